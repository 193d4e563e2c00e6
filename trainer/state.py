"""Model and optimizer state that reshards: a training checkpoint any world size and ZeRO stage can resume from.

Written and read by `raygpt train` workers (trainer/loop.py); `python -m trainer.state STEP_DIR/state` lists one.

Why our own format rather than DeepSpeed's (`engine.save_checkpoint` + `ds_to_universal`): DeepSpeed's files are
pickles laid out by data-parallel rank, so they load only at the world size that wrote them, and converting them to
its universal format is an offline pass over every rank's files. Here every tensor is saved *whole* (fp32 master
weight, Adam's exp_avg and exp_avg_sq), assembled with DeepSpeed's own fragment API
(`safe_get_full_fp32_param` / `safe_get_full_optimizer_state`, the same the universal checkpoint uses), in
safetensors (no pickle anywhere), spread over the ranks that wrote them and described by an index:

    state/index.json                 format, step, Adam's step, the world that wrote it, tensor name → file
    state/rank-00000.safetensors     whole tensors of the parameters rank 0 owns (parameter i belongs to rank i mod W):
                                     "<name>", "<name>.exp_avg", "<name>.exp_avg_sq" (fp32)

A resume at any world size and ZeRO stage reads the tensors it needs and hands them to the same API's setters
(`safe_set_full_*`), which keep only this rank's partition. The learning-rate schedule is a pure function of the step
(`trainer.config.lr_at`), the data order a pure function of (seed, step) (`trainer.data`), and the dropout RNG is
reseeded from (seed, step, rank) every step: the step is the whole position.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from core.errors import RunFileError
from core.files import atomic_write, read_json
from trainer.deepspeed_import import import_deepspeed

FORMAT = 1
INDEX = "index.json"
MOMENTS = ("exp_avg", "exp_avg_sq")


def _file(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


def _stage0_master(engine: Any, param: torch.nn.Parameter) -> tuple[torch.Tensor, dict[str, Any]]:
    """Without ZeRO: the fp32 master of a parameter and its optimizer state (the parameter itself in fp32; DeepSpeed's
    fp32 copy under bf16/fp16)."""
    optimizer = engine.optimizer
    for low, high in zip(getattr(optimizer, "fp16_groups", []), getattr(optimizer, "fp32_groups", [])):
        for lp, hp in zip(low, high):
            if lp is param:
                return hp, optimizer.optimizer.state[hp]
    return param, optimizer.state[param]


def _get(engine: Any, param: torch.nn.Parameter, key: str | None) -> torch.Tensor:
    """The whole fp32 master (key None) or optimizer moment of a parameter; a collective under ZeRO (every rank calls)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    full = safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
    if full is None:
        master, state = _stage0_master(engine, param)
        full = master if key is None else state[key]
    return full.detach().float().cpu().reshape(tuple(getattr(param, "ds_shape", param.shape))).contiguous()


def _set(engine: Any, param: torch.nn.Parameter, key: str | None, value: torch.Tensor) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    value = value.to(param.device)
    if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):
        (safe_set_full_fp32_param(param, value) if key is None else safe_set_full_optimizer_state(param, value, key))
        return
    master, state = _stage0_master(engine, param)
    with torch.no_grad():
        (master if key is None else state[key]).copy_(value.view_as(master))


