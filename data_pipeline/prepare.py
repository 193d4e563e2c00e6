"""`raygpt prepare CONFIG`: corpus → cleaned, deduplicated documents → tokenizer → packed webdataset shards + manifest.

    raygpt prepare configs/demo.yaml

The corpus is cut into units of work (`data_pipeline.units`: files, JSONL byte ranges, Parquet row groups), the same
on any cluster, and every pass is a Ray Data map with one task per unit or per hash bucket (`data_pipeline.passes`),
at most one per CPU in flight, each streaming its input a batch at a time and writing its own files:
  1. survey: read, clean and hash each unit; its documents' hashes (and MinHash band keys) go to bucket files, a
     hash-chosen sample of its text to the tokenizer's training set;
  2. the tokenizer is trained on that sample in one task (or loaded from data.tokenizer.path);
  3. dedup: per bucket, every copy of a document (and every near-duplicate band) meets, and the units' drop lists
     are written, before anything is tokenized;
  4. write: each unit is read again, cleaned, its duplicates skipped, tokenized, packed (documents joined by EOT, cut
     into seq_len + 1 blocks) and written to its own train and val tars.
Neither the driver, a worker nor the object store ever holds the corpus or its token ids: peak memory is the CPUs ×
data.batch_bytes, not the corpus size. The trainer permutes samples across every block, so no global shuffle is
needed. Each task's record is written last (DATA/_work), so a crashed prepare resumes where it stopped and ends with
the same bytes; the manifest is written last of all: the data is complete exactly when it exists.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
from tokenizers import Tokenizer

from core import files
from core.files import fingerprint, sha256
from core.layout import SPLITS, DataLayout, Location, is_uri, join
from data_pipeline.chat_data import COUNTS as CHAT_COUNTS, ChatOut
from data_pipeline.clean import DROP, SOURCE
from data_pipeline.config import DataConfig, DataError
from data_pipeline.manifest import FORMAT_VERSION, Manifest, finished, parse
from data_pipeline.pack import token_dtype
from data_pipeline.passes import (
    REASONS, WORK, bucket_parts, dup_bucket, fit_tokenizer, near_bucket, record, release_memory, survey_unit, work_path,
    write_unit,
)
from data_pipeline.refusals import check_sources_kept, check_written
from data_pipeline.shards import index_name
from data_pipeline.sources import SourceFiles, check_field, resolve_sources
from data_pipeline.tokenizer import eot_id, load_tokenizer
from data_pipeline.units import Unit, cut_units

_START = time.perf_counter()


def _log(message: str) -> None:
    print(f"[prepare {time.perf_counter() - _START:6.1f}s] {message}", flush=True)


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def data_fingerprint(cfg: DataConfig, resolved: list[SourceFiles]) -> str:
    """What the prepared bytes depend on: every output-changing config field, the tokenizer file's content, and each
    local source file's path, size and mtime (a changed corpus is new data)."""
    tokenizer = sha256(cfg.tokenizer.path) if cfg.tokenizer.path else None
    return fingerprint({"config": cfg.output_hash(), "tokenizer": tokenizer, "sources": [r.stamps for r in resolved]})


def plan(cfg: DataConfig, data_dir: Location) -> tuple[str, list[SourceFiles], Manifest | None]:
    """Checks before anything is written: (fingerprint, resolved sources, the finished manifest of this very data
    when it is already prepared). Data of another fingerprint is refused with one line unless data.overwrite."""
    if cfg.tokenizer.path:
        load_tokenizer(cfg.tokenizer.path)  # a bad file fails now
    resolved = resolve_sources(cfg.sources)
    for r, src in zip(resolved, cfg.sources):
        if (r.type in ("jsonl", "parquet") or src.format == "chat") and (r.files or r.type == "hf"):
            check_field(r.type, r.files[0] if r.files else src.path, src)
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


