"""Data sensitivity of M-estimators (dargmin.sensitivity) against independent truths:
closed-form leave-one-out ridge fits and the e_i/(1 - h_ii) shortcut, actual logistic
refits, finite differences of re-solved weighted problems, jax.jacfwd through
dargmin.argmin, the chain rule, and the explicit sandwich covariance."""

from __future__ import annotations

import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import dargmin
from dargmin import sensitivity
from dargmin.diagnostics import failure_reason

LAM = 1.0

# ----------------------------------------------------------------------------- ridge


def squared_loss(theta, example):
    x, y = example
    return 0.5 * (x @ theta - y) ** 2


def ridge_penalty(theta):
    return 0.5 * LAM * jnp.sum(theta**2)


def _ridge(n: int, p: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p))
    y = x @ rng.normal(size=p) + 0.5 * rng.normal(size=n)
    theta = np.linalg.solve(x.T @ x + LAM * np.eye(p), x.T @ y)
    return jnp.asarray(x), jnp.asarray(y), jnp.asarray(theta)


def _ridge_exact_loo(x, y):
    """Refit without each example, in closed form (n independent solves)."""
    x, y = np.asarray(x), np.asarray(y)
    p = x.shape[1]
    fits = []
    for i in range(x.shape[0]):
        keep = np.arange(x.shape[0]) != i
        xi, yi = x[keep], y[keep]
        fits.append(np.linalg.solve(xi.T @ xi + LAM * np.eye(p), xi.T @ yi))
    return np.array(fits)


@pytest.mark.parametrize(
    ("linear_solver", "hessian_rank"), [("auto", None), ("auto", 1), ("cg", None)]
)
def test_newton_alo_is_exact_for_ridge(linear_solver, hessian_rank):
    x, y, theta = _ridge(40)
    alo = sensitivity.approximate_leave_one_out(
        squared_loss,
        theta,
        (x, y),
        regularizer=ridge_penalty,
        method="newton",
        linear_solver=linear_solver,
        hessian_rank=hessian_rank,
        solve_rtol=1e-13,
    )
    np.testing.assert_allclose(alo, _ridge_exact_loo(x, y), rtol=0, atol=1e-10)


def test_ridge_loo_residual_shortcut():
    # Classical identity: y_i - x_iᵀθ̂₋ᵢ = e_i / (1 - h_ii), H = X (XᵀX + λI)⁻¹ Xᵀ.
    x, y, theta = _ridge(40)
    hat = x @ jnp.linalg.solve(x.T @ x + LAM * jnp.eye(x.shape[1]), x.T)
    shortcut = (y - x @ theta) / (1.0 - jnp.diag(hat))
    alo = sensitivity.approximate_leave_one_out(
        squared_loss, theta, (x, y), regularizer=ridge_penalty
    )
    np.testing.assert_allclose(y - jnp.sum(x * alo, axis=1), shortcut, rtol=1e-10)
    cv = sensitivity.approximate_cv_error(squared_loss, theta, (x, y), regularizer=ridge_penalty)
    np.testing.assert_allclose(cv, 0.5 * jnp.mean(shortcut**2), rtol=1e-10)


def test_infinitesimal_jackknife_error_shrinks_with_n():
    relative_errors = []
    for n in (40, 160, 640):
        x, y, theta = _ridge(n, seed=0)
        exact = _ridge_exact_loo(x, y)
        # check="ignore": the stationarity check is tested elsewhere; skipping it here saves
        # its compilation for each of the three sizes.
        ij = np.asarray(
            sensitivity.infinitesimal_jackknife(
                squared_loss, theta, (x, y), regularizer=ridge_penalty, check="ignore"
            )
        )
        change = np.linalg.norm(exact - np.asarray(theta), axis=1)
        relative_errors.append(np.median(np.linalg.norm(ij - exact, axis=1) / change))
    # The relative error is about the leverage h_ii ~ p/n.
    assert relative_errors[0] > relative_errors[1] > relative_errors[2], relative_errors
    assert relative_errors[2] < 0.03, relative_errors
    assert relative_errors[0] < 0.5, relative_errors


def two_output_loss(theta, example):
    # Two residuals per example: per-example Hessians A_iᵀA_i of rank 2.
    return 0.5 * jnp.sum((example["a"] @ theta - example["b"]) ** 2)


