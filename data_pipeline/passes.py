"""The work of `raygpt prepare CONFIG`: functions that `data_pipeline.prepare` maps over the units of the corpus (or
the dedup buckets) with Ray Data, one task each, each streaming its input and writing its own files under DATA/_work
(this module owns that folder) and the shards:

  survey (per unit)   read, clean and hash every document; write the kept ones' (hash, position) bucketed by hash,
                      their MinHash band keys bucketed by band (near-dedup on), and a hash-chosen sample of their text
                      (tokenizer training);
  near (per bucket)   documents sharing a band key → the hashes of near duplicates, bucketed by hash;
  dups (per bucket)   every copy of a hash meets here: all but the first (by unit, then position; units are in source
                      order) are duplicates; with the near duplicates of the bucket → a drop list per unit;
  write (per unit)    re-read and clean the unit, skip its drop list, tokenize (`encode_batch_fast`), join documents
                      with EOT, cut blocks of seq_len + 1 and write them to the unit's train and val tars (a new tar
                      every data.shard_bytes).
So a duplicate is found before it is tokenized, and no task holds more than a batch of text, one bucket of hashes,
or one unit's drop list. Every file is written atomically, and each task's record (`<name>.json`, written last) marks
it done, so a crashed prepare resumes with the tasks that have no record, and ends with the same bytes. Bucket files
are Arrow IPC files of one record batch per bucket, so a reader fetches only its bucket (ranged reads on a bucket).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections import defaultdict
from collections.abc import Iterator
from typing import IO, Any

import numpy as np
import pyarrow as pa
import ray
from tokenizers import Tokenizer

from core import files
from core.layout import Location, join
from data_pipeline.clean import DROP, HASH, NBYTES, REPLACED, TEXT, clean_batch, unit_interval
from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.dedup import band_collisions, band_rows, duplicate_reasons
from data_pipeline.pack import in_sample, is_val
from data_pipeline.chat_data import ChatOut
from data_pipeline.shards import SplitWriter
from data_pipeline.units import Unit, read_unit

WORK = "_work"
"""DATA/_work: the passes' bucket files and task records; removed once the manifest is written."""
_BUCKET_SALT, _BAND_SALT = 4, 5
REASONS = ("duplicate", "near_duplicate")
HASHES = pa.schema([("hash", pa.int64()), ("pos", pa.int64())])
BANDS = pa.schema([("band", pa.int64()), ("hash", pa.int64())])
NEAR = pa.schema([("hash", pa.int64())])
DROPS = pa.schema([("pos", pa.int64()), ("reason", pa.int8())])  # reason: index into REASONS
SAMPLE = pa.schema([("text", pa.large_string()), ("hash", pa.int64())])


def work_path(data_dir: Location, *parts: str) -> Location:
    return join(data_dir, WORK, *parts)


def record(data_dir: Location, name: str) -> dict[str, Any] | None:
    """A task's record (it finished), or None."""
    path = work_path(data_dir, f"{name}.json")
    return files.read_json(path, "prepare task record") if files.is_file(path) else None


def bucket_of(keys: np.ndarray, buckets: int, salt: int) -> np.ndarray:
    return np.minimum((unit_interval(keys, salt) * buckets).astype(np.int64), buckets - 1)


class BucketWriter:
    """Rows bucketed by a key into one Arrow IPC file: one record batch per bucket each time `limit` bytes are
    buffered (once per file for a unit of normal size). `close` returns the index bucket → record batch numbers."""

    def __init__(self, out: IO[bytes], schema: pa.Schema, buckets: int, limit: int) -> None:
        self.schema, self.buckets, self.limit = schema, buckets, limit
        self.writer = pa.ipc.new_file(out, schema)
        self.pending: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
        self.size, self.batches = 0, 0
        self.index: dict[int, list[int]] = defaultdict(list)

    def add(self, bucket: np.ndarray, columns: dict[str, np.ndarray]) -> None:
        if not len(bucket):
            return
        self.pending.append((bucket, columns))
        self.size += sum(c.nbytes for c in columns.values())
        if self.size >= self.limit:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        bucket = np.concatenate([b for b, _ in self.pending])
        columns = {n: np.concatenate([c[n] for _, c in self.pending]) for n in self.schema.names}
        order = np.argsort(bucket, kind="stable")
        bucket = bucket[order]
        bounds = np.flatnonzero(np.diff(bucket)) + 1
        for part in np.split(np.arange(len(bucket)), bounds):
            self.writer.write_batch(pa.record_batch({n: columns[n][order[part]] for n in self.schema.names},
                                                    schema=self.schema))
            self.index[int(bucket[part[0]])].append(self.batches)
            self.batches += 1
        self.pending, self.size = [], 0

    def close(self) -> dict[str, list[int]]:
        self._flush()
        self.writer.close()
        return {str(b): i for b, i in sorted(self.index.items())}


