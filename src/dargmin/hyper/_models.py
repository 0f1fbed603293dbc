"""The model factories of :mod:`dargmin.hyper`: :class:`~dargmin.hyper.HyperProblem` s for the
Lasso, elastic net, weighted Lasso, sparse logistic regression, ridge and ℓ2 logistic
regression, with ``θ`` the log of scikit-learn's penalty parameters.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dargmin.hyper._datafits import Logistic, Quadratic
from dargmin.hyper._penalty_maps import _exp0, _exp1, _exp_all
from dargmin.hyper._problems import HyperProblem

Array = Any


def lasso(X: Array, y: Array, *, fit_intercept: bool = True) -> HyperProblem:
    """Lasso: ``‖y − Xw‖²/(2n) + e^{θ}‖w‖₁`` (``e^θ`` is scikit-learn's ``alpha``).

    Examples
    --------
    >>> import numpy as np
    >>> prob = lasso(np.random.default_rng(0).normal(size=(20, 5)), np.arange(20.0))
    >>> prob.n_hyper
    1
    """
    return HyperProblem(X, y, Quadratic(), 1, l1=_exp0, fit_intercept=fit_intercept, name="lasso")


def elastic_net(X: Array, y: Array, *, fit_intercept: bool = True) -> HyperProblem:
    """Elastic net: ``‖y − Xw‖²/(2n) + e^{θ₀}‖w‖₁ + ½e^{θ₁}‖w‖²``.

    In scikit-learn's parametrization ``alpha = e^{θ₀} + e^{θ₁}`` and
    ``l1_ratio = e^{θ₀} / alpha``.

    Examples
    --------
    >>> import numpy as np
    >>> elastic_net(np.ones((4, 2)) + np.eye(4, 2), np.arange(4.0)).n_hyper
    2
    """
    return HyperProblem(
        X, y, Quadratic(), 2, l1=_exp0, l2=_exp1, fit_intercept=fit_intercept, name="elastic net"
    )


def weighted_lasso(X: Array, y: Array, *, fit_intercept: bool = True) -> HyperProblem:
    """Weighted Lasso: ``‖y − Xw‖²/(2n) + Σⱼ e^{θⱼ}|wⱼ|`` (one penalty per feature).

    Examples
    --------
    >>> import numpy as np
    >>> weighted_lasso(np.random.default_rng(0).normal(size=(10, 7)), np.ones(10)).n_hyper
    7
    """
    X = np.asarray(X)
    return HyperProblem(
        X,
        y,
        Quadratic(),
        int(X.shape[1]) if X.ndim == 2 else 1,
        l1=_exp_all,
        fit_intercept=fit_intercept,
        name="weighted lasso",
    )


def sparse_logistic(X: Array, y: Array, *, fit_intercept: bool = True) -> HyperProblem:
    """ℓ1 logistic regression: ``(1/n)Σ log(1+e^{−yᵢ(xᵢᵀw+b)}) + e^{θ}‖w‖₁``, ``y ∈ {±1}``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> sparse_logistic(rng.normal(size=(10, 3)), np.sign(rng.normal(size=10))).n_coef  # + b
    4
    """
    return HyperProblem(
        X, y, Logistic(), 1, l1=_exp0, fit_intercept=fit_intercept, name="sparse logistic"
    )


def ridge(X: Array, y: Array, *, fit_intercept: bool = True) -> HyperProblem:
    """Ridge: ``‖y − Xw‖²/(2n) + ½e^{θ}‖w‖²`` (scikit-learn ``Ridge(alpha=n e^θ)``).

    Examples
    --------
    >>> import numpy as np
    >>> ridge(np.eye(3), np.ones(3)).smooth
    True
    """
    return HyperProblem(X, y, Quadratic(), 1, l2=_exp0, fit_intercept=fit_intercept, name="ridge")


def l2_logistic(X: Array, y: Array, *, fit_intercept: bool = True) -> HyperProblem:
    """ℓ2 logistic regression: ``(1/n)Σ log(1+e^{−yᵢ(xᵢᵀw+b)}) + ½e^{θ}‖w‖²``.

    Examples
    --------
    >>> import numpy as np
    >>> l2_logistic(np.eye(4), np.array([1.0, -1, 1, -1])).smooth
    True
    """
    return HyperProblem(
        X, y, Logistic(), 1, l2=_exp0, fit_intercept=fit_intercept, name="l2 logistic"
    )
