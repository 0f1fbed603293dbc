"""Refusals and warnings of the imaging solvers, eager and under ``jax.jit`` / ``jax.vmap``.

Shapes are static, so a wrong shape is refused while tracing. Values (NaN pixels, ``θ ≤ 0``)
and the solver's convergence are known only at run time: on concrete inputs they are judged
at once in Python; on traced ones the verdict's trigger is computed on the device and the
host is called (``jax.pure_callback``, as :func:`dargmin.diagnostics.report` does) only when
some batch member fails, to raise or warn with that member's numbers. Every refusal is a
:class:`~dargmin.DargminError` ending with ``[reason: <code>]``:

* ``nonfinite``: NaN or inf pixels in ``y``, or a non-finite ``θ``;
* ``out_of_domain``: ``θ ≤ 0`` or ``σ ≤ 0``;
* ``bad_shape``: ``y``, ``θ`` or the tangents do not match the problem.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from dargmin.errors import DargminError, DargminWarning, refusal_from_callback


def refusal(reason: str, message: str) -> DargminError:
    """A :class:`~dargmin.DargminError` whose message ends with ``[reason: reason]``."""
    error = DargminError(f"{message} [reason: {reason}]")
    error.reason = reason
    return error


def is_traced(*arrays: Any) -> bool:
    """Whether any of ``arrays`` is a JAX tracer (under ``jit``, ``vmap``, ``jvp``...)."""
    return any(isinstance(a, jax.core.Tracer) for a in arrays)


def _value_problems(n_bad: int, first: int, shape: tuple[int, ...], theta: np.ndarray) -> list:
    """``(reason, sentence)`` for one member: non-finite pixels, then a bad ``θ``."""
    problems = []
    if n_bad:
        where = [int(i) for i in np.unravel_index(first, shape)] if shape else []
        problems.append(
            (
                "nonfinite",
                f"y has {n_bad} non-finite pixel(s) (first at index {where}); inpaint or "
                "mask them before restoring.",
            )
        )
    if not (np.all(np.isfinite(theta)) and np.all(theta > 0)):
        code = "out_of_domain" if np.all(np.isfinite(theta)) else "nonfinite"
        problems.append(
            (
                code,
                f"theta (the regularization weights) must be finite and > 0, got {theta.tolist()}.",
            )
        )
    return problems


def _refuse_members(what: str, failing: list, batch_shape: tuple[int, ...]) -> DargminError:
    problems = failing[0][1]
    where = ""
    if batch_shape:
        named = ", ".join(
            str(tuple(int(j) for j in np.unravel_index(k, batch_shape))) for k, _ in failing[:10]
        )
        where = f" (batch member(s) {named} of a batch of shape {batch_shape}; the first's numbers)"
    text = " Also, ".join(sentence for _, sentence in problems)
    return refusal(problems[0][0], f"dargmin.imaging.{what}{where}: {text}")


def check_values(what: str, y: Array, theta: Array) -> Array:
    """Refuse non-finite pixels and a non-finite or non-positive ``θ``.

    Returns a zero scalar (batched under ``vmap``) that the caller adds to ``y``, so that
    under tracing the check runs before, and cannot be dropped from, the solve.
    """
    # Under an eager jax.jvp / jacfwd / grad the values are concrete below the derivative
    # tracer: judge them at once, with the typed error.
    y_c, th_c = jax.lax.stop_gradient(y), jax.lax.stop_gradient(theta)
    if not is_traced(y_c, th_c):
        y_np, th_np = np.asarray(y_c), np.asarray(th_c)
        bad = ~np.isfinite(y_np)
        first_bad = int(np.argmax(bad.ravel())) if bad.any() else 0
        problems = _value_problems(int(bad.sum()), first_bad, y_np.shape, th_np)
        if problems:
            raise _refuse_members(what, [(0, problems)], ())
        return jnp.zeros((), y.dtype)
    bad_y = ~jnp.isfinite(y)
    n_bad = jnp.sum(bad_y)
    first = jnp.argmax(bad_y.ravel())
    trigger = (n_bad > 0) | jnp.any(~jnp.isfinite(theta)) | jnp.any(theta <= 0)
    shape, dtype = y.shape, y.dtype

    def host(n: Any, f: Any, th: Any) -> np.ndarray:
        n, f, th = np.asarray(n), np.asarray(f), np.asarray(th)
        batch = np.broadcast_shapes(n.shape, f.shape, th.shape[:-1])
        n, f = np.broadcast_to(n, batch).ravel(), np.broadcast_to(f, batch).ravel()
        th = np.broadcast_to(th, (*batch, th.shape[-1])).reshape(-1, th.shape[-1])
        failing = [
            (k, p)
            for k in range(n.size)
            if (p := _value_problems(int(n[k]), int(f[k]), shape, th[k]))
        ]
        out = np.zeros(batch, dtype)
        if not failing:
            return out
        return refusal_from_callback(_refuse_members(what, failing, batch), batch, dtype)

    def call_host(args: tuple) -> Array:
        spec = jax.ShapeDtypeStruct((), dtype)
        return jax.pure_callback(host, spec, *args, vmap_method="expand_dims")

    args = tuple(jax.lax.stop_gradient(a) for a in (n_bad, first, theta))
    return jax.lax.cond(eqxi.unvmap_any(trigger), call_host, lambda a: jnp.zeros((), dtype), args)


def warn_members(what: str, sentence: Callable[..., str | None], *values: Array) -> Array:
    """Warn (:class:`~dargmin.DargminWarning`) with ``sentence(*member's values)`` for every
    member (every batch member under ``vmap``) for which it is not ``None``.

    ``values`` are scalars per member; the first is the trigger (``True``: may warn), judged
    on the device so that the host is called only when needed. Returns a zero scalar for
    the caller to add to its outputs (traced: the callback then cannot be dropped).
    """
    dtype = jnp.result_type(float)
    if not is_traced(*values):
        text = sentence(*(np.asarray(v).item() for v in values))
        if text is not None:
            warnings.warn(f"dargmin.imaging.{what}: {text}", DargminWarning, stacklevel=3)
        return jnp.zeros((), dtype)

    def host(*arrays: Any) -> np.ndarray:
        arrays = np.broadcast_arrays(*(np.asarray(a) for a in arrays))
        for idx in np.ndindex(arrays[0].shape):
            text = sentence(*(a[idx].item() for a in arrays))
            if text is not None:
                member = f" (batch member {idx})" if idx else ""
                warnings.warn(
                    f"dargmin.imaging.{what}{member}: {text}", DargminWarning, stacklevel=2
                )
        return np.zeros(arrays[0].shape, dtype)

    def call_host(args: tuple) -> Array:
        spec = jax.ShapeDtypeStruct((), dtype)
        return jax.pure_callback(host, spec, *args, vmap_method="expand_dims")

    args = tuple(jax.lax.stop_gradient(v) for v in values)
    return jax.lax.cond(eqxi.unvmap_any(values[0]), call_host, lambda a: jnp.zeros((), dtype), args)


def warn_if_unconverged(
    what: str, converged: Array, gap: Array, primal: Array, n_iter: Array, tol: float
) -> Array:
    """Warn with the gap when the solver stopped at ``max_iter`` above ``tol > 0``."""
    if tol <= 0:  # a fixed iteration count (iterative SURE / SUGAR): nothing to reach
        return jnp.zeros((), jnp.result_type(float))

    def sentence(stopped: bool, g: float, p: float, k: int) -> str | None:
        if not stopped:
            return None
        rel = g / max(abs(p), np.finfo(float).tiny)
        return (
            f"Chambolle–Pock stopped after {k} iterations with duality gap {g:.3g} (relative "
            f"{rel:.3g}), above tol={tol:g}; the solution (and any derivative or risk "
            "estimate built on it) is inexact. Raise max_iter or loosen tol."
        )

    return warn_members(what, sentence, ~converged, gap, primal, n_iter)


def warn_if_tangents_moving(
    what: str, moving: Array, change: Array, limit: float, block: int
) -> Array:
    """Warn when the tangents still moved by more than ``limit`` (relative, see
    :class:`~dargmin.imaging.ChambollePock`) over the last ``block`` iterations: the
    derivative of the returned iterate is then not that of the solution."""

    def sentence(moving: bool, c: float) -> str | None:
        if not moving:
            return None
        return (
            f"the primal-dual gap is below tol but the tangents still changed by {c:.3g} "
            f"(relative) over the last {block} iterations, above √tol = {limit:.3g}: the "
            "derivative of the returned iterate is not yet that of the solution (typical "
            "for θ near 0, where the gap certifies w but not w − y). Pass "
            "ChambollePock(tangent_tol=...) to iterate until they settle, or tighten tol."
        )

    return warn_members(what, sentence, moving, change)
