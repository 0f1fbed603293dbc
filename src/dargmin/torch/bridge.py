"""A bridge from torch to dargmin's JAX-side features (Taylor expansions, the toolbox).

What works, and how:

* :func:`to_jax` / :func:`to_torch` convert arrays through DLPack: zero-copy where both
  libraries see the same device (CPU, or the same GPU).
* :func:`jax_function` turns a torch function of tensors into a JAX function of arrays,
  evaluated on the host through ``jax.pure_callback``. Its derivatives are **forward mode**,
  to any order: every ``jvp`` is ``torch.func.jvp`` of the level below, itself a bridged
  function. So ``jax.jvp``, ``jax.jacfwd``, nested forward mode and
  :meth:`dargmin.TaylorExpansion.from_optimality` (whose Taylor coefficients fall back to
  nested forward mode, with a :class:`dargmin.DargminWarning`, when ``jet`` meets the
  callback) work on a torch optimality function. :func:`taylor_expansion` packages this.
* Not supported: **reverse mode** through a bridged function (``jax.grad``, ``jax.vjp``,
  ``jax.jacrev``, ``jax.hessian``): a callback is opaque to JAX's transposition. So a
  torch *objective* cannot be given to JAX code that differentiates it in reverse mode:
  bridge its gradient instead (``torch.func.grad(f)``, as :func:`taylor_expansion` does).
  The toolbox functions that take a matrix-vector product (``lanczos_extreme_eigenvalues``,
  ``hutchinson_trace``, ``solve_cg``, ``rayleigh_quotient``) work with a bridged
  Hessian-vector product (:func:`hvp_operator`).

What stays JAX-only: ``jax.jit`` of the torch code itself (the callback is compiled around,
not into, the program), ``jet`` Taylor mode (nested forward mode is used instead: ``2^k``
evaluations for order ``k``), and everything in :mod:`dargmin.hyper` (its models are
written in JAX). For derivatives of torch solvers use :mod:`dargmin.torch` directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

from dargmin.taylor import TaylorExpansion

__all__ = ["hvp_operator", "jax_function", "taylor_expansion", "to_jax", "to_torch"]


def to_jax(tensor: torch.Tensor) -> jax.Array:
    """A torch tensor as a JAX array through DLPack (zero-copy on a shared device).

    Examples
    --------
    >>> to_jax(torch.arange(3.0)).tolist()
    [0.0, 1.0, 2.0]
    """
    return jax.dlpack.from_dlpack(tensor.detach().contiguous())


def to_torch(array: jax.Array) -> torch.Tensor:
    """A JAX array as a torch tensor through DLPack (zero-copy on a shared device).

    Examples
    --------
    >>> to_torch(jnp.arange(3.0)).tolist()
    [0.0, 1.0, 2.0]
    """
    return torch.from_dlpack(array)


def _output_struct(fn: Callable[..., torch.Tensor], args: tuple[Any, ...]) -> jax.ShapeDtypeStruct:
    """The output's shape and dtype, from one evaluation on shape-only ("meta") tensors."""
    metas = [torch.empty(np.shape(a), dtype=_torch_dtype(a), device="meta") for a in args]
    out = fn(*metas)
    return jax.ShapeDtypeStruct(tuple(out.shape), np.dtype(str(out.dtype).removeprefix("torch.")))


def _torch_dtype(array: Any) -> torch.dtype:
    return torch.from_numpy(np.zeros((), dtype=np.dtype(array.dtype))).dtype


