"""Sensitivity of an M-estimator to its training data: influence functions and approximate
leave-one-out (infinitesimal jackknife, one-Newton-step ALO, approximate cross-validation).

Setting. The fitted parameters are a weighted M-estimator evaluated at unit weights,

.. math::

    \\hat\\theta(w) = \\arg\\min_\\theta \\; F(\\theta, w), \\qquad
    F(\\theta, w) = \\sum_{i=1}^n w_i\\, \\ell(\\theta, z_i) + r(\\theta), \\qquad w = \\mathbf 1,

with a per-example loss ``loss(params, example)``, an optional ``regularizer(params)`` and
``data`` a pytree of arrays whose leading axis indexes the ``n`` examples. ``params`` may come
from any solver; only the optimality ``∇θF(θ̂, 1) = 0`` is used (and checked). Write
``g_i = ∇θℓ(θ̂, z_i)``, ``H_i = ∇²θℓ(θ̂, z_i)`` and ``H = Σ_i H_i + ∇²r(θ̂)``. The implicit
function theorem gives the influence of example ``i`` (the derivative in its weight)

.. math:: \\frac{\\partial \\hat\\theta}{\\partial w_i} = -H^{-1} g_i ,

from which this module derives:

* :func:`influence_on_params` — all ``n`` influences, one Hessian factorization (dense) or
  ``n`` batched conjugate-gradient solves with Hessian-vector products (matrix-free);
* :func:`influence_on_function` — ``d f(θ̂)/dw_i = -∇fᵀH⁻¹g_i`` for a test loss or a
  prediction ``f`` (Koh & Liang, 2017), with one solve per output of ``f``;
* :func:`infinitesimal_jackknife` — ``θ̂₋ᵢ ≈ θ̂ + H⁻¹g_i`` (Giordano et al., 2019);
* :func:`approximate_leave_one_out` — the jackknife, or one Newton step on the leave-``i``-out
  objective, ``θ̂₋ᵢ ≈ θ̂ + (H - H_i)⁻¹ g_i`` (Beirami et al., 2017; Rad & Maleki, 2020), which
  is exact for quadratic losses (ridge regression);
* :func:`approximate_cv_error` — the leave-one-out cross-validation error without refits;
* :func:`jackknife_variance` — the infinitesimal-jackknife (sandwich) variance.

Every function first checks with :func:`dargmin.check_optimum` that ``params`` is a
stationary point with a non-singular Hessian, and raises
:class:`dargmin.NonStationaryPointError` / :class:`dargmin.SingularSystemError` otherwise:
the influence of an unconverged fit is not the derivative of anything. NaN or inf in
``params`` or ``data`` (or a loss whose derivatives are not finite there) raises an error
that names the leaves and examples holding them (``[reason: nonfinite]``), never a NaN
result. pandas ``DataFrame`` / ``Series`` leaves of ``data`` are converted with
``.to_numpy()`` (non-numeric columns are refused).

The compiled code is cached per ``loss`` / ``regularizer`` and holds them only weakly: a
loss that the caller drops is garbage-collected together with its compiled code.
"""

from __future__ import annotations

import functools
import inspect
import types
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from dargmin.derivatives import solve_cg
from dargmin.diagnostics import (
    DargminError,
    DargminWarning,
    NonStationaryPointError,
    SingularSystemError,
    check_optimum,
)
from dargmin.linear_solvers import DENSE_MAX_SIZE

__all__ = [
    "approximate_cv_error",
    "approximate_leave_one_out",
    "infinitesimal_jackknife",
    "influence_on_function",
    "influence_on_params",
    "jackknife_variance",
]

PyTree = Any
Loss = Callable[[PyTree, PyTree], jax.Array]
Regularizer = Callable[[PyTree], jax.Array] | None
LinearSolver = Literal["auto", "cholesky", "lu", "cg"]
CheckMode = Literal["raise", "warn", "ignore"]

# Per-example Hessians are built this many at a time by the dense one-Newton-step ALO, so
# memory stays at batch × p² instead of n × p². The Woodbury path needs only p × rank per
# example and batches more.
_HESSIAN_BATCH = 64
_WOODBURY_BATCH = 1024


# ----------------------------------------------------------------------------- the problem


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


def _flat_problem(loss: Loss, regularizer: Regularizer, params: PyTree):
    """Flat views of the problem: ``θ ↦ ℓ(θ, z)`` and ``θ ↦ F(θ, 1)`` on a 1-D ``θ``.

    Working on the raveled parameters lets every solve be a plain matrix / vector one; the
    caller unravels the results back to the structure of ``params``.
    """
    flat, unravel = ravel_pytree(params)

    def example_loss(theta: jax.Array, example: PyTree) -> jax.Array:
        return loss(unravel(theta), example)

    def objective(theta: jax.Array, data: PyTree) -> jax.Array:
        total = jnp.sum(jax.vmap(example_loss, in_axes=(None, 0))(theta, data))
        if regularizer is not None:
            total = total + regularizer(unravel(theta))
        return total

    return flat, unravel, example_loss, objective


# ----------------------------------------------------------------------------- inputs


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


# ----------------------------------------------------------------------------- compiled code


class _WeakCall:
    """Calls the user's function through a weak reference.

    The compiled kernels of a ``loss`` close over this instead of the function itself, so
    that they do not keep it alive (``jax.jit`` holds static arguments and closures
    strongly, forever). A function that cannot be weakly referenced is held.
    """

    __slots__ = ("_get",)
    _get: Callable[[], Any]

    def __init__(self, fn: Callable[..., Any]):
        self.point_to(fn)

    def point_to(self, fn: Callable[..., Any]) -> None:
        """Call ``fn`` from now on (an equal object found in the cache may be another one)."""
        if inspect.ismethod(fn):
            # A bound method is a new object at every attribute access: hold its owner
            # weakly (the function is the class's, alive anyway).
            try:
                owner = weakref.ref(fn.__self__)
            except TypeError:
                pass
            else:
                func = fn.__func__
                self._get = lambda: None if (o := owner()) is None else types.MethodType(func, o)
                return
        try:
            self._get = weakref.ref(fn)
        except TypeError:
            self._get = lambda: fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fn = self._get()
        if fn is None:  # pragma: no cover - the caller holds the function while it runs
            raise RuntimeError("dargmin.sensitivity: the loss was garbage-collected in use.")
        return fn(*args, **kwargs)