def read_bucket(path: Location, batches: list[int], schema: pa.Schema) -> pa.Table:
    """The record batches of one bucket of a bucket file (ranged reads: only those batches are fetched)."""
    if not batches:
        return schema.empty_table()
    with files.open_random(path) as f:
        reader = pa.ipc.open_file(f)
        return pa.Table.from_batches([reader.get_batch(i) for i in batches], schema=schema)


@contextlib.contextmanager
def _bucket_files(data_dir: Location, name: str, specs: dict[str, tuple[pa.Schema, int]], limit: int
                  ) -> Iterator[dict[str, BucketWriter]]:
    with contextlib.ExitStack() as stack:
        yield {kind: BucketWriter(stack.enter_context(files.output(work_path(data_dir, f"{name}.{kind}.arrow"))),
                                  schema, buckets, limit) for kind, (schema, buckets) in specs.items()}


# -- survey (per unit) ------------------------------------------------------------------------------------------------
def survey_unit(unit: Unit, src: SourceConfig, cfg: DataConfig, data_dir: Location, buckets: dict[str, int],
                sample_fraction: float) -> dict[str, Any]:
    """Pass 1 over a unit → its record: counts by drop reason, documents, and the index of its bucket files."""
    name = f"survey/unit-{unit.id:06d}"
    minhash = cfg.clean.minhash
    specs = {"hashes": (HASHES, buckets["hash"])}
    if minhash.enabled:
        specs["bands"] = (BANDS, buckets["band"])
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    position = sampled = 0
    with _bucket_files(data_dir, name, specs, cfg.batch_bytes) as out, \
            files.output(work_path(data_dir, f"{name}.sample.arrow")) as sample_file, \
            pa.ipc.new_file(sample_file, SAMPLE) as sample:
        for batch in read_unit(unit, src, cfg.clean.invalid_utf8, cfg.batch_bytes):
            batch = clean_batch(batch, cfg.clean)
            for reason in np.unique(batch[DROP]):
                mine = batch[DROP] == reason
                c = counts[str(reason)]
                c[0] += int(mine.sum())
                c[1] += int(batch[NBYTES][mine].sum())
                c[2] += int(batch[REPLACED][mine].sum())
            kept = np.flatnonzero(batch[DROP] == "")
            hashes = batch[HASH][kept]
            out["hashes"].add(bucket_of(hashes, buckets["hash"], _BUCKET_SALT), {"hash": hashes, "pos": position + kept})
            if minhash.enabled:
                bands, of = band_rows(batch[TEXT][kept], hashes, minhash)
                out["bands"].add(bucket_of(bands, buckets["band"], _BAND_SALT), {"band": bands, "hash": of})
            chosen = kept[in_sample(hashes, sample_fraction)] if sample_fraction > 0 else kept[:0]
            if len(chosen):
                sample.write_batch(pa.record_batch({"text": batch[TEXT][chosen].tolist(), "hash": batch[HASH][chosen]},
                                                   schema=SAMPLE))
                sampled += sum(len(t.encode("utf-8")) for t in batch[TEXT][chosen])
            position += len(batch[DROP])
        index = {kind: writer.close() for kind, writer in out.items()}
    result = {"unit": unit.id, "documents": position, "sampled": sampled, "counts": dict(counts), "index": index,
              "node": ray.get_runtime_context().get_node_id()}
    files.write_json(work_path(data_dir, f"{name}.json"), result)
    return result


@ray.remote(num_cpus=1)
def fit_tokenizer(data_dir: Location, units: list[int], cfg: DataConfig) -> dict[str, Any]:
    """Train the tokenizer on the units' samples, in unit order, each distinct text once, up to sample_bytes."""
    import time

    from data_pipeline.tokenizer import train_tokenizer

    seen: set[int] = set()
    trained_on = 0

    def texts() -> Iterator[str]:
        nonlocal trained_on
        for unit in units:
            if trained_on >= cfg.tokenizer.sample_bytes:
                return
            with files.open_random(work_path(data_dir, f"survey/unit-{unit:06d}.sample.arrow")) as f:
                reader = pa.ipc.open_file(f)
                for i in range(reader.num_record_batches):
                    batch = reader.get_batch(i)
                    for text, h in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                        if h not in seen and trained_on < cfg.tokenizer.sample_bytes:
                            seen.add(h)
                            trained_on += len(text.encode("utf-8"))
                            yield text

    start = time.perf_counter()
    tokenizer = train_tokenizer(texts(), cfg.tokenizer)
    files.atomic_write(work_path(data_dir, "tokenizer.json"), tokenizer.to_str())
    result = {"seconds": time.perf_counter() - start, "trained_on": trained_on}
    files.write_json(work_path(data_dir, "tokenizer-fit.json"), result)
    return result


