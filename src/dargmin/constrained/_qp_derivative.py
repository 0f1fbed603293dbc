r"""The QP layer's own KKT derivative: one Cholesky chain, shared by every tangent.

For ``min ½xᵀQx + qᵀx s.t. Ax = b, Gx ≤ h`` at ``(x, ν, λ)`` with active set
:math:`\mathcal A`, write :math:`C = [A; G_\mathcal A]` (inactive rows of ``G`` zeroed) and
:math:`y = (\nu, \lambda)`. The tangent solves the KKT system of :mod:`._kkt`

.. math::

    \begin{pmatrix} Q & C^\top \\ C & 0 \end{pmatrix}
    \begin{pmatrix} \dot x \\ \dot y \end{pmatrix} = \begin{pmatrix} a_1 \\ a_2 \end{pmatrix},
    \quad a_1 = -(\dot Q x + \dot q + \dot A^\top \nu + \dot G_\mathcal A^\top
    \lambda_\mathcal A), \quad a_2 = -\begin{pmatrix} \dot A x - \dot b \\
    \dot G_\mathcal A x - \dot h_\mathcal A \end{pmatrix},

with :math:`\dot\lambda_i = 0` off the active set. Adding :math:`\rho C^\top` times the
second row to the first (an augmented Lagrangian: the solution is unchanged) makes the
leading block :math:`P = Q + \rho C^\top C` positive definite exactly when the KKT matrix is
invertible with a minimum there (second-order sufficiency on the null space of ``C``), even
for a semidefinite ``Q`` or an LP. Then, with :math:`P = LL^\top`, :math:`V = L^{-1}C^\top`
and the Schur complement :math:`S = V^\top V` (identity on inactive rows),

.. math::

    S \dot y = V^\top L^{-1}(a_1 + \rho C^\top a_2) - a_2, \qquad
    \dot x = L^{-\top}\bigl(L^{-1}(a_1 + \rho C^\top a_2) - V \dot y\bigr).

When the forward solver hands over its factors (:meth:`InteriorPoint.solve_and_factor`
on its dual path, ``Q`` positive definite), ``ρ = 0``: ``P = Q`` and ``V`` are the
interior point's, and the active set only masks columns of ``V`` (at n = 500 that skips
three quarters of the derivative's flops). The tangent takes one step of iterative
refinement against the KKT matrix itself, which keeps the gradient accurate to ~1e-14
relative where ``Q`` is ill-conditioned, and makes the first derivative of the tangent
independent of the factors' own (still exact: :func:`_reused_factors`).

Why not :func:`dargmin.implicit.implicit_solution`, as :func:`.kkt_solution` does: that
route builds and LU-factorizes the full ``(n + p + m)`` KKT matrix and, beside it, runs its
own condition check, two independent batched LAPACK calls. jaxlib 0.10's batched LAPACK
kernels split a batch over XLA's CPU thread pool and block a pool thread until the pieces
finish, so two of them running at once can deadlock the pool (seen on 2 cores at n = 100,
batch 128). Here every LAPACK call of the derivative (``chol(P)``, ``chol(S)``, the two
shifted factorizations of the LICQ certificate, then the KKT check's SVD when it is
needed, then the tangents' triangular solves with ``L`` and ``chol(S)``) depends on the
one before: a single chain, never two at once, in forward and in reverse mode (see
:func:`_kkt_solve`). The factors are computed once per call and serve every tangent
(``jax.jacfwd`` columns, the batch). No inverse is formed: at n = 500, batch 8, ``L⁻¹``
and ``chol(S)⁻¹`` had cost 56 ms, the triangular solves of one reverse pass cost ~10.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np

from dargmin.constrained._interior_point import _cho_solve
from dargmin.constrained._measure import _Pieces, duals_and_mask
from dargmin.constrained._qp_types import QPFactors
from dargmin.constrained._settings import KKTSettings
from dargmin.constrained._verdict import kkt_report
from dargmin.errors import DargminError, SingularSystemError
from dargmin.verdict import refuse_or_warn


class _Factors(NamedTuple):
    """The factors of the augmented KKT system of one QP (see the module docstring)."""

    chol: jax.Array  # L, P = Q + ρCᵀC = LLᵀ (lower; LAPACK's)
    v: jax.Array  # L⁻¹[A; G]ᵀ, (n, p + m); V = L⁻¹Cᵀ is its active columns
    schur_chol: jax.Array  # chol(VᵀV + diag(1 − active rows))
    a: jax.Array  # A
    g: jax.Array  # G
    rows: jax.Array  # 1 on the equalities and the active inequalities, 0 elsewhere
    rho: jax.Array
    # A certified lower bound of σ_min/σ_max of the active rows (NaN: none; see
    # _certify_licq). The KKT check skips its SVD where it certifies full rank
    # (licq_measure); a loose bound only costs that SVD.
    licq: jax.Array

    # C = [A; mask·G] acts through its parts and masks on vectors: forming it (or V's
    # masked columns) wrote an (p + m) × n batch out, 2.6 ms each at n = 100, batch 128.
    def c_times(self, x: jax.Array) -> jax.Array:
        """``C x``."""
        return self.rows * jnp.concatenate([self.a @ x, self.g @ x])

    def ct_times(self, y: jax.Array) -> jax.Array:
        """``Cᵀ y``."""
        p = self.a.shape[0]
        y = self.rows * y
        return self.a.T @ y[:p] + self.g.T @ y[p:]

    @property
    def c(self) -> jax.Array:
        """``C`` itself (for tests and reports)."""
        return self.rows[:, None] * jnp.concatenate([self.a, self.g], axis=0)


def qp_duals_and_mask(
    settings: KKTSettings, x: jax.Array, nu: jax.Array, lam: jax.Array, args: tuple
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(ν, λ, mask)`` as :func:`.duals_and_mask` decides them, from the QP's data (its
    Jacobians are ``A`` and ``G``: no autodiff needed)."""
    tolerances = settings.check.tolerances(x.dtype)
    return duals_and_mask(_qp_pieces(x, args), nu, lam, tolerances, settings.degenerate)


