"""trainer/state.py, trainer/checkpointer.py and the worker's parts with real DeepSpeed in one process (world 1,
gloo), no Ray: a checkpoint — fp32 masters, Adam moments and step, the LR schedule — saved in the background at one
ZeRO stage loads into another and continues as if never interrupted (Adam's state allocated without a step); at most
one save is in flight and the next waits for it; a failed save commits nothing and says why; a checkpoint of another
model is one line; the streamed safetensors files are read by `safetensors` itself; `Worker.setup`, `train_step` (with a
padded, weighted micro-batch) and `evaluate` run on their own. (Resharding across world sizes is tested with Ray in
test_train.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from core.errors import RunFileError
from core.layout import RunLayout
from model.gpt import GPT, ModelConfig
from trainer import state
from trainer.checkpointer import Checkpointer
from trainer.faults import Hooks
from trainer.config import TrainConfig, deepspeed_config, lr_at
from trainer.deepspeed_import import import_deepspeed
from trainer.loop import WorkerConfig, param_groups

SCHEDULE = TrainConfig(max_steps=10, warmup_steps=2, lr=1e-2, weight_decay=0.1, micro_batch_size=2)


@pytest.fixture(scope="module")
def gloo() -> Iterator[None]:
    import torch.distributed as dist

    from tests.conftest import _free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import_deepspeed().init_distributed("gloo")
    yield
    dist.destroy_process_group()


def _model_config(n_embd: int = 16) -> ModelConfig:
    return ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=n_embd)


def _engine(stage: int, precision: str, seed: int = 0, n_embd: int = 16) -> tuple[Any, Any]:
    deepspeed = import_deepspeed()
    torch.manual_seed(seed)
    model = GPT(_model_config(n_embd))
    config = deepspeed_config(SCHEDULE.model_copy(update={"zero_stage": stage}), False, precision, accum=1)  # type: ignore[arg-type]
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, SCHEDULE.weight_decay), config=config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, SCHEDULE)))
    return engine, scheduler


def _train(engine: Any, batches: list[torch.Tensor]) -> None:
    for x in batches:
        _, loss = engine(x[:, :-1], targets=x[:, 1:])
        engine.backward(loss)
        engine.step()


def _state(engine: Any) -> dict[str, torch.Tensor]:
    """The fp32 masters and moments of a world-1 engine (its one fragment of each parameter is the whole)."""
    state.link_moments(engine)
    return {k: v.clone() for k, v in state.snapshot(engine, {}).items()}


class Gate(Hooks):
    """Holds a save's background write after its state file until the test opens it; or fails it."""

    def __init__(self, fail: bool = False):
        self.open, self.fail = threading.Event(), fail

    def after_state_file(self, step: int, rank: int, world: int) -> None:
        if self.fail:
            raise OSError("No space left on device")
        self.open.wait()


def _checkpointer(engine: Any, scheduler: Any, run_dir: Path, stage: int, hooks: Hooks | None = None,
                  asynchronous: bool = True, n_embd: int = 16) -> Checkpointer:
    layout = RunLayout.of(run_dir)
    Path(layout.data.tokenizer).parent.mkdir(parents=True, exist_ok=True)
    Path(layout.data.tokenizer).write_text("{}")  # copied into the published model as it is
    train = SCHEDULE.model_copy(update={"zero_stage": stage, "checkpoint_async": asynchronous})
    cfg = WorkerConfig(train=train, model=_model_config(n_embd), layout=layout, seed=0, global_batch_size=2,
                       use_gpu=False, eot_token="<|endoftext|>", fingerprint={"seed": 0})
    return Checkpointer(cfg, engine, scheduler, hooks or Hooks())


@pytest.mark.parametrize(("before", "after", "precision", "asynchronous"),
                         [(1, 3, "fp32", True), (3, 0, "fp32", True), (0, 2, "fp32", False), (2, 1, "bf16", True)])
