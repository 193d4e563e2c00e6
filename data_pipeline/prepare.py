"""`raygpt prepare CONFIG`: corpus → cleaned, deduplicated documents → tokenizer → packed webdataset shards + manifest.

    raygpt prepare configs/demo.yaml

All per-document work runs in Ray Data tasks, never in a driver loop:
  0. (only when the tokenizer is trained) a streaming pass reads and cleans the corpus and one Ray task trains the
     tokenizer on a sample chosen by content hash;
  1. one fused pass: each read task decodes, splits into documents, cleans (NFC, control characters, length), hashes
     and tokenizes its own documents (`encode_batch_fast`, the tokenizer built once per worker process) and keeps
     only token ids — materialized, a third of the text's size; per-batch aggregates give the counts by source and
     drop reason and the token count per split, which sizes the shards;
  2. each kept document is placed by content hash (split, shard); with MinHash on, near duplicates are found (band
     keys grouped by bucket); a hash partition (`data_pipeline.partition`, Ray tasks) brings every copy of a document
     together, where each group drops exact and near duplicates, orders its documents by hash, joins them with EOT,
     cuts seq_len + 1 blocks and writes its tar.
Because split and shard are functions of the content hash, all copies of a document meet in one group: exact dedup
is corpus-wide. The manifest is written last and atomically: a crashed run leaves none, and a re-run redoes the work.
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data
from tokenizers import Tokenizer

from core import files
from core.files import fingerprint, sha256
from core.layout import SPLITS, DataLayout, Location, is_uri, join
from data_pipeline.clean import DROP, HASH, NBYTES, REPLACED, SOURCE, TEXT, clean_batch
from data_pipeline.config import DataConfig, DataError, TokenizerConfig
from data_pipeline.dedup import near_duplicates
from data_pipeline.refusals import check_sources_kept, check_written
from data_pipeline.manifest import FORMAT_VERSION, Manifest, finished, parse
from data_pipeline.pack import in_sample, is_val, tar_bytes_per_block, token_dtype
from data_pipeline.partition import columns, write_shards
from data_pipeline.shards import index_name
from data_pipeline.sources import SourceFiles, read_sources, resolve_sources
from data_pipeline.tokenizer import eot_id, load_tokenizer, train_tokenizer

_START = time.perf_counter()


def _log(message: str) -> None:
    print(f"[prepare {time.perf_counter() - _START:6.1f}s] {message}", flush=True)


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


class _Survey:
    """Totals over the tokenized rows: documents, bytes and UTF-8 repairs per (source, drop reason), kept bytes and
    tokens per split. Built from per-batch aggregates (`_survey_rows`), so no document row reaches the driver."""

    def __init__(self) -> None:
        self.counts: dict[tuple[int, str], list[int]] = defaultdict(lambda: [0, 0, 0])
        self.kept_bytes = {split: 0 for split in SPLITS}
        self.kept_tokens = {split: 0 for split in SPLITS}
        self.kept_docs = {split: 0 for split in SPLITS}

    def add(self, row: dict[str, Any]) -> None:
        counts = self.counts[(int(row[SOURCE]), str(row[DROP]))]
        counts[0] += int(row["documents"])
        counts[1] += int(row[NBYTES])
        counts[2] += int(row[REPLACED])
        if not row[DROP]:
            split = "val" if row["val"] else "train"
            self.kept_bytes[split] += int(row[NBYTES])
            self.kept_tokens[split] += int(row["tokens"])
            self.kept_docs[split] += int(row["documents"])


def _survey_rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """One batch of tokenized rows → one row per (source, drop reason, split) with its sums."""
    keys = np.stack([batch[SOURCE].astype(np.int64), batch["val"].astype(np.int64)], axis=1)
    drops = batch[DROP].astype(str)
    rows = []
    for drop in np.unique(drops):
        in_drop = drops == drop
        for source, val in np.unique(keys[in_drop], axis=0):
            idx = in_drop & (keys[:, 0] == source) & (keys[:, 1] == val)
            rows.append({
                SOURCE: int(source), "val": bool(val), DROP: str(drop), "documents": int(idx.sum()),
                **{col: int(batch[col][idx].sum()) for col in (NBYTES, REPLACED, "tokens")},
            })
    return rows


def _sampled_texts(batch: dict[str, np.ndarray], fraction: float) -> dict[str, Any]:
    """The kept documents chosen for tokenizer training by content hash (a deterministic sample)."""
    chosen = (batch[DROP] == "") & in_sample(batch[HASH], fraction)
    return {TEXT: batch[TEXT][chosen], HASH: batch[HASH][chosen]}


@ray.remote(num_cpus=1)
def _fit_tokenizer(sample: ray.data.Dataset, cfg: TokenizerConfig) -> dict[str, Any]:
    """Train the tokenizer on the sampled documents, streamed (each distinct text once: copies share a hash)."""
    seen: set[int] = set()
    trained_on = 0

    def texts() -> Iterator[str]:
        nonlocal trained_on
        for batch in sample.iter_batches(batch_size=512, batch_format="numpy"):
            for text, h in zip(batch[TEXT], batch[HASH].tolist()):
                if h not in seen:
                    seen.add(h)
                    trained_on += len(text.encode("utf-8"))
                    yield text

    start = time.perf_counter()
    tokenizer = train_tokenizer(texts(), cfg)
    return {"json": tokenizer.to_str(), "seconds": time.perf_counter() - start, "trained_on": trained_on}


_TOKENIZERS: dict[int, Tokenizer] = {}  # per worker process: built once, reused by every batch that process runs


def tokenize_batch(batch: dict[str, np.ndarray], tokenizer_json: str, dtype: str, val_fraction: float) -> dict[str, Any]:
    """Cleaned document rows → token ids of the kept ones (`encode_batch_fast`: no offsets, ~1.5x faster than
    `encode_batch`), their split by content hash, and the columns the survey counts. The text itself ends here.

    It runs as a plain Ray Data task fused with reading and cleaning (one operator, no actor pool to start): each task
    uses one core, so the tokenizer's own thread pool is turned off (TOKENIZERS_PARALLELISM)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    key = hash(tokenizer_json)
    if (tokenizer := _TOKENIZERS.get(key)) is None:
        tokenizer = _TOKENIZERS[key] = Tokenizer.from_str(tokenizer_json)
    kept = batch[DROP] == ""
    ids = np.full(len(kept), b"", dtype=object)
    counts = np.zeros(len(kept), dtype=np.int64)
    text_bytes = np.zeros(len(kept), dtype=np.int64)  # of the cleaned text (NBYTES is what was read)
    if kept.any():
        texts = batch[TEXT][kept].tolist()
        encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        ids[kept] = [np.asarray(e.ids, dtype=dtype).tobytes() for e in encodings]
        counts[kept] = [len(e.ids) for e in encodings]
        text_bytes[kept] = [len(t.encode("utf-8")) for t in texts]
    return {
        HASH: batch[HASH],
        SOURCE: batch[SOURCE],
        DROP: batch[DROP],
        NBYTES: batch[NBYTES],
        REPLACED: batch[REPLACED],
        "val": is_val(batch[HASH], val_fraction),
        "ids": ids,
        "tokens": counts,
        "text_bytes": text_bytes,
    }


