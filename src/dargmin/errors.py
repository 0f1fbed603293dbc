"""dargmin's error types and their stable reason codes (the bottom layer: no dargmin imports).

Every refusal is a :class:`DargminError` whose message ends in ``[reason: <code>]``; the
code is also the error's ``reason`` attribute. Under ``jax.jit`` the error surfaces wrapped
in a ``jax.errors.JaxRuntimeError`` (it is raised from a host callback); :func:`failure_reason`
reads the code from either, and :func:`reraise_typed` restores the typed error for eager
callers.
"""

from __future__ import annotations

import logging
import re
import warnings


class DargminError(ValueError):
    """Base class of dargmin's errors about the problem being differentiated.

    Attributes
    ----------
    reason
        A stable code for what went wrong: ``"nonfinite"``, ``"singular"``,
        ``"ill_conditioned"``, ``"not_minimum"``, ``"not_stationary"`` (or ``None``). Under
        ``jax.jit`` the error reaches the caller wrapped in a ``jax.errors.JaxRuntimeError``;
        :func:`failure_reason` reads the same code from either.
    """

    reason: str | None = None


class NonStationaryPointError(DargminError):
    """The solution is not a root of the optimality condition (not converged)."""


class SingularSystemError(DargminError):
    """``∂ₓg`` (the Hessian for an argmin) is singular, nearly singular or not definite."""


class DargminWarning(UserWarning):
    """Warning counterpart of :class:`DargminError` (``check="warn"``)."""


class _DropDargminCallbackTracebacks(logging.Filter):
    """JAX logs a traceback for every exception raised in a host callback before it re-raises
    it; ours carry a complete message already, so the log would only repeat it."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, DargminError)


for _logger_name in ("jax._src.debugging", "jax._src.callback"):
    logging.getLogger(_logger_name).addFilter(_DropDargminCallbackTracebacks())


_ERROR_TYPES: dict[str, type[DargminError]] = {
    cls.__name__: cls for cls in (DargminError, NonStationaryPointError, SingularSystemError)
}


def reraise_typed(err: Exception) -> None:
    """Re-raise a dargmin error that surfaced as a ``JaxRuntimeError`` from compiled code.

    Checks run in a host callback; when they fail inside compiled code JAX wraps the
    exception. Where the caller is eager, the typed error (with its message) is restored so
    that ``except dargmin.NonStationaryPointError`` works. Returns if ``err`` is not ours.
    """
    text = str(err)
    match = re.search(r"(\w+Error): (dargmin\.\w+: .*)", text, flags=re.S)
    if match and match.group(1) in _ERROR_TYPES:
        message = match.group(2).strip().splitlines()[0]
        error = _ERROR_TYPES[match.group(1)](message)
        error.reason = failure_reason(err)
        raise error from None


_REASON = re.compile(r"\[reason: (\w+)\]")


def failure_reason(err: BaseException) -> str | None:
    """The stable reason code of a dargmin refusal, typed or wrapped by JAX.

    Eagerly, dargmin raises :class:`NonStationaryPointError` / :class:`SingularSystemError`;
    inside ``jax.jit`` JAX wraps them in ``jax.errors.JaxRuntimeError``. Both carry the code
    ``[reason: …]`` at the end of dargmin's sentence; this returns it (``None`` if ``err``
    is not a dargmin refusal), so callers need no regular expression of their own.

    Examples
    --------
    >>> failure_reason(NonStationaryPointError("… [reason: not_stationary]"))
    'not_stationary'
    >>> failure_reason(RuntimeError("unrelated")) is None
    True
    """
    if isinstance(err, DargminError) and err.reason is not None:
        return err.reason
    match = _REASON.search(str(err))
    return match.group(1) if match else None


#: Appended to a refusal reported as a warning in a multi-device process (see
#: :func:`refusal_from_callback`).
MULTI_DEVICE_NOTE = (
    " (multi-device process: the refusal is reported as this warning and the derivative is "
    "NaN, because raising inside a program partitioned over several devices stalls the "
    "devices that did not raise)"
)


def multi_device() -> bool:
    """Whether this process sees more than one JAX device.

    A host callback runs on one device of a partitioned (SPMD) program; if it raised, the
    other devices would wait for it at their next collective until XLA aborts the process
    (measured: a 40 s stall, then a crash). Where a program may be partitioned, dargmin's
    callbacks therefore report a refusal as a :class:`DargminWarning` and poison the
    derivative with NaN instead of raising. Read on the host when the callback runs.
    """
    import jax  # the bottom layer stays importable without JAX's start-up cost

    return jax.device_count() > 1


def refusal_from_callback(error: DargminError, shape: tuple[int, ...], dtype: object):
    """In a host callback: raise ``error`` (one device), or, in a multi-device process,
    warn with its message and return NaN of ``shape`` (the caller adds the result to the
    derivative, which becomes NaN: never a silent number)."""
    import numpy as np

    if not multi_device():
        raise error
    warnings.warn(str(error) + MULTI_DEVICE_NOTE, DargminWarning, stacklevel=3)
    return np.full(shape, np.nan, dtype=dtype)