def _qp_pieces(x: jax.Array, args: tuple) -> _Pieces:
    """The values and Jacobians the KKT check needs, from the QP's data (its constraint
    Jacobians are ``A`` and ``G``: no autodiff)."""
    Q, q, A, b, G, h = args
    # ½(Q + Qᵀ)x as two products: forming Qᵀ copies the n × n matrix through a transpose
    # (~7 ms at n = 100, batch 128, one thread), the products read it in place.
    grad_f = 0.5 * (Q @ x + x @ Q) + q
    return _Pieces(grad_f, A @ x - b, G @ x - h, A, G, x)


def _certify_licq(
    p_matrix: jax.Array,
    chol: jax.Array,
    schur: jax.Array,
    schur_chol: jax.Array,
    rows: jax.Array,
    c_norm: jax.Array,
) -> jax.Array:
    r"""A lower bound of ``σ_min/σ_max`` of the active rows ``C`` (NaN where none is
    certified), from two Cholesky factorizations with a shift, no inverse.

    For a unit ``y`` on the active rows, ``yᵀSy = ‖L⁻¹Cᵀy‖² ≤ ‖Cᵀy‖² / λ_min(P)``, so
    ``σ_min(C)² ≥ λ_min(P) λ_min(S_A)`` and ``σ_max(C) ≤ ‖C‖_F``. Lower bounds of the two
    eigenvalues: if the Cholesky factorization of ``A − τI`` runs to completion with the
    computed factor ``R``, then ``RRᵀ = A − τI + E`` with ``‖E‖₂ ≤ γ_{k+2}‖R‖_F²``
    (Demmel's backward error, the shift's rounding included; Higham, *Accuracy and
    Stability of Numerical Algorithms*, Thm. 10.3), so ``λ_min(A) ≥ τ − γ_{k+2}‖R‖_F²``.
    The shifts are fractions of the smallest squared pivots (which bound ``λ_min`` from
    above): ``10⁻⁴`` for ``P``, ``10⁻²`` for ``S`` (on qpth's random QPs, n = 10 to 500,
    the squared pivots were 2-460 times ``λ_min(Q)`` and 1.3-7 times ``λ_min(S)``); where
    a shifted factorization fails, the SVD decides. ``S`` is computed from rounded
    factors: its rounding error, taken as ``10⁴ (p + m) eps tr(S)``, is subtracted too (a
    duplicated active row leaves the computed ``λ_min(S)`` near ``1e-16``, which must not
    certify anything).

    Why not the inverses (``σ_min(C) ≥ 1/(‖L⁻¹‖_F ‖chol(S)⁻¹‖_F)``, as before): forming
    ``L⁻¹`` was the largest cost of the derivative (39 of ~95 ms at n = 500, batch 8);
    the shifted ``P`` costs a quarter of that, and the tangents need no inverse."""
    dtype = chol.dtype
    eps = float(jnp.finfo(dtype).eps)

    def shifted_bound(
        matrix: jax.Array, fraction: float, smallest: jax.Array, shift_rows: jax.Array
    ) -> jax.Array:
        k = matrix.shape[0]
        tau = fraction * smallest
        diagonal = jnp.diag(matrix) - tau * shift_rows
        # The transpose first (symmetric: LAPACK's column-major layout, no transposing
        # copy), then the shift.
        shifted = jax.lax.linalg.cholesky(
            matrix.T - jnp.diag(tau * shift_rows), symmetrize_input=False
        )
        gamma = (k + 2) * eps / (1.0 - (k + 2) * eps)
        # ‖R‖_F² = tr(RRᵀ) ≤ tr(A − τI)/(1 − kγ) (A's diagonal; no pass over R).
        frobenius_sq = jnp.sum(diagonal) / (1.0 - k * gamma)
        failed = ~jnp.isfinite(jnp.sum(jnp.diag(shifted)))  # a failure is all NaN
        return jnp.where(failed, jnp.nan, tau - gamma * frobenius_sq)

    if schur.shape[0]:
        # After chol(S) (a data dependency): every LAPACK call of the derivative in one
        # chain (see the module docstring).
        p_matrix = p_matrix + 0.0 * schur_chol[0, 0]
    ones = jnp.ones((p_matrix.shape[0],), dtype)
    smallest_p = jnp.min(jnp.abs(jnp.diag(chol)), initial=jnp.inf) ** 2
    lam_p = shifted_bound(p_matrix, 1e-4, smallest_p, ones)
    # Each LAPACK call after the one before (see the module docstring).
    schur = schur + 0.0 * lam_p
    active = rows > 0
    pivots_s = jnp.abs(jnp.diag(schur_chol))
    smallest_s = jnp.min(jnp.where(active, pivots_s, jnp.inf), initial=jnp.inf) ** 2
    if not schur.shape[0]:
        lam_s = jnp.ones((), dtype)
    else:
        rounding = 1e4 * schur.shape[0] * eps * jnp.sum(jnp.diag(schur))  # tr(S)
        lam_s = shifted_bound(schur, 1e-2, smallest_s, rows) - rounding
    certified = (lam_p > 0) & (lam_s > 0)  # False for NaN
    bound = jnp.sqrt(jnp.maximum(lam_p * lam_s, 0.0)) / jnp.where(c_norm > 0, c_norm, 1.0)
    return jnp.where(certified, bound, jnp.nan)


