"""dargmin in four sections (``make demo``; about half a minute on two CPU cores).

1. Ridge regression on scikit-learn's diabetes data, solved by conjugate gradients: the
   implicit derivative dw*/dλ (forward and reverse mode) against the closed form
   -(XᵀX/n + λI)⁻¹ w* and against central finite differences.
2. The input that minimizes a small MLP (plus x²/16), found by Adam: implicit derivatives
   with respect to all weights against finite differences of re-optimization, and the
   ``dargmin.check_optimum`` report at the solution.
3. The same problem with Adam stopped after 5 steps: dargmin refuses to differentiate an
   unconverged solution and says by how much it is off.
4. Hyperparameter tuning by hypergradient descent: gradient steps on log λ of ridge
   regression to minimize the held-out mean squared error on diabetes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import jax

jax.config.update("jax_enable_x64", True)
# Refusals under jit come from a host callback whose traceback JAX logs before re-raising it;
# section 3 catches the error and prints its message, so the log would only repeat it.
logging.getLogger("jax._src.debugging").setLevel(logging.CRITICAL)

import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from sklearn.datasets import load_diabetes

import dargmin


def section(title: str) -> None:
    print(f"\n{'=' * 78}\n{title}\n{'=' * 78}")


# ----------------------------------------------------------------------------------------
# 1. Ridge regression
# ----------------------------------------------------------------------------------------


def load_standardized_diabetes() -> tuple[jax.Array, jax.Array]:
    features, target = load_diabetes(return_X_y=True)
    features = (features - features.mean(0)) / features.std(0)
    target = (target - target.mean()) / target.std()
    return jnp.asarray(features), jnp.asarray(target)


def ridge_objective(w: jax.Array, lam: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    """(1/2n)‖Xw - y‖² + (λ/2)‖w‖²."""
    return 0.5 * jnp.mean((x @ w - y) ** 2) + 0.5 * lam * jnp.sum(w**2)


@dargmin.argmin(ridge_objective)
def ridge_cg(init: jax.Array, lam: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    # An iterative solver on purpose: dargmin never differentiates (or unrolls) it.
    n = x.shape[0]

    def normal_matvec(w: jax.Array) -> jax.Array:
        return x.T @ (x @ w) / n + lam * w

    return jax.scipy.sparse.linalg.cg(normal_matvec, x.T @ y / n, x0=init, tol=1e-14)[0]


def ridge_section() -> None:
    section("1. Ridge regression on diabetes (442 x 10, standardized): dw*/dλ")
    x, y = load_standardized_diabetes()
    lam, init = jnp.asarray(0.1), jnp.zeros(x.shape[1])
    n = x.shape[0]
    w = ridge_cg(init, lam, x, y)
    system = x.T @ x / n + lam * jnp.eye(x.shape[1])
    closed_form = -jnp.linalg.solve(system, w)  # differentiate (XᵀX/n + λI) w = Xᵀy/n in λ
    forward = jax.jit(jax.jacfwd(ridge_cg, argnums=1))(init, lam, x, y)
    reverse = jax.jit(jax.jacrev(ridge_cg, argnums=1))(init, lam, x, y)
    h = 1e-5
    fd = (ridge_cg(init, lam + h, x, y) - ridge_cg(init, lam - h, x, y)) / (2 * h)
    print(
        f"λ = {float(lam)}; CG solution w* matches the direct solve to "
        f"{float(jnp.abs(w - jnp.linalg.solve(system, x.T @ y / n)).max()):.1e}"
    )
    print(f"{'i':>3} {'closed form':>15} {'jacfwd':>15} {'jacrev':>15} {'central FD':>15}")
    for i in range(x.shape[1]):
        print(
            f"{i:>3} {float(closed_form[i]):15.10f} {float(forward[i]):15.10f} "
            f"{float(reverse[i]):15.10f} {float(fd[i]):15.10f}"
        )
    scale = float(jnp.abs(closed_form).max())
    print(
        "max relative deviation from the closed form: "
        f"jacfwd {float(jnp.abs(forward - closed_form).max()) / scale:.1e}, "
        f"jacrev {float(jnp.abs(reverse - closed_form).max()) / scale:.1e}, "
        f"FD {float(jnp.abs(fd - closed_form).max()) / scale:.1e}"
    )


# ----------------------------------------------------------------------------------------
# 2. and 3. The input minimizing an MLP
# ----------------------------------------------------------------------------------------


def make_mlp_params(seed: int) -> dict[str, jax.Array]:
    """Linear(1→3) → tanh → Linear(3→1, no bias), PyTorch-style uniform initialization."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    bound = 1.0 / np.sqrt(3.0)
    return {
        "w1": jax.random.uniform(k1, (3, 1), minval=-1.0, maxval=1.0),
        "b1": jax.random.uniform(k2, (3,), minval=-1.0, maxval=1.0),
        "w2": jax.random.uniform(k3, (1, 3), minval=-bound, maxval=bound),
    }


def mlp_objective(x: jax.Array, params: dict[str, jax.Array]) -> jax.Array:
    # Without the x²/16 stabilizer this network's minimum is at infinity (tanh saturates).
    return (params["w2"] @ jnp.tanh(params["w1"] @ x + params["b1"]))[0] + jnp.sum(x**2) / 16


