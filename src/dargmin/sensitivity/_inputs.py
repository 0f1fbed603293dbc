"""The inputs of :mod:`dargmin.sensitivity`: their types, the example axis, the conversion of
pandas leaves, and the errors that name non-finite inputs.

``data`` is a pytree of arrays whose leading axis indexes the ``n`` examples; pandas
``DataFrame`` / ``Series`` leaves are converted with ``.to_numpy()`` and non-numeric ones are
refused with a message, before JAX would fail deep inside tracing.
"""

from __future__ import annotations

import functools
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


@functools.partial(jax.jit, static_argnums=(1,))
def _first_true(mask: jax.Array, shown: int) -> tuple[jax.Array, jax.Array]:
    # `shown` successive minimum reductions rather than jnp.flatnonzero: XLA lowers
    # flatnonzero of a row-sharded mask to an all-gather of the mask (measured); a minimum
    # is a local reduction plus an all-reduce of one scalar.
    n = mask.shape[0]
    candidates = jnp.where(mask, jnp.arange(n), n)

    def step(k: int, state: tuple[jax.Array, jax.Array]):
        found, last = state
        index = jnp.min(jnp.where(candidates > last, candidates, n))
        return found.at[k].set(jnp.where(index < n, index, -1)), index

    first, _ = jax.lax.fori_loop(0, shown, step, (jnp.full(shown, -1), jnp.asarray(-1)))
    return jnp.sum(mask), first


def _first_rows(mask: jax.Array, shown: int = 5) -> tuple[int, list[int]]:
    """How many entries of the boolean vector ``mask`` are true, and the first ``shown``.

    Computed where ``mask`` lives: on row-sharded data only these few integers come to the
    host, never the mask (messages name examples without moving them).
    """
    count, first = _first_true(mask, shown)
    return int(count), [int(i) for i in first.tolist() if i >= 0]


@jax.jit
def _leaf_counts(leaf: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Non-finite entries, NaNs among them, and per example (leading axis): any non-finite."""
    bad = ~jnp.isfinite(leaf)
    rows = bad.reshape(bad.shape[0], -1).any(axis=1) if bad.ndim else bad.reshape(1)
    return jnp.sum(bad), jnp.sum(jnp.isnan(leaf)), rows


def _leaf_counts_host(leaf: Any) -> tuple[Any, Any, Any]:
    values = np.asarray(leaf)
    bad = ~np.isfinite(values)
    rows = bad.reshape(bad.shape[0], -1).any(axis=1) if bad.ndim else bad.reshape(1)
    return np.count_nonzero(bad), np.count_nonzero(np.isnan(values)), rows


def _nonfinite_leaves(tree: PyTree, name: str, per_example: bool) -> list[str]:
    """One phrase per leaf of ``tree`` that holds NaN or inf: where, how many, which examples.

    Counted on the device that holds each leaf: only counts and example indices reach the
    host, so a row-sharded leaf is never gathered to say where its NaNs are.
    """
    phrases = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            continue
        # Host arrays are counted on the host (jnp.asarray could round float64 to float32
        # and turn a huge finite value into inf); device arrays where they live.
        counts = _leaf_counts if isinstance(leaf, jax.Array) else _leaf_counts_host
        total, nans, rows = counts(leaf)
        count, nans = int(total), int(nans)
        if not count:
            continue
        size = int(np.prod(jnp.shape(leaf)))
        phrase = (
            f"{name}{jax.tree_util.keystr(path)} holds {count} non-finite value"
            f"{'s' if count > 1 else ''} ({nans} NaN, {count - nans} ±inf) among its "
            f"{size} entries"
        )
        if per_example and jnp.ndim(leaf):
            n_bad, first = _first_rows(jnp.asarray(rows))
            phrase += f", in {n_bad} of {jnp.shape(leaf)[0]} examples (first: {first})"
        phrases.append(phrase)
    return phrases
