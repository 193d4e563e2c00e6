"""Bits per byte and perplexity of a checkpoint on token streams, with batched sliding windows.

    raygpt eval configs/demo.yaml          # val shards and every `eval.texts` file

A stream of n+1 tokens has n targets. Windows span `context` tokens and advance by `stride`; each window scores only
the targets no earlier window scored, so every target is scored exactly once, with at least `context - stride` tokens
of left context once the stream is long enough (the Hugging Face perplexity recipe). stride == context gives disjoint windows, which is
exactly lm-eval's rolling loglikelihood; a smaller stride gives each scored token more context (lower, fairer
perplexity) at proportionally more compute.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from core.layout import Location
from core.progress import Progress
from data_pipeline.manifest import read_manifest
from model.gpt import GPT


@dataclass
class StreamScore:
    """The summed negative log-likelihood of a stream and what it is normalised by."""

    nll: float
    """Sum of -ln p(target) over scored targets (nats)."""
    tokens: int
    """Targets scored."""
    bytes: float
    """UTF-8 bytes of text those targets encode."""

    @property
    def metrics(self) -> dict[str, float]:
        return {
            "bits_per_byte": self.nll / math.log(2) / self.bytes,
            "byte_perplexity": math.exp(self.nll / self.bytes),
            "token_perplexity": math.exp(self.nll / self.tokens),
            "loss": self.nll / self.tokens,
            "tokens": self.tokens,
            "bytes": self.bytes,
        }

    def to_json(self) -> dict[str, float]:
        return asdict(self) | self.metrics


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) for a stream with targets 1..n: inputs are tokens[begin:end], targets tokens[begin+1:end+1],
    and the last `scored` targets of the window count. Window ends advance by `stride`; every window (the last one too)
    spans the full context where the stream allows, as lm-eval's rolling windows do."""
    if not 1 <= stride <= context:
        raise ValueError(f"stride {stride} must be between 1 and the context length {context}")
    spans, prev_end = [], 0
    for end in range(min(context, n), n + stride, stride):
        end = min(end, n)
        spans.append((max(0, end - context), end, end - prev_end))
        prev_end = end
        if end == n:
            break
    return spans


@torch.inference_mode()
def score_tokens(
    model: GPT, tokens: np.ndarray | list[int], context: int, stride: int, batch_size: int, desc: str | None = "windows"
) -> tuple[float, int]:
    """Summed NLL (nats, float64) and number of scored targets of one token stream; progress lines named `desc`
    (None: none)."""
    seq = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    n = len(seq) - 1
    if n < 1:
        return 0.0, 0
    device = next(model.parameters()).device
    spans = windows(n, context, stride)
    total = 0.0
    progress = Progress("eval", desc or "", len(spans), unit="windows", enabled=desc is not None)
    for i in range(0, len(spans), batch_size):
        chunk = spans[i : i + batch_size]
        width = max(end - begin for begin, end, _ in chunk)
        inputs = torch.zeros(len(chunk), width, dtype=torch.long)  # (B, T), right-padded
        targets = torch.full((len(chunk), width), -1, dtype=torch.long)  # -1: not scored
        for row, (begin, end, scored) in enumerate(chunk):
            inputs[row, : end - begin] = seq[begin:end]
            targets[row, end - begin - scored : end - begin] = seq[end - scored + 1 : end + 1]
        logits, _ = model(inputs.to(device))  # (B, T, V)
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten(), ignore_index=-1, reduction="sum")
        total += nll.double().item()
        progress.update(len(chunk))
    return total, n


def score_val_shards(model: GPT, data_dir: Location, context: int, stride: int, batch_size: int, max_tokens: int | None,
                     progress: bool = True, source: str | None = None) -> StreamScore:
    """The val split (or one source's part of it) as one stream, its blocks concatenated in shard order; bytes from
    the manifest's ratio."""
    manifest = read_manifest(data_dir)
    stream = np.concatenate(list(manifest.blocks(data_dir, "val", source)))
    if max_tokens:
        stream = stream[: max_tokens + 1]
    desc = ("val shards" + (f" of {source}" if source else "")) if progress else None
    nll, n = score_tokens(model, stream, context, stride, batch_size, desc=desc)
    return StreamScore(nll=nll, tokens=n, bytes=n / manifest.tokens_per_byte("val", source))


def score_text(
    model: GPT, text: str, tokenizer: Tokenizer, eot_id: int, context: int, stride: int, batch_size: int,
    max_tokens: int | None = None, name: str = "text", progress: bool = True,
) -> StreamScore:
    """A text as one stream prefixed by the end-of-text token; bytes are those of the text the scored tokens cover."""
    encoding = tokenizer.encode(text, add_special_tokens=False)
    ids = encoding.ids
    covered = len(text.encode("utf-8"))
    if max_tokens and len(ids) > max_tokens:
        ids = ids[:max_tokens]
        covered = len(text[: encoding.offsets[max_tokens - 1][1]].encode("utf-8"))  # offsets are character spans
    nll, n = score_tokens(model, [eot_id, *ids], context, stride, batch_size, desc=name if progress else None)
    return StreamScore(nll=nll, tokens=n, bytes=covered)
