"""The `raygpt` CLI itself: light start-up (no training stack for --help, jobs, submit), --version, and the config
commands (`config show`, `config schema`, docs/config.md generated from the same source)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster import schema
from cluster.cli import main
from cluster.config import load_config
from tests.conftest import REPO

HEAVY = ("torch", "transformers", "lm_eval", "datasets", "deepspeed", "pyarrow")


def test_help_jobs_and_submit_do_not_import_the_training_stack() -> None:
    script = f"""
import sys
from cluster.cli import main
try:
    main(["--help"])
except SystemExit:
    pass
main(["jobs", "list", "--address", "http://127.0.0.1:1"])
main(["submit", "--address", "http://127.0.0.1:1", "--", "run", "configs/demo.yaml"])
print([m for m in {HEAVY!r} if m in sys.modules])
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr
    assert done.stderr.count("raygpt: error: cannot use the job server at http://127.0.0.1:1") == 2


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == "raygpt 0.1.0"


def test_config_show_prints_the_resolved_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RAYGPT_SHARED_DATA", "/secret/place")
    assert main(["config", "show", "configs/demo.yaml", "train.lr=0.001"]) == 0
    out = capsys.readouterr().out
    tree = yaml.safe_load(out)
    assert tree["train"]["lr"] == 0.001 and tree["model"]["preset"] == load_config(REPO / "configs/demo.yaml").model.preset
    assert "/secret/place" not in out and "${RAYGPT_SHARED_DATA:-../shared/data}" in out  # as written
    shown = tmp_path / "shown.yaml"
    shown.write_text(out)
    assert load_config(shown) == load_config(REPO / "configs/demo.yaml", ["train.lr=0.001"])  # it runs as is


def test_config_schema_lists_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    keys = [f.key for f in schema.fields()]
    assert len(keys) > 100 and {"data.seq_len", "train.lr", "eval.sandbox", "data.sources[].path"} <= set(keys)
    assert all(f.doc for f in schema.fields()), [f.key for f in schema.fields() if not f.doc]  # every field has a doc
    assert main(["config", "schema", "train"]) == 0
    out = capsys.readouterr().out
    assert "train.lr: float = 0.0006\n    Peak learning rate (after warmup)." in out and "data.seq_len" not in out
    assert main(["config", "schema", "trian"]) == 2
    assert capsys.readouterr().err.startswith("raygpt: error: no config section or key 'trian' (sections: data, ")


def test_docs_config_md_is_generated_from_the_config_classes() -> None:
    assert (REPO / "docs" / "config.md").read_text() == schema.markdown(), \
        "docs/config.md is stale: python -m cluster.schema > docs/config.md"


@pytest.mark.parametrize(("override", "suggestion"), [
    ("data.seq_lenn=3", "data.seq_len"), ("trian.lr=3", "train"), ("eval.sandbx=bwrap", "eval.sandbox"),
    ("data.sources=[{pth: a.txt}]", "data.sources[].path"),
])
def test_an_unknown_key_suggests_the_closest(override: str, suggestion: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "configs/demo.yaml", override]) == 2
    assert f"unknown key (did you mean `{suggestion}`?)" in capsys.readouterr().err
