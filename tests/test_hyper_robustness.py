"""The scikit-learn estimators of dargmin.hyper on real-world inputs, and the outer loop.

Each test checks against something independent: scikit-learn's LassoCV / Lasso / Ridge, the
same fit on another input representation (sparse, float32, DataFrame), or a closed form.
"""

import warnings

import numpy as np
import pytest
import scipy.sparse
from sklearn.datasets import load_diabetes, make_regression
from sklearn.linear_model import Lasso, LassoCV
from sklearn.model_selection import KFold
from sklearn.preprocessing import StandardScaler

import dargmin
from dargmin import hyper
from dargmin.hyper import (
    ElasticNetHyperCV,
    HeldOutMSE,
    ImplicitForward,
    ImplicitSupport,
    LassoHyperCV,
    OuterConvergenceWarning,
    RidgeHyperCV,
)


def _diabetes():
    X, y = load_diabetes(return_X_y=True)
    return StandardScaler().fit_transform(X), y


def _small(seed=0, n=60, p=12):
    X, y = make_regression(n, p, n_informative=4, noise=5.0, random_state=seed)
    return X, y


# ------------------------------------------------------------------ the CV optimum
def test_diabetes_finds_the_lasso_cv_minimum():
    # The CV curve of standardized diabetes has two minima (α ≈ 0.08 and α ≈ 1); LassoCV
    # picks 0.079. The coarse path must lead the descent to that basin (or a better point).
    X, y = _diabetes()
    cv = KFold(5)
    ref = LassoCV(cv=cv, tol=1e-10, max_iter=100_000).fit(X, y)
    ref_best = ref.mse_path_.mean(axis=1).min()
    est = LassoHyperCV(cv=cv).fit(X, y)
    # Within 0.01 % of LassoCV's converged minimum (the issue asks for 0.5 %): the search
    # stops once α is known to within its 5 % step tolerance (SEARCH_XTOL), here 1.3e-5
    # above it.
    assert est.cv_loss_ <= ref_best * (1 + 1e-4)
    assert 0.03 < est.alpha_ < 0.2  # the basin of LassoCV's α = 0.079, not α ≈ 1
    # alpha_ is in LassoCV's units: Lasso(alpha_) on the folds gives cv_loss_.
    folds = [
        np.mean((y[te] - Lasso(alpha=est.alpha_, tol=1e-12).fit(X[tr], y[tr]).predict(X[te])) ** 2)
        for tr, te in cv.split(X)
    ]
    assert np.mean(folds) == pytest.approx(est.cv_loss_, rel=1e-6)
    assert est.alphas_.shape == est.cv_loss_path_.shape == (est.n_evals_,)
    assert est.cv_loss_path_.min() == pytest.approx(est.cv_loss_)
    with pytest.warns(FutureWarning, match="cv_loss_"):
        assert est.cv_score_ == est.cv_loss_


# ------------------------------------------------------------------ input representations
def test_sparse_float32_and_dense_inputs_give_the_same_fit():
    X, y = _small()
    X[X < 0.3] = 0.0  # a genuinely sparse design
    dense = LassoHyperCV(cv=3, n_path=4).fit(X, y)
    for Xin, yin in [
        (scipy.sparse.csr_matrix(X), y),
        (scipy.sparse.csc_matrix(X), y),
        (X.astype(np.float32), y.astype(np.float32)),
    ]:
        other = LassoHyperCV(cv=3, n_path=4).fit(Xin, yin)
        # float32 input is rounded once (relative 6e-8), then everything is float64.
        np.testing.assert_allclose(other.alpha_, dense.alpha_, rtol=1e-5)
        np.testing.assert_allclose(other.predict(Xin), dense.predict(X), rtol=1e-4, atol=1e-4)


def test_large_sparse_input_is_refused_with_a_clear_message(monkeypatch):
    from dargmin.hyper import _estimator_base

    monkeypatch.setattr(_estimator_base, "SPARSE_DENSIFY_MAX", 100)
    X = scipy.sparse.random(30, 10, density=0.3, random_state=0, format="csr")
    with pytest.raises(ValueError, match="SPARSE_DENSIFY_MAX"):
        LassoHyperCV(cv=3).fit(X, np.arange(30.0))


