"""The estimators' speed levers, each checked against an independent reference.

* :class:`~dargmin.hyper.WorkingSetCD` against scikit-learn's ``Lasso`` / ``ElasticNet``
  solved to a tight tolerance (a peer);
* the NumPy twins of the penalty maps against the JAX maps and their JAX derivative;
* the folds' support systems solved in one batch against the per-fold solves, including a
  fold whose system is singular (duplicate columns);
* folds solved in threads (``n_jobs``) against the sequential fit;
* :func:`~dargmin.hyper.enable_compilation_cache` sets JAX's cache options;
* :class:`~dargmin.hyper.SplitLBFGSB` with a coarse L-BFGS-B phase and Newton steps
  against scikit-learn's liblinear.
"""

import warnings
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import make_regression
from sklearn.linear_model import ElasticNet, Lasso, LogisticRegression
from sklearn.model_selection import KFold

from dargmin.hyper import (
    CrossVal,
    HeldOutMSE,
    ImplicitSupport,
    LassoHyperCV,
    ProjectedGradientDescent,
    SplitLBFGSB,
    WorkingSetCD,
    elastic_net,
    enable_compilation_cache,
    lasso,
    optimize_hyperparameters,
    sparse_logistic,
    weighted_lasso,
)
from dargmin.hyper._penalty_maps import _penalty_vectors


@pytest.fixture(scope="module")
def data():
    return make_regression(60, 150, n_informative=8, noise=5.0, random_state=0)


@pytest.mark.parametrize("frac", [0.5, 0.05, 0.005])
def test_working_set_matches_sklearn_lasso(data, frac):
    X, y = data
    prob = lasso(X, y)  # centered: the intercept is exact
    alpha = frac * prob.alpha_max()
    res = WorkingSetCD(tol=1e-12).solve(prob, [np.log(alpha)])
    ref = Lasso(alpha=alpha, tol=1e-12, max_iter=200_000).fit(X, y)
    coef, intercept = prob.coef_intercept(res.coef)
    assert res.converged
    np.testing.assert_allclose(coef, ref.coef_, atol=1e-6)
    np.testing.assert_allclose(intercept, ref.intercept_, atol=1e-6)


def test_working_set_matches_sklearn_elastic_net(data):
    X, y = data
    prob = elastic_net(X, y, fit_intercept=False)
    theta = np.array([np.log(0.02 * prob.alpha_max()), np.log(0.5)])
    lam, mu = np.exp(theta)
    res = WorkingSetCD(tol=1e-12).solve(prob, theta)
    # scikit-learn: alpha (l1_ratio ‖w‖₁ + (1 − l1_ratio)/2 ‖w‖²) = λ‖w‖₁ + μ/2 ‖w‖².
    ref = ElasticNet(
        alpha=lam + mu, l1_ratio=lam / (lam + mu), fit_intercept=False, tol=1e-12, max_iter=10**5
    ).fit(X, y)
    np.testing.assert_allclose(res.coef, ref.coef_, atol=1e-6)


def test_working_set_warm_start_gives_the_same_solution(data):
    X, y = data
    prob = lasso(X, y)
    t1, t2 = np.log(0.1 * prob.alpha_max()), np.log(0.02 * prob.alpha_max())
    cold = WorkingSetCD(tol=1e-12).solve(prob, [t2])
    warm = WorkingSetCD(tol=1e-12).solve(prob, [t2], WorkingSetCD().solve(prob, [t1]).coef)
    np.testing.assert_allclose(warm.coef, cold.coef, atol=1e-7)


def test_working_set_refuses_per_feature_strengths(data):
    X, y = data
    with pytest.raises(ValueError, match="one ℓ1 strength"):
        WorkingSetCD().solve(weighted_lasso(X, y), np.zeros(X.shape[1]))


@pytest.mark.parametrize(
    "make, n_hyper", [(lasso, 1), (elastic_net, 2), (weighted_lasso, 150), (sparse_logistic, 1)]
)
def test_host_penalty_maps_equal_the_jax_maps(data, make, n_hyper):
    X, y = data
    prob = make(X, np.sign(y) if make is sparse_logistic else y)
    theta = np.random.default_rng(1).normal(size=n_hyper)
    with jax.enable_x64(True):
        l1, l2 = _penalty_vectors(jnp.asarray(theta), prob.l1, prob.l2, 150, prob.augmented)
        c1, c2 = np.random.default_rng(2).normal(size=(2, prob.n_coef))
        _, vjp = jax.vjp(
            lambda t: _penalty_vectors(t, prob.l1, prob.l2, 150, prob.augmented), theta
        )
        ref_vjp = np.asarray(vjp((jnp.asarray(c1), jnp.asarray(c2)))[0])
    h1, h2 = prob.penalties_host(theta)
    np.testing.assert_allclose(h1, np.asarray(l1), rtol=1e-15)
    np.testing.assert_allclose(h2, np.asarray(l2), rtol=1e-15)
    np.testing.assert_allclose(prob.penalty_vjp(theta, c1, c2), ref_vjp, rtol=1e-12)