def test_woodbury_rank_detection_and_pytree_data():
    rng = np.random.default_rng(3)
    n, p = 25, 4
    a = rng.normal(size=(n, 2, p))
    b = rng.normal(size=(n, 2))
    gram = np.einsum("nkp,nkq->pq", a, a) + LAM * np.eye(p)
    theta = jnp.asarray(np.linalg.solve(gram, np.einsum("nkp,nk->p", a, b)))
    data = {"a": jnp.asarray(a), "b": jnp.asarray(b)}
    exact = np.array(
        [
            np.linalg.solve(gram - a[i].T @ a[i], np.einsum("nkp,nk->p", a, b) - a[i].T @ b[i])
            for i in range(n)
        ]
    )
    alo = sensitivity.approximate_leave_one_out(
        two_output_loss, theta, data, regularizer=ridge_penalty, hessian_rank=2
    )
    np.testing.assert_allclose(alo, exact, atol=1e-10)
    with pytest.raises(ValueError, match="hessian_rank=1 is smaller"):
        sensitivity.approximate_leave_one_out(
            two_output_loss, theta, data, regularizer=ridge_penalty, hessian_rank=1, check="ignore"
        )


# ----------------------------------------------------------------------------- logistic

# p/n = 0.2: leverages are large enough for the jackknife's error to be visible next to
# the one-Newton-step error (Rad & Maleki's high-dimensional regime).
N_LOGISTIC, P_LOGISTIC = 80, 16


def logistic_loss(params, example):
    x, y = example  # y ∈ {-1, +1}
    return jnp.logaddexp(0.0, -y * (x @ params["coef"] + params["intercept"]))


def logistic_penalty(params):
    return 0.5 * LAM * jnp.sum(params["coef"] ** 2)


def _logistic_data():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(N_LOGISTIC, P_LOGISTIC))
    logits = x @ (0.7 * rng.normal(size=P_LOGISTIC)) + 0.3
    y = np.where(rng.uniform(size=N_LOGISTIC) < 1 / (1 + np.exp(-logits)), 1.0, -1.0)
    return jnp.asarray(x), jnp.asarray(y)


X_LOG, Y_LOG = _logistic_data()
TEMPLATE = {"coef": jnp.zeros(P_LOGISTIC), "intercept": jnp.zeros(())}
UNRAVEL = ravel_pytree(TEMPLATE)[1]


def weighted_logistic_objective(flat, weights):
    losses = jax.vmap(logistic_loss, in_axes=(None, 0))(UNRAVEL(flat), (X_LOG, Y_LOG))
    return jnp.sum(weights * losses) + logistic_penalty(UNRAVEL(flat))


@jax.jit
def weighted_logistic_newton(weights):
    """Newton's method on the weighted objective, to machine precision (strongly convex)."""

    def step(_, flat):
        grad = jax.grad(weighted_logistic_objective)(flat, weights)
        hess = jax.hessian(weighted_logistic_objective)(flat, weights)
        return flat - jnp.linalg.solve(hess, grad)

    return jax.lax.fori_loop(0, 25, step, jnp.zeros(P_LOGISTIC + 1))


ONES = jnp.ones(N_LOGISTIC)
THETA_LOG = UNRAVEL(weighted_logistic_newton(ONES))


def test_logistic_alo_vs_refits():
    # Exact leave-one-out: refit with w = 1 - e_i for every i (vmapped Newton solves).
    exact = jax.vmap(weighted_logistic_newton)(1.0 - jnp.eye(N_LOGISTIC))
    full = ravel_pytree(THETA_LOG)[0]
    flat = jax.vmap(lambda t: ravel_pytree(t)[0])
    data = (X_LOG, Y_LOG)
    newton = flat(
        sensitivity.approximate_leave_one_out(
            logistic_loss, THETA_LOG, data, regularizer=logistic_penalty
        )
    )
    ij = flat(
        sensitivity.approximate_leave_one_out(
            logistic_loss, THETA_LOG, data, regularizer=logistic_penalty, method="ij"
        )
    )

    newton_error = np.linalg.norm(newton - exact, axis=1)
    ij_error = np.linalg.norm(ij - exact, axis=1)
    refit_change = np.linalg.norm(exact - full, axis=1)
    # Typical example (median over the 80): ~0.1 and ~0.15 measured.
    assert np.median(newton_error / ij_error) < 0.2, np.median(newton_error / ij_error)
    assert np.median(ij_error / refit_change) < 0.25, np.median(ij_error / refit_change)
    # Every example: the Newton step is closer than the jackknife, both closer than θ̂.
    assert np.all(newton_error < ij_error)
    assert np.all(ij_error < refit_change)

    # Cross-validation by the Woodbury path (rank-1 GLM Hessians) scores the same
    # Newton-step fits; it is far closer to the exact LOO error than the training loss is.
    def mean_loss(fits):
        return float(jnp.mean(jax.vmap(lambda t, ex: logistic_loss(UNRAVEL(t), ex))(fits, data)))

    cv_alo = sensitivity.approximate_cv_error(
        logistic_loss, THETA_LOG, data, regularizer=logistic_penalty, hessian_rank=1
    )
    np.testing.assert_allclose(cv_alo, mean_loss(newton), rtol=1e-10)
    cv_exact, train = mean_loss(exact), mean_loss(jnp.broadcast_to(full, exact.shape))
    assert abs(float(cv_alo) - cv_exact) < 0.02 * abs(train - cv_exact), (cv_alo, cv_exact, train)


