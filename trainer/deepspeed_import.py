"""DeepSpeed, imported the way raygpt uses it (a worker imports it here first, in `trainer.loop`; so do the tests).

    python -c "from trainer.deepspeed_import import import_deepspeed; import_deepspeed()"
"""

from __future__ import annotations

import sys
from types import ModuleType


def import_deepspeed() -> ModuleType:
    """`import deepspeed`, less two costs of features raygpt never uses:
    - the `import mlflow` its autotuner runs at import time: ~1 s of every worker's start when mlflow is installed
      (measured 1.34 → 0.30 s). Our own MLflow logger (`trainer.tracking`) imports mlflow later, normally.
    - the shared-memory all-reduce op its CPU backend compiles on the first `init_distributed`: it serves only
      DeepSpeed-inference's `inference_all_reduce`, never training, and its JIT build takes ~35 s of 2 cores on a new
      machine, and again whenever another `ninja` (the venv's or the system's: other hashes) finds it stale. Marking it
      incompatible in DeepSpeed's own op table (kept for edits, see `deepspeed.ops.__getattr__`) skips the build."""
    hide = "deepspeed" not in sys.modules and "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises ImportError meanwhile
    try:
        import deepspeed
    finally:
        if hide:
            del sys.modules["mlflow"]
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed
