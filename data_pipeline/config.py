"""The `data` section of the run config: sources, cleaning, tokenizer, packing and sharding.

Loaded as part of the root config by `cluster.config.load_config`; used by `raygpt prepare CONFIG`.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Literal

from pydantic import Field, model_validator

from core.chat import CHAT_TOKENS
from core.config import Section
from core.errors import UserError


class DataError(UserError, ValueError):
    """Bad input to the data pipeline (missing path, unreadable source, empty corpus); one line for the user."""


SourceType = Literal["auto", "text", "jsonl", "parquet", "hf", "python-stdlib"]


class SourceConfig(Section):
    """One input of the corpus."""

    path: str = ""
    """A file, directory, glob or URI (s3://, gs://); a Hugging Face dataset name or saved-dataset folder for type 'hf';
    unused for 'python-stdlib'."""
    type: SourceType = "auto"
    """'text' (txt/md/code files), 'jsonl', 'parquet', 'hf', 'python-stdlib' (this interpreter's standard library
    .py files); 'auto' infers it from the file extension or the path 'python-stdlib'."""
    split_by: Literal["file", "paragraph", "line"] = "file"
    """Text files only: one document per file, per blank-line-separated paragraph, or per line."""
    text_field: str = "text"
    """JSONL / Parquet / Hugging Face sources: the field holding the document text."""
    format: Literal["text", "chat"] = "text"
    """'chat': JSONL / Parquet / Hugging Face records are conversations for supervised fine-tuning, each rendered
    with ChatML (`core.chat`) and trained on its assistant tokens only (`data_pipeline.chat_data`): a list of
    {role, content} in `messages_field`, else Alpaca's instruction / input / output (the three fields below)."""
    messages_field: str = "messages"
    """Chat sources: the field holding the list of {role, content} messages."""
    instruction_field: str = "instruction"
    """Chat sources without messages: the field holding the user's request (Alpaca's `instruction`; GSM8K's
    `question`)."""
    user_template: str | None = None
    """Chat sources without messages: the user turn written from the record's fields with Python's `str.format`, e.g.
    'Question: {question}\nAnswer:' (the prompt lm-eval's gsm8k task puts in the user turn); None: the instruction
    field, and the input field after a blank line."""
    input_field: str = "input"
    """Chat sources without messages: an optional field appended to the request after a blank line (Alpaca)."""
    output_field: str = "output"
    """Chat sources without messages: the field holding the assistant's reply (Alpaca's `output`; GSM8K's `answer`)."""
    extensions: list[str] = [".txt", ".md", ".rst", ".py"]
    """Text sources given as a directory: the file extensions taken from it (recursively)."""
    hf_config: str | None = None
    """Hugging Face sources: the dataset configuration name (e.g. 'wikitext-103-raw-v1')."""
    hf_split: str = "train"
    """Hugging Face sources: the split to read."""
    follow_symlinks: bool = False
    """Directory sources: also read files through symbolic links that lead outside the directory."""
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    """The source's name in the manifest, the metrics and `data.mixture` (letters, digits, `_.-`); default: from its
    path (`input` for `.../input.txt`), numbered when two would share one."""
    weight: Annotated[float, Field(gt=0)] | None = None
    """Share of every global batch drawn from this source (weights are normalized to sum to 1). Give a weight to every
    source or to none: none draws every block of the corpus alike, so each source in proportion to its tokens."""

    @model_validator(mode="after")
    def _path_given(self) -> SourceConfig:
        if self.type != "python-stdlib" and not self.path:
            raise ValueError("path is required for this source type")
        if self.format == "chat" and self.type in ("text", "python-stdlib"):
            raise ValueError(f"format chat reads records (jsonl, parquet, hf), not a {self.type} source")
        return self

    def default_name(self) -> str:
        """A name from the path: its last part without a glob, less extensions (`web` for `s3://b/web/*.parquet`)."""
        for part in reversed(self.path.rstrip("/").split("/")):
            if part and not re.search(r"[*?\[]", part):
                name = re.sub(r"[^A-Za-z0-9_-]", "-", part.split(".")[0]).strip("-_")[:64]
                if name:
                    return name
        return self.type


class MixturePhase(Section):
    """One phase of `data.mixture`: the share of each source in the global batches up to a step."""

    until_step: int | None = Field(default=None, ge=1)
    """The last step (1-based, as logged) of this phase; the last phase has none and runs to the end."""
    weights: dict[str, Annotated[float, Field(gt=0)]] = Field(min_length=1)
    """Source name → weight (normalized to sum to 1); a source not named gets no sample in this phase."""


class MinHashConfig(Section):
    """Near-duplicate removal with MinHash + locality-sensitive hashing."""

    enabled: bool = False
    """Drop documents whose MinHash signature collides in some LSH band with a document of smaller hash."""
    ngram: int = Field(default=5, ge=1)
    """Word n-gram size of the shingles."""
    bands: int = Field(default=16, ge=1)
    """LSH bands; a pair is a candidate when all rows of one band agree."""
    rows: int = Field(default=8, ge=1)
    """Rows per band; bands × rows permutations, Jaccard threshold ≈ (1/bands)^(1/rows) (16 × 8 → 0.71)."""


class CleanConfig(Section):
    """Per-document cleaning and filtering; every drop is counted by reason in the manifest."""

    normalize: Literal["NFC", "NFKC", "none"] = "NFC"
    """Unicode normalization form applied to every document."""
    invalid_utf8: Literal["replace", "drop"] = "replace"
    """Text files with invalid UTF-8: replace bad bytes with U+FFFD (counted) or drop the document."""
    strip_control_chars: bool = True
    """Remove C0/C1 control characters except tab and newline; CRLF and CR become LF."""
    min_chars: int = Field(default=1, ge=1)
    """Documents shorter than this (after cleaning) are dropped as 'too_short'."""
    max_chars: int | None = Field(default=None, ge=1)
    """Documents longer than this are dropped as 'too_long'; None keeps every length."""
    dedup: bool = True
    """Exact deduplication by content hash across the whole corpus: every copy meets in its hash bucket's task, and
    all but the first (in source order) are dropped before tokenizing."""
    minhash: MinHashConfig = MinHashConfig()
    """Near-duplicate removal (off by default)."""


class TokenizerConfig(Section):
    """The tokenizer: trained on a sample of the cleaned corpus, or loaded from a file."""

    path: str | None = None
    """An existing Hugging Face `tokenizer.json` to use instead of training one."""
    type: Literal["bpe", "wordpiece"] = "bpe"
    """Model trained: byte-level BPE (lossless, GPT-2 style) or WordPiece (BERT style, lowercases nothing)."""
    vocab_size: int = Field(default=8192, ge=64, le=1 << 20)
    """Vocabulary size of the trained tokenizer, special tokens included."""
    min_frequency: int = Field(default=2, ge=1)
    """Merges of pairs seen fewer times than this are not learned."""
    special_tokens: list[str] = ["<|endoftext|>", *CHAT_TOKENS]
    """Special tokens added to the vocabulary first (ids 0, 1, ...). The default reserves ChatML's turn tokens
    <|im_start|> / <|im_end|> beside end-of-text, so every checkpoint of the run carries the ChatML chat template
    (`core.chat`) that fine-tuning, `/v1/chat/completions` and the exports use."""
    eot_token: str = "<|endoftext|>"
    """End-of-text token that separates packed documents; must be a special token of the tokenizer."""
    sample_bytes: int = Field(default=50_000_000, ge=1)
    """Bytes of cleaned text to train on: a deterministic sample of documents chosen by content hash."""

    @model_validator(mode="after")
    def _eot_is_special(self) -> TokenizerConfig:
        if self.path is None and self.eot_token not in self.special_tokens:
            raise ValueError(f"eot_token {self.eot_token!r} must be one of special_tokens")
        floor = 256 + len(set(self.special_tokens))  # byte-level BPE starts from all 256 bytes
        if self.path is None and self.type == "bpe" and self.vocab_size < floor:
            raise ValueError(f"vocab_size {self.vocab_size} is below byte-level BPE's {floor} (256 bytes + "
                             f"{len(set(self.special_tokens))} special token(s)); give at least {floor}")
        return self


class DataConfig(Section):
    """Corpus → cleaned documents → tokenizer → packed token blocks in webdataset shards."""

    sources: list[SourceConfig] = Field(min_length=1)
    """The inputs of the corpus, read in this order."""
    clean: CleanConfig = CleanConfig()
    """Cleaning, filtering and deduplication."""
    tokenizer: TokenizerConfig = TokenizerConfig()
    """Tokenizer training or loading."""
    seq_len: int = Field(default=256, ge=1, le=1 << 20)
    """Training context length; every stored block holds seq_len + 1 token ids (inputs and shifted targets)."""
    val_fraction: float = Field(default=0.01, ge=0.0, lt=1.0)
    """Fraction of documents (chosen by content hash, so deterministic) that go to the val split."""
    shard_bytes: int = Field(default=100_000_000, ge=1024)
    """Largest webdataset shard in bytes: each unit's blocks of a split go to tars of at most this size."""
    unit_bytes: int | None = Field(default=None, ge=1024)
    """Input bytes per unit of work (files grouped, JSONL byte ranges, Parquet row groups): each unit is read,
    deduplicated and tokenized as a stream by one task, resumed as a whole, and written as its own shards. None: about
    1/64 of the corpus, 4-256 MB. Fixed by the corpus and config, never by the number of nodes or CPUs."""
    batch_bytes: int = Field(default=8_000_000, ge=1024)
    """Text that one prepare task holds at a time (one batch of documents): with the CPUs, it bounds prepare's memory
    (about 10 × batch_bytes per task, whatever the corpus size). Does not change the output."""
    chat_overlong: Literal["truncate", "drop"] = "truncate"
    """Chat data: a conversation longer than seq_len + 1 tokens is cut there ('truncate', trained on the assistant
    tokens that fit) or left out ('drop'); either way counted in the manifest's `chat` totals."""
    overwrite: bool = False
    """Re-prepare even when RUN_DIR/data holds a finished manifest of the same config (or of another config)."""
    mixture: list[MixturePhase] | None = None
    """A schedule of source weights, e.g. `[{until_step: 9000, weights: {web: 0.7, code: 0.3}}, {weights: {web: 0.5,
    code: 0.2, math: 0.3}}]`: steps 1-9000 draw 70% web, later steps the second mix. Used by `train` (not `prepare`):
    changing it is another run, except that a phase may be extended (a later `until_step`) past the step reached."""

    @model_validator(mode="after")
    def _mixture_names_sources(self) -> DataConfig:
        names = self.source_names()
        if len({s.format for s in self.sources}) > 1:
            raise ValueError("sources mix format chat and text: chat data (trained on a loss mask) is prepared on its "
                             "own, in a data section of its own (e.g. finetune.data)")
        weighted = [s.weight is not None for s in self.sources]
        if any(weighted) and not all(weighted):
            raise ValueError("give a weight to every source or to none (sources without one: "
                             + ", ".join(n for n, w in zip(names, weighted) if not w) + ")")
        if self.mixture is not None:
            if any(weighted):
                raise ValueError("give the weights either in data.sources or in data.mixture, not both")
            for i, phase in enumerate(self.mixture):
                if unknown := sorted(set(phase.weights) - set(names)):
                    raise ValueError(f"mixture[{i}] names {', '.join(unknown)}: no such source "
                                     f"(sources: {', '.join(names)})")
                last = i == len(self.mixture) - 1
                if last != (phase.until_step is None):
                    raise ValueError(f"mixture[{i}]: every phase but the last needs an until_step, and the last has none")
                if i and phase.until_step is not None and phase.until_step <= (self.mixture[i - 1].until_step or 0):
                    raise ValueError(f"mixture[{i}]: until_step {phase.until_step} is not after the previous phase's")
        return self

    def source_names(self) -> list[str]:
        """Each source's name: given, or from its path (numbered -2, -3 ... when names repeat)."""
        given = [s.name for s in self.sources if s.name]
        if len(set(given)) < len(given):
            raise ValueError(f"source names repeat: {', '.join(sorted(n for n in set(given) if given.count(n) > 1))}")
        names: list[str] = []
        for source in self.sources:
            name = source.name or source.default_name()
            base, n = name, 1
            while name in names or (not source.name and name in given):
                n += 1
                name = f"{base}-{n}"
            names.append(name)
        return names

    @property
    def chat(self) -> bool:
        """Conversations with a loss mask (every source has format chat)."""
        return self.sources[0].format == "chat"

    def phases(self) -> list[tuple[int | None, dict[str, float]]] | None:
        """The mixture as (last step or None, weights by source name) phases; None: every block drawn alike."""
        if self.mixture is not None:
            return [(p.until_step, dict(p.weights)) for p in self.mixture]
        if self.sources[0].weight is not None:
            return [(None, {n: float(s.weight or 0) for n, s in zip(self.source_names(), self.sources)})]
        return None

    def output_hash(self) -> str:
        """Hash of every field that changes the prepared bytes (all but overwrite, batch_bytes and the mixture, which
        only `train` reads)."""
        fields = self.model_dump(mode="json", exclude={"overwrite", "mixture", "batch_bytes"})
        for source in fields["sources"]:
            source.pop("weight")
        fields["names"] = self.source_names()
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
