"""The outer loop: hypergradient descent on a criterion (validation, cross-validation, SURE).

:func:`optimize_hyperparameters` and :func:`optimize_sure` evaluate ``(R(θ), ∇R(θ))`` with
warm-started inner solves (:func:`~dargmin.hyper.hypergradient`,
:meth:`~dargmin.hyper.SURE.evaluate`) and minimize it with an outer optimizer
(:func:`~dargmin.hyper.minimize_hyper`) on a box around the problem's reference scales.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from dargmin.diagnostics import DargminWarning, SingularSystemError
from dargmin.hyper._dof import _check_problem
from dargmin.hyper._evaluation import hypergradient, solve_folds
from dargmin.hyper._hypergradients import _criterion_grad
from dargmin.hyper._optimizers import (
    Monitor,
    OuterResult,
    ProjectedGradientDescent,
    _resolve_optimizer,
    minimize_hyper,
)
from dargmin.hyper._problems import HyperProblem
from dargmin.hyper._registry import resolve
from dargmin.hyper._risk import SURE, SURE_OPTIONS, split_options

Array = Any

#: The keyword options of :func:`minimize_hyper` that :func:`optimize_sure` forwards.
_MINIMIZE_OPTIONS = frozenset(inspect.signature(minimize_hyper).parameters) - {"fun", "log_theta0"}


def _references(problem: HyperProblem) -> tuple[np.ndarray, np.ndarray]:
    """Per-coordinate reference scale (log) and whether the coordinate is an ℓ1 strength
    (computed once per problem: the start and the bounds both ask)."""
    ref, is_l1 = problem.cache.get("references", lambda: _compute_references(problem))
    return ref.copy(), is_l1.copy()


def _compute_references(problem: HyperProblem) -> tuple[np.ndarray, np.ndarray]:
    # A null-model problem (zero or constant y, all-zero X: every penalty gives ŵ = 0) has
    # α_max ≈ 0 or no curvature; fall back to the unit scale rather than a log of ~0.
    null = problem.null_model_reason() is not None
    amax = problem.alpha_max()
    ref_l1 = np.log((amax if amax > 0 and not null else 1.0) / 10.0)
    curv = problem.datafit.curvature_bound(problem.n_samples) * float(np.sum(problem.col_sq))
    ref_l2 = np.log((curv / problem.n_features if curv > 0 and not null else 1.0) / 10.0)
    is_l1 = problem.l1_coordinates()
    return np.where(is_l1, ref_l1, ref_l2), is_l1


def default_log_theta0(problem: HyperProblem) -> np.ndarray:
    """A starting point: ``λ = λ_max/10`` for ℓ1 strengths, ``μ = c̄/10`` for ℓ2 strengths.

    ``λ_max = ‖Xᵀ∇ℓ(0)‖∞`` is where the ℓ1 solution becomes 0; ``c̄ = sup ℓ'' ‖X‖_F²/p`` is
    the mean curvature of the data fit along a coordinate, the scale of a ridge term. For a
    null-model problem (:meth:`HyperProblem.null_model_reason`) both fall back to 1.

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


def single_threaded_blas() -> contextlib.AbstractContextManager:
    """A context limiting the BLAS libraries loaded by NumPy/SciPy to one thread.

    The outer loop alternates NumPy BLAS calls (scikit-learn's solver, the support
    Hessian) with small XLA computations (the support solves). After each BLAS call
    OpenBLAS's worker threads keep spinning for a while and starve XLA's threads: on two
    cores a 64 × 64 support solve took 200-600 ms instead of 0.5 ms (diabetes with
    polynomial features: a 17 s fit instead of 1.5 s). The problems solved here are too
    small to gain from BLAS threads. ``threadpoolctl`` ships with scikit-learn.

    One ``ThreadpoolController`` is kept for the process: ``threadpool_limits`` scans the
    loaded libraries on every call (9 ms per estimator fit, 6 % of a ``LassoHyperCV`` fit
    on make_regression 300x1000).
    """
    controller = _blas_controller()
    if controller is None:  # pragma: no cover - scikit-learn (hence threadpoolctl) missing
        return contextlib.nullcontext()
    return controller.limit(limits=1, user_api="blas")


