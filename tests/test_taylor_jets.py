"""TaylorExpansion on the shared linear-system layer and diagnosis: saddles, Krylov paths,
immutability, float32. Truths are closed forms or nested forward mode of an independent
(implicitly differentiated) solver."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

import dargmin
from dargmin.diagnostics import Check, failure_reason
from dargmin.linear_solvers import CG, Auto
from dargmin.taylor import TaylorExpansion


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _saddle(x, th):
    return 0.5 * x[0] ** 2 - 0.5 * x[1] ** 2 - th * x[0]  # stationary at (th, 0), a saddle


# ------------------------------------------------------------------------ (a) saddles


@pytest.mark.parametrize("solver", ["auto", "cholesky", "lu", "cg"])
def test_saddle_is_refused_as_not_minimum(solver):
    # Exactly stationary: the residual is 0, so the refusal must come from the curvature
    # (Cholesky's failure, the smallest eigenvalue, or CG meeting negative curvature).
    with pytest.raises(dargmin.SingularSystemError) as info:
        TaylorExpansion(_saddle, jnp.array([1.0, 0.0]), jnp.array(1.0), linear_solver=solver)
    assert failure_reason(info.value) == "not_minimum", str(info.value)
    assert "TaylorExpansion at (x0, theta0)" in str(info.value)


def test_saddle_with_nonzero_residual_is_refused_by_cg():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(30, 30)))
    h = jnp.asarray(q @ np.diag(np.r_[-1.0, np.linspace(1.0, 5.0, 29)]) @ q.T)
    f = lambda x, th: 0.5 * x @ h @ x - th * jnp.sum(x)  # noqa: E731
    x0 = jnp.linalg.solve(h, jnp.ones(30)) + 1e-10
    with pytest.raises(dargmin.SingularSystemError) as info:
        TaylorExpansion(f, x0, jnp.array(1.0), order=2, linear_solver="cg")
    assert failure_reason(info.value) == "not_minimum"
    # The same point is a fine root: no minimum is declared there.
    g = lambda x, th: h @ x - th  # noqa: E731
    te = TaylorExpansion.from_optimality(g, x0, jnp.array(1.0), order=2, symmetric=True)
    assert te.linear_solver == "lu"
    np.testing.assert_allclose(te.derivatives(1.0)[0], np.linalg.solve(h, np.ones(30)), rtol=1e-9)


# ------------------------------------------------- (b) Krylov paths against closed forms


def _shifted_quadratic(n: int = 50):
    """x*(θ) = (1 + θ₁) (A + θ₀ I)⁻¹ b: every derivative in closed form, and ∂²x*/∂θ₁² = 0
    (a direction whose residual r₂ vanishes exactly inside a batch of directions)."""
    rng = np.random.default_rng(1)
    r = rng.normal(size=(n, n))
    a = r @ r.T / n + np.eye(n)
    b = rng.normal(size=n)
    th0 = np.array([0.3, 0.2])

    def f(x, th):
        return (
            0.5 * x @ (jnp.asarray(a) + th[0] * jnp.eye(n)) @ x - (1 + th[1]) * jnp.asarray(b) @ x
        )

    m = a + th0[0] * np.eye(n)
    x0 = (1 + th0[1]) * np.linalg.solve(m, b)
    mb = np.linalg.solve(m, b)
    m2b = np.linalg.solve(m, mb)
    m3b = np.linalg.solve(m, m2b)
    jac = np.stack([-(1 + th0[1]) * m2b, mb], axis=1)  # (n, 2)
    hess = np.zeros((n, 2, 2))
    hess[:, 0, 0] = 2 * (1 + th0[1]) * m3b
    hess[:, 0, 1] = hess[:, 1, 0] = -m2b
    return f, jnp.asarray(x0), jnp.asarray(th0), jac, hess


@pytest.mark.parametrize("solver", ["cholesky", "cg", "gmres"])
def test_derivative_tensor_and_mixed_derivative_krylov_match_closed_form(solver):
    f, x0, th0, jac, hess = _shifted_quadratic()
    te = TaylorExpansion(f, x0, th0, order=2, linear_solver=solver)
    assert te.linear_solver == solver
    assert _rel(te.derivative_tensor(1), jac) < 1e-9
    assert _rel(te.derivative_tensor(2), hess) < 1e-9
    e0, e1 = jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])
    assert _rel(te.mixed_derivative([e0, e1]), hess[:, 0, 1]) < 1e-9
    # A zero direction in the batch (its residuals vanish exactly): the mixed derivative is 0.
    np.testing.assert_allclose(te.mixed_derivative([e0, 0.0 * e1]), 0.0, atol=1e-12)


def test_krylov_mixed_derivative_matches_nested_forward_mode():
    # Non-quadratic: the truth is nested jacfwd through dargmin.argmin (implicit.py's rule).
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.normal(size=(6, 3)))

    def f(x, th):
        return 0.5 * jnp.sum(x**2) + 0.1 * jnp.sum(x**4) - jnp.sum(jnp.sin(w @ th) * x)

    grad, hess = jax.grad(f), jax.hessian(f)

    @dargmin.argmin(f, linear_solver="lu")
    def solve(init, th):
        def step(_, v):
            return v - jnp.linalg.solve(hess(v, th), grad(v, th))

        return jax.lax.fori_loop(0, 40, step, init)

    th0 = jnp.array([0.3, -0.2, 0.5])
    x0 = jax.jit(solve)(jnp.zeros(6), th0)
    second = jax.jit(jax.jacfwd(jax.jacfwd(lambda th: solve(x0, th))))(th0)  # (6, 3, 3)
    te = TaylorExpansion(f, x0, th0, order=2, linear_solver="cg")
    e = jnp.eye(3)
    assert _rel(te.mixed_derivative([e[0], e[2]]), second[:, 0, 2]) < 1e-8
    assert _rel(te.derivative_tensor(2), second) < 1e-8


def test_failed_krylov_solve_is_reported_not_ignored():
    f, x0, th0, _, _ = _shifted_quadratic()
    te = TaylorExpansion(
        f, x0, th0, order=2, linear_solver="cg", krylov_max_steps=2, check="ignore"
    )
    with pytest.raises(dargmin.SingularSystemError, match="did not converge") as info:
        te.derivatives(jnp.array([1.0, 0.0]))
    assert failure_reason(info.value) == "ill_conditioned"


# ------------------------------------------------------------------- (c) immutability


def test_expansion_is_not_mutated_by_its_methods():
    f, x0, th0, _, _ = _shifted_quadratic(8)
    te = TaylorExpansion(f, x0, th0, order=2)
    before = (repr(te), te.linear_solver)
    assert before[1] == "cholesky"
    te.derivatives(jnp.array([0.1, 0.2]))
    te.predict(th0 + 0.01)
    te.mixed_derivative([jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])])
    te.derivative_tensor(2)
    assert (repr(te), te.linear_solver) == before
    with pytest.raises(AttributeError, match="immutable"):
        te._strategy = None  # type: ignore[misc]
    with pytest.raises(AttributeError):
        te.linear_solver = "lu"  # type: ignore[misc]


def test_failed_cholesky_is_reported_not_replaced_by_lu():
    x0, th0 = jnp.array([1.0, 0.0]), jnp.array(1.0)
    # check="ignore" skips the diagnosis, not the failed factorization.
    with pytest.raises(dargmin.SingularSystemError, match="cholesky") as info:
        TaylorExpansion(_saddle, x0, th0, order=2, linear_solver="cholesky", check="ignore")
    assert failure_reason(info.value) == "singular"
    # check="warn": the verdict and the failed factorization are warned; the strategy stays.
    with pytest.warns(dargmin.DargminWarning) as record:
        te = TaylorExpansion(_saddle, x0, th0, order=2, check="warn")
    messages = " ".join(str(w.message) for w in record)
    assert "not_minimum" in messages and "cholesky" in messages
    assert te.linear_solver == "cholesky" and "linear_solver='cholesky'" in repr(te)
    # Warned once at construction; the derivatives are NaN, not those of an LU solve.
    assert not np.any(np.isfinite(te.derivatives(1.0)[0]))
    assert te.linear_solver == "cholesky"


# ------------------------------------------------------------------------- (d) float32


@pytest.mark.parametrize("solver", ["auto", "cg"])
def test_float32_dense_and_krylov(solver):
    f, x0, th0, jac, hess = _shifted_quadratic(20)
    te = TaylorExpansion(
        f, x0.astype(jnp.float32), th0.astype(jnp.float32), order=2, linear_solver=solver
    )
    tensor = te.derivative_tensor(2)
    assert tensor.dtype == jnp.float32
    # Stated float32 tolerance: 1e-4 relative (cond(H) ≈ 10, eps = 1.2e-7).
    assert _rel(te.derivative_tensor(1), jac) < 1e-4
    assert _rel(tensor, hess) < 1e-4
    d1, d2 = te.derivatives(jnp.array([0.5, -0.5], jnp.float32))
    delta = np.array([0.5, -0.5])
    assert _rel(d1, jac @ delta) < 1e-4
    assert _rel(d2, hess @ delta @ delta) < 1e-4


# --------------------------------------------------------------- strategy specifications


def test_linear_solver_accepts_names_strategies_and_lineax_solvers():
    f, x0, th0, jac, _ = _shifted_quadratic(8)
    delta = jnp.array([1.0, 0.0])
    for spec, name in [
        ("qr", "qr"),
        ("lstsq", "lstsq"),
        ("minres", "minres"),
        (CG(rtol=1e-13), "cg"),
        (Auto(dense_max_size=4), "cg"),
        (lx.LU(), "LU()"),
    ]:
        te = TaylorExpansion(f, x0, th0, order=1, linear_solver=spec)
        assert te.linear_solver == name
        assert _rel(te.derivatives(delta)[0], jac[:, 0]) < 1e-9, name
    with pytest.raises(ValueError, match="Unknown linear_solver 'nope'"):
        TaylorExpansion(f, x0, th0, linear_solver="nope")
    g = lambda x, th: x - th  # noqa: E731
    with pytest.raises(ValueError, match="needs a symmetric positive-definite system"):
        TaylorExpansion.from_optimality(g, jnp.ones(2), jnp.ones(2), linear_solver="cholesky")


def test_check_object_and_keywords():
    f, x0, th0, _, _ = _shifted_quadratic(8)
    with pytest.raises(dargmin.NonStationaryPointError):
        TaylorExpansion(f, x0 + 1e-3, th0, check=Check(tol=1e-8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TaylorExpansion(f, x0 + 1e-3, th0, check=Check(tol=1e-1))
    with pytest.raises(ValueError, match="inside the Check"):
        TaylorExpansion(f, x0, th0, check=Check(), tol=1e-3)
    with pytest.raises(ValueError, match="check must be"):
        TaylorExpansion(f, x0, th0, check="loud")


def test_series_orders_share_one_factorization():
    f, x0, th0, jac, hess = _shifted_quadratic(8)
    te = TaylorExpansion(f, x0, th0, order=3)
    factors = te._factors
    d = jnp.array([0.2, 0.1])
    xs = te.derivatives(d)
    assert te._factors is factors
    assert _rel(xs[1], hess @ np.asarray(d) @ np.asarray(d)) < 1e-10
    assert _rel(te.predict(th0 + d, order=1), x0 + jac @ np.asarray(d)) < 1e-12
    assert math.isclose(
        float(jnp.linalg.norm(xs[0])), float(np.linalg.norm(jac @ d)), rel_tol=1e-10
    )
