"""Smooth data-fitting terms ``Σᵢ ℓ(zᵢ, yᵢ)`` of the predictions ``z = Xw``.

The data fit of a :class:`~dargmin.hyper.HyperProblem` is separable over samples, so its
Hessian in ``z`` is diagonal: the support systems of the hypergradients are
``X_Sᵀ diag(ℓ'') X_S + diag(μ_S)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

Array = Any


class Datafit:
    """A smooth data-fitting term ``Σᵢ ℓ(zᵢ, yᵢ)`` of the predictions ``z = Xw``.

    Subclasses implement :meth:`value` (JAX-traceable, a sum of per-sample terms, so that
    the Hessian in ``z`` is diagonal) and :meth:`curvature_bound`; :meth:`grad` and
    :meth:`hess_diag` default to JAX autodiff and may be overridden by closed forms.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> class Huber(Datafit):
    ...     def value(self, z, y):
    ...         r = jnp.abs(z - y)
    ...         return jnp.mean(jnp.where(r < 1, 0.5 * r**2, r - 0.5))
    ...     def curvature_bound(self, n):
    ...         return 1.0 / n
    >>> float(Huber().value(jnp.zeros(2), jnp.array([0.5, 3.0])))
    1.3125
    """

    def value(self, z: Array, y: Array) -> Array:
        """The data-fit value ``Σᵢ ℓ(zᵢ, yᵢ)`` (scalar)."""
        raise NotImplementedError

    def curvature_bound(self, n: int) -> float:
        """An upper bound of ``ℓ''(zᵢ, yᵢ)`` over all ``z`` (for ``n`` samples)."""
        raise NotImplementedError

    def grad(self, z: Array, y: Array) -> Array:
        """``∂ℓ/∂z`` (a vector of length ``n``)."""
        return jax.grad(self.value)(z, y)

    def hess_diag(self, z: Array, y: Array) -> Array:
        """Diagonal of ``∂²ℓ/∂z²`` (the data fit is separable over samples)."""
        # For a separable function the Hessian is diagonal, so one JVP of the gradient along
        # the all-ones vector returns exactly its diagonal.
        return jax.jvp(lambda zz: self.grad(zz, y), (z,), (jnp.ones_like(z),))[1]

    # Host (NumPy) versions for the outer loop's per-fold bookkeeping (KKT checks, support
    # Hessians): eager JAX dispatch cost more than the arithmetic there. Subclasses with a
    # closed form override them; the default evaluates the JAX definitions.
    def value_host(self, z: np.ndarray, y: np.ndarray) -> float:
        """:meth:`value` as a float."""
        return float(self.value(jnp.asarray(z), jnp.asarray(y)))

    def grad_host(self, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        """:meth:`grad` as a NumPy array."""
        return np.asarray(self.grad(jnp.asarray(z), jnp.asarray(y)))

    def hess_diag_host(self, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        """:meth:`hess_diag` as a NumPy array."""
        return np.asarray(self.hess_diag(jnp.asarray(z), jnp.asarray(y)))

    def validate_target(self, y: np.ndarray) -> np.ndarray:
        """Check (and possibly recode) the targets; return them as float64."""
        return np.asarray(y, dtype=np.float64)


@dataclass(frozen=True)
class Quadratic(Datafit):
    """Least squares with the scikit-learn scaling, ``ℓ = ‖y − z‖² / (2n)``.

    With this convention ``alpha`` of :class:`sklearn.linear_model.Lasso` is ``λ``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> float(Quadratic().value(jnp.array([1.0, 1.0]), jnp.array([0.0, 2.0])))
    0.5
    """

    def value(self, z: Array, y: Array) -> Array:
        return 0.5 * jnp.mean((y - z) ** 2)

    def grad(self, z: Array, y: Array) -> Array:
        return (z - y) / z.shape[0]

    def hess_diag(self, z: Array, y: Array) -> Array:
        return jnp.full_like(z, 1.0 / z.shape[0])

    def value_host(self, z: np.ndarray, y: np.ndarray) -> float:
        r = np.asarray(z) - y
        return 0.5 * float(r @ r) / len(y)

    def grad_host(self, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (np.asarray(z) - y) / len(y)

    def hess_diag_host(self, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.full(len(y), 1.0 / len(y))

    def curvature_bound(self, n: int) -> float:
        return 1.0 / n


@dataclass(frozen=True)
class Logistic(Datafit):
    """Mean logistic loss for labels in ``{-1, +1}``, ``ℓ = (1/n) Σ log(1 + e^{-yᵢ zᵢ})``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> round(float(Logistic().value(jnp.zeros(2), jnp.array([1.0, -1.0]))), 6)  # log 2
    0.693147
    """

    def value(self, z: Array, y: Array) -> Array:
        return jnp.mean(jnp.logaddexp(0.0, -y * z))

    def grad(self, z: Array, y: Array) -> Array:
        return -y * jax.nn.sigmoid(-y * z) / z.shape[0]

    def hess_diag(self, z: Array, y: Array) -> Array:
        s = jax.nn.sigmoid(y * z)
        return s * (1.0 - s) / z.shape[0]

    def value_host(self, z: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(np.logaddexp(0.0, -y * np.asarray(z))))

    def grad_host(self, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        return -y * scipy.special.expit(-y * np.asarray(z)) / len(y)

    def hess_diag_host(self, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        s = scipy.special.expit(y * np.asarray(z))
        return s * (1.0 - s) / len(y)

    def curvature_bound(self, n: int) -> float:
        return 0.25 / n

    def validate_target(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64)
        bad = ~np.isin(y, (-1.0, 1.0))
        if np.any(bad):
            raise ValueError(
                f"The logistic data fit needs labels in {{-1, +1}}; found {int(bad.sum())} "
                f"other value(s), e.g. {y[bad][0]!r}. Encode the two classes as -1 and +1."
            )
        return y