def test_state_written_at_one_zero_stage_continues_at_another(
    gloo: None, tmp_path: Path, before: int, after: int, precision: str, asynchronous: bool
) -> None:
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (2, 9), generator=generator) for _ in range(6)]
    first, first_schedule = _engine(before, precision)
    _train(first, batches[:3])
    saver = _checkpointer(first, first_schedule, tmp_path, before, asynchronous=asynchronous)
    saver.save(3)
    saver.wait()
    published = load_file(str(tmp_path / "checkpoint" / "model.safetensors"))  # the consolidated model, published
    assert json.loads((tmp_path / "checkpoint" / "config.json").read_text())["step"] == 3
    assert torch.equal(published["wte.weight"], first.module.wte.weight.detach().float()) or before == 3
    resumed, resumed_schedule = _engine(after, precision, seed=5)  # other initial weights: all must come from the file
    untouched, _ = _engine(after, precision, seed=5)
    loader = _checkpointer(resumed, resumed_schedule, tmp_path, after)
    assert loader.load() == 3
    assert resumed_schedule.get_last_lr() == pytest.approx(first_schedule.get_last_lr())
    saved, loaded = _state(first), _state(resumed)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)  # fp32 as written
    read = loader.resume_bytes
    assert read["resume_read_bytes"][0] >= read["resume_state_bytes"]  # world 1: its share is the whole state
    for engine in (first, resumed, untouched):
        _train(engine, batches[3:])
    tolerance = 1e-4 if precision == "fp32" else 1e-2  # ZeRO stages reduce in other orders; bf16 rounds coarser
    expected, got, control = _state(first), _state(resumed), _state(untouched)
    weights = [k for k in expected if not k.endswith(state.MOMENTS)]
    resumed_diff = max((expected[k] - got[k]).abs().max().item() for k in weights)
    control_diff = max((expected[k] - control[k]).abs().max().item() for k in weights)  # had it loaded nothing
    assert resumed_diff < tolerance and control_diff > max(0.05, 10 * resumed_diff), (resumed_diff, control_diff)


def test_one_save_in_flight_and_a_failed_one_commits_nothing(gloo: None, tmp_path: Path) -> None:
    """The write of step 1 is held after its state file: `save` has returned, training goes on, nothing is committed.
    The save of step 2 first waits for step 1's commit. A save whose write fails commits nothing, and the next `wait`
    raises why in one line; the previous commit stays the newest."""
    from trainer import checkpoints

    engine, schedule = _engine(1, "fp32")
    batch = torch.randint(0, 64, (2, 9))
    gate = Gate()
    saver = _checkpointer(engine, schedule, tmp_path, 1, hooks=gate)
    _train(engine, [batch])
    saver.save(1)
    assert saver.thread is not None and saver.thread.is_alive()
    assert checkpoints.newest(saver.layout) is None  # written in part, not committed
    saver.before_update()  # (as the loop does before every optimizer step) the weights are copied already
    _train(engine, [batch])  # training goes on while step 1 is in flight
    gate.open.set()
    saver.save(2)  # waits for step 1 first
    assert [c.step for c in checkpoints.committed(saver.layout)] == [1]
    saver.wait()
    assert [c.step for c in checkpoints.committed(saver.layout)] == [1, 2]
    failing = _checkpointer(engine, schedule, tmp_path, 1, hooks=Gate(fail=True))
    _train(engine, [batch])
    failing.save(3)
    with pytest.raises(RunFileError, match=r"^checkpoint of step 3 not committed: rank 0: OSError: No space left on "
                                           r"device$"):
        failing.wait()
    assert checkpoints.newest(saver.layout).step == 2


def test_streamed_state_files_are_safetensors(tmp_path: Path) -> None:
    from trainer import tensorfile

    tensors = {"a.weight": torch.randn(7), "a.weight.exp_avg": torch.arange(5, dtype=torch.float32), "b": torch.ones(1)}
    with open(tmp_path / "t.safetensors", "wb") as out:
        record = tensorfile.write(tensors, out, {"step": "3"})
    data = (tmp_path / "t.safetensors").read_bytes()
    assert record["bytes"] == len(data) and record["sha256"] == hashlib.sha256(data).hexdigest()
    loaded = load_file(str(tmp_path / "t.safetensors"))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert all(torch.equal(v, tensors[k]) for k, v in tensorfile.parse(data, "t").items())
    with pa.OSFile(str(tmp_path / "t.safetensors")) as source:
        entries, _ = tensorfile.read_header(source, "t")
        assert torch.equal(tensorfile.read_range(source, entries["a.weight"], 2, 3), tensors["a.weight"][2:5])
    (tmp_path / "bad").write_bytes(b"\xff" * 16)
    with pa.OSFile(str(tmp_path / "bad")) as source, pytest.raises(RunFileError, match="not a safetensors file"):
        tensorfile.read_header(source, "bad")


