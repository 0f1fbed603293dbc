"""Sharded implicit differentiation: a held-out hypergradient with the data split over devices.

An L2-regularized logistic regression whose training rows are sharded over 8 devices
(simulated on the CPU here; the same code runs on GPUs or TPUs). The inner solver is plain
Newton's method under ``jax.jit``; ``dargmin.argmin`` attaches the implicit derivative,
whose Hessian-vector products (CG) run where the rows are: each device multiplies its own
rows and one all-reduce sums the results. Nothing gathers the data.

The script checks that the sharded hypergradient equals the unsharded one, that the
compiled program has no all-gather of the data, and then tunes λ by a few steps of
gradient descent on the held-out loss in log λ.

Run: ``python examples/sharded_logistic.py`` (``DARGMIN_FAST=1``: smaller data).
"""

from __future__ import annotations

import os

# Simulate 8 devices on the CPU (must happen before JAX starts); on a machine with several
# accelerators, remove this line and the mesh below spans them.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import dargmin

FAST = os.environ.get("DARGMIN_FAST", "") not in ("", "0")
ROWS = 2_000 if FAST else 80_000
FEATURES = 20
NEWTON_STEPS = 12


def objective(w: jax.Array, lam: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.logaddexp(0.0, -y * (x @ w))) + 0.5 * lam * jnp.sum(w**2)


@dargmin.argmin(objective, linear_solver="cg")
def fit(init: jax.Array, lam: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    # Newton's method: the 20 x 20 Hessian Xᵀ D X / n + λI is summed over the devices' rows
    # (one all-reduce); the few-unknown solve is replicated.
    def step(w: jax.Array, _: None) -> tuple[jax.Array, None]:
        gradient = jax.grad(objective)(w, lam, x, y)
        hessian = jax.hessian(objective)(w, lam, x, y)
        return w - jnp.linalg.solve(hessian, gradient), None

    return jax.lax.scan(step, init, length=NEWTON_STEPS)[0]


def held_out_loss(log_lam: jax.Array, x, y, xv, yv) -> jax.Array:
    w = fit(jnp.zeros(FEATURES), jnp.exp(log_lam), x, y)
    return jnp.mean(jnp.logaddexp(0.0, -yv * (xv @ w)))


def make_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    w_true = rng.standard_normal(FEATURES) * (rng.random(FEATURES) < 0.3)
    x = rng.standard_normal((ROWS + 2_000, FEATURES)) / np.sqrt(FEATURES)
    y = np.where(x @ w_true * 4 + rng.standard_normal(len(x)) > 0, 1.0, -1.0)
    return x[:ROWS], y[:ROWS], x[ROWS:], y[ROWS:]


def main() -> None:
    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("rows",))
    x, y, xv, yv = make_data()
    xs = jax.device_put(x, NamedSharding(mesh, P("rows", None)))
    ys = jax.device_put(y, NamedSharding(mesh, P("rows")))
    print(f"{len(devices)} devices; X {x.shape} sharded by rows: {xs.sharding.spec}")

    value_and_grad = jax.jit(jax.value_and_grad(held_out_loss))
    log_lam = jnp.asarray(np.log(1e-2))
    sharded = value_and_grad(log_lam, xs, ys, xv, yv)[1]
    single = value_and_grad(log_lam, jnp.asarray(x), jnp.asarray(y), xv, yv)[1]
    print(f"hypergradient d L_val / d log λ: sharded {float(sharded):+.12e}")
    print(f"                                 one device {float(single):+.12e}")
    assert abs(float(sharded - single)) <= 1e-10 * max(1.0, abs(float(single)))

    hlo = value_and_grad.lower(log_lam, xs, ys, xv, yv).compile().as_text()
    gathers = [line for line in hlo.splitlines() if "all-gather" in line and f"{ROWS}," in line]
    reduces = sum("all-reduce" in line and "=" in line for line in hlo.splitlines())
    print(f"compiled program: {len(gathers)} all-gathers of the data, {reduces} all-reduces")
    assert not gathers

    # Tune λ: gradient descent on the held-out loss in log λ.
    start = time.perf_counter()
    for it in range(1 if FAST else 15):
        loss, grad = value_and_grad(log_lam, xs, ys, xv, yv)
        print(f"  step {it:2d}: λ = {float(jnp.exp(log_lam)):.3e}  held-out loss {float(loss):.6f}")
        log_lam = log_lam - 2.0 * grad
    print(f"tuning took {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