# -- dedup (per bucket) -----------------------------------------------------------------------------------------------
def bucket_parts(surveys: list[dict[str, Any]], kind: str, buckets: int) -> list[list[tuple[int, list[int]]]]:
    """Per bucket, the (unit, record batches) of every unit's `kind` file that holds rows of it: what the bucket's
    task reads (so each task is handed its own part of the index, not the whole of it)."""
    parts: list[list[tuple[int, list[int]]]] = [[] for _ in range(buckets)]
    for s in surveys:
        for bucket, batches in s["index"].get(kind, {}).items():
            parts[int(bucket)].append((s["unit"], batches))
    return parts


def _gather(data_dir: Location, kind: str, parts: list[tuple[int, list[int]]], schema: pa.Schema
            ) -> tuple[pa.Table, np.ndarray]:
    """One bucket's rows of the units' `kind` files → (rows, the unit of each row)."""
    tables, units = [], []
    for unit, batches in parts:
        table = read_bucket(work_path(data_dir, f"survey/unit-{unit:06d}.{kind}.arrow"), batches, schema)
        tables.append(table)
        units.append(np.full(table.num_rows, unit, dtype=np.int64))
    if not tables:
        return schema.empty_table(), np.zeros(0, dtype=np.int64)
    return pa.concat_tables(tables), np.concatenate(units)


def near_bucket(data_dir: Location, parts: list[tuple[int, list[int]]], bucket: int, hash_buckets: int
                ) -> dict[str, Any]:
    """Every band key of one band bucket (`parts`: of `bucket_parts`) → the near duplicates' hashes, by hash bucket."""
    bands, _ = _gather(data_dir, "bands", parts, BANDS)
    near = band_collisions({"band": bands.column("band").to_numpy(), HASH: bands.column("hash").to_numpy()})[HASH]
    name = f"near/bucket-{bucket:06d}"
    with files.output(work_path(data_dir, f"{name}.arrow")) as f:
        writer = BucketWriter(f, NEAR, hash_buckets, 1 << 62)
        writer.add(bucket_of(near, hash_buckets, _BUCKET_SALT), {"hash": near})
        index = writer.close()
    result = {"bucket": bucket, "near": len(near), "index": index}
    files.write_json(work_path(data_dir, f"{name}.json"), result)
    return result


def dup_bucket(data_dir: Location, parts: list[tuple[int, list[int]]], near: list[tuple[int, list[int]]], bucket: int,
               exact: bool, units_total: int) -> dict[str, Any]:
    """Every copy of the hashes of one bucket (`parts`: of `bucket_parts`; `near`: (near bucket, record batches)) →
    the drop lists of the units, one record batch per unit."""
    rows, units = _gather(data_dir, "hashes", parts, HASHES)
    hashes, positions = rows.column("hash").to_numpy(), rows.column("pos").to_numpy()
    near_hashes = [read_bucket(work_path(data_dir, f"near/bucket-{n:06d}.arrow"), batches, NEAR).column("hash").to_numpy()
                   for n, batches in near]
    order = np.lexsort((positions, units, hashes))  # copies by unit (units are in source order), then position
    reasons = duplicate_reasons(hashes[order], np.concatenate([np.zeros(0, np.int64), *near_hashes]), exact)
    dropped = order[reasons != ""]
    codes = (reasons[reasons != ""] == REASONS[1]).astype(np.int8)  # index into REASONS
    by_unit = np.argsort(units[dropped], kind="stable")
    name = f"dups/bucket-{bucket:06d}"
    with files.output(work_path(data_dir, f"{name}.arrow")) as f:
        writer = BucketWriter(f, DROPS, units_total, 1 << 62)
        writer.add(units[dropped][by_unit], {"pos": positions[dropped][by_unit], "reason": codes[by_unit]})
        index = writer.close()
    result = {"bucket": bucket, "dropped": int(len(dropped)), "index": index}
    files.write_json(work_path(data_dir, f"{name}.json"), result)
    return result


# -- write (per unit) -------------------------------------------------------------------------------------------------
_TOKENIZERS: dict[int, Tokenizer] = {}  # per worker process: built once, reused by every unit it writes
_ENCODE_BYTES = 1 << 20
"""Text per `encode_batch_fast` call: its encodings (ids, token strings, masks) take roughly 40-50 bytes per byte."""


def _slices(rows: np.ndarray, nbytes: np.ndarray, limit: int) -> Iterator[np.ndarray]:
    """`rows` cut into consecutive runs of about `limit` bytes of text (a longer document is a run of its own)."""
    start, size = 0, 0
    for i, row in enumerate(rows):
        if i > start and size + nbytes[row] > limit:
            yield rows[start:i]
            start, size = i, 0
        size += int(nbytes[row])
    if start < len(rows):
        yield rows[start:]


