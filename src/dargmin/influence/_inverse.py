"""Inverse-curvature-vector products without forming the curvature matrix: the exact
(dense, for validation) baseline, LiSSA and the Arnoldi/Lanczos low-rank inverse."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

from dargmin.errors import DargminWarning, SingularSystemError
from dargmin.influence._lanczos import lanczos
from dargmin.influence._problem import (
    Curvature,
    FlatProblem,
    Loader,
    batch_size,
    flat_view,
    iterate,
)
from dargmin.linear_solvers import Cholesky, factorize
from dargmin.typing import PyTree


def _check_damping(damping: float) -> None:
    if not (isinstance(damping, int | float) and math.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}.")


class InverseCurvature:
    r"""A fitted approximation of :math:`(C + \lambda I)^{-1}` (``C`` the curvature).

    Made by a strategy's ``fit``; :meth:`solve` applies it to params-shaped vectors and
    :func:`dargmin.influence.influence_scores` to test gradients.

    Attributes
    ----------
    problem
        The flat view of the objective (parameters, curvature, compiled kernels).
    damping
        :math:`\lambda`.
    """

    def __init__(self, problem: FlatProblem, damping: float) -> None:
        self.problem = problem
        self.damping = float(damping)

    def solve_flat(self, rhs: jax.Array) -> jax.Array:
        """Apply the inverse to the rows of ``rhs`` (shape ``(q, p)``, flat parameters)."""
        raise NotImplementedError

    def solve(self, vectors: PyTree, *, batched: bool = False) -> PyTree:
        """Apply the inverse to a params-shaped pytree (with a leading axis if ``batched``)."""
        flat = self.problem.as_flat(vectors, batched=batched)
        solved = self.solve_flat(flat if batched else flat[None])
        return self.problem.as_tree(solved if batched else solved[0], batched=batched)


# --------------------------------------------------------------------------- exact (dense)


class ExactInverseCurvature(InverseCurvature):
    """:math:`(C + \\lambda I)^{-1}` by a Cholesky factorization of the dense matrix."""

    def __init__(self, problem: FlatProblem, damping: float, matrix: jax.Array) -> None:
        super().__init__(problem, damping)
        self.matrix = matrix
        operator = lx.MatrixLinearOperator(matrix, (lx.symmetric_tag, lx.positive_semidefinite_tag))
        self._system = factorize(operator, Cholesky(), context="influence.ExactInverse")

    def solve_flat(self, rhs: jax.Array) -> jax.Array:
        return _solve_rows(self._system, rhs)


# Module-level, with the factorization as an argument (an equinox module: its factors are
# traced, its solver configuration is static): every fit of the same size reuses the
# compiled solve. A `jax.jit` made per fit recompiled it each time, which was most of the
# time of a warm ExactInverse fit + scores (measured: ~2 s of ~2 s on the benchmark MLP).
@eqx.filter_jit
def _solve_rows(system: Any, rhs: jax.Array) -> jax.Array:
    return jax.vmap(system.solve)(rhs)


@dataclasses.dataclass(frozen=True)
class ExactInverse:
    r"""The exact :math:`(C + \lambda I)^{-1}` from the dense ``p × p`` curvature matrix.

    :math:`C = \sum_b C_b` is built column by column from curvature-vector products of the
    standard basis (one pass over the loader, ``p`` batched products per batch), then
    factorized once with Cholesky (:func:`dargmin.linear_solvers.factorize`, which refuses
    a matrix that is not positive definite). Cost :math:`O(p^2)` memory, :math:`O(p^3)`
    time: a reference for validating the approximations on small models.

    Parameters
    ----------
    damping
        :math:`\lambda \ge 0`.
    max_size
        Largest ``p`` accepted (the dense matrix is ``p²`` numbers).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from dargmin.influence import Hessian
    >>> loader = [{"x": jnp.array([[1.0, 0.0], [0.0, 2.0]])}]
    >>> curvature = Hessian(lambda w, b: 0.5 * jnp.sum((b["x"] @ w) ** 2))
    >>> inverse = ExactInverse(damping=1.0).fit(curvature, jnp.zeros(2), loader)
    >>> [round(float(t), 4) for t in inverse.solve(jnp.array([2.0, 5.0]))]  # (diag(1,4)+I)⁻¹v
    [1.0, 1.0]
    """

    damping: float = 0.0
    max_size: int = 5000

    def __post_init__(self) -> None:
        _check_damping(self.damping)

    def fit(self, curvature: Curvature, params: PyTree, loader: Loader) -> ExactInverseCurvature:
        """Build and factorize :math:`C + \\lambda I` over one pass of ``loader``."""
        problem = FlatProblem(curvature, params)
        if problem.size > self.max_size:
            raise ValueError(
                f"ExactInverse forms the dense {problem.size} x {problem.size} curvature; "
                f"that exceeds max_size={self.max_size}. Use Arnoldi, EKFAC or LiSSA."
            )
        identity = jnp.eye(problem.size, dtype=problem.dtype)
        matrix = problem.full_products(loader, identity)
        matrix = 0.5 * (matrix + matrix.T) + self.damping * identity
        return ExactInverseCurvature(problem, self.damping, matrix)


# --------------------------------------------------------------------------- LiSSA


@eqx.filter_jit
def _lissa_step(
    curvature: Curvature,
    params: PyTree,
    batch: Any,
    h: jax.Array,
    rhs: jax.Array,
    constants: jax.Array,
) -> jax.Array:
    # Numbers travel as one array so that a new scale or damping reuses the compiled step.
    factor, damping, scale = constants
    flat, build = flat_view(params)
    products = jax.vmap(lambda v: curvature.product(build, flat, batch, v))(h)
    return rhs + h - (factor * products + damping * h) / scale


class LiSSAInverseCurvature(InverseCurvature):
    """LiSSA's stochastic Neumann series, run lazily over the loader at each solve."""

    def __init__(
        self,
        problem: FlatProblem,
        strategy: LiSSA,
        loader: Loader,
        num_examples: int,
        scale: float,
    ) -> None:
        super().__init__(problem, strategy.damping)
        self.strategy = strategy
        self.loader = loader
        self.num_examples = num_examples
        self.scale = scale
        #: ``‖h_T - h_{T-1}‖ / ‖h_T‖`` of the last repeat of the last solve (the step the
        #: recursion was still making when it stopped; minibatch noise keeps it above 0).
        self.last_relative_change: float = float("nan")

    def solve_flat(self, rhs: jax.Array) -> jax.Array:
        total = jnp.zeros_like(rhs)
        depth = self.strategy.depth
        # Iterates from this step on are averaged (Polyak tail averaging).
        first_averaged = depth - max(1, round(self.strategy.tail_fraction * depth))
        for _ in range(self.strategy.repeats):
            h = rhs
            previous = h
            taken = 0
            tail = jnp.zeros_like(rhs)
            while taken < self.strategy.depth:
                for batch in iterate(self.loader):
                    # n/|b| C_b is an unbiased estimate of C = Σ_b C_b for a uniformly
                    # drawn batch of equal-sized batches.
                    factor = self.num_examples / batch_size(batch)
                    previous, h = (
                        h,
                        _lissa_step(
                            self.problem.curvature,
                            self.problem.params,
                            batch,
                            h,
                            rhs,
                            jnp.asarray([factor, self.damping, self.scale], rhs.dtype),
                        ),
                    )
                    taken += 1
                    if taken > first_averaged:
                        tail = tail + h
                    if taken == depth:
                        break
            change = float(jnp.linalg.norm(h - previous) / jnp.maximum(jnp.linalg.norm(h), 1e-300))
            self.last_relative_change = change
            if not math.isfinite(change) or change > 0.5:
                raise SingularSystemError(
                    f"LiSSA diverged (last relative step {change:.3g} after "
                    f"{self.strategy.depth} steps with scale {self.scale:.4g}): the series "
                    "converges only when 0 < eig(C + damping I) < 2 scale for every batch "
                    "estimate. Increase scale (or scale_margin) or the damping. "
                    "[reason: singular]"
                )
            total = total + tail / ((depth - first_averaged) * self.scale)
        return total / self.strategy.repeats


