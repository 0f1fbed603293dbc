"""Stein's unbiased risk estimate (SURE) as a criterion, and its evaluator (with SUGAR).

``SURE(θ) = ‖y − μ̂‖² − nσ² + 2σ² df`` estimates the in-sample prediction risk of a
least-squares model from the training data alone; ``df`` comes from :mod:`._dof`. A
:class:`SURE` object is an immutable criterion; :meth:`SURE.evaluate` runs the solves (the
inner problem, and for finite differences one perturbed problem per probe, whose
``θ``-gradient is SUGAR: Deledalle, Vaiter, Fadili & Peyré, 2014) in an evaluator it keeps
in its cache.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from dargmin.hyper._criteria import Criterion
from dargmin.hyper._dof import (
    _check_df,
    _check_problem,
    _check_sigma,
    _exact_df,
    _local,
    _make_probes,
    _mc_df,
    _perturbed,
    default_delta,
)
from dargmin.hyper._evaluation import hypergradient
from dargmin.hyper._hypergradients import _support
from dargmin.hyper._problems import Cache, HyperProblem
from dargmin.hyper._registry import resolve

Array = Any


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


class _FitTerm(eqx.Module, Criterion):
    """``a‖t − Xw‖² + ⟨Xw, c⟩`` on the (centered) design and target of the problem."""

    a: float
    c: np.ndarray | None

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


class _SureEvaluator:
    """The solves behind :meth:`SURE.evaluate` on one problem: probes, perturbed problems
    (finite differences), one solver per inner problem and their warm starts."""

    def __init__(self, crit: SURE, problem: HyperProblem, solver: Any):
        n = problem.n_samples
        self.crit, self.problem, self.solver_arg = crit, problem, solver
        self.Z = _make_probes(n, crit.n_probes, crit.seed, crit.probes)
        self.delta = default_delta(crit.sigma, n) if crit.delta is None else crit.delta
        self.solver = resolve("solver", solver, problem)
        self.coef: np.ndarray | None = None
        self.perturbed: list[HyperProblem] = []
        self.solvers: list[Any] = []
        if crit.df == "finite_difference":
            K = self.Z.shape[1]
            self.perturbed = [_perturbed(problem, self.delta * self.Z[:, k]) for k in range(K)]
            # One solver object per inner problem keeps each warm start (scikit-learn's
            # lives in the estimator object); solver instances are copied, not shared.
            self.solvers = [
                resolve("solver", solver if isinstance(solver, str) else copy.deepcopy(solver), p)
                for p in self.perturbed
            ]
            self.coefs: list[np.ndarray | None] = [None] * K

    def evaluate(self, theta: np.ndarray, method: Any, w0: Array | None) -> SureResult:
        problem, crit = self.problem, self.crit
        n, s2 = problem.n_samples, crit.sigma**2
        w_start = self.coef if w0 is None else w0
        if crit.df == "finite_difference":
            return self._evaluate_fd(theta, method, w_start)
        hg = hypergradient(
            problem, _FitTerm(1.0, None), theta, method=method, solver=self.solver, w0=w_start
        )
        self.coef = w = np.asarray(hg.coef)
        loc = _local(problem, theta, w)
        if crit.df == "exact":
            df, ddf = _exact_df(problem, theta, loc, grad=True)
        else:
            samples, ddf = _mc_df(problem, theta, loc, self.Z, grad=True)
            df = float(np.mean(samples))
        value = hg.value - n * s2 + 2.0 * s2 * df
        grad = np.asarray(hg.grad) + 2.0 * s2 * np.asarray(ddf)
        return SureResult(float(value), grad, df, w, int(loc.S.size), 1)

    def _evaluate_fd(self, theta, method, w_start) -> SureResult:
        problem, Z, delta = self.problem, self.Z, self.delta
        n, s2, K = problem.n_samples, self.crit.sigma**2, Z.shape[1]
        scale = 2.0 * s2 / (delta * K)
        # SURE_FD = [‖t − Xŵ‖² − scale Σ_k⟨Xŵ, z_k⟩] + Σ_k scale⟨Xŵ'_k, z_k⟩ − nσ² + const:
        # one hypergradient per inner problem (at y and at each y + δz_k).
        hg = hypergradient(
            problem,
            _FitTerm(1.0, -scale * Z.sum(axis=1)),
            theta,
            method=method,
            solver=self.solver,
            w0=w_start,
        )
        self.coef = w = np.asarray(hg.coef)
        value, grad = hg.value, np.asarray(hg.grad, dtype=float).copy()
        fit = problem.design @ w
        df_samples = np.empty(K)
        for k, pk in enumerate(self.perturbed):
            hk = hypergradient(
                pk,
                _FitTerm(0.0, scale * Z[:, k]),
                theta,
                method=method,
                solver=self.solvers[k],
                w0=self.coefs[k] if self.coefs[k] is not None else w,
            )
            self.coefs[k] = wk = np.asarray(hk.coef)
            value += hk.value
            grad += np.asarray(hk.grad)
            df_samples[k] = (pk.design @ wk - fit) @ Z[:, k] / delta
        # The intercept (mean of y) moves by δ z̄_k: ⟨δ z̄_k 1, z_k⟩/δ = (Σz_k)²/n.
        mean_part = np.sum(Z, axis=0) ** 2 / n if problem.fit_intercept else np.zeros(K)
        df_samples += mean_part
        value += -n * s2 + 2.0 * s2 * float(np.mean(mean_part))
        S = _support(problem, w, np.asarray(problem.penalties(jnp.asarray(theta))[0]))
        return SureResult(float(value), grad, float(np.mean(df_samples)), w, int(S.size), 1 + K)


class SURE(eqx.Module, Criterion):
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

    Immutable; the solves (inner problem, perturbed problems of the finite-difference
    mode, warm starts) are run by an evaluator kept in :attr:`cache`. Use :meth:`evaluate`
    or :func:`optimize_sure` for every model and mode.
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

    sigma: float
    df: str
    delta: float | None
    n_probes: int
    seed: int
    probes: Array | None
    cache: Cache = eqx.field(repr=False, static=True)

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
        self.cache = Cache()

    def evaluator(self, problem: HyperProblem, solver: Any = "auto") -> _SureEvaluator:
        """The evaluator of this SURE on ``problem`` (reused while both stay the same)."""
        last = self.cache.get("evaluator", lambda: None)
        if last is not None and last.problem is problem and last.solver_arg is solver:
            return last
        ev = _SureEvaluator(self, problem, solver)
        self.cache.set("evaluator", ev)
        return ev

    def evaluate(
        self,
        problem: HyperProblem,
        log_theta: Array,
        *,
        method: Any = "implicit",
        solver: Any = "auto",
        w0: Array | None = None,
        **hypergradient_options: Any,
    ) -> SureResult:
        """``SURE(θ)`` and its gradient in ``log_theta`` (SUGAR for finite differences).

        The data-fit term ``‖y − μ̂‖²`` (and, for finite differences, the inner products
        with the perturbed fits) is differentiated by :func:`~dargmin.hyper.hypergradient`
        with ``method`` (a method object or name); the ``θ``-dependence of the exact /
        Monte-Carlo ``df`` (through an ℓ2 strength ``μ(θ)``; none for the Lasso, whose
        ``df`` is locally constant) is differentiated in closed form on the support. Warm
        starts are kept between calls on the same problem.

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
        with jax.enable_x64(True):
            theta = problem.check_theta(log_theta)
            meth = resolve("method", method, problem, **hypergradient_options)
            return self.evaluator(problem, solver).evaluate(theta, meth, w0)

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


