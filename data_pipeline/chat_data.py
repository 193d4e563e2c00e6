"""Supervised fine-tuning data: conversation records → ChatML text, and ChatML text → packed blocks of token ids with
a loss mask (only the assistant's tokens are trained on).

Run by `raygpt prepare CONFIG` (or the finetune stage of `raygpt run`) for sources with `format: chat`:
  - reading (`data_pipeline.units`): each record's `messages` (or Alpaca's instruction / input / output) is checked
    (`core.chat.check_messages`: known roles, no empty assistant turn) and rendered with ChatML, so that cleaning,
    exact dedup and the tokenizer work on it as on any text;
  - writing (`data_pipeline.passes.write_unit` → `ChatOut`): a conversation's tokens are masked by their characters
    (`core.chat.assistant_spans`: each assistant reply and its <|im_end|>, found in the tokenizer's offsets, so the
    ids are exactly those of tokenizing the whole text, as serving does), followed by one end-of-text (mask 0), and
    packed whole into blocks of seq_len + 1 (first fit over a few open blocks; the rest of a block is end-of-text,
    mask 0). A conversation longer than a block is truncated or dropped (`data.chat_overlong`), one without any
    assistant token left is skipped; both are counted in the manifest (`chat`).
A block is stored as one (2, seq_len + 1) array, ids over mask, so every block still takes the same tar bytes and the
training reader fetches it by offset. The trainer keeps packed conversations apart: attention stays inside the
conversation (its end-of-text tokens delimit it) and positions restart at each one (`model.gpt`, `segments`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from core.chat import CHATML, ChatError, assistant_spans, check_messages, render
from data_pipeline.config import DataError, SourceConfig
from data_pipeline.shards import SplitWriter

OPEN_BLOCKS = 8
"""Blocks kept open for first-fit packing: a conversation goes into the first with room; when more are needed the
fullest is written."""
COUNTS = ("conversations", "truncated", "dropped_overlong", "no_assistant_tokens", "assistant_tokens", "padding_tokens")
"""The manifest's `chat` totals per split."""


def conversation(record: Mapping[str, Any], src: SourceConfig) -> list[dict[str, str]]:
    """A record as checked {role, content} messages: its `messages_field`, else Alpaca's fields (request, with the
    optional input after a blank line, as the user; the output as the assistant). A ChatError names what is wrong."""
    if src.messages_field in record:
        messages = record[src.messages_field]
        if not isinstance(messages, list):
            raise ChatError(f"{src.messages_field}: a list of {{role, content}} messages, not {type(messages).__name__}")
        return check_messages(messages)
    request, reply = record.get(src.instruction_field), record.get(src.output_field)
    if not isinstance(request, str) or not isinstance(reply, str):
        raise ChatError(f"neither {src.messages_field!r} nor {src.instruction_field!r} and {src.output_field!r} "
                        f"(fields: {', '.join(record)})")
    extra = record.get(src.input_field)
    user = f"{request}\n\n{extra}" if isinstance(extra, str) and extra.strip() else request
    if src.user_template is not None:
        try:
            user = src.user_template.format_map(record)
        except (KeyError, IndexError, ValueError) as e:
            raise ChatError(f"user_template {src.user_template!r}: {type(e).__name__} {e} (fields: {', '.join(record)})")
    return check_messages([{"role": "user", "content": user}, {"role": "assistant", "content": reply}])


def chat_columns(src: SourceConfig, names: list[str]) -> list[str]:
    """The columns a chat source reads: its messages field, else the Alpaca fields the file has; a file with neither
    is one error."""
    if src.messages_field in names:
        return [src.messages_field]
    if src.instruction_field in names and src.output_field in names:
        if src.user_template is not None:  # it may name any field
            return list(names)
        return [f for f in (src.instruction_field, src.input_field, src.output_field) if f in names]
    raise DataError(f"no conversation fields: neither {src.messages_field!r} nor {src.instruction_field!r} and "
                    f"{src.output_field!r} (fields: {', '.join(names)}); set the source's messages_field or "
                    "instruction_field / output_field")


def chat_text(record: Any, src: SourceConfig) -> str:
    """The ChatML text of one conversation record (what is cleaned, deduplicated and tokenized)."""
    if not isinstance(record, Mapping):
        raise ChatError("not a JSON object")
    return render(CHATML, conversation(record, src))


def token_mask(offsets: list[tuple[int, int]], text: str) -> np.ndarray:
    """1 for each token whose first character lies in an assistant reply (or is its <|im_end|>), else 0."""
    mask = np.zeros(len(offsets), dtype=np.int64)
    starts = np.array([start for start, _ in offsets], dtype=np.int64)
    for begin, end in assistant_spans(text):
        mask[(starts >= begin) & (starts < end)] = 1
    return mask


class ChatOut(SplitWriter):
    """One split of a chat unit: conversations packed whole into (2, block_len) blocks of ids and loss mask."""

    sample_key, rows = "ids_mask.npy", 2

    def __init__(self, *args: Any, overlong: str, end_of_text: int) -> None:
        super().__init__(*args)
        self.overlong, self.eot = overlong, end_of_text
        self.open: list[list[np.ndarray]] = []  # each: the (2, n) conversations placed in one block
        self.fill: list[int] = []
        self.chat = dict.fromkeys(COUNTS, 0)

    def add(self, docs: list[tuple[Any, str]], text_bytes: int, eot: int) -> None:
        """Conversations (an encoding with offsets, its text) → masked, packed, written as blocks fill."""
        self.totals["documents"] += len(docs)
        self.totals["text_bytes"] += text_bytes
        for encoding, text in docs:
            self.totals["doc_tokens"] += len(encoding.ids)
            self.chat["conversations"] += 1
            ids = np.append(np.asarray(encoding.ids, dtype=np.int64), eot)  # the end-of-text closes the conversation
            mask = np.append(token_mask(encoding.offsets, text), 0)
            if len(ids) > self.block_len:
                if self.overlong == "drop":
                    self.chat["dropped_overlong"] += 1
                    continue
                self.chat["truncated"] += 1
                ids, mask = ids[: self.block_len], mask[: self.block_len]
            if not mask[1:].any():  # position 0 of a block is never a target
                self.chat["no_assistant_tokens"] += 1
                continue
            self.chat["assistant_tokens"] += int(mask[1:].sum())
            self._place(np.stack([ids, mask]))

    def _place(self, pair: np.ndarray) -> None:
        n = pair.shape[1]
        for i, used in enumerate(self.fill):
            if used + n <= self.block_len:
                self.open[i].append(pair)
                self.fill[i] += n
                return
        if len(self.open) == OPEN_BLOCKS:
            self._emit(int(np.argmax(self.fill)))
        self.open.append([pair])
        self.fill.append(n)

    def _emit(self, i: int) -> None:
        """Write open block i, its free end filled with end-of-text (mask 0)."""
        parts, used = self.open.pop(i), self.fill.pop(i)
        block = np.zeros((2, self.block_len), dtype=self.dtype)
        block[0, used:] = self.eot
        block[:, :used] = np.concatenate(parts, axis=1)
        self.chat["padding_tokens"] += self.block_len - used
        self.write_blocks(block[None])

    def tail(self) -> dict[str, Any]:
        while self.open:  # in the order they were opened: the same bytes on every run
            self._emit(0)
        return {"tail_tokens": 0, "chat": self.chat}
