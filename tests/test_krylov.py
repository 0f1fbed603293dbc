"""Tests for dargmin.krylov (ConjugateGradient, MINRES) against numpy / scipy and closed forms."""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
import scipy.sparse.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

from dargmin.krylov import MINRES, ConjugateGradient

RTOL = 1e-10
SOLVERS = {"cg": ConjugateGradient, "minres": MINRES}


def _symmetric_with_spectrum(eigenvalues: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((eigenvalues.size, eigenvalues.size)))
    return (q * eigenvalues) @ q.T


def _spd(n: int, cond: float = 100.0, seed: int = 0) -> np.ndarray:
    return _symmetric_with_spectrum(np.logspace(0.0, np.log10(cond), n), seed)


def _indefinite(n: int, seed: int = 0) -> np.ndarray:
    """Eigenvalues of both signs, |λ| in [1, 10]."""
    rng = np.random.default_rng(seed + 1000)
    magnitudes = np.linspace(1.0, 10.0, n)
    signs = np.where(rng.permutation(n) % 2 == 0, 1.0, -1.0)
    return _symmetric_with_spectrum(signs * magnitudes, seed)


def _solve_eager(matrix, vector, solver, tag=lx.symmetric_tag, throw=False):
    return lx.linear_solve(lx.MatrixLinearOperator(matrix, tag), vector, solver, throw=throw)


# The solver is a traced argument (its rtol/atol/max_steps leaves), so one compilation
# serves every solver of a type at a given shape: keeps the file fast.
_solve = jax.jit(_solve_eager, static_argnames=("tag", "throw"))


def _tag(name: str):
    return lx.positive_semidefinite_tag if name == "cg" else lx.symmetric_tag


def _default_steps(vector) -> int:
    # the default cap, passed explicitly so that capped solves reuse the same compilation
    return max(10 * vector.shape[-1], 100)


def _solve_cg(matrix, vector):
    solver = ConjugateGradient(rtol=RTOL, atol=0.0, max_steps=_default_steps(vector))
    return _solve(matrix, vector, solver, lx.positive_semidefinite_tag)


def _solve_minres(matrix, vector):
    return _solve(matrix, vector, MINRES(rtol=RTOL, atol=0.0, max_steps=_default_steps(vector)))


JITTED = {"cg": _solve_cg, "minres": _solve_minres}


def _check_against_numpy(sol, matrix: np.ndarray, b: np.ndarray, cond: float) -> None:
    assert sol.result == lx.RESULTS.successful
    assert float(sol.stats["residual_norm"]) <= RTOL * np.linalg.norm(b)
    expected = np.linalg.solve(matrix, b)
    # forward error ≤ cond · relative residual (plus rounding slack)
    err = np.linalg.norm(np.asarray(sol.value) - expected) / np.linalg.norm(expected)
    assert err <= 10 * cond * RTOL
    true_residual = np.linalg.norm(b - matrix @ np.asarray(sol.value))
    assert true_residual <= 10 * RTOL * np.linalg.norm(b)


# --------------------------------------------------------------------------------------
# accuracy
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 5, 50, 300])
@pytest.mark.parametrize("name", ["cg", "minres"])
def test_spd_solution_matches_numpy(name: str, n: int) -> None:
    matrix = _spd(n, cond=100.0, seed=n)
    b = np.random.default_rng(n).standard_normal(n)
    sol = JITTED[name](jnp.asarray(matrix), jnp.asarray(b))
    _check_against_numpy(sol, matrix, b, cond=100.0)
    assert 1 <= int(sol.stats["num_steps"]) <= max(10 * n, 100)


@pytest.mark.parametrize("n", [1, 5, 50, 300])
def test_minres_indefinite_solution_matches_numpy(n: int) -> None:
    matrix = _indefinite(n, seed=n)
    b = np.random.default_rng(n).standard_normal(n)
    sol = _solve_minres(jnp.asarray(matrix), jnp.asarray(b))
    _check_against_numpy(sol, matrix, b, cond=10.0)


