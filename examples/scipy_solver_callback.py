"""Differentiating through a SciPy solver that JAX cannot trace.

L2-regularized logistic regression on scikit-learn's breast-cancer data (standardized) is
solved by ``scipy.optimize.minimize(method="L-BFGS-B")`` on the host, called from JAX with
``jax.pure_callback``. ``dargmin.argmin`` never differentiates the solver (it only needs the
optimality condition ∇_w f = 0), so the derivatives of the solution w*(λ) with respect to the
regularization λ are available, under ``jax.jit``, in forward mode (``jax.jacfwd``: dw*/dλ)
and reverse mode (``jax.grad`` of a held-out loss: the hypergradient). Both are checked against
central finite differences of problems re-solved by SciPy (then polished by Newton
steps) at λ(1 ± 1e-4).
"""

from __future__ import annotations

import jax

jax.config.update("jax_enable_x64", True)

import time

import jax.numpy as jnp
import numpy as np
import scipy.optimize
from sklearn.datasets import load_breast_cancer

import dargmin


def load_data() -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Standardized features, labels in {-1, +1}, split 400 train / 169 validation."""
    features, labels = load_breast_cancer(return_X_y=True)
    features = (features - features.mean(0)) / features.std(0)
    signs = 2.0 * labels - 1.0
    perm = np.random.default_rng(0).permutation(len(signs))
    train, val = perm[:400], perm[400:]
    return (
        jnp.asarray(features[train]),
        jnp.asarray(signs[train]),
        jnp.asarray(features[val]),
        jnp.asarray(signs[val]),
    )


X_TRAIN, Y_TRAIN, X_VAL, Y_VAL = load_data()


def logistic_objective(w: jax.Array, lam: jax.Array) -> jax.Array:
    """Mean logistic loss on the training set plus (λ/2)‖w‖²."""
    margins = Y_TRAIN * (X_TRAIN @ w)
    return jnp.mean(jnp.logaddexp(0.0, -margins)) + 0.5 * lam * jnp.sum(w**2)


# The objective and its gradient, compiled once and called from SciPy as plain NumPy.
_value_and_grad = jax.jit(jax.value_and_grad(logistic_objective))


def scipy_lbfgs(init: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """Host-side solve; tolerances tight enough that the Newton step is ~1e-10."""

    def fun(w: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = _value_and_grad(jnp.asarray(w), jnp.asarray(lam))
        return float(value), np.asarray(grad)

    result = scipy.optimize.minimize(
        fun,
        np.asarray(init, dtype=np.float64),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 10_000, "gtol": 1e-12, "ftol": 1e-15},
    )
    return result.x


def reference_solve(lam: float) -> np.ndarray:
    """SciPy, then Newton steps: FD with step h needs errors far below h · |dw/dλ|."""
    w = jnp.asarray(scipy_lbfgs(np.zeros(X_TRAIN.shape[1]), np.asarray(lam)))
    for _ in range(3):
        grad = jax.grad(logistic_objective)(w, lam)
        w = w - jnp.linalg.solve(jax.hessian(logistic_objective)(w, lam), grad)
    return np.asarray(w)


@dargmin.argmin(logistic_objective)
def solve(init: jax.Array, lam: jax.Array) -> jax.Array:
    # pure_callback: JAX sees only the output's shape; dargmin supplies the derivatives.
    # "sequential" lets jax.vmap (used by jacfwd over several tangents) call SciPy in a loop.
    return jax.pure_callback(
        scipy_lbfgs,
        jax.ShapeDtypeStruct(init.shape, init.dtype),
        init,
        lam,
        vmap_method="sequential",
    )


def validation_loss(lam: jax.Array) -> jax.Array:
    """Held-out logistic loss of w*(λ): the outer objective of hyperparameter tuning."""
    w = solve(jnp.zeros(X_TRAIN.shape[1]), lam)
    return jnp.mean(jnp.logaddexp(0.0, -Y_VAL * (X_VAL @ w)))


def main() -> None:
    lam = jnp.asarray(0.05)
    init = jnp.zeros(X_TRAIN.shape[1])
    print(f"L2-logistic regression, breast cancer: {X_TRAIN.shape[0]} train x {init.size} features")
    w = solve(init, lam)
    print(dargmin.check_optimum(logistic_objective, w, lam))

    start = time.perf_counter()
    dw_dlam = jax.jit(jax.jacfwd(solve, argnums=1))(init, lam)
    hypergrad = jax.jit(jax.grad(validation_loss))(lam)
    print(f"\ndargmin derivatives under jit (incl. compile): {time.perf_counter() - start:.2f} s")

    # Central differences of re-solved problems (relative step keeps λ ± h positive).
    h = 1e-4 * float(lam)
    w_plus, w_minus = reference_solve(float(lam) + h), reference_solve(float(lam) - h)
    fd_dw = (w_plus - w_minus) / (2 * h)

    def val_loss_of(w: np.ndarray) -> float:
        return float(jnp.mean(jnp.logaddexp(0.0, -Y_VAL * (X_VAL @ w))))

    fd_hyper = (val_loss_of(w_plus) - val_loss_of(w_minus)) / (2 * h)

    print("\ndw*/dλ (jax.jacfwd through dargmin) vs central finite differences, first 6 entries:")
    for i in range(6):
        print(f"  w[{i}]  {float(dw_dlam[i]):+.10f}  {fd_dw[i]:+.10f}")
    rel_w = np.abs(np.asarray(dw_dlam) - fd_dw).max() / np.abs(fd_dw).max()
    print(f"  max |dargmin - FD| / max |FD| over all {init.size} entries: {rel_w:.2e}")
    print("\nhypergradient d(validation loss)/dλ (jax.grad through dargmin) vs FD:")
    print(f"  dargmin {float(hypergrad):+.10f}")
    print(f"  FD      {fd_hyper:+.10f}")
    print(f"  relative difference {abs(float(hypergrad) - fd_hyper) / abs(fd_hyper):.2e}")


if __name__ == "__main__":
    main()
