"""Degrees of freedom ``tr ∂μ̂/∂y`` of least-squares models: exact, Monte-Carlo, finite differences.

Used by :class:`~dargmin.hyper.SURE` (risk estimation without a validation set).

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

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dargmin.hyper._hypergradients import _restricted_hessian, _support
from dargmin.hyper._problems import HyperProblem, Quadratic, _check_finite
from dargmin.hyper._registry import resolve
from dargmin.hyper._support_solve import _support_solve

Array = Any
DF_MODES = ("exact", "monte_carlo", "finite_difference")


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
        _check_finite("probes", Z, "pass finite probes or None for Gaussian draws")
        return Z
    if int(n_probes) < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}.")
    return np.random.default_rng(seed).standard_normal((n, int(n_probes)))


def _solve_inner(problem: HyperProblem, theta: np.ndarray, solver: Any, w0: Array | None):
    return np.asarray(resolve("solver", solver, problem).solve(problem, theta, w0).coef)


def _perturbed(problem: HyperProblem, shift: np.ndarray) -> HyperProblem:
    """The same inner problem with targets ``y + shift``."""
    return problem.with_data(problem.X, problem.y + shift)


# ---------------------------------------------------------------------- local derivative in y
class _Local(NamedTuple):
    """The solution map's derivative in ``y`` at ``ŵ``: ``∂ŵ_S/∂y = H⁻¹ X_Sᵀ/n``."""

    S: np.ndarray
    XS: np.ndarray
    Hinv: np.ndarray
    intercept: bool
    rank: int

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
        return _Local(S, problem.design[:, S], np.zeros((0, 0)), problem.fit_intercept, 0)
    H, XS, _ = _restricted_hessian(problem, w, S, l2)
    # The (pseudo-)inverse: with duplicate active columns of a pure ℓ1 model, H⁺ gives the
    # derivative of the (unique) prediction, X_S H⁺ X_Sᵀ/n the projection onto span(X_S).
    sol = _support_solve(H, np.eye(S.size), problem, mu=l2[S])
    Hinv = sol.x
    return _Local(S, XS, 0.5 * (Hinv + Hinv.T), problem.fit_intercept, sol.rank)


def _exact_df(problem: HyperProblem, theta: np.ndarray, loc: _Local, grad: bool):
    """``df = tr(H⁻¹A) (+1)`` with ``A = X_SᵀX_S/n``, and ``∂df/∂θ`` through ``μ(θ)``."""
    n = problem.n_samples
    mu = np.asarray(problem.penalties(jnp.asarray(theta))[1])[loc.S]
    # tr(H⁺A) = tr(H⁺(H − diag μ_S)) = rank H − Σ_j μ_j (H⁺)_jj: exactly |S| for the Lasso
    # (the rank of X_S with duplicate or collinear active columns).
    df = loc.rank - float(np.sum(mu * np.diag(loc.Hinv))) + float(loc.intercept)
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


def _fd_samples(problem, theta, w, Z, delta, solver) -> np.ndarray:
    """Per-probe ``⟨μ̂(y + δz) − μ̂(y), z⟩/δ`` (one more inner solve per probe)."""
    if not (np.isfinite(delta) and delta > 0):
        raise ValueError(f"delta must be finite and > 0, got {delta}.")
    mu = np.asarray(problem.decision_function(problem.X, w))
    samples = np.empty(Z.shape[1])
    for k in range(Z.shape[1]):
        pk = _perturbed(problem, delta * Z[:, k])
        wk = _solve_inner(pk, theta, solver, w)
        samples[k] = (np.asarray(pk.decision_function(pk.X, wk)) - mu) @ Z[:, k] / delta
    return samples