def adam(params: dict[str, jax.Array], steps: int) -> jax.Array:
    opt = optax.adam(0.5)
    x0 = jnp.zeros(1)

    def step(_: int, carry: tuple) -> tuple:
        x, state = carry
        updates, state = opt.update(jax.grad(mlp_objective)(x, params), state)
        return optax.apply_updates(x, updates), state

    return jax.lax.fori_loop(0, steps, step, (x0, opt.init(x0)))[0]


def make_adam_solver(steps: int) -> Callable[[jax.Array, dict[str, jax.Array]], jax.Array]:
    @dargmin.argmin(mlp_objective)
    def solve(init: jax.Array, params: dict[str, jax.Array]) -> jax.Array:
        return adam(params, steps)

    return solve


def polished_solve(params: dict[str, jax.Array]) -> jax.Array:
    """Adam then Newton steps: the reference for finite differences must be very accurate."""

    def newton(_: int, x: jax.Array) -> jax.Array:
        hess = jax.hessian(mlp_objective)(x, params)
        return x - jnp.linalg.solve(hess, jax.grad(mlp_objective)(x, params))

    return jax.lax.fori_loop(0, 20, newton, adam(params, 700))


def mlp_section() -> None:
    section("2. argmin_x of a tanh MLP + x²/16 (Adam, 350 steps): dx*/dθ for all 9 weights")
    params, init = make_mlp_params(0), jnp.zeros(1)
    solve = make_adam_solver(350)
    x = solve(init, params)
    print(f"x* = {float(x[0]):.10f}")
    print(dargmin.check_optimum(mlp_objective, x, params))
    jac = jax.jit(jax.jacrev(solve, argnums=1))(init, params)
    implicit, _ = ravel_pytree(jac)
    flat, unravel = ravel_pytree(params)
    delta = 1e-4
    shifts = delta * jnp.eye(flat.size)
    resolve = jax.jit(jax.vmap(lambda s: polished_solve(unravel(flat + s))[0]))
    fd = (resolve(shifts) - resolve(-shifts)) / (2 * delta)
    names = [f"{k}[{i}]" for k in sorted(params) for i in range(3)]
    print(f"{'θ':>6} {'dargmin':>15} {'FD of re-opt.':>15}")
    for name, a, b in zip(names, implicit, fd, strict=True):
        print(f"{name:>6} {float(a):15.10f} {float(b):15.10f}")
    rel = float(jnp.abs(implicit - fd).max() / jnp.abs(fd).max())
    print(f"max |dargmin - FD| / max |FD| = {rel:.1e}")


def refusal_section() -> None:
    section("3. The same problem with Adam stopped after 5 steps: dargmin refuses")
    params, init = make_mlp_params(0), jnp.zeros(1)
    solve = make_adam_solver(5)
    print(f"x after 5 Adam steps = {float(solve(init, params)[0]):.6f} (converged: 0.3766)")
    try:
        jax.jit(jax.jacrev(solve, argnums=1))(init, params)
        print("no error (unexpected)")
    except (dargmin.DargminError, jax.errors.JaxRuntimeError) as err:
        # Under jit the error reaches us inside a JaxRuntimeError; print dargmin's sentence.
        text = str(err)
        start = text.find("dargmin.argmin")
        print(f"caught {type(err).__name__}:")
        print(text[start:].splitlines()[0] if start >= 0 else text)


# ----------------------------------------------------------------------------------------
# 4. Hypergradient descent on the ridge penalty
# ----------------------------------------------------------------------------------------


def hypergradient_section() -> None:
    section("4. Hypergradient descent on log λ (ridge, diabetes: 300 train / 142 held out)")
    x, y = load_standardized_diabetes()
    perm = np.random.default_rng(0).permutation(x.shape[0])
    train, val = perm[:300], perm[300:]
    x_tr, y_tr, x_val, y_val = x[train], y[train], x[val], y[val]
    init = jnp.zeros(x.shape[1])

    def val_mse(log_lam: jax.Array) -> jax.Array:
        w = ridge_cg(init, jnp.exp(log_lam), x_tr, y_tr)
        return jnp.mean((x_val @ w - y_val) ** 2)

    value_and_hypergrad = jax.jit(jax.value_and_grad(val_mse))
    log_lam, lr = jnp.asarray(np.log(5.0)), 20.0
    print(f"{'step':>4} {'λ':>12} {'held-out MSE':>14} {'d MSE / d log λ':>17}")
    for step in range(16):
        loss, grad = value_and_hypergrad(log_lam)
        print(f"{step:>4} {float(jnp.exp(log_lam)):12.6f} {float(loss):14.8f} {float(grad):17.3e}")
        log_lam = log_lam - lr * grad
    grid = jnp.logspace(-4, 1, 201)
    losses = jax.jit(jax.vmap(val_mse))(jnp.log(grid))
    best = int(jnp.argmin(losses))
    print(
        f"grid search over 201 values of λ in [1e-4, 10]: best λ = {float(grid[best]):.6f}, "
        f"MSE = {float(losses[best]):.8f}"
    )


if __name__ == "__main__":
    ridge_section()
    mlp_section()
    refusal_section()
    hypergradient_section()
