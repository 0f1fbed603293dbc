"""scikit-learn estimators that select their regularization by hypergradient descent.

Each estimator minimizes the K-fold cross-validation loss over its hyperparameters (log
scale) with :func:`~dargmin.hyper.optimize_hyperparameters`, then refits on all the data:
the hypergradient analogue of :class:`sklearn.linear_model.LassoCV`, with a continuous
search instead of a grid (and so usable with one hyperparameter per feature). The shared
parameters, validation and fit are in ``_estimator_base``; the docstrings' shared sections
in ``_estimator_docs``.
"""

from __future__ import annotations

import warnings
from numbers import Integral, Real
from typing import Any, ClassVar

import numpy as np
from sklearn.utils._param_validation import Interval

from dargmin.diagnostics import DargminWarning
from dargmin.hyper._criteria import CrossVal
from dargmin.hyper._estimator_base import (  # noqa: F401 - re-exported (historical home)
    _BASE_CONSTRAINTS,
    SEARCH_TOL_CD,
    SEARCH_TOL_SKLEARN,
    SEARCH_XTOL,
    SPARSE_DENSIFY_MAX,
    _dense,
    _HyperCVBase,
    _path_solver,
    _Regressor,
    _search_solver,
    _store_params,
)
from dargmin.hyper._estimator_docs import PARAM_MAX_ITER_LASSO, document_regressor
from dargmin.hyper._models import elastic_net, lasso, ridge, weighted_lasso
from dargmin.hyper._outer import default_bounds, optimize_hyperparameters


def _lasso_start(est: _HyperCVBase, X: np.ndarray, y: np.ndarray, max_iter: int) -> float:
    """``log alpha`` of the single-alpha CV optimum (a warm start for richer models)."""
    single = lasso(X, y, fit_intercept=est.fit_intercept)
    search_solver = _search_solver(est.solver, single)
    res = optimize_hyperparameters(
        single,
        CrossVal(est._criterion, cv=est.cv),
        method=est.method,
        solver=search_solver,
        path_solver=_path_solver(search_solver),
        max_iter=max_iter,
        n_path=est.n_path,
        xtol=SEARCH_XTOL,
        n_jobs=est.n_jobs,
    )
    return float(res.log_theta[0])


class _LassoStarted(_Regressor):
    """The richer models whose search starts from the single-``alpha`` Lasso optimum."""

    _parameter_constraints: ClassVar[dict] = {
        **_BASE_CONSTRAINTS,
        "max_iter_lasso": [Interval(Integral, 0, None, closed="left")],
    }

    def __init__(
        self,
        *,
        cv: Any = 5,
        method: str = "implicit",
        optimizer: Any = "gd",
        solver: Any = "auto",
        max_iter: int = 30,
        max_iter_lasso: int = 20,
        fit_intercept: bool = True,
        verbose: bool = False,
        n_path: int = 10,
        n_jobs: int | None = None,
    ):
        _store_params(self, locals())