def _run_tasks(what: str, root: Location, names: list[str], payloads: list[Any], work: Callable[[Any], dict[str, Any]],
               sizes: list[int] | None = None) -> list[dict[str, Any]]:
    """`work(payload)` for every item whose record (`names[i]`) does not exist yet — a resumed prepare skips the
    others — as a Ray Data map: one task per item on one CPU, spread over the nodes, as many in flight as there are
    CPUs (each holds one batch of text: memory is bounded by the CPUs, not the corpus). Each row carries its own
    payload as JSON, so a task never receives the whole listing. → every item's record, in item order. Logs
    progress every ~10 s."""
    results: dict[int, dict[str, Any]] = {}
    todo = []
    for i, name in enumerate(names):
        if (done := record(root, name)) is not None:
            results[i] = done
        else:
            todo.append(i)
    if len(results):
        _log(f"{what}: {len(results)} of {len(names)} already done (resumed)")
    if not todo:
        return [results[i] for i in range(len(names))]

    def run(row: dict[str, Any]) -> dict[str, Any]:  # a record's keys vary (bucket numbers): it travels as JSON
        try:
            return {"i": row["i"], "record": json.dumps(work(json.loads(row["payload"]))), "error": ""}
        except DataError as e:  # returned, not raised: Ray Data would wrap it and lose its type and one-line message
            return {"i": row["i"], "record": "", "error": str(e)}
        finally:
            release_memory()

    rows = [{"i": i, "payload": json.dumps(payloads[i])} for i in todo]
    tasks = ray.data.from_items(rows, override_num_blocks=len(rows)).map(run, num_cpus=1)
    start = last = time.perf_counter()
    done_bytes = 0
    for row in tasks.iter_rows():
        if row["error"]:
            raise DataError(row["error"])
        i = int(row["i"])
        results[i] = json.loads(row["record"])
        done_bytes += sizes[i] if sizes else 0
        if time.perf_counter() - last > 10 and len(results) < len(names):
            last = time.perf_counter()
            rate = f", {_mb(done_bytes / (last - start))}/s" if done_bytes else ""
            _log(f"{what}: {len(results)} of {len(names)}{rate}")
    return [results[i] for i in range(len(names))]


