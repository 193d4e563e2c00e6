"""The typed config: recipes load, overrides apply, bad keys and values give one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from cluster.cli import main
from cluster.config import ConfigError, RunConfig, apply_override, load_config, save_resolved
from tests.conftest import REPO

RECIPES = sorted((REPO / "configs").glob("*.yaml"))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


MINIMAL = "name: t\ndata:\n  sources:\n    - path: a.txt\n"


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_loads(recipe: Path) -> None:
    cfg = load_config(recipe)
    assert cfg.name == recipe.stem and Path(cfg.run_dir).name == recipe.stem  # runs/<name> unless set (cloud)


def test_recipes_exist() -> None:
    assert {"demo", "shakespeare"} <= {p.stem for p in RECIPES}


def _models(model: type[BaseModel]) -> list[type[BaseModel]]:
    found = [model]
    for field in model.model_fields.values():
        for candidate in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel) and candidate not in found:
                found += _models(candidate)
    return found


def test_every_field_is_documented() -> None:
    for model in _models(RunConfig):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"


def test_overrides_are_parsed_as_yaml(tmp_path: Path) -> None:
    cfg = load_config(
        _write(tmp_path, MINIMAL),
        ["data.seq_len=64", "data.clean.dedup=false", "data.val_fraction=0.25", "cluster.address=auto", "seed=7"],
    )
    assert (cfg.data.seq_len, cfg.data.clean.dedup, cfg.data.val_fraction) == (64, False, 0.25)
    assert cfg.cluster.address == "auto" and cfg.seed == 7
    tree: dict = {}
    apply_override(tree, "data.sources=[{path: x.jsonl, text_field: body}]")
    assert tree == {"data": {"sources": [{"path": "x.jsonl", "text_field": "body"}]}}


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        (MINIMAL, ["data.seq_lenn=3"], r"data\.seq_lenn: unknown key \(did you mean `data\.seq_len`\?\)$"),
        (MINIMAL, ["data.seq_len=-1"], r"data\.seq_len: Input should be greater than or equal to 1 \(got -1\)$"),
        (MINIMAL, ["data.val_fraction=1.5"], r"data\.val_fraction: .*less than 1"),
        (MINIMAL, ["data.tokenizer.type=sentencepiece"], r"data\.tokenizer\.type: Input should be 'bpe' or"),
        (MINIMAL, ["data.sources[0]=x"], r"data\.sources\[0\]: unknown key"),
        (MINIMAL, ["bogus"], r"override 'bogus' is not of the form"),
        (MINIMAL, ["name.x=1"], r"name: is not a section"),
        ("name: t\ndata:\n  sources: []\n", [], r"data\.sources: List should have at least 1 item"),
        ("name: t\n", [], r"data: Field required$"),
        ("name: bad name\ndata:\n  sources:\n    - path: a\n", [], r"name: String should match pattern"),
        ("name: t\ndata:\n  sources:\n    - type: text\n", [], r"data\.sources\[0\]: path is required for this source type$"),
        ("name: t\ndata: [1, 2\n", [], r"not valid YAML"),
        ("- a\n- b\n", [], r"top level must be a mapping"),
        (MINIMAL, ["data.tokenizer.eot_token=<eos>"], r"eot_token '<eos>' must be one of special_tokens"),
    ],
)
def test_bad_configs_fail_with_one_line(tmp_path: Path, text: str, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        load_config(_write(tmp_path, text), overrides)
    assert "\n" not in str(error.value)


def test_missing_file_and_env_expansion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    text = "name: t\ndata:\n  sources:\n    - path: ${CORPUS}/a.txt\n    - path: ${UNSET_VAR:-/d}/b.txt\n"
    monkeypatch.setenv("CORPUS", "/corpus")
    cfg = load_config(_write(tmp_path, text))
    assert [s.path for s in cfg.data.sources] == ["/corpus/a.txt", "/d/b.txt"]
    monkeypatch.delenv("CORPUS")
    with pytest.raises(ConfigError, match="environment variable CORPUS is not set"):
        load_config(_write(tmp_path, text))


def test_resolved_config_is_written_and_reloads(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, MINIMAL), [f"run_dir={tmp_path / 'run'}", "data.seq_len=32"])
    out = save_resolved(cfg)
    assert out == tmp_path / "run" / "config.yaml"
    assert RunConfig.model_validate(yaml.safe_load(out.read_text())) == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.seq_len=true", r"data\.seq_len: .*expected int, got a boolean"),
        ("train.zero_stage=true", r"train\.zero_stage: .*got a boolean"),
        ("train.lr=.inf", r"train\.lr: Input should be a finite number"),
        ("train.min_lr=.nan", r"train\.min_lr: Input should be a finite number"),
        ("data.val_fraction=abc", r"data\.val_fraction: Input should be a valid number"),
    ],
)
def test_strict_types_and_finite_numbers(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, MINIMAL), [override])
    assert load_config(_write(tmp_path, MINIMAL), ["train.lr=3e-3"]).train.lr == 3e-3  # YAML reads 3e-3 as a string


def test_unreadable_configs_and_env_flags_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(MINIMAL.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text \(byte \d+\); save the config as UTF-8"):
        load_config(latin1)
    for flag in ("=x", "1A=b", "A-B=c"):
        assert main(["submit", "--address", "http://127.0.0.1:1", "--env", flag, "--", "run", "x.yaml"]) == 2
        err = capsys.readouterr().err
        assert err == (f"raygpt: error: --env {flag!r}: expected KEY=VALUE or KEY, with KEY made of letters, digits "
                       "and '_'\n")
    assert main(["submit", "--address", "http://127.0.0.1:1", "--env", "RAYGPT_UNSET_VAR", "--", "run", "x.yaml"]) == 2
    assert capsys.readouterr().err == ("raygpt: error: --env RAYGPT_UNSET_VAR: not set in this shell (give "
                                       "--env RAYGPT_UNSET_VAR=VALUE or export it)\n")


def test_values_from_the_environment_are_written_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A token passed as ${VAR} never lands in RUN_DIR/config.yaml or in the sections' dumps that runs record."""
    monkeypatch.setenv("WANDB_API_KEY", "tok-9f8e7d6c5b4a")
    monkeypatch.setenv("CORPUS_ROOT", "/srv/corpus")
    text = MINIMAL + ("cluster:\n  address: ray://${WANDB_API_KEY}@head:10001\n"
                      "eval:\n  texts:\n    held_out: ${CORPUS_ROOT}/v.txt\n")
    cfg = load_config(_write(tmp_path, text), [f"run_dir={tmp_path / 'run'}"])
    assert cfg.cluster.address == "ray://tok-9f8e7d6c5b4a@head:10001"  # the run itself sees the value
    written = save_resolved(cfg).read_text()
    assert "tok-9f8e7d6c5b4a" not in written and "/srv/corpus" not in written
    tree = yaml.safe_load(written)
    assert tree["cluster"]["address"] == "ray://${WANDB_API_KEY}@head:10001"
    assert tree["eval"]["texts"] == {"held_out": "${CORPUS_ROOT}/v.txt"}
    assert cfg.eval.dump_as_written()["texts"] == {"held_out": "${CORPUS_ROOT}/v.txt"}  # eval/results.json
    assert cfg.eval.model_copy(update={"limit": 3}).dump_as_written()["texts"]["held_out"].startswith("${")
    reloaded = load_config(out := tmp_path / "run" / "config.yaml")  # the written recipe runs again
    assert reloaded.cluster.address == cfg.cluster.address and out.read_text() == written