class _FunctionCache:
    """``callable -> value`` that does not keep the callable alive.

    Hashable callables are matched by equality, as ``jax.jit`` matches static arguments;
    unhashable ones by identity; bound methods by (owner identity, function), as Python
    compares them. The entry goes when the callable is garbage-collected. Callables that
    cannot be weakly referenced are kept, at most ``max_pinned`` of them (least recently
    used out).
    """

    def __init__(self, max_pinned: int = 32):
        self._by_value: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._by_identity: dict[int, tuple[weakref.ref, Any]] = {}
        self._pinned: OrderedDict = OrderedDict()
        self._max_pinned = max_pinned

    def get(self, fn: Any, make: Callable[[], Any]) -> Any:
        if inspect.ismethod(fn):
            per_function = self._get_by_identity(fn.__self__, dict)
            if per_function is not None:
                if fn.__func__ not in per_function:
                    per_function[fn.__func__] = make()
                return per_function[fn.__func__]
        else:
            try:
                value = self._by_value.get(fn)
            except TypeError:  # unhashable, or not weakly referenceable
                value = self._get_by_identity(fn, make)
            else:
                if value is None:
                    value = self._by_value[fn] = make()
            if value is not None:
                return value
        try:
            value = self._pinned.pop(fn)
        except KeyError:
            value = make()
        except TypeError:  # neither hashable nor weakly referenceable: nothing to key on
            return make()
        self._pinned[fn] = value
        while len(self._pinned) > self._max_pinned:
            self._pinned.popitem(last=False)
        return value

    def _get_by_identity(self, obj: Any, make: Callable[[], Any]) -> Any:
        """The value of ``obj`` (by identity); ``None`` if ``obj`` has no weak references."""
        key = id(obj)
        entry = self._by_identity.get(key)
        if entry is not None and entry[0]() is obj:
            return entry[1]

        def forget(ref: weakref.ref, key: int = key) -> None:
            if self._by_identity.get(key, (None,))[0] is ref:
                del self._by_identity[key]

        try:
            ref = weakref.ref(obj, forget)
        except TypeError:
            return None
        value = make()
        self._by_identity[key] = (ref, value)
        return value


class _Kernels:
    """The jitted kernels of one ``(loss, regularizer)``.

    Repeated calls with the same functions reuse the compiled code instead of re-tracing,
    and nothing runs op by op. The kernels hold the functions weakly and are themselves
    cached weakly by them (:data:`_KERNELS`), so dropping a loss frees its compiled code.
    """

    def __init__(self, loss: Loss, regularizer: Regularizer):
        self.loss = _WeakCall(loss)
        self.regularizer = None if regularizer is None else _WeakCall(regularizer)

        def jit(body: Callable[..., Any], static_argnums: tuple[int, ...] = ()) -> Any:
            bound = functools.partial(body, self.loss, self.regularizer)
            return jax.jit(bound, static_argnums=static_argnums)

        self.total_objective = jit(_total_objective)
        self.example_gradients = jit(_example_gradients)
        self.total_hessian = jit(_total_hessian)
        self.solve_cg_batch = jit(_solve_cg_batch, static_argnums=(3, 4))
        self.newton_dense = jit(_newton_dense, static_argnums=(2,))
        self.newton_woodbury = jit(_newton_woodbury, static_argnums=(2, 3))
        self.newton_cg = jit(_newton_cg, static_argnums=(2, 3))


_KERNELS = _FunctionCache()  # loss -> _FunctionCache(regularizer -> _Kernels)


def _kernels(loss: Loss, regularizer: Regularizer) -> _Kernels:
    if not callable(loss):
        raise TypeError(f"loss must be a callable loss(params, example), got {loss!r}.")
    if regularizer is not None and not callable(regularizer):
        raise TypeError(
            f"regularizer must be None or a callable regularizer(params), got {regularizer!r}."
        )
    per_regularizer = _KERNELS.get(loss, _FunctionCache)
    kernels = per_regularizer.get(regularizer, lambda: _Kernels(loss, regularizer))
    kernels.loss.point_to(loss)
    if kernels.regularizer is not None:
        kernels.regularizer.point_to(regularizer)
    return kernels


# The bodies of the kernels, jitted per (loss, regularizer) by _Kernels.


def _total_objective(loss: Loss, regularizer: Regularizer, params: PyTree, data: PyTree):
    return _flat_problem(loss, regularizer, params)[3](ravel_pytree(params)[0], data)


def _example_gradients(loss: Loss, regularizer: Regularizer, params: PyTree, data: PyTree):
    flat, _, example_loss, _ = _flat_problem(loss, regularizer, params)
    return jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(flat, data)


def _total_hessian(loss: Loss, regularizer: Regularizer, params: PyTree, data: PyTree):
    flat, _, _, objective = _flat_problem(loss, regularizer, params)
    hessian = jax.hessian(objective)(flat, data)
    # Symmetrize: forward-over-reverse is symmetric only to round-off, and Cholesky reads
    # one triangle.
    return 0.5 * (hessian + hessian.T)


@jax.jit
def _cholesky_solve(hessian: jax.Array, rhs: jax.Array) -> jax.Array:
    """Solve ``H X = B`` for all columns of ``B`` with one Cholesky factorization.

    Non-finite entries in the result mean that ``H`` is not positive definite.
    """
    return jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(hessian, lower=True), rhs)


@jax.jit
def _lu_solve(hessian: jax.Array, rhs: jax.Array) -> jax.Array:
    return jax.scipy.linalg.lu_solve(jax.scipy.linalg.lu_factor(hessian), rhs)


def _solve_cg_batch(
    loss: Loss,
    regularizer: Regularizer,
    params: PyTree,
    data: PyTree,
    rhs: jax.Array,
    max_steps: int,
    rtol: float,
):
    """Solve ``H x_j = b_j`` for every row ``b_j`` of ``rhs`` by CG, never forming ``H``."""
    flat, _, _, objective = _flat_problem(loss, regularizer, params)

    def hvp(v: jax.Array) -> jax.Array:
        return jax.jvp(lambda t: jax.grad(objective)(t, data), (flat,), (v,))[1]

    def solve_one(b: jax.Array):
        solution = solve_cg(hvp, b, rtol=rtol, max_steps=max_steps, throw=False)
        return solution.value, solution.converged

    # vmap batches the right-hand sides through one CG loop: each iteration is one
    # batched Hessian-vector product instead of n separate ones.
    return jax.vmap(solve_one)(rhs)


