"""Choice of the linear solver for the implicit system ``(∂ₓg) ẋ = -(∂θg) θ̇``.

All solvers are lineax solvers, so that the linear solve is differentiable and transposable
(reverse mode comes from transposing the forward rule). This module only maps user-facing
names to lineax objects and decides a default from the structure of the problem.

==============  =========================================  ==================================
name            lineax solver                              use when
==============  =========================================  ==================================
``"cholesky"``  :class:`lineax.Cholesky` (dense)           SPD Hessian (a strict minimum)
``"lu"``        :class:`lineax.LU` (dense)                 any square non-singular system
``"cg"``        :class:`lineax.CG` (matrix-free)           large SPD Hessian
``"gmres"``     :class:`lineax.GMRES` (matrix-free)        large non-symmetric / indefinite
``"bicgstab"``  :class:`lineax.BiCGStab` (matrix-free)     large non-symmetric
``"lstsq"``     :class:`lineax.SVD` (dense, pseudo-inv.)   singular / rank-deficient systems
``"lsmr"``      :class:`lineax.LSMR` (matrix-free)         large singular / least squares
``"qr"``        :class:`lineax.QR` (dense)                 full-rank rectangular / square
``"minres"``    :class:`dargmin.krylov.MINRES` (m.-free)   large symmetric indefinite
==============  =========================================  ==================================

``"auto"``: dense when the unknown has at most ``dense_max_size`` entries (Cholesky for a
symmetric positive-definite system, LU otherwise), matrix-free beyond (CG / GMRES).
lineax ships no MINRES, so ``"minres"`` is dargmin's own (:mod:`dargmin.krylov`), written on
lineax's solver interface so that it transposes and differentiates like the others.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import lineax as lx

from dargmin.krylov import MINRES

SolverName = Literal[
    "auto", "cholesky", "lu", "cg", "gmres", "bicgstab", "lstsq", "lsmr", "qr", "minres"
]

#: Above this many unknowns, ``"auto"`` switches from dense factorizations to Krylov
#: methods (building the dense matrix costs one Jacobian-vector product per unknown).
DENSE_MAX_SIZE = 200

_NAMES = ("auto", "cholesky", "lu", "cg", "gmres", "bicgstab", "lstsq", "lsmr", "qr", "minres")


def two_norm(tree: object) -> jax.Array:
    """Euclidean norm of a pytree of arrays, the stopping norm of our Krylov solvers.

    lineax's default (the max norm) made CG stall for thousands of iterations on a
    well-conditioned 10 000-unknown Hessian when the right-hand side lay in a
    low-dimensional subspace; the 2-norm stops where the textbook criterion says.

    Examples
    --------
    >>> float(two_norm({"a": jnp.array([3.0]), "b": jnp.array([4.0])}))
    5.0
    """
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.abs(leaf) ** 2) for leaf in leaves))


def make_linear_solver(
    name: str | lx.AbstractLinearSolver,
    *,
    size: int,
    symmetric_positive_definite: bool,
    rtol: float,
    atol: float,
    max_steps: int | None = None,
    dense_max_size: int = DENSE_MAX_SIZE,
) -> lx.AbstractLinearSolver:
    """Return the lineax solver for ``name`` (or ``name`` itself if already a solver).

    Parameters
    ----------
    name
        One of ``"auto", "cholesky", "lu", "cg", "gmres", "bicgstab", "lstsq", "lsmr", "qr"``
        or a :class:`lineax.AbstractLinearSolver` instance.
    size
        Number of unknowns (entries of ``x``), used by ``"auto"``.
    symmetric_positive_definite
        Whether the system matrix is known to be SPD (true for ``argmin``).
    rtol, atol
        Tolerances of the iterative solvers.
    max_steps
        Iteration cap of the iterative solvers (default ``10 * size``).

    Examples
    --------
    >>> make_linear_solver("auto", size=10, symmetric_positive_definite=True,
    ...                    rtol=1e-10, atol=1e-10)
    Cholesky()
    """
    if isinstance(name, lx.AbstractLinearSolver):
        return name
    if not isinstance(name, str) or name not in _NAMES:
        raise ValueError(
            f"Unknown linear_solver {name!r}. Choose one of {', '.join(_NAMES)} "
            "or pass a lineax.AbstractLinearSolver instance."
        )
    if max_steps is None:
        max_steps = max(10 * size, 100)
    if name == "auto":
        if size <= dense_max_size:
            name = "cholesky" if symmetric_positive_definite else "lu"
        else:
            name = "cg" if symmetric_positive_definite else "gmres"
    if name == "cholesky":
        return lx.Cholesky()
    if name == "lu":
        return lx.LU()
    if name == "qr":
        return lx.QR()
    if name == "lstsq":
        return lx.SVD()
    if name == "cg":
        return lx.CG(rtol=rtol, atol=atol, norm=two_norm, max_steps=max_steps)
    if name == "gmres":
        return lx.GMRES(
            rtol=rtol, atol=atol, norm=two_norm, max_steps=max_steps, restart=min(size, 50)
        )
    if name == "bicgstab":
        return lx.BiCGStab(rtol=rtol, atol=atol, norm=two_norm, max_steps=max_steps)
    if name == "minres":
        return MINRES(rtol=rtol, atol=atol, max_steps=max_steps)
    return lx.LSMR(rtol=rtol, atol=atol, max_steps=max_steps)


def needs_symmetric_tag(solver: lx.AbstractLinearSolver) -> bool:
    """Whether ``solver`` requires a symmetric operator (MINRES, and the SPD solvers).

    Examples
    --------
    >>> needs_symmetric_tag(MINRES(rtol=1e-8, atol=1e-8))
    True
    """
    return isinstance(solver, MINRES) or needs_spd_tags(solver)


def needs_spd_tags(solver: lx.AbstractLinearSolver) -> bool:
    """Whether ``solver`` requires the operator to be tagged symmetric positive (semi)definite.

    Examples
    --------
    >>> needs_spd_tags(lx.CG(rtol=1e-8, atol=1e-8))
    True
    """
    return isinstance(solver, lx.Cholesky | lx.CG)
