"""Risk estimation without a validation set: SURE, Monte-Carlo degrees of freedom, SUGAR.

For the Gaussian model ``y = Xw + ε``, ``ε ~ N(0, σ²I)``, and the fitted values
``μ̂(y) = X ŵ(y, θ)`` (plus the intercept) of a least-squares :class:`HyperProblem`, Stein's
unbiased risk estimate

.. math::

    \\mathrm{SURE}(\\theta) = \\|y - \\hat\\mu\\|^2 - n\\sigma^2 + 2\\sigma^2\\,\\mathrm{df},
    \\qquad \\mathrm{df} = \\operatorname{div}\\hat\\mu
        = \\operatorname{tr}\\frac{\\partial\\hat\\mu}{\\partial y},

satisfies ``E[SURE] = E‖μ̂ − Xw‖²`` (the in-sample prediction risk), so it selects ``θ``
from the training data alone. Away from support changes the solution is differentiable in
``y`` and, with ``S`` the support and ``H_SS = X_SᵀX_S/n + diag(μ_S)`` the restricted
Hessian of the inner problem (``½n`` scaling of the data fit),

.. math::

    \\frac{\\partial\\hat\\mu}{\\partial y}
        = X_S H_{SS}^{-1} X_S^\\top / n \\;\\big(+\\, \\mathbf 1\\mathbf 1^\\top/n
        \\text{ with an intercept}\\big),

so ``df = |S|`` (+1) for the Lasso (Zou, Hastie & Tibshirani, 2007) and
``df = tr X(XᵀX + nμI)⁻¹Xᵀ`` (+1) for ridge. Three estimates of ``df`` are offered:

``"exact"``
    The trace above (an ``|S| × |S|`` inverse).
``"monte_carlo"``
    ``⟨(∂μ̂/∂y) z, z⟩`` for probes ``z ~ N(0, I)`` (Hutchinson), the directional derivative
    obtained by implicit differentiation in ``y`` on the support.
``"finite_difference"``
    ``⟨μ̂(y + δz) − μ̂(y), z⟩/δ`` (Ramani, Blu & Unser, 2008): a second inner problem at
    ``y + δz`` per probe, no derivative of the solver in ``y``. Its gradient in ``θ`` is
    SUGAR (Deledalle, Vaiter, Fadili & Peyré, 2014): the hypergradients of both inner
    problems, each by :func:`~dargmin.hyper.hypergradient`.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dargmin.hyper._criteria import Criterion
from dargmin.hyper._hypergrad import (
    METHODS,
    _restricted_hessian,
    _solve_spd,
    _support,
    hypergradient,
)
from dargmin.hyper._outer import (
    Monitor,
    OuterResult,
    default_bounds,
    default_log_theta0,
    minimize_rejecting_singular,
)
from dargmin.hyper._problems import HyperProblem, Quadratic
from dargmin.hyper._solvers import make_solver

Array = Any
DF_MODES = ("exact", "monte_carlo", "finite_difference")


class SureResult(NamedTuple):
    """Result of :func:`sure` / :meth:`SURE.evaluate`.

    Attributes
    ----------
    value : float
        ``SURE(θ) = ‖y − μ̂‖² − nσ² + 2σ² df``.
    grad : numpy.ndarray
        ``∇_θ SURE`` with respect to ``log_theta`` (for ``df="finite_difference"``: SUGAR).
    df : float
        The degrees-of-freedom estimate used in ``value``.
    coef : numpy.ndarray
        The inner solution ``ŵ(y, θ)``.
    support_size : int
        ``|S|`` (``n_coef`` for smooth problems).
    n_solves : int
        Inner problems solved (1, or ``1 + n_probes`` for finite differences).
    """

    value: float
    grad: np.ndarray
    df: float
    coef: np.ndarray
    support_size: int
    n_solves: int


# ---------------------------------------------------------------------- validation helpers
def _check_problem(problem: Any) -> HyperProblem:
    if not isinstance(problem, HyperProblem):
        raise TypeError(f"Expected a HyperProblem, got {type(problem).__name__}.")
    if not isinstance(problem.datafit, Quadratic):
        raise ValueError(
            "SURE and degrees of freedom are defined here for least squares (lasso, ridge, "
            f"elastic_net, weighted_lasso); {problem.name} has a "
            f"{type(problem.datafit).__name__} data fit."
        )
    return problem


def _check_sigma(sigma: float) -> float:
    s = float(sigma)
    if not (np.isfinite(s) and s > 0):
        raise ValueError(f"sigma (the noise standard deviation) must be finite and > 0, got {s}.")
    return s


def _check_df(df: str) -> str:
    if df not in DF_MODES:
        raise ValueError(f"df must be one of {DF_MODES}, got {df!r}.")
    return df


def default_delta(sigma: float, n_samples: int) -> float:
    """Default finite-difference step ``δ = 2σ n^{-0.3}`` (Deledalle et al., 2014).

    Examples
    --------
    >>> round(default_delta(1.0, 100), 4)
    0.5024
    """
    return 2.0 * _check_sigma(sigma) * float(n_samples) ** -0.3


def _make_probes(n: int, n_probes: int, seed: int, probes: Array | None) -> np.ndarray:
    """Probe matrix ``Z`` of shape ``(n, K)``: the given ``probes`` or ``N(0, I)`` draws."""
    if probes is not None:
        Z = np.asarray(probes, dtype=np.float64)
        Z = Z[:, None] if Z.ndim == 1 else Z
        if Z.ndim != 2 or Z.shape[0] != n or Z.shape[1] < 1:
            raise ValueError(
                f"probes must have shape (n_samples,) or (n_samples, K) with n_samples = {n}; "
                f"got {np.shape(probes)}."
            )
        if not np.all(np.isfinite(Z)):
            raise ValueError("probes contain non-finite values.")
        return Z
    if int(n_probes) < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}.")
    return np.random.default_rng(seed).standard_normal((n, int(n_probes)))


def _solve_inner(problem: HyperProblem, theta: np.ndarray, solver: Any, w0: Array | None):
    return np.asarray(make_solver(solver, problem).solve(problem, theta, w0).coef)


def _perturbed(problem: HyperProblem, shift: np.ndarray) -> HyperProblem:
    """The same inner problem with targets ``y + shift``."""
    return HyperProblem(
        problem.X,
        problem.y + shift,
        problem.datafit,
        problem.n_hyper,
        l1=problem.l1,
        l2=problem.l2,
        fit_intercept=problem.fit_intercept,
        name=problem.name,
    )


# ---------------------------------------------------------------------- local derivative in y
class _Local(NamedTuple):
    """The solution map's derivative in ``y`` at ``ŵ``: ``∂ŵ_S/∂y = H⁻¹ X_Sᵀ/n``."""

    S: np.ndarray
    XS: np.ndarray
    Hinv: np.ndarray
    intercept: bool

    def jvp(self, Z: np.ndarray) -> np.ndarray:
        """``(∂μ̂/∂y) Z`` for the columns of ``Z`` (implicit differentiation in ``y``)."""
        n = Z.shape[0]
        out = self.XS @ (self.Hinv @ (self.XS.T @ Z)) / n
        if self.intercept:
            # μ̂ = ȳ 1 + X_c ŵ(y − ȳ): the mean contributes 11ᵀ/n; the centered columns are
            # orthogonal to 1, so the centering of y drops out of X_Sᵀ.
            out = out + Z.mean(axis=0, keepdims=True)
        return out


