"""The problem objects of the torch front end: the configuration, ``g`` on flat leaves, the
linear problems of the Krylov path, and positional parameters as pytrees.

A :class:`_Problem` holds the optimality function ``g(x, leaves)`` of an implicitly
differentiated solution on its differentiable tensors ``leaves`` (the floating-point tensors
among the user's parameters, :class:`_Params`), with the products and the matrix of ``∂ₓg``
that the derivative needs. A matrix-free solve of ``(∂ₓg)ᵀ u = x̄`` is itself a root problem,
:class:`_LinearProblem`, differentiated like any other (:mod:`dargmin.torch._functions`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree  # the tree utilities torch.func itself uses

from dargmin.diagnostics import Check
from dargmin.torch._checks import Diagnosis, report_krylov_failure
from dargmin.torch._linear import Auto, KrylovResult, TorchLinearSolver, as_torch_linear_solver

Tensor = torch.Tensor
Leaves = tuple[Tensor, ...]
FlatFn = Callable[[Tensor, Leaves], Tensor]

__all__ = ["FlatFn", "Leaves", "Tensor", "TorchImplicitConfig"]


@dataclass(frozen=True)
class TorchImplicitConfig:
    """Static configuration of an implicitly differentiated torch solution map.

    Attributes
    ----------
    linear_solver
        A strategy (``dargmin.torch.Cholesky()``, ``CG(rtol=1e-10)``, ``Auto(...)``…) or its
        name: ``"auto"`` (dense Cholesky/LU up to 200 unknowns, CG/GMRES beyond),
        ``"cholesky"``, ``"lu"``, ``"lstsq"``, ``"cg"``, ``"minres"``, ``"gmres"``.
    check
        A :class:`dargmin.Check`: the same modes, tolerances and limits as the JAX side.
    kind
        ``"argmin"``, ``"root"`` or ``"fixed_point"`` (names the problem in messages).
    symmetric, positive_definite
        What ``∂ₓg`` is declared to be (both true for ``argmin``: a Hessian at a minimum).

    Examples
    --------
    >>> TorchImplicitConfig(kind="argmin", symmetric=True, positive_definite=True).check.mode
    'raise'
    """

    linear_solver: TorchLinearSolver = field(default_factory=Auto)
    check: Check = field(default_factory=Check)
    kind: str = "root"
    symmetric: bool = False
    positive_definite: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "linear_solver", as_torch_linear_solver(self.linear_solver))
        if not isinstance(self.check, Check):
            object.__setattr__(self, "check", Check.of(self.check))
        self.linear_solver.check_applies(
            symmetric=self.symmetric,
            positive_definite=self.positive_definite,
            problem=f"{self.kind} problem",
        )

    @classmethod
    def of(
        cls,
        kind: str,
        linear_solver: str | TorchLinearSolver,
        check: Check,
        symmetric: bool,
        positive_definite: bool,
    ) -> TorchImplicitConfig:
        """The configuration a decorator builds (a strategy name resolved to its object).

        Examples
        --------
        >>> TorchImplicitConfig.of("root", "gmres", Check("warn"), False, False).linear_solver
        GMRES(rtol=None, atol=None, max_steps=None, restart=30)
        """
        strategy = as_torch_linear_solver(linear_solver)
        return cls(strategy, check, kind, symmetric, positive_definite)

    @property
    def diagnosis(self) -> Diagnosis:
        return Diagnosis(self.check, self.kind, self.positive_definite)

    @property
    def system(self) -> str:
        """The name of ``∂ₓg`` in messages (the JAX side's wording)."""
        return "Hessian" if self.kind == "argmin" else "Jacobian ∂ₓg"


def _point_key(x: Tensor, leaves: Leaves) -> tuple[Any, ...] | None:
    """Identity of a point made of plain tensors that need no gradient (storage and
    version of each), or ``None``: only such points are cached."""
    tensors = (x, *leaves)
    if any(t.requires_grad or not _plain(t) for t in tensors):
        return None
    return tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype) for t in tensors)


