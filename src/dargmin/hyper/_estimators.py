"""scikit-learn estimators that select their regularization by hypergradient descent.

Each estimator minimizes the K-fold cross-validation loss over its hyperparameters (log
scale) with :func:`~dargmin.hyper.optimize_hyperparameters`, then refits on all the data:
the hypergradient analogue of :class:`sklearn.linear_model.LassoCV`, with a continuous
search instead of a grid (and so usable with one hyperparameter per feature).
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from dargmin.diagnostics import DargminWarning
from dargmin.hyper._criteria import CrossVal, HeldOutMSE
from dargmin.hyper._outer import default_bounds, optimize_hyperparameters
from dargmin.hyper._problems import (
    HyperProblem,
    elastic_net,
    lasso,
    ridge,
    weighted_lasso,
)
from dargmin.hyper._registry import resolve


class _HyperCVBase(BaseEstimator):
    """Shared fit logic; subclasses define the model and how ``θ`` maps to attributes."""

    _criterion: Any = HeldOutMSE

    def _make_problem(self, X: np.ndarray, y: np.ndarray) -> HyperProblem:
        raise NotImplementedError

    def _initial_log_theta(self, problem: HyperProblem, X, y) -> np.ndarray | None:
        return None

    def _set_hyper_attributes(self, log_theta: np.ndarray, problem: HyperProblem) -> None:
        raise NotImplementedError

    def _check_params(self) -> None:
        if not (isinstance(self.max_iter, int | np.integer) and self.max_iter >= 0):
            raise ValueError(f"max_iter must be a non-negative integer, got {self.max_iter!r}.")
        if isinstance(self.cv, int | np.integer) and self.cv < 2:
            raise ValueError(f"cv must be >= 2 folds, got {self.cv}.")

    def _split(self, y: np.ndarray) -> Any:
        return self.cv

    def _fit(self, X: np.ndarray, y: np.ndarray) -> _HyperCVBase:
        self._check_params()
        with jax.enable_x64(True):
            problem = self._make_problem(X, y)
            cv = self._split(y)
            if isinstance(cv, int | np.integer) and cv > X.shape[0]:
                raise ValueError(f"cv={cv} folds needs at least {cv} samples, got {X.shape[0]}.")
            criterion = CrossVal(self._criterion, cv=cv)
            reason = problem.null_model_reason()
            if reason is not None:
                return self._fit_null_model(problem, reason)
            theta0 = self._initial_log_theta(problem, X, y)
            res = optimize_hyperparameters(
                problem,
                criterion,
                theta0,
                method=self.method,
                optimizer=self.optimizer,
                solver=self.solver,
                bounds=default_bounds(problem),
                max_iter=self.max_iter,
                progress=self.verbose,
            )
            # Refit on all the training data at the selected hyperparameters.
            solver = resolve("solver", self.solver, problem)
            coef_full = solver.solve(problem, res.log_theta).coef
        coef, intercept = problem.coef_intercept(coef_full)
        self.coef_ = coef
        self.intercept_ = intercept
        self.log_theta_ = np.asarray(res.log_theta)
        self.path_ = res.monitor
        self.n_iter_ = int(res.n_iter)
        self.n_evals_ = int(res.n_evals)
        self.cv_score_ = float(res.value)
        self._set_hyper_attributes(self.log_theta_, problem)
        return self

    def _fit_null_model(self, problem: HyperProblem, reason: str) -> _HyperCVBase:
        """Every penalty gives ``ŵ = 0``: no search; the strongest penalty of the box."""
        from dargmin.hyper._optimizers import Monitor

        log_theta = np.asarray(default_bounds(problem)[1], dtype=float)
        warnings.warn(
            f"{type(self).__name__}: {reason}, so the fitted coefficients are zero for every "
            "regularization strength and there is nothing to select; the upper end of the "
            f"search box, log_theta = {np.round(log_theta, 4).tolist()[:5]}, is reported "
            "(α_max falls back to 1 when it is 0). Check the data (e.g. y or X constant).",
            DargminWarning,
            stacklevel=4,
        )
        coef_full = resolve("solver", self.solver, problem).solve(problem, log_theta).coef
        coef, intercept = problem.coef_intercept(coef_full)
        self.coef_, self.intercept_ = coef, intercept
        self.log_theta_ = log_theta
        self.path_ = Monitor()
        self.n_iter_, self.n_evals_ = 0, 0
        self.cv_score_ = float("nan")
        self._set_hyper_attributes(self.log_theta_, problem)
        return self

    def _decision(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "coef_")
        X = validate_data(self, X, reset=False)
        return X @ self.coef_ + self.intercept_

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False
        return tags


# The shared parameter section, imported by _classifier.py. The regressors below spell it
# out in their own docstrings: a docstring must be one string literal, or ``__doc__`` is None.
_COMMON_PARAMS_DOC = """
    cv : int or cross-validation splitter, default=5
        Folds of the cross-validation criterion (mean held-out loss over folds).
    method : str or HypergradientMethod, default="implicit"
        Hypergradient method (:func:`dargmin.hyper.hypergradient`): an object such as
        ``ImplicitSupport()`` or a name ("implicit", "implicit_forward", "forward", "reverse").
    optimizer : "gd", "lbfgs", an optimizer object or an optax optimizer, default="gd"
        Outer optimizer (:func:`dargmin.hyper.minimize_hyper`).
    solver : str or solver object, default="auto"
        Inner solver: "auto", "cd", "fista", "sklearn" or an instance.
    max_iter : int, default=30
        Maximal number of outer iterations.
    fit_intercept : bool, default=True
        Fit an unpenalized intercept.
    verbose : bool, default=False
        Show a tqdm progress bar.
