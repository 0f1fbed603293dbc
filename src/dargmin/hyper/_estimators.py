"""scikit-learn estimators that select their regularization by hypergradient descent.

Each estimator minimizes the K-fold cross-validation loss over its hyperparameters (log
scale) with :func:`~dargmin.hyper.optimize_hyperparameters`, then refits on all the data:
the hypergradient analogue of :class:`sklearn.linear_model.LassoCV`, with a continuous
search instead of a grid (and so usable with one hyperparameter per feature).
"""

from __future__ import annotations

import warnings
from numbers import Integral, Real
from typing import Any, ClassVar

import jax
import numpy as np
import scipy.sparse
from sklearn.base import BaseEstimator, RegressorMixin, _fit_context
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from dargmin.diagnostics import DargminWarning
from dargmin.hyper._criteria import CrossVal, HeldOutMSE
from dargmin.hyper._inner_solvers import ProxCD
from dargmin.hyper._outer import default_bounds, optimize_hyperparameters, single_threaded_blas
from dargmin.hyper._problems import (
    HyperProblem,
    elastic_net,
    lasso,
    ridge,
    weighted_lasso,
)
from dargmin.hyper._registry import resolve
from dargmin.hyper._sklearn_ridge_solvers import SklearnSolver, default_solver

#: Sparse inputs are densified up to this many entries (160 MB in float64); the inner
#: problems, the support systems and the JAX solvers work on dense arrays.
SPARSE_DENSIFY_MAX = 20_000_000

_SOLVER_CONSTRAINT = [
    StrOptions({"auto", "cd", "fista", "ista", "sklearn", "direct"}),
    HasMethods(["solve"]),
]
_BASE_CONSTRAINTS: dict[str, list[Any]] = {
    "cv": ["cv_object"],
    "method": [
        StrOptions({"implicit", "implicit_forward", "forward", "reverse"}),
        HasMethods(["compute"]),
    ],
    "optimizer": [StrOptions({"gd", "lbfgs"}), HasMethods(["minimize"]), HasMethods(["update"])],
    "solver": _SOLVER_CONSTRAINT,
    "max_iter": [Interval(Integral, 0, None, closed="left")],
    "n_path": [Interval(Integral, 0, None, closed="left")],
    "fit_intercept": ["boolean"],
    "verbose": ["verbose"],
}


#: Inner tolerances of the search with ``solver="auto"``: scikit-learn's duality-gap
#: tolerance (100x tighter than ``LassoCV``'s default 1e-4, 100x looser than the refit's) and
#: the relative KKT tolerance of :class:`ProxCD`. Measured on make_regression 300x1000 and
#: diabetes: the same test MSE (within 0.5 %) as 1e-8, at 3-10x less time.
SEARCH_TOL_SKLEARN = 1e-6
SEARCH_TOL_CD = 1e-6


def _search_solver(solver: Any, problem: HyperProblem) -> Any:
    if not (isinstance(solver, str) and solver == "auto"):
        return solver
    default = default_solver(problem)
    if isinstance(default, SklearnSolver):
        return SklearnSolver(tol=SEARCH_TOL_SKLEARN, kkt_tol=1e-2)
    if isinstance(default, ProxCD):
        return ProxCD(tol=SEARCH_TOL_CD, max_epochs=2_000)
    return default


def _dense(X: Any) -> np.ndarray:
    """A dense float64 copy of a (validated) sparse matrix, refused above the size limit."""
    if not scipy.sparse.issparse(X):
        return X
    n, p = X.shape
    if n * p > SPARSE_DENSIFY_MAX:
        raise ValueError(
            f"X is a sparse {n}x{p} matrix ({n * p:.3g} entries once dense, more than "
            f"dargmin.hyper's limit SPARSE_DENSIFY_MAX = {SPARSE_DENSIFY_MAX:.3g}): the "
            "hypergradient estimators work on dense arrays. Select features first, or use "
            "scikit-learn's LassoCV, which works on sparse X."
        )
    return np.asarray(X.toarray(), dtype=np.float64)


