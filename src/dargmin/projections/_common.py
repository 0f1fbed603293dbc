"""Array helpers shared by the projections and proximal operators."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dargmin.typing import ArrayLike


def _as_float(x: ArrayLike) -> jax.Array:
    """``x`` as a floating array (integers become the default float type)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(jnp.result_type(float))
    return x


def _like(value: ArrayLike, x: jax.Array) -> jax.Array:
    """A parameter in ``x``'s dtype (so custom_jvp tangents are floats, never float0)."""
    return jnp.asarray(value, dtype=x.dtype)
