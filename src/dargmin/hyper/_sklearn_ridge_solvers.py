"""Inner solvers outside JAX: scikit-learn's coordinate descent and the exact ridge solver.

Both follow the :class:`~dargmin.hyper.InnerSolver` protocol (``solve`` only: they cannot
be unrolled); :func:`default_solver` is the ``"auto"`` choice.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dargmin.hyper._inner_solvers import (
    InnerResult,
    ProxCD,
    _init,
    _warn_not_converged,
    kkt_violation,
)
from dargmin.hyper._problems import HyperProblem, Quadratic
from dargmin.hyper._registry import register

Array = Any


class SklearnSolver:
    """A warm-started scikit-learn ``Lasso`` / ``ElasticNet`` as the inner solver.

    Least-squares problems only. Per-feature ℓ1 weights are handled by rescaling columns:
    with ``Xⱼ' = Xⱼ c/λⱼ`` and ``wⱼ = vⱼ c/λⱼ`` the weighted problem becomes a Lasso of
    strength ``c`` in ``v``; a scalar ℓ2 term maps to ``alpha = λ + μ`` and
    ``l1_ratio = λ/alpha``. The estimator object is kept (``warm_start=True``), so
    consecutive solves along an outer optimization start from the previous solution.

    scikit-learn stops on its duality gap (``gap < tol ‖y‖²/n``); the relative KKT violation
    of the result is reported, and a warning is issued when it exceeds ``kkt_tol``.

    Parameters
    ----------
    tol
        scikit-learn's ``tol``.
    max_iter
        scikit-learn's ``max_iter``.
    kkt_tol
        Warn when the relative KKT violation of the result exceeds this.

    Examples
    --------
    Per-feature weights (closed form here: ``wⱼ = ST(yⱼ, n λⱼ)/n·n = ST(3, 3λⱼ)``):

    >>> import numpy as np
    >>> from dargmin.hyper import weighted_lasso
    >>> prob = weighted_lasso(np.eye(3), np.array([3.0, 0.0, -3.0]), fit_intercept=False)
    >>> SklearnSolver().solve(prob, np.log([0.5, 0.1, 2.0])).coef.round(6).tolist()
    [1.5, 0.0, 0.0]
    """

    name = "sklearn"

    def __init__(self, tol: float = 1e-8, max_iter: int = 10_000, kkt_tol: float = 1e-4):
        self.tol = tol
        self.max_iter = max_iter
        self.kkt_tol = kkt_tol
        self._est: Any = None
        self._key: Any = None

    def solve(self, problem: HyperProblem, log_theta: Array, w0: Array | None = None):
        """Minimize the inner problem; return an :class:`InnerResult`."""
        with jax.enable_x64(True):
            return self._solve(problem, log_theta, w0)

    def _solve(self, problem: HyperProblem, log_theta: Array, w0: Array | None = None):
        from sklearn.linear_model import ElasticNet, Lasso

        if not isinstance(problem.datafit, Quadratic) or problem.augmented:
            raise ValueError(
                "SklearnSolver handles least-squares problems only (Lasso, elastic net, "
                f"weighted Lasso); got a {type(problem.datafit).__name__} data fit. Use ProxCD."
            )
        t0 = time.perf_counter()
        theta = problem.check_theta(log_theta)
        l1, l2 = problem.penalties_host(theta)
        mu = float(l2[0]) if l2.size else 0.0
        if np.ptp(l2) > 0:
            raise ValueError(
                "SklearnSolver needs one ℓ2 strength shared by all features; use ProxCD() "
                "for per-feature ℓ2 strengths."
            )
        if np.any(l1 <= 0):
            raise ValueError(
                "SklearnSolver needs positive ℓ1 strengths for all features; use ProxCD() "
                "when some are zero."
            )
        c = float(np.max(l1))
        scale = c / l1  # column scaling that turns weights λⱼ into a common strength c
        uniform = bool(np.ptp(l1) == 0)
        if not uniform and mu > 0:
            raise ValueError(
                "SklearnSolver: per-feature ℓ1 weights with an ℓ2 term are not supported; "
                "use ProxCD()."
            )
        # Fortran order is what the coordinate descent reads; with it, and float64
        # contiguous data, fit(check_input=False) skips scikit-learn's validation (about a
        # millisecond a call, as much as a warm-started solve).
        # (problem.design is column-major already; the product keeps its layout)
        X = problem.design if uniform else np.asfortranarray(problem.design * scale)
        key = (id(problem), uniform)
        if self._est is None or self._key != key:
            # A new problem (e.g. another CV fold): start a fresh estimator, warm-started
            # from w0 when given.
            self._est = (
                ElasticNet(
                    fit_intercept=False, warm_start=True, tol=self.tol, max_iter=self.max_iter
                )
                if mu > 0
                else Lasso(
                    fit_intercept=False, warm_start=True, tol=self.tol, max_iter=self.max_iter
                )
            )
            self._key = key
            if w0 is not None:
                self._est.coef_ = _init(problem, w0) / (1.0 if uniform else scale)
        elif w0 is not None:
            self._est.coef_ = _init(problem, w0) / (1.0 if uniform else scale)
        if mu > 0:
            self._est.set_params(alpha=c + mu, l1_ratio=c / (c + mu))
        else:
            self._est.set_params(alpha=c)
        with warnings.catch_warnings():
            # Convergence is judged below, on the KKT violation of the original problem.
            warnings.filterwarnings("ignore", message=".*did not converge.*")
            warnings.filterwarnings("ignore", message=".*Objective did not converge.*")
            self._est.fit(X, np.ascontiguousarray(problem.target), check_input=False)
        w = np.asarray(self._est.coef_, dtype=np.float64) * (1.0 if uniform else scale)
        kkt = kkt_violation(problem, w, theta)
        ok = kkt <= self.kkt_tol
        n_iter = int(np.max(self._est.n_iter_))
        if not ok:
            _warn_not_converged("scikit-learn coordinate descent", kkt, self.kkt_tol, n_iter, theta)
        return InnerResult(w, n_iter, kkt, ok, time.perf_counter() - t0)


class RidgeDirect:
    """Exact solver of least squares with an ℓ2 penalty and no ℓ1 term (ridge).

    With the thin SVD ``X = U diag(s) Vᵀ`` (computed once per problem) and a common
    strength ``μ``,

    .. math:: \\hat w = V \\operatorname{diag}\\Big(\frac{s}{s^2 + n\\mu}\\Big) U^\top y ,

    so each solve costs ``O(n p)``; per-feature strengths use a Cholesky solve instead.

    Examples
    --------
    >>> import numpy as np
    >>> from dargmin.hyper import ridge
    >>> prob = ridge(np.eye(2), np.array([2.0, 4.0]), fit_intercept=False)
    >>> RidgeDirect().solve(prob, [0.0]).coef.tolist()   # y/n / (1/n + 1) with n = 2
    [0.666..., 1.333...]
    """

    name = "direct"

    def solve(self, problem: HyperProblem, log_theta: Array, w0: Array | None = None):
        """Solve the ridge problem exactly; return an :class:`InnerResult`."""
        with jax.enable_x64(True):
            return self._solve(problem, log_theta, w0)

    def _solve(self, problem: HyperProblem, log_theta: Array, w0: Array | None = None):
        if not isinstance(problem.datafit, Quadratic) or problem.l1 is not None:
            raise ValueError(
                f"RidgeDirect solves least squares with an ℓ2 penalty only; {problem.name} "
                "has an ℓ1 term or another data fit: use ProxCD()."
            )
        t0 = time.perf_counter()
        theta = problem.check_theta(log_theta)
        _, l2 = (np.asarray(v) for v in problem.penalties(jnp.asarray(theta)))
        X, y, n = problem.design, problem.target, problem.n_samples
        if np.ptp(l2) == 0:
            U, sv, Vt = problem.cache.get("svd", lambda: np.linalg.svd(X, full_matrices=False))
            w = Vt.T @ (sv / (sv**2 + n * l2[0]) * (U.T @ y))
        else:
            w = np.linalg.solve(X.T @ X / n + np.diag(l2), X.T @ y / n)
        kkt = kkt_violation(problem, w, theta)
        return InnerResult(w, 1, kkt, True, time.perf_counter() - t0)


def default_solver(problem: HyperProblem) -> Any:
    """The ``"auto"`` inner solver: scikit-learn's coordinate descent for least squares
    with ℓ1 weights (the fastest option on CPU), :class:`RidgeDirect` for ridge and
    :class:`ProxCD` otherwise.

    Examples
    --------
    >>> import numpy as np
    >>> from dargmin.hyper import ridge
    >>> default_solver(ridge(np.eye(3), np.ones(3))).name
    'direct'
    """
    quad = isinstance(problem.datafit, Quadratic) and not problem.augmented
    if quad and problem.l1 is None:
        return RidgeDirect()
    return SklearnSolver() if quad else ProxCD()


register("solver", "auto", lambda problem, **_: default_solver(problem))
register("solver", "sklearn", lambda problem, **_: SklearnSolver())
register("solver", "direct", lambda problem, **_: RidgeDirect())
