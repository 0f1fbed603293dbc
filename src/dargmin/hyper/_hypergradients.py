"""Hypergradients ``∇R(θ) = (dŵ/dθ)ᵀ ∇C(ŵ)``: method objects and :func:`hypergradient`.

A hypergradient method is a small immutable object with one method,
``compute(problem, criterion, log_theta, w) -> (value, gradient, info)``; adding a method
is adding one class (and, optionally, a name in :data:`~dargmin.hyper.REGISTRY`).

:class:`ImplicitSupport` (``"implicit"``)
    Implicit function theorem. With an ℓ1 term the optimality condition is differentiable
    on the support ``S`` and ``dŵ_{S^c}/dθ = 0``; on ``S`` (Bertrand et al., 2020, 2022)

    .. math::

        H_{SS}\\,\\frac{d\\hat w_S}{d\\theta}
            = -\\Big(\\operatorname{sign}(\\hat w_S)\\,\\frac{d\\lambda_S}{d\\theta}
              + \\hat w_S\\,\\frac{d\\mu_S}{d\\theta}\\Big),
        \\qquad H_{SS} = X_S^\\top \\operatorname{diag}(\\ell'') X_S + \\operatorname{diag}(\\mu_S),

    so one ``|S| × |S|`` adjoint solve ``H_{SS} v = ∇_S C`` gives the hypergradient. When
    ``H_SS`` is singular without an ℓ2 term (duplicate or collinear active columns) the
    Lasso solution is not unique but its prediction ``Xŵ`` is, and the system is consistent
    for prediction-based criteria (the KKT conditions put ``sign(ŵ_S)`` in the range of
    ``X_Sᵀ``): the minimum-norm solution gives the hypergradient, and ``info`` says so.
:class:`ImplicitForward` (``"implicit_forward"``)
    The same Jacobian obtained by iterating the linearized proximal coordinate descent
    sweep at ``ŵ`` restricted to ``S`` (a Gauss-Seidel iteration on the system above).
:class:`~dargmin.hyper.Unrolled` (``"forward"``, ``"reverse"``)
    Forward- or reverse-mode differentiation through the iterations (``step``) of a JAX
    inner solver.

All agree for smooth problems and, for ℓ1 problems, away from support changes.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from dargmin.diagnostics import DargminWarning
from dargmin.hyper._penalty_maps import _penalty_vectors
from dargmin.hyper._problems import HyperProblem, Quadratic, _host_method
from dargmin.hyper._registry import register
from dargmin.hyper._support_solve import (
    _COND_MAX,
    SupportSolve,
    _solve_folds,
    _support_solve,
)
from dargmin.implicit import argmin

Array = Any
#: The historical method names (see :data:`~dargmin.hyper.REGISTRY` for all of them).
METHODS = ("implicit", "implicit_forward", "forward", "reverse")


# ---------------------------------------------------------------------- shared pieces
def _criterion_grad(criterion, problem: HyperProblem, w: np.ndarray) -> tuple[float, np.ndarray]:
    val, g = criterion.value_and_grad(w, problem)
    val = float(val)
    if not np.isfinite(val):
        raise FloatingPointError(
            f"The criterion is not finite at the inner solution ({val}); check the "
            "validation data and the scale of the targets."
        )
    return val, np.asarray(g, dtype=float)


def _penalties_np(problem: HyperProblem, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return problem.penalties_host(theta)


def _support(problem: HyperProblem, w: np.ndarray, l1: np.ndarray) -> np.ndarray:
    # Unpenalized coordinates (λ = 0, e.g. the intercept column) are smooth and always free.
    return np.flatnonzero((w != 0) | (l1 == 0))


def _restricted_hessian(problem: HyperProblem, w: np.ndarray, S: np.ndarray, l2: np.ndarray):
    XS = problem.design[:, S]
    if type(problem.datafit) is Quadratic:
        # ℓ'' = 1/n everywhere: no prediction, no weighted copy of X_S (a quarter of the
        # time of a 5-fold hypergradient of LassoHyperCV on make_regression 300x1000).
        n = problem.n_samples
        d = np.full(n, 1.0 / n)
        H = XS.T @ XS
        H /= n
    else:
        d = problem.datafit.hess_diag_host(problem.design @ w, problem.target)
        H = XS.T @ (d[:, None] * XS)
    H[np.diag_indices_from(H)] += l2[S]
    return H, XS, d


class _SupportSystem(NamedTuple):
    """One fold's support system ``H v = ∇_S C`` before its solve, and how to finish."""

    problem: HyperProblem
    log_theta: np.ndarray
    w: np.ndarray
    value: float
    l2: np.ndarray
    S: np.ndarray
    H: np.ndarray
    rhs: np.ndarray

    @classmethod
    def build(cls, problem, criterion, log_theta, w) -> _SupportSystem:
        l1, l2 = _penalties_np(problem, log_theta)
        val, gC = _criterion_grad(criterion, problem, w)
        S = _support(problem, w, l1)
        H = _restricted_hessian(problem, w, S, l2)[0] if S.size else np.zeros((0, 0))
        return cls(problem, log_theta, w, val, l2, S, H, gC[S])

    def finish(self, sol: SupportSolve) -> tuple[float, np.ndarray, dict]:
        """``(R, ∇R, info)`` from the adjoint ``v``:
        ``∇R = −(dλ_S/dθ)ᵀ(sign ŵ_S ⊙ v) − (dμ_S/dθ)ᵀ(ŵ_S ⊙ v)``."""
        prob, S, w = self.problem, self.S, self.w
        c_l1, c_l2 = np.zeros(prob.n_coef), np.zeros(prob.n_coef)
        c_l1[S] = -sol.x * np.sign(w[S])
        c_l2[S] = -sol.x * w[S]
        grad = prob.penalty_vjp(self.log_theta, c_l1, c_l2)
        return self.value, grad, _info(sol.rank, sol.note, support_size=S.size)