def test_batched_fold_solves_equal_per_fold_solves(data):
    X, y = data
    j = int(np.argmax(np.abs(X.T @ (y - y.mean()))))  # the first column to enter
    X = np.hstack([X, X[:, j : j + 1]])  # duplicated: its support systems are singular
    prob = lasso(X, y)
    crit = CrossVal(HeldOutMSE, cv=KFold(4))
    pairs = crit.folds(prob)
    theta = np.array([np.log(0.2 * prob.alpha_max())])
    ws = []
    for p, _ in pairs:
        w = WorkingSetCD(tol=1e-12).solve(p, theta).coef
        # Splitting a coefficient between duplicate columns (same sign) is also a solution;
        # one fold gets it, so its support Hessian is singular.
        if not ws:
            w[j] = w[-1] = 0.5 * (w[j] + w[-1])
        ws.append(w)
    assert ws[0][j] != 0 and ws[0][-1] != 0
    meth = ImplicitSupport()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batched = meth.compute_folds(pairs, theta, ws)
        single = [meth.compute(p, c, theta, w) for (p, c), w in zip(pairs, ws, strict=True)]
    for (vb, gb, ib), (vs, gs, is_) in zip(batched, single, strict=True):
        assert vb == vs
        np.testing.assert_allclose(gb, gs, rtol=1e-9)
        assert ib["support_rank"] == is_["support_rank"]
    # The singular fold went through the minimum-norm fallback, and said so.
    assert batched[0][2]["notes"]


def test_threaded_folds_give_the_sequential_fit():
    X, y = make_regression(80, 30, n_informative=5, noise=5.0, random_state=0)
    one = LassoHyperCV(cv=KFold(3), n_path=5, max_iter=5).fit(X, y)
    two = LassoHyperCV(cv=KFold(3), n_path=5, max_iter=5, n_jobs=2).fit(X, y)
    assert two.alpha_ == one.alpha_
    np.testing.assert_array_equal(two.coef_, one.coef_)


def test_enable_compilation_cache_sets_jax_options(tmp_path, monkeypatch):
    calls = {}
    monkeypatch.setattr(jax.config, "update", lambda name, value: calls.__setitem__(name, value))
    out = enable_compilation_cache(tmp_path / "c")
    assert out.is_dir()
    assert calls["jax_compilation_cache_dir"] == str(tmp_path / "c")
    assert calls["jax_persistent_cache_min_compile_time_secs"] == 0.0


