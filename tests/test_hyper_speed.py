"""The speed-ups of the estimators' search, checked against independent references.

* :class:`~dargmin.hyper.SplitLBFGSB` (the logistic search and refit solver) against
  scikit-learn's liblinear and Lasso solvers on the same objectives;
* the coarse path's early stop and bracket against the CV curve of scikit-learn's Lasso,
  solved to 1e-10 on a fine grid (the converged curve the search must reach).
"""

import warnings

import numpy as np
import pytest
from sklearn.datasets import make_classification, make_regression
from sklearn.linear_model import Lasso, LogisticRegression
from sklearn.model_selection import KFold

from dargmin.hyper import (
    CrossVal,
    HeldOutMSE,
    LassoHyperCV,
    Monitor,
    SplitLBFGSB,
    lasso,
    optimize_hyperparameters,
    sparse_logistic,
)
from dargmin.hyper._outer import PATH_RISE


@pytest.mark.parametrize("alpha", [0.05, 0.005])
def test_split_lbfgsb_matches_liblinear_l1_logistic(alpha):
    X, y01 = make_classification(80, 12, n_informative=4, random_state=0)
    y = np.where(y01 == 1, 1.0, -1.0)
    n = X.shape[0]
    # liblinear minimizes ‖w‖₁ + C Σ log(1 + e^{−yᵢxᵢᵀw}): ours divided by C n, α = 1/(C n).
    ref = LogisticRegression(
        C=1.0 / (n * alpha), l1_ratio=1.0, solver="liblinear", fit_intercept=False, tol=1e-12
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.fit(X, y01)
    res = SplitLBFGSB(tol=1e-10).solve(sparse_logistic(X, y, fit_intercept=False), [np.log(alpha)])
    assert res.converged
    np.testing.assert_allclose(res.coef, ref.coef_[0], atol=2e-5)
    # Exact zeros off the support (the hypergradient's support is read from them).
    assert np.array_equal(res.coef != 0, np.abs(ref.coef_[0]) > 1e-8)


def test_split_lbfgsb_matches_sklearn_lasso_with_intercept():
    X, y = make_regression(50, 20, n_informative=5, noise=2.0, random_state=1)
    prob = lasso(X, y)  # the intercept is a free (unsplit) coordinate
    res = SplitLBFGSB(tol=1e-10).solve(prob, [np.log(0.5)])
    ref = Lasso(alpha=0.5, tol=1e-12, max_iter=100_000).fit(X, y)
    coef, intercept = prob.coef_intercept(res.coef)
    np.testing.assert_allclose(coef, ref.coef_, atol=1e-6)
    np.testing.assert_allclose(intercept, ref.intercept_, atol=1e-6)


def _converged_cv_curve(X, y, alphas, cv):
    """The 5-fold CV MSE of scikit-learn's Lasso solved to 1e-10 at each alpha."""
    out = []
    for a in alphas:
        errs = []
        for tr, te in cv.split(X):
            m = Lasso(alpha=a, tol=1e-10, max_iter=100_000).fit(X[tr], y[tr])
            errs.append(np.mean((m.predict(X[te]) - y[te]) ** 2))
        out.append(np.mean(errs))
    return np.array(out)


def test_early_stopped_path_still_reaches_the_converged_cv_optimum():
    X, y = make_regression(60, 80, n_informative=6, noise=8.0, random_state=3)
    cv = KFold(5)
    prob, mon = lasso(X, y), Monitor()
    res = optimize_hyperparameters(prob, CrossVal(HeldOutMSE, cv=cv), n_path=10, monitor=mon)
    # The path's records come first, none accepted; the descent's starting record (the
    # best path point again) is the first accepted one.
    n_path = mon.accepted.index(True)
    path = np.array(mon.values[:n_path])
    # The path stopped early, on a rise of more than PATH_RISE above its best point...
    assert n_path < 10
    assert path[n_path - 1] > (1 + PATH_RISE) * np.min(path[:n_path])
    # ... and the search still found the minimum of the converged CV curve (fine grid).
    grid = np.exp(np.linspace(np.log(prob.alpha_max()), np.log(prob.alpha_max() * 1e-3), 80))
    curve = _converged_cv_curve(X, y, grid, cv)
    alpha = float(np.exp(res.log_theta[0]))
    at_ours = _converged_cv_curve(X, y, [alpha], cv)[0]
    assert at_ours <= 1.005 * curve.min()


def test_lasso_estimator_refit_matches_sklearn_at_its_alpha():
    X, y = make_regression(60, 30, n_informative=5, noise=5.0, random_state=4)
    est = LassoHyperCV(cv=KFold(3), n_path=6).fit(X, y)
    ref = Lasso(alpha=est.alpha_, tol=1e-12, max_iter=100_000).fit(X, y)
    np.testing.assert_allclose(est.coef_, ref.coef_, atol=1e-5)