def _local(problem: HyperProblem, theta: np.ndarray, w: np.ndarray) -> _Local:
    l1, l2 = (np.asarray(v) for v in problem.penalties(jnp.asarray(theta)))
    S = _support(problem, w, l1)
    if S.size == 0:
        return _Local(S, problem.design[:, S], np.zeros((0, 0)), problem.fit_intercept)
    H, XS, _ = _restricted_hessian(problem, w, S, l2)
    Hinv = _solve_spd(H, np.eye(S.size), problem)
    return _Local(S, XS, 0.5 * (Hinv + Hinv.T), problem.fit_intercept)


def _exact_df(problem: HyperProblem, theta: np.ndarray, loc: _Local, grad: bool):
    """``df = tr(H⁻¹A) (+1)`` with ``A = X_SᵀX_S/n``, and ``∂df/∂θ`` through ``μ(θ)``."""
    n = problem.n_samples
    mu = np.asarray(problem.penalties(jnp.asarray(theta))[1])[loc.S]
    # tr(H⁻¹A) = tr(H⁻¹(H − diag μ_S)) = |S| − Σ_j μ_j (H⁻¹)_jj: exactly |S| for the Lasso.
    df = loc.S.size - float(np.sum(mu * np.diag(loc.Hinv))) + float(loc.intercept)
    if not grad:
        return df, None
    A = loc.XS.T @ loc.XS / n
    # d tr(H⁻¹A) = −tr(H⁻¹ dH H⁻¹ A) with dH = diag(dμ_S): ∂df/∂μ_j = −(H⁻¹AH⁻¹)_jj.
    c_l2 = np.zeros(problem.n_coef)
    c_l2[loc.S] = -np.einsum("ij,jk,ki->i", loc.Hinv, A, loc.Hinv)
    return df, problem.penalty_vjp(theta, np.zeros(problem.n_coef), c_l2)


