"""The house: dependencies point one way, in floors, found by an import scan of every source file.

    ground floor   core/                                  imports nothing of ours
    stages         data_pipeline/, model/                 stand on core (model on core alone)
                   trainer/, evaluation/                  stand on core and the stages below
    roof           cluster/ (CLI, RunConfig, pipeline, serve, jobs, report, console filter)   only composes

Every `import` and `from ... import` counts, at module level or inside a function (a lazy import is still a
dependency); only imports under `if TYPE_CHECKING:` do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

FLOORS = {"core": 0, "data_pipeline": 1, "model": 1, "trainer": 2, "evaluation": 2, "cluster": 3}
"""Each package's floor: a module may import its own package and packages on lower floors, nothing above or beside."""
MAY_IMPORT = {"model": {"core"}, "data_pipeline": {"core"}}
"""Stricter than the floors: the model stands on the ground floor alone."""
FRONT_DOOR = {"core.object_store": {"core.files"}}
"""Modules only the named ones may import: object storage is reached through core.files."""


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            found |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return found


def imports_of(source: str) -> set[str]:
    """The modules of ours (and other top-level names) a source imports, resolved to `package.module` where a
    `from package import module` names one; imports for type checkers only are left out."""
    tree = ast.parse(source)
    skipped = _type_checking_nodes(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module in FLOORS:  # `from core import files` imports core.files
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _modules() -> dict[str, Path]:
    return {".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path
            for package in FLOORS for path in sorted((REPO / package).rglob("*.py"))}


def arrows() -> set[tuple[str, str]]:
    """(importing module, imported module of ours) for every source file of the packages."""
    return {(module, imported) for module, path in _modules().items() for imported in imports_of(path.read_text())
            if imported.split(".")[0] in FLOORS}


def violations(found: set[tuple[str, str]]) -> list[str]:
    """The arrows that do not point down (or that leave what a package may import)."""
    wrong = []
    for module, imported in sorted(found):
        mine, theirs = module.split(".")[0], imported.split(".")[0]
        allowed = MAY_IMPORT.get(mine)
        if mine != theirs and (FLOORS[theirs] >= FLOORS[mine] or (allowed is not None and theirs not in allowed)):
            wrong.append(f"{module} imports {imported} ({mine} is on floor {FLOORS[mine]}, {theirs} on {FLOORS[theirs]})")
    return wrong


def test_every_import_points_down() -> None:
    wrong = violations(arrows())
    assert not wrong, "imports that do not point down:\n" + "\n".join(wrong)


def test_the_rule_catches_each_kind_of_wrong_arrow() -> None:
    """The rule itself, on made-up arrows: up, sideways, the model beside the data, the ground floor reaching up."""
    wrong = {("model.gpt", "trainer.loop"), ("trainer.loop", "evaluation.run"), ("model.gpt", "data_pipeline.pack"),
             ("core.files", "cluster.config"), ("evaluation.run", "cluster.console")}
    right = {("trainer.loop", "model.gpt"), ("cluster.cli", "trainer.plan"), ("model.gpt", "core.files"),
             ("evaluation.run", "data_pipeline.manifest"), ("model.gpt", "model.config")}
    assert len(violations(wrong)) == len(wrong) and violations(right) == []


def test_the_ground_floor_imports_nothing_of_ours() -> None:
    ours = {imported for module, imported in arrows() if module.startswith("core") and not imported.startswith("core")}
    assert ours == set()


def test_object_storage_only_through_the_front_door() -> None:
    wrong = [f"{module} imports {imported}" for module, imported in sorted(arrows())
             if imported in FRONT_DOOR and module not in FRONT_DOOR[imported]]
    assert not wrong, "\n".join(wrong)


def test_the_stages_never_import_the_roof() -> None:
    """No stage package imports cluster/ (CLI, RunConfig, pipeline, serve, jobs, report, the console filter)."""
    up = sorted(f"{m} imports {i}" for m, i in arrows() if m.split(".")[0] != "cluster" and i.split(".")[0] == "cluster")
    assert up == []


@pytest.mark.parametrize("source, expected", [
    ("from cluster.config import RunConfig", {"cluster.config"}),
    ("from core import files, layout", {"core", "core.files", "core.layout"}),
    ("def f():\n    import trainer.loop\n", {"trainer.loop"}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cluster.config import RunConfig\n", {"typing"}),
])
def test_the_scan_sees_every_kind_of_import(source: str, expected: set[str]) -> None:
    """The scanner itself: lazy imports count, `from package import module` resolves, type-checking imports don't."""
    assert imports_of(source) == expected


def test_modules_stay_readable() -> None:
    """Each module has one job and reads top to bottom: at most 400 lines."""
    long = {module: n for module, path in _modules().items() if (n := len(path.read_text().splitlines())) > 400}
    assert long == {}