def _bucket(k: int, minimum: int = 8) -> int:
    # Pad dynamic sizes to powers of two so jit compiles O(log p) variants, not one per |S|.
    return max(minimum, 1 << (int(k) - 1).bit_length())


def _info(support_rank: int | None = None, note: str | None = None, **extra: Any) -> dict:
    return {"support_rank": support_rank, "notes": [] if note is None else [note], **extra}


# ---------------------------------------------------------------------- methods
class HypergradientMethod(eqx.Module):
    """Base class of hypergradient methods.

    Subclasses implement :meth:`compute`. ``needs_solution`` tells :func:`hypergradient`
    whether ``w`` is the converged inner solution (implicit methods) or only a warm start
    (unrolled methods, which run their own solver). ``info`` must hold ``support_size``
    (and, for methods that run their own solver, ``coef`` and ``n_iter``).

    Examples
    --------
    >>> import numpy as np
    >>> from dargmin.hyper import lasso, HeldOutMSE, hypergradient
    >>> class Frozen(HypergradientMethod):        # a (useless) method: zero gradient
    ...     def compute(self, problem, criterion, log_theta, w):
    ...         value, _ = criterion.value_and_grad(w, problem)
    ...         return value, np.zeros(problem.n_hyper), {"support_size": 0}
    >>> X = np.random.default_rng(0).normal(size=(20, 3)); y = X[:, 0]
    >>> hypergradient(lasso(X[:10], y[:10]), HeldOutMSE(X[10:], y[10:]), [-3.0],
    ...               method=Frozen()).grad.tolist()
    [0.0]
    """

    needs_solution: ClassVar[bool] = True

    def compute(
        self, problem: HyperProblem, criterion: Any, log_theta: np.ndarray, w: np.ndarray
    ) -> tuple[float, np.ndarray, dict]:
        """``(R(θ), ∇R(θ), info)``; ``info`` holds ``support_size`` among others."""
        raise NotImplementedError


