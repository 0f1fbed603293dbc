"""One evaluation of ``R(θ)`` and ``∇R(θ)``: inner solve(s), then a hypergradient method.

:func:`hypergradient` resolves the method and solver names (:func:`~dargmin.hyper.resolve`),
solves the inner problem (one per fold of a :class:`~dargmin.hyper.CrossVal`) unless the
method runs its own solver, and averages the per-fold ``(value, gradient, info)`` of the
method into a :class:`HypergradientResult`.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
import numpy as np

from dargmin.hyper._problems import HyperProblem
from dargmin.hyper._registry import resolve

Array = Any


class HypergradientResult(NamedTuple):
    """Result of :func:`hypergradient`.

    Attributes
    ----------
    value : float
        The criterion ``R(θ) = C(ŵ(θ))`` (mean over folds for :class:`CrossVal`).
    grad : numpy.ndarray
        ``∇R(θ)`` with respect to ``log_theta``.
    coef : numpy.ndarray or list of numpy.ndarray
        The inner solution(s) (one per fold for cross-validation), for warm starts.
    n_inner_iter : int
        Epochs / iterations of the inner solver(s), summed over folds.
    n_solves : int
        Number of inner problems solved (1, or the number of folds).
    support_size : int
        ``|S|`` (summed over folds); ``n_coef`` for smooth problems.
    time_solve, time_grad : float
        Seconds spent in inner solves and in the hypergradient computation proper.
    info : dict
        Diagnostics of the method: ``"support_rank"`` (rank of the support systems,
        summed over folds; ``None`` when not computed) and ``"notes"`` (a list of
        messages, e.g. that a support Hessian was rank-deficient and its minimum-norm
        solution was used).
    """

    value: float
    grad: np.ndarray
    coef: Any
    n_inner_iter: int
    n_solves: int
    support_size: int
    time_solve: float
    time_grad: float
    info: dict | None = None


def _n_threads(n_jobs: int | None, n_tasks: int) -> int:
    """scikit-learn's ``n_jobs`` convention as a thread count for ``n_tasks`` tasks."""
    if n_jobs is None or n_jobs == 0:
        return 1
    cores = os.cpu_count() or 1
    n = n_jobs if n_jobs > 0 else max(cores + 1 + n_jobs, 1)
    return max(1, min(n, n_tasks))


def solve_folds(
    pairs: list, solvers: list, theta: np.ndarray, starts: list, n_jobs: int | None = None
) -> list[Any]:
    """Solve each fold's inner problem (``pairs[k][0]``) with ``solvers[k]`` from
    ``starts[k]``; with ``n_jobs`` > 1 the folds run in a thread pool (each fold has its own
    solver object and warm start, so the solves are independent)."""

    def one(k: int) -> Any:
        prob_k = pairs[k][0]
        with jax.enable_x64(True):  # the context is per thread
            return resolve("solver", solvers[k], prob_k).solve(prob_k, theta, starts[k])

    n = _n_threads(n_jobs, len(pairs))
    objects = [id(s) for s in solvers if not isinstance(s, str)]
    if n == 1 or len(set(objects)) < len(objects):
        # One solver object shared by several folds keeps state (warm starts): sequential.
        return [one(k) for k in range(len(pairs))]
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(len(pairs))))


