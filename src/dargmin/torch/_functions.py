"""The three ``torch.autograd.Function`` s of the torch front end and the derivative's solve.

``_Solve`` runs the user's solver once on plain tensors, ``_Check`` measures and judges the
solution, ``_Implicit`` is the identity with the implicit derivative; :func:`_solve_system`
solves ``(∂ₓg) y = b`` or ``(∂ₓg)ᵀ y = b`` for both modes, densely or by a Krylov method
that is itself an implicit solution. The design is told in :mod:`dargmin.torch._core`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch._C._functorch import TransformType

from dargmin.errors import DargminError
from dargmin.torch._checks import TorchMeasurements, measure_dense, measure_matrix_free
from dargmin.torch._linear import CG, KrylovResult
from dargmin.torch._problem import Leaves, Tensor, _LinearProblem, _plain, _Problem

__all__: list[str] = []


def _refuse_forward_over_forward() -> None:
    """Refuse forward mode nested in forward mode rather than return a wrong number.

    torch runs a Function's ``jvp`` with forward gradients switched off, so an outer forward
    level sees the inner tangent as a constant: ``jacfwd(jacfwd(·))`` through a solution
    would give 0 for the second derivative. Reverse-over-forward, forward-over-reverse
    (``torch.func.hessian``) and reverse-over-reverse are exact and are what to use.
    """
    stack = torch._C._functorch.get_interpreter_stack() or []
    forward_levels = sum(1 for level in stack if level.key() == TransformType.Jvp)
    if forward_levels > 1:
        raise NotImplementedError(
            "dargmin.torch: forward mode over forward mode (e.g. jacfwd(jacfwd(f)) or nested "
            "torch.func.jvp) through an implicit solution is not supported: torch does not "
            "differentiate a custom Function's jvp, and the result would be wrong. Use "
            "torch.func.hessian (forward over reverse), jacrev(jacfwd(f)) or "
            "jacrev(jacrev(f)): they are exact."
        )


def _member(tensor: Any, dim: int | None, i: int) -> Any:
    return tensor if dim is None or tensor is None else tensor.select(dim, i)


def _members(args: tuple[Any, ...], dims: tuple[int | None, ...], i: int) -> tuple[Any, ...]:
    """Member ``i`` of each of ``args`` batched along ``dims`` (unbatched ones as they are)."""
    return tuple(_member(a, d, i) for a, d in zip(args, dims, strict=True))


def _in_batch_member(err: DargminError, i: int, size: int) -> DargminError:
    """``err`` again (same type and reason), its sentence naming batch member ``i``, in the
    verdict's words, so that a refusal under ``vmap`` says which member failed."""
    prefix, colon, rest = str(err).partition(":")
    where = f" (batch member ({i},) of a batch of shape ({size},))"
    named = type(err)(f"{prefix}{where}{colon}{rest}" if colon else f"{err}{where}")
    named.reason = err.reason
    return named


class _Opaque(torch.autograd.Function):
    """A Function whose output carries no derivative, in either mode (``_Solve``, ``_Check``):
    what it computes is a value the implicit derivative does not pass through."""

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.mark_non_differentiable(output)
        ctx.n_inputs = len(inputs)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple[None, ...]:
        return (None,) * ctx.n_inputs

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> None:
        return None


class _Solve(_Opaque):
    """Run ``runner(init, leaves)`` on plain detached tensors; the output has no derivative."""

    @staticmethod
    def forward(runner: Callable[[Any, Leaves], Tensor], init: Any, *leaves: Tensor) -> Tensor:
        with torch.enable_grad():  # solvers such as torch.optim loops need autograd
            out = runner(init, tuple(leaf.detach() for leaf in leaves))
        if not isinstance(out, Tensor):
            raise TypeError(
                f"dargmin.torch: the solver must return a tensor, got {type(out).__name__}."
            )
        return out.detach().clone()

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[int | None, ...], runner: Any, init: Any, *leaves: Tensor
    ) -> tuple[Tensor, int]:
        # The solver may be anything (a torch.optim loop, data-dependent stopping): run it
        # once per batch member rather than under vmap.
        args = (init, *leaves)
        outs = []
        for i in range(info.batch_size):
            try:
                outs.append(_Solve.apply(runner, *_members(args, in_dims[1:], i)))
            except DargminError as err:  # a failed Krylov solve of one member: name it
                raise _in_batch_member(err, i, info.batch_size) from err
        return torch.stack(outs), 0