def _smooth_ift_vjp(theta, w, g_crit, X, y, datafit, l1, l2, p, augmented):
    """``(dŵ/dθ)ᵀ ∇C`` for a smooth inner problem, through :func:`dargmin.argmin`."""

    def objective(ww, th):
        _, mu = _penalty_vectors(th, l1, l2, p, augmented)
        return datafit.value(X @ ww, y) + 0.5 * jnp.sum(mu * ww**2)

    # The inner solution is already computed; argmin attaches the IFT derivative to it (and
    # checks stationarity and the Hessian before returning a derivative).
    solution = argmin(objective)(lambda init, th: w)
    _, vjp = jax.vjp(lambda th: solution(None, th), theta)
    return vjp(g_crit)[0]


_smooth_ift_vjp_jit = jax.jit(
    _smooth_ift_vjp, static_argnames=("datafit", "l1", "l2", "p", "augmented")
)


class ImplicitSupport(HypergradientMethod):
    """Implicit differentiation on the support: one ``|S| × |S|`` adjoint solve.

    .. math::

        \\nabla R = -\\Big(\\frac{d\\lambda_S}{d\\theta}\\Big)^{\\!\\top}
            (\\operatorname{sign}\\hat w_S \\odot v)
            - \\Big(\\frac{d\\mu_S}{d\\theta}\\Big)^{\\!\\top}(\\hat w_S \\odot v),
        \\qquad H_{SS} v = \\nabla_S C .

    Parameters
    ----------
    smooth_backend
        For smooth problems (no ℓ1 term): ``"support"`` solves the dense system with the
        same code (the "support" is every coordinate); ``"argmin"`` differentiates through
        :func:`dargmin.argmin` (with its stationarity checks, compiled per problem size).

    Examples
    --------
    >>> import numpy as np
    >>> from dargmin.hyper import lasso, HeldOutMSE, hypergradient
    >>> X = np.random.default_rng(0).normal(size=(30, 5)); y = X[:, 0] + 0.1 * X[:, 1]
    >>> hg = hypergradient(lasso(X[:15], y[:15]), HeldOutMSE(X[15:], y[15:]), [np.log(0.01)],
    ...                    method=ImplicitSupport())
    >>> hg.grad.shape
    (1,)
    """

    smooth_backend: str = "support"

    def __check_init__(self):
        if self.smooth_backend not in ("support", "argmin"):
            raise ValueError(
                f"smooth_backend must be 'support' or 'argmin', got {self.smooth_backend!r}."
            )

    @_host_method
    def compute(self, problem, criterion, log_theta, w):
        """``(R(θ), ∇R(θ), info)`` at the inner solution ``w``."""
        if problem.smooth and self.smooth_backend == "argmin":
            return self._argmin(problem, criterion, log_theta, w)
        sys_ = _SupportSystem.build(problem, criterion, log_theta, w)
        if sys_.S.size == 0:
            # ŵ = 0 strictly inside the zero region: locally constant, the hypergradient is 0.
            return sys_.value, np.zeros(problem.n_hyper), _info(0, support_size=0)
        return sys_.finish(_support_solve(sys_.H, sys_.rhs, problem, mu=sys_.l2[sys_.S]))

    @_host_method
    def compute_folds(self, pairs, log_theta, ws) -> list[tuple[float, np.ndarray, dict]]:
        """:meth:`compute` for the CV folds ``pairs`` (``(problem, criterion)``) at their
        solutions ``ws``, with the support systems solved in one batched call.

        The systems are padded to a common size and solved by a Cholesky factorization
        per fold on the host (NumPy/SciPy: nothing to compile); when several JAX devices
        exist (and :data:`SHARD_FOLDS`), by one vmapped JAX factorization with the fold
        axis sharded over them. A fold whose system is (nearly) singular is
        re-solved alone by :func:`_support_solve` (minimum-norm solution or a clear error).
        """
        if any(p.smooth for p, _ in pairs) and self.smooth_backend == "argmin":
            return [self.compute(p, c, log_theta, w) for (p, c), w in zip(pairs, ws, strict=True)]
        systems = [
            _SupportSystem.build(p, c, log_theta, w) for (p, c), w in zip(pairs, ws, strict=True)
        ]
        active = [k for k, sy in enumerate(systems) if sy.S.size]
        out: list[Any] = [
            (sy.value, np.zeros(sy.problem.n_hyper), _info(0, support_size=0)) for sy in systems
        ]
        if not active:
            return out
        X, cond = _solve_folds(
            [systems[k].H for k in active], [systems[k].rhs[:, None] for k in active]
        )
        for i, k in enumerate(active):
            sy = systems[k]
            if cond[i] < _COND_MAX:
                sol = SupportSolve(X[i][:, 0], sy.S.size, None)
            else:
                sol = _support_solve(sy.H, sy.rhs, sy.problem, mu=sy.l2[sy.S])
            out[k] = sy.finish(sol)
        return out

    def _argmin(self, problem, criterion, theta, w):
        val, gC = _criterion_grad(criterion, problem, w)
        # Jitted only when float64 is enabled globally: under a local ``jax.enable_x64``
        # context the host callback of dargmin's optimality check returns float32.
        x64 = bool(jax.config.jax_enable_x64)  # type: ignore[attr-defined]
        fn = _smooth_ift_vjp_jit if x64 else _smooth_ift_vjp
        grad = fn(
            jnp.asarray(theta),
            jnp.asarray(w),
            jnp.asarray(gC),
            jnp.asarray(problem.design),
            jnp.asarray(problem.target),
            problem.datafit,
            problem.l1,
            problem.l2,
            problem.n_features,
            problem.augmented,
        )
        return val, np.asarray(grad), _info(support_size=problem.n_coef)