@ray.remote
def _survey_block(table: pa.Table) -> list[dict[str, Any]]:
    return _survey_rows(columns(table))


def data_fingerprint(cfg: DataConfig, resolved: list[SourceFiles]) -> str:
    """What the prepared bytes depend on: every output-changing config field, the tokenizer file's content, and each
    local source file's path, size and mtime (a changed corpus is new data)."""
    tokenizer = sha256(Path(cfg.tokenizer.path)) if cfg.tokenizer.path else None
    return fingerprint({"config": cfg.output_hash(), "tokenizer": tokenizer, "sources": [r.stamps for r in resolved]})


def plan(cfg: DataConfig, data_dir: Location) -> tuple[str, list[SourceFiles], Manifest | None]:
    """Checks before anything is written: (fingerprint, resolved sources, the finished manifest of this very data
    when it is already prepared). Data of another fingerprint is refused with one line unless data.overwrite."""
    if cfg.tokenizer.path:
        load_tokenizer(cfg.tokenizer.path)  # a bad file fails now
    resolved = resolve_sources(cfg.sources)
    key = data_fingerprint(cfg, resolved)
    existing = finished(data_dir)
    if existing is None or cfg.overwrite:
        return key, resolved, None
    if existing.fingerprint != key:
        raise DataError(
            f"{data_dir} already holds data prepared from another config or corpus (fingerprint {existing.fingerprint}, "
            f"now {key}); set data.overwrite=true or choose another run_dir"
        )
    return key, resolved, existing


def prepare_stage(cfg: DataConfig, data_dir: Location, begin: Callable[[], int]) -> Manifest:
    """The prepare stage (`raygpt prepare`): corpus → tokenizer + webdataset shards in `data_dir`. Everything checkable
    fails before anything is written; data already prepared from this config and corpus is kept as it is. `begin` is
    called once the checks passed: it connects to Ray, records the run's config and returns the CPUs to use."""
    key, resolved, existing = plan(cfg, data_dir)
    if existing is not None:
        print(f"[prepare] {data_dir} is already prepared from this config and corpus; set data.overwrite=true to redo",
              flush=True)
        return existing
    return prepare(cfg, data_dir, begin(), key, resolved)