def hypergradient(
    problem: HyperProblem,
    criterion: Any,
    log_theta: Array,
    *,
    method: Any = "implicit",
    solver: Any = "auto",
    w0: Any = None,
    n_jobs: int | None = None,
    **method_options: Any,
) -> HypergradientResult:
    """Value and gradient of ``R(θ) = C(ŵ(θ))`` with respect to ``log_theta``.

    .. math::

        \\nabla R(\\theta) = \\Big(\\frac{d\\hat w}{d\\theta}\\Big)^{\\!\\top}
            \\nabla C(\\hat w(\\theta)),
        \\qquad \\hat w(\\theta) = \\arg\\min_w F(w, \\theta).

    Parameters
    ----------
    problem
        The inner problem (:func:`lasso`, :func:`elastic_net`, :func:`weighted_lasso`,
        :func:`sparse_logistic`, :func:`ridge`, :func:`l2_logistic` or a
        :class:`HyperProblem`).
    criterion
        A criterion ``C(w, problem)`` (:class:`HeldOutMSE`, :class:`HeldOutLogistic`,
        :class:`CustomCriterion`, :class:`SURE`) or any object with ``folds(problem)``
        returning ``(problem, criterion)`` pairs, such as :class:`CrossVal`.
    log_theta
        Hyperparameters in log scale, shape ``(problem.n_hyper,)``.
    method
        A :class:`HypergradientMethod` (:class:`ImplicitSupport`, :class:`ImplicitForward`,
        :class:`Unrolled`) or one of the names ``"implicit"``, ``"implicit_forward"``,
        ``"forward"``, ``"reverse"`` (see :data:`REGISTRY`).
    solver
        Inner solver for the implicit methods: an :class:`InnerSolver` object or a name
        (``"auto"``, ``"cd"``, ``"fista"``, ``"ista"``, ``"sklearn"``, ``"direct"``); a list
        gives one per fold. Keep the same instance across calls to reuse warm starts.
    w0
        Warm start (an array, or a list of arrays with one per fold for ``CrossVal``).
    n_jobs
        Threads solving the folds' inner problems concurrently (scikit-learn's
        convention: ``None`` or 1 for one, ``-1`` for one per core). The inner solvers
        built on scikit-learn's coordinate descent and NumPy release the GIL.
    **method_options
        Options of the method names, for backward compatibility: ``smooth_backend``
        (``"implicit"``), ``tol_jac`` and ``max_iter_jac`` (``"implicit_forward"``),
        ``unrolled`` (``"cd"``, ``"ista"``, ``"fista"``), ``tol`` and ``max_iter``
        (``"forward"``, ``"reverse"``). Prefer configuring the method object.

    Returns
    -------
    HypergradientResult

    Raises
    ------
    dargmin.SingularSystemError
        When the Hessian restricted to the support is singular and the derivative is not
        defined (see :func:`_support_solve`).

    Examples
    --------
    >>> import numpy as np
    >>> from dargmin.hyper import lasso, HeldOutMSE
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(40, 10)); y = X[:, 0] - 2 * X[:, 1] + 0.1 * rng.normal(size=40)
    >>> prob = lasso(X[:20], y[:20])
    >>> hg = hypergradient(prob, HeldOutMSE(X[20:], y[20:]), [np.log(0.05)])
    >>> hg.grad.shape, bool(hg.grad[0] > 0)   # less regularization helps here
    ((1,), True)
    """
    known = {"smooth_backend", "tol_jac", "max_iter_jac", "unrolled", "tol", "max_iter"}
    unknown = set(method_options) - known
    if unknown:
        raise TypeError(
            f"hypergradient got unexpected option(s) {sorted(unknown)}; the accepted "
            f"options are {sorted(known)} (or configure a method object)."
        )
    with jax.enable_x64(True):
        theta = problem.check_theta(log_theta)
        meth = resolve("method", method, problem, **method_options)
        folds = getattr(criterion, "folds", None)
        if folds is not None:
            pairs = folds(problem)
            if w0 is not None and len(w0) != len(pairs):
                raise ValueError(
                    f"w0 must hold one warm start per fold ({len(pairs)}), got {len(w0)}; "
                    "pass the .coef list of a previous result or None."
                )
            solvers = list(solver) if isinstance(solver, list | tuple) else [solver] * len(pairs)
            starts = [None] * len(pairs) if w0 is None else list(w0)
        else:
            pairs, starts = [(problem, criterion)], [w0]
            solvers = list(solver) if isinstance(solver, list | tuple) else [solver]
        vals, grads, coefs, iters, supp, ts, tg = [], [], [], 0, 0, 0.0, 0.0
        ranks: list[int | None] = []
        notes: list[str] = []
        if meth.needs_solution:
            results = solve_folds(pairs, solvers, theta, starts, n_jobs)
            sols = [r.coef for r in results]
            ts = sum(r.time for r in results)
            n_its = [r.n_iter for r in results]
        else:
            sols, n_its = starts, [0] * len(pairs)
        t0 = time.perf_counter()
        batch = getattr(meth, "compute_folds", None)
        if meth.needs_solution and batch is not None and len(pairs) > 1:
            # One batched call for the folds' support systems (see compute_folds).
            outs = batch(pairs, theta, sols)
        else:
            outs = [
                meth.compute(prob_k, crit_k, theta, w)
                for (prob_k, crit_k), w in zip(pairs, sols, strict=True)
            ]
        tg += time.perf_counter() - t0
        for w, n_it, (val, grad, info) in zip(sols, n_its, outs, strict=True):
            if not meth.needs_solution:
                w, n_it = info["coef"], info["n_iter"]
            vals.append(val)
            grads.append(np.asarray(grad, dtype=float))
            coefs.append(np.asarray(w))
            iters += int(n_it)
            supp += int(info["support_size"])
            ranks.append(info.get("support_rank"))
            notes.extend(info.get("notes", []))
        grad = np.mean(grads, axis=0)
        if not np.all(np.isfinite(grad)):
            raise FloatingPointError(
                f"The hypergradient is not finite: {grad[:5]}. The inner solution or the "
                "criterion overflowed; check the data scale and the bounds of log_theta."
            )
        ranks_known = [r for r in ranks if r is not None]
        rank = int(sum(ranks_known)) if len(ranks_known) == len(ranks) else None
        info = {"method": meth, "support_rank": rank, "notes": notes}
        coef = coefs if folds is not None else coefs[0]
        return HypergradientResult(
            float(np.mean(vals)), grad, coef, iters, len(pairs), supp, ts, tg, info
        )
