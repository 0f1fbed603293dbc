"""The CV folds of ``dargmin.hyper`` sharded over 8 simulated CPU devices.

The device count is fixed when JAX starts, so the checks run in a subprocess
(``tests/workers/hyper_folds_sharded.py``) with ``--xla_force_host_platform_device_count=8``;
this file asserts on the numbers it prints: the batched support systems of the folds are
spread over the devices, and the hypergradients and fitted estimators equal those computed
with the batch on one device.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).parent / "workers" / "hyper_folds_sharded.py"


@pytest.fixture(scope="module")
def sharded(run_worker: Callable[..., dict]) -> dict:
    return run_worker(WORKER)  # the script asks for 8 simulated devices itself


def test_fold_batch_is_spread_over_eight_devices(sharded: dict) -> None:
    assert sharded["devices"] == 8
    # 5 folds padded with identity systems to 8, one per device.
    assert sharded["placed_shape"][0] == 8
    assert sharded["placed_spec"] == "P('folds',)"
    assert sharded["placed_devices"] == 8


@pytest.mark.parametrize("check", ["lasso_grad", "enet_grad", "lasso_fit"])
def test_sharded_folds_equal_one_device(sharded: dict, check: str) -> None:
    result = sharded[check]
    np.testing.assert_allclose(result["sharded"], result["single"], rtol=1e-10, atol=1e-12)
