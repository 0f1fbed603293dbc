"""Inner solvers: proximal coordinate descent, ISTA/FISTA (JAX) and scikit-learn wrappers.

Every solver follows the :class:`InnerSolver` protocol, ``solve(problem, log_theta, w0)``;
the JAX solvers (:class:`ProxCD`, :class:`FISTA`) also expose one iteration,
``step(problem, log_theta, state)`` (with ``init`` and ``coef``), which their ``solve``
iterates to the tolerance and which :class:`~dargmin.hyper.Unrolled` differentiates.

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
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from dargmin.diagnostics import DargminWarning
from dargmin.hyper._problems import HyperProblem, _check_finite
from dargmin.hyper._registry import register

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


@runtime_checkable
class InnerSolver(Protocol):
    """Protocol of inner solvers: ``solve(problem, log_theta, w0) -> InnerResult``.

    JAX solvers that can be unrolled (:class:`~dargmin.hyper.Unrolled`) also provide
    ``init(problem, log_theta, w0) -> state``, ``step(problem, log_theta, state) -> state``
    (one iteration, JAX-traceable in ``log_theta``) and ``coef(state) -> w``.

    Optionally, ``probe() -> InnerSolver``: a cheap, loose and quiet variant (a few epochs or
    Newton steps, no convergence warning) that the coarse path of
    :func:`~dargmin.hyper.optimize_hyperparameters` solves first where it may be past the
    CV minimum (:class:`~dargmin.hyper.WorkingSetCD`, :class:`~dargmin.hyper.ProxNewton`).

    Examples
    --------
    >>> isinstance(ProxCD(), InnerSolver), isinstance(object(), InnerSolver)
    (True, False)
    """

    def solve(self, problem: HyperProblem, log_theta: Array, w0: Array | None = None) -> Any:
        """Minimize ``F(·, θ)``; return an :class:`InnerResult`."""
        ...


def _kkt_violation(grad: Array, w: Array, l1: Array, xp: Any = jnp) -> Array:
    """``max_j dist(−∇ⱼf, λⱼ∂|wⱼ|)`` (absolute), with the array module ``xp`` (``jnp``
    inside the jitted solvers, ``np`` on the host)."""
    on = w != 0
    viol = xp.where(on, xp.abs(grad + l1 * xp.sign(w)), xp.maximum(xp.abs(grad) - l1, 0.0))
    return xp.max(viol)


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
    # On the host: one fold is checked after each solve of the outer loop, where the
    # dispatch and synchronization of a device computation cost more than the arithmetic.
    l1, l2 = problem.penalties_host(log_theta)
    X, y = problem.design, problem.target
    w = np.asarray(w, dtype=np.float64)
    g = X.T @ problem.datafit.grad_host(X @ w, y) + l2 * w
    return float(_kkt_violation(g, w, l1, np)) / problem.grad_scale


# ---------------------------------------------------------------------- JAX kernels
# A kernel is the pure, hashable part of a JAX solver: ``init``, ``update`` (one
# iteration) and ``kkt`` on a tuple of arrays ``consts``; the jitted loops below take it as
# a static argument, so one compilation serves every tolerance and every problem size.
@dataclass(frozen=True)
class _CDKernel:
    """Cyclic proximal coordinate descent; ``consts = (Xᵀ, y, λ, μ, L)``, state ``(w, Xw, k)``."""

    def init(self, consts, w0):
        XT = consts[0]
        return w0, XT.T @ w0, jnp.asarray(0)

    def update(self, consts, state, datafit):
        XT, y, l1, l2, L = consts
        w, z, k = state

        def body(j, carry):
            w, z = carry
            xj = XT[j]
            wj = w[j]
            gj = xj @ datafit.grad(z, y) + l2[j] * wj
            # A zero column with no ℓ2 term has L = 0: the coordinate does not affect F
            # beyond the penalty, so its minimizer is 0 (any λ > 0): left unchanged.
            active = L[j] > 0
            inv = 1.0 / jnp.where(active, L[j], 1.0)
            new = jnp.where(active, soft_threshold(wj - gj * inv, l1[j] * inv), wj)
            z = z + xj * (new - wj)
            return w.at[j].set(new), z

        w, z = jax.lax.fori_loop(0, XT.shape[0], body, (w, z))
        # Recompute z from scratch now and then: the incremental updates accumulate
        # rounding errors that would otherwise floor the attainable KKT violation.
        z = jax.lax.cond(k % 20 == 19, lambda: XT.T @ w, lambda: z)
        return w, z, k + 1

    def kkt(self, consts, state, datafit):
        XT, y, l1, l2, _ = consts
        w, z, _ = state
        return _kkt_violation(XT @ datafit.grad(z, y) + l2 * w, w, l1)


@dataclass(frozen=True)
class _FistaKernel:
    """ISTA / FISTA with adaptive restart; ``consts = (X, y, λ, μ, 1/L)``, state ``(w, v, t)``."""

    accelerated: bool = True

    def init(self, consts, w0):
        return w0, w0, jnp.asarray(1.0, w0.dtype)

    def update(self, consts, state, datafit):
        X, y, l1, l2, step = consts
        w, v, t = state
        g = X.T @ datafit.grad(X @ v, y) + l2 * v
        w_new = soft_threshold(v - step * g, step * l1)
        if not self.accelerated:
            return w_new, w_new, t
        t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t**2))
        # Gradient-based adaptive restart (O'Donoghue & Candès): drop the momentum when it
        # points uphill, which keeps FISTA monotone-ish and linear near the solution.
        uphill = jnp.vdot(v - w_new, w_new - w) > 0
        t_new = jnp.where(uphill, 1.0, t_new)
        v_new = w_new + jnp.where(uphill, 0.0, (t - 1.0) / t_new) * (w_new - w)
        return w_new, v_new, t_new

    def kkt(self, consts, state, datafit):
        X, y, l1, l2, _ = consts
        w = state[0]
        return _kkt_violation(X.T @ datafit.grad(X @ w, y) + l2 * w, w, l1)


@partial(jax.jit, static_argnames=("kernel", "datafit"))
def run_to_tolerance(kernel, consts, state0, tol_abs, max_iter, datafit):
    """Iterate ``kernel.update`` until the absolute KKT violation is ``<= tol_abs``.

    Returns ``(state, n_iter, violation)``. Forward-mode differentiable (JVPs go through
    the ``while_loop``), which :class:`~dargmin.hyper.Unrolled` uses.
    """

    def cond(carry):
        _, it, viol = carry
        return (viol > tol_abs) & (it < max_iter)

    def body(carry):
        state, it, _ = carry
        state = kernel.update(consts, state, datafit)
        return state, it + 1, kernel.kkt(consts, state, datafit)

    init = (state0, 0, kernel.kkt(consts, state0, datafit))
    return jax.lax.while_loop(cond, body, init)


def _warn_not_converged(name: str, kkt: float, tol: float, n_iter: int, log_theta) -> None:
    warnings.warn(
        f"{name} did not converge: relative KKT violation {kkt:.3g} > tol {tol:.3g} after "
        f"{n_iter} iterations at log_theta = {np.round(np.asarray(log_theta), 4).tolist()[:5]}."
        " Hypergradients inherit this error; raise max_iter or loosen tol.",
        InnerSolverWarning,
        stacklevel=4,
    )


def _init(problem: HyperProblem, w0: Array | None) -> np.ndarray:
    if w0 is None:
        return np.zeros(problem.n_coef)
    w0 = np.asarray(w0, dtype=np.float64)
    if w0.shape != (problem.n_coef,):
        raise ValueError(
            f"w0 (warm start) must have shape ({problem.n_coef},) for {problem.name}, got "
            f"{w0.shape}; pass None to start from zero."
        )
    _check_finite("w0 (warm start)", w0, "pass None or a finite w0")
    return w0


class _JaxSolver:
    """Shared ``solve`` / ``init`` / ``step`` of the JAX solvers (subclasses: ``kernel``,
    ``prepare``, ``_max_iter``, ``_label``)."""

    tol: float
    kernel: Any

    @property
    def _label(self) -> str:
        """The solver's name in messages."""
        raise NotImplementedError

    @property
    def _max_iter(self) -> int:
        raise NotImplementedError

    def prepare(self, problem: HyperProblem, log_theta: Array) -> tuple:
        raise NotImplementedError

    def init(self, problem: HyperProblem, log_theta: Array, w0: Array | None = None):
        """The solver state at ``w0`` (zeros by default)."""
        consts = self.prepare(problem, jnp.asarray(log_theta))
        return self.kernel.init(consts, jnp.asarray(_init(problem, w0)))

    def step(self, problem: HyperProblem, log_theta: Array, state):
        """One iteration (an epoch for coordinate descent); JAX-traceable in ``log_theta``."""
        consts = self.prepare(problem, jnp.asarray(log_theta))
        return self.kernel.update(consts, state, problem.datafit)

    @staticmethod
    def coef(state) -> Array:
        """The iterate ``w`` of a solver state."""
        return state[0]

    def solve(self, problem: HyperProblem, log_theta: Array, w0: Array | None = None):
        """Minimize the inner problem; return an :class:`InnerResult`."""
        with jax.enable_x64(True):  # the solvers are float64 throughout
            t0 = time.perf_counter()
            theta = problem.check_theta(log_theta)
            consts = self.prepare(problem, jnp.asarray(theta))
            state0 = self.kernel.init(consts, jnp.asarray(_init(problem, w0)))
            state, it, viol = run_to_tolerance(
                self.kernel,
                consts,
                state0,
                self.tol * problem.grad_scale,
                self._max_iter,
                problem.datafit,
            )
            kkt = float(viol) / problem.grad_scale
            ok = bool(kkt <= self.tol)
            if not ok:
                _warn_not_converged(self._label, kkt, self.tol, int(it), theta)
            return InnerResult(np.asarray(state[0]), int(it), kkt, ok, time.perf_counter() - t0)


