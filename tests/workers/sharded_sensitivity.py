"""``dargmin.sensitivity`` on row-sharded data over 8 simulated CPU devices
(``tests/test_sharding.py`` starts this script in a subprocess: the device count is fixed
when JAX starts).

An L2 logistic regression (1024 × 4, rows split over the 8 devices) fitted by Newton's
method. Each sensitivity function runs on the sharded data and on the same data on one
device; the worker prints one JSON object with, per check:

- the largest difference between the two results and the sharding of the sharded one;
- the collectives, in every program XLA compiled during the sharded call (the kernels and
  the eager operations of the stationarity check alike, read from XLA's HLO dump), that
  move at least ``n`` values: moving the data, or anything with one entry per example,
  between devices would show there;
- the largest array brought to the host during the sharded call (every host conversion of
  a ``jax.Array`` goes through its ``_value``).

It also checks that the refusals still fire on sharded data (a fit that has not converged,
a NaN in one sharded row) and that the detector is not blind (a program that does gather).
"""

from __future__ import annotations

import os
import sys
import tempfile

DUMP = tempfile.mkdtemp(prefix="dargmin_hlo_")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 "
    f"--xla_dump_to={DUMP} --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=NONE"
)

import glob  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax._src.array import ArrayImpl  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import dargmin  # noqa: E402
from dargmin import sensitivity  # noqa: E402

N_DEVICES = 8
ROWS = 1024  # > the CG batch (128) and the dense per-example batch (64): the chunked paths
FEATURES = 4
LAM = 0.5

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
# `%name = <result shapes> <collective>(`: the instruction itself, not its users.
INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\("
)


def collectives_moving(hlo: str, values: int) -> list[str]:
    """Collective instructions of ``hlo`` whose result holds at least ``values`` values.

    Stricter than the all-gather detector of ``sharded_checks.py`` (an all-gather whose
    result has the data's row count as a dimension): XLA also gathers reshaped data
    (``f64[8,128,4]`` for 1024 rows was measured when a loop ran over a sharded axis) and
    can gather with an all-reduce of a zero-padded buffer.
    """
    found = []
    for line in hlo.splitlines():
        match = INSTRUCTION.match(line)
        if not match:
            continue
        shapes = re.findall(r"\w+\[([\d,]*)\]", match.group(1))
        size = max((int(np.prod([int(d) for d in s.split(",") if d])) for s in shapes), default=0)
        if size >= values:
            found.append(line.strip()[:160])
    return found


def clear_dump() -> None:
    shutil.rmtree(DUMP, ignore_errors=True)
    os.makedirs(DUMP, exist_ok=True)


def dumped_collectives(values: int) -> list[str]:
    found = []
    for path in glob.glob(os.path.join(DUMP, "*after_optimizations.txt")):
        with open(path) as handle:
            found += collectives_moving(handle.read(), values)
    return found


class HostTransfers:
    """Records the shape of every ``jax.Array`` converted to a host value in its block."""

    def __enter__(self) -> list[tuple[int, ...]]:
        self.shapes: list[tuple[int, ...]] = []
        self.original = ArrayImpl._value
        shapes, original = self.shapes, self.original

        def recorded(array: ArrayImpl):
            shapes.append(tuple(array.shape))
            return original.fget(array)

        ArrayImpl._value = property(recorded)  # type: ignore[method-assign,assignment]
        return self.shapes

    def __exit__(self, *exc: object) -> None:
        ArrayImpl._value = self.original  # type: ignore[method-assign]


def loss(w, example):
    x, y = example
    return jnp.logaddexp(0.0, -y * (x @ w))


def regularizer(w):
    return 0.5 * LAM * jnp.sum(w**2)


def problem():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((ROWS, FEATURES))
    y = np.where(x @ rng.standard_normal(FEATURES) + 0.5 * rng.standard_normal(ROWS) > 0, 1.0, -1.0)

    def objective(w):
        return jnp.sum(jax.vmap(loss, (None, 0))(w, (x, y))) + regularizer(w)

    @jax.jit
    def newton(w):  # Newton's method: converged to round-off
        def step(_, w):
            return w - jnp.linalg.solve(jax.hessian(objective)(w), jax.grad(objective)(w))

        return jax.lax.fori_loop(0, 30, step, w)

    return x, y, newton(jnp.zeros(FEATURES))


