"""The checkpoint component of a training worker: the loop calls `load()` once and `save(step)` at each checkpoint;
this owns the snapshot, the (background) upload, the commit, publishing the model and pruning — the protocol of
`trainer.checkpoints`, in the state format of `trainer.state`. Used by `raygpt train` workers (trainer/loop.py).

A save, on every rank:
  1. **snapshot**: its fragments of the fp32 master weights and Adam's moments are copied to host memory; rank 0 also
     takes the module's weights for the published model (gathered under ZeRO-3: the one gather of a checkpoint). With
     `train.checkpoint_async` the copy runs in a background thread while the next step's forward and backward run:
     training waits for it only before its next optimizer step (`before_update`), and not at all when it is done.
  2. **write** (in that thread at the lowest CPU priority, else inline): each rank streams its fragments into
     `step-N/state/rank-R.safetensors` of the run's storage (local, or an object store), hashing as it writes and
     flushing to disk as it goes; rank 0 also writes the index and the model.
  3. **commit**: the file records of every rank meet on rank 0 over a gloo group of the checkpoint's own (collectives
     of a second thread must not interleave with training's), and only then is `commit.json` written; the model is
     published and older checkpoints pruned.
At most one save is in flight: the next one waits for it. A crash before step 3 leaves a folder without a commit
record, which counts for nothing: the run resumes from the previous commit.

Why not `ray.train.report(checkpoint=..., checkpoint_upload_mode=ASYNC)`: its upload copies a finished local folder,
and nothing tells a worker when *every* rank's upload has finished — which is what the commit record must wait for.
raygpt never asks Ray Train for a checkpoint (it resumes from its commit records), so Ray only schedules the workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Any

import torch
import torch.distributed as dist

from core import files
from core.errors import RunFileError
from core.layout import RunLayout, join
from model.checkpoint import CONFIG, TOKENIZER, WEIGHTS, checkpoint_parts
from trainer import checkpoints, liveness, state, tensorfile
from trainer.faults import Hooks
from trainer.metrics import metrics_length, upload_metrics

STATE_DIR = "state"
BACKGROUND_NICE = 19


class Checkpointer:
    """Saves and loads one worker's share of the run's training checkpoints (see the module docstring)."""

    def __init__(self, cfg: Any, engine: Any, scheduler: Any, hooks: Hooks):
        self.cfg, self.layout, self.engine, self.scheduler, self.hooks = cfg, cfg.layout, engine, scheduler, hooks
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.asynchronous = cfg.train.checkpoint_async
        self.group = dist.new_group(backend="gloo")  # the background thread's own collectives
        self.static = state.layout(engine)
        self.thread: threading.Thread | None = None
        self.buffers: dict[str, torch.Tensor] = {}  # host copies, reused by every save (one is in flight at most)
        self.copied = threading.Event()  # the save in flight has copied the weights (training may update them)
        self.copied.set()
        self.error: BaseException | None = None
        self.saved_step: int | None = None
        self.resume_bytes: dict[str, Any] = {}
        """After a resume: the bytes each rank read and the state's total (reported in the first metrics line)."""
        self.written_by = 0
        """After a resume: the world size that wrote the checkpoint."""
        self.metrics_bytes: int | None = None
        """Rank 0 of a run on object storage: the metrics mirror's length when the save in flight was taken."""

    # -- save ------------------------------------------------------------------------------------------------------
    def save(self, step: int) -> None:
        """Save `step` (every rank calls it at the same step): its share is copied to host memory — asynchronously
        in the background, while the next step's forward and backward run, `before_update` holding its optimizer
        step until the copy is done — then written and committed. A step already saved is not saved again."""
        if step == self.saved_step:
            return
        self.wait()
        state.link_moments(self.engine)
        # ZeRO-3's module weights are gathered (a collective: here, on the training thread); other stages' are copied
        full = state.consolidated(self.engine, self.buffers) if self.cfg.train.zero_stage == 3 else None
        index = state.index(self.static, step, state.adam_step(self.engine)) if self.rank == 0 else None
        self.metrics_bytes = metrics_length(self.layout) if self.rank == 0 else None
        self.saved_step = step
        self.copied.clear()
        if not self.asynchronous:
            self._save(step, full, index)
            return
        self.thread = threading.Thread(target=self._background, args=(step, full, index), name=f"checkpoint-{step}",
                                       daemon=True)
        self.thread.start()

    def before_update(self) -> None:
        """Called before every optimizer step: the weights may change only once a save in flight has copied them."""
        self.copied.wait()

    def wait(self) -> None:
        """Until the save in flight (if any) has committed; its error, if it failed, is raised here."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def _background(self, *args: Any) -> None:
        try:
            self._save(*args)
        except BaseException as e:  # raised in the training thread by the next wait()
            self.error = e

    def _save(self, step: int, full: dict[str, torch.Tensor] | None, index: dict[str, Any] | None) -> None:
        try:
            snapshot = state.snapshot(self.engine, self.buffers)
            full = full if full is not None else state.module_weights(self.engine, self.buffers)
        finally:
            self.copied.set()
        if self.asynchronous:
            try:  # the writer yields the CPU to training (it is bound by the disk or network anyway); Linux: this thread
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
            except (AttributeError, OSError):
                pass
        self._write_and_commit(step, snapshot, full, index)

    def _write_and_commit(self, step: int, snapshot: dict[str, torch.Tensor], full: dict[str, torch.Tensor] | None,
                          index: dict[str, Any] | None) -> None:
        location = self.layout.checkpoint_dir(step)
        records: dict[str, Any] | str
        try:
            records = self._write(location, step, snapshot, full, index)
        except Exception as e:  # every rank must reach the gather below, or the others would wait for ever
            records = f"rank {self.rank}: {type(e).__name__}: {e}"
        del snapshot, full
        every: list[Any] = [None] * self.world
        dist.all_gather_object(every, records, group=self.group)  # every rank's files are in storage
        if failed := [r for r in every if isinstance(r, str)]:
            raise RunFileError(f"checkpoint of step {step} not committed: {failed[0]}")
        if self.rank != 0:
            return
        liveness.check(self.cfg.driver, self.rank, step)  # never commit for a driver that is gone
        upload_metrics(self.layout, self.metrics_bytes)  # the metrics to this step first: a resume must find them
        record = checkpoints.commit(self.layout, step, self.cfg.fingerprint, self.world, checkpoints.merge_files(every))
        if self.layout.remote_storage and not self.layout.remote:  # the published model of a local run is local
            with files.atomic_folder(self.layout.model_dir(step), replace=True) as tmp:
                files.download_folder(join(location, RunLayout.MODEL), tmp)
        checkpoints.publish(self.layout, step, record)
        checkpoints.prune(self.layout, self.cfg.train.keep_checkpoints)

    def _write(self, location: str, step: int, snapshot: dict[str, torch.Tensor],
               full: dict[str, torch.Tensor] | None, index: dict[str, Any] | None) -> dict[str, Any]:
        """This rank's files of the checkpoint, each written whole or not at all; their records."""
        records = {}
        name = f"{STATE_DIR}/{state.rank_file(self.rank)}"
        with files.output(join(location, name)) as out:
            records[name] = tensorfile.write(snapshot, out, {"step": str(step), "rank": str(self.rank)})
        self.hooks.after_state_file(step, self.rank, self.world)
        if self.rank != 0:
            return records
        assert index is not None and full is not None
        raw = json.dumps(index, indent=1).encode()
        files.atomic_write(join(location, STATE_DIR, state.INDEX), raw)
        records[f"{STATE_DIR}/{state.INDEX}"] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
        # the published model, from the weights already taken (no second gather), streamed and hashed like the state
        weights, metadata, config = checkpoint_parts(full, self.cfg.model, {"step": step, "eot_token": self.cfg.eot_token})
        with files.output(join(location, RunLayout.MODEL, WEIGHTS)) as out:
            records[f"{RunLayout.MODEL}/{WEIGHTS}"] = tensorfile.write(weights, out, metadata)
        for name, data in ((CONFIG, config.encode()), (TOKENIZER, files.read_bytes(self.layout.data.tokenizer))):
            files.atomic_write(join(location, RunLayout.MODEL, name), data)
            records[f"{RunLayout.MODEL}/{name}"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        return records

    # -- load ------------------------------------------------------------------------------------------------------
    def load(self) -> int | None:
        """Resume from the newest committed checkpoint (rank 0 picks it and clears newer uncommitted folders); every
        rank reads only its share of the state, each byte checked against the commit record, whatever world size and
        ZeRO stage wrote it. Returns its step, or None when there is none."""
        holder: list[checkpoints.Committed | None] = [None]
        if self.rank == 0:
            holder[0] = checkpoints.newest(self.layout)
            stale = [s for s in checkpoints.step_folders(self.layout) if holder[0] is None or s > holder[0].step]
            checkpoints.remove_steps(self.layout, stale)  # crashed saves: a new save of that step must start empty
        dist.broadcast_object_list(holder, src=0)
        chosen = holder[0]
        if chosen is None:
            return None
        folder = join(chosen.location, STATE_DIR)
        reader = _ShareReader(chosen, folder, self.rank, self.world)
        saved = state.parse_index(reader.verified(state.INDEX), folder)
        values = reader.read(state.plan(self.engine, saved, folder))
        reader.check_rest(self.rank, self.world)
        state.init_optimizer_state(self.engine)
        step = state.apply(self.engine, values, saved, self.scheduler)
        every: list[Any] = [None] * self.world
        dist.all_gather_object(every, reader.bytes_read)
        self.resume_bytes = {"resume_read_bytes": every, "resume_state_bytes": reader.total}
        self.written_by = int(chosen.record["world_size"])
        self.saved_step = step
        return step


class _ShareReader:
    """Reads one rank's share of a committed state folder: a file it needs whole is read in one go and checked by its
    sha256; pieces of other files by ranged reads, those files being checked (streamed) by one rank each. Every
    rank's problems are shared, so all ranks refuse the checkpoint with the same line."""

    def __init__(self, chosen: checkpoints.Committed, folder: str, rank: int, world: int):
        self.records: dict[str, dict[str, Any]] = chosen.record["files"]
        self.folder, self.rank, self.world = folder, rank, world
        self.whole: set[str] = set()
        self.problems: list[str] = []
        self.bytes_read = 0
        self.total = sum(r["bytes"] for k, r in self.records.items() if k.startswith(f"{STATE_DIR}/"))

    def _record(self, name: str) -> dict[str, Any]:
        if (record := self.records.get(f"{STATE_DIR}/{name}")) is None:
            raise RunFileError(f"{self.folder}/{name} is not in the commit record; refusing to load this checkpoint")
        return record

    def verified(self, name: str) -> bytes:
        """A whole file, after checking it against its commit record."""
        record, where = self._record(name), join(self.folder, name)
        data = files.read_bytes(where)
        self.bytes_read += len(data)
        if len(data) != record["bytes"] or hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise RunFileError(f"{where}: size or sha256 differs from the commit record; the checkpoint is corrupt")
        self.whole.add(name)
        return data

    def read(self, pieces: dict[str, list[state.Piece]]) -> dict[str, dict[str, torch.Tensor]]:
        """This rank's range of every parameter it holds: {name: {key: 1-D fp32}}."""
        by_file: dict[str, list[state.Piece]] = {}
        for found in pieces.values():
            for piece in found:
                by_file.setdefault(piece.file, []).append(piece)
        values = {name: {k: torch.empty(sum(p.numel for p in found)) for k in state.KEYS} for name, found in pieces.items()}
        for file, wanted in by_file.items():
            try:
                self._read_file(file, wanted, values)
            except RunFileError as e:
                self.problems.append(str(e))
        return values

    def _read_file(self, file: str, wanted: list[state.Piece], values: dict[str, dict[str, torch.Tensor]]) -> None:
        where = join(self.folder, file)
        with files.open_random(where) as source:
            entries, header_bytes = tensorfile.read_header(source, str(where))
            self.bytes_read += header_bytes
            names = [(p, key, state.tensor_name(p.name, key)) for p in wanted for key in state.KEYS]
            if missing := [name for _, _, name in names if name not in entries]:
                raise RunFileError(f"{where}: no tensor {missing[0]!r} (a corrupt checkpoint)")
            if len(names) == len(entries) and all(p.start == 0 and p.numel * 4 == entries[n].end - entries[n].begin
                                                  for p, _, n in names):
                # its own file (the same world size and stage): one read, checked whole
                tensors = tensorfile.parse(self.verified(file), str(where))
                parts = {n: tensors[n] for _, _, n in names}
            else:
                parts = {n: tensorfile.read_range(source, entries[n], p.start, p.numel) for p, _, n in names}
                self.bytes_read += sum(t.numel() * 4 for t in parts.values())
        for p, key, name in names:
            values[p.name][key][p.offset:p.offset + p.numel] = parts[name]  # (a whole file: p is its whole fragment)

    def check_rest(self, rank: int, world: int) -> None:
        """Files no rank read whole are streamed through sha256 by one rank each; then every rank's problems are
        shared and the first one is raised on every rank."""
        every: list[Any] = [None] * world
        dist.all_gather_object(every, sorted(self.whole))
        read_whole = {name for names in every for name in names}
        rest = sorted(k.split("/", 1)[1] for k in self.records if k.startswith(f"{STATE_DIR}/") and k.split("/", 1)[1] not in read_whole)
        for i, name in enumerate(rest):
            if i % world == rank:
                try:
                    self.verified(name)
                except RunFileError as e:
                    self.problems.append(str(e))
        problems: list[Any] = [None] * world
        dist.all_gather_object(problems, self.problems)
        if found := [p for ps in problems for p in ps]:
            raise RunFileError(found[0])