def _mc_df(problem: HyperProblem, theta: np.ndarray, loc: _Local, Z: np.ndarray, grad: bool):
    """Per-probe ``⟨(∂μ̂/∂y) z, z⟩`` and the gradient in ``θ`` of their mean."""
    n, K = Z.shape
    samples = np.einsum("ik,ik->k", loc.jvp(Z), Z)
    if not grad:
        return samples, None
    # zᵀX_S H⁻¹ X_Sᵀz / n with c = X_Sᵀz: ∂/∂μ_j = −(H⁻¹c)_j² / n.
    v = loc.Hinv @ (loc.XS.T @ Z)
    c_l2 = np.zeros(problem.n_coef)
    c_l2[loc.S] = -np.sum(v**2, axis=1) / (n * K)
    return samples, problem.penalty_vjp(theta, np.zeros(problem.n_coef), c_l2)


# ---------------------------------------------------------------------- criteria (closed form)
class _FitTerm(Criterion):
    """``a‖t − Xw‖² + ⟨Xw, c⟩`` on the (centered) design and target of the problem."""

    def __init__(self, a: float, c: np.ndarray | None):
        self.a = float(a)
        self.c = c

    def __call__(self, w: Array, problem: HyperProblem) -> Array:
        z = jnp.asarray(problem.design) @ w
        val = self.a * jnp.sum((jnp.asarray(problem.target) - z) ** 2)
        return val if self.c is None else val + jnp.dot(z, jnp.asarray(self.c))

    def value_and_grad(self, w: np.ndarray, problem: HyperProblem) -> tuple[float, np.ndarray]:
        X = problem.design
        z = X @ w
        r = problem.target - z
        val, g = self.a * float(r @ r), -2.0 * self.a * (X.T @ r)
        if self.c is not None:
            val, g = val + float(z @ self.c), g + X.T @ self.c
        return val, g