def test_minres_iterates_agree_with_scipy() -> None:
    """Same Krylov iterate x_k as scipy.sparse.linalg.minres after k steps (k < n)."""
    n, k = 60, 12
    matrix = _indefinite(n, seed=3)
    b = np.random.default_rng(3).standard_normal(n)
    sol = _solve(jnp.asarray(matrix), jnp.asarray(b), MINRES(rtol=0.0, atol=0.0, max_steps=k))
    assert sol.result == lx.RESULTS.max_steps_reached
    assert int(sol.stats["num_steps"]) == k
    x_scipy, _ = scipy.sparse.linalg.minres(matrix, b, rtol=1e-30, maxiter=k)
    np.testing.assert_allclose(np.asarray(sol.value), x_scipy, rtol=1e-8, atol=1e-10)
    # the recursive residual norm is the true one (no drift after so few steps)
    true_residual = np.linalg.norm(b - matrix @ np.asarray(sol.value))
    np.testing.assert_allclose(float(sol.stats["residual_norm"]), true_residual, rtol=1e-8)
    # and the converged solutions agree too
    full = _solve_minres(jnp.asarray(matrix), jnp.asarray(b))
    x_full, info = scipy.sparse.linalg.minres(matrix, b, rtol=1e-12)
    assert info == 0
    np.testing.assert_allclose(np.asarray(full.value), x_full, rtol=1e-8, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(n=st.sampled_from([1, 3, 6]), seed=st.integers(0, 2**16), log_cond=st.floats(0.0, 3.0))
def test_hypothesis_random_spd(n: int, seed: int, log_cond: float) -> None:
    matrix = _spd(n, cond=10.0**log_cond, seed=seed)
    b = np.random.default_rng(seed + 1).standard_normal(n)
    for name in ("cg", "minres"):
        sol = JITTED[name](jnp.asarray(matrix), jnp.asarray(b))
        _check_against_numpy(sol, matrix, b, cond=10.0**log_cond)
        assert int(sol.stats["num_steps"]) <= n + 2  # finite termination (plus rounding)


def test_sparse_right_hand_side_stops_on_the_two_norm() -> None:
    """A one-hot b on a well-conditioned system converges in a handful of steps."""
    n = 300
    matrix = _spd(n, cond=4.0, seed=7)
    b = np.zeros(n)
    b[17] = 1.0
    for name in ("cg", "minres"):
        sol = JITTED[name](jnp.asarray(matrix), jnp.asarray(b))
        _check_against_numpy(sol, matrix, b, cond=4.0)
        assert int(sol.stats["num_steps"]) <= 40


# --------------------------------------------------------------------------------------
# curvature certificate, results
# --------------------------------------------------------------------------------------


def test_cg_min_curvature_certifies_indefiniteness() -> None:
    n = 40
    eigenvalues = np.concatenate([[-0.5], np.linspace(1.0, 10.0, n - 1)])
    matrix = _symmetric_with_spectrum(eigenvalues, seed=5)
    b = np.random.default_rng(5).standard_normal(n)  # has a component on every eigvector
    sol = _solve_cg(jnp.asarray(matrix), jnp.asarray(b))
    assert sol.result == lx.RESULTS.breakdown
    min_curvature = float(sol.stats["min_curvature"])
    assert min_curvature < 0.0
    assert min_curvature >= eigenvalues.min() - 1e-12  # a Rayleigh quotient is ≥ λ_min
    assert np.all(np.isfinite(np.asarray(sol.value)))
    with pytest.raises(Exception, match="breakdown"):
        _solve(
            jnp.asarray(matrix), jnp.asarray(b), ConjugateGradient(RTOL, 0.0), throw=True
        ).value.block_until_ready()


def test_cg_min_curvature_bounds_spectrum_of_spd() -> None:
    eigenvalues = np.linspace(0.5, 8.0, 30)
    matrix = _symmetric_with_spectrum(eigenvalues, seed=2)
    b = np.random.default_rng(2).standard_normal(30)
    sol = _solve_cg(jnp.asarray(matrix), jnp.asarray(b))
    assert sol.result == lx.RESULTS.successful
    assert 0.5 - 1e-12 <= float(sol.stats["min_curvature"]) <= 8.0 + 1e-12


@pytest.mark.parametrize("name", ["cg", "minres"])
def test_max_steps_reached(name: str) -> None:
    matrix = jnp.asarray(_spd(50, cond=1e8, seed=1))
    b = jnp.asarray(np.random.default_rng(1).standard_normal(50))
    solver = SOLVERS[name](rtol=RTOL, atol=0.0, max_steps=3)
    sol = _solve(matrix, b, solver, _tag(name))
    assert sol.result == lx.RESULTS.max_steps_reached
    assert int(sol.stats["num_steps"]) == 3
    assert float(sol.stats["residual_norm"]) > RTOL * float(jnp.linalg.norm(b))
    with pytest.raises(Exception, match="maximum number of solver steps"):
        _solve(matrix, b, solver, throw=True).value.block_until_ready()


@pytest.mark.parametrize("name", ["cg", "minres"])
def test_zero_right_hand_side(name: str) -> None:
    sol = _solve(jnp.asarray(_spd(4)), jnp.zeros(4), SOLVERS[name](rtol=RTOL, atol=0.0))
    assert sol.result == lx.RESULTS.successful
    assert int(sol.stats["num_steps"]) == 0
    np.testing.assert_array_equal(np.asarray(sol.value), 0.0)
    if name == "cg":
        assert float(sol.stats["min_curvature"]) == np.inf


@pytest.mark.parametrize("name", ["cg", "minres"])
def test_non_finite_is_not_successful(name: str) -> None:
    solver = SOLVERS[name](rtol=RTOL, atol=0.0)
    matrix = jnp.asarray(_spd(4))
    b = jnp.array([1.0, jnp.nan, 0.0, 2.0])
    assert _solve(matrix, b, solver).result == lx.RESULTS.nonfinite_input
    bad_matrix = matrix.at[0, 1].set(jnp.inf).at[1, 0].set(jnp.inf)
    assert _solve(bad_matrix, jnp.ones(4), solver).result != lx.RESULTS.successful


@pytest.mark.parametrize("name", ["cg", "minres"])
def test_operator_checks(name: str) -> None:
    solver = SOLVERS[name](rtol=RTOL, atol=0.0)
    with pytest.raises(ValueError, match="symmetric_tag"):
        _solve(jnp.eye(3), jnp.ones(3), solver, tag=())
    with pytest.raises(ValueError, match="square"):
        lx.linear_solve(lx.MatrixLinearOperator(jnp.ones((3, 2))), jnp.ones(3), solver)
    with pytest.raises(ValueError, match="no options"):
        lx.linear_solve(
            lx.MatrixLinearOperator(jnp.eye(3), lx.symmetric_tag),
            jnp.ones(3),
            solver,
            options={"y0": jnp.zeros(3)},
        )
    with pytest.raises(ValueError, match="non-negative"):
        SOLVERS[name](rtol=-1.0, atol=0.0)
    state = solver.init(lx.MatrixLinearOperator(jnp.eye(3), lx.symmetric_tag), {})
    assert solver.transpose(state, {})[0] is state
    assert solver.conj(state, {})[0] is state
    assert solver.assume_full_rank()


# --------------------------------------------------------------------------------------
# jit, vmap
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cg", "minres"])
def test_jit_matches_eager(name: str) -> None:
    matrix = jnp.asarray(_spd(8, seed=4))
    b = jnp.asarray(np.random.default_rng(4).standard_normal(8))
    solver = SOLVERS[name](rtol=RTOL, atol=0.0)
    eager = _solve_eager(matrix, b, solver)
    jitted = jax.jit(lambda m, v: _solve_eager(m, v, solver))(matrix, b)
    np.testing.assert_allclose(np.asarray(jitted.value), np.asarray(eager.value), rtol=1e-12)
    assert int(jitted.stats["num_steps"]) == int(eager.stats["num_steps"])


@pytest.mark.parametrize("name", ["cg", "minres"])
def test_vmap_over_right_hand_sides(name: str) -> None:
    n = 30
    eigenvalues = np.logspace(0.0, 3.0, n)
    matrix = _symmetric_with_spectrum(eigenvalues, seed=6)
    q = np.linalg.eigh(matrix)[1]
    rng = np.random.default_rng(6)
    # members converge at different steps: eigenvectors in 1 step, 2-term sums in 2, ...
    rhs = np.stack(
        [
            q[:, 0],
            q[:, 3] + q[:, 9],
            rng.standard_normal(n),
            np.zeros(n),
            q[:, :5].sum(1),
            rng.standard_normal(n),
            q[:, -1],
        ]
    )
    jitted = JITTED[name]
    batched = jax.vmap(jitted, in_axes=(None, 0))(jnp.asarray(matrix), jnp.asarray(rhs))
    for i in range(rhs.shape[0]):
        single = jitted(jnp.asarray(matrix), jnp.asarray(rhs[i]))
        # batched and single matvecs round differently: agree to well below the solve error
        np.testing.assert_allclose(
            np.asarray(batched.value[i]), np.asarray(single.value), rtol=0, atol=1e-9
        )
        # a residual that lands near the stopping threshold may take one or two more
        # steps on one side (rounding of GEMM vs GEMV differs between CPUs)
        assert abs(int(batched.stats["num_steps"][i]) - int(single.stats["num_steps"])) <= 2
        assert batched.result._value[i] == single.result._value
    steps = np.asarray(batched.stats["num_steps"])
    assert steps[0] == 1 and steps[3] == 0 and steps[1] == 2
    assert np.all(np.asarray(batched.result._value) == lx.RESULTS.successful._value)


def test_vmap_cg_results_are_per_member() -> None:
    """One member meets the negative eigenvalue (breakdown), the other never sees it."""
    eigenvalues = np.concatenate([[-1.0], np.linspace(1.0, 5.0, 9)])
    matrix = _symmetric_with_spectrum(eigenvalues, seed=8)
    q = np.linalg.eigh(matrix)[1]
    rhs = jnp.asarray(np.stack([q[:, 1] + q[:, 2], np.ones(10) / np.sqrt(10)]))
    batched = jax.vmap(_solve_cg, in_axes=(None, 0))(jnp.asarray(matrix), rhs)
    assert batched.result._value[0] == lx.RESULTS.successful._value
    assert batched.result._value[1] == lx.RESULTS.breakdown._value
    curvature = np.asarray(batched.stats["min_curvature"])
    assert curvature[0] > 0 > curvature[1]


# --------------------------------------------------------------------------------------
# differentiation
# --------------------------------------------------------------------------------------

N_AD = 6


def _ad_problem(name: str):
    base = _spd(N_AD, cond=10.0, seed=11) if name == "cg" else _indefinite(N_AD, seed=11)
    rng = np.random.default_rng(11)
    direction = rng.standard_normal((2, N_AD, N_AD))
    directions = direction + direction.transpose(0, 2, 1)  # symmetric perturbations E_i
    b = rng.standard_normal(N_AD)
    return jnp.asarray(base), jnp.asarray(0.05 * directions), jnp.asarray(b)


def _fd_points(x, h):
    """Rows x + h e_i then x - h e_i, for a vmapped central difference."""
    steps = h * jnp.eye(x.size, dtype=x.dtype)
    return jnp.concatenate([x + steps, x - steps])


def _central_fd(values, h):
    n = values.shape[0] // 2
    return ((values[:n] - values[n:]) / (2 * h)).T


# One jit per test computes every derivative: tracing lineax's AD machinery is what costs.


@pytest.mark.parametrize("name", ["cg", "minres"])
def test_derivatives_with_respect_to_vector(name: str) -> None:
    matrix, _, b = _ad_problem(name)
    solver = SOLVERS[name](rtol=1e-13, atol=0.0)
    op = lx.MatrixLinearOperator(matrix, _tag(name))
    c = jnp.arange(1.0, N_AD + 1)
    h = 1e-3

    def solve(v):
        return lx.linear_solve(op, v, solver).value

    @jax.jit
    def derivatives(v):
        return {
            "jacrev": jax.jacrev(solve)(v),
            "jacfwd": jax.jacfwd(solve)(v),
            "grad": jax.grad(lambda u: jnp.dot(c, solve(u)))(v),
            "fd": _central_fd(jax.vmap(solve)(_fd_points(v, h)), h),
        }

    out = derivatives(b)
    inverse = np.linalg.inv(np.asarray(matrix))  # closed form: ∂x/∂b = A⁻¹
    np.testing.assert_allclose(np.asarray(out["jacrev"]), inverse, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(np.asarray(out["jacfwd"]), inverse, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(np.asarray(out["grad"]), inverse @ np.asarray(c), rtol=1e-9)
    np.testing.assert_allclose(np.asarray(out["fd"]), inverse, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", ["cg", "minres"])
def test_derivatives_with_respect_to_matrix_parameter(name: str) -> None:
    matrix, directions, b = _ad_problem(name)
    solver = SOLVERS[name](rtol=1e-13, atol=0.0)
    c = jnp.arange(1.0, N_AD + 1)
    h = 1e-4

    def solve(theta):
        a = matrix + jnp.tensordot(theta, directions, axes=1)
        return lx.linear_solve(lx.MatrixLinearOperator(a, _tag(name)), b, solver).value

    @jax.jit
    def derivatives(theta):
        return {
            "jacrev": jax.jacrev(solve)(theta),
            "jacfwd": jax.jacfwd(solve)(theta),
            "grad": jax.grad(lambda t: jnp.dot(c, solve(t)))(theta),
            "jvp": jax.jvp(solve, (theta,), (jnp.array([1.0, 0.0]),))[1],
            "fd": _central_fd(jax.vmap(solve)(_fd_points(theta, h)), h),
        }

    theta = jnp.array([0.3, -0.2])
    out = derivatives(theta)
    a = np.asarray(matrix + jnp.tensordot(theta, directions, axes=1))
    x = np.linalg.solve(a, np.asarray(b))
    # closed form: ∂x/∂θ_i = -A⁻¹ E_i A⁻¹ b
    expected = np.stack([-np.linalg.solve(a, np.asarray(e) @ x) for e in directions], axis=-1)
    np.testing.assert_allclose(np.asarray(out["jacrev"]), expected, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(np.asarray(out["jacfwd"]), expected, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(np.asarray(out["grad"]), np.asarray(c) @ expected, rtol=1e-8)
    np.testing.assert_allclose(np.asarray(out["jvp"]), expected[:, 0], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(np.asarray(out["fd"]), expected, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------
# pytrees, float32
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cg", "minres"])
def test_pytree_vector_with_function_operator(name: str) -> None:
    matrix = jnp.asarray(_spd(7, cond=20.0, seed=9))
    example = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    structure = jax.eval_shape(lambda: example)

    def flat(tree):
        return jnp.concatenate([tree["a"], tree["b"].reshape(-1)])

    def unflat(v):
        return {"a": v[:3], "b": v[3:].reshape(2, 2)}

    op = lx.FunctionLinearOperator(lambda t: unflat(matrix @ flat(t)), structure, _tag(name))
    solver = SOLVERS[name](rtol=RTOL, atol=0.0)
    rhs = {"a": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array([[0.0, 3.0], [1.0, -1.0]])}

    @jax.jit
    def run(r):
        sol = lx.linear_solve(op, r, solver)
        # reverse mode through the pytree solve
        grad = jax.grad(lambda u: jnp.sum(lx.linear_solve(op, u, solver).value["a"]))(r)
        return sol.value, sol.result, grad

    value, result, grad = run(rhs)
    assert result == lx.RESULTS.successful
    assert set(value) == {"a", "b"} and value["b"].shape == (2, 2)
    expected = np.linalg.solve(np.asarray(matrix), np.asarray(flat(rhs)))
    np.testing.assert_allclose(np.asarray(flat(value)), expected, rtol=1e-8)
    weights = np.linalg.solve(np.asarray(matrix), np.array([1.0, 1, 1, 0, 0, 0, 0]))
    np.testing.assert_allclose(np.asarray(flat(grad)), weights, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", ["cg", "minres"])
def test_float32(name: str) -> None:
    """float32 at rtol 1e-5: relative error within cond · 1e-5 (cond = 10)."""
    matrix = _spd(20, cond=10.0, seed=12) if name == "cg" else _indefinite(20, seed=12)
    b = np.random.default_rng(12).standard_normal(20)
    solver = SOLVERS[name](rtol=1e-5, atol=0.0)
    sol = _solve(jnp.asarray(matrix, jnp.float32), jnp.asarray(b, jnp.float32), solver)
    assert sol.result == lx.RESULTS.successful
    assert sol.value.dtype == jnp.float32
    assert sol.stats["residual_norm"].dtype == jnp.float32
    expected = np.linalg.solve(matrix, b)
    err = np.linalg.norm(np.asarray(sol.value, np.float64) - expected) / np.linalg.norm(expected)
    assert err <= 10 * 1e-5