def release_memory() -> None:
    """Hand the heap that a task freed back to the OS (glibc keeps it otherwise, so a worker's resident memory would
    grow to the largest batch it ever held, task after task)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _TextOut(SplitWriter):
    """A split of a text unit: documents joined by EOT into one token stream, cut into blocks of block_len; the ids
    left over are carried to the next batch (and dropped at the end as `tail_tokens`)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.carry = np.zeros(0, dtype=self.dtype)

    def add(self, docs: list[Any], text_bytes: int, eot: int) -> None:
        self.totals["documents"] += len(docs)
        self.totals["doc_tokens"] += sum(len(d.ids) for d in docs)
        self.totals["text_bytes"] += text_bytes
        stream = np.concatenate([self.carry] + [np.asarray(d.ids + [eot], dtype=self.dtype) for d in docs])
        n = len(stream) // self.block_len
        self.carry = stream[n * self.block_len:].copy()
        self.write_blocks(stream[: n * self.block_len].reshape(n, self.block_len))

    def tail(self) -> dict[str, Any]:
        return {"tail_tokens": len(self.carry)}


def write_unit(unit: Unit, src: SourceConfig, cfg: DataConfig, data_dir: Location, dups: list[dict[str, Any]],
               eot: int, dtype: str) -> dict[str, Any]:
    """Pass 2 over a unit → its tars and record: per split the shards and totals, and what dedup dropped."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one task per core
    tokenizer_json = files.read_text(work_path(data_dir, "tokenizer.json"))
    key = hash(tokenizer_json)
    if (tokenizer := _TOKENIZERS.get(key)) is None:
        tokenizer = _TOKENIZERS[key] = Tokenizer.from_str(tokenizer_json)
    drops = [read_bucket(work_path(data_dir, f"dups/bucket-{d['bucket']:06d}.arrow"), d["index"].get(str(unit.id), []),
                         DROPS) for d in dups]
    table = pa.concat_tables(drops) if drops else DROPS.empty_table()
    drop_pos, drop_code = table.column("pos").to_numpy(), table.column("reason").to_numpy()
    order = np.argsort(drop_pos)
    drop_pos, drop_code = drop_pos[order], drop_code[order]
    dropped = {reason: {split: [0, 0] for split in ("train", "val")} for reason in REASONS}
    chat = src.format == "chat"
    outs: dict[str, Any] = {
        split: ChatOut(*where, overlong=cfg.chat_overlong, end_of_text=eot) if chat else _TextOut(*where)
        for split in ("train", "val")
        for where in [(data_dir, split, unit.id, cfg.seq_len + 1, np.dtype(dtype), cfg.shard_bytes)]}
    position = 0
    try:
        for batch in read_unit(unit, src, cfg.clean.invalid_utf8, cfg.batch_bytes):
            batch = clean_batch(batch, cfg.clean)
            n = len(batch[DROP])
            at = np.searchsorted(drop_pos, [position, position + n])
            code = np.full(n, -1, dtype=np.int8)
            code[drop_pos[at[0]:at[1]] - position] = drop_code[at[0]:at[1]]
            val = is_val(batch[HASH], cfg.val_fraction)
            nbytes = np.array([len(t.encode("utf-8")) for t in batch[TEXT]], dtype=np.int64)
            for split, in_split in (("train", ~val), ("val", val)):
                for r, reason in enumerate(REASONS):
                    mine = in_split & (code == r)
                    dropped[reason][split][0] += int(mine.sum())
                    dropped[reason][split][1] += int(nbytes[mine].sum())
                keep = np.flatnonzero(in_split & (batch[DROP] == "") & (code < 0))
                for part in _slices(keep, nbytes, _ENCODE_BYTES):
                    texts = batch[TEXT][part].tolist()
                    # chat: the loss mask needs each token's characters (offsets), which the fast path skips
                    encode = tokenizer.encode_batch if chat else tokenizer.encode_batch_fast
                    encodings = encode(texts, add_special_tokens=False)
                    outs[split].add(list(zip(encodings, texts)) if chat else encodings, int(nbytes[part].sum()), eot)
                    del encodings
            position += n
        splits = {split: out.finish() for split, out in outs.items()}
    except BaseException:
        for out in outs.values():
            out.abandon()
        raise
    result = {"unit": unit.id, "source": unit.source, "splits": splits, "dropped": dropped,
              "node": ray.get_runtime_context().get_node_id()}
    files.write_json(work_path(data_dir, f"written/unit-{unit.id:06d}.json"), result)
    return result
