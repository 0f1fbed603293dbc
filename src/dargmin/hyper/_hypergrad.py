"""Hypergradients ``∇R(θ) = (dŵ/dθ)ᵀ ∇C(ŵ)`` by four methods behind one interface.

``implicit``
    Implicit function theorem (smooth problems: optionally through
    :func:`dargmin.argmin`, ``smooth_backend="argmin"``). With an ℓ1 term the optimality
    condition is differentiable on the support ``S`` and
    ``dŵ_{S^c}/dθ = 0``; on ``S`` (Bertrand et al., 2020, 2022)

    .. math::

        H_{SS}\\,\\frac{d\\hat w_S}{d\\theta}
            = -\\Big(\\operatorname{sign}(\\hat w_S)\\,\\frac{d\\lambda_S}{d\\theta}
              + \\hat w_S\\,\\frac{d\\mu_S}{d\\theta}\\Big),
        \\qquad H_{SS} = X_S^\\top \\operatorname{diag}(\\ell'') X_S + \\operatorname{diag}(\\mu_S),

    so one ``|S| × |S|`` adjoint solve ``H_{SS} v = ∇_S C`` gives the hypergradient.
``implicit_forward``
    The same Jacobian obtained by iterating the linearized proximal coordinate descent
    sweep at ``ŵ`` restricted to ``S`` (a Gauss-Seidel iteration on the system above),
    after the inner solve. No linear system is factorized.
``forward``
    Forward-mode differentiation (``jax.jacfwd``) through the iterations of a JAX inner
    solver (coordinate descent, ISTA or FISTA) run until its KKT tolerance.
``reverse``
    Reverse-mode differentiation (``jax.grad``) through the same iterations, unrolled for
    as many epochs as the solver needed (memory grows with the number of epochs).

All four agree for smooth problems and, for ℓ1 problems, away from support changes.
"""

from __future__ import annotations

import time
import warnings
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from dargmin.diagnostics import DargminWarning, SingularSystemError
from dargmin.hyper._criteria import CrossVal
from dargmin.hyper._problems import HyperProblem, _penalty_vectors
from dargmin.hyper._solvers import (
    _cd_epoch,
    _cd_solve,
    _fista_solve,
    _lipschitz_per_coordinate,
    _scale,
    _warn_not_converged,
    make_solver,
    soft_threshold,
)
from dargmin.implicit import argmin

Array = Any
METHODS = ("implicit", "implicit_forward", "forward", "reverse")


class HyperGradient(NamedTuple):
    """Result of :func:`hypergradient`.

    Attributes
    ----------
    value : float
        The criterion ``R(θ) = C(ŵ(θ))`` (mean over folds for :class:`CrossVal`).
    grad : numpy.ndarray
        ``∇R(θ)`` with respect to ``log_theta``.
    coef : numpy.ndarray or list of numpy.ndarray
        The inner solution(s) (one per fold for cross-validation), for warm starts.
    n_inner_iter : int
        Epochs / iterations of the inner solver(s), summed over folds.
    n_solves : int
        Number of inner problems solved (1, or the number of folds).
    support_size : int
        ``|S|`` (summed over folds); ``n_coef`` for smooth problems.
    time_solve, time_grad : float
        Seconds spent in inner solves and in the hypergradient computation proper.
    """

    value: float
    grad: np.ndarray
    coef: Any
    n_inner_iter: int
    n_solves: int
    support_size: int
    time_solve: float
    time_grad: float


def _criterion_grad(criterion, problem: HyperProblem, w: np.ndarray) -> tuple[float, np.ndarray]:
    val, g = criterion.value_and_grad(w, problem)
    val = float(val)
    if not np.isfinite(val):
        raise FloatingPointError(f"The criterion is not finite at the inner solution ({val}).")
    return val, np.asarray(g, dtype=float)


def _penalty_vjp(problem: HyperProblem, theta: np.ndarray, c_l1: np.ndarray, c_l2: np.ndarray):
    """``(dλ/dθ)ᵀ c_l1 + (dμ/dθ)ᵀ c_l2`` by one reverse pass through the penalty maps."""
    return problem.penalty_vjp(theta, c_l1, c_l2)


