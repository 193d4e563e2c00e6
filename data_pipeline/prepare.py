"""`raygpt prepare CONFIG`: corpus → cleaned, deduplicated documents → tokenizer → packed webdataset shards + manifest.

    raygpt prepare configs/demo.yaml

Two passes over the corpus, all per-document work in Ray tasks and actors:
  1. read the sources, decode, split into documents, clean (NFC, control characters, length), hash  — map_batches,
     materialized; one Ray task then surveys it (counts by source and drop reason, bytes per split) and trains the
     tokenizer on a sample chosen by content hash (or loads one); with MinHash on, near duplicates are found
     (band keys grouped by bucket);
  2. tokenize on an actor pool (`encode_batch`), assign split and shard by content hash, group by (split, shard); each
     group drops exact and near duplicates, orders its documents by hash, joins them with EOT, cuts seq_len + 1 blocks
     and writes its tar                                                                              — one shuffle.
Because split and shard are functions of the content hash, all copies of a document meet in one group: exact dedup
is corpus-wide. The manifest is written last and atomically: a crashed run leaves none, and a re-run redoes the work.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
from tokenizers import Tokenizer

from data_pipeline.clean import DROP, HASH, NBYTES, REPLACED, SOURCE, TEXT, clean_batch
from data_pipeline.config import DataConfig, DataError, TokenizerConfig
from data_pipeline.dedup import duplicate_reasons, near_duplicates
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

SPLITS = ("train", "val")
MANIFEST_VERSION = 1
_MEASURE_BYTES = 2_000_000  # text encoded to estimate bytes per token (for the shard count)
_START = time.perf_counter()


def _log(message: str) -> None:
    print(f"[prepare {time.perf_counter() - _START:6.1f}s] {message}", flush=True)


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


class _Survey:
    """Pass-1 totals: documents, bytes and UTF-8 repairs per (source, drop reason), kept bytes per split."""

    def __init__(self, val_fraction: float) -> None:
        self.val_fraction = val_fraction
        self.counts: dict[tuple[int, str], list[int]] = defaultdict(lambda: [0, 0, 0])
        self.kept_bytes = {split: 0 for split in SPLITS}

    def add(self, batch: dict[str, np.ndarray]) -> None:
        for (source, drop), idx in _groups(batch[SOURCE], batch[DROP]).items():
            row = self.counts[(source, drop)]
            row[0] += len(idx)
            row[1] += int(batch[NBYTES][idx].sum())
            row[2] += int(batch[REPLACED][idx].sum())
        kept = batch[DROP] == ""
        val = is_val(batch[HASH], self.val_fraction)
        self.kept_bytes["train"] += int(batch[NBYTES][kept & ~val].sum())
        self.kept_bytes["val"] += int(batch[NBYTES][kept & val].sum())


def _groups(sources: np.ndarray, drops: np.ndarray) -> dict[tuple[int, str], np.ndarray]:
    """Row indices of each (source, drop reason) pair in a batch (vectorized: few distinct pairs per batch)."""
    out = {}
    for drop in np.unique(drops.astype(str)):
        in_drop = np.flatnonzero(drops == drop)
        for source in np.unique(sources[in_drop]):
            out[(int(source), str(drop))] = in_drop[sources[in_drop] == source]
    return out


@ray.remote(num_cpus=1)
def _survey_and_fit(
    docs: ray.data.Dataset, cfg: TokenizerConfig, val_fraction: float, loaded: str | None, kept_estimate: int
) -> dict[str, Any]:
    """One pass over the cleaned documents: count them, and train the tokenizer on a hash-chosen sample of the kept
    ones (each distinct text once: copies share a hash). Also measures bytes per token on ~2 MB of the sample."""
    survey = _Survey(val_fraction)
    fraction = min(1.0, cfg.sample_bytes / max(kept_estimate, 1))
    measure = fraction * min(1.0, _MEASURE_BYTES / cfg.sample_bytes)
    seen: set[int] = set()
    trained_on = 0
    to_measure: list[str] = []

    def sample() -> Iterator[str]:
        nonlocal trained_on
        for batch in docs.iter_batches(batch_size=512, batch_format="numpy"):
            survey.add(batch)
            chosen = (batch[DROP] == "") & in_sample(batch[HASH], fraction)
            measured = in_sample(batch[HASH], measure)
            for text, h, m in zip(batch[TEXT][chosen], batch[HASH][chosen].tolist(), measured[chosen]):
                if h not in seen:
                    seen.add(h)
                    trained_on += len(text.encode("utf-8"))
                    if m:
                        to_measure.append(text)
                    yield text

    start = time.perf_counter()
    if loaded:
        tokenizer = Tokenizer.from_str(loaded)
        for _ in sample():
            pass
    else:
        tokenizer = train_tokenizer(sample(), cfg)
    seconds = time.perf_counter() - start
    tokens = sum(len(e.ids) for e in tokenizer.encode_batch(to_measure, add_special_tokens=False))
    measured_bytes = sum(len(t.encode("utf-8")) for t in to_measure)
    return {
        "json": tokenizer.to_str(),
        "bytes_per_token": measured_bytes / tokens if tokens else 4.0,
        "seconds": seconds,
        "trained_on": 0 if loaded else trained_on,
        "counts": [
            {SOURCE: s, DROP: d, "documents": v[0], "bytes": v[1], "replaced": v[2]} for (s, d), v in survey.counts.items()
        ],
        "kept_bytes": survey.kept_bytes,
    }


class Tokenize:
    """Actor: the tokenizer is built once per actor; each call encodes one batch of kept documents (`encode_batch`)
    and assigns each its split and shard by content hash. Dropped rows end here (pass 1 counted them)."""

    def __init__(self, tokenizer_json: str, dtype: str, val_fraction: float, num_shards: dict[str, int]) -> None:
        os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one core per actor: the pool provides the parallelism
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.dtype = np.dtype(dtype)
        self.val_fraction = val_fraction
        self.num_shards = num_shards

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        kept = batch[DROP] == ""
        texts, hashes = batch[TEXT][kept].tolist(), batch[HASH][kept]
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return {
            **_placement(hashes, self.val_fraction, self.num_shards),
            "ids": np.array([np.asarray(e.ids, dtype=self.dtype).tobytes() for e in encodings], dtype=object),
            "text_bytes": np.array([len(t.encode("utf-8")) for t in texts], dtype=np.int64),
            "near": np.zeros(len(texts), dtype=bool),
        }


def _placement(hashes: np.ndarray, val_fraction: float, num_shards: dict[str, int]) -> dict[str, np.ndarray]:
    """Split and shard of each document: functions of its content hash only."""
    val = is_val(hashes, val_fraction)
    shards = np.where(val, shard_index(hashes, num_shards["val"]), shard_index(hashes, num_shards["train"]))
    return {HASH: hashes, "split": np.where(val, "val", "train").astype(object), "shard": shards}


def _near_rows(batch: dict[str, np.ndarray], val_fraction: float, num_shards: dict[str, int]) -> dict[str, Any]:
    """Near-duplicate names as rows of the tokenized schema, so they land in their document's (split, shard) group."""
    n = len(batch[HASH])
    return {
        **_placement(batch[HASH], val_fraction, num_shards),
        "ids": np.full(n, b"", dtype=object),
        "text_bytes": np.zeros(n, dtype=np.int64),
        "near": np.ones(n, dtype=bool),
    }


