"""Linear operators of the imaging problems: the forward model ``Φ`` and the analysis ``D``.

``Φ`` enters the data term ``G(w) = ½‖y − Φw‖²``, which the primal-dual solver handles by
its exact proximal map; ``D`` enters the penalty ``F(Dw)``, which it handles through its
dual. Each operator is an :class:`equinox.Module` (a pytree: its arrays are leaves, so one
compiled solver serves every blur kernel or matrix of the same shape).
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from dargmin.imaging._checks import refusal


# ----------------------------------------------------------------------------- forward Φ
class ForwardOperator(eqx.Module):
    """The forward model ``Φ`` of ``G(w) = ½‖y − Φw‖²`` and the pieces the solver needs."""

    @abc.abstractmethod
    def apply(self, w: Array) -> Array:
        """``Φw``."""

    @abc.abstractmethod
    def prox_data(self, v: Array, tau: Array, y: Array) -> Array:
        """``argmin_w ½‖y − Φw‖² + ‖w − v‖²/(2τ) = (I + τΦᵀΦ)⁻¹(v + τΦᵀy)``."""

    def prox_data_tangent(self, v_dot: Array, tau: Array, y_dot: Array | None) -> Array:
        """The derivative of :meth:`prox_data` along ``(v̇, ẏ)``: ``prox_data(v̇, τ, ẏ)``, as
        it is linear in ``(v, y)`` (``ẏ = None``: zero, which saves its transform)."""
        return self.prox_data(v_dot, tau, jnp.zeros_like(v_dot) if y_dot is None else y_dot)

    @abc.abstractmethod
    def conj_data(self, v: Array, y: Array) -> Array:
        """``G*(v) = sup_w ⟨v, w⟩ − ½‖y − Φw‖² = ⟨u, y⟩ + ½‖u‖²`` with ``Φᵀu = v``."""

    @property
    def strong_convexity(self) -> float:
        """A lower bound on the smallest eigenvalue of ``ΦᵀΦ`` (0: no acceleration)."""
        return 0.0

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Refuse (``[reason: bad_shape]``) an observation ``y`` of a shape ``Φ`` cannot
        produce; any shape by default."""


class Identity(ForwardOperator):
    """``Φ = I`` (denoising): ``G`` is 1-strongly convex, so the solver accelerates.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> Identity().prox_data(jnp.zeros(2), 1.0, jnp.ones(2)).tolist()
    [0.5, 0.5]
    """

    def apply(self, w: Array) -> Array:
        return w

    def prox_data(self, v: Array, tau: Array, y: Array) -> Array:
        return (v + tau * y) / (1.0 + tau)

    def prox_data_tangent(self, v_dot: Array, tau: Array, y_dot: Array | None) -> Array:
        return v_dot / (1.0 + tau) if y_dot is None else self.prox_data(v_dot, tau, y_dot)

    def conj_data(self, v: Array, y: Array) -> Array:
        return jnp.vdot(v, y) + 0.5 * jnp.vdot(v, v)

    @property
    def strong_convexity(self) -> float:
        return 1.0


