"""Hypergradients by differentiating through the iterations of a JAX inner solver.

:class:`Unrolled` runs an unrollable solver (:class:`~dargmin.hyper.ProxCD`,
:class:`~dargmin.hyper.FISTA`: anything with ``prepare`` and a ``kernel`` whose
``update`` is the solver's :meth:`~dargmin.hyper.ProxCD.step`) and differentiates the
criterion of its output with respect to ``log_theta`` in forward mode (``jax.jacfwd``
through the ``while_loop`` run to the tolerance) or reverse mode (``jax.grad`` through as
many steps as the solver needed, each checkpointed).
"""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from dargmin.hyper._hypergradients import HypergradientMethod, _bucket, _info
from dargmin.hyper._inner_solvers import (
    FISTA,
    ProxCD,
    _warn_not_converged,
    run_to_tolerance,
)
from dargmin.hyper._registry import register

Array = Any


@partial(jax.jit, static_argnames=("kernel", "datafit", "n_bucket"))
def _unroll(kernel, consts, state0, n_active, datafit, n_bucket):
    """``n_active`` solver steps (of a static budget ``n_bucket``), reverse-differentiable."""

    # Checkpoint each step: the backward pass recomputes it instead of storing its
    # intermediates (for coordinate descent, p coordinate updates per epoch).
    @jax.checkpoint
    def one(state):
        return kernel.update(consts, state, datafit)

    def body(state, i):
        new = one(state)
        # Steps past n_active are the identity: one compiled budget serves all counts.
        keep = i < n_active
        return jax.tree_util.tree_map(lambda a, b: jnp.where(keep, a, b), new, state), None

    state, _ = jax.lax.scan(body, state0, jnp.arange(n_bucket))
    return state


class Unrolled(HypergradientMethod):
    """Differentiate through the solver's iterations (forward or reverse mode).

    Parameters
    ----------
    mode
        ``"forward"`` (``jax.jacfwd`` through the loop run to the solver's tolerance; cost
        grows with the number of hyperparameters) or ``"reverse"`` (``jax.grad`` through
        the same number of steps; memory grows with the number of steps).
    solver
        An unrollable JAX solver, :class:`~dargmin.hyper.ProxCD` (default) or
        :class:`~dargmin.hyper.FISTA`; its ``tol`` sets the number of iterations.

    Examples
    --------
    >>> import numpy as np
    >>> from dargmin.hyper import lasso, HeldOutMSE, hypergradient
    >>> X = np.random.default_rng(0).normal(size=(30, 5)); y = X[:, 0] + 0.1 * X[:, 1]
    >>> m = Unrolled("reverse", FISTA(tol=1e-8))
    >>> hypergradient(lasso(X[:15], y[:15]), HeldOutMSE(X[15:], y[15:]), [-4.0],
    ...               method=m).grad.shape
    (1,)
    """

    mode: str = "reverse"
    solver: Any = ProxCD()

    needs_solution: ClassVar[bool] = False

    def __check_init__(self):
        if self.mode not in ("forward", "reverse"):
            raise ValueError(f"Unrolled mode must be 'forward' or 'reverse', got {self.mode!r}.")
        if not (hasattr(self.solver, "prepare") and hasattr(self.solver, "kernel")):
            raise TypeError(
                f"Unrolled needs a JAX solver with a step (ProxCD or FISTA), got "
                f"{type(self.solver).__name__}."
            )

    def compute(self, problem, criterion, log_theta, w):
        """``(R(θ), ∇R(θ), info)`` with the solver started at ``w`` (a warm start or None)."""
        slv, datafit = self.solver, problem.datafit
        kernel, scale = slv.kernel, problem.grad_scale
        w0 = jnp.zeros(problem.n_coef) if w is None else jnp.asarray(w, dtype=float)
        th0 = jnp.asarray(log_theta)
        label = f"{self.mode}-mode {getattr(slv, 'name', type(slv).__name__)}"
        if self.mode == "forward":

            def pipeline(th):
                consts = slv.prepare(problem, th)
                state0 = kernel.init(consts, w0)
                state, it, viol = run_to_tolerance(
                    kernel, consts, state0, slv.tol * scale, slv._max_iter, datafit
                )
                val = criterion(slv.coef(state), problem)
                return val, (val, slv.coef(state), it, viol)

            grad, (val, w_out, n_it, viol) = jax.jacfwd(pipeline, has_aux=True)(th0)
            n_it = int(n_it)
        else:
            consts0 = slv.prepare(problem, th0)
            state0 = kernel.init(consts0, w0)
            # Unroll as many steps as the solver needs from w0 to reach its tolerance.
            _, n_it, viol = run_to_tolerance(
                kernel, consts0, state0, slv.tol * scale, slv._max_iter, datafit
            )
            n_it = int(n_it)

            def pipeline(th):
                consts = slv.prepare(problem, th)
                state = _unroll(
                    kernel, consts, kernel.init(consts, w0), n_it, datafit, _bucket(n_it, 16)
                )
                return criterion(slv.coef(state), problem), slv.coef(state)

            (val, w_out), grad = jax.value_and_grad(pipeline, has_aux=True)(th0)
        kkt = float(viol) / scale
        if kkt > slv.tol:
            _warn_not_converged(label, kkt, slv.tol, n_it, log_theta)
        w_out = np.asarray(w_out)
        s = int(np.count_nonzero(w_out)) if problem.l1 is not None else problem.n_coef
        return float(val), np.asarray(grad), _info(support_size=s, coef=w_out, n_iter=n_it)


def _unrolled_solver(unrolled: str = "cd", tol: float = 1e-10, max_iter: int = 10_000):
    table = {
        "cd": lambda: ProxCD(tol=tol, max_epochs=max_iter),
        "fista": lambda: FISTA(tol=tol, max_iter=max_iter),
        "ista": lambda: FISTA(tol=tol, max_iter=max_iter, accelerated=False, name="ista"),
    }
    if unrolled not in table:
        raise ValueError(
            f"unrolled must be 'cd', 'ista' or 'fista', got {unrolled!r} (or pass "
            "method=Unrolled(mode, solver) with a ProxCD or FISTA solver)."
        )
    return table[unrolled]()


def _unrolled_factory(mode: str):
    def factory(problem, unrolled="cd", tol=1e-10, max_iter=10_000, **_):
        return Unrolled(mode, _unrolled_solver(unrolled, tol, max_iter))

    return factory


register("method", "forward", _unrolled_factory("forward"))
register("method", "reverse", _unrolled_factory("reverse"))
