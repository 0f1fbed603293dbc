"""Taylor series of the solution of an optimization problem in its parameters.

For a solution map ``x*(θ)`` defined by ``g(x*(θ), θ) = 0`` (``g = ∇ₓf`` for an argmin) the
series along a direction ``Δ`` is

.. math::

    x^*(\\theta_0 + t\\Delta) \\approx \\sum_{k=0}^{K} \\frac{t^k}{k!}\\, x_k, \\qquad
    x_k = \\frac{d^k}{dt^k} x^*(\\theta_0 + t\\Delta)\\Big|_{t=0}
        = D^k x^*(\\theta_0)[\\Delta, \\dots, \\Delta].

Differentiating ``φ(t) = g(x(t), θ₀ + tΔ) = 0`` ``k`` times at ``t = 0`` (Faà di Bruno) gives

.. math::

    0 = φ^{(k)}(0) = H\\, x_k + r_k, \\qquad H = \\partial_x g(x_0, \\theta_0),

where ``r_k`` depends only on ``x_1, …, x_{k-1}`` and ``Δ``: it is ``φ^{(k)}(0)`` computed
with ``x_k`` set to zero. So ``x_k = -H^{-1} r_k``, one order after the other. ``r_k`` comes
from Taylor-mode automatic differentiation, which propagates a whole truncated series through
``g`` at a cost that grows polynomially with the order, and ``H`` is factorized once
(Cholesky for a minimum, LU otherwise) and reused for every order and every direction.

The Taylor mode is :func:`jax.experimental.jet`'s, driven by a small interpreter of the
jaxpr of ``g`` that keeps zero coefficients symbolic through the linear and bilinear
primitives (jet itself materializes them as arrays of zeros, and multiplies by them). A term
of ``g`` linear in ``x``, say ``Ax`` with a closed-over matrix ``A``, then costs nothing unless
a nonlinearity consumes it: its top coefficient is ``A x_k`` with ``x_k = 0``, a symbolic zero.
For ``g = Ax + (cheap nonlinear term)`` a call is the ``K`` pairs of triangular solves plus the
nonlinear term's series, where jet did ``O(K²)`` products of ``A`` with zeros.

Nesting ``jax.jvp`` around an implicitly differentiated solver gives the same numbers but
re-forms and re-factorizes ``H`` at every level of nesting (``2^k``-fold).

Which functions are supported
-----------------------------
``jet`` has rules for the elementwise and structural primitives (arithmetic, powers, ``exp``,
``log``, ``sin``/``cos``, ``tanh``, ``logistic``, ``erf``, ``sqrt``, dot products, reductions,
indexing, ``jnp.where``, ``logsumexp``, ...). It has none for ``arctan``/``tan``, control
flow (``lax.cond``, ``lax.scan``/``fori_loop``/``while_loop``), linear solves and
factorizations, and it fails on some ``custom_jvp`` functions (``jax.nn.softplus``,
``jax.nn.log_sigmoid``). For such objectives the residuals ``r_k`` are computed by nested
forward mode instead (``k`` nested ``jax.jvp`` along the curve ``t ↦ (x(t), θ₀ + tΔ)``, cost
``2^k`` evaluations of ``g``), with a :class:`dargmin.DargminWarning` naming the primitive.
The factorization of ``H`` is still shared. The numbers agree to rounding.

Examples
--------
>>> import jax, jax.numpy as jnp
>>> f = lambda x, lam: 0.5 * jnp.sum((x - 1.0) ** 2) + 0.5 * lam * jnp.sum(x**2)
>>> te = TaylorExpansion(f, jnp.full(2, 0.5), 1.0, order=3)   # x*(λ) = 1 / (1 + λ)
>>> [round(float(d[0]), 6) for d in te.derivatives(1.0)]    # -1/4, 2/8, -6/16
[-0.25, 0.25, -0.375]
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
from jax.experimental import jet
from jax.extend import core as jex_core
from jax.flatten_util import ravel_pytree

from dargmin import diagnostics

PyTree = Any
Method = Literal["auto", "jet", "nested"]
LinearSolverName = Literal["auto", "cholesky", "lu", "cg", "gmres"]
CheckMode = Literal["raise", "warn", "ignore"]

#: Above this many unknowns, ``linear_solver="auto"`` switches to matrix-free Krylov solves.
DENSE_MAX_SIZE = 2000

__all__ = ["AccuracyReport", "TaylorExpansion", "taylor_expand"]


# --------------------------------------------------------------------------------------------
# Residuals r_k: Taylor mode (jet) and its nested forward-mode fallback
# --------------------------------------------------------------------------------------------


def _residual_jet(
    g: Callable[[jax.Array, jax.Array], jax.Array],
    x0: jax.Array,
    th0: jax.Array,
    delta: jax.Array,
    xs: Sequence[jax.Array],
) -> jax.Array:
    """``r_k``: the k-th derivative of ``g(x(t), θ₀+tΔ)`` at 0 with ``x_k = 0`` (k = len(xs)+1).

    Taylor mode on the jaxpr of ``g`` (:func:`_taylor_eval`): the series of
    ``x(t) = x₀ + Σ_{j<k} x_j t^j / j!`` and ``θ(t) = θ₀ + tΔ`` is pushed through ``g`` with
    the coefficients ``c_j = x_j / j!``, and ``φ^{(k)}(0) = k! · c_k`` is read off the output.
    """
    k = len(xs) + 1
    closed = jax.make_jaxpr(g)(x0, th0)
    x_series: list[jax.Array | None] = [xj / math.factorial(j) for j, xj in enumerate(xs, 1)]
    th_series: list[jax.Array | None] = [delta] + [None] * (k - 1)
    ((_, out),) = _taylor_eval(
        closed.jaxpr, closed.consts, [x0, th0], [[*x_series, None], th_series], k
    )
    if out is None or out[-1] is None:
        return jnp.zeros_like(x0)
    return out[-1] * math.factorial(k)


# Taylor mode with symbolic zeros. ``jax.experimental.jet`` turns every zero coefficient into
# a dense array of zeros before applying a rule: a closed-over matrix ``A`` (a constant, whose
# series is zero) then costs a full-size broadcast and ``k`` useless ``x_j @ 0`` products at
# order ``k``, and the vanishing top coefficient ``x_k = 0`` is multiplied through the whole
# graph as well. On a dense quadratic at n = 1000 that was >90% of the time of a call. The
# interpreter below walks the jaxpr of ``g`` itself and keeps zero coefficients symbolic
# (``None``) through the linear and bilinear primitives (which carry the cost: products with
# big constants); every other primitive goes through jet's own rule, on the inputs that carry
# a series. Coefficients are Taylor coefficients (not factorial-scaled), as in jet's rules.

Series = list[jax.Array | None]

_BILINEAR = (jax.lax.mul_p, jax.lax.dot_general_p)


def _is_linear(primitive: Any) -> bool:
    rule = jet.jet_rules.get(primitive)
    return isinstance(rule, functools.partial) and rule.func is jet.linear_prop


def _bind(eqn: Any, values: Sequence[Any]) -> Any:
    return eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))


def _zeros(value: Any) -> jax.Array:
    return jnp.zeros(jnp.shape(value), jnp.result_type(value))


def _taylor_eqn(eqn: Any, primals: list[Any], series: list[Series | None], k: int) -> tuple:
    """``(primal out, series out)`` of one equation (``None`` series: identically zero)."""
    prim = eqn.primitive
    series = [None if s is None or all(t is None for t in s) else list(s) for s in series]
    if all(s is None for s in series):
        return _bind(eqn, primals), None
    full = [[None] * k if s is None else s for s in series]
    if prim in (jex_core.primitives.jit_p, jex_core.primitives.closed_call_p):  # inline nested jit
        closed = eqn.params["jaxpr"] if "jaxpr" in eqn.params else eqn.params["call_jaxpr"]
        outs = _taylor_eval(closed.jaxpr, closed.consts, primals, full, k)
        return [p for p, _ in outs], [s for _, s in outs]
    primal_out = _bind(eqn, primals)
    if prim in _BILINEAR:
        u, w = [primals[0], *full[0]], [primals[1], *full[1]]
        out: Series = []
        for j in range(1, k + 1):
            terms = [
                _bind(eqn, (u[i], w[j - i]))
                for i in range(j + 1)
                if u[i] is not None and w[j - i] is not None
            ]
            out.append(functools.reduce(jax.lax.add, terms) if terms else None)
        return primal_out, out
    if prim is jax.lax.div_p and series[1] is None:  # linear in the numerator
        return primal_out, [None if t is None else prim.bind(t, primals[1]) for t in full[0]]
    if _is_linear(prim) and not prim.multiple_results:
        out = []
        for j in range(k):
            terms = [s[j] for s in full]
            if all(t is None for t in terms):
                out.append(None)
            elif prim in (jax.lax.add_p, jax.lax.sub_p) and terms[1] is None:
                out.append(terms[0])
            elif prim is jax.lax.add_p and terms[0] is None:
                out.append(terms[1])
            else:
                filled = [
                    _zeros(p) if t is None else t for p, t in zip(primals, terms, strict=True)
                ]
                out.append(_bind(eqn, filled))
        return primal_out, out
    # Any other primitive: jet's rule (raises KeyError where jet has none, like jet itself).
    index = [i for i, s in enumerate(series) if s is not None]

    def call(*args: Any) -> Any:
        values = list(primals)
        for i, a in zip(index, args, strict=True):
            values[i] = a
        return _bind(eqn, values)

    ins = [primals[i] for i in index]
    ser = [[_zeros(primals[i]) if t is None else t for t in full[i]] for i in index]
    _, series_out = jet.jet(call, ins, ser, factorial_scaled=False)
    return primal_out, series_out


def _taylor_eval(
    jaxpr: Any, consts: Sequence[Any], primals: Sequence[Any], series: Sequence[Any], k: int
) -> list[tuple[Any, Series | None]]:
    """Evaluate ``jaxpr`` on truncated series of order ``k``: ``[(primal, series)]`` per output."""
    env: dict[Any, tuple[Any, Series | None]] = {}

    def read(v: Any) -> tuple[Any, Series | None]:
        return (v.val, None) if isinstance(v, jex_core.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts, strict=True):
        env[v] = (c, None)
    for v, p, s in zip(jaxpr.invars, primals, series, strict=True):
        env[v] = (p, s)
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        p_out, s_out = _taylor_eqn(eqn, [p for p, _ in ins], [s for _, s in ins], k)
        if eqn.primitive.multiple_results:
            s_out = [None] * len(p_out) if s_out is None else s_out
            for v, p, s in zip(eqn.outvars, p_out, s_out, strict=True):
                env[v] = (p, s)
        else:
            env[eqn.outvars[0]] = (p_out, s_out)
    return [read(v) for v in jaxpr.outvars]


def _residual_nested(
    g: Callable[[jax.Array, jax.Array], jax.Array],
    x0: jax.Array,
    th0: jax.Array,
    delta: jax.Array,
    xs: Sequence[jax.Array],
) -> jax.Array:
    """``r_k`` by ``k`` nested ``jax.jvp`` of ``t ↦ g(x(t), θ₀+tΔ)`` with the truncated curve."""
    k = len(xs) + 1

    def curve(t: jax.Array) -> jax.Array:
        x = x0
        for j, xj in enumerate(xs, start=1):
            x = x + xj * (t**j / math.factorial(j))
        return g(x, th0 + t * delta)

    def differentiate(fn: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
        return lambda t: jax.jvp(fn, (t,), (jnp.ones_like(t),))[1]

    fn = curve
    for _ in range(k):
        fn = differentiate(fn)
    return fn(jnp.zeros((), x0.dtype))


def _jet_failure(err: BaseException) -> str:
    """Name the primitive (or construct) that made ``jet`` fail, for the fallback warning."""
    if isinstance(err, KeyError) and err.args:
        # jet looks its rules up in a dict keyed by primitive: the missing key is the name.
        return f"primitive '{getattr(err.args[0], 'name', err.args[0])}'"
    if isinstance(err, jax.errors.UnexpectedTracerError):
        return "a custom_jvp/custom_vjp function (jet leaks a tracer through it)"
    match = re.search(r"primitive[^\w']*'?(\w+)", str(err))
    if match:
        return f"primitive '{match.group(1)}'"
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


# --------------------------------------------------------------------------------------------
# Result of the accuracy check
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccuracyReport:
    """Errors of the truncated series against re-solved solutions (see ``check_accuracy``).

    Attributes
    ----------
    delta_norms
        ``‖Δᵢ‖₂`` of each tested direction, shape ``(n,)``.
    errors
        ``errors[i, k] = ‖Σ_{j≤k} x_j/j! − x*(θ₀+Δᵢ)‖₂`` for orders ``k = 0..K``, shape
        ``(n, K+1)``.
    relative_errors
        ``errors`` divided by ``‖x*(θ₀+Δᵢ) − x₀‖₂`` (the order-0 error), so that column 0 is 1.
    decreasing
        Per direction: whether the error falls (or stays below ``floor``) at every order.
    radius
        Crude radius of validity per direction, in the units of ``θ``: ``‖Δᵢ‖`` times the
        root-test estimate ``min(‖c_K‖^{-1/K}, ‖c_{K-1}‖/‖c_K‖)`` with ``c_k = x_k / k!`` (the
        series coefficients in ``t``). Beyond it the series should not be trusted.
    floor
        Error level below which differences are attributed to the solver's accuracy.
    """

    delta_norms: np.ndarray
    errors: np.ndarray
    relative_errors: np.ndarray
    decreasing: np.ndarray
    radius: np.ndarray
    floor: float

    @property
    def ok(self) -> bool:
        """Whether the error fell with the order for every tested direction."""
        return bool(np.all(self.decreasing))

    def __str__(self) -> str:
        order = self.errors.shape[1] - 1
        head = "  ‖Δ‖      " + " ".join(f"{'order ' + str(k):>10}" for k in range(order + 1))
        rows = [
            f"  {n:<9.3g}" + " ".join(f"{e:>10.2e}" for e in errs) + ("" if ok else "  (!)")
            for n, errs, ok in zip(self.delta_norms, self.errors, self.decreasing, strict=True)
        ]
        return (
            "AccuracyReport: ‖series − re-solved x*‖ by order\n"
            + head
            + "\n"
            + "\n".join(rows)
            + f"\n  errors fall with order: {self.ok}; crude radius of validity (‖Δ‖ units): "
            + ", ".join(f"{r:.3g}" for r in self.radius)
        )


# --------------------------------------------------------------------------------------------
# The expansion
# --------------------------------------------------------------------------------------------


class TaylorExpansion:
    """Taylor expansion of an optimum ``x*(θ)`` around ``(x₀, θ₀)`` up to a maximal order.

    With ``g = ∇ₓf`` (or a given optimality function), ``H = ∂ₓg(x₀, θ₀)`` and a direction
    ``Δ``, the derivatives ``x_k = D^k x*(θ₀)[Δ]^k`` solve

    .. math:: H x_k = -r_k(x_1, \\dots, x_{k-1}; \\Delta), \\qquad k = 1, \\dots, K,

    where ``r_k`` is the k-th Taylor coefficient of ``g(x(t), θ₀+tΔ)`` with ``x_k = 0``
    (computed with :func:`jax.experimental.jet`, or nested ``jvp`` where jet lacks a rule).
    ``H`` is formed and factorized once at construction (dense Cholesky or LU), or applied
    matrix-free (Hessian-vector products and CG/GMRES) for large problems; the compiled
    function of each order is cached on the object.

    Parameters
    ----------
    fn
        The objective ``f(x, θ) -> scalar`` (default), or the optimality function
        ``g(x, θ)`` (a pytree shaped like ``x``) when ``optimality=True``.
    x0
        The solution at ``θ0`` (pytree of floating arrays). It must be stationary.
    theta0
        The parameters at which ``x0`` was computed (pytree of arrays).
    order
        The maximal order ``K`` of the expansion (``≥ 1``).
    optimality
        Interpret ``fn`` as ``g(x, θ)`` (root problem) instead of an objective.
    symmetric
        Whether ``∂ₓg`` is symmetric (default: ``True`` for an objective, ``False`` for an
        optimality function). A symmetric system is factorized by Cholesky when positive
        definite, and solved by CG when matrix-free.
    linear_solver
        ``"auto"`` (dense up to ``2000`` unknowns, matrix-free beyond), ``"cholesky"``,
        ``"lu"``, ``"cg"`` or ``"gmres"``.
    method
        ``"auto"`` (jet, falling back to nested jvp with a warning), ``"jet"`` or ``"nested"``.
    check
        ``"raise"`` (default), ``"warn"`` or ``"ignore"``: what to do when ``x0`` is not
        stationary or ``H`` is singular / not positive definite (for an objective).
    tol
        Largest accepted Newton step ``‖H⁻¹g(x₀, θ₀)‖ / max(1, ‖x₀‖)`` (``1e-4`` in float64,
        ``1e-2`` in float32).
    max_condition
        Largest accepted lower bound of ``cond(H)`` (``0.01 / eps``).
    krylov_rtol, krylov_max_steps
        Tolerance and iteration cap of the matrix-free solves (default ``eps^0.75`` and
        ``10 n``).

    Raises
    ------
    dargmin.NonStationaryPointError
        ``x0`` is not a root of ``g(·, θ0)`` (the Newton step is above ``tol``).
    dargmin.SingularSystemError
        ``H`` is singular, badly conditioned, or (objective) not positive definite.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> f = lambda x, th: 0.5 * jnp.sum(x**2) - jnp.sum(jnp.sin(th) * x)   # x* = sin θ
    >>> te = TaylorExpansion(f, jnp.zeros(2), jnp.zeros(2), order=3)
    >>> [(d.round(4) + 0.0).tolist() for d in te.derivatives(jnp.array([1.0, 2.0]))]
    [[1.0, 2.0], [0.0, 0.0], [-1.0, -8.0]]
    >>> [round(v, 5) for v in te.predict(jnp.array([0.1, 0.2])).tolist()]  # ≈ sin θ + O(θ⁴)
    [0.09983, 0.19867]
    """

    def __init__(
        self,
        fn: Callable[..., PyTree],
        x0: PyTree,
        theta0: PyTree,
        order: int = 4,
        *,
        optimality: bool = False,
        symmetric: bool | None = None,
        linear_solver: LinearSolverName = "auto",
        method: Method = "auto",
        check: CheckMode = "raise",
        tol: float | None = None,
        max_condition: float | None = None,
        krylov_rtol: float | None = None,
        krylov_max_steps: int | None = None,
    ) -> None:
        self._order = _validate_order(order, minimum=1)
        if method not in ("auto", "jet", "nested"):
            raise ValueError(f"method must be 'auto', 'jet' or 'nested', got {method!r}.")
        if linear_solver not in ("auto", "cholesky", "lu", "cg", "gmres"):
            raise ValueError(
                "linear_solver must be 'auto', 'cholesky', 'lu', 'cg' or 'gmres', got "
                f"{linear_solver!r}."
            )
        if check not in ("raise", "warn", "ignore"):
            raise ValueError(f"check must be 'raise', 'warn' or 'ignore', got {check!r}.")
        self._optimality = bool(optimality)
        self._symmetric = (not optimality) if symmetric is None else bool(symmetric)
        self._check = check

        x_flat, self._unravel_x = ravel_pytree(x0)
        if not jnp.issubdtype(x_flat.dtype, jnp.inexact):
            raise TypeError(f"x0 must have floating-point leaves, got dtype {x_flat.dtype}.")
        th_flat, self._unravel_th = ravel_pytree(theta0)
        if not jnp.issubdtype(th_flat.dtype, jnp.inexact):
            # Integer parameters cannot carry a direction: compute in the dtype of x.
            th_flat = th_flat.astype(x_flat.dtype)
        self._x0, self._th0 = x_flat, th_flat
        self._dtype = x_flat.dtype
        eps = float(jnp.finfo(self._dtype).eps)

        unravel_x, unravel_th = self._unravel_x, self._unravel_th
        if optimality:

            def g_flat(x: jax.Array, th: jax.Array) -> jax.Array:
                return ravel_pytree(fn(unravel_x(x), unravel_th(th)))[0].astype(x.dtype)
        else:

            def g_flat(x: jax.Array, th: jax.Array) -> jax.Array:
                grad = jax.grad(lambda xx: fn(unravel_x(xx), unravel_th(th)))(x)
                return grad.astype(x.dtype)

        self._g = g_flat
        n = x_flat.size
        out = jax.eval_shape(g_flat, x_flat, th_flat)
        if out.shape != x_flat.shape:
            raise ValueError(
                f"The optimality function must return as many entries as x has ({n}), "
                f"got shape {out.shape}."
            )

        if linear_solver == "auto":
            if n > DENSE_MAX_SIZE:
                linear_solver = "cg" if self._symmetric else "gmres"
            else:
                linear_solver = "cholesky" if self._symmetric else "lu"
        if linear_solver in ("cholesky", "cg") and not self._symmetric:
            raise ValueError(
                f"linear_solver={linear_solver!r} needs a symmetric system; pass "
                "symmetric=True if ∂ₓg is symmetric, or use 'lu'/'gmres'."
            )
        self._linear_solver: str = linear_solver
        self._krylov_rtol = krylov_rtol if krylov_rtol is not None else eps**0.75
        self._krylov_max_steps = krylov_max_steps if krylov_max_steps is not None else 10 * n

        self._tol = tol if tol is not None else (1e-4 if eps < 1e-10 else 1e-2)
        self._max_condition = max_condition if max_condition is not None else 1e-2 / eps
        self._factor: tuple = ()
        if linear_solver in ("cholesky", "lu"):
            self._factor = self._factorize()
        self._diagnose()

        self._method = self._select_method(method)
        self._cache: dict[int, Callable[..., list[jax.Array]]] = {}

    # ---------------------------------------------------------------------------- construction

    @classmethod
    def from_optimality(
        cls,
        g: Callable[..., PyTree],
        x0: PyTree,
        theta0: PyTree,
        order: int = 4,
        **kwargs: Any,
    ) -> TaylorExpansion:
        """Expansion of the root ``x*(θ)`` of ``g(x, θ) = 0`` (``optimality=True``).

        Examples
        --------
        >>> import jax.numpy as jnp
        >>> g = lambda x, a: x**2 - a                       # x*(a) = sqrt(a)
        >>> te = TaylorExpansion.from_optimality(g, jnp.array(2.0), jnp.array(4.0), order=2)
        >>> [round(float(d), 6) for d in te.derivatives(1.0)]  # a^{-1/2}/2, -a^{-3/2}/4
        [0.25, -0.03125]
        """
        return cls(g, x0, theta0, order, optimality=True, **kwargs)

    def _factorize(self) -> tuple:
        """Form ``H = ∂ₓg(x₀, θ₀)`` densely and factorize it once (Cholesky, else LU)."""

        @jax.jit
        def factor(x0: jax.Array, th0: jax.Array) -> tuple:
            h = jax.jacfwd(self._g)(x0, th0)
            if self._linear_solver == "cholesky":
                # Symmetrize: the Hessian is symmetric up to rounding, Cholesky reads one half.
                chol, _ = jsl.cho_factor(0.5 * (h + h.T), lower=True)
                return (chol.T,)
            lu, piv = jsl.lu_factor(h)
            return (lu.T, piv)

        factors = factor(self._x0, self._th0)
        if self._linear_solver == "cholesky" and not bool(jnp.all(jnp.isfinite(factors[0]))):
            # Not positive definite: report (through _diagnose, which sees the NaN solves)
            # unless checks are relaxed, in which case LU still gives the derivative of the
            # stationary point (a saddle).
            if self._check != "raise":
                self._linear_solver = "lu"
                return self._factorize()
        return factors

    def _solve_dense(self, factors: tuple, b: jax.Array) -> jax.Array:
        # The factor is stored transposed: LAPACK's triangular solves read column-major
        # matrices, and the transpose of a row-major array is a free bitcast to that layout.
        # Stored as is, every call copied (transposed) the whole n×n factor first, which cost
        # more than the two triangular solves together.
        if len(factors) == 1:
            return jsl.cho_solve((factors[0].T, True), b)
        return jsl.lu_solve((factors[0].T, factors[1]), b)

    def _solve(
        self,
        state: tuple,
        hvp: Callable[[jax.Array], jax.Array] | None,
        b: jax.Array,
        guess: jax.Array | None = None,
    ) -> jax.Array:
        """``H⁻¹ b`` with the stored factorization, or matrix-free from ``guess``."""
        _, _, factors = state
        if factors:
            return self._solve_dense(factors, b)
        assert hvp is not None
        scale = jnp.linalg.norm(b)
        kwargs = {
            "x0": guess,
            "tol": self._krylov_rtol,
            "atol": 0.0,
            "maxiter": self._krylov_max_steps,
        }
        if self._linear_solver == "cg":
            sol, _ = jax.scipy.sparse.linalg.cg(hvp, b, **kwargs)
        else:
            sol, _ = jax.scipy.sparse.linalg.gmres(hvp, b, **kwargs)
        return jnp.where(scale > 0, sol, jnp.zeros_like(b))

    def _state(self) -> tuple:
        # Passed as arguments (not closed over) so that compiled functions take them as inputs.
        return (self._x0, self._th0, self._factor)

    def _diagnose(self) -> None:
        """Measure stationarity and conditioning at ``(x₀, θ₀)``; raise, warn or pass."""
        if self._check == "ignore":
            return

        @jax.jit
        def measure(state: tuple) -> tuple[jax.Array, ...]:
            # One compiled call: eager op-by-op dispatch of these few solves costs seconds.
            x0, th0, _ = state
            residual = self._g(x0, th0)
            hvp = None if self._factor else self._hvp(x0, th0)
            newton = self._solve(state, hvp, residual)
            nan = jnp.asarray(jnp.nan, x0.dtype)
            condition, curvature = nan, nan
            if self._factor:
                # ‖Hb‖‖H⁻¹b‖/‖b‖² is a lower bound of cond(H) (never a false alarm), and
                # bᵀH⁻¹b < 0 proves H is not positive definite.
                probe = jax.random.normal(jax.random.key(0), x0.shape, dtype=x0.dtype)
                probe_image = jax.jvp(lambda v: self._g(v, th0), (x0,), (probe,))[1]
                probe_sol = self._solve(state, None, probe)
                condition = (
                    jnp.linalg.norm(probe_image) * jnp.linalg.norm(probe_sol) / jnp.sum(probe**2)
                )
                curvature = jnp.vdot(probe, probe_sol)
            norms = (jnp.linalg.norm(residual), jnp.linalg.norm(x0), jnp.linalg.norm(newton))
            return (*norms, condition, curvature)

        residual_norm, x_norm, newton_norm, condition, curvature = (
            float(v) for v in measure(self._state())
        )
        try:
            diagnostics.report_implicit_check(
                residual_norm,
                x_norm,
                newton_norm,
                condition,
                curvature,
                kind="root" if self._optimality else "argmin",
                mode=self._check,
                tol=self._tol,
                max_condition=self._max_condition,
                expect_positive_definite=not self._optimality,
            )
        except diagnostics.DargminError as err:
            raise type(err)(f"TaylorExpansion at (x0, theta0): {err}") from None

    def _hvp(self, x0: jax.Array, th0: jax.Array) -> Callable[[jax.Array], jax.Array]:
        # Linearize once: every CG iteration of every order then reuses the same linear map.
        _, lin = jax.linearize(lambda v: self._g(v, th0), x0)
        return lin

    def _select_method(self, method: Method) -> str:
        """Trace the jet path once; fall back to nested forward mode where jet cannot go."""
        if method == "nested":
            return "nested"
        xs = [jnp.zeros_like(self._x0)] * (self._order - 1)
        try:
            jax.eval_shape(
                lambda d: _residual_jet(self._g, self._x0, self._th0, d, xs),
                jax.ShapeDtypeStruct(self._th0.shape, self._th0.dtype),
            )
        except (KeyError, NotImplementedError, TypeError, jax.errors.UnexpectedTracerError) as err:
            if method == "jet":
                raise NotImplementedError(
                    f"jax.experimental.jet cannot propagate Taylor series through the "
                    f"optimality function ({_jet_failure(err)}). Use method='nested' or "
                    "method='auto'."
                ) from err
            warnings.warn(
                f"TaylorExpansion: jax.experimental.jet has no rule for {_jet_failure(err)} in "
                "the optimality function; computing the Taylor residuals with nested "
                "forward-mode jvp instead (same numbers, cost 2^k evaluations at order k).",
                diagnostics.DargminWarning,
                stacklevel=3,
            )
            return "nested"
        return "jet"

    # ------------------------------------------------------------------------------ properties

    @property
    def order(self) -> int:
        """The maximal order ``K`` of the expansion."""
        return self._order

    @property
    def method(self) -> str:
        """``"jet"`` or ``"nested"``: how the residuals ``r_k`` are computed."""
        return self._method

    @property
    def linear_solver(self) -> str:
        """``"cholesky"``, ``"lu"``, ``"cg"`` or ``"gmres"``: how ``H`` is inverted."""
        return self._linear_solver

    @property
    def x0(self) -> PyTree:
        """The expansion point (the solution at ``theta0``)."""
        return self._unravel_x(self._x0)

    @property
    def theta0(self) -> PyTree:
        """The parameters at the expansion point."""
        return self._unravel_th(self._th0)

    # ------------------------------------------------------------------------------ the core

    def _flat_derivatives(self, state: tuple, delta: jax.Array, order: int) -> list[jax.Array]:
        """``[x_1, …, x_order]`` (flat) along the flat direction ``delta`` (traceable)."""
        x0, th0, _ = state
        residual = _residual_jet if self._method == "jet" else _residual_nested
        hvp = None if self._factor else self._hvp(x0, th0)
        xs: list[jax.Array] = []
        rs: list[jax.Array] = []
        for _ in range(order):
            r = residual(self._g, x0, th0, delta, xs)
            guess = None
            if hvp is not None and xs and self._linear_solver == "cg":
                # Warm start: the Galerkin solution in span{x_1..x_{k-1}}, which minimizes the
                # H-norm error over that subspace. H x_j = -r_j is known, so it costs no HVP.
                basis = jnp.stack(xs)
                gram = -basis @ jnp.stack(rs).T
                coef = jnp.linalg.lstsq(0.5 * (gram + gram.T), -basis @ r)[0]
                guess = -(coef @ basis)
            xk = -self._solve(state, hvp, r, guess)
            xs.append(xk)
            rs.append(r)
        return xs

    def _compiled(self, order: int) -> Callable[..., list[PyTree]]:
        """The jitted ``(state, Δ) ↦ [x_1..x_order]``, compiled once per order and cached.

        ``Δ`` goes in as given (pytree or array) and the ``x_k`` come out as pytrees: the
        flattening happens inside the compiled function, because done eagerly it would cost
        more than the derivatives themselves on small problems.
        """
        if order not in self._cache:

            def run(state: tuple, delta: PyTree) -> list[PyTree]:
                xs = self._flat_derivatives(state, self._flat_delta(delta), order)
                return [self._unravel_x(xk) for xk in xs]

            self._cache[order] = jax.jit(run)
        return self._cache[order]

    def _flat_kth(self, k: int) -> Callable[[jax.Array], jax.Array]:
        """Flat direction ↦ flat ``x_k`` (for batched use under ``vmap``)."""
        compiled, state = self._compiled(k), self._state()
        return lambda d: ravel_pytree(compiled(state, self._unravel_th(d))[-1])[0]

    def _check_order(self, order: int | None) -> int:
        order = self._order if order is None else _validate_order(order, minimum=0)
        if not 0 <= order <= self._order:
            raise ValueError(
                f"order must be between 0 and the expansion's order {self._order}, got {order}."
            )
        return order

    def _flat_delta(self, delta: PyTree) -> jax.Array:
        if jax.tree_util.tree_structure(delta) == jax.tree_util.tree_structure(0.0):
            delta = jnp.broadcast_to(jnp.asarray(delta), self._th0.shape)
            flat = jnp.reshape(delta, -1)
        else:
            flat = ravel_pytree(delta)[0]
        if flat.shape != self._th0.shape:
            raise ValueError(
                f"The direction has {flat.size} entries but theta0 has {self._th0.size}."
            )
        return flat.astype(self._th0.dtype)

    def derivatives(self, delta: PyTree, order: int | None = None) -> list[PyTree]:
        """The directional derivatives ``[x_1, …, x_order]``, ``x_k = D^k x*(θ₀)[Δ, …, Δ]``.

        Not divided by ``k!``. Each ``x_k`` solves ``H x_k = -r_k(x_1..x_{k-1}; Δ)`` with the
        factorization made at construction. Works under ``jax.vmap`` over ``delta``.

        Parameters
        ----------
        delta
            The direction ``Δ``, shaped like ``theta0`` (a scalar is broadcast).
        order
            Highest order (default: the expansion's order ``K``).

        Examples
        --------
        >>> import jax.numpy as jnp
        >>> f = lambda x, a: 0.5 * x**2 - a**3 * x          # x*(a) = a³
        >>> te = TaylorExpansion(f, jnp.array(1.0), jnp.array(1.0), order=4)
        >>> [round(float(d), 4) + 0.0 for d in te.derivatives(1.0)]  # 3a², 6a, 6, 0 at a = 1
        [3.0, 6.0, 6.0, 0.0]
        """
        order = self._check_order(order)
        if order == 0:
            return []
        return self._compiled(order)(self._state(), delta)

    def predict(self, theta: PyTree, order: int | None = None) -> PyTree:
        """The truncated series ``x₀ + Σ_{k≤order} x_k / k!`` with ``Δ = θ − θ₀``.

        Use ``jax.vmap(te.predict)(thetas)`` for many parameter values at once.

        Parameters
        ----------
        theta
            The new parameters (shaped like ``theta0``).
        order
            Truncation order (default ``K``; ``0`` returns ``x0``).

        Examples
        --------
        >>> import jax, jax.numpy as jnp
        >>> f = lambda x, lam: 0.5 * (1.0 + lam) * x**2 - x  # x*(λ) = 1 / (1 + λ)
        >>> te = TaylorExpansion(f, jnp.array(1.0), jnp.array(0.0), order=4)
        >>> round(float(te.predict(jnp.array(0.1))), 4)      # 1 - .1 + .01 - .001 + .0001
        0.9091
        >>> [round(v, 4) for v in jax.vmap(te.predict)(jnp.array([0.0, 0.1])).tolist()]
        [1.0, 0.9091]
        """
        order = self._check_order(order)
        flat, _ = ravel_pytree(theta)
        delta = flat.astype(self._th0.dtype) - self._th0
        total = self._x0
        if order > 0:
            # Sharing the compiled derivatives (rather than compiling the sum too) halves the
            # compilations; the K additions are negligible next to the solves.
            xs = self._compiled(order)(self._state(), self._unravel_th(delta))
            for k, xk in enumerate(xs, start=1):
                total = total + ravel_pytree(xk)[0] / math.factorial(k)
        return self._unravel_x(total)

    def mixed_derivative(self, directions: Sequence[PyTree]) -> PyTree:
        """The mixed derivative ``D^k x*(θ₀)[Δ₁, …, Δ_k]`` (``k = len(directions) ≤ K``).

        By polarization of the symmetric k-linear form:

        .. math::

            D^k x^*[\\Delta_1, \\dots, \\Delta_k] = \\frac{1}{k!}
            \\sum_{\\emptyset \\ne S \\subseteq \\{1..k\\}} (-1)^{k-|S|}\\,
            D^k x^*\\Big[\\sum_{i\\in S} \\Delta_i\\Big]^k,

        i.e. ``2^k − 1`` directional expansions, batched in one compiled call.

        Examples
        --------
        >>> import jax.numpy as jnp
        >>> f = lambda x, th: 0.5 * x**2 - th[0] * th[1] * x  # x* = θ₀θ₁, ∂²x*/∂θ₀∂θ₁ = 1
        >>> te = TaylorExpansion(f, jnp.array(0.0), jnp.zeros(2), order=2)
        >>> round(float(te.mixed_derivative([jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])])), 4)
        1.0
        """
        k = len(directions)
        self._check_order(k)
        if k == 0:
            return self.x0
        flats = jnp.stack([self._flat_delta(d) for d in directions])
        subsets = [s for r in range(1, k + 1) for s in itertools.combinations(range(k), r)]
        weights = np.zeros((len(subsets), k), dtype=np.float64)
        signs = np.empty(len(subsets), dtype=np.float64)
        for row, subset in enumerate(subsets):
            weights[row, list(subset)] = 1.0
            signs[row] = (-1.0) ** (k - len(subset))
        dirs = jnp.asarray(weights, flats.dtype) @ flats
        dk = jax.vmap(self._flat_kth(k))(dirs)
        value = jnp.asarray(signs, dk.dtype) @ dk / math.factorial(k)
        return self._unravel_x(value)

    def derivative_tensor(self, k: int) -> jax.Array:
        """The full k-th derivative tensor ``∂^k x*/∂θ^k`` at ``θ₀`` (flattened x and θ).

        Shape ``(n, m, …, m)`` with ``k`` axes of size ``m = size(θ)`` and ``n = size(x)``;
        ``T[:, i₁, …, i_k] = ∂^k x* / ∂θ_{i₁}⋯∂θ_{i_k}``. Each of the ``C(m+k−1, k)`` distinct
        entries is obtained by polarization (see :meth:`mixed_derivative`) from directional
        derivatives along sums of coordinate vectors; shared directions are computed once,
        in one batched call. Meant for small ``m`` and ``k``.

        Examples
        --------
        >>> import jax.numpy as jnp
        >>> f = lambda x, th: 0.5 * jnp.sum(x**2) - th[0] ** 2 * th[1] * x[0]  # x₀* = θ₀²θ₁
        >>> te = TaylorExpansion(f, jnp.zeros(1), jnp.zeros(2), order=3)
        >>> round(float(te.derivative_tensor(3)[0, 0, 0, 1]), 4)     # ∂³x*/∂θ₀²∂θ₁ = 2
        2.0
        """
        self._check_order(k)
        n, m = self._x0.size, self._th0.size
        if k == 0:
            return self._x0
        multisets = list(itertools.combinations_with_replacement(range(m), k))
        direction_index: dict[tuple[int, ...], int] = {}
        rows, cols, vals = [], [], []
        for row, multiset in enumerate(multisets):
            # Polarization over the k (possibly repeated) coordinate vectors; the subset sum
            # is an integer count vector, and equal count vectors share one expansion.
            contrib: dict[tuple[int, ...], float] = {}
            for r in range(1, k + 1):
                for subset in itertools.combinations(range(k), r):
                    counts = [0] * m
                    for pos in subset:
                        counts[multiset[pos]] += 1
                    key = tuple(counts)
                    contrib[key] = contrib.get(key, 0.0) + (-1.0) ** (k - r)
            for key, weight in contrib.items():
                if weight != 0.0:
                    col = direction_index.setdefault(key, len(direction_index))
                    rows.append(row)
                    cols.append(col)
                    vals.append(weight / math.factorial(k))
        dirs = jnp.asarray(np.array(list(direction_index), dtype=np.float64), self._th0.dtype)
        dk = jax.vmap(self._flat_kth(k))(dirs)
        combine = np.zeros((len(multisets), len(direction_index)))
        np.add.at(combine, (np.array(rows), np.array(cols)), np.array(vals))
        entries = jnp.asarray(combine, dk.dtype) @ dk  # (num multisets, n)
        # Scatter each distinct entry to all its index permutations (the tensor is symmetric).
        index = np.empty((m,) * k, dtype=np.int64)
        for row, multiset in enumerate(multisets):
            for perm in set(itertools.permutations(multiset)):
                index[perm] = row
        tensor = entries[index.reshape(-1)].reshape((m,) * k + (n,))
        return jnp.moveaxis(tensor, -1, 0)

    # ------------------------------------------------------------------------------ accuracy

    def check_accuracy(
        self,
        solver: Callable[[PyTree], PyTree],
        deltas: Sequence[PyTree] | jax.Array,
        *,
        floor: float | None = None,
    ) -> AccuracyReport:
        """Compare the series at orders ``0..K`` with re-solved ``x*(θ₀+Δ)``.

        For each ``Δ`` the partial sums ``S_k = Σ_{j≤k} x_j / j!`` are compared with
        ``solver(θ₀ + Δ)``; in the disk of convergence the error falls with ``k`` roughly
        like ``(‖Δ‖/ρ)^{k+1}``. A crude radius ``ρ`` is estimated from the coefficients
        ``c_k = x_k / k!`` by the root and ratio tests at the last order.

        Parameters
        ----------
        solver
            ``solver(theta) -> x``: re-solves the problem at ``theta`` (same pytrees as
            ``theta0`` and ``x0``), accurately.
        deltas
            Directions ``Δᵢ``: a sequence of pytrees shaped like ``theta0``, or an array whose
            leading axis indexes the directions.
        floor
            Errors below this are attributed to the solver's accuracy (default
            ``100 eps max(1, ‖x*‖)``).

        Examples
        --------
        >>> import jax.numpy as jnp
        >>> f = lambda x, lam: 0.5 * (1.0 + lam) * x**2 - x       # x*(λ) = 1 / (1 + λ)
        >>> te = TaylorExpansion(f, jnp.array(1.0), jnp.array(0.0), order=3)
        >>> report = te.check_accuracy(lambda lam: 1.0 / (1.0 + lam), [0.1, 0.3])
        >>> report.ok, report.radius.round(2).tolist()                # true radius: 1
        (True, [1.0, 1.0])
        """
        if isinstance(deltas, jax.Array | np.ndarray) and np.ndim(deltas) > np.ndim(self._th0):
            deltas = list(deltas)
        eps = float(jnp.finfo(self._dtype).eps)
        errors, norms, radii, decreasing, floors = [], [], [], [], []
        for delta in deltas:
            flat_delta = self._flat_delta(delta)
            xs = [ravel_pytree(xk)[0] for xk in self.derivatives(delta)]
            truth = ravel_pytree(solver(self._unravel_th(self._th0 + flat_delta)))[0]
            partial = self._x0
            errs = [float(jnp.linalg.norm(partial - truth))]
            for k, xk in enumerate(xs, start=1):
                partial = partial + xk / math.factorial(k)
                errs.append(float(jnp.linalg.norm(partial - truth)))
            level = (
                floor if floor is not None else 100 * eps * max(1.0, float(jnp.linalg.norm(truth)))
            )
            errs_arr = np.array(errs)
            falls = (errs_arr[1:] <= errs_arr[:-1]) | (errs_arr[1:] <= level)
            coeffs = [float(jnp.linalg.norm(xk)) / math.factorial(k) for k, xk in enumerate(xs, 1)]
            radius_t = _radius_estimate(coeffs)
            dnorm = float(jnp.linalg.norm(flat_delta))
            errors.append(errs_arr)
            norms.append(dnorm)
            radii.append(radius_t * dnorm)
            decreasing.append(bool(np.all(falls)))
            floors.append(level)
        errors_arr = np.array(errors)
        with np.errstate(divide="ignore", invalid="ignore"):
            relative = errors_arr / errors_arr[:, :1]
        return AccuracyReport(
            delta_norms=np.array(norms),
            errors=errors_arr,
            relative_errors=relative,
            decreasing=np.array(decreasing),
            radius=np.array(radii),
            floor=float(max(floors)) if floors else 0.0,
        )

    def __repr__(self) -> str:
        return (
            f"TaylorExpansion(order={self._order}, n={self._x0.size}, m={self._th0.size}, "
            f"method={self._method!r}, linear_solver={self._linear_solver!r})"
        )


def _validate_order(order: Any, *, minimum: int) -> int:
    """An order is a whole number: ``order=1.5`` must not be silently truncated to 1."""
    if isinstance(order, bool) or not float(order).is_integer():
        raise ValueError(f"order must be a whole number (an int), got {order!r}.")
    if int(order) < minimum:
        raise ValueError(f"order must be at least {minimum}, got {order!r}.")
    return int(order)


def _radius_estimate(coeffs: Sequence[float]) -> float:
    """Radius of convergence in ``t`` from ``‖c_k‖``: min of the root and ratio tests at K."""
    last = coeffs[-1]
    if last == 0.0 or not np.isfinite(last):
        return float("inf")
    root = last ** (-1.0 / len(coeffs))
    ratio = coeffs[-2] / last if len(coeffs) >= 2 and coeffs[-2] > 0 else float("inf")
    return float(min(root, ratio))


def taylor_expand(
    fn: Callable[..., PyTree],
    x0: PyTree,
    theta0: PyTree,
    order: int = 4,
    **kwargs: Any,
) -> TaylorExpansion:
    """Build a :class:`TaylorExpansion` of ``x*(θ) = argmin_x fn(x, θ)`` around ``(x0, θ0)``.

    Pass ``optimality=True`` to expand the root of ``fn(x, θ) = 0`` instead. Other keyword
    arguments are those of :class:`TaylorExpansion`.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> f = lambda x, lam: 0.5 * (1.0 + lam) * x**2 - x       # x*(λ) = 1 / (1 + λ)
    >>> te = taylor_expand(f, jnp.array(1.0), jnp.array(0.0), order=2)
    >>> [round(float(d), 4) for d in te.derivatives(1.0)]     # -1, 2
    [-1.0, 2.0]
    """
    return TaylorExpansion(fn, x0, theta0, order, **kwargs)
