"""Influence functions and curvature at network scale: ``(params, batch)`` losses and data
loaders, never whole-dataset arrays or dense Hessians.

Setting. A model with parameters :math:`\\theta` (any pytree: an equinox model, a dict of
arrays; only its float arrays are differentiated) is trained on the objective
:math:`\\sum_b L(\\theta, b)` summed over the batches :math:`b` of a loader (a re-iterable
of pytrees of arrays with a leading example axis), :math:`L` being the SUM of the
per-example losses of the batch. The curvature :math:`C = \\sum_b C_b` is

* :class:`Hessian` — :math:`\\nabla^2_\\theta L`, from Hessian-vector products; or
* :class:`GaussNewton` — :math:`J^\\top H_z J` for a model and an output loss (positive
  semidefinite; the Fisher for softmax cross-entropy).

An inverse strategy fits an approximation of :math:`(C + \\lambda I)^{-1}` (damping
:math:`\\lambda`; an L2 penalty :math:`\\tfrac\\lambda2\\|\\theta\\|^2` on the objective is
exactly this damping), from curvature-vector products accumulated over the loader:

* :class:`ExactInverse` — dense Cholesky, the reference for small models;
* :class:`Arnoldi` — top-k eigenpairs by Lanczos, low-rank inverse (Schioppa et al., 2022);
* :class:`LiSSA` — stochastic Neumann series (Agarwal et al., 2017);
* :class:`EKFAC` / :func:`KFAC` — Kronecker factors of the dense and convolutional
  layers of an equinox model, eigenvalue-corrected (George et al., 2018; Grosse & Martens,
  2016 for convolutions);
* :class:`PreconditionedCG` — conjugate gradients on the exact curvature, preconditioned
  by one of the above (EK-FAC): a few passes over the data remove its approximation error.

:func:`influence_scores` turns a fitted inverse into the train × query matrix
:math:`-\\nabla f_j^\\top (C+\\lambda I)^{-1} \\nabla \\ell_i`, streaming the training set;
:func:`spectral_density` estimates the spectrum of :math:`C` by stochastic Lanczos
quadrature.

Examples
--------
>>> import jax, jax.numpy as jnp
>>> from dargmin.influence import Arnoldi, Hessian, influence_scores
>>> x = jax.random.normal(jax.random.PRNGKey(0), (8, 3)); y = x @ jnp.array([1.0, -1.0, 0.5])
>>> loss = lambda w, b: 0.5 * jnp.sum((b["x"] @ w - b["y"]) ** 2)
>>> loader = [{"x": x[:4], "y": y[:4]}, {"x": x[4:], "y": y[4:]}]
>>> w = jnp.linalg.lstsq(x, y)[0]
>>> inverse = Arnoldi(rank=3).fit(Hessian(loss), w, loader)
>>> influence_scores(inverse, loader, {"x": x[:2], "y": y[:2] + 1.0}).shape
(8, 2)
"""

from dargmin.influence._inverse import (
    Arnoldi,
    ExactInverse,
    ExactInverseCurvature,
    InverseCurvature,
    LiSSA,
    LiSSAInverseCurvature,
    LowRankInverseCurvature,
)
from dargmin.influence._kfac import EKFAC, KFAC, KroneckerInverseCurvature
from dargmin.influence._problem import GaussNewton, Hessian, Loader
from dargmin.influence._refine import PreconditionedCG, PreconditionedCGInverseCurvature
from dargmin.influence._scores import influence_scores
from dargmin.influence._spectrum import SpectralDensity, spectral_density

__all__ = [
    "EKFAC",
    "KFAC",
    "Arnoldi",
    "ExactInverse",
    "ExactInverseCurvature",
    "GaussNewton",
    "Hessian",
    "InverseCurvature",
    "KroneckerInverseCurvature",
    "LiSSA",
    "LiSSAInverseCurvature",
    "Loader",
    "LowRankInverseCurvature",
    "PreconditionedCG",
    "PreconditionedCGInverseCurvature",
    "SpectralDensity",
    "influence_scores",
    "spectral_density",
]
