"""Sharded implicit differentiation on 8 simulated CPU devices.

The device count is fixed when JAX starts, so the checks run in a subprocess
(``tests/workers/sharded_checks.py``) with ``--xla_force_host_platform_device_count=8``;
this file asserts on the numbers it prints. The data (an L2 logistic regression's design
matrix, 512 × 12) are row-sharded over the 8 devices.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "workers" / "sharded_checks.py"


@pytest.fixture(scope="module")
def sharded(run_worker: Callable[..., dict]) -> dict:
    return run_worker(WORKER)  # the script asks for 8 simulated devices itself


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


# dargmin.sensitivity on row-sharded data (tests/workers/sharded_sensitivity.py): an L2
# logistic regression, 1024 × 4, rows over 8 devices; results against NumPy closed forms.
SENSITIVITY_WORKER = Path(__file__).parent / "workers" / "sharded_sensitivity.py"
SENSITIVITY_CHECKS = [
    "influence_on_params",
    "influence_on_function_cg",
    "leave_one_out_newton",
    "leave_one_out_cg",
]


@pytest.fixture(scope="module")
def sensitivity_sharded(run_worker: Callable[..., dict]) -> dict:
    # the worker sets its own device count before JAX starts
    return run_worker(SENSITIVITY_WORKER)


@pytest.mark.parametrize("name", SENSITIVITY_CHECKS)
def test_sensitivity_sharded_equals_closed_form(sensitivity_sharded: dict, name: str) -> None:
    result = sensitivity_sharded[name]
    assert sensitivity_sharded["devices"] == 8
    assert result["relative_difference"] < 1e-10
    # per-example results stay where their rows are
    assert result["sharding"] == "P('rows',)"


def test_sensitivity_unsharded_equals_closed_form(sensitivity_sharded: dict) -> None:
    # with the test above: sharded and unsharded agree to 1e-10
    assert sensitivity_sharded["influence_on_params"]["unsharded_difference"] < 1e-10


@pytest.mark.parametrize("name", SENSITIVITY_CHECKS)
def test_sensitivity_moves_no_data(sensitivity_sharded: dict, name: str) -> None:
    result = sensitivity_sharded[name]
    rows = sensitivity_sharded["rows"]
    # no collective in any program it compiled moves n values or more ...
    assert result["collectives"] == []
    # ... and nothing row-sized reaches the host (the 16 × 4 test inputs are the largest;
    # the stationarity check's spectrum is computed on the devices, 4 scalars come back)
    assert result["largest_host_transfer"] < rows
    # the detectors see a program that gathers and an array brought to the host
    assert sensitivity_sharded["control"]["collectives"] > 0
    assert sensitivity_sharded["control"]["largest_host_transfer"] == rows * 4


def test_sensitivity_refusals_fire_on_sharded_data(sensitivity_sharded: dict) -> None:
    refusals = sensitivity_sharded["refusals"]
    assert refusals["not_converged"] == ["NonStationaryPointError", "not_stationary"]
    kind, reason, message = refusals["nan_row"]
    assert (kind, reason) == ("NonStationaryPointError", "nonfinite")
    # the example is named, found where its row is: no gather, no row-sized transfer
    assert "1 of 1024 examples (first: [700])" in message
    assert refusals["nan_row_collectives"] == []
    assert refusals["nan_row_largest_host_transfer"] < sensitivity_sharded["rows"]


# dargmin.influence with a loader of row-sharded batches (tests/workers/sharded_influence.py):
# a 67-parameter MLP, 2 batches of 256 rows, each split over the 8 devices.
INFLUENCE_WORKER = Path(__file__).parent / "workers" / "sharded_influence.py"


@pytest.fixture(scope="module")
def influence_sharded(run_worker: Callable[..., dict]) -> dict:
    return run_worker(INFLUENCE_WORKER)


@pytest.mark.parametrize("method", ["exact", "arnoldi"])
def test_influence_scores_on_sharded_batches(influence_sharded: dict, method: str) -> None:
    result = influence_sharded[method]
    assert influence_sharded["devices"] == 8
    assert result["finite"]
    assert result["relative_difference"] < 1e-10
    assert result["shape"] == [512, 5]
    assert result["sharding"] == "P('rows',)"
    # No batch (x: (256, 4), y: (256,)) crosses devices or reaches the host; the only
    # row-indexed collective allowed is the (256, 5) block of scores that concatenating the
    # batches' blocks into one (512, 5) array redistributes.
    assert set(result["moved_shapes"]) <= {"256,5"}
    assert result["host_row_indexed"] == []
