"""Penalties ``F_θ(u)`` on ``u = Dw``, given to the solver through the prox of their conjugate.

Each penalty is an immutable strategy object with

* ``value(u, θ) = F_θ(u)`` (the primal objective),
* ``conj(p, θ) = F_θ*(p)`` (the dual objective; the solver's dual iterates are always in
  its domain),
* ``dual_prox(q, σ, θ) = prox_{σF_θ*}(q)`` (the dual step of Chambolle–Pock),

* ``dual_prox_jvp(q, Q̇, σ, θ, Θ̇)``: the prox and its derivatives along the rows of
  ``(Q̇, Θ̇)`` at once, for the solver's forward-mode derivative (the default linearizes
  ``dual_prox`` once; the ℓ1 and TV penalties write it by hand),

and ``n_params``, the length of ``θ``. All are positively homogeneous or quadratic in
``u``, and smooth in ``θ > 0``, so that the iterates are differentiable in ``θ`` almost
everywhere (forward-mode iterative differentiation and SUGAR rely on it).
"""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import Array

from dargmin.imaging import _operators as ops


def _squares(u: Array) -> Array:
    # Σ u_c² over the group (leading) axis as a sum of slices: XLA's CPU backend fuses it with
    # its neighbours, where a reduction over a length-2 axis ran as a separate, slower loop
    # (measured with the one division of IsotropicTV.dual_prox: an iteration 10.1 → 8.3 ms at
    # 512², CPU time, one thread).
    parts = [u[c] for c in range(u.shape[0])]
    total = parts[0] * parts[0]
    for part in parts[1:]:
        total = total + part * part
    return total


def _group_norm(u: Array) -> Array:
    # Isotropic groups are the leading axis (the two gradient components of a pixel). The
    # tiny floor keeps the derivative of |q| finite at q = 0 (JAX's sqrt'(0) is inf).
    return jnp.sqrt(_squares(u) + 1e-300)


def _project_on_discs(q: Array, radius: Array) -> Array:
    # Each pixel's q (leading axis: its components) onto the disc of the given radius, as
    # q · r/max(r, |q|): one division per pixel, not per component. (Not rsqrt: its
    # derivative at the floor overflows, and 0 · inf made the Jacobian NaN at q = 0.)
    return q * (radius / jnp.maximum(radius, _group_norm(q)))


class Penalty(eqx.Module):
    """``F_θ(Dw)`` through ``value``, ``conj`` and ``dual_prox`` (see the module docstring)."""

    n_params: ClassVar[int] = 1
    grouped: ClassVar[bool] = False  # True: Dw has a leading axis of coupled components

    @abc.abstractmethod
    def value(self, u: Array, theta: Array) -> Array:
        """``F_θ(u)``."""

    @abc.abstractmethod
    def conj(self, p: Array, theta: Array) -> Array:
        """``F_θ*(p)`` for ``p`` in its domain (the solver keeps it there)."""

    @abc.abstractmethod
    def dual_prox(self, q: Array, sigma: Array, theta: Array) -> Array:
        """``prox_{σF_θ*}(q)``."""

    def dual_prox_jvp(
        self, q: Array, Q_dot: Array, sigma: Array, theta: Array, Theta_dot: Array
    ) -> tuple[Array, Array]:
        """``prox_{σF_θ*}(q)`` and its derivatives along the rows ``(Q̇[j], Θ̇[j])``.

        The default linearizes ``dual_prox`` once and pushes the ``m`` rows through it.
        """
        p, lin = jax.linearize(lambda q_, t_: self.dual_prox(q_, sigma, t_), q, theta)
        return p, jax.vmap(lin)(Q_dot, Theta_dot)

    def default_analysis(self) -> ops.AnalysisOperator:
        """The ``D`` that :func:`~dargmin.imaging.tv_denoising` and ``tv_deblurring`` pair
        with this penalty: the image gradient, unless the penalty needs another."""
        return ops.Gradient2D()


def _clip_jvp(q: Array, Q_dot: Array, bound: Array, bound_dot: Array) -> tuple[Array, Array]:
    # Clip to [−t, t] and its tangents: a free coordinate moves with q, a clipped one with
    # ±ṫ (a tie |q| = t counts as clipped, as in dargmin.projections).
    free = jnp.abs(q) < bound
    return jnp.clip(q, -bound, bound), jnp.where(free, Q_dot, jnp.sign(q) * bound_dot)


def _disc_jvp(q: Array, Q_dot: Array, radius: Array, radius_dot: Array) -> tuple[Array, Array]:
    # Projection of each pixel's q (leading axis: its components) on the disc of radius θ,
    # and its tangents: outside, p = θu (u = q/r), ṗ = (θ/r)(q̇ − u⟨u, q̇⟩) + θ̇u; inside,
    # ṗ = q̇. By hand: JAX's jvp of q/max(1, r/θ) made the tangent step ≈ 2.6× a plain step,
    # this ≈ 2.1× (measured, 256², benchmarks/results/sugar_imaging.md).
    r = _group_norm(q)
    out = r > radius
    u = q / r
    along = jnp.expand_dims(sum(u[c] * Q_dot[:, c] for c in range(q.shape[0])), 1)
    shape = (-1,) + (1,) * q.ndim
    tangent = (radius / r) * (Q_dot - u * along) + radius_dot.reshape(shape) * u
    return jnp.where(out, radius * u, q), jnp.where(out, tangent, Q_dot)


