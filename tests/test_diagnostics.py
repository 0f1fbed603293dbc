"""Diagnostics: the verdicts of check_optimum and the checks made before every derivative."""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dargmin

SCALES = jnp.array([1.0, 2.0, 4.0])


def quadratic(x, a):
    return 0.5 * jnp.sum(a * x**2)


def test_check_optimum_ok_at_a_minimum_with_exact_eigenvalues():
    report = dargmin.check_optimum(quadratic, jnp.zeros(3), SCALES)
    assert report.ok and report.verdict == "ok"
    assert report.smallest_eigenvalue == pytest.approx(1.0)
    assert report.largest_eigenvalue == pytest.approx(4.0)
    assert report.condition_number == pytest.approx(4.0)
    assert "well conditioned" in str(report)


def test_check_optimum_not_stationary_reports_newton_step():
    x = jnp.array([1.0, 0.0, 0.0])
    report = dargmin.check_optimum(quadratic, x, SCALES)
    assert report.verdict == "not_stationary"
    assert report.residual_norm == pytest.approx(1.0)
    assert report.newton_step == pytest.approx(1.0)  # exact distance to the minimum
    assert "1" in report.message and "stationary" in report.message


def test_check_optimum_singular_and_not_minimum():
    flat = dargmin.check_optimum(quadratic, jnp.zeros(3), jnp.array([1.0, 0.0, 2.0]))
    assert flat.verdict == "singular"
    assert flat.condition_number == np.inf
    saddle = dargmin.check_optimum(quadratic, jnp.zeros(3), jnp.array([1.0, -1.0, 2.0]))
    assert saddle.verdict == "not_minimum"
    assert saddle.smallest_eigenvalue == pytest.approx(-1.0)


def test_check_optimum_ill_conditioned():
    report = dargmin.check_optimum(quadratic, jnp.zeros(2), jnp.array([1.0, 1e10]))
    assert report.verdict == "ill_conditioned"
    assert report.condition_number == pytest.approx(1e10)


def test_check_optimum_root_kind_uses_singular_values():
    m = jnp.array([[2.0, 1.0], [0.0, 3.0]])
    report = dargmin.check_optimum(lambda x, b: m @ x - b, jnp.zeros(2), jnp.zeros(2))
    assert report.kind == "root" and report.ok
    s = np.linalg.svd(np.asarray(m), compute_uv=False)
    assert report.smallest_eigenvalue == pytest.approx(s[-1])
    assert report.largest_eigenvalue == pytest.approx(s[0])


def test_check_optimum_matrix_free_path_matches_dense():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(30, 30))
    q = jnp.asarray(r @ r.T / 30 + np.eye(30))

    def f(x, c):
        return 0.5 * x @ q @ x - c @ x

    c = jnp.asarray(rng.normal(size=30))
    x = jnp.linalg.solve(q, c)
    dense = dargmin.check_optimum(f, x, c)
    free = dargmin.check_optimum(f, x, c, dense_max_size=5, lanczos_iterations=30)
    eig = np.linalg.eigvalsh(np.asarray(q))
    assert dense.smallest_eigenvalue == pytest.approx(eig[0], rel=1e-8)
    assert free.smallest_eigenvalue == pytest.approx(eig[0], rel=1e-6)
    assert free.largest_eigenvalue == pytest.approx(eig[-1], rel=1e-6)
    assert free.verdict == dense.verdict == "ok"
    off = dargmin.check_optimum(f, x + 0.1, c, dense_max_size=5, lanczos_iterations=30)
    assert off.verdict == "not_stationary"
    # Matrix-free, the Newton step is the decorators' own measurement: a CG solve to
    # rtol=0.1 (one digit is all the comparison with tol needs), so 10 % is its accuracy.
    np.testing.assert_allclose(off.newton_step, 0.1 * np.sqrt(30), rtol=0.1)
    exact = dargmin.check_optimum(f, x + 0.1, c)
    np.testing.assert_allclose(exact.newton_step, 0.1 * np.sqrt(30), rtol=1e-8)


# -------------------------------------------------------- checks in the decorators


def _decorated(offset: float, **options):
    @dargmin.argmin(quadratic, **options)
    def solve(init, a):
        return jnp.zeros(3) + offset  # the minimum is 0: offset > 0 is "not converged"

    return solve


def test_nonconverged_solution_raises_with_numbers_eager_and_under_jit():
    solve = _decorated(0.1)
    with pytest.raises(dargmin.NonStationaryPointError, match=r"Newton step .* = 0\.173"):
        jax.jacrev(solve, 1)(None, SCALES)
    # Under jit the error comes out of compiled code: same message.
    with pytest.raises(Exception, match=r"not a stationary point.*0\.173"):
        jax.jit(jax.jacfwd(solve, 1))(None, SCALES)
    # Forward and reverse mode, and vmap, all check.
    with pytest.raises(dargmin.NonStationaryPointError):
        jax.vmap(lambda a: jax.jacfwd(solve, 1)(None, a))(jnp.stack([SCALES, SCALES]))