def _map_examples(fn: Callable[[PyTree], PyTree], data: PyTree, batch_size: int) -> PyTree:
    """``vmap`` of ``fn`` over the examples, in sequential batches when there are many.

    A single ``vmap`` when everything fits one batch: ``lax.map(batch_size=...)`` would
    compile a loop plus a remainder for nothing.
    """
    if _num_examples(data) <= batch_size:
        return jax.vmap(fn)(data)
    return jax.lax.map(fn, data, batch_size=batch_size)


# ----------------------------------------------------------------------------- checks


def _raise_if_nonfinite(
    kernels: _Kernels,
    params: PyTree,
    data: PyTree,
    *,
    caller: str,
    hessian: jax.Array | None = None,
) -> None:
    """Raise a ``[reason: nonfinite]`` error if the gradients or the Hessian at ``params``
    hold NaN / inf, naming what is not finite and the inputs that cause it.

    Called only where something downstream came out non-finite (the checks cost nothing
    when all is well), so NaN in a leaf of ``data`` that the loss never reads is no error.
    """
    flat, unravel = ravel_pytree(params)
    problems = []
    gradients = np.asarray(kernels.example_gradients(params, data))
    bad = np.flatnonzero(~np.all(np.isfinite(gradients), axis=1))
    if bad.size:
        problems.append(
            f"the gradient of the loss is not finite for {bad.size} of {gradients.shape[0]} "
            f"examples (first: {bad[:5].tolist()})"
        )
    regularizer = kernels.regularizer
    reg_bad = 0
    if regularizer is not None:
        reg_gradient = np.asarray(jax.grad(lambda t: regularizer(unravel(t)))(flat))
        reg_bad = int(np.count_nonzero(~np.isfinite(reg_gradient)))
        if reg_bad:
            problems.append(
                f"the gradient of the regularizer has {reg_bad} non-finite "
                f"entr{'ies' if reg_bad > 1 else 'y'} of {reg_gradient.size}"
            )
    gradient_problem = bool(problems)
    if hessian is None and flat.size <= DENSE_MAX_SIZE:
        hessian = kernels.total_hessian(params, data)
    if hessian is not None:
        count = int(np.count_nonzero(~np.isfinite(np.asarray(hessian))))
        if count:
            problems.append(
                f"the Hessian of the objective has {count} non-finite "
                f"entr{'ies' if count > 1 else 'y'} of {np.size(hessian)}"
            )
    else:  # too large to build: one Hessian-vector product with a vector of ones
        hvp = jax.jvp(
            jax.grad(lambda t: kernels.total_objective(unravel(t), data)),
            (flat,),
            (jnp.ones_like(flat),),
        )[1]
        if not bool(jnp.all(jnp.isfinite(hvp))):
            problems.append("a Hessian-vector product of the objective is not finite")
    if not problems:
        return
    causes = _nonfinite_leaves(params, "params", False) + _nonfinite_leaves(data, "data", True)
    if causes:
        cause = (
            "NaN/inf in the inputs: "
            + "; ".join(causes)
            + ". Remove or impute them (or fix the fit that produced these params)."
        )
    else:
        if reg_bad and not bad.size:
            culprit = "the regularizer"
        elif (bad.size and not reg_bad) or regularizer is None:
            culprit = "the loss"
        else:
            culprit = "the loss or the regularizer"
        cause = (
            f"Every input is finite: {culprit} itself has non-finite derivatives at these "
            "params (e.g. the log or square root of a non-positive number, a division by "
            "zero, or an overflow)."
        )
    # As in dargmin.diagnostics: a non-finite residual is "not stationary"; a non-finite
    # Hessian at a finite gradient is a broken system to solve.
    error = NonStationaryPointError if gradient_problem or causes else SingularSystemError
    raise _refusal(
        error,
        "nonfinite",
        f"dargmin.sensitivity.{caller}: cannot compute the influence of the data: "
        f"{'; '.join(problems)}. {cause}",
    )


def _check_stationary(
    kernels: _Kernels,
    params: PyTree,
    data: PyTree,
    *,
    check: CheckMode,
    tol: float | None,
    caller: str,
) -> None:
    """Raise (or warn) unless ``params`` is a strict, well-posed minimum of ``F(·, 1)``."""
    if check not in ("raise", "warn", "ignore"):
        raise ValueError(f"check must be 'raise', 'warn' or 'ignore', got {check!r}.")
    if check == "ignore":
        return
    try:
        report = check_optimum(
            lambda theta, d: kernels.total_objective(theta, d),
            params,
            data,
            kind="argmin",
            tol=tol,
        )
    except np.linalg.LinAlgError:
        # The eigenvalues of a Hessian holding NaN/inf do not converge: say where they are.
        _raise_if_nonfinite(kernels, params, data, caller=caller)
        raise
    measured = (report.residual_norm, report.smallest_eigenvalue, report.largest_eigenvalue)
    if not np.all(np.isfinite(measured)):
        _raise_if_nonfinite(kernels, params, data, caller=caller)
    # check_optimum's default limit of the condition number: beyond it the verdict may read
    # "ill_conditioned" (named first), but the Hessian is numerically singular.
    max_condition = 1e-2 / float(jnp.finfo(ravel_pytree(params)[0].dtype).eps)
    error: type[DargminError] | None = None
    if report.verdict in ("not_stationary", "nonfinite"):
        error = NonStationaryPointError
    elif report.verdict in ("singular", "not_minimum") or (
        report.verdict == "ill_conditioned" and not report.condition_number <= max_condition
    ):
        # Not a strict minimum: the influence (a derivative of the argmin) is undefined or
        # meaningless, exactly as dargmin.argmin refuses to differentiate there.
        error = SingularSystemError
    if error is None:
        return
    message = (
        f"dargmin.sensitivity.{caller}: cannot compute the influence of the data at these "
        f"params: {report.message} (gradient norm {report.residual_norm:.3g}, Hessian "
        f"eigenvalues in [{report.smallest_eigenvalue:.3g}, {report.largest_eigenvalue:.3g}])."
    )
    if check == "raise":
        raise _refusal(error, report.verdict, message)
    warnings.warn(f"{message} [reason: {report.verdict}]", DargminWarning, stacklevel=3)


