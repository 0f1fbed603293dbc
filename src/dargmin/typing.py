"""Type aliases used in dargmin's public signatures.

The aliases are built on `jaxtyping <https://docs.kidger.site/jaxtyping/>`_, so the shape
strings document the expected layout (``"n"``: one axis of length n, ``""``: a scalar),
but they are **static only**: dargmin decorates nothing with a runtime type checker, and a
static checker (mypy) sees ``Float[Array, "n"]`` as plain :class:`jax.Array` and
:data:`PyTree` as ``Any``. Shapes and dtypes are checked by the functions themselves,
where it matters, with explicit error messages.

=================  ===========================================================================
``PyTree``         any pytree of arrays (nested tuples, lists, dicts, dataclasses, ...);
                   ``PyTree[Float[Array, "n"]]`` names the leaf type (jaxtyping's
                   :data:`jaxtyping.PyTree`)
``Scalar``         a floating array of shape ``()``
``BoolScalar``     a boolean array of shape ``()`` (a flag computed under ``jax.jit``)
``IntScalar``      an integer array of shape ``()`` (e.g. an iteration count)
``Vector``         a floating array of shape ``(n,)``
``Matrix``         a floating array of shape ``(m, n)``
``ArrayLike``      anything :func:`jax.numpy.asarray` accepts (:data:`jax.typing.ArrayLike`)
``ScalarLike``     a Python number or a scalar array
``DTypeLike``      anything :func:`jax.numpy.dtype` accepts (:data:`jax.typing.DTypeLike`)
``PRNGKey``        a ``jax.random`` key (new-style typed key or legacy ``uint32[2]``)
``Matvec``         a linear map on pytrees, ``v -> A v``
``FlatMatvec``     a linear map on flat vectors
=================  ===========================================================================

Examples
--------
>>> import jax.numpy as jnp
>>> from dargmin.typing import Scalar, Vector
>>> def squared_norm(x: Vector) -> Scalar:
...     return jnp.sum(x**2)
>>> squared_norm(jnp.array([3.0, 4.0]))
Array(25., dtype=float32)
"""

from __future__ import annotations

from collections.abc import Callable

from jax.typing import ArrayLike, DTypeLike
from jaxtyping import Array, Bool, Float, Int, Key, PyTree, UInt32

__all__ = [
    "ArrayLike",
    "BoolScalar",
    "DTypeLike",
    "FlatMatvec",
    "IntScalar",
    "Matrix",
    "Matvec",
    "PRNGKey",
    "PyTree",
    "Scalar",
    "ScalarLike",
    "Vector",
]

Scalar = Float[Array, ""]
BoolScalar = Bool[Array, ""]
IntScalar = Int[Array, ""]
Vector = Float[Array, "n"]
Matrix = Float[Array, "m n"]
ScalarLike = float | int | Scalar
PRNGKey = Key[Array, ""] | UInt32[Array, "2"]
Matvec = Callable[[PyTree], PyTree]
FlatMatvec = Callable[[Vector], Vector]
