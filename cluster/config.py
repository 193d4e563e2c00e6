"""The typed run configuration: one YAML file plus dotted `section.key=value` overrides → a validated `RunConfig`.

    raygpt prepare configs/demo.yaml data.seq_len=128 cluster.num_cpus=2

Each section's fields live next to the code that owns them (`data_pipeline.config.DataConfig`, ...); this module
composes them into the root, loads and validates it, and writes the resolved config to `RUN_DIR/config.yaml`.
Every field carries its docstring (pydantic reads attribute docstrings into the field description); unknown keys
and bad values raise `ConfigError` with one line naming the key.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from core.config import ClusterConfig, Section, problem_line
from core.errors import UserError, one_line, shown
from core.files import RECORD_LIMIT
from core.layout import Location, RunLayout, join
from data_pipeline.config import DataConfig
from evaluation.config import EvalConfig, QuantizeConfig
from model.config import PRESETS, ModelConfig, ModelSection, SampleConfig
from trainer.config import TrainConfig


class ConfigError(UserError, ValueError):
    """A bad config file, key or value; the message is one line meant for the user."""


class ServeConfig(Section):
    """`raygpt serve RUN_DIR_OR_CHECKPOINT`: the model behind an OpenAI-compatible HTTP API on Ray Serve
    (cluster/serve.py)."""

    checkpoint: str = ""
    """Which checkpoint of a run to serve, relative to the run_dir (e.g. quantized/int8); empty: the final one."""
    host: str = "127.0.0.1"
    """Address the HTTP proxy listens on: this machine only unless told otherwise (0.0.0.0: every interface)."""
    port: int = Field(default=8000, ge=1, le=65535)
    """Port of the HTTP proxy."""
    min_replicas: int = Field(default=1, ge=1)
    """Fewest model replicas (Ray Serve autoscaling)."""
    max_replicas: int = Field(default=1, ge=1)
    """Most model replicas; above min_replicas, Serve adds replicas while each has more than max_batch requests."""
    num_cpus: float = Field(default=1.0, ge=0)
    """CPUs reserved per replica (its torch threads)."""
    num_gpus: float = Field(default=0.0, ge=0)
    """GPUs per replica; > 0 decodes on CUDA."""
    max_batch: int = Field(default=16, ge=1)
    """Sequences a replica decodes together (continuous batching; KV-cache rows)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Decoding dtype: auto is bf16 on GPUs that have it (else fp16) and on CPUs that run bf16 natively (else fp32);
    quantized checkpoints keep their kernels' dtypes."""
    api_key_env: str = "RAYGPT_API_KEY"
    """Environment variable holding the API key: when it is set where `raygpt serve` starts, requests must carry
    `Authorization: Bearer KEY` (only its sha256 reaches the replicas)."""
    model_name: str = ""
    """The model's id in /v1/models and responses; empty: the run's name (or the checkpoint folder's)."""
    max_prompts: int = Field(default=32, ge=1, le=4096)
    """Prompts one request may carry (a list prompt); more is a 400."""
    allow_public: bool = False
    """Listen on an address other than loopback without an API key. Off: such a host needs the key (serve.api_key_env)
    set, so a model is never served to the network by accident."""

    @model_validator(mode="after")
    def _replicas(self) -> ServeConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"serve.max_replicas ({self.max_replicas}) is below serve.min_replicas ({self.min_replicas})")
        return self


class FinetuneConfig(Section):
    """Supervised fine-tuning after pretraining (`raygpt finetune CONFIG`, a stage of `raygpt run`): conversations
    prepared with the base model's tokenizer into RUN_DIR/finetune/data, and the base model trained on their
    assistant tokens into RUN_DIR/finetune (its own checkpoints, metrics and config.yaml, with the resume, elastic and
    fingerprint rules of pretraining). With this section, `eval` compares the base and the fine-tuned checkpoints, and
    `quantize` and `sample` work on the fine-tuned one (RUN_DIR/finetune/quantized, RUN_DIR/finetune/sample.txt)."""

    data: DataConfig
    """The conversations: sources with `format: chat` (their tokenizer is the base model's; seq_len at most its
    context)."""
    train: TrainConfig = TrainConfig()
    """Optimization of the fine-tuning run (its own lr, steps, batch; typically a lower lr than pretraining)."""
    init_from: str | None = None
    """The base model: a raygpt checkpoint folder (a run's `checkpoint`, or one written by `raygpt import HF_DIR`);
    None: this run's own final checkpoint (RUN_DIR/checkpoint)."""

    @model_validator(mode="after")
    def _chat_data(self) -> FinetuneConfig:
        if not self.data.chat:
            raise ValueError("finetune.data.sources: fine-tuning reads conversations; give its sources format: chat")
        if self.data.tokenizer.path is not None:
            raise ValueError("finetune.data.tokenizer.path: the tokenizer is the base model's (finetune.init_from)")
        return self