def _default_rtol(dtype: Any) -> float:
    # A tenth of sqrt(eps): ~1.5e-9 in float64, ~3e-5 in float32 — CG's residual test is
    # relative, and float32 stalls well before eps.
    return 0.1 * float(jnp.finfo(dtype).eps) ** 0.5


def _resolve_solver(linear_solver: str, size: int) -> str:
    if linear_solver not in ("auto", "cholesky", "lu", "cg"):
        raise ValueError(
            f"linear_solver must be 'auto', 'cholesky', 'lu' or 'cg', got {linear_solver!r}."
        )
    if linear_solver == "auto":
        # Building the Hessian costs p Hessian-vector products and p² memory: worth it (one
        # factorization shared by all n solves) only while p is moderate.
        return "cholesky" if size <= DENSE_MAX_SIZE else "cg"
    return linear_solver


def _solve_hessian(
    kernels: _Kernels,
    params: PyTree,
    data: PyTree,
    rhs: jax.Array,
    *,
    linear_solver: str,
    rtol: float | None,
    max_steps: int | None,
    caller: str,
) -> jax.Array:
    """``H⁻¹ b_j`` for every row ``b_j`` of ``rhs`` (shape ``(m, p)``); returns ``(m, p)``.

    ``rhs`` must be finite (the callers check theirs).
    """
    size = rhs.shape[1]
    method = _resolve_solver(linear_solver, size)
    if method in ("cholesky", "lu"):
        hessian = kernels.total_hessian(params, data)
        solution = _cholesky_solve(hessian, rhs.T) if method == "cholesky" else None
        if solution is None or not bool(jnp.all(jnp.isfinite(solution))):
            # Cholesky failed (H not positive definite: a saddle accepted with
            # check="warn"/"ignore"): LU only needs H non-singular. Decided here rather
            # than with lax.cond so that the common case never compiles the LU branch.
            solution = _lu_solve(hessian, rhs.T)
        if not bool(jnp.all(jnp.isfinite(solution))):
            _raise_if_nonfinite(kernels, params, data, caller=caller, hessian=hessian)
            spectrum = np.linalg.eigvalsh(np.asarray(hessian))
            raise _refusal(
                SingularSystemError,
                "singular",
                f"dargmin.sensitivity.{caller}: solving with the Hessian gave non-finite "
                f"values: its eigenvalues lie in [{spectrum[0]:.3g}, {spectrum[-1]:.3g}], so "
                "it is singular. Add a regularizer (e.g. a small ridge term).",
            )
        return solution.T
    rtol = float(rtol) if rtol is not None else _default_rtol(rhs.dtype)
    max_steps = max_steps if max_steps is not None else max(10 * size, 100)
    solution, converged = kernels.solve_cg_batch(params, data, rhs, max_steps, rtol)
    # CG can stop at once, "converged", on a NaN right-hand side (a NaN residual norm is
    # not above the tolerance): check the inputs and the outputs.
    finite = np.all(np.isfinite(rhs), axis=1) & np.all(np.isfinite(solution), axis=1)
    failed = np.flatnonzero(~(np.asarray(converged) & finite))
    if failed.size:
        _raise_if_nonfinite(kernels, params, data, caller=caller)
        raise _refusal(
            SingularSystemError,
            "singular",
            f"dargmin.sensitivity.{caller}: conjugate gradients on the Hessian did not reach "
            f"rtol={rtol:.2g} within max_steps={max_steps} for {failed.size} of "
            f"{converged.shape[0]} right-hand sides (first: {failed[:5].tolist()}): the "
            "Hessian is ill-conditioned or not positive definite. Raise max_steps, add a "
            "regularizer, or use linear_solver='cholesky'.",
        )
    return solution


def _check_gradients(
    kernels: _Kernels, params: PyTree, data: PyTree, gradients: jax.Array, caller: str
) -> None:
    """The per-example gradients are the right-hand sides of every solve: refuse NaN/inf."""
    if not bool(jnp.all(jnp.isfinite(gradients))):
        _raise_if_nonfinite(kernels, params, data, caller=caller)


# ----------------------------------------------------------------------------- influence


def influence_on_params(
    loss: Loss,
    params: PyTree,
    data: PyTree,
    *,
    regularizer: Regularizer = None,
    linear_solver: LinearSolver = "auto",
    check: CheckMode = "raise",
    tol: float | None = None,
    solve_rtol: float | None = None,
    max_steps: int | None = None,
) -> PyTree:
    r"""Influence of each training example on the fitted parameters, ∂θ̂/∂wᵢ.

    For :math:`\hat\theta(w) = \arg\min_\theta \sum_i w_i \ell(\theta, z_i) + r(\theta)` at
    :math:`w = \mathbf 1`, the implicit function theorem applied to
    :math:`\nabla_\theta F(\hat\theta(w), w) = 0` gives

    .. math::

        \frac{\partial \hat\theta}{\partial w_i} = -H^{-1} \nabla_\theta \ell(\hat\theta, z_i),
        \qquad H = \sum_j \nabla^2_\theta \ell(\hat\theta, z_j) + \nabla^2 r(\hat\theta).

    Removing example ``i`` changes ``w_i`` by ``-1``, so ``-influence[i]`` is the
    first-order change of the parameters when ``i`` is dropped
    (see :func:`infinitesimal_jackknife`).

    Parameters
    ----------
    loss
        ``loss(params, example) -> scalar``: the loss of ONE example, a JAX function.
        ``example`` is ``data`` indexed at ``i`` along the leading axis of every leaf.
    params
        Fitted parameters :math:`\hat\theta` (any pytree of float arrays), from any solver.
    data
        Pytree of arrays whose leaves share the leading axis of length ``n``.
    regularizer
        Optional ``regularizer(params) -> scalar`` :math:`r(\theta)`, not weighted.
    linear_solver
        ``"cholesky"``: build the ``p × p`` Hessian once, factorize it (LU fallback if not
        positive definite) and solve for all ``n`` gradients at once; ``"lu"``: the same
        with LU; ``"cg"``: matrix-free conjugate gradients with Hessian-vector products,
        batched over examples (memory ``O(n p)``, never ``p²``); ``"auto"``: Cholesky up to
        200 parameters, CG beyond.
    check
        ``"raise"`` (default), ``"warn"`` or ``"ignore"`` when ``params`` is not a
        stationary point or the Hessian is singular / not positive definite
        (:func:`dargmin.check_optimum`).
    tol
        Accepted Newton step of the stationarity check, relative to ``max(1, ‖θ̂‖)``.
    solve_rtol, max_steps
        Tolerance and iteration cap of CG (default ``0.1·sqrt(eps)``, ``10 p`` steps).

    Returns
    -------
    PyTree
        Pytree like ``params`` whose leaves have a leading axis of length ``n``: entry ``i``
        is :math:`\partial\hat\theta/\partial w_i`.

    Raises
    ------
    dargmin.NonStationaryPointError
        ``params`` is not a minimizer (the fit has not converged), or NaN / inf in
        ``params``, ``data`` or the gradients (``[reason: nonfinite]``, naming the leaves
        and examples that hold them).
    dargmin.SingularSystemError
        The Hessian is singular, not positive definite or not finite, or CG did not
        converge.
    TypeError
        A leaf of ``data`` is not numeric (strings, objects, dates). pandas ``DataFrame`` /
        ``Series`` leaves are converted with ``.to_numpy()``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> data = jnp.array([0.0, 1.0, 5.0])
    >>> loss = lambda mu, z: 0.5 * (mu - z) ** 2          # the mean is the M-estimator
    >>> influence_on_params(loss, jnp.mean(data), data).tolist()  # (z_i - mean) / n
    [-0.667, -0.333, 1.0]
    """
    caller = "influence_on_params"
    params, data = _as_arrays(params, "params", caller), _as_arrays(data, "data", caller)
    _num_examples(data)
    _resolve_solver(linear_solver, 1)  # reject a bad name before the (costly) check
    kernels = _kernels(loss, regularizer)
    _check_stationary(kernels, params, data, check=check, tol=tol, caller=caller)
    gradients = kernels.example_gradients(params, data)
    solved = _solve_hessian(
        kernels,
        params,
        data,
        gradients,
        linear_solver=linear_solver,
        rtol=solve_rtol,
        max_steps=max_steps,
        caller=caller,
    )
    unravel = ravel_pytree(params)[1]
    return jax.vmap(unravel)(-solved)


