"""Sharded implicit differentiation on 8 simulated CPU devices.

The device count is fixed when JAX starts, so the checks run in a subprocess
(``tests/workers/sharded_checks.py``) with ``--xla_force_host_platform_device_count=8``;
this file asserts on the numbers it prints. The data (an L2 logistic regression's design
matrix, 512 × 12) are row-sharded over the 8 devices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "workers" / "sharded_checks.py"


@pytest.fixture(scope="module")
def sharded() -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    run = subprocess.run(
        [sys.executable, str(WORKER)], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def test_runs_on_eight_devices(sharded: dict) -> None:
    assert sharded["devices"] == 8
    assert sharded["cg"]["x_sharding"] == "P('rows', None)"


@pytest.mark.parametrize("solver", ["cg", "cholesky"])
def test_sharded_hypergradient_equals_unsharded(sharded: dict, solver: str) -> None:
    result = sharded[solver]
    assert result["sharded"] == pytest.approx(result["single"], rel=1e-10, abs=0)


def test_second_derivative_sharded_equals_unsharded(sharded: dict) -> None:
    second = sharded["second"]
    assert second["sharded"] == pytest.approx(second["single"], rel=1e-10, abs=0)


@pytest.mark.parametrize("solver", ["cg", "cholesky"])
def test_no_all_gather_of_the_data(sharded: dict, solver: str) -> None:
    assert sharded[solver]["gathers"] == []
    # the detector is not blind: an SVD of the sharded matrix gathers it
    assert sharded["control_gathers"] > 0


def test_refusal_fires_on_sharded_data(sharded: dict) -> None:
    # Multi-device: a warning naming the reason and a NaN derivative, not a stalled process.
    assert sharded["refusal"]["value"] is None
    assert "not_stationary" in sharded["refusal"]["reasons"]


def test_taylor_coefficients_sharded_equal_unsharded(sharded: dict) -> None:
    import numpy as np

    for sharded_k, single_k in zip(
        sharded["taylor"]["sharded"], sharded["taylor"]["single"], strict=True
    ):
        np.testing.assert_allclose(sharded_k, single_k, rtol=1e-9, atol=1e-12)


def test_hyperparameter_candidates_spread_over_devices(sharded: dict) -> None:
    import numpy as np

    candidates = sharded["candidates"]
    assert candidates["sharding"] == "P('rows',)"
    np.testing.assert_allclose(candidates["on_devices"], candidates["one_by_one"], rtol=1e-10)
