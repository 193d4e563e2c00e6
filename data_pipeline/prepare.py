"""`raygpt prepare CONFIG`: corpus → cleaned, deduplicated documents → tokenizer → packed webdataset shards + manifest.

    raygpt prepare configs/demo.yaml

Stages (all Ray Data, all per-document work in Ray tasks or actors):
  1. read the sources, decode, split into documents, clean (NFC, control characters, length)   — map_batches
  2. exact / near-duplicate removal, hash-partitioned                                        — groupby + map_groups
  3. train the tokenizer on a hash-chosen sample (or load one)                               — one Ray task
  4. tokenize on an actor pool (`encode_batch`), assign split and shard by content hash       — map_batches, actors
  5. per (split, shard): order by hash, join with EOT, cut into seq_len + 1 blocks, write tar — groupby + map_groups
The manifest is written last and atomically: a crashed run leaves none, and a re-run redoes the work.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
from ray.data.aggregate import Count, Sum
from tokenizers import Tokenizer

from data_pipeline.clean import DROP, HASH, NBYTES, REPLACED, SOURCE, TEXT, clean_batch
from data_pipeline.config import DataConfig, DataError, TokenizerConfig
from data_pipeline.dedup import deduplicate
from data_pipeline.pack import (
    in_sample,
    is_val,
    pack_blocks,
    shard_index,
    tar_bytes_per_block,
    token_dtype,
    token_stream,
)
from data_pipeline.shards import MANIFEST, TOKENIZER, read_manifest, sha256_file, write_json_atomic, write_shard
from data_pipeline.sources import SourceFiles, read_sources
from data_pipeline.tokenizer import eot_id, load_tokenizer, train_tokenizer

SPLIT = "split"
SPLITS = ("train", "val")
MANIFEST_VERSION = 1
_MEASURE_BYTES = 2_000_000  # text encoded to estimate bytes per token (for the shard count)


def _log(message: str) -> None:
    print(f"[prepare] {message}", flush=True)


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def _assign_split(batch: dict[str, np.ndarray], val_fraction: float) -> dict[str, Any]:
    val = is_val(batch[HASH], val_fraction)
    kept = batch[DROP] == ""
    return {**batch, SPLIT: np.where(kept, np.where(val, "val", "train"), "").astype(object)}


def _sample(batch: dict[str, np.ndarray], fraction: float) -> dict[str, Any]:
    keep = (batch[DROP] == "") & in_sample(batch[HASH], fraction)
    return {TEXT: batch[TEXT][keep]}


def _texts(ds: ray.data.Dataset) -> Iterator[str]:
    for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
        yield from batch[TEXT].tolist()


@ray.remote(num_cpus=1)
def _fit_tokenizer(sample: ray.data.Dataset, cfg: TokenizerConfig, loaded: str | None) -> dict[str, Any]:
    """Train on the sample (or take the loaded tokenizer); measure bytes per token on the sample's first ~2 MB."""
    start = time.perf_counter()
    trained_on = 0

    def counted() -> Iterator[str]:
        nonlocal trained_on
        for text in _texts(sample):
            trained_on += len(text.encode("utf-8"))
            yield text

    tokenizer = Tokenizer.from_str(loaded) if loaded else train_tokenizer(counted(), cfg)
    seconds = time.perf_counter() - start
    texts, size = [], 0
    for text in _texts(sample):
        texts.append(text)
        size += len(text.encode("utf-8"))
        if size >= _MEASURE_BYTES:
            break
    tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False))
    return {"json": tokenizer.to_str(), "bytes_per_token": size / max(tokens, 1), "seconds": seconds, "bytes": trained_on}


class Tokenize:
    """Actor: the tokenizer is built once per actor; each call encodes one batch of documents with `encode_batch`."""

    def __init__(self, tokenizer_json: str, dtype: str, num_shards: dict[str, int]) -> None:
        os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one core per actor: the pool provides the parallelism
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.dtype = np.dtype(dtype)
        self.num_shards = num_shards

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        batch = {k: v[batch[DROP] == ""] for k, v in batch.items()}  # dropped documents end here
        texts = batch[TEXT].tolist()
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        hashes, splits = batch[HASH], batch[SPLIT]
        shards = np.zeros(len(texts), dtype=np.int64)
        for split, n in self.num_shards.items():
            mask = splits == split
            shards[mask] = shard_index(hashes[mask], n)
        return {
            HASH: hashes,
            SPLIT: splits,
            "shard": shards,
            "ids": np.array([np.asarray(e.ids, dtype=self.dtype).tobytes() for e in encodings], dtype=object),
            "text_bytes": np.array([len(t.encode("utf-8")) for t in texts], dtype=np.int64),
        }


