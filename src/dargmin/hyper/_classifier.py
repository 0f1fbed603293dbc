"""The classifier among the hypergradient estimators: sparse (ℓ1) logistic regression."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from dargmin.hyper._criteria import HeldOutLogistic
from dargmin.hyper._estimators import _COMMON_PARAMS_DOC, _HyperCVBase
from dargmin.hyper._problems import sparse_logistic


class SparseLogisticHyperCV(ClassifierMixin, _HyperCVBase):
    (
        """Binary ℓ1 logistic regression with ``alpha`` tuned on the CV log-loss.

    ``(1/n)Σ log(1 + e^{−yᵢ(xᵢᵀw + b)}) + alpha‖w‖₁``; scikit-learn's
    ``LogisticRegression(penalty="l1")`` uses ``C_ = 1/(n alpha_)``.
    """
        + _COMMON_PARAMS_DOC
        + """
    Attributes
    ----------
    alpha_, C_ : float
        Selected strength and its ``LogisticRegression`` equivalent.
    classes_ : ndarray of shape (2,)
    coef_ : ndarray of shape (1, n_features)
    intercept_ : ndarray of shape (1,)
    path_, n_iter_, cv_score_
        As in :class:`LassoHyperCV`.

    Examples
    --------
    >>> from sklearn.datasets import make_classification
    >>> X, y = make_classification(80, 10, n_informative=3, random_state=0)
    >>> est = SparseLogisticHyperCV(cv=3, max_iter=10).fit(X, y)
    >>> est.score(X, y) > 0.8
    True
    """
    )

    _criterion = HeldOutLogistic

    def __init__(
        self,
        *,
        cv: Any = 5,
        method: str = "implicit",
        optimizer: Any = "gd",
        solver: Any = "auto",
        max_iter: int = 30,
        fit_intercept: bool = True,
        verbose: bool = False,
    ):
        self.cv = cv
        self.method = method
        self.optimizer = optimizer
        self.solver = solver
        self.max_iter = max_iter
        self.fit_intercept = fit_intercept
        self.verbose = verbose

    def _make_problem(self, X, y):
        return sparse_logistic(X, y, fit_intercept=self.fit_intercept)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False
        return tags

    def _split(self, y):
        from sklearn.model_selection import StratifiedKFold

        if isinstance(self.cv, int | np.integer):
            _, counts = np.unique(y, return_counts=True)
            # Stratify when every class can populate every fold.
            if counts.min() >= self.cv:
                return StratifiedKFold(int(self.cv))
        return self.cv

    def fit(self, X: Any, y: Any) -> SparseLogisticHyperCV:
        """Select ``alpha`` by hypergradient descent on the CV log-loss, then refit.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) with exactly two classes

        Returns
        -------
        self
        """
        X, y = validate_data(self, X, y, ensure_min_samples=2, dtype=np.float64)
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        if self.classes_.size != 2:
            raise ValueError(
                "Only binary classification is supported. SparseLogisticHyperCV got "
                f"{self.classes_.size} class(es): {self.classes_.tolist()[:5]}."
            )
        y_pm = np.where(y == self.classes_[1], 1.0, -1.0)
        self._fit(X, y_pm)
        self.coef_ = self.coef_[None, :]
        self.intercept_ = np.array([self.intercept_])
        return self

    def _set_hyper_attributes(self, log_theta, problem):
        self.alpha_ = float(np.exp(log_theta[0]))
        self.C_ = 1.0 / (problem.n_samples * self.alpha_)

    def decision_function(self, X: Any) -> np.ndarray:
        """Signed distance ``X coef_ᵀ + intercept_`` (positive: ``classes_[1]``)."""
        check_is_fitted(self, "coef_")
        X = validate_data(self, X, reset=False)
        return X @ self.coef_[0] + self.intercept_[0]

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, columns ordered as ``classes_``."""
        p1 = 1.0 / (1.0 + np.exp(-self.decision_function(X)))
        return np.column_stack([1.0 - p1, p1])

    def predict(self, X: Any) -> np.ndarray:
        """Predicted class labels."""
        check_is_fitted(self, "coef_")
        return self.classes_[(self.decision_function(X) > 0).astype(int)]
