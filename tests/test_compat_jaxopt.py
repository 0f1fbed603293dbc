"""dargmin.compat.jaxopt: JAXopt's implicit_diff API on dargmin's core.

Every case mirrors JAXopt's documented usage (ridge regression with ``custom_root``,
keyword arguments, ``has_aux``, ``custom_fixed_point``, ``root_vjp``/``root_jvp``) and is
checked against closed forms, finite differences and, where installed, JAXopt itself;
forward mode and Hessians, which JAXopt cannot give, against closed forms and finite
differences.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dargmin import NonStationaryPointError, SingularSystemError
from dargmin.compat import jaxopt as dj
from dargmin.diagnostics import failure_reason
from dargmin.finite_differences import finite_difference_derivative, gradient_fd

N_SAMPLES, N_FEATURES = 12, 4
X = jax.random.normal(jax.random.key(0), (N_SAMPLES, N_FEATURES))
Y = X @ jnp.arange(1.0, N_FEATURES + 1.0) + 0.3 * jax.random.normal(jax.random.key(1), (N_SAMPLES,))
LAM = 0.7


def ridge_objective(params, l2reg, X, y):
    # JAXopt's documented example: mean squared error plus a ridge penalty.
    residuals = X @ params - y
    return 0.5 * jnp.mean(residuals**2) + 0.5 * l2reg * jnp.sum(params**2)


def ridge_closed_form(l2reg, X, y):
    n, p = X.shape
    return jnp.linalg.solve(X.T @ X + l2reg * n * jnp.eye(p), X.T @ y)


def ridge_solver(init_params, l2reg, X, y):
    del init_params  # a closed-form solver, as in JAXopt's documentation
    return ridge_closed_form(l2reg, X, y)


def ridge_dw_dlam(l2reg, X, y):
    # d/dλ (XᵀX + λnI)⁻¹ Xᵀy = -(XᵀX + λnI)⁻¹ n w
    n, p = X.shape
    return -jnp.linalg.solve(X.T @ X + l2reg * n * jnp.eye(p), n * ridge_closed_form(l2reg, X, y))


dargmin_ridge = dj.custom_root(jax.grad(ridge_objective))(ridge_solver)


def test_ridge_reverse_mode_matches_closed_form_and_jaxopt():
    grad = jax.jit(jax.jacrev(dargmin_ridge, argnums=1))(None, LAM, X, Y)
    np.testing.assert_allclose(grad, ridge_dw_dlam(LAM, X, Y), rtol=1e-10)
    jaxopt = pytest.importorskip("jaxopt")
    peer = jaxopt.implicit_diff.custom_root(
        jax.grad(ridge_objective), solve=jaxopt.linear_solve.solve_lu
    )(ridge_solver)
    np.testing.assert_allclose(
        grad, jax.jit(jax.jacrev(peer, argnums=1))(None, LAM, X, Y), rtol=1e-9
    )


def test_gradient_in_data_matches_finite_differences_and_jaxopt():
    def loss(X):
        return jnp.sum(dargmin_ridge(None, LAM, X, Y) ** 2)

    grad = jax.jit(jax.grad(loss))(X)
    closed = jax.jit(lambda X: jnp.sum(ridge_closed_form(LAM, X, Y) ** 2))
    np.testing.assert_allclose(grad, gradient_fd(closed, X), atol=1e-7)
    jaxopt = pytest.importorskip("jaxopt")
    peer = jaxopt.implicit_diff.custom_root(jax.grad(ridge_objective))(ridge_solver)
    np.testing.assert_allclose(
        grad, jax.jit(jax.grad(lambda X: jnp.sum(peer(None, LAM, X, Y) ** 2)))(X), rtol=1e-6
    )


def test_forward_mode_and_hessian_which_jaxopt_cannot_give():
    jac = jax.jit(jax.jacfwd(dargmin_ridge, argnums=1))(None, LAM, X, Y)
    np.testing.assert_allclose(jac, ridge_dw_dlam(LAM, X, Y), rtol=1e-10)

    def loss(lam):
        return jnp.sum(dargmin_ridge(None, lam, X, Y) ** 2)

    hess = jax.jit(jax.hessian(loss))(LAM)
    # Second derivative of the closed form: central differences of its (exact) gradient.
    closed_grad = jax.jit(jax.grad(lambda lam: jnp.sum(ridge_closed_form(lam, X, Y) ** 2)))
    expected = finite_difference_derivative(closed_grad, LAM)
    np.testing.assert_allclose(hess, expected, rtol=1e-6)
    jaxopt = pytest.importorskip("jaxopt")
    peer = jaxopt.implicit_diff.custom_root(jax.grad(ridge_objective))(ridge_solver)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jacfwd(peer, argnums=1)(None, LAM, X, Y)


def test_keyword_arguments_resolve_like_jaxopt():
    def loss_kw(X, lam):
        return jnp.sum(dargmin_ridge(None, l2reg=lam, X=X, y=Y) ** 2)

    def loss_pos(X, lam):
        return jnp.sum(dargmin_ridge(None, lam, X, Y) ** 2)

    g_kw = jax.grad(loss_kw, argnums=(0, 1))(X, LAM)
    g_pos = jax.grad(loss_pos, argnums=(0, 1))(X, LAM)
    for a, b in zip(g_kw, g_pos, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    # init_params by keyword too; its derivative is zero, as in JAXopt.
    g_init = jax.grad(lambda w0: dargmin_ridge(init_params=w0, l2reg=LAM, X=X, y=Y).sum())(
        jnp.ones(N_FEATURES)
    )
    np.testing.assert_array_equal(g_init, jnp.zeros(N_FEATURES))
    jaxopt = pytest.importorskip("jaxopt")
    peer = jaxopt.implicit_diff.custom_root(jax.grad(ridge_objective))(ridge_solver)
    g_peer = jax.grad(lambda X, lam: jnp.sum(peer(None, l2reg=lam, X=X, y=Y) ** 2), argnums=(0, 1))(
        X, LAM
    )
    for a, b in zip(g_kw, g_peer, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_keyword_only_parameters_which_jaxopt_refuses():
    def optimality(w, X, y, *, l2reg):
        return jax.grad(ridge_objective)(w, l2reg, X, y)

    @dj.custom_root(optimality)
    def solver(init_params, X, y, *, l2reg):
        return ridge_closed_form(l2reg, X, y)

    jac = jax.jacrev(lambda lam: solver(None, X, Y, l2reg=lam))(LAM)
    np.testing.assert_allclose(jac, ridge_dw_dlam(LAM, X, Y), rtol=1e-10)


class OptStep(NamedTuple):  # the shape of JAXopt's solver outputs
    params: jax.Array
    state: jax.Array


def test_has_aux_returns_aux_unchanged_and_differentiates_the_solution():
    @dj.custom_root(jax.grad(ridge_objective), has_aux=True)
    def solver_tuple(init_params, l2reg, X, y):
        w = ridge_closed_form(l2reg, X, y)
        return w, {"objective": ridge_objective(w, l2reg, X, y)}

    @dj.custom_root(jax.grad(ridge_objective), has_aux=True)
    def solver_optstep(init_params, l2reg, X, y):
        return OptStep(ridge_closed_form(l2reg, X, y), jnp.asarray(l2reg) * 2)

    sol, aux = solver_tuple(None, LAM, X, Y)
    np.testing.assert_allclose(aux["objective"], ridge_objective(sol, LAM, X, Y), rtol=1e-14)
    step = solver_optstep(None, LAM, X, Y)
    assert isinstance(step, OptStep)
    assert float(step.state) == 2 * LAM
    for solver in (solver_tuple, solver_optstep):
        jac = jax.jacrev(lambda lam, s=solver: s(None, lam, X, Y)[0])(LAM)
        np.testing.assert_allclose(jac, ridge_dw_dlam(LAM, X, Y), rtol=1e-10)
    # aux carries no derivative (JAXopt discards its cotangent too).
    assert float(jax.grad(lambda lam: solver_optstep(None, lam, X, Y).state)(LAM)) == 0.0


def gd_map(params, l2reg, X, y):
    # One gradient step: its fixed point is the ridge solution.
    return params - 0.5 * jax.grad(ridge_objective)(params, l2reg, X, y)


def gd_solver(init_params, l2reg, X, y):
    return jax.lax.fori_loop(0, 2000, lambda i, w: gd_map(w, l2reg, X, y), init_params)


def test_custom_fixed_point_matches_closed_form_and_jaxopt():
    solver = dj.custom_fixed_point(gd_map)(gd_solver)
    w0 = jnp.zeros(N_FEATURES)
    np.testing.assert_allclose(solver(w0, LAM, X, Y), ridge_closed_form(LAM, X, Y), rtol=1e-10)
    jac_rev = jax.jit(jax.jacrev(solver, argnums=1))(w0, LAM, X, Y)
    jac_fwd = jax.jit(jax.jacfwd(solver, argnums=1))(w0, LAM, X, Y)
    np.testing.assert_allclose(jac_rev, ridge_dw_dlam(LAM, X, Y), rtol=1e-8)
    np.testing.assert_allclose(jac_fwd, jac_rev, rtol=1e-10)
    jaxopt = pytest.importorskip("jaxopt")
    peer = jaxopt.implicit_diff.custom_fixed_point(gd_map)(gd_solver)
    np.testing.assert_allclose(
        jac_rev, jax.jit(jax.jacrev(peer, argnums=1))(w0, LAM, X, Y), rtol=1e-6
    )


def test_solve_accepts_jaxopt_functions_and_dargmin_solvers():
    jaxopt = pytest.importorskip("jaxopt")
    expected = ridge_dw_dlam(LAM, X, Y)
    # JAXopt functions: CG assumes a symmetric system (the Jacobian of a gradient is);
    # reverse mode hands solve_normal_cg the transposed matvec. (dargmin's own strategies
    # are tested with dargmin.implicit; "auto", a dense LU here, is the default above.)
    for solve, mode in [
        (jaxopt.linear_solve.solve_cg, jax.jacfwd),
        (jaxopt.linear_solve.solve_normal_cg, jax.jacrev),
    ]:
        solver = dj.custom_root(jax.grad(ridge_objective), solve=solve)(ridge_solver)
        np.testing.assert_allclose(
            jax.jit(mode(solver, argnums=1))(None, LAM, X, Y), expected, rtol=1e-6
        )


def test_root_vjp_and_root_jvp_match_jaxopt_and_closed_form():
    F = jax.grad(ridge_objective)
    sol = ridge_closed_form(LAM, X, Y)
    cotangent = jnp.arange(1.0, N_FEATURES + 1.0)
    vjps = jax.jit(dj.root_vjp, static_argnums=0)(F, sol, (LAM, X, Y), cotangent)
    assert len(vjps) == 3
    np.testing.assert_allclose(vjps[0], cotangent @ ridge_dw_dlam(LAM, X, Y), rtol=1e-10)
    closed = jax.jit(lambda X: cotangent @ ridge_closed_form(LAM, X, Y))
    np.testing.assert_allclose(vjps[1], gradient_fd(closed, X), atol=1e-7)
    tangents = (jnp.asarray(1.0), jnp.zeros_like(X), jnp.ones_like(Y))
    jvp = jax.jit(dj.root_jvp, static_argnums=0)(F, sol, (LAM, X, Y), tangents)
    expected = (
        ridge_dw_dlam(LAM, X, Y)
        + jax.jvp(lambda y: ridge_closed_form(LAM, X, y), (Y,), (jnp.ones_like(Y),))[1]
    )
    np.testing.assert_allclose(jvp, expected, rtol=1e-10)
    with pytest.raises(ValueError, match="same length"):
        dj.root_jvp(F, sol, (LAM, X, Y), (1.0,))
    jaxopt = pytest.importorskip("jaxopt")
    peer_vjps = jax.jit(jaxopt.implicit_diff.root_vjp, static_argnums=0)(
        F, sol, (LAM, X, Y), cotangent
    )
    for a, b in zip(vjps, peer_vjps, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-10)
    peer_jvp = jax.jit(jaxopt.implicit_diff.root_jvp, static_argnums=0)(
        F, sol, (LAM, X, Y), tangents
    )
    np.testing.assert_allclose(jvp, peer_jvp, rtol=1e-6)


def test_jit_and_vmap():
    lams = jnp.array([0.1, 0.7, 2.0])
    jac = jax.jit(jax.vmap(jax.jacfwd(dargmin_ridge, argnums=1), in_axes=(None, 0, None, None)))(
        None, lams, X, Y
    )
    expected = jnp.stack([ridge_dw_dlam(lam, X, Y) for lam in lams])
    np.testing.assert_allclose(jac, expected, rtol=1e-10)


def test_unconverged_solution_is_refused_where_jaxopt_is_silent():
    def early_stopped(init_params, l2reg, X, y):
        return jax.lax.fori_loop(0, 3, lambda i, w: gd_map(w, l2reg, X, y), init_params)

    w0 = jnp.zeros(N_FEATURES)
    solver = dj.custom_root(jax.grad(ridge_objective))(early_stopped)
    with pytest.raises(NonStationaryPointError, match="not a stationary point"):
        jax.jacrev(solver, argnums=1)(w0, LAM, X, Y)
    with pytest.raises(Exception) as info:  # under jit: wrapped by JAX, same reason code
        jax.jit(jax.jacrev(solver, argnums=1))(w0, LAM, X, Y)
    assert failure_reason(info.value) == "not_stationary"
    relaxed = dj.custom_root(jax.grad(ridge_objective), check="ignore")(early_stopped)
    assert jnp.all(jnp.isfinite(jax.jacrev(relaxed, argnums=1)(w0, LAM, X, Y)))
    jaxopt = pytest.importorskip("jaxopt")
    peer = jaxopt.implicit_diff.custom_root(jax.grad(ridge_objective))(early_stopped)
    wrong = jax.jit(jax.jacrev(peer, argnums=1))(w0, LAM, X, Y)  # returned without a word ...
    error = jnp.linalg.norm(wrong - ridge_dw_dlam(LAM, X, Y)) / jnp.linalg.norm(
        ridge_dw_dlam(LAM, X, Y)
    )
    assert error > 0.01  # ... and it is wrong (4.8 %: the derivative at a non-solution)


def test_a_wrong_linear_solve_is_refused():
    def identity_solve(matvec, b):  # returns b: not the solution of A x = b
        return b

    solver = dj.custom_root(jax.grad(ridge_objective), solve=identity_solve)(ridge_solver)
    # Forward mode raises the typed error; in reverse mode the failed (transposed) solve
    # runs inside JAX's backward pass, which wraps it: the reason code reads the same.
    with pytest.raises(SingularSystemError, match="did not converge"):
        jax.jacfwd(solver, argnums=1)(None, LAM, X, Y)
    with pytest.raises(Exception, match="did not converge") as info:
        jax.jacrev(solver, argnums=1)(None, LAM, X, Y)
    assert failure_reason(info.value) == "ill_conditioned"


def test_signature_mismatch_is_named():
    @dj.custom_root(jax.grad(ridge_objective))
    def solver(init_params, l2reg, X, y, maxiter=10):
        return ridge_closed_form(l2reg, X, y)

    with pytest.raises(TypeError, match="reference signature"):
        solver(None, LAM, X, Y)
    with pytest.raises(TypeError, match="solve="):
        dj.custom_root(jax.grad(ridge_objective), solve=3)
    with pytest.raises(TypeError, match="has_aux=True"):
        dj.custom_root(jax.grad(ridge_objective), has_aux=True)(ridge_solver)(None, LAM, X, Y)


def test_arrays_closed_over_by_the_optimality_function_are_differentiated():
    # x*(a; y) = a·y with y captured by the optimality function: ∂(Σx*)/∂y = a.
    def loss(y):
        @dj.custom_root(lambda x, a: x - a * y)
        def solver(init_params, a):
            return a * y

        return solver(None, 2.0).sum()

    np.testing.assert_allclose(jax.grad(loss)(jnp.ones(3)), [2.0, 2.0, 2.0], rtol=1e-12)