def _factorize(mask: jax.Array, args: tuple, reuse: QPFactors | None = None) -> _Factors:
    """The factors of the active-set KKT matrix: from the forward solve's ``reuse`` where
    it hands over usable ones (``ρ = 0``: ``P = Q``, whose factor and ``V`` it has), else
    computed (:func:`_factorize_augmented`)."""
    if reuse is None:
        return _factorize_augmented(mask, args)
    return jax.lax.cond(
        eqxi.unvmap_all(reuse.usable),
        functools.partial(_factorize_reused, reuse=reuse),
        _factorize_augmented,
        mask,
        args,
    )


def _factorize_reused(mask: jax.Array, args: tuple, reuse: QPFactors) -> _Factors:
    """The factors with ``ρ = 0`` from the forward solve's ``Q = LLᵀ``, ``V = L⁻¹[A; G]ᵀ``
    and ``VᵀV``: the active set only masks the columns of ``V`` and the rows and columns
    of ``VᵀV``. At n = 500 this skips ``CᵀC``, ``L⁻¹Cᵀ``, ``VᵀV`` and the factorization
    of ``P``, about 480 of the derivative's 640 MFlop."""
    Q, _, A, _, G, _ = args
    dtype = Q.dtype
    chol, v_all, gram = _reused_factors(Q, A, G, reuse.chol, reuse.v, reuse.gram)
    rows = jnp.concatenate([jnp.ones((A.shape[0],), dtype), mask])
    schur = gram * rows[:, None] * rows + jnp.diag(1.0 - rows)
    schur_chol = jax.lax.linalg.cholesky(schur.T, symmetrize_input=False)
    # P = ½(Q + Qᵀ) for the certificate, formed by the copy its factorization needs
    # anyway (as fast as a plain copy to LAPACK's layout: both read Q through a transpose).
    p_matrix = 0.5 * (Q + Q.T)
    c_norm = jnp.sqrt(jnp.sum(A * A) + jnp.sum(mask * jnp.sum(G * G, axis=1)))  # ‖C‖_F
    licq = _certify_licq(p_matrix, chol, schur, schur_chol, rows, c_norm)
    return _Factors(chol, v_all, schur_chol, A, G, rows, jnp.zeros((), dtype), licq)


