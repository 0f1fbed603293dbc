"""Checks run on 8 simulated CPU devices (``tests/test_sharding.py`` starts this script in a
subprocess, because the device count is fixed when JAX starts).

Prints one JSON object: for each check, the numbers the test asserts on.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import json
import math
import re
import sys
import warnings

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402 (after the device count is set)
import numpy as np  # noqa: E402 (after the device count is set)
from jax.sharding import Mesh, NamedSharding  # noqa: E402 (after the device count is set)
from jax.sharding import PartitionSpec as P  # noqa: E402 (after the device count is set)

import dargmin  # noqa: E402

N_DEVICES = 8
ROWS_PER_DEVICE = 64
P_FEATURES = 12
GD_STEPS = 500


def logistic_objective(w, lam, x, y):
    return jnp.mean(jnp.logaddexp(0.0, -y * (x @ w))) + 0.5 * lam * jnp.sum(w**2)


def gradient_descent(steps):
    def solve(init, lam, x, y):
        # step 1/L, L = ‖X‖²/(4n) + λ ≤ (mean row norm²)/4 + λ: data are standardized rows
        step = 1.0 / (0.25 * P_FEATURES + lam)

        def body(_, w):
            return w - step * jax.grad(logistic_objective)(w, lam, x, y)

        return jax.lax.fori_loop(0, steps, body, init)

    return solve


def data(seed=0):
    rng = np.random.default_rng(seed)
    n = N_DEVICES * ROWS_PER_DEVICE
    x = rng.standard_normal((n, P_FEATURES))
    y = np.where(x @ rng.standard_normal(P_FEATURES) + 0.5 * rng.standard_normal(n) > 0, 1.0, -1.0)
    xv = rng.standard_normal((200, P_FEATURES))
    yv = np.where(xv[:, 0] > 0, 1.0, -1.0)
    return x, y, xv, yv


def hypergradient_fn(linear_solver, steps=GD_STEPS):
    """``dL_val/dλ`` (not jitted)."""
    solve = dargmin.argmin(logistic_objective, linear_solver=linear_solver)(gradient_descent(steps))

    def held_out(lam, x, y, xv, yv):
        w = solve(jnp.zeros(P_FEATURES), lam, x, y)
        return jnp.mean(jnp.logaddexp(0.0, -yv * (xv @ w)))

    return jax.grad(held_out)


def hypergradient(linear_solver, steps=GD_STEPS):
    return jax.jit(hypergradient_fn(linear_solver, steps))


def gathers_of(hlo: str, rows: int) -> list[str]:
    """all-gather instructions whose result has the data's full row count."""
    found = []
    for line in hlo.splitlines():
        if "all-gather" in line and "=" in line:
            shape = re.search(r"=\s*\w+\[([\d,]*)\]", line)
            dims = [int(d) for d in shape.group(1).split(",") if d] if shape else []
            if rows in dims:
                found.append(line.strip()[:160])
    return found


def main() -> None:
    devices = jax.devices()
    assert len(devices) == N_DEVICES, devices
    mesh = Mesh(np.array(devices), ("rows",))
    rows = NamedSharding(mesh, P("rows", None))
    labels = NamedSharding(mesh, P("rows"))
    x, y, xv, yv = data()
    xs, ys = jax.device_put(x, rows), jax.device_put(y, labels)
    lam = jnp.asarray(0.1)
    out: dict[str, object] = {"devices": len(devices)}
    for solver in ("cg", "cholesky"):
        fn = hypergradient(solver)
        # compiled once for the sharded inputs: called, and its HLO read
        on_shards = fn.lower(lam, xs, ys, xv, yv).compile()
        sharded = float(on_shards(lam, xs, ys, xv, yv))
        single = float(fn(lam, jnp.asarray(x), jnp.asarray(y), xv, yv))
        hlo = on_shards.as_text()
        out[solver] = {
            "sharded": sharded,
            "single": single,
            "gathers": gathers_of(hlo, x.shape[0]),
            "x_sharding": str(xs.sharding.spec),
        }
    # the diagnosis still fires on sharded data: 3 gradient steps are far from converged.
    # In a multi-device process a refusal is a warning plus a NaN derivative (raising on
    # one device would stall the others; see dargmin.errors.multi_device).
    bad = hypergradient("cg", steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = float(bad(lam, xs, ys, xv, yv))
    reasons = [dargmin.failure_reason(w.message) for w in caught]
    out["refusal"] = {"value": None if math.isnan(value) else value, "reasons": reasons}
    # second order: the λ-Hessian of the held-out loss, sharded vs not
    second = jax.jit(jax.grad(hypergradient_fn("cg")))
    out["second"] = {
        "sharded": float(second(lam, xs, ys, xv, yv)),
        "single": float(second(lam, jnp.asarray(x), jnp.asarray(y), xv, yv)),
    }
    # TaylorExpansion of w*(λ) around a converged point: the data stay sharded (the
    # expansion's closures compute on them where they are) and the coefficients agree.
    taylor = {}
    for name, (xx, yy) in {"sharded": (xs, ys), "single": (jnp.asarray(x), jnp.asarray(y))}.items():
        w0 = jax.jit(gradient_descent(4 * GD_STEPS))(jnp.zeros(P_FEATURES), lam, xx, yy)
        expansion = dargmin.TaylorExpansion(
            lambda w, lam_, xx=xx, yy=yy: logistic_objective(w, lam_, xx, yy), w0, lam, order=3
        )
        taylor[name] = [np.asarray(d).tolist() for d in expansion.derivatives(1.0)]
    out["taylor"] = taylor
    # Hyperparameter candidates spread over the devices: a vmap over a sharded grid of λ
    # (each device runs its own candidates: replicated data, no communication needed).
    grid = jnp.logspace(-1, 0.5, 2 * N_DEVICES)
    spread = jax.device_put(grid, NamedSharding(mesh, P("rows")))
    batched = jax.jit(jax.vmap(hypergradient_fn("cholesky"), in_axes=(0, None, None, None, None)))
    on_devices = batched(spread, jnp.asarray(x), jnp.asarray(y), xv, yv)
    one_at_a_time = hypergradient("cholesky")
    one_by_one = [float(one_at_a_time(lam_, x, y, xv, yv)) for lam_ in grid[:3]]
    out["candidates"] = {
        "sharding": str(on_devices.sharding.spec),
        "on_devices": np.asarray(on_devices)[:3].tolist(),
        "one_by_one": one_by_one,
    }
    # control: the detector sees the all-gather of a computation that needs the whole data
    control = jax.jit(lambda x: jnp.linalg.svd(x, compute_uv=False)).lower(xs).compile()
    out["control_gathers"] = len(gathers_of(control.as_text(), x.shape[0]))
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