def test_influence_on_params_vs_weight_finite_differences_and_jacfwd():
    influence = sensitivity.influence_on_params(
        logistic_loss, THETA_LOG, (X_LOG, Y_LOG), regularizer=logistic_penalty
    )
    assert influence["coef"].shape == (N_LOGISTIC, P_LOGISTIC)
    assert influence["intercept"].shape == (N_LOGISTIC,)
    flat_influence = jax.vmap(lambda t: ravel_pytree(t)[0])(influence)

    # Central differences of re-solved weighted problems, for a few weights.
    h = 1e-4
    for i in (0, 17, 42):
        e_i = jnp.zeros(N_LOGISTIC).at[i].set(h)
        fd = (weighted_logistic_newton(ONES + e_i) - weighted_logistic_newton(ONES - e_i)) / (2 * h)
        np.testing.assert_allclose(flat_influence[i], fd, rtol=1e-6, atol=1e-9)

    # The implicit derivative of a dargmin.argmin-decorated weighted solver, in forward mode.
    solver = dargmin.argmin(weighted_logistic_objective)(
        lambda init, weights: weighted_logistic_newton(weights)
    )
    jac = jax.jit(jax.jacfwd(lambda w: solver(None, w)))(ONES)  # (p, n)
    np.testing.assert_allclose(flat_influence, jac.T, atol=1e-11)

    # Matrix-free path.
    by_cg = sensitivity.influence_on_params(
        logistic_loss,
        THETA_LOG,
        (X_LOG, Y_LOG),
        regularizer=logistic_penalty,
        linear_solver="cg",
        solve_rtol=1e-12,
    )
    np.testing.assert_allclose(by_cg["coef"], influence["coef"], atol=1e-10)


def test_influence_on_function_matches_chain_rule():
    data = (X_LOG, Y_LOG)
    rng = np.random.default_rng(7)
    x_test = jnp.asarray(rng.normal(size=(100, P_LOGISTIC)))
    y_test = jnp.asarray(np.where(rng.uniform(size=100) < 0.5, 1.0, -1.0))
    influence = sensitivity.influence_on_params(
        logistic_loss, THETA_LOG, data, regularizer=logistic_penalty
    )
    flat_influence = jax.vmap(lambda t: ravel_pytree(t)[0])(influence)
    flat0, unravel = ravel_pytree(THETA_LOG)

    def test_loss(params):
        return jnp.mean(jax.vmap(logistic_loss, in_axes=(None, 0))(params, (x_test, y_test)))

    def predictions(params, m):
        return x_test[:m] @ params["coef"] + params["intercept"]

    cases = [
        (test_loss, ()),  # scalar (m = 1 ≤ n): one reverse solve
        (lambda t: predictions(t, 100), (100,)),  # m = 100 > n: forward
    ]
    for fn, shape in cases:
        result = sensitivity.influence_on_function(
            fn, logistic_loss, THETA_LOG, data, regularizer=logistic_penalty
        )
        assert result.shape == (N_LOGISTIC, *shape)
        jac = jax.jit(jax.jacfwd(lambda f: fn(unravel(f))))(flat0).reshape(-1, flat0.size)
        chain = (flat_influence @ jac.T).reshape(result.shape)
        np.testing.assert_allclose(result, chain, rtol=1e-10, atol=1e-13)