def _plain(tensor: Any) -> bool:
    """Whether ``tensor`` is free of torch.func wrappers (so ``float()`` is defined)."""
    return not (
        isinstance(tensor, Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(tensor)
    )


@dataclass(frozen=True, eq=False)
class _Problem:
    """``g(x, leaves)``: the optimality function on the differentiable tensors ``leaves``.

    ``operator(x, leaves, transpose)`` is ``v ↦ (∂ₓg) v`` or ``v ↦ (∂ₓg)ᵀ v``.
    """

    g: FlatFn
    config: TorchImplicitConfig
    # (residual, pullback) at one plain point, made by the check and taken by the solve
    # that follows it: one linearization of g instead of two.
    _linearized: dict[tuple[Any, ...], tuple[Tensor, Callable[..., Any]]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def linearize(
        self, x: Tensor, leaves: Leaves, *, keep: bool = False
    ) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """``g(x)`` and ``u ↦ (∂ₓg)ᵀ u`` from one reverse-mode linearization.

        On plain tensors (inside a Function's ``forward``) ``keep=True`` stores the result
        for the next call at the same point, which takes it out again.
        """
        key = _point_key(x, leaves)
        if key is not None and key in self._linearized:
            residual, pullback = self._linearized[key] if keep else self._linearized.pop(key)
        else:
            linearized = torch.func.vjp(lambda v: self.g(v, leaves), x)
            residual, pullback = linearized[0], linearized[1]
            if keep and key is not None:
                self._linearized.clear()
                self._linearized[key] = (residual, pullback)

        def vjp(u: Tensor) -> Tensor:
            return pullback(u)[0]

        return residual, vjp

    def operator(self, x: Tensor, leaves: Leaves, *, transpose: bool) -> Callable[[Tensor], Tensor]:
        if transpose or self.config.symmetric:
            # Reverse mode also for the symmetric forward product (a Hessian is its own
            # transpose): torch's forward-mode matmul was ~10x slower than a VJP (51 ms
            # against 5 ms for a logistic-regression HVP at 400 x 1000). One
            # linearization per operator serves every product of a Krylov run.
            return self.linearize(x, leaves, keep=True)[1]

        def at_x(v: Tensor) -> Tensor:
            return self.g(v, leaves)

        def jvp(v: Tensor) -> Tensor:
            return torch.func.jvp(at_x, (x,), (v,))[1]

        return jvp

    def matrix(self, x: Tensor, leaves: Leaves) -> Tensor:
        """``∂ₓg`` as an ``n × n`` matrix (``n`` batched VJPs through ``jacrev``;
        differentiable)."""
        shape = x.shape

        def flat_g(v: Tensor) -> Tensor:
            return self.g(v.reshape(shape), leaves).reshape(-1)

        return torch.func.jacrev(flat_g)(x.reshape(-1))


@dataclass(frozen=True, eq=False)
class _LinearProblem(_Problem):
    """The linear root ``op(u) − b = 0`` of a Krylov solve, ``op = ∂ₓg`` or ``(∂ₓg)ᵀ`` of
    ``base`` at ``x``; its leaves are ``(x, *base leaves, b)``. Being a root problem, its
    solution is differentiated by :class:`_Implicit` like any other (never unrolled)."""

    base: _Problem | None = None
    transpose: bool = False

    @staticmethod
    def of(base: _Problem, strategy: TorchLinearSolver, *, transpose: bool) -> _LinearProblem:
        def g(u: Tensor, leaves: Leaves) -> Tensor:
            x, inner, b = leaves[0], leaves[1:-1], leaves[-1]
            return base.operator(x, inner, transpose=transpose)(u) - b

        config = TorchImplicitConfig(
            linear_solver=strategy,
            check=Check("ignore"),  # the base problem's check has run; failures still raise
            kind=base.config.kind,
            symmetric=base.config.symmetric,
            positive_definite=base.config.positive_definite,
        )
        return _LinearProblem(g=g, config=config, base=base, transpose=transpose)

    def krylov(self, leaves: Leaves) -> KrylovResult:
        """The Krylov solve on plain tensors, unchecked (``x`` of the result is flat)."""
        x, inner, b = leaves[0], leaves[1:-1], leaves[-1]
        assert self.base is not None
        op = self.base.operator(x, inner, transpose=self.transpose)

        def flat_op(v: Tensor) -> Tensor:
            return op(v.reshape(x.shape)).reshape(-1)

        return self.config.linear_solver.krylov(flat_op, b.reshape(-1))

    def report(self, result: KrylovResult, dtype: torch.dtype) -> None:
        """Raise (or warn) if the Krylov solve failed: in every check mode."""
        assert self.base is not None
        strategy = self.config.linear_solver
        report_krylov_failure(
            result,
            strategy,
            strategy.tolerances(dtype)[0],
            kind=self.config.kind,
            mode="warn" if self.base.config.check.mode == "warn" else "raise",
            system=self.base.config.system,
        )

    def run(self, init: Tensor | None, leaves: Leaves) -> Tensor:
        """The checked Krylov solve on plain tensors (the ``_Solve`` runner)."""
        result = self.krylov(leaves)
        self.report(result, leaves[-1].dtype)
        return result.x.reshape(leaves[0].shape)


@dataclass(frozen=True)
class _Params:
    """Positional parameters split into differentiable leaves (floating tensors) and the
    rest (constants: integers, Python numbers, non-float tensors)."""

    spec: Any
    constants: tuple[Any, ...]
    is_leaf: tuple[bool, ...]

    @staticmethod
    def split(params: tuple[Any, ...]) -> tuple[_Params, Leaves]:
        flat, spec = pytree.tree_flatten(params)
        mask = tuple(isinstance(v, Tensor) and v.is_floating_point() for v in flat)
        leaves = tuple(v for v, m in zip(flat, mask, strict=True) if m)
        constants = tuple(v for v, m in zip(flat, mask, strict=True) if not m)
        return _Params(spec, constants, mask), leaves

    def rebuild(self, leaves: Leaves) -> tuple[Any, ...]:
        it_leaves, it_constants = iter(leaves), iter(self.constants)
        flat = [next(it_leaves) if m else next(it_constants) for m in self.is_leaf]
        return tuple(pytree.tree_unflatten(flat, self.spec))


def _flat_problem(
    g: Callable[..., Tensor], params: _Params, config: TorchImplicitConfig
) -> _Problem:
    def flat_g(x: Tensor, leaves: Leaves) -> Tensor:
        return g(x, *params.rebuild(leaves))

    return _Problem(flat_g, config)