def closed_forms(x, y, w, x_test) -> dict[str, np.ndarray]:
    """The same quantities in NumPy from the logistic loss's closed-form derivatives.

    ``ℓᵢ = log(1 + exp(-yᵢxᵢᵀw))``: ``gᵢ = -σ(-mᵢ) yᵢ xᵢ`` and ``Hᵢ = σ(mᵢ)σ(-mᵢ) xᵢxᵢᵀ``
    with the margin ``mᵢ = yᵢxᵢᵀw``; ``H = Σᵢ Hᵢ + λI``.
    """
    margin = y * (x @ w)
    sigma = 1.0 / (1.0 + np.exp(margin))  # σ(-m)
    g = -(sigma * y)[:, None] * x
    curvature = sigma * (1.0 - sigma)
    h = (x * curvature[:, None]).T @ x + LAM * np.eye(x.shape[1])
    influence = -np.linalg.solve(h, g.T).T
    # test loss f(w) = mean log(1 + exp(-sᵢ tᵢᵀw)), sᵢ = sign of the first feature
    s = np.sign(x_test[:, 0])
    grad_f = -((1.0 / (1.0 + np.exp(s * (x_test @ w)))) * s) @ x_test / x_test.shape[0]
    leave_one_out = np.stack(
        [
            w + np.linalg.solve(h - curvature[i] * np.outer(x[i], x[i]), g[i])
            for i in range(x.shape[0])
        ]
    )
    return {
        "influence_on_params": influence,
        "influence_on_function_cg": influence @ grad_f,
        "leave_one_out_newton": leave_one_out,
        "leave_one_out_cg": leave_one_out,
    }


def relative_difference(result: jax.Array, reference: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(result) - reference)) / np.max(np.abs(reference)))


def main() -> None:
    devices = jax.devices()
    assert len(devices) == N_DEVICES, devices
    mesh = Mesh(np.array(devices), ("rows",))
    x, y, w = problem()
    sharded = (
        jax.device_put(x, NamedSharding(mesh, P("rows", None))),
        jax.device_put(y, NamedSharding(mesh, P("rows"))),
    )
    single = (jnp.asarray(x), jnp.asarray(y))
    x_test = jnp.asarray(x[:16])

    def test_loss(params):
        return jnp.mean(jnp.logaddexp(0.0, -jnp.sign(x_test[:, 0]) * (x_test @ params)))

    common = {"regularizer": regularizer}
    truth = closed_forms(x, y, np.asarray(w), np.asarray(x_test))
    checks = {
        "influence_on_params": lambda d: sensitivity.influence_on_params(loss, w, d, **common),
        "influence_on_function_cg": lambda d: sensitivity.influence_on_function(
            test_loss, loss, w, d, linear_solver="cg", **common
        ),
        "leave_one_out_newton": lambda d: sensitivity.approximate_leave_one_out(
            loss, w, d, **common
        ),
        "leave_one_out_cg": lambda d: sensitivity.approximate_leave_one_out(
            loss, w, d, linear_solver="cg", **common
        ),
    }
    out: dict[str, object] = {"devices": len(devices), "rows": ROWS}
    for name, call in checks.items():
        clear_dump()
        with HostTransfers() as transfers:
            result = call(sharded)
        out[name] = {
            "relative_difference": relative_difference(result, truth[name]),
            "sharding": str(result.sharding.spec),
            "collectives": dumped_collectives(ROWS),
            "largest_host_transfer": max((int(np.prod(s)) for s in transfers), default=0),
        }
    # The same call on one device: equal to the sharded one (and so to the closed form).
    out["influence_on_params"]["unsharded_difference"] = relative_difference(
        checks["influence_on_params"](single), truth["influence_on_params"]
    )
    # The refusals fire on sharded data: a fit stopped early, and a NaN in one sharded row.
    refusals = {}
    try:
        sensitivity.influence_on_params(loss, 0.5 * w, sharded, **common)
    except dargmin.DargminError as error:
        refusals["not_converged"] = [type(error).__name__, dargmin.failure_reason(error)]
    bad_x = x.copy()
    bad_x[700, 2] = np.nan  # on device 5
    bad = (jax.device_put(bad_x, sharded[0].sharding), sharded[1])
    clear_dump()
    with HostTransfers() as transfers:
        try:
            sensitivity.influence_on_params(loss, w, bad, **common)
        except dargmin.DargminError as error:
            refusals["nan_row"] = [type(error).__name__, dargmin.failure_reason(error), str(error)]
    refusals["nan_row_collectives"] = dumped_collectives(ROWS)
    refusals["nan_row_largest_host_transfer"] = max((int(np.prod(s)) for s in transfers), default=0)
    out["refusals"] = refusals
    # Control: the detectors are not blind. A singular-value decomposition needs every row
    # on one device; np.asarray brings the whole array to the host.
    clear_dump()
    with HostTransfers() as transfers:
        jax.jit(lambda a: jnp.linalg.svd(a, compute_uv=False))(sharded[0]).block_until_ready()
        np.asarray(sharded[0])
    out["control"] = {
        "collectives": len(dumped_collectives(ROWS)),
        "largest_host_transfer": max((int(np.prod(s)) for s in transfers), default=0),
    }
    shutil.rmtree(DUMP, ignore_errors=True)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
