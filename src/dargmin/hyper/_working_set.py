"""A working-set inner solver for least squares with a uniform ℓ1 (and scalar ℓ2) penalty.

Coordinate descent over all ``p`` features costs ``O(n p)`` per epoch even when a few
dozen features are active. A working-set solver (as celer and skglm do) runs coordinate
descent on a small set ``W`` of features and grows ``W`` with the features that violate
the optimality conditions outside it:

1. ``W`` = the support of the warm start plus the features of largest ``|X_jᵀ r|``
   (``r = y − Xw``), at least :data:`WS_MIN` of them;
2. solve the subproblem restricted to ``W`` (scikit-learn's Cython coordinate descent on the
   ``n × |W|`` columns, warm-started, stopping on its duality gap);
3. with ``c = Xᵀ r``: stop when every feature outside ``W`` satisfies
   ``|c_j| ≤ max(nλ, ‖c_W‖∞)``. The dual point scikit-learn builds from ``r`` is then the
   same for the full problem as for the subproblem, and so is the duality gap; otherwise
   double ``|W|`` with the most violating features and go to 2.

Each outer step costs one ``Xᵀ r`` (``O(n p)``); the epochs cost ``O(n |W|)``. Measured on
make_regression 300x1000 (5-fold CV search of ``LassoHyperCV``): see the estimators
benchmark.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import jax
import numpy as np

from dargmin.hyper._inner_solvers import (
    InnerResult,
    _init,
    _kkt_violation,
    _warn_not_converged,
)
from dargmin.hyper._penalty_maps import _exp0, _exp1
from dargmin.hyper._problems import HyperProblem, Quadratic
from dargmin.hyper._registry import register

Array = Any

#: Smallest working set (features).
WS_MIN = 16
#: Most working-set growths before falling back to all the features.
WS_MAX_ROUNDS = 30
#: Epochs of each subproblem in a probe (:meth:`WorkingSetCD.probe`). On make_regression
#: 300x1000 (5 folds) the path's point past the minimum took 68 ms to its 1e-5 gap, with a
#: CV loss 6.0 % above the best; after 10 epochs, 17 ms and 4.8 % (30 epochs: 31 ms, 6.2 %).
PROBE_EPOCHS = 10
#: Solves remembered per problem (:meth:`WorkingSetCD.solve` returns a repeated one).
WS_MEMO = 16
#: The kernel's random-order generator, unused (cyclic order): creating one per call cost
#: half a millisecond.
_UNUSED_RNG = np.random.RandomState(0)


def largest_features(score: np.ndarray, keep: np.ndarray, size: int) -> np.ndarray:
    """The sorted indices of the ``size`` features of largest ``score``, every feature with
    ``keep`` among them (``size`` must be at least their number).

    Examples
    --------
    >>> largest_features(np.array([0.1, 0.9, 0.5, 0.0]), np.array([1, 0, 0, 0], bool), 2).tolist()
    [0, 1]
    """
    ranked = np.where(keep, np.inf, score)
    return np.sort(np.argpartition(-ranked, size - 1)[:size])


def _cd_subproblem(
    w: np.ndarray,
    l1: float,
    l2: float,
    XW: np.ndarray,
    y: np.ndarray,
    max_iter: int,
    tol: float,
    quiet: bool = False,
) -> tuple[np.ndarray, int]:
    """scikit-learn's coordinate descent on ``½‖y − X_W w‖² + l1‖w‖₁ + ½ l2‖w‖²`` (its own
    unnormalized scaling), in place on ``w``, to a duality gap below ``tol ‖y‖²``; returns
    ``(w, epochs)``. ``quiet``: without scikit-learn's warning when ``max_iter`` epochs
    end above ``tol`` (a truncated solve on purpose).

    The Cython kernel is private scikit-learn API: when its signature changes, the public
    ``ElasticNet`` estimator (about a millisecond more per call) takes over.
    """
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import _cd_fast

        args = (w, l1, l2, XW, y, max_iter, tol, _UNUSED_RNG, False, False)
        if quiet:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                out = _cd_fast.enet_coordinate_descent(*args)
        else:
            out = _cd_fast.enet_coordinate_descent(*args)
        return np.asarray(out[0]), int(out[3])
    except (ImportError, TypeError, AttributeError):  # pragma: no cover - other sklearn
        from sklearn.linear_model import ElasticNet

        n = y.shape[0]
        alpha = (l1 + l2) / n
        est = ElasticNet(
            alpha=alpha,
            l1_ratio=l1 / (l1 + l2) if l1 + l2 > 0 else 1.0,
            fit_intercept=False,
            warm_start=True,
            tol=tol,
            max_iter=max_iter,
        )
        est.coef_ = w.copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est.fit(XW, y, check_input=False)
        w[:] = est.coef_
        return w, int(est.n_iter_)


@dataclass(frozen=True)
class WorkingSetCD:
    """Working-set coordinate descent for the Lasso and the elastic net (module docstring).

    Least-squares problems with one ℓ1 strength for all features and one ℓ2 strength (the
    ``lasso`` and ``elastic_net`` problems); other problems raise ``ValueError``.

    Parameters
    ----------
    tol
        scikit-learn's duality-gap tolerance: stop when the gap of the full problem is
        below ``tol ‖y‖²`` (in scikit-learn's scaling).
    max_iter
        Epochs of each subproblem.
    kkt_tol
        Warn when the relative KKT violation of the result exceeds this.
    warn
        ``False``: no warning on a result above the tolerances (a truncated solve on
        purpose, as in :meth:`probe`).

    Examples
    --------
    An orthogonal design ``X = 3I`` (``n = 3``), where the Lasso solution is the
    soft-thresholding ``wⱼ = ST(yⱼ, α)/3``:

    >>> import numpy as np
    >>> from dargmin.hyper import lasso
    >>> prob = lasso(np.eye(3) * 3.0, np.array([3.0, 0.0, -6.0]), fit_intercept=False)
    >>> WorkingSetCD().solve(prob, [np.log(1.5)]).coef.round(8).tolist()
    [0.5, 0.0, -1.5]
    """

    tol: float = 1e-8
    max_iter: int = 10_000
    kkt_tol: float = 1e-4
    warn: bool = True
    name: ClassVar[str] = "working_set"

    def probe(self) -> WorkingSetCD:
        """A truncated variant for the coarse path's probes (:data:`PROBE_EPOCHS` epochs per
        subproblem, no warning). A looser duality-gap tolerance would not do: scaled by
        ``‖y‖²`` it is already met by the warm start from the previous path point.

        Examples
        --------
        >>> WorkingSetCD(tol=1e-6).probe()
        WorkingSetCD(tol=1e-06, max_iter=10, kkt_tol=0.0001, warn=False)
        """
        return replace(self, max_iter=PROBE_EPOCHS, warn=False)

    @staticmethod
    def supports(problem: HyperProblem) -> bool:
        """Whether the problem is least squares with uniform ℓ1 and scalar ℓ2 strengths."""
        # The penalty maps of lasso() and elastic_net(): λ = e^θ₀ (and μ = e^θ₁) for all
        # features (weighted_lasso has one λ per feature).
        return (
            isinstance(problem.datafit, Quadratic)
            and not problem.augmented
            and problem.l1 is _exp0
            and problem.l2 in (None, _exp1)
        )

    def solve(self, problem: HyperProblem, log_theta: Array, w0: Array | None = None):
        """Minimize the inner problem; return an :class:`InnerResult`."""
        with jax.enable_x64(True):
            return self._solve(problem, log_theta, w0)

    def _solve(self, problem: HyperProblem, log_theta: Array, w0: Array | None):
        t0 = time.perf_counter()
        theta = problem.check_theta(log_theta)
        l1v, l2v = problem.penalties_host(theta)
        if not self.supports(problem) or np.ptp(l1v) > 0 or (l2v.size and np.ptp(l2v) > 0):
            raise ValueError(
                "WorkingSetCD handles least squares with one ℓ1 strength for all features "
                f"and one ℓ2 strength (lasso, elastic_net); {problem.name} has per-feature "
                "strengths or another data fit. Use SklearnSolver() or ProxCD()."
            )
        if np.any(l1v <= 0):
            raise ValueError("WorkingSetCD needs a positive ℓ1 strength.")
        X = problem.design  # column-major, as the kernel reads it
        y = problem.cache.get("target_c", lambda: np.ascontiguousarray(problem.target))
        n, p = X.shape
        # scikit-learn's unnormalized scaling: ½‖y − Xw‖² + nλ‖w‖₁ + ½nμ‖w‖².
        lam = float(l1v[0]) * n
        mu = float(l2v[0]) * n if l2v.size else 0.0
        w = _init(problem, w0).astype(np.float64, copy=True)
        # A solve with the same θ and settings from its own start or solution returns its
        # result (the solver is deterministic, and a solution is a fixed point of it): the
        # coarse path's best point is evaluated once more, with its hypergradient, from its
        # own solution (a solve of no epochs, 0.4 ms a fold on make_regression 300x1000).
        key = (float(lam), float(mu), self)  # self: all the settings (a frozen dataclass)
        memo = problem.cache.get("ws_results", dict)
        hit = memo.get(key)
        if hit is not None and np.array_equal(hit[0], w):
            return hit[1]._replace(coef=hit[1].coef.copy(), time=time.perf_counter() - t0)
        if hit is not None and hit[2] and np.array_equal(hit[1].coef, w):
            # Already at the solution: no epochs.
            return hit[1]._replace(coef=hit[1].coef.copy(), n_iter=0, time=time.perf_counter() - t0)
        w0_copy = w.copy()
        # Xᵀr depends on w only: the previous solve of this problem (the usual warm start)
        # left it for its solution, saving one O(np) product per solve.
        last = problem.cache.get("ws_last", lambda: None)
        if last is not None and np.array_equal(last[0], w):
            xtr = last[1]
        else:
            xtr = X.T @ (y - X @ w)
        c = xtr - mu * w
        epochs = 0
        size = max(WS_MIN, 2 * int(np.count_nonzero(w)))
        it = 0
        for _ in range(WS_MAX_ROUNDS):
            if size >= p:
                W = np.arange(p)
            else:
                # the support stays in the working set
                W = largest_features(np.abs(c), w != 0, size)
            XW = np.asfortranarray(X[:, W])
            wW, it = _cd_subproblem(
                np.ascontiguousarray(w[W]), lam, mu, XW, y, self.max_iter, self.tol, not self.warn
            )
            epochs += it
            w[:] = 0.0
            w[W] = wW
            xtr = X.T @ (y - XW @ wW)
            c = xtr - mu * w
            if W.size == p:
                break
            outside = np.ones(p, bool)
            outside[W] = False
            # The dual point of the subproblem is feasible for the full problem: same gap.
            bound = max(lam, float(np.max(np.abs(c[W]), initial=0.0)))
            if float(np.max(np.abs(c[outside]), initial=0.0)) <= bound:
                break
            size = min(p, max(2 * size, 2 * int(np.count_nonzero(w))))
        problem.cache.set("ws_last", (w.copy(), xtr))
        # The KKT violation from c = Xᵀr − nμw = −n ∇f(w) (no further product with X).
        kkt = float(_kkt_violation(-c / n, w, l1v, np)) / problem.grad_scale
        ok = kkt <= self.kkt_tol
        if not ok and self.warn:
            _warn_not_converged("working-set coordinate descent", kkt, self.kkt_tol, epochs, theta)
        result = InnerResult(w, epochs, kkt, ok, time.perf_counter() - t0)
        if len(memo) >= WS_MEMO:
            memo.pop(next(iter(memo)))  # the oldest (insertion order)
        # Stored with its start, a copy of its solution (callers may write into theirs) and
        # whether its last subproblem stopped on the tolerance (then the solution is a fixed
        # point of the solver; a truncated one, as a probe's, is not).
        memo[key] = (w0_copy, result._replace(coef=w.copy()), it < self.max_iter)
        return result


register("solver", "working_set", lambda problem, **_: WorkingSetCD())