@functools.cache
def _blas_controller() -> Any:
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover
        return None
    return ThreadpoolController()


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
    n_path: int = 0,
    rgtol: float = 1e-4,
    xtol: float = 1e-3,
    n_jobs: int | None = None,
    path_solver: Any = None,
    **hypergradient_options: Any,
) -> OuterResult:
    """Hypergradient descent: minimize ``R(θ) = C(ŵ(θ))`` over ``log_theta``.

    Each evaluation solves the inner problem (one per fold), warm-started from the previous
    evaluation, and computes ``∇R`` with :func:`hypergradient`; the outer loop is
    :func:`minimize_hyper`.

    A cross-validation curve often has several local minima. With ``n_path > 0`` (and one
    hyperparameter) ``R`` is first evaluated on ``n_path`` log-spaced points of the box,
    from the strongest penalty down, each inner solve warm-started from the previous one
    (the path scikit-learn's ``LassoCV`` computes, but coarse); the descent then starts at
    the best of them (``log_theta0`` is ignored). The path stops early once ``R`` exceeds
    its best value by 2 % (:data:`PATH_RISE`): weaker penalties only overfit more, and
    their inner solves are the slowest. Once the decrease slows (below 10 % per point, or
    below half the previous decrease in log), each
    next point is first solved by the path solver's ``probe()`` variant where it has one
    (:meth:`WorkingSetCD.probe`: 10 epochs; :meth:`ProxNewton.probe`: 100x the tolerance):
    if that loose value already rises by 2 % the path stops on it, otherwise the solve
    continues from the probe's solution. The hypergradient at the best path point is taken
    at the path solver's tolerance (from its own solutions: no epochs); if that point stays
    the best, its value is re-solved at ``solver``'s tolerance before it is reported. With
    the default optimizer (``"gd"``) the descent's first step goes to the minimizer of the
    quadratic through ``R`` and ``R'`` at the best path point and ``R`` at the neighbour
    its slope descends to. The path points are recorded in the monitor (a probe's loose
    value where the path stopped on one) and counted in ``n_evals`` and ``n_iter``.

    Parameters
    ----------
    problem, criterion
        As in :func:`hypergradient`.
    log_theta0
        Starting point (default :func:`default_log_theta0`).
    method
        Hypergradient method: an object (:class:`ImplicitSupport`, :class:`ImplicitForward`,
        :class:`Unrolled`) or a name (see :data:`REGISTRY`).
    optimizer
        Outer optimizer: an object (:class:`ProjectedGradientDescent`, :class:`LBFGSB`,
        :class:`OptaxOptimizer`), an optax optimizer, ``"gd"`` or ``"lbfgs"``.
    solver
        Inner solver (an :class:`InnerSolver` or ``"auto"``, ``"cd"``, ``"fista"``,
        ``"sklearn"``).
    bounds
        ``(lo, hi)`` in log scale (default :func:`default_bounds`).
    max_iter, gtol, ftol, max_step, progress, monitor, rgtol, xtol
        See :func:`minimize_hyper`.
    n_path
        Number of coarse-path points evaluated before the descent (0: none).
    path_solver
        Inner solver of the coarse path's value-only solves (default ``solver``): a looser
        tolerance there only has to pick the basin; the descent starts with a solve by
        ``solver``, warm-started from the path's solution.
    n_jobs
        Threads solving the CV folds concurrently (see :func:`hypergradient`).
    **hypergradient_options
        Legacy options of the method names (``tol``, ``tol_jac``, ``unrolled``...), see
        :func:`hypergradient`.

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
    with single_threaded_blas():
        meth = resolve("method", method, problem, **hypergradient_options)
        theta0 = default_log_theta0(problem) if log_theta0 is None else log_theta0
        theta0 = problem.check_theta(theta0)
        if bounds is None:
            bounds = default_bounds(problem)
        folds = hasattr(criterion, "folds")
        base = [p for p, _ in criterion.folds(problem)] if folds else [problem]
        # One solver object per fold (a copy of a user's instance): scikit-learn's warm start
        # lives in the estimator object, which must not be shared between folds.
        solvers = [copy.deepcopy(resolve("solver", solver, p)) for p in base]
        path_solvers = (
            solvers
            if path_solver is None
            else [copy.deepcopy(resolve("solver", path_solver, p)) for p in base]
        )

        def evaluate(
            th: np.ndarray, w0: Any, fold_solvers: list[Any] = solvers
        ) -> tuple[float, np.ndarray, Any]:
            hg = hypergradient(
                problem, criterion, th, method=meth, solver=fold_solvers, w0=w0, n_jobs=n_jobs
            )
            return hg.value, hg.grad, hg.coef

        def evaluate_path_point(th: np.ndarray, w0: Any) -> tuple[float, np.ndarray, Any]:
            # At the path's best point, from its own solutions: the path solver's tolerance
            # (met already, no epochs) is enough for the descent's first step; the descent's
            # later points are solved by ``solvers``. A re-solve at the search tolerance there
            # cost 5 solves (make_regression 300x1000) for a change of 0.02 % in the value.
            return evaluate(th, w0, path_solvers)

        probe_solvers = [_probe_solver(s) for s in path_solvers]

        def value_only(
            th: np.ndarray, w0: Any, probe: bool = False, fold_solvers: Any = None
        ) -> tuple[float, Any]:
            # The coarse path only compares criterion values: no support systems.
            pairs = criterion.folds(problem) if folds else [(problem, criterion)]
            starts = [None] * len(pairs) if w0 is None else (list(w0) if folds else [w0])
            if fold_solvers is None:
                fold_solvers = probe_solvers if probe else path_solvers
            results = solve_folds(pairs, fold_solvers, th, starts, n_jobs)
            coefs = [np.asarray(r.coef) for r in results]
            with jax.enable_x64(True):
                vals = [
                    _criterion_grad(crit_k, prob_k, w)[0]
                    for (prob_k, crit_k), w in zip(pairs, coefs, strict=True)
                ]
            return float(np.mean(vals)), (coefs if folds else coefs[0])

        # The best path point's hypergradient at the path solvers' tolerance (value-only
        # path solves by other solvers than the search's).
        path_tol_start = meth.needs_solution and path_solvers is not solvers
        mon = monitor if monitor is not None else Monitor()
        coef0, first, n_path_evals = None, None, 0
        if n_path > 0:
            path = _coarse_path(
                # Without value-only solves (a method that runs its own solver) the path
                # evaluates every point with the search solvers, as before.
                evaluate_path_point if path_tol_start else evaluate,
                value_only if meth.needs_solution else None,
                all(s is not None for s in probe_solvers),
                problem,
                np.asarray(bounds[0]),
                np.asarray(bounds[1]),
                n_path,
                mon,
            )
            theta0, first, coef0, n_path_evals = path.theta, path.first, path.coef, path.n_evals
            # The best path point is below its two neighbours, so a minimum lies between
            # them: the descent stays there (the weaker penalties beyond are the slowest to
            # solve) with steps of at most half the path's spacing.
            if path.first is not None:
                bounds = path.bracket
                max_step = min(max_step, path.spacing / 2)
                step = _model_step(path, mon, n_path_evals)
                if step is not None and _is_default_descent(optimizer):
                    optimizer = ProjectedGradientDescent(first_step=step)
        descent_evaluate: Callable[..., Any] = evaluate
        if n_path_evals and isinstance(_resolve_optimizer(optimizer), ProjectedGradientDescent):
            descent_evaluate = _known_points_first(evaluate, mon, n_path_evals)
        res = minimize_rejecting_singular(
            descent_evaluate,
            theta0,
            coef0=coef0,
            first=first,
            optimizer=optimizer,
            bounds=bounds,
            max_iter=max_iter,
            gtol=gtol,
            ftol=ftol,
            max_step=max_step,
            monitor=mon,
            progress=progress,
            rgtol=rgtol,
            xtol=xtol,
        )
        if n_path_evals:
            # The best point may be a path point (the descent only sees its own records).
            start = len(mon.values) - res.n_evals - n_path_evals
            theta_b, value_b = mon.best(start)
            if path_tol_start and coef0 is not None and np.array_equal(theta_b, theta0):
                # The path's best point, evaluated at the path solver's tolerance only: its
                # value at the search tolerance (a warm-started re-solve, value only) replaces
                # its records, so that the reported loss is the search's accuracy.
                value_b, _ = value_only(theta_b, coef0, fold_solvers=solvers)
                mon.revise(start, theta_b, value_b)
                theta_b, value_b = mon.best(start)
            res = res._replace(
                log_theta=theta_b,
                value=value_b,
                n_iter=res.n_iter + n_path_evals,
                n_evals=res.n_evals + n_path_evals,
            )
        return res


#: The coarse path stops once the criterion exceeds its best value by this fraction. On
#: make_regression 300x1000 the two points past the first rise (4 %) took 60 % of the
#: path's time. The bumps between the local minima of the converged 5-fold CV curve of
#: standardized diabetes (three minima) are 0.26 % and 0.04 % high: ten times below this.
PATH_RISE = 0.02
#: Once the path's decrease slows below this fraction per point, the next point is first
#: solved loosely by the solver's ``probe()`` variant (a probe): if even that value is
#: :data:`PATH_RISE` above the best, the path stops there; otherwise the solve goes on to
#: the path's tolerance from the probe's solution. The point past the minimum, the
#: weakest penalty of the path, was its slowest solve: 25-35 % of the fit time of
#: ``LassoHyperCV`` (make_regression 300x1000) and ``SparseLogisticHyperCV``
#: (make_classification 300x300).
PATH_PROBE_BELOW = 0.1
#: The next point is also probed when the path's last decrease, in log, is below this
#: fraction of the one before: a decrease slowing that sharply announces the minimum. On
#: make_regression 300x1000 (the estimators benchmark's split) the CV loss fell 77, 73, 69,
#: then 35 % per point, never less than 10 %, and the point past the minimum was solved in
#: full (12 ms, a fifth of the fit); its probe rises 3.1 % and stops the path (fit 59 ->
#: 53 ms).
PATH_PROBE_SLOWDOWN = 0.5


def _probe_solver(solver: Any) -> Any:
    """The solver's cheap variant for the path's probes (its ``probe()`` method), or
    ``None`` where it has none."""
    probe = getattr(solver, "probe", None)
    return probe() if callable(probe) else None


class _PathStart(NamedTuple):
    """Where the coarse path leaves the descent: the best point ``theta``, its
    ``(value, gradient)`` and inner solutions, the path's evaluation count, the bracket
    ``(lo, hi)`` of the best point's grid neighbours and the grid spacing (log scale)."""

    theta: np.ndarray
    first: tuple[float, np.ndarray] | None
    coef: Any
    n_evals: int
    bracket: tuple[np.ndarray, np.ndarray]
    spacing: float