def _set_weights(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """The module's own (low-precision) weights; under ZeRO-3 gathered, set on rank 0 and re-partitioned."""
    import deepspeed

    with torch.no_grad():
        if hasattr(param, "ds_id"):
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if dist.get_rank() == 0:
                    param.data.copy_(value.view_as(param).to(param.dtype))
        else:
            param.data.copy_(value.view_as(param).to(param.device, param.dtype))


def _base_states(engine: Any) -> list[dict[str, Any]]:
    """The torch optimizer's per-tensor states (DeepSpeed wraps it; ZeRO's states are of flat partitions)."""
    optimizer = engine.optimizer
    base = getattr(optimizer, "optimizer", optimizer)
    return [s for s in base.state.values() if "step" in s]


def _link_moments(engine: Any) -> None:
    """Re-link each parameter's view into Adam's flat ZeRO-1/2 (and bf16) state. DeepSpeed 0.19.8 links them once,
    right after the *first* param group's first step, before the second group has any state — so the fragment API
    finds no exp_avg for parameters of the second group (our no-decay group) unless linked again."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def save(engine: Any, folder: Path, step: int) -> None:
    """Every rank: the whole tensors of the parameters it owns → folder/rank-R.safetensors; rank 0 also the index."""
    rank, world = dist.get_rank(), dist.get_world_size()
    _link_moments(engine)
    owned: dict[str, torch.Tensor] = {}
    files: dict[str, str] = {}
    for i, (name, param) in enumerate(engine.module.named_parameters()):
        tensors = {name: _get(engine, param, None), **{f"{name}.{k}": _get(engine, param, k) for k in MOMENTS}}
        files[name] = _file(i % world)
        if i % world == rank:
            owned.update(tensors)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(owned, str(folder / _file(rank)), metadata={"format": str(FORMAT), "step": str(step)})
    if rank == 0:
        states = _base_states(engine)
        adam_step = float(states[0]["step"]) if states else 0.0
        index = {"format": FORMAT, "step": step, "adam_step": adam_step, "world": world, "files": files}
        atomic_write(folder / INDEX, json.dumps(index, indent=1))


def read_index(folder: Path) -> dict[str, Any]:
    index = read_json(folder / INDEX, "training state index")
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise RunFileError(f"{folder / INDEX}: training state format {index.get('format') if isinstance(index, dict) else None}, "
                           f"this raygpt reads {FORMAT}")
    return index


def materialize(engine: Any, batch: torch.Tensor, accum: int) -> None:
    """Make DeepSpeed allocate its optimizer state (Adam's is created lazily at the first step): one step of zero
    gradients at learning rate 0, which changes no weight. Every rank calls it."""
    lrs = [group["lr"] for group in engine.optimizer.param_groups]
    for group in engine.optimizer.param_groups:
        group["lr"] = 0.0
    for _ in range(accum):
        _, loss = engine(batch[:, :-1], targets=batch[:, 1:])
        engine.backward(loss * 0.0)
        engine.step()
    for group, lr in zip(engine.optimizer.param_groups, lrs):
        group["lr"] = lr


def load(engine: Any, folder: Path, scheduler: Any, batch: torch.Tensor, accum: int) -> int:
    """Every rank: master weights, Adam moments and step, the module's weights and the LR schedule from a state folder
    written at any world size and ZeRO stage; returns the step. A parameter missing or of another shape is one line."""
    index = read_index(folder)
    materialize(engine, batch, accum)
    _link_moments(engine)
    handles: dict[str, Any] = {}
    try:
        for name, param in engine.module.named_parameters():
            file = index["files"].get(name)
            if file is None:
                raise RunFileError(f"{folder}: no tensor {name!r} (a checkpoint of another model)")
            if file not in handles:
                handles[file] = safe_open(str(folder / file), framework="pt")
            master = handles[file].get_tensor(name)
            shape = tuple(getattr(param, "ds_shape", param.shape))
            if tuple(master.shape) != shape:
                raise RunFileError(f"{folder}: {name} is {tuple(master.shape)}, the model has {shape} (a checkpoint of another model)")
            _set(engine, param, None, master)
            for key in MOMENTS:
                _set(engine, param, key, handles[file].get_tensor(f"{name}.{key}"))
            _set_weights(param, master)
    finally:
        handles.clear()
    for state in _base_states(engine):
        state["step"] = torch.tensor(index["adam_step"], dtype=torch.float32, device=state["step"].device) \
            if torch.is_tensor(state["step"]) else index["adam_step"]
    step = int(index["step"])
    scheduler.last_epoch = step - 1
    scheduler.step()  # the learning rate of step `step`
    return step


def consolidated(engine: Any, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Full fp32 weights on rank 0 (ZeRO-3 shards are gathered first; every rank must call this)."""
    deepspeed = import_deepspeed()
    module = engine.module
    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            full = {k: v.detach().float().clone() for k, v in module.state_dict().items()}
    else:
        full = {k: v.detach().float().clone() for k, v in module.state_dict().items()}
    return full if dist.get_rank() == 0 else None


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    index = read_index(folder)
    print(f"step {index['step']} (Adam step {index['adam_step']:g}), written by {index['world']} rank(s)")
    for name, file in index["files"].items():
        with safe_open(str(folder / file), framework="pt") as f:
            print(f"  {name:40s} {tuple(f.get_slice(name).get_shape())} in {file}")