@document_regressor(
    """Lasso whose ``alpha`` minimizes the K-fold CV error, found by hypergradient descent.

    Objective (scikit-learn's convention): ``‖y − Xw − b‖²/(2n) + alpha ‖w‖₁``. The CV
    criterion is minimized over ``log alpha``, with gradients by implicit differentiation
    restricted to the support (:class:`~dargmin.hyper.ImplicitSupport` by default); the
    model is then refit on all the data. The hypergradient analogue of
    :class:`sklearn.linear_model.LassoCV`, with a continuous search instead of a grid.
    """,
    parameters="""
    alpha0 : float or None, default=None
        Starting ``alpha`` of the descent (default: the best point of the coarse path,
        or ``alpha_max / 10`` when ``n_path=0``).
    """,
    attributes="""
    alpha_ : float
        Selected regularization strength (scikit-learn's ``Lasso`` units: the same
        ``alpha`` on every fold and in the refit, as ``LassoCV.alpha_``).
    alphas_ : ndarray of shape (n_evals,)
        Every evaluated ``alpha``, in evaluation order (with ``cv_loss_path_``).
    """,
    see_also="""
    dargmin.hyper.optimize_hyperparameters : The search this estimator runs.
    WeightedLassoHyperCV : One ``alpha`` per feature.
    """,
    examples="""
    >>> from sklearn.datasets import make_regression
    >>> from dargmin.hyper import ImplicitSupport, LBFGSB
    >>> X, y = make_regression(60, 20, n_informative=4, noise=5.0, random_state=0)
    >>> est = LassoHyperCV(cv=3, method=ImplicitSupport(), optimizer=LBFGSB()).fit(X, y)
    >>> est.alpha_ > 0, est.score(X, y) > 0.9
    (True, True)
    """,
)
class LassoHyperCV(_Regressor):
    _parameter_constraints: ClassVar[dict] = {
        **_BASE_CONSTRAINTS,
        "alpha0": [Interval(Real, 0, None, closed="neither"), None],
    }

    def __init__(
        self,
        *,
        alpha0: float | None = None,
        cv: Any = 5,
        method: str = "implicit",
        optimizer: Any = "gd",
        solver: Any = "auto",
        max_iter: int = 30,
        fit_intercept: bool = True,
        verbose: bool = False,
        n_path: int = 10,
        n_jobs: int | None = None,
    ):
        _store_params(self, locals())

    def _make_problem(self, X, y):
        return lasso(X, y, fit_intercept=self.fit_intercept)

    def _initial_log_theta(self, problem, X, y):
        if self.alpha0 is None:
            return None
        amax = problem.alpha_max()
        if self.alpha0 >= amax:
            # ŵ = 0 for every fold near α_max: R is flat there and its gradient is 0, so a
            # descent would stop at once on the null model.
            warnings.warn(
                f"alpha0 = {self.alpha0:.4g} >= alpha_max = {amax:.4g}: every coefficient is "
                "zero there and the hypergradient vanishes; starting from the best point of "
                "the coarse path instead.",
                DargminWarning,
                stacklevel=5,
            )
            return None
        return np.array([np.log(self.alpha0)])

    def _set_hyper_attributes(self, log_theta, problem):
        self.alpha_ = float(np.exp(log_theta[0]))
        self.alphas_ = np.exp(self.log_theta_path_[:, 0])


@document_regressor(
    """Elastic net with ``(alpha, l1_ratio)`` tuned by hypergradient descent on the CV error.

    Internally ``‖y − Xw − b‖²/(2n) + λ‖w‖₁ + ½μ‖w‖²`` with ``(log λ, log μ)`` optimized,
    starting from the single-``alpha`` Lasso optimum (``max_iter_lasso`` iterations) with a
    negligible ℓ2 term; in scikit-learn's parametrization ``alpha_ = λ + μ`` and
    ``l1_ratio_ = λ / alpha_``.
    """,
    parameters=PARAM_MAX_ITER_LASSO,
    attributes="""
    alpha_ : float
        Selected ``alpha`` (scikit-learn's ``ElasticNet`` convention).
    l1_ratio_ : float
        Selected ``l1_ratio``.
    """,
    see_also="""
    LassoHyperCV : The ℓ1-only model.
    """,
    examples="""
    >>> from sklearn.datasets import make_regression
    >>> X, y = make_regression(60, 20, n_informative=4, noise=5.0, random_state=0)
    >>> est = ElasticNetHyperCV(cv=3).fit(X, y)
    >>> 0 < est.l1_ratio_ < 1
    True
    """,
)
class ElasticNetHyperCV(_LassoStarted):
    def _make_problem(self, X, y):
        return elastic_net(X, y, fit_intercept=self.fit_intercept)

    def _initial_log_theta(self, problem, X, y):
        # Start from the single-alpha Lasso optimum with a negligible ridge term (the lower
        # end of the μ range): the elastic-net search then only has to improve on the Lasso.
        t = _lasso_start(self, X, y, self.max_iter_lasso)
        return np.array([t, default_bounds(problem)[0][1] + np.log(10.0)])

    def _set_hyper_attributes(self, log_theta, problem):
        lam, mu = np.exp(log_theta)
        self.alpha_ = float(lam + mu)
        self.l1_ratio_ = float(lam / (lam + mu))


