"""The list of kernel-dependent tests stays honest: a test module that imports code whose results depend on the CPU's
kernels (precision, MFU, quantized kernels, generation, batching, serve) carries the `kernels` marker, which .ci/run
runs again with the ISA forced down to AVX2 (`make test-avx2`)."""

from __future__ import annotations

import re

from tests.conftest import REPO

KERNEL_MODULES = re.compile(r"^\s*from (model\.(precision|flops|quantize\w*|generate|batching)|cluster\.serve\w*) import",
                            re.M)


def test_every_module_that_tests_kernels_is_marked() -> None:
    unmarked = [str(path.relative_to(REPO)) for path in sorted((REPO / "tests").rglob("test_*.py"))
                if KERNEL_MODULES.search(path.read_text()) and "pytest.mark.kernels" not in path.read_text()]
    assert unmarked == [], "mark these with pytest.mark.kernels (module or test): " + ", ".join(unmarked)


def test_the_pattern_finds_kernel_imports() -> None:
    assert KERNEL_MODULES.search("from model.quantize_kernels import QuantLinear\n")
    assert KERNEL_MODULES.search("    from cluster.serve import start\n")
    assert not KERNEL_MODULES.search("from model.gpt import GPT\n")