class L1(Penalty):
    """``F_θ(u) = θ‖u‖₁`` (generalized Lasso ``θ‖Dw‖₁``; anisotropic TV with ``D = ∇``).

    ``F* = ι_{‖p‖∞ ≤ θ}``, its prox a clip.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> L1().dual_prox(jnp.array([-3.0, 0.5]), 1.0, jnp.array([1.0])).tolist()
    [-1.0, 0.5]
    """

    def value(self, u: Array, theta: Array) -> Array:
        return theta[0] * jnp.sum(jnp.abs(u))

    def conj(self, p: Array, theta: Array) -> Array:
        return jnp.zeros((), p.dtype)

    def dual_prox(self, q: Array, sigma: Array, theta: Array) -> Array:
        return jnp.clip(q, -theta[0], theta[0])

    def dual_prox_jvp(
        self, q: Array, Q_dot: Array, sigma: Array, theta: Array, Theta_dot: Array
    ) -> tuple[Array, Array]:
        return _clip_jvp(q, Q_dot, theta[0], Theta_dot[:, 0].reshape((-1,) + (1,) * q.ndim))


class IsotropicTV(Penalty):
    """``F_θ(u) = θ Σ_i ‖u_i‖₂`` over the pixels ``i`` (``‖∇w‖₁,₂`` for ``D = ∇``).

    ``F* = ι_{max_i ‖p_i‖₂ ≤ θ}``, its prox a projection on each pixel's disc.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> q = jnp.array([[3.0], [4.0]])                    # one pixel, |q| = 5
    >>> IsotropicTV().dual_prox(q, 1.0, jnp.array([1.0])).ravel().tolist()
    [0.6, 0.8]
    """

    grouped: ClassVar[bool] = True

    def value(self, u: Array, theta: Array) -> Array:
        return theta[0] * jnp.sum(_group_norm(u))

    def conj(self, p: Array, theta: Array) -> Array:
        return jnp.zeros((), p.dtype)

    def dual_prox(self, q: Array, sigma: Array, theta: Array) -> Array:
        return _project_on_discs(q, theta[0])

    def dual_prox_jvp(
        self, q: Array, Q_dot: Array, sigma: Array, theta: Array, Theta_dot: Array
    ) -> tuple[Array, Array]:
        return _disc_jvp(q, Q_dot, theta[0], Theta_dot[:, 0])


class _TwoWeightsPerPixel(Penalty):
    """A penalty of the gradient's pixels (grouped ``Dw``) with two weights ``θ₀, θ₁``."""

    n_params: ClassVar[int] = 2
    grouped: ClassVar[bool] = True


class AnisotropicTV(_TwoWeightsPerPixel):
    """Separate vertical and horizontal weights: ``F_θ(u) = θ₀‖u_v‖₁ + θ₁‖u_h‖₁``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> q = jnp.array([[2.0], [2.0]])
    >>> AnisotropicTV().dual_prox(q, 1.0, jnp.array([1.0, 0.5])).ravel().tolist()
    [1.0, 0.5]
    """

    def _weights(self, theta: Array, ndim: int) -> Array:
        return theta.reshape((2,) + (1,) * (ndim - 1))

    def value(self, u: Array, theta: Array) -> Array:
        return jnp.sum(self._weights(theta, u.ndim) * jnp.abs(u))

    def conj(self, p: Array, theta: Array) -> Array:
        return jnp.zeros((), p.dtype)

    def dual_prox(self, q: Array, sigma: Array, theta: Array) -> Array:
        t = self._weights(theta, q.ndim)
        return jnp.clip(q, -t, t)

    def dual_prox_jvp(
        self, q: Array, Q_dot: Array, sigma: Array, theta: Array, Theta_dot: Array
    ) -> tuple[Array, Array]:
        t = self._weights(theta, q.ndim)
        t_dot = Theta_dot.reshape(Theta_dot.shape + (1,) * (q.ndim - 1))
        return _clip_jvp(q, Q_dot, t, t_dot)