@dataclasses.dataclass(frozen=True)
class LiSSA:
    r"""LiSSA (Agarwal, Bullins & Hazan, 2017): a stochastic Neumann series for
    :math:`(C + \lambda I)^{-1} v`.

    With a scale :math:`s`, :math:`(C + \lambda I)^{-1} = \frac1s \sum_{t \ge 0}
    (I - (C + \lambda I)/s)^t`, which converges iff every eigenvalue of
    :math:`C + \lambda I` lies in :math:`(0, 2s)`. The truncated series is computed by the
    recursion

    .. math:: h_0 = v, \qquad h_t = v + h_{t-1} - (\hat C_t h_{t-1} + \lambda h_{t-1})/s,
       \qquad (C + \lambda I)^{-1} v \approx h_T / s,

    with :math:`\hat C_t = (n/|b_t|)\, C_{b_t}` the curvature of the ``t``-th batch of the
    loader (cycled) scaled to the whole data set. The returned estimate averages
    :math:`h_t/s` over the last ``tail_fraction`` of the steps (Polyak averaging): once the
    deterministic part has converged, the final iterate still carries the noise of the last
    :math:`\sim s/(\mu+\lambda)` batches and, with a loader in a fixed order, a periodic
    bias from the order; averaging over whole cycles removes most of both. For the exact
    curvature, :math:`x - h_t/s = M^{t+1} x` with :math:`M = I - (C + \lambda I)/s`, so the
    error of :math:`h_t/s` is at most :math:`\rho^{t+1}\|x\|`,
    :math:`\rho = 1 - (\mu + \lambda)/s` (:math:`\mu` the smallest eigenvalue), and that
    of the average at most :math:`\rho^{t_0+1}\|x\|` for its first step :math:`t_0`.
    The number of steps needed grows like
    :math:`s/(\mu + \lambda)` (the condition number), so damping matters. Minibatch
    estimates add noise of order :math:`1/s` per step; average over ``repeats``.

    Parameters
    ----------
    damping
        :math:`\lambda \ge 0`.
    scale
        :math:`s`. Default: ``scale_margin`` times (:math:`\lambda` plus the largest
        eigenvalue of the batch estimates :math:`\hat C_t` of the first ``scale_batches``
        batches, 10 Lanczos steps each). A batch estimate's top eigenvalue can be several
        times that of :math:`C`, and the series needs every one below :math:`2s`.
    scale_margin
        Safety factor of the default scale (Lanczos underestimates the top eigenvalue).
    scale_batches
        Number of batches whose estimates set the default scale.
    depth
        Number of recursion steps :math:`T` (one batch each, cycling through the loader).
    tail_fraction
        Fraction of the last steps whose iterates are averaged (``0``: the last one only).
    repeats
        Independent recursions averaged (each restarts the loader: a shuffling loader
        gives independent estimates).

    Notes
    -----
    Divergence (non-finite iterates, or a last step larger than half the iterate) raises
    :class:`dargmin.SingularSystemError`; the fitted operator keeps the last relative step
    in ``last_relative_change``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from dargmin.influence import Hessian
    >>> loader = [{"x": jnp.array([[1.0, 0.0], [0.0, 2.0]])}]
    >>> curvature = Hessian(lambda w, b: 0.5 * jnp.sum((b["x"] @ w) ** 2))
    >>> inverse = LiSSA(damping=1.0, scale=5.0, depth=200).fit(curvature, jnp.zeros(2), loader)
    >>> [round(float(t), 4) for t in inverse.solve(jnp.array([2.0, 5.0]))]
    [1.0, 1.0]
    """

    damping: float = 0.0
    scale: float | None = None
    scale_margin: float = 1.2
    scale_batches: int = 16
    depth: int = 500
    tail_fraction: float = 0.5
    repeats: int = 1

    def __post_init__(self) -> None:
        _check_damping(self.damping)
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"LiSSA scale must be > 0, got {self.scale!r}.")
        if not 0 <= self.tail_fraction < 1:
            raise ValueError(f"tail_fraction must be in [0, 1), got {self.tail_fraction}.")
        if self.depth < 1 or self.repeats < 1:
            raise ValueError(f"depth and repeats must be >= 1, got {self.depth}, {self.repeats}.")

    def fit(self, curvature: Curvature, params: PyTree, loader: Loader) -> LiSSAInverseCurvature:
        """Count the examples and, without a given scale, estimate the top eigenvalue."""
        problem = FlatProblem(curvature, params)
        num_examples = problem.count(loader)
        scale = self.scale
        if scale is None:
            # The series must contract for every batch estimate n/|b| C_b, whose top
            # eigenvalue can be several times that of C (measured: 3x with 3 batches), so
            # the scale comes from the batches themselves, not from C.
            start = jax.random.normal(jax.random.PRNGKey(0), (problem.size,), problem.dtype)
            top = 0.0
            for index, batch in enumerate(iterate(loader)):
                if index == self.scale_batches:
                    break
                factor = num_examples / batch_size(batch)

                def batch_estimate(q: jax.Array, b: Any = batch, f: float = factor) -> jax.Array:
                    return f * problem.products(b, q[None])[0]

                tri = lanczos(batch_estimate, start, 10)
                top = max(top, float(np.linalg.eigvalsh(tri.tridiagonal())[-1]))
            scale = self.scale_margin * (top + self.damping)
            if not scale > 0:
                raise SingularSystemError(
                    "LiSSA: the curvature's largest eigenvalue is <= 0 and damping is 0; "
                    "there is no positive-definite system to invert. [reason: singular]"
                )
        return LiSSAInverseCurvature(problem, self, loader, num_examples, float(scale))


