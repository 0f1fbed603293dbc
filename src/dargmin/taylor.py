"""Taylor series of the solution of an optimization problem in its parameters.

For a solution map ``x*(θ)`` defined by ``g(x*(θ), θ) = 0`` (``g = ∇ₓf`` for an argmin) the
series along a direction ``Δ`` is

.. math::

    x^*(\\theta_0 + t\\Delta) \\approx \\sum_{k=0}^{K} \\frac{t^k}{k!}\\, x_k, \\qquad
    x_k = \\frac{d^k}{dt^k} x^*(\\theta_0 + t\\Delta)\\Big|_{t=0}
        = D^k x^*(\\theta_0)[\\Delta, \\dots, \\Delta].

Differentiating ``φ(t) = g(x(t), θ₀ + tΔ) = 0`` ``k`` times at ``t = 0`` (Faà di Bruno) gives

.. math::

    0 = φ^{(k)}(0) = H\\, x_k + r_k, \\qquad H = \\partial_x g(x_0, \\theta_0),

where ``r_k`` depends only on ``x_1, …, x_{k-1}`` and ``Δ``: it is ``φ^{(k)}(0)`` computed
with ``x_k`` set to zero. So ``x_k = -H^{-1} r_k``, one order after the other. ``r_k`` comes
from Taylor-mode automatic differentiation, which propagates a whole truncated series through
``g`` at a cost that grows polynomially with the order, and ``H`` is factorized once
(Cholesky for a minimum, LU otherwise) and reused for every order and every direction.
All linear algebra goes through :mod:`dargmin.linear_solvers` (one factorization,
:func:`~dargmin.linear_solvers.factorize`; checked Krylov solves for large problems) and the
check of ``(x₀, θ₀)`` is :mod:`dargmin.diagnostics`'s. The Taylor-mode machinery lives in
:mod:`dargmin.taylor_jets`, the system ``H`` and the order-by-order solves on it in
:mod:`dargmin.taylor_system`.

The Taylor mode is :func:`jax.experimental.jet`'s, driven by a small interpreter of the
jaxpr of ``g`` that keeps zero coefficients symbolic through the linear and bilinear
primitives (jet itself materializes them as arrays of zeros, and multiplies by them). A term
of ``g`` linear in ``x``, say ``Ax`` with a closed-over matrix ``A``, then costs nothing unless
a nonlinearity consumes it: its top coefficient is ``A x_k`` with ``x_k = 0``, a symbolic zero.
For ``g = Ax + (cheap nonlinear term)`` a call is the ``K`` pairs of triangular solves plus the
nonlinear term's series, where jet did ``O(K²)`` products of ``A`` with zeros.

Nesting ``jax.jvp`` around an implicitly differentiated solver gives the same numbers but
re-forms and re-factorizes ``H`` at every level of nesting (``2^k``-fold).

Which functions are supported
-----------------------------
``jet`` has rules for the elementwise and structural primitives (arithmetic, powers, ``exp``,
``log``, ``sin``/``cos``, ``tanh``, ``logistic``, ``erf``, ``sqrt``, dot products, reductions,
indexing, ``jnp.where``, ``logsumexp``, ...). It has none for ``arctan``/``tan``, control
flow (``lax.cond``, ``lax.scan``/``fori_loop``/``while_loop``), linear solves and
factorizations, and it fails on some ``custom_jvp`` functions (``jax.nn.softplus``,
``jax.nn.log_sigmoid``). For such objectives the residuals ``r_k`` are computed by nested
forward mode instead (``k`` nested ``jax.jvp`` along the curve ``t ↦ (x(t), θ₀ + tΔ)``, cost
``2^k`` evaluations of ``g``), with a :class:`dargmin.DargminWarning` naming the primitive.
The factorization of ``H`` is still shared. The numbers agree to rounding.

Examples
--------
>>> import jax, jax.numpy as jnp
>>> f = lambda x, lam: 0.5 * jnp.sum((x - 1.0) ** 2) + 0.5 * lam * jnp.sum(x**2)
>>> te = TaylorExpansion(f, jnp.full(2, 0.5), 1.0, order=3)   # x*(λ) = 1 / (1 + λ)
>>> [round(float(d[0]), 6) for d in te.derivatives(1.0)]    # -1/4, 2/8, -6/16
[-0.25, 0.25, -0.375]
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jax.flatten_util import ravel_pytree

from dargmin.diagnostics import Check, CheckMode
from dargmin.linear_solvers import LinearSolver
from dargmin.taylor_accuracy import AccuracyReport, _accuracy_report
from dargmin.taylor_jets import _select_method
from dargmin.taylor_polarization import _polarization, _tensor_polarization
from dargmin.taylor_system import _TaylorSystem, _typed_errors, _validate_order

PyTree = Any
Method = Literal["auto", "jet", "nested"]

__all__ = ["AccuracyReport", "TaylorExpansion", "taylor_expand"]


class TaylorExpansion(_TaylorSystem):
    """Taylor expansion of an optimum ``x*(θ)`` around ``(x₀, θ₀)`` up to a maximal order.

    With ``g = ∇ₓf`` (or a given optimality function), ``H = ∂ₓg(x₀, θ₀)`` and a direction
    ``Δ``, the derivatives ``x_k = D^k x*(θ₀)[Δ]^k`` solve

    .. math:: H x_k = -r_k(x_1, \\dots, x_{k-1}; \\Delta), \\qquad k = 1, \\dots, K,

    where ``r_k`` is the k-th Taylor coefficient of ``g(x(t), θ₀+tΔ)`` with ``x_k = 0``
    (computed with :func:`jax.experimental.jet`, or nested ``jvp`` where jet lacks a rule).
    ``H`` is formed and factorized once at construction (dense Cholesky or LU, through
    :func:`dargmin.linear_solvers.factorize`), or applied matrix-free (Hessian-vector
    products and checked CG/GMRES solves) for large problems.

    The object is immutable: the strategy is decided and the factorization made in
    ``__init__``, and neither changes afterwards (a Cholesky factorization that fails is
    reported, never silently replaced by LU).

    Parameters
    ----------
    fn
        The objective ``f(x, θ) -> scalar`` (default), or the optimality function
        ``g(x, θ)`` (a pytree shaped like ``x``) when ``optimality=True``.
    x0
        The solution at ``θ0`` (pytree of floating arrays). It must be stationary.
    theta0
        The parameters at which ``x0`` was computed (pytree of arrays).
    order
        The maximal order ``K`` of the expansion (``≥ 1``).
    optimality
        Interpret ``fn`` as ``g(x, θ)`` (root problem) instead of an objective.
    symmetric
        Whether ``∂ₓg`` is symmetric (default: ``True`` for an objective, ``False`` for an
        optimality function). An objective declares a minimum: ``H`` must be positive
        definite, and the check refuses a saddle point.
    linear_solver
        ``"auto"`` (default: ``Auto(dense_max_size=DENSE_MAX_SIZE_REUSED)``, a dense
        Cholesky/LU factorization up to 2000 unknowns, CG/GMRES beyond), any name of
        :data:`dargmin.linear_solvers.SOLVERS` (``"cholesky"``, ``"lu"``, ``"qr"``,
        ``"lstsq"``, ``"cg"``, ``"minres"``, ``"gmres"``, ``"bicgstab"``, ``"lsmr"``), a
        strategy (``CG(rtol=1e-12)``, ``Auto(dense_max_size=500)``) or a lineax solver.
    method
        ``"auto"`` (jet, falling back to nested jvp with a warning), ``"jet"`` or ``"nested"``.
    check
        ``"raise"`` (default), ``"warn"``, ``"ignore"`` or a :class:`dargmin.Check`: what to
        do when ``x0`` is not stationary or ``H`` is singular, ill-conditioned or (objective)
        not positive definite. A failed factorization or Krylov solve is reported in every
        mode (raised; warned with ``"warn"``).
    tol
        Largest accepted Newton step ``‖H⁻¹g(x₀, θ₀)‖ / max(1, ‖x₀‖)`` (``1e-4`` in float64,
        ``1e-2`` in float32).
    max_condition
        Largest accepted lower bound of ``cond(H)`` (``0.01 / eps``).
    krylov_rtol, krylov_max_steps
        Tolerance and iteration cap of the matrix-free solves (default ``eps^0.75`` and
        ``max(10 n, 100)``; the absolute floor is ``1e-3 · rtol``).

    Raises
    ------
    dargmin.NonStationaryPointError
        ``x0`` is not a root of ``g(·, θ0)`` (the Newton step is above ``tol``).
    dargmin.SingularSystemError
        ``H`` is singular, badly conditioned, or (objective) not positive definite (reason
        ``"not_minimum"``: read it with :func:`dargmin.diagnostics.failure_reason`).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> f = lambda x, th: 0.5 * jnp.sum(x**2) - jnp.sum(jnp.sin(th) * x)   # x* = sin θ
    >>> te = TaylorExpansion(f, jnp.zeros(2), jnp.zeros(2), order=3)
    >>> [(d.round(4) + 0.0).tolist() for d in te.derivatives(jnp.array([1.0, 2.0]))]
    [[1.0, 2.0], [0.0, 0.0], [-1.0, -8.0]]
    >>> [round(v, 5) for v in te.predict(jnp.array([0.1, 0.2])).tolist()]  # ≈ sin θ + O(θ⁴)
    [0.09983, 0.19867]
    """

    def __init__(
        self,
        fn: Callable[..., PyTree],
        x0: PyTree,
        theta0: PyTree,
        order: int = 4,
        *,
        optimality: bool = False,
        symmetric: bool | None = None,
        linear_solver: str | LinearSolver | lx.AbstractLinearSolver = "auto",
        method: Method = "auto",
        check: CheckMode | Check = "raise",
        tol: float | None = None,
        max_condition: float | None = None,
        krylov_rtol: float | None = None,
        krylov_max_steps: int | None = None,
    ) -> None:
        set_field = functools.partial(object.__setattr__, self)
        order = _validate_order(order, minimum=1)
        if method not in ("auto", "jet", "nested"):
            raise ValueError(f"method must be 'auto', 'jet' or 'nested', got {method!r}.")
        check = Check.of(check, tol=tol, max_condition=max_condition)
        symmetric = (not optimality) if symmetric is None else bool(symmetric)
        # The flat problem, the strategy, the one factorization and the check of (x0, theta0):
        # see dargmin.taylor_system.
        self._setup(
            fn,
            x0,
            theta0,
            order,
            optimality=optimality,
            symmetric=symmetric,
            linear_solver=linear_solver,
            check=check,
            krylov_rtol=krylov_rtol,
            krylov_max_steps=krylov_max_steps,
        )
        set_field("_method", _select_method(self._g, self._x0, self._th0, order, method))
        # One jitted function per order (compiled at its first call by JAX's own cache).
        runs = tuple(jax.jit(functools.partial(self._run, order=k)) for k in range(1, order + 1))
        set_field("_runs", runs)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(
            f"TaylorExpansion is immutable (cannot set {name!r}); build a new expansion instead."
        )

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"TaylorExpansion is immutable (cannot delete {name!r}).")

    # ---------------------------------------------------------------------------- construction

    @classmethod
    def from_optimality(
        cls,
        g: Callable[..., PyTree],
        x0: PyTree,
        theta0: PyTree,
        order: int = 4,
        **kwargs: Any,
    ) -> TaylorExpansion:
        """Expansion of the root ``x*(θ)`` of ``g(x, θ) = 0`` (``optimality=True``).

        Examples
        --------
        >>> import jax.numpy as jnp
        >>> g = lambda x, a: x**2 - a                       # x*(a) = sqrt(a)
        >>> te = TaylorExpansion.from_optimality(g, jnp.array(2.0), jnp.array(4.0), order=2)
        >>> [round(float(d), 6) for d in te.derivatives(1.0)]  # a^{-1/2}/2, -a^{-3/2}/4
        [0.25, -0.03125]
        """
        return cls(g, x0, theta0, order, optimality=True, **kwargs)

    # ------------------------------------------------------------------------------ properties

    @property
    def order(self) -> int:
        """The maximal order ``K`` of the expansion."""
        return self._order

    @property
    def method(self) -> str:
        """``"jet"`` or ``"nested"``: how the residuals ``r_k`` are computed."""
        return self._method

    @property
    def linear_solver(self) -> str:
        """The resolved strategy's name (``"cholesky"``, ``"lu"``, ``"cg"``, ``"gmres"``, ...):
        how ``H`` is inverted, decided at construction."""
        return self._strategy.name

    @property
    def x0(self) -> PyTree:
        """The expansion point (the solution at ``theta0``)."""
        return self._unravel_x(self._x0)

    @property
    def theta0(self) -> PyTree:
        """The parameters at the expansion point."""
        return self._unravel_th(self._th0)

    # ----------------------------------------------------------------------------- derivatives

    @_typed_errors
    def derivatives(self, delta: PyTree, order: int | None = None) -> list[PyTree]:
        """The directional derivatives ``[x_1, …, x_order]``, ``x_k = D^k x*(θ₀)[Δ, …, Δ]``.

        Not divided by ``k!``. Each ``x_k`` solves ``H x_k = -r_k(x_1..x_{k-1}; Δ)`` with the
        factorization made at construction. Works under ``jax.vmap`` over ``delta``.

        Parameters
        ----------
        delta
            The direction ``Δ``, shaped like ``theta0`` (a scalar is broadcast).
        order
            Highest order (default: the expansion's order ``K``).

        Examples
        --------
        >>> import jax.numpy as jnp
        >>> f = lambda x, a: 0.5 * x**2 - a**3 * x          # x*(a) = a³
        >>> te = TaylorExpansion(f, jnp.array(1.0), jnp.array(1.0), order=4)
        >>> [round(float(d), 4) + 0.0 for d in te.derivatives(1.0)]  # 3a², 6a, 6, 0 at a = 1
        [3.0, 6.0, 6.0, 0.0]
        """
        order = self._check_order(order)
        if order == 0:
            return []
        return self._compiled(order)(self._state(), delta)

    @_typed_errors
    def predict(self, theta: PyTree, order: int | None = None) -> PyTree:
        """The truncated series ``x₀ + Σ_{k≤order} x_k / k!`` with ``Δ = θ − θ₀``.

        Use ``jax.vmap(te.predict)(thetas)`` for many parameter values at once.

        Parameters
        ----------
        theta
            The new parameters (shaped like ``theta0``).
        order
            Truncation order (default ``K``; ``0`` returns ``x0``).

        Examples
        --------
        >>> import jax, jax.numpy as jnp
        >>> f = lambda x, lam: 0.5 * (1.0 + lam) * x**2 - x  # x*(λ) = 1 / (1 + λ)
        >>> te = TaylorExpansion(f, jnp.array(1.0), jnp.array(0.0), order=4)
        >>> round(float(te.predict(jnp.array(0.1))), 4)      # 1 - .1 + .01 - .001 + .0001
        0.9091
        >>> [round(v, 4) for v in jax.vmap(te.predict)(jnp.array([0.0, 0.1])).tolist()]
        [1.0, 0.9091]
        """
        order = self._check_order(order)
        flat, _ = ravel_pytree(theta)
        delta = flat.astype(self._th0.dtype) - self._th0
        total = self._x0
        if order > 0:
            # Sharing the compiled derivatives (rather than compiling the sum too) halves the
            # compilations; the K additions are negligible next to the solves.
            xs = self._compiled(order)(self._state(), self._unravel_th(delta))
            for k, xk in enumerate(xs, start=1):
                total = total + ravel_pytree(xk)[0] / math.factorial(k)
        return self._unravel_x(total)

    @_typed_errors
    def mixed_derivative(self, directions: Sequence[PyTree]) -> PyTree:
        """The mixed derivative ``D^k x*(θ₀)[Δ₁, …, Δ_k]`` (``k = len(directions) ≤ K``).

        By polarization of the symmetric k-linear form:

        .. math::

            D^k x^*[\\Delta_1, \\dots, \\Delta_k] = \\frac{1}{k!}
            \\sum_{\\emptyset \\ne S \\subseteq \\{1..k\\}} (-1)^{k-|S|}\\,
            D^k x^*\\Big[\\sum_{i\\in S} \\Delta_i\\Big]^k,

        i.e. ``2^k − 1`` directional expansions, batched in one compiled call.

        Examples
        --------
        >>> import jax.numpy as jnp
        >>> f = lambda x, th: 0.5 * x**2 - th[0] * th[1] * x  # x* = θ₀θ₁, ∂²x*/∂θ₀∂θ₁ = 1
        >>> te = TaylorExpansion(f, jnp.array(0.0), jnp.zeros(2), order=2)
        >>> round(float(te.mixed_derivative([jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])])), 4)
        1.0
        """
        k = len(directions)
        self._check_order(k)
        if k == 0:
            return self.x0
        flats = jnp.stack([self._flat_delta(d) for d in directions])
        weights, signs = _polarization(k)
        dirs = jnp.asarray(weights, flats.dtype) @ flats
        dk = jax.vmap(self._flat_kth(k))(dirs)
        value = jnp.asarray(signs, dk.dtype) @ dk / math.factorial(k)
        return self._unravel_x(value)

    @_typed_errors
    def derivative_tensor(self, k: int) -> jax.Array:
        """The full k-th derivative tensor ``∂^k x*/∂θ^k`` at ``θ₀`` (flattened x and θ).

        Shape ``(n, m, …, m)`` with ``k`` axes of size ``m = size(θ)`` and ``n = size(x)``;
        ``T[:, i₁, …, i_k] = ∂^k x* / ∂θ_{i₁}⋯∂θ_{i_k}``. Each of the ``C(m+k−1, k)`` distinct
        entries is obtained by polarization (see :meth:`mixed_derivative`) from directional
        derivatives along sums of coordinate vectors; shared directions are computed once,
        in one batched call. Meant for small ``m`` and ``k``.

        Examples
        --------
        >>> import jax.numpy as jnp
        >>> f = lambda x, th: 0.5 * jnp.sum(x**2) - th[0] ** 2 * th[1] * x[0]  # x₀* = θ₀²θ₁
        >>> te = TaylorExpansion(f, jnp.zeros(1), jnp.zeros(2), order=3)
        >>> round(float(te.derivative_tensor(3)[0, 0, 0, 1]), 4)     # ∂³x*/∂θ₀²∂θ₁ = 2
        2.0
        """
        self._check_order(k)
        n, m = self._x0.size, self._th0.size
        if k == 0:
            return self._x0
        directions, combine, index = _tensor_polarization(m, k)
        dk = jax.vmap(self._flat_kth(k))(jnp.asarray(directions, self._th0.dtype))
        entries = jnp.asarray(combine, dk.dtype) @ dk  # (number of distinct entries, n)
        tensor = entries[index.reshape(-1)].reshape((m,) * k + (n,))
        return jnp.moveaxis(tensor, -1, 0)

    # ------------------------------------------------------------------------------ accuracy

    @_typed_errors
    def check_accuracy(
        self,
        solver: Callable[[PyTree], PyTree],
        deltas: Sequence[PyTree] | jax.Array,
        *,
        floor: float | None = None,
    ) -> AccuracyReport:
        """Compare the series at orders ``0..K`` with re-solved ``x*(θ₀+Δ)``.

        For each ``Δ`` the partial sums ``S_k = Σ_{j≤k} x_j / j!`` are compared with
        ``solver(θ₀ + Δ)``; in the disk of convergence the error falls with ``k`` roughly
        like ``(‖Δ‖/ρ)^{k+1}``. A crude radius ``ρ`` is estimated from the coefficients
        ``c_k = x_k / k!`` by the root and ratio tests at the last order.

        Parameters
        ----------
        solver
            ``solver(theta) -> x``: re-solves the problem at ``theta`` (same pytrees as
            ``theta0`` and ``x0``), accurately.
        deltas
            Directions ``Δᵢ``: a sequence of pytrees shaped like ``theta0``, or an array whose
            leading axis indexes the directions.
        floor
            Errors below this are attributed to the solver's accuracy (default
            ``100 eps max(1, ‖x*‖)``).

        Examples
        --------
        >>> import jax.numpy as jnp
        >>> f = lambda x, lam: 0.5 * (1.0 + lam) * x**2 - x       # x*(λ) = 1 / (1 + λ)
        >>> te = TaylorExpansion(f, jnp.array(1.0), jnp.array(0.0), order=3)
        >>> report = te.check_accuracy(lambda lam: 1.0 / (1.0 + lam), [0.1, 0.3])
        >>> report.ok, report.radius.round(2).tolist()                # true radius: 1
        (True, [1.0, 1.0])
        """
        if isinstance(deltas, jax.Array | np.ndarray) and np.ndim(deltas) > np.ndim(self._th0):
            deltas = list(deltas)
        cases = []
        for delta in deltas:
            flat_delta = self._flat_delta(delta)
            xs = [ravel_pytree(xk)[0] for xk in self.derivatives(delta)]
            truth = ravel_pytree(solver(self._unravel_th(self._th0 + flat_delta)))[0]
            cases.append((flat_delta, xs, truth))
        return _accuracy_report(self._x0, cases, floor)

    def __repr__(self) -> str:
        return (
            f"TaylorExpansion(order={self._order}, n={self._x0.size}, m={self._th0.size}, "
            f"method={self._method!r}, linear_solver={self.linear_solver!r})"
        )


def taylor_expand(
    fn: Callable[..., PyTree],
    x0: PyTree,
    theta0: PyTree,
    order: int = 4,
    **kwargs: Any,
) -> TaylorExpansion:
    """Build a :class:`TaylorExpansion` of ``x*(θ) = argmin_x fn(x, θ)`` around ``(x0, θ0)``.

    Pass ``optimality=True`` to expand the root of ``fn(x, θ) = 0`` instead. Other keyword
    arguments are those of :class:`TaylorExpansion`.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> f = lambda x, lam: 0.5 * (1.0 + lam) * x**2 - x       # x*(λ) = 1 / (1 + λ)
    >>> te = taylor_expand(f, jnp.array(1.0), jnp.array(0.0), order=2)
    >>> [round(float(d), 4) for d in te.derivatives(1.0)]     # -1, 2
    [-1.0, 2.0]
    """
    return TaylorExpansion(fn, x0, theta0, order, **kwargs)