def influence_on_function(
    fn: Callable[[PyTree], PyTree],
    loss: Loss,
    params: PyTree,
    data: PyTree,
    *,
    regularizer: Regularizer = None,
    linear_solver: LinearSolver = "auto",
    check: CheckMode = "raise",
    tol: float | None = None,
    solve_rtol: float | None = None,
    max_steps: int | None = None,
) -> PyTree:
    r"""Influence of each training example on a function of the fitted parameters.

    For a quantity :math:`f(\hat\theta)` — a test loss, a prediction, a contrast — the chain
    rule and :func:`influence_on_params` give (Koh & Liang, 2017)

    .. math::

        \frac{d f(\hat\theta)}{d w_i} = -\nabla f(\hat\theta)^\top H^{-1}
        \nabla_\theta \ell(\hat\theta, z_i).

    For a scalar ``f`` this costs ONE solve :math:`s = H^{-1}\nabla f` (reverse mode)
    followed by ``n`` dot products :math:`-s^\top g_i`, instead of ``n`` solves. For an
    ``m``-dimensional ``f`` it uses ``min(m, n)`` solves: ``m`` reverse solves
    :math:`H^{-1}\nabla f_k` when ``m ≤ n``, otherwise the ``n`` parameter influences
    contracted with the Jacobian of ``f``.

    Parameters
    ----------
    fn
        ``fn(params) -> pytree of arrays``, differentiable by JAX. It may close over test
        data.
    loss, params, data, regularizer, linear_solver, check, tol, solve_rtol, max_steps
        As in :func:`influence_on_params`.

    Returns
    -------
    PyTree
        Like ``fn(params)`` with a new leading axis of length ``n``: entry ``i`` is
        :math:`d f(\hat\theta)/d w_i`. A scalar ``fn`` gives an array of shape ``(n,)``.
        Removing example ``i`` changes ``f`` by about ``-result[i]``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> data = jnp.array([0.0, 1.0, 5.0])
    >>> loss = lambda mu, z: 0.5 * (mu - z) ** 2
    >>> test_loss = lambda mu: 0.5 * (mu - 1.0) ** 2       # ∇f = mean - 1 = 1
    >>> influence_on_function(test_loss, loss, jnp.mean(data), data).tolist()
    [-0.667, -0.333, 1.0]
    """
    caller = "influence_on_function"
    params, data = _as_arrays(params, "params", caller), _as_arrays(data, "data", caller)
    n = _num_examples(data)
    kernels = _kernels(loss, regularizer)
    _check_stationary(kernels, params, data, check=check, tol=tol, caller=caller)
    flat, unravel = ravel_pytree(params)
    # One evaluation of fn (cheap next to the solves) gives the output layout to rebuild.
    out_flat, unravel_out = ravel_pytree(fn(params))
    m = out_flat.size

    def flat_fn(theta: jax.Array) -> jax.Array:
        return ravel_pytree(fn(unravel(theta)))[0]

    gradients = kernels.example_gradients(params, data)
    _check_gradients(kernels, params, data, gradients, caller)
    solve = functools.partial(
        _solve_hessian,
        kernels,
        params,
        data,
        linear_solver=linear_solver,
        rtol=solve_rtol,
        max_steps=max_steps,
        caller=caller,
    )
    # Reverse (m ≤ n): m solves with the rows of the Jacobian of f (H is symmetric, so
    # ∇fₖᵀH⁻¹gᵢ = (H⁻¹∇fₖ)ᵀgᵢ), then an (n × p)(p × m) product. Forward: the n parameter
    # influences pushed through the Jacobian of f.
    jacobian = jax.jacrev if m <= n else jax.jacfwd
    jac = jacobian(flat_fn)(flat).reshape(m, flat.size)
    count = int(jnp.sum(~jnp.isfinite(jac)))
    if count:
        causes = _nonfinite_leaves(params, "params", False)
        raise _refusal(
            DargminError,
            "nonfinite",
            f"dargmin.sensitivity.{caller}: the Jacobian of fn at params has {count} "
            f"non-finite entr{'ies' if count > 1 else 'y'} of {jac.size}: "
            + ("; ".join(causes) + "." if causes else "fn's derivative is not finite there."),
        )
    result = -gradients @ solve(jac).T if m <= n else -solve(gradients) @ jac.T
    return jax.vmap(unravel_out)(result)


# ----------------------------------------------------------------------------- leave-one-out


