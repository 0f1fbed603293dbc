"""The public entry points of the torch front end: ``argmin``, ``root``, ``fixed_point``,
``implicit_solution`` and ``module_function``.

Each decorator builds a :class:`~dargmin.torch.TorchImplicitConfig` and wraps
``solve(init, *params)`` so that its output is ``_Implicit(_Solve(solve))``: the solver runs
once, and the solution carries the implicit derivative (:mod:`dargmin.torch._core`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dargmin.diagnostics import Check, CheckMode
from dargmin.torch._functions import _Implicit, _Solve
from dargmin.torch._linear import TorchLinearSolver
from dargmin.torch._problem import Leaves, Tensor, TorchImplicitConfig, _flat_problem, _Params

__all__ = ["argmin", "fixed_point", "implicit_solution", "module_function", "root"]


def module_function(module: nn.Module, reduce_to_scalar: bool = False) -> Callable[..., Tensor]:
    """``fn(x, params) = functional_call(module, params, (x,))``: a module as a function of
    its input and a dict of its parameters (``dict(module.named_parameters())``).

    With ``reduce_to_scalar`` a one-element output is reshaped to a scalar (an objective).

    Examples
    --------
    >>> net = torch.nn.Linear(2, 1)
    >>> f = module_function(net, reduce_to_scalar=True)
    >>> f(torch.zeros(2), dict(net.named_parameters())).shape
    torch.Size([])
    """

    def fn(x: Tensor, params: dict[str, Tensor], *rest: Any) -> Tensor:
        out = torch.func.functional_call(module, params, (x, *rest))
        return out.reshape(()) if reduce_to_scalar else out

    return fn


def _as_function(fn: Callable[..., Tensor] | nn.Module, *, scalar: bool) -> Callable[..., Tensor]:
    if isinstance(fn, nn.Module):
        return module_function(fn, reduce_to_scalar=scalar)
    return fn


def implicit_solution(
    optimality_fn: Callable[..., Tensor],
    x_star: Tensor,
    *params: Any,
    config: TorchImplicitConfig | None = None,
) -> Tensor:
    """Attach implicit derivatives to a solution ``x_star`` of ``optimality_fn(x, *params) = 0``.

    The value equals ``x_star``; derivatives with respect to the floating-point tensors in
    ``params`` (tensors, tuples or dicts of tensors) are those of the implicit function
    theorem, ``ẋ = −(∂ₓg)⁻¹ ∂θg θ̇``. Gradients flowing through ``x_star`` are discarded.

    Examples
    --------
    >>> a = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    >>> x = implicit_solution(lambda x, a: x**2 - a, torch.tensor(2.0, dtype=torch.float64), a)
    >>> torch.autograd.grad(x, a)[0].item()   # d sqrt(a)/da = 1/(2 sqrt(a))
    0.25
    """
    config = config if config is not None else TorchImplicitConfig()
    structure, leaves = _Params.split(params)
    problem = _flat_problem(optimality_fn, structure, config)
    return _Implicit.apply(problem, x_star.detach(), *leaves)


def _decorate(
    make_g: Callable[[], Callable[..., Tensor]], config: TorchImplicitConfig
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    g = make_g()

    def decorator(solver: Callable[..., Tensor]) -> Callable[..., Tensor]:
        @functools.wraps(solver)
        def solve(init: Any, *params: Any) -> Tensor:
            structure, leaves = _Params.split(params)

            def runner(init: Any, plain: Leaves) -> Tensor:
                return solver(init, *structure.rebuild(plain))

            x_star = _Solve.apply(runner, init, *leaves)
            return _Implicit.apply(_flat_problem(g, structure, config), x_star, *leaves)

        solve.config = config  # type: ignore[attr-defined]
        return solve

    return decorator


def argmin(
    objective: Callable[..., Tensor] | nn.Module,
    *,
    linear_solver: str | TorchLinearSolver = "auto",
    check: CheckMode | Check = "raise",
    tol: float | None = None,
    max_condition: float | None = None,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorate ``solve(init, *params) -> x`` that minimizes ``objective(x, *params)``.

    The optimality condition is ``g = ∇ₓ objective = 0`` (``torch.func.grad``), ``∂ₓg`` is
    the Hessian (Hessian-vector products are reverse-over-reverse: faster than forward mode
    in torch). ``objective`` may be an
    ``nn.Module``: it is called as ``functional_call(module, params, (x,))`` with the first
    parameter a dict of its tensors (:func:`module_function`).

    Parameters
    ----------
    objective
        ``f(x, *params) -> scalar tensor``, or an ``nn.Module`` with a one-element output.
    linear_solver
        ``"auto"`` (dense Cholesky up to 200 unknowns, CG beyond), ``"cholesky"``, ``"lu"``,
        ``"lstsq"``, ``"cg"``, ``"minres"``, ``"gmres"`` or a strategy object.
    check, tol, max_condition
        As in :func:`dargmin.argmin` (a :class:`dargmin.Check`): refuse (``"raise"``), warn
        or ignore a point that is not stationary, a singular or indefinite Hessian.

    Examples
    --------
    >>> f = lambda x, lam: 0.5 * ((x - 1.0) ** 2).sum() + 0.5 * lam * (x**2).sum()
    >>> @argmin(f)
    ... def solve(init, lam):          # x*(λ) = 1/(1 + λ)
    ...     return torch.full((2,), 1.0 / (1.0 + lam.item()), dtype=torch.float64)
    >>> lam = torch.tensor(1.0, dtype=torch.float64)
    >>> torch.func.grad(lambda l: solve(None, l).sum())(lam).item()  # 2·(−1/(1+λ)²)
    -0.5
    >>> torch.func.hessian(lambda l: solve(None, l).sum())(lam).item()  # 2·2/(1+λ)³
    0.5
    """
    fn = _as_function(objective, scalar=True)

    def make_g() -> Callable[..., Tensor]:
        grad = torch.func.grad(fn)

        def g(x: Tensor, *params: Any) -> Tensor:
            return grad(x, *params)

        return g

    config = TorchImplicitConfig.of(
        "argmin", linear_solver, Check.of(check, tol=tol, max_condition=max_condition), True, True
    )
    return _decorate(make_g, config)


