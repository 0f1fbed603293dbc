"""Taylor-mode machinery of :mod:`dargmin.taylor`: the residuals ``r_k``.

:class:`~dargmin.taylor.TaylorExpansion` solves ``H x_k = -r_k`` order after order, where
``r_k`` is the k-th derivative of ``φ(t) = g(x(t), θ₀ + tΔ)`` at ``t = 0`` with ``x_k = 0``.
This module computes ``r_k``:

* :func:`_residual_jet`: Taylor mode on the jaxpr of ``g`` (:func:`_taylor_eval`), with zero
  coefficients kept symbolic through the linear and bilinear primitives; every other
  primitive goes through :mod:`jax.experimental.jet`'s own rule;
* :func:`_residual_nested`: the same numbers by ``k`` nested ``jax.jvp`` (cost ``2^k``), the
  fallback where jet has no rule (:func:`_select_method` decides, :func:`_jet_failure` names
  the primitive).

The directions that turn directional derivatives into mixed ones live in
:mod:`dargmin.taylor_polarization`, the comparison of the series with re-solved optima
(:class:`~dargmin.taylor_accuracy.AccuracyReport`) in :mod:`dargmin.taylor_accuracy`, the
linear system and the order-by-order solves in :mod:`dargmin.taylor_system`.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import jet
from jax.extend import core as jex_core

from dargmin.errors import DargminWarning
from dargmin.taylor_accuracy import AccuracyReport  # lived here before: still importable

__all__ = ["AccuracyReport"]


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

    fn: Callable[[jax.Array], jax.Array] = curve
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


def _select_method(
    g: Callable[[jax.Array, jax.Array], jax.Array],
    x0: jax.Array,
    th0: jax.Array,
    order: int,
    method: str,
) -> str:
    """Trace the jet path once; fall back to nested forward mode where jet cannot go."""
    if method == "nested":
        return "nested"
    xs = [jnp.zeros_like(x0)] * (order - 1)
    try:
        jax.eval_shape(
            lambda d: _residual_jet(g, x0, th0, d, xs),
            jax.ShapeDtypeStruct(th0.shape, th0.dtype),
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
            DargminWarning,
            stacklevel=4,
        )
        return "nested"
    return "jet"
