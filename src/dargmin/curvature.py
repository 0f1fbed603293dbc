"""Curvature diagnostics from matrix-vector products: extreme eigenvalues and traces.

All routines take the operator as a function ``v -> A v`` (e.g. a Hessian-vector product
from :mod:`dargmin.derivatives`), so Hessians are never materialized except in the small
dense helper :func:`spectrum_dense`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from dargmin.typing import DTypeLike, FlatMatvec, Matrix, Matvec, PRNGKey, PyTree, Scalar, Vector

__all__ = [
    "EigenEstimate",
    "hutch_plus_plus_trace",
    "hutchinson_trace",
    "lanczos_extreme_eigenvalues",
    "spectrum_dense",
]


class EigenEstimate(NamedTuple):
    r"""Extreme Ritz pairs from :func:`lanczos_extreme_eigenvalues`.

    Attributes
    ----------
    smallest
        The ``k`` smallest Ritz values, ascending, shape ``(k,)``.
    largest
        The ``k`` largest Ritz values, descending, shape ``(k,)``.
    smallest_residuals
        :math:`\|A u_i - \theta_i u_i\|_2` for the smallest pairs (unit :math:`u_i`). For
        symmetric :math:`A` some true eigenvalue lies within this distance of
        :math:`\theta_i`, so these are a-posteriori certificates.
    largest_residuals
        Same for the largest pairs.
    smallest_vectors
        Ritz vectors with a leading axis of length ``k`` (structure of ``v0``).
    largest_vectors
        Same for the largest pairs.
    """

    smallest: Vector
    largest: Vector
    smallest_residuals: Vector
    largest_residuals: Vector
    smallest_vectors: PyTree
    largest_vectors: PyTree


def _flatten_operator(
    matvec: Matvec, example: PyTree
) -> tuple[FlatMatvec, Vector, Callable[[Vector], PyTree]]:
    flat_example, unravel = ravel_pytree(example)

    def flat_matvec(flat_v: jax.Array) -> jax.Array:
        return ravel_pytree(matvec(unravel(flat_v)))[0]

    return flat_matvec, flat_example, unravel


def _orthogonalize(w: jax.Array, basis: jax.Array) -> jax.Array:
    # Two passes of classical Gram-Schmidt ("twice is enough", Kahan/Parlett) keep the
    # basis orthogonal to working precision. Rows of `basis` not yet filled are zero and
    # therefore have no effect, which keeps the shapes static for lax loops.
    w = w - basis.T @ (basis @ w)
    return w - basis.T @ (basis @ w)


def lanczos_extreme_eigenvalues(
    matvec: Matvec,
    v0: PyTree,
    *,
    k: int = 1,
    num_iterations: int | None = None,
    reorthogonalize: bool = True,
) -> EigenEstimate:
    r"""Extreme eigenvalues of a symmetric operator by the Lanczos method.

    Builds an orthonormal basis :math:`Q_m = [q_1, \dots, q_m]` of the Krylov space
    :math:`\mathcal{K}_m(A, v_0)` together with the tridiagonal
    :math:`T_m = Q_m^\top A Q_m` (diagonal :math:`\alpha_j = q_j^\top A q_j`, off-diagonal
    :math:`\beta_j`) from the three-term recurrence
    :math:`\beta_j q_{j+1} = A q_j - \alpha_j q_j - \beta_{j-1} q_{j-1}`.
    The eigenvalues :math:`\theta_i` of :math:`T_m` (Ritz values) converge first to the
    extreme eigenvalues of :math:`A`. Residuals :math:`\|A u_i - \theta_i u_i\|` of the Ritz
    vectors :math:`u_i = Q_m s_i` are computed explicitly (``2k`` extra matvecs) and bound
    the distance from :math:`\theta_i` to the spectrum.

    With ``reorthogonalize=True`` each new vector is orthogonalized against all previous
    ones, which prevents the spurious duplicate Ritz values of plain Lanczos in finite
    precision. On breakdown (:math:`\beta_j \approx 0`: the Krylov space is invariant) the
    recurrence restarts from a pseudo-random vector orthogonal to the basis with
    :math:`\beta_j = 0`, so :math:`T_m` stays equal to :math:`Q_m^\top A Q_m` and no NaN
    appears.

    Hand-written because ``lineax`` has no eigensolver and ``scipy.sparse.linalg.eigsh``
    cannot run under ``jax.jit``. The loop has a fixed iteration count (``lax.fori_loop``),
    so the function is jit-compatible (close over ``matvec``; ``k``, ``num_iterations``
    and ``reorthogonalize`` are static). Memory is :math:`O(m\,n)`.

    Parameters
    ----------
    matvec
        :math:`v \mapsto A v` for symmetric :math:`A`, on arrays or pytrees shaped like
        ``v0``; must be ``vmap``-compatible (the residuals are batched).
    v0
        Nonzero starting vector (array or pytree). A zero vector is replaced by a constant
        one.
    k
        Number of smallest and of largest Ritz values to return.
    num_iterations
        Krylov dimension :math:`m`; default :math:`\min(n, \max(2k + 20, 30))`, always
        capped at :math:`n = \dim(v_0)`. With :math:`m = n` the result is exact up to
        round-off.
    reorthogonalize
        Full reorthogonalization (recommended).

    Returns
    -------
    EigenEstimate
        Ritz values, residual norms and Ritz vectors.

    Raises
    ------
    ValueError
        If ``k < 1`` or ``k`` exceeds the Krylov dimension.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> A = jnp.diag(jnp.arange(1.0, 11.0))
    >>> estimate = lanczos_extreme_eigenvalues(lambda v: A @ v, jnp.ones(10), k=2)
    >>> [round(float(t), 4) for t in estimate.largest]
    [10.0, 9.0]
    """
    flat_matvec, flat_v0, unravel = _flatten_operator(matvec, v0)
    dimension = flat_v0.size
    if num_iterations is None:
        num_iterations = max(2 * k + 20, 30)
    num_iterations = min(int(num_iterations), dimension)
    if k < 1 or k > num_iterations:
        raise ValueError(
            f"k must satisfy 1 <= k <= num_iterations (= {num_iterations} after capping at "
            f"the dimension {dimension}); got k={k}."
        )
    dtype = flat_v0.dtype
    eps = jnp.finfo(dtype).eps

    v0_norm = jnp.linalg.norm(flat_v0)
    fallback = jnp.full_like(flat_v0, 1.0 / jnp.sqrt(dimension))
    q_first = jnp.where(v0_norm > 0, flat_v0 / jnp.where(v0_norm > 0, v0_norm, 1.0), fallback)

    # Fixed key: restart vectors only need to be generic, and determinism keeps results
    # reproducible under jit.
    restart_key = jax.random.PRNGKey(0)

    def restart_vector(step: jax.Array, basis: jax.Array) -> jax.Array:
        candidate = jax.random.normal(jax.random.fold_in(restart_key, step), (dimension,), dtype)
        candidate = _orthogonalize(candidate, basis)
        norm = jnp.linalg.norm(candidate)
        # The norm is zero only when the basis already spans the space (last step), where
        # the next vector is never used.
        return jnp.where(norm > 0, candidate / jnp.where(norm > 0, norm, 1.0), 0.0)

    def body(step: jax.Array, carry: tuple) -> tuple:
        basis, alphas, betas, q_previous, beta_previous, operator_scale = carry
        q_current = basis[step]
        w = flat_matvec(q_current)
        alpha = jnp.vdot(q_current, w)
        w = w - alpha * q_current - beta_previous * q_previous
        if reorthogonalize:
            w = _orthogonalize(w, basis)
        beta = jnp.linalg.norm(w)
        operator_scale = jnp.maximum(operator_scale, jnp.abs(alpha) + beta + beta_previous)
        breakdown = beta <= 10.0 * dimension * eps * operator_scale
        q_next = jax.lax.cond(
            breakdown,
            lambda: restart_vector(step, basis),
            lambda: w / jnp.where(breakdown, 1.0, beta),
        )
        beta = jnp.where(breakdown, 0.0, beta)
        next_index = jnp.minimum(step + 1, num_iterations - 1)
        # On the last step there is no row left for q_next; writing to the clamped index
        # would overwrite q_m, so keep the row unchanged there.
        basis = basis.at[next_index].set(
            jnp.where(step + 1 < num_iterations, q_next, basis[next_index])
        )
        alphas = alphas.at[step].set(alpha)
        betas = betas.at[step].set(beta)
        return basis, alphas, betas, q_current, beta, operator_scale

    basis = jnp.zeros((num_iterations, dimension), dtype).at[0].set(q_first)
    initial = (
        basis,
        jnp.zeros(num_iterations, dtype),
        jnp.zeros(num_iterations, dtype),
        jnp.zeros(dimension, dtype),
        jnp.zeros((), dtype),
        jnp.zeros((), dtype),
    )
    basis, alphas, betas, *_ = jax.lax.fori_loop(0, num_iterations, body, initial)

    off_diagonal = betas[: num_iterations - 1]
    tridiagonal = jnp.diag(alphas) + jnp.diag(off_diagonal, 1) + jnp.diag(off_diagonal, -1)
    ritz_values, ritz_coordinates = jnp.linalg.eigh(tridiagonal)

    def pairs(indices: jax.Array) -> tuple[jax.Array, jax.Array, PyTree]:
        values = ritz_values[indices]
        vectors = (basis.T @ ritz_coordinates[:, indices]).T
        vectors = vectors / jnp.linalg.norm(vectors, axis=1, keepdims=True)
        residual_vectors = jax.vmap(flat_matvec)(vectors) - values[:, None] * vectors
        residuals = jnp.linalg.norm(residual_vectors, axis=1)
        return values, residuals, jax.vmap(unravel)(vectors)

    smallest, smallest_residuals, smallest_vectors = pairs(jnp.arange(k))
    largest, largest_residuals, largest_vectors = pairs(num_iterations - 1 - jnp.arange(k))
    return EigenEstimate(
        smallest, largest, smallest_residuals, largest_residuals, smallest_vectors, largest_vectors
    )


def _probe_setup(
    matvec: Matvec, dim_or_example: int | PyTree, dtype: DTypeLike | None
) -> tuple[FlatMatvec, int, DTypeLike]:
    if isinstance(dim_or_example, int):
        probe_dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(float)
        return matvec, dim_or_example, probe_dtype
    flat_matvec, flat_example, _ = _flatten_operator(matvec, dim_or_example)
    return flat_matvec, flat_example.size, flat_example.dtype


def hutchinson_trace(
    matvec: Matvec,
    dim_or_example: int | PyTree,
    key: PRNGKey,
    num_samples: int = 64,
    *,
    dtype: DTypeLike | None = None,
) -> Scalar:
    r"""Hutchinson's stochastic trace estimator with Rademacher probes.

    .. math:: \widehat{\operatorname{tr}}(A) = \frac1s \sum_{i=1}^s z_i^\top A z_i,
       \qquad z_i \in \{-1, +1\}^n \text{ i.i.d. uniform},

    unbiased with variance
    :math:`\tfrac{2}{s}\big(\|A\|_F^2 - \sum_j A_{jj}^2\big)` for symmetric :math:`A`.
    Probes are evaluated in one ``vmap``-ed batch.

    Parameters
    ----------
    matvec
        :math:`v \mapsto A v`; on flat vectors of length ``dim`` when ``dim_or_example`` is
        an int, otherwise on pytrees shaped like the example.
    dim_or_example
        Dimension :math:`n`, or an example pytree (only shapes and dtypes are used).
    key
        ``jax.random`` key.
    num_samples
        Number of probes :math:`s` (= number of matvecs).
    dtype
        Probe dtype when ``dim_or_example`` is an int; default float (float64 under x64).

    Returns
    -------
    jax.Array
        Scalar trace estimate.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> A = jnp.diag(jnp.arange(1.0, 5.0))
    >>> float(hutchinson_trace(lambda v: A @ v, 4, jax.random.PRNGKey(0), 8))
    10.0
    """
    flat_matvec, dimension, probe_dtype = _probe_setup(matvec, dim_or_example, dtype)
    probes = jax.random.rademacher(key, (num_samples, dimension), probe_dtype)
    quadratic_forms = jnp.sum(probes * jax.vmap(flat_matvec)(probes), axis=1)
    return jnp.mean(quadratic_forms)


def hutch_plus_plus_trace(
    matvec: Matvec,
    dim_or_example: int | PyTree,
    key: PRNGKey,
    num_matvecs: int = 60,
    *,
    dtype: DTypeLike | None = None,
) -> Scalar:
    r"""Hutch++ trace estimator (Meyer, Musco, Musco & Woodruff, 2021).

    With a budget of :math:`m` matvecs, let :math:`r = \lfloor m/3 \rfloor` and
    :math:`s = m - 2r`. Draw Rademacher :math:`S \in \mathbb{R}^{n\times r}`,
    :math:`G \in \mathbb{R}^{n\times s}`, take an orthonormal basis :math:`Q` of
    :math:`AS` (QR) and return

    .. math:: \operatorname{tr}(Q^\top A Q)
       + \frac1s \operatorname{tr}\!\big(G^\top (I - QQ^\top) A (I - QQ^\top) G\big).

    The first term captures the top of the spectrum exactly, and Hutchinson is applied only
    to the deflated remainder, so the error decays like :math:`O(1/m)` instead of
    :math:`O(1/\sqrt m)` for PSD matrices. If :math:`\operatorname{rank}(A) \le r` the
    estimate is exact (up to round-off).

    Parameters
    ----------
    matvec
        :math:`v \mapsto A v` for symmetric :math:`A` (flat vectors, or pytrees shaped like
        the example).
    dim_or_example
        Dimension :math:`n`, or an example pytree.
    key
        ``jax.random`` key.
    num_matvecs
        Total matvec budget :math:`m \ge 3`.
    dtype
        Probe dtype when ``dim_or_example`` is an int.

    Returns
    -------
    jax.Array
        Scalar trace estimate.

    Raises
    ------
    ValueError
        If ``num_matvecs < 3``.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> u = jnp.arange(1.0, 7.0)
    >>> A = jnp.outer(u, u)  # rank one: Hutch++ is exact
    >>> round(float(hutch_plus_plus_trace(lambda v: A @ v, 6, jax.random.PRNGKey(0), 9)), 3)
    91.0
    """
    if num_matvecs < 3:
        raise ValueError(f"Hutch++ needs num_matvecs >= 3, got {num_matvecs}.")
    flat_matvec, dimension, probe_dtype = _probe_setup(matvec, dim_or_example, dtype)
    sketch_size = num_matvecs // 3
    num_probes = num_matvecs - 2 * sketch_size
    sketch_key, probe_key = jax.random.split(key)
    batched_matvec = jax.vmap(flat_matvec)  # rows in, rows out

    sketch = jax.random.rademacher(sketch_key, (sketch_size, dimension), probe_dtype)
    basis, _ = jnp.linalg.qr(batched_matvec(sketch).T)  # (n, r), orthonormal columns
    top_part = jnp.sum(basis.T * batched_matvec(basis.T))

    probes = jax.random.rademacher(probe_key, (num_probes, dimension), probe_dtype)
    deflated_probes = probes - (probes @ basis) @ basis.T
    remainder = jnp.sum(deflated_probes * batched_matvec(deflated_probes)) / num_probes
    return top_part + remainder


def spectrum_dense(
    matrix_or_matvec: Matrix | FlatMatvec,
    n: int | None = None,
    *,
    dtype: DTypeLike | None = None,
) -> Vector:
    r"""All eigenvalues (ascending) of a small symmetric operator, by dense ``eigvalsh``.

    A matvec is materialized column by column, :math:`A = [A e_1, \dots, A e_n]` (one
    batched ``vmap`` over the identity), then symmetrized as :math:`(A + A^\top)/2` so
    that round-off asymmetry does not bias ``eigvalsh`` (which reads one triangle only).
    Cost :math:`O(n^3)`; meant for diagnostics and tests.

    Parameters
    ----------
    matrix_or_matvec
        Square array, or a function on flat vectors of length ``n``.
    n
        Dimension; required for a matvec, ignored for an array.
    dtype
        Dtype of the basis vectors for a matvec; default float.

    Returns
    -------
    jax.Array
        Eigenvalues in ascending order, shape ``(n,)``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> spectrum_dense(lambda v: 2.0 * v, 3)
    Array([2., 2., 2.], dtype=float32)
    """
    if callable(matrix_or_matvec):
        if n is None:
            raise ValueError("n is required when a matvec is given.")
        basis_dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(float)
        # vmap over rows e_i gives rows (A e_i)^T, i.e. A^T; symmetrization makes it moot.
        matrix = jax.vmap(matrix_or_matvec)(jnp.eye(n, dtype=basis_dtype))
    else:
        matrix = jnp.asarray(matrix_or_matvec)
    return jnp.linalg.eigvalsh(0.5 * (matrix + matrix.T))