def test_a_checkpoint_of_another_model_is_one_line(gloo: None, tmp_path: Path) -> None:
    small, schedule = _engine(1, "fp32")
    _train(small, [torch.randint(0, 64, (2, 9))])
    saver = _checkpointer(small, schedule, tmp_path, 1, asynchronous=False)
    saver.save(1)
    wide, schedule = _engine(1, "fp32", n_embd=32)
    with pytest.raises(RunFileError, match=r"state: wte.weight is \(64, 16\), the model has \(64, 32\) "
                                           r"\(a checkpoint of another model\)$"):
        _checkpointer(wide, schedule, tmp_path, 1, n_embd=32).load()


def test_the_worker_parts_run_on_their_own(gloo: None, tmp_path: Path) -> None:
    """Global batch 5 in micro-batches of 2 on one worker: 3 micro-batches of 2, 2, 1 (the short one weighted 1/2)."""
    from core.layout import RunLayout
    from tests.trainer.test_data import hand_made_data
    from trainer.data import rank_steps
    from trainer.loop import Worker

    hand_made_data(tmp_path / "data", [6, 5, 7], trainable=True)
    model = ModelConfig(vocab_size=100, block_size=4, n_layer=1, n_head=2, n_embd=16)
    train = TrainConfig(micro_batch_size=2, lr=1e-2, warmup_steps=0, eval_batches=2, precision="fp32")
    worker = Worker(WorkerConfig(train=train, model=model, layout=RunLayout.of(tmp_path), seed=3, global_batch_size=5,
                                 use_gpu=False, eot_token="<|endoftext|>", fingerprint={}))
    worker.setup()
    assert worker.accum == 3 and worker.step == 0
    steps = rank_steps(worker.train_data, worker.sources.order, 0, 5, 2, rank=0, world=1)
    first = next(steps)
    assert [len(b) for b in first.micro_batches] == [2, 2, 1] and first.weights == pytest.approx([1.2, 1.2, 0.6])
    totals = [worker.train_step(first)[0]] + [worker.train_step(next(steps))[0] for _ in range(29)]
    assert [int(t[1]) for t in totals] == [5] * 30  # (loss summed over the rank's samples, samples)
    losses = [(t[0] / t[1]).item() for t in totals]
    assert worker.step == 30 and sum(losses[-5:]) < sum(losses[:5]) - 1.0  # it learns the hand-made blocks
    val_loss, val_bpb = worker.evaluate()
    assert 0 < val_loss < losses[0] and val_bpb > 0
    worker.train_data.close()
    worker.val_data.close()


def test_nothing_in_raygpt_unpickles() -> None:
    """Why resume needs no signature on its commit records (issue 16): checkpoints, state and data are safetensors,
    JSON and .npy without pickles, and no code path of raygpt can load a pickle, so bytes in a bucket any node role
    can write are at worst wrong numbers (and caught by the commit record's sha256), never code."""
    from tests.conftest import REPO

    loaders = re.compile(r"torch\.load\(|pickle\.loads?\(|cloudpickle\.loads?\(|allow_pickle\s*=\s*True|"
                         r"weights_only\s*=\s*False|joblib\.load|dill\.load|\.load_checkpoint\(|Unpickler")
    found = [f"{path.relative_to(REPO)}:{n}" for package in ("cluster", "trainer", "data_pipeline", "model", "evaluation")
             for path in (REPO / package).rglob("*.py") for n, line in enumerate(path.read_text().splitlines(), 1)
             if loaders.search(line)]
    assert found == []