def degrees_of_freedom(
    problem: HyperProblem,
    log_theta: Array,
    *,
    df: str = "exact",
    n_probes: int = 1,
    seed: int = 0,
    probes: Array | None = None,
    delta: float | None = None,
    solver: Any = "auto",
    coef: Array | None = None,
    average: bool = True,
) -> float | np.ndarray:
    """Degrees of freedom ``tr ∂μ̂/∂y`` of a least-squares model at ``log_theta``.

    .. math::

        \\mathrm{df} = \\operatorname{tr}\\big(X_S H_{SS}^{+} X_S^\\top\\big)/n
            \\;(+1 \\text{ with an intercept}),
        \\qquad H_{SS} = X_S^\\top X_S / n + \\operatorname{diag}(\\mu_S),

    i.e. ``|S|`` for the Lasso (Zou, Hastie & Tibshirani, 2007; the rank of ``X_S`` with
    duplicate or collinear active columns) and ``tr X(XᵀX + nμI)⁻¹Xᵀ`` for ridge (``½n``
    scaling of the data fit). Three estimates:

    ``df="exact"``
        The trace above.
    ``df="monte_carlo"``
        ``⟨(∂μ̂/∂y) z, z⟩`` for probes ``z ~ N(0, I)`` (Hutchinson), the directional
        derivative by implicit differentiation in ``y`` on the support.
    ``df="finite_difference"``
        ``⟨μ̂(y + δz) − μ̂(y), z⟩/δ`` (Ramani, Blu & Unser, 2008): one more inner solve per
        probe; ``delta`` is required.

    ``E⟨Jz, z⟩ = tr J``; averaged over an orthonormal basis of probes it is exactly ``tr J``.

    Parameters
    ----------
    problem, log_theta
        A least-squares :class:`~dargmin.hyper.HyperProblem` and its hyperparameters.
    df
        ``"exact"``, ``"monte_carlo"`` or ``"finite_difference"``.
    n_probes, seed, probes
        Number and seed of the Gaussian probes, or explicit probes ``(n,)`` / ``(n, K)``.
    delta
        Finite-difference step (``df="finite_difference"``).
    solver
        Inner solver (also for the perturbed problems).
    coef
        A precomputed inner solution at ``y``.
    average
        Return the mean over probes (default) or the ``K`` per-probe estimates.

    Examples
    --------
    >>> import numpy as np
    >>> from dargmin.hyper import ridge, lasso
    >>> X = np.eye(4)                      # s² = 1, n = 4: df = 4 / (1 + 4μ)
    >>> round(degrees_of_freedom(ridge(X, np.eye(4)[0], fit_intercept=False), [np.log(0.25)]), 12)
    2.0
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(30, 6)); y = X[:, 0] - X[:, 1] + 0.3 * rng.normal(size=30)
    >>> prob, t = lasso(X, y, fit_intercept=False), [np.log(0.1)]
    >>> mc = degrees_of_freedom(prob, t, df="monte_carlo", probes=np.eye(30))  # basis: exact
    >>> bool(abs(30 * mc - degrees_of_freedom(prob, t)) < 1e-8)
    True
    """
    _check_problem(problem)
    _check_df(df)
    with jax.enable_x64(True):
        theta = problem.check_theta(log_theta)
        w = _solve_inner(problem, theta, solver, None) if coef is None else np.asarray(coef)
        if df == "exact":
            return _exact_df(problem, theta, _local(problem, theta, w), grad=False)[0]
        Z = _make_probes(problem.n_samples, n_probes, seed, probes)
        if df == "monte_carlo":
            samples = _mc_df(problem, theta, _local(problem, theta, w), Z, grad=False)[0]
        else:
            if delta is None:
                raise ValueError(
                    "df='finite_difference' needs a step delta, e.g. "
                    "delta=dargmin.hyper.default_delta(sigma, n_samples)."
                )
            samples = _fd_samples(problem, theta, w, Z, float(delta), solver)
        return samples if not average else float(np.mean(samples))


def _lasso_degrees_of_freedom(problem, log_theta, *, solver="auto", coef=None) -> int:
    """Deprecated ``lasso_degrees_of_freedom``: ``|S|`` (+1), the count of non-zeros."""
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


def _monte_carlo_degrees_of_freedom(problem, log_theta, *, delta=None, **kwargs):
    """Deprecated ``monte_carlo_degrees_of_freedom``: JVP probes, or FD with ``delta``."""
    df = "monte_carlo" if delta is None else "finite_difference"
    return degrees_of_freedom(problem, log_theta, df=df, delta=delta, **kwargs)
