r"""Finite-difference derivatives with automatic step selection, and gradient checking.

Finite differences are the independent reference against which the automatic
derivatives of this package are tested. All stencil points are evaluated in one
``jax.vmap``-ed batch, and Jacobians batch over all basis directions at once, so the
functions are jit-compatible (``method``/``order`` are static Python values).

Step-size rules (:math:`\varepsilon` = machine epsilon of the input dtype,
:math:`s = \max(1, |x|)`):

* forward / backward, truncation :math:`O(h)`: :math:`h = \sqrt{\varepsilon}\, s`, which
  balances truncation :math:`O(h)` against round-off :math:`O(\varepsilon / h)`;
* central, truncation :math:`O(h^2)`: :math:`h = \varepsilon^{1/3} s` (same balance);
* Richardson: central differences :math:`D_0(h_i)` at :math:`h_i = h_0 / 2^i`,
  :math:`h_0 = s/10`, down to about :math:`\varepsilon^{1/3} s` (15 steps in float64, 6 in
  float32), extrapolated in a Neville tableau. As in Ridders' method, every tableau entry
  gets an error estimate from its neighbours and the entry with the smallest estimate is
  returned, separately for every output entry. This adapts the effective step to the
  function: coarse steps that are too large (or leave its domain and give NaN) are ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from dargmin.typing import DTypeLike, PyTree, Scalar, ScalarLike

__all__ = [
    "GradientCheckReport",
    "LeafError",
    "check_gradients",
    "directional_derivative_fd",
    "finite_difference_derivative",
    "gradient_fd",
    "hessian_fd",
    "hvp_fd",
    "jacobian_fd",
]

Method = Literal["central", "forward", "backward", "richardson"]
_METHODS = ("central", "forward", "backward", "richardson")
_RICHARDSON_FIRST_RELATIVE_STEP = 0.1


def _resolve_order(method: str, order: int | None) -> int | None:
    """Validate ``order``; ``None`` for Richardson means the full tableau."""
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")
    natural = {"forward": 1, "backward": 1, "central": 2}
    if method in natural:
        if order is not None and order != natural[method]:
            raise ValueError(
                f"method={method!r} has order {natural[method]}; use method='richardson' "
                f"for higher orders (got order={order})."
            )
        return natural[method]
    if order is not None and (order < 2 or order % 2):
        raise ValueError(f"Richardson order must be an even integer >= 2, got {order}.")
    return order


def _richardson_num_steps(dtype: DTypeLike) -> int:
    # Halve from h0 = s/10 until the central-difference optimum eps^(1/3) s: below that,
    # round-off dominates every tableau entry and finer steps only add noise.
    eps = float(jnp.finfo(dtype).eps)
    return math.ceil(math.log2(_RICHARDSON_FIRST_RELATIVE_STEP / eps ** (1.0 / 3.0))) + 1


def _default_relative_step(method: str, dtype: DTypeLike) -> float:
    eps = float(jnp.finfo(dtype).eps)
    if method in ("forward", "backward"):
        return eps**0.5
    if method == "central":
        return eps ** (1.0 / 3.0)
    return _RICHARDSON_FIRST_RELATIVE_STEP


def _float_dtype(x: PyTree) -> np.dtype:
    dtype = jnp.result_type(x)
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.result_type(float)


# Jitted because it is a long chain of tiny array operations: compiled once per shape,
# instead of dispatching (and compiling) every operation separately in eager mode.
@functools.partial(jax.jit, static_argnames="max_columns")
def _best_richardson_estimate(central: jax.Array, max_columns: int) -> jax.Array:
    """Neville/Richardson tableau over halving steps, Ridders-style selection.

    ``central[i]`` is D_0(h0 / 2^i) (leading axis = step index). Written by hand because
    neither JAX nor SciPy provide a traceable tableau (``scipy.differentiate`` runs in NumPy
    and cannot be jit-compiled or vmapped by JAX).
    """
    # With D_0(h) = f' + c_2 h^2 + c_4 h^4 + ... and step ratio 2,
    # T[i, j] = T[i, j-1] + (T[i, j-1] - T[i-1, j-1]) / (4^j - 1) cancels the h^(2j) term.
    # Error estimate of T[i, j] (Ridders / Numerical Recipes dfridr): the larger of its
    # distances to the two entries it was built from.
    column = central
    candidates = [column[1:]]
    errors = [jnp.abs(column[1:] - column[:-1])]
    for level in range(1, max_columns):
        new_column = column[1:] + (column[1:] - column[:-1]) / (4.0**level - 1.0)
        candidates.append(new_column)
        errors.append(
            jnp.maximum(jnp.abs(new_column - column[1:]), jnp.abs(new_column - column[:-1]))
        )
        column = new_column
    all_candidates = jnp.concatenate(candidates, axis=0)
    all_errors = jnp.concatenate(errors, axis=0)
    # NaN comes from steps that leave the function's domain; never select those entries.
    all_errors = jnp.where(jnp.isnan(all_errors), jnp.inf, all_errors)
    best = jnp.argmin(all_errors, axis=0)
    return jnp.take_along_axis(all_candidates, best[None], axis=0)[0]


def _derivative_along_line(
    g: Callable[[jax.Array], PyTree],
    t0: jax.Array,
    typical_scale: jax.Array,
    method: str,
    step: ScalarLike | None,
    order: int | None,
) -> PyTree:
    """Derivative of ``g`` at scalar ``t0``; ``typical_scale`` sets the default step."""
    dtype = t0.dtype
    if step is None:
        step = _default_relative_step(method, dtype) * typical_scale
    step = jnp.asarray(step, dtype)
    num_steps = _richardson_num_steps(dtype) if method == "richardson" else 1
    if order is not None and method == "richardson":
        num_steps = max(num_steps, order // 2 + 1)
    max_columns = num_steps - 1 if order is None else order // 2
    steps = step / 2.0 ** jnp.arange(num_steps, dtype=dtype)
    # Use the representable step (t0 + h) - t0 so that the rounding of t0 + h does not
    # enter the quotient (Numerical Recipes §5.7). For Richardson this makes step ratios
    # differ from 2 by O(eps / h), far below the target accuracy.
    steps = (t0 + steps) - t0

    if method == "forward":
        offsets = jnp.stack([steps[0], jnp.zeros((), dtype)])
    elif method == "backward":
        offsets = jnp.stack([jnp.zeros((), dtype), -steps[0]])
    else:
        offsets = jnp.concatenate([steps, -steps])
    values = jax.vmap(g)(t0 + offsets)

    def per_leaf(leaf_values: jax.Array) -> jax.Array:
        if method in ("forward", "backward"):
            return (leaf_values[0] - leaf_values[1]) / steps[0]
        broadcast_steps = steps.reshape((num_steps,) + (1,) * (leaf_values.ndim - 1))
        central = (leaf_values[:num_steps] - leaf_values[num_steps:]) / (2.0 * broadcast_steps)
        if method == "central":
            return central[0]
        return _best_richardson_estimate(central, max_columns)

    return jax.tree_util.tree_map(per_leaf, values)


def finite_difference_derivative(
    f: Callable[[Scalar], PyTree],
    x: ScalarLike,
    *,
    method: Method = "central",
    step: ScalarLike | None = None,
    order: int | None = None,
) -> PyTree:
    r"""Derivative :math:`f'(x)` of a function of one scalar by finite differences.

    .. math::
        D_+(h) = \frac{f(x+h) - f(x)}{h}, \quad
        D_-(h) = \frac{f(x) - f(x-h)}{h}, \quad
        D_0(h) = \frac{f(x+h) - f(x-h)}{2h},

    with errors :math:`O(h)`, :math:`O(h)` and :math:`O(h^2)`. ``"richardson"`` evaluates
    :math:`D_0` at :math:`h, h/2, h/4, \dots` and extrapolates to :math:`h \to 0`
    (column :math:`j` of the tableau has error :math:`O(h^{2j+2})`), returning the tableau
    entry with the smallest estimated error; in float64 it reaches about 1e-10 relative
    accuracy or better on smooth functions.

    Parameters
    ----------
    f
        Function of a scalar; its output may be any pytree of floating arrays.
    x
        Scalar point.
    method
        ``"central"`` (default), ``"forward"``, ``"backward"`` or ``"richardson"``.
    step
        Step :math:`h` (the largest one for Richardson). Default: see the module
        docstring; it scales with :math:`\max(1, |x|)` and the dtype's epsilon.
    order
        Truncation order in :math:`h`: fixed at 1 for forward/backward and 2 for central.
        For Richardson the highest order of extrapolation allowed (an even number; the
        tableau then has ``order / 2`` columns); ``None`` uses the full tableau.

    Returns
    -------
    PyTree
        :math:`f'(x)` with the structure of ``f(x)``.

    Raises
    ------
    ValueError
        For an unknown method or an order the method cannot provide.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> d = finite_difference_derivative(jnp.sin, 0.0, method="richardson")
    >>> round(float(d), 6)
    1.0
    """
    x = jnp.asarray(x)
    x = x.astype(_float_dtype(x))
    order = _resolve_order(method, order)
    if x.ndim != 0:
        raise ValueError(f"x must be a scalar, got shape {x.shape}; see gradient_fd.")
    typical_scale = jnp.maximum(1.0, jnp.abs(x))
    return _derivative_along_line(f, x, typical_scale, method, step, order)


def directional_derivative_fd(
    f: Callable[[PyTree], PyTree],
    x: PyTree,
    v: PyTree,
    *,
    method: Method = "central",
    step: ScalarLike | None = None,
    order: int | None = None,
) -> PyTree:
    r"""Directional derivative :math:`\partial_t f(x + t v)|_{t=0} = J(x)\,v` by finite
    differences.

    Applies :func:`finite_difference_derivative` to :math:`t \mapsto f(x + t v)`. The
    default step in :math:`t` makes the perturbation :math:`t v` of size
    :math:`h_{\mathrm{rel}} \max(1, |x_i|)` on the coordinates where :math:`v` is largest,
    i.e. :math:`t = h_{\mathrm{rel}} \max(1, \max_i |x_i v_i| / \|v\|_\infty) /
    \|v\|_\infty`; for a basis vector :math:`e_i` this is the usual
    :math:`h_{\mathrm{rel}} \max(1, |x_i|)`.

    Parameters
    ----------
    f
        Function between pytrees.
    x
        Point (pytree).
    v
        Direction, structure of ``x``. A zero direction gives a zero derivative.
    method, step, order
        As in :func:`finite_difference_derivative`; ``step`` is in units of :math:`t`.

    Returns
    -------
    PyTree
        :math:`J v` with the structure of ``f(x)``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> f = lambda x: jnp.sum(x**2)
    >>> d = directional_derivative_fd(f, jnp.array([1.0, 2.0]), jnp.array([1.0, 0.0]))
    >>> round(float(d), 3)
    2.0
    """
    flat_x, unravel = ravel_pytree(x)
    flat_v, _ = ravel_pytree(v)
    dtype = _float_dtype(flat_x)
    order = _resolve_order(method, order)
    flat_x = flat_x.astype(dtype)
    flat_v = flat_v.astype(dtype)

    v_size = jnp.max(jnp.abs(flat_v), initial=0.0)
    safe_v_size = jnp.where(v_size > 0, v_size, 1.0)
    weighted_x_size = jnp.max(jnp.abs(flat_x * flat_v), initial=0.0) / safe_v_size
    typical_scale = jnp.maximum(1.0, weighted_x_size) / safe_v_size

    def along_line(t: jax.Array) -> PyTree:
        return f(unravel(flat_x + t * flat_v))

    return _derivative_along_line(
        along_line, jnp.zeros((), dtype), typical_scale, method, step, order
    )


def _flat_jacobian_fd(
    f: Callable[[PyTree], PyTree],
    x: PyTree,
    method: Method,
    step: ScalarLike | None,
    order: int | None,
) -> PyTree:
    """Derivatives along all basis directions: output leaves have a leading axis of size n."""
    flat_x, unravel = ravel_pytree(x)
    dtype = _float_dtype(flat_x)
    basis = jnp.eye(flat_x.size, dtype=dtype)

    def along_basis(direction: jax.Array) -> PyTree:
        return directional_derivative_fd(
            f, x, unravel(direction), method=method, step=step, order=order
        )

    return jax.vmap(along_basis)(basis)


def _split_last_axis_like(flat: jax.Array, example: PyTree) -> PyTree:
    """Split the last axis of ``flat`` (size = total size of ``example``) into its leaves."""
    leaves, treedef = jax.tree_util.tree_flatten(example)
    batch_shape = flat.shape[:-1]
    pieces = []
    offset = 0
    for leaf in leaves:
        size = int(np.prod(jnp.shape(leaf), dtype=int))
        piece = flat[..., offset : offset + size]
        pieces.append(piece.reshape(batch_shape + jnp.shape(leaf)))
        offset += size
    return jax.tree_util.tree_unflatten(treedef, pieces)


def gradient_fd(
    f: Callable[[PyTree], Scalar],
    x: PyTree,
    *,
    method: Method = "central",
    step: ScalarLike | None = None,
    order: int | None = None,
) -> PyTree:
    r"""Gradient :math:`\nabla f(x)` of a scalar function by finite differences.

    Entry :math:`i` is the directional derivative along the basis vector :math:`e_i`;
    all :math:`n` directions are evaluated in one ``vmap``.

    Parameters
    ----------
    f
        Scalar-valued function of a pytree.
    x
        Point (pytree).
    method, step, order
        As in :func:`finite_difference_derivative`.

    Returns
    -------
    PyTree
        Gradient with the structure of ``x``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> g = gradient_fd(lambda x: x[0] * x[1], jnp.array([2.0, 3.0]), method="richardson")
    >>> [round(float(gi), 4) for gi in g]
    [3.0, 2.0]
    """
    derivatives = _flat_jacobian_fd(f, x, method, step, order)
    return ravel_pytree(x)[1](jnp.reshape(derivatives, (-1,)))


def jacobian_fd(
    f: Callable[[PyTree], PyTree],
    x: PyTree,
    *,
    method: Method = "central",
    step: ScalarLike | None = None,
    order: int | None = None,
) -> PyTree:
    r"""Jacobian :math:`\partial f / \partial x` by finite differences.

    Column :math:`i` is :math:`J e_i`, computed by :func:`directional_derivative_fd`
    with all basis directions batched by ``vmap``.

    Parameters
    ----------
    f
        Function between pytrees.
    x
        Point (pytree).
    method, step, order
        As in :func:`finite_difference_derivative`.

    Returns
    -------
    PyTree
        Same layout as ``jax.jacfwd(f)(x)``: output structure whose leaves are input
        structures with leaf shapes ``out_leaf.shape + in_leaf.shape``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> J = jacobian_fd(lambda x: x**2, jnp.array([1.0, 2.0]), method="richardson")
    >>> jnp.round(J, 4).tolist()
    [[2.0, 0.0], [0.0, 4.0]]
    """
    derivatives = _flat_jacobian_fd(f, x, method, step, order)

    def to_jacfwd_layout(leaf: jax.Array) -> PyTree:
        # leaf: (n, *out_shape) -> (*out_shape, n) -> split n into the input leaves.
        return _split_last_axis_like(jnp.moveaxis(leaf, 0, -1), x)

    return jax.tree_util.tree_map(to_jacfwd_layout, derivatives)


def hessian_fd(
    f: Callable[[PyTree], Scalar],
    x: PyTree,
    *,
    method: Method = "central",
    step: ScalarLike | None = None,
    order: int | None = None,
    gradient: Literal["autodiff", "finite_differences"] = "autodiff",
) -> PyTree:
    r"""Hessian :math:`\nabla^2 f(x)` by differencing a gradient, then symmetrizing.

    :math:`H_{:, i} \approx \partial_t \nabla f(x + t e_i)`, where :math:`\nabla f` is
    ``jax.grad(f)`` (default) or :func:`gradient_fd` (nested finite differences, fully
    independent of autodiff but less accurate). The result is replaced by
    :math:`(H + H^\top)/2`, which removes the antisymmetric part of the error.

    Parameters
    ----------
    f
        Scalar-valued function of a pytree.
    x
        Point (pytree).
    method, step, order
        As in :func:`finite_difference_derivative` (for the outer differences).
    gradient
        ``"autodiff"`` or ``"finite_differences"`` for the inner gradient.

    Returns
    -------
    PyTree
        Same layout as ``jax.hessian(f)(x)``: ``H[a][b]`` has shape
        ``x[a].shape + x[b].shape``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> H = hessian_fd(lambda x: x[0] ** 2 * x[1], jnp.array([1.0, 2.0]))
    >>> jnp.round(H, 3).tolist()
    [[4.0, 2.0], [2.0, 0.0]]
    """
    if gradient == "autodiff":
        gradient_function = jax.grad(f)
    elif gradient == "finite_differences":

        def gradient_function(point: PyTree) -> PyTree:
            return gradient_fd(f, point, method=method, order=order)

    else:
        raise ValueError(f"gradient must be 'autodiff' or 'finite_differences', got {gradient!r}.")

    def flat_gradient(point: PyTree) -> jax.Array:
        return ravel_pytree(gradient_function(point))[0]

    # rows: derivative of the whole gradient along e_i, i.e. H[:, i] (= H[i, :] by symmetry)
    rows = _flat_jacobian_fd(flat_gradient, x, method, step, order)
    symmetric = 0.5 * (rows + rows.T)

    leaves, treedef = jax.tree_util.tree_flatten(x)
    outer = []
    offset = 0
    for leaf in leaves:
        size = int(np.prod(jnp.shape(leaf), dtype=int))
        block_rows = symmetric[offset : offset + size].reshape((*jnp.shape(leaf), -1))
        outer.append(_split_last_axis_like(block_rows, x))
        offset += size
    return jax.tree_util.tree_unflatten(treedef, outer)


def hvp_fd(
    f: Callable[[PyTree], Scalar],
    x: PyTree,
    v: PyTree,
    step: ScalarLike | None = None,
    *,
    method: Method = "forward",
) -> PyTree:
    r"""Hessian-vector product by differencing ``jax.grad(f)`` along ``v``.

    .. math::
        H v \approx \frac{\nabla f(x + \delta v) - \nabla f(x)}{\delta}
        \quad\text{(forward)}, \qquad
        H v \approx \frac{\nabla f(x + \delta v) - \nabla f(x - \delta v)}{2\delta}
        \quad\text{(central)}.

    This is the classic matrix-free Hessian product of truncated-Newton methods; it is
    :func:`directional_derivative_fd` applied to the gradient.

    Parameters
    ----------
    f
        Scalar-valued function of a pytree.
    x
        Point (pytree).
    v
        Direction, structure of ``x``.
    step
        :math:`\delta`; default from the rules in the module docstring.
    method
        ``"forward"`` (default), ``"central"``, ``"backward"`` or ``"richardson"``.

    Returns
    -------
    PyTree
        :math:`H v` with the structure of ``x``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> f = lambda x: jnp.sum(x**3) / 6.0
    >>> hv = hvp_fd(f, jnp.array([1.0, 2.0]), jnp.array([1.0, 1.0]), method="central")
    >>> [round(float(h), 3) for h in hv]
    [1.0, 2.0]
    """
    return directional_derivative_fd(jax.grad(f), x, v, method=method, step=step)


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
