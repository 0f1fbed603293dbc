"""Derivative of the input that minimizes a tiny MLP, and when dargmin refuses to give one.

The objective is ``f_θ(x) = W₂ tanh(W₁ x + b₁)`` (Linear(1→3) → tanh → Linear(3→1, no
bias)), optionally plus the stabilizer ``x²/16``; ``x`` is found by Adam (lr 0.5, 350 steps
from 0) inside a ``dargmin.argmin``-decorated solver and θ = {W₁, b₁, W₂} is a pytree.

(a) With the stabilizer the minimum exists, Adam reaches it, and dx*/dθ from dargmin (forward
    and reverse mode) matches central finite differences of tightly re-optimized solutions.
(b) Without it, for some weights the minimum is at infinity: Adam walks off until tanh
    saturates, the gradient is small (~1e-4) but not zero and so is the second derivative.
    The implicit-function formula would return a number; dargmin refuses and says why.
(c) With a 3-dimensional input and a 2-unit bottleneck (Linear(3→2)) the Hessian is singular
    (f is constant along the null space of W₁) and Adam has not converged: naive inversion of
    the Hessian gives derivatives ~1e15 while finite differences of the optimizer's output
    give ~1. dargmin refuses; ``dargmin.check_optimum`` reports the numbers.
Weights that show (b) and (c) are found by scanning seeds.
"""

from __future__ import annotations

import logging
import os

import jax

jax.config.update("jax_enable_x64", True)
# A refusal under jit is raised from a host callback; JAX logs that callback's traceback
# before re-raising it as a JaxRuntimeError. We catch and print the error ourselves.
logging.getLogger("jax._src.debugging").setLevel(logging.CRITICAL)

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import dargmin

Params = dict[str, jax.Array]
ADAM_LR = 0.5
ADAM_STEPS = 350
FD_STEP = 1e-4
# DARGMIN_FAST=1 (the test suite): in (b), finite differences of Adam's output for one step
# budget instead of two (one compilation less); everything else is unchanged.
FAST = bool(os.environ.get("DARGMIN_FAST"))