def infinitesimal_jackknife(
    loss: Loss,
    params: PyTree,
    data: PyTree,
    *,
    regularizer: Regularizer = None,
    linear_solver: LinearSolver = "auto",
    check: CheckMode = "raise",
    tol: float | None = None,
    solve_rtol: float | None = None,
    max_steps: int | None = None,
) -> PyTree:
    r"""Approximate leave-one-out parameters by the infinitesimal jackknife.

    Dropping example ``i`` sets :math:`w_i = 0`; a first-order Taylor expansion of
    :math:`\hat\theta(w)` around :math:`w = \mathbf 1` (Giordano et al., 2019, "A Swiss army
    infinitesimal jackknife") gives

    .. math::

        \hat\theta_{-i} \approx \hat\theta - \frac{\partial\hat\theta}{\partial w_i}
        = \hat\theta + H^{-1}\nabla_\theta \ell(\hat\theta, z_i).

    The error is :math:`O(1/n^2)` per parameter for smooth, well-conditioned problems
    (the change itself is :math:`O(1/n)`). :func:`approximate_leave_one_out` with
    ``method="newton"`` is more accurate at a higher cost.

    Parameters
    ----------
    loss, params, data, regularizer, linear_solver, check, tol, solve_rtol, max_steps
        As in :func:`influence_on_params`.

    Returns
    -------
    PyTree
        Pytree like ``params`` with a leading axis of length ``n``: entry ``i``
        approximates the parameters refitted without example ``i``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> data = jnp.array([0.0, 1.0, 5.0])
    >>> loss = lambda mu, z: 0.5 * (mu - z) ** 2
    >>> infinitesimal_jackknife(loss, jnp.mean(data), data)  # exact LOO means: 3, 2.5, 0.5
    Array([2.666..., 2.333..., 1.   ...], dtype=float32)
    """
    influence = influence_on_params(
        loss,
        params,
        data,
        regularizer=regularizer,
        linear_solver=linear_solver,
        check=check,
        tol=tol,
        solve_rtol=solve_rtol,
        max_steps=max_steps,
    )
    return jax.tree_util.tree_map(lambda p, d: p[None] - d, params, influence)


def _newton_dense(
    loss: Loss, regularizer: Regularizer, params: PyTree, data: PyTree, batch_size: int
):
    """``(H - H_i)⁻¹ g_i`` for every ``i`` with per-example dense Hessians."""
    flat, _, example_loss, objective = _flat_problem(loss, regularizer, params)
    hessian = jax.hessian(objective)(flat, data)

    def one(example: PyTree) -> jax.Array:
        g = jax.grad(example_loss)(flat, example)
        h = jax.hessian(example_loss)(flat, example)
        # The leave-i-out Hessian is a general (possibly indefinite when the model is not
        # convex) non-singular matrix: LU does not need positive definiteness.
        return jnp.linalg.solve(hessian - h, g)

    # Batches keep only batch_size per-example Hessians (p² each) alive.
    return _map_examples(one, data, batch_size)


def _newton_woodbury(
    loss: Loss,
    regularizer: Regularizer,
    params: PyTree,
    data: PyTree,
    rank: int,
    batch_size: int,
    key: jax.Array,
):
    """``(H - H_i)⁻¹ g_i`` by Sherman–Morrison–Woodbury from one factorization of ``H``.

    A randomized range finder recovers ``H_i = Q B Qᵀ`` exactly when ``rank(H_i) ≤ rank``
    (``Q`` spans ``H_i Ω`` for a Gaussian ``Ω``; ``B = Qᵀ H_i Q``). Then, with
    ``C = H⁻¹Q`` and ``u = H⁻¹g_i``, the form of Woodbury that tolerates a singular ``B``,

        (H - QBQᵀ)⁻¹ g = u + C (I - B QᵀC)⁻¹ B Qᵀ u,

    costs ``2·rank`` Hessian-vector products of one example and a ``rank × rank`` solve,
    instead of a ``p × p`` factorization per example. Returns the steps and, per example,
    the relative error of the low-rank representation on a fresh probe.
    """
    flat, _, example_loss, objective = _flat_problem(loss, regularizer, params)
    hessian = jax.hessian(objective)(flat, data)
    factor = jax.scipy.linalg.cho_factor(hessian, lower=True)
    p = flat.size
    probes = jax.random.normal(key, (p, rank + 1), dtype=flat.dtype)

    def one(example: PyTree):
        g = jax.grad(example_loss)(flat, example)

        def example_hvp(v: jax.Array) -> jax.Array:
            return jax.jvp(lambda t: jax.grad(example_loss)(t, example), (flat,), (v,))[1]

        hvps = jax.vmap(example_hvp, in_axes=1, out_axes=1)
        sketch = hvps(probes)  # H_i Ω, plus one probe kept aside to validate the rank
        q, _ = jnp.linalg.qr(sketch[:, :rank])
        b = q.T @ hvps(q)
        b = 0.5 * (b + b.T)
        # Validation: H_i ω for the spare probe must lie in span(Q) with the same action.
        spare = probes[:, rank]
        reconstructed = q @ (b @ (q.T @ spare))
        scale = jnp.linalg.norm(sketch[:, rank]) + jnp.finfo(flat.dtype).tiny
        mismatch = jnp.linalg.norm(sketch[:, rank] - reconstructed) / scale
        u = jax.scipy.linalg.cho_solve(factor, g)
        c = jax.scipy.linalg.cho_solve(factor, q)
        small = jnp.eye(rank, dtype=flat.dtype) - b @ (q.T @ c)
        step = u + c @ jnp.linalg.solve(small, b @ (q.T @ u))
        # An exactly zero H_i (e.g. a hinge-like flat loss) makes the mismatch 0/0-like:
        # scale is then ~tiny and the reconstruction 0, which is exact.
        mismatch = jnp.where(jnp.linalg.norm(sketch[:, rank]) == 0, 0.0, mismatch)
        return step, mismatch

    return _map_examples(one, data, batch_size)


