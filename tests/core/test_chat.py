"""The chat format: ChatML rendering, the conversation checks (one line each), and which tokenizers carry ChatML."""

from __future__ import annotations

import pytest

from core.chat import CHATML, ChatError, check_messages, default_template, render

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]


def test_chatml_renders_each_turn_and_the_generation_prompt() -> None:
    text = render(CHATML, CONVERSATION)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n4<|im_end|>\n")
    assert render(CHATML, CONVERSATION[:2], add_generation_prompt=True).endswith("2+2?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("messages, problem", [
    ([], "messages: the conversation is empty"),
    ([{"role": "robot", "content": "hi"}], "messages[0].role: 'robot' is not one of system, user, assistant"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], "messages[1]: an empty assistant turn"),
    ([{"role": "user", "content": 3}], "messages[0].content: must be a string (or text parts)"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content: must be a string (or text parts)"),
    (["hi"], "messages[0]: a message is an object with role and content"),
])
def test_bad_conversations_are_one_line(messages: list, problem: str) -> None:
    with pytest.raises(ChatError) as error:
        check_messages(messages)
    assert str(error.value) == problem


def test_a_tokenizer_with_chatmls_tokens_carries_chatml() -> None:
    assert default_template({"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}) == CHATML
    assert default_template({"<|endoftext|>": 0}) is None
    assert check_messages(CONVERSATION) == CONVERSATION
    parts = [{"role": "user", "content": [{"type": "text", "text": "2+"}, {"type": "text", "text": "2?"}]}]
    assert check_messages(parts) == [{"role": "user", "content": "2+2?"}]  # OpenAI's content parts, text only