def make_mlp_params(seed: int, n_in: int = 1, n_hidden: int = 3) -> Params:
    """PyTorch-style initialization: U(-1/√fan_in, 1/√fan_in) for every entry."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    a_in, a_hidden = 1.0 / np.sqrt(n_in), 1.0 / np.sqrt(n_hidden)
    return {
        "w1": jax.random.uniform(k1, (n_hidden, n_in), minval=-a_in, maxval=a_in),
        "b1": jax.random.uniform(k2, (n_hidden,), minval=-a_in, maxval=a_in),
        "w2": jax.random.uniform(k3, (1, n_hidden), minval=-a_hidden, maxval=a_hidden),
    }


def mlp_objective(x: jax.Array, params: Params, stabilizer: float) -> jax.Array:
    """``W₂ tanh(W₁ x + b₁) + stabilizer · ‖x‖²/16`` (a scalar)."""
    out = params["w2"] @ jnp.tanh(params["w1"] @ x + params["b1"])
    return out[0] + stabilizer * jnp.sum(x**2) / 16.0


def adam_solve(params: Params, stabilizer: float, n_in: int, steps: int = ADAM_STEPS) -> jax.Array:
    """Minimize over x with Adam from x = 0 (a fixed number of steps, as in the seed case)."""
    opt = optax.adam(ADAM_LR)
    x0 = jnp.zeros(n_in)

    def step(_: int, carry: tuple) -> tuple:
        x, state = carry
        grad = jax.grad(mlp_objective)(x, params, stabilizer)
        updates, state = opt.update(grad, state)
        return optax.apply_updates(x, updates), state

    return jax.lax.fori_loop(0, steps, step, (x0, opt.init(x0)))[0]


def tight_solve(params: Params, stabilizer: float) -> jax.Array:
    """Adam followed by Newton steps: finite differences need the solution to ~1e-12."""
    x = adam_solve(params, stabilizer, n_in=1, steps=2 * ADAM_STEPS)

    def newton(_: int, x: jax.Array) -> jax.Array:
        grad = jax.grad(mlp_objective)(x, params, stabilizer)
        hess = jax.hessian(mlp_objective)(x, params, stabilizer)
        return x - jnp.linalg.solve(hess, grad)

    return jax.lax.fori_loop(0, 20, newton, x)


def make_solver(stabilizer: float, n_in: int) -> Callable[[jax.Array, Params], jax.Array]:
    """A dargmin-decorated Adam solver; ``init`` is unused (Adam always starts at 0)."""

    def objective(x: jax.Array, params: Params) -> jax.Array:
        return mlp_objective(x, params, stabilizer)

    @dargmin.argmin(objective)
    def solve(init: jax.Array, params: Params) -> jax.Array:
        return adam_solve(params, stabilizer, n_in)

    return solve


def finite_difference_jacobian(
    solve: Callable[[Params], jax.Array], params: Params, delta: float = FD_STEP
) -> np.ndarray:
    """Central differences of re-solved problems, one column per flattened parameter."""
    flat, unravel = ravel_pytree(params)
    shifts = delta * jnp.eye(flat.size)
    # All 2·n re-optimizations run at once under vmap.
    plus = jax.vmap(lambda s: solve(unravel(flat + s)))(shifts)
    minus = jax.vmap(lambda s: solve(unravel(flat - s)))(shifts)
    return np.asarray((plus - minus).T / (2 * delta))


def flat_jacobian(jac: Params) -> np.ndarray:
    """Flatten a dict-of-arrays Jacobian of a vector x into an (n_x, n_params) matrix."""
    n_x = jax.tree_util.tree_leaves(jac)[0].shape[0]
    cols = [jac[k].reshape(n_x, -1) for k in ("b1", "w1", "w2")]  # ravel_pytree's key order
    return np.asarray(jnp.concatenate(cols, axis=1))


def naive_ift_jacobian(x: jax.Array, params: Params, stabilizer: float) -> np.ndarray:
    """-H⁻¹ ∂²f/∂x∂θ with no questions asked (what a hand-rolled IFT would return)."""
    hess = jax.hessian(mlp_objective)(x, params, stabilizer)
    mixed = jax.jacobian(jax.grad(mlp_objective), argnums=1)(x, params, stabilizer)
    return -np.linalg.solve(np.asarray(hess), flat_jacobian(mixed))


def try_dargmin(solve: Callable, x0: jax.Array, params: Params) -> None:
    """Ask for dx*/dθ under jit; print the refusal if dargmin refuses."""
    try:
        jac = jax.jit(jax.jacfwd(solve, argnums=1))(x0, params)
        print("  dargmin returned (unexpected):", flat_jacobian(jac))
    except (dargmin.DargminError, jax.errors.JaxRuntimeError) as err:
        # Under jit the host-side error arrives wrapped in a JaxRuntimeError; keep the sentence.
        text = str(err)
        start = text.find("dargmin.argmin")
        print(f"  dargmin refused ({type(err).__name__}):")
        print("   ", text[start:].splitlines()[0] if start >= 0 else text)


def scan_seeds(
    n_in: int, n_hidden: int, accept: Callable[[dict], bool], max_seed: int = 100
) -> int:
    """First seed whose unstabilized Adam solution passes ``accept``."""
    for seed in range(max_seed):
        params = make_mlp_params(seed, n_in, n_hidden)
        x = jitted_adam(params, 0.0, n_in)
        hess = np.asarray(jax.hessian(mlp_objective)(x, params, 0.0))
        stats = {
            "x": np.asarray(x),
            "grad": float(jnp.linalg.norm(jax.grad(mlp_objective)(x, params, 0.0))),
            "min_eig": float(np.linalg.eigvalsh(hess)[0]),
            "max_eig": float(np.linalg.eigvalsh(hess)[-1]),
            "params": params,
        }
        if accept(stats):
            return seed
    raise RuntimeError("no seed found")


jitted_adam = jax.jit(adam_solve, static_argnums=(1, 2, 3))


def part_a() -> None:
    print("(a) stabilized objective W₂ tanh(W₁x + b₁) + x²/16, seed 0")
    params = make_mlp_params(0)
    solve = make_solver(stabilizer=1.0, n_in=1)
    x0 = jnp.zeros(1)
    x = solve(x0, params)
    print(f"  Adam solution x* = {float(x[0]):.10f}")
    print(dargmin.check_optimum(lambda x, p: mlp_objective(x, p, 1.0), x, params))
    jac_fwd = flat_jacobian(jax.jit(jax.jacfwd(solve, argnums=1))(x0, params))
    jac_rev = flat_jacobian(jax.jit(jax.jacrev(solve, argnums=1))(x0, params))
    jac_fd = finite_difference_jacobian(jax.jit(lambda p: tight_solve(p, 1.0)), params)
    names = [f"{k}[{i}]" for k in ("b1", "w1", "w2") for i in range(3)]
    print(f"  {'θ':>6} {'dargmin jacfwd':>16} {'dargmin jacrev':>16} {'FD (δ=1e-4)':>16}")
    for j, name in enumerate(names):
        print(f"  {name:>6} {jac_fwd[0, j]:16.10f} {jac_rev[0, j]:16.10f} {jac_fd[0, j]:16.10f}")
    rel = np.abs(jac_fwd - jac_fd).max() / np.abs(jac_fd).max()
    print(f"  max |dargmin - FD| / max |FD| = {rel:.2e}")


def part_b() -> None:
    print("\n(b) no stabilizer: the minimum is at infinity, Adam walks off")

    # Run-off: |x| large, gradient and curvature both small but nonzero.
    def runs_off(s: dict) -> bool:
        return abs(s["x"][0]) > 5 and 1e-5 < s["grad"] < 1e-3 and 1e-5 < s["max_eig"] < 1e-3

    seed = scan_seeds(1, 3, runs_off)
    params = make_mlp_params(seed)
    x = jitted_adam(params, 0.0, 1)
    grad = float(jax.grad(mlp_objective)(x, params, 0.0)[0])
    curv = float(jax.hessian(mlp_objective)(x, params, 0.0)[0, 0])
    z = np.asarray(params["w1"][:, 0] * x + params["b1"]).round(2)
    print(f"  first seed that runs off: {seed}; x = {float(x[0]):.4f}, pre-activations {z}")
    print(f"  f'(x) = {grad:.3e}, f''(x) = {curv:.3e}")
    naive = naive_ift_jacobian(x, params, 0.0)
    print(f"  naive -f''⁻¹ ∂f'/∂θ (largest entry): {np.abs(naive).max():.3e}")
    # The optimizer's output moves with θ, but how much depends on the step budget:
    # it is a property of Adam's trajectory, not of a (non-existent) minimizer.
    for steps in (ADAM_STEPS,) if FAST else (ADAM_STEPS, 2 * ADAM_STEPS):
        fd = finite_difference_jacobian(
            jax.jit(lambda p, steps=steps: adam_solve(p, 0.0, 1, steps)), params
        )
        print(f"  FD of Adam's output after {steps} steps (largest entry): {np.abs(fd).max():.3e}")
    print(dargmin.check_optimum(lambda x, p: mlp_objective(x, p, 0.0), x, params))
    try_dargmin(make_solver(stabilizer=0.0, n_in=1), jnp.zeros(1), params)


def part_c() -> None:
    print("\n(c) x ∈ R³ through a Linear(3→2) bottleneck, no stabilizer, Adam not converged")

    def singular_and_unconverged(s: dict) -> bool:
        naive = naive_ift_jacobian(jnp.asarray(s["x"]), s["params"], 0.0)
        return 1e-5 < s["grad"] < 1e-3 and np.abs(naive).max() > 1e12

    seed = scan_seeds(3, 2, singular_and_unconverged)
    params = make_mlp_params(seed, n_in=3, n_hidden=2)
    x = jitted_adam(params, 0.0, 3)
    grad = jax.grad(mlp_objective)(x, params, 0.0)
    print(
        f"  seed {seed}: x = {np.asarray(x).round(3)}, ‖∇f(x)‖ = {float(jnp.linalg.norm(grad)):.3e}"
    )
    naive = naive_ift_jacobian(x, params, 0.0)
    fd = finite_difference_jacobian(jax.jit(lambda p: adam_solve(p, 0.0, 3)), params)
    print(f"  naive Hessian inversion: largest |dx/dθ| = {np.abs(naive).max():.3e}")
    print(f"  FD of Adam's output:     largest |dx/dθ| = {np.abs(fd).max():.3e}")
    print(dargmin.check_optimum(lambda x, p: mlp_objective(x, p, 0.0), x, params))
    try_dargmin(make_solver(stabilizer=0.0, n_in=3), jnp.zeros(3), params)


if __name__ == "__main__":
    part_a()
    part_b()
    part_c()
