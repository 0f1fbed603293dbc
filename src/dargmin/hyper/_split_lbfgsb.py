"""An inner solver for small and medium ℓ1 problems with any smooth data fit: L-BFGS-B on the
split ``w = u − v``.

The ℓ1 term is linear on the orthant ``u, v ≥ 0``:

.. math::

    \\min_{u, v \\ge 0,\\; w_F}\\; f(X w) + \\lambda^\\top (u + v) + \\tfrac12 \\sum_j \\mu_j w_j^2,
    \\qquad w = u − v \\text{ on the penalized coordinates},

a smooth bound-constrained problem that SciPy's L-BFGS-B solves with a quasi-Newton model
(coordinates with ``λⱼ = 0``, such as an intercept, stay one free variable). At its
solution a coordinate is either at its bound, exactly 0, or stationary, and L-BFGS-B's
projected-gradient test ``‖P∇‖∞ ≤ pgtol`` is exactly the KKT violation of the ℓ1 problem:
``|∇ⱼf + λⱼ sign wⱼ|`` on the support and ``max(|∇ⱼf| − λⱼ, 0)`` off it.

Why not :class:`~dargmin.hyper.ProxCD` for the logistic loss: coordinate descent with the
curvature bound ``1/4`` needed 2000+ epochs (200 µs each, jitted) to reach a relative KKT
violation of 1e-5 on standardized breast_cancer (correlated columns); L-BFGS-B's curvature
model reaches 1e-8 in a few hundred NumPy iterations (milliseconds). A few Newton steps
on the support (signs fixed) then polish the solution to the tight tolerances of a refit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from dargmin.hyper._inner_solvers import InnerResult, _init, _warn_not_converged, kkt_violation
from dargmin.hyper._problems import HyperProblem
from dargmin.hyper._registry import register

Array = Any


@dataclass(frozen=True)
class SplitLBFGSB:
    """SciPy's L-BFGS-B on the split ``w = u − v`` (see the module docstring).

    Parameters
    ----------
    tol
        Relative KKT tolerance (absolute ``tol × problem.grad_scale``, as the other
        solvers): L-BFGS-B's ``pgtol``.
    max_iter
        Maximal number of L-BFGS-B iterations.
    memory
        Number of correction pairs of the quasi-Newton model.
    coarse_tol
        When set (above ``tol``): stop L-BFGS-B at this relative tolerance, then take
        Newton steps on the support; L-BFGS-B resumes to ``tol`` only if they fall short.

    Examples
    --------
    ℓ1 logistic regression on an orthogonal design, where ``½σ(−wⱼ) = α`` on the support
    gives ``|wⱼ| = log((1 − 2α)/(2α)) = log 4`` at ``α = 0.1``:

    >>> import numpy as np
    >>> from dargmin.hyper import sparse_logistic
    >>> prob = sparse_logistic(np.eye(2), np.array([1.0, -1.0]), fit_intercept=False)
    >>> SplitLBFGSB().solve(prob, [np.log(0.1)]).coef.round(6).tolist()
    [1.386294, -1.386294]
    """

    tol: float = 1e-9
    max_iter: int = 10_000
    memory: int = 20
    coarse_tol: float | None = None
    name: str = "lbfgsb"

    def solve(self, problem: HyperProblem, log_theta: Array, w0: Array | None = None):
        """Minimize the inner problem; return an :class:`InnerResult`."""
        import scipy.optimize

        t0 = time.perf_counter()
        theta = problem.check_theta(log_theta)
        l1, l2 = problem.penalties_host(theta)
        X, y, fit = problem.design, problem.target, problem.datafit
        pen = np.flatnonzero(l1 > 0)
        free = np.flatnonzero(l1 <= 0)
        lam = l1[pen]
        n_f, n_p = free.size, pen.size

        n_coef = problem.n_coef  # a property of an equinox module: read once, not per call
        X_pen = np.ascontiguousarray(X[:, pen])
        X_free = np.ascontiguousarray(X[:, free])
        l2_pen, l2_free = l2[pen], l2[free]
        quad = bool(np.any(l2 > 0))

        def unsplit(z: np.ndarray) -> np.ndarray:
            w = np.zeros(n_coef)
            w[free] = z[:n_f]
            w[pen] = z[n_f : n_f + n_p] - z[n_f + n_p :]
            return w

        def fun(z: np.ndarray) -> tuple[float, np.ndarray]:
            # Called a few thousand times a fit: column blocks fixed once, no w assembled.
            wf, wp = z[:n_f], z[n_f : n_f + n_p] - z[n_f + n_p :]
            pred = X_pen @ wp
            if n_f:
                pred = pred + X_free @ wf
            r = fit.grad_host(pred, y)
            gp = X_pen.T @ r + l2_pen * wp
            gf = X_free.T @ r + l2_free * wf
            value = fit.value_host(pred, y) + float(lam @ (z[n_f : n_f + n_p] + z[n_f + n_p :]))
            if quad:
                value += 0.5 * float(l2_pen @ (wp * wp) + l2_free @ (wf * wf))
            return float(value), np.concatenate([gf, gp + lam, lam - gp])

        w_init = _init(problem, w0)
        z0 = np.concatenate(
            [w_init[free], np.maximum(w_init[pen], 0.0), np.maximum(-w_init[pen], 0.0)]
        )
        bounds = [(None, None)] * n_f + [(0.0, None)] * (2 * n_p)

        def run(z_start: np.ndarray, tol: float) -> Any:
            return scipy.optimize.minimize(
                fun,
                z_start,
                jac=True,
                method="L-BFGS-B",
                bounds=bounds,
                # Only the projected gradient (the KKT violation) decides convergence.
                options={
                    # Half the tolerance: u and v may overlap slightly (both > 0), where the
                    # split problem's projected gradient understates the KKT violation of w.
                    "gtol": 0.5 * tol * problem.grad_scale,
                    "ftol": 0.0,
                    "maxiter": self.max_iter,
                    "maxcor": self.memory,
                },
            )

        if self.coarse_tol is not None and self.coarse_tol > self.tol:
            # L-BFGS-B to a loose tolerance finds the support and signs; Newton steps on
            # the support then reach the tolerance (quadratic convergence), and L-BFGS-B
            # resumes only when they do not.
            res = run(z0, self.coarse_tol)
            w = _polish(problem, unsplit(res.x), l1, l2, self.tol)
            if kkt_violation(problem, w, theta) > self.tol:
                n_coarse = int(res.nit)
                res = run(res.x, self.tol)
                res.nit = int(res.nit) + n_coarse
                w = _polish(problem, unsplit(res.x), l1, l2, self.tol)
        else:
            res = run(z0, self.tol)
            w = _polish(problem, unsplit(res.x), l1, l2, self.tol)
        kkt = kkt_violation(problem, w, theta)
        ok = kkt <= self.tol
        if not ok:
            _warn_not_converged("L-BFGS-B (split)", kkt, self.tol, int(res.nit), theta)
        return InnerResult(w, int(res.nit), kkt, ok, time.perf_counter() - t0)


def _polish(
    problem: HyperProblem, w: np.ndarray, l1: np.ndarray, l2: np.ndarray, tol: float
) -> np.ndarray:
    """Newton steps on the support with its signs fixed, while they keep the signs and
    lower the KKT violation.

    L-BFGS-B stops once the objective no longer decreases in floating point, at a relative
    KKT violation near 1e-9; on the support the problem is smooth and Newton's method
    (the restricted Hessian ``X_Sᵀ diag(ℓ'') X_S + diag(μ_S)``) converges quadratically.
    """
    X, y, fit = problem.design, problem.target, problem.datafit
    theta_free = l1 <= 0

    def violation(v: np.ndarray) -> tuple[float, np.ndarray]:
        g = X.T @ fit.grad_host(X @ v, y) + l2 * v
        on = (v != 0) | theta_free
        r = np.where(on, g + l1 * np.sign(v), np.maximum(np.abs(g) - l1, 0.0))
        return float(np.max(np.abs(r), initial=0.0)), r

    best, r = violation(w)
    for _ in range(3):
        if best <= 0.1 * tol * problem.grad_scale:
            break
        S = np.flatnonzero((w != 0) | theta_free)
        d = fit.hess_diag_host(X @ w, y)
        XS = X[:, S]
        H = XS.T @ (d[:, None] * XS) + np.diag(l2[S])
        # Least squares: a support Hessian may be singular (duplicate columns).
        step = np.linalg.lstsq(H, -r[S], rcond=None)[0]
        new = w.copy()
        new[S] += step
        keeps_signs = np.all((np.sign(new[S]) == np.sign(w[S])) | theta_free[S])
        value, r_new = violation(new)
        if not (keeps_signs and value < best):
            break
        w, best, r = new, value, r_new
    return w


register("solver", "lbfgsb", lambda problem, **_: SplitLBFGSB())
