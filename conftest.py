"""Root test configuration, shared by tests/ and the doctests of src/dargmin.

* Tests run in float64 (accuracy checks); float32 tests set dtypes explicitly.
  ``tests/conftest.py`` does the same for runs rooted below the repository root.
* XLA compiles for compile speed, not run-time speed (test programs are small and run few
  times; see ``_TEST_XLA_FLAGS``).
* Docstring examples show what a user sees with JAX's defaults, i.e. float32: each
  doctest runs with ``jax_enable_x64`` switched off (thread-locally, restored afterwards).
"""

import contextlib
import importlib.util
import os

import pytest
from _pytest.doctest import DoctestItem

# The suite compiles some thousands of small XLA programs and runs most of them a few times,
# so compile time dominates it. Three XLA CPU options trade run-time speed for compile speed:
# no LLVM optimization passes, the classic fusion code generator instead of the MLIR fusion
# emitters, and one code-generation unit per program. Measured on three compile-heavy tests:
# 62 s CPU time with JAX's defaults, 49 s without LLVM passes, 29 s with all three. Set
# before JAX starts its backend; subprocesses (examples, multi-device workers) inherit them,
# and the workers append their simulated device count. Benchmarks never use these options.
_TEST_XLA_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_parallel_codegen_split_count=1",
)
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *_TEST_XLA_FLAGS]).strip()

import jax  # noqa: E402 (after XLA_FLAGS)

jax.config.update("jax_enable_x64", True)


def _float32_context():
    enable_x64 = getattr(jax, "enable_x64", None)  # a context manager in recent JAX
    if callable(enable_x64):
        return enable_x64(False)
    from jax.experimental import disable_x64  # older JAX

    return disable_x64()


@pytest.fixture(autouse=True)
def _doctests_in_default_precision(request):
    context = (
        _float32_context() if isinstance(request.node, DoctestItem) else contextlib.nullcontext()
    )
    with context:
        yield


# dargmin.torch's doctests need torch (the optional extra ``[torch]``).
collect_ignore_glob = [] if importlib.util.find_spec("torch") else ["src/dargmin/torch/*"]