def _work_plan(cfg: DataConfig, root: Location, key: str, resolved: list[SourceFiles]) -> dict[str, Any]:
    """The units and bucket counts of this prepare: those of an unfinished prepare of the same fingerprint (resumed),
    else new ones (and the work of another config removed)."""
    where = work_path(root, "plan.json")
    if files.is_file(where):
        found = files.read_json(where, "prepare plan")
        if isinstance(found, dict) and found.get("fingerprint") == key:
            return found
        _log("removing the unfinished work of another config or corpus")
    files.remove(join(root, WORK))
    units = cut_units(resolved, cfg.sources, cfg.unit_bytes)
    total = sum(u.bytes for u in units)
    hash_buckets = max(1, math.ceil(total / 2e9))  # ~2 GB of text (~16 MB of hashes) per dedup task
    plan = {
        "fingerprint": key,
        "units": [u.to_json() for u in units],
        "buckets": {"hash": hash_buckets, "band": hash_buckets * max(1, cfg.clean.minhash.bands // 4)},
        "sample_fraction": 0.0 if cfg.tokenizer.path else min(1.0, cfg.tokenizer.sample_bytes / max(total, 1)),
    }
    files.write_json(where, plan)
    return plan


def prepare(cfg: DataConfig, data_dir: Location, num_cpus: int, key: str, resolved: list[SourceFiles]) -> Manifest:
    """Run the whole data pipeline into data_dir (a local folder or an object-storage URI; after `plan`) and return
    the manifest. (`num_cpus` is what `begin` found; Ray Data sizes each pass's concurrency from the cluster itself.)"""
    global _START
    start = _START = time.perf_counter()
    layout = DataLayout(data_dir if is_uri(data_dir) else Path(data_dir).resolve())
    root = str(layout.root)
    files.remove(layout.manifest)  # data.overwrite: from here on a crash leaves no manifest
    if not any(r.type == "hf" or r.files for r in resolved):
        raise DataError("no readable input: every file of every source is unreadable")
    work = _work_plan(cfg, root, key, resolved)
    units = [Unit.from_json(u) for u in work["units"]]
    buckets, srcs, unit_count = work["buckets"], cfg.sources, len(units)  # what the tasks' closures hold: no listing
    input_bytes = sum(u.bytes for u in units)
    _log(f"reading {sum(len(r.files) for r in resolved):,} files ({_mb(input_bytes)}) from {len(resolved)} source(s) "
         f"in {len(units)} unit(s)")

    # 1. Survey: clean and hash every document; hashes, band keys and the tokenizer's sample go to bucket files.
    fraction, sizes = work["sample_fraction"], [u.bytes for u in units]
    surveys = _run_tasks("surveyed units", root, [f"survey/unit-{u.id:06d}" for u in units], work["units"],
                         lambda u: survey_unit(Unit.from_json(u), srcs[u["source"]], cfg, root, buckets, fraction), sizes)
    counts = [{SOURCE: u.source, DROP: reason, "documents": c[0], "bytes": c[1], "replaced": c[2]}
              for u, s in zip(units, surveys) for reason, c in s["counts"].items()]
    dropped = _dropped(counts, resolved)
    read_docs = sum(c["documents"] for c in counts)
    if not any(c["documents"] for c in counts if not c[DROP]):
        reasons = ", ".join(f"{k}={v['documents']}" for k, v in dropped.items()) or "none"
        raise DataError(f"nothing left after filtering: {read_docs} documents read, dropped: {reasons}")
    check_sources_kept(counts, resolved, cfg.source_names())
    _log(f"cleaned {read_docs:,} documents")

    # 2. Tokenizer: loaded, or trained on the survey's hash-chosen sample.
    if cfg.tokenizer.path:
        fit = {"seconds": 0.0, "trained_on": 0}
        files.atomic_write(work_path(root, "tokenizer.json"), load_tokenizer(cfg.tokenizer.path).to_str())
    elif (fit := record(root, "tokenizer-fit")) is None:
        fit = ray.get(fit_tokenizer.remote(root, [u.id for u in units], cfg))
    tokenizer_json = files.read_text(work_path(root, "tokenizer.json"))
    tokenizer = Tokenizer.from_str(tokenizer_json)
    eot = eot_id(tokenizer, cfg.tokenizer.eot_token)
    dtype = token_dtype(tokenizer.get_vocab_size())
    how = f"loaded {cfg.tokenizer.path}" if cfg.tokenizer.path else \
        f"trained on {_mb(fit['trained_on'])} in {fit['seconds']:.1f} s"
    _log(f"tokenizer {how}: vocab {tokenizer.get_vocab_size():,}")

    # 3. Dedup: every copy (and near-duplicate band) of a document meets in its bucket's task → drop lists per unit.
    near: list[dict[str, Any]] = []
    if cfg.clean.minhash.enabled:
        parts = [{"bucket": b, "parts": p} for b, p in enumerate(bucket_parts(surveys, "bands", buckets["band"]))]
        near = _run_tasks("near-dedup buckets", root, [f"near/bucket-{b:06d}" for b in range(buckets["band"])], parts,
                          lambda p: near_bucket(root, p["parts"], p["bucket"], buckets["hash"]))
    dups: list[dict[str, Any]] = []
    if cfg.clean.dedup or cfg.clean.minhash.enabled:
        near_of = [[(n["bucket"], n["index"][str(b)]) for n in near if str(b) in n["index"]]
                   for b in range(buckets["hash"])]
        parts = [{"bucket": b, "parts": p, "near": near_of[b]}
                 for b, p in enumerate(bucket_parts(surveys, "hashes", buckets["hash"]))]
        dups = _run_tasks("dedup buckets", root, [f"dups/bucket-{b:06d}" for b in range(buckets["hash"])], parts,
                          lambda p: dup_bucket(root, p["parts"], p["near"], p["bucket"], cfg.clean.dedup, unit_count))

    # 4. Write: re-read, skip the drop lists, tokenize, pack and write each unit's tars.
    def drops(u: Unit) -> list[dict[str, Any]]:
        return [{"bucket": d["bucket"], "index": {str(u.id): d["index"][str(u.id)]}} for d in dups
                if str(u.id) in d["index"]]

    written = _run_tasks("written units", root, [f"written/unit-{u.id:06d}" for u in units],
                         [{"unit": u.to_json(), "drops": drops(u)} for u in units],
                         lambda p: write_unit(Unit.from_json(p["unit"]), srcs[p["unit"]["source"]], cfg, root,
                                              p["drops"], eot, dtype.str), sizes)
    nodes = {r["node"] for r in [*surveys, *written]}
    _log(f"read, deduplicated and wrote {len(units)} unit(s) on {len(nodes)} node(s)")
    rows = [{"split": split, SOURCE: w["source"], "unit": w["unit"], **part,
             **{reason: w["dropped"][reason][split][0] for reason in REASONS},
             **{f"{reason}_bytes": w["dropped"][reason][split][1] for reason in REASONS}}
            for w in written for split, part in w["splits"].items()]
    for reason in REASONS:
        if count := sum(int(r[reason]) for r in rows):
            dropped[reason] = {"documents": count, "bytes": sum(int(r[f"{reason}_bytes"]) for r in rows)}
    try:
        check_written(cfg, rows, resolved)
    except DataError:
        for r in rows:  # nothing of a refused prepare stays in the data dir
            for shard in r["shards"]:
                files.remove(join(layout.root, shard["file"]))
                files.remove(join(layout.root, index_name(shard["file"])))
        files.remove(join(root, WORK))
        raise
    files.atomic_write(layout.tokenizer, tokenizer_json)
    manifest = _manifest(cfg, key, tokenizer, eot, dtype, rows, counts, dropped, resolved)
    _remove_stale(layout, manifest)
    files.write_json(layout.manifest, manifest)  # last: the data is complete
    files.remove(join(root, WORK))
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
    written: list[dict[str, Any]],
    counts: list[dict[str, Any]],
    dropped: dict[str, dict[str, int]],
    resolved: list[SourceFiles],
) -> dict[str, Any]:
    names = cfg.source_names()
    splits: dict[str, Any] = {}
    for split in SPLITS:
        rows = sorted((w for w in written if w["split"] == split), key=lambda w: w["unit"])  # units: in source order
        totals = ("sequences", "tokens", "documents", "text_bytes", "doc_tokens", "tail_tokens")
        splits[split] = {
            "shards": [{**shard, "source": names[w[SOURCE]]} for w in rows for shard in w["shards"]],
            **{k: sum(int(w[k]) for w in rows) for k in totals},
        }
        if cfg.chat:  # conversations: kept, cut, left out, and the tokens trained on (data_pipeline.chat_data)
            splits[split]["chat"] = {k: sum(int(w["chat"][k]) for w in rows) for k in CHAT_COUNTS}
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
        "sample_key": ChatOut.sample_key if cfg.chat else "input_ids.npy",
        "loss_mask": cfg.chat,
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
        if chat := split.get("chat"):
            _log(f"{name} conversations: {chat['conversations']:,} read, {chat['truncated']:,} truncated and "
                 f"{chat['dropped_overlong']:,} dropped for exceeding a block, {chat['no_assistant_tokens']:,} skipped "
                 f"with no assistant token to train on; {chat['assistant_tokens']:,} tokens trained on, "
                 f"{chat['padding_tokens']:,} padding")
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
