"""Inner solvers: proximal coordinate descent, ISTA/FISTA (JAX) and scikit-learn wrappers.

All solvers minimize ``F(w, θ) = Σℓ(Xw) + Σλⱼ|wⱼ| + ½Σμⱼwⱼ²`` of a
:class:`~dargmin.hyper.HyperProblem` and stop on the relative KKT violation

.. math::

    \\mathrm{kkt}(w) = \\frac{\\max_j \\operatorname{dist}\\big(-\\nabla_j f(w),
        \\lambda_j \\partial|w_j|\\big)}{\\max(\\|\\nabla f(0)\\|_\\infty, \\varepsilon)}
    \\le \\mathrm{tol},

with ``f`` the smooth part. The KKT violation bounds the error of the hypergradient: on the
support it is the residual of the optimality condition that implicit differentiation uses.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dargmin.diagnostics import DargminWarning
from dargmin.hyper._problems import Datafit, HyperProblem, Quadratic

Array = Any


class InnerSolverWarning(DargminWarning):
    """The inner solver stopped before reaching its tolerance."""


class InnerResult(NamedTuple):
    """Output of an inner solve.

    Attributes
    ----------
    coef : numpy.ndarray
        The solution ``ŵ`` (length ``problem.n_coef``).
    n_iter : int
        Epochs (coordinate descent) or iterations (FISTA) used.
    kkt : float
        Relative KKT violation at ``coef``.
    converged : bool
        Whether ``kkt <= tol``.
    time : float
        Wall time of the solve in seconds.
    """

    coef: np.ndarray
    n_iter: int
    kkt: float
    converged: bool
    time: float


def soft_threshold(x: Array, t: Array) -> Array:
    """The proximal operator of ``t|·|``: ``sign(x) max(|x| − t, 0)``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> soft_threshold(jnp.array([-2.0, 0.5, 3.0]), 1.0).tolist()
    [-1.0, 0.0, 2.0]
    """
    return jnp.sign(x) * jnp.maximum(jnp.abs(x) - t, 0.0)


def _kkt_violation(grad: Array, w: Array, l1: Array) -> Array:
    """``max_j dist(−∇ⱼf, λⱼ∂|wⱼ|)`` (absolute)."""
    on = w != 0
    viol = jnp.where(on, jnp.abs(grad + l1 * jnp.sign(w)), jnp.maximum(jnp.abs(grad) - l1, 0.0))
    return jnp.max(viol)


def kkt_violation(problem: HyperProblem, w: Array, log_theta: Array) -> float:
    """Relative KKT violation of ``w`` for ``problem`` at ``log_theta`` (see module doc).

    Examples
    --------
    >>> import numpy as np
    >>> from dargmin.hyper import lasso
    >>> prob = lasso(np.eye(3), np.array([3.0, 0.0, -3.0]), fit_intercept=False)
    >>> kkt_violation(prob, np.zeros(3), [0.0])   # α = 1 = ‖Xᵀy‖∞/n: 0 is optimal
    0.0
    """
    with jax.enable_x64(True):
        return _kkt_violation_x64(problem, w, log_theta)


def _kkt_violation_x64(problem: HyperProblem, w: Array, log_theta: Array) -> float:
    l1, l2 = problem.penalties(jnp.asarray(log_theta, dtype=float))
    viol = _kkt_jit(
        jnp.asarray(problem.design),
        jnp.asarray(problem.target),
        jnp.asarray(w, dtype=float),
        l1,
        l2,
        problem.datafit,
    )
    return float(viol) / _scale(problem)


@partial(jax.jit, static_argnames=("datafit",))
def _kkt_jit(X, y, w, l1, l2, datafit):
    g = X.T @ datafit.grad(X @ w, y) + l2 * w
    return _kkt_violation(g, w, l1)


def _lipschitz_per_coordinate(problem: HyperProblem, l2: Array) -> Array:
    key = ("col_sq", 0)
    if key not in problem._jit_cache:
        problem._jit_cache[key] = np.sum(problem.design**2, axis=0)
    col_sq = jnp.asarray(problem._jit_cache[key])
    return problem.datafit.curvature_bound(problem.n_samples) * col_sq + l2


def _cd_epoch(XT: Array, y: Array, w: Array, z: Array, l1, l2, L, datafit: Datafit):
    """One cyclic sweep of proximal coordinate descent, keeping ``z = Xw`` up to date."""

    def body(j, carry):
        w, z = carry
        xj = XT[j]
        wj = w[j]
        gj = xj @ datafit.grad(z, y) + l2[j] * wj
        # A zero column with no ℓ2 term has L = 0: the coordinate does not affect F beyond
        # the penalty, so its minimizer is 0 (any λ > 0) and it is left unchanged.
        active = L[j] > 0
        inv = 1.0 / jnp.where(active, L[j], 1.0)
        new = jnp.where(active, soft_threshold(wj - gj * inv, l1[j] * inv), wj)
        z = z + xj * (new - wj)
        return w.at[j].set(new), z

    return jax.lax.fori_loop(0, XT.shape[0], body, (w, z))


@partial(jax.jit, static_argnames=("datafit",))
def _cd_solve(XT, y, w0, l1, l2, L, tol_abs, max_epochs, datafit):
    z0 = XT.T @ w0

    def kkt(w, z):
        g = XT @ datafit.grad(z, y) + l2 * w
        return _kkt_violation(g, w, l1)

    def cond(state):
        _, _, it, viol = state
        return (viol > tol_abs) & (it < max_epochs)

    def step(state):
        w, z, it, _ = state
        w, z = _cd_epoch(XT, y, w, z, l1, l2, L, datafit)
        # Recompute z from scratch now and then: the incremental updates accumulate
        # rounding errors that would otherwise floor the attainable KKT violation.
        z = jax.lax.cond(it % 20 == 19, lambda: XT.T @ w, lambda: z)
        return w, z, it + 1, kkt(w, z)

    w, _, it, viol = jax.lax.while_loop(cond, step, (w0, z0, 0, kkt(w0, z0)))
    return w, it, viol


@partial(jax.jit, static_argnames=("datafit", "accelerated"))
def _fista_solve(X, y, w0, l1, l2, step, tol_abs, max_iter, datafit, accelerated):
    def grad_f(w):
        return X.T @ datafit.grad(X @ w, y) + l2 * w

    def cond(state):
        _, _, _, it, viol = state
        return (viol > tol_abs) & (it < max_iter)

    def body(state):
        w, v, t, it, _ = state
        w_new = soft_threshold(v - step * grad_f(v), step * l1)
        if accelerated:
            t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t**2))
            # Gradient-based adaptive restart (O'Donoghue & Candès): drop the momentum when
            # it points uphill, which keeps FISTA monotone-ish and linear near the solution.
            uphill = jnp.vdot(v - w_new, w_new - w) > 0
            t_new = jnp.where(uphill, 1.0, t_new)
            v_new = w_new + jnp.where(uphill, 0.0, (t - 1.0) / t_new) * (w_new - w)
        else:
            t_new, v_new = t, w_new
        return w_new, v_new, t_new, it + 1, _kkt_violation(grad_f(w_new), w_new, l1)

    one = jnp.asarray(1.0, w0.dtype)
    init = (w0, w0, one, 0, _kkt_violation(grad_f(w0), w0, l1))
    w, _, _, it, viol = jax.lax.while_loop(cond, body, init)
    return w, it, viol


def _scale(problem: HyperProblem) -> float:
    if ("scale", 0) in problem._jit_cache:
        return problem._jit_cache[("scale", 0)]
    X, y = problem.design, problem.target
    g0 = X.T @ np.asarray(problem.datafit.grad(jnp.zeros(X.shape[0]), jnp.asarray(y)))
    out = max(float(np.max(np.abs(g0))), 1e-300)
    problem._jit_cache[("scale", 0)] = out
    return out


def _warn_not_converged(name: str, kkt: float, tol: float, n_iter: int, log_theta) -> None:
    warnings.warn(
        f"{name} did not converge: relative KKT violation {kkt:.3g} > tol {tol:.3g} after "
        f"{n_iter} iterations at log_theta = {np.round(np.asarray(log_theta), 4).tolist()[:5]}."
        " Hypergradients inherit this error; raise max_iter or loosen tol.",
        InnerSolverWarning,
        stacklevel=3,
    )


def _init(problem: HyperProblem, w0: Array | None) -> np.ndarray:
    if w0 is None:
        return np.zeros(problem.n_coef)
    w0 = np.asarray(w0, dtype=np.float64)
    if w0.shape != (problem.n_coef,):
        raise ValueError(f"w0 must have shape ({problem.n_coef},), got {w0.shape}.")
    if not np.all(np.isfinite(w0)):
        raise ValueError("w0 (warm start) contains non-finite values.")
    return w0


@dataclass(frozen=True)
class ProxCD:
    """Cyclic proximal coordinate descent, jitted with JAX.

    Each coordinate update is the exact minimizer of the quadratic upper bound with the
    per-coordinate constant ``Lⱼ = (sup ℓ'')‖Xⱼ‖² + μⱼ``,

    .. math:: w_j \\leftarrow \\operatorname{ST}\\big(w_j - \\nabla_j f(w)/L_j,\\;
        \\lambda_j/L_j\\big),

    (an exact coordinate minimization for least squares); the predictions ``z = Xw`` are
    updated in ``O(n)`` per coordinate, so an epoch costs ``O(np)``.

    Parameters
    ----------
    tol
        Relative KKT tolerance (see the module docstring).
    max_epochs
        Maximal number of sweeps over the coordinates.

    Examples
    --------
    >>> import numpy as np
    >>> from dargmin.hyper import lasso
    >>> prob = lasso(np.eye(3), np.array([3.0, 0.0, -3.0]), fit_intercept=False)
    >>> ProxCD().solve(prob, [np.log(0.5)]).coef.round(6).tolist()   # (3 − 1.5)/1 ...
    [1.5, 0.0, -1.5]
    """

    tol: float = 1e-10
    max_epochs: int = 10_000
    name: str = "cd"

    def solve(self, problem: HyperProblem, log_theta: Array, w0: Array | None = None):
        """Minimize the inner problem; return an :class:`InnerResult`."""
        with jax.enable_x64(True):  # the solvers are float64 throughout
            return self._solve(problem, log_theta, w0)

    def _solve(self, problem: HyperProblem, log_theta: Array, w0: Array | None = None):
        t0 = time.perf_counter()
        theta = problem.check_theta(log_theta)
        l1, l2 = problem.penalties(jnp.asarray(theta))
        L = _lipschitz_per_coordinate(problem, l2)
        XT = jnp.asarray(problem.design.T)
        w, it, viol = _cd_solve(
            XT,
            jnp.asarray(problem.target),
            jnp.asarray(_init(problem, w0)),
            l1,
            l2,
            L,
            self.tol * _scale(problem),
            self.max_epochs,
            problem.datafit,
        )
        w = np.asarray(w)
        kkt = float(viol) / _scale(problem)
        ok = bool(kkt <= self.tol)
        if not ok:
            _warn_not_converged("Proximal coordinate descent", kkt, self.tol, int(it), theta)
        return InnerResult(w, int(it), kkt, ok, time.perf_counter() - t0)


@dataclass(frozen=True)
class FISTA:
    """Proximal gradient descent (ISTA) or its accelerated version FISTA, jitted with JAX.

    .. math:: w^{k+1} = \\operatorname{ST}\\big(v^k - \\nabla f(v^k)/L,\\; \\lambda/L\\big),
        \\qquad L = (\\sup \\ell'')\\,\\|X\\|_2^2 + \\max_j \\mu_j ,

    with Nesterov momentum ``v`` and adaptive restart when ``accelerated=True``.

    Examples
    --------
    >>> import numpy as np
    >>> from dargmin.hyper import lasso
    >>> prob = lasso(np.eye(3), np.array([3.0, 0.0, -3.0]), fit_intercept=False)
    >>> FISTA().solve(prob, [np.log(0.5)]).coef.round(6).tolist()
    [1.5, 0.0, -1.5]
    """

    tol: float = 1e-10
    max_iter: int = 100_000
    accelerated: bool = True
    name: str = "fista"

    def solve(self, problem: HyperProblem, log_theta: Array, w0: Array | None = None):
        """Minimize the inner problem; return an :class:`InnerResult`."""
        with jax.enable_x64(True):  # the solvers are float64 throughout
            return self._solve(problem, log_theta, w0)

    def _solve(self, problem: HyperProblem, log_theta: Array, w0: Array | None = None):
        t0 = time.perf_counter()
        theta = problem.check_theta(log_theta)
        l1, l2 = problem.penalties(jnp.asarray(theta))
        lip = problem.datafit.curvature_bound(problem.n_samples) * np.linalg.norm(
            problem.design, 2
        ) ** 2 + float(jnp.max(l2))
        w, it, viol = _fista_solve(
            jnp.asarray(problem.design),
            jnp.asarray(problem.target),
            jnp.asarray(_init(problem, w0)),
            l1,
            l2,
            1.0 / max(lip, 1e-300),
            self.tol * _scale(problem),
            self.max_iter,
            problem.datafit,
            self.accelerated,
        )
        w = np.asarray(w)
        kkt = float(viol) / _scale(problem)
        ok = bool(kkt <= self.tol)
        if not ok:
            name = "FISTA" if self.accelerated else "ISTA"
            _warn_not_converged(name, kkt, self.tol, int(it), theta)
        return InnerResult(w, int(it), kkt, ok, time.perf_counter() - t0)


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
    >>> import numpy as np
    >>> from dargmin.hyper import lasso
    >>> prob = lasso(np.eye(3), np.array([3.0, 0.0, -3.0]), fit_intercept=False)
    >>> SklearnSolver().solve(prob, [np.log(0.5)]).coef.round(6).tolist()
    [1.5, 0.0, -1.5]
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
        pen = problem.penalties(jnp.asarray(theta))
        l1, l2 = (np.asarray(v) for v in pen)
        mu = float(l2[0]) if l2.size else 0.0
        if np.ptp(l2) > 0:
            raise ValueError("SklearnSolver needs one ℓ2 strength shared by all features.")
        if np.any(l1 <= 0):
            raise ValueError("SklearnSolver needs positive ℓ1 strengths for all features.")
        c = float(np.max(l1))
        scale = c / l1  # column scaling that turns weights λⱼ into a common strength c
        uniform = bool(np.ptp(l1) == 0)
        if not uniform and mu > 0:
            raise ValueError(
                "SklearnSolver: per-feature ℓ1 weights with an ℓ2 term are not supported."
            )
        X = problem.design if uniform else problem.design * scale
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
            self._est.fit(X, problem.target)
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
            raise ValueError("RidgeDirect solves least squares with an ℓ2 penalty only.")
        t0 = time.perf_counter()
        theta = problem.check_theta(log_theta)
        _, l2 = (np.asarray(v) for v in problem.penalties(jnp.asarray(theta)))
        X, y, n = problem.design, problem.target, problem.n_samples
        if np.ptp(l2) == 0:
            key = ("svd", 0)
            if key not in problem._jit_cache:
                problem._jit_cache[key] = np.linalg.svd(X, full_matrices=False)
            U, sv, Vt = problem._jit_cache[key]
            w = Vt.T @ (sv / (sv**2 + n * l2[0]) * (U.T @ y))
        else:
            w = np.linalg.solve(X.T @ X / n + np.diag(l2), X.T @ y / n)
        kkt = kkt_violation(problem, w, theta)
        return InnerResult(w, 1, kkt, True, time.perf_counter() - t0)


def make_solver(solver: str | Any, problem: HyperProblem) -> Any:
    """Resolve ``"cd"``, ``"fista"``, ``"ista"``, ``"sklearn"``, ``"auto"`` or an instance.

    ``"auto"`` is scikit-learn's coordinate descent for least squares with ℓ1 weights (the
    fastest option on CPU), :class:`RidgeDirect` for ridge and :class:`ProxCD` otherwise.

    Examples
    --------
    >>> import numpy as np
    >>> from dargmin.hyper import ridge
    >>> make_solver("auto", ridge(np.eye(3), np.ones(3))).name
    'direct'
    """
    if not isinstance(solver, str):
        if not hasattr(solver, "solve"):
            raise TypeError(f"An inner solver needs a .solve method, got {solver!r}.")
        return solver
    if solver == "auto":
        quad = isinstance(problem.datafit, Quadratic) and not problem.augmented
        if quad and problem.l1 is None:
            return RidgeDirect()
        return SklearnSolver() if quad else ProxCD()
    table = {
        "cd": ProxCD,
        "fista": FISTA,
        "ista": partial(FISTA, accelerated=False, name="ista"),
        "sklearn": SklearnSolver,
        "direct": RidgeDirect,
    }
    if solver not in table:
        raise ValueError(f"Unknown inner solver {solver!r}; choose from {sorted(table)} or 'auto'.")
    return table[solver]()