def _penalties_np(problem: HyperProblem, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    l1, l2 = problem.penalties(jnp.asarray(theta))
    return np.asarray(l1), np.asarray(l2)


def _support(problem: HyperProblem, w: np.ndarray, l1: np.ndarray) -> np.ndarray:
    # Unpenalized coordinates (λ = 0, e.g. the intercept column) are smooth and always free.
    return np.flatnonzero((w != 0) | (l1 == 0))


def _restricted_hessian(problem: HyperProblem, w: np.ndarray, S: np.ndarray, l2: np.ndarray):
    z = problem.design @ w
    d = np.asarray(problem.datafit.hess_diag(jnp.asarray(z), jnp.asarray(problem.target)))
    XS = problem.design[:, S]
    return XS.T @ (d[:, None] * XS) + np.diag(l2[S]), XS, d


def _solve_spd(H: np.ndarray, b: np.ndarray, problem: HyperProblem) -> np.ndarray:
    """Solve ``H v = b`` for the restricted Hessian, refusing singular systems loudly."""
    s = H.shape[0]
    try:
        factor = scipy.linalg.cho_factor(H, lower=True, check_finite=False)
        # (max/min diagonal of the Cholesky factor)² is a cheap lower bound of cond(H).
        diag = np.abs(np.diag(factor[0]))
        cond = float((diag.max() / diag.min()) ** 2) if diag.min() > 0 else np.inf
    except np.linalg.LinAlgError:
        cond = np.inf
    if not cond < 1e12:
        raise SingularSystemError(
            f"The {problem.name} Hessian restricted to the support (|S| = {s}, n = "
            f"{problem.n_samples}) is singular or nearly so (condition number >= {cond:.3g}). "
            "The solution is not unique (|S| > n or collinear active features), so its "
            "Jacobian is undefined; increase the penalty or add an ℓ2 term."
        )
    return scipy.linalg.cho_solve(factor, b, check_finite=False)


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


def _implicit_smooth(problem, criterion, theta, w):
    t0 = time.perf_counter()
    val, gC = _criterion_grad(criterion, problem, w)
    # Jitted only when float64 is enabled globally: under a local ``jax.enable_x64`` context
    # the host callback of dargmin's optimality check returns float32 at run time.
    fn = _smooth_ift_vjp_jit if jax.config.jax_enable_x64 else _smooth_ift_vjp
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
    return val, np.asarray(grad), time.perf_counter() - t0


def _implicit_support(problem, criterion, theta, w):
    t0 = time.perf_counter()
    l1, l2 = _penalties_np(problem, theta)
    val, gC = _criterion_grad(criterion, problem, w)
    S = _support(problem, w, l1)
    if S.size == 0:
        # ŵ = 0 strictly inside the zero region: locally constant, the hypergradient is 0.
        return val, np.zeros(problem.n_hyper), 0, time.perf_counter() - t0
    H, _, _ = _restricted_hessian(problem, w, S, l2)
    v = _solve_spd(H, gC[S], problem)
    c_l1, c_l2 = np.zeros(problem.n_coef), np.zeros(problem.n_coef)
    c_l1[S] = -v * np.sign(w[S])
    c_l2[S] = -v * w[S]
    grad = _penalty_vjp(problem, theta, c_l1, c_l2)
    return val, grad, S.size, time.perf_counter() - t0


def _bucket(k: int, minimum: int = 8) -> int:
    # Pad dynamic sizes to powers of two so jit compiles O(log p) variants, not one per |S|.
    return max(minimum, 1 << (int(k) - 1).bit_length())


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


def _implicit_forward(problem, criterion, theta, w, tol, max_iter):
    t0 = time.perf_counter()
    l1, l2 = _penalties_np(problem, theta)
    val, gC = _criterion_grad(criterion, problem, w)
    S = _support(problem, w, l1)
    if S.size == 0:
        return val, np.zeros(problem.n_hyper), 0, time.perf_counter() - t0
    s = S.size
    sign, wS = np.sign(w[S]), w[S]
    m = problem.n_hyper
    in_theta_space = m <= 16
    if in_theta_space:
        # Few hyperparameters: propagate dŵ_S/dθ (m columns); the forcing term is ∂θ of the
        # optimality condition, sign(w) dλ/dθ + w dμ/dθ, from forward-mode Jacobians.
        dl1, dl2 = (np.asarray(a) for a in jax.jacfwd(problem.penalties)(jnp.asarray(theta)))
        R = sign[:, None] * dl1[S] + wS[:, None] * dl2[S]
    else:
        # Many hyperparameters (one per feature): propagate the Jacobian with respect to the
        # penalties on the support (≤ 2|S| columns) and chain with dλ/dθ by one VJP.
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
    L_full = np.asarray(_lipschitz_per_coordinate(problem, jnp.asarray(l2)))
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
        max_iter,
    )
    if float(rel) > tol:
        warnings.warn(
            f"implicit_forward: the Jacobian iteration stopped after {int(it)} sweeps with "
            f"relative change {float(rel):.3g} > tol {tol:.3g} (|S| = {s}).",
            DargminWarning,
            stacklevel=3,
        )
    J = np.asarray(J)[:s, :k]
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
        grad = _penalty_vjp(problem, theta, c_l1, c_l2)
    return val, np.asarray(grad), s, time.perf_counter() - t0


