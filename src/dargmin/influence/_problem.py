"""Data loaders, curvature strategies (Hessian, Gauss–Newton) and the flat view of a
``(params, batch)`` training objective that every influence method works on."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeAlias

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from dargmin.derivatives import gauss_newton_vector_product, hessian_vector_product
from dargmin.errors import DargminError
from dargmin.typing import PyTree, Scalar

Batch: TypeAlias = PyTree
#: A re-iterable of batches (a list, a ``torch`` ``DataLoader``, an object whose ``__iter__``
#: starts a fresh pass) or a function returning a fresh iterator of batches.
Loader: TypeAlias = Iterable[Batch] | Callable[[], Iterable[Batch]]
BatchLoss: TypeAlias = Callable[[PyTree, Batch], Scalar]


def iterate(loader: Loader) -> Iterator[Batch]:
    """One pass over ``loader``; refuses one-shot iterators and empty loaders.

    Every method makes several passes (a Lanczos step, a LiSSA repeat, the K-FAC factors
    and their eigen-correction are one pass each), so a generator that is exhausted after
    the first pass would silently give a zero curvature on the second.
    """
    if callable(loader) and not isinstance(loader, Iterable):
        source = iter(loader())
    else:
        if isinstance(loader, Iterator):
            raise TypeError(
                "The loader is a one-shot iterator (e.g. a generator); influence methods "
                "make several passes over the data. Pass a list of batches, an object whose "
                "__iter__ starts a fresh pass, or a function returning a fresh iterator."
            )
        source = iter(loader)
    empty = True
    for batch in source:
        empty = False
        yield batch
    if empty:
        raise DargminError("The loader yielded no batch; it must yield at least one.")


def batch_size(batch: Batch) -> int:
    """Number of examples of ``batch`` (the common leading axis of its leaves)."""
    sizes = {int(jnp.shape(leaf)[0]) for leaf in jax.tree_util.tree_leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(
            f"Every leaf of a batch must have the same leading (example) axis; got lengths "
            f"{sorted(sizes)}."
        )
    return sizes.pop()


def single(example_batch: Batch, index: int | jax.Array) -> Batch:
    """Example ``index`` of a batch, kept as a batch of one (so a batch loss applies)."""
    return jax.tree_util.tree_map(lambda leaf: leaf[index][None], example_batch)


class Curvature(Protocol):
    """What an influence method needs of the curvature matrix :math:`C = \\sum_b C_b`."""

    def loss(self, params: PyTree, batch: Batch) -> Scalar:
        """The training loss of a batch (a sum over its examples)."""
        ...

    def product(
        self, build: Callable[[PyTree], PyTree], arrays: PyTree, batch: Batch, v: PyTree
    ) -> PyTree:
        """:math:`C_b v`, differentiating ``build(arrays)`` in ``arrays``."""
        ...

    def probe_cotangents(
        self, tapped: Callable[[PyTree], PyTree], probes: PyTree, example: Batch
    ) -> PyTree:
        """Cotangents of ``probes`` whose outer products sum to the example's curvature
        (leading axis: one entry per factor column), for K-FAC."""
        ...


@dataclasses.dataclass(frozen=True)
class Hessian:
    r"""The Hessian :math:`H = \sum_b \nabla^2_\theta L(\theta, b)` of a batch loss.

    Parameters
    ----------
    loss
        ``loss(params, batch) -> scalar``: the SUM of the per-example losses of ``batch``
        (a pytree of arrays with a leading example axis). An L2 penalty
        :math:`\tfrac\lambda2\|\theta\|^2` on the total objective is the ``damping``
        :math:`\lambda` of the inverse methods; do not add it per batch.

    Notes
    -----
    K-FAC with this curvature uses the empirical Fisher (outer products of the gradients
    of the observed losses), the only factorization a black-box loss allows; use
    :class:`GaussNewton` for the Gauss–Newton/Fisher factors.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> curvature = Hessian(lambda w, b: 0.5 * jnp.sum((b["x"] @ w) ** 2))
    >>> curvature.loss(jnp.ones(2), {"x": jnp.eye(2)})
    Array(1., dtype=float32)
    """

    loss: BatchLoss

    def product(
        self, build: Callable[[PyTree], PyTree], arrays: PyTree, batch: Batch, v: PyTree
    ) -> PyTree:
        return hessian_vector_product(lambda a: self.loss(build(a), batch), arrays, v)

    def probe_cotangents(
        self, tapped: Callable[[PyTree], PyTree], probes: PyTree, example: Batch
    ) -> PyTree:
        gradient = jax.grad(lambda p: self.loss(tapped(p), example))(probes)
        return jax.tree_util.tree_map(lambda leaf: leaf[None], gradient)


@dataclasses.dataclass(frozen=True)
class GaussNewton:
    r"""The generalized Gauss–Newton matrix :math:`G = \sum_i J_i^\top H_{z,i} J_i`.

    For a loss :math:`\ell(z_i, y_i)` of the model output :math:`z_i = f(\theta, x_i)`,
    :math:`J_i = \partial z_i/\partial\theta` and :math:`H_{z,i} = \nabla^2_z \ell`; it drops
    the second-derivative term of the model from the Hessian and is positive semidefinite
    for convex :math:`\ell`. For softmax cross-entropy it is also the Fisher information.

    Parameters
    ----------
    model
        ``model(params, batch) -> outputs`` (any pytree, leading example axis).
    output_loss
        ``output_loss(outputs, batch) -> scalar``: the SUM over the batch of the losses of
        the outputs (e.g. the cross-entropy with the batch's labels).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> curvature = GaussNewton(lambda w, b: b @ w, lambda z, b: 0.5 * jnp.sum(z**2))
    >>> curvature.loss(jnp.ones(2), jnp.eye(2))
    Array(1., dtype=float32)
    """

    model: Callable[[PyTree, Batch], PyTree]
    output_loss: Callable[[PyTree, Batch], Scalar]

    def loss(self, params: PyTree, batch: Batch) -> Scalar:
        return self.output_loss(self.model(params, batch), batch)

    def product(
        self, build: Callable[[PyTree], PyTree], arrays: PyTree, batch: Batch, v: PyTree
    ) -> PyTree:
        return gauss_newton_vector_product(
            lambda a: self.model(build(a), batch),
            lambda z: self.output_loss(z, batch),
            arrays,
            v,
        )

    def probe_cotangents(
        self, tapped: Callable[[PyTree], PyTree], probes: PyTree, example: Batch
    ) -> PyTree:
        # G_i = J_iᵀ H_z J_i = Σ_c (J_iᵀ l_c)(J_iᵀ l_c)ᵀ for any factor H_z = Σ_c l_c l_cᵀ:
        # backpropagating the columns l_c gives the exact Gauss–Newton "pseudo-gradients"
        # (no label sampling, so no Monte Carlo noise in the factors).
        outputs, pullback = jax.vjp(lambda p: self.model(tapped(p), example), probes)
        flat_outputs, unravel = ravel_pytree(outputs)
        output_hessian = jax.hessian(lambda z: self.output_loss(unravel(z), example))(flat_outputs)
        values, vectors = jnp.linalg.eigh(0.5 * (output_hessian + output_hessian.T))
        columns = vectors * jnp.sqrt(jnp.maximum(values, 0.0))
        return jax.vmap(lambda column: pullback(unravel(column))[0])(columns.T)


def flat_view(params: PyTree) -> tuple[jax.Array, Callable[[jax.Array], PyTree]]:
    """The flat vector of the float arrays of ``params`` and the map putting one back."""
    arrays, static = eqx.partition(params, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(arrays)
    return flat, lambda vector: eqx.combine(unravel(vector), static)


# The kernels are module-level `eqx.filter_jit` functions, not closures made per fit: the
# curvature (a frozen dataclass of functions) and the non-array part of `params` are static
# and hashed, so every fit on the same model and loss reuses the compiled code.
@eqx.filter_jit
def _products(curvature: Curvature, params: PyTree, batch: Batch, vectors: jax.Array) -> jax.Array:
    flat, build = flat_view(params)
    return jax.vmap(lambda v: curvature.product(build, flat, batch, v))(vectors)


@eqx.filter_jit
def _example_gradients(
    loss: Callable[[PyTree, Batch], Scalar], params: PyTree, batch: Batch
) -> jax.Array:
    flat, build = flat_view(params)

    def one(example: Batch) -> jax.Array:
        as_batch = jax.tree_util.tree_map(lambda leaf: leaf[None], example)
        return jax.grad(lambda f: loss(build(f), as_batch))(flat)

    return jax.vmap(one)(batch)


class FlatProblem:
    """A training objective seen on the flat vector of the parameters' float arrays.

    ``params`` may hold non-array leaves (an equinox model's activation functions): only
    its inexact arrays are differentiated (``eqx.partition``), and ``build`` puts a flat
    vector back into a full ``params``.
    """

    def __init__(self, curvature: Curvature, params: PyTree) -> None:
        self.curvature = curvature
        self.params = params
        self.flat, self.build = flat_view(params)
        if self.flat.size == 0:
            raise ValueError("params holds no floating-point array to differentiate.")
        self.size = int(self.flat.size)
        self.dtype = self.flat.dtype
        self.unravel = ravel_pytree(eqx.filter(params, eqx.is_inexact_array))[1]

    def products(self, batch: Batch, vectors: jax.Array) -> jax.Array:
        """:math:`C_b V^\\top` rows for the rows of ``vectors`` (shape ``(k, p)``)."""
        return _products(self.curvature, self.params, batch, vectors)

    def example_gradients(
        self, batch: Batch, loss: Callable[[PyTree, Batch], Scalar] | None = None
    ) -> jax.Array:
        """Per-example gradients of ``loss`` (default the curvature's), ``(batch size, p)``."""
        return _example_gradients(loss or self.curvature.loss, self.params, batch)

    def full_products(self, loader: Loader, vectors: jax.Array) -> jax.Array:
        """:math:`C V^\\top` summed over one pass of ``loader`` (memory of ``vectors`` only)."""
        total = jnp.zeros_like(vectors)
        for batch in iterate(loader):
            total = total + self.products(batch, vectors)
        return total

    def count(self, loader: Loader) -> int:
        """Number of examples in one pass of ``loader``."""
        return sum(batch_size(batch) for batch in iterate(loader))

    def as_flat(self, tree: PyTree, *, batched: bool) -> jax.Array:
        """A params-shaped pytree (leading query axis if ``batched``) as flat rows."""
        arrays = eqx.filter(tree, eqx.is_inexact_array)
        ravel = lambda t: ravel_pytree(t)[0]  # noqa: E731
        flat = jax.vmap(ravel)(arrays) if batched else ravel(arrays)
        expected = (flat.shape[0], self.size) if batched else (self.size,)
        if flat.shape != expected:
            raise ValueError(
                f"The vector(s) do not match params: {flat.shape} flat entries, expected "
                f"{expected}."
            )
        return flat

    def as_tree(self, flat: jax.Array, *, batched: bool) -> PyTree:
        """Flat rows back to params-shaped pytrees (float leaves only)."""
        return jax.vmap(self.unravel)(flat) if batched else self.unravel(flat)


def tree_dtype(tree: Any) -> Any:
    """The dtype of the first float leaf of ``tree``."""
    return ravel_pytree(eqx.filter(tree, eqx.is_inexact_array))[0].dtype
