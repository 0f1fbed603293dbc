"""Implicit differentiation of the primal-dual fixed point ``(ŵ, p̂)`` of Chambolle–Pock,
through :func:`dargmin.fixed_point` (its linear-system layer and its diagnosis)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jax import Array

from dargmin.imaging._checks import warn_if_unconverged
from dargmin.imaging._iteration import PDState, _pd_step
from dargmin.imaging._problem import RestorationProblem
from dargmin.imaging._solver import ChambollePock, _solve_core, _steps
from dargmin.implicit import fixed_point


def pd_fixed_point_map(
    problem: RestorationProblem, solver: ChambollePock | None = None
) -> Callable[[tuple[Array, Array], Array, Array], tuple[Array, Array]]:
    """``T((w, p), θ, y)``: one primal-dual step with the initial step sizes, whose fixed
    points are the saddle points ``(ŵ, p̂)``: ``p = prox_{σF*}(p + σDw)``,
    ``w = prox_{τG}(w − τDᵀp)``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from dargmin.imaging import tv_denoising
    >>> T = pd_fixed_point_map(tv_denoising())
    >>> y = jnp.ones((3, 3))                              # a constant image is its own TV fit
    >>> w, p = T((y, jnp.zeros((2, 3, 3))), jnp.array([0.1]), y)
    >>> bool(jnp.allclose(w, y))
    True
    """
    cfg = solver or ChambollePock()

    def T(z: tuple[Array, Array], theta: Array, y: Array) -> tuple[Array, Array]:
        w, p = z
        tau, sig = _steps(problem, cfg, w.dtype)
        s = _pd_step(problem, PDState(w, w, p), theta, y, tau, sig, 0.0)
        return s.w, s.p

    return T


def implicit_solver(
    problem: RestorationProblem,
    solver: ChambollePock | None = None,
    **fixed_point_options: Any,
) -> Callable[[Any, Any], Array]:
    """``(θ, y) ↦ ŵ`` differentiable by implicit differentiation of the primal-dual fixed
    point (:func:`dargmin.fixed_point` on :func:`pd_fixed_point_map`).

    The derivative solves ``(I − ∂_z T) ż = ∂_{θ,y}T · (θ̇, ẏ)`` at ``z = (ŵ, p̂)``. It
    exists where ``F_θ*`` is twice differentiable at ``p̂`` and ``Dᵀ`` is injective on the
    dual directions left free (e.g. the 1-D fused lasso, ``D`` of full row rank). For 2-D
    total variation the dual solution is not unique (``Dᵀ = −div`` has a kernel) and the
    system is singular but consistent: a dense solve (the default on small images)
    refuses it (``[reason: singular]``); ``linear_solver="lstsq"``, the minimum-norm solve,
    warns with the rank it used, and its ``w`` part is the derivative (measured against
    finite differences of re-solves, ``tests/test_imaging_adversarial.py``).

    Bad input is refused as by :func:`~dargmin.imaging.solve` (also under ``jax.jit``,
    ``jax.vmap``, ``jax.jacfwd``); a solve stopped by ``max_iter`` warns with its gap, and
    its derivative is refused by :func:`dargmin.fixed_point`'s check (``not_stationary``).

    Examples
    --------
    >>> import jax, numpy as np
    >>> from dargmin.imaging import generalized_lasso
    >>> prob = generalized_lasso(np.diff(np.eye(6), axis=0))
    >>> y = np.array([0.0, 0.05, 0.0, 2.0, 2.05, 2.0])
    >>> f = implicit_solver(prob, ChambollePock(tol=1e-6))
    >>> dw = jax.jacfwd(f)(np.array([0.2]), y)        # two flat pieces: ±θ/3
    >>> np.round(np.asarray(dw).ravel(), 4).tolist()
    [0.3333, 0.3333, 0.3333, -0.3333, -0.3333, -0.3333]
    """
    cfg = solver or ChambollePock()
    T = pd_fixed_point_map(problem, cfg)

    @fixed_point(T, **fixed_point_options)
    def _fixed_point_solve(init: Any, theta: Array, y: Array) -> tuple[Array, Array]:
        res = _solve_core(problem, cfg, y, theta, None, None, None, None, None, None)
        z = warn_if_unconverged(
            "implicit_solver", res.converged, res.gap, res.primal, res.n_iter, cfg.tol
        )
        return res.w + z, res.p + z

    def f(theta: Any, y: Any) -> Array:
        # The refusals of solve (shapes, NaN pixels, θ ≤ 0), also under jit / vmap / jacfwd.
        y_, th = problem.check(y, theta, "implicit_solver")
        return _fixed_point_solve(None, th, y_)[0]

    return f
