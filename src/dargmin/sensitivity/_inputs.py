"""The inputs of :mod:`dargmin.sensitivity`: their types, the example axis, the conversion of
pandas leaves, and the errors that name non-finite inputs.

``data`` is a pytree of arrays whose leading axis indexes the ``n`` examples; pandas
``DataFrame`` / ``Series`` leaves are converted with ``.to_numpy()`` and non-numeric ones are
refused with a message, before JAX would fail deep inside tracing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from dargmin.diagnostics import (
    DargminError,
)

PyTree = Any
Loss = Callable[[PyTree, PyTree], jax.Array]
Regularizer = Callable[[PyTree], jax.Array] | None
LinearSolver = Literal["auto", "cholesky", "lu", "cg"]
CheckMode = Literal["raise", "warn", "ignore"]


def _num_examples(data: PyTree) -> int:
    leaves = jax.tree_util.tree_leaves(data)
    if not leaves:
        raise ValueError("data must be a pytree with at least one array leaf.")
    sizes = {int(jnp.shape(leaf)[0]) if jnp.ndim(leaf) > 0 else -1 for leaf in leaves}
    if len(sizes) != 1 or -1 in sizes:
        shapes = [jnp.shape(leaf) for leaf in leaves]
        raise ValueError(
            "Every leaf of data must have the same leading (example) axis; got leaves of "
            f"shapes {shapes}."
        )
    n = sizes.pop()
    if n < 1:
        raise ValueError("data holds no examples (leading axis of size 0).")
    return n


def _is_numeric(dtype: Any) -> bool:
    try:
        return bool(jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_))
    except TypeError:  # a pandas extension dtype (Int64, category, string, ...)
        return getattr(dtype, "kind", "O") in "biufc"


def _is_frame(leaf: Any) -> bool:
    """A pandas ``DataFrame`` / ``Series`` (or a look-alike), told by duck typing."""
    return not isinstance(leaf, np.ndarray | np.generic | jax.Array) and callable(
        getattr(leaf, "to_numpy", None)
    )


def _frame_to_numpy(frame: Any, where: str, caller: str) -> np.ndarray:
    dtypes: Any = getattr(frame, "dtypes", None)
    if hasattr(dtypes, "items"):  # a DataFrame: one dtype per column
        columns, what = list(dtypes.items()), "column(s)"
    else:  # a Series
        columns, what = [(getattr(frame, "name", None), getattr(frame, "dtype", None))], "values"
    bad = [
        f"{name!r} ({dtype})"
        for name, dtype in columns
        if dtype is not None and not _is_numeric(dtype)
    ]
    kind = type(frame).__name__
    refusal = (
        f"dargmin.sensitivity.{caller}: {where} is a {kind} with non-numeric {what} "
        "{}: the loss needs numbers. Drop or encode them (e.g. pandas.get_dummies) first."
    )
    if bad:
        raise TypeError(refusal.format(", ".join(bad)))
    values = np.asarray(frame.to_numpy())
    if not _is_numeric(values.dtype):
        # Nullable extension dtypes (Int64, Float64, boolean) and mixed bool / number
        # columns come out as objects; missing values become NaN (and are then reported).
        try:
            values = np.asarray(frame.to_numpy(dtype=np.float64, na_value=np.nan))
        except (TypeError, ValueError):
            raise TypeError(refusal.format(f"of dtype {values.dtype}")) from None
    return values


def _as_arrays(tree: PyTree, name: str, caller: str) -> PyTree:
    """``tree`` with pandas ``DataFrame`` / ``Series`` leaves turned into NumPy arrays.

    JAX does not know these types (they are not arrays or pytrees) and fails deep inside
    tracing; non-numeric leaves (strings, objects, dates) are refused here with a message.
    """

    def convert(path: Any, leaf: Any) -> Any:
        where = f"{name}{jax.tree_util.keystr(path)}"
        if _is_frame(leaf):
            return _frame_to_numpy(leaf, where, caller)
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and not _is_numeric(dtype):
            raise TypeError(
                f"dargmin.sensitivity.{caller}: {where} has the non-numeric dtype {dtype}: "
                "the loss needs numbers. Drop or encode it first."
            )
        return leaf

    return jax.tree_util.tree_map_with_path(convert, tree)


def _refusal(error: type[DargminError], reason: str, message: str) -> DargminError:
    """``error(message)`` ending with the stable ``[reason: …]`` code, like dargmin's others."""
    exception = error(f"{message} [reason: {reason}]")
    exception.reason = reason
    return exception


def _nonfinite_leaves(tree: PyTree, name: str, per_example: bool) -> list[str]:
    """One phrase per leaf of ``tree`` that holds NaN or inf: where, how many, which examples."""
    phrases = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        values = np.asarray(leaf)
        if not jnp.issubdtype(values.dtype, jnp.inexact):
            continue
        bad = ~np.isfinite(values)
        count = int(np.count_nonzero(bad))
        if not count:
            continue
        nans = int(np.count_nonzero(np.isnan(values)))
        phrase = (
            f"{name}{jax.tree_util.keystr(path)} holds {count} non-finite value"
            f"{'s' if count > 1 else ''} ({nans} NaN, {count - nans} ±inf) among its "
            f"{values.size} entries"
        )
        if per_example and values.ndim:
            rows = np.flatnonzero(bad.reshape(values.shape[0], -1).any(axis=1))
            phrase += f", in {rows.size} of {values.shape[0]} examples (first: {rows[:5].tolist()})"
        phrases.append(phrase)
    return phrases