#: The keyword options of :class:`SURE` besides ``sigma`` and ``df``.
SURE_OPTIONS = frozenset({"delta", "n_probes", "seed", "probes"})


def split_options(
    options: dict[str, Any], names: frozenset[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``options`` split into those named in ``names`` and the others."""
    picked = {k: v for k, v in options.items() if k in names}
    return picked, {k: v for k, v in options.items() if k not in names}


def _sure(
    problem: HyperProblem,
    log_theta: Array,
    sigma: float,
    *,
    df: str = "exact",
    method: str = "implicit",
    solver: Any = "auto",
    w0: Array | None = None,
    **options: Any,
) -> SureResult:
    """Value and ``log_theta``-gradient of Stein's unbiased risk estimate.

    .. math::

        \\mathrm{SURE}(\\theta) = \\|y - \\hat\\mu\\|^2 - n\\sigma^2 + 2\\sigma^2\\,\\mathrm{df}

    with ``df`` exact, Monte-Carlo or finite-difference (then the gradient is SUGAR); see
    :class:`SURE` for the parameters (``delta``, ``n_probes``, ``seed``, ``probes`` among
    ``options``; the other options go to the hypergradient method) and
    :meth:`SURE.evaluate` for the computation. Deprecated as ``dargmin.hyper.sure``: use
    ``SURE(sigma, df=...).evaluate(problem, log_theta)``.

    Examples
    --------
    >>> import numpy as np
    >>> from dargmin.hyper import ridge
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(30, 5)); y = X @ np.ones(5) + rng.normal(size=30)
    >>> res = _sure(ridge(X, y, fit_intercept=False), [np.log(0.1)], sigma=1.0)
    >>> bool(0 < res.df < 5), res.grad.shape
    (True, (1,))
    """
    sure_options, hypergradient_options = split_options(options, SURE_OPTIONS)
    return SURE(sigma, df, **sure_options).evaluate(
        problem, log_theta, method=method, solver=solver, w0=w0, **hypergradient_options
    )


def _sugar_gradient(
    problem: HyperProblem, log_theta: Array, sigma: float, **options: Any
) -> np.ndarray:
    """SUGAR: the ``log_theta``-gradient of the finite-difference Monte-Carlo SURE.

    .. math::

        \\nabla_\\theta\\Big[\\|y - \\hat\\mu(y,\\theta)\\|^2 - n\\sigma^2
            + \\frac{2\\sigma^2}{\\delta}\\big\\langle \\hat\\mu(y + \\delta z, \\theta)
            - \\hat\\mu(y, \\theta),\\, z\\big\\rangle\\Big]

    (Deledalle, Vaiter, Fadili & Peyré, 2014): two inner solves and two hypergradients per
    probe pair, ``≈ (1 + K)`` of each for ``K`` probes; ``options`` as in :func:`_sure`.
    Deprecated as ``dargmin.hyper.sugar_gradient``: use
    ``SURE(sigma, "finite_difference", ...).evaluate(problem, log_theta).grad``.

    Examples
    --------
    >>> import numpy as np
    >>> from dargmin.hyper import lasso
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(40, 8)); y = X[:, 0] + 0.5 * rng.normal(size=40)
    >>> _sugar_gradient(lasso(X, y), [np.log(0.05)], sigma=0.5).shape
    (1,)
    """
    return _sure(problem, log_theta, sigma, df="finite_difference", **options).grad
