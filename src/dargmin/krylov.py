r"""Krylov solvers for symmetric systems, written on lineax's solver interface.

Two solvers for :math:`Ax = b` with a real symmetric operator :math:`A`:

* :class:`ConjugateGradient` — conjugate gradients for symmetric positive-definite
  :math:`A`, which also *certifies* indefiniteness: it records the smallest Rayleigh
  quotient :math:`p_k^\top A p_k / p_k^\top p_k` of its search directions, and a negative
  value proves that :math:`A` is not positive semidefinite.
* :class:`MINRES` — Paige–Saunders MINRES for symmetric, possibly indefinite, nonsingular
  :math:`A` (saddle-point / KKT systems).

Why hand-written rather than lineax's own solvers:

1. lineax ships no MINRES, and symmetric indefinite systems (e.g. the KKT systems of
   constrained problems) need one: CG is invalid on them and GMRES ignores the symmetry
   (its cost and memory grow with the iteration count).
2. lineax's CG stops on an element-wise scaled criterion
   :math:`\max_i |r_i| / (\mathrm{atol} + \mathrm{rtol}\,|b_i|) \le 1`, which stalls when
   the right-hand side is sparse (entries with :math:`b_i = 0` demand
   :math:`|r_i| \le \mathrm{atol}`). Both solvers here stop on the textbook 2-norm test

   .. math:: \|r_k\|_2 \le \max(\mathrm{rtol}\,\|b\|_2,\ \mathrm{atol}).

3. lineax's CG does not report negative curvature, which dargmin needs to certify that a
   Hessian is not positive definite (``dargmin.argmin`` must refuse a saddle point).

Both are :class:`lineax.AbstractLinearSolver` subclasses, so ``lineax.linear_solve`` with
them is differentiable (forward and reverse mode, in the vector and in the operator),
``jax.jit``-able and ``jax.vmap``-able. Both work on the flattened (raveled) vector, so
pytree-valued operators (e.g. :class:`lineax.FunctionLinearOperator`) are supported. Real
dtypes only.

Failures map onto :class:`lineax.RESULTS` as follows:

==========================  ===============================================================
``successful``              the 2-norm test holds (including :math:`b = 0`, solution 0)
``max_steps_reached``       ``max_steps`` iterations without meeting the test
``breakdown``               CG only: a search direction with :math:`p^\top A p \le 0`
                            (negative or zero curvature: :math:`A` is not positive definite)
``singular``                a non-finite (NaN/inf) residual or iterate; lineax turns it
                            into ``nonfinite_input`` when the right-hand side is non-finite
==========================  ===============================================================

With ``lineax.linear_solve(..., throw=True)`` (the default) any of these failures raises;
pass ``throw=False`` and read ``solution.result`` / ``solution.stats`` to act on them.

Under ``jax.vmap`` (batched right-hand sides, e.g. ``jax.jacrev`` of a solve) the
iteration is one ``lax.while_loop`` whose batched predicate keeps it running until every
member has stopped; members that stopped earlier are frozen (JAX selects their old state),
so each member's solution, result and statistics are those of its own solve, up to the
rounding of batched matrix products. The cost is that of the slowest member for all.
Neither solver takes options (no preconditioner, no initial guess ``y0``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import lineax as lx
from jax.flatten_util import ravel_pytree

from dargmin.typing import FlatMatvec, PyTree, Vector

__all__ = ["MINRES", "ConjugateGradient"]


def _check_tolerances(solver: _SymmetricKrylov) -> None:
    for name in ("rtol", "atol"):
        value = getattr(solver, name)
        if isinstance(value, int | float) and value < 0:
            raise ValueError(f"{type(solver).__name__}: {name} must be non-negative, got {value}.")
    if isinstance(solver.max_steps, int) and solver.max_steps < 0:
        raise ValueError(
            f"{type(solver).__name__}: max_steps must be non-negative, got {solver.max_steps}."
        )


def _check_operator(
    operator: lx.AbstractLinearOperator, name: str, options: dict[str, Any]
) -> None:
    """Square, real, symmetric-tagged operator and no options (none are supported)."""
    if options:
        raise ValueError(
            f"{name} accepts no options (no preconditioner, no y0); got {sorted(options)}."
        )
    in_leaves, in_def = jax.tree_util.tree_flatten(operator.in_structure())
    out_leaves, out_def = jax.tree_util.tree_flatten(operator.out_structure())
    if in_def != out_def or [(x.shape, x.dtype) for x in in_leaves] != [
        (x.shape, x.dtype) for x in out_leaves
    ]:
        raise ValueError(
            f"{name} needs a square operator whose input and output structures are equal."
        )
    if any(jnp.issubdtype(x.dtype, jnp.complexfloating) for x in in_leaves):
        raise ValueError(f"{name} supports real dtypes only.")
    if not lx.is_symmetric(operator):
        raise ValueError(
            f"{name} needs a symmetric operator: tag it with `lineax.symmetric_tag` (or "
            "`lineax.positive_semidefinite_tag`), e.g. "
            "`lineax.MatrixLinearOperator(A, lineax.symmetric_tag)`."
        )


def _max_steps(max_steps: int | None, size: int) -> int:
    return max(10 * size, 100) if max_steps is None else max_steps


def _flat_problem(
    operator: lx.AbstractLinearOperator, vector: PyTree
) -> tuple[Vector, FlatMatvec, Callable[[Vector], PyTree]]:
    """Raveled right-hand side, a flat matvec, and the map back to the pytree."""
    b, unravel = ravel_pytree(vector)

    def matvec(v: jax.Array) -> jax.Array:
        return ravel_pytree(operator.mv(unravel(v)))[0].astype(b.dtype)

    return b, matvec, unravel


class _SymmetricKrylov(lx.AbstractLinearSolver):
    """What dargmin's CG and MINRES share: tolerances, the operator check, and the
    symmetric-real transposition rules (the solver of ``Aᵀ`` is the solver of ``A``)."""

    rtol: float
    atol: float
    max_steps: int | None = None

    def __check_init__(self) -> None:
        _check_tolerances(self)

    def init(
        self, operator: lx.AbstractLinearOperator, options: dict[str, Any]
    ) -> lx.AbstractLinearOperator:
        """Check the operator (square, real, symmetric tag) and keep it, linearised."""
        _check_operator(operator, type(self).__name__, options)
        return lx.linearise(operator)

    def transpose(
        self, state: lx.AbstractLinearOperator, options: dict[str, Any]
    ) -> tuple[lx.AbstractLinearOperator, dict[str, Any]]:
        """Symmetric operator: the transposed state is the state itself."""
        return state, options

    def conj(
        self, state: lx.AbstractLinearOperator, options: dict[str, Any]
    ) -> tuple[lx.AbstractLinearOperator, dict[str, Any]]:
        """Real operator: the conjugated state is the state itself."""
        return state, options

    def assume_full_rank(self) -> bool:
        """Both target nonsingular systems."""
        return True


class ConjugateGradient(_SymmetricKrylov):
    r"""Conjugate gradients with a 2-norm stop and a negative-curvature certificate.

    Solves :math:`Ax = b` for a symmetric operator :math:`A` (positive definite for the
    iteration to be valid) from :math:`x_0 = 0`:

    .. math::

        \alpha_k = \frac{r_k^\top r_k}{p_k^\top A p_k},\quad
        x_{k+1} = x_k + \alpha_k p_k,\quad
        r_{k+1} = r_k - \alpha_k A p_k,\quad
        p_{k+1} = r_{k+1} + \frac{r_{k+1}^\top r_{k+1}}{r_k^\top r_k}\, p_k,

    with :math:`r_0 = p_0 = b`, until
    :math:`\|r_k\|_2 \le \max(\mathrm{rtol}\,\|b\|_2, \mathrm{atol})` (``successful``), or
    ``max_steps`` iterations (``max_steps_reached``), or a direction with
    :math:`p_k^\top A p_k \le 0` (``breakdown``; the iterate before that step is
    returned). The residual :math:`r_k` is the recursively updated one.

    Along the way it records the smallest Rayleigh quotient of the search directions,

    .. math:: \mu = \min_k \frac{p_k^\top A p_k}{p_k^\top p_k} \ \ge\ \lambda_{\min}(A),

    so :math:`\mu < 0` *certifies* that :math:`A` is not positive semidefinite (the
    converse does not hold: CG may converge before exploring a negative direction, e.g.
    when :math:`b` has no component on it). :math:`\mu = +\infty` when no step was taken
    (:math:`b = 0`, or ``max_steps = 0``).

    The operator must carry ``lineax.symmetric_tag`` or
    ``lineax.positive_semidefinite_tag``; the latter is not required, since the solver is
    also meant as a probe of definiteness. Unlike ``lineax.CG``, a negative-definite
    operator is not negated (it fails with ``breakdown`` at the first step): solve with
    :math:`-A` instead. Statistics (``solution.stats``):
    ``num_steps`` (matrix-vector products), ``min_curvature`` (:math:`\mu`),
    ``max_curvature`` (the largest Rayleigh quotient, a lower bound of :math:`\lambda_{max}`) and
    ``residual_norm`` (final recursive :math:`\|r_k\|_2`).

    Parameters
    ----------
    rtol, atol
        Relative and absolute tolerances of the 2-norm stopping test.
    max_steps
        Iteration cap; ``None`` means ``max(10 * size, 100)``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import lineax as lx
    >>> A = jnp.array([[4.0, 1.0], [1.0, 3.0]])
    >>> op = lx.MatrixLinearOperator(A, lx.positive_semidefinite_tag)
    >>> sol = lx.linear_solve(op, jnp.array([1.0, 2.0]), ConjugateGradient(rtol=1e-6, atol=0.0))
    >>> [round(float(v), 4) for v in sol.value]
    [0.0909, 0.6364]
    >>> int(sol.stats["num_steps"]), round(float(sol.stats["min_curvature"]), 4)
    (2, 2.5882)

    A negative Rayleigh quotient certifies an indefinite matrix (and stops the solve):

    >>> op = lx.MatrixLinearOperator(jnp.diag(jnp.array([2.0, -1.0])), lx.symmetric_tag)
    >>> sol = lx.linear_solve(op, jnp.array([1.0, 1.0]), ConjugateGradient(1e-6, 0.0),
    ...                       throw=False)
    >>> bool(sol.result == lx.RESULTS.breakdown), float(sol.stats["min_curvature"]) < 0
    (True, True)
    """

    def compute(
        self, state: lx.AbstractLinearOperator, vector: PyTree, options: dict[str, Any]
    ) -> tuple[PyTree, lx.RESULTS, dict[str, jax.Array]]:
        """Run CG on ``vector``; return ``(solution, result, stats)``."""
        del options
        b, matvec, unravel = _flat_problem(state, vector)
        dtype = b.dtype
        max_steps = _max_steps(self.max_steps, b.size)
        rr0 = jnp.dot(b, b)
        tol = jnp.maximum(self.rtol * jnp.sqrt(rr0), self.atol).astype(dtype)

        # carry: x, r, p, r·r, p·p, step, min and max curvature, curvature breakdown flag
        init = (
            jnp.zeros_like(b),
            b,
            b,
            rr0,
            rr0,
            jnp.array(0, dtype=jnp.int32),
            jnp.array(jnp.inf, dtype=dtype),
            jnp.array(0.0, dtype=dtype),
            jnp.array(False),
        )

        def cond(carry):
            _, _, _, rr, _, step, _, _, broke = carry
            rnorm = jnp.sqrt(rr)
            return (rnorm > tol) & jnp.isfinite(rnorm) & (step < max_steps) & ~broke

        # The body is kept to the textbook recurrence plus two scalar updates: at small sizes
        # each extra vector operation is a separate kernel launch per iteration, and the
        # loop's cost is those launches (p = 100: 22 fused kernels per iteration before, 19 now).
        def body(carry):
            x, r, p, rr, pp, step, min_curv, max_curv, _ = carry
            Ap = matvec(p)
            pAp = jnp.dot(p, Ap)
            # ‖p‖² by its recurrence (r_{k+1} ⟂ p_k: ‖p_{k+1}‖² = ‖r_{k+1}‖² + β²‖p_k‖²), a
            # scalar update instead of one more reduction; only the quotient's scale rests
            # on it, its sign (the certificate) is that of pᵀAp.
            curvature = pAp / pp
            broke = pAp <= 0
            # On breakdown the step is meaningless: a zero step keeps the last valid iterate
            # (the loop stops there), without selecting between old and new vectors.
            alpha = jnp.where(broke, 0, rr / jnp.where(broke, 1, pAp))
            x = x + alpha * p
            r = r - alpha * Ap
            rr_new = jnp.dot(r, r)
            beta = rr_new / rr
            return (
                x,
                r,
                r + beta * p,
                rr_new,
                rr_new + beta**2 * pp,
                step + 1,
                jnp.minimum(min_curv, curvature),
                jnp.maximum(max_curv, curvature),
                broke,
            )

        x, _, _, rr, _, steps, min_curv, max_curv, broke = jax.lax.while_loop(cond, body, init)
        rnorm = jnp.sqrt(rr)
        nonfinite = ~jnp.isfinite(rnorm) | ~jnp.all(jnp.isfinite(x))
        result = lx.RESULTS.where(rnorm <= tol, lx.RESULTS.successful, lx.RESULTS.max_steps_reached)
        result = lx.RESULTS.where(broke, lx.RESULTS.breakdown, result)
        result = lx.RESULTS.where(nonfinite, lx.RESULTS.singular, result)
        stats = {
            "num_steps": steps,
            "min_curvature": min_curv,
            "max_curvature": max_curv,
            "residual_norm": rnorm,
        }
        return unravel(x), result, stats


class MINRES(_SymmetricKrylov):
    r"""Paige–Saunders MINRES for symmetric (possibly indefinite) nonsingular systems.

    From :math:`x_0 = 0`, the Lanczos process builds an orthonormal basis
    :math:`V_k = [v_1, \dots, v_k]` of the Krylov space
    :math:`\mathcal K_k(A, b)` with :math:`v_1 = b / \beta_1`, :math:`\beta_1 = \|b\|_2`,

    .. math::

        \beta_{k+1} v_{k+1} = A v_k - \alpha_k v_k - \beta_k v_{k-1},\qquad
        A V_k = V_{k+1} \underline{T}_k,

    and :math:`x_k = V_k y_k` minimizes :math:`\|b - A x\|_2` over :math:`\mathcal K_k`,
    i.e. :math:`y_k = \arg\min_y \|\beta_1 e_1 - \underline{T}_k y\|_2`. The
    :math:`(k+1)\times k` tridiagonal :math:`\underline T_k` is reduced by Givens rotations
    :math:`Q_k` (one new rotation per step), which gives short recurrences for
    :math:`x_k` and the residual norm :math:`\|r_k\|_2 = \bar\phi_k =
    \beta_1 \prod_{j\le k} s_j` (:math:`s_j` the sines of the rotations). It stops when
    :math:`\bar\phi_k \le \max(\mathrm{rtol}\,\|b\|_2, \mathrm{atol})` (``successful``),
    after ``max_steps`` iterations (``max_steps_reached``), or on a non-finite quantity
    (``singular``; e.g. an exactly singular projected system).

    The residual norm is the recursive :math:`\bar\phi_k`; in floating point it can fall
    below the true :math:`\|b - Ax_k\|_2` once the latter reaches its attainable accuracy
    (about machine epsilon times :math:`\|A\|\,\|x\|`). Statistics (``solution.stats``):
    ``num_steps`` (matrix-vector products) and ``residual_norm`` (:math:`\bar\phi_k`).

    The operator must carry ``lineax.symmetric_tag`` (or a tag implying it, such as
    ``lineax.positive_semidefinite_tag``); a ``ValueError`` is raised otherwise.

    Parameters
    ----------
    rtol, atol
        Relative and absolute tolerances of the 2-norm stopping test.
    max_steps
        Iteration cap; ``None`` means ``max(10 * size, 100)``.

    Examples
    --------
    A symmetric indefinite (saddle-point) system, where CG is invalid:

    >>> import jax.numpy as jnp
    >>> import lineax as lx
    >>> K = jnp.array([[2.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    >>> op = lx.MatrixLinearOperator(K, lx.symmetric_tag)
    >>> sol = lx.linear_solve(op, jnp.array([1.0, 2.0, 3.0]), MINRES(rtol=1e-6, atol=0.0))
    >>> [round(float(v), 4) for v in sol.value]
    [0.6667, 2.3333, -0.3333]
    >>> int(sol.stats["num_steps"])
    3
    """

    def compute(
        self, state: lx.AbstractLinearOperator, vector: PyTree, options: dict[str, Any]
    ) -> tuple[PyTree, lx.RESULTS, dict[str, jax.Array]]:
        """Run MINRES on ``vector``; return ``(solution, result, stats)``."""
        del options
        b, matvec, unravel = _flat_problem(state, vector)
        dtype = b.dtype
        max_steps = _max_steps(self.max_steps, b.size)
        beta1 = jnp.linalg.norm(b)
        tol = jnp.maximum(self.rtol * beta1, self.atol).astype(dtype)
        zero = jnp.zeros_like(b)
        scalar = lambda value: jnp.array(value, dtype=dtype)  # noqa: E731

        # Lanczos: v_prev = v_{k-1}, v = v_k, beta = β_k.
        # Rotations: (cs, sn) = Q_{k-1}; dbar, eps = the entries Q_{k-2}, Q_{k-1} left in
        # column k of T̲ above the diagonal; phibar = ‖r_{k-1}‖. w_prev, w = w_{k-2}, w_{k-1}.
        init = {
            "x": zero,
            "v_prev": zero,
            "v": b / jnp.where(beta1 > 0, beta1, 1),
            "beta": beta1,
            "cs": scalar(-1.0),
            "sn": scalar(0.0),
            "dbar": scalar(0.0),
            "eps": scalar(0.0),
            "phibar": beta1,
            "w_prev": zero,
            "w": zero,
            "step": jnp.array(0, dtype=jnp.int32),
        }

        def cond(c):
            phibar = c["phibar"]
            return (phibar > tol) & jnp.isfinite(phibar) & (c["step"] < max_steps)

        def body(c):
            # Lanczos step
            z = matvec(c["v"]) - c["beta"] * c["v_prev"]
            alpha = jnp.dot(c["v"], z)
            z = z - alpha * c["v"]
            beta_next = jnp.linalg.norm(z)
            # β_{k+1} = 0: the Krylov space is invariant and the solve is exact this step
            v_next = z / jnp.where(beta_next > 0, beta_next, 1)
            # previous rotations applied to column k: (eps, dbar, alpha) -> (eps, delta, gbar)
            cs, sn = c["cs"], c["sn"]
            delta = cs * c["dbar"] + sn * alpha
            gbar = sn * c["dbar"] - cs * alpha
            # Q_{k-1} applied to column k+1 (entry β_{k+1} in row k)
            eps_next = sn * beta_next
            dbar_next = -cs * beta_next
            # new rotation Q_k annihilates β_{k+1} below the diagonal
            gamma = jnp.hypot(gbar, beta_next)
            cs_new = gbar / gamma
            sn_new = beta_next / gamma
            phi = cs_new * c["phibar"]
            phibar = sn_new * c["phibar"]
            w_new = (c["v"] - c["eps"] * c["w_prev"] - delta * c["w"]) / gamma
            return {
                "x": c["x"] + phi * w_new,
                "v_prev": c["v"],
                "v": v_next,
                "beta": beta_next,
                "cs": cs_new,
                "sn": sn_new,
                "dbar": dbar_next,
                "eps": eps_next,
                "phibar": phibar,
                "w_prev": c["w"],
                "w": w_new,
                "step": c["step"] + 1,
            }

        out = jax.lax.while_loop(cond, body, init)
        x, rnorm, steps = out["x"], out["phibar"], out["step"]
        nonfinite = ~jnp.isfinite(rnorm) | ~jnp.all(jnp.isfinite(x))
        result = lx.RESULTS.where(rnorm <= tol, lx.RESULTS.successful, lx.RESULTS.max_steps_reached)
        result = lx.RESULTS.where(nonfinite, lx.RESULTS.singular, result)
        stats = {"num_steps": steps, "residual_norm": rnorm}
        return unravel(x), result, stats