def test_dataframe_keeps_feature_names():
    pd = pytest.importorskip("pandas")
    X, y = _small()
    df = pd.DataFrame(X, columns=[f"f{j}" for j in range(X.shape[1])])
    est = LassoHyperCV(cv=3, n_path=4).fit(df, y)
    assert list(est.feature_names_in_) == list(df.columns)
    np.testing.assert_allclose(est.predict(df), LassoHyperCV(cv=3, n_path=4).fit(X, y).predict(X))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_raises_sklearn_value_error(bad):
    X, y = _small()
    X[3, 2] = bad
    with pytest.raises(ValueError, match=r"NaN|infinity"):
        LassoHyperCV(cv=3).fit(X, y)
    X, y = _small()
    y[0] = bad
    with pytest.raises(ValueError, match=r"NaN|infinity"):
        RidgeHyperCV(cv=3).fit(X, y)


# ------------------------------------------------------------------ degenerate designs
def test_constant_and_duplicate_columns():
    X, y = _small()
    Xd = np.hstack([X, np.full((X.shape[0], 1), 3.0), X[:, [0]]])  # constant + duplicate
    est = LassoHyperCV(cv=3, n_path=4).fit(Xd, y)
    ref = LassoHyperCV(cv=3, n_path=4).fit(X, y)
    assert est.coef_[-2] == 0.0  # a constant column is absorbed by the intercept
    # A duplicated column changes no prediction of the Lasso path: the same CV optimum.
    assert est.cv_loss_ == pytest.approx(ref.cv_loss_, rel=1e-4)
    np.testing.assert_allclose(est.predict(Xd), ref.predict(X), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(("n", "p"), [(40, 60), (30, 400)])
def test_more_features_than_samples(n, p):
    X, y = make_regression(n, p, n_informative=3, noise=1.0, random_state=1)
    est = LassoHyperCV(cv=3, n_path=6).fit(X, y)

    # Truth: scikit-learn's Lasso, converged, on the same folds.
    def cv_mse(alpha):
        return np.mean(
            [
                np.mean(
                    (
                        y[te]
                        - Lasso(alpha=alpha, tol=1e-8, max_iter=100_000)
                        .fit(X[tr], y[tr])
                        .predict(X[te])
                    )
                    ** 2
                )
                for tr, te in KFold(3).split(X)
            ]
        )

    # The search solves to a duality gap of 1e-6 ‖y‖² (scikit-learn's scaling): with noise 1
    # and var(y) about 4000 times the CV loss, the loss is accurate to a few 1e-3 (measured
    # 2.7e-3 at n, p = 40, 60; cv_loss_'s documented error).
    rel = 1e-6 * np.var(y) / est.cv_loss_
    assert est.cv_loss_ == pytest.approx(cv_mse(est.alpha_), rel=max(1e-3, 2 * rel))
    amax = np.max(np.abs((X - X.mean(0)).T @ (y - y.mean()))) / n
    grid_best = min(cv_mse(a) for a in amax * np.geomspace(1, 1e-3, 13)[1:])
    assert est.cv_loss_ <= 1.001 * grid_best
    assert np.count_nonzero(est.coef_) < n


def test_alpha0_above_alpha_max_warns_and_still_selects():
    X, y = _small()
    amax = np.max(np.abs((X - X.mean(0)).T @ (y - y.mean()))) / len(y)
    with pytest.warns(dargmin.DargminWarning, match="alpha_max"):
        est = LassoHyperCV(cv=3, alpha0=10 * amax, n_path=4).fit(X, y)
    assert est.alpha_ < 0.5 * amax and np.any(est.coef_ != 0)


# ------------------------------------------------------------------ sample weights
def test_sample_weight_refit_is_sklearn_weighted_lasso():
    X, y = _small(2)
    sw = np.random.default_rng(0).uniform(0.2, 3.0, size=len(y))
    est = LassoHyperCV(cv=3, n_path=4).fit(X, y, sample_weight=sw)
    ref = Lasso(alpha=est.alpha_, tol=1e-12, max_iter=100_000).fit(X, y, sample_weight=sw)
    np.testing.assert_allclose(est.coef_, ref.coef_, rtol=1e-5, atol=1e-6)
    assert est.intercept_ == pytest.approx(ref.intercept_, rel=1e-6, abs=1e-6)
    # Uniform weights are the unweighted fit.
    plain = LassoHyperCV(cv=3, n_path=4).fit(X, y)
    same = LassoHyperCV(cv=3, n_path=4).fit(X, y, sample_weight=np.full(len(y), 2.0))
    assert same.alpha_ == plain.alpha_


# ------------------------------------------------------------------ two methods agree
def test_implicit_and_implicit_forward_refuse_together_on_non_unique_criteria():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 6))
    y = X[:, :2] @ [2.0, -1.0] + 0.3 * rng.normal(size=40)
    Xd = np.hstack([X, X[:, [0]]])
    prob = hyper.lasso(Xd, y)
    theta = np.array([np.log(prob.alpha_max() / 6)])
    w = np.array(hyper.ProxCD(tol=1e-13, max_epochs=100_000).solve(prob, theta).coef)
    w[-1], w[0] = 0.4 * w[0], 0.6 * w[0]  # another solution: both copies active
    crit = hyper.CustomCriterion(lambda ww, p: ww[0] ** 2)  # depends on the split: undefined
    for method in (ImplicitSupport(), ImplicitForward(tol=1e-12)):
        with pytest.raises(dargmin.SingularSystemError, match="not in its range"):
            method.compute(prob, crit, theta, w)
    # A criterion of the predictions is defined, and both give the same value.
    mse = HeldOutMSE(Xd, y)
    g1 = ImplicitSupport().compute(prob, mse, theta, w)[1]
    g2 = ImplicitForward(tol=1e-13, max_iter=100_000).compute(prob, mse, theta, w)[1]
    np.testing.assert_allclose(g2, g1, rtol=1e-6)


