"""trainer/state.py and the worker's parts with real DeepSpeed in one process (world 1, gloo), no Ray: the saved
state — fp32 masters, Adam moments and step, the LR schedule — loads into another ZeRO stage and continues as if
never interrupted; a checkpoint of another model is one line; `Worker.setup`, `train_step` (with a padded, weighted
micro-batch) and `evaluate` run on their own. (Resharding across world sizes is tested with Ray in test_train.py.)"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from core.errors import RunFileError
from model.gpt import GPT, ModelConfig
from trainer import state
from trainer.config import TrainConfig, deepspeed_config, lr_at
from trainer.deepspeed_import import import_deepspeed
from trainer.loop import param_groups

SCHEDULE = TrainConfig(max_steps=10, warmup_steps=2, lr=1e-2, weight_decay=0.1, micro_batch_size=2)


@pytest.fixture(scope="module")
def gloo() -> Iterator[None]:
    import torch.distributed as dist

    from tests.conftest import _free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import_deepspeed().init_distributed("gloo")
    yield
    dist.destroy_process_group()


def _engine(stage: int, precision: str, seed: int = 0, n_embd: int = 16) -> tuple[Any, Any]:
    deepspeed = import_deepspeed()
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=n_embd))
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


def _weights(engine: Any) -> dict[str, torch.Tensor]:
    return {n: state._get(engine, p, None) for n, p in engine.module.named_parameters()}


@pytest.mark.parametrize(("before", "after", "precision"), [(1, 3, "fp32"), (3, 0, "fp32"), (0, 2, "fp32"), (2, 1, "bf16")])
def test_state_written_at_one_zero_stage_continues_at_another(
    gloo: None, tmp_path: Path, before: int, after: int, precision: str
) -> None:
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (2, 9), generator=generator) for _ in range(6)]
    first, first_schedule = _engine(before, precision)
    _train(first, batches[:3])
    state.save(first, tmp_path / "state", step=3)
    resumed, resumed_schedule = _engine(after, precision, seed=5)  # other initial weights: all must come from the file
    untouched, _ = _engine(after, precision, seed=5)
    example = torch.zeros(2, 9, dtype=torch.long)
    assert state.load(resumed, tmp_path / "state", resumed_schedule, example, accum=1) == 3
    assert resumed_schedule.get_last_lr() == pytest.approx(first_schedule.get_last_lr())
    assert {n: state._get(resumed, p, "exp_avg_sq").abs().sum().item() for n, p in resumed.module.named_parameters()} \
        == pytest.approx({n: state._get(first, p, "exp_avg_sq").abs().sum().item() for n, p in first.module.named_parameters()})
    for engine in (first, resumed, untouched):
        _train(engine, batches[3:])
    tolerance = 1e-4 if precision == "fp32" else 1e-2  # ZeRO stages reduce in other orders; bf16 rounds coarser
    expected, got, control = _weights(first), _weights(resumed), _weights(untouched)
    resumed_diff = max((expected[k] - got[k]).abs().max().item() for k in expected)
    control_diff = max((expected[k] - control[k]).abs().max().item() for k in expected)  # had it loaded nothing
    assert resumed_diff < tolerance and control_diff > max(0.05, 10 * resumed_diff), (resumed_diff, control_diff)


def test_a_checkpoint_of_another_model_is_one_line(gloo: None, tmp_path: Path) -> None:
    small, _ = _engine(1, "fp32")
    _train(small, [torch.randint(0, 64, (2, 9))])
    state.save(small, tmp_path / "state", step=1)
    wide, schedule = _engine(1, "fp32", n_embd=32)
    with pytest.raises(RunFileError, match=r"state: wte.weight is \(64, 16\), the model has \(64, 32\) "
                                           r"\(a checkpoint of another model\)$"):
        state.load(wide, tmp_path / "state", schedule, torch.zeros(2, 9, dtype=torch.long), accum=1)


def test_the_worker_parts_run_on_their_own(gloo: None, tmp_path: Path) -> None:
    """Global batch 5 in micro-batches of 2 on one worker: 3 micro-batches of 2, 2, 1 (the short one weighted 1/2)."""
    from core.layout import RunLayout
    from tests.trainer.test_data import hand_made_data
    from trainer.data import rank_steps
    from trainer.loop import Worker, WorkerConfig

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
    losses = [worker.train_step(first)[0].item()] + [worker.train_step(next(steps))[0].item() for _ in range(29)]
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