@jax.jit
def _gauss_seidel(XST, d, L, l2S, R, tol, max_iter):
    """Iterate ``Jⱼ ← Jⱼ − ((H J)ⱼ + Rⱼ)/Lⱼ`` sweeping ``j`` over the (padded) support."""
    J0 = jnp.zeros_like(R)
    DZ0 = jnp.zeros((XST.shape[1], R.shape[1]), R.dtype)  # diag(ℓ'') X_S J, kept updated

    def sweep(J, DZ):
        def body(j, carry):
            J, DZ = carry
            xj = XST[j]
            hj = xj @ DZ + l2S[j] * J[j]
            new = J[j] - (hj + R[j]) / L[j]
            DZ = DZ + jnp.outer(d * xj, new - J[j])
            return J.at[j].set(new), DZ

        return jax.lax.fori_loop(0, XST.shape[0], body, (J, DZ))

    def cond(state):
        _, _, it, delta, size = state
        return (delta > tol * jnp.maximum(size, 1e-300)) & (it < max_iter)

    def step(state):
        J, DZ, it, _, _ = state
        J_new, DZ = sweep(J, DZ)
        return J_new, DZ, it + 1, jnp.max(jnp.abs(J_new - J)), jnp.max(jnp.abs(J_new))

    inf, zero = jnp.asarray(jnp.inf, R.dtype), jnp.asarray(0.0, R.dtype)
    J, _, it, delta, size = jax.lax.while_loop(cond, step, (J0, DZ0, 0, inf, zero))
    return J, it, delta / jnp.maximum(size, 1e-300)