# ------------------------------------------------------------------ outer loop
def test_outer_loop_warns_when_it_stops_on_a_slope():
    calls = []

    def fun(t):
        calls.append(t.copy())
        return float(100.0 + t[0]), np.array([1.0])  # a constant slope: never stationary

    with pytest.warns(OuterConvergenceWarning, match="‖∇R‖∞ = 1"):
        res = hyper.minimize_hyper(fun, [0.0], bounds=(-5.0, 5.0), max_iter=3)
    assert res.log_theta[0] < 0


def test_outer_loop_stops_quietly_at_a_kink():
    # R = |θ − 1|: the gradient never vanishes, the minimum is a kink.
    def fun(t):
        return float(abs(t[0] - 1.0)), np.array([np.sign(t[0] - 1.0) or 1.0])

    with warnings.catch_warnings():
        warnings.simplefilter("error", OuterConvergenceWarning)
        res = hyper.minimize_hyper(fun, [3.3], max_iter=100)
    assert abs(res.log_theta[0] - 1.0) < 2e-3


def test_barzilai_borwein_step_is_the_secant_step_on_a_quadratic():
    # R = (θ − 1)²: after one capped step, the Barzilai–Borwein step is the secant step of
    # the derivative, exact on a quadratic; the fixed doubling rule needs many more.
    def run(optimizer):
        calls = []

        def fun(t):
            calls.append(float(t[0]))
            return float((t[0] - 1.0) ** 2), 2 * (t - 1.0)

        res = hyper.minimize_hyper(fun, [3.0], optimizer=optimizer, max_step=1.5, xtol=1e-9)
        return res, calls

    res, calls = run(hyper.ProjectedGradientDescent())
    assert calls[:2] == [3.0, 1.5]
    assert calls[2] == pytest.approx(1.0, abs=1e-12)
    assert res.log_theta[0] == pytest.approx(1.0, abs=1e-12)
    _, fixed_calls = run(hyper.ProjectedGradientDescent(barzilai_borwein=False))
    assert len(fixed_calls) > len(calls)