def _coarse_path(
    evaluate: Callable[[np.ndarray, Any], tuple[float, np.ndarray, Any]],
    value_only: Callable[..., tuple[float, Any]] | None,
    can_probe: bool,
    problem: HyperProblem,
    lo: np.ndarray,
    hi: np.ndarray,
    n_path: int,
    monitor: Monitor,
) -> _PathStart:
    """Evaluate ``R`` on ``n_path`` points from ``hi`` to ``lo`` (warm-started), stopping
    once ``R`` exceeds its best value by :data:`PATH_RISE`.

    With ``value_only(θ, w0) -> (R, coef)`` the path solves and compares values only, and
    ``evaluate`` (value and hypergradient) runs once, at the best point, warm-started from
    its own solutions (a solve of no or one iteration): the support systems of the other
    points were a third of the path's time (make_regression 300x1000)."""
    if problem.n_hyper != 1:
        raise ValueError(
            f"n_path > 0 needs a single hyperparameter; {problem.name} has {problem.n_hyper}."
        )
    lo_b = np.broadcast_to(lo, (1,))
    hi_b = np.broadcast_to(hi, (1,))
    # The top of an ℓ1 box is α_max, where ŵ = 0 is known: start one step below it.
    grid = np.linspace(hi_b[0], lo_b[0], n_path + 1)[1:]
    best: tuple[float, np.ndarray, Any, Any] = (np.inf, grid[:1], None, None)
    coef, n_evals, i_best = None, 0, 0
    visited: list[tuple[float, int, np.ndarray, Any]] = []  # (value, index, θ, coef)
    for i, t in enumerate(grid):
        th = np.array([t])
        try:
            if value_only is None:
                value, grad, coef = evaluate(th, coef)
            else:
                start = coef
                if can_probe and _flattening(visited):
                    probe_value, start = value_only(th, coef, probe=True)
                    if probe_value > (1.0 + PATH_RISE) * best[0]:
                        # Past the minimum even for the loose solve (which under-fits: from
                        # the stronger penalty's warm start it rises less): stop.
                        n_evals += 1
                        monitor.record(th, probe_value, float("nan"), accepted=False)
                        break
                (value, coef), grad = value_only(th, start), None
        except SingularSystemError:
            # Past this point the support systems are singular (|S| > n): stop the path.
            break
        n_evals += 1
        gnorm = float("nan") if grad is None else float(np.max(np.abs(grad)))
        monitor.record(th, value, gnorm, accepted=False)
        visited.append((value, i, th, coef))
        if np.isfinite(value) and value < best[0]:
            best, i_best = (value, th, coef, grad), i
        elif value > (1.0 + PATH_RISE) * best[0]:
            # Well past the minimum: weaker penalties overfit more, and their inner solves
            # (larger supports) are the slowest of the path.
            break
    if best[2] is None:
        raise SingularSystemError(
            f"Every point of the coarse path of {problem.name} had a singular support "
            "system; raise the lower bound of log_theta."
        )
    if best[3] is None:
        # The hypergradient at the best point; if its support system is singular (an
        # inner solution with |S| above the rank of X_S, as near interpolation when p > n:
        # measured on make_regression 60x150 with noise, 3 folds), the next best points of
        # the path in turn, with a warning: the descent still explores the whole box and
        # rejects singular trial points.
        failed: list[float] = []
        for _, i, th, coef_i in sorted(
            (v for v in visited if np.isfinite(v[0])), key=lambda v: v[0]
        ):
            try:
                value, grad, coef = evaluate(th, coef_i)
            except SingularSystemError:
                failed.append(float(np.exp(th[0])))
                continue
            best, i_best = (value, th, coef, grad), i
            break
        else:
            # No hypergradient anywhere on the path: the descent re-evaluates and reports.
            return _PathStart(best[1], None, None, n_evals, (lo_b, hi_b), 0.0)
        if failed:
            warnings.warn(
                f"{problem.name}: the coarse path's best point(s) at exp(log_theta) = "
                f"{', '.join(f'{a:.4g}' for a in failed)} have "
                "a singular support system (more active features than the rank of their "
                "columns), so no hypergradient there; the descent starts from the best point "
                f"with one, {float(np.exp(best[1][0])):.4g}.",
                DargminWarning,
                stacklevel=3,
            )
    # The descent starts from the best point's own evaluation: re-solving there from other
    # warm starts could land on another (equally optimal) inner solution.
    # The first grid point's upper neighbour is the top of the box (hi), the last's lower
    # neighbour its bottom (lo).
    edges = np.concatenate([hi_b, grid, lo_b])
    bracket = (edges[i_best + 2 : i_best + 3].copy(), edges[i_best : i_best + 1].copy())
    spacing = float(abs(grid[1] - grid[0])) if grid.size > 1 else float(hi_b[0] - lo_b[0])
    return _PathStart(best[1], (best[0], best[3]), best[2], n_evals, bracket, spacing)


