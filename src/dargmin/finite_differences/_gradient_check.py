"""The gradient checker: JAX's derivatives against finite differences, leaf by leaf, with a
report that says which leaves fail and by how much."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from dargmin.finite_differences._derivatives import gradient_fd, jacobian_fd
from dargmin.finite_differences._stencils import Method, _float_dtype
from dargmin.typing import PyTree


@dataclasses.dataclass(frozen=True)
class LeafError:
    r"""Errors of one Jacobian leaf in a :class:`GradientCheckReport`.

    Attributes
    ----------
    name
        Path of the leaf (``jax.tree_util.keystr``), ``"<root>"`` for a bare array.
    shape
        Leaf shape.
    max_abs_error
        :math:`\max |J_{\mathrm{AD}} - J_{\mathrm{FD}}|`.
    max_rel_error
        :math:`\max |J_{\mathrm{AD}} - J_{\mathrm{FD}}| / \max(|J_{\mathrm{FD}}|, \mathrm{tiny})`.
    tolerance_ratio
        :math:`\max |J_{\mathrm{AD}} - J_{\mathrm{FD}}| / (\mathrm{atol} + \mathrm{rtol}
        |J_{\mathrm{FD}}|)`; the leaf passes when it is at most 1.
    """

    name: str
    shape: tuple[int, ...]
    max_abs_error: float
    max_rel_error: float
    tolerance_ratio: float

    @property
    def passed(self) -> bool:
        """Whether every entry satisfies the tolerance."""
        return bool(self.tolerance_ratio <= 1.0)


@dataclasses.dataclass(frozen=True)
class GradientCheckReport:
    r"""Comparison of automatic and finite-difference derivatives (see :func:`check_gradients`).

    Attributes
    ----------
    leaves
        One :class:`LeafError` per leaf of the derivative pytree.
    method
        Finite-difference method used.
    rtol, atol
        Tolerances of the test :math:`|J_{AD} - J_{FD}| \le \mathrm{atol} + \mathrm{rtol}
        |J_{FD}|` (elementwise).
    """

    leaves: tuple[LeafError, ...]
    method: str
    rtol: float
    atol: float

    @property
    def max_rel_error(self) -> float:
        """Largest relative error over all leaves."""
        return max((leaf.max_rel_error for leaf in self.leaves), default=0.0)

    @property
    def max_abs_error(self) -> float:
        """Largest absolute error over all leaves."""
        return max((leaf.max_abs_error for leaf in self.leaves), default=0.0)

    @property
    def passed(self) -> bool:
        """Whether every leaf passes."""
        return all(leaf.passed for leaf in self.leaves)

    def __str__(self) -> str:
        header = (
            f"{'leaf':<24} {'shape':<14} {'max abs err':>12} {'max rel err':>12} {'err/tol':>9}  ok"
        )
        lines = [
            f"gradient check ({self.method}, rtol={self.rtol:.1e}, atol={self.atol:.1e}): "
            + ("PASSED" if self.passed else "FAILED"),
            header,
            "-" * len(header),
        ]
        for leaf in self.leaves:
            lines.append(
                f"{leaf.name:<24} {leaf.shape!s:<14} {leaf.max_abs_error:>12.3e} "
                f"{leaf.max_rel_error:>12.3e} {leaf.tolerance_ratio:>9.2e}  "
                + ("yes" if leaf.passed else "NO")
            )
        return "\n".join(lines)


_DEFAULT_RTOL = {
    # Errors expected from each method, with a margin of ~100x, by dtype bits.
    64: {"richardson": 1e-6, "central": 1e-5, "forward": 1e-4, "backward": 1e-4},
    32: {"richardson": 1e-2, "central": 1e-2, "forward": 5e-2, "backward": 5e-2},
}


def check_gradients(
    f: Callable[[PyTree], PyTree],
    x: PyTree,
    *,
    method: Method = "richardson",
    rtol: float | None = None,
    atol: float | None = None,
    raise_on_failure: bool = True,
) -> GradientCheckReport:
    r"""Compare JAX's derivative of ``f`` at ``x`` with finite differences.

    For scalar ``f`` the reference is ``jax.grad(f)``, otherwise ``jax.jacobian(f)``;
    the finite-difference side is :func:`gradient_fd` / :func:`jacobian_fd`. An entry
    passes when :math:`|J_{AD} - J_{FD}| \le \mathrm{atol} + \mathrm{rtol}\,|J_{FD}|`.
    Not meant for ``jit`` (it returns a Python report).

    Parameters
    ----------
    f
        Function of a pytree (scalar or pytree output).
    x
        Point (pytree).
    method
        Finite-difference method, default ``"richardson"``.
    rtol
        Relative tolerance; default by method and dtype (float64: 1e-6 Richardson, 1e-5
        central, 1e-4 one-sided; float32: 1e-2, 1e-2, 5e-2).
    atol
        Absolute tolerance; default ``rtol`` times the largest finite-difference entry
        (at least ``rtol``), so entries that are exactly zero are judged relative to the
        scale of the whole derivative.
    raise_on_failure
        Raise ``AssertionError`` with the report table when the check fails.

    Returns
    -------
    GradientCheckReport
        Per-leaf errors, overall maxima and a ``passed`` flag; ``str()`` gives a table.

    Raises
    ------
    AssertionError
        If the check fails and ``raise_on_failure`` is true.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> report = check_gradients(lambda x: jnp.sum(jnp.sin(x)), jnp.array([0.1, 0.2]))
    >>> report.passed
    True
    """
    flat_x, _ = ravel_pytree(x)
    bits = jnp.finfo(_float_dtype(flat_x)).bits
    if rtol is None:
        rtol = _DEFAULT_RTOL[64 if bits >= 64 else 32][method]

    output_shape = jax.eval_shape(f, x)
    is_scalar = isinstance(output_shape, jax.ShapeDtypeStruct) and output_shape.shape == ()
    # One compiled program per check: eager mode would dispatch (and compile) each of the
    # many small stencil and tableau operations separately, which is much slower.
    if is_scalar:
        automatic = jax.jit(jax.grad(f))(x)
        numerical = jax.jit(lambda point: gradient_fd(f, point, method=method))(x)
    else:
        automatic = jax.jit(jax.jacobian(f))(x)
        numerical = jax.jit(lambda point: jacobian_fd(f, point, method=method))(x)

    numerical_leaves = jax.tree_util.tree_flatten_with_path(numerical)[0]
    automatic_leaves = jax.tree_util.tree_leaves(automatic)
    if atol is None:
        largest = max(
            (float(jnp.max(jnp.abs(leaf), initial=0.0)) for _, leaf in numerical_leaves),
            default=0.0,
        )
        atol = rtol * largest if largest > 0.0 else rtol

    leaf_errors = []
    for (path, fd_leaf), ad_leaf in zip(numerical_leaves, automatic_leaves, strict=True):
        fd_values = np.asarray(fd_leaf, dtype=np.float64)
        ad_values = np.asarray(ad_leaf, dtype=np.float64)
        abs_error = np.abs(ad_values - fd_values)
        tiny = np.finfo(np.float64).tiny
        rel_error = abs_error / np.maximum(np.abs(fd_values), tiny)
        ratio = abs_error / (atol + rtol * np.abs(fd_values))
        leaf_errors.append(
            LeafError(
                name=jax.tree_util.keystr(path) or "<root>",
                shape=tuple(fd_values.shape),
                max_abs_error=float(np.max(abs_error, initial=0.0)),
                max_rel_error=float(np.max(rel_error, initial=0.0)),
                tolerance_ratio=float(np.max(ratio, initial=0.0)),
            )
        )
    report = GradientCheckReport(tuple(leaf_errors), method, float(rtol), float(atol))
    if raise_on_failure and not report.passed:
        raise AssertionError(str(report))
    return report


def check_grads(*args: Any, **kwargs: Any) -> GradientCheckReport:
    """Deprecated alias of :func:`check_gradients`.

    Renamed because ``jax.test_util.check_grads`` has the same name and other behaviour
    (it checks to a given order and raises, returning nothing)."""
    import warnings

    warnings.warn(
        "dargmin.check_grads is deprecated and will be removed in dargmin 0.3; use "
        "dargmin.check_gradients (same arguments). The name clashed with "
        "jax.test_util.check_grads, which behaves differently.",
        DeprecationWarning,
        stacklevel=2,
    )
    return check_gradients(*args, **kwargs)
