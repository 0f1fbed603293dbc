"""Curvature of a regularized linear autoencoder along its (broken) symmetries.

The loss is J(W₁, W₂; Λ) = (1/2N) Σ‖W₂W₁x − x‖² + ½‖Λ^{½}W₁‖²_F + ½‖W₂Λ^{½}‖²_F with a
diagonal, increasing Λ. Without the penalty the loss only depends on W₂W₁, so it is flat
along W₁ → A W₁, W₂ → W₂ A⁻¹ for any invertible A. The penalty breaks this symmetry, but
unequally: rescaling a latent unit (A diagonal) is penalized strongly, while rotating two
latent units (A a Givens rotation) only costs the *difference* of their penalties. After
training to the optimum (SciPy L-BFGS, float64) we measure, with Hessian-vector products
(forward-over-reverse) and no Hessian ever formed,

* Rayleigh quotients vᵀHv / vᵀv along the rescaling and the rotation directions (the second
  is about a thousand times smaller; the first comes out as 2λ₀), compared with Lanczos
  estimates of the extreme eigenvalues of H;
* the response Jacobian dW*/dΛ = −[∇²_w J]⁻¹ ∇²_{wΛ} J, by conjugate gradients on the HVP
  operator, checked against ``dargmin.implicit_solution`` and finite differences of
  re-trained autoencoders. The small rotational curvature makes this system the slow one.
"""

from __future__ import annotations

import os

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import lineax as lx
import numpy as np
import scipy.optimize
from jax.flatten_util import ravel_pytree

import dargmin
from dargmin.curvature import lanczos_extreme_eigenvalues
from dargmin.derivatives import hessian_vector_product, rayleigh_quotient

Weights = dict[str, jax.Array]
N_SAMPLES, DIM, LATENT = 400, 8, 3
# DARGMIN_FAST=1 (the test suite): finite differences for the first penalty only (2 re-trainings
# instead of 2 · LATENT); everything else is unchanged.
FD_COLUMNS = 1 if os.environ.get("DARGMIN_FAST") else LATENT


def make_data(seed: int = 0) -> jax.Array:
    """Gaussian data with a decaying spectrum, so the principal subspace is well defined."""
    rng = np.random.default_rng(seed)
    scales = 2.0 * 1.5 ** -np.arange(DIM)
    return jnp.asarray(rng.standard_normal((N_SAMPLES, DIM)) * scales)


DATA = make_data()


def loss(weights: Weights, lam: jax.Array) -> jax.Array:
    """J(W₁, W₂; Λ) with Λ = diag(lam); data x are the rows of DATA."""
    recon = DATA @ weights["w1"].T @ weights["w2"].T
    fit = 0.5 * jnp.sum((recon - DATA) ** 2) / N_SAMPLES
    penalty = 0.5 * jnp.sum(lam[:, None] * weights["w1"] ** 2)
    return fit + penalty + 0.5 * jnp.sum(weights["w2"] ** 2 * lam[None, :])


_, UNRAVEL = ravel_pytree({"w1": jnp.zeros((LATENT, DIM)), "w2": jnp.zeros((DIM, LATENT))})


def flat_loss(flat: jax.Array, lam: jax.Array) -> jax.Array:
    return loss(UNRAVEL(flat), lam)


# Compiled once with λ as an argument: the finite differences below re-train six times.
_value_and_grad = jax.jit(jax.value_and_grad(flat_loss))
_newton_step = jax.jit(
    lambda v, lam: v - jnp.linalg.solve(jax.hessian(flat_loss)(v, lam), jax.grad(flat_loss)(v, lam))
)


def train(lam: jax.Array, seed: int = 1) -> Weights:
    """L-BFGS, then Newton: curvatures of 1e-3 need an optimum accurate to ~1e-15."""
    rng = np.random.default_rng(seed)
    flat0 = 0.1 * rng.standard_normal(2 * LATENT * DIM)

    def fun(v: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = _value_and_grad(jnp.asarray(v), lam)
        return float(value), np.asarray(grad)

    result = scipy.optimize.minimize(
        fun,
        flat0,
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 20_000, "gtol": 1e-13, "ftol": 1e-16, "maxcor": 30},
    )
    # L-BFGS stalls along the nearly flat rotation directions: its error there is about
    # ‖∇J‖ / 1e-3. Dense Newton steps (48 unknowns) remove it; the finite differences need it.
    flat = jnp.asarray(result.x)
    for _ in range(3):
        flat = _newton_step(flat, lam)
    return UNRAVEL(flat)


def symmetry_direction(weights: Weights, generator: jax.Array) -> Weights:
    """d/dt of (e^{tA}W₁, W₂e^{-tA}) at t = 0: the tangent of the reparametrization orbit."""
    return {"w1": generator @ weights["w1"], "w2": -weights["w2"] @ generator}


