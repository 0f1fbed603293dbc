"""The support systems of ``dargmin.hyper``: ``H_SS X = B``, one at a time
(:func:`_support_solve`) or all CV folds at once. A Cholesky factorization on the host
(:func:`_cholesky_solve_folds_host`: SciPy, nothing to compile) on one device; through the
linear-system layer, vmapped and spread over the JAX devices, on several
(:data:`_cholesky_solve_folds`, :func:`_place_folds`); a singular system gets the
minimum-norm (pseudo-inverse) solution, on the host.

Split from :mod:`dargmin.hyper._hypergradients`, whose methods and whose degrees of freedom
(:mod:`dargmin.hyper._dof`) call these solves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

from dargmin.diagnostics import SingularSystemError
from dargmin.hyper._problems import HyperProblem
from dargmin.linear_solvers import Cholesky, factorize

_COND_MAX = 1e12  # condition number above which a support system counts as singular
_RCOND = 1e-10  # relative eigenvalue cutoff of the minimum-norm (pseudo-inverse) solve


#: Spread the CV folds' batched support solves over the JAX devices when there are several
#: (a ``NamedSharding`` of the fold axis); ``False`` keeps them on the default device.
SHARD_FOLDS = True


def _place_folds(*arrays: np.ndarray) -> tuple[Any, ...]:
    """The fold-stacked arrays, sharded along their first axis over all JAX devices when
    there are several (padded with identity systems to a multiple of the device count);
    as they are otherwise."""
    n_dev = jax.device_count()
    if not SHARD_FOLDS or n_dev == 1:
        return arrays
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    k = arrays[0].shape[0]
    extra = (-k) % n_dev
    mesh = Mesh(np.array(jax.devices()), ("folds",))
    placed = []
    for i, a in enumerate(arrays):
        if extra:
            # Identity systems with zero right-hand sides: well posed, solution 0.
            fill = (
                np.broadcast_to(np.eye(a.shape[1]), (extra, *a.shape[1:]))
                if i == 0
                else (np.zeros((extra, *a.shape[1:])))
            )
            a = np.concatenate([a, fill])
        placed.append(jax.device_put(a, NamedSharding(mesh, PartitionSpec("folds"))))
    return tuple(placed)


class SupportSolve(NamedTuple):
    """Solution of a support system ``H X = B`` by :func:`_support_solve`."""

    x: np.ndarray
    rank: int
    note: str | None


def _padded_size(s: int) -> int:
    """The bucketed size of a support system (powers of 4 from 16): each compiled size
    costs about a second."""
    sp = 16
    while sp < s:
        sp *= 4
    return sp


def _padded(H: np.ndarray, B: np.ndarray, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``H`` bordered by ``c·I`` (``c`` its mean diagonal) and ``B`` by zero rows, to a
    bucketed size (or ``size``): the padding block is decoupled, well scaled, and its
    solution is 0."""
    s = H.shape[0]
    sp = _padded_size(s) if size is None else size
    c = max(float(np.mean(np.abs(np.diag(H)))), 1e-300) if s else 1.0
    Hp = np.eye(sp) * c
    Hp[:s, :s] = H
    Bp = np.zeros((sp, B.shape[1]))
    Bp[:s] = B
    # NumPy arrays: the jitted solves transfer them directly (jnp.asarray would first run
    # an eager conversion, about half a millisecond each under load).
    return Hp, Bp


