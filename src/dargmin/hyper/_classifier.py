"""The classifier among the hypergradient estimators: sparse (ℓ1) logistic regression."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import ClassifierMixin, _fit_context
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted

from dargmin.hyper._criteria import HeldOutLogistic
from dargmin.hyper._estimator_base import _HyperCVBase
from dargmin.hyper._estimator_docs import document
from dargmin.hyper._models import sparse_logistic


@document(
    """Binary ℓ1 logistic regression with ``alpha`` tuned on the cross-validated log-loss.

    Objective: ``(1/n)Σ log(1 + e^{−yᵢ(xᵢᵀw + b)}) + alpha‖w‖₁`` with labels mapped to
    ``yᵢ = ±1`` (``+1`` for ``classes_[1]``); scikit-learn's
    ``LogisticRegression(penalty="l1")`` is the same model with ``C_ = 1/(n alpha_)``. The
    CV criterion, the mean held-out log-loss (:class:`~dargmin.hyper.HeldOutLogistic`
    averaged by :class:`~dargmin.hyper.CrossVal`), is minimized over ``log alpha`` with
    hypergradients, and the model is then refit on all the data. Folds are stratified when
    ``cv`` is an int and every class has at least ``cv`` samples.
    """,
    attributes="""
    alpha_ : float
        Selected regularization strength.
    C_ : float
        Its ``LogisticRegression`` equivalent, ``1/(n_samples alpha_)``.
    classes_ : ndarray of shape (2,)
        The two class labels; ``classes_[1]`` is the positive class.
    coef_ : ndarray of shape (1, n_features)
        Coefficients refit on all the data at the selected hyperparameters.
    intercept_ : ndarray of shape (1,)
        Intercept of the refit (0 when ``fit_intercept=False``).
    """,
    see_also="""
    LassoHyperCV : The regression counterpart.
    dargmin.hyper.sparse_logistic : The inner problem.
    """,
    examples="""
    >>> from sklearn.datasets import make_classification
    >>> X, y = make_classification(80, 10, n_informative=3, class_sep=2.0, random_state=0)
    >>> est = SparseLogisticHyperCV(cv=3, max_iter=10).fit(X, y)
    >>> est.alpha_ > 0, est.score(X, y) > 0.85
    (True, True)
    """,
)
class SparseLogisticHyperCV(ClassifierMixin, _HyperCVBase):
    _criterion = HeldOutLogistic

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

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any) -> SparseLogisticHyperCV:
        """Select ``alpha`` by hypergradient descent on the CV log-loss, then refit.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Sparse matrices are densified (up to ``SPARSE_DENSIFY_MAX`` entries).
        y : array-like of shape (n_samples,) with exactly two classes

        Returns
        -------
        self
        """
        X, y = self._validate(X, y)
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
        return self._decision(X)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, columns ordered as ``classes_``."""
        p1 = 1.0 / (1.0 + np.exp(-self.decision_function(X)))
        return np.column_stack([1.0 - p1, p1])

    def predict(self, X: Any) -> np.ndarray:
        """Predicted class labels."""
        check_is_fitted(self, "coef_")  # before self.classes_ is read
        return self.classes_[(self.decision_function(X) > 0).astype(int)]