def _dedup_pack_write(
    group: dict[str, np.ndarray], data_dir: str, seq_len: int, eot: int, dtype: str, exact: bool
) -> dict[str, Any]:
    """All documents of one (split, shard) → drop duplicates, order by hash, pack, write one tar → its stats row."""
    split, shard = str(group["split"][0]), int(group["shard"][0])
    near = group["near"]
    hashes, ids, text_bytes = group[HASH][~near], group["ids"][~near], group["text_bytes"][~near]
    order = np.argsort(hashes, kind="stable")
    hashes, ids, text_bytes = hashes[order], ids[order], text_bytes[order]
    reasons = duplicate_reasons(hashes, group[HASH][near], exact)
    keep = reasons == ""
    docs = [np.frombuffer(b, dtype=dtype) for b in ids[keep]]
    blocks, tail = pack_blocks(token_stream(docs, eot, np.dtype(dtype)), seq_len + 1)
    name = f"{split}/shard-{shard:06d}.tar"
    path = Path(data_dir) / name
    digest = write_shard(path, blocks, f"{split}-{shard:06d}") if len(blocks) else ""
    return {
        "split": [split],
        "shard": [shard],
        "file": [name if len(blocks) else ""],
        "sequences": [len(blocks)],
        "tokens": [blocks.size],
        "tail_tokens": [tail],
        "documents": [len(docs)],
        "doc_tokens": [sum(len(d) for d in docs)],
        "text_bytes": [int(text_bytes[keep].sum())],
        "bytes": [path.stat().st_size if len(blocks) else 0],
        "sha256": [digest],
        "duplicate": [int((reasons == "duplicate").sum())],
        "duplicate_bytes": [int(text_bytes[reasons == "duplicate"].sum())],
        "near_duplicate": [int((reasons == "near_duplicate").sum())],
        "near_duplicate_bytes": [int(text_bytes[reasons == "near_duplicate"].sum())],
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


def _save_tokenizer(data_dir: Path, tokenizer_json: str) -> None:
    tmp = data_dir / (TOKENIZER + ".tmp")
    tmp.write_text(tokenizer_json)
    os.replace(tmp, data_dir / TOKENIZER)


def prepare(cfg: DataConfig, data_dir: Path, num_cpus: int) -> dict[str, Any]:
    """Run the whole data pipeline into data_dir and return the manifest (the existing one if already done)."""
    global _START
    start = _START = time.perf_counter()
    data_dir = data_dir.resolve()
    loaded = load_tokenizer(cfg.tokenizer.path).to_str() if cfg.tokenizer.path else None  # bad file: fail now
    config_hash = _config_hash(cfg)
    if (existing := _check_existing(data_dir, config_hash, cfg.overwrite)) is not None:
        _log(f"{data_dir} is already prepared for this config (hash {config_hash}); set data.overwrite=true to redo")
        return existing

    # Pass 1: read, clean, survey, tokenizer.
    docs, resolved = read_sources(cfg.sources, cfg.clean, num_cpus)
    input_bytes = sum(r.bytes for r in resolved)
    _log(f"reading {sum(len(r.files) for r in resolved):,} files ({_mb(input_bytes)}) from {len(resolved)} source(s)")
    docs = docs.map_batches(clean_batch, fn_kwargs={"cfg": cfg.clean}, batch_format="numpy").materialize()
    # The sample fraction comes from the input size (file sizes: deterministic); streamed HF sources add the
    # in-memory size of what was read.
    size = input_bytes + (docs.size_bytes() if any(r.type == "hf" for r in resolved) else 0)
    survey = ray.get(_survey_and_fit.remote(docs, cfg.tokenizer, cfg.val_fraction, loaded, size))
    kept_bytes = survey["kept_bytes"]
    dropped = _dropped(survey["counts"], resolved)
    read_docs = sum(c["documents"] for c in survey["counts"])
    if sum(kept_bytes.values()) == 0:
        reasons = ", ".join(f"{k}={v['documents']}" for k, v in dropped.items()) or "none"
        raise DataError(f"nothing left after filtering: {read_docs} documents read, dropped: {reasons}")
    if kept_bytes["train"] == 0:
        raise DataError("no document went to the train split; lower data.val_fraction or add data")
    tokenizer = Tokenizer.from_str(survey["json"])
    eot = eot_id(tokenizer, cfg.tokenizer.eot_token)
    dtype = token_dtype(tokenizer.get_vocab_size())
    how = f"loaded {cfg.tokenizer.path}" if loaded else f"trained on {_mb(survey['trained_on'])} in {survey['seconds']:.1f} s"
    _log(f"cleaned {read_docs:,} documents; tokenizer {how}: vocab {tokenizer.get_vocab_size():,}, "
         f"{survey['bytes_per_token']:.2f} bytes/token")

    # Pass 2: tokenize, place by hash, dedup + pack + write per (split, shard).
    tar_per_text_byte = tar_bytes_per_block(cfg.seq_len + 1, dtype) / (cfg.seq_len + 1) / survey["bytes_per_token"]
    num_shards = {s: max(1, math.ceil(kept_bytes[s] * tar_per_text_byte / cfg.shard_bytes)) for s in SPLITS}
    data_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        (data_dir / split).mkdir(exist_ok=True)
    placement = {"val_fraction": cfg.val_fraction, "num_shards": num_shards}
    tokens = docs.map_batches(
        Tokenize,
        fn_constructor_kwargs={"tokenizer_json": survey["json"], "dtype": dtype.str, **placement},
        compute=ray.data.ActorPoolStrategy(size=cfg.tokenize_actors or num_cpus),
        batch_size=cfg.tokenize_batch_size,
        batch_format="numpy",
        # Each actor runs one tokenizer thread but reserves half a CPU: a pool reserving every CPU would starve the
        # shuffle tasks downstream and stall the pipeline (seen on 2 cores).
        num_cpus=0.5,
    )
    if cfg.clean.minhash.enabled:
        buckets = max(4 * num_cpus, math.ceil(input_bytes / 64e6))
        near = near_duplicates(docs, cfg.clean.minhash, buckets)
        tokens = tokens.union(near.map_batches(_near_rows, fn_kwargs=placement, batch_format="numpy"))
    written = (
        tokens.groupby(["split", "shard"], num_partitions=min(sum(num_shards.values()), 4 * num_cpus))
        .map_groups(
            _dedup_pack_write,
            fn_kwargs={
                "data_dir": str(data_dir),
                "seq_len": cfg.seq_len,
                "eot": eot,
                "dtype": dtype.str,
                "exact": cfg.clean.dedup,
            },
            batch_format="numpy",
        )
        .take_all()
    )
    for reason in ("duplicate", "near_duplicate"):
        if count := sum(int(w[reason]) for w in written):
            dropped[reason] = {"documents": count, "bytes": sum(int(w[f"{reason}_bytes"]) for w in written)}
    _save_tokenizer(data_dir, survey["json"])
    manifest = _manifest(cfg, config_hash, tokenizer, eot, dtype, num_shards, written, survey, dropped, resolved)
    _remove_stale(data_dir, manifest)
    write_json_atomic(data_dir / MANIFEST, manifest)
    _summary(manifest, time.perf_counter() - start)
    return manifest


def _dropped(counts: list[dict[str, Any]], resolved: list[SourceFiles]) -> dict[str, dict[str, int]]:
    """Documents and bytes dropped while cleaning, by reason (unreadable files count as documents of 0 bytes)."""
    dropped: dict[str, dict[str, int]] = defaultdict(lambda: {"documents": 0, "bytes": 0})
    for c in counts:
        if c[DROP]:
            dropped[c[DROP]]["documents"] += c["documents"]
            dropped[c[DROP]]["bytes"] += c["bytes"]
    if unreadable := sum(len(r.unreadable) for r in resolved):
        dropped["unreadable"]["documents"] += unreadable
    return dict(dropped)


def _manifest(
    cfg: DataConfig,
    config_hash: str,
    tokenizer: Tokenizer,
    eot: int,
    dtype: np.dtype,
    num_shards: dict[str, int],
    written: list[dict[str, Any]],
    survey: dict[str, Any],
    dropped: dict[str, dict[str, int]],
    resolved: list[SourceFiles],
) -> dict[str, Any]:
    splits: dict[str, Any] = {}
    for split in SPLITS:
        rows = sorted((w for w in written if w["split"] == split), key=lambda w: w["shard"])
        totals = ("sequences", "tokens", "documents", "text_bytes", "doc_tokens", "tail_tokens")
        splits[split] = {
            "num_shards": num_shards[split],  # shards documents were hashed over (an empty one has no file)
            "shards": [{k: w[k] for k in ("file", "sequences", "tokens", "bytes", "sha256")} for w in rows if w["file"]],
            **{k: sum(int(w[k]) for w in rows) for k in totals},
        }
    counts = survey["counts"]
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
        "documents": {
            "read": sum(s["documents"] for s in per_source),
            "kept": sum(splits[s]["documents"] for s in SPLITS),
        },
        "bytes": {"read": sum(s["bytes"] for s in per_source), "kept": sum(splits[s]["text_bytes"] for s in SPLITS)},
        "utf8_replaced_documents": sum(int(c["replaced"]) for c in counts),
        "dropped": dict(sorted(dropped.items())),
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
    _log(f"documents: {docs['read']:,} read, {docs['kept']:,} kept; {_mb(size['read'])} read, {_mb(size['kept'])} kept")
    drops = ", ".join(f"{k} {v['documents']:,} ({_mb(v['bytes'])})" for k, v in manifest["dropped"].items())
    _log(f"dropped: {drops or 'none'}; UTF-8 repaired in {manifest['utf8_replaced_documents']:,} documents")
    for name, split in manifest["splits"].items():
        _log(
            f"{name}: {len(split['shards'])} shard(s), {split['sequences']:,} sequences of {manifest['block_len']}, "
            f"{split['tokens']:,} tokens ({split['tail_tokens']:,} tail tokens dropped)"
        )
    _log(f"done in {seconds:.1f} s: {size['read'] / 1e6 / seconds:.2f} MB/s")