def _cholesky_solve_impl(H: jax.Array, B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cholesky through the linear-system layer; ``(X, cond)`` with the cheap lower bound
    ``(max/min diagonal of the factor)²`` of ``cond(H)`` (``inf`` when it failed)."""
    op = lx.MatrixLinearOperator(H, lx.positive_semidefinite_tag)
    system = factorize(op, Cholesky(), context="hypergradient support solve")
    # The factors' own solve, unchecked: failure is judged here (a NaN factor, or the
    # condition estimate), and a singular system falls back to the minimum-norm solve.
    # (Going through ``lx.linear_solve`` doubled the compile time of this small system.)
    solver, state = system.unchecked_solver()
    X = jax.vmap(lambda b: solver.compute(state, b, {})[0], in_axes=1, out_axes=1)(B)
    diag = jnp.abs(jnp.diag(state[0]))
    cond = (jnp.max(diag) / jnp.min(diag)) ** 2
    bad = ~jnp.all(jnp.isfinite(X)) | ~jnp.isfinite(cond)
    return X, jnp.where(bad, jnp.inf, cond)


def _cholesky_solve_folds_host(
    Hs: Sequence[np.ndarray], Bs: Sequence[np.ndarray]
) -> tuple[list[np.ndarray], np.ndarray]:
    """:data:`_cholesky_solve_folds` on the host, for one device: the same factorization,
    solve and condition bound, in NumPy/SciPy, on systems of any sizes (unpadded: the
    padding to a common bucketed size is for the compiled solve; a support of 130 padded to
    256 cost 7x the flops).

    Why not the linear-system layer here: its jitted solve is compiled once per padded
    size (16, 64, 256, …), and that compilation was most of a first fit (make_regression
    300x1000: 0.9 s of 1.1 s; first fit / LassoCV 4.4x → 1.0x), while these systems are a
    few dozen unknowns that LAPACK solves in well under a millisecond either way. Several
    devices keep the sharded JAX solve through the layer (:data:`_cholesky_solve_folds`);
    a singular system gets :func:`_min_norm_solve_host`."""
    import scipy.linalg

    X: list[np.ndarray] = []
    cond = np.empty(len(Hs))
    for k, (H, B) in enumerate(zip(Hs, Bs, strict=True)):
        try:
            chol = scipy.linalg.cho_factor(H, lower=True, check_finite=False)
        except np.linalg.LinAlgError:
            X.append(np.full(np.shape(B), np.nan))
            cond[k] = np.inf
            continue
        X.append(scipy.linalg.cho_solve(chol, B, check_finite=False))
        diag = np.abs(np.diag(chol[0]))
        cond[k] = (diag.max() / diag.min()) ** 2 if diag.min() > 0 else np.inf
        if not (np.all(np.isfinite(X[k])) and np.isfinite(cond[k])):
            cond[k] = np.inf
    return X, cond


#: The support systems of all the CV folds in one call (a leading fold axis): one dispatch
#: per evaluation instead of one per fold, and the axis that spreads over devices.
_cholesky_solve_folds = jax.jit(jax.vmap(_cholesky_solve_impl))


def _solve_folds(
    Hs: Sequence[np.ndarray], Bs: Sequence[np.ndarray]
) -> tuple[list[np.ndarray], np.ndarray]:
    """``(X, cond)`` of the folds' support systems ``Hs[k] X[k] = Bs[k]``: the sharded JAX
    solve (:data:`_cholesky_solve_folds` on :func:`_place_folds`, the systems padded to one
    bucketed size) when there are several devices and :data:`SHARD_FOLDS`, else the host
    one (:func:`_cholesky_solve_folds_host`, unpadded)."""
    if SHARD_FOLDS and jax.device_count() > 1:
        size = _padded_size(max(H.shape[0] for H in Hs))
        padded = [_padded(H, B, size) for H, B in zip(Hs, Bs, strict=True)]
        Hp, Bp = np.stack([h for h, _ in padded]), np.stack([b for _, b in padded])
        with jax.enable_x64(True):
            X, cond = _cholesky_solve_folds(*_place_folds(Hp, Bp))
        X = np.asarray(X)
        return [X[k, : H.shape[0]] for k, H in enumerate(Hs)], np.asarray(cond)
    return _cholesky_solve_folds_host(Hs, Bs)


def _min_norm_solve_host(H: np.ndarray, B: np.ndarray) -> tuple[np.ndarray, int]:
    """Minimum-norm solution of ``H X = B`` for a symmetric positive semi-definite ``H``,
    the pseudo-inverse from its eigendecomposition with the relative cutoff ``_RCOND``
    (the cutoff of the layer's :class:`~dargmin.linear_solvers.LeastSquares`, whose
    singular values are these eigenvalues' magnitudes); ``(X, rank)``.

    On the host for the reason of :func:`_cholesky_solve_folds_host`: the layer's compiled
    solve cost 0.47 s of compilation on the first fit of diabetes with degree-2 features
    (a duplicated column, two support sizes), 80 % of that fit, for systems of a few dozen
    unknowns."""
    import scipy.linalg

    eig, V = scipy.linalg.eigh(H, check_finite=False)
    keep = np.abs(eig) > _RCOND * max(float(np.max(np.abs(eig), initial=0.0)), 1e-300)
    Vk = V[:, keep]
    return Vk @ ((Vk.T @ B) / eig[keep][:, None]), int(np.count_nonzero(keep))


def _support_solve(H: np.ndarray, B: np.ndarray, problem: HyperProblem, mu: Any = None):
    """Solve ``H X = B`` for a support Hessian ``H = X_Sᵀ D X_S + diag(μ_S)``.

    The one place where ``dargmin.hyper`` solves a support system (hypergradients, degrees
    of freedom): a well-conditioned ``H`` is solved by a host Cholesky factorization
    (:func:`_cholesky_solve_folds_host`). A singular ``H`` with no ℓ2 term on the
    support (``mu`` zero: duplicate or collinear active columns) gets the minimum-norm
    solution (:func:`_min_norm_solve_host`: pseudo-inverse, relative cutoff ``1e-10``),
    provided ``B`` lies in the range of ``H`` (always so for right-hand sides that are
    functions of the predictions of duplicated columns, since null(H) = null(X_S)); the
    returned note reports the rank. Otherwise a :class:`~dargmin.SingularSystemError` is
    raised.

    Returns
    -------
    SupportSolve
        ``(x, rank, note)``.

    Examples
    --------
    >>> import numpy as np
    >>> from dargmin.hyper import lasso
    >>> H = np.array([[1.0, 1.0], [1.0, 1.0]])          # a duplicated active column
    >>> sol = _support_solve(H, np.array([2.0, 2.0]), lasso(np.eye(2), np.ones(2)))
    >>> sol.x.round(6).tolist(), sol.rank             # the minimum-norm solution
    ([1.0, 1.0], 1)
    """
    s = H.shape[0]
    vector = B.ndim == 1
    B2 = B[:, None] if vector else B
    H64, B64 = np.asarray(H, dtype=np.float64), np.asarray(B2, dtype=np.float64)
    X, conds = _cholesky_solve_folds_host([H64], [B64])
    cond = float(conds[0])
    if cond < _COND_MAX:
        x = X[0]
        return SupportSolve(x[:, 0] if vector else x, s, None)
    pure_l1 = mu is None or not np.any(np.asarray(mu) > 0)
    if not pure_l1:
        raise SingularSystemError(
            f"The {problem.name} Hessian restricted to the support (|S| = {s}, n = "
            f"{problem.n_samples}) is singular or nearly so (condition number >= "
            f"{cond:.3g}). The derivative is numerically unreliable (|S| > n or collinear "
            "active features with a vanishing ℓ2 term); increase the penalty or the ℓ2 "
            "term."
        )
    x, r = _min_norm_solve_host(H64, B64)
    resid = np.linalg.norm(H @ x - B2) / max(float(np.linalg.norm(B2)), 1e-300)
    if resid <= 1e-6:
        note = (
            f"the {problem.name} support Hessian is rank-deficient (rank {r} of |S| = "
            f"{s}: duplicate or collinear active columns); the inner solution is not "
            "unique but its prediction is, and the minimum-norm solution of the "
            "consistent support system was used"
        )
        return SupportSolve(x[:, 0] if vector else x, r, note)
    raise SingularSystemError(
        f"The {problem.name} Hessian restricted to the support is singular (|S| = {s}, "
        f"rank {r}, n = {problem.n_samples}) and the right-hand side is not in its range "
        f"(relative residual {resid:.2g}): the criterion depends on which of the "
        "non-unique inner solutions is returned, so its hypergradient is undefined. Use a "
        "criterion of the predictions Xŵ, increase the penalty, drop duplicated columns "
        "or add an ℓ2 term."
    )