# --------------------------------------------------------------------------- Arnoldi / Lanczos


class LowRankInverseCurvature(InverseCurvature):
    r"""The inverse of :math:`U \Theta U^\top + \lambda I` (or its projection on ``U``).

    Attributes
    ----------
    eigenvalues
        :math:`\theta_1 \ge \dots \ge \theta_k`, shape ``(k,)``.
    eigenvectors
        Orthonormal rows :math:`u_i` (flat parameters), shape ``(k, p)``.
    residuals
        :math:`\|C u_i - \theta_i u_i\|` (one extra pass): some eigenvalue of :math:`C`
        lies within this distance of :math:`\theta_i`.
    project
        Whether the complement of the subspace is dropped.
    krylov_dimension
        Lanczos steps taken (fewer than asked when an invariant subspace was found).
    """

    krylov_dimension: int = 0

    def __init__(
        self,
        problem: FlatProblem,
        damping: float,
        eigenvalues: jax.Array,
        eigenvectors: jax.Array,
        residuals: jax.Array,
        project: bool,
    ) -> None:
        super().__init__(problem, damping)
        self.eigenvalues = eigenvalues
        self.eigenvectors = eigenvectors
        self.residuals = residuals
        self.project = project

        def solve(rhs: jax.Array) -> jax.Array:
            coordinates = rhs @ eigenvectors.T
            inside = (coordinates / (eigenvalues + damping)) @ eigenvectors
            if project:
                return inside
            # (UΘUᵀ + λI)⁻¹ = U (Θ + λ)⁻¹ Uᵀ + (I - UUᵀ)/λ: the complement sees only λ.
            return inside + (rhs - coordinates @ eigenvectors) / damping

        self._solve = jax.jit(solve)

    def solve_flat(self, rhs: jax.Array) -> jax.Array:
        return self._solve(rhs)