def prepare(cfg: DataConfig, data_dir: Location, num_cpus: int, key: str, resolved: list[SourceFiles]) -> Manifest:
    """Run the whole data pipeline into data_dir (a local folder or an object-storage URI; after `plan`) and return
    the manifest."""
    global _START
    start = _START = time.perf_counter()
    layout = DataLayout(data_dir if is_uri(data_dir) else Path(data_dir).resolve())
    files.remove(layout.manifest)  # data.overwrite: from here on a crash leaves no manifest
    loaded = load_tokenizer(cfg.tokenizer.path).to_str() if cfg.tokenizer.path else None
    docs = read_sources(cfg.sources, resolved, cfg.clean, num_cpus)
    input_bytes = sum(r.bytes for r in resolved)
    _log(f"reading {sum(len(r.files) for r in resolved):,} files ({_mb(input_bytes)}) from {len(resolved)} source(s)")
    docs = docs.map_batches(clean_batch, fn_kwargs={"cfg": cfg.clean}, batch_format="numpy")
    if any(r.type == "hf" for r in resolved):  # streamed hub data has no file sizes: read it once, measure it
        docs = docs.materialize()
        input_bytes += docs.size_bytes()

    # Tokenizer: loaded, or trained on a hash-chosen sample of the cleaned documents (a streaming pass).
    if loaded:
        fit = {"json": loaded, "seconds": 0.0, "trained_on": 0}
    else:
        fraction = min(1.0, cfg.tokenizer.sample_bytes / max(input_bytes, 1))
        sample = docs.map_batches(_sampled_texts, fn_kwargs={"fraction": fraction}, batch_format="numpy")
        fit = ray.get(_fit_tokenizer.remote(sample, cfg.tokenizer))
    tokenizer = Tokenizer.from_str(fit["json"])
    eot = eot_id(tokenizer, cfg.tokenizer.eot_token)
    dtype = token_dtype(tokenizer.get_vocab_size())
    how = f"loaded {cfg.tokenizer.path}" if loaded else f"trained on {_mb(fit['trained_on'])} in {fit['seconds']:.1f} s"
    _log(f"tokenizer {how}: vocab {tokenizer.get_vocab_size():,}")

    # One streaming pass: read, clean, hash and tokenize fused in each task; only token ids are kept (materialized).
    tokens = docs.map_batches(
        tokenize_batch,
        fn_kwargs={"tokenizer_json": fit["json"], "dtype": dtype.str, "val_fraction": cfg.val_fraction},
        batch_size=None,  # a whole block per call: blocks are never merged, so the cores share the work evenly
        batch_format="numpy",
    ).materialize()
    token_blocks = tokens.to_arrow_refs()
    survey = _Survey()
    for rows in ray.get([_survey_block.remote(ref) for ref in token_blocks]):
        for row in rows:
            survey.add(row)
    counts = [{SOURCE: s, DROP: d, "documents": v[0], "bytes": v[1], "replaced": v[2]} for (s, d), v in survey.counts.items()]
    dropped = _dropped(counts, resolved)
    read_docs = sum(c["documents"] for c in counts)
    kept_bytes = survey.kept_bytes
    if sum(kept_bytes.values()) == 0:
        reasons = ", ".join(f"{k}={v['documents']}" for k, v in dropped.items()) or "none"
        raise DataError(f"nothing left after filtering: {read_docs} documents read, dropped: {reasons}")
    if kept_bytes["train"] == 0:
        raise DataError("no document went to the train split; lower data.val_fraction or add data")
    check_sources_kept(counts, resolved, cfg.source_names())
    kept_tokens = sum(survey.kept_tokens.values())
    _log(f"cleaned and tokenized {read_docs:,} documents: {kept_tokens:,} tokens, "
         f"{sum(kept_bytes.values()) / max(kept_tokens, 1):.2f} bytes/token")

    # Dedup + pack + write per (split, shard): shards sized from the token counts (before dedup: at most shard_bytes).
    tar_per_token = tar_bytes_per_block(cfg.seq_len + 1, dtype) / (cfg.seq_len + 1)
    num_shards = {
        s: max(1, math.ceil((survey.kept_tokens[s] + survey.kept_docs[s]) * tar_per_token / cfg.shard_bytes))
        for s in SPLITS
    }
    for split in SPLITS:
        if not is_uri(layout.root):
            Path(layout.split_dir(split)).mkdir(parents=True, exist_ok=True)
    near_blocks = []
    if cfg.clean.minhash.enabled:
        buckets = max(4 * num_cpus, math.ceil(input_bytes / 64e6))
        near_blocks = near_duplicates(docs, cfg.clean.minhash, buckets).to_arrow_refs()
    _log(f"deduplicating, packing and writing {sum(num_shards.values())} shard(s)")
    pack = {"data_dir": str(layout.root), "seq_len": cfg.seq_len, "eot": eot, "dtype": dtype.str, "exact": cfg.clean.dedup,
            "num_sources": len(resolved)}
    written = write_shards(token_blocks, near_blocks, num_shards, cfg.val_fraction, pack)
    for reason in ("duplicate", "near_duplicate"):
        if count := sum(int(w[reason]) for w in written):
            dropped[reason] = {"documents": count, "bytes": sum(int(w[f"{reason}_bytes"]) for w in written)}
    try:
        check_written(cfg, written, resolved)
    except DataError:
        for w in written:  # nothing of a refused prepare stays in the data dir
            if w["file"]:
                files.remove(join(layout.root, w["file"]))
                files.remove(join(layout.root, index_name(w["file"])))
        raise
    files.atomic_write(layout.tokenizer, fit["json"])
    manifest = _manifest(cfg, key, tokenizer, eot, dtype, num_shards, written, counts, dropped, resolved)
    _remove_stale(layout, manifest)
    files.write_json(layout.manifest, manifest)  # last: the data is complete
    _summary(manifest, time.perf_counter() - start)
    return parse(manifest, layout.manifest)