class _HyperCVBase(BaseEstimator):
    """Shared fit logic; subclasses define the model and how ``θ`` maps to attributes."""

    fit_intercept: bool
    # Set by fit: arrays for the classifier (one row per class), a float for regressors.
    coef_: Any
    intercept_: Any

    _criterion: Any = HeldOutMSE
    _parameter_constraints: ClassVar[dict] = _BASE_CONSTRAINTS

    def _make_problem(self, X: np.ndarray, y: np.ndarray) -> HyperProblem:
        raise NotImplementedError

    def _initial_log_theta(self, problem: HyperProblem, X, y) -> np.ndarray | None:
        return None

    def _set_hyper_attributes(self, log_theta: np.ndarray, problem: HyperProblem) -> None:
        raise NotImplementedError

    def _refit_log_theta(self, log_theta: np.ndarray, problem: HyperProblem, folds) -> np.ndarray:
        """The hyperparameters of the final refit (the CV ones unless a convention says)."""
        return log_theta

    def _split(self, y: np.ndarray) -> Any:
        return self.cv

    def _search_solver(self, problem: HyperProblem) -> Any:
        """The inner solver of the search: for ``"auto"``, the default solver at a search
        tolerance (the refit on all the data uses the default, tight, tolerance)."""
        return _search_solver(self.solver, problem)

    def _fit(self, X: np.ndarray, y: np.ndarray) -> _HyperCVBase:
        with jax.enable_x64(True), single_threaded_blas():
            problem = self._make_problem(X, y)
            cv = self._split(y)
            if isinstance(cv, int | np.integer) and cv > X.shape[0]:
                raise ValueError(f"cv={cv} folds needs at least {cv} samples, got {X.shape[0]}.")
            criterion = CrossVal(self._criterion, cv=cv)
            reason = problem.null_model_reason()
            if reason is not None:
                return self._fit_null_model(problem, reason)
            theta0 = self._initial_log_theta(problem, X, y)
            # A coarse warm-started path picks the basin (CV curves have several minima)
            # unless the user gave a start or the model has several hyperparameters.
            n_path = self.n_path if theta0 is None and problem.n_hyper == 1 else 0
            res = optimize_hyperparameters(
                problem,
                criterion,
                theta0,
                method=self.method,
                optimizer=self.optimizer,
                solver=self._search_solver(problem),
                bounds=default_bounds(problem),
                max_iter=self.max_iter,
                progress=self.verbose,
                n_path=n_path,
            )
            # Refit on all the training data at the selected hyperparameters.
            log_theta = np.asarray(res.log_theta)
            refit = self._refit_log_theta(log_theta, problem, criterion.folds(problem))
            solver = resolve("solver", self.solver, problem)
            coef_full = solver.solve(problem, refit).coef
        coef, intercept = problem.coef_intercept(coef_full)
        self.coef_ = coef
        self.intercept_ = intercept
        self.log_theta_ = log_theta
        self.path_ = res.monitor
        self.log_theta_path_ = np.array(res.monitor.log_thetas).reshape(-1, problem.n_hyper)
        self.cv_loss_path_ = np.asarray(res.monitor.values, dtype=float)
        self.n_iter_ = int(res.n_iter)
        self.n_evals_ = int(res.n_evals)
        self.cv_loss_ = float(res.value)
        self._set_hyper_attributes(self.log_theta_, problem)
        return self

    @property
    def cv_score_(self) -> float:
        """Deprecated alias of ``cv_loss_`` (a loss, not a score: lower is better)."""
        warnings.warn(
            "cv_score_ is deprecated and will be removed in dargmin 0.3: it is a loss "
            "(lower is better); use cv_loss_.",
            FutureWarning,
            stacklevel=2,
        )
        return self.cv_loss_

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
            stacklevel=5,
        )
        coef_full = resolve("solver", self.solver, problem).solve(problem, log_theta).coef
        coef, intercept = problem.coef_intercept(coef_full)
        self.coef_, self.intercept_ = coef, intercept
        self.log_theta_ = log_theta
        self.path_ = Monitor()
        self.log_theta_path_ = np.zeros((0, problem.n_hyper))
        self.cv_loss_path_ = np.zeros(0)
        self.n_iter_, self.n_evals_ = 0, 0
        self.cv_loss_ = float("nan")
        self._set_hyper_attributes(self.log_theta_, problem)
        return self

    def _decision(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "coef_")
        X = validate_data(self, X, reset=False, accept_sparse=True, dtype=np.float64)
        return np.asarray(X @ self.coef_).reshape(-1) + self.intercept_

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
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
    n_path : int, default=10
        Points of the coarse warm-started path (from ``alpha_max`` down four decades)
        evaluated before the descent, which starts at the best of them: CV curves often
        have several local minima. 0 starts from ``alpha_max/10`` instead.
