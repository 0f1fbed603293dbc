r"""Device-side measurements of a KKT point (traceable, batched under ``vmap``).

At ``z = (x, ν, λ)`` with active set :math:`\mathcal A`: the constraint violations, the
Lagrangian gradient :math:`\|\nabla f + J_h^\top \nu + J_g^\top \lambda\|`, the smallest
multiplier, the complementarity failures (:math:`\lambda_i` and :math:`-g_i` both non-zero),
the weakly active constraints (both ≈ 0), and the numerical rank of the active rows
:math:`[J_h; J_{g_\mathcal A}]` (LICQ). Also the active mask itself and the least-squares
recovery of missing multipliers. The host-side verdict on these numbers is in
:mod:`._verdict`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox.internal as eqxi
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from dargmin.constrained._settings import Degenerate

PyTree = Any


class _Pieces(NamedTuple):
    grad_f: jax.Array  # ∇f (flat)
    h: jax.Array
    g: jax.Array
    jac_h: jax.Array  # (m_eq, n)
    jac_g: jax.Array  # (m_in, n)
    x_flat: jax.Array


def _pieces(parts: Callable[..., tuple], x: PyTree, args: tuple) -> _Pieces:
    x_flat, unravel = ravel_pytree(x)

    def flat_parts(xf: jax.Array) -> tuple:
        return parts(unravel(xf), *args)

    _, h, g = flat_parts(x_flat)
    grad_f = jax.grad(lambda xf: flat_parts(xf)[0])(x_flat)
    jac_h = jax.jacrev(lambda xf: flat_parts(xf)[1])(x_flat).reshape(h.size, x_flat.size)
    jac_g = jax.jacrev(lambda xf: flat_parts(xf)[2])(x_flat).reshape(g.size, x_flat.size)
    return _Pieces(grad_f, h, g, jac_h, jac_g, x_flat)


def _scales(p: _Pieces, lam: jax.Array) -> tuple[jax.Array, jax.Array]:
    x_scale = jnp.maximum(1.0, jnp.max(jnp.abs(p.x_flat), initial=0.0))
    lam_scale = jnp.maximum(1.0, jnp.max(jnp.abs(lam), initial=0.0))
    return x_scale, lam_scale


def active_mask(
    g: jax.Array,
    lam: jax.Array,
    x_scale: jax.Array,
    lam_scale: jax.Array,
    degeneracy_tol: float,
    degenerate: Degenerate,
) -> jax.Array:
    """1.0 where an inequality is treated as active, 0.0 elsewhere (float, for the KKT
    residual). A constraint is active when its relative multiplier exceeds its relative
    slack (the non-zero one of a complementary pair); a weakly active one (both below
    ``degeneracy_tol``) follows ``degenerate`` (``"raise"`` keeps the comparison: the
    check refuses it anyway)."""
    a = lam / lam_scale
    s = -g / x_scale
    weak = jnp.maximum(a, s) <= degeneracy_tol
    active = a > s
    if degenerate == "active":
        active = active | weak
    elif degenerate == "inactive":
        active = active & ~weak
    return active.astype(g.dtype)


def _recover_duals(p: _Pieces, active_tol: float) -> tuple[jax.Array, jax.Array]:
    """Least-squares multipliers on the active constraints: ``min ‖∇f + J_Aᵀ y‖``.

    Inequalities with slack below ``active_tol · max(1, ‖x‖∞)`` count as active; the
    others get a zero multiplier (their columns are zeroed, and the minimum-norm solution
    of ``lstsq`` gives them zero)."""
    x_scale = jnp.maximum(1.0, jnp.max(jnp.abs(p.x_flat), initial=0.0))
    near = (-p.g <= active_tol * x_scale).astype(p.g.dtype)
    jac = jnp.concatenate([p.jac_h, near[:, None] * p.jac_g], axis=0)
    if jac.shape[0] == 0:
        return p.h[:0], p.g[:0]
    y = jnp.linalg.lstsq(jac.T, -p.grad_f)[0]
    return y[: p.h.size], near * y[p.h.size :]


def duals_and_mask(
    p: _Pieces,
    nu: jax.Array | None,
    lam: jax.Array | None,
    tolerances: dict[str, float],
    degenerate: Degenerate,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(ν, λ, mask)``: the given multipliers (the missing ones recovered by least squares
    on the constraints active at ``x``, see :func:`_recover_duals`) and the active mask."""
    if nu is None or lam is None:
        nu_fit, lam_fit = _recover_duals(p, tolerances["feasibility"])
        nu = nu_fit if nu is None else nu
        lam = lam_fit if lam is None else lam
    dtype = p.x_flat.dtype
    nu, lam = jnp.asarray(nu, dtype), jnp.asarray(lam, dtype)
    x_scale, lam_scale = _scales(p, lam)
    mask = active_mask(p.g, lam, x_scale, lam_scale, tolerances["degeneracy"], degenerate)
    return nu, lam, mask


#: The per-member numbers the host judges, in the order they are passed.
_FIELDS = (
    "eq_violation",
    "ineq_violation",
    "ineq_violation_index",
    "x_scale",
    "stationarity",
    "grad_scale",
    "min_multiplier",
    "min_multiplier_index",
    "lam_scale",
    "n_complementarity",
    "complementarity_index",
    "complementarity_multiplier",
    "complementarity_slack",
    "n_degenerate",
    "degenerate_index",
    "degenerate_multiplier",
    "degenerate_slack",
    "n_active_eq",
    "n_active_ineq",
    "rank",
    "sigma_ratio",
)