def test_jackknife_variance_is_sandwich_diagonal():
    data = (X_LOG, Y_LOG)
    variance = sensitivity.jackknife_variance(
        logistic_loss, THETA_LOG, data, regularizer=logistic_penalty
    )
    flat0 = ravel_pytree(THETA_LOG)[0]
    # jit: eager (op-by-op) Hessians of a vmapped loss are slow to dispatch.
    hessian = jax.jit(jax.hessian(weighted_logistic_objective))(flat0, ONES)
    grads = jax.jit(
        jax.vmap(jax.grad(lambda f, ex: logistic_loss(UNRAVEL(f), ex)), in_axes=(None, 0))
    )(flat0, data)
    h_inv = jnp.linalg.inv(hessian)
    sandwich = h_inv @ (grads.T @ grads) @ h_inv
    np.testing.assert_allclose(ravel_pytree(variance)[0], jnp.diag(sandwich), rtol=1e-10)


# ----------------------------------------------------------------------------- errors


def test_non_stationary_params_raise():
    x, y, theta = _ridge(40)
    with pytest.raises(dargmin.NonStationaryPointError, match="not a stationary point") as err:
        sensitivity.influence_on_params(
            squared_loss, theta + 0.1, (x, y), regularizer=ridge_penalty
        )
    assert failure_reason(err.value) == "not_stationary"
    with pytest.warns(dargmin.DargminWarning):
        sensitivity.influence_on_params(
            squared_loss, theta + 0.1, (x, y), regularizer=ridge_penalty, check="warn"
        )


def test_singular_hessian_raises():
    # Unregularized least squares with more parameters than examples: flat directions.
    x, y, _ = _ridge(3)
    theta = jnp.linalg.lstsq(x, y)[0]
    with pytest.raises(dargmin.SingularSystemError, match="singular") as err:
        sensitivity.approximate_leave_one_out(squared_loss, theta, (x, y))
    # Rank 3 of 5: exactly singular, numerically a condition number of ~1e16 or inf.
    assert failure_reason(err.value) in ("singular", "ill_conditioned")


def test_bad_arguments():
    x, y, theta = _ridge(10)
    with pytest.raises(ValueError, match="leading"):
        sensitivity.influence_on_params(squared_loss, theta, (x, y[:5]))
    with pytest.raises(ValueError, match="method"):
        sensitivity.approximate_leave_one_out(
            squared_loss, theta, (x, y), regularizer=ridge_penalty, method="exact"
        )
    with pytest.raises(ValueError, match="linear_solver"):
        sensitivity.influence_on_params(
            squared_loss, theta, (x, y), regularizer=ridge_penalty, linear_solver="qr"
        )


# ----------------------------------------------------------------------------- NaN / inf


def _ridge_call(name, x, y, theta, **kwargs):
    """Every public function (and the solver paths of leave-one-out) on the ridge problem."""
    data = (x, y)
    kw = {"regularizer": ridge_penalty, **kwargs}
    calls = {
        "influence_on_params": lambda: sensitivity.influence_on_params(
            squared_loss, theta, data, **kw
        ),
        "influence_on_function": lambda: sensitivity.influence_on_function(
            jnp.sum, squared_loss, theta, data, **kw
        ),
        "infinitesimal_jackknife": lambda: sensitivity.infinitesimal_jackknife(
            squared_loss, theta, data, **kw
        ),
        "jackknife_variance": lambda: sensitivity.jackknife_variance(
            squared_loss, theta, data, **kw
        ),
        "alo_newton": lambda: sensitivity.approximate_leave_one_out(
            squared_loss, theta, data, **kw
        ),
        "alo_woodbury": lambda: sensitivity.approximate_leave_one_out(
            squared_loss, theta, data, hessian_rank=1, **kw
        ),
        "alo_cg": lambda: sensitivity.approximate_leave_one_out(
            squared_loss, theta, data, linear_solver="cg", **kw
        ),
        "approximate_cv_error": lambda: sensitivity.approximate_cv_error(
            squared_loss, theta, data, **kw
        ),
    }
    return calls[name]()


ALL_CALLS = [
    "influence_on_params",
    "influence_on_function",
    "infinitesimal_jackknife",
    "jackknife_variance",
    "alo_newton",
    "alo_woodbury",
    "alo_cg",
    "approximate_cv_error",
]