def test_first_step_length_and_the_paths_model_step_on_a_quadratic():
    # R = (θ − 1.3)², a path that evaluated θ = 0 (its best, with R') and its neighbours
    # ±1: the model step through R(0), R'(0) and R(1), and a descent whose first trial step
    # has a given length.
    from dargmin.hyper._optimizers import Monitor as _Monitor
    from dargmin.hyper._outer import _model_step, _PathStart

    def R(t):
        return float((t - 1.3) ** 2)

    mon = _Monitor()
    for t in (1.0, 0.0, -1.0):
        mon.record([t], R(t), accepted=False)
    path = _PathStart(
        np.array([0.0]),
        (R(0.0), np.array([-2.6])),
        None,
        3,
        (np.array([-1.0]), np.array([1.0])),
        1.0,
    )
    # exact on a quadratic: the distance to the minimizer (past the end; the box clips it)
    assert _model_step(path, mon, 3) == pytest.approx(1.3)
    mon.values[0] = 4.0  # R(1) = 4 instead of 0.09: the model's minimizer moves nearer
    c = (4.0 - R(0.0) + 2.6) / 1.0
    assert _model_step(path, mon, 3) == pytest.approx(2.6 / (2 * c))
    mon.values[0] = -1.0  # R(1) below the tangent: a concave model (c < 0), no model step
    assert _model_step(path, mon, 3) is None

    calls = []

    def fun(t):
        calls.append(float(t[0]))
        return R(t[0]), 2 * (t - 1.3)

    hyper.minimize_hyper(fun, [0.0], optimizer=hyper.ProjectedGradientDescent(first_step=0.7))
    assert calls[1] == pytest.approx(0.7)


def test_rejected_step_shrinks_to_the_quadratic_minimizer():
    from dargmin.hyper._optimizers import _backtrack_factor

    # φ(τ) = −τ + aτ² along the step: φ(0) = 0, φ'(0) = −1, minimizer τ = 1/(2a).
    for a, expected in [(1.0, 0.5), (2.5, 0.2), (10.0, 0.1), (50.0, 0.1)]:
        assert _backtrack_factor(0.0, -1.0 + a, -1.0) == pytest.approx(expected)
    assert _backtrack_factor(0.0, float("nan"), -1.0) == 0.5


def test_reused_monitor_does_not_leak_earlier_runs():
    mon = hyper.Monitor()
    hyper.minimize_hyper(lambda t: (float((t[0] - 1) ** 2), 2 * (t - 1)), [3.0], monitor=mon)
    res = hyper.minimize_hyper(
        lambda t: (float((t[0] + 2) ** 2 + 5), 2 * (t + 2)), [0.0], monitor=mon
    )
    assert res.value == pytest.approx(5.0)
    assert res.log_theta[0] == pytest.approx(-2.0, abs=1e-3)


def test_problem_declares_which_hyperparameters_are_l1():
    X, y = _small()
    assert hyper.elastic_net(X, y).l1_coordinates().tolist() == [True, False]
    assert hyper.ridge(X, y).l1_coordinates().tolist() == [False]
    assert hyper.weighted_lasso(X, y).l1_coordinates().all()
    # A two-hyperparameter model whose entries are both ℓ2 (not guessed from n_hyper == 2).
    import jax.numpy as jnp

    two_l2 = hyper.HyperProblem(
        X, y, hyper.Quadratic(), 2, l2=lambda t: jnp.exp(t[0]) + jnp.exp(t[1])
    )
    assert two_l2.l1_coordinates().tolist() == [False, False]


def test_solver_instance_is_copied_per_fold():
    X, y = _small()
    solver = hyper.SklearnSolver(tol=1e-10)
    res = hyper.optimize_hyperparameters(
        hyper.lasso(X, y), hyper.CrossVal(cv=3), solver=solver, max_iter=3
    )
    assert solver._est is None  # the user's object is untouched; each fold has its own
    assert np.isfinite(res.value)


def test_elastic_net_alpha_is_sklearn_convention():
    from sklearn.linear_model import ElasticNet

    X, y = _small(3)
    est = ElasticNetHyperCV(cv=3, max_iter=5, max_iter_lasso=5, n_path=4).fit(X, y)
    ref = ElasticNet(alpha=est.alpha_, l1_ratio=est.l1_ratio_, tol=1e-12, max_iter=100_000)
    np.testing.assert_allclose(est.coef_, ref.fit(X, y).coef_, rtol=1e-5, atol=1e-6)