def test_primal_call_is_not_checked_and_tolerance_is_respected():
    solve = _decorated(1e-6)
    np.testing.assert_allclose(solve(None, SCALES), 1e-6)  # no derivative: no check
    jac = jax.jacrev(solve, 1)(None, SCALES)  # Newton step 1.7e-6 < 1e-4: accepted
    # The IFT at x: -(diag a)⁻¹ diag(x) = -x/a, an error of order the Newton step.
    np.testing.assert_allclose(jac, -np.diag(1e-6 / np.asarray(SCALES)), rtol=1e-12)
    with pytest.raises(dargmin.NonStationaryPointError, match="tolerance 1e-07"):
        jax.jacrev(_decorated(1e-6, tol=1e-7), 1)(None, SCALES)


def test_warn_and_ignore_modes():
    with pytest.warns(dargmin.DargminWarning, match="not a stationary point"):
        jax.jacrev(_decorated(0.1, check="warn"), 1)(None, SCALES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jac = jax.jacrev(_decorated(0.1, check="ignore"), 1)(None, SCALES)
    # With the check off, the IFT formula is applied at the wrong point: -x/a.
    np.testing.assert_allclose(jac, -np.diag(0.1 / np.asarray(SCALES)), rtol=1e-12)


def test_singular_hessian_is_refused_not_returned_as_huge_numbers():
    @dargmin.argmin(lambda x, t: 0.5 * (x[0] - t) ** 2 + 0.0 * x[1] ** 2)
    def solve(init, t):
        return jnp.array([t, 0.0])

    with pytest.raises(dargmin.SingularSystemError, match="singular"):
        jax.jacfwd(solve, 1)(None, 1.0)
    # Least squares gives the minimum-norm derivative instead.
    lstsq = dargmin.argmin(
        lambda x, t: 0.5 * (x[0] - t) ** 2 + 0.0 * x[1] ** 2, linear_solver="lstsq", check="ignore"
    )(lambda init, t: jnp.array([t, 0.0]))
    np.testing.assert_allclose(jax.jacfwd(lstsq, 1)(None, 1.0), [1.0, 0.0], atol=1e-12)


def test_nearly_singular_hessian_names_the_condition_number():
    @dargmin.argmin(lambda x, t: 0.5 * (x[0] - t) ** 2 + 0.5e-15 * x[1] ** 2)
    def solve(init, t):
        return jnp.array([t, 0.0])

    with pytest.raises(dargmin.SingularSystemError, match="condition number is at least"):
        jax.jacfwd(solve, 1)(None, 1.0)


def test_saddle_point_is_not_a_minimum():
    def f(x, t):
        return 0.5 * (x[0] - t) ** 2 - 0.5 * x[1] ** 2

    @dargmin.argmin(f, linear_solver="lu")
    def solve(init, t):
        return jnp.array([t, 0.0])

    with pytest.raises(dargmin.SingularSystemError, match="not positive definite"):
        jax.jacfwd(solve, 1)(None, 1.0)
    # As a root (any stationary point), the saddle is fine: dx/dt = (1, 0).
    as_root = dargmin.root(dargmin.gradient_optimality(f))(lambda init, t: jnp.array([t, 0.0]))
    np.testing.assert_allclose(jax.jacfwd(as_root, 1)(None, 1.0), [1.0, 0.0])


def test_nan_solution_is_reported():
    @dargmin.argmin(quadratic)
    def solve(init, a):
        return jnp.full(3, jnp.nan)

    with pytest.raises(dargmin.NonStationaryPointError, match="not finite"):
        jax.jacrev(solve, 1)(None, SCALES)


# ------------------------------------------------------------------ bad input


def test_shape_mismatch_and_bad_options_are_clear_errors():
    @dargmin.root(lambda x, b: jnp.concatenate([x, b]))
    def solve(init, b):
        return jnp.zeros(2)

    with pytest.raises(ValueError, match="structure and shapes of x"):
        solve(None, jnp.ones(2))
    with pytest.raises(ValueError, match="Unknown linear_solver 'conjugate'"):
        jax.jacfwd(dargmin.argmin(quadratic, linear_solver="conjugate")(lambda i, a: 0 * a), 1)(
            None, SCALES
        )
    with pytest.raises(ValueError, match="needs a symmetric"):
        jax.jacfwd(dargmin.root(lambda x, b: x - b, linear_solver="cg")(lambda i, b: b), 1)(
            None, SCALES
        )
    with pytest.raises(ValueError, match="check must be"):
        dargmin.argmin(quadratic, check="loud")
    with pytest.raises(TypeError, match="floating-point"):
        dargmin.root(lambda x, b: x - b)(lambda i, b: jnp.arange(3))(None, jnp.arange(3))


def test_krylov_solve_that_does_not_converge_is_reported_not_silent():
    # JAXopt returns a zero/garbage vector silently here (jaxopt#466); dargmin must not.
    import lineax as lx

    rng = np.random.default_rng(1)
    r = rng.normal(size=(40, 40))
    q = jnp.asarray(r @ r.T + 1e-3 * np.eye(40))  # ill-conditioned SPD

    def f(x, c):
        return 0.5 * x @ q @ x - c @ x

    starved = lx.CG(rtol=1e-12, atol=0.0, max_steps=2)

    @dargmin.argmin(f, linear_solver=starved)
    def solve(init, c):
        return jnp.linalg.solve(q, c)

    c = jnp.asarray(rng.normal(size=40))
    with pytest.raises(dargmin.SingularSystemError, match="did not converge"):
        jax.jacrev(solve, 1)(None, c)
    # With the check off, the linear-system layer still refuses to return the unconverged
    # vector, with dargmin's reason code and the numbers (not lineax's bare text).
    unchecked = dargmin.argmin(f, linear_solver=starved, check="ignore")(solve.__wrapped__)
    with pytest.raises(Exception, match=r"did not converge.*after 2 steps") as info:
        jax.jacrev(unchecked, 1)(None, c)
    assert dargmin.diagnostics.failure_reason(info.value) == "ill_conditioned"


def test_nonconverged_solution_is_caught_by_the_matrix_free_check_too():
    with pytest.raises(dargmin.NonStationaryPointError, match="not a stationary point"):
        jax.jacrev(_decorated(0.1, linear_solver="cg"), 1)(None, SCALES)


def test_float32_default_tolerance_refuses_a_derivative_percent_off():
    # Issue 9.11: with the old float32 default (1e-2) a ridge solved by 300 gradient steps
    # passed the check with dw/dλ 1.7 % wrong; the converged solve must still pass.
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.normal(size=(200, 20)))
    v, _ = np.linalg.qr(rng.normal(size=(20, 20)))
    x_np = u @ np.diag(np.logspace(0, -1.5, 20)) @ v.T * np.sqrt(200)
    y_np = x_np @ rng.normal(size=20) + rng.normal(size=200)
    design, target = jnp.asarray(x_np, jnp.float32), jnp.asarray(y_np, jnp.float32)

    def objective(w, lam):
        return 0.5 * jnp.mean((design @ w - target) ** 2) + 0.5 * lam * jnp.sum(w**2)

    def gradient_descent(steps):
        @dargmin.argmin(objective)
        def solve(init, lam):
            lipschitz = jnp.linalg.norm(design, 2) ** 2 / design.shape[0] + lam
            step = lambda i, w: w - jax.grad(objective)(w, lam) / lipschitz  # noqa: E731
            return jax.lax.fori_loop(0, steps, step, init)

        return solve

    hessian = x_np.T @ x_np / 200 + 0.01 * np.eye(20)
    truth = -np.linalg.solve(hessian, np.linalg.solve(hessian, x_np.T @ y_np / 200))
    init, lam = jnp.zeros(20, jnp.float32), jnp.float32(0.01)
    with pytest.raises(dargmin.NonStationaryPointError) as info:
        jax.jacfwd(gradient_descent(300), 1)(init, lam)
    assert dargmin.failure_reason(info.value) == "not_stationary"
    converged = jax.jacfwd(gradient_descent(3000), 1)(init, lam)
    # float32: the derivative of a converged float32 solve is good to ~1e-5 here.
    np.testing.assert_allclose(converged, truth, rtol=1e-4, atol=1e-4 * np.abs(truth).max())


def test_matrix_free_check_measures_a_small_newton_step_to_one_digit():
    # The check's loose CG once kept an absolute floor of 1e-3·0.1 = 1e-4 and stopped after
    # one step: a solution 1e-2 from the root (limit 1e-4·‖x‖) passed under CG.
    rng = np.random.default_rng(3)
    r = rng.normal(size=(100, 100))
    a = jnp.asarray(r @ r.T / 100 + np.eye(100))
    c = jnp.asarray(rng.normal(size=100))
    x_star = jnp.linalg.solve(a, c)
    offset = jnp.asarray(rng.normal(size=100))
    offset = 1e-2 * offset / jnp.linalg.norm(offset)

    def f(x, c):
        return 0.5 * x @ a @ x - c @ x

    @dargmin.argmin(f, linear_solver="cg")
    def solve(init, c):
        return x_star + offset

    with pytest.raises(dargmin.NonStationaryPointError) as info:
        jax.jacfwd(solve, 1)(None, c)
    assert dargmin.failure_reason(info.value) == "not_stationary"
    step = float(re.search(r"g‖ = ([0-9.e+-]+), above", str(info.value)).group(1))
    np.testing.assert_allclose(step, 1e-2, rtol=0.1)  # the exact Newton step is the offset
