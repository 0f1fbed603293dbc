"""Docstring fragments shared by the hypergradient estimators, and the decorator that fills them.

The five estimators take the same search parameters and expose the same fitted search
attributes; each class states only what is its own (model, extra parameters, ``alpha_``...)
and :func:`document` assembles the NumPy-style docstring around the shared sections. It
sets ``__doc__`` (a real string, read by ``help``, doctest and the API reference's
runtime-docstring extension, ``docs/_ext/runtime_docstrings.py``).
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: The search parameters every estimator takes (``_HyperCVBase.__init__``).
PARAMS = """\
cv : int or cross-validation splitter, default=5
    Folds of the criterion, :class:`~dargmin.hyper.CrossVal` (mean held-out loss).
method : str or HypergradientMethod, default="implicit"
    Hypergradient method: an object (:class:`~dargmin.hyper.ImplicitSupport`,
    :class:`~dargmin.hyper.ImplicitForward`, :class:`~dargmin.hyper.Unrolled`) or a
    name of :data:`~dargmin.hyper.REGISTRY` ("implicit", "implicit_forward",
    "forward", "reverse").
optimizer : str, optimizer object or optax optimizer, default="gd"
    Outer optimizer: :class:`~dargmin.hyper.ProjectedGradientDescent` ("gd"),
    :class:`~dargmin.hyper.LBFGSB` ("lbfgs"), :class:`~dargmin.hyper.OptaxOptimizer`
    or an ``optax.GradientTransformation``.
solver : str or InnerSolver, default="auto"
    Inner solver: an object (:class:`~dargmin.hyper.ProxCD`,
    :class:`~dargmin.hyper.FISTA`, :class:`~dargmin.hyper.SklearnSolver`,
    :class:`~dargmin.hyper.WorkingSetCD`,
    :class:`~dargmin.hyper.SplitLBFGSB`, :class:`~dargmin.hyper.ProxNewton`...) or a
    name ("auto", "cd", "fista", "ista", "sklearn", "direct", "lbfgsb", "prox_newton",
    "working_set"). "auto" searches with :func:`~dargmin.hyper.default_solver` at a looser
    tolerance (for one ℓ1 strength, the Lasso and the elastic net,
    :class:`~dargmin.hyper.WorkingSetCD`; for the logistic loss,
    :class:`~dargmin.hyper.ProxNewton`) and refits at its tight default.
max_iter : int, default=30
    Maximal number of outer iterations.
fit_intercept : bool, default=True
    Fit an unpenalized intercept.
verbose : bool, default=False
    Show a tqdm progress bar.
n_path : int, default=10
    Points of the coarse warm-started path (from ``alpha_max`` down four decades)
    evaluated before the descent, which starts at the best of them: CV curves often
    have several local minima. 0 starts from ``alpha_max/10`` instead.
n_jobs : int or None, default=None
    Threads solving the CV folds' inner problems concurrently (scikit-learn's
    convention: ``None`` means 1, ``-1`` all cores). The support systems of the folds
    are solved in one batched call whatever ``n_jobs``, sharded over the JAX devices
    when there are several."""

#: ``max_iter_lasso`` of the estimators that start from the single-``alpha`` optimum.
PARAM_MAX_ITER_LASSO = """\
max_iter_lasso : int, default=20
    Outer iterations of the initial single-``alpha`` Lasso search."""

#: The regressors' refit coefficients (the classifier's have one row per class).
REGRESSOR_COEF = """\
coef_ : ndarray of shape (n_features,)
    Coefficients refit on all the data at the selected hyperparameters.
intercept_ : float
    Intercept of the refit (0 when ``fit_intercept=False``)."""

#: The fitted search attributes every estimator sets (``_HyperCVBase._fit``).
ATTRIBUTES = """\
log_theta_ : ndarray of shape (n_hyper,)
    Selected hyperparameters in log scale.
path_ : dargmin.hyper.Monitor
    Every evaluation of the outer search (time, log θ, CV loss, gradient norm).
n_iter_ : int
    Outer iterations: coarse-path points plus descent steps.
n_evals_ : int
    Criterion evaluations (each solves ``cv`` inner problems).
cv_loss_ : float
    Mean CV loss (held-out MSE or log-loss) at the selected hyperparameters; lower is
    better. ``cv_score_`` is its deprecated alias. Computed from the folds' solves at
    the search tolerance (least squares: a duality gap of ``1e-6 ‖y‖²``, scikit-learn's
    convention), so its error grows with the signal-to-noise ratio: about
    ``1e-6 · var(y) / cv_loss_`` relative (0.3 % measured where ``var(y)`` is 4000 times
    the loss; ``LassoCV``'s ``mse_path_`` at its default ``tol=1e-4`` is 100 times
    looser).
log_theta_path_ : ndarray of shape (n_evals, n_hyper)
    Every evaluated point of the search (coarse path, then descent), log scale.
cv_loss_path_ : ndarray of shape (n_evals,)
    The CV loss at each row of ``log_theta_path_`` (the last coarse-path point may be a
    loose probe's value: the path stopped because even it rose 2 % above the best).
n_features_in_ : int
    Number of features seen by :meth:`fit`."""


def _section(title: str, body: str) -> str:
    return f"{title}\n{'-' * len(title)}\n{body}" if body else ""


def fill(
    summary: str,
    *,
    parameters: str = "",
    attributes: str,
    see_also: str,
    examples: str,
    shared_attributes: str = ATTRIBUTES,
) -> str:
    """A NumPy-style docstring: ``summary``, then the sections, shared parts included.

    The Parameters section is the class's own ``parameters`` after :data:`PARAMS`; the
    Attributes section is the class's own ``attributes`` (its selected hyperparameters
    first) followed by ``shared_attributes``. The summary is cleaned with
    :func:`inspect.cleandoc` and the sections with :func:`textwrap.dedent`, so they may be
    written indented in the class body.

    Examples
    --------
    >>> doc = fill("One line.", attributes="alpha_ : float", see_also="", examples="")
    >>> inspect.cleandoc(doc).splitlines()[:4]
    ['One line.', '', 'Parameters', '----------']
    >>> "alpha_ : float" in doc and "n_features_in_ : int" in doc
    True
    """
    own = [textwrap.dedent(p).strip() for p in (parameters, attributes, see_also, examples)]
    sections = [
        inspect.cleandoc(summary),
        _section("Parameters", "\n".join(p for p in (PARAMS, own[0]) if p)),
        _section("Attributes", "\n".join(p for p in (own[1], shared_attributes) if p)),
        _section("See Also", own[2]),
        _section("Examples", own[3]),
    ]
    # Indented as a class docstring is, so inspect.cleandoc(__doc__) gives the same text.
    return textwrap.indent("\n\n".join(s for s in sections if s), "    ").lstrip() + "\n"


def document(summary: str, **sections: str) -> Callable[[T], T]:
    """Class decorator setting ``__doc__`` to :func:`fill` ``(summary, **sections)``."""

    def decorate(cls: T) -> T:
        cls.__doc__ = fill(summary, **sections)
        return cls

    return decorate


def document_regressor(summary: str, **sections: str) -> Callable[[T], T]:
    """:func:`document` with the regressors' ``coef_`` and ``intercept_`` among the shared
    attributes."""
    return document(summary, shared_attributes=f"{REGRESSOR_COEF}\n{ATTRIBUTES}", **sections)
