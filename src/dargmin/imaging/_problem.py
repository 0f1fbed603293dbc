"""The restoration problem ``argmin_w ½‖y − Φw‖² + F_θ(Dw)``: its forward model ``Φ``,
analysis operator ``D`` and penalty ``F_θ``, its primal and dual objectives, the
validation of ``(y, θ)``, and the factories of the usual problems.

The primal objective is ``P(w) = G(w) + F_θ(Dw)`` with ``G(w) = ½‖y − Φw‖²``; the dual
objective ``−G*(−Dᵀp) − F_θ*(p)`` is ``≤ P(w)`` for every ``w`` (weak duality), so their
difference, the duality gap, bounds ``P(w) − P(ŵ)``.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jax import Array

from dargmin.imaging import _operators as ops
from dargmin.imaging._checks import check_values, refusal
from dargmin.imaging._penalties import L1, IsotropicTV, Penalty


class RestorationProblem(eqx.Module):
    """``argmin_w ½‖y − Φw‖² + F_θ(Dw)``: the forward model, the analysis operator and the
    penalty (``y`` and ``θ`` are given to the solver).

    Use the factories :func:`tv_denoising`, :func:`tv_deblurring`,
    :func:`generalized_lasso`.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> prob = tv_denoising()
    >>> y = jnp.zeros((4, 4)).at[:2].set(1.0)
    >>> float(prob.objective(y, y, jnp.array([0.5])))   # one edge of length 4, jump 1
    2.0
    """

    forward: ops.ForwardOperator
    analysis: ops.AnalysisOperator
    penalty: Penalty

    @property
    def n_params(self) -> int:
        """The length of ``θ``."""
        return self.penalty.n_params

    def objective(self, w: Array, y: Array, theta: Array) -> Array:
        """The primal objective ``P(w) = ½‖y − Φw‖² + F_θ(Dw)``."""
        r = y - self.forward.apply(w)
        return 0.5 * jnp.vdot(r, r) + self.penalty.value(self.analysis.apply(w), theta)

    def dual_objective(self, p: Array, y: Array, theta: Array) -> Array:
        """The dual objective ``−G*(−Dᵀp) − F_θ*(p)`` (``≤ P(w)`` for every ``w``)."""
        return -self.forward.conj_data(-self.analysis.adjoint(p), y) - self.penalty.conj(p, theta)

    def check(self, y: Any, theta: Any, what: str = "solve") -> tuple[Array, Array]:
        """Validate ``y`` and ``θ`` and return them as float arrays.

        Refuses (:class:`~dargmin.DargminError`, ``[reason: …]``) a non-numeric or
        misshapen ``y`` or ``θ`` (``bad_shape``, while tracing), non-finite pixels or ``θ``
        (``nonfinite``) and ``θ ≤ 0`` (``out_of_domain``): at once on concrete inputs,
        from the compiled code under ``jax.jit`` / ``jax.vmap`` (naming the batch members).
        """
        dtype = jnp.result_type(float)
        y_dtype = getattr(y, "dtype", None) or np.asarray(y).dtype
        if not np.issubdtype(y_dtype, np.number):
            raise refusal("bad_shape", f"y must be a numeric array, got dtype {y_dtype}.")
        y_arr = jnp.asarray(y, dtype=dtype)
        self.forward.check_shape(y_arr.shape)
        self.analysis.check_shape(y_arr.shape)
        th = jnp.atleast_1d(jnp.asarray(theta, dtype=dtype))
        if th.shape != (self.n_params,):
            raise refusal(
                "bad_shape",
                f"theta must have {self.n_params} entr{'y' if self.n_params == 1 else 'ies'} "
                f"for {type(self.penalty).__name__}, got shape {th.shape}.",
            )
        return y_arr + check_values(what, y_arr, th), th


def tv_denoising(penalty: Penalty | None = None) -> RestorationProblem:
    """``argmin_w ½‖y − w‖² + θ‖∇w‖₁,₂`` (or another penalty of the gradient, e.g.
    :class:`~dargmin.imaging.TVTikhonov` or :class:`~dargmin.imaging.TVSecondOrder` for
    several parameters; the penalty brings its operator ``D``).

    Examples
    --------
    >>> tv_denoising().n_params
    1
    """
    penalty = penalty or IsotropicTV()
    return RestorationProblem(ops.Identity(), penalty.default_analysis(), penalty)


def tv_deblurring(blur: ops.FFTBlur, penalty: Penalty | None = None) -> RestorationProblem:
    """``argmin_w ½‖y − k ⊛ w‖² + θ‖∇w‖₁,₂`` with a known periodic blur ``k``.

    Examples
    --------
    >>> from dargmin.imaging import FFTBlur
    >>> tv_deblurring(FFTBlur.gaussian((16, 16), 1.0)).n_params
    1
    """
    penalty = penalty or IsotropicTV()
    return RestorationProblem(blur, penalty.default_analysis(), penalty)


def generalized_lasso(D: Any, forward: ops.ForwardOperator | None = None) -> RestorationProblem:
    """``argmin_w ½‖y − Φw‖² + θ‖Dw‖₁`` for a dense matrix ``D`` (``Φ = I`` by default).

    Examples
    --------
    >>> import numpy as np
    >>> generalized_lasso(np.diff(np.eye(5), axis=0)).n_params     # the fused lasso
    1
    """
    return RestorationProblem(forward or ops.Identity(), ops.MatrixAnalysis(D), L1())
