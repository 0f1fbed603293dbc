"""The KKT derivative: a ``jax.custom_jvp`` rule on the masked KKT residual, and the public
entry points :func:`kkt_solution` and :func:`constrained_argmin` (see :mod:`._kkt` for the
math).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import lineax as lx
from jax.flatten_util import ravel_pytree

from dargmin.constrained._measure import _pieces, duals_and_mask
from dargmin.constrained._settings import (
    ConstrainedProblem,
    Degenerate,
    KKTCheck,
    KKTSettings,
    KKTSolution,
    reraise_constrained,
)
from dargmin.constrained._verdict import kkt_report
from dargmin.diagnostics import Check, CheckMode
from dargmin.errors import DargminError
from dargmin.implicit import _WeakCallable, implicit_solution
from dargmin.linear_solvers import LinearSolver, as_linear_solver, full_float32_products

PyTree = Any


@dataclass(frozen=True, eq=False)
class _KKTFunctions:
    """The closure-converted ``parts`` of one traced call (no tracers inside), and whether
    the duals were recovered; hashed by identity (a ``nondiff_argnums`` of the rule)."""

    parts: Callable[..., tuple]
    recovered: bool

    def residual(self, z: tuple, mask: jax.Array, *args: PyTree) -> tuple:
        """``F(z, θ)`` of the module docstring (its Jacobian is the symmetric KKT matrix)."""
        x, nu, lam = z
        active_lam = mask * lam

        def lagrangian(xx: PyTree) -> jax.Array:
            f, h, g = self.parts(xx, *args)
            return f + jnp.dot(nu, h) + jnp.dot(active_lam, g)

        grad = jax.grad(lagrangian)(x)
        _, h, g = self.parts(x, *args)
        return grad, h, mask * g + (1.0 - mask) * lam


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _kkt_solution(
    fns: _KKTFunctions, settings: KKTSettings, z: tuple, mask: jax.Array, args: tuple
):
    return z


@_kkt_solution.defjvp
def _kkt_solution_jvp(fns, settings, primals, tangents):
    # The KKT check's measurements and the derivative at full float32 precision (TF32 on
    # GPUs).
    with full_float32_products():
        return _kkt_tangent(fns, settings, primals, tangents)


def _kkt_tangent(fns, settings, primals, tangents):
    z, mask, args = primals
    _, _, args_dot = tangents
    frozen = jax.lax.stop_gradient
    if settings.check.mode != "ignore":
        verified = kkt_report(
            fns.parts, frozen(z), frozen(mask), frozen(args), settings, recovered=fns.recovered
        )
        # The implicit check and solve below depend on the KKT check through x (+ 0; x
        # is never empty, unlike the mask): the KKT refusal, which names the cause, comes
        # before a generic one, and the callback is never dead code.
        x, nu, lam = z
        x = jax.tree_util.tree_map(lambda leaf: leaf + verified.astype(leaf.dtype), x)
        z = (x, nu, lam)
    config = settings.implicit_config

    def attach(params: tuple) -> tuple:
        return implicit_solution(fns.residual, z, mask, *params, config=config)

    # Re-entry: the primal comes from implicit_solution, whose own rule differentiates it,
    # so second and higher derivatives (with the active set frozen) are exact.
    return jax.jvp(attach, (args,), (args_dot,))


def _attach_kkt(
    problem_parts: Callable[..., tuple],
    settings: KKTSettings,
    x: PyTree,
    nu: jax.Array | None,
    lam: jax.Array | None,
    params: tuple,
) -> KKTSolution:
    # Hoist arrays the problem's functions close over (tracers of an outer transformation)
    # into explicit arguments, so they are differentiated like params.
    # At full float32 precision (TF32 on GPUs): the converted functions keep the
    # precision of their products from this trace, and the recovered duals and the active
    # set come from full-precision Jacobians.
    with full_float32_products():
        parts, hoisted = jax.closure_convert(problem_parts, x, *params)
        args = (*params, *hoisted)
        frozen = jax.lax.stop_gradient
        tolerances = settings.check.tolerances(ravel_pytree(x)[0].dtype)
        recovered = nu is None or lam is None
        # Under jit the Jacobians are dead code when the duals are given (only g is used).
        pieces = frozen(_pieces(parts, x, args))
        nu, lam, mask = duals_and_mask(
            pieces, frozen(nu), frozen(lam), tolerances, settings.degenerate
        )
    fns = _KKTFunctions(parts, recovered)
    x_out, nu_out, lam_out = _kkt_solution(fns, settings, (x, nu, lam), mask, args)
    return KKTSolution(x_out, nu_out, lam_out)


# One compiled attachment per live problem (released with it), as in dargmin.implicit.
_RULES: weakref.WeakKeyDictionary[ConstrainedProblem, Callable[..., KKTSolution]] = (
    weakref.WeakKeyDictionary()
)


def kkt_solution(
    problem: ConstrainedProblem,
    x: PyTree,
    *params: PyTree,
    eq_dual: jax.Array | None = None,
    ineq_dual: jax.Array | None = None,
    settings: KKTSettings | None = None,
) -> KKTSolution:
    """Attach KKT derivatives to a solution ``x`` (and optionally its duals) of ``problem``.

    The returned :class:`KKTSolution` equals ``(x, ν, λ)`` (duals recovered by least
    squares on the active constraints when not given); its derivatives with respect to
    ``params`` (and arrays the problem's functions close over) are those of the KKT system
    on the active set. Derivatives flowing through ``x`` and the duals are discarded.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> problem = ConstrainedProblem(lambda x, c: 0.5 * jnp.sum((x - c) ** 2),
    ...                              eq=lambda x, c: jnp.sum(x, keepdims=True) - 1.0)
    >>> c = jnp.array([0.3, 0.1, 0.2])          # projection onto the plane Σx = 1
    >>> proj = lambda c: c - (jnp.sum(c) - 1.0) / 3
    >>> sol = kkt_solution(problem, proj(c), c)
    >>> jnp.allclose(jax.jacobian(lambda c: kkt_solution(problem, proj(c), c).x)(c),
    ...              jnp.eye(3) - 1.0 / 3)
    Array(True, dtype=bool)
    """
    settings = settings if settings is not None else KKTSettings()
    frozen = jax.lax.stop_gradient
    x = frozen(x)
    rule = _RULES.get(problem)
    if rule is None:
        # A weak reference to the problem's method: the cache must not keep it alive.
        rule = jax.jit(
            functools.partial(_attach_kkt, _WeakCallable(problem.parts)), static_argnums=0
        )
        _RULES[problem] = rule
    try:
        return rule(settings, x, eq_dual, ineq_dual, params)
    except (jax.errors.JaxRuntimeError, ValueError) as err:
        if not isinstance(err, DargminError):
            reraise_constrained(err)
        raise


def constrained_argmin(
    objective: Callable[..., jax.Array],
    *,
    eq: Callable[..., jax.Array] | None = None,
    ineq: Callable[..., jax.Array] | None = None,
    degenerate: Degenerate = "raise",
    linear_solver: str | LinearSolver | lx.AbstractLinearSolver = "lu",
    check: CheckMode | Check | KKTCheck = "raise",
    with_duals: bool = False,
) -> Callable[[Callable[..., PyTree]], Callable[..., PyTree]]:
    r"""Decorate a solver of ``min f(x, θ) s.t. h(x, θ) = 0, g(x, θ) ≤ 0``.

    The solver ``solve(init, *params)`` returns ``x`` or a :class:`KKTSolution`
    ``(x, ν, λ)`` with the multipliers of ``L = f + νᵀh + λᵀg`` (``λ ≥ 0``). Missing
    multipliers are recovered by least squares on the active constraints (the fit is
    judged by the stationarity check). The decorated solver is differentiable in
    ``params`` (forward, reverse, higher orders with the active set frozen; ``jit``,
    ``vmap``, pytrees), by the implicit function theorem on the KKT system restricted to
    the active set :math:`\mathcal A`:

    .. math::

        \begin{pmatrix} \nabla^2_{xx} L & J_h^\top & J_{g_\mathcal A}^\top \\ J_h & 0 & 0 \\
        J_{g_\mathcal A} & 0 & 0 \end{pmatrix}
        \begin{pmatrix} \dot x \\ \dot\nu \\ \dot\lambda_\mathcal A \end{pmatrix}
        = -\begin{pmatrix} \partial_\theta \nabla_x L \\ \partial_\theta h \\
        \partial_\theta g_\mathcal A \end{pmatrix} \dot\theta, \qquad
        \dot\lambda_{\bar{\mathcal A}} = 0 .

    Before a derivative is returned the point is checked, eagerly and under ``jit``/``vmap``:
    a violated constraint, a non-stationary Lagrangian, a negative multiplier, failed
    complementary slackness, linearly dependent active constraints (LICQ) and a weakly
    active constraint (multiplier and slack both ≈ 0: the map has a kink) are refused with
    the numbers; then the implicit-function check of the KKT matrix (Newton step,
    condition number) runs as in :func:`dargmin.argmin`.

    Parameters
    ----------
    objective
        ``f(x, *params)``, a scalar.
    eq, ineq
        ``h(x, *params)`` and ``g(x, *params)``, arrays (flattened); bounds are
        inequalities (``lo - x`` and ``x - hi``).
    degenerate
        At a weakly active inequality: ``"raise"`` (default) refuses, naming its multiplier
        and slack; ``"active"`` gives the one-sided derivative of the branch where it stays
        active, ``"inactive"`` the branch where it leaves the active set.
    linear_solver
        The KKT matrix is symmetric indefinite: ``"lu"`` (default), ``"minres"``,
        ``"gmres"``, or ``"lstsq"`` (SVD, minimum norm), which also solves systems whose
        active constraints are redundant (LICQ fails; refused otherwise, with the rank).
    check
        ``"raise"``, ``"warn"``, ``"ignore"`` or a :class:`KKTCheck` with tolerances.
    with_duals
        Return a :class:`KKTSolution` (differentiable duals included) even when the solver
        returns ``x`` alone.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> f = lambda x, c: 0.5 * jnp.sum((x - c) ** 2)     # projection of c onto x ≤ 0
    >>> @constrained_argmin(f, ineq=lambda x, c: x)
    ... def project(init, c):
    ...     return jnp.minimum(c, 0.0)                     # duals recovered: λ = max(c, 0)
    >>> jax.jacobian(lambda c: project(None, c))(jnp.array([1.0, -2.0])).tolist()
    [[0.0, 0.0], [0.0, 1.0]]
    """
    problem = ConstrainedProblem(objective, eq, ineq)
    settings = KKTSettings(
        linear_solver=as_linear_solver(linear_solver),
        check=KKTCheck.of(check),
        degenerate=degenerate,
    )

    def decorator(solver: Callable[..., PyTree]) -> Callable[..., PyTree]:
        @functools.wraps(solver)
        def solve(init: PyTree, *params: PyTree) -> PyTree:
            out = solver(init, *jax.lax.stop_gradient(params))
            given = isinstance(out, KKTSolution)
            sol = out if given else KKTSolution(out)
            result = kkt_solution(
                problem,
                sol.x,
                *params,
                eq_dual=sol.eq_dual,
                ineq_dual=sol.ineq_dual,
                settings=settings,
            )
            return result if (given or with_duals) else result.x

        solve.problem = problem  # type: ignore[attr-defined]
        return solve

    return decorator
