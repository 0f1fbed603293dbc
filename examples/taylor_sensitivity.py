"""Taylor expansion of an optimum in its hyperparameters (vittles' seed case 1).

Problem: ``f(x, θ) = ½ xᵀAx + mean(x − 0.5)⁵ · mean(θ − 0.5)⁵`` with ``A = RRᵀ + I``
(``R`` uniform, ``x ∈ ℝ⁴``, ``θ ∈ ℝ³``), expanded at ``θ₀ = 0`` where ``x₀`` is found by a
trust-region Newton solve. We print the directional derivatives ``d^k x*/dθ^k [Δ]^k`` for
``k = 1..4``, the error of the truncated series against re-solving at ``θ₀ + Δ``, and timings.

Run: ``python examples/taylor_sensitivity.py`` (about 10 s, mostly compilation).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from dargmin.taylor import TaylorExpansion

jax.config.update("jax_enable_x64", True)

DIM, HYPER_DIM = 4, 3


def make_objective(a: jax.Array):
    """The seed-case objective for a fixed positive-definite ``a``."""

    def objective(x: jax.Array, theta: jax.Array) -> jax.Array:
        return 0.5 * x @ a @ x + jnp.mean(x - 0.5) ** 5 * jnp.mean(theta - 0.5) ** 5

    return objective


def solve(objective, theta: jax.Array, x_init: np.ndarray) -> np.ndarray:
    """Trust-region Newton (exact subproblem) with JAX gradients and Hessians."""
    fun = jax.jit(lambda x: objective(x, theta))
    grad = jax.jit(jax.grad(lambda x: objective(x, theta)))
    hess = jax.jit(jax.hessian(lambda x: objective(x, theta)))
    result = scipy.optimize.minimize(
        lambda x: float(fun(x)),
        x_init,
        jac=lambda x: np.asarray(grad(x)),
        hess=lambda x: np.asarray(hess(x)),
        method="trust-exact",
        options={"gtol": 1e-13},
    )
    return result.x


def main() -> None:
    rng = np.random.default_rng(42)
    r = rng.uniform(size=(DIM, DIM))
    a = jnp.asarray(r @ r.T + np.eye(DIM))
    objective = make_objective(a)
    theta0 = jnp.zeros(HYPER_DIM)
    delta = 0.1 * jnp.asarray(rng.uniform(size=HYPER_DIM))

    start = time.perf_counter()
    x0 = jnp.asarray(solve(objective, theta0, np.zeros(DIM)))
    print(f"x0 = {np.asarray(x0)}   (trust-exact solve: {time.perf_counter() - start:.2f} s)")

    start = time.perf_counter()
    expansion = TaylorExpansion(objective, x0, theta0, order=4)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    derivs = expansion.derivatives(delta)
    jax.block_until_ready(derivs)
    first = time.perf_counter() - start
    start = time.perf_counter()
    repeats = 100
    for _ in range(repeats):
        jax.block_until_ready(expansion.derivatives(delta))
    per_call = (time.perf_counter() - start) / repeats

    print(f"\nΔ = {np.asarray(delta)}")
    for k, xk in enumerate(derivs, start=1):
        print(f"d^{k}x*/dθ^{k}[Δ]^{k} = {np.asarray(xk)}")

    x_true = solve(objective, theta0 + delta, np.asarray(x0))
    print("\norder  ‖series − re-solved x*(θ0+Δ)‖")
    for k in range(5):
        error = np.linalg.norm(np.asarray(expansion.predict(theta0 + delta, order=k)) - x_true)
        print(f"{k:5d}  {error:.3e}")

    report = expansion.check_accuracy(
        lambda th: solve(objective, th, np.asarray(x0)), [delta, 3 * delta, 10 * delta]
    )
    print(f"\n{report}")

    print(
        f"\ntimings: setup (Hessian, Cholesky, checks) {setup * 1e3:.1f} ms, first call "
        f"(compiles orders 1..4) {first * 1e3:.0f} ms, then {per_call * 1e6:.0f} µs per call"
    )


if __name__ == "__main__":
    main()
