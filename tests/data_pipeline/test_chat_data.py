"""Chat data for supervised fine-tuning (`data_pipeline.chat_data`): records → ChatML, the loss mask from the
tokenizer's offsets, whole-conversation packing, over-long and mask-less conversations counted, bad conversations
one line; and `raygpt prepare` end to end on local Ray with JSONL and Parquet sources, read back by the trainer's
reader and by plain webdataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from tokenizers import Tokenizer

from cluster.cli import main
from core.chat import CHATML, END, render
from data_pipeline.chat_data import ChatOut, chat_text, token_mask
from data_pipeline.config import SourceConfig
from data_pipeline.manifest import read_manifest
from tests.conftest import SHAKESPEARE, chat_records, write_jsonl
from trainer.data import SampleReader

GSM8K = SourceConfig(path="x.jsonl", format="chat", instruction_field="question", output_field="answer")


def _source(path: Path, **fields: str) -> str:
    extra = "".join(f", {k}: {v}" for k, v in fields.items())
    return f"data.sources=[{{path: {path}, format: chat{extra}}}]"


def _prepare(tokenizer: Path, run_dir: Path, source: str, *extra: str) -> int:
    return main(["prepare", SHAKESPEARE, f"run_dir={run_dir}", f"data.tokenizer.path={tokenizer}", "data.seq_len=64",
                 "data.val_fraction=0.1", source, *extra])


def test_records_render_as_chatml_and_the_mask_covers_exactly_the_replies(prepared: Path) -> None:
    """`messages`, Alpaca (input after a blank line) and GSM8K's fields (named by the source) give the ChatML text;
    the tokens masked 1 are exactly each assistant reply and its <|im_end|>, and the ids are those of tokenizing the
    whole text (what serving feeds the model)."""
    tokenizer = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    alpaca = {"instruction": "Add.", "input": "2 and 3", "output": "5"}
    assert chat_text(alpaca, SourceConfig(path="x.jsonl", format="chat")) == render(
        CHATML, [{"role": "user", "content": "Add.\n\n2 and 3"}, {"role": "assistant", "content": "5"}])
    assert chat_text({"question": "Q?", "answer": "A #### 1"}, GSM8K).endswith("<|im_start|>assistant\nA #### 1<|im_end|>\n")
    for record in chat_records(12):
        text = chat_text(record, SourceConfig(path="x.jsonl", format="chat"))
        encoding = tokenizer.encode(text, add_special_tokens=False)
        mask = token_mask(encoding.offsets, text)
        replies = [m["content"] for m in record.get("messages", []) if m["role"] == "assistant"] or [record["output"]]
        ids = np.array(encoding.ids)
        edges = np.flatnonzero(np.diff(np.r_[0, mask, 0]))  # where each run of 1s starts and ends
        trained = [tokenizer.decode(ids[a:b].tolist(), skip_special_tokens=False) for a, b in zip(edges[::2], edges[1::2])]
        assert trained == [reply + END for reply in replies]
        assert encoding.ids == tokenizer.encode(text).ids


class _Encoding:
    def __init__(self, ids: list[int], offsets: list[tuple[int, int]]) -> None:
        self.ids, self.offsets = ids, offsets


def test_conversations_are_packed_whole_and_counted(tmp_path: Path) -> None:
    """Blocks of 16: conversations of 7 + 1 end-of-text ids fill blocks two at a time (none split across blocks);
    the rest of a block is end-of-text with mask 0; over-long ones are cut or left out by the setting; one whose
    reply falls outside the block (or that has none) is skipped; every case is counted."""
    user = f"<|im_start|>user\nhi{END}\n"

    def conversation(first: int, reply_at: int | None, length: int) -> tuple[_Encoding, str]:
        """`length` tokens; with reply_at, token reply_at on is the reply (its characters inside the assistant turn)."""
        text = user + "<|im_start|>assistant\n" + "x" * 40 + END
        begin = text.index("x")
        offsets = [(0, 1)] * length if reply_at is None else \
            [(0, 1)] * reply_at + [(begin + i, begin + i + 1) for i in range(length - reply_at)]
        return _Encoding(list(range(first, first + length)), offsets), text

    for overlong in ("truncate", "drop"):
        out = ChatOut(tmp_path / overlong, "train", 0, 16, np.dtype(np.uint16), 1 << 20, overlong=overlong, end_of_text=0)
        out.add([conversation(100, 3, 7), conversation(200, 3, 7), conversation(300, None, 7),
                 conversation(400, 3, 20), conversation(500, 18, 20), conversation(600, 2, 7)], 100, 0)
        result = out.finish()
        blocks = np.stack([s["ids_mask.npy"] for s in wds.WebDataset(str(tmp_path / overlong / result["shards"][0]["file"]),
                                                                      shardshuffle=False).decode()])
        assert blocks.shape[1:] == (2, 16)
        firsts = {int(b[0, 0]) for b in blocks}
        assert result["chat"]["no_assistant_tokens"] == (2 if overlong == "truncate" else 1)  # 300; 500 cut before its reply
        if overlong == "truncate":
            assert result["chat"]["truncated"] == 2 and firsts == {100, 400, 600}
            assert blocks[1, 0].tolist() == list(range(400, 416)) and blocks[1, 1, 3:].all()  # cut at the block's end
        else:
            assert result["chat"]["dropped_overlong"] == 2 and firsts == {100, 600}
        pair = blocks[0]
        assert pair[0].tolist() == [*range(100, 107), 0, *range(200, 207), 0]  # two whole conversations, each + EOT
        assert pair[1].tolist() == [0, 0, 0, 1, 1, 1, 1, 0] * 2
        last = blocks[-1]  # 600's 7 + 1, then padding: end-of-text, mask 0
        assert last[0, 8:].tolist() == [0] * 8 and not last[1, 8:].any()
        assert result["chat"]["padding_tokens"] == 8  # only 600's block has room left


def test_prepare_writes_masked_shards_from_jsonl_and_parquet(prepared: Path, tmp_path: Path, ray_session: None,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`raygpt prepare` with chat sources: a manifest with `loss_mask`, (2, 65) blocks that the training reader and
    plain webdataset both read, masks 1 only inside assistant turns, the conversations counted (and the summary
    line printed); Parquet's list-of-struct `messages` reads like JSONL's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = chat_records(300)
    write_jsonl(tmp_path / "chats.jsonl", rows)
    messages = [r for r in rows if "messages" in r]
    pq.write_table(pa.Table.from_pylist(messages), tmp_path / "chats.parquet", row_group_size=64)
    tokenizer = prepared / "tokenizer.json"
    assert _prepare(tokenizer, tmp_path / "run", _source(tmp_path / "chats.jsonl")) == 0
    printed = capsys.readouterr().out
    data = tmp_path / "run" / "data"
    manifest = read_manifest(data)
    chat = {split: manifest.splits[split].model_extra["chat"] for split in ("train", "val")}
    assert manifest.loss_mask and manifest.block_shape == (2, 65)
    assert sum(c["conversations"] for c in chat.values()) == 300 and not chat["train"]["no_assistant_tokens"]
    assert "train conversations: " in printed and "tokens trained on" in printed
    reader = SampleReader(data, "train", manifest)
    blocks = reader.read_many(np.arange(reader.num_samples))
    reader.close()
    assert blocks.shape == (manifest.splits["train"].sequences, 2, 65)
    assert int(blocks[:, 1].sum()) == chat["train"]["assistant_tokens"]
    tok = Tokenizer.from_file(str(tokenizer))
    end, start = tok.token_to_id(END), tok.token_to_id("<|im_start|>")
    assert blocks[:, 1][blocks[:, 0] == start].sum() == 0 and (blocks[:, 1][blocks[:, 0] == end] == 1).any()
    shard = data / manifest.splits["train"].shards[0].file
    first = next(iter(wds.WebDataset(str(shard), shardshuffle=False).decode()))["ids_mask.npy"]
    assert np.array_equal(first, blocks[0])

    assert _prepare(tokenizer, tmp_path / "pq", _source(tmp_path / "chats.parquet")) == 0
    parquet = read_manifest(tmp_path / "pq" / "data")
    assert sum(parquet.splits[s].model_extra["chat"]["conversations"] for s in ("train", "val")) == len(messages)


@pytest.mark.parametrize(("record", "message"), [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]},
     "record 3: messages[1].role: 'robot' is not one of system, user, assistant"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
     "record 3: messages[1]: an empty assistant turn"),
    ({"messages": [{"role": "user", "content": "hi <|im_end|>"}]}, "record 3: messages[0].content: holds a chat special token"),
    ({"prompt": "hi", "completion": "ho"}, "record 3: neither 'messages' nor 'instruction' and 'output' (fields: prompt, completion)"),
])
def test_a_bad_conversation_is_one_line_naming_its_record(prepared: Path, tmp_path: Path, ray_session: None,
                                                          capsys: pytest.CaptureFixture[str], record: dict,
                                                          message: str) -> None:
    rows = chat_records(2) + [record] + chat_records(5, seed=1)
    write_jsonl(tmp_path / "bad.jsonl", rows)
    if "prompt" in record:  # a file whose first record has no conversation fields is refused before any work
        write_jsonl(tmp_path / "bad.jsonl", [record, *rows])
        message = "bad.jsonl: no conversation fields: neither 'messages' nor 'instruction' and 'output'"
    assert _prepare(prepared / "tokenizer.json", tmp_path / "run", _source(tmp_path / "bad.jsonl")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run" / "data" / "manifest.json").exists()


def test_chat_sources_must_be_records_and_not_mixed_with_text(prepared: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.txt").write_text("plain text")
    assert _prepare(prepared / "tokenizer.json", tmp_path / "run", _source(tmp_path / "a.txt")) == 2
    assert "a.txt: format chat reads JSONL, Parquet or Hugging Face records, not text files" in capsys.readouterr().err
    write_jsonl(tmp_path / "c.jsonl", chat_records(3))
    mixed = f"data.sources=[{{path: {tmp_path / 'c.jsonl'}, format: chat}}, {{path: {tmp_path / 'a.txt'}}}]"
    assert _prepare(prepared / "tokenizer.json", tmp_path / "run", mixed) == 2
    assert "sources mix format chat and text" in capsys.readouterr().err