def licq_measure(
    p: _Pieces, mask: jax.Array, rank_tol: float, bound: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """``(numerical rank, σ_min/σ_max)`` of the active rows ``[J_h; J_{g_A}]`` (LICQ),
    by an SVD; inactive rows are zeroed and contribute zero singular values, not counted
    as active.

    With ``bound`` (a lower bound of ``σ_min/σ_max`` from factors the caller has already
    computed, NaN where unknown), every member whose bound is at least ``rank_tol`` has
    full rank for certain, and when all of a batch do the SVD is skipped (it was the
    largest single cost of the QP layer's backward pass: 94 of ~300 ms at n = 100, batch
    128); the reported ratio is then the bound."""
    dtype = p.x_flat.dtype
    n_active = p.h.size + jnp.sum(mask)
    if not p.h.size + mask.size:
        return jnp.zeros((), dtype), jnp.ones((), dtype)

    def by_svd(_: Any) -> tuple[jax.Array, jax.Array]:
        # Formed here, not before the cond: XLA writes it out even when the bound skips
        # the SVD (2.7 ms at n = 100, batch 128).
        jac = jnp.concatenate([p.jac_h, mask[:, None] * p.jac_g], axis=0)
        sigma = jnp.linalg.svd(jac, compute_uv=False)
        sigma_max = jnp.max(sigma)
        rank = jnp.sum(sigma > rank_tol * sigma_max).astype(dtype)
        padded = jnp.concatenate([sigma, jnp.zeros((jac.shape[0],), dtype)])
        last = jnp.clip(n_active.astype(jnp.int32) - 1, 0, padded.size - 1)
        ratio = jnp.where(
            n_active > 0, padded[last] / jnp.where(sigma_max > 0, sigma_max, 1.0), 1.0
        )
        return rank, ratio.astype(dtype)

    if bound is None:
        return by_svd(None)
    certified = bound >= rank_tol  # False for NaN
    return jax.lax.cond(
        eqxi.unvmap_all(certified),
        lambda b: (n_active.astype(dtype), jnp.minimum(b, 1.0).astype(dtype)),
        by_svd,
        bound,
    )


def kkt_measure(
    parts: Callable[..., tuple],
    z: tuple[PyTree, jax.Array, jax.Array],
    mask: jax.Array,
    args: tuple,
    tolerances: dict[str, float],
    *,
    pieces: _Pieces | None = None,
    licq_bound: jax.Array | None = None,
) -> tuple[jax.Array, ...]:
    """The numbers of the KKT check at ``z = (x, ν, λ)`` with active set ``mask``
    (traceable; scalars, batched under ``vmap``), in the order of ``_FIELDS``.

    ``pieces`` (the values and Jacobians at ``x``) replaces their autodiff from ``parts``
    when the caller has them. ``licq_bound`` is a certified lower bound of
    ``σ_min/σ_max`` of the active rows (see :func:`licq_measure`): the SVD runs only when
    some batch member's bound does not clear the rank tolerance."""
    x, nu, lam = z
    p = _pieces(parts, x, args) if pieces is None else pieces
    dtype = p.x_flat.dtype
    x_scale, lam_scale = _scales(p, lam)
    zero = jnp.zeros((), dtype)
    eq_violation = jnp.max(jnp.abs(p.h), initial=0.0)
    if p.g.size:
        ineq_index = jnp.argmax(p.g)
        ineq_violation = jnp.maximum(p.g[ineq_index], 0.0)
    else:
        ineq_index, ineq_violation = jnp.zeros((), jnp.int32), zero
    lagrangian = p.grad_f + p.jac_h.T @ nu + p.jac_g.T @ lam
    stationarity = jnp.linalg.norm(lagrangian)
    grad_scale = jnp.maximum(1.0, jnp.linalg.norm(p.grad_f))
    a = lam / lam_scale
    s = -p.g / x_scale
    feasibility = tolerances["feasibility"]
    comp = (jnp.minimum(a, s) > feasibility) & (a > 0) & (s > 0)
    weak = jnp.maximum(a, s) <= tolerances["degeneracy"]

    def first(flags: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        if not flags.size:
            return zero, jnp.zeros((), jnp.int32), zero, zero
        index = jnp.argmax(flags)
        return jnp.sum(flags).astype(dtype), index, lam[index], -p.g[index]

    n_comp, comp_index, comp_lam, comp_slack = first(comp)
    n_weak, weak_index, weak_lam, weak_slack = first(weak)
    if lam.size:
        min_index = jnp.argmin(lam)
        min_multiplier = lam[min_index]
    else:
        min_index, min_multiplier = jnp.zeros((), jnp.int32), zero
    rank, sigma_ratio = licq_measure(p, mask, tolerances["rank"], licq_bound)
    values = (
        eq_violation,
        ineq_violation,
        ineq_index,
        x_scale,
        stationarity,
        grad_scale,
        min_multiplier,
        min_index,
        lam_scale,
        n_comp,
        comp_index,
        comp_lam,
        comp_slack,
        n_weak,
        weak_index,
        weak_lam,
        weak_slack,
        jnp.asarray(p.h.size, dtype),
        jnp.sum(mask),
        rank,
        sigma_ratio,
    )
    return tuple(jnp.asarray(v, dtype) for v in values)
