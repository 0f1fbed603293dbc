"""Influence scores of training examples on test queries, streamed over the loader."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from dargmin.influence._inverse import InverseCurvature
from dargmin.influence._problem import Batch, Loader, iterate
from dargmin.typing import PyTree, Scalar


def influence_scores(
    inverse: InverseCurvature,
    train_loader: Loader,
    queries: Batch,
    *,
    query_loss: Callable[[PyTree, Batch], Scalar] | None = None,
) -> jax.Array:
    r"""Influence of every training example on every test query, ``(n_train, n_queries)``.

    With the fitted :math:`\hat\theta` minimizing :math:`\sum_i w_i \ell(\theta, z_i)`,
    the derivative of a query loss :math:`f_j` in the weight of example :math:`i` at
    :math:`w = 1` is (Koh & Liang, 2017)

    .. math:: \mathcal I_{ij} = \frac{\partial f_j(\hat\theta)}{\partial w_i}
       = -\nabla f_j^\top (C + \lambda I)^{-1} \nabla \ell(\hat\theta, z_i),

    with :math:`C` the curvature and :math:`(C+\lambda I)^{-1}` as approximated by
    ``inverse`` (exact for :class:`ExactInverse` with the Hessian and no damping).
    Removing example :math:`i` changes :math:`f_j` by about :math:`-\mathcal I_{ij}`; a
    negative score marks a helpful example.

    The query gradients are preconditioned once, :math:`u_j = (C+\lambda I)^{-1}\nabla f_j`
    (``q`` vectors of size ``p``); the training set is then streamed one batch at a time
    (per-example gradients of that batch, ``(B, p)``) and only the ``(B, q)`` block of
    scores is kept, so memory is :math:`O((q + B)\,p)` plus the output.

    Parameters
    ----------
    inverse
        A fitted inverse (``ExactInverse``, ``Arnoldi``, ``EKFAC`` or ``LiSSA`` ``.fit``).
    train_loader
        Re-iterable of training batches (the order of the rows of the result).
    queries
        A batch of test examples (leading axis ``q``).
    query_loss
        ``query_loss(params, batch_of_one) -> scalar``; default the curvature's loss.

    Returns
    -------
    jax.Array
        Scores, shape ``(n_train, q)``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from dargmin.influence import ExactInverse, Hessian
    >>> data = {"z": jnp.array([0.0, 1.0, 5.0])}
    >>> curvature = Hessian(lambda mu, b: 0.5 * jnp.sum((mu - b["z"]) ** 2))
    >>> inverse = ExactInverse().fit(curvature, jnp.mean(data["z"]), [data])
    >>> scores = influence_scores(inverse, [data], {"z": jnp.array([0.0])})
    >>> [round(float(s), 3) for s in scores[:, 0]]  # -(mu - 0)(mu - z_i)/3, mu = 2
    [-1.333, -0.667, 2.0]
    """
    problem = inverse.problem
    query_gradients = problem.example_gradients(queries, query_loss)
    preconditioned = inverse.solve_flat(query_gradients)
    blocks = [
        -(problem.example_gradients(batch) @ preconditioned.T) for batch in iterate(train_loader)
    ]
    return jnp.concatenate(blocks, axis=0)