@jax.custom_jvp
def _reused_factors(
    Q: jax.Array, A: jax.Array, G: jax.Array, chol: jax.Array, v: jax.Array, gram: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(chol, v, gram)`` as given, equal to :func:`_fresh_factors` of ``(Q, A, G)``; its
    derivative is theirs, so that a second derivative (which differentiates the factors)
    sees them move with the data."""
    return chol, v, gram


@_reused_factors.defjvp
def _reused_factors_jvp(primals: tuple, tangents: tuple) -> tuple:
    return jax.jvp(_fresh_factors, primals[:3], tangents[:3])


def _fresh_factors(
    Q: jax.Array, A: jax.Array, G: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``Q = LLᵀ`` (of ``½(Q + Qᵀ)``), ``V = L⁻¹[A; G]ᵀ`` and ``VᵀV``, as the interior
    point's dual path computes them."""
    chol = jnp.linalg.cholesky(0.5 * (Q + Q.T))
    c = jnp.concatenate([A, G], axis=0)
    v = jax.lax.linalg.triangular_solve(chol, c.T, left_side=True, lower=True)
    return chol, v, v.T @ v


def _factorize_augmented(mask: jax.Array, args: tuple) -> _Factors:
    """The factors with ``ρ > 0`` (``P = Q + ρCᵀC``; any convex ``Q``)."""
    Q, _, A, _, G, _ = args
    dtype = Q.dtype
    Qs = 0.5 * (Q + Q.T)
    c = jnp.concatenate([A, mask[:, None] * G], axis=0)
    rows = jnp.concatenate([jnp.ones((A.shape[0],), dtype), mask])
    # ρ brings CᵀC to Q's scale (an LP, Q = 0, takes CᵀC's own).
    c_scale = jnp.max(jnp.sum(c * c, axis=1), initial=0.0)
    c_scale = jnp.where(c_scale > 0, c_scale, 1.0)
    q_scale = jnp.max(jnp.abs(jnp.diag(Qs)), initial=0.0)
    rho = jnp.where(q_scale > 0, q_scale, c_scale) / c_scale
    # P is symmetric by construction: its transpose is LAPACK's layout, and no second
    # symmetrizing pass (jnp.linalg.cholesky's) is needed.
    p_matrix = Qs + rho * (c.T @ c)
    chol = jax.lax.linalg.cholesky(p_matrix.T, symmetrize_input=False)
    v = jax.lax.linalg.triangular_solve(chol, c.T, left_side=True, lower=True)
    schur = v.T @ v + jnp.diag(1.0 - rows)
    schur_chol = jax.lax.linalg.cholesky(schur.T, symmetrize_input=False)
    licq = _certify_licq(p_matrix, chol, schur, schur_chol, rows, jnp.linalg.norm(c))
    return _Factors(chol, v, schur_chol, A, G, rows, rho, licq)


def _pivot_ratio(factors: _Factors) -> jax.Array:
    """``min over both factors of (smallest/largest Cholesky pivot)²``: an estimate, from
    below, of the inverse condition number (NaN where a factorization failed)."""

    def ratio(chol: jax.Array) -> jax.Array:
        d = jnp.abs(jnp.diag(chol))
        if not d.size:
            return jnp.ones((), chol.dtype)
        return (jnp.min(d) / jnp.maximum(jnp.max(d), 1e-300)) ** 2

    return jnp.minimum(ratio(factors.chol), ratio(factors.schur_chol))


def _judge_factors(ratio: np.ndarray, *, limit: float, mode: str, kind: str, dtype) -> np.ndarray:
    """Host side: refuse (or warn about) the members whose KKT factorization failed."""
    ratio = np.asarray(ratio, dtype=float)
    failing: list[tuple[int, list[tuple[type[DargminError], str, str]]]] = []
    for i, r in enumerate(ratio.ravel()):
        if not (np.isfinite(r) and r >= limit):
            shown = "failed (not positive definite)" if not np.isfinite(r) else f"{r:.3g}"
            failing.append(
                (
                    i,
                    [
                        (
                            SingularSystemError,
                            "singular",
                            "the KKT matrix of the active set is singular or nearly so: the "
                            "Cholesky factorization of Q + ρCᵀC and of its Schur complement "
                            f"(C the equalities and active inequalities) gives a squared "
                            f"pivot ratio of {shown}, below 1/max_condition = {limit:.1g}. Q "
                            "is not positive definite on the null space of the active "
                            "constraints (second-order sufficiency fails), so the solution "
                            "is not a locally unique function of the data.",
                        )
                    ],
                )
            )
    return refuse_or_warn(failing, np.zeros(ratio.shape, dtype=dtype), kind=kind, mode=mode)


def _checked(factors: _Factors, settings: KKTSettings, after: jax.Array) -> _Factors:
    """The factors, after a host-side refusal when some batch member's are unusable (only
    then is the host called). A failed factorization is reported in every check mode.
    ``after`` (a zero scalar, the KKT check's verdict) goes first: the KKT refusal names
    the cause (an LICQ failure, say) before this one's generic singular matrix."""
    dtype = factors.chol.dtype
    _, max_condition = settings.check.core.tolerances(dtype)
    # The verdict is a constant of the data (a second derivative must not differentiate
    # the host callback).
    ratio = jax.lax.stop_gradient(_pivot_ratio(factors))
    after = jax.lax.stop_gradient(after)
    limit = 1.0 / max_condition
    suspicious = ~(jnp.isfinite(ratio) & (ratio >= limit))
    if settings.check.mode == "ignore":
        suspicious = ~jnp.isfinite(ratio)
    mode = "raise" if settings.check.mode == "ignore" else settings.check.mode
    host = functools.partial(
        _judge_factors, limit=limit, mode=mode, kind=settings.kind, dtype=np.dtype(dtype)
    )

    def call_host(r: jax.Array) -> jax.Array:
        return jax.pure_callback(
            host, jax.ShapeDtypeStruct((), dtype), r, vmap_method="expand_dims"
        )

    verified = jax.lax.cond(
        eqxi.unvmap_any(suspicious), call_host, lambda r: jnp.zeros((), dtype), ratio + after
    )
    # The tangents depend on the verdict (and so come after it): _kkt_solve scales its
    # input and its output by rho's companion `one` (see there).
    return factors._replace(rho=factors.rho + verified)


def _kkt_solve(factors: _Factors, a1: jax.Array, a2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(ẋ, ẏ)`` of the active-set KKT system for the right-hand side ``(a1, a2)``, from
    the factors: triangular solves with ``L`` and ``chol(S)``, products with ``V``.

    The input and the output are scaled by ``one = 1 + 0·verdict`` (through ``rho``,
    which :func:`_checked` makes depend on the verdict): a linear map, so that both this
    solve and its transpose in reverse mode start their LAPACK calls after the KKT
    check's (two batched LAPACK calls running at once can deadlock XLA's CPU pool, see
    the module docstring)."""
    chol, v, schur_chol, rows, rho = (
        factors.chol,
        factors.v,
        factors.schur_chol,
        factors.rows,
        factors.rho,
    )
    one = 1.0 + 0.0 * rho
    rhs = one * (a1 + rho * factors.ct_times(a2))
    u = jax.lax.linalg.triangular_solve(chol, rhs[:, None], left_side=True, lower=True)[:, 0]
    y_dot = _cho_solve(schur_chol, rows * (v.T @ u) - a2)
    x_dot = jax.lax.linalg.triangular_solve(
        chol, (u - v @ (rows * y_dot))[:, None], left_side=True, lower=True, transpose_a=True
    )[:, 0]
    return one * x_dot, one * y_dot


def _tangent(
    factors: _Factors, z: tuple, mask: jax.Array, args: tuple, args_dot: tuple
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(ẋ, ν̇, λ̇)`` from the factors: linear in ``args_dot`` (so reverse mode is its
    transpose: matrix products only), with one step of iterative refinement."""
    x, nu, lam = z
    Q = args[0]
    Q_dot, q_dot, A_dot, b_dot, G_dot, h_dot = args_dot
    p = A_dot.shape[0]
    active_lam = mask * lam
    # ½(Q̇ + Q̇ᵀ)x as two products (no transposed copy of Q̇, nor of its cotangent).
    a1 = -(0.5 * (Q_dot @ x + x @ Q_dot) + q_dot + A_dot.T @ nu + G_dot.T @ active_lam)
    a2 = -jnp.concatenate([A_dot @ x - b_dot, mask * (G_dot @ x - h_dot)])
    x_dot, y_dot = _kkt_solve(factors, a1, a2)
    # One refinement step against the KKT matrix itself. With the forward solve's factors
    # (ρ = 0) the solve goes through Q⁻¹, whose condition number (up to ~1e7 in qpth's
    # random QPs, Q = LLᵀ + 1e-3·I) cost two to three digits: relative gradient errors of
    # 5e-12 at n = 100 and 9e-12 at n = 500, 1e-14 after this step.
    r1 = a1 - 0.5 * (Q @ x_dot + x_dot @ Q) - factors.ct_times(y_dot)
    # The system's rows of the inactive constraints read -λ̇ᵢ = a2ᵢ (= 0).
    r2 = (
        a2
        - factors.c_times(x_dot)
        + jnp.concatenate([jnp.zeros((p,), Q.dtype), (1.0 - mask) * y_dot[p:]])
    )
    dx, dy = _kkt_solve(factors, r1, r2)
    x_dot, y_dot = x_dot + dx, y_dot + dy
    return x_dot, y_dot[:p], y_dot[p:]


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def qp_kkt_solution(
    settings: KKTSettings,
    z: tuple,
    mask: jax.Array,
    args: tuple,
    reuse: QPFactors | None = None,
) -> tuple:
    """``z = (x, ν, λ)`` of the QP ``args = (Q, q, A, b, G, h)``, with its KKT derivative
    on the active set ``mask`` (see the module docstring), after the KKT check; ``reuse``:
    the forward solver's factors, if it hands any over (:func:`_factorize`)."""
    return z


@qp_kkt_solution.defjvp
def _qp_kkt_solution_jvp(settings: KKTSettings, primals: tuple, tangents: tuple) -> tuple:
    z, mask, args, reuse = primals
    args_dot = tangents[2]
    frozen = jax.lax.stop_gradient
    # The factors first: the KKT check takes its LICQ bound from them (and skips its
    # SVD when the bound certifies full rank). Every LAPACK call stays in one chain: the
    # check's SVD, when it runs, depends on the bound, and the verdicts on the check.
    factors = _factorize(frozen(mask), args, frozen(reuse))
    after = jnp.zeros((), args[0].dtype)
    if settings.check.mode != "ignore":
        from dargmin.constrained._qp import QP_PROBLEM  # the QP's parts, for the check

        after = kkt_report(
            QP_PROBLEM.parts,
            frozen(z),
            frozen(mask),
            frozen(args),
            settings,
            recovered=False,
            pieces=_qp_pieces(frozen(z[0]), frozen(args)),
            licq_bound=frozen(factors.licq),
        )
    factors = _checked(factors, settings, after)
    # Re-entry: the primal output is this rule's own function, so that a second
    # derivative sees z move with the data (the active set frozen).
    z_out = qp_kkt_solution(settings, z, mask, args, reuse)
    return z_out, _tangent(factors, z_out, mask, args, args_dot)