def _is_default_descent(optimizer: Any) -> bool:
    """Whether ``optimizer`` is the default, ``"gd"`` (an object is the user's own)."""
    return isinstance(optimizer, str) and optimizer == "gd"


def _model_step(path: _PathStart, monitor: Monitor, n_path: int) -> float | None:
    """The first step of the descent from the path's best point ``θ``: the distance to the
    minimizer of the quadratic through ``R(θ)``, ``R'(θ)`` and ``R(e)`` at the bracket end
    ``e`` the slope descends to (a path point), ``|R'(θ)| / (2c)`` with
    ``c = (R(e) − R(θ) − R'(θ)(e − θ)) / (e − θ)²``; ``None`` where unknown or not convex.

    The default first step, half the path's spacing, ignores the value at the bracket end:
    with this model, 8 -> 6 evaluations on make_classification 300x300 (the estimators
    benchmark's split), as many on make_regression 300x1000."""
    if path.first is None or path.theta.size != 1:
        return None
    value, grad = path.first
    g = float(np.asarray(grad).reshape(-1)[0])
    if not (np.isfinite(g) and g != 0.0):
        return None
    end = float(path.bracket[0][0] if g > 0 else path.bracket[1][0])
    r_end = _path_values(monitor, n_path).get(end)
    d = end - float(path.theta[0])
    if r_end is None or not np.isfinite(r_end) or d == 0.0:
        return None
    c = (r_end - value - g * d) / d**2
    if not (np.isfinite(c) and c > 0):
        return None
    return abs(g) / (2.0 * c)