@partial(jax.jit, static_argnames=("datafit", "kind", "n_bucket"))
def _unrolled(XT, y, w0, l1, l2, step, n_active, datafit, kind, n_bucket):
    """``n_active`` solver iterations (of a static budget ``n_bucket``), reverse-differentiable."""
    X = XT.T

    if kind == "cd":
        # Checkpoint each epoch: the backward pass recomputes its p coordinate steps instead of
        # storing them, so memory is O(epochs (n + p)) rather than O(epochs p (n + p)).
        @jax.checkpoint
        def one(carry):
            w, z, v, t = carry
            w, z = _cd_epoch(XT, y, w, z, l1, l2, step, datafit)
            return w, z, v, t
    else:

        def one(carry):
            w, z, v, t = carry
            g = XT @ datafit.grad(X @ v, y) + l2 * v
            w_new = soft_threshold(v - step * g, step * l1)
            if kind == "fista":
                # Same momentum and restart rule as the primal FISTA solver, so that the
                # unrolled iterates are the solver's iterates.
                t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t**2))
                uphill = jnp.vdot(v - w_new, w_new - w) > 0
                t_new = jnp.where(uphill, 1.0, t_new)
                v_new = w_new + jnp.where(uphill, 0.0, (t - 1.0) / t_new) * (w_new - w)
            else:
                t_new, v_new = t, w_new
            return w_new, z, v_new, t_new

    def body(carry, i):
        new = one(carry)
        # Iterations past n_active are the identity: one compiled budget serves all counts.
        keep = i < n_active
        return jax.tree_util.tree_map(lambda a, b: jnp.where(keep, a, b), new, carry), None

    one_t = jnp.asarray(1.0, w0.dtype)
    init = (w0, X @ w0, w0, one_t)
    (w, _, _, _), _ = jax.lax.scan(body, init, jnp.arange(n_bucket))
    return w


def _unrolled_setup(problem, th, kind):
    l1, l2 = problem.penalties(th)
    if kind == "cd":
        step = _lipschitz_per_coordinate(problem, l2)
    else:
        lip = problem.datafit.curvature_bound(problem.n_samples) * _spectral_sq(problem)
        step = 1.0 / (lip + jnp.max(l2))
    return l1, l2, step


def _spectral_sq(problem: HyperProblem) -> float:
    return float(np.linalg.norm(problem.design, 2) ** 2)


def _solve_jax(problem, kind, l1, l2, step, w0, tol, max_iter):
    XT = jnp.asarray(problem.design.T)
    y = jnp.asarray(problem.target)
    tol_abs = tol * _scale(problem)
    if kind == "cd":
        return _cd_solve(XT, y, w0, l1, l2, step, tol_abs, max_iter, problem.datafit)
    return _fista_solve(
        XT.T, y, w0, l1, l2, step, tol_abs, max_iter, problem.datafit, kind == "fista"
    )


