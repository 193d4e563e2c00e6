"""A checkpoint's chat template reaches transformers and llama.cpp: `apply_chat_template` on the exported tokenizer
gives raygpt's text and ids, the exported generation config stops at the end of a turn, an imported model keeps its
own template, and a GGUF file names it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.chat import CHATML, END, render
from model.checkpoint import load_checkpoint, save_checkpoint
from model.export import export
from model.hf_import import import_hf
from tests.conftest import perturbed_model
from tests.core.test_chat import CONVERSATION


def test_exported_tokenizer_formats_conversations_as_raygpt(checkpoint: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    loaded = load_checkpoint(checkpoint)
    assert loaded.chat_template == CHATML  # the tokenizer was trained with the default special tokens
    out = export(checkpoint, tmp_path / "hf")
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHATML
    theirs = AutoTokenizer.from_pretrained(out)
    for messages, prompt in ((CONVERSATION, False), (CONVERSATION[:2], True)):
        text = render(CHATML, messages, add_generation_prompt=prompt)
        assert theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt) == text
        ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt, return_dict=False)
        assert list(ids) == loaded.tokenizer.encode(text, add_special_tokens=False).ids
    assert GenerationConfig.from_pretrained(out).eos_token_id == [loaded.eot_id, loaded.tokenizer.token_to_id(END)]


def test_an_imported_models_own_template_is_kept(tokenizer_file: Path, tmp_path: Path) -> None:
    own = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    ours = save_checkpoint(perturbed_model("llama"), tmp_path / "ckpt", tokenizer_file)
    hf = export(ours, tmp_path / "hf")
    config = json.loads((hf / "tokenizer_config.json").read_text())
    (hf / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": own}))
    back = load_checkpoint(import_hf(hf, tmp_path / "back"))
    assert back.chat_template == own and render(back.chat_template, CONVERSATION[1:2]) == "[user] 2+2?\n"


@pytest.mark.kernels
def test_gguf_carries_the_chat_template(tokenizer_file: Path, tmp_path: Path) -> None:
    from llama_cpp import Llama

    from model.export_gguf import export_gguf

    folder = save_checkpoint(perturbed_model("llama"), tmp_path / "ckpt", tokenizer_file)
    path = export_gguf(folder, tmp_path / "m.gguf", "f16")
    meta = Llama(str(path), n_ctx=64, verbose=False).metadata
    assert meta["tokenizer.chat_template"] == CHATML
    assert int(meta["tokenizer.ggml.eot_token_id"]) == load_checkpoint(folder).tokenizer.token_to_id(END)