class _Check(_Opaque):
    """Measure and judge the solution (plain tensors); returns a zero with no derivative."""

    @staticmethod
    def forward(problem: _Problem, x: Tensor, matrix: Tensor | None, *leaves: Tensor) -> Tensor:
        measured = _measure(problem, x.detach(), matrix, tuple(leaf.detach() for leaf in leaves))
        problem.config.diagnosis.judge([measured], x.dtype)
        return x.new_zeros(())

    @staticmethod
    def vmap(
        info: Any,
        in_dims: tuple[int | None, ...],
        problem: _Problem,
        x: Tensor,
        matrix: Tensor | None,
        *leaves: Tensor,
    ) -> tuple[Tensor, None]:
        args = (x, matrix, *leaves)
        if all(d is None for d in in_dims) or not all(_plain(a) for a in args):
            # Unbatched at this level (e.g. jacrev's batch of cotangents), or batched at an
            # outer level too: judge each member one level down.
            for i in range(info.batch_size if any(d is not None for d in in_dims) else 1):
                _Check.apply(problem, *_members(args, in_dims[1:], i))
            return x.new_zeros(()), None
        measured = []
        for i in range(info.batch_size):
            x_i, matrix_i, *leaves_i = _members(args, in_dims[1:], i)
            plain_leaves = tuple(leaf.detach() for leaf in leaves_i)
            measured.append(_measure(problem, x_i.detach(), matrix_i, plain_leaves))
        # One verdict for the batch: every member on its own numbers, the failing named.
        problem.config.diagnosis.judge(measured, x.dtype, (info.batch_size,))
        return x.new_zeros(()), None


def _measure(
    problem: _Problem,
    x: Tensor,
    matrix: Tensor | None,
    leaves: Leaves,
    witness: KrylovResult | None = None,
) -> TorchMeasurements:
    cfg = problem.config
    if matrix is not None:
        with torch.no_grad():
            residual = problem.g(x, leaves)
        return measure_dense(residual, x, matrix.detach(), positive_definite=cfg.positive_definite)
    strategy = cfg.linear_solver.resolve(
        x.numel(), symmetric=cfg.symmetric, positive_definite=cfg.positive_definite
    )
    if cfg.symmetric:
        # The solve that follows the check reuses this linearization (and its residual).
        residual, op = problem.linearize(x, leaves, keep=True)
    else:
        with torch.no_grad():
            residual = problem.g(x, leaves)
        op = problem.operator(x, leaves, transpose=False)

    def flat_op(v: Tensor) -> Tensor:
        return op(v.reshape(x.shape)).reshape(-1)

    return measure_matrix_free(
        residual.detach(),
        x,
        flat_op,
        strategy,
        positive_definite=cfg.positive_definite,
        witness=witness if isinstance(strategy, CG) else None,
    )