class TVTikhonov(_TwoWeightsPerPixel):
    """Isotropic TV plus a Tikhonov term on the gradient: ``F_θ(u) = θ₀ Σ_i ‖u_i‖₂ +
    ½θ₁‖u‖²`` (``θ₁ > 0``).

    ``F*(p) = Σ_i (‖p_i‖ − θ₀)₊² / (2θ₁)``; its prox shrinks each pixel's radius ``r > θ₀``
    to ``(θ₁ r + σθ₀)/(θ₁ + σ)`` and keeps the others.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> q = jnp.array([[3.0], [4.0]])
    >>> TVTikhonov().dual_prox(q, 1.0, jnp.array([1.0, 1.0])).ravel().tolist()   # r: 5 → 3
    [1.8..., 2.4...]
    """

    def value(self, u: Array, theta: Array) -> Array:
        return theta[0] * jnp.sum(_group_norm(u)) + 0.5 * theta[1] * jnp.sum(u * u)

    def conj(self, p: Array, theta: Array) -> Array:
        excess = jnp.maximum(_group_norm(p) - theta[0], 0.0)
        return jnp.sum(excess**2) / (2.0 * theta[1])

    def dual_prox(self, q: Array, sigma: Array, theta: Array) -> Array:
        r = _group_norm(q)
        s = (theta[1] * r + sigma * theta[0]) / (theta[1] + sigma)
        return q * jnp.where(r > theta[0], s / r, 1.0)


class TVSecondOrder(Penalty):
    """Total variation plus second-order total variation (TV-TV², Papafitsoros & Schönlieb,
    J. Math. Imaging Vis. 2014): ``F_θ(u) = θ₀ Σ_i ‖(∇w)_i‖₂ + θ₁ Σ_i ‖(∇²w)_i‖_F`` on
    ``u = Dw`` of :class:`~dargmin.imaging.GradientAndHessian2D` (its channels 0-1 and 2-4).

    The first term keeps edges sharp; the second lets smooth shading be piecewise affine
    instead of the staircase of piecewise constants that TV alone gives it. ``F*`` is the
    indicator of two discs per pixel (radii ``θ₀`` and ``θ₁``); its prox projects on each.
    ``tv_denoising(TVSecondOrder())`` picks the operator itself.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> q = jnp.array([[3.0], [4.0], [0.0], [0.0], [0.2]])   # |q₀₁| = 5, |q₂₋₄| = 0.2
    >>> TVSecondOrder().dual_prox(q, 1.0, jnp.array([1.0, 1.0])).ravel().tolist()
    [0.6, 0.8, 0.0, 0.0, 0.2]
    """

    n_params: ClassVar[int] = 2
    grouped: ClassVar[bool] = True

    def default_analysis(self) -> ops.AnalysisOperator:
        return ops.GradientAndHessian2D()

    def value(self, u: Array, theta: Array) -> Array:
        first, second = jnp.sum(_group_norm(u[:2])), jnp.sum(_group_norm(u[2:]))
        return theta[0] * first + theta[1] * second

    def conj(self, p: Array, theta: Array) -> Array:
        return jnp.zeros((), p.dtype)

    def dual_prox(self, q: Array, sigma: Array, theta: Array) -> Array:
        return jnp.concatenate(
            [_project_on_discs(q[:2], theta[0]), _project_on_discs(q[2:], theta[1])]
        )

    def dual_prox_jvp(
        self, q: Array, Q_dot: Array, sigma: Array, theta: Array, Theta_dot: Array
    ) -> tuple[Array, Array]:
        p1, t1 = _disc_jvp(q[:2], Q_dot[:, :2], theta[0], Theta_dot[:, 0])
        p2, t2 = _disc_jvp(q[2:], Q_dot[:, 2:], theta[1], Theta_dot[:, 1])
        return jnp.concatenate([p1, p2]), jnp.concatenate([t1, t2], axis=1)


class HuberTV(_TwoWeightsPerPixel):
    """Huber total variation: ``F_θ(u) = θ₀ Σ_i h_{θ₁}(‖u_i‖₂)``, ``h_α(r) = r²/(2α)`` for
    ``r ≤ α``, ``r − α/2`` beyond (quadratic on small gradients: less staircasing).

    ``F*(p) = θ₁‖p‖²/(2θ₀)`` on ``max_i ‖p_i‖ ≤ θ₀``; its prox scales by
    ``1/(1 + σθ₁/θ₀)`` then projects on the discs.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> pen, theta = HuberTV(), jnp.array([1.0, 1.0])
    >>> float(pen.value(jnp.array([[0.3], [0.4]]), theta))       # r = 0.5 ≤ α: r²/(2α)
    0.125
    >>> pen.dual_prox(jnp.array([[0.3], [0.4]]), 1.0, theta).ravel().tolist()
    [0.15, 0.2]
    """

    def value(self, u: Array, theta: Array) -> Array:
        r, a = _group_norm(u), theta[1]
        return theta[0] * jnp.sum(jnp.where(r <= a, r * r / (2.0 * a), r - 0.5 * a))

    def conj(self, p: Array, theta: Array) -> Array:
        return theta[1] * jnp.sum(p * p) / (2.0 * theta[0])

    def dual_prox(self, q: Array, sigma: Array, theta: Array) -> Array:
        q = q / (1.0 + sigma * theta[1] / theta[0])
        return q / jnp.maximum(1.0, _group_norm(q) / theta[0])
