"""Makes `lm_eval --model raygpt ...` work: registers the "raygpt" model whenever lm-eval loads its model list.

    python -m evaluation.lm_eval_plugin install     # writes raygpt_lm_eval.pth into site-packages (`make` runs this)

lm-eval 0.4 has no entry-point plugin mechanism for models: its CLI only knows the models in `lm_eval.models`. The
.pth file imports this small module at interpreter start; it only adds an import hook (no lm-eval or torch import),
which, right after `lm_eval.models` is executed, registers "raygpt" as a lazy "evaluation.lm:RaygptLM" placeholder.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

PTH_NAME = "raygpt_lm_eval.pth"
TARGET = "evaluation.lm:RaygptLM"


class _RegisterAfterLmEvalModels(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "lm_eval.models":
            return None
        sys.meta_path.remove(self)  # one shot: let the regular finders locate the real module
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            exec_module(module)
            from lm_eval.api.registry import model_registry

            if "raygpt" not in model_registry:
                model_registry.register("raygpt", target=TARGET)

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


def activate() -> None:
    """Called from the .pth file at interpreter start."""
    if "lm_eval.models" not in sys.modules and not any(isinstance(f, _RegisterAfterLmEvalModels) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterLmEvalModels())


def install() -> Path:
    """Write the .pth file into this interpreter's site-packages."""
    target = Path(sysconfig.get_paths()["purelib"]) / PTH_NAME
    target.write_text("import evaluation.lm_eval_plugin as p; p.activate()\n")
    return target


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python -m evaluation.lm_eval_plugin install")
    print(f"installed {install()}")