class _Implicit(torch.autograd.Function):
    """The identity on a solution, with the implicit derivative (see the module docstring)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(problem: _Problem, x_star: Tensor, *leaves: Tensor) -> Tensor:
        return x_star.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        problem, x_star, *leaves = inputs
        ctx.problem = problem
        # The output, not x_star: in a differentiable backward (create_graph, hessian) the
        # saved output carries the implicit derivative again (re-entry).
        ctx.save_for_backward(output, *leaves)
        ctx.save_for_forward(x_star, *leaves)

    @staticmethod
    def backward(ctx: Any, x_bar: Tensor) -> tuple[Tensor | None, ...]:
        problem: _Problem = ctx.problem
        x, *leaves = ctx.saved_tensors
        leaves = tuple(leaves)
        u = _solve_system(problem, x, leaves, x_bar, transpose=True)

        # Only the leaves whose gradient is asked for: a data matrix passed as a parameter
        # but not differentiated would otherwise cost an X-sized outer product (it made the
        # p = 10 000 hypergradient 3x slower).
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[2:]) if need]
        grads: list[Tensor | None] = [None] * len(leaves)
        if x.numel() == 0:
            # (∂θg)ᵀ u with an empty u is zero; and torch's forward mode over torch.func.grad
            # fails on empty inputs (torch.func.hessian would raise an IndexError).
            for i in wanted:
                grads[i] = torch.zeros_like(leaves[i])
        elif wanted:

            def g_of_wanted(*ws: Tensor) -> Tensor:
                ls = list(leaves)
                for i, w in zip(wanted, ws, strict=True):
                    ls[i] = w
                return problem.g(x, tuple(ls))

            pullback = torch.func.vjp(g_of_wanted, *(leaves[i] for i in wanted))[1]
            for i, grad in zip(wanted, pullback(-u), strict=True):
                grads[i] = grad
        return (None, None, *grads)

    @staticmethod
    def jvp(ctx: Any, _problem_dot: Any, _x_star_dot: Any, *leaf_dots: Tensor | None) -> Tensor:
        problem: _Problem = ctx.problem
        x_star, *leaves = ctx.saved_tensors
        leaves = tuple(leaves)
        _refuse_forward_over_forward()
        return _Implicit._tangent(problem, x_star, leaves, leaf_dots)

    @staticmethod
    def _tangent(
        problem: _Problem, x_star: Tensor, leaves: Leaves, leaf_dots: tuple[Tensor | None, ...]
    ) -> Tensor:
        # Re-entry: this x carries its own implicit tangent under an outer transform.
        x = _Implicit.apply(problem, x_star, *leaves)
        # Only the leaves that carry a tangent are differentiated (the others are constants
        # here); tangents are cloned because torch may hand expanded views, which
        # make_dual refuses.
        moving = [i for i, dot in enumerate(leaf_dots) if dot is not None]
        if not moving or x.numel() == 0:
            # An empty x has an empty tangent (and torch's forward mode through
            # torch.func.grad fails on empty inputs: "select(): index 0 out of range").
            return torch.zeros_like(x)

        def g_of_moving(*ms: Tensor) -> Tensor:
            ls = list(leaves)
            for i, m in zip(moving, ms, strict=True):
                ls[i] = m
            return problem.g(x, tuple(ls))

        primals = tuple(leaves[i].clone() for i in moving)
        dots = tuple(leaf_dots[i].clone() for i in moving)  # type: ignore[union-attr]
        g_dot = torch.func.jvp(g_of_moving, primals, dots)[1]
        return _solve_system(problem, x, leaves, -g_dot, transpose=False)


def _solve_system(
    problem: _Problem, x: Tensor, leaves: Leaves, rhs: Tensor, *, transpose: bool
) -> Tensor:
    """``(∂ₓg) y = rhs`` or ``(∂ₓg)ᵀ y = rhs``, differentiable in ``x``, ``leaves``, ``rhs``,
    after the check (which runs before any solve can fail on a singular matrix)."""
    if x.numel() == 0:
        # An empty system: its solution is the (empty) right-hand side, and there is nothing
        # to check (torch.linalg refuses the spectrum of a 0 × 0 matrix).
        return rhs.reshape(x.shape)
    cfg = problem.config
    strategy = cfg.linear_solver.resolve(
        x.numel(), symmetric=cfg.symmetric, positive_definite=cfg.positive_definite
    )
    if strategy.dense:
        matrix = problem.matrix(x, leaves)
        if cfg.check.mode != "ignore":
            _Check.apply(problem, x, matrix, *leaves)
        if transpose and not cfg.symmetric:
            matrix = matrix.mT
        return strategy.solve_dense(matrix, rhs.reshape(-1)).reshape(x.shape)
    linear = _LinearProblem.of(problem, strategy, transpose=transpose)
    linear_leaves = (x, *leaves, rhs)
    if _nothing_differentiates():
        # A first-order backward: the solve's own derivative will never be asked for, so
        # the Krylov run is called directly, and its CG run doubles as the check's
        # curvature probe (a generic right-hand side): the check judges before the
        # derivative is returned, at the cost of the Newton step alone.
        plain = tuple(t.detach() for t in linear_leaves)  # detached: one cache key
        result = linear.krylov(plain)
        if cfg.check.mode != "ignore":
            measured = _measure(problem, plain[0], None, plain[1:-1], witness=result)
            cfg.diagnosis.judge([measured], x.dtype)
        problem._linearized.clear()
        linear.report(result, rhs.dtype)
        return result.x.reshape(x.shape)
    if cfg.check.mode != "ignore":
        _Check.apply(problem, x, None, *leaves)
    y_star = _Solve.apply(_run_linear(linear), None, *linear_leaves)
    problem._linearized.clear()  # the check's linearization has served the solve
    return _Implicit.apply(linear, y_star, *linear_leaves)


def _nothing_differentiates() -> bool:
    """No autograd recording (a backward without ``create_graph``) and no torch.func
    transform active: what is computed now is a final value."""
    return not torch.is_grad_enabled() and not torch._C._functorch.get_interpreter_stack()


def _run_linear(linear: _LinearProblem) -> Callable[[Any, Leaves], Tensor]:
    return linear.run