@pytest.mark.parametrize("check", ["raise", "ignore"])
@pytest.mark.parametrize("name", ALL_CALLS)
def test_nonfinite_data_names_the_leaf_and_examples(name, check):
    # Before: numpy's "LinAlgError: Eigenvalues did not converge" (or, for CG with
    # check="ignore", a silent result).
    x, y, theta = _ridge(40)
    x = x.at[7, 2].set(jnp.nan).at[31, 0].set(jnp.nan)
    with pytest.raises(dargmin.NonStationaryPointError) as err:
        _ridge_call(name, x, y, theta, check=check)
    message = str(err.value)
    assert failure_reason(err.value) == "nonfinite"
    assert message.endswith("[reason: nonfinite]")
    assert "data[0] holds 2 non-finite values (2 NaN, 0 ±inf) among its 200 entries" in message
    assert "in 2 of 40 examples (first: [7, 31])" in message
    assert "the gradient of the loss is not finite for 2 of 40 examples" in message
    assert "data[1]" not in message and "params holds" not in message


def test_nonfinite_targets_and_params_are_named():
    x, y, theta = _ridge(40)
    with pytest.raises(dargmin.NonStationaryPointError, match="nonfinite") as err:
        sensitivity.influence_on_params(
            squared_loss, theta, (x, y.at[3].set(-jnp.inf)), regularizer=ridge_penalty
        )
    assert "data[1] holds 1 non-finite value (0 NaN, 1 ±inf) among its 40 entries" in str(err.value)
    assert "(first: [3])" in str(err.value)
    params = {"coef": theta, "scale": jnp.array([1.0, jnp.nan])}

    def loss(p, example):
        return squared_loss(p["coef"], example) + 0.5 * jnp.sum(p["scale"] ** 2)

    with pytest.raises(dargmin.NonStationaryPointError) as err:
        sensitivity.approximate_leave_one_out(loss, params, (x, y))
    assert failure_reason(err.value) == "nonfinite"
    assert "params['scale'] holds 1 non-finite value (1 NaN, 0 ±inf) among its 2" in str(err.value)


def test_nonfinite_derivatives_of_finite_inputs():
    x, y, theta = _ridge(40)

    def sqrt_loss(t, example):  # value, gradient and Hessian NaN: sqrt of a negative
        return squared_loss(t, example) + 0.0 * jnp.sqrt(t[0] - 10.0)

    for check, solver in (("raise", "auto"), ("ignore", "cg")):
        with pytest.raises(dargmin.NonStationaryPointError) as err:
            sensitivity.influence_on_params(
                sqrt_loss,
                theta,
                (x, y),
                regularizer=ridge_penalty,
                check=check,
                linear_solver=solver,
            )
        assert failure_reason(err.value) == "nonfinite"
        assert "the gradient of the loss is not finite for 40 of 40 examples" in str(err.value)
        assert "Every input is finite: the loss itself" in str(err.value)

    # Finite gradient (zero), non-finite Hessian: d²/dt² |t - t̂|^1.5 = inf·0 at t = t̂.
    anchor = float(theta[0])

    def kinked_loss(t, example):
        return squared_loss(t, example) + 1e-30 * jnp.abs(t[0] - anchor) ** 1.5

    with pytest.raises(dargmin.SingularSystemError) as err:
        sensitivity.approximate_leave_one_out(kinked_loss, theta, (x, y), regularizer=ridge_penalty)
    assert failure_reason(err.value) == "nonfinite"
    assert "the Hessian of the objective has" in str(err.value)
    assert "gradient" not in str(err.value)

    # A regularizer with a non-finite gradient is named as such.
    with pytest.raises(dargmin.NonStationaryPointError) as err:
        sensitivity.influence_on_params(
            squared_loss,
            theta,
            (x, y),
            regularizer=lambda t: ridge_penalty(t) + 0.0 * jnp.sqrt(-(t[1] ** 2) - 1.0),
        )
    assert "the gradient of the regularizer has 1 non-finite entry of 5" in str(err.value)
    assert "the regularizer itself" in str(err.value)


def test_nonfinite_value_with_finite_derivatives_and_unused_nan_leaf_are_fine():
    # NaN where the derivatives never look is no error: the exact refits are the truth.
    x, y, theta = _ridge(40)
    exact = _ridge_exact_loo(x, y)
    ids = jnp.where(jnp.arange(40) == 5, jnp.nan, 1.0)

    def dict_loss(t, example):  # ignores example["id"]; its value is NaN everywhere
        return squared_loss(t, (example["x"], example["y"])) + 0.0 * jnp.log(-1.0)

    alo = sensitivity.approximate_leave_one_out(
        dict_loss, theta, {"x": x, "y": y, "id": ids}, regularizer=ridge_penalty
    )
    np.testing.assert_allclose(alo, exact, rtol=0, atol=1e-10)


