r"""Differentiable Euclidean projections and proximal operators, with exact Jacobians.

Each function here is the solution map of a tiny optimization problem,

.. math::

    P_C(x) = \arg\min_{p \in C} \tfrac12\|p - x\|_2^2, \qquad
    \operatorname{prox}_h(x) = \arg\min_p \tfrac12\|p - x\|_2^2 + h(p),

computed in closed form (or by a sort, for the simplex and the ℓ1 ball) and differentiable
in ``x`` and in the set's or the penalty's parameters (radius, bounds, ``λ``). They are
meant as the non-smooth part of projected- and proximal-gradient fixed points,
``x = P_C(x - η ∇f(x, θ))`` or ``x = prox_{ηh}(x - η ∇f(x, θ))``, differentiated by
:func:`dargmin.fixed_point`.

========================================  ====================================================
function                                  set or penalty
========================================  ====================================================
:func:`projection_simplex`,               ``{p ≥ 0, Σ p = s}`` (sparsemax: the scale-1 simplex
:func:`sparsemax`                         along an axis)
:func:`projection_l1_ball`                ``{‖p‖₁ ≤ r}``
:func:`projection_box`                    ``{l ≤ p ≤ u}``
:func:`projection_l2_ball`                ``{‖p‖₂ ≤ r}``
:func:`projection_non_negative`           ``{p ≥ 0}``
:func:`projection_affine_set`             ``{A p = b}``
:func:`prox_l1`                           ``λ‖p‖₁`` (soft thresholding)
:func:`prox_group_l1`                     ``λ Σ_g ‖p_g‖₂`` (block soft thresholding)
:func:`prox_elastic_net`                  ``λ‖p‖₁ + (μ/2)‖p‖₂²``
========================================  ====================================================

**Derivatives.** Where the map is piecewise smooth, the derivative is a ``jax.custom_jvp``
rule with the Jacobian of the active piece, because JAX's own derivative is wrong or
wasteful there: ``jnp.clip`` and ``jnp.maximum`` split a tie into ``0.5``/``0.5`` (a
Jacobian entry that no piece has), ``jnp.linalg.norm`` has a NaN derivative at zero (a
group at zero, the most common case in a sparse solution, poisons the whole reverse-mode
gradient, even through ``jnp.where``), and the simplex through ``jnp.sort`` costs a sort and
a permutation per tangent where the rule costs one masked sum. Every rule is written in
differentiable JAX operations of the primal input, so Hessians (zero almost everywhere
for the polyhedral sets, non-zero for the ℓ2 ball and the group prox) are exact too.
All functions compose with ``jax.jit``, ``jax.vmap``, ``jax.grad``, ``jax.jacfwd``.

**At kinks** (a point exactly on the boundary of the set, or exactly at a threshold),
the map is not differentiable and its Jacobian is set-valued. The convention here is the
same everywhere: *a constraint that holds with equality counts as active*, a coordinate
exactly at the threshold counts as thresholded. So ``projection_box`` at ``x = u`` has
derivative 0 in ``x`` and 1 in ``u``; ``prox_l1`` at ``|x| = λ`` has derivative 0;
``projection_simplex`` leaves out a coordinate with ``x_i = τ``; ``projection_l2_ball``
at ``‖x‖ = r`` uses the derivative of the radial projection. This is the one-sided
derivative from outside the set, one element of the Clarke generalized Jacobian. At such
points the solution of a projected-gradient fixed point may itself have a kink (a weakly
active constraint): the derivative :func:`dargmin.fixed_point` returns there is then one
of the one-sided derivatives, not *the* derivative.

Examples
--------
>>> import jax, jax.numpy as jnp
>>> p = projection_simplex(jnp.array([0.5, 1.2, -0.3]))      # sparsemax
>>> [round(float(v), 2) for v in p]
[0.15, 0.85, 0.0]
>>> J = jax.jacfwd(projection_simplex)(jnp.array([0.5, 1.2, -0.3]))
>>> [[round(float(v), 2) for v in row] for row in J]          # diag(s) - s sᵀ/|S|
[[0.5, -0.5, 0.0], [-0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]
"""

from dargmin.projections._prox import prox_elastic_net, prox_group_l1, prox_l1
from dargmin.projections._sets import (
    projection_affine_set,
    projection_box,
    projection_l2_ball,
    projection_non_negative,
)
from dargmin.projections._simplex import projection_l1_ball, projection_simplex, sparsemax

__all__ = [
    "projection_affine_set",
    "projection_box",
    "projection_l1_ball",
    "projection_l2_ball",
    "projection_non_negative",
    "projection_simplex",
    "prox_elastic_net",
    "prox_group_l1",
    "prox_l1",
    "sparsemax",
]