def _newton_cg(
    loss: Loss,
    regularizer: Regularizer,
    params: PyTree,
    data: PyTree,
    max_steps: int,
    rtol: float,
):
    """``(H - H_i)⁻¹ g_i`` by CG on ``v ↦ Hv - H_i v``, batched over examples."""
    flat, _, example_loss, objective = _flat_problem(loss, regularizer, params)

    def total_hvp(v: jax.Array) -> jax.Array:
        return jax.jvp(lambda t: jax.grad(objective)(t, data), (flat,), (v,))[1]

    def one(example: PyTree):
        g = jax.grad(example_loss)(flat, example)

        def leave_out_hvp(v: jax.Array) -> jax.Array:
            example_hvp = jax.jvp(lambda t: jax.grad(example_loss)(t, example), (flat,), (v,))
            return total_hvp(v) - example_hvp[1]

        solution = solve_cg(leave_out_hvp, g, rtol=rtol, max_steps=max_steps, throw=False)
        # CG may report a NaN right-hand side as converged (its NaN residual norm is not
        # above the tolerance).
        finite = jnp.all(jnp.isfinite(g)) & jnp.all(jnp.isfinite(solution.value))
        return solution.value, solution.converged & finite

    return jax.vmap(one)(data)


def approximate_leave_one_out(
    loss: Loss,
    params: PyTree,
    data: PyTree,
    *,
    regularizer: Regularizer = None,
    method: Literal["ij", "newton"] = "newton",
    linear_solver: LinearSolver = "auto",
    hessian_rank: int | None = None,
    check: CheckMode = "raise",
    tol: float | None = None,
    solve_rtol: float | None = None,
    max_steps: int | None = None,
    seed: int = 0,
) -> PyTree:
    r"""Approximate the ``n`` leave-one-out fits :math:`\hat\theta_{-i}` without refitting.

    ``method="ij"`` is the infinitesimal jackknife :math:`\hat\theta + H^{-1} g_i`
    (:func:`infinitesimal_jackknife`). ``method="newton"`` (default) takes one Newton step
    from :math:`\hat\theta` on the leave-``i``-out objective
    :math:`F_{-i}(\theta) = F(\theta) - \ell(\theta, z_i)`, whose gradient at
    :math:`\hat\theta` is :math:`-g_i` and Hessian :math:`H - H_i`:

    .. math::

        \hat\theta_{-i} \approx \hat\theta + (H - H_i)^{-1} g_i, \qquad
        H_i = \nabla^2_\theta \ell(\hat\theta, z_i)

    (Beirami et al., 2017; Rad & Maleki, 2020, "ALO"). It is exact when the loss is quadratic
    in :math:`\theta` (least squares, ridge) and has error :math:`O(1/n^2)` relative to the
    jackknife's :math:`O(1/n)` relative error otherwise.

    How the Newton steps are solved:

    * ``hessian_rank=k`` given (e.g. ``1`` for generalized linear models, where
      :math:`H_i = \psi''\,x_i x_i^\top`; the number of outputs for multi-output models):
      Sherman–Morrison–Woodbury from one Cholesky factorization of ``H``, with ``H_i``
      recovered by ``2k`` Hessian-vector products of example ``i`` (a randomized range
      finder, checked on a spare probe). Cost ``O(p² k)`` per example.
    * otherwise, dense (``p ≤ 200`` or ``linear_solver`` ``"cholesky"``/``"lu"``): the
      ``p × p`` matrix ``H - H_i`` is built and solved per example (``O(p³)`` each, batched);
    * ``linear_solver="cg"`` (or ``p > 200``): CG with Hessian-vector products of
      ``H - H_i``, batched over examples.

    Parameters
    ----------
    loss, params, data, regularizer, linear_solver, check, tol, solve_rtol, max_steps
        As in :func:`influence_on_params`.
    method
        ``"newton"`` or ``"ij"``.
    hessian_rank
        Upper bound on the rank of every per-example Hessian; enables the Woodbury path.
        A bound that is too small is detected and raises ``ValueError``.
    seed
        Seed of the random probes of the Woodbury path.

    Returns
    -------
    PyTree
        Pytree like ``params`` with a leading axis of length ``n``: approximations of the
        leave-one-out parameters.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> data = jnp.array([0.0, 1.0, 5.0])
    >>> loss = lambda mu, z: 0.5 * (mu - z) ** 2           # quadratic: Newton is exact
    >>> approximate_leave_one_out(loss, jnp.mean(data), data)
    Array([3. , 2.5, 0.5], dtype=float32)
    """
    common: dict[str, Any] = {
        "regularizer": regularizer,
        "linear_solver": linear_solver,
        "check": check,
        "tol": tol,
        "solve_rtol": solve_rtol,
        "max_steps": max_steps,
    }
    if method == "ij":
        return infinitesimal_jackknife(loss, params, data, **common)
    if method != "newton":
        raise ValueError(f"method must be 'ij' or 'newton', got {method!r}.")
    name = "approximate_leave_one_out"
    params, data = _as_arrays(params, "params", name), _as_arrays(data, "data", name)
    n = _num_examples(data)
    kernels = _kernels(loss, regularizer)
    _check_stationary(kernels, params, data, check=check, tol=tol, caller=name)
    flat, unravel = ravel_pytree(params)
    p = flat.size
    caller = f"dargmin.sensitivity.{name}"
    if hessian_rank is not None:
        rank = int(hessian_rank)
        if not 1 <= rank <= p:
            raise ValueError(f"hessian_rank must be in [1, {p}], got {hessian_rank!r}.")
        steps, mismatch = kernels.newton_woodbury(
            params, data, rank, _WOODBURY_BATCH, jax.random.key(seed)
        )
        eps = float(jnp.finfo(flat.dtype).eps)
        worst = int(jnp.argmax(mismatch))
        if float(mismatch[worst]) > 1e3 * eps**0.5:
            raise ValueError(
                f"{caller}: hessian_rank={rank} is smaller than the rank of the per-example "
                f"Hessians: for example {worst}, a rank-{rank} representation misses "
                f"{float(mismatch[worst]):.2g} of a Hessian-vector product. Pass a larger "
                "hessian_rank or leave it None."
            )
    elif _resolve_solver(linear_solver, p) in ("cholesky", "lu"):
        steps = kernels.newton_dense(params, data, _HESSIAN_BATCH)
    else:
        rtol = float(solve_rtol) if solve_rtol is not None else _default_rtol(flat.dtype)
        steps_cap = max_steps if max_steps is not None else max(10 * p, 100)
        steps, converged = kernels.newton_cg(params, data, steps_cap, rtol)
        failed = np.flatnonzero(~np.asarray(converged))
        if failed.size:
            _raise_if_nonfinite(kernels, params, data, caller=name)
            raise _refusal(
                SingularSystemError,
                "singular",
                f"{caller}: conjugate gradients on the leave-one-out Hessians H - H_i did not "
                f"converge within {steps_cap} steps for {failed.size} of {n} examples (first: "
                f"{failed[:5].tolist()}); removing those examples may leave a singular "
                "problem. Add a regularizer or raise max_steps.",
            )
    bad = np.flatnonzero(~np.all(np.isfinite(np.asarray(steps)), axis=1))
    if bad.size:
        _raise_if_nonfinite(kernels, params, data, caller=name)
        if hessian_rank is not None:
            _check_cholesky(kernels, params, data, caller)
        raise _refusal(
            SingularSystemError,
            "singular",
            f"{caller}: the leave-one-out Hessian H - H_i is singular for {bad.size} of {n} "
            f"examples (first: {bad[:5].tolist()}): without them the problem has no unique "
            "minimizer. Add a regularizer, or use method='ij'.",
        )
    return jax.vmap(lambda s: unravel(flat + s))(steps)


