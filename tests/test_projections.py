"""dargmin.projections: values against closed forms and a NumPy sorting reference,
projection properties (feasibility, idempotence, the variational inequality), Jacobians
against finite differences away from kinks (hypothesis draws the points), the conventions
at kinks, and projected-gradient fixed points differentiated by ``dargmin.fixed_point``
against the KKT closed form and finite differences of re-solves."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import dargmin
from dargmin import projections as P
from dargmin.finite_differences import jacobian_fd

N = 5
SETTINGS = settings(max_examples=8, deadline=None, derandomize=True)
points = arrays(np.float64, N, elements=st.floats(-3.0, 3.0, allow_subnormal=False))


def simplex_reference(x: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """The textbook sort-based projection onto the simplex, in NumPy."""
    u = np.sort(x)[::-1]
    css = np.cumsum(u)
    j = np.arange(1, x.size + 1)
    rho = j[u - (css - scale) / j > 0][-1]
    tau = (css[rho - 1] - scale) / rho
    return np.maximum(x - tau, 0.0)


@dataclass(frozen=True)
class Case:
    """A projection with fixed parameters, its feasibility test and distance to a kink."""

    name: str
    fn: Callable[[jax.Array], jax.Array]
    feasible: Callable[[np.ndarray], bool]
    kink_distance: Callable[[np.ndarray], float]


LO, HI = -0.5 * np.ones(N), np.array([1.0, 0.5, 2.0, 0.2, 1.5])
R = 1.3


def _simplex_kink(x: np.ndarray, scale: float = 1.0) -> float:
    p = simplex_reference(x, scale)
    tau = float(np.max(x - p))  # x_i - p_i = τ on the support
    return float(np.min(np.abs(x - tau)))


CASES = [
    Case(
        "simplex",
        lambda x: P.projection_simplex(x, 1.0),
        lambda p: bool(np.all(p >= 0) and abs(p.sum() - 1) < 1e-10),
        _simplex_kink,
    ),
    Case(
        "l1_ball",
        lambda x: P.projection_l1_ball(x, R),
        lambda p: bool(np.abs(p).sum() <= R + 1e-10),
        lambda x: min(abs(np.abs(x).sum() - R), _simplex_kink(np.abs(x), R), np.min(np.abs(x))),
    ),
    Case(
        "box",
        lambda x: P.projection_box(x, LO, HI),
        lambda p: bool(np.all(p >= LO - 1e-12) and np.all(p <= HI + 1e-12)),
        lambda x: float(np.min(np.minimum(np.abs(x - LO), np.abs(x - HI)))),
    ),
    Case(
        "l2_ball",
        lambda x: P.projection_l2_ball(x, R),
        lambda p: bool(np.linalg.norm(p) <= R + 1e-10),
        lambda x: abs(float(np.linalg.norm(x)) - R),
    ),
    Case(
        "non_negative",
        P.projection_non_negative,
        lambda p: bool(np.all(p >= 0)),
        lambda x: float(np.min(np.abs(x))),
    ),
]
JITTED = {case.name: jax.jit(case.fn) for case in CASES}
JACOBIANS = {case.name: jax.jit(jax.jacfwd(case.fn)) for case in CASES}
JACOBIANS_REV = {case.name: jax.jit(jax.jacrev(case.fn)) for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@SETTINGS
@given(x=points, y=points)
def test_projection_properties(case: Case, x: np.ndarray, y: np.ndarray) -> None:
    proj = JITTED[case.name]
    p = np.asarray(proj(x))
    assert case.feasible(p)
    np.testing.assert_allclose(proj(p), p, atol=1e-12)  # idempotent
    # The variational inequality that characterizes the projection onto a convex set:
    # <x - p, q - p> ≤ 0 for every feasible q (here the projection of another point).
    q = np.asarray(proj(y))
    assert np.dot(x - p, q - p) <= 1e-10 * (1 + np.linalg.norm(x) * np.linalg.norm(q))
    # Non-expansive.
    assert np.linalg.norm(p - q) <= np.linalg.norm(x - y) + 1e-10


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@SETTINGS
@given(x=points)
def test_projection_jacobian_matches_finite_differences_away_from_kinks(
    case: Case, x: np.ndarray
) -> None:
    assume(case.kink_distance(x) > 1e-3)
    jac = JACOBIANS[case.name](x)
    np.testing.assert_allclose(jac, jacobian_fd(JITTED[case.name], jnp.asarray(x)), atol=1e-7)
    np.testing.assert_allclose(JACOBIANS_REV[case.name](x), jac, atol=1e-14)


@SETTINGS
@given(x=points, scale=st.floats(0.1, 4.0))
def test_sparsemax_matches_numpy_sorting_reference_and_closed_form_jacobian(
    x: np.ndarray, scale: float
) -> None:
    p = np.asarray(P.projection_simplex(x, scale))
    np.testing.assert_allclose(p, simplex_reference(x, scale), atol=1e-12)
    s = (p > 0).astype(float)
    expected = np.diag(s) - np.outer(s, s) / s.sum()
    np.testing.assert_allclose(JACOBIANS["simplex"](x) if scale == 1.0 else _jac_simplex(x, scale),
                               expected, atol=1e-12)  # fmt: skip
    # d/dscale = s / |S|
    np.testing.assert_allclose(_dscale(x, scale), s / s.sum(), atol=1e-12)


_jac_simplex = jax.jit(jax.jacfwd(P.projection_simplex))
_dscale = jax.jit(jax.jacfwd(P.projection_simplex, argnums=1))


def test_sparsemax_along_an_axis_and_against_jaxopt() -> None:
    logits = jax.random.normal(jax.random.key(0), (2, 4, 3))
    out = jax.jit(P.sparsemax, static_argnums=1)(logits, 1)
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(out[i, :, j], simplex_reference(np.asarray(logits[i, :, j])))
    jaxopt = pytest.importorskip("jaxopt")
    x = logits[0, :, 0]
    np.testing.assert_allclose(
        JACOBIANS_REV["simplex"](jnp.pad(x, (0, 1), constant_values=-9.0))[:4, :4],
        jax.jit(jax.jacrev(jaxopt.projection.projection_simplex))(x),
        atol=1e-12,
    )


@jax.jit
def _at_kinks() -> dict[str, jax.Array]:
    # Everything evaluated in one compiled function (eager mode compiles every operation).
    x = jnp.array([0.0, 0.3, 1.0])
    naive_l2 = lambda v: jnp.where(jnp.linalg.norm(v) > 1, v / jnp.linalg.norm(v), v)  # noqa: E731
    return {
        "box_x": jax.jacfwd(P.projection_box)(x, 0.0, 1.0).diagonal(),
        "clip_x": jax.jacfwd(jnp.clip)(x, 0.0, 1.0).diagonal(),
        "box_bounds": jax.grad(lambda lo, hi: P.projection_box(x, lo, hi).sum(), (0, 1))(0.0, 1.0),
        "orthant": jax.grad(lambda v: P.projection_non_negative(v).sum())(0.0),
        "prox_l1": jax.grad(lambda v: P.prox_l1(v, 1.0).sum())(1.0),
        "simplex": jax.jacfwd(P.projection_simplex)(jnp.array([1.0, 0.5, 0.25])),
        "l2_zero": jax.jacrev(P.projection_l2_ball)(jnp.zeros(3)),
        "naive_l2_zero": jax.jacrev(naive_l2)(jnp.zeros(3)),
        "l2_sphere": jax.jacfwd(P.projection_l2_ball)(jnp.array([0.6, 0.8])),
        "group_zero": jax.jacrev(P.prox_group_l1)(jnp.zeros((2, 3)), 0.5),
    }


def test_conventions_at_kinks() -> None:
    r = _at_kinks()
    # Box: on a bound, clamped: derivative 0 in x, 1 in the bound (jnp.clip: 0.5 and 0.5).
    np.testing.assert_array_equal(r["box_x"], [0.0, 1.0, 0.0])
    np.testing.assert_array_equal(r["clip_x"], [0.5, 1.0, 0.5])
    assert [float(v) for v in r["box_bounds"]] == [1.0, 1.0]
    # Orthant and soft thresholding at the threshold: derivative 0.
    assert float(r["orthant"]) == 0.0 and float(r["prox_l1"]) == 0.0
    # Simplex: z_i = τ (here z = (1, 0.5, 0.25), τ = 0.25) leaves i out of the support.
    expected = [[0.5, -0.5, 0.0], [-0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]
    np.testing.assert_array_equal(r["simplex"], expected)
    # ℓ2 ball: NaN-free inside, at 0, where the norm's own derivative is 0/0 and leaks
    # through jnp.where in reverse mode ...
    np.testing.assert_array_equal(r["l2_zero"], np.eye(3))
    assert np.isnan(r["naive_l2_zero"]).any()
    # ... and on the sphere the radial projection's derivative (active).
    u = np.array([0.6, 0.8])
    np.testing.assert_allclose(r["l2_sphere"], np.eye(2) - np.outer(u, u), atol=1e-15)
    # Group prox: a group at zero has derivative 0, no NaN.
    np.testing.assert_array_equal(r["group_zero"], np.zeros((2, 3, 2, 3)))


def _l2_cubed(v: jax.Array) -> jax.Array:
    return jnp.sum(P.projection_l2_ball(v, R) ** 3)


def test_l2_ball_second_derivative_and_radius() -> None:
    x = jnp.array([1.5, -0.7, 2.0])
    hess = jax.jit(jax.hessian(_l2_cubed))(x)
    np.testing.assert_allclose(hess, jacobian_fd(jax.jit(jax.grad(_l2_cubed)), x), rtol=1e-6)
    d_r = jax.jit(jax.jacfwd(P.projection_l2_ball, argnums=1))(x, R)
    np.testing.assert_allclose(d_r, x / jnp.linalg.norm(x), atol=1e-15)  # closed form: u


def test_affine_projection_closed_form_and_derivatives() -> None:
    key_a, key_x, key_b = jax.random.split(jax.random.key(1), 3)
    A = jax.random.normal(key_a, (2, 5))
    x = jax.random.normal(key_x, (5,))
    b = jax.random.normal(key_b, (2,))

    @jax.jit
    def evaluate(x, A, b):
        p = P.projection_affine_set(x, A, b)
        return {
            "p": p,
            "again": P.projection_affine_set(p, A, b),
            "jac_x": jax.jacfwd(P.projection_affine_set)(x, A, b),
            "jac_A": jax.jacrev(P.projection_affine_set, argnums=1)(x, A, b),
            "batch": jax.vmap(P.projection_affine_set, (0, None, None))(
                jnp.stack([x, 2 * x]), A, b
            ),
        }

    r = evaluate(x, A, b)
    A_np, x_np = np.asarray(A), np.asarray(x)
    pinv = np.linalg.pinv(A_np)
    np.testing.assert_allclose(r["p"], x_np - pinv @ (A_np @ x_np - np.asarray(b)), atol=1e-12)
    np.testing.assert_allclose(A @ r["p"], b, atol=1e-12)
    np.testing.assert_allclose(r["again"], r["p"], atol=1e-12)  # idempotent
    # The Jacobian in x is the orthogonal projector onto the null space of A.
    np.testing.assert_allclose(r["jac_x"], np.eye(5) - pinv @ A_np, atol=1e-12)
    fd_a = jacobian_fd(jax.jit(lambda a: P.projection_affine_set(x, a, b)), A)
    np.testing.assert_allclose(r["jac_A"], fd_a, atol=1e-7)
    np.testing.assert_allclose(
        r["batch"][1], 2 * x_np - pinv @ (2 * A_np @ x_np - np.asarray(b)), atol=1e-12
    )
    # A rank-deficient A (a repeated, consistent constraint): lstsq gives the same
    # projection, and warns with the rank it used.
    A_def = jnp.concatenate([A, A[:1]])
    b_def = jnp.concatenate([b, b[:1]])
    with pytest.warns(dargmin.DargminWarning, match="rank 2"):
        p_def = P.projection_affine_set(x, A_def, b_def, linear_solver="lstsq")
    np.testing.assert_allclose(p_def, r["p"], atol=1e-10)


@SETTINGS
@given(x=points, lam=st.floats(0.05, 2.0), mu=st.floats(0.0, 3.0))
def test_prox_l1_and_elastic_net_optimality_and_jacobian(
    x: np.ndarray, lam: float, mu: float
) -> None:
    p = np.asarray(P.prox_elastic_net(x, lam, mu))
    # Optimality of min ½‖p - x‖² + λ‖p‖₁ + (μ/2)‖p‖²: x - (1 + μ) p ∈ λ ∂‖p‖₁.
    r = x - (1 + mu) * p
    nz = p != 0
    np.testing.assert_allclose(r[nz], lam * np.sign(p[nz]), atol=1e-12)
    assert np.all(np.abs(r[~nz]) <= lam + 1e-12)
    np.testing.assert_allclose(P.prox_l1(x, lam), np.sign(x) * np.maximum(np.abs(x) - lam, 0))
    assume(np.min(np.abs(np.abs(x) - lam)) > 1e-3)
    jac = _jac_enet(x, lam, mu)
    fd = jacobian_fd(lambda v: _enet(*v), (jnp.asarray(x), jnp.asarray(lam), jnp.asarray(mu)))
    for got, want in zip(jac, fd, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-7)


_enet = jax.jit(P.prox_elastic_net)
_jac_enet = jax.jit(jax.jacfwd(P.prox_elastic_net, argnums=(0, 1, 2)))
_group = jax.jit(lambda x, lam: P.prox_group_l1(x, lam))
_jac_group = jax.jit(jax.jacfwd(lambda x, lam: P.prox_group_l1(x, lam), argnums=(0, 1)))


@SETTINGS
@given(x=arrays(np.float64, (3, 2), elements=st.floats(-2.0, 2.0)), lam=st.floats(0.1, 1.5))
def test_group_prox_optimality_and_jacobian(x: np.ndarray, lam: float) -> None:
    p = np.asarray(_group(x, lam))
    norms = np.linalg.norm(x, axis=-1)
    # Closed form per group, and its optimality: x_g - p_g = λ p_g/‖p_g‖ or ‖x_g‖ ≤ λ.
    expected = np.maximum(1 - lam / np.where(norms > 0, norms, 1), 0)[:, None] * x
    np.testing.assert_allclose(p, expected, atol=1e-12)
    assume(np.min(np.abs(norms - lam)) > 1e-3)
    jac = _jac_group(x, lam)
    fd = jacobian_fd(lambda v: _group(*v), (jnp.asarray(x), jnp.asarray(lam)))
    for got, want in zip(jac, fd, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-7)


def test_group_prox_with_group_ids_matches_the_last_axis_form() -> None:
    x = jnp.array([3.0, 0.1, 4.0, -0.2, 1.0])
    ids = jnp.array([0, 1, 0, 1, 2])
    lam = jnp.array([2.5, 0.5, 0.3])
    np.testing.assert_allclose(
        P.prox_group_l1(x, lam, groups=ids), [1.5, 0.0, 2.0, 0.0, 0.7], atol=1e-12
    )

    @jax.jit
    def jacobians(x, ids):
        with_ids = jax.jacfwd(lambda v: P.prox_group_l1(v, lam, groups=ids, num_groups=3))(x)
        last_axis = jax.jacfwd(lambda v: P.prox_group_l1(v, 2.5))(x[jnp.array([0, 2])])
        return with_ids, last_axis

    jac, block = jacobians(x, ids)
    # Group 0 = coordinates (0, 2): its 2×2 block equals the last-axis form's Jacobian.
    np.testing.assert_allclose(jac[np.ix_([0, 2], [0, 2])], block, atol=1e-14)
    np.testing.assert_allclose(jac[4, 4], 1.0, atol=1e-14)
    with pytest.raises(ValueError, match="num_groups"):
        jax.jit(lambda g: P.prox_group_l1(x, 1.0, groups=g))(ids)


# --------------------------------------------------------------------------------------
# Projected-gradient fixed points through dargmin.fixed_point
# --------------------------------------------------------------------------------------

Q = jnp.array(
    [
        [4.0, 1.0, 0.5, 0.0, 0.2],
        [1.0, 3.0, 0.3, 0.4, 0.0],
        [0.5, 0.3, 2.5, 0.6, 0.1],
        [0.0, 0.4, 0.6, 3.5, 0.7],
        [0.2, 0.0, 0.1, 0.7, 3.0],
    ]
)
STEP = 0.2  # < 2 / λ_max(Q): the projected-gradient map is a contraction


def quadratic_grad(x, theta):
    return Q @ x - theta  # f(x, θ) = ½ xᵀQx − θᵀx


def test_box_constrained_quadratic_jacobian_equals_active_set_closed_form() -> None:
    # Build θ so that the solution and its strictly active set are known: coordinates 1
    # and 3 sit on their bounds with non-zero multipliers, the others are free.
    lo, hi = jnp.full(N, -1.0), jnp.full(N, 1.0)
    x_star = jnp.array([0.3, 1.0, -0.2, -1.0, 0.5])
    multipliers = jnp.array([0.0, -0.8, 0.0, 0.6, 0.0])  # ∇f = -0.8 at the upper bound
    theta = Q @ x_star - multipliers

    def T(x, theta, lo, hi):
        return P.projection_box(x - STEP * quadratic_grad(x, theta), lo, hi)

    @dargmin.fixed_point(T)
    def solve(init, theta, lo, hi):
        return jax.lax.fori_loop(0, 400, lambda i, x: T(x, theta, lo, hi), init)

    x0 = jnp.zeros(N)
    np.testing.assert_allclose(solve(x0, theta, lo, hi), x_star, atol=1e-12)
    free = np.array([0, 2, 4])
    expected = np.zeros((N, N))
    expected[np.ix_(free, free)] = np.linalg.inv(np.asarray(Q)[np.ix_(free, free)])
    jac_theta, jac_hi = jax.jit(jax.jacfwd(solve, argnums=(1, 3)))(x0, theta, lo, hi)
    np.testing.assert_allclose(jac_theta, expected, atol=1e-12)
    # In the bounds: an active coordinate follows its bound, the free ones respond
    # through Q: dx_F/dhi_A = -Q_FF⁻¹ Q_FA on the active column.
    expected_hi = np.zeros((N, N))
    expected_hi[1, 1] = 1.0
    expected_hi[free, 1] = -expected[np.ix_(free, free)] @ np.asarray(Q)[free, 1]
    np.testing.assert_allclose(jac_hi, expected_hi, atol=1e-12)
    # And finite differences of re-solves agree (the active set is locally constant).
    fd = jacobian_fd(jax.jit(lambda t: solve(x0, t, lo, hi)), theta)
    np.testing.assert_allclose(jac_theta, fd, atol=1e-7)


def test_simplex_constrained_quadratic_matches_the_kkt_system() -> None:
    # min ½ xᵀQx − θᵀx on the simplex. On the support S, the KKT conditions are
    #   Q_SS x_S + ν 1 = θ_S,  1ᵀ x_S = 1,
    # a bordered linear system whose inverse gives dx_S/dθ_S directly (the KKT route).
    theta = jnp.array([2.0, 1.8, -1.0, 1.0, -2.0])

    def T(x, theta):
        return P.projection_simplex(x - STEP * quadratic_grad(x, theta))

    @dargmin.fixed_point(T)
    def solve(init, theta):
        return jax.lax.fori_loop(0, 600, lambda i, x: T(x, theta), init)

    x0 = jnp.full(N, 1.0 / N)
    x = np.asarray(solve(x0, theta))
    support = np.flatnonzero(x > 1e-9)
    grad = np.asarray(Q) @ x - np.asarray(theta)
    nu = -grad[support].mean()
    off = np.setdiff1d(np.arange(N), support)
    assert support.size >= 2 and np.all(grad[off] + nu > 1e-3)  # strict complementarity
    k = support.size
    kkt = np.zeros((k + 1, k + 1))
    kkt[:k, :k] = np.asarray(Q)[np.ix_(support, support)]
    kkt[:k, k] = kkt[k, :k] = 1.0
    expected = np.zeros((N, N))
    expected[np.ix_(support, support)] = np.linalg.inv(kkt)[:k, :k]
    np.testing.assert_allclose(jax.jacfwd(solve, argnums=1)(x0, theta), expected, atol=1e-10)
    np.testing.assert_allclose(jax.jacrev(solve, argnums=1)(x0, theta), expected, atol=1e-10)


def test_proximal_gradient_lasso_fixed_point_matches_support_closed_form() -> None:
    # Lasso min ½‖Aw − y‖² + λ‖w‖₁ by ISTA; on the support S with signs s,
    # w_S = (A_Sᵀ A_S)⁻¹ (A_Sᵀ y − λ s), so dw_S/dλ = −(A_Sᵀ A_S)⁻¹ s.
    A = jax.random.normal(jax.random.key(3), (8, N))
    y = A @ jnp.array([1.5, 0.0, -2.0, 0.0, 0.8]) + 0.05 * jax.random.normal(
        jax.random.key(4), (8,)
    )
    step = 1.0 / float(jnp.linalg.norm(A, 2) ** 2)

    def T(w, lam):
        return P.prox_l1(w - step * A.T @ (A @ w - y), step * lam)

    @dargmin.fixed_point(T)
    def ista(init, lam):
        return jax.lax.fori_loop(0, 3000, lambda i, w: T(w, lam), init)

    lam = 2.0
    w = np.asarray(ista(jnp.zeros(N), lam))
    support = np.flatnonzero(w != 0)
    assert 0 < support.size < N
    A_s = np.asarray(A)[:, support]
    expected = np.zeros(N)
    expected[support] = -np.linalg.solve(A_s.T @ A_s, np.sign(w[support]))
    np.testing.assert_allclose(jax.jacfwd(ista, argnums=1)(jnp.zeros(N), lam), expected, atol=1e-9)
