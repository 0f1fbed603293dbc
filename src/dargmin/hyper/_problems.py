"""Inner problems of bilevel hyperparameter selection.

Every inner problem handled by :mod:`dargmin.hyper` has the form

.. math::

    \\hat w(\\theta) = \\arg\\min_w \\; \\sum_{i=1}^n \\ell(z_i, y_i)
        + \\sum_{j=1}^p \\lambda_j(\\theta)\\,|w_j|
        + \\tfrac12 \\sum_{j=1}^p \\mu_j(\\theta)\\, w_j^2 ,
    \\qquad z = X w ,

with a smooth data fit ``ℓ`` that is separable over samples (a :class:`Datafit`) and
hyperparameters ``θ`` in log scale mapped to the per-feature penalty strengths ``λ(θ) ≥ 0``
(ℓ1) and ``μ(θ) ≥ 0`` (squared ℓ2). Lasso, elastic net, weighted Lasso, ridge and ℓ1/ℓ2
logistic regression are all of this form; so is any user model built with
:class:`HyperProblem` directly.

The structure is what makes the non-smooth hypergradient cheap: at a solution the ℓ1 term
is differentiable on the support ``S = {j : ŵ_j ≠ 0}`` and the Jacobian ``dŵ/dθ`` vanishes
off ``S`` (away from support changes), so implicit differentiation only needs the
``|S| × |S|`` system ``X_Sᵀ diag(ℓ'') X_S + diag(μ_S)``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from dargmin.hyper._datafits import Datafit, Quadratic
from dargmin.hyper._penalty_maps import (
    _HOST_VJP,
    PenaltyMap,
    _host_maps,
    _penalty_vectors,
    _penalty_vjp,
)

Array = Any


def _check_finite(
    name: str, arr: np.ndarray, fix: str = "hyperparameter selection needs finite data"
) -> None:
    bad = ~np.isfinite(arr)
    if np.any(bad):
        raise ValueError(
            f"{name} contains {int(bad.sum())} non-finite value(s) (NaN or inf) out of "
            f"{arr.size}; {fix}."
        )


class _host_method:
    """A method bound by :func:`functools.partial` instead of equinox's ``BoundMethod``.

    An ``eqx.Module`` returns each bound method as a ``BoundMethod`` module (so that it is a
    pytree), which costs 0.1-0.4 ms per access; the host-side methods below run once per
    fold and evaluation of the outer loop (hundreds of times a fit) and are never passed
    to a JAX transformation.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.__doc__, self.__name__, self.__wrapped__ = fn.__doc__, fn.__name__, fn

    def __get__(self, obj: Any, objtype: Any = None) -> Callable[..., Any]:
        return self.fn if obj is None else partial(self.fn, obj)


class Cache:
    """An explicit, mutable store owned by an immutable object (created at construction).

    Frozen problems and criteria keep derived quantities that are expensive and not always
    needed (an SVD, a spectral norm, per-fold designs, warm starts) here, computed on
    first use: the frozen object itself is never written after construction.

    Examples
    --------
    >>> c = Cache()
    >>> c.get("answer", lambda: 42), c.get("answer", lambda: 0)
    (42, 42)
    """

    __slots__ = ("_store",)

    def __init__(self) -> None:
        self._store: dict[Any, Any] = {}

    def get(self, key: Any, compute: Callable[[], Any]) -> Any:
        """The value under ``key``, computed by ``compute()`` the first time."""
        if key not in self._store:
            self._store[key] = compute()
        return self._store[key]

    def set(self, key: Any, value: Any) -> None:
        """Store ``value`` under ``key`` (e.g. a warm start)."""
        self._store[key] = value

    def __repr__(self) -> str:
        return f"Cache({len(self._store)} entries)"


