"""The linear system behind :class:`dargmin.taylor.TaylorExpansion`, and the recursion on it.

``H = ∂ₓg(x₀, θ₀)`` is set up once per expansion: the solver strategy is decided
(:func:`_resolve_strategy`), ``H`` is formed and factorized once for dense strategies (the
factors stored transposed, :func:`_transposed_once`) or applied matrix-free, and ``(x₀, θ₀)``
is checked with :mod:`dargmin.diagnostics`. On that system the derivatives solve
``H x_k = -r_k`` order after order (:meth:`_TaylorSystem._flat_derivatives`), with the
residuals ``r_k`` of :mod:`dargmin.taylor_jets`; matrix-free solves start from the best
combination of the earlier orders. :class:`_TaylorSystem` is the base class of
``TaylorExpansion``, which adds the public API.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jax.flatten_util import ravel_pytree

from dargmin import diagnostics
from dargmin.diagnostics import Check
from dargmin.linear_solvers import (
    DENSE_MAX_SIZE_REUSED,
    Auto,
    Factorization,
    LinearSolver,
    as_linear_solver,
    factorize,
    operator_tags,
    with_tolerances,
)
from dargmin.taylor_jets import _residual_jet, _residual_nested

PyTree = Any
State = tuple[jax.Array, jax.Array, Any]


def _resolve_strategy(
    spec: str | LinearSolver | lx.AbstractLinearSolver,
    *,
    size: int,
    dtype: Any,
    symmetric: bool,
    positive_definite: bool,
    krylov_rtol: float | None,
    krylov_max_steps: int | None,
    problem: str,
) -> LinearSolver:
    """The concrete strategy, decided once at construction.

    ``"auto"`` is ``Auto(dense_max_size=DENSE_MAX_SIZE_REUSED)``: the one factorization serves
    every order and direction, so dense pays off up to 2000 unknowns. A Krylov strategy gets
    ``krylov_rtol``/``krylov_max_steps`` when given, else its own values, else ``rtol =
    eps^0.75`` (the errors of the orders compound, so the series asks more than one solve's
    default); ``atol`` stays the layer's (``1e-3·rtol``, see ``default_tolerances``).
    """
    is_auto = isinstance(spec, str) and spec == "auto"
    strategy = Auto(dense_max_size=DENSE_MAX_SIZE_REUSED) if is_auto else as_linear_solver(spec)
    strategy = strategy.resolve(size, symmetric=symmetric, positive_definite=positive_definite)
    operator_tags(
        strategy, symmetric=symmetric, positive_definite=positive_definite, problem=problem
    )
    if not strategy.dense:
        own_rtol = getattr(strategy, "rtol", None)
        rtol = krylov_rtol if krylov_rtol is not None else own_rtol
        rtol = rtol if rtol is not None else float(jnp.finfo(dtype).eps) ** 0.75
        strategy = with_tolerances(strategy, rtol=rtol, max_steps=krylov_max_steps)
    return strategy


def _transpose_matrices(leaf: jax.Array) -> jax.Array:
    return leaf.T if leaf.ndim == 2 else leaf


def _transposed_once(tree: PyTree) -> PyTree:
    """``tree`` with its matrices transposed; equal matrices (``H`` is held by the operator
    and by the solver's state) come out as one array, so ``H`` is stored once."""
    done: list[tuple[jax.Array, jax.Array]] = []

    def transpose(leaf: jax.Array) -> jax.Array:
        if leaf.ndim != 2:
            return leaf
        for seen, result in done:
            if (
                seen.shape == leaf.shape
                and seen.dtype == leaf.dtype
                and bool(jnp.array_equal(seen, leaf))
            ):
                return result
        done.append((leaf, leaf.T))
        return done[-1][1]

    return jax.tree_util.tree_map(transpose, tree)


def _typed_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Give eager callers the typed dargmin error raised by a checked solve in compiled code."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except jax.errors.JaxRuntimeError as err:
            diagnostics.reraise_typed(err)
            raise

    return wrapper


def _validate_order(order: Any, *, minimum: int) -> int:
    """An order is a whole number: ``order=1.5`` must not be silently truncated to 1."""
    if isinstance(order, bool) or not float(order).is_integer():
        raise ValueError(f"order must be a whole number (an int), got {order!r}.")
    if int(order) < minimum:
        raise ValueError(f"order must be at least {minimum}, got {order!r}.")
    return int(order)


class _TaylorSystem:
    """The system ``H`` of an expansion and the order-by-order solves on it (the base class of
    :class:`dargmin.taylor.TaylorExpansion`, whose ``__init__`` calls :meth:`_setup`)."""

    # The fields, set once by _setup / TaylorExpansion.__init__ (through object.__setattr__:
    # a TaylorExpansion is immutable) and never changed.
    _order: int
    _optimality: bool
    _symmetric: bool
    _positive_definite: bool
    _kind: Literal["argmin", "root"]
    _check: Check
    _x0: jax.Array
    _th0: jax.Array
    _unravel_x: Callable[[jax.Array], PyTree]
    _unravel_th: Callable[[jax.Array], PyTree]
    _dtype: Any
    _g: Callable[[jax.Array, jax.Array], jax.Array]
    _strategy: LinearSolver
    _tags: Any
    _failure_mode: Literal["raise", "warn"]
    _factors: PyTree | None
    _static_system: PyTree | None
    _method: str
    _runs: tuple[Callable[..., list[PyTree]], ...]

    def _setup(
        self,
        fn: Callable[..., PyTree],
        x0: PyTree,
        theta0: PyTree,
        order: int,
        *,
        optimality: bool,
        symmetric: bool,
        linear_solver: str | LinearSolver | lx.AbstractLinearSolver,
        check: Check,
        krylov_rtol: float | None,
        krylov_max_steps: int | None,
    ) -> None:
        """Everything up to the choice of the Taylor mode: the flat optimality function, the
        strategy, the one factorization (dense strategies) and the check of ``(x₀, θ₀)``."""
        set_field = functools.partial(object.__setattr__, self)
        x_flat, unravel_x = ravel_pytree(x0)
        if not jnp.issubdtype(x_flat.dtype, jnp.inexact):
            raise TypeError(f"x0 must have floating-point leaves, got dtype {x_flat.dtype}.")
        th_flat, unravel_th = ravel_pytree(theta0)
        if not jnp.issubdtype(th_flat.dtype, jnp.inexact):
            # Integer parameters cannot carry a direction: compute in the dtype of x.
            th_flat = th_flat.astype(x_flat.dtype)
        if optimality:

            def g_flat(x: jax.Array, th: jax.Array) -> jax.Array:
                return ravel_pytree(fn(unravel_x(x), unravel_th(th)))[0].astype(x.dtype)
        else:

            def g_flat(x: jax.Array, th: jax.Array) -> jax.Array:
                grad = jax.grad(lambda xx: fn(unravel_x(xx), unravel_th(th)))(x)
                return grad.astype(x.dtype)

        n = x_flat.size
        out = jax.eval_shape(g_flat, x_flat, th_flat)
        if out.shape != x_flat.shape:
            raise ValueError(
                f"The optimality function must return as many entries as x has ({n}), "
                f"got shape {out.shape}."
            )
        positive_definite = not optimality  # an objective declares a minimum
        kind = "root" if optimality else "argmin"
        strategy = _resolve_strategy(
            linear_solver,
            size=n,
            dtype=x_flat.dtype,
            symmetric=symmetric,
            positive_definite=positive_definite,
            krylov_rtol=krylov_rtol,
            krylov_max_steps=krylov_max_steps,
            problem=f"{kind} problem",
        )
        for name, value in {
            "_order": order,
            "_optimality": bool(optimality),
            "_symmetric": symmetric,
            "_positive_definite": positive_definite,
            "_kind": kind,
            "_check": check,
            "_x0": x_flat,
            "_th0": th_flat,
            "_unravel_x": unravel_x,
            "_unravel_th": unravel_th,
            "_dtype": x_flat.dtype,
            "_g": g_flat,
            "_strategy": strategy,
            "_tags": operator_tags(
                strategy, symmetric=symmetric, positive_definite=positive_definite
            ),
            # A failed solve is reported in every mode: raised, or warned under check="warn".
            "_failure_mode": "warn" if check.mode == "warn" else "raise",
        }.items():
            set_field(name, value)

        # The one factorization (dense strategies), made here and never replaced: its arrays
        # go into the compiled functions as arguments, the rest (solver, tags) is static.
        factors, static = None, None
        usable: bool | jax.Array = True
        if strategy.dense:
            system, usable = eqx.filter_jit(self._factorize)(x_flat, th_flat)
            factors, static = eqx.partition(system, eqx.is_array)
            # Stored transposed: XLA's triangular solves read column-major matrices, and the
            # transpose of a row-major array is a free bitcast to that layout. Stored as is,
            # every call copied (transposed) the whole factor, which cost more than the solves.
            # (H appears twice in the factorization, once in memory: keep it so.)
            factors = _transposed_once(factors)
        set_field("_factors", factors)
        set_field("_static_system", static)
        if check.mode != "ignore":
            self._diagnose()
        if not bool(usable):
            self._report_failed_factorization()

    def _factorize(self, x0: jax.Array, th0: jax.Array) -> tuple[Factorization, jax.Array]:
        """Form ``H = ∂ₓg(x₀, θ₀)`` densely and factorize it once; also whether it is usable
        (a failed factorization, e.g. Cholesky of an indefinite ``H``, gives non-finite solves)."""
        h = jax.jacfwd(self._g)(x0, th0)
        if self._symmetric:
            h = 0.5 * (h + h.T)  # symmetric up to rounding; Cholesky reads one half
        system = factorize(
            lx.MatrixLinearOperator(h, self._tags),
            self._strategy,
            context="TaylorExpansion",
            mode=self._failure_mode,
        )
        probe = system.solve_unchecked(jnp.ones_like(x0))[0]
        return system, jnp.all(jnp.isfinite(probe))

    def _system(self, state: State) -> Factorization:
        """The prepared system ``H`` (traceable): the stored factors, or matrix-free."""
        x0, th0, factors = state
        if factors is not None:
            factors = jax.tree_util.tree_map(_transpose_matrices, factors)
            return eqx.combine(factors, self._static_system)
        # Linearize once: every Krylov iteration of every order reuses the same linear map.
        _, hvp = jax.linearize(lambda v: self._g(v, th0), x0)
        operator = lx.FunctionLinearOperator(
            hvp, jax.ShapeDtypeStruct(x0.shape, x0.dtype), self._tags
        )
        return factorize(
            operator, self._strategy, context="TaylorExpansion", mode=self._failure_mode
        )

    def _state(self) -> State:
        # Passed as arguments (not closed over) so that compiled functions take them as inputs.
        return (self._x0, self._th0, self._factors)

    def _measure(self, state: State) -> diagnostics.Measurements:
        """:func:`dargmin.diagnostics.measure` at ``(x₀, θ₀)`` with the stored system."""
        x0, th0, _ = state
        system, strategy = self._system(state), self._strategy
        return diagnostics.measure(
            self._g(x0, th0),
            x0,
            system,
            strategy,
            positive_definite=self._positive_definite,
            newton_system=diagnostics.newton_system_for(system, strategy),
        )

    def _diagnose(self) -> None:
        """Measure stationarity, conditioning and definiteness at ``(x₀, θ₀)``; judge them with
        the shared verdict (:func:`dargmin.diagnostics.report_implicit_check`)."""
        measurements = jax.jit(self._measure)(self._state())  # one call: eager dispatch is slow
        verdict = diagnostics.judge(
            self._check,
            kind=self._kind,
            positive_definite=self._positive_definite,
            dtype=self._dtype,
        )
        try:
            verdict(*(float(v) for v in measurements))
        except diagnostics.DargminError as err:
            error = type(err)(f"TaylorExpansion at (x0, theta0): {err}")
            error.reason = err.reason
            raise error from None

    @_typed_errors
    def _report_failed_factorization(self) -> None:
        """A dense factorization that failed (Cholesky of an indefinite ``H``, LU of a singular
        one): a checked solve reports it in the layer's words (raise, or warn)."""
        solve = jax.jit(lambda state: self._system(state).solve(jnp.ones_like(state[0])))
        solve(self._state()).block_until_ready()

    def _flat_derivatives(self, state: State, delta: jax.Array, order: int) -> list[jax.Array]:
        """``[x_1, …, x_order]`` (flat) along the flat direction ``delta`` (traceable)."""
        x0, th0, _ = state
        system = self._system(state)
        residual = _residual_jet if self._method == "jet" else _residual_nested
        xs: list[jax.Array] = []
        rs: list[jax.Array] = []
        for _ in range(order):
            r = residual(self._g, x0, th0, delta, xs)
            xs.append(-self._solve(system, r, xs, rs))
            rs.append(r)
        return xs

    def _solve(
        self, system: Factorization, r: jax.Array, xs: list[jax.Array], rs: list[jax.Array]
    ) -> jax.Array:
        """``H⁻¹ r``: the stored factors, or a checked Krylov solve from a warm start."""
        if self._strategy.dense:
            # The factors were verified at construction (a finite solve). A dense solve's check
            # is a finiteness test only, and its host round trip per order cost 4-10× the
            # triangular solves on small problems; a non-finite r_k shows in the result.
            return system.solve_unchecked(r)[0]
        guess, rhs = jnp.zeros_like(r), r
        if xs:
            # Warm start. H x_j = -r_j is known, so y = -Σ c_j x_j has H y = Σ c_j r_j: the c
            # minimizing ‖r − Σ c_j r_j‖ costs no operator product, and the solve (no initial
            # guess in the Krylov solvers) is for the correction, to the same relative accuracy.
            past = jnp.stack(rs)
            coef = jnp.linalg.lstsq(past.T, r)[0]
            guess, rhs = -(coef @ jnp.stack(xs)), r - coef @ past
        # The solve is linear: solve for the unit vector and scale back. Near the absolute
        # floor atol a Krylov solver stops at once (rightly), but the layer's check judges the
        # relative residual and would call that a failure; a zero right-hand side (r_k = 0)
        # has the solution 0 without a solve (lineax's BiCGStab returns NaN for it).
        norm = jnp.linalg.norm(rhs)
        nonzero = norm > 0
        scale = jnp.where(nonzero, norm, 1.0)
        unit = jnp.where(nonzero, rhs / scale, jnp.ones_like(rhs) / math.sqrt(rhs.size))
        correction = system.solve(unit) * scale
        return guess + jnp.where(nonzero, correction, jnp.zeros_like(rhs))

    def _run(self, state: State, delta: PyTree, *, order: int) -> list[PyTree]:
        # Δ goes in as given (pytree or array) and the x_k come out as pytrees: the flattening
        # happens inside the compiled function, because done eagerly it would cost more than
        # the derivatives themselves on small problems.
        xs = self._flat_derivatives(state, self._flat_delta(delta), order)
        return [self._unravel_x(xk) for xk in xs]

    def _compiled(self, order: int) -> Callable[..., list[PyTree]]:
        """The jitted ``(state, Δ) ↦ [x_1..x_order]`` (one per order, made at construction)."""
        return self._runs[order - 1]

    def _flat_kth(self, k: int) -> Callable[[jax.Array], jax.Array]:
        """Flat direction ↦ flat ``x_k`` (for batched use under ``vmap``)."""
        compiled, state = self._compiled(k), self._state()
        return lambda d: ravel_pytree(compiled(state, self._unravel_th(d))[-1])[0]

    def _check_order(self, order: int | None) -> int:
        order = self._order if order is None else _validate_order(order, minimum=0)
        if not 0 <= order <= self._order:
            raise ValueError(
                f"order must be between 0 and the expansion's order {self._order}, got {order}."
            )
        return order

    def _flat_delta(self, delta: PyTree) -> jax.Array:
        if jax.tree_util.tree_structure(delta) == jax.tree_util.tree_structure(0.0):
            delta = jnp.broadcast_to(jnp.asarray(delta), self._th0.shape)
            flat = jnp.reshape(delta, -1)
        else:
            flat = ravel_pytree(delta)[0]
        if flat.shape != self._th0.shape:
            raise ValueError(
                f"The direction has {flat.size} entries but theta0 has {self._th0.size}."
            )
        return flat.astype(self._th0.dtype)