def _check_cholesky(kernels: _Kernels, params: PyTree, data: PyTree, caller: str) -> None:
    """The Woodbury path factorizes ``H`` by Cholesky: refuse, with its eigenvalues, an ``H``
    that is not positive definite (a saddle or a singular fit let through by ``check``)."""
    spectrum = np.linalg.eigvalsh(np.asarray(kernels.total_hessian(params, data)))
    lo, hi = float(spectrum[0]), float(spectrum[-1])
    eps = float(np.finfo(spectrum.dtype).eps)
    if lo > spectrum.size * eps * max(abs(hi), np.finfo(spectrum.dtype).tiny):
        return
    reason, what = (
        ("not_minimum", "not positive definite: params is not a minimum")
        if lo < 0
        else ("singular", "singular: the minimum is not unique")
    )
    raise _refusal(
        SingularSystemError,
        reason,
        f"{caller}: the Hessian H is {what} (its eigenvalues lie in [{lo:.3g}, {hi:.3g}]), "
        "and the Woodbury updates of hessian_rank= need its Cholesky factorization. Add a "
        "regularizer, or leave hessian_rank=None (dense LU per example).",
    )


def approximate_cv_error(
    loss: Loss,
    params: PyTree,
    data: PyTree,
    *,
    metric: Callable[[PyTree, PyTree], jax.Array] | None = None,
    regularizer: Regularizer = None,
    method: Literal["ij", "newton"] = "newton",
    linear_solver: LinearSolver = "auto",
    hessian_rank: int | None = None,
    check: CheckMode = "raise",
    tol: float | None = None,
    solve_rtol: float | None = None,
    max_steps: int | None = None,
    seed: int = 0,
) -> jax.Array:
    r"""Leave-one-out cross-validation error without refitting.

    .. math::

        \mathrm{CV} = \frac1n \sum_{i=1}^n m(\hat\theta_{-i}, z_i),

    with :math:`\hat\theta_{-i}` from :func:`approximate_leave_one_out` and the metric
    :math:`m` defaulting to the training loss (``metric=None``). With ``method="newton"``
    and a quadratic loss this equals exact leave-one-out cross-validation.

    Parameters
    ----------
    loss, params, data, regularizer, method, linear_solver, hessian_rank, check, tol, \
solve_rtol, max_steps, seed
        As in :func:`approximate_leave_one_out`.
    metric
        ``metric(params, example) -> scalar`` evaluated on the held-out example (e.g. a
        0-1 error or the squared error); ``None`` uses ``loss``.

    Returns
    -------
    jax.Array
        The scalar cross-validation estimate.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> data = jnp.array([0.0, 1.0, 5.0])
    >>> loss = lambda mu, z: 0.5 * (mu - z) ** 2
    >>> approximate_cv_error(loss, jnp.mean(data), data)  # (4.5 + 1.125 + 10.125) / 3
    Array(5.25, dtype=float32)
    """
    metric = loss if metric is None else metric
    params = _as_arrays(params, "params", "approximate_cv_error")
    data = _as_arrays(data, "data", "approximate_cv_error")
    left_out = approximate_leave_one_out(
        loss,
        params,
        data,
        regularizer=regularizer,
        method=method,
        linear_solver=linear_solver,
        hessian_rank=hessian_rank,
        check=check,
        tol=tol,
        solve_rtol=solve_rtol,
        max_steps=max_steps,
        seed=seed,
    )
    # Each held-out example is scored by the fit that did not see it.
    return jnp.mean(jax.vmap(metric)(left_out, data))


def jackknife_variance(
    loss: Loss,
    params: PyTree,
    data: PyTree,
    *,
    regularizer: Regularizer = None,
    linear_solver: LinearSolver = "auto",
    check: CheckMode = "raise",
    tol: float | None = None,
    solve_rtol: float | None = None,
    max_steps: int | None = None,
) -> PyTree:
    r"""Infinitesimal-jackknife variance of the fitted parameters (the sandwich diagonal).

    .. math::

        \widehat{\mathrm{Var}}_{IJ}(\hat\theta) = \sum_{i=1}^n
        \Big(\frac{\partial\hat\theta}{\partial w_i}\Big)^2
        = \operatorname{diag}\Big(H^{-1} \Big(\sum_i g_i g_i^\top\Big) H^{-1}\Big),

    the diagonal of the sandwich (Huber–White) covariance of an M-estimator with summed
    loss, robust to model misspecification. Uses :func:`influence_on_params`, so never forms
    the ``p × p`` covariance.

    Parameters
    ----------
    loss, params, data, regularizer, linear_solver, check, tol, solve_rtol, max_steps
        As in :func:`influence_on_params`.

    Returns
    -------
    PyTree
        Like ``params``: the estimated variance of each parameter.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> data = jnp.array([0.0, 1.0, 5.0])
    >>> loss = lambda mu, z: 0.5 * (mu - z) ** 2           # Σ(z - z̄)²/n²
    >>> jackknife_variance(loss, jnp.mean(data), data)
    Array(1.555..., dtype=float32)
    """
    influence = influence_on_params(
        loss,
        params,
        data,
        regularizer=regularizer,
        linear_solver=linear_solver,
        check=check,
        tol=tol,
        solve_rtol=solve_rtol,
        max_steps=max_steps,
    )
    return jax.tree_util.tree_map(lambda d: jnp.sum(d**2, axis=0), influence)