class HyperProblem(eqx.Module):
    """A parametrized inner problem ``ŵ(θ) = argmin_w F(w, θ)`` on training data.

    .. math::

        F(w, \\theta) = \\sum_i \\ell\\big((Xw)_i + b, y_i\\big)
            + \\sum_j \\lambda_j(\\theta)|w_j| + \\tfrac12 \\sum_j \\mu_j(\\theta) w_j^2 .

    The intercept ``b`` (``fit_intercept=True``) is handled as scikit-learn does for least
    squares (centering ``X`` and ``y``; ``b = ȳ − x̄ᵀw``) and, for other data fits, as an
    extra unpenalized column of ones (the last coordinate of ``w``).

    Immutable (an :class:`equinox.Module`): the derived arrays (``design``, ``target``,
    offsets, column norms, the gradient scale) are computed at construction; quantities
    needed by some solvers only (an SVD, the spectral norm) live in :attr:`cache`, a
    :class:`Cache` created with the problem.

    Parameters
    ----------
    X, y
        Training design ``(n, p)`` and targets ``(n,)``; finite values only.
    datafit
        A :class:`Datafit` (``Quadratic()``, ``Logistic()`` or a user subclass).
    n_hyper
        Number of hyperparameters (the length of ``log_theta``).
    l1, l2
        Maps ``log_theta ↦ λ`` and ``log_theta ↦ μ`` (JAX-traceable, returning a scalar or
        a ``(p,)`` vector of non-negative values); ``None`` for no such penalty.
    fit_intercept
        Fit an unpenalized intercept.
    name
        A label used in messages.
    check_finite
        Check ``X`` and ``y`` for NaN and inf (``False`` only for data known finite, such as
        the rows of a checked problem: :meth:`subset`).

    Examples
    --------
    >>> import numpy as np, jax.numpy as jnp
    >>> X, y = np.eye(3), np.array([1.0, -2.0, 0.1])
    >>> prob = HyperProblem(X, y, Quadratic(), n_hyper=1, l1=lambda t: jnp.exp(t[0]),
    ...                     fit_intercept=False)
    >>> prob.n_features, prob.alpha_max()            # ‖Xᵀy‖∞ / n
    (3, 0.666...)
    """

    X: np.ndarray
    y: np.ndarray
    datafit: Datafit
    n_hyper: int
    l1: PenaltyMap | None
    l2: PenaltyMap | None
    fit_intercept: bool
    name: str
    design: np.ndarray = eqx.field(repr=False)
    target: np.ndarray = eqx.field(repr=False)
    x_offset: np.ndarray = eqx.field(repr=False)
    y_offset: float = eqx.field(repr=False)
    col_sq: np.ndarray = eqx.field(repr=False)
    grad_scale: float = eqx.field(repr=False)
    cache: Cache = eqx.field(repr=False, static=True)

    def __init__(
        self,
        X: Array,
        y: Array,
        datafit: Datafit,
        n_hyper: int,
        l1: PenaltyMap | None = None,
        l2: PenaltyMap | None = None,
        fit_intercept: bool = True,
        name: str = "problem",
        *,
        check_finite: bool = True,
    ) -> None:
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if X.ndim != 2:
            raise ValueError(
                f"X must be a 2-D array (n_samples, n_features), got shape {X.shape}; "
                "reshape a single feature with X.reshape(-1, 1)."
            )
        if y.ndim != 1 or y.shape[0] != X.shape[0]:
            raise ValueError(
                f"y must be a 1-D array with one entry per row of X: X has shape {X.shape}, "
                f"y has shape {y.shape}."
            )
        if X.shape[0] < 2:
            raise ValueError(f"Need at least 2 samples, got {X.shape[0]}.")
        if check_finite:
            _check_finite("X", X)
            _check_finite("y", y)
        if l1 is None and l2 is None:
            raise ValueError(
                "A HyperProblem needs an l1 or an l2 penalty map (or both), e.g. "
                "l1=lambda t: jnp.exp(t[0])."
            )
        if int(n_hyper) < 1:
            raise ValueError(f"n_hyper must be >= 1, got {n_hyper}.")
        y = datafit.validate_target(y)
        n, p = X.shape
        quadratic = isinstance(datafit, Quadratic)
        if fit_intercept and quadratic:
            # Centering is exact for least squares: the optimal intercept is ȳ − x̄ᵀw for any
            # w, so the reduced problem in w has the centered data and no intercept.
            x_off, y_off = X.mean(axis=0), float(y.mean())
            design, target = np.subtract(X, x_off, order="F"), y - y_off
        elif fit_intercept:
            x_off, y_off = np.zeros(p), 0.0
            design, target = np.empty((n, p + 1), order="F"), y
            design[:, :p], design[:, p] = X, 1.0
        else:
            # The design is X itself (one column-major copy, shared).
            X = np.asfortranarray(X)
            x_off, y_off = np.zeros(p), 0.0
            design, target = X, y
        self.X, self.y, self.datafit, self.n_hyper = X, y, datafit, int(n_hyper)
        self.l1, self.l2, self.fit_intercept, self.name = l1, l2, bool(fit_intercept), name
        # Column-major (built so, no extra copy): coordinate descent (scikit-learn's kernel,
        # the working sets) reads columns, and the support systems gather them. On
        # make_regression 300x1000, LassoHyperCV's fit 2.5 ms (5 %) faster than with the
        # row-major design, which each fold's solver copied.
        self.design = np.asfortranarray(design)
        self.target = target
        self.x_offset, self.y_offset = x_off, y_off
        # einsum: no squared copy of the design (each fold builds one problem).
        self.col_sq = np.einsum("ij,ij->j", self.design, self.design)
        # On the host: eager JAX calls here compiled a kernel each on a first fit.
        g0 = self.design.T @ datafit.grad_host(np.zeros(n), np.asarray(target))
        # Scale of the relative KKT violation: ‖∇f(0)‖∞ (guarded for an all-zero problem).
        self.grad_scale = max(float(np.max(np.abs(g0))), 1e-300)
        self.cache = Cache()

    # ------------------------------------------------------------------ structure
    @property
    def n_samples(self) -> int:
        """Number of training samples ``n``."""
        return int(self.X.shape[0])

    @property
    def n_features(self) -> int:
        """Number of features ``p`` (without the intercept column)."""
        return int(self.X.shape[1])

    @property
    def augmented(self) -> bool:
        """Whether the intercept is the last coordinate of ``w``."""
        return self.fit_intercept and not isinstance(self.datafit, Quadratic)

    @property
    def n_coef(self) -> int:
        """Length of the inner variable ``w`` (``p``, or ``p + 1`` with an intercept column)."""
        return self.n_features + int(self.augmented)

    @property
    def smooth(self) -> bool:
        """True when there is no ℓ1 term (the inner problem is differentiable)."""
        return self.l1 is None

    @_host_method
    def l1_coordinates(self) -> np.ndarray:
        """Which entries of ``log_theta`` are ℓ1 strengths (a boolean vector).

        Read from the penalty maps themselves: entry ``i`` is an ℓ1 strength when ``λ``
        depends on ``θᵢ`` (``∂λ/∂θᵢ ≠ 0`` at ``θ = 0``), an ℓ2 strength otherwise.

        Examples
        --------
        >>> import numpy as np
        >>> from dargmin.hyper import elastic_net
        >>> elastic_net(np.eye(3), np.ones(3)).l1_coordinates().tolist()
        [True, False]
        """

        def compute() -> np.ndarray:
            if self.l1 is None:
                return np.zeros(self.n_hyper, dtype=bool)
            host = _host_maps(self.l1, self.l2)
            if host is not None:
                # The factories' e^θ maps: θᵢ drives λ when moving it alone changes λ.
                base = host[0](np.zeros(self.n_hyper))
                return np.array(
                    [np.any(host[0](np.eye(self.n_hyper)[i]) != base) for i in range(self.n_hyper)]
                )
            with jax.enable_x64(True):
                jac = jax.jacfwd(lambda t: self.penalties(t)[0])(jnp.zeros(self.n_hyper))
            return np.asarray(np.any(np.asarray(jac) != 0, axis=0))

        return np.asarray(self.cache.get("l1_coordinates", compute))

    @_host_method
    def check_theta(self, log_theta: Array) -> np.ndarray:
        """Validate ``log_theta`` (shape, finiteness) and return it as a float64 vector."""
        t = np.asarray(log_theta, dtype=np.float64).reshape(-1)
        if t.shape[0] != self.n_hyper:
            raise ValueError(
                f"{self.name} has {self.n_hyper} hyperparameter(s); log_theta has "
                f"{t.shape[0]} entries (shape {np.shape(log_theta)})."
            )
        if not np.all(np.isfinite(t)):
            raise ValueError(
                f"log_theta must be finite (penalties are exp(log_theta)), got {t.tolist()[:5]}."
            )
        if np.any(np.abs(t) > 700):
            raise ValueError(
                f"log_theta = {t[np.argmax(np.abs(t))]:.4g} is outside the representable "
                "range: exp overflows or underflows to 0 beyond ±700."
            )
        return t

    def penalties(self, log_theta: Array) -> tuple[Array, Array]:
        """Per-coordinate ``(λ, μ)`` of length :attr:`n_coef` (zeros for the intercept).

        JAX-traceable: used inside solvers and differentiated by the hypergradient methods.
        """
        return _penalty_vectors(
            jnp.asarray(log_theta), self.l1, self.l2, self.n_features, self.augmented
        )

    @_host_method
    def penalties_host(self, log_theta: Array) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`penalties` as NumPy arrays, kept for the last ``log_theta``: a fold's
        solver, KKT check and hypergradient all ask at the same point."""
        t = np.asarray(log_theta, dtype=np.float64).reshape(-1)
        last = self.cache.get("penalties_host", lambda: None)
        if last is not None and np.array_equal(last[0], t):
            return last[1]
        host = _host_maps(self.l1, self.l2)
        if host is not None:
            # The factories' maps in NumPy: an eager JAX call costs about 0.3 ms, and the
            # outer loop asks once per fold and evaluation.
            out = (self._host_vec(host[0](t)), self._host_vec(host[1](t)))
        else:
            with jax.enable_x64(True):
                l1, l2 = self.penalties(jnp.asarray(t))
                out = (np.asarray(l1), np.asarray(l2))
        self.cache.set("penalties_host", (t, out))
        return out

    @_host_method
    def _host_vec(self, v: np.ndarray) -> np.ndarray:
        out = np.broadcast_to(v, (self.n_features,)).astype(np.float64)
        return np.concatenate([out, [0.0]]) if self.augmented else out

    @_host_method
    def penalty_vjp(self, log_theta: Array, c_l1: Array, c_l2: Array) -> np.ndarray:
        """``(dλ/dθ)ᵀ c_l1 + (dμ/dθ)ᵀ c_l2`` (compiled once per model type and size)."""
        host = _host_maps(self.l1, self.l2)
        if host is not None:
            # e^θ maps: dλ/dθᵢ = λ on the coordinates θᵢ drives (no compilation, no dispatch).
            t = np.asarray(log_theta, dtype=np.float64).reshape(-1)
            p = self.n_features
            out = np.zeros(self.n_hyper)
            for fn, c in ((self.l1, c_l1), (self.l2, c_l2)):
                if fn is not None:
                    _HOST_VJP[fn](t, np.asarray(c, dtype=np.float64)[:p], out)
            return out
        out = _penalty_vjp(
            np.asarray(log_theta, dtype=np.float64),
            np.asarray(c_l1, dtype=np.float64),
            np.asarray(c_l2, dtype=np.float64),
            self.l1,
            self.l2,
            self.n_features,
            self.augmented,
        )
        return np.asarray(out)

    @_host_method
    def prediction_design(self, X_new: np.ndarray) -> tuple[np.ndarray, float]:
        """``(A, c)`` with predictions ``A w + c`` on ``X_new`` (intercept folded in)."""
        if self.augmented:
            return np.hstack([X_new, np.ones((X_new.shape[0], 1))]), 0.0
        if self.fit_intercept:
            return X_new - self.x_offset, self.y_offset
        return X_new, 0.0

    def objective(self, w: Array, log_theta: Array) -> Array:
        """The inner objective ``F(w, θ)`` (JAX)."""
        l1, l2 = self.penalties(log_theta)
        z = jnp.asarray(self.design) @ w
        return (
            self.datafit.value(z, jnp.asarray(self.target))
            + jnp.sum(l1 * jnp.abs(w))
            + 0.5 * jnp.sum(l2 * w**2)
        )

    @_host_method
    def alpha_max(self) -> float:
        """``‖Xᵀ∇ℓ(0)‖∞``: the smallest ℓ1 strength for which ``ŵ = 0`` (single α)."""
        z0 = np.zeros(self.n_samples)
        if self.augmented:
            # With an intercept the reference point is the intercept-only model; solve it by a
            # few Newton steps on the single unpenalized coordinate.
            b = 0.0
            for _ in range(50):
                zb = np.full(self.n_samples, b)
                g = float(np.sum(self.datafit.grad_host(zb, self.target)))
                h = float(np.sum(self.datafit.hess_diag_host(zb, self.target)))
                b -= g / max(h, 1e-12)
            z0 = np.full(self.n_samples, b)
        grad = self.datafit.grad_host(z0, np.asarray(self.target))
        return float(np.max(np.abs(self.design[:, : self.n_features].T @ grad)))

    # ------------------------------------------------------------------ predictions
    @_host_method
    def coef_intercept(self, w: Array) -> tuple[np.ndarray, float]:
        """Split an inner solution into ``(coef, intercept)`` on the original scale."""
        w = np.asarray(w, dtype=np.float64)
        if self.augmented:
            return w[:-1], float(w[-1])
        return w, float(self.y_offset - self.x_offset @ w) if self.fit_intercept else 0.0

    def decision_function(self, X_new: Array, w: Array) -> Array:
        """Linear predictions ``X_new coef + intercept`` (JAX-traceable in ``w``)."""
        X_new = jnp.asarray(X_new)
        if self.augmented:
            return X_new @ w[:-1] + w[-1]
        if self.fit_intercept:
            return (X_new - jnp.asarray(self.x_offset)) @ w + self.y_offset
        return X_new @ w

    @_host_method
    def subset(self, rows: np.ndarray) -> HyperProblem:
        """The same problem on the training rows ``rows`` (used by cross-validation)."""
        # The rows of checked data are finite: no second check per fold.
        return self.with_data(self.X[rows], self.y[rows], check_finite=False)

    @_host_method
    def with_data(self, X: Array, y: Array, *, check_finite: bool = True) -> HyperProblem:
        """The same model (data fit, penalties, intercept) on other data ``(X, y)``."""
        return HyperProblem(
            X,
            y,
            self.datafit,
            self.n_hyper,
            l1=self.l1,
            l2=self.l2,
            fit_intercept=self.fit_intercept,
            name=self.name,
            check_finite=check_finite,
        )

    @_host_method
    def null_model_reason(self) -> str | None:
        """Why every penalty gives the null model ``ŵ = 0`` (``None`` when it does not).

        The ℓ1 path is entirely zero when ``α_max = ‖Xᵀ∇ℓ(0)‖∞`` vanishes (up to rounding):
        for a zero or constant ``y`` (with an intercept) or an all-zero (or, with an
        intercept, all-constant) ``X``; then there is nothing to select.

        Examples
        --------
        >>> import numpy as np
        >>> from dargmin.hyper import lasso
        >>> lasso(np.random.default_rng(0).normal(size=(5, 2)), np.full(5, 3.0)).null_model_reason()
        'y is constant (the intercept fits it exactly)'
        """
        if not np.any(self.design[:, : self.n_features]):
            return (
                "X is all zero"
                if not np.any(self.X)
                else "every column of X is constant (centering by the intercept zeroes it)"
            )
        n = self.n_samples
        # Largest possible |Xⱼᵀ∇ℓ(0)| for these column norms and targets: a relative scale
        # below which α_max is rounding noise.
        ref = float(np.sqrt(np.max(self.col_sq)) * np.linalg.norm(self.y)) / n
        if isinstance(self.datafit, Quadratic) and self.alpha_max() <= 1e-10 * ref:
            if not np.any(self.y):
                return "y is all zero"
            if self.fit_intercept and np.ptp(self.y) <= 1e-12 * np.max(np.abs(self.y)):
                return "y is constant (the intercept fits it exactly)"
            return "y is orthogonal to every column of X (α_max = 0)"
        if not np.any(self.y) and isinstance(self.datafit, Quadratic):
            return "y is all zero"
        return None