@pytest.mark.parametrize("alpha", [0.05, 0.005])
def test_split_lbfgsb_coarse_phase_matches_liblinear(alpha):
    from sklearn.datasets import make_classification

    X, y01 = make_classification(80, 12, n_informative=4, random_state=0)
    y = np.where(y01 == 1, 1.0, -1.0)
    # liblinear minimizes ‖w‖₁ + C Σ log(1 + e^{−yᵢxᵢᵀw}): ours divided by C n, α = 1/(C n).
    ref = LogisticRegression(
        C=1.0 / (80 * alpha), l1_ratio=1.0, solver="liblinear", fit_intercept=False, tol=1e-12
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.fit(X, y01)
    prob = sparse_logistic(X, y, fit_intercept=False)
    res = SplitLBFGSB(tol=1e-10, coarse_tol=1e-3).solve(prob, [np.log(alpha)])
    assert res.converged
    np.testing.assert_allclose(res.coef, ref.coef_[0], atol=2e-5)
    assert np.array_equal(res.coef != 0, np.abs(ref.coef_[0]) > 1e-8)


class _CountingWorkingSetCD(WorkingSetCD):
    calls = 0

    def solve(self, problem, log_theta, w0=None):
        type(self).calls += 1
        return super().solve(problem, log_theta, w0)


def test_coarse_path_solver_is_used_and_keeps_the_optimum():
    # A looser solver on the coarse path (it only picks the basin) must not move the
    # optimum the descent finds: the reference is the same search with one solver.
    X, y = make_regression(150, 300, n_informative=10, noise=5.0, random_state=0)
    problem, criterion = lasso(X, y), CrossVal(HeldOutMSE, cv=KFold(3))
    options = dict(solver=WorkingSetCD(tol=1e-6), n_path=6, xtol=1e-2)
    reference = optimize_hyperparameters(problem, criterion, **options)
    path_solver = _CountingWorkingSetCD(tol=1e-5, kkt_tol=1e-1)
    found = optimize_hyperparameters(problem, criterion, path_solver=path_solver, **options)
    # The path's value-only solves (one per fold and path point, at least two points)
    # went to the path solver; the descent's to the search solver.
    assert _CountingWorkingSetCD.calls >= 3 * 2
    assert _CountingWorkingSetCD.calls % 3 == 0
    np.testing.assert_allclose(found.log_theta, reference.log_theta, atol=1e-2)
    np.testing.assert_allclose(found.value, reference.value, rtol=1e-4)


def test_host_fold_solve_matches_the_layers_jax_solve():
    # The one-device host Cholesky (no compilation) against the linear-system layer's
    # vmapped JAX Cholesky: same solutions and condition bounds; a singular member (a
    # duplicated column) is flagged by both (an infinite or > _COND_MAX bound).
    from dargmin.hyper._support_solve import (
        _COND_MAX,
        _cholesky_solve_folds,
        _cholesky_solve_folds_host,
    )

    rng = np.random.default_rng(0)
    A = rng.normal(size=(4, 16, 40))
    A[3, 1] = A[3, 0]  # fold 3: two identical active columns
    Hs = A @ np.swapaxes(A, 1, 2)
    Bs = rng.normal(size=(4, 16, 1))
    X_host, cond_host = _cholesky_solve_folds_host(list(Hs), list(Bs))
    X_host = np.stack(X_host)
    with jax.enable_x64(True):
        X_jax, cond_jax = (np.asarray(a) for a in _cholesky_solve_folds(Hs, Bs))
    np.testing.assert_allclose(X_host[:3], X_jax[:3], rtol=1e-10)
    np.testing.assert_allclose(X_host[:3], np.linalg.solve(Hs[:3], Bs[:3]), rtol=1e-10)
    np.testing.assert_allclose(cond_host[:3], cond_jax[:3], rtol=1e-10)
    assert cond_host[3] >= _COND_MAX and cond_jax[3] >= _COND_MAX
    # Systems of different sizes, unpadded (the host solve needs no common size).
    mixed_H = [Hs[0][:3, :3], Hs[1][:7, :7]]
    mixed_B = [Bs[0][:3], Bs[1][:7]]
    X_mixed, _ = _cholesky_solve_folds_host(mixed_H, mixed_B)
    for H, B, x in zip(mixed_H, mixed_B, X_mixed, strict=True):
        np.testing.assert_allclose(x, np.linalg.solve(H, B), rtol=1e-10)


def test_probe_is_a_quiet_truncated_descent(data):
    # The coarse path's probe: a few epochs from the warm start, no warning. Coordinate
    # descent decreases the objective, so the probe lies between the warm start and the
    # minimum: objective(minimum) <= objective(probe) <= objective(warm start).
    X, y = data
    prob = lasso(X, y, fit_intercept=False)
    n = X.shape[0]
    theta_warm, theta = np.log(0.3 * prob.alpha_max()), np.log(0.01 * prob.alpha_max())
    alpha = float(np.exp(theta))

    def objective(w):
        return 0.5 / n * float(np.sum((y - X @ w) ** 2)) + alpha * float(np.abs(w).sum())

    warm = WorkingSetCD(tol=1e-10).solve(prob, [theta_warm]).coef
    full = WorkingSetCD(tol=1e-10).solve(prob, [theta], warm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no scikit-learn or dargmin convergence warning
        probe = WorkingSetCD(tol=1e-10).probe().solve(prob, [theta], warm.copy())
    assert probe.n_iter < full.n_iter
    assert objective(full.coef) - 1e-12 <= objective(probe.coef) <= objective(warm)
    assert objective(probe.coef) > objective(full.coef) + 1e-8  # truncated, not converged


def test_path_probe_stops_where_the_full_solve_stops(monkeypatch):
    # The path's points are first solved by the probe; the reference is the same search
    # without probes.
    from dargmin.hyper import _outer

    X, y = make_regression(150, 300, n_informative=10, noise=5.0, random_state=0)
    problem, criterion = lasso(X, y), CrossVal(HeldOutMSE, cv=KFold(3))
    options = dict(
        solver=WorkingSetCD(tol=1e-6), path_solver=WorkingSetCD(tol=1e-5), n_path=10, xtol=1e-2
    )

    def path_values(res):
        return np.array(res.monitor.values[: res.monitor.accepted.index(True)])

    # Probe every point from the second on (the rule's threshold at +inf), against never.
    monkeypatch.setattr(_outer, "PATH_PROBE_BELOW", np.inf)
    probed = optimize_hyperparameters(problem, criterion, **options)
    monkeypatch.setattr(_outer, "PATH_PROBE_BELOW", -np.inf)
    monkeypatch.setattr(_outer, "PATH_PROBE_SLOWDOWN", 0.0)
    full = optimize_hyperparameters(problem, criterion, **options)
    p, f = path_values(probed), path_values(full)
    # The same stopping point, where the probe's loose value already rose by PATH_RISE
    # (less than the converged value: the probe under-fits from the stronger penalty).
    assert p.size == f.size < 10
    assert (1 + _outer.PATH_RISE) * p[:-1].min() < p[-1] < f[-1]
    np.testing.assert_allclose(p[:-1], f[:-1], rtol=1e-4)  # both solves at a 1e-5 gap
    # The probe's solution warm-starts that point's full solve, so the searches may differ
    # at the level of the path's 1e-5 duality gap.
    np.testing.assert_allclose(probed.log_theta, full.log_theta, atol=5e-2)
    np.testing.assert_allclose(probed.value, full.value, rtol=1e-3)


class _RecordingWorkingSetCD(WorkingSetCD):
    thetas: ClassVar[list] = []

    def solve(self, problem, log_theta, w0=None):
        type(self).thetas.append(float(np.asarray(log_theta).reshape(-1)[0]))
        return super().solve(problem, log_theta, w0)


def test_descent_takes_the_paths_values_instead_of_solving_again():
    # On this split gradient descent's first step (half the path's spacing: an explicit
    # ProjectedGradientDescent, without the default's model step) lands on the upper end
    # of its bracket, a path point: its value comes from the path record, with no solve by
    # the search solver.
    from sklearn.model_selection import train_test_split

    X, y = make_regression(429, 1000, n_informative=20, noise=10.0, random_state=0)
    X, _, y, _ = train_test_split(X, y, test_size=0.3, random_state=0)
    _RecordingWorkingSetCD.thetas = []
    res = optimize_hyperparameters(
        lasso(X, y),
        CrossVal(HeldOutMSE, cv=KFold(5, shuffle=True, random_state=0)),
        solver=_RecordingWorkingSetCD(tol=1e-6, kkt_tol=1e-2),
        path_solver=WorkingSetCD(tol=1e-5, kkt_tol=1e-1),
        n_path=10,
        xtol=1e-2,
        optimizer=ProjectedGradientDescent(),
    )
    mon = res.monitor
    n_path = mon.accepted.index(True)
    records = zip(mon.log_thetas[:n_path], mon.values[:n_path], strict=True)
    path = {float(t[0]): v for t, v in records}
    best = min(path, key=path.get)
    revisited = [
        (float(t[0]), v)
        for t, v in zip(mon.log_thetas[n_path:], mon.values[n_path:], strict=True)
        if float(t[0]) in path and float(t[0]) != best
    ]
    assert revisited  # the case this test is about
    assert all(v == path[t] and v > path[best] for t, v in revisited)
    assert not set(_RecordingWorkingSetCD.thetas) & {t for t, _ in revisited}
    assert res.value <= path[best]  # and the descent still went below the path's best


def test_host_minimum_norm_solve_matches_the_pseudo_inverse():
    # A rank-deficient PSD support Hessian (three duplicated columns of eight) with a
    # right-hand side in its range: NumPy's pseudo-inverse and matrix rank are the reference.
    from dargmin.hyper._support_solve import _min_norm_solve_host

    rng = np.random.default_rng(1)
    A = rng.normal(size=(30, 8))
    A[:, 5:] = A[:, :3]
    H = A.T @ A
    B = A.T @ rng.normal(size=(30, 2))
    X, rank = _min_norm_solve_host(H, B)
    assert rank == np.linalg.matrix_rank(H) == 5
    np.testing.assert_allclose(X, np.linalg.pinv(H, rcond=1e-10, hermitian=True) @ B, atol=1e-10)
    np.testing.assert_allclose(H @ X, B, atol=1e-9)


def test_repeated_solve_from_its_own_solution_is_remembered(data, monkeypatch):
    # A converged solve is a fixed point of the solver: solving again at the same θ from its
    # solution returns it without calling the kernel; a truncated probe is not a fixed
    # point, so a second probe from its output runs (and descends) again.
    from dargmin.hyper import _working_set

    calls = []
    kernel = _working_set._cd_subproblem
    monkeypatch.setattr(
        _working_set, "_cd_subproblem", lambda *a, **k: calls.append(1) or kernel(*a, **k)
    )
    X, y = data
    prob = lasso(X, y)
    theta = [np.log(0.05 * prob.alpha_max())]
    first = WorkingSetCD(tol=1e-10).solve(prob, theta)
    n_calls = len(calls)
    again = WorkingSetCD(tol=1e-10).solve(prob, theta, first.coef)
    assert first.n_iter > 0 and again.n_iter == 0 and len(calls) == n_calls > 0
    np.testing.assert_array_equal(again.coef, first.coef)
    assert again.coef is not first.coef  # a copy: callers may write into theirs
    # The same solve from a fresh problem object (no memory) agrees to the tolerance.
    fresh = WorkingSetCD(tol=1e-10).solve(lasso(X, y), theta, first.coef)
    np.testing.assert_allclose(fresh.coef, first.coef, atol=1e-8)
    # Another θ or tolerance is solved, not recalled.
    other = WorkingSetCD(tol=1e-10).solve(prob, [theta[0] - 0.5], first.coef)
    assert other.n_iter > 0

    warm = WorkingSetCD(tol=1e-10).solve(prob, [np.log(0.5 * prob.alpha_max())]).coef
    probe = WorkingSetCD(tol=1e-10).probe()
    p1 = probe.solve(prob, theta, warm)
    p2 = probe.solve(prob, theta, p1.coef)
    assert p2.n_iter > 0
    assert not np.array_equal(p2.coef, p1.coef)


@pytest.mark.parametrize(
    "values, probe",
    [
        ([402.1, 260.9], False),  # one decrease of 35 %: no history to compare
        ([1297.0, 402.1, 260.9], True),  # log-decrease 1.17 then 0.43: below half
        ([4749.0, 1297.0, 402.1], False),  # 1.30 then 1.17: steady
        ([300.0, 280.0, 275.0], True),  # last decrease below 10 % (PATH_PROBE_BELOW)
        ([300.0, 310.0, 200.0], False),  # a rise before the last decrease
    ],
)
def test_path_probes_when_the_decrease_slows(values, probe):
    from dargmin.hyper._outer import _flattening

    visited = [(v, i, np.array([float(-i)]), None) for i, v in enumerate(values)]
    assert _flattening(visited) is probe


def test_design_is_column_major_and_centered(data):
    # The solvers read columns: the design is built column-major (no per-solver copy) and
    # equals the centered X; a fold (subset) too.
    X, y = data
    prob = lasso(X, y)
    assert prob.design.flags.f_contiguous
    np.testing.assert_allclose(prob.design, X - X.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(prob.col_sq, np.sum((X - X.mean(axis=0)) ** 2, axis=0))
    fold = prob.subset(np.arange(10, 60))
    assert fold.design.flags.f_contiguous
    np.testing.assert_allclose(fold.design, X[10:] - X[10:].mean(axis=0), atol=1e-12)
    plain = lasso(X, y, fit_intercept=False)  # the design is X, one shared copy
    assert plain.design is plain.X and plain.design.flags.f_contiguous
    np.testing.assert_array_equal(plain.X, X)
    logistic = sparse_logistic(X, np.sign(y))  # the intercept as a column of ones
    assert logistic.design.flags.f_contiguous
    np.testing.assert_array_equal(logistic.design, np.hstack([X, np.ones((X.shape[0], 1))]))


def test_least_squares_restricted_hessian_matches_the_weighted_formula(data):
    # The least-squares shortcut (ℓ'' = 1/n, no prediction) against the general formula
    # X_Sᵀ diag(ℓ''(Xw)) X_S + diag(μ_S) of the data fit's own Hessian diagonal.
    from dargmin.hyper._hypergradients import _restricted_hessian

    X, y = data
    prob = elastic_net(X, y)
    w = WorkingSetCD().solve(prob, [np.log(0.05 * prob.alpha_max()), np.log(0.3)]).coef
    S = np.flatnonzero(w)
    l2 = np.full(prob.n_coef, 0.3)
    H, XS, d = _restricted_hessian(prob, w, S, l2)
    dd = prob.datafit.hess_diag_host(prob.design @ w, prob.target)
    XS_ref = prob.design[:, S]
    np.testing.assert_array_equal(XS, XS_ref)
    np.testing.assert_allclose(d, dd)
    np.testing.assert_allclose(H, XS_ref.T @ (dd[:, None] * XS_ref) + np.diag(l2[S]), rtol=1e-12)
