"""A QP as a layer: learning the cost of a constrained allocation, and sparsemax as a QP.

(a) A teacher maps features θ ∈ R³ to an allocation on the simplex,

    x*(θ) = argmin_x ½ xᵀQx − (Wθ)ᵀx   s.t.  Σx = 1,  x ≥ 0,

a small OptNet-style layer (Amos & Kolter 2017) with 5 outputs. A student with the same
structure and an unknown W learns it from 64 (θ, x*) pairs by Adam on the squared error,
with gradients from ``dargmin.constrained.solve_qp`` (the batch is solved at once under
``vmap``; the derivative is the KKT system on each member's active set, not the unrolled
interior-point iterations). The final error and the learned W are printed.

(b) Sparsemax (Martins & Astudillo 2016) is the projection onto the simplex, i.e. the QP
with Q = I, q = −z, 1ᵀx = 1, x ≥ 0. Its Jacobian from the KKT route equals the closed form
of ``dargmin.projections.sparsemax`` (diag(s) − ssᵀ/|S| on the support S).

``DARGMIN_FAST=1``: 30 Adam steps instead of 300. The loss curve is written to
``$DARGMIN_OUTPUT_DIR/constrained_layers.json`` when that is set.
"""

from __future__ import annotations

import jax

jax.config.update("jax_enable_x64", True)

import json
import os
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax

from dargmin.constrained import solve_qp
from dargmin.projections import sparsemax

FAST = os.environ.get("DARGMIN_FAST", "") not in ("", "0")
STEPS = 30 if FAST else 300
N_OUT, N_FEATURES, N_SAMPLES = 5, 3, 64

rng = np.random.default_rng(0)
L = rng.standard_normal((N_OUT, N_OUT))
Q = jnp.asarray(L @ L.T / N_OUT + 0.5 * np.eye(N_OUT))
A, b = jnp.ones((1, N_OUT)), jnp.ones(1)  # Σx = 1
G, h = -jnp.eye(N_OUT), jnp.zeros(N_OUT)  # x ≥ 0
W_TRUE = jnp.asarray(2.0 * rng.standard_normal((N_OUT, N_FEATURES)))
THETA = jnp.asarray(rng.standard_normal((N_SAMPLES, N_FEATURES)))


def allocate(W: jax.Array, theta: jax.Array) -> jax.Array:
    """The QP layer on a batch of features: (B, 3) -> (B, 5), shared Q, A, b, G, h."""
    return solve_qp(Q, -(theta @ W.T), A, b, G, h).x


TARGETS = allocate(W_TRUE, THETA)


@jax.jit
def loss_and_grad(W: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jax.value_and_grad(lambda W: jnp.mean((allocate(W, THETA) - TARGETS) ** 2))(W)


def train() -> list[float]:
    W = jnp.zeros((N_OUT, N_FEATURES))
    optimizer = optax.adam(0.1)
    state = optimizer.init(W)
    losses = []
    for _ in range(STEPS):
        loss, grad = loss_and_grad(W)
        updates, state = optimizer.update(grad, state)
        W = optax.apply_updates(W, updates)
        losses.append(float(loss))
    print(f"(a) {STEPS} Adam steps: loss {losses[0]:.3e} -> {losses[-1]:.3e}")
    print(f"    sparsity of the targets: {float(jnp.mean(TARGETS < 1e-9)):.0%} of entries are 0")
    relative = float(jnp.linalg.norm(W - W_TRUE) / jnp.linalg.norm(W_TRUE))
    print(f"    ‖W − W_true‖ / ‖W_true‖ = {relative:.3f}")
    return losses


def sparsemax_by_qp(z: jax.Array) -> jax.Array:
    n = z.size
    return solve_qp(jnp.eye(n), -z, jnp.ones((1, n)), jnp.ones(1), -jnp.eye(n), jnp.zeros(n)).x


def compare_sparsemax() -> float:
    z = jnp.array([0.9, 0.1, 0.6, -0.4, 0.75])
    by_qp = jax.jacrev(sparsemax_by_qp)(z)
    closed = jax.jacfwd(sparsemax)(z)
    error = float(jnp.max(jnp.abs(by_qp - closed)))
    print(f"(b) sparsemax(z) = {np.round(np.asarray(sparsemax(z)), 4).tolist()}")
    print(f"    Jacobian by the KKT route vs the closed form: max difference {error:.1e}")
    assert error < 1e-8, error
    return error


def main() -> None:
    start = time.perf_counter()
    losses = train()
    assert losses[-1] < 0.5 * losses[0], "the QP layer did not learn"
    error = compare_sparsemax()
    output_dir = os.environ.get("DARGMIN_OUTPUT_DIR")
    if output_dir:
        path = Path(output_dir) / "constrained_layers.json"
        path.write_text(json.dumps({"losses": losses, "sparsemax_jacobian_error": error}))
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
