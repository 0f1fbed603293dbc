""":class:`~dargmin.hyper.ProxNewton` (the logistic search and refit solver) against
independent references: scikit-learn's liblinear on the same objective, SciPy's L-BFGS-B on
the split problem (:class:`~dargmin.hyper.SplitLBFGSB`), and the KKT conditions."""

import warnings

import numpy as np
import pytest
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression

from dargmin.hyper import ProxNewton, SparseLogisticHyperCV, SplitLBFGSB, lasso, sparse_logistic
from dargmin.hyper._inner_solvers import kkt_violation


def _labels(y01):
    return np.where(y01 == 1, 1.0, -1.0)


@pytest.mark.parametrize(("n", "p", "alpha"), [(80, 12, 0.05), (80, 12, 0.005), (40, 100, 0.01)])
def test_matches_liblinear_l1_logistic(n, p, alpha):
    X, y01 = make_classification(n, p, n_informative=4, random_state=0)
    # liblinear minimizes ‖w‖₁ + C Σ log(1 + e^{−yᵢxᵢᵀw}): ours divided by C n, α = 1/(C n).
    ref = LogisticRegression(
        C=1.0 / (n * alpha), l1_ratio=1.0, solver="liblinear", fit_intercept=False, tol=1e-12,
        max_iter=10_000,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.fit(X, y01)
    res = ProxNewton(tol=1e-10).solve(
        sparse_logistic(X, _labels(y01), fit_intercept=False), [np.log(alpha)]
    )
    assert res.converged and res.kkt <= 1e-10
    np.testing.assert_allclose(res.coef, ref.coef_[0], atol=5e-5)
    # Exact zeros off the support (the hypergradient's support is read from them).
    assert np.array_equal(res.coef != 0, np.abs(ref.coef_[0]) > 1e-8)


@pytest.mark.parametrize("alpha", [0.1, 1e-3, 1e-4])
def test_matches_split_lbfgsb_with_an_intercept(alpha):
    # p > n, correlated columns and an unpenalized intercept, down to α where the model's
    # coordinate descent is slow (the solver must still reach the tolerance).
    X, y01 = make_classification(60, 90, n_informative=6, random_state=3)
    prob = sparse_logistic(X, _labels(y01))
    ref = SplitLBFGSB(tol=1e-11).solve(prob, [np.log(alpha)])
    res = ProxNewton(tol=1e-10).solve(prob, [np.log(alpha)])
    assert res.converged
    assert kkt_violation(prob, res.coef, [np.log(alpha)]) <= 1e-10
    np.testing.assert_allclose(res.coef, ref.coef, atol=1e-6 * max(1.0, np.abs(ref.coef).max()))


def test_warm_start_takes_fewer_steps_and_separable_data_converge():
    X, y01 = make_classification(100, 20, n_informative=5, class_sep=3.0, random_state=1)
    prob = sparse_logistic(X, _labels(y01))
    solver = ProxNewton(tol=1e-10)
    cold = solver.solve(prob, [np.log(0.01)])
    warm = solver.solve(prob, [np.log(0.009)], w0=cold.coef)
    again = solver.solve(prob, [np.log(0.009)])
    assert warm.converged and again.converged
    assert warm.n_iter < again.n_iter
    np.testing.assert_allclose(warm.coef, again.coef, atol=1e-7)


def test_refuses_what_it_does_not_solve():
    X = np.random.default_rng(0).normal(size=(20, 4))
    with pytest.raises(ValueError, match="ProxNewton handles"):
        ProxNewton().solve(lasso(X, X[:, 0]), [0.0])
    assert not ProxNewton.supports(lasso(X, X[:, 0]))
    assert ProxNewton.supports(sparse_logistic(X, np.sign(X[:, 0])))


def test_path_probes_keep_the_logistic_search(monkeypatch):
    # The coarse path's probes (ProxNewton at 100x its tolerance) against the same search
    # without probes: the same path values where both solved fully, the same selection.
    from sklearn.model_selection import StratifiedKFold

    from dargmin.hyper import _outer

    X, y01 = make_classification(150, 40, n_informative=5, random_state=1)
    monkeypatch.setattr(_outer, "PATH_PROBE_BELOW", np.inf)  # probe every point
    probed = SparseLogisticHyperCV(cv=StratifiedKFold(3)).fit(X, y01)
    monkeypatch.setattr(_outer, "PATH_PROBE_BELOW", -np.inf)  # never
    full = SparseLogisticHyperCV(cv=StratifiedKFold(3)).fit(X, y01)
    n = full.path_.accepted.index(True)
    assert probed.path_.accepted.index(True) == n
    p, f = probed.cv_loss_path_[:n], full.cv_loss_path_[:n]
    np.testing.assert_allclose(p[:-1], f[:-1], rtol=1e-4)
    # Stopped on the probe: a loose value, not the full solve's, above the rise threshold.
    assert (1 + _outer.PATH_RISE) * p[:-1].min() < p[-1] != f[-1]
    np.testing.assert_allclose(probed.alpha_, full.alpha_, rtol=1e-2)
    np.testing.assert_allclose(probed.cv_loss_, full.cv_loss_, rtol=1e-4)
