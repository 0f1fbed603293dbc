"""KKT differentiation of constrained solvers (dargmin.constrained.constrained_argmin).

Truths: closed forms (equality-constrained least squares, projections onto a half-space
and a sphere), central differences of re-solves, and the refusals' numbers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dargmin.constrained import (
    DegenerateActiveSetError,
    InfeasibleSolutionError,
    KKTSolution,
    check_kkt,
    constrained_argmin,
)
from dargmin.errors import DargminWarning, NonStationaryPointError, failure_reason

RNG = np.random.default_rng(0)
C = jnp.asarray(RNG.standard_normal((8, 4)))
E = jnp.asarray(RNG.standard_normal((2, 4)))


def lsq(x, d, f):
    return 0.5 * jnp.sum((C @ x - d) ** 2)


def lsq_eq(x, d, f):
    return E @ x - f


def kkt_matrix():
    return jnp.block([[C.T @ C, E.T], [E, jnp.zeros((2, 2))]])


@constrained_argmin(lsq, eq=lsq_eq)
def eq_lsq_solver(init, d, f):
    # Any solver: here the KKT system solved directly, primal only (duals recovered).
    return jnp.linalg.solve(kkt_matrix(), jnp.concatenate([C.T @ d, f]))[:4]


def test_equality_constrained_least_squares_closed_form():
    d, f = jnp.asarray(RNG.standard_normal(8)), jnp.asarray(RNG.standard_normal(2))
    inverse = jnp.linalg.inv(kkt_matrix())
    jac_d = inverse[:4, :4] @ C.T  # x* = K⁻¹[Cᵀd; f] restricted to x
    jac_f = inverse[:4, 4:]
    fwd = jax.jacfwd(eq_lsq_solver, argnums=(1, 2))(None, d, f)
    rev = jax.jit(jax.jacrev(eq_lsq_solver, argnums=(1, 2)))(None, d, f)
    for got in (fwd, rev):
        np.testing.assert_allclose(got[0], jac_d, atol=1e-10)
        np.testing.assert_allclose(got[1], jac_f, atol=1e-10)


def test_pytree_solution_and_duals_match_closed_form():
    # x as a dict; the solver returns the duals too (ν from the KKT solve).
    @constrained_argmin(
        lambda x, d, f: lsq(jnp.concatenate([x["a"], x["b"]]), d, f),
        eq=lambda x, d, f: lsq_eq(jnp.concatenate([x["a"], x["b"]]), d, f),
    )
    def solver(init, d, f):
        z = jnp.linalg.solve(kkt_matrix(), jnp.concatenate([C.T @ d, f]))
        return KKTSolution({"a": z[:3], "b": z[3:4]}, eq_dual=z[4:])

    d, f = jnp.asarray(RNG.standard_normal(8)), jnp.asarray(RNG.standard_normal(2))
    jac = jax.jacrev(lambda f: solver(None, d, f))(f)
    inverse = jnp.linalg.inv(kkt_matrix())
    np.testing.assert_allclose(jac.x["a"], inverse[:3, 4:], atol=1e-10)
    np.testing.assert_allclose(jac.x["b"], inverse[3:4, 4:], atol=1e-10)
    np.testing.assert_allclose(jac.eq_dual, inverse[4:, 4:], atol=1e-10)


def sphere_objective(x, theta, c):
    return 0.5 * jnp.sum((x - c) ** 2)


def sphere_eq(x, theta, c):
    return jnp.sum(x**2, keepdims=True) - theta  # ‖x‖² = θ


@constrained_argmin(sphere_objective, eq=sphere_eq)
def sphere_projection(init, theta, c):
    return jnp.sqrt(theta) * c / jnp.linalg.norm(c)


def test_nonlinear_equality_second_derivative_closed_form():
    # x*(θ) = √θ u: d²x/dθ² = -¼ θ^(-3/2) u needs the constraint's curvature (ν ∇²h).
    c = jnp.array([1.0, 2.0, -2.0])
    u, theta = c / 3.0, 2.0
    second = jax.jacfwd(jax.jacrev(sphere_projection, argnums=1), argnums=1)(None, theta, c)
    np.testing.assert_allclose(second, -0.25 * theta**-1.5 * u, atol=1e-9)
    # and the derivative in c (tangent projection scaled by √θ/‖c‖), vmapped over θ
    jac = jax.vmap(lambda t: jax.jacfwd(sphere_projection, argnums=2)(None, t, c))(
        jnp.array([1.0, 4.0])
    )
    tangent = jnp.eye(3) - jnp.outer(u, u)
    np.testing.assert_allclose(jac[1], 2.0 / 3.0 * tangent, atol=1e-10)


# A half-space projection with a weakly active constraint: x*(θ) = argmin ½‖x − c‖²_W
# s.t. aᵀx ≤ θ. At θ = aᵀW⁻¹... chosen so that the unconstrained minimizer c lies exactly on
# the plane: the constraint is active with multiplier 0, and dx*/dθ jumps.
W = jnp.diag(jnp.array([1.0, 3.0, 0.5]))
a_vec = jnp.array([1.0, -1.0, 2.0])
c_vec = jnp.array([0.5, 0.2, 0.4])


def halfspace_solve(theta):
    # closed form: if aᵀc ≤ θ, x = c; else x = c − W⁻¹a (aᵀc − θ)/(aᵀW⁻¹a)
    w_inv_a = jnp.linalg.solve(W, a_vec)
    excess = jnp.maximum(a_vec @ c_vec - theta, 0.0)
    return c_vec - w_inv_a * excess / (a_vec @ w_inv_a)


def halfspace_problem(degenerate):
    @constrained_argmin(
        lambda x, t: 0.5 * (x - c_vec) @ W @ (x - c_vec),
        ineq=lambda x, t: jnp.atleast_1d(a_vec @ x - t),
        degenerate=degenerate,
    )
    def solver(init, t):
        return halfspace_solve(t)

    return solver


def test_degenerate_constraint_refused_and_one_sided_derivatives_match_differences():
    theta0 = float(a_vec @ c_vec)  # weakly active
    with pytest.raises(DegenerateActiveSetError, match=r"inequality 0 is weakly active") as info:
        jax.jacfwd(halfspace_problem("raise"), argnums=1)(None, theta0)
    assert failure_reason(info.value) == "degenerate"
    step = 1e-4
    x0 = halfspace_solve(theta0)
    left = (x0 - halfspace_solve(theta0 - step)) / step  # θ decreasing: constraint active
    right = (halfspace_solve(theta0 + step) - x0) / step  # θ increasing: it leaves
    active = jax.jacfwd(halfspace_problem("active"), argnums=1)(None, theta0)
    inactive = jax.jacrev(halfspace_problem("inactive"), argnums=1)(None, theta0)
    np.testing.assert_allclose(active, left, atol=1e-8)
    np.testing.assert_allclose(inactive, right, atol=1e-8)
    assert float(jnp.linalg.norm(active - inactive)) > 0.1  # a real kink


def test_strictly_active_halfspace_matches_central_differences_under_jit():
    theta = float(a_vec @ c_vec) - 0.3
    grad = jax.jit(jax.jacrev(halfspace_problem("raise"), argnums=1))(None, theta)
    fd = (halfspace_solve(theta + 1e-5) - halfspace_solve(theta - 1e-5)) / 2e-5
    np.testing.assert_allclose(grad, fd, atol=1e-8)


def test_refusals_name_the_numbers():
    f = lambda x, c: 0.5 * jnp.sum((x - c) ** 2)  # noqa: E731
    c = jnp.array([1.0, -1.0])

    @constrained_argmin(f, ineq=lambda x, c: x)
    def infeasible(init, c):
        return c  # violates x ≤ 0 by 1.0

    with pytest.raises(InfeasibleSolutionError, match=r"inequality 0: g = 1 > 0"):
        jax.jacfwd(infeasible, argnums=1)(None, c)

    @constrained_argmin(f, ineq=lambda x, c: x)
    def not_converged(init, c):
        return jnp.minimum(c, 0.0) + jnp.array([0.0, 0.01])

    with pytest.raises(NonStationaryPointError, match=r"‖∇f \+ J_hᵀν \+ J_gᵀλ‖ = 0.01"):
        jax.jacfwd(not_converged, argnums=1)(None, c)

    @constrained_argmin(f, ineq=lambda x, c: x)
    def wrong_sign(init, c):
        x = jnp.minimum(c, 0.0)
        return KKTSolution(x, ineq_dual=-jnp.maximum(c, 0.0))  # λ = −1

    with pytest.raises(NonStationaryPointError, match=r"λ = -1 < 0") as info:
        jax.jacfwd(wrong_sign, argnums=1)(None, c)
    assert failure_reason(info.value) == "negative_multiplier"


def test_licq_failure_refused_with_rank_or_solved_by_least_squares():
    # The equality Ex = f written twice: redundant, consistent. The least-squares KKT solve
    # gives the x-derivative of the non-redundant problem exactly.
    def twice(x, d, f):
        return jnp.concatenate([lsq_eq(x, d, f), lsq_eq(x, d, f)])

    def solve(init, d, f):
        return eq_lsq_solver(None, d, f)

    d, f = jnp.asarray(RNG.standard_normal(8)), jnp.asarray(RNG.standard_normal(2))
    refused = constrained_argmin(lsq, eq=twice)(solve)
    # under jit: the refusal, wrapped by JAX, keeps its numbers and reason code
    with pytest.raises(Exception, match=r"4 rows .* numerical rank 2") as info:
        jax.jit(jax.jacfwd(refused, argnums=2))(None, d, f).block_until_ready()
    assert failure_reason(info.value) == "licq"
    solved = constrained_argmin(lsq, eq=twice, linear_solver="lstsq")(solve)
    with pytest.warns(DargminWarning, match="rank"):
        jac = jax.jacfwd(solved, argnums=2)(None, d, f)
    np.testing.assert_allclose(jac, jnp.linalg.inv(kkt_matrix())[:4, 4:], atol=1e-8)


def test_check_kkt_reports_recovered_duals_and_degenerate_numbers():
    f = lambda x, c: 0.5 * jnp.sum((x - c) ** 2)  # noqa: E731
    c = jnp.array([1.5, -2.0, 0.0])
    report = check_kkt(f, jnp.minimum(c, 0.0), c, ineq=lambda x, c: x)
    # λ = max(c, 0) exactly (the projection's closed form); constraint 2 is weakly active
    np.testing.assert_allclose(report.ineq_dual, [1.5, 0.0, 0.0], atol=1e-12)
    assert report.reasons == ("degenerate",) and "inequality 2 is weakly active" in report.message
    assert report.measurements["stationarity"] < 1e-12
    one_sided = check_kkt(f, jnp.minimum(c, 0.0), c, ineq=lambda x, c: x, degenerate="active")
    assert one_sided.ok and one_sided.active.tolist() == [True, False, True]


def test_float32_kkt_derivative_products_are_full_precision():
    # As for dargmin.argmin (TF32 on GPUs): every product of the KKT derivative, including
    # those of the problem's own functions, is lowered at full float32 precision.
    import re

    C32, E32 = C.astype(jnp.float32), E.astype(jnp.float32)
    x_np = np.linalg.solve(
        np.asarray(kkt_matrix()), np.concatenate([np.asarray(C.T) @ np.ones(8), np.zeros(2)])
    )[:4]
    x32 = jnp.asarray(x_np, jnp.float32)

    @constrained_argmin(
        lambda x, d, f: 0.5 * jnp.sum((C32 @ x - d) ** 2), eq=lambda x, d, f: E32 @ x - f
    )
    def solver(init, d, f):
        return x32

    def program(d):
        return jax.grad(lambda dd: solver(None, dd, jnp.zeros(2, jnp.float32)).sum())(d)

    text = jax.jit(program).lower(jnp.ones(8, jnp.float32)).as_text()
    dots = re.findall(r"stablehlo\.dot_general.*", text)
    assert dots and all("HIGHEST" in d for d in dots)
