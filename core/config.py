"""The base of every config section, and the one section every stage shares: where the Ray work runs.

    python -m cluster.schema cluster      # every field of the cluster section with its type, default and doc

Each stage's section lives next to the code that owns it (`data_pipeline.config.DataConfig`, `trainer.config`, ...);
`cluster.config.RunConfig` (the roof) composes them. Unknown keys and bad values are errors with one line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator

from core.errors import shown


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, attribute docstrings are the field docs. A boolean is
    not a number and floats are finite, so `seq_len=true` or `lr=.inf` is an error rather than 1 or infinity (strings
    that spell numbers, like YAML's `3e-4`, are still numbers)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True, allow_inf_nan=False)
    _from_env: dict[tuple[str | int, ...], str] = PrivateAttr(default_factory=dict)
    """Values that came from `${VAR}` in the recipe: path in this section → the text as written."""

    def remember_env(self, written: dict[tuple[str | int, ...], str]) -> None:
        """Record which values came from `${VAR}` (paths relative to this section), here and in nested sections."""
        self._from_env = dict(written)
        for name in type(self).model_fields:
            child = getattr(self, name)
            if isinstance(child, Section):
                child.remember_env({p[1:]: text for p, text in written.items() if len(p) > 1 and p[0] == name})

    def dump_as_written(self) -> dict[str, Any]:
        """`model_dump(mode="json")`, except that values which came from `${VAR}` stay `${VAR}`: what any file under a
        run directory records of a config, so tokens and keys passed through the environment never land there."""
        tree = self.model_dump(mode="json")
        for path, text in self._from_env.items():
            node: Any = tree
            for key in path[:-1]:
                node = node[key] if _has(node, key) else None
            if _has(node, path[-1]):
                node[path[-1]] = text
        return tree

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML `true` is not 1: a boolean is accepted only by boolean fields."""
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and annotation is not bool and bool not in get_args(annotation):
            raise ValueError(f"expected {getattr(annotation, '__name__', annotation)}, got a boolean")
        return value


def _has(node: Any, key: str | int) -> bool:
    if isinstance(node, dict):
        return key in node
    return isinstance(node, list) and isinstance(key, int) and key < len(node)


class ClusterConfig(Section):
    """Where the Ray work runs and with what resources."""

    address: str | None = None
    """Ray cluster to connect to ('auto', 'ray://host:10001', 'host:6379'); None reads RAY_ADDRESS, else starts a local Ray."""
    num_cpus: int | None = Field(default=None, ge=1)
    """CPUs of the local Ray started when there is no address; None uses every core of this machine."""
    num_workers: int | tuple[int, int] = 2
    """Ray Train workers (data-parallel DeepSpeed ranks): a number, or [min, max] for an elastic group that starts
    with what the cluster has (at least min), grows when nodes are added and shrinks when one is lost, resuming from
    the newest committed checkpoint at each resize (the same global batches at every size)."""
    elastic_resize_s: float = Field(default=60.0, ge=0)
    """Elastic groups: how often Ray Train checks whether more workers could run (a grow restarts the group from
    the newest checkpoint, so keep it well above train.checkpoint_every_s)."""
    worker_start_timeout_s: float = Field(default=60.0, gt=0)
    """How long Ray Train waits for a worker group to be placed before it counts a failure and decides again. After
    a node is lost Ray still counts its resources for a while, so an elastic group first tries its old size and
    shrinks only after this timeout (Ray's default, 60 s)."""
    use_gpu: bool = False
    """One GPU per worker (NCCL); False trains on CPU (gloo)."""
    cpus_per_worker: float = Field(default=0.5, gt=0)
    """CPUs reserved per worker; below 1 on a small machine so Ray Data and the driver keep a share."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How workers are placed on nodes."""
    storage_path: str | None = None
    """Ray Train storage for training checkpoints (local path or s3:// / gs:// URI), holding `checkpoints/step-N/`;
    None means RUN_DIR."""
    max_failures: int = Field(default=0, ge=-1)
    """Worker-group restarts (from the last checkpoint) before the run fails; -1 retries forever."""
    @field_validator("num_workers")
    @classmethod
    def _workers(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if not 1 <= low <= high:
            raise ValueError(f"must be a number ≥ 1 or [min, max] with 1 ≤ min ≤ max, got {value}")
        return value

    @property
    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers; equal for a fixed group."""
        return (self.num_workers, self.num_workers) if isinstance(self.num_workers, int) else self.num_workers

    runtime_env: dict[str, Any] = {}
    """Ray runtime_env for the work this process starts on an existing cluster (working_dir, py_modules, env_vars,
    pip, ...); unused for a local Ray. Jobs from `raygpt submit` already carry the repository and these env vars."""


def dotted(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as a config key: `train.betas[1]`."""
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")


def problem_line(error: ValidationError, prefix: str = "", name: Callable[[tuple[Any, ...]], str] = dotted,
                 unknown: Callable[[tuple[Any, ...]], str] | None = None) -> str:
    """The first problem of a validation error as one line: `key: message (got value)`, and how many more there are.

    The one wording of every validated input (recipes, CLI options, run records, imported configs): `prefix` goes
    before the key (`model.` for a checkpoint's config), `name` words the key (a CLI flag), `unknown` the message for an
    unknown key (a did-you-mean). A value is echoed cut to ~100 characters (`core.errors.shown`), a whole section
    never; a problem of the whole object (no key) is its message alone."""
    problems = error.errors()
    first = problems[0]
    loc = tuple(first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = unknown(loc) if unknown is not None else "unknown key"
    elif first["type"] != "missing" and "input" in first and not isinstance(first["input"], (dict, BaseModel)):
        message += f" (got {shown(first['input'])})"  # a value, not a whole section
    key = prefix + name(loc) if loc else prefix.rstrip(".")
    more = len(problems) - 1
    return (f"{key}: " if key else "") + message + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")