def root(
    optimality_fn: Callable[..., Tensor] | nn.Module,
    *,
    linear_solver: str | TorchLinearSolver = "auto",
    check: CheckMode | Check = "raise",
    tol: float | None = None,
    max_condition: float | None = None,
    symmetric: bool = False,
    positive_definite: bool = False,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorate ``solve(init, *params) -> x`` with ``optimality_fn(x, *params) = 0``.

    ``∂ₓg`` is general (dense LU up to 200 unknowns, GMRES beyond); declare
    ``symmetric=True`` to allow MINRES, and ``positive_definite=True`` as well (a
    hand-written gradient of a convex objective) for Cholesky/CG and the curvature check.
    An ``nn.Module`` is called as ``functional_call(module, params, (x,))``.

    Examples
    --------
    >>> @root(lambda x, a: x**3 - a)
    ... def cube_root(init, a):
    ...     return a.detach() ** (1 / 3)
    >>> a = torch.tensor(8.0, dtype=torch.float64, requires_grad=True)
    >>> torch.autograd.grad(cube_root(None, a), a)[0].item()   # a^{-2/3}/3
    0.0833...
    """
    fn = _as_function(optimality_fn, scalar=False)
    checked = Check.of(check, tol=tol, max_condition=max_condition)
    config = TorchImplicitConfig.of(
        "root", linear_solver, checked, symmetric or positive_definite, positive_definite
    )
    return _decorate(lambda: fn, config)


def fixed_point(
    mapping: Callable[..., Tensor] | nn.Module,
    *,
    linear_solver: str | TorchLinearSolver = "auto",
    check: CheckMode | Check = "raise",
    tol: float | None = None,
    max_condition: float | None = None,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorate ``solve(init, *params) -> x`` with ``x = mapping(x, *params)``.

    The optimality function is ``g(x, θ) = T(x, θ) − x``; ``∂ₓg = ∂ₓT − I``.

    Examples
    --------
    >>> T = lambda x, a: 0.5 * (x + a / x)            # Heron: fixed point sqrt(a)
    >>> @fixed_point(T)
    ... def heron(init, a):
    ...     x = init
    ...     for _ in range(30):
    ...         x = T(x, a)
    ...     return x
    >>> a = torch.tensor(9.0, dtype=torch.float64, requires_grad=True)
    >>> torch.autograd.grad(heron(torch.tensor(1.0, dtype=torch.float64), a), a)[0].item()
    0.1666...
    """
    fn = _as_function(mapping, scalar=False)

    def g(x: Tensor, *params: Any) -> Tensor:
        return fn(x, *params) - x

    checked = Check.of(check, tol=tol, max_condition=max_condition)
    config = TorchImplicitConfig.of("fixed_point", linear_solver, checked, False, False)
    return _decorate(lambda: g, config)