def test_submit_forwards_only_the_env_vars_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    from cluster.cli import _env_vars
    from cluster.jobs import runtime_env

    monkeypatch.setenv("HF_TOKEN", "hf_abc123")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-the-job")
    env = runtime_env(".", _env_vars(["HF_TOKEN", "MODE=fast"]))["env_vars"]
    assert env == {"RAY_USAGE_STATS_ENABLED": "0", "HF_TOKEN": "hf_abc123", "MODE": "fast"}


def test_hostile_recipes_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The audit's config probes: a "billion laughs" recipe (1 KB of aliases) and a deeply nested one are refused
    before they are built; a 5 MB value is echoed cut to about 100 characters; a negative seed is refused at load,
    not inside the workers."""
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(12))
    with pytest.raises(ConfigError, match="more than 100 YAML aliases"):
        load_config(_write(tmp_path, MINIMAL + laughs))
    with pytest.raises(ConfigError, match="nested more than 32 levels deep"):
        load_config(_write(tmp_path, MINIMAL + "deep: " + "[" * 5000 + "]" * 5000 + "\n"))
    assert main(["prepare", str(_write(tmp_path, MINIMAL)), "train.lr=" + "x" * 5_000_000]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 400 and "(5,000,002 characters)" in err
    with pytest.raises(ConfigError, match=r"seed: Input should be greater than or equal to 0"):
        load_config(_write(tmp_path, MINIMAL), ["seed=-1"])


def test_run_dir_that_is_a_file_or_a_planted_lock_link(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`run_dir` naming a regular file is one line at once (not after a minute of work); RUN_DIR/.lock as a symlink
    to another file is refused and that file is left as it was."""
    recipe = _write(tmp_path, MINIMAL)
    (tmp_path / "afile").write_text("mine")
    assert main(["prepare", str(recipe), f"run_dir={tmp_path / 'afile'}"]) == 2
    assert "afile is a file, not a folder; choose another run_dir" in capsys.readouterr().err
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").symlink_to(tmp_path / "afile")
    assert main(["prepare", str(recipe), f"run_dir={run_dir}"]) == 2
    assert ".lock is a symlink; remove it" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "mine"


