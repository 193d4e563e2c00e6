"""The chat format: the role and end-of-turn special tokens a tokenizer reserves, the chat template a checkpoint
carries, and rendering a conversation with it exactly as transformers' `apply_chat_template` does.

    python -c "from core.chat import CHATML, render; print(render(CHATML, [{'role': 'user', 'content': 'Hi'}], True))"

raygpt's own template is ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n` per message), the format Qwen, SmolLM and
many open chat models use, which llama.cpp and Ollama recognise by name. A tokenizer trained by `raygpt prepare` reserves
its two tokens (`data.tokenizer.special_tokens`), so a checkpoint whose tokenizer has them carries ChatML; a checkpoint
may also name its own template (an imported Hugging Face model's, in config.json's `chat_template`). Templates are
Jinja, rendered in jinja2's sandbox with the settings transformers uses, so raygpt and transformers format a
conversation identically (tested against `apply_chat_template`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

START, END = "<|im_start|>", "<|im_end|>"
"""ChatML's turn tokens: a turn is START role \\n content END \\n."""
CHAT_TOKENS = (START, END)
ROLES = ("system", "user", "assistant")

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""ChatML as a Jinja chat template (what export writes into tokenizer_config.json and GGUF)."""


class ChatError(ValueError):
    """A conversation that cannot be formatted (unknown role, missing or empty content); one line."""


def default_template(vocab: Mapping[str, int] | Any) -> str | None:
    """ChatML when a tokenizer (anything with `token_to_id`, or a vocabulary mapping) has both of its tokens."""
    has = (lambda t: vocab.token_to_id(t) is not None) if hasattr(vocab, "token_to_id") else (lambda t: t in vocab)
    return CHATML if all(has(token) for token in CHAT_TOKENS) else None


def stop_ids(tokenizer: Any, eot_id: int | None, template: str | None) -> list[int]:
    """The ids a reply stops at: end-of-text, and with ChatML the end of a turn (`END`). `tokenizer`: anything with
    `token_to_id`."""
    ids = [] if eot_id is None else [eot_id]
    end = tokenizer.token_to_id(END) if template == CHATML else None
    return ids + ([end] if end is not None and end not in ids else [])


def check_messages(messages: Sequence[Mapping[str, Any]], allow_empty_last: bool = False) -> list[dict[str, str]]:
    """The conversation as plain {role, content} dicts, or a ChatError naming the first bad message. Every message
    needs a known role and string content (OpenAI's list of text parts is joined); an assistant turn may not be empty
    (nothing to learn or show), except a last one a caller prefills (`allow_empty_last`)."""
    if not messages:
        raise ChatError("messages: the conversation is empty")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatError(f"messages[{i}]: a message is an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ChatError(f"messages[{i}].role: {role!r} is not one of {', '.join(ROLES)}")
        if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
            content = "".join(str(part.get("text", "")) for part in content)  # OpenAI's content parts, text only
        if not isinstance(content, str):
            raise ChatError(f"messages[{i}].content: must be a string (or text parts)")
        if role == "assistant" and not content.strip() and not (allow_empty_last and i == len(messages) - 1):
            raise ChatError(f"messages[{i}]: an empty assistant turn")
        if any(token in content for token in CHAT_TOKENS):  # it would end the turn early or start a forged one
            raise ChatError(f"messages[{i}].content: holds a chat special token ({' or '.join(CHAT_TOKENS)})")
        out.append({"role": role, "content": content})
    return out


def _environment() -> Any:
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ChatError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env


def render(template: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
           continue_final_message: bool = False) -> str:
    """The conversation as the text the model reads; with `add_generation_prompt`, ending where the assistant's
    reply begins; with `continue_final_message`, ending right after the last message's content (a reply to go on
    with: its end-of-turn is cut, as transformers' option of that name does)."""
    compiled = _environment().from_string(template)
    text = compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt)
    if continue_final_message:
        final = str(messages[-1]["content"]).strip()
        if final not in text:
            raise ChatError("continue_final_message: the template does not show the last message's content as given")
        text = text[: text.rindex(final) + len(final)]
    return text


_ASSISTANT_TURN = re.compile(re.escape(f"{START}assistant\n") + r"(.*?)" + re.escape(END), re.DOTALL)


def assistant_spans(text: str) -> list[tuple[int, int]]:
    """[start, end) character spans of a ChatML text that a fine-tuned model learns to write: each assistant turn's
    content and its end-of-turn token (content holds no chat token: `check_messages`)."""
    return [(m.start(1), m.end()) for m in _ASSISTANT_TURN.finditer(text)]
