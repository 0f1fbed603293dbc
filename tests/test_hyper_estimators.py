"""Outer optimizers and scikit-learn estimators of dargmin.hyper."""

import numpy as np
import optax
import pytest
from sklearn.datasets import make_classification, make_regression
from sklearn.linear_model import LassoCV, Ridge
from sklearn.model_selection import KFold, cross_val_score
from sklearn.utils.estimator_checks import parametrize_with_checks

from dargmin import hyper
from dargmin.hyper import (
    ElasticNetHyperCV,
    HeldOutMSE,
    LassoHyperCV,
    ProxCD,
    RidgeHyperCV,
    SparseLogisticHyperCV,
    WeightedLassoHyperCV,
    optimize_hyperparameters,
)


def _split_problem(seed=0):
    X, y = make_regression(120, 40, n_informative=8, noise=15.0, random_state=seed)
    return hyper.lasso(X[:60], y[:60]), HeldOutMSE(X[60:], y[60:])


def _grid_best(prob, crit, n=200):
    amax = prob.alpha_max()
    grid = np.geomspace(amax, amax * 1e-4, n)
    solver = hyper.SklearnSolver(tol=1e-12)
    vals = [float(crit(solver.solve(prob, [np.log(a)]).coef, prob)) for a in grid]
    i = int(np.argmin(vals))
    assert 0 < i < n - 1, "the test problem must have an interior best alpha"
    return vals[i]


@pytest.mark.parametrize("optimizer", ["gd", "lbfgs", optax.adam(0.3)], ids=["gd", "lbfgs", "adam"])
def test_outer_optimizers_reach_the_grid_optimum(optimizer):
    prob, crit = _split_problem()
    best = _grid_best(prob, crit)
    res = optimize_hyperparameters(prob, crit, optimizer=optimizer, max_iter=40)
    assert res.value <= best * 1.01
    lo, hi = hyper.default_bounds(prob)
    thetas = np.array(res.monitor.log_thetas)
    assert np.all(thetas >= lo - 1e-12) and np.all(thetas <= hi + 1e-12)
    assert len(res.monitor.values) == res.n_evals


def test_gd_steps_are_capped_and_monotone():
    prob, crit = _split_problem(1)
    res = optimize_hyperparameters(prob, crit, np.log([prob.alpha_max() * 0.9]), max_step=0.5)
    acc = [t for t, a in zip(res.monitor.log_thetas, res.monitor.accepted, strict=True) if a]
    steps = np.abs(np.diff(np.array(acc)[:, 0]))
    assert np.all(steps <= 0.5 + 1e-12)
    vals = [v for v, a in zip(res.monitor.values, res.monitor.accepted, strict=True) if a]
    assert np.all(np.diff(vals) <= 0)  # Armijo: accepted iterates never increase R


def test_minimize_hyper_quadratic_and_bounds():
    res = hyper.minimize_hyper(
        lambda t: (float(np.sum((t - 3.0) ** 2)), 2 * (t - 3.0)), [0.0, 0.0], bounds=(-1, 2)
    )
    np.testing.assert_allclose(res.log_theta, [2.0, 2.0])  # the projection onto the box
    with pytest.raises(ValueError, match="optimizer"):
        hyper.minimize_hyper(lambda t: (0.0, t), [0.0], optimizer="newton")


def test_lasso_hyper_cv_matches_lasso_cv():
    X, y = make_regression(150, 60, n_informative=10, noise=20.0, random_state=0)
    ref = LassoCV(cv=KFold(5), alphas=100, eps=1e-4, tol=1e-10, max_iter=100_000).fit(X, y)
    ref_best = ref.mse_path_.mean(axis=1).min()
    assert 0 < np.argmin(ref.mse_path_.mean(axis=1)) < 99  # interior best alpha
    est = LassoHyperCV(cv=5).fit(X, y)
    assert est.cv_loss_ <= 1.01 * ref_best
    # Same model family: refit coefficients predict like LassoCV's.
    assert est.score(X, y) == pytest.approx(ref.score(X, y), abs=0.02)
    assert est.n_iter_ >= 1 and len(est.path_.values) == est.n_evals_


