"""K-FAC and EK-FAC for the dense (``equinox.nn.Linear``) layers of an equinox model.

The layer inputs :math:`a` and output gradients :math:`g` are read without hooks: every
``Linear`` is wrapped (inside the traced loss only) in a tap computing
``linear(record(x, p_in)) + p_out`` with zero probes. The derivative in ``p_out`` is the
output gradient :math:`g`; ``record`` is the identity whose custom VJP returns the layer
input as the cotangent of ``p_in``, so the "gradient" in ``p_in`` is :math:`a` itself.
Differentiating per example (a batch of one, under ``vmap``) gives per-example
:math:`a_i, g_i`, whatever batching the user's loss does internally.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from dargmin.influence._inverse import InverseCurvature, _check_damping
from dargmin.influence._problem import Batch, Curvature, FlatProblem, Loader, flat_view, iterate
from dargmin.typing import PyTree


@jax.custom_vjp
def _record_input(x: jax.Array, probe: jax.Array) -> jax.Array:
    del probe
    return x


def _record_forward(x: jax.Array, probe: jax.Array) -> tuple[jax.Array, jax.Array]:
    del probe
    return x, x


def _record_backward(x: jax.Array, cotangent: jax.Array) -> tuple[jax.Array, jax.Array]:
    return cotangent, x


_record_input.defvjp(_record_forward, _record_backward)


class _TappedLinear(eqx.Module):
    linear: eqx.nn.Linear
    probe_in: jax.Array
    probe_out: jax.Array

    def __call__(self, x: jax.Array, *, key: Any = None) -> jax.Array:
        return self.linear(_record_input(x, self.probe_in)) + self.probe_out


def _is_linear(node: Any) -> bool:
    return isinstance(node, eqx.nn.Linear)


def _linears(tree: PyTree) -> list[eqx.nn.Linear]:
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=_is_linear)
    return [leaf for leaf in leaves if _is_linear(leaf)]


def _layer_matrix(linear: eqx.nn.Linear) -> jax.Array:
    # [W | b]: the gradient of the layer is g āᵀ with ā = (a, 1).
    if linear.bias is None:
        return linear.weight
    return jnp.concatenate([linear.weight, linear.bias[..., None]], axis=-1)


def _augment(inputs: jax.Array, use_bias: bool) -> jax.Array:
    if not use_bias:
        return inputs
    return jnp.concatenate([inputs, jnp.ones((*inputs.shape[:-1], 1), inputs.dtype)], axis=-1)


Bases = list[tuple[jax.Array, jax.Array]]


@eqx.filter_jit
def _kronecker_solve(
    params: PyTree, bases: Bases, scalings: list[jax.Array], damping: jax.Array, rhs: jax.Array
) -> jax.Array:
    _, build = flat_view(params)

    def solve_one(flat: jax.Array) -> jax.Array:
        tree = build(flat)  # the vector laid out as the model, to find each layer's block
        replaced = []
        for layer, (q_a, q_g), scaling in zip(_linears(tree), bases, scalings, strict=True):
            rotated = q_g.T @ _layer_matrix(layer) @ q_a
            solved = q_g @ (rotated / (scaling + damping)) @ q_a.T
            layer = eqx.tree_at(lambda lin: lin.weight, layer, solved[:, : layer.in_features])
            if layer.bias is not None:
                layer = eqx.tree_at(lambda lin: lin.bias, layer, solved[:, -1])
            replaced.append(layer)
        new_tree = eqx.tree_at(_linears, tree, replace=replaced)
        return ravel_pytree(eqx.filter(new_tree, eqx.is_inexact_array))[0]

    return jax.vmap(solve_one)(rhs)


def _example_statistics(
    curvature: Curvature, params: PyTree, batch: Batch
) -> list[tuple[jax.Array, jax.Array]]:
    """Per layer: augmented inputs ā ``(B, in [+1])`` and output gradients ``(B, C, out)``."""
    model = params
    layers = _linears(model)
    dtype = flat_view(params)[0].dtype
    probes = [
        (jnp.zeros(layer.in_features, dtype), jnp.zeros(layer.out_features, dtype))
        for layer in layers
    ]

    def tapped(probe_values: list[tuple[jax.Array, jax.Array]]) -> PyTree:
        taps = [
            _TappedLinear(layer, p_in, p_out)
            for layer, (p_in, p_out) in zip(layers, probe_values, strict=True)
        ]
        return eqx.tree_at(_linears, model, replace=taps)

    def one(example: Batch) -> list[tuple[jax.Array, jax.Array]]:
        as_batch = jax.tree_util.tree_map(lambda leaf: leaf[None], example)
        cotangents = curvature.probe_cotangents(tapped, probes, as_batch)
        # The input "cotangent" is the input itself for every column.
        return [(c_in[0], c_out) for c_in, c_out in cotangents]

    stats = jax.vmap(one)(batch)
    return [
        (_augment(a, layer.bias is not None), g)
        for (a, g), layer in zip(stats, layers, strict=True)
    ]


@eqx.filter_jit
def _factors(curvature: Curvature, params: PyTree, batch: Batch) -> Bases:
    return [
        (a.T @ a, jnp.einsum("bco,bcp->op", g, g))
        for a, g in _example_statistics(curvature, params, batch)
    ]


@eqx.filter_jit
def _corrections(
    curvature: Curvature, params: PyTree, batch: Batch, bases: Bases
) -> list[jax.Array]:
    return [
        jnp.einsum("bo,bk->ok", jnp.sum((g @ q_g) ** 2, axis=1), (a @ q_a) ** 2)
        for (a, g), (q_a, q_g) in zip(
            _example_statistics(curvature, params, batch), bases, strict=True
        )
    ]


class KroneckerInverseCurvature(InverseCurvature):
    r"""Per-layer :math:`Q_G\,[(Q_G^\top V Q_A) \oslash (S + \lambda)]\,Q_A^\top`.

    Attributes
    ----------
    eigenbases
        Per layer ``(Q_A, Q_G)``: eigenvectors of the input and output-gradient factors.
    scalings
        Per layer ``S`` (shape ``(out, in [+1])``): :math:`\lambda_G \lambda_A^\top` for
        K-FAC, the corrected second moments for EK-FAC.
    """

    def __init__(
        self,
        problem: FlatProblem,
        damping: float,
        eigenbases: list[tuple[jax.Array, jax.Array]],
        scalings: list[jax.Array],
    ) -> None:
        super().__init__(problem, damping)
        self.eigenbases = eigenbases
        self.scalings = scalings

    def solve_flat(self, rhs: jax.Array) -> jax.Array:
        damping = jnp.asarray(self.damping, rhs.dtype)
        return _kronecker_solve(self.problem.params, self.eigenbases, self.scalings, damping, rhs)


@dataclasses.dataclass(frozen=True)
class EKFAC:
    r"""K-FAC (Martens & Grosse, 2015) and its eigenvalue-corrected variant EK-FAC
    (George et al., 2018) for the ``equinox.nn.Linear`` layers of an equinox model.

    For a dense layer :math:`y = W a + b`, write :math:`\bar a = (a, 1)` and let
    :math:`g_{ic}` be the output gradients of example :math:`i` for the factor columns
    :math:`c` of the curvature (one column, the loss gradient, for :class:`Hessian`: the
    empirical Fisher; the columns of :math:`H_z^{1/2}` for :class:`GaussNewton`: the
    exact Gauss–Newton). The layer's block of the curvature is
    :math:`\sum_{i,c} (g_{ic} g_{ic}^\top) \otimes (\bar a_i \bar a_i^\top)`; K-FAC replaces
    it by :math:`G \otimes A` with

    .. math:: A = \frac1n \sum_i \bar a_i \bar a_i^\top, \qquad
       G = \sum_{i,c} g_{ic} g_{ic}^\top ,

    whose inverse with damping is cheap in the factors' eigenbases
    :math:`A = Q_A \Lambda_A Q_A^\top`, :math:`G = Q_G \Lambda_G Q_G^\top`:
    :math:`V \mapsto Q_G [(Q_G^\top V Q_A) \oslash (S + \lambda)] Q_A^\top` with
    :math:`S = \lambda_G \lambda_A^\top`. EK-FAC keeps the eigenbasis but replaces
    :math:`S` by the exact diagonal of the curvature block in it (a second pass),

    .. math:: S_{ok} = \sum_{i,c} (Q_G^\top g_{ic})_o^2\, (Q_A^\top \bar a_i)_k^2 ,

    which is the best diagonal in that basis (Frobenius norm). Cross-layer blocks are
    dropped (block-diagonal approximation).

    Memory: the factors, ``(in+1)² + out²`` per layer; nothing grows with the data.

    Parameters
    ----------
    damping
        :math:`\lambda \ge 0` added to :math:`S`.
    eigen_corrected
        ``True``: EK-FAC; ``False``: K-FAC.

    Raises
    ------
    TypeError
        If ``params`` has float entries outside ``eqx.nn.Linear`` layers (convolutions,
        norms, embeddings are not covered), or a layer maps scalars.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, equinox as eqx
    >>> from dargmin.influence import Hessian
    >>> model = eqx.nn.Linear(2, 1, key=jax.random.PRNGKey(0))
    >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> loss = lambda m, b: 0.5 * jnp.sum((jax.vmap(m)(b["x"])[:, 0] - b["y"]) ** 2)
    >>> loader = [{"x": x, "y": jnp.array([1.0, -1.0, 0.5])}]
    >>> inverse = EKFAC(damping=0.1).fit(Hessian(loss), model, loader)
    >>> [s.shape for s in inverse.scalings]
    [(1, 3)]
    """

    damping: float = 0.0
    eigen_corrected: bool = True

    def __post_init__(self) -> None:
        _check_damping(self.damping)

    def fit(
        self, curvature: Curvature, params: PyTree, loader: Loader
    ) -> KroneckerInverseCurvature:
        """Accumulate the factors (one pass), eigendecompose, and correct (one more pass)."""
        problem = FlatProblem(curvature, params)
        layers = _linears(params)
        covered = 0
        for layer in layers:
            if layer.in_features == "scalar" or layer.out_features == "scalar":
                raise TypeError("EKFAC does not support eqx.nn.Linear layers on scalars.")
            covered += layer.weight.size + (0 if layer.bias is None else layer.bias.size)
        if not layers or covered != problem.size:
            raise TypeError(
                f"EKFAC covers the float parameters of eqx.nn.Linear layers only; params has "
                f"{problem.size} float entries of which {covered} are in {len(layers)} such "
                "layers. Use Arnoldi or LiSSA for other architectures."
            )
        total: list[tuple[jax.Array, jax.Array]] | None = None
        num_examples = 0
        for batch in iterate(loader):
            num_examples += int(jax.tree_util.tree_leaves(batch)[0].shape[0])
            batch_factors = _factors(curvature, params, batch)
            total = (
                batch_factors
                if total is None
                else [
                    (a0 + a1, g0 + g1)
                    for (a0, g0), (a1, g1) in zip(total, batch_factors, strict=True)
                ]
            )
        assert total is not None  # iterate() refuses an empty loader
        bases: list[tuple[jax.Array, jax.Array]] = []
        scalings: list[jax.Array] = []
        for a_sum, g_sum in total:
            lambda_a, q_a = jnp.linalg.eigh(a_sum / num_examples)
            lambda_g, q_g = jnp.linalg.eigh(g_sum)
            bases.append((q_a, q_g))
            # Rounding can leave tiny negative eigenvalues of the PSD factors.
            scalings.append(jnp.outer(jnp.maximum(lambda_g, 0.0), jnp.maximum(lambda_a, 0.0)))
        if self.eigen_corrected:
            corrected = [jnp.zeros_like(s) for s in scalings]
            for batch in iterate(loader):
                corrected = [
                    s0 + s1
                    for s0, s1 in zip(
                        corrected, _corrections(curvature, params, batch, bases), strict=True
                    )
                ]
            scalings = corrected
        return KroneckerInverseCurvature(problem, self.damping, bases, scalings)


def KFAC(damping: float = 0.0) -> EKFAC:
    """Plain K-FAC (no eigenvalue correction): ``EKFAC(damping, eigen_corrected=False)``.

    Examples
    --------
    >>> KFAC(0.1)
    EKFAC(damping=0.1, eigen_corrected=False)
    """
    return EKFAC(damping=damping, eigen_corrected=False)
