"""Model and optimizer state that reshards: a training checkpoint that every rank writes and reads only its own share
of, and that any world size and ZeRO stage can resume from.

Written and read by the checkpoint component (`trainer.checkpointer`); `python -m trainer.state STEP_DIR/state` lists
one.

Why our own format rather than DeepSpeed's (`engine.save_checkpoint` + `ds_to_universal`): DeepSpeed's files are
pickles laid out by data-parallel rank, so they load only at the world size that wrote them, and converting them to
its universal format is an offline pass over every rank's files. Here each rank saves the **fragments** it holds — for
each parameter the contiguous range [start, start + numel) of its flattened fp32 master weight, Adam's exp_avg and
exp_avg_sq, found through DeepSpeed's fragment API (`param._hp_mapping`, the one its universal checkpoint uses; under
ZeRO-3 the local partition API) — in safetensors (no pickle anywhere), with an index of who holds what:

    state/index.json                 format, step, Adam's step, world, each parameter's shape and fragments
    state/rank-00000.safetensors     rank 0's fragments: "<name>", "<name>.exp_avg", "<name>.exp_avg_sq" (1-D fp32)

Nothing is gathered to save. A resume computes the range of every parameter it holds now and reads only the
overlapping bytes of the saved fragments: at the same world size and stage exactly its own file, at another one its
new share by ranged reads. The learning-rate schedule is a pure function of the step (`trainer.config.lr_at`), the
data order a pure function of (seed, step) (`trainer.data`), and the dropout RNG is reseeded from (seed, step, rank)
every step: the step is the whole position.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from core import files
from core.errors import RunFileError
from core.layout import join
from trainer.deepspeed_import import import_deepspeed

FORMAT = 2
"""2: fragments per rank (1: whole tensors, gathered to save)."""
INDEX = "index.json"
MOMENTS = ("exp_avg", "exp_avg_sq")
KEYS = ("", *MOMENTS)  # the master weight ("") and Adam's moments, in every fragment


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


def tensor_name(name: str, key: str) -> str:
    return f"{name}.{key}" if key else name


# -- where this rank's share lies --------------------------------------------------------------------------------------
def _base(engine: Any) -> Any:
    """The torch optimizer DeepSpeed wraps (ZeRO's and the bf16 optimizer's state is of flat partitions)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _stage0_master(engine: Any, param: torch.nn.Parameter) -> tuple[torch.Tensor, dict[str, Any]]:
    """Without a partitioning optimizer: the fp32 master of a parameter (the parameter itself in fp32; DeepSpeed's
    fp32 copy under fp16) and its optimizer state."""
    optimizer = engine.optimizer
    for low, high in zip(getattr(optimizer, "fp16_groups", []), getattr(optimizer, "fp32_groups", [])):
        for lp, hp in zip(low, high):
            if lp is param:
                return hp, optimizer.optimizer.state[hp]
    return param, _base(engine).state[param]


def _range(param: torch.nn.Parameter, index: int, rank: int, world: int, loading: bool) -> tuple[int, int] | None:
    """(start, numel) of the flattened parameter this rank holds, or None: ZeRO-3's partition, the fragment ZeRO-1/2
    and the bf16 optimizer map (`_hp_mapping`), or without partitions the whole parameter — which rank i mod W saves
    and every rank loads."""
    if hasattr(param, "ds_id"):
        per_rank = param.ds_tensor.numel()
        start = rank * per_rank
        numel = min(per_rank, param.ds_numel - start)
        return (start, numel) if numel > 0 else None
    if hasattr(param, "_hp_mapping"):
        mapping = param._hp_mapping
        return None if mapping is None else (mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel)
    return (0, param.numel()) if loading or index % world == rank else None


def _views(engine: Any, param: torch.nn.Parameter, numel: int) -> dict[str, torch.Tensor]:
    """This rank's fragment of the master weight and of each moment, as views into DeepSpeed's own buffers (1-D)."""
    if hasattr(param, "ds_id"):
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        local = {"": safe_get_local_fp32_param(param), **{k: safe_get_local_optimizer_state(param, k) for k in MOMENTS}}
        return {k: v.reshape(-1).narrow(0, 0, numel) for k, v in local.items()}
    if hasattr(param, "_hp_mapping"):
        mapping = param._hp_mapping
        return {"": mapping.hp_fragment, **{k: mapping.get_optim_state_fragment(k) for k in MOMENTS}}
    master, state = _stage0_master(engine, param)
    return {"": master.reshape(-1), **{k: state[k].reshape(-1) for k in MOMENTS}}