def _pack_and_write(group: dict[str, np.ndarray], data_dir: str, seq_len: int, eot: int, dtype: str) -> dict[str, Any]:
    """All documents of one (split, shard) → one tar of packed blocks; returns the shard's manifest entry."""
    split, shard = str(group[SPLIT][0]), int(group["shard"][0])
    order = np.argsort(group[HASH], kind="stable")
    docs = [np.frombuffer(group["ids"][i], dtype=dtype) for i in order]
    blocks, tail = pack_blocks(token_stream(docs, eot, np.dtype(dtype)), seq_len + 1)
    name = f"{split}/shard-{shard:06d}.tar"
    path = Path(data_dir) / name
    digest = write_shard(path, blocks, f"{split}-{shard:06d}") if len(blocks) else ""
    return {
        SPLIT: [split],
        "shard": [shard],
        "file": [name if len(blocks) else ""],
        "sequences": [len(blocks)],
        "tokens": [blocks.size],
        "tail_tokens": [tail],
        "documents": [len(docs)],
        "doc_tokens": [sum(len(d) for d in docs)],
        "text_bytes": [int(group["text_bytes"].sum())],
        "bytes": [path.stat().st_size if len(blocks) else 0],
        "sha256": [digest],
    }


def _config_hash(cfg: DataConfig) -> str:
    if cfg.tokenizer.path is None:
        return cfg.output_hash()
    return f"{cfg.output_hash()}-{sha256_file(Path(cfg.tokenizer.path))[:16]}"


def _check_existing(data_dir: Path, config_hash: str, overwrite: bool) -> dict[str, Any] | None:
    """A finished manifest of the same config → it (nothing to do); of another config → error unless overwrite."""
    existing = read_manifest(data_dir)
    if existing is None:
        return None
    if existing.get("config_hash") == config_hash and not overwrite:
        return existing
    if not overwrite:
        raise DataError(
            f"{data_dir} already holds data prepared with another config (hash {existing.get('config_hash')}, "
            f"now {config_hash}); set data.overwrite=true or choose another run_dir"
        )
    (data_dir / MANIFEST).unlink()  # from here on a crash leaves no manifest
    return None


def _count(docs: ray.data.Dataset) -> list[dict[str, Any]]:
    """Documents, bytes and UTF-8 replacements per (source, drop reason, split): a small table."""
    aggregates = (Count(alias_name="documents"), Sum(NBYTES, alias_name="bytes"), Sum(REPLACED, alias_name="replaced"))
    return docs.groupby([SOURCE, DROP, SPLIT]).aggregate(*aggregates).take_all()


