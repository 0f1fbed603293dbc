"""The shared machinery of the hypergradient estimators: parameters, validation, fit.

:class:`_HyperCVBase` holds the search parameters every estimator takes, their
scikit-learn constraints, the input validation and the fit (coarse path, descent on the CV
loss, refit on all the data); :class:`_Regressor` adds ``sample_weight`` and ``predict``.
The estimators (``_estimators``, ``_classifier``) only define the model: the problem, the
start of the search and how ``θ`` maps to their attributes.
"""

from __future__ import annotations

import dataclasses
import warnings
from numbers import Integral
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
from dargmin.hyper._problems import HyperProblem
from dargmin.hyper._prox_newton import ProxNewton
from dargmin.hyper._registry import resolve
from dargmin.hyper._sklearn_ridge_solvers import SklearnSolver, default_solver
from dargmin.hyper._split_lbfgsb import SplitLBFGSB
from dargmin.hyper._working_set import WorkingSetCD

#: Sparse inputs are densified up to this many entries (160 MB in float64); the inner
#: problems, the support systems and the JAX solvers work on dense arrays.
SPARSE_DENSIFY_MAX = 20_000_000

_SOLVER_CONSTRAINT = [
    StrOptions(
        {"auto", "cd", "fista", "ista", "sklearn", "direct", "lbfgsb", "prox_newton", "working_set"}
    ),
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
    "n_jobs": [Integral, None],
    "fit_intercept": ["boolean"],
    "verbose": ["verbose"],
}


#: Inner tolerances of the search with ``solver="auto"``: scikit-learn's duality-gap
#: tolerance (100x tighter than ``LassoCV``'s default 1e-4, 100x looser than the refit's)
#: and the relative KKT tolerance of :class:`ProxNewton` / :class:`SplitLBFGSB` (other
#: data fits). Measured on make_regression 300x1000 and diabetes: the same test MSE
#: (within 0.5 %) as 1e-8, at 3-10x less time.
SEARCH_TOL_SKLEARN = 1e-6
SEARCH_TOL_CD = 1e-6
#: L-BFGS-B's loose tolerance before the Newton steps on the support (:class:`SplitLBFGSB`,
#: the logistic search and refit with per-feature penalties): the same selected alpha and
#: CV loss on breast_cancer and make_classification 300x300, with 0.6x the CPU time on
#: breast_cancer (1e-2: 0.9x).
SEARCH_COARSE_TOL = 1e-4
#: Duality-gap tolerance of the coarse path's solves (:class:`WorkingSetCD`), which only
#: pick the basin the descent starts in: on make_regression 300x1000 the same alpha and CV
#: loss as at 1e-6 in 0.8x the fit time (1e-4 picked another basin: alpha 0.16 instead of
#: 0.65, test MSE 7 % worse).
SEARCH_PATH_TOL = 1e-5

#: The outer search stops when a step moves ``log alpha`` by less than this: ``alpha`` to
#: within 5 %, finer than the grids of ``LassoCV`` (100 values over three decades, 7 %
#: apart) and ``LogisticRegressionCV`` (10 values over eight decades, a factor 7.7 apart).
#: Near the minimum the CV loss is flat to second order, so finer steps only cost
#: evaluations: against 1e-2, 11 -> 9 evaluations and 0.99x -> 0.73x ``LassoCV``'s time on
#: make_regression 300x1000, 13 -> 8 and 0.61x -> 0.49x ``LogisticRegressionCV``'s on
#: make_classification 300x300 (the benchmark's splits; its table reports the CV loss at
#: the selected alpha against the converged path's best).
SEARCH_XTOL = 5e-2


def _search_solver(solver: Any, problem: HyperProblem) -> Any:
    if not (isinstance(solver, str) and solver == "auto"):
        return solver
    default = default_solver(problem)
    if isinstance(default, SklearnSolver) and WorkingSetCD.supports(problem):
        # One ℓ1 strength (lasso, elastic net): coordinate descent on a working set.
        return WorkingSetCD(tol=SEARCH_TOL_SKLEARN, kkt_tol=1e-2)
    if isinstance(default, SklearnSolver):
        return SklearnSolver(tol=SEARCH_TOL_SKLEARN, kkt_tol=1e-2)
    if isinstance(default, ProxCD):
        return _smooth_loss_solver(problem, tol=SEARCH_TOL_CD)
    return default