# ---------------------------------------------------------------------- public API
class SURE(Criterion):
    """Stein's unbiased risk estimate of the in-sample prediction risk, as a criterion.

    .. math::

        \\mathrm{SURE}(\\theta) = \\|y - \\hat\\mu(y, \\theta)\\|^2 - n\\sigma^2
            + 2\\sigma^2\\,\\widehat{\\mathrm{df}}(\\theta),
        \\qquad \\mathbb E\\,\\mathrm{SURE} = \\mathbb E\\,\\|\\hat\\mu - Xw_\\star\\|^2 ,

    computed on the training data ``(X, y)`` of the problem (no validation set). ``df`` is
    ``"exact"`` (``tr ∂μ̂/∂y``: ``|S|`` for the Lasso), ``"monte_carlo"``
    (``mean_k ⟨(∂μ̂/∂y) z_k, z_k⟩``, ``z_k ~ N(0, I)``) or ``"finite_difference"``
    (``mean_k ⟨μ̂(y + δz_k) − μ̂(y), z_k⟩/δ``, whose ``θ``-gradient is SUGAR). The probes
    are drawn once from ``seed`` and kept fixed, so the criterion is a deterministic
    function of ``θ``. An intercept adds 1 to ``df``.

    Use :meth:`evaluate`, :func:`sure` or :func:`optimize_sure` for every model and mode.
    As a ``Criterion`` of :func:`~dargmin.hyper.hypergradient` /
    :func:`~dargmin.hyper.optimize_hyperparameters` (a function of ``ŵ`` only), it is
    exact where ``df`` is locally constant in ``θ``: pure ℓ1 models (lasso, weighted lasso)
    with ``df="exact"`` or ``"monte_carlo"``; other cases raise a ``ValueError``.

    Parameters
    ----------
    sigma
        Noise standard deviation ``σ`` (known or estimated beforehand).
    df
        ``"exact"``, ``"monte_carlo"`` or ``"finite_difference"``.
    delta
        Finite-difference step (default :func:`default_delta`, ``2σ n^{-0.3}``).
    n_probes
        Number of Gaussian probes ``K`` (Monte-Carlo and finite-difference modes).
    seed
        Seed of the probes.
    probes
        Explicit probes ``(n,)`` or ``(n, K)`` instead of random ones.

    Examples
    --------
    >>> import numpy as np
    >>> from dargmin.hyper import lasso
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(50, 10)); y = X[:, 0] - X[:, 1] + rng.normal(size=50)
    >>> prob = lasso(X, y)
    >>> res = SURE(sigma=1.0).evaluate(prob, [np.log(0.1)])
    >>> bool(res.df == np.count_nonzero(res.coef) + 1)    # |S| + intercept
    True
    >>> fd = SURE(1.0, df="finite_difference", n_probes=2).evaluate(prob, [np.log(0.1)])
    >>> fd.n_solves, fd.grad.shape                         # SUGAR: 1 + K solves
    (3, (1,))
    """

    def __init__(
        self,
        sigma: float,
        df: str = "exact",
        *,
        delta: float | None = None,
        n_probes: int = 1,
        seed: int = 0,
        probes: Array | None = None,
    ):
        self.sigma = _check_sigma(sigma)
        self.df = _check_df(df)
        if delta is not None and not (np.isfinite(delta) and delta > 0):
            raise ValueError(f"delta must be finite and > 0, got {delta}.")
        self.delta = None if delta is None else float(delta)
        if int(n_probes) < 1:
            raise ValueError(f"n_probes must be >= 1, got {n_probes}.")
        self.n_probes = int(n_probes)
        self.seed = seed
        self.probes = probes
        self._cache: dict[str, Any] | None = None

    # -- per-problem state: probes, perturbed problems, solvers and warm starts
    def _state(self, problem: HyperProblem, solver: Any) -> dict[str, Any]:
        c = self._cache
        if c is not None and c["problem"] is problem and c["solver_arg"] is solver:
            return c
        n = problem.n_samples
        Z = _make_probes(n, self.n_probes, self.seed, self.probes)
        delta = default_delta(self.sigma, n) if self.delta is None else self.delta
        state: dict[str, Any] = {"problem": problem, "solver_arg": solver, "Z": Z, "delta": delta}
        state["solver"] = make_solver(solver, problem)
        state["coef"] = None
        if self.df == "finite_difference":
            state["perturbed"] = [_perturbed(problem, delta * Z[:, k]) for k in range(Z.shape[1])]
            # One solver object per inner problem keeps each warm start (scikit-learn's lives
            # in the estimator object); solver instances are copied, not shared.
            state["solvers"] = [
                make_solver(solver if isinstance(solver, str) else copy.deepcopy(solver), p)
                for p in state["perturbed"]
            ]
            state["coefs"] = [None] * Z.shape[1]
        self._cache = state
        return state

    def evaluate(
        self,
        problem: HyperProblem,
        log_theta: Array,
        *,
        method: str = "implicit",
        solver: Any = "auto",
        w0: Array | None = None,
        **hypergradient_options: Any,
    ) -> SureResult:
        """``SURE(θ)`` and its gradient in ``log_theta`` (SUGAR for finite differences).

        The data-fit term ``‖y − μ̂‖²`` (and, for finite differences, the inner products
        with the perturbed fits) is differentiated by :func:`~dargmin.hyper.hypergradient`
        with ``method`` (any of :data:`~dargmin.hyper.METHODS`); the ``θ``-dependence of
        the exact / Monte-Carlo ``df`` (through an ℓ2 strength ``μ(θ)``; none for the
        Lasso, whose ``df`` is locally constant) is differentiated in closed form on the
        support. Warm starts are kept between calls on the same problem.

        Parameters
        ----------
        problem
            A least-squares :class:`~dargmin.hyper.HyperProblem`.
        log_theta
            Hyperparameters in log scale.
        method, solver, **hypergradient_options
            Forwarded to :func:`~dargmin.hyper.hypergradient`.
        w0
            Warm start of the inner problem at ``y`` (default: the previous solution).

        Returns
        -------
        SureResult
        """
        _check_problem(problem)
        if method not in METHODS:
            raise ValueError(f"Unknown method {method!r}; choose from {METHODS}.")
        with jax.enable_x64(True):
            theta = problem.check_theta(log_theta)
            st = self._state(problem, solver)
            Z, n, s2 = st["Z"], problem.n_samples, self.sigma**2
            opts = {"method": method, **hypergradient_options}
            w_start = st["coef"] if w0 is None else w0
            if self.df == "finite_difference":
                return self._evaluate_fd(problem, theta, st, w_start, opts)
            hg = hypergradient(
                problem, _FitTerm(1.0, None), theta, solver=st["solver"], w0=w_start, **opts
            )
            st["coef"] = w = np.asarray(hg.coef)
            loc = _local(problem, theta, w)
            if self.df == "exact":
                df, ddf = _exact_df(problem, theta, loc, grad=True)
            else:
                samples, ddf = _mc_df(problem, theta, loc, Z, grad=True)
                df = float(np.mean(samples))
            value = hg.value - n * s2 + 2.0 * s2 * df
            grad = np.asarray(hg.grad) + 2.0 * s2 * np.asarray(ddf)
            return SureResult(float(value), grad, df, w, int(loc.S.size), 1)

    def _evaluate_fd(self, problem, theta, st, w_start, opts) -> SureResult:
        Z, delta, n, s2 = st["Z"], st["delta"], problem.n_samples, self.sigma**2
        K = Z.shape[1]
        scale = 2.0 * s2 / (delta * K)
        # SURE_FD = [‖t − Xŵ‖² − scale Σ_k⟨Xŵ, z_k⟩] + Σ_k scale⟨Xŵ'_k, z_k⟩ − nσ² + const:
        # one hypergradient per inner problem (at y and at each y + δz_k).
        hg = hypergradient(
            problem,
            _FitTerm(1.0, -scale * Z.sum(axis=1)),
            theta,
            solver=st["solver"],
            w0=w_start,
            **opts,
        )
        st["coef"] = w = np.asarray(hg.coef)
        value, grad = hg.value, np.asarray(hg.grad, dtype=float).copy()
        fit = problem.design @ w
        df_samples = np.empty(K)
        for k, pk in enumerate(st["perturbed"]):
            hk = hypergradient(
                pk,
                _FitTerm(0.0, scale * Z[:, k]),
                theta,
                solver=st["solvers"][k],
                w0=st["coefs"][k] if st["coefs"][k] is not None else w,
                **opts,
            )
            st["coefs"][k] = wk = np.asarray(hk.coef)
            value += hk.value
            grad += np.asarray(hk.grad)
            df_samples[k] = (pk.design @ wk - fit) @ Z[:, k] / delta
        # The intercept (mean of y) moves by δ z̄_k: ⟨δ z̄_k 1, z_k⟩/δ = (Σz_k)²/n.
        mean_part = np.sum(Z, axis=0) ** 2 / n if problem.fit_intercept else np.zeros(K)
        df_samples += mean_part
        value += -n * s2 + 2.0 * s2 * float(np.mean(mean_part))
        S = _support(problem, w, np.asarray(problem.penalties(jnp.asarray(theta))[0]))
        return SureResult(float(value), grad, float(np.mean(df_samples)), w, int(S.size), 1 + K)

    # -- Criterion interface: a function of ŵ only (pure ℓ1 models)
    def _check_criterion_use(self, problem: HyperProblem) -> None:
        _check_problem(problem)
        if problem.l2 is not None or problem.l1 is None or self.df == "finite_difference":
            raise ValueError(
                "SURE as a criterion of hypergradient / optimize_hyperparameters (a function "
                "of ŵ alone) is exact only for pure ℓ1 models (lasso, weighted_lasso) with "
                f"df='exact' or 'monte_carlo'; got {problem.name} with df={self.df!r}. Use "
                "dargmin.hyper.sure or optimize_sure, which also differentiate df(θ) and run "
                "the second inner problem of the finite-difference (SUGAR) estimate."
            )

    def _df_of_w(self, w: np.ndarray, problem: HyperProblem) -> float:
        S = np.flatnonzero(np.asarray(w) != 0)
        if self.df == "exact":
            return float(S.size + problem.fit_intercept)
        Z = self._probes(problem)
        XS = problem.design[:, S]
        # ∂μ̂/∂y on the support of a pure ℓ1 model: the projection onto span(X_S) (+ 11ᵀ/n).
        PZ = XS @ np.linalg.lstsq(XS, Z, rcond=None)[0] if S.size else np.zeros_like(Z)
        if problem.fit_intercept:
            PZ = PZ + Z.mean(axis=0, keepdims=True)
        return float(np.mean(np.einsum("ik,ik->k", PZ, Z)))

    def _probes(self, problem: HyperProblem) -> np.ndarray:
        return _make_probes(problem.n_samples, self.n_probes, self.seed, self.probes)

    def __call__(self, w: Array, problem: HyperProblem) -> Array:
        self._check_criterion_use(problem)
        df = self._df_traced(w, problem)
        r = jnp.asarray(problem.target) - jnp.asarray(problem.design) @ w
        n, s2 = problem.n_samples, self.sigma**2
        return jnp.sum(r**2) - n * s2 + 2.0 * s2 * df

    def _df_traced(self, w: Array, problem: HyperProblem) -> Array:
        # JAX version of _df_of_w with a static-shape mask (traced by the forward / reverse
        # methods); df is locally constant, so no derivative flows through it.
        w = jax.lax.stop_gradient(w)
        m = (w != 0).astype(w.dtype)
        base = problem.fit_intercept
        if self.df == "exact":
            return jnp.sum(m) + base
        X, Z = jnp.asarray(problem.design), jnp.asarray(self._probes(problem))
        G = X.T @ X
        Gm = m[:, None] * G * m[None, :] + jnp.diag(1.0 - m)
        c = m[:, None] * (X.T @ Z)
        quad = jnp.sum(c * jnp.linalg.solve(Gm, c), axis=0)
        if base:
            quad = quad + jnp.sum(Z, axis=0) ** 2 / problem.n_samples
        return jnp.mean(quad)

    def value_and_grad(self, w: np.ndarray, problem: HyperProblem) -> tuple[float, np.ndarray]:
        """Closed form: ``RSS(w) − nσ² + 2σ² df(w)``, gradient ``−2Xᵀ(y − Xw)``."""
        self._check_criterion_use(problem)
        w = np.asarray(w, dtype=float)
        r = problem.target - problem.design @ w
        s2 = self.sigma**2
        val = float(r @ r) - problem.n_samples * s2 + 2.0 * s2 * self._df_of_w(w, problem)
        return val, -2.0 * (problem.design.T @ r)


