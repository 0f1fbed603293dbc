"""Iterative refinement of an approximate inverse: conjugate gradients on the exact
curvature, preconditioned by a fitted approximation (EK-FAC, Arnoldi, ...)."""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp

from dargmin.errors import SingularSystemError
from dargmin.influence._inverse import InverseCurvature
from dargmin.influence._problem import Curvature, FlatProblem, Loader
from dargmin.typing import PyTree


class InverseStrategy(Protocol):
    """A strategy with a damping and a ``fit`` returning an :class:`InverseCurvature`."""

    @property
    def damping(self) -> float: ...

    def fit(self, curvature: Curvature, params: PyTree, loader: Loader) -> InverseCurvature: ...


class PreconditionedCGInverseCurvature(InverseCurvature):
    r""":math:`(C + \lambda I)^{-1}` by ``steps`` preconditioned CG iterations.

    Attributes
    ----------
    preconditioner
        The fitted approximation :math:`P \approx (C + \lambda I)^{-1}`.
    loader
        The training loader (one pass per CG step).
    steps
        Number of CG iterations (passes over the loader per solve).
    rtol
        A row stops once its residual is below ``rtol`` times its right-hand side.
    last_relative_residuals
        After a solve: :math:`\|b_j - (C+\lambda I)x_j\| / \|b_j\|` per row, the
        measured (not estimated) accuracy of that solve.
    """

    def __init__(
        self,
        problem: FlatProblem,
        damping: float,
        preconditioner: InverseCurvature,
        loader: Loader,
        steps: int,
        rtol: float,
    ) -> None:
        super().__init__(problem, damping)
        self.preconditioner = preconditioner
        self.loader = loader
        self.steps = steps
        self.rtol = rtol
        self.last_relative_residuals: jax.Array | None = None

    def _apply(self, vectors: jax.Array) -> jax.Array:
        return self.problem.full_products(self.loader, vectors) + self.damping * vectors

    def solve_flat(self, rhs: jax.Array) -> jax.Array:
        # Written here rather than with dargmin.krylov.ConjugateGradient (a lineax solver):
        # the operator is a Python loop over a data loader, which cannot be traced.
        # Independent CG recurrences per row, batched so that one pass serves all rows.
        def rowdot(u: jax.Array, v: jax.Array) -> jax.Array:
            return jnp.sum(u * v, axis=1)

        norms = jnp.linalg.norm(rhs, axis=1)
        solution = self.preconditioner.solve_flat(rhs)  # the approximation is the start
        residual = rhs - self._apply(solution)
        preconditioned = self.preconditioner.solve_flat(residual)
        direction = preconditioned
        rho = rowdot(residual, preconditioned)
        for _ in range(self.steps):
            active = jnp.linalg.norm(residual, axis=1) > self.rtol * norms
            if not bool(jnp.any(active)):
                break
            image = self._apply(direction)
            curvature = rowdot(direction, image)
            if bool(jnp.any(active & ~(curvature > 0))):
                raise SingularSystemError(
                    "PreconditionedCG met a direction of non-positive curvature: "
                    "C + damping I is not positive definite (e.g. a Hessian away from a "
                    "minimum) or the preconditioner is not. Use GaussNewton, or increase the "
                    "damping. [reason: singular]"
                )
            step = jnp.where(active, rho / jnp.where(active, curvature, 1.0), 0.0)
            solution = solution + step[:, None] * direction
            residual = residual - step[:, None] * image
            preconditioned = self.preconditioner.solve_flat(residual)
            rho_next = rowdot(residual, preconditioned)
            beta = jnp.where(active, rho_next / jnp.where(active, rho, 1.0), 0.0)
            direction = preconditioned + beta[:, None] * direction
            rho = rho_next
        # The recurrence's residual drifts from the true one in floating point; the
        # reported accuracy is measured with one more pass.
        true_residual = rhs - self._apply(solution)
        self.last_relative_residuals = jnp.linalg.norm(true_residual, axis=1) / jnp.where(
            norms > 0, norms, 1.0
        )
        return solution


@dataclasses.dataclass(frozen=True)
class PreconditionedCG:
    r"""Conjugate gradients on the exact :math:`C + \lambda I`, started from and
    preconditioned by an approximate inverse (EK-FAC by default in practice).

    An approximation :math:`P \approx (C + \lambda I)^{-1}` alone has a fixed error (for
    EK-FAC: the dropped cross-layer blocks and the diagonal in the Kronecker eigenbasis).
    CG on the exact system with :math:`P` as preconditioner removes it: after :math:`k`
    steps the error in the :math:`(C+\lambda I)`-norm shrinks by at least
    :math:`2\big((\sqrt\kappa - 1)/(\sqrt\kappa + 1)\big)^k`, :math:`\kappa` the condition
    number of :math:`P^{1/2}(C+\lambda I)P^{1/2}`, and it is exact after ``p`` steps.
    Each step is one pass over the loader (``q`` curvature-vector products per batch for
    ``q`` right-hand sides) and one application of :math:`P`, plus two passes per solve
    (the starting residual, and the final residual measured afresh and kept in
    ``last_relative_residuals``). Memory: about five ``q × p`` arrays.

    Parameters
    ----------
    preconditioner
        A strategy (``EKFAC(damping)``, ``Arnoldi(...)``); its ``damping`` is the
        :math:`\lambda` of the system solved.
    steps
        CG iterations (passes over the data per solve).
    rtol
        Relative residual at which a row stops early.

    Raises
    ------
    SingularSystemError
        (from ``solve``) if a CG direction has non-positive curvature: :math:`C + \lambda I`
        is not positive definite (a Hessian away from a minimum; use :class:`GaussNewton`).

    Examples
    --------
    >>> import jax.numpy as jnp, equinox as eqx, jax
    >>> from dargmin.influence import EKFAC, ExactInverse, GaussNewton
    >>> model = eqx.nn.MLP(2, 1, 3, 1, key=jax.random.PRNGKey(0))
    >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 2.0]])
    >>> outputs = lambda m, b: jax.vmap(m)(b)
    >>> curvature = GaussNewton(outputs, lambda z, b: 0.5 * jnp.sum(z**2))
    >>> v = jnp.ones((1, 13))
    >>> exact = ExactInverse(0.1).fit(curvature, model, [x]).solve_flat(v)
    >>> refined = PreconditionedCG(EKFAC(0.1), steps=13).fit(curvature, model, [x])
    >>> bool(jnp.allclose(refined.solve_flat(v), exact, rtol=1e-4))
    True
    """

    preconditioner: InverseStrategy
    steps: int = 4
    rtol: float = 1e-10

    def __post_init__(self) -> None:
        if not (isinstance(self.steps, int) and self.steps >= 0):
            raise ValueError(f"steps must be an integer >= 0, got {self.steps!r}.")
        if not (self.rtol >= 0):
            raise ValueError(f"rtol must be >= 0, got {self.rtol!r}.")

    @property
    def damping(self) -> float:
        return float(self.preconditioner.damping)

    def fit(
        self, curvature: Curvature, params: PyTree, loader: Loader
    ) -> PreconditionedCGInverseCurvature:
        """Fit the preconditioner; the CG passes run at each solve."""
        fitted = self.preconditioner.fit(curvature, params, loader)
        return PreconditionedCGInverseCurvature(
            fitted.problem, self.damping, fitted, loader, self.steps, self.rtol
        )