def _known_points_first(
    evaluate: Callable[[np.ndarray, Any], tuple[float, np.ndarray, Any]],
    monitor: Monitor,
    n_path: int,
) -> Callable[[np.ndarray, Any], tuple[float, np.ndarray | None, Any]]:
    """``evaluate``, except at the coarse path's points other than its best: their recorded
    value, without a solve or a gradient (gradient descent rejects such a trial and
    backtracks from its value). The descent's bracket ends are path points, higher than
    its start; on make_regression 300x1000 a step of half the path's spacing landed on
    one, a solve of the slowest kind (weaker penalty) that only confirmed the path's
    value."""
    values = _path_values(monitor, n_path)
    best = min(values.values(), default=np.inf)
    known = {t: v for t, v in values.items() if v > best}

    def wrapped(th: np.ndarray, w0: Any) -> tuple[float, np.ndarray | None, Any]:
        value = known.get(float(th[0])) if th.size == 1 else None
        if value is None:
            return evaluate(th, w0)
        return value, None, w0

    return wrapped


def _path_values(monitor: Monitor, n_path: int) -> dict[float, float]:
    """``{θ: R(θ)}`` of the coarse path's last ``n_path`` records (finite values, one
    hyperparameter)."""
    records = zip(monitor.log_thetas[-n_path:], monitor.values[-n_path:], strict=True)
    return {float(t[0]): float(v) for t, v in records if t.size == 1 and np.isfinite(v)}