class FFTBlur(ForwardOperator):
    """A circular convolution ``Φw = k ⊛ w`` (periodic boundaries), applied by FFT.

    ``ΦᵀΦ`` is diagonal in the Fourier basis, so ``prox_data`` is exact:
    ``ŵ = (v̂ + τ φ̂* ŷ)/(1 + τ|φ̂|²)``. The kernel is centred on pixel ``(0, 0)`` (use
    :meth:`gaussian`); a symmetric kernel has a real transfer function ``φ̂``.

    Parameters
    ----------
    transfer
        ``φ̂ = rfft2(kernel)``, shape ``(H, W // 2 + 1)``.
    shape
        ``(H, W)``, the image shape.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> blur = FFTBlur.gaussian((8, 8), 1.0)
    >>> round(float(blur.apply(jnp.ones((8, 8))).mean()), 6)   # a blur keeps the mean
    1.0
    """

    transfer: Array
    shape: tuple[int, int] = eqx.field(static=True)

    @classmethod
    def from_kernel(cls, kernel: Array) -> FFTBlur:
        """The blur by ``kernel`` (an ``(H, W)`` array centred on pixel ``(0, 0)``)."""
        kernel = jnp.asarray(kernel)
        if kernel.ndim != 2:
            raise ValueError(f"The blur kernel must be 2-D (H, W), got shape {kernel.shape}.")
        return cls(jnp.fft.rfft2(kernel), (int(kernel.shape[0]), int(kernel.shape[1])))

    @classmethod
    def gaussian(cls, shape: tuple[int, int], width: float) -> FFTBlur:
        """A normalized Gaussian blur of standard deviation ``width`` pixels on an image of
        ``shape``, wrapped around the borders (periodic)."""
        if not (np.isfinite(width) and width > 0):
            raise ValueError(f"The blur width must be finite and > 0, got {width}.")
        H, W = (int(s) for s in shape)
        # Signed circular distances to pixel (0, 0): the kernel is centred there so that the
        # convolution does not shift the image.
        di = np.minimum(np.arange(H), H - np.arange(H))[:, None]
        dj = np.minimum(np.arange(W), W - np.arange(W))[None, :]
        k = np.exp(-(di**2 + dj**2) / (2.0 * width**2))
        return cls.from_kernel(jnp.asarray(k / k.sum()))

    def check_shape(self, shape: tuple[int, ...]) -> None:
        if tuple(shape) != self.shape:
            raise refusal(
                "bad_shape",
                f"y has shape {tuple(shape)} but the blur was built for {self.shape}.",
            )

    def _filter(self, w: Array, h: Array) -> Array:
        return jnp.fft.irfft2(h * jnp.fft.rfft2(w), s=self.shape)

    def apply(self, w: Array) -> Array:
        return self._filter(w, self.transfer)

    def adjoint(self, r: Array) -> Array:
        """``Φᵀr``."""
        return self._filter(r, jnp.conj(self.transfer))

    def prox_data(self, v: Array, tau: Array, y: Array) -> Array:
        h = self.transfer
        num = jnp.fft.rfft2(v) + tau * jnp.conj(h) * jnp.fft.rfft2(y)
        return jnp.fft.irfft2(num / (1.0 + tau * jnp.abs(h) ** 2), s=self.shape)

    def prox_data_tangent(self, v_dot: Array, tau: Array, y_dot: Array | None) -> Array:
        if y_dot is not None:
            return self.prox_data(v_dot, tau, y_dot)
        return self._filter(v_dot, 1.0 / (1.0 + tau * jnp.abs(self.transfer) ** 2))

    def conj_data(self, v: Array, y: Array) -> Array:
        # u = Φ⁻ᵀv in the Fourier basis; finite whenever φ̂ has no zero (a Gaussian blur).
        u = jnp.fft.irfft2(jnp.fft.rfft2(v) / jnp.conj(self.transfer), s=self.shape)
        return jnp.vdot(u, y) + 0.5 * jnp.vdot(u, u)


