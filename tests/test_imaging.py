"""dargmin.imaging: the primal-dual solver, its derivatives, SURE and SUGAR, against
independent truths.

Truths: weak duality (the gap bounds the objective error of any iterate, measured against a
tighter solve), closed forms (soft-thresholding for ``D = I``; two flat pieces for the fused
lasso), a peer (scikit-image's TV denoiser), central finite differences of re-solves (in θ
and in y), Stein's lemma over simulated noise draws, and the grid minimum of SURE.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dargmin.errors import DargminError, DargminWarning
from dargmin.imaging import (
    ChambollePock,
    FFTBlur,
    GradientAndHessian2D,
    ImageSURE,
    TVSecondOrder,
    TVTikhonov,
    generalized_lasso,
    implicit_solver,
    solve,
    solve_jvp,
    tv_deblurring,
    tv_denoising,
)
from dargmin.imaging._solver import _solve_core

TIGHT = ChambollePock(tol=1e-10, max_iter=40_000)


def _image(n=16, seed=0, sigma=0.2):
    rng = np.random.default_rng(seed)
    x = np.zeros((n, n))
    x[n // 4 : 3 * n // 4, n // 4 : 3 * n // 4] = 1.0
    x[1 : n // 3, n // 2 : n - 2] = 0.5
    return x, x + sigma * rng.normal(size=x.shape), rng


def _quiet(f, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DargminWarning)
        return f(*a, **k)


# ----------------------------------------------------------------------- solver, certificate
@pytest.mark.parametrize("blur", [False, True])
def test_gap_bounds_objective_error_of_any_iterate(blur):
    x, y, _ = _image(10)
    prob = tv_deblurring(FFTBlur.gaussian(x.shape, 0.8)) if blur else tv_denoising()
    ref = _quiet(solve, prob, y, 0.1, solver=ChambollePock(tol=1e-10, max_iter=8_000))
    for k in (10, 200):
        it = solve(prob, y, 0.1, solver=ChambollePock(tol=0.0, max_iter=k))
        excess = float(it.primal - ref.primal)
        # weak duality: P(w_k) − P(ŵ) ≤ gap_k, for any iterate (ŵ known up to ref.gap)
        assert -float(ref.gap) <= excess <= float(it.gap) + 1e-12, (k, excess, float(it.gap))
        assert excess > 0.01 * float(it.gap) or k == 200  # and the bound is not vacuous
        if not blur:  # P is 1-strongly convex: ‖w − ŵ‖² ≤ 2 gap
            assert float(jnp.sum((it.w - ref.w) ** 2)) <= 2 * (float(it.gap) + float(ref.gap))


def test_generalized_lasso_identity_is_soft_thresholding():
    y = np.array([-1.5, -0.2, 0.05, 0.4, 2.0])
    res = solve(generalized_lasso(np.eye(5)), y, 0.3, solver=TIGHT)
    expected = np.sign(y) * np.maximum(np.abs(y) - 0.3, 0.0)
    # Φ = I makes P 1-strongly convex: the certificate bounds the distance to the truth.
    assert float(np.sum((np.asarray(res.w) - expected) ** 2)) <= 2 * float(res.gap)
    np.testing.assert_allclose(res.w, expected, atol=5e-5)


def test_matches_scikit_image_tv_denoiser():
    skr = pytest.importorskip("skimage.restoration")
    _, y, _ = _image(24)
    prob = tv_denoising()
    ours = solve(prob, y, 0.15, solver=ChambollePock(tol=1e-10, max_iter=100_000))
    sk = skr.denoise_tv_chambolle(y, weight=0.15, eps=1e-12, max_num_iter=20_000)
    p_sk = float(prob.objective(jnp.asarray(sk), jnp.asarray(y), jnp.array([0.15])))
    # Same weight convention: scikit-image's output is near our optimum, never below it.
    assert float(ours.primal) <= p_sk * (1 + 1e-10)
    assert (p_sk - float(ours.primal)) / p_sk < 1e-6
    assert float(np.max(np.abs(sk - np.asarray(ours.w)))) < 2e-3


def test_unconverged_solver_warns_with_the_gap():
    _, y, _ = _image()
    with pytest.warns(DargminWarning, match=r"duality gap [0-9.e+-]+ \(relative"):
        solve(tv_denoising(), y, 0.1, solver=ChambollePock(tol=1e-12, max_iter=20))


# ----------------------------------------------------------------------------- refusals
def test_refusals_name_the_problem():
    prob = tv_denoising()
    _, y, _ = _image()
    with pytest.raises(ValueError, match="2-D grey image"):
        solve(prob, np.ones((4, 4, 3)), 0.1)
    bad = y.copy()
    bad[3, 5] = np.nan
    with pytest.raises(DargminError, match=r"non-finite pixel.*\[3, 5\]") as err:
        solve(prob, bad, 0.1)
    assert err.value.reason == "nonfinite"
    for theta in (0.0, -1.0, np.inf):
        with pytest.raises(ValueError, match="finite and > 0"):
            solve(prob, y, theta)
    with pytest.raises(ValueError, match="2 entries"):
        solve(tv_denoising(TVTikhonov()), y, 0.1)
    with pytest.raises(ValueError, match="blur was built for"):
        solve(tv_deblurring(FFTBlur.gaussian((8, 8), 1.0)), y, 0.1)
    with pytest.raises(ValueError, match="to match D"):
        solve(generalized_lasso(np.eye(3)), np.ones(4), 0.1)
    for sigma in (0.0, -0.1):
        with pytest.raises(ValueError, match="sigma"):
            ImageSURE(prob, y, sigma)


# -------------------------------------------------------------------------- derivatives
def _fd_theta(prob, y, theta, j, h):
    e = np.zeros_like(theta)
    e[j] = h
    wp = _quiet(solve, prob, y, theta + e, solver=TIGHT).w
    wm = _quiet(solve, prob, y, theta - e, solver=TIGHT).w
    return (wp - wm) / (2 * h)


@pytest.mark.parametrize(
    "kind",
    ["denoising", "deblurring", "tv_tikhonov", "tv_second_order"],
    ids=lambda s: s.replace("_", "-"),
)
def test_forward_iterative_derivative_matches_finite_differences(kind):
    x, y, _ = _image(10)
    prob, theta = {
        "denoising": (tv_denoising(), np.array([0.15])),
        "deblurring": (tv_deblurring(FFTBlur.gaussian(x.shape, 0.7)), np.array([0.05])),
        "tv_tikhonov": (tv_denoising(TVTikhonov()), np.array([0.1, 0.3])),
        "tv_second_order": (tv_denoising(TVSecondOrder()), np.array([0.1, 0.05])),
    }[kind]
    res = _quiet(solve_jvp, prob, y, theta, solver=TIGHT)
    for j in range(prob.n_params):
        fd = _fd_theta(prob, y, theta, j, 1e-4 * theta[j])
        err = float(jnp.linalg.norm(res.w_dot[j] - fd) / jnp.linalg.norm(fd))
        assert err < 1e-4, (kind, j, err)


def test_derivative_in_y_and_jax_jvp_through_the_loop():
    _, y, rng = _image(10)
    prob, theta = tv_denoising(), np.array([0.15])
    z = rng.normal(size=y.shape)
    res = _quiet(solve_jvp, prob, y, theta, y_dots=z[None], solver=TIGHT)
    h = 1e-5
    fd = (
        _quiet(solve, prob, y + h * z, theta, solver=TIGHT).w
        - _quiet(solve, prob, y - h * z, theta, solver=TIGHT).w
    ) / (2 * h)
    assert float(jnp.linalg.norm(res.w_dot[0] - fd) / jnp.linalg.norm(fd)) < 1e-4
    # jax.jvp through the plain while_loop: the same iterations, the same numbers.
    cfg = ChambollePock(tol=0.0, max_iter=100)

    def core(t):
        return _solve_core(prob, cfg, jnp.asarray(y), t, None, None, None, None, None, None).w

    _, tangent = jax.jvp(core, (jnp.asarray(theta),), (jnp.ones(1),))
    ours = solve_jvp(prob, y, theta, solver=cfg).w_dot[0]
    np.testing.assert_allclose(tangent, ours, rtol=1e-9, atol=1e-12)


def test_implicit_derivative_fused_lasso_closed_form():
    # Fused lasso with two flat pieces of 3: each piece moves by ∓θ/3 (closed form).
    prob = generalized_lasso(np.diff(np.eye(6), axis=0))
    y = np.array([0.0, 0.05, 0.0, 2.0, 2.05, 2.0])
    dw = jax.jacfwd(implicit_solver(prob, TIGHT))(np.array([0.2]), y)[:, 0]
    np.testing.assert_allclose(dw, [1 / 3] * 3 + [-1 / 3] * 3, atol=1e-7)


def test_gradient_and_hessian_operator_adjoint_and_norm():
    # On a 12 × 9 image (compiled once: eager dispatch compiled each op apart, 7 s):
    # ⟨Dw, p⟩ = ⟨w, Dᵀp⟩ on random arrays; the exact norm, the largest singular value of D
    # as a dense matrix, within the stated bound; second differences of an affine image
    # vanish everywhere, boundaries included.
    rng = np.random.default_rng(3)
    D = GradientAndHessian2D()
    w, p = rng.normal(size=(12, 9)), rng.normal(size=(5, 12, 9))
    i, j = np.mgrid[0:12, 0:9]

    @jax.jit
    def measured(w, p, affine):
        matrix = jax.jacfwd(D.apply)(jnp.zeros_like(w)).reshape(5 * w.size, w.size)
        return (
            jnp.vdot(D.apply(w), p), jnp.vdot(w, D.adjoint(p)), matrix,
            jnp.abs(D.apply(affine)[2:]).max(),
        )  # fmt: skip

    lhs, rhs, matrix, affine_second = measured(w, p, 2.0 * i - 3.0 * j)
    assert abs(float(lhs - rhs)) <= 1e-12 * abs(float(lhs))
    exact = float(np.linalg.norm(np.asarray(matrix), 2))
    assert 0.8 * D.norm() < exact <= D.norm(), (exact, D.norm())
    assert float(affine_second) < 1e-13


def test_second_order_prox_tangent_matches_jax_jvp():
    # The hand-written tangent of the two-disc projection against JAX's jvp of the prox.
    rng = np.random.default_rng(4)
    pen, q = TVSecondOrder(), jnp.asarray(rng.normal(size=(5, 5, 5)))
    theta = jnp.array([0.9, 1.1])
    Q_dot, T_dot = jnp.asarray(rng.normal(size=(2, 5, 5, 5))), jnp.asarray(rng.normal(size=(2, 2)))

    @jax.jit  # one compilation, not one per eager op
    def both(q, Q_dot, T_dot):
        def reference(q_dot, t_dot):
            return jax.jvp(lambda q_, t_: pen.dual_prox(q_, 1.0, t_), (q, theta), (q_dot, t_dot))

        return pen.dual_prox_jvp(q, Q_dot, 1.0, theta, T_dot), jax.vmap(reference)(Q_dot, T_dot)

    (p, tangents), (p_ref, t_ref) = both(q, Q_dot, T_dot)
    for k in range(2):
        np.testing.assert_allclose(p, p_ref[k], rtol=1e-12)
        np.testing.assert_allclose(tangents[k], t_ref[k], rtol=1e-10, atol=1e-12)


def test_second_order_tv_restores_shading_better_than_tv():
    # A tilted plane with one raised corner: TV alone staircases the shading, TV-TV² keeps it
    # affine. At their best weights (small grids, true MSE) TV-TV² must lower the error by
    # more than 10 % (measured: 17 %), every solve certified by its gap.
    rng = np.random.default_rng(5)
    i, j = np.mgrid[0:24, 0:24]
    x = 0.04 * i + 0.03 * j + 0.5 * (j >= 12) * (i >= 8)
    y = x + 0.1 * rng.normal(size=x.shape)
    cfg = ChambollePock(tol=1e-6, max_iter=20_000)

    def mse(prob, theta):
        res = solve(prob, y, theta, solver=cfg)
        assert float(res.gap) <= 1e-6 * float(res.primal)
        return float(np.mean((np.asarray(res.w) - x) ** 2))

    best_tv = min(mse(tv_denoising(), [t]) for t in (0.05, 0.08, 0.12, 0.18))
    prob = tv_denoising(TVSecondOrder())
    best_2 = min(mse(prob, [a, b]) for a in (0.04, 0.08) for b in (0.01, 0.03, 0.1))
    assert best_2 < 0.9 * best_tv, (best_2, best_tv)


# ------------------------------------------------------------------------- SURE, SUGAR
def test_sugar_matches_finite_differences_of_fd_sure():
    # No warm starts: each estimate is then a function of θ alone, as finite differences need.
    _, y, _ = _image(10)
    est = ImageSURE(tv_denoising(), y, 0.2, solver=TIGHT, n_probes=2, delta=0.02, warm_start=False)
    th = 0.15
    g = _quiet(est.sugar, [th]).grad[0]
    h = 1e-4 * th
    vals = [_quiet(est.finite_difference, [th + s * h]).value for s in (1, -1)]
    fd = (vals[0] - vals[1]) / (2 * h)
    assert abs(g - fd) <= 1e-5 * abs(fd), (g, fd)


@pytest.mark.parametrize(
    ("penalty", "th"),
    [(TVTikhonov(), [0.1, 0.3]), (TVSecondOrder(), [0.1, 0.05])],
    ids=["tv-tikhonov", "tv-second-order"],
)
def test_sugar_two_parameters_matches_finite_differences(penalty, th):
    _, y, _ = _image(10)
    est = ImageSURE(tv_denoising(penalty), y, 0.2, solver=TIGHT, warm_start=False)
    th = np.array(th)
    g = _quiet(est.sugar, th).grad
    for j, h in ((0, 1e-5), (1, 3e-5)):
        e = np.zeros(2)
        e[j] = h
        fd = (
            _quiet(est.finite_difference, th + e).value
            - _quiet(est.finite_difference, th - e).value
        ) / (2 * h)
        assert abs(g[j] - fd) <= 1e-5 * abs(fd), (j, g[j], fd)


def test_sure_is_unbiased_over_noise_draws():
    # Stein's lemma: E SURE = E‖ŵ − x‖² (Φ = I), over 40 draws on an 8 × 8 image. The
    # finite-difference divergence is unbiased as δ → 0 (a large δ overestimates it), so a
    # small δ, with solves tight enough for it.
    x, _, _ = _image(8)
    sigma, prob, cfg = 0.2, tv_denoising(), ChambollePock(tol=1e-10, max_iter=20_000)
    fd, mc, risk = [], [], []
    for seed in range(40):
        y = x + sigma * np.random.default_rng(100 + seed).normal(size=x.shape)
        est = ImageSURE(prob, y, sigma, solver=cfg, seed=seed, delta=2e-3)
        r = _quiet(est.finite_difference, [0.12])
        fd.append(r.value)
        mc.append(_quiet(est.monte_carlo, [0.12]).value)
        risk.append(float(np.sum((r.w - x) ** 2)))
    fd, mc, risk = map(np.asarray, (fd, mc, risk))
    for est_vals in (fd, mc):
        diff = est_vals - risk
        se = diff.std(ddof=1) / np.sqrt(diff.size)
        assert abs(diff.mean()) < 4 * se, (diff.mean(), se)
    # and it is not vacuous: the standard error is small next to the risk
    assert 4 * (fd - risk).std() / np.sqrt(fd.size) < 0.5 * risk.mean()


@pytest.mark.parametrize("coarse", [None, (0.5, 1.0, 2.0)])
def test_tuning_finds_the_grid_minimum_of_sure(coarse):
    _, y, _ = _image(16)
    cfg = ChambollePock(tol=1e-7)
    est = ImageSURE(tv_denoising(), y, 0.2, solver=cfg, warm_start=False)
    cold = ImageSURE(tv_denoising(), y, 0.2, solver=cfg, warm_start=False)
    seen = []
    res = _quiet(
        est.tune, [0.2], progress=False, monitor=lambda t, v: seen.append(v), coarse=coarse
    )
    grid = np.geomspace(0.05, 0.4, 11)
    vals = _quiet(cold.grid, [[g] for g in grid])
    assert len(seen) == res.n_evals == len(res.history)
    assert res.value <= vals.min() + 1e-3 * abs(vals.min())
    i = int(np.argmin(vals))
    assert grid[max(i - 1, 0)] <= res.theta[0] <= grid[min(i + 1, grid.size - 1)]
    if coarse is not None:  # two points define no parabola
        with pytest.raises(ValueError, match="at least 3 positive factors"):
            est.tune([0.2], progress=False, coarse=(1.0, 2.0))
        with pytest.raises(ValueError, match="1 among them"):
            est.tune([0.2], progress=False, coarse=(0.5, 2.0, 4.0))


def test_coarse_start_looks_only_on_the_side_of_the_minimum():
    # SUGAR at θ₀ first; its slope must send the finite-difference values to the side where
    # a cold grid of the same SURE has its minimum, and skip the other side's factors.
    _, y, _ = _image(16)
    cfg = ChambollePock(tol=1e-7)
    grid = np.geomspace(0.02, 0.8, 17)
    vals = _quiet(
        ImageSURE(tv_denoising(), y, 0.2, solver=cfg, warm_start=False).grid, grid[:, None]
    )
    best = grid[int(np.argmin(vals))]
    factors = (0.25, 0.5, 1.0, 2.0, 4.0)
    for theta0 in (4.0 * best, best / 4.0):
        seen = []
        est = ImageSURE(tv_denoising(), y, 0.2, solver=cfg)
        res = _quiet(
            est.tune, [theta0], progress=False, coarse=factors,
            monitor=lambda t, v: seen.append(float(t[0])),
        )  # fmt: skip
        expected = [1.0, 0.5, 0.25] if theta0 > best else [1.0, 2.0, 4.0]
        np.testing.assert_allclose(np.array(seen[:3]) / theta0, expected, rtol=1e-12)
        assert best / 1.3 <= res.theta[0] <= best * 1.3, (theta0, res.theta, best)


def test_tune_stops_on_a_flat_estimate_with_the_best_point_seen():
    # ftol larger than any change: BFGS's first new point ends the search, and the result
    # is the better of the two points seen (not the last); ftol = 0 leaves BFGS its own end.
    _, y, _ = _image(16)
    cfg = ChambollePock(tol=1e-7)
    est = ImageSURE(tv_denoising(), y, 0.2, solver=cfg, warm_start=False)
    res = _quiet(est.tune, [0.05], progress=False, ftol=10.0)
    assert res.n_evals == 2 and "flat" in res.message
    values = [v for _, v in res.history]
    assert res.value == min(values)
    assert res.theta[0] == res.history[int(np.argmin(values))][0][0]
    full = _quiet(est.tune, [0.05], progress=False, ftol=0.0)
    assert full.n_evals > 2 and "flat" not in full.message
    assert full.value <= res.value