def test_nonfinite_fn_in_influence_on_function():
    x, y, theta = _ridge(40)
    with pytest.raises(dargmin.DargminError, match="Jacobian of fn") as err:
        sensitivity.influence_on_function(
            lambda t: jnp.sqrt(t[0] - 10.0), squared_loss, theta, (x, y), regularizer=ridge_penalty
        )
    assert failure_reason(err.value) == "nonfinite"
    assert "1 non-finite entry of 5" in str(err.value)


# ----------------------------------------------------------------------------- saddles


def saddle_loss(theta, z):
    # Stationary at θ = (z̄, z̄); Hessian diag(n, -n): a saddle.
    return 0.5 * (theta[0] - z) ** 2 - 0.5 * (theta[1] - z) ** 2


SADDLE_DATA = jnp.array([0.0, 1.0, 5.0])
SADDLE_THETA = jnp.full(2, jnp.mean(SADDLE_DATA))


def test_saddle_is_refused_with_its_eigenvalues():
    with pytest.raises(dargmin.SingularSystemError, match=r"in \[-3, 3\]") as err:
        sensitivity.influence_on_params(saddle_loss, SADDLE_THETA, SADDLE_DATA)
    assert failure_reason(err.value) == "not_minimum"
    # check="ignore": Cholesky fails on the indefinite H, the LU fallback gives -H⁻¹g_i.
    influence = sensitivity.influence_on_params(
        saddle_loss, SADDLE_THETA, SADDLE_DATA, check="ignore"
    )
    h = np.diag([3.0, -3.0])
    g = np.stack([SADDLE_THETA[0] - SADDLE_DATA, -(SADDLE_THETA[1] - SADDLE_DATA)], axis=1)
    np.testing.assert_allclose(influence, -np.linalg.solve(h, g.T).T, rtol=1e-12)


def test_woodbury_names_an_indefinite_or_singular_hessian():
    # The Woodbury path factorizes H by Cholesky: before, NaNs from the failed
    # factorization were reported as "H - H_i singular for 3 of 3 examples".
    with pytest.raises(dargmin.SingularSystemError, match=r"in \[-3, 3\]") as err:
        sensitivity.approximate_leave_one_out(
            saddle_loss, SADDLE_THETA, SADDLE_DATA, hessian_rank=2, check="ignore"
        )
    assert failure_reason(err.value) == "not_minimum"
    assert "not positive definite" in str(err.value)

    def flat_loss(theta, z):  # θ₁ unconstrained: H = diag(3, 0)
        return 0.5 * (theta[0] - z) ** 2

    with pytest.raises(dargmin.SingularSystemError, match=r"in \[0, 3\]") as err:
        sensitivity.approximate_leave_one_out(
            flat_loss, SADDLE_THETA, SADDLE_DATA, hessian_rank=1, check="ignore"
        )
    assert failure_reason(err.value) == "singular"
    with pytest.raises(dargmin.SingularSystemError, match=r"in \[0, 3\]") as err:
        sensitivity.influence_on_params(flat_loss, SADDLE_THETA, SADDLE_DATA, check="ignore")
    assert failure_reason(err.value) == "singular"


# ----------------------------------------------------------------------------- data frames


class FrameLike:
    """The part of a pandas DataFrame that dargmin uses: to_numpy() and dtypes."""

    def __init__(self, values):
        self._values = np.asarray(values)
        self.dtypes = {f"c{j}": self._values.dtype for j in range(self._values.shape[1])}

    def to_numpy(self, dtype=None, na_value=None):
        return self._values.astype(dtype) if dtype is not None else self._values.copy()


def test_frame_like_data_is_converted():
    x, y, theta = _ridge(40)
    alo = sensitivity.approximate_leave_one_out(
        squared_loss, theta, (FrameLike(x), y), regularizer=ridge_penalty
    )
    np.testing.assert_allclose(alo, _ridge_exact_loo(x, y), rtol=0, atol=1e-10)
    with pytest.raises(TypeError, match=r"data\[1\] has the non-numeric dtype object"):
        sensitivity.influence_on_params(
            squared_loss, theta, (x, np.asarray(y).astype(object)), regularizer=ridge_penalty
        )