@dataclasses.dataclass(frozen=True)
class Arnoldi:
    r"""Low-rank inverse from the top eigenpairs of the curvature (Schioppa et al., 2022).

    Runs ``num_iterations`` Lanczos steps (the symmetric Arnoldi process; one pass over the
    loader per step, full reorthogonalization) from a random start and takes the ``rank``
    largest Ritz pairs :math:`(\theta_i, u_i)` of the tridiagonal matrix, i.e. the
    approximation :math:`C \approx U \Theta U^\top`. Its damped inverse is exact:

    .. math:: (U \Theta U^\top + \lambda I)^{-1} v = \sum_{i=1}^{k}
       \frac{u_i^\top v}{\theta_i + \lambda}\, u_i + \frac1\lambda (I - U U^\top) v .

    With ``project=True`` the second term is dropped (Schioppa et al.'s choice: the inverse
    restricted to the dominant subspace, which needs no damping and keeps the scores'
    scale set by the data rather than by :math:`1/\lambda`). The full form is accurate when
    the eigenvalues outside the top ``k`` are small next to :math:`\lambda`; the projection
    when they are large next to it and the influence lives in the top subspace. Ritz values
    converge first at the top of the spectrum, so take ``num_iterations`` about twice
    ``rank``.

    Memory: the ``(m, p)`` Lanczos basis while fitting, the ``(k, p)`` eigenvectors after;
    nothing grows with the number of examples.

    Parameters
    ----------
    rank
        :math:`k`, the number of eigenpairs kept.
    num_iterations
        Lanczos steps :math:`m \ge k`; default :math:`2k + 10` (capped at ``p``).
    damping
        :math:`\lambda \ge 0`; must be positive unless ``project``.
    project
        Drop the complement of the top-``k`` subspace. Default: only when ``damping`` is 0.
    seed
        Seed of the random start vector.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from dargmin.influence import Hessian
    >>> loader = [{"x": jnp.diag(jnp.array([1.0, 2.0, 3.0]))}]
    >>> curvature = Hessian(lambda w, b: 0.5 * jnp.sum((b["x"] @ w) ** 2))
    >>> inverse = Arnoldi(rank=2, damping=1.0).fit(curvature, jnp.zeros(3), loader)
    >>> [round(float(t), 4) for t in inverse.eigenvalues]
    [9.0, 4.0]
    >>> [round(float(t), 4) for t in inverse.solve(jnp.ones(3))]  # 1/λ outside (exact: 1/2)
    [1.0, 0.2, 0.1]
    """

    rank: int = 20
    num_iterations: int | None = None
    damping: float = 0.0
    project: bool | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_damping(self.damping)
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}.")
        if self.num_iterations is not None and self.num_iterations < self.rank:
            raise ValueError(
                f"num_iterations ({self.num_iterations}) must be >= rank ({self.rank})."
            )
        if self.project is False and self.damping == 0:
            raise ValueError(
                "Arnoldi(project=False) inverts U Θ Uᵀ + damping I, which is singular with "
                "damping=0; pass damping > 0 or project=True."
            )

    def fit(self, curvature: Curvature, params: PyTree, loader: Loader) -> LowRankInverseCurvature:
        """Lanczos over the loader, then the top-``rank`` Ritz pairs and their residuals."""
        problem = FlatProblem(curvature, params)
        steps = self.num_iterations if self.num_iterations is not None else 2 * self.rank + 10
        start = jax.random.normal(jax.random.PRNGKey(self.seed), (problem.size,), problem.dtype)
        tri = lanczos(lambda q: problem.full_products(loader, q[None])[0], start, steps)
        values, coordinates = jnp.linalg.eigh(jnp.asarray(tri.tridiagonal(), problem.dtype))
        keep = jnp.arange(tri.size - 1, max(tri.size - self.rank, 0) - 1, -1)
        values, coordinates = values[keep], coordinates[:, keep]
        positive = values + self.damping > 0
        if not bool(jnp.all(positive)):
            dropped = int(jnp.sum(~positive))
            if dropped == keep.size:
                raise SingularSystemError(
                    "Arnoldi: no eigenvalue of the curvature plus damping is positive; "
                    "the low-rank inverse is empty. [reason: singular]"
                )
            warnings.warn(
                f"Arnoldi: {dropped} of the top {keep.size} Ritz values plus damping are "
                "<= 0 (the curvature is not positive semidefinite there); they are dropped.",
                DargminWarning,
                stacklevel=2,
            )
            values, coordinates = values[positive], coordinates[:, positive]
        # Slice only when Lanczos stopped early: a full slice would copy the (m, p) basis.
        basis = tri.basis if tri.size == tri.basis.shape[0] else tri.basis[: tri.size]
        vectors = coordinates.T @ basis
        krylov_dimension = tri.size
        del tri, basis  # the (m, p) basis is the peak of the memory; keep the k rows
        residuals = jnp.linalg.norm(
            problem.full_products(loader, vectors) - values[:, None] * vectors, axis=1
        )
        project = self.project if self.project is not None else self.damping == 0
        fitted = LowRankInverseCurvature(problem, self.damping, values, vectors, residuals, project)
        fitted.krylov_dimension = krylov_dimension
        return fitted