def sure(
    problem: HyperProblem,
    log_theta: Array,
    sigma: float,
    *,
    df: str = "exact",
    delta: float | None = None,
    n_probes: int = 1,
    seed: int = 0,
    probes: Array | None = None,
    method: str = "implicit",
    solver: Any = "auto",
    w0: Array | None = None,
    **hypergradient_options: Any,
) -> SureResult:
    """Value and ``log_theta``-gradient of Stein's unbiased risk estimate.

    .. math::

        \\mathrm{SURE}(\\theta) = \\|y - \\hat\\mu\\|^2 - n\\sigma^2 + 2\\sigma^2\\,\\mathrm{df}

    with ``df`` exact, Monte-Carlo or finite-difference (then the gradient is SUGAR); see
    :class:`SURE` for the parameters and :meth:`SURE.evaluate` for the computation.

    Examples
    --------
    >>> import numpy as np
    >>> from dargmin.hyper import ridge
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(30, 5)); y = X @ np.ones(5) + rng.normal(size=30)
    >>> res = sure(ridge(X, y, fit_intercept=False), [np.log(0.1)], sigma=1.0)
    >>> bool(0 < res.df < 5), res.grad.shape
    (True, (1,))
    """
    crit = SURE(sigma, df, delta=delta, n_probes=n_probes, seed=seed, probes=probes)
    return crit.evaluate(
        problem, log_theta, method=method, solver=solver, w0=w0, **hypergradient_options
    )


