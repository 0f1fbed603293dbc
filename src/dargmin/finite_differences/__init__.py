r"""Finite-difference derivatives with automatic step selection, and gradient checking.

Finite differences are the independent reference against which the automatic
derivatives of this package are tested. All stencil points are evaluated in one
``jax.vmap``-ed batch, and Jacobians batch over all basis directions at once, so the
functions are jit-compatible (``method``/``order`` are static Python values).

Step-size rules (:math:`\varepsilon` = machine epsilon of the input dtype,
:math:`s = \max(1, |x|)`):

* forward / backward, truncation :math:`O(h)`: :math:`h = \sqrt{\varepsilon}\, s`, which
  balances truncation :math:`O(h)` against round-off :math:`O(\varepsilon / h)`;
* central, truncation :math:`O(h^2)`: :math:`h = \varepsilon^{1/3} s` (same balance);
* Richardson: central differences :math:`D_0(h_i)` at :math:`h_i = h_0 / 2^i`,
  :math:`h_0 = s/10`, down to about :math:`\varepsilon^{1/3} s` (15 steps in float64, 6 in
  float32), extrapolated in a Neville tableau. As in Ridders' method, every tableau entry
  gets an error estimate from its neighbours and the entry with the smallest estimate is
  returned, separately for every output entry. This adapts the effective step to the
  function: coarse steps that are too large (or leave its domain and give NaN) are ignored.
"""

# The modules: the difference schemes and step rules (_stencils) → the derivatives built on
# them (_derivatives) → the gradient checker (_gradient_check).
from dargmin.finite_differences._derivatives import (
    directional_derivative_fd,
    finite_difference_derivative,
    gradient_fd,
    hessian_fd,
    hvp_fd,
    jacobian_fd,
)
from dargmin.finite_differences._gradient_check import (
    GradientCheckReport,
    LeafError,
    check_gradients,
)
from dargmin.finite_differences._gradient_check import check_grads as check_grads  # deprecated
from dargmin.finite_differences._stencils import Method as Method

__all__ = [
    "GradientCheckReport",
    "LeafError",
    "check_gradients",
    "directional_derivative_fd",
    "finite_difference_derivative",
    "gradient_fd",
    "hessian_fd",
    "hvp_fd",
    "jacobian_fd",
]
