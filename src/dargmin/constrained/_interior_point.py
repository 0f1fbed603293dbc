"""A primal-dual interior-point QP solver written in JAX (jittable, ``vmap``-able), with an
active-set polish that gives the KKT derivative exact complementarity to work from."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import equinox.internal as eqxi
import jax
import jax.numpy as jnp

from dargmin.constrained._compaction import compacted_while
from dargmin.constrained._qp_types import QPData, QPFactors, QPInfo, qp_residuals


@dataclass(frozen=True)
class InteriorPoint:
    """Mehrotra predictor-corrector primal-dual interior-point method, in JAX.

    Each iteration eliminates the slacks and inequality multipliers and takes one
    predictor and one corrector step from one factorization, with a fraction-to-boundary
    rule of 0.99. Two ways to solve the Newton systems:

    * **dual path** (``Q`` positive definite, its Cholesky pivots within a squared ratio of
      ``1e-9``; every member of a batch): ``Q = LLᵀ`` once and the iterations in
      ``z = Lᵀx``, where the objective is ``½‖z‖² + (L⁻¹q)ᵀz``; per iteration the
      ``(p + m)`` system ``(C Q⁻¹ Cᵀ + diag(0, s/λ)) y = …`` with ``C = [A; G]`` (a
      ``1e-13`` relative shift for redundant equalities), and no product with an n × n
      matrix but the residuals' ``L r_z``. After each iteration the
      iterate is *polished* (below) and the solve stops at the first polished point that
      passes ``info.converged``: in qpth's random QPs (n = 10 to 500) after the first
      iteration, within the default 10 active-set corrections of its polish.
    * **primal path** (``Q`` semidefinite, an LP): ``Q + Gᵀ diag(λ/s) G`` and the Schur
      complement ``A (·)⁻¹ Aᵀ`` by Cholesky (``1e-14`` / ``1e-13`` relative shifts),
      iterating until the primal and dual residuals are below ``tol`` times the size of
      the data and of their rounding (``1 + max(‖b‖∞, ‖h‖∞) + ‖C‖∞ x̄``;
      ``1 + ‖q‖∞ + ‖Q‖∞ x̄``, with ``x̄ = max(1, ‖x‖∞)`` and ``‖·‖∞`` of a matrix its
      largest absolute row sum) and the largest complementarity product
      ``max sᵢλᵢ / ((1 + ‖C‖∞) x̄ max(1, ‖λ‖∞))`` is below ``gap_tol``, or ``max_iter``
      iterations, or a vanishing step; then it polishes once (a dense LU).

    The *polish* solves the equality-constrained QP of a guessed active set exactly and
    keeps it if feasible with ``λ ≥ 0`` (to ``tol``). The guess is the one the iteration's
    predictor foresees (``λ + dλ > s + ds`` at its full step) on the dual path, the
    iterate's (``λᵢ > sᵢ``) on the primal path; on the dual path, a failed guess is
    corrected up to ``corrections`` times (drop the inequalities
    with a negative multiplier, add the violated ones, solve again: primal-dual active-set
    steps, which converge fast from a good guess but may cycle, so the interior point
    stays the safeguard). The result
    has exact complementarity, so a weakly active constraint ends with both its multiplier
    and its slack at rounding level, recognized as degenerate by the KKT check instead of
    being silently assigned to one side. ``info.converged`` tests the returned point
    (residuals as above, ``sᵀλ ≤ gap_tol (1 + ‖C‖∞) x̄ max(1, ‖λ‖∞)``); the KKT check
    refuses to differentiate an unconverged point. Defaults: ``tol = 1e-10``,
    ``gap_tol = 1e-12`` in float64; ``1e-5`` and ``1e-7`` in float32.

    The LAPACK calls of either path form a single dependent chain, so that under ``vmap``
    no two batched LAPACK kernels run at once: jaxlib 0.10's batched kernels split the
    batch over XLA's CPU thread pool and block a pool thread until the pieces finish, and
    two running side by side can deadlock the pool (seen on 2 cores at n = 100, batch
    128: a ``potrf`` and a ``trsm``). ``lax.optimization_barrier`` does not order them
    (XLA:CPU removes it); data dependencies do.

    Attributes
    ----------
    tol
        Relative tolerance of the stopping test (``None``: ``1e-10`` / ``1e-6``).
    max_iter
        Iteration limit.
    corrections
        Active-set corrections per polish (dual path; 0: the guess only). Without them
        the interior point's guess was typically one or two constraints off for several
        iterations and qpth's random QPs took 3-8 iterations at n = 100 (14 at n = 500);
        with them, one: forward 338 → 235 ms at n = 100, batch 128 (one run,
        interleaved).
    """

    tol: float | None = None
    gap_tol: float | None = None
    max_iter: int = 60
    corrections: int = 10

    def _tols(self, dtype: Any) -> tuple[float, float]:
        double = float(jnp.finfo(dtype).eps) < 1e-10
        tol = self.tol if self.tol is not None else (1e-10 if double else 1e-5)
        gap_tol = self.gap_tol if self.gap_tol is not None else (1e-12 if double else 1e-7)
        return tol, gap_tol

    def __call__(
        self, Q: jax.Array, q: jax.Array, A: jax.Array, b: jax.Array, G: jax.Array, h: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array, QPInfo]:
        return self.solve_and_factor(Q, q, A, b, G, h)[:4]

    def solve_and_factor(
        self, Q: jax.Array, q: jax.Array, A: jax.Array, b: jax.Array, G: jax.Array, h: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array, QPInfo, QPFactors]:
        """As calling the solver, plus the factors of the dual path (``Q = LLᵀ``,
        ``V = L⁻¹[A; G]ᵀ``, ``VᵀV``; ``usable`` false after the primal path), which
        :func:`solve_qp`'s KKT derivative reuses instead of factorizing ``Q`` again
        (the KKT matrix of any active set is ``Q`` and masked columns of ``V``).

        Examples
        --------
        >>> import jax.numpy as jnp
        >>> Q, q = jnp.array([[4.0, 1.0], [1.0, 2.0]]), jnp.array([-1.0, -1.0])
        >>> A, b = jnp.zeros((0, 2)), jnp.zeros((0,))
        >>> G, h = jnp.array([[1.0, 1.0]]), jnp.array([0.2])
        >>> *_, factors = InteriorPoint().solve_and_factor(Q, q, A, b, G, h)
        >>> L = factors.chol
        >>> bool(factors.usable), bool(jnp.allclose(L @ L.T, Q))
        (True, True)
        >>> bool(jnp.allclose(L @ factors.v, jnp.concatenate([A, G]).T))
        True
        """
        dtype = q.dtype
        n, p, m = q.size, b.size, h.size
        tol, gap_tol = self._tols(dtype)
        # The objective's matrix is ½(Q + Qᵀ), never formed in full but where a path needs
        # it: in the one pass that copies Q to LAPACK's layout for its Cholesky
        # factorization (as fast as the plain copy it replaces: both read Q through a
        # transpose), and on the primal path. The residuals symmetrize by products
        # (qp_residuals). A test for asymmetry had cost 4.5 ms at n = 500, batch 8.
        data = QPData(Q, q, A, b, G, h)
        scale_q = 1.0 + jnp.max(jnp.abs(q), initial=0.0)
        scale_p = 1.0 + jnp.maximum(
            jnp.max(jnp.abs(b), initial=0.0), jnp.max(jnp.abs(h), initial=0.0)
        )
        # ‖Q‖∞ and ‖[A; G]‖∞ (largest absolute row sums): the residuals' rounding error is
        # about eps·‖Q‖∞‖x‖∞ (and ‖C‖∞‖x‖∞ for Cx, the slacks, hence sᵢλᵢ), so the tests
        # scale with them. Without them, float32 on qpth's random QPs (n = 30) never met
        # the gap test: slacks rounded at ~1e-5, 60 iterations and info.converged false on
        # solutions accurate to 5e-7.
        # (Q's rows for ½(Q + Qᵀ): equal if Q is symmetric; otherwise the tests are only
        # stricter. Rows and columns both made XLA write |Q| out, 6.6 ms at n = 500.)
        q_norm = jnp.max(jnp.sum(jnp.abs(Q), axis=1), initial=0.0)
        c_norm = jnp.maximum(
            jnp.max(jnp.sum(jnp.abs(A), axis=1), initial=0.0),
            jnp.max(jnp.sum(jnp.abs(G), axis=1), initial=0.0),
        )

        # The scales of the tests, as arguments where a loop takes them as operands.
        norms = (scale_p, scale_q, q_norm, c_norm)

        def within(
            primal: jax.Array, dual: jax.Array, x_scale: jax.Array, norms: tuple = norms
        ) -> jax.Array:
            """The residual tests of ``info.converged`` at a point with ``‖x‖∞ ≤ x_scale``."""
            scale_p, scale_q, q_norm, c_norm = norms
            return (primal <= tol * (scale_p + c_norm * x_scale)) & (
                dual <= tol * (scale_q + q_norm * x_scale)
            )

        def converged(
            primal: jax.Array,
            dual: jax.Array,
            gap: jax.Array,
            x_scale: jax.Array,
            lam_scale: jax.Array,
            norms: tuple = norms,
        ) -> jax.Array:
            """``info.converged`` from a point's residuals, mean ``sᵢλᵢ`` and scales."""
            return within(primal, dual, x_scale, norms) & (
                gap * max(m, 1) <= gap_tol * (1.0 + norms[3]) * x_scale * lam_scale
            )

        diag_scale = jnp.maximum(jnp.max(jnp.abs(jnp.diag(Q)), initial=0.0), 1.0)
        # Why hand-written: no maintained JAX QP solver returns accurate duals (jaxopt is
        # unmaintained and its OSQP stops at 1e-3); the KKT derivative needs both.

        # The Newton systems [[Q + Gᵀ D G, Aᵀ], [A, 0]] [dx; dν] = [r1; r2] of one iteration
        # share D = λ/s: factorize once, solve for the predictor and the corrector. The
        # LAPACK calls form one dependent chain (Aᵀ and r1 solved together, not side by
        # side): jaxlib 0.10's batched LAPACK kernels split a batch over the CPU thread
        # pool and block a pool thread until the pieces finish, so two independent batched
        # factorizations running at once under vmap can hold every pool thread waiting and
        # deadlock (seen: two concurrent batched potrf at n = 100, batch ≥ 48, 2 cores).
        shift = 1e-14 * diag_scale

        def factorize(
            q_sym: jax.Array, d: jax.Array, r1: jax.Array, r2: jax.Array
        ) -> tuple[tuple, tuple]:
            """Factors of the system with ``D = diag(d)`` (``q_sym = ½(Q + Qᵀ)``), and its
            solution for ``(r1, r2)``."""
            # A shift relative to Q's scale, not M's: near the end λ/s reaches 1e14 on
            # active rows, and a shift relative to that would distort every other direction.
            M = q_sym + (G.T * d) @ G + shift * jnp.eye(n, dtype=dtype)
            chol = jnp.linalg.cholesky(M)
            if p == 0:
                return (chol,), (_cho_solve(chol, r1), jnp.zeros((0,), dtype))
            both = _cho_solve(chol, jnp.concatenate([A.T, r1[:, None]], axis=1))
            m_inv_at, m_inv_r1 = both[:, :p], both[:, p]
            schur = A @ m_inv_at
            schur_shift = 1e-13 * jnp.maximum(jnp.max(jnp.abs(jnp.diag(schur))), 1e-300)
            schur_chol = jnp.linalg.cholesky(schur + schur_shift * jnp.eye(p, dtype=dtype))
            factors = (chol, m_inv_at, schur_chol)
            return factors, eliminate(factors, m_inv_r1, r2)

        def eliminate(factors: tuple, m_inv_r1: jax.Array, r2: jax.Array) -> tuple:
            _, m_inv_at, schur_chol = factors
            dnu = _cho_solve(schur_chol, A @ m_inv_r1 - r2)
            return m_inv_r1 - m_inv_at @ dnu, dnu

        def resolve(factors: tuple, r1: jax.Array, r2: jax.Array) -> tuple:
            """The same system for another right-hand side, from its factors."""
            m_inv_r1 = _cho_solve(factors[0], r1)
            if p == 0:
                return m_inv_r1, jnp.zeros((0,), dtype)
            return eliminate(factors, m_inv_r1, r2)

        def max_step(v: jax.Array, dv: jax.Array) -> jax.Array:
            ratios = jnp.where(dv < 0, -v / jnp.where(dv < 0, dv, -1.0), jnp.inf)
            return jnp.minimum(1.0, jnp.min(ratios, initial=jnp.inf))

        def start(x0: jax.Array) -> tuple[jax.Array, jax.Array]:
            """Slacks and multipliers of the start, shifted into the interior. Both paths
            start from the equality-constrained minimizer of the objective plus
            ½‖Gx − h‖²."""
            s0 = h - G @ x0
            s0 = s0 + jnp.maximum(0.0, 1.0 - jnp.min(s0, initial=1.0))
            return s0, jnp.ones((m,), dtype)

        def accepted(x: jax.Array, nu: jax.Array, lam: jax.Array) -> jax.Array:
            """``info.converged`` of a returned point (see the class docstring)."""
            primal, dual, gap = qp_residuals(data, x, nu, lam)
            x_scale = jnp.maximum(1.0, jnp.max(jnp.abs(x), initial=0.0))
            lam_scale = jnp.maximum(1.0, jnp.max(lam, initial=0.0))
            return converged(primal, dual, gap, x_scale, lam_scale)

        def measures(q_sym: jax.Array, state: tuple) -> tuple:
            x, s, lam, nu, _ = state
            r_d = q_sym @ x + q + A.T @ nu + G.T @ lam
            return r_d, A @ x - b, G @ x + s - h

        def complementarity(state: tuple, x_scale: jax.Array) -> jax.Array:
            # max sᵢλᵢ relative to the scales the KKT check uses (‖λ‖∞, ‖x‖∞): a weakly
            # active pair then ends with both below √gap_tol relative.
            s, lam = state[1], state[2]
            lam_scale = jnp.maximum(1.0, jnp.max(lam, initial=0.0))
            return jnp.max(s * lam, initial=0.0) / ((1.0 + c_norm) * x_scale * lam_scale)

        def done(residuals: tuple, state: tuple, x_scale: jax.Array) -> jax.Array:
            """The interior point's own stopping test (``residuals`` in x)."""
            r_d, r_p, r_g = residuals
            primal = jnp.maximum(
                jnp.max(jnp.abs(r_p), initial=0.0), jnp.max(jnp.abs(r_g), initial=0.0)
            )
            dual = jnp.max(jnp.abs(r_d), initial=0.0)
            return within(primal, dual, x_scale) & (complementarity(state, x_scale) <= gap_tol)

        def step(
            factorize: Any,
            resolve: Any,
            measure: Any,
            times_g: Any,
            state: tuple,
            residuals: tuple | None = None,
        ) -> tuple:
            """One Mehrotra iteration, with the Newton systems solved by ``factorize``
            (factors and the predictor) and ``resolve`` (the corrector, same factors), the
            residuals ``measure(state)`` (unless given) and the products ``G·dx`` /
            ``Gᵀ·v`` from ``times_g(dx)`` / ``times_g(v, transpose=True)``. Returns the
            new state and the active set the predictor foresees: ``λ + dλ > s + ds`` at
            its full (affine-scaling) step, where the linearized KKT conditions hold with
            ``sᵢλᵢ = 0``."""
            x, s, lam, nu, k = state
            r_d, r_p, r_g = measure(state) if residuals is None else residuals
            mu = jnp.dot(s, lam) / max(m, 1)
            d = lam / s

            def rhs(r_c: jax.Array) -> jax.Array:
                # Eliminate ds = -r_g - G dx and dλ = (Λ r_g - r_c)/s + D G dx.
                return -r_d - times_g((lam * r_g - r_c) / s, transpose=True)

            def recover(r_c: jax.Array, dx: jax.Array) -> tuple[jax.Array, jax.Array]:
                g_dx = times_g(dx)
                return -r_g - g_dx, (lam * r_g - r_c) / s + d * g_dx

            factors, (dx_a, _) = factorize(d, rhs(s * lam), -r_p)
            ds_a, dlam_a = recover(s * lam, dx_a)
            alpha_a = jnp.minimum(max_step(s, ds_a), max_step(lam, dlam_a))
            mu_a = jnp.dot(s + alpha_a * ds_a, lam + alpha_a * dlam_a) / max(m, 1)
            sigma = jnp.clip((mu_a / jnp.maximum(mu, 1e-300)) ** 3, 0.0, 1.0)
            r_c = s * lam + ds_a * dlam_a - sigma * mu
            dx, dnu = resolve(factors, rhs(r_c), -r_p)
            ds, dlam = recover(r_c, dx)
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
            foreseen = lam + dlam_a > s + ds_a
            return (*kept, jnp.where(stalled, self.max_iter, k + 1)), foreseen

        def times_g_x(v: jax.Array, transpose: bool = False) -> jax.Array:
            return G.T @ v if transpose else G @ v

        def primal_path(_: Any) -> tuple:
            q_sym = 0.5 * (Q + Q.T)
            factorize_x = functools.partial(factorize, q_sym)
            measures_x = functools.partial(measures, q_sym)
            _, (x0, nu0) = factorize_x(jnp.ones((m,), dtype), -q + G.T @ h, b)
            state = (x0, *start(x0), nu0, jnp.zeros((), jnp.int32))

            def keep_going(state: tuple) -> jax.Array:
                x_scale = jnp.maximum(1.0, jnp.max(jnp.abs(state[0]), initial=0.0))
                finished = done(measures_x(state), state, x_scale)
                return (state[4] < self.max_iter) & ~finished

            def body(state: tuple) -> tuple:
                return step(factorize_x, resolve, measures_x, times_g_x, state)[0]

            x, s, lam, nu, k = jax.lax.while_loop(keep_going, body, state)
            # No factors to reuse (Q is not positive definite here).
            unused = (jnp.zeros((n, p + m), dtype), jnp.zeros((p + m, p + m), dtype))
            polished = self._polish(data._replace(Q=q_sym), x, s, lam, nu, tol)
            return (*polished, k, unused)

        def dual_path(chol_q: jax.Array) -> tuple:
            """The iterations in the variables ``z = Lᵀx`` (``Q = LLᵀ`` factorized once):
            the objective is ``½‖z‖² + wᵀz`` (``w = L⁻¹q``) and the constraints
            ``Vᵀz = (b, ≤ h)`` with ``V = L⁻¹Cᵀ``, ``C = [A; G]``. Each Newton system is
            then ``(VᵀV + diag(0, s/λ)) y = Vᵀa₁ − a₂``, ``dz = a₁ − Vy``, of size
            ``p + m``, and the polish (below) the same on the guessed active set (rows
            dropped elsewhere). It stops at the first polished point that passes
            ``info.converged``: the interior point itself, stopped at ``tol``, stalls above
            the rounding floor of its ill-conditioned last systems, while the polish of an
            early iterate with the right active set is exact.

            Why z: every product inside the loop is then one with ``V`` (n × (p + m)),
            none with Q or L⁻¹ (n × n). Batched matrix–vector products are memory-bound on
            the CPU (one pass over the batch's matrices each): at n = 100, batch 128, 11 of
            an iteration's ~30 products read a 10 MB n × n batch, measured 1.3-1.6 ms each.
            The dual residual in x is ``L`` times the one in z (a product with the
            triangle of Q's factor where the tests need it, one per test)."""
            c = jnp.concatenate([A, G], axis=0)
            # One triangular solve for V and w (L⁻¹ itself is never formed: that solve
            # had n right-hand sides and a product with Cᵀ after it).
            v_w = jax.lax.linalg.triangular_solve(
                chol_q, jnp.concatenate([c.T, q[:, None]], axis=1), left_side=True, lower=True
            )
            v, w_q = v_w[:, : p + m], v_w[:, p + m]  # L⁻¹Cᵀ, L⁻¹q
            gram = v.T @ v  # C Q⁻¹ Cᵀ

            def to_x(z: jax.Array) -> jax.Array:
                return jax.lax.linalg.triangular_solve(
                    chol_q, z[:, None], left_side=True, lower=True, transpose_a=True
                )[:, 0]

            dual_shift = 1e-13 * jnp.maximum(jnp.max(jnp.diag(gram)), 1e-300)
            bh = jnp.concatenate([b, h])
            eq_zeros = jnp.zeros((p,), dtype)
            # L for the products L r_z, as its own array: LAPACK returns L column-major,
            # and XLA copied it to the products' row-major layout inside the loop, once per
            # product (a pass over the n × n batch each: 39 of 373 ms at n = 100, batch
            # 128). tril gives a new array that XLA lays out row-major, once.
            l_rows = jnp.tril(chol_q)
            # ‖x‖∞ ≥ ‖z‖∞ / ‖Lᵀ‖∞: a lower bound keeps the complementarity test conservative.
            # From the row-major copy: reduced from LAPACK's column-major L, XLA first
            # copied L to row-major (7 ms at n = 500, batch 8).
            lt_norm = jnp.max(jnp.sum(jnp.abs(l_rows), axis=0))
            # ‖L‖∞ ≤ √n ‖L‖_F = √(n tr Q) (a second reduction over |L| made XLA write |L|
            # out: 7.4 ms at n = 500, batch 8).
            l_norm = jnp.sqrt(n * jnp.maximum(jnp.sum(jnp.diag(Q)), 0.0))

            def x_scale_from_z(z: jax.Array, lt_norm: jax.Array = lt_norm) -> jax.Array:
                """``max(1, ‖z‖∞/‖Lᵀ‖∞) ≤ max(1, ‖x‖∞)``, without forming x."""
                return jnp.maximum(1.0, jnp.max(jnp.abs(z), initial=0.0) / lt_norm)

            def measure_z(state: tuple) -> tuple:
                z, s, lam, nu, _ = state
                r_z = z + w_q + v @ jnp.concatenate([nu, lam])
                cz = v.T @ z
                return r_z, cz[:p] - b, cz[p:] + s - h

            def times_g_z(u: jax.Array, transpose: bool = False) -> jax.Array:
                # Products with V_G = V[:, p:] through the whole V (a slice would copy it).
                if transpose:
                    return v @ jnp.concatenate([eq_zeros, u])
                return (v.T @ u)[p:]

            def cholesky(matrix: jax.Array) -> jax.Array:
                # The transpose of the (symmetric) matrix is LAPACK's column-major layout
                # for free: 6.0 instead of 9.0 ms for 128 × 70² (no symmetrizing copy).
                return jax.lax.linalg.cholesky(matrix.T, symmetrize_input=False)

            def factorize_z(d: jax.Array, r1: jax.Array, r2: jax.Array) -> tuple:
                diag = jnp.concatenate([eq_zeros, 1.0 / d]) + dual_shift
                chol_s = cholesky(gram + jnp.diag(diag))
                return chol_s, resolve_z(chol_s, r1, r2)

            def resolve_z(chol_s: jax.Array, r1: jax.Array, r2: jax.Array) -> tuple:
                y = _cho_solve(chol_s, v.T @ r1 - jnp.concatenate([r2, jnp.zeros((m,), dtype)]))
                return r1 - v @ y, y[:p]

            vt_w = v.T @ w_q
            # What the polish reads, as the operands of its loop (gathered with the
            # members still correcting, see _compaction).
            polish_operands = (v, gram, w_q, vt_w, bh, dual_shift, lt_norm, l_norm, norms)

            def solve_active(operands: tuple, rows: jax.Array) -> tuple:
                """The equality-constrained QP of the active set ``rows`` (1.0 on the
                equalities and the active inequalities), solved exactly in z with one step
                of iterative refinement (which removes the shift's bias). Rows off the set
                get ``y = 0`` from the unit diagonal; masks act on vectors, not on V.
                Returns ``(z, ν, λ ≥ 0)``, whether that point is usable (finite, ``λ ≥ 0``
                and feasible to ``tol``), whether it passes ``info.converged``, and the
                raw multipliers and slacks (for the active-set correction), and what the
                tests in x need (``r_z``, the primal residual, the mean ``sᵢλᵢ`` and the
                multipliers' scale)."""
                v, gram, w_q, vt_w, bh, dual_shift, lt_norm, l_norm, norms = operands
                b, h = bh[:p], bh[p:]
                chol_s = cholesky(gram * rows[:, None] * rows + jnp.diag(1.0 - rows + dual_shift))
                a2 = rows * bh
                y = _cho_solve(chol_s, -rows * vt_w - a2)
                z_p = -w_q - v @ (rows * y)
                # Refinement: the z-rows of the system hold to rounding by construction.
                r_y = rows * (v.T @ z_p) - (1.0 - rows) * y - a2
                dy = _cho_solve(chol_s, r_y)
                y = y + dy
                z_p = z_p - v @ (rows * dy)
                cz = v.T @ z_p
                nu_p, lam_raw = y[:p], y[p:]
                # The tests in z, without x = L⁻ᵀz (a triangular solve) and the dual
                # residual in x (L r_z, a product with L): ‖x‖∞ ≥ ‖z‖∞/‖Lᵀ‖∞ and
                # ‖L r_z‖∞ ≤ ‖L‖∞‖r_z‖∞ make them at least as strict as info.converged
                # (which the returned point passes in x after the loop). Where they fail a
                # usable point, the polish tests it in x after its loop (in float32, where
                # the bound exceeds the tolerance). Saves 1 of ~5 ms per pass at n = 100,
                # batch 128, and 2 of ~10 at n = 500, batch 8.
                x_scale = x_scale_from_z(z_p, lt_norm)
                scale = jnp.maximum(x_scale, jnp.max(jnp.abs(y), initial=0.0))
                slack = h - cz[p:]
                usable = (
                    jnp.all(jnp.isfinite(z_p))
                    & jnp.all(jnp.isfinite(y))
                    & (jnp.min(lam_raw, initial=0.0) >= -tol * scale)
                    & (jnp.max(-slack, initial=0.0) <= tol * scale)
                )
                lam_p = jnp.maximum(lam_raw, 0.0)
                r_z = z_p + w_q + v @ (rows * y)
                lam_scale = jnp.maximum(1.0, jnp.max(lam_p, initial=0.0))
                primal = jnp.maximum(
                    jnp.max(jnp.abs(cz[:p] - b), initial=0.0), jnp.max(-slack, initial=0.0)
                )
                gap = jnp.sum(jnp.maximum(slack, 0.0) * lam_p) / max(m, 1)
                dual = l_norm * jnp.max(jnp.abs(r_z), initial=0.0)
                passes = converged(primal, dual, gap, x_scale, lam_scale, norms)
                return (
                    (z_p, nu_p, lam_p),
                    usable,
                    passes,
                    (lam_raw, slack, tol * scale),
                    (r_z, primal, gap, lam_scale),
                )

            def polish(z: jax.Array, nu: jax.Array, lam: jax.Array, guess: jax.Array) -> tuple:
                """As :meth:`InteriorPoint._polish`, in z (:func:`solve_active` on the
                active set ``guess``, the one the iteration's predictor foresees), with up
                to ``corrections`` active-set corrections: while the solve fails, drop its
                inequalities with a negative multiplier, add the violated ones, and solve
                again (primal-dual active-set steps). Under ``vmap`` the last passes run
                on the members still correcting only (:func:`.compacted_while`): at n =
                100, batch 128, the batch took 6 passes, its slowest 9 members the last
                two.

                Why the predictor's guess (``λ + dλ > s + ds`` at its full step) and not
                the iterate's (``λ > s``): after the first iteration on qpth's random QPs
                the iterate's guess missed about half the active set (n = 500: 122 of 250
                constraints changed in the first correction, 7 passes for the batch of 8;
                n = 100, batch 128: 7 passes) and the predictor's far less (53; 5 passes at
                n = 500, and 80 of 128 members done after 3 at n = 100)."""
                rows = jnp.concatenate([jnp.ones((p,), dtype), guess.astype(dtype)])

                # One solve per pass, the guess in the first and its corrections after
                # (one traced copy of solve_active: compile time). A member stops moving
                # once its solve passes or its correction changes nothing (which a usable
                # point's does: its tests in x can wait until after the loop).
                def retrying(state: tuple) -> jax.Array:
                    return (state[0] <= self.corrections) & state[5]

                def solve_and_correct(operands: tuple, state: tuple) -> tuple:
                    # Runs only while the member is moving (compacted_while keeps a
                    # stopped member's state, batched or not): no masking here.
                    count, rows, _, _, _, moving, _ = state
                    point, usable, passes, (lam_raw, slack, limit), tests = solve_active(
                        operands, rows
                    )
                    ineq = rows[p:] > 0
                    new_ineq = jnp.where(ineq, lam_raw >= -limit, slack < -limit)
                    retry = ~(usable & passes) & jnp.any(new_ineq != ineq)
                    retry = retry & jnp.all(jnp.isfinite(lam_raw)) & jnp.all(jnp.isfinite(slack))
                    moving = moving & retry
                    rows = jnp.where(
                        moving, jnp.concatenate([rows[:p], new_ineq.astype(dtype)]), rows
                    )
                    return count + 1, rows, point, usable, passes, moving, tests

                no = jnp.zeros((), bool)
                zero = jnp.zeros((), dtype)
                tests = (jnp.zeros((n,), dtype), zero, zero, zero)
                state = (jnp.zeros((), jnp.int32), rows, (z, nu, lam), no, no, ~no, tests)
                _, _, point, usable, passes, _, tests = compacted_while(
                    retrying, solve_and_correct, polish_operands, state
                )

                def in_x(_: Any) -> jax.Array:
                    r_z, primal, gap, lam_scale = tests
                    x_p = to_x(point[0])
                    x_scale = jnp.maximum(1.0, jnp.max(jnp.abs(x_p), initial=0.0))
                    dual = jnp.max(jnp.abs(l_rows @ r_z), initial=0.0)
                    return converged(primal, dual, gap, x_scale, lam_scale)

                passes = jax.lax.cond(
                    eqxi.unvmap_any(usable & ~passes), in_x, lambda _: passes, None
                )
                pick = functools.partial(jnp.where, usable)
                return tuple(pick(a, b) for a, b in zip(point, (z, nu, lam), strict=True)), (
                    usable & passes
                )

            ipm_step = functools.partial(step, factorize_z, resolve_z, measure_z, times_g_z)

            def body(state: tuple) -> tuple:
                # The iterate's residuals are measured once: for the loop's stopping test
                # here, and carried to the next iteration's step.
                iterate, foreseen = ipm_step(state[0], state[1])
                z, _, lam, nu, k = iterate
                out, accepted_ = polish(z, nu, lam, foreseen)
                z_scale = x_scale_from_z(z)
                residuals = measure_z(iterate)
                r_z, r_p, r_g = residuals
                own = done((l_rows @ r_z, r_p, r_g), iterate, z_scale)
                finished = accepted_ | (k >= self.max_iter) | own
                return iterate, residuals, out, finished

            start_u = -w_q + times_g_z(h, transpose=True)
            _, (z0, nu0) = factorize_z(jnp.ones((m,), dtype), start_u, b)
            x0 = to_x(z0)
            lam0 = jnp.ones((m,), dtype)
            iterate0 = (z0, *start(x0), nu0, jnp.zeros((), jnp.int32))
            state = (iterate0, measure_z(iterate0), (z0, nu0, lam0), jnp.zeros((), bool))
            iterate, _, (z, nu, lam), _ = jax.lax.while_loop(lambda st: ~st[3], body, state)
            return to_x(z), nu, lam, iterate[4], (v, gram)

        if m == 0:
            # No inequality: one Newton solve is exact.
            _, (x, nu) = factorize(0.5 * (Q + Q.T), jnp.ones((m,), dtype), -q + G.T @ h, b)
            lam, k = jnp.ones((m,), dtype), jnp.ones((), jnp.int32)
            factors = QPFactors(
                jnp.zeros((n, n), dtype),
                jnp.zeros((n, p), dtype),
                jnp.zeros((p, p), dtype),
                jnp.zeros((), bool),
            )
        else:
            # A positive definite Q (its Cholesky pivots within 1e-9 of each other,
            # squared) takes the dual path (``dual_path``: Q factorized once, (p + m)
            # systems per iteration); otherwise every member of the batch takes this
            # module's primal path (n × n systems; Q semidefinite, an LP).
            # ½(Q + Qᵀ) formed in LAPACK's (column-major) layout by the copy the
            # factorization needs anyway. A failed factorization is all NaN, so its
            # diagonal tells.
            chol_q = jax.lax.linalg.cholesky(0.5 * (Q.T + Q), symmetrize_input=False)
            pivots = jnp.abs(jnp.diag(chol_q))
            ratio = (jnp.min(pivots) / jnp.maximum(jnp.max(pivots), 1e-300)) ** 2
            definite = jnp.all(jnp.isfinite(pivots)) & (ratio >= 1e-9)
            took_dual_path = eqxi.unvmap_all(definite)
            x, nu, lam, k, (v, gram) = jax.lax.cond(took_dual_path, dual_path, primal_path, chol_q)
            factors = QPFactors(chol_q, v, gram, took_dual_path)
        primal, dual, gap = qp_residuals(data, x, nu, lam)
        return x, nu, lam, QPInfo(accepted(x, nu, lam), k, primal, dual, gap), factors

    @staticmethod
    def _polish(
        data: QPData,
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
        Q, q, A, b, G, h = data
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


def _cho_solve(chol: jax.Array, rhs: jax.Array) -> jax.Array:
    return jax.scipy.linalg.cho_solve((chol, True), rhs)
