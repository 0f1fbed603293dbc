"""Penalty maps ``θ ↦ (λ(θ), μ(θ))`` of :mod:`dargmin.hyper`'s problems: the JAX vectors and
their VJP (jitted, the maps static), the built-in maps of the model factories (``e^{θ_k}``),
and the NumPy twins of those maps, so that the outer loop's host-side bookkeeping needs no
JAX dispatch.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any
PenaltyMap = Callable[[Array], Array]


def _vec(t: Array, fn: PenaltyMap | None, p: int, augmented: bool) -> Array:
    dtype = jnp.result_type(float)
    v = jnp.zeros(p, dtype) if fn is None else jnp.broadcast_to(jnp.asarray(fn(t), dtype), (p,))
    return jnp.concatenate([v, jnp.zeros(1, dtype)]) if augmented else v


# The penalty maps are static arguments: module-level functions such as ``_exp0`` are shared
# by every problem of a model, so cross-validation folds reuse one compiled function.
@partial(jax.jit, static_argnames=("l1", "l2", "p", "augmented"))
def _penalty_vectors(t, l1, l2, p, augmented):
    return _vec(t, l1, p, augmented), _vec(t, l2, p, augmented)


@partial(jax.jit, static_argnames=("l1", "l2", "p", "augmented"))
def _penalty_vjp(t, c1, c2, l1, l2, p, augmented):
    _, vjp = jax.vjp(lambda tt: _penalty_vectors(tt, l1, l2, p, augmented), t)
    return vjp((c1, c2))[0]


def _exp0(t: Array) -> Array:
    return jnp.exp(t[0])


def _exp1(t: Array) -> Array:
    return jnp.exp(t[1])


def _exp_all(t: Array) -> Array:
    return jnp.exp(t)


def _vjp0(t: np.ndarray, c: np.ndarray, out: np.ndarray) -> None:
    out[0] += np.exp(t[0]) * c.sum()


def _vjp1(t: np.ndarray, c: np.ndarray, out: np.ndarray) -> None:
    out[1] += np.exp(t[1]) * c.sum()


def _vjp_all(t: np.ndarray, c: np.ndarray, out: np.ndarray) -> None:
    out += np.exp(t) * c


#: NumPy twins of the factories' penalty maps (value, and VJP accumulated into ``out``),
#: so that the host-side bookkeeping of the outer loop needs no JAX dispatch.
_HOST_VALUE: dict[Any, Callable[[np.ndarray], np.ndarray]] = {
    _exp0: lambda t: np.exp(t[:1]),
    _exp1: lambda t: np.exp(t[1:2]),
    _exp_all: np.exp,
}
_HOST_VJP: dict[Any, Callable[[np.ndarray, np.ndarray, np.ndarray], None]] = {
    _exp0: _vjp0,
    _exp1: _vjp1,
    _exp_all: _vjp_all,
}


def _host_maps(l1: Any, l2: Any) -> tuple[Callable, Callable] | None:
    """NumPy versions of ``(l1, l2)`` (an absent map gives zeros), or ``None`` when one of
    them is a user function (then JAX computes it)."""
    maps = []
    for fn in (l1, l2):
        if fn is None:
            maps.append(lambda t: np.zeros(1))
        elif fn in _HOST_VALUE:
            maps.append(_HOST_VALUE[fn])
        else:
            return None
    return maps[0], maps[1]