"""


class _Regressor(RegressorMixin, _HyperCVBase):
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> _Regressor:
        """Select the hyperparameters by hypergradient descent on the CV loss, then refit.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Sparse matrices are densified (up to ``SPARSE_DENSIFY_MAX`` entries).
        y : array-like of shape (n_samples,)
        sample_weight : array-like of shape (n_samples,), default=None
            Weights of the squared errors, as in ``Lasso.fit``: the refit minimizes
            ``Σᵢ sᵢ(yᵢ − xᵢᵀw − b)²/(2n) + penalty`` with ``s`` rescaled to sum to ``n``;
            the CV loss is the held-out weighted MSE. The data are centered once with the
            weighted means of all the samples (not per fold).

        Returns
        -------
        self
        """
        X, y = validate_data(
            self,
            X,
            y,
            y_numeric=True,
            ensure_min_samples=2,
            dtype=np.float64,
            accept_sparse=["csr", "csc", "coo"],
        )
        X = _dense(X)
        if sample_weight is None:
            return self._fit(X, y)
        sw = _check_sample_weight(sample_weight, X, dtype=np.float64, ensure_non_negative=True)
        if np.ptp(sw) == 0 and sw[0] > 0:
            return self._fit(X, y)  # uniform weights: the unweighted problem exactly
        if not np.any(sw > 0):
            raise ValueError("sample_weight must have at least one positive entry.")
        s = sw * (X.shape[0] / sw.sum())
        x_off = s @ X / X.shape[0] if self.fit_intercept else np.zeros(X.shape[1])
        y_off = float(s @ y / X.shape[0]) if self.fit_intercept else 0.0
        root = np.sqrt(s)[:, None]
        # Σ sᵢ rᵢ² = ‖√s ⊙ r‖²: the weighted problem is the unweighted one on rescaled
        # rows, with the intercept removed by weighted centering.
        fit_intercept = self.fit_intercept
        try:
            self.fit_intercept = False
            self._fit(root * (X - x_off), root[:, 0] * (y - y_off))
        finally:
            self.fit_intercept = fit_intercept
        self.intercept_ = float(y_off - x_off @ self.coef_) if fit_intercept else 0.0
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Linear predictions ``X coef_ + intercept_``."""
        return self._decision(X)