def _flattening(visited: list[tuple[float, int, np.ndarray, Any]]) -> bool:
    """Whether the path's last point decreased the criterion by less than
    :data:`PATH_PROBE_BELOW` (or did not decrease it), or by less, in log, than
    :data:`PATH_PROBE_SLOWDOWN` times the decrease before: the minimum may be near."""
    if len(visited) < 2:
        return False
    last, before = visited[-1][0], visited[-2][0]
    if not (np.isfinite(last) and np.isfinite(before)):
        return False
    if last >= (1 - PATH_PROBE_BELOW) * before:
        return True
    first = visited[-3][0] if len(visited) >= 3 else np.nan
    if not (np.isfinite(first) and min(first, before, last) > 0 and last < before < first):
        return False
    # Two decreases, the last (in log) below PATH_PROBE_SLOWDOWN times the previous one.
    return bool(np.log(before / last) < PATH_PROBE_SLOWDOWN * np.log(first / before))


def minimize_rejecting_singular(
    evaluate: Callable[[np.ndarray, Any], tuple[float, np.ndarray, Any]],
    theta0: np.ndarray,
    coef0: Any = None,
    first: tuple[float, np.ndarray] | None = None,
    **minimize_options: Any,
) -> OuterResult:
    """Run :func:`minimize_hyper` on ``evaluate(θ, w0) -> (value, gradient, coef)``,
    warm-starting each inner solve from the previous coefficients (``coef0`` first) and
    rejecting (value ``inf``) trial points whose restricted Hessian is singular, with one
    warning at the end. ``first``: the known ``(value, gradient)`` at ``theta0``.

    Shared by :func:`optimize_hyperparameters` and :func:`dargmin.hyper.optimize_sure`.
    """
    state: dict[str, Any] = {"coef": coef0, "n_singular": 0, "n_calls": 0}

    def fun(th: np.ndarray) -> tuple[float, np.ndarray | None]:
        state["n_calls"] += 1
        if state["n_calls"] == 1 and first is not None:
            return first  # already evaluated at theta0 (with coef0)
        try:
            value, grad, coef = evaluate(th, state["coef"])
        except SingularSystemError as err:
            if state["n_calls"] == 1:
                # Nothing to fall back on at the starting point: report the real cause.
                raise SingularSystemError(
                    f"At the starting point log_theta = {np.round(th, 4).tolist()[:5]}: "
                    f"{err} Start from a stronger penalty (log_theta0) or raise the lower "
                    "bounds."
                ) from err
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