def test_pandas_data():
    pd = pytest.importorskip("pandas")
    x, y, theta = _ridge(40)
    frame = pd.DataFrame(np.asarray(x), columns=[f"x{j}" for j in range(5)])
    target = pd.Series(np.asarray(y), name="y")
    calls = [
        lambda d: sensitivity.approximate_leave_one_out(
            squared_loss, theta, d, regularizer=ridge_penalty
        ),
        lambda d: sensitivity.influence_on_params(
            squared_loss, theta, d, regularizer=ridge_penalty
        ),
        lambda d: sensitivity.approximate_cv_error(
            squared_loss, theta, d, regularizer=ridge_penalty
        ),
    ]
    for call in calls:
        from_frame = call((frame, target))
        np.testing.assert_array_equal(from_frame, call((frame.to_numpy(), target.to_numpy())))
    np.testing.assert_allclose(calls[0]((frame, target)), _ridge_exact_loo(x, y), atol=1e-10)

    # A whole DataFrame as data, rows as examples.
    table = frame.assign(y=target)

    def row_loss(t, row):
        return 0.5 * (row[:5] @ t - row[5]) ** 2

    np.testing.assert_allclose(
        sensitivity.approximate_leave_one_out(row_loss, theta, table, regularizer=ridge_penalty),
        _ridge_exact_loo(x, y),
        atol=1e-10,
    )
    with pytest.raises(
        TypeError, match=r"data\[0\] is a DataFrame with non-numeric column\(s\) 'name'"
    ):
        sensitivity.influence_on_params(
            squared_loss, theta, (frame.assign(name="a"), target), regularizer=ridge_penalty
        )
    # Nullable dtypes: missing values become NaN, then named like any NaN.
    holey = frame.astype("Float64")
    holey.iloc[4, 1] = pd.NA
    with pytest.raises(dargmin.NonStationaryPointError, match=r"data\[0\] holds 1 non-finite"):
        sensitivity.influence_on_params(
            squared_loss, theta, (holey, target), regularizer=ridge_penalty
        )


# ----------------------------------------------------------------------------- memory


def _fit_with_fresh_loss(traces: list):
    """Define a new loss and regularizer, use them twice, and return weak references."""

    def loss(mu, z):
        traces.append("loss")
        return 0.5 * (mu - z) ** 2

    def penalty(mu):
        return 0.5 * mu**2

    data = jnp.array([0.0, 1.0, 5.0])
    mu = jnp.sum(data) / 4.0  # minimizer of Σ½(μ - z)² + ½μ²
    first = sensitivity.influence_on_params(loss, mu, data, regularizer=penalty)
    traced = len(traces)
    second = sensitivity.influence_on_params(loss, mu, data, regularizer=penalty)
    assert len(traces) == traced > 0  # the second call reuses the compiled code
    # dμ̂/dw_i = -(μ̂ - z_i) / (n + 1)
    np.testing.assert_allclose(first, -(mu - data) / 4.0, rtol=1e-12)
    np.testing.assert_array_equal(first, second)
    return weakref.ref(loss), weakref.ref(penalty)


def test_dropped_loss_is_garbage_collected_with_its_compiled_code():
    # Before, jax.jit's cache of static arguments held every loss (and ~11 MB of
    # executables each) for the life of the process.
    traces = []
    loss_ref, penalty_ref = _fit_with_fresh_loss(traces)
    gc.collect()
    assert loss_ref() is None
    assert penalty_ref() is None


def test_bound_method_loss_is_reused_then_collected():
    class Model:
        def __init__(self):
            self.traces = 0

        def loss(self, mu, z):
            self.traces += 1
            return 0.5 * (mu - z) ** 2

    model = Model()
    data = jnp.array([0.0, 1.0, 5.0])
    # A new bound-method object at each access: the compiled code is still reused.
    first = sensitivity.influence_on_params(model.loss, jnp.mean(data), data)
    traced = model.traces
    second = sensitivity.influence_on_params(model.loss, jnp.mean(data), data)
    assert model.traces == traced > 0
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, (data - jnp.mean(data)) / 3, rtol=1e-12)
    model_ref = weakref.ref(model)
    del model
    gc.collect()
    assert model_ref() is None