def _lasso_start(est: _HyperCVBase, X: np.ndarray, y: np.ndarray, max_iter: int) -> float:
    """``log alpha`` of the single-alpha CV optimum (a warm start for richer models)."""
    single = lasso(X, y, fit_intercept=est.fit_intercept)
    res = optimize_hyperparameters(
        single,
        CrossVal(est._criterion, cv=est.cv),
        method=est.method,
        solver=_search_solver(est.solver, single),
        max_iter=max_iter,
        n_path=est.n_path,
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
    n_path : int, default=10
        Points of the coarse warm-started path (from ``alpha_max`` down four decades)
        evaluated before the descent, which starts at the best of them: CV curves often
        have several local minima. 0 starts from ``alpha_max/10`` instead.

    Attributes
    ----------
    alpha_ : float
        Selected regularization strength (scikit-learn's ``Lasso`` units: the same
        ``alpha`` on every fold and in the refit, as ``LassoCV.alpha_``).
    alphas_ : ndarray of shape (n_evals,)
        Every evaluated ``alpha``, in evaluation order (with ``cv_loss_path_``).
    coef_ : ndarray of shape (n_features,)
        Coefficients refit on all the data at the selected hyperparameters.
    intercept_ : float
        Intercept of the refit (0 when ``fit_intercept=False``).
    log_theta_ : ndarray of shape (n_hyper,)
        Selected hyperparameters in log scale.
    path_ : dargmin.hyper.Monitor
        Every evaluation of the outer search (time, log θ, CV loss, gradient norm).
    n_iter_ : int
        Outer iterations: coarse-path points plus descent steps.
    n_evals_ : int
        Criterion evaluations (each solves ``cv`` inner problems).
    cv_loss_ : float
        Mean CV loss (held-out MSE or log-loss) at the selected hyperparameters; lower is
        better. ``cv_score_`` is its deprecated alias.
    log_theta_path_ : ndarray of shape (n_evals, n_hyper)
        Every evaluated point of the search (coarse path, then descent), log scale.
    cv_loss_path_ : ndarray of shape (n_evals,)
        The CV loss at each row of ``log_theta_path_``.
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
    ):
        self.alpha0 = alpha0
        self.cv = cv
        self.method = method
        self.optimizer = optimizer
        self.solver = solver
        self.max_iter = max_iter
        self.fit_intercept = fit_intercept
        self.verbose = verbose
        self.n_path = n_path

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
    n_path : int, default=10
        Points of the coarse warm-started path (from ``alpha_max`` down four decades)
        evaluated before the descent, which starts at the best of them: CV curves often
        have several local minima. 0 starts from ``alpha_max/10`` instead.
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
        Outer iterations: coarse-path points plus descent steps.
    n_evals_ : int
        Criterion evaluations (each solves ``cv`` inner problems).
    cv_loss_ : float
        Mean CV loss (held-out MSE or log-loss) at the selected hyperparameters; lower is
        better. ``cv_score_`` is its deprecated alias.
    log_theta_path_ : ndarray of shape (n_evals, n_hyper)
        Every evaluated point of the search (coarse path, then descent), log scale.
    cv_loss_path_ : ndarray of shape (n_evals,)
        The CV loss at each row of ``log_theta_path_``.
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
        n_path: int = 10,
    ):
        self.cv = cv
        self.method = method
        self.optimizer = optimizer
        self.solver = solver
        self.max_iter = max_iter
        self.fit_intercept = fit_intercept
        self.max_iter_lasso = max_iter_lasso
        self.verbose = verbose
        self.n_path = n_path

    _parameter_constraints: ClassVar[dict] = {
        **_BASE_CONSTRAINTS,
        "max_iter_lasso": [Interval(Integral, 0, None, closed="left")],
    }

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
    n_path : int, default=10
        Points of the coarse warm-started path (from ``alpha_max`` down four decades)
        evaluated before the descent, which starts at the best of them: CV curves often
        have several local minima. 0 starts from ``alpha_max/10`` instead.
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
        Outer iterations: coarse-path points plus descent steps.
    n_evals_ : int
        Criterion evaluations (each solves ``cv`` inner problems).
    cv_loss_ : float
        Mean CV loss (held-out MSE or log-loss) at the selected hyperparameters; lower is
        better. ``cv_score_`` is its deprecated alias.
    log_theta_path_ : ndarray of shape (n_evals, n_hyper)
        Every evaluated point of the search (coarse path, then descent), log scale.
    cv_loss_path_ : ndarray of shape (n_evals,)
        The CV loss at each row of ``log_theta_path_``.
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
        n_path: int = 10,
    ):
        self.cv = cv
        self.method = method
        self.optimizer = optimizer
        self.solver = solver
        self.max_iter = max_iter
        self.max_iter_lasso = max_iter_lasso
        self.fit_intercept = fit_intercept
        self.verbose = verbose
        self.n_path = n_path

    _parameter_constraints: ClassVar[dict] = {
        **_BASE_CONSTRAINTS,
        "max_iter_lasso": [Interval(Integral, 0, None, closed="left")],
    }

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
    n_path : int, default=10
        Points of the coarse warm-started path (from ``alpha_max`` down four decades)
        evaluated before the descent, which starts at the best of them: CV curves often
        have several local minima. 0 starts from ``alpha_max/10`` instead.

    Attributes
    ----------
    alpha_ : float
        Selected strength in ``RidgeCV``'s convention: ``Ridge(alpha=alpha_)`` on each
        training fold gives ``cv_loss_`` (exactly when the folds have equal sizes) and the
        refit is ``Ridge(alpha=alpha_)`` on all the data.
    coef_ : ndarray of shape (n_features,)
        Coefficients refit on all the data at the selected hyperparameters.
    intercept_ : float
        Intercept of the refit (0 when ``fit_intercept=False``).
    log_theta_ : ndarray of shape (n_hyper,)
        Selected hyperparameters in log scale.
    path_ : dargmin.hyper.Monitor
        Every evaluation of the outer search (time, log θ, CV loss, gradient norm).
    n_iter_ : int
        Outer iterations: coarse-path points plus descent steps.
    n_evals_ : int
        Criterion evaluations (each solves ``cv`` inner problems).
    cv_loss_ : float
        Mean CV loss (held-out MSE or log-loss) at the selected hyperparameters; lower is
        better. ``cv_score_`` is its deprecated alias.
    log_theta_path_ : ndarray of shape (n_evals, n_hyper)
        Every evaluated point of the search (coarse path, then descent), log scale.
    cv_loss_path_ : ndarray of shape (n_evals,)
        The CV loss at each row of ``log_theta_path_``.
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
        n_path: int = 10,
    ):
        self.cv = cv
        self.method = method
        self.optimizer = optimizer
        self.solver = solver
        self.max_iter = max_iter
        self.fit_intercept = fit_intercept
        self.verbose = verbose
        self.n_path = n_path

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