def optimize_sure(
    problem: HyperProblem,
    sigma: float,
    log_theta0: Array | None = None,
    *,
    df: str = "exact",
    method: str = "implicit",
    solver: Any = "auto",
    **options: Any,
) -> OuterResult:
    """Select hyperparameters by minimizing SURE (no validation set) with hypergradients.

    The outer loop is :func:`~dargmin.hyper.minimize_hyper` on
    ``θ ↦ (SURE(θ), ∇SURE(θ))`` from :meth:`SURE.evaluate` (warm-started inner solves).
    Without a validation set: ``SURE(θ) = ‖y − μ̂‖² − nσ² + 2σ² df``.
    With ``df="exact"`` the Lasso SURE jumps by ``2σ²`` at support changes and its gradient
    ignores the jumps; ``df="finite_difference"`` (SUGAR) smooths them out.

    Parameters
    ----------
    problem, sigma
        The least-squares model and the noise standard deviation.
    log_theta0
        Start (default :func:`~dargmin.hyper.default_log_theta0`).
    df
        ``"exact"``, ``"monte_carlo"`` or ``"finite_difference"`` (see :class:`SURE`).
    method, solver
        See :func:`~dargmin.hyper.hypergradient`.
    **options
        By name: ``delta``, ``n_probes``, ``seed``, ``probes`` go to :class:`SURE`;
        ``optimizer``, ``bounds`` (default :func:`~dargmin.hyper.default_bounds`),
        ``max_iter``, ``gtol``, ``ftol``, ``max_step``, ``monitor``, ``progress``,
        ``rgtol``, ``xtol`` to :func:`~dargmin.hyper.minimize_hyper`; any other to the
        hypergradient method (legacy options, see :func:`~dargmin.hyper.hypergradient`).

    Returns
    -------
    OuterResult
        ``value`` is the best SURE; ``coef`` the inner solution at the last evaluation.

    Examples
    --------
    >>> import numpy as np
    >>> from dargmin.hyper import lasso
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(60, 15)); y = X[:, :3] @ [2.0, -1.0, 1.0] + rng.normal(size=60)
    >>> res = optimize_sure(lasso(X, y), sigma=1.0, max_iter=20)
    >>> res.log_theta.shape
    (1,)
    """
    _check_problem(problem)
    sure_options, options = split_options(options, SURE_OPTIONS)
    minimize_options, hypergradient_options = split_options(options, _MINIMIZE_OPTIONS)
    crit = SURE(sigma, df, **sure_options)
    theta0 = default_log_theta0(problem) if log_theta0 is None else log_theta0
    theta0 = problem.check_theta(theta0)
    if minimize_options.get("bounds") is None:
        minimize_options["bounds"] = default_bounds(problem)
    meth = resolve("method", method, problem, **hypergradient_options)

    def evaluate(th: np.ndarray, w0: Any) -> tuple[float, np.ndarray, Any]:
        # SURE keeps its own warm starts between calls; w0 is not needed here.
        res = crit.evaluate(problem, th, method=meth, solver=solver)
        return res.value, res.grad, res.coef

    with single_threaded_blas():
        return minimize_rejecting_singular(evaluate, theta0, **minimize_options)