@document_regressor(
    """Weighted Lasso with one penalty per feature, tuned by hypergradient descent.

    ``‖y − Xw − b‖²/(2n) + Σⱼ αⱼ|wⱼ|`` with the ``p`` values ``log αⱼ`` optimized on the CV
    error (a search no grid can do). The search starts from the single-``alpha`` optimum
    found by :class:`LassoHyperCV`'s procedure (``max_iter_lasso`` iterations);
    ``path_``, ``n_iter_`` and ``n_evals_`` cover the per-feature phase only.
    """,
    parameters=PARAM_MAX_ITER_LASSO,
    attributes="""
    alphas_ : ndarray of shape (n_features,)
        Selected per-feature penalties.
    """,
    see_also="""
    LassoHyperCV : A single ``alpha``.
    """,
    examples="""
    >>> from sklearn.datasets import make_regression
    >>> X, y = make_regression(60, 10, n_informative=3, noise=5.0, random_state=0)
    >>> WeightedLassoHyperCV(cv=3, max_iter=5).fit(X, y).alphas_.shape
    (10,)
    """,
)
class WeightedLassoHyperCV(_LassoStarted):
    def _make_problem(self, X, y):
        return weighted_lasso(X, y, fit_intercept=self.fit_intercept)

    def _initial_log_theta(self, problem, X, y):
        return np.full(problem.n_hyper, _lasso_start(self, X, y, self.max_iter_lasso))

    def _set_hyper_attributes(self, log_theta, problem):
        self.alphas_ = np.exp(log_theta)


@document_regressor(
    """Ridge regression with ``alpha`` tuned by hypergradient descent on the CV error.

    Internally ``‖y − Xw − b‖²/(2n) + ½μ‖w‖²`` (``μ`` is per-sample normalized, so one
    value means the same regularization on every CV fold); ``alpha_ = n μ`` is reported in
    scikit-learn's ``Ridge`` convention ``‖y − Xw − b‖² + alpha‖w‖²`` for the ``n`` samples
    of the final refit (on a fold of ``n_k`` samples the equivalent is ``n_k μ``). The
    inner problem is smooth: "auto" solves it exactly (:class:`~dargmin.hyper.RidgeDirect`)
    and the implicit hypergradient uses the whole Hessian.
    """,
    attributes="""
    alpha_ : float
        Selected strength in ``RidgeCV``'s convention: ``Ridge(alpha=alpha_)`` on each
        training fold gives ``cv_loss_`` (exactly when the folds have equal sizes) and the
        refit is ``Ridge(alpha=alpha_)`` on all the data.
    """,
    see_also="""
    sklearn.linear_model.RidgeCV : Grid search with efficient leave-one-out.
    """,
    examples="""
    >>> from sklearn.datasets import make_regression
    >>> X, y = make_regression(60, 10, noise=5.0, random_state=0)
    >>> RidgeHyperCV(cv=3).fit(X, y).alpha_ > 0
    True
    """,
)
class RidgeHyperCV(_Regressor):
    def _make_problem(self, X, y):
        return ridge(X, y, fit_intercept=self.fit_intercept)

    def _refit_log_theta(self, log_theta, problem, folds):
        # RidgeCV's convention: one alpha for ‖y − Xw‖² + alpha‖w‖² on every training
        # fold, then refit with the same alpha. Our μ is per sample (μ = alpha/n_k), so
        # alpha_ = n̄ μ with n̄ the mean training-fold size, and the refit uses alpha_/n.
        n_bar = float(np.mean([p.n_samples for p, _ in folds]))
        self._alpha = n_bar * float(np.exp(log_theta[0]))
        return np.array([np.log(self._alpha / problem.n_samples)])

    def _set_hyper_attributes(self, log_theta, problem):
        self.alpha_ = float(getattr(self, "_alpha", problem.n_samples * np.exp(log_theta[0])))