SOURCE_TOTALS = {"blocks": "sequences", "tokens": "tokens", "documents": "documents", "doc_tokens": "doc_tokens",
                 "text_bytes": "text_bytes"}
"""A source's totals per split in the manifest ← the shard rows' columns they sum."""


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
    key: str,
    tokenizer: Tokenizer,
    eot: int,
    dtype: np.dtype,
    num_shards: dict[str, int],
    written: list[dict[str, Any]],
    counts: list[dict[str, Any]],
    dropped: dict[str, dict[str, int]],
    resolved: list[SourceFiles],
) -> dict[str, Any]:
    names = cfg.source_names()
    splits: dict[str, Any] = {}
    for split in SPLITS:
        rows = sorted((w for w in written if w["split"] == split), key=lambda w: w["shard"])
        totals = ("sequences", "tokens", "documents", "text_bytes", "doc_tokens", "tail_tokens")
        splits[split] = {
            "num_shards": num_shards[split],  # groups documents were hashed over (a source's tar in each, if any)
            "shards": [{**{k: w[k] for k in ("file", "sequences", "tokens", "bytes", "sha256", "index_sha256")},
                        "source": names[w[SOURCE]]} for w in rows if w["file"]],
            **{k: sum(int(w[k]) for w in rows) for k in totals},
        }
    per_source = [
        {
            "name": names[r.index],
            "splits": {split: {total: sum(int(w[key]) for w in written if w["split"] == split and w[SOURCE] == r.index)
                               for total, key in SOURCE_TOTALS.items()} for split in SPLITS},
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
        "format_version": FORMAT_VERSION,
        "fingerprint": key,
        "config": cfg.dump_as_written(),
        "vocab_size": tokenizer.get_vocab_size(),
        "seq_len": cfg.seq_len,
        "block_len": cfg.seq_len + 1,
        "dtype": dtype.name,
        "eot_id": eot,
        "eot_token": cfg.tokenizer.eot_token,
        "tokenizer": DataLayout.TOKENIZER,
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


def _remove_stale(layout: DataLayout, manifest: dict[str, Any]) -> None:
    """Delete shard and temp files that the new manifest does not list (a previous config, a crashed run)."""
    listed = {name for split in manifest["splits"].values() for shard in split["shards"]
              for name in (shard["file"], index_name(shard["file"]))}
    for split in SPLITS:
        for name in files.listdir(layout.split_dir(split)):
            if f"{split}/{name}" not in listed:
                files.remove(join(layout.split_dir(split), name))


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
    if len(manifest["sources"]) > 1:
        total = max(1, sum(s["splits"]["train"]["tokens"] for s in manifest["sources"]))
        _log("train tokens by source: " + ", ".join(
            f"{s['name']} {s['splits']['train']['tokens']:,} ({s['splits']['train']['tokens'] / total:.1%})"
            for s in manifest["sources"]))
    _log(f"done in {seconds:.1f} s: {size['read'] / 1e6 / seconds:.2f} MB/s")