def _forward_mode(problem, criterion, theta, w0, kind, tol, max_iter):
    t0 = time.perf_counter()

    def pipeline(th):
        l1, l2, step = _unrolled_setup(problem, th, kind)
        w, it, viol = _solve_jax(problem, kind, l1, l2, step, w0, tol, max_iter)
        val = criterion(w, problem)
        return val, (val, w, it, viol)

    # JVPs go through lax.while_loop: the solver runs to its tolerance, carrying tangents.
    grad, (val, w, it, viol) = jax.jacfwd(pipeline, has_aux=True)(jnp.asarray(theta))
    kkt = float(viol) / _scale(problem)
    if kkt > tol:
        _warn_not_converged(f"forward-mode {kind}", kkt, tol, int(it), theta)
    return float(val), np.asarray(grad), np.asarray(w), int(it), time.perf_counter() - t0


def _reverse_mode(problem, criterion, theta, w0, kind, tol, max_iter):
    t0 = time.perf_counter()
    th0 = jnp.asarray(theta)
    # The number of iterations to unroll: as many as the solver needs from w0 to reach tol.
    l1, l2, step = _unrolled_setup(problem, th0, kind)
    _, n_it, viol = _solve_jax(problem, kind, l1, l2, step, w0, tol, max_iter)
    n_it = int(n_it)
    kkt = float(viol) / _scale(problem)
    if kkt > tol:
        _warn_not_converged(f"reverse-mode {kind}", kkt, tol, n_it, theta)
    XT, y = jnp.asarray(problem.design.T), jnp.asarray(problem.target)

    def pipeline(th):
        l1, l2, step = _unrolled_setup(problem, th, kind)
        w = _unrolled(XT, y, w0, l1, l2, step, n_it, problem.datafit, kind, _bucket(n_it, 16))
        return criterion(w, problem), w

    (val, w), grad = jax.value_and_grad(pipeline, has_aux=True)(th0)
    return float(val), np.asarray(grad), np.asarray(w), n_it, time.perf_counter() - t0


def _one_problem(problem, criterion, theta, method, solver, w0, opts):
    if method in ("forward", "reverse"):
        kind = opts["unrolled"]
        if kind not in ("cd", "ista", "fista"):
            raise ValueError(f"unrolled must be 'cd', 'ista' or 'fista', got {kind!r}.")
        w_init = jnp.zeros(problem.n_coef) if w0 is None else jnp.asarray(w0, dtype=float)
        fn = _forward_mode if method == "forward" else _reverse_mode
        val, grad, w, it, t = fn(
            problem, criterion, theta, w_init, kind, opts["tol"], opts["max_iter"]
        )
        s = int(np.count_nonzero(w)) if problem.l1 is not None else problem.n_coef
        return val, grad, w, it, s, t, 0.0
    res = solver.solve(problem, theta, w0)
    w = res.coef
    if problem.smooth and opts["smooth_backend"] == "argmin":
        val, grad, tg = _implicit_smooth(problem, criterion, theta, w)
        s = problem.n_coef
    elif method == "implicit":
        val, grad, s, tg = _implicit_support(problem, criterion, theta, w)
    else:
        val, grad, s, tg = _implicit_forward(
            problem, criterion, theta, w, opts["tol_jac"], opts["max_iter_jac"]
        )
    return val, grad, w, res.n_iter, s, res.time, tg