def init_optimizer_state(engine: Any) -> None:
    """Allocate Adam's state (zeros, step 0) the way the optimizer would at its first step, so that a resume can fill
    it in without running a step: torch's Adam/AdamW (`_init_group`) and DeepSpeed's FusedAdam / DeepSpeedCPUAdam
    (`len(state) == 0`). Another optimizer is refused in one line. Then the fragments are linked to it."""
    base = _base(engine)
    torch_adam = isinstance(base, (torch.optim.Adam, torch.optim.AdamW))
    if not torch_adam and type(base).__name__ not in ("FusedAdam", "DeepSpeedCPUAdam"):
        raise RunFileError(f"resuming {type(base).__name__}'s state is not supported (Adam/AdamW only)")
    owner = engine.optimizer
    if hasattr(owner, "fp32_partitioned_groups_flat"):  # ZeRO-3 hands its flat partitions to Adam only during a step
        tensors = [(base.param_groups[owner.sub_group_to_group_id[i]], p)
                   for i, p in enumerate(owner.fp32_partitioned_groups_flat)]
    else:
        tensors = [(group, p) for group in base.param_groups for p in group["params"]]
    for group, p in tensors:
        if base.state.get(p):
            continue
        on_device = torch_adam and (group.get("capturable") or group.get("fused"))
        step: Any = torch.zeros((), dtype=torch.float32, device=p.device) if on_device else (
            torch.tensor(0.0) if torch_adam else 0)
        zeros = {k: torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format) for k in MOMENTS}
        base.state[p] = {"step": step, **zeros, **({"max_exp_avg_sq": torch.zeros_like(p)} if group.get("amsgrad") else {})}
    link_moments(engine)


def link_moments(engine: Any) -> None:
    """Re-link each parameter's view into Adam's flat ZeRO-1/2 (and bf16) state. DeepSpeed 0.19.8 links them once,
    right after the *first* param group's first step, before the second group has any state — so the fragment API
    finds no exp_avg for parameters of the second group (our no-decay group) unless linked again."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def adam_step(engine: Any) -> float:
    states = [s for s in _base(engine).state.values() if "step" in s]
    return float(states[0]["step"]) if states else 0.0


# -- save ---------------------------------------------------------------------------------------------------------------
def layout(engine: Any) -> dict[str, Any]:
    """Every rank's fragments ({name: [[rank, start, numel], ...]}) and every parameter's shape: the static part of
    the index, the same for every checkpoint of one engine (a collective: every rank calls it once, at setup)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {}
    for i, (name, param) in enumerate(engine.module.named_parameters()):
        if (held := _range(param, i, rank, world, loading=False)) is not None:
            mine[name] = [rank, *held]
    every: list[dict[str, list[int]] | None] = [None] * world
    dist.all_gather_object(every, mine)
    shapes = {name: list(getattr(p, "ds_shape", p.shape)) for name, p in engine.module.named_parameters()}
    fragments = {name: sorted(r[name] for r in every if r and name in r) for name in shapes}
    return {"world": world, "shapes": shapes, "fragments": fragments}