# ---------------------------------------------------------------------------- analysis D
class AnalysisOperator(eqx.Module):
    """The linear operator ``D`` of the penalty ``F(Dw)``: ``apply``, ``adjoint``, ``norm``."""

    @abc.abstractmethod
    def apply(self, w: Array) -> Array:
        """``Dw``."""

    @abc.abstractmethod
    def adjoint(self, p: Array) -> Array:
        """``Dᵀp``."""

    @abc.abstractmethod
    def norm(self) -> float:
        """An upper bound on the operator norm ``‖D‖`` (sets the step sizes)."""

    @abc.abstractmethod
    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Refuse (``[reason: bad_shape]``) a signal shape ``D`` does not act on."""


class Gradient2D(AnalysisOperator):
    """Forward differences with Neumann boundaries: ``(Dw)[0] = ∂_vertical w``, ``(Dw)[1] =
    ∂_horizontal w``, the last row / column of differences being zero (scikit-image's
    convention in ``denoise_tv_chambolle``). ``‖D‖² ≤ 8``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> Gradient2D().apply(jnp.array([[0.0, 1.0], [2.0, 3.0]])).tolist()
    [[[2.0, 2.0], [0.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]]
    """

    def apply(self, w: Array) -> Array:
        # pad + diff, not .at[].set: XLA fuses it into one pass over the image.
        dv = jnp.pad(w[1:, :] - w[:-1, :], ((0, 1), (0, 0)))
        dh = jnp.pad(w[:, 1:] - w[:, :-1], ((0, 0), (0, 1)))
        return jnp.stack([dv, dh])

    def adjoint(self, p: Array) -> Array:
        # Dᵀ = −div: each difference w[i+1] − w[i] sends +p[i] to i+1 and −p[i] to i.
        pv, ph = p[0][:-1, :], p[1][:, :-1]
        out = jnp.pad(pv, ((1, 0), (0, 0))) - jnp.pad(pv, ((0, 1), (0, 0)))
        return out + jnp.pad(ph, ((0, 0), (1, 0))) - jnp.pad(ph, ((0, 0), (0, 1)))

    def norm(self) -> float:
        return float(np.sqrt(8.0))

    def check_shape(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 2:
            raise refusal(
                "bad_shape",
                f"Total variation needs a 2-D grey image y of shape (H, W); got shape "
                f"{tuple(shape)}. Convert colour images to grey (or solve per channel).",
            )
        if min(shape) < 2:
            raise refusal("bad_shape", f"The image must be at least 2 × 2, got shape {shape}.")


_GRADIENT = Gradient2D()


class GradientAndHessian2D(AnalysisOperator):
    """First and second differences at once: ``Dw = (∂_v w, ∂_h w, ∂_vv w, ∂_hh w, √2 ∂_vh w)``.

    Channels ``0-1`` are :class:`Gradient2D`'s. Channels ``2-4`` are the discrete Hessian,
    scaled so that their norm per pixel is its Frobenius norm (the second-order total
    variation of :class:`~dargmin.imaging.TVSecondOrder`): central second differences
    ``w[i+1] − 2w[i] + w[i−1]``, zero on the first and last row (column), and the forward
    mixed difference ``∂_h ∂_v w`` of :class:`Gradient2D`. All three vanish on an affine
    image, boundaries included, so that the penalty favours piecewise-affine shading.
    ``‖D‖² ≤ 8 + 16 + 16 + 2·16 = 72``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> w = jnp.array([[0.0, 1.0, 4.0, 9.0]] * 3)          # w = j² on every row
    >>> GradientAndHessian2D().apply(w)[3, 0].tolist()      # ∂_hh w: 2 inside, 0 at the ends
    [0.0, 2.0, 2.0, 0.0]
    """

    def apply(self, w: Array) -> Array:
        g = _GRADIENT.apply(w)
        dvv = jnp.pad(w[2:, :] - 2.0 * w[1:-1, :] + w[:-2, :], ((1, 1), (0, 0)))
        dhh = jnp.pad(w[:, 2:] - 2.0 * w[:, 1:-1] + w[:, :-2], ((0, 0), (1, 1)))
        dvh = _GRADIENT.apply(g[0])[1]
        return jnp.concatenate([g, jnp.stack([dvv, dhh, np.sqrt(2.0) * dvh])])

    def adjoint(self, p: Array) -> Array:
        # The transpose of apply's pads, slices and differences, derived by JAX (exact, and
        # one place to keep right instead of a hand-written divergence per channel).
        template = jax.ShapeDtypeStruct(p.shape[1:], p.dtype)
        return jax.linear_transpose(self.apply, template)(p)[0]

    def norm(self) -> float:
        return float(np.sqrt(72.0))

    def check_shape(self, shape: tuple[int, ...]) -> None:
        _GRADIENT.check_shape(shape)
        if min(shape) < 3:
            raise refusal(
                "bad_shape", f"Second differences need an image of at least 3 × 3, got {shape}."
            )


class MatrixAnalysis(AnalysisOperator):
    """A dense matrix ``D`` acting on flattened signals ``w`` of shape ``(n,)``.

    Examples
    --------
    >>> import numpy as np
    >>> D = MatrixAnalysis(np.diff(np.eye(4), axis=0))    # 1-D differences (fused lasso)
    >>> round(D.norm(), 4)
    1.8478
    """

    matrix: Array
    _norm: float = eqx.field(static=True)

    def __init__(self, matrix: Array):
        m = np.asarray(matrix, dtype=float)
        if m.ndim != 2:
            raise ValueError(f"D must be a 2-D matrix, got shape {m.shape}.")
        if not np.all(np.isfinite(m)):
            raise ValueError("D has non-finite entries.")
        self.matrix = jnp.asarray(m)
        self._norm = float(np.linalg.norm(m, 2)) if m.size else 0.0

    def apply(self, w: Array) -> Array:
        return self.matrix @ w

    def adjoint(self, p: Array) -> Array:
        return self.matrix.T @ p

    def norm(self) -> float:
        return self._norm

    def check_shape(self, shape: tuple[int, ...]) -> None:
        n = self.matrix.shape[1]
        if tuple(shape) != (n,):
            raise refusal(
                "bad_shape",
                f"y must have shape ({n},) to match D of shape {tuple(self.matrix.shape)}; "
                f"got {tuple(shape)}.",
            )
