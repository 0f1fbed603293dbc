r"""A batched quadratic-programming layer with KKT derivatives in every argument.

.. math::

    x^* = \arg\min_x \tfrac12 x^\top Q x + q^\top x \quad \text{s.t.} \quad A x = b,\;
    G x \le h .

The forward solve is a primal-dual interior-point method written in JAX
(:class:`InteriorPoint`: jittable, ``vmap``-able) or an external solver behind
``jax.pure_callback`` (:class:`Clarabel`, :class:`OSQP`). Either way the derivative is
dargmin's: the KKT system at the solution on its active set (:mod:`._kkt`), never the
unrolled iterations, with the KKT check (feasibility, stationarity, multipliers,
degenerate constraints, LICQ) before it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

from dargmin.constrained._kkt import (
    ConstrainedProblem,
    Degenerate,
    KKTCheck,
    KKTSettings,
    kkt_solution,
)
from dargmin.diagnostics import Check, CheckMode
from dargmin.linear_solvers import LinearSolver, as_linear_solver


class QPInfo(NamedTuple):
    """Convergence of the forward solve (arrays; batched under ``vmap``).

    Attributes
    ----------
    converged
        Whether every residual below met the solver's tolerance.
    iterations
        Iterations used (``-1`` when the external solver does not say).
    primal_residual
        ``max(‖Ax − b‖∞, ‖max(Gx − h, 0)‖∞)``.
    dual_residual
        ``‖Qx + q + Aᵀν + Gᵀλ‖∞``.
    gap
        The complementarity ``sᵀλ / m`` (``0`` without inequalities).
    """

    converged: jax.Array
    iterations: jax.Array
    primal_residual: jax.Array
    dual_residual: jax.Array
    gap: jax.Array


class QPSolution(NamedTuple):
    """``x``, the multipliers ``ν`` of ``Ax = b`` and ``λ ≥ 0`` of ``Gx ≤ h`` (all
    differentiable), and the forward solve's :class:`QPInfo`."""

    x: jax.Array
    eq_dual: jax.Array
    ineq_dual: jax.Array
    info: QPInfo


class QPSolver(Protocol):
    """A forward QP solver: ``(Q, q, A, b, G, h) -> (x, ν, λ, info)``, traceable (a
    callback for external solvers), for one unbatched problem."""

    def __call__(
        self, Q: jax.Array, q: jax.Array, A: jax.Array, b: jax.Array, G: jax.Array, h: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array, QPInfo]: ...