def sugar_gradient(
    problem: HyperProblem,
    log_theta: Array,
    sigma: float,
    *,
    delta: float | None = None,
    n_probes: int = 1,
    seed: int = 0,
    probes: Array | None = None,
    method: str = "implicit",
    solver: Any = "auto",
) -> np.ndarray:
    """SUGAR: the ``log_theta``-gradient of the finite-difference Monte-Carlo SURE.

    .. math::

        \\nabla_\\theta\\Big[\\|y - \\hat\\mu(y,\\theta)\\|^2 - n\\sigma^2
            + \\frac{2\\sigma^2}{\\delta}\\big\\langle \\hat\\mu(y + \\delta z, \\theta)
            - \\hat\\mu(y, \\theta),\\, z\\big\\rangle\\Big]

    (Deledalle, Vaiter, Fadili & Peyré, 2014): two inner solves and two hypergradients per
    probe pair, ``≈ (1 + K)`` of each for ``K`` probes.

    Examples
    --------
    >>> import numpy as np
    >>> from dargmin.hyper import lasso
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(40, 8)); y = X[:, 0] + 0.5 * rng.normal(size=40)
    >>> sugar_gradient(lasso(X, y), [np.log(0.05)], sigma=0.5).shape
    (1,)
    """
    crit = SURE(
        sigma, "finite_difference", delta=delta, n_probes=n_probes, seed=seed, probes=probes
    )
    return crit.evaluate(problem, log_theta, method=method, solver=solver).grad