def prepare(cfg: DataConfig, data_dir: Path, num_cpus: int) -> dict[str, Any]:
    """Run the whole data pipeline into data_dir and return the manifest (the existing one if already done)."""
    start = time.perf_counter()
    data_dir = data_dir.resolve()
    if cfg.tokenizer.path is not None:
        load_tokenizer(cfg.tokenizer.path)  # a bad file fails now, before any Ray work
    config_hash = _config_hash(cfg)
    if (existing := _check_existing(data_dir, config_hash, cfg.overwrite)) is not None:
        _log(f"{data_dir} is already prepared for this config (hash {config_hash}); set data.overwrite=true to redo")
        return existing

    docs, resolved = read_sources(cfg.sources, cfg.clean)
    input_bytes = sum(r.bytes for r in resolved)
    _log(f"reading {sum(len(r.files) for r in resolved):,} files ({_mb(input_bytes)}) from {len(resolved)} source(s)")
    docs = docs.map_batches(clean_batch, fn_kwargs={"cfg": cfg.clean}, batch_format="numpy")
    buckets = max(2 * num_cpus, math.ceil(input_bytes / 256e6))
    docs = deduplicate(docs, cfg.clean, buckets)
    docs = docs.map_batches(_assign_split, fn_kwargs={"val_fraction": cfg.val_fraction}, batch_format="numpy")
    docs = docs.materialize()
    counts = _count(docs)

    kept_bytes = {s: sum(c["bytes"] for c in counts if c[DROP] == "" and c[SPLIT] == s) for s in SPLITS}
    dropped = _dropped(counts, resolved)
    read_docs = sum(c["documents"] for c in counts)
    if sum(kept_bytes.values()) == 0:
        reasons = ", ".join(f"{k}={v['documents']}" for k, v in dropped.items()) or "none"
        raise DataError(f"nothing left after filtering: {read_docs} documents read, dropped: {reasons}")
    if kept_bytes["train"] == 0:
        raise DataError("no document went to the train split; lower data.val_fraction or add data")
    _log(f"cleaned: {read_docs:,} documents read, dropped " + (", ".join(f"{k} {v['documents']:,}" for k, v in dropped.items()) or "none"))

    sample_fraction = min(1.0, cfg.tokenizer.sample_bytes / sum(kept_bytes.values()))
    sample = docs.map_batches(_sample, fn_kwargs={"fraction": sample_fraction}, batch_format="numpy").materialize()
    loaded = load_tokenizer(cfg.tokenizer.path).to_str() if cfg.tokenizer.path else None
    fitted = ray.get(_fit_tokenizer.remote(sample, cfg.tokenizer, loaded))
    tokenizer = Tokenizer.from_str(fitted["json"])
    eot = eot_id(tokenizer, cfg.tokenizer.eot_token)
    dtype = token_dtype(tokenizer.get_vocab_size())
    data_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_tmp = data_dir / (TOKENIZER + ".tmp")
    tokenizer_tmp.write_text(fitted["json"])
    os.replace(tokenizer_tmp, data_dir / TOKENIZER)
    how = f"loaded {cfg.tokenizer.path}" if loaded else f"trained on {_mb(fitted['bytes'])} in {fitted['seconds']:.1f} s"
    _log(f"tokenizer: {how}, vocab {tokenizer.get_vocab_size():,}, {fitted['bytes_per_token']:.2f} bytes/token")

    bytes_per_text_byte = tar_bytes_per_block(cfg.seq_len + 1, dtype) / (cfg.seq_len + 1) / fitted["bytes_per_token"]
    num_shards = {
        s: max(1, math.ceil(kept_bytes[s] * bytes_per_text_byte / cfg.shard_bytes))
        for s in SPLITS
        if kept_bytes[s]
    }
    for split in SPLITS:
        (data_dir / split).mkdir(exist_ok=True)
    actors = cfg.tokenize_actors or num_cpus
    tokens = docs.map_batches(
        Tokenize,
        fn_constructor_kwargs={
            "tokenizer_json": fitted["json"],
            "dtype": dtype.str,
            "num_shards": num_shards,
        },
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=cfg.tokenize_batch_size,
        batch_format="numpy",
        # Each actor runs one tokenizer thread, but reserves only half a CPU: a pool that reserved every CPU would
        # starve the shuffle tasks downstream and stall the pipeline (seen on 2 cores).
        num_cpus=0.5,
    )
    written = (
        tokens.groupby([SPLIT, "shard"])
        .map_groups(
            _pack_and_write,
            fn_kwargs={"data_dir": str(data_dir), "seq_len": cfg.seq_len, "eot": eot, "dtype": dtype.str},
            batch_format="numpy",
        )
        .take_all()
    )
    manifest = _manifest(cfg, config_hash, tokenizer, eot, dtype, written, counts, dropped, resolved)
    _remove_stale(data_dir, manifest)
    write_json_atomic(data_dir / MANIFEST, manifest)
    _summary(manifest, time.perf_counter() - start)
    return manifest