def test_ridge_hyper_cv_matches_grid():
    X, y = make_regression(80, 30, noise=30.0, random_state=2)
    est = RidgeHyperCV(cv=4).fit(X, y)
    grid = np.geomspace(1e-3, 1e4, 300)
    cv = KFold(4)
    scores = [
        -cross_val_score(Ridge(alpha=a), X, y, cv=cv, scoring="neg_mean_squared_error").mean()
        for a in grid
    ]
    assert 0 < np.argmin(scores) < len(grid) - 1
    assert est.cv_loss_ <= 1.001 * min(scores)
    # RidgeCV's convention: Ridge(alpha_) on every (equal-size) training fold ...
    at_alpha = -cross_val_score(
        Ridge(alpha=est.alpha_), X, y, cv=cv, scoring="neg_mean_squared_error"
    ).mean()
    assert at_alpha == pytest.approx(est.cv_loss_, rel=1e-6)
    # ... and the refit is Ridge(alpha_) on all the data.
    ref = Ridge(alpha=est.alpha_).fit(X, y)
    np.testing.assert_allclose(est.coef_, ref.coef_, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(est.intercept_, ref.intercept_, rtol=1e-6, atol=1e-8)


def test_weighted_and_elastic_net_estimators_improve_on_lasso():
    X, y = make_regression(100, 30, n_informative=5, noise=10.0, random_state=3)
    lasso_est = LassoHyperCV(cv=3).fit(X, y)
    wl = WeightedLassoHyperCV(cv=3, max_iter=30).fit(X, y)
    en = ElasticNetHyperCV(cv=3).fit(X, y)
    assert wl.alphas_.shape == (30,)
    assert wl.cv_loss_ < lasso_est.cv_loss_
    assert en.cv_loss_ <= lasso_est.cv_loss_ * 1.001
    assert 0 < en.l1_ratio_ <= 1


def test_sparse_logistic_estimator():
    X, y = make_classification(120, 15, n_informative=4, class_sep=2.0, random_state=0)
    labels = np.array(["neg", "pos"])[y]
    est = SparseLogisticHyperCV(cv=3, max_iter=10).fit(X, labels)
    assert set(est.predict(X)) <= {"neg", "pos"}
    assert est.score(X, labels) > 0.75
    # Truth: scikit-learn's ℓ1 logistic regression at the equivalent C = 1/(n alpha).
    from sklearn.linear_model import LogisticRegression

    ref = LogisticRegression(
        l1_ratio=1.0, C=est.C_, solver="saga", tol=1e-12, max_iter=100_000
    ).fit(X, labels)
    np.testing.assert_allclose(est.coef_, ref.coef_, atol=2e-4)
    np.testing.assert_allclose(est.intercept_, ref.intercept_, atol=2e-4)
    assert est.predict_proba(X).shape == (120, 2)
    with pytest.raises(ValueError, match="Only binary"):
        SparseLogisticHyperCV().fit(X, np.arange(120) % 3)


def test_plot_convergence_smoke():
    import matplotlib

    matplotlib.use("Agg")
    prob, crit = _split_problem()
    res = optimize_hyperparameters(prob, crit, max_iter=5)
    fig = hyper.plot_convergence({"hypergradient": res.monitor})
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 1


def _expected_failures(estimator):
    # Integer weights are not row repetitions for a cross-validated estimator: repeating a
    # row changes the folds (scikit-learn's own CV estimators fail this check too).
    return {
        "check_sample_weight_equivalence_on_dense_data": "CV folds depend on the rows",
        "check_sample_weight_equivalence_on_sparse_data": "CV folds depend on the rows",
    }


@parametrize_with_checks(
    [
        # One outer iteration and no coarse path keep the ~50 fits per estimator fast; the
        # search itself is tested above and in test_hyper_robustness.py.
        LassoHyperCV(cv=2, max_iter=1, n_path=0),
        ElasticNetHyperCV(cv=2, max_iter=1, max_iter_lasso=1, n_path=0),
        WeightedLassoHyperCV(cv=2, max_iter=1, max_iter_lasso=1, n_path=0),
        RidgeHyperCV(cv=2, max_iter=1, n_path=0),
        # A loose inner tolerance keeps the fits of the checks fast; the accuracy of the
        # default solver is tested above.
        SparseLogisticHyperCV(cv=2, max_iter=1, n_path=0, solver=ProxCD(tol=1e-4, max_epochs=100)),
    ],
    expected_failed_checks=_expected_failures,
)
def test_sklearn_compatible(estimator, check):
    check(estimator)