def _residuals(
    Q: jax.Array,
    q: jax.Array,
    A: jax.Array,
    b: jax.Array,
    G: jax.Array,
    h: jax.Array,
    x: jax.Array,
    nu: jax.Array,
    lam: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    dual = jnp.max(jnp.abs(Q @ x + q + A.T @ nu + G.T @ lam), initial=0.0)
    primal = jnp.maximum(jnp.max(jnp.abs(A @ x - b), initial=0.0), jnp.max(G @ x - h, initial=0.0))
    slack = jnp.maximum(h - G @ x, 0.0)
    gap = jnp.sum(slack * lam) / max(h.size, 1)
    return primal, jnp.maximum(dual, 0.0), gap


@dataclass(frozen=True)
class InteriorPoint:
    """Mehrotra predictor-corrector primal-dual interior-point method, in JAX.

    Each iteration eliminates the slacks and inequality multipliers, factorizes
    ``Q + Gᵀ diag(λ/s) G`` by Cholesky and the Schur complement of the equalities
    ``A (·)⁻¹ Aᵀ`` by Cholesky (both with a relative ``1e-13`` diagonal shift, so that
    redundant equalities and semidefinite ``Q`` do not break it), and takes one predictor
    and one corrector step with a fraction-to-boundary rule of 0.99.

    Iterates until the primal and dual residuals are below ``tol`` times ``1 +`` the size
    of the data they are compared with (``max(‖b‖∞, ‖h‖∞)``; ``‖q‖∞``) and the largest
    complementarity product ``max sᵢλᵢ / (max(1, ‖x‖∞) max(1, ‖λ‖∞))`` is below
    ``gap_tol``, or ``max_iter`` iterations, or a vanishing step. Then it *polishes*: the
    equality-constrained QP of the active set it found (``λᵢ > sᵢ``) is solved exactly by
    one dense LU and kept if feasible with ``λ ≥ 0`` (to ``tol``). The result has exact
    complementarity, so a weakly active constraint ends with both its multiplier and its
    slack at rounding level, recognized as degenerate by the KKT check instead of being
    silently assigned to one side. ``info.converged`` applies the same tests to the
    returned point (``sᵀλ ≤ gap_tol·m·max(1, ‖x‖∞)·max(1, ‖λ‖∞)``); the KKT check refuses
    to differentiate an unconverged point. Defaults: ``tol = 1e-10``,
    ``gap_tol = 1e-12`` in float64; ``1e-5`` and ``1e-7`` in float32.

    Attributes
    ----------
    tol
        Relative tolerance of the stopping test (``None``: ``1e-10`` / ``1e-6``).
    max_iter
        Iteration limit.
    """

    tol: float | None = None
    gap_tol: float | None = None
    max_iter: int = 60

    def _tols(self, dtype: Any) -> tuple[float, float]:
        double = float(jnp.finfo(dtype).eps) < 1e-10
        tol = self.tol if self.tol is not None else (1e-10 if double else 1e-5)
        gap_tol = self.gap_tol if self.gap_tol is not None else (1e-12 if double else 1e-7)
        return tol, gap_tol

    def __call__(
        self, Q: jax.Array, q: jax.Array, A: jax.Array, b: jax.Array, G: jax.Array, h: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array, QPInfo]:
        dtype = q.dtype
        n, p, m = q.size, b.size, h.size
        tol, gap_tol = self._tols(dtype)
        Q = 0.5 * (Q + Q.T)
        scale_q = 1.0 + jnp.max(jnp.abs(q), initial=0.0)
        scale_p = 1.0 + jnp.maximum(
            jnp.max(jnp.abs(b), initial=0.0), jnp.max(jnp.abs(h), initial=0.0)
        )
        diag_scale = jnp.maximum(jnp.max(jnp.abs(jnp.diag(Q)), initial=0.0), 1.0)
        # Why hand-written: no maintained JAX QP solver returns accurate duals (jaxopt is
        # unmaintained and its OSQP stops at 1e-3); the KKT derivative needs both.

        def solve_newton(d: jax.Array, r1: jax.Array, r2: jax.Array) -> tuple:
            """Solve [[Q + Gᵀ D G, Aᵀ], [A, 0]] [dx; dν] = [r1; r2]."""
            M = Q + (G.T * d) @ G
            # A shift relative to Q's scale, not M's: near the end λ/s reaches 1e14 on
            # active rows, and a shift relative to that would distort every other direction.
            shift = 1e-14 * diag_scale
            chol = jnp.linalg.cholesky(M + shift * jnp.eye(n, dtype=dtype))

            def m_solve(v: jax.Array) -> jax.Array:
                return jax.scipy.linalg.cho_solve((chol, True), v)

            if p == 0:
                return m_solve(r1), jnp.zeros((0,), dtype)
            m_inv_at = m_solve(A.T)
            schur = A @ m_inv_at
            schur_shift = 1e-13 * jnp.maximum(jnp.max(jnp.abs(jnp.diag(schur))), 1e-300)
            schur_chol = jnp.linalg.cholesky(schur + schur_shift * jnp.eye(p, dtype=dtype))
            m_inv_r1 = m_solve(r1)
            dnu = jax.scipy.linalg.cho_solve((schur_chol, True), A @ m_inv_r1 - r2)
            return m_inv_r1 - m_inv_at @ dnu, dnu

        def max_step(v: jax.Array, dv: jax.Array) -> jax.Array:
            ratios = jnp.where(dv < 0, -v / jnp.where(dv < 0, dv, -1.0), jnp.inf)
            return jnp.minimum(1.0, jnp.min(ratios, initial=jnp.inf))

        # Start: the equality-constrained minimizer of the objective plus ½‖Gx − h‖², then
        # slacks and multipliers shifted into the interior.
        x0, nu0 = solve_newton(jnp.ones((m,), dtype), -q + G.T @ h, b)
        s0 = h - G @ x0
        s0 = s0 + jnp.maximum(0.0, 1.0 - jnp.min(s0, initial=1.0))
        lam0 = jnp.ones((m,), dtype)

        def measures(state: tuple) -> tuple:
            x, s, lam, nu, _ = state
            r_d = Q @ x + q + A.T @ nu + G.T @ lam
            r_p = A @ x - b
            r_g = G @ x + s - h
            mu = jnp.dot(s, lam) / max(m, 1)
            return r_d, r_p, r_g, mu

        def complementarity(state: tuple) -> jax.Array:
            # max sᵢλᵢ relative to the scales the KKT check uses (‖λ‖∞, ‖x‖∞): a weakly
            # active pair then ends with both below √gap_tol relative.
            x, s, lam = state[0], state[1], state[2]
            x_scale = jnp.maximum(1.0, jnp.max(jnp.abs(x), initial=0.0))
            lam_scale = jnp.maximum(1.0, jnp.max(lam, initial=0.0))
            return jnp.max(s * lam, initial=0.0) / (x_scale * lam_scale)

        def done(state: tuple) -> jax.Array:
            r_d, r_p, r_g, _ = measures(state)
            primal = jnp.maximum(
                jnp.max(jnp.abs(r_p), initial=0.0), jnp.max(jnp.abs(r_g), initial=0.0)
            )
            dual = jnp.max(jnp.abs(r_d), initial=0.0)
            return (
                (primal <= tol * scale_p)
                & (dual <= tol * scale_q)
                & (complementarity(state) <= gap_tol)
            )

        def step(state: tuple) -> tuple:
            x, s, lam, nu, k = state
            r_d, r_p, r_g, mu = measures(state)
            d = lam / s

            def direction(r_c: jax.Array) -> tuple:
                # Eliminate ds = -r_g - G dx and dλ = (Λ r_g - r_c)/s + D G dx.
                r1 = -r_d - G.T @ ((lam * r_g - r_c) / s)
                dx, dnu = solve_newton(d, r1, -r_p)
                ds = -r_g - G @ dx
                dlam = (lam * r_g - r_c) / s + d * (G @ dx)
                return dx, ds, dlam, dnu

            _, ds_a, dlam_a, _ = direction(s * lam)
            alpha_a = jnp.minimum(max_step(s, ds_a), max_step(lam, dlam_a))
            mu_a = jnp.dot(s + alpha_a * ds_a, lam + alpha_a * dlam_a) / max(m, 1)
            sigma = jnp.clip((mu_a / jnp.maximum(mu, 1e-300)) ** 3, 0.0, 1.0)
            dx, ds, dlam, dnu = direction(s * lam + ds_a * dlam_a - sigma * mu)
            alpha = 0.99 * jnp.minimum(max_step(s, ds), max_step(lam, dlam))
            alpha = jnp.minimum(alpha, 1.0)
            s_new = jnp.maximum(s + alpha * ds, 1e-300)
            lam_new = jnp.maximum(lam + alpha * dlam, 1e-300)
            new = (x + alpha * dx, s_new, lam_new, nu + alpha * dnu)
            finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(v)) for v in new]))
            # A failed factorization (NaN) ends the loop on the last finite iterate, which
            # then reports its own residuals (info.converged false).
            kept = tuple(jnp.where(finite, a, b) for a, b in zip(new, (x, s, lam, nu), strict=True))
            # A vanishing step (rounding floor reached) ends the loop as well.
            stalled = ~finite | (alpha < 1e-12)
            return (*kept, jnp.where(stalled, self.max_iter, k + 1))

        def keep_going(state: tuple) -> jax.Array:
            return (state[4] < self.max_iter) & ~done(state)

        state = (x0, s0, lam0, nu0, jnp.zeros((), jnp.int32))
        if m == 0:
            # No inequality: one Newton solve is exact.
            state = (x0, s0, lam0, nu0, jnp.ones((), jnp.int32))
        else:
            state = jax.lax.while_loop(keep_going, step, state)
        x, s, lam, nu, k = state
        if m:
            x, nu, lam = self._polish(Q, q, A, b, G, h, x, s, lam, nu, tol)
        primal, dual, gap = _residuals(Q, q, A, b, G, h, x, nu, lam)
        x_scale = jnp.maximum(1.0, jnp.max(jnp.abs(x), initial=0.0))
        lam_scale = jnp.maximum(1.0, jnp.max(lam, initial=0.0))
        converged = (
            (primal <= tol * scale_p)
            & (dual <= tol * scale_q)
            & (gap * max(m, 1) <= gap_tol * x_scale * lam_scale)
        )
        return x, nu, lam, QPInfo(converged, k, primal, dual, gap)

    @staticmethod
    def _polish(
        Q: jax.Array,
        q: jax.Array,
        A: jax.Array,
        b: jax.Array,
        G: jax.Array,
        h: jax.Array,
        x: jax.Array,
        s: jax.Array,
        lam: jax.Array,
        nu: jax.Array,
        tol: float,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Solve the equality-constrained QP of the active set guessed by the interior
        point (λᵢ > sᵢ) exactly, one dense LU; keep it if it is feasible with λ ≥ 0 (to
        ``tol``), else keep the interior-point iterate. Exact complementarity (sᵢ = 0 or
        λᵢ = 0) is what an interior point only approaches, as ``D = λ/s`` blows up the
        conditioning of its Newton systems (OSQP polishes for the same reason)."""
        n, p, m = q.size, b.size, h.size
        dtype = q.dtype
        mask = (lam > s).astype(dtype)
        kkt = jnp.block(
            [
                [Q, A.T, G.T * mask],
                [A, jnp.zeros((p, p), dtype), jnp.zeros((p, m), dtype)],
                [mask[:, None] * G, jnp.zeros((m, p), dtype), jnp.diag(1.0 - mask)],
            ]
        )
        z = jnp.linalg.solve(kkt, jnp.concatenate([-q, b, mask * h]))
        x_p, nu_p, lam_p = z[:n], z[n : n + p], z[n + p :]
        scale = jnp.maximum(1.0, jnp.max(jnp.abs(z), initial=0.0))
        ok = (
            jnp.all(jnp.isfinite(z))
            & (jnp.min(lam_p, initial=0.0) >= -tol * scale)
            & (jnp.max(G @ x_p - h, initial=0.0) <= tol * scale)
        )
        lam_p = jnp.maximum(lam_p, 0.0)
        return (
            jnp.where(ok, x_p, x),
            jnp.where(ok, nu_p, nu),
            jnp.where(ok, lam_p, lam),
        )


@dataclass(frozen=True)
class Clarabel:
    """The Clarabel interior-point solver (``pip install clarabel``), through
    ``jax.pure_callback`` (sequential under ``vmap``). Its duals are used as they are
    (``Px + q + Aᵀz = 0`` is dargmin's sign convention); the derivative is dargmin's.

    Attributes
    ----------
    tol
        Clarabel's ``tol_gap_abs``, ``tol_gap_rel``, ``tol_feas`` (default ``1e-10``).
    """

    tol: float = 1e-10

    def _solve_host(self, Q: Any, q: Any, A: Any, b: Any, G: Any, h: Any) -> tuple:
        import clarabel
        import scipy.sparse as sp

        Q, q, A, b, G, h = (np.asarray(v, dtype=float) for v in (Q, q, A, b, G, h))
        n, p, m = q.size, b.size, h.size
        P = sp.triu(sp.csc_matrix(0.5 * (Q + Q.T))).tocsc()
        K = sp.csc_matrix(np.vstack([A.reshape(p, n), G.reshape(m, n)]))
        cones = []
        if p:
            cones.append(clarabel.ZeroConeT(p))
        if m:
            cones.append(clarabel.NonnegativeConeT(m))
        settings = clarabel.DefaultSettings()
        settings.verbose = False
        settings.tol_gap_abs = settings.tol_gap_rel = settings.tol_feas = self.tol
        settings.tol_ktratio = 1e-8
        solution = clarabel.DefaultSolver(P, q, K, np.concatenate([b, h]), cones, settings).solve()
        z = np.asarray(solution.z)
        ok = str(solution.status) in ("Solved", "AlmostSolved")
        return (
            np.asarray(solution.x),
            z[:p],
            z[p:],
            np.asarray(ok),
            np.asarray(solution.iterations, np.int32),
        )

    def __call__(
        self, Q: jax.Array, q: jax.Array, A: jax.Array, b: jax.Array, G: jax.Array, h: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array, QPInfo]:
        return _external_call(self._solve_host, Q, q, A, b, G, h)


@dataclass(frozen=True)
class OSQP:
    """The OSQP ADMM solver (``pip install osqp``) through ``jax.pure_callback``, with
    polishing on and tightened tolerances (OSQP's defaults, ``1e-3``, leave the KKT
    conditions so loosely met that the derivative check refuses them — rightly).

    Attributes
    ----------
    eps
        OSQP's ``eps_abs`` and ``eps_rel`` (default ``1e-9``).
    """

    eps: float = 1e-9
    max_iter: int = 100_000

    def _solve_host(self, Q: Any, q: Any, A: Any, b: Any, G: Any, h: Any) -> tuple:
        import osqp
        import scipy.sparse as sp

        Q, q, A, b, G, h = (np.asarray(v, dtype=float) for v in (Q, q, A, b, G, h))
        n, p, m = q.size, b.size, h.size
        K = sp.csc_matrix(np.vstack([A.reshape(p, n), G.reshape(m, n)]))
        lower = np.concatenate([b, np.full(m, -np.inf)])
        upper = np.concatenate([b, h])
        solver = osqp.OSQP()
        solver.setup(
            sp.triu(sp.csc_matrix(0.5 * (Q + Q.T))).tocsc(),
            q,
            K,
            lower,
            upper,
            eps_abs=self.eps,
            eps_rel=self.eps,
            polishing=True,
            max_iter=self.max_iter,
            verbose=False,
        )
        result = solver.solve()
        y = np.asarray(result.y)
        ok = "solved" in str(result.info.status).lower()
        return (
            np.asarray(result.x),
            y[:p],
            np.maximum(y[p:], 0.0) if m else y[p:],
            np.asarray(ok),
            np.asarray(result.info.iter, np.int32),
        )

    def __call__(
        self, Q: jax.Array, q: jax.Array, A: jax.Array, b: jax.Array, G: jax.Array, h: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array, QPInfo]:
        return _external_call(self._solve_host, Q, q, A, b, G, h)


def _external_call(
    host: Any, Q: jax.Array, q: jax.Array, A: jax.Array, b: jax.Array, G: jax.Array, h: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, QPInfo]:
    dtype = q.dtype
    shapes = (
        jax.ShapeDtypeStruct(q.shape, dtype),
        jax.ShapeDtypeStruct(b.shape, dtype),
        jax.ShapeDtypeStruct(h.shape, dtype),
        jax.ShapeDtypeStruct((), jnp.bool_),
        jax.ShapeDtypeStruct((), jnp.int32),
    )

    def cast(*arrays: Any) -> tuple:
        x, nu, lam, ok, k = host(*arrays)
        return (
            np.asarray(x, dtype),
            np.asarray(nu, dtype),
            np.asarray(lam, dtype),
            np.asarray(ok, bool),
            np.asarray(k, np.int32),
        )

    x, nu, lam, ok, k = jax.pure_callback(cast, shapes, Q, q, A, b, G, h, vmap_method="sequential")
    primal, dual, gap = _residuals(Q, q, A, b, G, h, x, nu, lam)
    return x, nu, lam, QPInfo(ok, k, primal, dual, gap)


def _qp_objective(x: jax.Array, Q: jax.Array, q: jax.Array, *_: jax.Array) -> jax.Array:
    return 0.5 * x @ (Q @ x) + q @ x


def _qp_eq(x: jax.Array, Q: jax.Array, q: jax.Array, A: jax.Array, b: jax.Array, *_: Any):
    return A @ x - b


def _qp_ineq(x: jax.Array, *args: jax.Array) -> jax.Array:
    G, h = args[4], args[5]
    return G @ x - h


#: The QP as a constrained problem of (Q, q, A, b, G, h): one compiled derivative for all.
QP_PROBLEM = ConstrainedProblem(_qp_objective, eq=_qp_eq, ineq=_qp_ineq)


@dataclass(frozen=True)
class _QPConfig:
    solver: Any = field(default_factory=InteriorPoint)
    settings: KKTSettings = field(default_factory=KKTSettings)


@functools.partial(jax.jit, static_argnums=0)
def _solve_one(config: _QPConfig, Q, q, A, b, G, h) -> QPSolution:
    frozen = jax.lax.stop_gradient
    x, nu, lam, info = config.solver(*frozen((Q, q, A, b, G, h)))
    sol = kkt_solution(
        QP_PROBLEM, x, Q, q, A, b, G, h, eq_dual=nu, ineq_dual=lam, settings=config.settings
    )
    assert sol.eq_dual is not None and sol.ineq_dual is not None  # filled by kkt_solution
    return QPSolution(sol.x, sol.eq_dual, sol.ineq_dual, jax.tree_util.tree_map(frozen, info))


def solve_qp(
    Q: jax.Array,
    q: jax.Array,
    A: jax.Array | None = None,
    b: jax.Array | None = None,
    G: jax.Array | None = None,
    h: jax.Array | None = None,
    *,
    solver: QPSolver | None = None,
    degenerate: Degenerate = "raise",
    linear_solver: str | LinearSolver | lx.AbstractLinearSolver = "lu",
    check: CheckMode | Check | KKTCheck = "raise",
) -> QPSolution:
    r"""Solve ``min ½xᵀQx + qᵀx s.t. Ax = b, Gx ≤ h``, differentiably, possibly batched.

    The forward solve is ``solver`` (default :class:`InteriorPoint`, tolerance ``1e-10``
    in float64); its convergence is in ``QPSolution.info``. Derivatives with respect to
    every argument (``Q`` through the symmetric part ``½(Q + Qᵀ)`` the objective sees)
    come from the KKT system at the solution, restricted to its active set:

    .. math::

        \begin{pmatrix} Q & A^\top & G_\mathcal A^\top \\ A & 0 & 0 \\ G_\mathcal A & 0 & 0
        \end{pmatrix} \begin{pmatrix} \dot x \\ \dot\nu \\ \dot\lambda_\mathcal A
        \end{pmatrix} = -\begin{pmatrix} \dot Q x + \dot q + \dot A^\top \nu +
        \dot G_\mathcal A^\top \lambda_\mathcal A \\ \dot A x - \dot b \\
        \dot G_\mathcal A x - \dot h_\mathcal A \end{pmatrix},

    forward and reverse mode, under ``jit`` and ``vmap``, after the KKT check of
    :func:`constrained_argmin` (an infeasible instance, an unconverged solve, a weakly
    active constraint, dependent active constraints are refused with the numbers).

    Batches: arguments with one more leading axis than an unbatched problem
    (``Q: (B, n, n)``, ``q: (B, n)``, ``A: (B, p, n)``, ...) are solved as a batch, the
    others are shared (like qpth); or call ``jax.vmap(solve_qp)`` yourself.

    Parameters
    ----------
    Q, q
        ``(n, n)`` positive semidefinite (strictly convex for a unique derivative) and
        ``(n,)``.
    A, b, G, h
        ``(p, n)``, ``(p,)``, ``(m, n)``, ``(m,)``; ``None`` for no such constraints.
    solver
        :class:`InteriorPoint` (default), :class:`Clarabel`, :class:`OSQP` or any
        :class:`QPSolver`.
    degenerate, linear_solver, check
        As in :func:`constrained_argmin` (``linear_solver="lstsq"`` accepts redundant
        equalities).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> Q, q = jnp.eye(2), jnp.array([-1.0, -1.0])
    >>> G, h = jnp.array([[1.0, 1.0]]), jnp.array([1.0])     # x₁ + x₂ ≤ 1
    >>> sol = solve_qp(Q, q, G=G, h=h)
    >>> sol.x.round(6).tolist(), bool(sol.info.converged)
    ([0.5, 0.5], True)
    >>> jax.grad(lambda h: solve_qp(Q, q, G=G, h=h).x.sum())(h).round(6).tolist()
    [1.0]
    """
    q = jnp.asarray(q)
    batched = q.ndim == 2
    n = q.shape[-1]
    dtype = jnp.result_type(Q, q)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)

    def default(matrix: Any, vector: Any) -> tuple[jax.Array, jax.Array]:
        if matrix is None and vector is None:
            return jnp.zeros((0, n), dtype), jnp.zeros((0,), dtype)
        if matrix is None or vector is None:
            raise ValueError("Give both the matrix and the right-hand side of a constraint.")
        return jnp.asarray(matrix, dtype), jnp.asarray(vector, dtype)

    A_, b_ = default(A, b)
    G_, h_ = default(G, h)
    args = (jnp.asarray(Q, dtype), q.astype(dtype), A_, b_, G_, h_)
    config = _QPConfig(
        solver=solver if solver is not None else InteriorPoint(),
        settings=KKTSettings(
            linear_solver=as_linear_solver(linear_solver),
            check=KKTCheck.of(check),
            degenerate=degenerate,
            kind="solve_qp",
        ),
    )
    unbatched_ndim = (2, 1, 2, 1, 2, 1)
    axes = tuple(0 if a.ndim > d else None for a, d in zip(args, unbatched_ndim, strict=True))
    if batched or any(ax is not None for ax in axes):
        fn = jax.vmap(functools.partial(_solve_one, config), in_axes=axes)
        return _run(fn, *args)
    return _run(functools.partial(_solve_one, config), *args)


def _run(fn: Any, *args: jax.Array) -> QPSolution:
    from dargmin.constrained._kkt import reraise_constrained
    from dargmin.errors import DargminError

    try:
        return fn(*args)
    except (jax.errors.JaxRuntimeError, ValueError) as err:
        if not isinstance(err, DargminError):
            reraise_constrained(err)
        raise
