"""Outer criteria ``C(ŵ)``: held-out losses, K-fold cross-validation and custom hooks.

A criterion is a JAX-traceable callable ``criterion(w, problem) -> scalar`` of the inner
solution ``w`` (and of the :class:`~dargmin.hyper.HyperProblem`, which knows how to turn
``w`` into predictions, intercept included). :class:`CrossVal` is different: it splits the
training data of a problem into folds (``folds(problem)``) and is averaged over per-fold
inner problems.

The built-in criteria are immutable (:class:`equinox.Module`); what they compute once per
problem (the validation design, the folds) is kept in a :class:`~dargmin.hyper.Cache`
created with the criterion.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

from dargmin.hyper._problems import Cache, HyperProblem, _check_finite, _host_method

Array = Any


class Criterion:
    """Base class of outer criteria ``C(w)``; subclasses implement ``__call__(w, problem)``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> class L1Norm(Criterion):
    ...     def __call__(self, w, problem):
    ...         return jnp.sum(jnp.abs(w))
    >>> float(L1Norm()(jnp.array([1.0, -2.0]), None))
    3.0
    """

    def __call__(self, w: Array, problem: HyperProblem) -> Array:
        raise NotImplementedError

    def value_and_grad(self, w: np.ndarray, problem: HyperProblem) -> tuple[float, np.ndarray]:
        """``(C(w), ∇C(w))``; the default differentiates :meth:`__call__` with JAX."""
        val, g = jax.value_and_grad(lambda ww: self(ww, problem))(jnp.asarray(w, dtype=float))
        return float(val), np.asarray(g)


def _validation_data(X: Array, y: Array) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0]:
        raise ValueError(
            f"Validation data must be X (n_val, p) and y (n_val,); got shapes {X.shape} and "
            f"{y.shape}."
        )
    _check_finite("X_val", X)
    _check_finite("y_val", y)
    return X, y


def _check_features(X_val: np.ndarray, problem: HyperProblem) -> None:
    if X_val.shape[1] != problem.n_features:
        raise ValueError(
            f"X_val has {X_val.shape[1]} features but the inner problem has "
            f"{problem.n_features}; pass validation data with the training columns."
        )


def _design_for(crit: Any, problem: HyperProblem) -> tuple[np.ndarray, float]:
    # The prediction design of the validation data, once per problem (fold): the criterion
    # is evaluated once per outer step, the design changes only with the problem. The
    # problem is kept with its design so that its id is not reused while cached.
    def compute():
        _check_features(crit.X_val, problem)
        return (problem, *problem.prediction_design(crit.X_val))

    return crit.cache.get(("design", id(problem)), compute)[1:]


class HeldOutMSE(eqx.Module, Criterion):
    """Mean squared error on held-out data, ``C(w) = ‖y_val − X_val w − b‖² / n_val``.

    Examples
    --------
    >>> import numpy as np
    >>> from dargmin.hyper import lasso
    >>> prob = lasso(np.eye(2), np.ones(2), fit_intercept=False)
    >>> float(HeldOutMSE(np.eye(2), np.array([1.0, 3.0]))(np.ones(2), prob))
    2.0
    """

    X_val: np.ndarray
    y_val: np.ndarray
    cache: Cache = eqx.field(repr=False, static=True)

    def __init__(self, X_val: Array, y_val: Array):
        self.X_val, self.y_val = _validation_data(X_val, y_val)
        self.cache = Cache()

    def __call__(self, w: Array, problem: HyperProblem) -> Array:
        pred = problem.decision_function(self.X_val, w)
        return jnp.mean((jnp.asarray(self.y_val) - pred) ** 2)

    @_host_method
    def value_and_grad(self, w: np.ndarray, problem: HyperProblem) -> tuple[float, np.ndarray]:
        """Closed form: ``r = A w + c − y``, ``C = ‖r‖²/m``, ``∇C = 2 Aᵀ r / m``."""
        A, c = _design_for(self, problem)
        r = A @ w + c - self.y_val
        m = r.shape[0]
        return float(r @ r / m), 2.0 * (A.T @ r) / m


class HeldOutLogistic(eqx.Module, Criterion):
    """Mean logistic loss on held-out data (labels ``±1``), ``(1/n)Σ log(1+e^{−yᵢ zᵢ})``.

    Examples
    --------
    >>> import numpy as np
    >>> from dargmin.hyper import sparse_logistic
    >>> prob = sparse_logistic(np.eye(2), np.array([1.0, -1.0]), fit_intercept=False)
    >>> round(float(HeldOutLogistic(np.eye(2), np.array([1.0, -1.0]))(np.zeros(2), prob)), 4)
    0.6931
    """

    X_val: np.ndarray
    y_val: np.ndarray
    cache: Cache = eqx.field(repr=False, static=True)

    def __init__(self, X_val: Array, y_val: Array):
        X_val, y_val = _validation_data(X_val, y_val)
        if not np.all(np.isin(y_val, (-1.0, 1.0))):
            raise ValueError(
                "HeldOutLogistic needs labels in {-1, +1}; encode the two classes as -1 and +1."
            )
        self.X_val, self.y_val = X_val, y_val
        self.cache = Cache()

    def __call__(self, w: Array, problem: HyperProblem) -> Array:
        z = problem.decision_function(self.X_val, w)
        return jnp.mean(jnp.logaddexp(0.0, -jnp.asarray(self.y_val) * z))

    @_host_method
    def value_and_grad(self, w: np.ndarray, problem: HyperProblem) -> tuple[float, np.ndarray]:
        """Closed form: ``∇C = −Aᵀ(y σ(−y z))/m`` with ``z = A w + c``."""
        A, c = _design_for(self, problem)
        yz = self.y_val * (A @ w + c)
        m = yz.shape[0]
        val = float(np.mean(np.logaddexp(0.0, -yz)))
        return val, -(A.T @ (self.y_val * scipy.special.expit(-yz))) / m


class CustomCriterion(eqx.Module, Criterion):
    """Wrap a user function ``fn(w, problem) -> scalar`` (JAX-traceable in ``w``).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> crit = CustomCriterion(lambda w, problem: jnp.sum(w**2))
    >>> float(crit(jnp.array([1.0, 2.0]), None))
    5.0
    """

    fn: Callable[[Array, HyperProblem], Array]

    def __init__(self, fn: Callable[[Array, HyperProblem], Array]):
        if not callable(fn):
            raise TypeError(f"CustomCriterion needs a callable, got {type(fn).__name__}.")
        self.fn = fn

    def __call__(self, w: Array, problem: HyperProblem) -> Array:
        return self.fn(w, problem)


class CrossVal(eqx.Module):
    """K-fold cross-validation: the mean over folds of a held-out criterion.

    .. math:: C(\\theta) = \\frac1K \\sum_{k=1}^K C_k\\big(\\hat w^{(k)}(\\theta)\\big),

    where ``ŵ⁽ᵏ⁾`` solves the inner problem on the training part of fold ``k`` and ``C_k`` is
    ``criterion(X_test_k, y_test_k)``. (The mean rather than the sum keeps the scale of
    scikit-learn's ``mse_path_.mean(axis=1)``; the minimizer is the same.)

    Parameters
    ----------
    criterion
        A factory ``(X_val, y_val) -> Criterion`` such as :class:`HeldOutMSE`.
    cv
        Number of folds or a scikit-learn splitter (``KFold``, ``StratifiedKFold``...).

    Examples
    --------
    >>> import numpy as np
    >>> from dargmin.hyper import lasso
    >>> prob = lasso(np.random.default_rng(0).normal(size=(30, 4)), np.arange(30.0))
    >>> len(CrossVal(HeldOutMSE, cv=3).folds(prob))
    3
    """

    criterion: Callable[[Array, Array], Criterion]
    cv: Any
    cache: Cache = eqx.field(repr=False, static=True)

    def __init__(self, criterion: Callable[[Array, Array], Criterion] = HeldOutMSE, cv: Any = 5):
        self.criterion = criterion
        self.cv = cv
        self.cache = Cache()

    @_host_method
    def folds(self, problem: HyperProblem) -> list[tuple[HyperProblem, Criterion]]:
        """The per-fold ``(inner problem, held-out criterion)`` pairs (cached per problem)."""
        # Same fold objects on every evaluation (one entry: the last problem): no copies of
        # the data, and solvers keyed on the fold problem keep their warm starts.
        last = self.cache.get("folds", lambda: None)
        if last is not None and last[0] is problem:
            return last[1]
        from sklearn.model_selection import KFold

        splitter = KFold(int(self.cv)) if isinstance(self.cv, int | np.integer) else self.cv
        if isinstance(self.cv, int | np.integer) and not 2 <= self.cv <= problem.n_samples:
            raise ValueError(
                f"cv={self.cv} folds is impossible with {problem.n_samples} samples; use "
                f"2 <= cv <= {problem.n_samples}."
            )
        out = []
        for train, test in splitter.split(problem.X, problem.y):
            out.append((problem.subset(train), self.criterion(problem.X[test], problem.y[test])))
        self.cache.set("folds", (problem, out))
        return out
