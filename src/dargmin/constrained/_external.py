"""External QP solvers (Clarabel, OSQP) behind ``jax.pure_callback``: their primal-dual
solution, dargmin's KKT derivative. Imported lazily: both packages are optional."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dargmin.constrained._qp_types import QPData, QPInfo, qp_residuals


@dataclass(frozen=True)
class Clarabel:
    """The Clarabel interior-point solver (``pip install clarabel``), through
    ``jax.pure_callback`` (sequential under ``vmap``). Its duals are used as they are
    (``Px + q + Aᵀz = 0`` is dargmin's sign convention); the derivative is dargmin's.

    Attributes
    ----------
    tol
        Clarabel's ``tol_gap_abs``, ``tol_gap_rel``, ``tol_feas`` (default ``1e-10``).
    """

    tol: float = 1e-10

    def _solve_host(self, Q: Any, q: Any, A: Any, b: Any, G: Any, h: Any) -> tuple:
        import clarabel
        import scipy.sparse as sp

        Q, q, A, b, G, h = (np.asarray(v, dtype=float) for v in (Q, q, A, b, G, h))
        n, p, m = q.size, b.size, h.size
        P = sp.triu(sp.csc_matrix(0.5 * (Q + Q.T))).tocsc()
        K = sp.csc_matrix(np.vstack([A.reshape(p, n), G.reshape(m, n)]))
        cones = []
        if p:
            cones.append(clarabel.ZeroConeT(p))
        if m:
            cones.append(clarabel.NonnegativeConeT(m))
        settings = clarabel.DefaultSettings()
        settings.verbose = False
        settings.tol_gap_abs = settings.tol_gap_rel = settings.tol_feas = self.tol
        settings.tol_ktratio = 1e-8
        solution = clarabel.DefaultSolver(P, q, K, np.concatenate([b, h]), cones, settings).solve()
        z = np.asarray(solution.z)
        ok = str(solution.status) in ("Solved", "AlmostSolved")
        return (
            np.asarray(solution.x),
            z[:p],
            z[p:],
            np.asarray(ok),
            np.asarray(solution.iterations, np.int32),
        )

    def __call__(
        self, Q: jax.Array, q: jax.Array, A: jax.Array, b: jax.Array, G: jax.Array, h: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array, QPInfo]:
        return _external_call(self._solve_host, Q, q, A, b, G, h)


@dataclass(frozen=True)
class OSQP:
    """The OSQP ADMM solver (``pip install osqp``) through ``jax.pure_callback``, with
    polishing on and tightened tolerances (OSQP's defaults, ``1e-3``, leave the KKT
    conditions so loosely met that the derivative check refuses them — rightly).

    Attributes
    ----------
    eps
        OSQP's ``eps_abs`` and ``eps_rel`` (default ``1e-9``).
    """

    eps: float = 1e-9
    max_iter: int = 100_000

    def _solve_host(self, Q: Any, q: Any, A: Any, b: Any, G: Any, h: Any) -> tuple:
        import osqp
        import scipy.sparse as sp

        Q, q, A, b, G, h = (np.asarray(v, dtype=float) for v in (Q, q, A, b, G, h))
        n, p, m = q.size, b.size, h.size
        K = sp.csc_matrix(np.vstack([A.reshape(p, n), G.reshape(m, n)]))
        lower = np.concatenate([b, np.full(m, -np.inf)])
        upper = np.concatenate([b, h])
        solver = osqp.OSQP()
        solver.setup(
            sp.triu(sp.csc_matrix(0.5 * (Q + Q.T))).tocsc(),
            q,
            K,
            lower,
            upper,
            eps_abs=self.eps,
            eps_rel=self.eps,
            polishing=True,
            max_iter=self.max_iter,
            verbose=False,
        )
        result = solver.solve()
        y = np.asarray(result.y)
        ok = "solved" in str(result.info.status).lower()
        return (
            np.asarray(result.x),
            y[:p],
            np.maximum(y[p:], 0.0) if m else y[p:],
            np.asarray(ok),
            np.asarray(result.info.iter, np.int32),
        )

    def __call__(
        self, Q: jax.Array, q: jax.Array, A: jax.Array, b: jax.Array, G: jax.Array, h: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array, QPInfo]:
        return _external_call(self._solve_host, Q, q, A, b, G, h)


def _external_call(
    host: Any, Q: jax.Array, q: jax.Array, A: jax.Array, b: jax.Array, G: jax.Array, h: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, QPInfo]:
    dtype = q.dtype
    shapes = (
        jax.ShapeDtypeStruct(q.shape, dtype),
        jax.ShapeDtypeStruct(b.shape, dtype),
        jax.ShapeDtypeStruct(h.shape, dtype),
        jax.ShapeDtypeStruct((), jnp.bool_),
        jax.ShapeDtypeStruct((), jnp.int32),
    )

    def cast(*arrays: Any) -> tuple:
        x, nu, lam, ok, k = host(*arrays)
        return (
            np.asarray(x, dtype),
            np.asarray(nu, dtype),
            np.asarray(lam, dtype),
            np.asarray(ok, bool),
            np.asarray(k, np.int32),
        )

    x, nu, lam, ok, k = jax.pure_callback(cast, shapes, Q, q, A, b, G, h, vmap_method="sequential")
    primal, dual, gap = qp_residuals(QPData(Q, q, A, b, G, h), x, nu, lam)
    return x, nu, lam, QPInfo(ok, k, primal, dual, gap)