def _path_solver(search_solver: Any) -> Any:
    """The coarse path's solver: the search's at :data:`SEARCH_PATH_TOL` where it is a
    working set's (``None``: the search solver itself)."""
    if isinstance(search_solver, WorkingSetCD):
        return WorkingSetCD(tol=max(SEARCH_PATH_TOL, search_solver.tol), kkt_tol=1e-1)
    return None


def _smooth_loss_solver(problem: HyperProblem, tol: float | None = None) -> Any:
    """The solver of the data fits whose default, coordinate descent, is slow (logistic), at
    ``tol`` (``None``: its own default): proximal Newton, coordinate descent on each
    quadratic model (see _prox_newton), for one ℓ1 strength; otherwise L-BFGS-B on the split
    w = u − v, which converges where coordinate descent stalls on correlated columns (see
    _split_lbfgsb)."""
    solver: ProxNewton | SplitLBFGSB = (
        ProxNewton() if ProxNewton.supports(problem) else SplitLBFGSB(coarse_tol=SEARCH_COARSE_TOL)
    )
    return solver if tol is None else dataclasses.replace(solver, tol=tol)


def _refit_solver(solver: Any, problem: HyperProblem) -> Any:
    """The solver of the refit on all the data: the default one at its tight tolerance,
    except for the data fits whose default, coordinate descent, is slow (logistic), and the
    single-``alpha`` models, whose working-set solver reaches the same tolerance faster."""
    if isinstance(solver, str) and solver == "auto":
        if isinstance(default_solver(problem), ProxCD):
            return _smooth_loss_solver(problem)
        if WorkingSetCD.supports(problem):
            return WorkingSetCD()
    return resolve("solver", solver, problem)


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


def _store_params(est: BaseEstimator, params: dict[str, Any]) -> None:
    """Store the arguments of ``__init__`` (its ``locals()``) unchanged, as scikit-learn
    requires (no validation or conversion in ``__init__``)."""
    for name, value in params.items():
        if name != "self":
            setattr(est, name, value)


class _HyperCVBase(BaseEstimator):
    """Shared fit logic; subclasses define the model and how ``θ`` maps to attributes."""

    fit_intercept: bool
    # Set by fit: arrays for the classifier (one row per class), a float for regressors.
    coef_: Any
    intercept_: Any

    _criterion: Any = HeldOutMSE
    _parameter_constraints: ClassVar[dict] = _BASE_CONSTRAINTS

    # scikit-learn reads the parameters off the explicit keyword signature of __init__
    # (get_params, clone): subclasses with more parameters spell out theirs and store
    # them with _store_params.
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
        n_jobs: int | None = None,
    ):
        _store_params(self, locals())

    def _validate(self, X: Any, y: Any, **options: Any) -> tuple[np.ndarray, np.ndarray]:
        """scikit-learn's validation of ``(X, y)`` as float64; sparse ``X`` is densified."""
        X, y = validate_data(
            self,
            X,
            y,
            ensure_min_samples=2,
            dtype=np.float64,
            accept_sparse=["csr", "csc", "coo"],
            **options,
        )
        return _dense(X), y

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
            search_solver = self._search_solver(problem)
            res = optimize_hyperparameters(
                problem,
                criterion,
                theta0,
                method=self.method,
                optimizer=self.optimizer,
                solver=search_solver,
                path_solver=_path_solver(search_solver),
                bounds=default_bounds(problem),
                max_iter=self.max_iter,
                progress=self.verbose,
                n_path=n_path,
                xtol=SEARCH_XTOL,
                n_jobs=self.n_jobs,
            )
            # Refit on all the training data at the selected hyperparameters.
            log_theta = np.asarray(res.log_theta)
            refit = self._refit_log_theta(log_theta, problem, criterion.folds(problem))
            coef_full = _refit_solver(self.solver, problem).solve(problem, refit).coef
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
        coef_full = _refit_solver(self.solver, problem).solve(problem, log_theta).coef
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
        # One row of coefficients (the classifier stores it as shape (1, n_features)).
        coef, intercept = np.reshape(self.coef_, -1), np.reshape(self.intercept_, -1)[0]
        return np.asarray(X @ coef).reshape(-1) + intercept

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags


class _Regressor(RegressorMixin, _HyperCVBase):
    """The least-squares estimators: ``sample_weight`` and ``predict``."""

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
        X, y = self._validate(X, y, y_numeric=True)
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