def degrees_of_freedom(
    problem: HyperProblem,
    log_theta: Array,
    *,
    solver: Any = "auto",
    coef: Array | None = None,
) -> float:
    """Exact degrees of freedom ``tr ∂μ̂/∂y`` of a least-squares model at ``log_theta``.

    .. math::

        \\mathrm{df} = \\operatorname{tr}\\big(X_S H_{SS}^{-1} X_S^\\top\\big)/n
            \\;(+1 \\text{ with an intercept}),
        \\qquad H_{SS} = X_S^\\top X_S / n + \\operatorname{diag}(\\mu_S),

    i.e. ``|S|`` for the Lasso and ``tr X(XᵀX + nμI)⁻¹Xᵀ`` for ridge (``½n`` scaling of the
    data fit: ``μ`` is ``exp(log_theta)`` of :func:`~dargmin.hyper.ridge`).

    Parameters
    ----------
    problem
        A least-squares :class:`~dargmin.hyper.HyperProblem`.
    log_theta
        Hyperparameters in log scale.
    solver
        Inner solver used when ``coef`` is not given.
    coef
        A precomputed inner solution ``ŵ(θ)``.

    Examples
    --------
    >>> import numpy as np
    >>> from dargmin.hyper import ridge
    >>> X = np.eye(4)                      # s² = 1, n = 4: df = 4 / (1 + 4μ)
    >>> round(degrees_of_freedom(ridge(X, np.eye(4)[0], fit_intercept=False), [np.log(0.25)]), 12)
    2.0
    """
    _check_problem(problem)
    with jax.enable_x64(True):
        theta = problem.check_theta(log_theta)
        w = _solve_inner(problem, theta, solver, None) if coef is None else np.asarray(coef)
        return _exact_df(problem, theta, _local(problem, theta, w), grad=False)[0]


def lasso_degrees_of_freedom(
    problem: HyperProblem,
    log_theta: Array,
    *,
    solver: Any = "auto",
    coef: Array | None = None,
) -> int:
    """Degrees of freedom of the Lasso: ``|S|`` (+1 with an intercept).

    Zou, Hastie & Tibshirani (2007): ``|S|`` is an unbiased estimate of the degrees of
    freedom of the Lasso fit; away from support changes it is exactly the divergence
    ``tr ∂μ̂/∂y`` (the rank of the projection onto ``span(X_S)``, ``|S|`` when ``X_S`` has
    full column rank, as for data in general position).

    Examples
    --------
    >>> import numpy as np
    >>> from dargmin.hyper import lasso
    >>> prob = lasso(np.eye(3), np.array([3.0, 0.0, -3.0]), fit_intercept=False)
    >>> lasso_degrees_of_freedom(prob, [np.log(0.5)])
    2
    """
    _check_problem(problem)
    if problem.l1 is None or problem.l2 is not None:
        raise ValueError(
            f"lasso_degrees_of_freedom needs a pure ℓ1 model (lasso, weighted_lasso); "
            f"{problem.name} has an ℓ2 term or no ℓ1 term. Use degrees_of_freedom."
        )
    with jax.enable_x64(True):
        theta = problem.check_theta(log_theta)
        w = _solve_inner(problem, theta, solver, None) if coef is None else np.asarray(coef)
        return int(np.count_nonzero(w)) + int(problem.fit_intercept)


def monte_carlo_degrees_of_freedom(
    problem: HyperProblem,
    log_theta: Array,
    *,
    n_probes: int = 1,
    seed: int = 0,
    probes: Array | None = None,
    delta: float | None = None,
    solver: Any = "auto",
    coef: Array | None = None,
    average: bool = True,
) -> float | np.ndarray:
    """Monte-Carlo degrees of freedom ``⟨(∂μ̂/∂y) z, z⟩``, ``z ~ N(0, I)`` (Hutchinson).

    With ``delta=None`` the directional derivative ``(∂μ̂/∂y) z`` is computed by implicit
    differentiation of the inner problem in ``y`` on the support,
    ``∂ŵ_S/∂y · z = H_SS⁻¹ X_Sᵀ z / n`` (for the Lasso ``X_S(X_SᵀX_S)⁻¹X_Sᵀ z``, the
    projection onto ``span(X_S)``); with a step ``delta`` it is the finite difference
    ``⟨μ̂(y + δz) − μ̂(y), z⟩/δ`` (Ramani, Blu & Unser, 2008: one more inner solve per probe).
    ``E⟨Jz, z⟩ = tr J``; averaged over an orthonormal basis of probes it is exactly ``tr J``.

    Parameters
    ----------
    problem, log_theta
        The least-squares model and its hyperparameters (log scale).
    n_probes, seed
        Number and seed of the Gaussian probes (ignored when ``probes`` is given).
    probes
        Explicit probes, shape ``(n,)`` or ``(n, K)``.
    delta
        ``None`` for the exact directional derivative, else the finite-difference step.
    solver
        Inner solver (also for the perturbed problems).
    coef
        A precomputed inner solution at ``y``.
    average
        Return the mean over probes (default) or the ``K`` per-probe estimates.

    Examples
    --------
    >>> import numpy as np
    >>> from dargmin.hyper import lasso
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(30, 6)); y = X[:, 0] - X[:, 1] + 0.3 * rng.normal(size=30)
    >>> prob = lasso(X, y, fit_intercept=False)
    >>> basis = np.eye(30)                 # orthonormal probes: exactly tr J = |S|
    >>> t = [np.log(0.1)]
    >>> mc = monte_carlo_degrees_of_freedom(prob, t, probes=basis)
    >>> round(mc * 30, 8) == lasso_degrees_of_freedom(prob, t)
    True
    """
    _check_problem(problem)
    with jax.enable_x64(True):
        theta = problem.check_theta(log_theta)
        w = _solve_inner(problem, theta, solver, None) if coef is None else np.asarray(coef)
        Z = _make_probes(problem.n_samples, n_probes, seed, probes)
        if delta is None:
            samples = _mc_df(problem, theta, _local(problem, theta, w), Z, grad=False)[0]
        else:
            if not (np.isfinite(delta) and delta > 0):
                raise ValueError(f"delta must be finite and > 0, got {delta}.")
            mu = problem.decision_function(problem.X, w)
            samples = np.empty(Z.shape[1])
            for k in range(Z.shape[1]):
                pk = _perturbed(problem, delta * Z[:, k])
                wk = _solve_inner(pk, theta, solver, w)
                diff = np.asarray(pk.decision_function(pk.X, wk)) - np.asarray(mu)
                samples[k] = diff @ Z[:, k] / delta
        return samples if not average else float(np.mean(samples))


