"""Data sensitivity of M-estimators (dargmin.sensitivity) against independent truths:
closed-form leave-one-out ridge fits and the e_i/(1 - h_ii) shortcut, actual logistic
refits, finite differences of re-solved weighted problems, jax.jacfwd through
dargmin.argmin, the chain rule, and the explicit sandwich covariance."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import dargmin
from dargmin import sensitivity

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
    with pytest.raises(dargmin.NonStationaryPointError, match="not a stationary point"):
        sensitivity.influence_on_params(
            squared_loss, theta + 0.1, (x, y), regularizer=ridge_penalty
        )
    with pytest.warns(dargmin.DargminWarning):
        sensitivity.influence_on_params(
            squared_loss, theta + 0.1, (x, y), regularizer=ridge_penalty, check="warn"
        )


def test_singular_hessian_raises():
    # Unregularized least squares with more parameters than examples: flat directions.
    x, y, _ = _ridge(3)
    theta = jnp.linalg.lstsq(x, y)[0]
    with pytest.raises(dargmin.SingularSystemError, match="singular"):
        sensitivity.approximate_leave_one_out(squared_loss, theta, (x, y))


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