class ImplicitForward(HypergradientMethod):
    """Implicit forward differentiation: the coordinate-descent Jacobian on the support.

    Iterates ``Jⱼ ← Jⱼ − ((H_SS J)ⱼ + Rⱼ)/Lⱼ`` over ``j ∈ S`` (Gauss-Seidel on
    ``H_SS J = −R``, ``R = sign(ŵ_S) dλ_S/dθ + ŵ_S dμ_S/dθ``) until the relative change is
    below ``tol``; no linear system is factorized. On a singular but consistent system
    (duplicate active columns) the iteration started from 0 converges to a solution, so
    prediction-based hypergradients agree with :class:`ImplicitSupport`.

    Parameters
    ----------
    tol, max_iter
        Stopping rule of the Jacobian iteration.

    Examples
    --------
    >>> ImplicitForward(tol=1e-8).max_iter
    10000
    """

    tol: float = 1e-10
    max_iter: int = 10_000

    def compute(self, problem, criterion, log_theta, w):
        """``(R(θ), ∇R(θ), info)`` at the inner solution ``w``."""
        theta, tol = log_theta, self.tol
        l1, l2 = _penalties_np(problem, theta)
        val, gC = _criterion_grad(criterion, problem, w)
        S = _support(problem, w, l1)
        if S.size == 0:
            return val, np.zeros(problem.n_hyper), _info(support_size=0)
        s = S.size
        sign, wS = np.sign(w[S]), w[S]
        in_theta_space = problem.n_hyper <= 16
        if in_theta_space:
            # Few hyperparameters: propagate dŵ_S/dθ (m columns); the forcing term is ∂θ of
            # the optimality condition, sign(w) dλ/dθ + w dμ/dθ (forward-mode Jacobians).
            dl1, dl2 = (np.asarray(a) for a in jax.jacfwd(problem.penalties)(jnp.asarray(theta)))
            R = sign[:, None] * dl1[S] + wS[:, None] * dl2[S]
        else:
            # Many hyperparameters (one per feature): propagate the Jacobian with respect to
            # the penalties on the support (≤ 2|S| columns), chain with dλ/dθ by one VJP.
            blocks = []
            if problem.l1 is not None:
                blocks.append(np.diag(sign))
            if problem.l2 is not None:
                blocks.append(np.diag(wS))
            R = np.hstack(blocks)
        k = R.shape[1]
        sp, kp = _bucket(s), _bucket(k, 1)
        z = problem.design @ w
        d = np.asarray(problem.datafit.hess_diag(jnp.asarray(z), jnp.asarray(problem.target)))
        L_full = problem.datafit.curvature_bound(problem.n_samples) * problem.col_sq + l2
        XST = np.zeros((sp, problem.n_samples))
        XST[:s] = problem.design[:, S].T
        Lp, l2p, Rp = np.ones(sp), np.zeros(sp), np.zeros((sp, kp))
        Lp[:s], l2p[:s], Rp[:s, :k] = L_full[S], l2[S], R
        J, it, rel = _gauss_seidel(
            jnp.asarray(XST),
            jnp.asarray(d),
            jnp.asarray(Lp),
            jnp.asarray(l2p),
            jnp.asarray(Rp),
            tol,
            self.max_iter,
        )
        if float(rel) > tol:
            warnings.warn(
                f"implicit_forward: the Jacobian iteration stopped after {int(it)} sweeps "
                f"with relative change {float(rel):.3g} > tol {tol:.3g} (|S| = {s}); raise "
                "max_iter or loosen tol.",
                DargminWarning,
                stacklevel=4,
            )
        J = np.asarray(J)[:s, :k]
        if not np.any(l2[S] > 0):
            # A pure ℓ1 support system may be singular (duplicate or collinear active
            # columns): the Jacobian is then not unique and ∇R is defined only when ∇_S C is
            # in the range of H_SS. The shared support solve decides, so that this method
            # and ImplicitSupport are right together or refuse together.
            H, _, _ = _restricted_hessian(problem, w, S, l2)
            _support_solve(H, gC[S], problem, mu=l2[S])
        c = gC[S] @ J
        if in_theta_space:
            grad = c
        else:
            c_l1, c_l2 = np.zeros(problem.n_coef), np.zeros(problem.n_coef)
            off = 0
            if problem.l1 is not None:
                c_l1[S] = c[:s]
                off = s
            if problem.l2 is not None:
                c_l2[S] = c[off : off + s]
            grad = problem.penalty_vjp(theta, c_l1, c_l2)
        return val, np.asarray(grad), _info(support_size=s, n_iter_jacobian=int(it))


register(
    "method",
    "implicit",
    lambda problem, smooth_backend="support", **_: ImplicitSupport(smooth_backend),
)
register(
    "method",
    "implicit_forward",
    lambda problem, tol_jac=1e-10, max_iter_jac=10_000, **_: ImplicitForward(
        tol=tol_jac, max_iter=max_iter_jac
    ),
)