def jax_function(
    fn: Callable[..., torch.Tensor], result: jax.ShapeDtypeStruct | None = None
) -> Callable[..., jax.Array]:
    """A JAX function evaluating the torch function ``fn`` (forward-mode derivatives).

    ``fn(*tensors) -> tensor`` must be a function of its tensor arguments that torch can
    evaluate on "meta" tensors (for the output's shape). The result runs ``fn`` on the
    host; ``jax.jvp`` of it runs ``torch.func.jvp(fn)``, bridged the same way, so forward
    mode of any order works. Reverse mode raises (see the module docstring). ``result``
    gives the output's shape and dtype when the meta evaluation cannot (the tangent of
    ``torch.func.jvp`` on meta tensors came out float64 for float32 inputs).

    Examples
    --------
    >>> f = jax_function(lambda x: torch.sin(x) * x)
    >>> x = jnp.array([0.5, 1.0])
    >>> bool(jnp.allclose(f(x), jnp.sin(x) * x))
    True
    >>> bool(jnp.allclose(jax.jacfwd(jax.jacfwd(f))(x).sum(0).diagonal(),
    ...                   2 * jnp.cos(x) - x * jnp.sin(x), atol=1e-6))
    True
    """

    @jax.custom_jvp
    def bridged(*args: jax.Array) -> jax.Array:
        out = result if result is not None else _output_struct(fn, args)

        def host(*arrays: np.ndarray) -> np.ndarray:
            tensors = [torch.from_numpy(np.array(a)) for a in arrays]
            with torch.no_grad():
                return fn(*tensors).detach().cpu().numpy().astype(out.dtype)

        return jax.pure_callback(host, out, *args, vmap_method="sequential")

    @bridged.defjvp
    def bridged_jvp(primals: tuple[jax.Array, ...], tangents: tuple[jax.Array, ...]) -> Any:
        k = len(primals)

        def torch_jvp(*both: torch.Tensor) -> torch.Tensor:
            return torch.func.jvp(fn, tuple(both[:k]), tuple(both[k:]))[1]

        tangents = tuple(
            jnp.asarray(t, dtype=jnp.result_type(p)) for p, t in zip(primals, tangents, strict=True)
        )
        out = bridged(*primals)
        tangent = jax_function(torch_jvp, jax.ShapeDtypeStruct(out.shape, out.dtype))
        return out, tangent(*primals, *tangents)

    return bridged


def hvp_operator(
    objective: Callable[..., torch.Tensor], x: jax.Array, *params: jax.Array
) -> Callable[[jax.Array], jax.Array]:
    """``v ↦ ∇²ₓ f(x, θ) v`` of a torch objective, as a JAX function of ``v`` (for the
    toolbox's matrix-free functions: Lanczos, trace estimators, CG)."""
    grad = torch.func.grad(objective)

    def torch_hvp(x: torch.Tensor, v: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(lambda xx: grad(xx, *ps), (x,), (v,))[1]

    bridged = jax_function(torch_hvp)
    return lambda v: bridged(x, v, *params)


def taylor_expansion(
    objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    theta0: torch.Tensor,
    order: int = 4,
    **options: Any,
) -> TaylorExpansion:
    """:class:`dargmin.TaylorExpansion` of ``x*(θ) = argmin_x objective(x, θ)`` for a torch
    objective of two tensors, at a solution ``x0`` for ``theta0``.

    The optimality condition ``∇ₓ objective`` is ``torch.func.grad`` bridged by
    :func:`jax_function`; the Taylor coefficients use nested forward mode (a
    :class:`dargmin.DargminWarning` says so). Derivatives come back as JAX arrays; use
    :func:`to_torch` to convert them.

    Examples
    --------
    >>> import warnings
    >>> f = lambda x, a: 0.5 * ((x - 1.0) ** 2).sum() + 0.5 * a.sum() * (x**2).sum()
    >>> x0, a0 = torch.full((2,), 0.5), torch.tensor([1.0])   # x*(a) = 1/(1 + a)
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     te = taylor_expansion(f, x0, a0, order=3)
    ...     print([round(float(d[0]), 4) for d in te.derivatives(jnp.array([1.0]))])
    [-0.25, 0.25, -0.375]
    """
    gradient = jax_function(torch.func.grad(objective))
    return TaylorExpansion.from_optimality(
        gradient, to_jax(x0), to_jax(theta0), order=order, **options
    )