"""


class _Regressor(RegressorMixin, _HyperCVBase):
    def fit(self, X: Any, y: Any) -> _Regressor:
        """Select the hyperparameters by hypergradient descent on the CV loss, then refit.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)

        Returns
        -------
        self
        """
        X, y = validate_data(self, X, y, y_numeric=True, ensure_min_samples=2, dtype=np.float64)
        return self._fit(X, y)

    def predict(self, X: Any) -> np.ndarray:
        """Linear predictions ``X coef_ + intercept_``."""
        return self._decision(X)


def _lasso_start(est: _HyperCVBase, X: np.ndarray, y: np.ndarray, max_iter: int) -> float:
    """``log alpha`` of the single-alpha CV optimum (a warm start for richer models)."""
    single = lasso(X, y, fit_intercept=est.fit_intercept)
    res = optimize_hyperparameters(
        single, CrossVal(est._criterion, cv=est.cv), solver=est.solver, max_iter=max_iter
    )
    return float(res.log_theta[0])


class LassoHyperCV(_Regressor):
    """Lasso whose ``alpha`` minimizes the K-fold CV error, found by hypergradient descent.

    Objective (scikit-learn's convention): ``‖y − Xw − b‖²/(2n) + alpha ‖w‖₁``. The CV
    criterion is minimized over ``log alpha``, with gradients by implicit differentiation
    restricted to the support (:class:`~dargmin.hyper.ImplicitSupport` by default); the
    model is then refit on all the data. The hypergradient analogue of
    :class:`sklearn.linear_model.LassoCV`, with a continuous search instead of a grid.

    Parameters
    ----------
    alpha0 : float or None, default=None
        Starting ``alpha`` (default ``alpha_max / 10``).
    cv : int or cross-validation splitter, default=5
        Folds of the criterion, :class:`~dargmin.hyper.CrossVal` (mean held-out loss).
    method : str or HypergradientMethod, default="implicit"
        Hypergradient method: an object (:class:`~dargmin.hyper.ImplicitSupport`,
        :class:`~dargmin.hyper.ImplicitForward`, :class:`~dargmin.hyper.Unrolled`) or a
        name of :data:`~dargmin.hyper.REGISTRY` ("implicit", "implicit_forward",
        "forward", "reverse").
    optimizer : str, optimizer object or optax optimizer, default="gd"
        Outer optimizer: :class:`~dargmin.hyper.ProjectedGradientDescent` ("gd"),
        :class:`~dargmin.hyper.LBFGSB` ("lbfgs"), :class:`~dargmin.hyper.OptaxOptimizer`
        or an ``optax.GradientTransformation``.
    solver : str or InnerSolver, default="auto"
        Inner solver: an object (:class:`~dargmin.hyper.ProxCD`,
        :class:`~dargmin.hyper.FISTA`, :class:`~dargmin.hyper.SklearnSolver`...) or a name
        ("auto", "cd", "fista", "ista", "sklearn", "direct"); "auto" is
        :func:`~dargmin.hyper.default_solver`.
    max_iter : int, default=30
        Maximal number of outer iterations.
    fit_intercept : bool, default=True
        Fit an unpenalized intercept.
    verbose : bool, default=False
        Show a tqdm progress bar.

    Attributes
    ----------
    alpha_ : float
        Selected regularization strength.
    coef_ : ndarray of shape (n_features,)
        Coefficients refit on all the data at the selected hyperparameters.
    intercept_ : float
        Intercept of the refit (0 when ``fit_intercept=False``).
    log_theta_ : ndarray of shape (n_hyper,)
        Selected hyperparameters in log scale.
    path_ : dargmin.hyper.Monitor
        Every evaluation of the outer search (time, log θ, CV loss, gradient norm).
    n_iter_ : int
        Outer iterations.
    n_evals_ : int
        Criterion evaluations (each solves ``cv`` inner problems).
    cv_score_ : float
        Mean CV loss at the selected hyperparameters.
    n_features_in_ : int
        Number of features seen by :meth:`fit`.

    See Also
    --------
    dargmin.hyper.optimize_hyperparameters : The search this estimator runs.
    WeightedLassoHyperCV : One ``alpha`` per feature.

    Examples
    --------
    >>> from sklearn.datasets import make_regression
    >>> from dargmin.hyper import ImplicitSupport, LBFGSB
    >>> X, y = make_regression(60, 20, n_informative=4, noise=5.0, random_state=0)
    >>> est = LassoHyperCV(cv=3, method=ImplicitSupport(), optimizer=LBFGSB()).fit(X, y)
    >>> est.alpha_ > 0, est.score(X, y) > 0.9
    (True, True)
    """

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
    ):
        self.alpha0 = alpha0
        self.cv = cv
        self.method = method
        self.optimizer = optimizer
        self.solver = solver
        self.max_iter = max_iter
        self.fit_intercept = fit_intercept
        self.verbose = verbose

    def _make_problem(self, X, y):
        return lasso(X, y, fit_intercept=self.fit_intercept)

    def _initial_log_theta(self, problem, X, y):
        if self.alpha0 is None:
            return None
        if not (np.isfinite(self.alpha0) and self.alpha0 > 0):
            raise ValueError(f"alpha0 must be a positive finite number, got {self.alpha0!r}.")
        return np.array([np.log(self.alpha0)])

    def _set_hyper_attributes(self, log_theta, problem):
        self.alpha_ = float(np.exp(log_theta[0]))


class ElasticNetHyperCV(_Regressor):
    """Elastic net with ``(alpha, l1_ratio)`` tuned by hypergradient descent on the CV error.

    Internally ``‖y − Xw − b‖²/(2n) + λ‖w‖₁ + ½μ‖w‖²`` with ``(log λ, log μ)`` optimized,
    starting from the single-``alpha`` Lasso optimum (``max_iter_lasso`` iterations) with a
    negligible ℓ2 term; in scikit-learn's parametrization ``alpha_ = λ + μ`` and
    ``l1_ratio_ = λ / alpha_``.

    Parameters
    ----------
    cv : int or cross-validation splitter, default=5
        Folds of the criterion, :class:`~dargmin.hyper.CrossVal` (mean held-out loss).
    method : str or HypergradientMethod, default="implicit"
        Hypergradient method: an object (:class:`~dargmin.hyper.ImplicitSupport`,
        :class:`~dargmin.hyper.ImplicitForward`, :class:`~dargmin.hyper.Unrolled`) or a
        name of :data:`~dargmin.hyper.REGISTRY` ("implicit", "implicit_forward",
        "forward", "reverse").
    optimizer : str, optimizer object or optax optimizer, default="gd"
        Outer optimizer: :class:`~dargmin.hyper.ProjectedGradientDescent` ("gd"),
        :class:`~dargmin.hyper.LBFGSB` ("lbfgs"), :class:`~dargmin.hyper.OptaxOptimizer`
        or an ``optax.GradientTransformation``.
    solver : str or InnerSolver, default="auto"
        Inner solver: an object (:class:`~dargmin.hyper.ProxCD`,
        :class:`~dargmin.hyper.FISTA`, :class:`~dargmin.hyper.SklearnSolver`...) or a name
        ("auto", "cd", "fista", "ista", "sklearn", "direct"); "auto" is
        :func:`~dargmin.hyper.default_solver`.
    max_iter : int, default=30
        Maximal number of outer iterations.
    fit_intercept : bool, default=True
        Fit an unpenalized intercept.
    verbose : bool, default=False
        Show a tqdm progress bar.
    max_iter_lasso : int, default=20
        Outer iterations of the initial single-``alpha`` Lasso search.

    Attributes
    ----------
    alpha_ : float
        Selected ``alpha`` (scikit-learn's ``ElasticNet`` convention).
    l1_ratio_ : float
        Selected ``l1_ratio``.
    coef_ : ndarray of shape (n_features,)
        Coefficients refit on all the data at the selected hyperparameters.
    intercept_ : float
        Intercept of the refit (0 when ``fit_intercept=False``).
    log_theta_ : ndarray of shape (n_hyper,)
        Selected hyperparameters in log scale.
    path_ : dargmin.hyper.Monitor
        Every evaluation of the outer search (time, log θ, CV loss, gradient norm).
    n_iter_ : int
        Outer iterations.
    n_evals_ : int
        Criterion evaluations (each solves ``cv`` inner problems).
    cv_score_ : float
        Mean CV loss at the selected hyperparameters.
    n_features_in_ : int
        Number of features seen by :meth:`fit`.

    See Also
    --------
    LassoHyperCV : The ℓ1-only model.

    Examples
    --------
    >>> from sklearn.datasets import make_regression
    >>> X, y = make_regression(60, 20, n_informative=4, noise=5.0, random_state=0)
    >>> est = ElasticNetHyperCV(cv=3).fit(X, y)
    >>> 0 < est.l1_ratio_ < 1
    True
    """

    def __init__(
        self,
        *,
        cv: Any = 5,
        method: str = "implicit",
        optimizer: Any = "gd",
        solver: Any = "auto",
        max_iter: int = 30,
        fit_intercept: bool = True,
        max_iter_lasso: int = 20,
        verbose: bool = False,
    ):
        self.cv = cv
        self.method = method
        self.optimizer = optimizer
        self.solver = solver
        self.max_iter = max_iter
        self.fit_intercept = fit_intercept
        self.max_iter_lasso = max_iter_lasso
        self.verbose = verbose

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


class WeightedLassoHyperCV(_Regressor):
    """Weighted Lasso with one penalty per feature, tuned by hypergradient descent.

    ``‖y − Xw − b‖²/(2n) + Σⱼ αⱼ|wⱼ|`` with the ``p`` values ``log αⱼ`` optimized on the CV
    error (a search no grid can do). The search starts from the single-``alpha`` optimum
    found by :class:`LassoHyperCV`'s procedure (``max_iter_lasso`` iterations);
    ``path_``, ``n_iter_`` and ``n_evals_`` cover the per-feature phase only.

    Parameters
    ----------
    cv : int or cross-validation splitter, default=5
        Folds of the criterion, :class:`~dargmin.hyper.CrossVal` (mean held-out loss).
    method : str or HypergradientMethod, default="implicit"
        Hypergradient method: an object (:class:`~dargmin.hyper.ImplicitSupport`,
        :class:`~dargmin.hyper.ImplicitForward`, :class:`~dargmin.hyper.Unrolled`) or a
        name of :data:`~dargmin.hyper.REGISTRY` ("implicit", "implicit_forward",
        "forward", "reverse").
    optimizer : str, optimizer object or optax optimizer, default="gd"
        Outer optimizer: :class:`~dargmin.hyper.ProjectedGradientDescent` ("gd"),
        :class:`~dargmin.hyper.LBFGSB` ("lbfgs"), :class:`~dargmin.hyper.OptaxOptimizer`
        or an ``optax.GradientTransformation``.
    solver : str or InnerSolver, default="auto"
        Inner solver: an object (:class:`~dargmin.hyper.ProxCD`,
        :class:`~dargmin.hyper.FISTA`, :class:`~dargmin.hyper.SklearnSolver`...) or a name
        ("auto", "cd", "fista", "ista", "sklearn", "direct"); "auto" is
        :func:`~dargmin.hyper.default_solver`.
    max_iter : int, default=30
        Maximal number of outer iterations.
    fit_intercept : bool, default=True
        Fit an unpenalized intercept.
    verbose : bool, default=False
        Show a tqdm progress bar.
    max_iter_lasso : int, default=20
        Outer iterations of the initial single-``alpha`` search.

    Attributes
    ----------
    alphas_ : ndarray of shape (n_features,)
        Selected per-feature penalties.
    coef_ : ndarray of shape (n_features,)
        Coefficients refit on all the data at the selected hyperparameters.
    intercept_ : float
        Intercept of the refit (0 when ``fit_intercept=False``).
    log_theta_ : ndarray of shape (n_hyper,)
        Selected hyperparameters in log scale.
    path_ : dargmin.hyper.Monitor
        Every evaluation of the outer search (time, log θ, CV loss, gradient norm).
    n_iter_ : int
        Outer iterations.
    n_evals_ : int
        Criterion evaluations (each solves ``cv`` inner problems).
    cv_score_ : float
        Mean CV loss at the selected hyperparameters.
    n_features_in_ : int
        Number of features seen by :meth:`fit`.

    See Also
    --------
    LassoHyperCV : A single ``alpha``.

    Examples
    --------
    >>> from sklearn.datasets import make_regression
    >>> X, y = make_regression(60, 10, n_informative=3, noise=5.0, random_state=0)
    >>> WeightedLassoHyperCV(cv=3, max_iter=5).fit(X, y).alphas_.shape
    (10,)
    """

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
    ):
        self.cv = cv
        self.method = method
        self.optimizer = optimizer
        self.solver = solver
        self.max_iter = max_iter
        self.max_iter_lasso = max_iter_lasso
        self.fit_intercept = fit_intercept
        self.verbose = verbose

    def _make_problem(self, X, y):
        return weighted_lasso(X, y, fit_intercept=self.fit_intercept)

    def _initial_log_theta(self, problem, X, y):
        return np.full(problem.n_hyper, _lasso_start(self, X, y, self.max_iter_lasso))

    def _set_hyper_attributes(self, log_theta, problem):
        self.alphas_ = np.exp(log_theta)


class RidgeHyperCV(_Regressor):
    """Ridge regression with ``alpha`` tuned by hypergradient descent on the CV error.

    Internally ``‖y − Xw − b‖²/(2n) + ½μ‖w‖²`` (``μ`` is per-sample normalized, so one
    value means the same regularization on every CV fold); ``alpha_ = n μ`` is reported in
    scikit-learn's ``Ridge`` convention ``‖y − Xw − b‖² + alpha‖w‖²`` for the ``n`` samples
    of the final refit (on a fold of ``n_k`` samples the equivalent is ``n_k μ``). The
    inner problem is smooth: "auto" solves it exactly (:class:`~dargmin.hyper.RidgeDirect`)
    and the implicit hypergradient uses the whole Hessian.

    Parameters
    ----------
    cv : int or cross-validation splitter, default=5
        Folds of the criterion, :class:`~dargmin.hyper.CrossVal` (mean held-out loss).
    method : str or HypergradientMethod, default="implicit"
        Hypergradient method: an object (:class:`~dargmin.hyper.ImplicitSupport`,
        :class:`~dargmin.hyper.ImplicitForward`, :class:`~dargmin.hyper.Unrolled`) or a
        name of :data:`~dargmin.hyper.REGISTRY` ("implicit", "implicit_forward",
        "forward", "reverse").
    optimizer : str, optimizer object or optax optimizer, default="gd"
        Outer optimizer: :class:`~dargmin.hyper.ProjectedGradientDescent` ("gd"),
        :class:`~dargmin.hyper.LBFGSB` ("lbfgs"), :class:`~dargmin.hyper.OptaxOptimizer`
        or an ``optax.GradientTransformation``.
    solver : str or InnerSolver, default="auto"
        Inner solver: an object (:class:`~dargmin.hyper.ProxCD`,
        :class:`~dargmin.hyper.FISTA`, :class:`~dargmin.hyper.SklearnSolver`...) or a name
        ("auto", "cd", "fista", "ista", "sklearn", "direct"); "auto" is
        :func:`~dargmin.hyper.default_solver`.
    max_iter : int, default=30
        Maximal number of outer iterations.
    fit_intercept : bool, default=True
        Fit an unpenalized intercept.
    verbose : bool, default=False
        Show a tqdm progress bar.

    Attributes
    ----------
    alpha_ : float
        Selected strength, scikit-learn ``Ridge`` convention.
    coef_ : ndarray of shape (n_features,)
        Coefficients refit on all the data at the selected hyperparameters.
    intercept_ : float
        Intercept of the refit (0 when ``fit_intercept=False``).
    log_theta_ : ndarray of shape (n_hyper,)
        Selected hyperparameters in log scale.
    path_ : dargmin.hyper.Monitor
        Every evaluation of the outer search (time, log θ, CV loss, gradient norm).
    n_iter_ : int
        Outer iterations.
    n_evals_ : int
        Criterion evaluations (each solves ``cv`` inner problems).
    cv_score_ : float
        Mean CV loss at the selected hyperparameters.
    n_features_in_ : int
        Number of features seen by :meth:`fit`.

    See Also
    --------
    sklearn.linear_model.RidgeCV : Grid search with efficient leave-one-out.

    Examples
    --------
    >>> from sklearn.datasets import make_regression
    >>> X, y = make_regression(60, 10, noise=5.0, random_state=0)
    >>> RidgeHyperCV(cv=3).fit(X, y).alpha_ > 0
    True
    """

    def __init__(
        self,
        *,
        cv: Any = 5,
        method: str = "implicit",
        optimizer: Any = "gd",
        solver: Any = "auto",
        max_iter: int = 30,
        fit_intercept: bool = True,
        verbose: bool = False,
    ):
        self.cv = cv
        self.method = method
        self.optimizer = optimizer
        self.solver = solver
        self.max_iter = max_iter
        self.fit_intercept = fit_intercept
        self.verbose = verbose

    def _make_problem(self, X, y):
        return ridge(X, y, fit_intercept=self.fit_intercept)

    def _set_hyper_attributes(self, log_theta, problem):
        self.alpha_ = float(problem.n_samples * np.exp(log_theta[0]))