def _dropped(counts: list[dict[str, Any]], resolved: list[SourceFiles]) -> dict[str, dict[str, int]]:
    """Documents and bytes dropped, by reason (unreadable files are counted as documents of 0 bytes read)."""
    dropped: dict[str, dict[str, int]] = defaultdict(lambda: {"documents": 0, "bytes": 0})
    for c in counts:
        if c[DROP]:
            dropped[c[DROP]]["documents"] += c["documents"]
            dropped[c[DROP]]["bytes"] += c["bytes"]
    if unreadable := sum(len(r.unreadable) for r in resolved):
        dropped["unreadable"]["documents"] += unreadable
    return dict(sorted(dropped.items()))


def _manifest(
    cfg: DataConfig,
    config_hash: str,
    tokenizer: Tokenizer,
    eot: int,
    dtype: np.dtype,
    written: list[dict[str, Any]],
    counts: list[dict[str, Any]],
    dropped: dict[str, dict[str, int]],
    resolved: list[SourceFiles],
) -> dict[str, Any]:
    splits: dict[str, Any] = {}
    for split in SPLITS:
        rows = sorted((w for w in written if w[SPLIT] == split), key=lambda w: w["shard"])
        total = {k: sum(int(w[k]) for w in rows) for k in ("documents", "text_bytes", "doc_tokens", "tail_tokens")}
        splits[split] = {
            "shards": [
                {k: w[k] for k in ("file", "sequences", "tokens", "bytes", "sha256")} for w in rows if w["file"]
            ],
            "sequences": sum(int(w["sequences"]) for w in rows),
            "tokens": sum(int(w["tokens"]) for w in rows),
            **total,
        }
    per_source = [
        {
            "label": r.label,
            "type": r.type,
            "files": len(r.files),
            "unreadable_files": r.unreadable,
            "documents": sum(c["documents"] for c in counts if c[SOURCE] == r.index),
            "bytes": sum(c["bytes"] for c in counts if c[SOURCE] == r.index),
        }
        for r in resolved
    ]
    return {
        "format_version": MANIFEST_VERSION,
        "config_hash": config_hash,
        "config": cfg.model_dump(mode="json"),
        "vocab_size": tokenizer.get_vocab_size(),
        "seq_len": cfg.seq_len,
        "block_len": cfg.seq_len + 1,
        "dtype": dtype.name,
        "eot_id": eot,
        "eot_token": cfg.tokenizer.eot_token,
        "tokenizer": TOKENIZER,
        "sample_key": "input_ids.npy",
        "splits": splits,
        "sources": per_source,
        "documents": {"read": sum(s["documents"] for s in per_source), "kept": sum(splits[s]["documents"] for s in SPLITS)},
        "bytes": {"read": sum(s["bytes"] for s in per_source), "kept": sum(splits[s]["text_bytes"] for s in SPLITS)},
        "utf8_replaced_documents": sum(int(c["replaced"]) for c in counts),
        "dropped": dropped,
    }


def _remove_stale(data_dir: Path, manifest: dict[str, Any]) -> None:
    """Delete shard and temp files that the new manifest does not list (a previous config, a crashed run)."""
    listed = {shard["file"] for split in manifest["splits"].values() for shard in split["shards"]}
    for split in SPLITS:
        for path in (data_dir / split).iterdir():
            if f"{split}/{path.name}" not in listed:
                path.unlink() if path.is_file() else shutil.rmtree(path)


def _summary(manifest: dict[str, Any], seconds: float) -> None:
    docs, size = manifest["documents"], manifest["bytes"]
    _log(f"documents: {docs['read']:,} read, {docs['kept']:,} kept; bytes: {_mb(size['read'])} read, {_mb(size['kept'])} kept")
    drops = ", ".join(f"{k} {v['documents']:,} ({_mb(v['bytes'])})" for k, v in manifest["dropped"].items())
    _log(f"dropped: {drops or 'none'}; UTF-8 repaired in {manifest['utf8_replaced_documents']:,} documents")
    for name, split in manifest["splits"].items():
        _log(
            f"{name}: {len(split['shards'])} shard(s), {split['sequences']:,} sequences of {manifest['block_len']}, "
            f"{split['tokens']:,} tokens ({split['tail_tokens']:,} tail tokens dropped)"
        )
    _log(f"done in {seconds:.1f} s: {size['read'] / 1e6 / seconds:.2f} MB/s")