@dataclass(frozen=True)
class ProxCD(_JaxSolver):
    """Cyclic proximal coordinate descent, jitted with JAX.

    Each coordinate update is the exact minimizer of the quadratic upper bound with the
    per-coordinate constant ``Lⱼ = (sup ℓ'')‖Xⱼ‖² + μⱼ``,

    .. math:: w_j \\leftarrow \\operatorname{ST}\\big(w_j - \\nabla_j f(w)/L_j,\\;
        \\lambda_j/L_j\\big),

    (an exact coordinate minimization for least squares); the predictions ``z = Xw`` are
    updated in ``O(n)`` per coordinate, so an epoch (one :meth:`step`) costs ``O(np)``.

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

    kernel = _CDKernel()
    _label = "Proximal coordinate descent"

    @property
    def _max_iter(self) -> int:
        return self.max_epochs

    def prepare(self, problem: HyperProblem, log_theta: Array) -> tuple:
        """``(Xᵀ, y, λ, μ, L)`` at ``log_theta`` (JAX-traceable)."""
        l1, l2 = problem.penalties(log_theta)
        L = problem.datafit.curvature_bound(problem.n_samples) * jnp.asarray(problem.col_sq) + l2
        return jnp.asarray(problem.design.T), jnp.asarray(problem.target), l1, l2, L


def _spectral_sq(problem: HyperProblem) -> float:
    return problem.cache.get("spectral_sq", lambda: float(np.linalg.norm(problem.design, 2) ** 2))


@dataclass(frozen=True)
class FISTA(_JaxSolver):
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

    @property
    def kernel(self) -> _FistaKernel:
        return _FistaKernel(self.accelerated)

    @property
    def _label(self) -> str:
        return "FISTA" if self.accelerated else "ISTA"

    @property
    def _max_iter(self) -> int:
        return self.max_iter

    def prepare(self, problem: HyperProblem, log_theta: Array) -> tuple:
        """``(X, y, λ, μ, 1/L)`` at ``log_theta`` (JAX-traceable)."""
        l1, l2 = problem.penalties(log_theta)
        lip = problem.datafit.curvature_bound(problem.n_samples) * _spectral_sq(problem)
        step = 1.0 / jnp.maximum(lip + jnp.max(l2), 1e-300)
        return jnp.asarray(problem.design), jnp.asarray(problem.target), l1, l2, step


register("solver", "cd", lambda problem, **_: ProxCD())
register("solver", "fista", lambda problem, **_: FISTA())
register("solver", "ista", lambda problem, **_: FISTA(accelerated=False, name="ista"))