def test_two_runs_sharing_a_storage_path_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """cluster.storage_path is locked like the run dir: a second run whose checkpoints go to the same folder is
    refused in one line (one with train.resume=false would otherwise move the first one's checkpoints away)."""
    from cluster.run_lock import run_locks

    recipe, storage = _write(tmp_path, MINIMAL), tmp_path / "storage"
    first = load_config(recipe, [f"run_dir={tmp_path / 'a'}", f"cluster.storage_path={storage}"])
    with run_locks(first.layout, "raygpt train first"):
        assert main(["train", str(recipe), f"run_dir={tmp_path / 'b'}", f"cluster.storage_path={storage}",
                     "train.resume=false"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{storage} is in use by pid" in err and "raygpt train first" in err


@pytest.mark.parametrize(("flag", "message"), [
    ("--tokens=-1e12", "--tokens must be a finite number above 0"), ("--tokens=nan", "--tokens must be a finite"),
    ("--tokens=inf", "--tokens must be a finite"), ("--mfu=0", "--mfu must be a fraction in (0, 1]"),
    ("--mfu=nan", "--mfu must be a fraction"),
])
def test_plan_refuses_non_finite_or_negative_inputs(flag: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(REPO / "configs/demo.yaml"), flag]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.parametrize(("flags", "message"), [
    (["--max-new-tokens", "0"], "--max-new-tokens: Input should be greater than or equal to 1 (got 0)"),
    (["--max-new-tokens", "-5"], "--max-new-tokens: Input should be greater than or equal to 1 (got -5)"),
    (["--top-k", "0"], "--top-k: Input should be greater than or equal to 1"),
    (["--top-p", "0"], "--top-p: Input should be greater than 0"),
    (["--temperature", "nan"], "--temperature: Input should be a finite number"),
    (["--seed", "-1"], "--seed: Input should be greater than or equal to 0"),
])
def test_generate_options_are_validated_like_config_fields(flags: list[str], message: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Checked before the checkpoint is even looked at (the path here does not exist)."""
    assert main(["generate", "/no/such/checkpoint", "--prompt", "x", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"raygpt: error: {message}"), err