def curvature_section(weights: Weights, lam: jax.Array) -> None:
    def hvp(v: Weights) -> Weights:
        return hessian_vector_product(loss, weights, v, lam)

    grad_norm = float(jnp.abs(ravel_pytree(jax.grad(loss)(weights, lam))[0]).max())
    print(f"trained: J = {float(loss(weights, lam)):.10f}, max |∇J| = {grad_norm:.2e}")
    rescale = jnp.zeros((LATENT, LATENT)).at[0, 0].set(1.0)
    rotate = jnp.zeros((LATENT, LATENT)).at[0, 1].set(-1.0).at[1, 0].set(1.0)
    rq_rescale = float(rayleigh_quotient(hvp, symmetry_direction(weights, rescale)))
    rq_rotate = float(rayleigh_quotient(hvp, symmetry_direction(weights, rotate)))
    print("Rayleigh quotients vᵀHv / vᵀv (Hessian-vector products, forward-over-reverse):")
    print(f"  rescaling latent unit 0       {rq_rescale:.4e}")
    print(f"  Givens rotation of units 0, 1 {rq_rotate:.4e}")
    print(f"  ratio                         {rq_rescale / rq_rotate:.0f}")
    v0 = jax.tree_util.tree_map(jnp.ones_like, weights)
    eig = lanczos_extreme_eigenvalues(hvp, v0, k=2, num_iterations=ravel_pytree(weights)[0].size)
    print(f"Lanczos: smallest eigenvalues {np.asarray(eig.smallest)}")
    print(f"         largest eigenvalues  {np.asarray(eig.largest)}")
    print(
        "  the rotation's quotient is near the bottom of the spectrum; the Hessian is "
        "positive definite, so the optimum is isolated and the IFT applies."
    )


def response_section(weights: Weights, lam: jax.Array) -> None:
    flat_w, unravel = ravel_pytree(weights)

    def grad_flat(w_flat: jax.Array, lam_: jax.Array) -> jax.Array:
        return ravel_pytree(jax.grad(loss)(unravel(w_flat), lam_))[0]

    def hvp_flat(v: jax.Array) -> jax.Array:
        return jax.jvp(lambda w: grad_flat(w, lam), (flat_w,), (v,))[1]

    # ∇²_{wΛ} J: one column per penalty λ_j (forward mode over Λ, k JVPs).
    mixed = jax.jacfwd(grad_flat, argnums=1)(flat_w, lam)
    # Matrix-free: the operator is the HVP, tagged SPD so that CG accepts it.
    operator = lx.FunctionLinearOperator(
        hvp_flat,
        jax.ShapeDtypeStruct(flat_w.shape, flat_w.dtype),
        tags=(lx.symmetric_tag, lx.positive_semidefinite_tag),
    )
    cg = lx.CG(rtol=1e-12, atol=1e-14, max_steps=10_000)
    columns, iterations = [], []
    for j in range(LATENT):
        sol = lx.linear_solve(operator, -mixed[:, j], cg)
        columns.append(sol.value)
        iterations.append(int(sol.stats["num_steps"]))
    response_cg = jnp.stack(columns, axis=1)
    print(
        f"CG solves of H z = -∂(∇J)/∂λ_j ({flat_w.size} unknowns): {iterations} iterations "
        "(one Hessian-vector product each)"
    )

    def implicit(lam_: jax.Array) -> jax.Array:
        optimality = dargmin.gradient_optimality(lambda w, l: loss(unravel(w), l))
        return dargmin.implicit_solution(
            optimality, flat_w, lam_, config=dargmin.ImplicitConfig(linear_solver="cg", **SPD)
        )

    response_dargmin = jax.jit(jax.jacfwd(implicit))(lam)
    h = 1e-6
    fd_columns = []
    for j in range(FD_COLUMNS):
        e = jnp.zeros(LATENT).at[j].set(h)
        plus, minus = ravel_pytree(train(lam + e))[0], ravel_pytree(train(lam - e))[0]
        fd_columns.append((plus - minus) / (2 * h))
    response_fd = jnp.stack(fd_columns, axis=1)
    # Compared on the columns that have finite differences (all of them unless DARGMIN_FAST).
    response_cg, response_dargmin = response_cg[:, :FD_COLUMNS], response_dargmin[:, :FD_COLUMNS]
    scale = float(jnp.abs(response_fd).max())
    print(f"response Jacobian dW*/dΛ: {response_cg.shape[0]} x {LATENT}, max |entry| {scale:.3f}")
    print(
        "  max |CG - FD| / max |FD|      "
        f"{float(jnp.abs(response_cg - response_fd).max()) / scale:.2e}"
    )
    print(
        "  max |dargmin - FD| / max |FD| "
        f"{float(jnp.abs(response_dargmin - response_fd).max()) / scale:.2e}"
    )
    # λ_j moves only latent unit j at this optimum (the other rows' entries are ~0).
    print("  dW₁*/dλ_j, latent row j, first 4 inputs (CG | FD):")
    for j in range(FD_COLUMNS):
        cg_row = unravel(response_cg[:, j])["w1"][j, :4]
        fd_row = unravel(response_fd[:, j])["w1"][j, :4]
        print(f"    λ_{j}: {np.asarray(cg_row).round(6)} | {np.asarray(fd_row).round(6)}")


SPD = {"symmetric": True, "positive_definite": True, "kind": "argmin"}


def main() -> None:
    lam = jnp.asarray([0.50, 0.51, 0.52])
    print(f"linear autoencoder {DIM} → {LATENT} → {DIM}, N = {N_SAMPLES}, Λ = diag{lam.tolist()}")
    weights = train(lam)
    curvature_section(weights, lam)
    response_section(weights, lam)


if __name__ == "__main__":
    main()
