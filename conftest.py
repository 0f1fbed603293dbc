"""Root test configuration, shared by tests/ and the doctests of src/dargmin.

* Tests run in float64 (accuracy checks); float32 tests set dtypes explicitly.
  ``tests/conftest.py`` does the same for runs rooted below the repository root.
* Docstring examples show what a user sees with JAX's defaults, i.e. float32: each
  doctest runs with ``jax_enable_x64`` switched off (thread-locally, restored afterwards).
"""

import contextlib
import importlib.util

import jax
import pytest
from _pytest.doctest import DoctestItem

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
