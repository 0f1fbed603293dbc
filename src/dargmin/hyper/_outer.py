"""Outer optimization of the hyperparameters: projected gradient descent, L-BFGS-B, optax.

All optimizers work in log scale on a box ``[lo, hi]`` and record every evaluation of the
criterion in a :class:`Monitor`; the best evaluated point is returned.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from dargmin.diagnostics import DargminWarning, SingularSystemError
from dargmin.hyper._criteria import CrossVal
from dargmin.hyper._hypergrad import METHODS, hypergradient
from dargmin.hyper._problems import HyperProblem
from dargmin.hyper._solvers import make_solver

Array = Any
ValueGrad = Callable[[np.ndarray], tuple[float, np.ndarray]]


@dataclass
class Monitor:
    """Per-evaluation record of an outer optimization (or of a grid search).

    Attributes
    ----------
    times : list of float
        Seconds since the start, at the end of each evaluation.
    log_thetas : list of numpy.ndarray
        Evaluated hyperparameters (log scale).
    values : list of float
        Criterion values.
    grad_norms : list of float
        ``‖∇R‖∞`` (``nan`` for gradient-free evaluations such as grid points).
    accepted : list of bool
        Whether the evaluation became the new iterate (line searches reject some).

    Examples
    --------
    >>> m = Monitor()
    >>> m.record([0.0], 1.5, 0.1)
    >>> m.best()
    (array([0.]), 1.5)
    """

    times: list[float] = field(default_factory=list)
    log_thetas: list[np.ndarray] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    accepted: list[bool] = field(default_factory=list)
    _t0: float = field(default_factory=time.perf_counter, repr=False)

    def record(
        self, log_theta: Array, value: float, grad_norm: float = float("nan"), accepted=True
    ) -> None:
        """Append one evaluation (time is measured from the monitor's creation)."""
        self.times.append(time.perf_counter() - self._t0)
        self.log_thetas.append(np.array(log_theta, dtype=float).reshape(-1))
        self.values.append(float(value))
        self.grad_norms.append(float(grad_norm))
        self.accepted.append(bool(accepted))

    def best(self) -> tuple[np.ndarray, float]:
        """The evaluated ``(log_theta, value)`` with the lowest finite value."""
        vals = np.asarray(self.values, dtype=float)
        if vals.size == 0 or not np.any(np.isfinite(vals)):
            raise ValueError("No finite criterion value was recorded.")
        i = int(np.nanargmin(np.where(np.isfinite(vals), vals, np.nan)))
        return self.log_thetas[i], float(vals[i])

    def time_to_reach(self, target: float) -> float:
        """First time the criterion was ``≤ target`` (``inf`` if never)."""
        for t, v in zip(self.times, self.values, strict=True):
            if v <= target:
                return t
        return float("inf")


class OuterResult(NamedTuple):
    """Result of :func:`minimize_hyper` / :func:`optimize_hyperparameters`.

    Attributes
    ----------
    log_theta : numpy.ndarray
        Best evaluated hyperparameters (log scale).
    value : float
        Criterion at ``log_theta``.
    n_iter : int
        Outer iterations (accepted steps for gradient descent).
    n_evals : int
        Criterion evaluations (each is one inner solve per fold plus one hypergradient).
    monitor : Monitor
        The evaluation history.
    message : str
        Why the optimization stopped.
    coef : Any
        Inner solution(s) at the last evaluation (for warm starts).
    """

    log_theta: np.ndarray
    value: float
    n_iter: int
    n_evals: int
    monitor: Monitor
    message: str
    coef: Any = None


def _projected_grad(theta: np.ndarray, g: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    # Components that push against an active bound cannot be followed: drop them.
    pg = g.copy()
    pg[(theta <= lo) & (g > 0)] = 0.0
    pg[(theta >= hi) & (g < 0)] = 0.0
    return pg


def _progress(progress: bool | None, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, leave=False)


def minimize_hyper(
    fun: ValueGrad,
    log_theta0: Array,
    *,
    optimizer: Any = "gd",
    bounds: tuple[Array, Array] | None = None,
    max_iter: int = 50,
    gtol: float = 1e-6,
    ftol: float = 1e-5,
    max_step: float = 1.0,
    monitor: Monitor | None = None,
    progress: bool | None = False,
) -> OuterResult:
    """Minimize ``R(θ)`` given ``fun(θ) -> (R(θ), ∇R(θ))`` over a box in log scale.

    ``optimizer="gd"`` is projected gradient descent with Armijo backtracking,

    .. math::

        \\theta^+ = \\Pi_{[lo, hi]}\\big(\\theta - t\\,\\nabla R(\\theta)\\big),\\qquad
        R(\\theta^+) \\le R(\\theta) - 10^{-4}\\,\\nabla R(\\theta)^\\top(\\theta - \\theta^+),

    where the trial step ``t`` doubles after each accepted step and halves after each
    rejection, and ``‖θ⁺ − θ‖∞ ≤ max_step`` always (a factor ``e^{max_step}`` on the
    penalties): the step adapts to the curvature but never jumps across the box.
    ``"lbfgs"`` is SciPy's L-BFGS-B; an ``optax.GradientTransformation`` runs that optimizer
    with projection onto the box and the same step cap.

    Stopping: ``‖projected ∇R‖∞ ≤ gtol``, a relative decrease below ``ftol`` between two
    accepted iterates, or ``max_iter`` iterations.

    Examples
    --------
    >>> import numpy as np
    >>> res = minimize_hyper(lambda t: (float((t[0] - 1.0) ** 2), 2 * (t - 1.0)), [3.0])
    >>> round(float(res.log_theta[0]), 4)
    1.0
    """
    theta = np.array(log_theta0, dtype=float).reshape(-1)
    if not np.all(np.isfinite(theta)):
        raise ValueError(f"log_theta0 must be finite, got {theta.tolist()[:5]}.")
    lo, hi = (
        (np.full_like(theta, -np.inf), np.full_like(theta, np.inf))
        if bounds is None
        else (np.broadcast_to(np.asarray(b, float), theta.shape).copy() for b in bounds)
    )
    if np.any(lo > hi):
        raise ValueError("bounds: every lower bound must be <= the upper bound.")
    if max_step <= 0:
        raise ValueError(f"max_step must be positive, got {max_step}.")
    theta = np.clip(theta, lo, hi)
    mon = monitor if monitor is not None else Monitor()
    n_evals = 0

    def evaluate(th: np.ndarray, accepted: bool = True) -> tuple[float, np.ndarray | None]:
        nonlocal n_evals
        n_evals += 1
        v, g = fun(th)
        gn = float(np.max(np.abs(g))) if g is not None and np.isfinite(v) else float("nan")
        mon.record(th, v, gn, accepted)
        return v, g

    if isinstance(optimizer, str) and optimizer == "lbfgs":
        return _lbfgs(evaluate, theta, lo, hi, max_iter, gtol, ftol, mon, progress, n_evals)
    is_optax = hasattr(optimizer, "init") and hasattr(optimizer, "update")
    if not (is_optax or optimizer == "gd"):
        raise ValueError(
            f"optimizer must be 'gd', 'lbfgs' or an optax GradientTransformation, got "
            f"{optimizer!r}."
        )
    value, grad = evaluate(theta)
    if not np.isfinite(value) or grad is None:
        raise FloatingPointError(f"The criterion is not finite at the starting point {theta}.")
    step = None
    message = f"maximum number of iterations ({max_iter}) reached"
    opt_state = optimizer.init(theta) if is_optax else None
    it = 0
    bar = _progress(progress, max_iter, "hyper")
    try:
        for it in range(1, max_iter + 1):
            pg = _projected_grad(theta, grad, lo, hi)
            gmax = float(np.max(np.abs(pg)))
            if gmax <= gtol:
                message = f"projected gradient ‖∇R‖∞ = {gmax:.3g} <= gtol"
                it -= 1
                break
            if is_optax:
                import optax

                updates, opt_state = optimizer.update(grad, opt_state, theta)
                delta = np.clip(np.asarray(updates, float), -max_step, max_step)
                new = np.clip(np.asarray(optax.apply_updates(theta, delta)), lo, hi)
                new_value, new_grad = evaluate(new)
                if not np.isfinite(new_value) or new_grad is None:
                    message = f"criterion not finite at {new.tolist()[:5]}"
                    break
            else:
                cap = max_step / gmax
                step = cap if step is None else min(2.0 * step, cap)
                for _ in range(30):
                    new = np.clip(theta - step * pg, lo, hi)
                    if np.array_equal(new, theta):
                        break
                    new_value, new_grad = evaluate(new, accepted=False)
                    decrease = 1e-4 * float(grad @ (theta - new))
                    if np.isfinite(new_value) and new_value <= value - decrease:
                        mon.accepted[-1] = True
                        break
                    step *= 0.5
                else:
                    message = "line search failed to decrease the criterion"
                    break
                if np.array_equal(new, theta) or not mon.accepted[-1]:
                    message = "no feasible descent step (stuck at the bounds)"
                    break
            rel = abs(value - new_value) / max(abs(value), 1e-300)
            theta, value, grad = new, new_value, new_grad
            bar.update(1)
            bar.set_postfix(criterion=f"{value:.4g}")
            if rel <= ftol:
                message = f"relative criterion change {rel:.3g} <= ftol"
                break
    finally:
        bar.close()
    best_theta, best_value = mon.best()
    return OuterResult(best_theta, best_value, it, n_evals, mon, message)


def _lbfgs(evaluate, theta, lo, hi, max_iter, gtol, ftol, mon, progress, n_evals0):
    import scipy.optimize

    bar = _progress(progress, max_iter, "hyper (L-BFGS-B)")
    n_iter = 0

    def fg(th):
        v, g = evaluate(np.asarray(th, float))
        if not np.isfinite(v) or g is None:
            # L-BFGS-B backtracks on a large finite value; inf/nan would abort it.
            return 1e300, np.zeros_like(th)
        return v, np.asarray(g, float)

    def callback(intermediate_result):
        nonlocal n_iter
        n_iter += 1
        bar.update(1)
        bar.set_postfix(criterion=f"{intermediate_result.fun:.4g}")

    bnds = list(
        zip(np.where(np.isfinite(lo), lo, None), np.where(np.isfinite(hi), hi, None), strict=True)
    )
    try:
        res = scipy.optimize.minimize(
            fg,
            theta,
            jac=True,
            method="L-BFGS-B",
            bounds=bnds,
            callback=callback,
            options={"maxiter": max_iter, "gtol": gtol, "ftol": ftol},
        )
    finally:
        bar.close()
    best_theta, best_value = mon.best()
    return OuterResult(best_theta, best_value, n_iter, len(mon.values), mon, str(res.message))


def _references(problem: HyperProblem) -> tuple[np.ndarray, np.ndarray]:
    """Per-coordinate reference scale (log) and whether the coordinate is an ℓ1 strength."""
    ref_l1 = np.log(max(problem.alpha_max(), 1e-300) / 10.0)
    curv = problem.datafit.curvature_bound(problem.n_samples) * np.sum(problem.X**2)
    ref_l2 = np.log(max(curv / problem.n_features, 1e-300) / 10.0)
    if problem.l1 is not None and problem.l2 is not None and problem.n_hyper == 2:
        is_l1 = np.array([True, False])  # elastic net: (log λ, log μ)
    else:
        is_l1 = np.full(problem.n_hyper, problem.l1 is not None)
    return np.where(is_l1, ref_l1, ref_l2), is_l1


def default_log_theta0(problem: HyperProblem) -> np.ndarray:
    """A starting point: ``λ = λ_max/10`` for ℓ1 strengths, ``μ = c̄/10`` for ℓ2 strengths.

    ``λ_max = ‖Xᵀ∇ℓ(0)‖∞`` is where the ℓ1 solution becomes 0; ``c̄ = sup ℓ'' ‖X‖_F²/p`` is
    the mean curvature of the data fit along a coordinate, the scale of a ridge term.

    Examples
    --------
    >>> import numpy as np
    >>> from dargmin.hyper import lasso
    >>> prob = lasso(np.eye(2), np.array([2.0, 0.0]), fit_intercept=False)
    >>> round(float(np.exp(default_log_theta0(prob))[0]), 12)   # λ_max/10 = (2/2)/10
    0.1
    """
    return _references(problem)[0]


def default_bounds(problem: HyperProblem) -> tuple[np.ndarray, np.ndarray]:
    """Box for ``log_theta`` around the reference scales of :func:`default_log_theta0`.

    ℓ1 strengths: ``[10⁻⁴, 1] × λ_max`` (above ``λ_max`` the model is 0; four decades below
    covers scikit-learn's grids). ℓ2 strengths: ``[10⁻⁶, 10³] × c̄``.

    Examples
    --------
    >>> import numpy as np
    >>> from dargmin.hyper import ridge
    >>> lo, hi = default_bounds(ridge(np.eye(2), np.ones(2)))
    >>> bool(lo[0] < hi[0])
    True
    """
    ref, is_l1 = _references(problem)
    ln10 = np.log(10.0)
    lo = ref + np.where(is_l1, -3.0, -5.0) * ln10
    hi = ref + np.where(is_l1, 1.0, 4.0) * ln10
    return lo, hi


def optimize_hyperparameters(
    problem: HyperProblem,
    criterion: Any,
    log_theta0: Array | None = None,
    *,
    method: str = "implicit",
    optimizer: Any = "gd",
    solver: Any = "auto",
    bounds: tuple[Array, Array] | None = None,
    max_iter: int = 50,
    gtol: float = 1e-6,
    ftol: float = 1e-5,
    max_step: float = 1.0,
    progress: bool | None = False,
    monitor: Monitor | None = None,
    **hypergradient_options: Any,
) -> OuterResult:
    """Hypergradient descent: minimize ``R(θ) = C(ŵ(θ))`` over ``log_theta``.

    Each evaluation solves the inner problem (one per fold), warm-started from the previous
    evaluation, and computes ``∇R`` with :func:`hypergradient`; the outer loop is
    :func:`minimize_hyper`.

    Parameters
    ----------
    problem, criterion
        As in :func:`hypergradient`.
    log_theta0
        Starting point (default :func:`default_log_theta0`).
    method
        Hypergradient method (see :data:`METHODS`).
    optimizer
        ``"gd"``, ``"lbfgs"`` or an ``optax`` optimizer.
    solver
        Inner solver (``"auto"``, ``"cd"``, ``"fista"``, ``"sklearn"`` or an instance).
    bounds
        ``(lo, hi)`` in log scale (default :func:`default_bounds`).
    max_iter, gtol, ftol, max_step, progress, monitor
        See :func:`minimize_hyper`.
    **hypergradient_options
        Forwarded to :func:`hypergradient` (``tol``, ``tol_jac``, ``unrolled``...).

    Examples
    --------
    >>> import numpy as np
    >>> from dargmin.hyper import lasso, HeldOutMSE
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(80, 20)); y = X[:, :3] @ [1.0, -2.0, 1.5] + rng.normal(size=80)
    >>> res = optimize_hyperparameters(lasso(X[:40], y[:40]), HeldOutMSE(X[40:], y[40:]))
    >>> res.value < 1.5
    True
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose from {METHODS}.")
    theta0 = default_log_theta0(problem) if log_theta0 is None else log_theta0
    theta0 = problem.check_theta(theta0)
    if bounds is None:
        bounds = default_bounds(problem)
    n_folds = len(criterion.folds(problem)) if isinstance(criterion, CrossVal) else 1
    # One solver object per fold: scikit-learn's warm start lives in the estimator object.
    base = [problem] if n_folds == 1 else [p for p, _ in criterion.folds(problem)]
    solvers = [make_solver(solver, p) for p in base]

    def evaluate(th: np.ndarray, w0: Any) -> tuple[float, np.ndarray, Any]:
        hg = hypergradient(
            problem, criterion, th, method=method, solver=solvers, w0=w0, **hypergradient_options
        )
        return hg.value, hg.grad, hg.coef

    return minimize_rejecting_singular(
        evaluate,
        theta0,
        optimizer=optimizer,
        bounds=bounds,
        max_iter=max_iter,
        gtol=gtol,
        ftol=ftol,
        max_step=max_step,
        monitor=monitor,
        progress=progress,
    )


def minimize_rejecting_singular(
    evaluate: Callable[[np.ndarray, Any], tuple[float, np.ndarray, Any]],
    theta0: np.ndarray,
    **minimize_options: Any,
) -> OuterResult:
    """Run :func:`minimize_hyper` on ``evaluate(θ, w0) -> (value, gradient, coef)``,
    warm-starting each inner solve from the previous coefficients and rejecting (value
    ``inf``) trial points whose restricted Hessian is singular, with one warning at the end.

    Shared by :func:`optimize_hyperparameters` and :func:`dargmin.hyper.optimize_sure`.
    """
    state: dict[str, Any] = {"coef": None, "n_singular": 0}

    def fun(th: np.ndarray) -> tuple[float, np.ndarray | None]:
        try:
            value, grad, coef = evaluate(th, state["coef"])
        except SingularSystemError:
            # Too little regularization (|S| > n): reject this trial point, keep going.
            state["n_singular"] += 1
            return float("inf"), None
        state["coef"] = coef
        return value, grad

    res = minimize_hyper(fun, theta0, **minimize_options)
    if state["n_singular"]:
        warnings.warn(
            f"{state['n_singular']} trial point(s) had a singular restricted Hessian "
            "(non-unique inner solution) and were rejected.",
            DargminWarning,
            stacklevel=3,
        )
    return res._replace(coef=state["coef"])