def optimize_sure(
    problem: HyperProblem,
    sigma: float,
    log_theta0: Array | None = None,
    *,
    df: str = "exact",
    delta: float | None = None,
    n_probes: int = 1,
    seed: int = 0,
    probes: Array | None = None,
    method: str = "implicit",
    optimizer: Any = "gd",
    solver: Any = "auto",
    bounds: tuple[Array, Array] | None = None,
    max_iter: int = 50,
    gtol: float = 1e-6,
    ftol: float = 1e-5,
    max_step: float = 1.0,
    monitor: Monitor | None = None,
    progress: bool | None = False,
    **hypergradient_options: Any,
) -> OuterResult:
    """Select hyperparameters by minimizing SURE (no validation set) with hypergradients.

    The outer loop is :func:`~dargmin.hyper.minimize_hyper` on
    ``θ ↦ (SURE(θ), ∇SURE(θ))`` from :meth:`SURE.evaluate` (warm-started inner solves).
    With ``df="exact"`` the Lasso SURE jumps by ``2σ²`` at support changes and its gradient
    ignores the jumps; ``df="finite_difference"`` (SUGAR) smooths them out.

    Parameters
    ----------
    problem, sigma
        The least-squares model and the noise standard deviation.
    log_theta0, bounds
        Start and box (defaults :func:`~dargmin.hyper.default_log_theta0`,
        :func:`~dargmin.hyper.default_bounds`).
    df, delta, n_probes, seed, probes
        See :class:`SURE`.
    method, solver, **hypergradient_options
        See :func:`~dargmin.hyper.hypergradient`.
    optimizer, max_iter, gtol, ftol, max_step, monitor, progress
        See :func:`~dargmin.hyper.minimize_hyper`.

    Returns
    -------
    OuterResult
        ``value`` is the best SURE; ``coef`` the inner solution at the last evaluation.

    Examples
    --------
    >>> import numpy as np
    >>> from dargmin.hyper import lasso
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(60, 15)); y = X[:, :3] @ [2.0, -1.0, 1.0] + rng.normal(size=60)
    >>> res = optimize_sure(lasso(X, y), sigma=1.0, max_iter=20)
    >>> res.log_theta.shape
    (1,)
    """
    _check_problem(problem)
    crit = SURE(sigma, df, delta=delta, n_probes=n_probes, seed=seed, probes=probes)
    theta0 = default_log_theta0(problem) if log_theta0 is None else log_theta0
    theta0 = problem.check_theta(theta0)
    if bounds is None:
        bounds = default_bounds(problem)

    def evaluate(th: np.ndarray, w0: Any) -> tuple[float, np.ndarray, Any]:
        # SURE keeps its own warm starts between calls; w0 is not needed here.
        res = crit.evaluate(problem, th, method=method, solver=solver, **hypergradient_options)
        return res.value, res.grad, res.coef

    return minimize_rejecting_singular(
        evaluate,
        theta0,
        optimizer=optimizer,
        bounds=bounds,
        max_iter=max_iter,
        gtol=gtol,
        ftol=ftol,
        max_step=max_step,
        monitor=monitor,
        progress=progress,
    )