def hypergradient(
    problem: HyperProblem,
    criterion: Any,
    log_theta: Array,
    *,
    method: str = "implicit",
    solver: Any = "auto",
    w0: Any = None,
    unrolled: str = "cd",
    tol: float = 1e-10,
    max_iter: int = 10_000,
    tol_jac: float = 1e-10,
    max_iter_jac: int = 10_000,
    smooth_backend: str = "support",
) -> HyperGradient:
    """Value and gradient of ``R(θ) = C(ŵ(θ))`` with respect to ``log_theta``.

    .. math::

        \\nabla R(\\theta) = \\Big(\\frac{d\\hat w}{d\\theta}\\Big)^{\\!\\top}
            \\nabla C(\\hat w(\\theta)),
        \\qquad \\hat w(\\theta) = \\arg\\min_w F(w, \\theta).

    Parameters
    ----------
    problem
        The inner problem (:func:`lasso`, :func:`elastic_net`, :func:`weighted_lasso`,
        :func:`sparse_logistic`, :func:`ridge`, :func:`l2_logistic` or a
        :class:`HyperProblem`).
    criterion
        A criterion ``C(w, problem)`` (:class:`HeldOutMSE`, :class:`HeldOutLogistic`,
        :class:`CustomCriterion`) or a :class:`CrossVal`.
    log_theta
        Hyperparameters in log scale, shape ``(problem.n_hyper,)``.
    method
        ``"implicit"``, ``"implicit_forward"``, ``"forward"`` or ``"reverse"`` (see the
        module docstring).
    solver
        Inner solver for the implicit methods: ``"auto"``, ``"cd"``, ``"fista"``,
        ``"ista"``, ``"sklearn"`` or an object with ``solve(problem, log_theta, w0)``.
        Keep the same instance across calls to reuse scikit-learn's warm start.
    w0
        Warm start (an array, or a list of arrays with one per fold for ``CrossVal``).
    unrolled
        Solver differentiated by ``"forward"`` / ``"reverse"``: ``"cd"``, ``"ista"`` or
        ``"fista"``.
    tol, max_iter
        Relative KKT tolerance and iteration cap of the unrolled solver.
    tol_jac, max_iter_jac
        Stopping rule of the ``implicit_forward`` Jacobian iteration.
    smooth_backend
        For smooth problems (no ℓ1 term) and ``method="implicit"``: ``"support"`` (default)
        solves the dense system ``(Xᵀ diag(ℓ'') X + diag(μ)) v = ∇C`` with the same code as
        the ℓ1 case (the "support" is every coordinate); ``"argmin"`` differentiates through
        :func:`dargmin.argmin` (general, with its stationarity checks, but compiled per
        problem size).

    Returns
    -------
    HyperGradient

    Raises
    ------
    dargmin.SingularSystemError
        When the Hessian restricted to the support is singular (non-unique solution).

    Examples
    --------
    >>> import numpy as np
    >>> from dargmin.hyper import lasso, HeldOutMSE
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(40, 10)); y = X[:, 0] - 2 * X[:, 1] + 0.1 * rng.normal(size=40)
    >>> prob = lasso(X[:20], y[:20])
    >>> hg = hypergradient(prob, HeldOutMSE(X[20:], y[20:]), [np.log(0.05)])
    >>> hg.grad.shape, bool(hg.grad[0] > 0)   # less regularization helps here
    ((1,), True)
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose from {METHODS}.")
    if smooth_backend not in ("support", "argmin"):
        raise ValueError(f"smooth_backend must be 'support' or 'argmin', got {smooth_backend!r}.")
    with jax.enable_x64(True):
        theta = problem.check_theta(log_theta)
        opts = {
            "unrolled": unrolled,
            "tol": tol,
            "max_iter": max_iter,
            "tol_jac": tol_jac,
            "max_iter_jac": max_iter_jac,
            "smooth_backend": smooth_backend,
        }
        if isinstance(criterion, CrossVal):
            pairs = criterion.folds(problem)
            if w0 is not None and len(w0) != len(pairs):
                raise ValueError(f"w0 must hold one warm start per fold ({len(pairs)}).")
            solvers = solver if isinstance(solver, list | tuple) else None
        else:
            pairs = [(problem, criterion)]
            w0 = [w0]
            solvers = [solver] if isinstance(solver, list | tuple) is False else list(solver)
        if solvers is None:
            # One solver object per fold keeps each fold's warm start separate.
            solvers = [solver] * len(pairs)
        vals, grads, coefs, iters, supp, ts, tg = [], [], [], 0, 0, 0.0, 0.0
        for k, (prob_k, crit_k) in enumerate(pairs):
            slv = make_solver(solvers[k], prob_k) if method in METHODS[:2] else None
            out = _one_problem(
                prob_k, crit_k, theta, method, slv, None if w0 is None else w0[k], opts
            )
            vals.append(out[0])
            grads.append(out[1])
            coefs.append(out[2])
            iters += out[3]
            supp += out[4]
            ts += out[5]
            tg += out[6]
        K = len(pairs)
        grad = np.mean(grads, axis=0)
        if not np.all(np.isfinite(grad)):
            raise FloatingPointError(f"The hypergradient is not finite: {grad[:5]}.")
        coef = coefs if isinstance(criterion, CrossVal) else coefs[0]
        return HyperGradient(float(np.mean(vals)), grad, coef, iters, K, supp, ts, tg)