def host_copy(source: torch.Tensor, buffers: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """`source` copied into the fp32 host buffer kept under `name` (allocated on first use): a save reuses the last
    one's memory instead of faulting in fresh pages every time."""
    buffer = buffers.get(name)
    if buffer is None or buffer.shape != source.shape:
        buffer = buffers[name] = torch.empty(source.shape, dtype=torch.float32)
    buffer.copy_(source.detach())
    return buffer


def snapshot(engine: Any, buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's fragments, copied into host `buffers` (after `link_moments`; safe beside a forward and backward,
    which change none of them)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    copies: dict[str, torch.Tensor] = {}
    for i, (name, param) in enumerate(engine.module.named_parameters()):
        if (held := _range(param, i, rank, world, loading=False)) is None:
            continue
        for key, view in _views(engine, param, held[1]).items():
            copies[tensor_name(name, key)] = host_copy(view, buffers, tensor_name(name, key))
    return copies


def index(static: dict[str, Any], step: int, adam: float) -> dict[str, Any]:
    return {"format": FORMAT, "step": step, "adam_step": adam, **static}


# -- load ---------------------------------------------------------------------------------------------------------------
@dataclass
class Piece:
    """Saved elements [saved_start, +numel) of one fragment, landing at `offset` of this rank's range."""

    file: str
    name: str
    saved_start: int
    offset: int
    numel: int
    start: int  # within the saved fragment


def parse_index(raw: bytes, folder: str) -> dict[str, Any]:
    """The index of a state folder (its bytes already checked against the commit record)."""
    try:
        found = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        found = None
    if not isinstance(found, dict) or found.get("format") != FORMAT:
        got = found.get("format") if isinstance(found, dict) else "unreadable"
        raise RunFileError(f"{folder}/{INDEX}: training state format {got}, this raygpt reads {FORMAT} (a checkpoint of "
                           "an older raygpt: resume it with that version, or start a new run_dir)")
    return found


def plan(engine: Any, saved: dict[str, Any], folder: str) -> dict[str, list[Piece]]:
    """The saved pieces this rank needs, by parameter: the overlap of its range with every saved fragment. A
    parameter missing or of another shape is one line."""
    rank, world = dist.get_rank(), dist.get_world_size()
    pieces: dict[str, list[Piece]] = {}
    for i, (name, param) in enumerate(engine.module.named_parameters()):
        shape = list(getattr(param, "ds_shape", param.shape))
        if name not in saved["shapes"]:
            raise RunFileError(f"{folder}: no tensor {name!r} (a checkpoint of another model)")
        if saved["shapes"][name] != shape:
            raise RunFileError(f"{folder}: {name} is {tuple(saved['shapes'][name])}, the model has {tuple(shape)} "
                               "(a checkpoint of another model)")
        if (held := _range(param, i, rank, world, loading=True)) is None:
            continue
        start, numel = held
        pieces[name] = [Piece(rank_file(r), name, s, max(s, start) - start, min(s + n, start + numel) - max(s, start),
                              max(s, start) - s)
                        for r, s, n in saved["fragments"][name] if s < start + numel and start < s + n]
        if sum(p.numel for p in pieces[name]) != numel:
            raise RunFileError(f"{folder}: the saved fragments of {name} do not cover it (a corrupt index)")
    return pieces


def apply(engine: Any, values: dict[str, dict[str, torch.Tensor]], saved: dict[str, Any], scheduler: Any) -> int:
    """Set this rank's master weights and moments (`values[name][key]`, its range of each), then the module's own
    weights from them, Adam's step and the LR schedule; returns the step."""
    optimizer = engine.optimizer
    with torch.no_grad():
        for name, param in engine.module.named_parameters():
            if name not in values:
                continue
            if hasattr(param, "ds_id"):  # ZeRO-3: whole local partitions (padded), through its setters
                from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

                padded = {k: torch.zeros(param.ds_tensor.numel()) for k in KEYS}
                for k, v in values[name].items():
                    padded[k][: v.numel()] = v
                safe_set_local_fp32_param(param, padded[""].to(param.ds_tensor.device))
                for k in MOMENTS:
                    safe_set_local_optimizer_state(param, padded[k].to(param.ds_tensor.device), k)
                continue
            for key, view in _views(engine, param, values[name][""].numel()).items():
                view.copy_(values[name][key].to(view.device))
            master, _ = (None, None) if hasattr(param, "_hp_mapping") else _stage0_master(engine, param)
            if master is not None and master is not param:
                param.data.copy_(master.view_as(param))
        if hasattr(optimizer, "_reassign_or_swap_out_partitioned_parameters"):  # ZeRO-3: fp32 partitions → module
            for group in range(len(optimizer.fp16_groups)):
                optimizer._reassign_or_swap_out_partitioned_parameters(group)
        elif hasattr(optimizer, "update_lp_params"):  # ZeRO-1/2, bf16: own fragment → module, then an all-gather
            optimizer.update_lp_params()
    for state in _base(engine).state.values():
        if "step" in state:
            state["step"] = torch.tensor(saved["adam_step"], dtype=torch.float32, device=state["step"].device) \
                if torch.is_tensor(state["step"]) else int(saved["adam_step"])
    step = int(saved["step"])
    scheduler.last_epoch = step - 1
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": no step is due, only its rate
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
        scheduler.step()  # the learning rate of step `step`
    return step


def consolidated(engine: Any, buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """ZeRO-3: the module's weights gathered, in fp32 on rank 0 for the published model (the one gather of a
    checkpoint; every rank must call this)."""
    deepspeed = import_deepspeed()
    module = engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        return module_weights(engine, buffers)


def module_weights(engine: Any, buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The module's own (whole, below ZeRO-3) weights in fp32 host `buffers` on rank 0, for the published model;
    None elsewhere."""
    if dist.get_rank() != 0:
        return None
    return {k: host_copy(v, buffers, f"model/{k}") for k, v in engine.module.state_dict().items()}


if __name__ == "__main__":
    folder = sys.argv[1]
    saved = parse_index(files.read_bytes(join(folder, INDEX)), folder)
    print(f"step {saved['step']} (Adam step {saved['adam_step']:g}), written by {saved['world']} rank(s)")
    for name, shape in saved["shapes"].items():
        held = ", ".join(f"rank {r} [{s}:{s + n}]" for r, s, n in saved["fragments"][name])
        print(f"  {name:40s} {tuple(shape)}  {held}")
    print(json.dumps({"files": sorted({rank_file(r) for f in saved["fragments"].values() for r, _, _ in f})}))