class RunConfig(Section):
    """The root of a raygpt run: every stage reads its section from here."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """Name of the run (letters, digits, '_', '-', '.'); the default run_dir is runs/<name>."""
    run_dir: str = ""
    """Folder holding everything the run writes (data/, checkpoints, eval/, config.yaml): a local path or an s3:// /
    gs:// URI (no shared file system needed on a cluster; `core.files`); empty means runs/<name>."""
    seed: int = Field(default=1337, ge=0, lt=1 << 32)
    """Seed of every random choice in the run (model init, data order, sampling); numpy's range, 0 to 2³²−1."""
    data: DataConfig
    """Corpus → tokenizer → webdataset shards (`raygpt prepare`)."""
    model: ModelSection = ModelSection()
    """The transformer (`model/gpt.py`)."""
    train: TrainConfig = TrainConfig()
    """Optimization and DeepSpeed (`raygpt train`)."""
    eval: EvalConfig = EvalConfig()
    """Intrinsic metrics and lm-evaluation-harness benchmarks (`raygpt eval`)."""
    quantize: QuantizeConfig = QuantizeConfig()
    """Post-training quantization of the final checkpoint (`raygpt quantize`)."""
    sample: SampleConfig = SampleConfig()
    """A generated sample at the end of `raygpt run`."""
    serve: ServeConfig = ServeConfig()
    """The OpenAI-compatible HTTP API of `raygpt serve`."""
    finetune: FinetuneConfig | None = None
    """Supervised fine-tuning of the pretrained model on conversations (None: none)."""
    cluster: ClusterConfig = ClusterConfig()
    """Ray connection and resources."""

    def model_post_init(self, __context: Any) -> None:
        if not self.run_dir:
            self.run_dir = str(Path("runs") / self.name)

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        for key, t in (("train", self.train), *((("finetune.train", self.finetune.train),) if self.finetune else ())):
            self._consistent_train(key, t)
        return self

    def _consistent_train(self, key: str, t: TrainConfig) -> None:
        c = self.cluster
        batch = t.resolved_global_batch(c.worker_range[1])
        if c.worker_range[1] > batch:
            raise ValueError(f"cluster.num_workers {c.worker_range[1]} exceeds {key}.global_batch_size {batch}: a "
                             "worker would have no sample")
        if t.precision == "fp16" and not c.use_gpu:
            raise ValueError(f"{key}.precision fp16 needs GPUs (cluster.use_gpu=true); use bf16 or fp32 on CPU")
        if t.offload_optimizer and t.zero_stage < 2:
            raise ValueError(f"{key}.offload_optimizer needs {key}.zero_stage 2 or 3")
        if t.offload_params and t.zero_stage != 3:
            raise ValueError(f"{key}.offload_params needs {key}.zero_stage 3")

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step at every world size (train.global_batch_size, or micro × the largest group)."""
        return self.train.resolved_global_batch(self.cluster.worker_range[1])

    def planned_model(self) -> ModelConfig:
        """The architecture the run trains, before any data is prepared (`raygpt plan`): the vocabulary of the
        tokenizer it will train (or the preset's for a given tokenizer file); init_from is read from its checkpoint."""
        if self.model.init_from is not None:
            return self.model.resolve(vocab_size=0, block_size=None)
        if self.model.preset not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {self.model.preset!r} (known: {', '.join(PRESETS)})")
        vocab = PRESETS[self.model.preset]["vocab_size"] if self.data.tokenizer.path else self.data.tokenizer.vocab_size
        return self.model.resolve(vocab_size=vocab, block_size=self.data.seq_len)

    @property
    def layout(self) -> RunLayout:
        """Every path of this run (`core.layout`)."""
        return RunLayout.of(self.run_dir, self.cluster.storage_path)

    @property
    def data_dir(self) -> Location:
        return self.layout.data.root


    @property
    def finetune_base(self) -> str:
        """The model fine-tuning starts from: finetune.init_from, else this run's final checkpoint."""
        if self.finetune is None:
            raise ConfigError("the recipe has no finetune section")
        return self.finetune.init_from or str(self.layout.checkpoint)

    def finetune_run(self) -> RunConfig:
        """The fine-tuning run as a run of its own (RUN_DIR/finetune): the finetune section's data and train, the base
        checkpoint as model.init_from, its tokenizer for the data; every other section as this run's."""
        if self.finetune is None:
            raise ConfigError("the recipe has no finetune section")
        ft, base = self.finetune, self.finetune_base
        tokenizer = ft.data.tokenizer.model_copy(update={"path": str(join(base, "tokenizer.json"))})
        storage = None if self.cluster.storage_path is None else str(join(self.cluster.storage_path, FINETUNE))
        run = self.model_copy(update={
            "name": f"{self.name}.{FINETUNE}", "run_dir": str(join(self.run_dir, FINETUNE)),
            "data": ft.data.model_copy(update={"tokenizer": tokenizer}), "model": ModelSection(init_from=base),
            "train": ft.train, "finetune": None,
            "cluster": self.cluster.model_copy(update={"storage_path": storage}),
        })
        # the `${VAR}` values as written: finetune.data / finetune.train are this run's data / train
        moved = {"data", "train", "model", "finetune", "name", "run_dir"}
        written = {path: text for path, text in self._from_env.items() if path[0] not in moved}
        written |= {path[1:]: text for path, text in self._from_env.items()
                    if path[:1] == ("finetune",) and len(path) > 2 and path[1] in ("data", "train")}
        run.remember_env(written)
        return run

    @property
    def final(self) -> RunConfig:
        """The run whose checkpoint is the result: the fine-tuning run when there is one, else this run."""
        return self.finetune_run() if self.finetune is not None else self


FINETUNE = "finetune"
"""The fine-tuning run's folder inside RUN_DIR (and inside cluster.storage_path)."""

_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, path: tuple[str | int, ...] = (), written: dict[tuple[str | int, ...], str] | None = None) -> Any:
    """Expand `${VAR}` and `${VAR:-default}` in every string of a parsed YAML tree; `written` collects each such
    string as written (path → text), so that the values (tokens, keys) are never written back out."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is None:
                raise ConfigError(f"environment variable {name} is not set (used as ${{{name}}} in the config)")
            return default

        if written is not None and _ENV_VAR.search(value):
            written[path] = value
        return _ENV_VAR.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, (*path, k), written) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, (*path, i), written) for i, v in enumerate(value)]
    return value


YAML_ALIASES, YAML_DEPTH = 100, 32
"""Bounds of a recipe: aliases (`*name`) and nesting. A "billion laughs" file (1 KB of aliases that expand to 10⁹
nodes) or a deeply nested one is refused before it is built."""


def read_yaml(text: str, where: str) -> Any:
    """Parse YAML (safe loader) after checking its events against YAML_ALIASES and YAML_DEPTH; one-line errors."""
    aliases = depth = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                aliases += 1
                if aliases > YAML_ALIASES:
                    raise ConfigError(f"{where}: more than {YAML_ALIASES} YAML aliases (*name); write the values out")
            elif isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > YAML_DEPTH:
                    raise ConfigError(f"{where}: nested more than {YAML_DEPTH} levels deep; not a raygpt recipe")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({one_line(e)})") from None


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (numbers, booleans, lists, null)."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {shown(override)} is not of the form section.key=value")
    try:
        value = read_yaml(raw, f"override {shown(key)}") if raw else ""
    except ConfigError:
        value = raw
    node = tree
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is not a section, cannot set {key}")
        node = child
    node[parts[-1]] = value


def _one_line(error: ValidationError) -> str:
    """The first validation error as `dotted.key: message (got value)`; an unknown key with a did-you-mean."""
    from cluster.schema import closest_key  # imports this module

    def unknown(loc: tuple[Any, ...]) -> str:
        suggestion = closest_key(loc)
        return "unknown key" + (f" (did you mean `{suggestion}`?)" if suggestion else "")

    return problem_line(error, unknown=unknown) if error.errors()[0]["loc"] else f"config: {problem_line(error)}"


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe, apply overrides, validate. Raises ConfigError with a one-line message."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.stat().st_size > RECORD_LIMIT:
        raise ConfigError(f"{path}: {path.stat().st_size:,} bytes is not a recipe")
    try:
        tree = read_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for override in overrides or []:
        apply_override(tree, override)
    written: dict[tuple[str | int, ...], str] = {}
    try:
        config = RunConfig.model_validate(_expand_env(tree, (), written))
    except ValidationError as e:
        raise ConfigError(f"{path}: {_one_line(e)}") from None
    config.remember_env(written)
    return config


def load_serve_config(overrides: list[str]) -> ServeConfig:
    """The serve section from `serve.key=value` overrides alone (`raygpt serve CHECKPOINT`, no recipe)."""
    tree: dict[str, Any] = {}
    for override in overrides:
        apply_override(tree, override)
    try:
        return ServeConfig.model_validate(_expand_env(tree.get("serve", {})))
    except ValidationError as e:
        raise ConfigError(f"serve.{_one_line(e)}") from None


def config_to_yaml(config: RunConfig) -> str:
    """The resolved config as YAML, except that values which came from `${VAR}` are written as `${VAR}`."""
    return yaml.safe_dump(config.dump_as_written(), sort_keys=False)


def save_resolved(config: RunConfig) -> Location:
    """Write the resolved config to RUN_DIR/config.yaml (atomically; one PUT on object storage); stages call it once
    their checks passed."""
    from core import files  # pyarrow: not needed to parse a config

    return files.atomic_write(config.layout.config, config_to_yaml(config))
