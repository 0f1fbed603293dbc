"""Hypergradients of dargmin.hyper against independent truths.

Truths: central finite differences of the criterion with a tightly converged inner solver,
the closed-form Lasso Jacobian on the support, scikit-learn's solvers, and dargmin's own
fixed_point / argmin implicit differentiation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import Lasso

import dargmin
from dargmin import hyper
from dargmin.hyper import (
    FISTA,
    METHODS,
    CrossVal,
    CustomCriterion,
    HeldOutLogistic,
    HeldOutMSE,
    ProxCD,
    SklearnSolver,
    hypergradient,
)

TIGHT = ProxCD(tol=1e-14, max_epochs=200_000)


def _data(n=40, p=12, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(2 * n, p))
    w = np.zeros(p)
    w[:4] = [2.0, -1.5, 1.0, 0.5]
    y = X @ w + 0.5 * rng.normal(size=2 * n)
    return X[:n], y[:n], X[n:], y[n:]


def _logistic_data(n=40, p=12, seed=1):
    Xt, yt, Xv, yv = _data(n, p, seed)
    return Xt, np.where(yt > 0, 1.0, -1.0), Xv, np.where(yv > 0, 1.0, -1.0)


# model name -> (factory, data, criterion class, log_theta as a function of the problem)
def _case(name):
    Xt, yt, Xv, yv = _data()
    if name in ("sparse_logistic", "l2_logistic"):
        Xt, yt, Xv, yv = _logistic_data()
        crit = HeldOutLogistic(Xv, yv)
    else:
        crit = HeldOutMSE(Xv, yv)
    prob = getattr(hyper, name)(Xt, yt)
    amax = prob.alpha_max()
    if name == "ridge":
        theta = np.array([np.log(0.3)])
    elif name == "l2_logistic":
        theta = np.array([np.log(0.05)])
    elif name == "elastic_net":
        theta = np.log([amax / 8, amax / 5])
    elif name == "weighted_lasso":
        theta = np.log(amax / 8) + np.random.default_rng(3).uniform(-0.3, 0.3, prob.n_hyper)
    else:
        theta = np.array([np.log(amax / 8)])
    return prob, crit, theta


def _fd_directional(prob, crit, theta, direction, h):
    def R(t):
        res = TIGHT.solve(prob, t)
        assert res.converged
        return float(crit(res.coef, prob)), res.coef

    (rp, wp), (rm, wm) = R(theta + h * direction), R(theta - h * direction)
    w0 = TIGHT.solve(prob, theta).coef
    # Finite differences are valid only when the support is the same on both sides.
    assert np.array_equal(wp != 0, w0 != 0) and np.array_equal(wm != 0, w0 != 0)
    return (rp - rm) / (2 * h)


MODELS = ["lasso", "elastic_net", "weighted_lasso", "sparse_logistic", "ridge", "l2_logistic"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model", MODELS)
def test_hypergradient_matches_finite_differences(model, method):
    prob, crit, theta = _case(model)
    hg = hypergradient(
        prob,
        crit,
        theta,
        method=method,
        solver=ProxCD(tol=1e-13, max_epochs=100_000),
        tol=1e-13,
        max_iter=100_000,
        tol_jac=1e-13,
        max_iter_jac=100_000,
    )
    direction = np.random.default_rng(7).normal(size=prob.n_hyper)
    direction /= np.linalg.norm(direction)
    fd = _fd_directional(prob, crit, theta, direction, h=1e-4)
    got = float(hg.grad @ direction)
    # Non-trivial: the directional derivative must be clearly non-zero for the test to bite.
    assert abs(fd) > 1e-4
    np.testing.assert_allclose(got, fd, rtol=1e-5)
    assert hg.value == pytest.approx(float(crit(TIGHT.solve(prob, theta).coef, prob)), rel=1e-8)


def test_lasso_jacobian_closed_form_on_support():
    # ½n convention: on S, X_Sᵀ X_S w_S = X_Sᵀ y − nλ sign(w_S), so
    # dw_S/dλ = −n (X_SᵀX_S)⁻¹ sign(w_S), and dw_S/dθ = λ dw_S/dλ for λ = e^θ; 0 off S.
    Xt, yt, _, _ = _data()
    prob = hyper.lasso(Xt, yt, fit_intercept=False)
    lam = prob.alpha_max() / 10
    theta = np.array([np.log(lam)])
    w = TIGHT.solve(prob, theta).coef
    S = np.flatnonzero(w)
    assert 0 < S.size < prob.n_features
    n = Xt.shape[0]
    XS = Xt[:, S]
    expected = np.zeros(prob.n_features)
    expected[S] = -n * lam * np.linalg.solve(XS.T @ XS, np.sign(w[S]))
    for method in ("implicit", "implicit_forward", "forward", "reverse"):
        jac = np.array(
            [
                hypergradient(
                    prob,
                    CustomCriterion(lambda ww, pr, j=j: ww[j]),
                    theta,
                    method=method,
                    solver=TIGHT,
                    tol=1e-13,
                    tol_jac=1e-13,
                ).grad[0]
                for j in range(prob.n_features)
            ]
        )
        np.testing.assert_allclose(jac, expected, rtol=1e-7, atol=1e-9, err_msg=method)


def test_implicit_support_matches_dargmin_fixed_point():
    """The support-restricted system equals dargmin.fixed_point on the ISTA map."""
    Xt, yt, Xv, yv = _data()
    prob = hyper.lasso(Xt, yt, fit_intercept=False)
    crit = HeldOutMSE(Xv, yv)
    theta = np.array([np.log(prob.alpha_max() / 6)])
    X, y, n = jnp.asarray(Xt), jnp.asarray(yt), Xt.shape[0]
    step = n / np.linalg.norm(Xt, 2) ** 2

    def T(w, t):
        grad = X.T @ (X @ w - y) / n
        return hyper.soft_threshold(w - step * grad, step * jnp.exp(t[0]))

    w_star = TIGHT.solve(prob, theta).coef

    @dargmin.fixed_point(T)
    def solve(init, t):
        return jnp.asarray(w_star)

    with jax.enable_x64(True):
        g = jax.grad(lambda t: crit(solve(None, t), prob))(jnp.asarray(theta))
    hg = hypergradient(prob, crit, theta, solver=TIGHT)
    np.testing.assert_allclose(hg.grad, np.asarray(g), rtol=1e-8)


def test_smooth_backends_agree_with_dargmin_argmin():
    prob, crit, theta = _case("ridge")
    a = hypergradient(prob, crit, theta, smooth_backend="support")
    b = hypergradient(prob, crit, theta, smooth_backend="argmin")
    np.testing.assert_allclose(a.grad, b.grad, rtol=1e-8)


def test_weighted_lasso_with_equal_weights_is_lasso():
    Xt, yt, Xv, yv = _data()
    crit = HeldOutMSE(Xv, yv)
    lasso_p, wl_p = hyper.lasso(Xt, yt), hyper.weighted_lasso(Xt, yt)
    t = np.log(lasso_p.alpha_max() / 7)
    a = hypergradient(lasso_p, crit, [t], solver=TIGHT)
    b = hypergradient(wl_p, crit, np.full(Xt.shape[1], t), solver=TIGHT)
    np.testing.assert_allclose(b.coef, a.coef, atol=1e-12)
    assert b.value == pytest.approx(a.value, rel=1e-12)
    # dR/dθ along the all-ones direction is the single-α hypergradient.
    np.testing.assert_allclose(b.grad.sum(), a.grad[0], rtol=1e-9)
    # Features off the support have no influence: their hypergradient is exactly 0.
    assert np.all(b.grad[b.coef == 0] == 0)


@pytest.mark.parametrize("solver", [ProxCD(tol=1e-12), FISTA(tol=1e-12), SklearnSolver(tol=1e-14)])
def test_inner_solvers_match_sklearn_lasso(solver):
    Xt, yt, _, _ = _data()
    prob = hyper.lasso(Xt, yt)
    alpha = prob.alpha_max() / 9
    ref = Lasso(alpha=alpha, tol=1e-14, max_iter=100_000).fit(Xt, yt)
    res = solver.solve(prob, [np.log(alpha)])
    coef, intercept = prob.coef_intercept(res.coef)
    np.testing.assert_allclose(coef, ref.coef_, atol=1e-8)
    assert intercept == pytest.approx(ref.intercept_, abs=1e-8)


def test_weighted_sklearn_solver_matches_cd():
    Xt, yt, _, _ = _data()
    prob = hyper.weighted_lasso(Xt, yt)
    theta = np.log(prob.alpha_max() / 8) + np.random.default_rng(0).uniform(-1, 1, 12)
    a = SklearnSolver(tol=1e-14).solve(prob, theta).coef
    b = ProxCD(tol=1e-13).solve(prob, theta).coef
    np.testing.assert_allclose(a, b, atol=1e-8)


def test_cross_validation_is_mean_of_folds():
    Xt, yt, _, _ = _data(n=60)
    prob = hyper.lasso(Xt, yt)
    crit = CrossVal(HeldOutMSE, cv=3)
    theta = [np.log(prob.alpha_max() / 10)]
    hg = hypergradient(prob, crit, theta, solver=TIGHT)
    parts = [hypergradient(p, c, theta, solver=TIGHT) for p, c in crit.folds(prob)]
    assert hg.value == pytest.approx(np.mean([h.value for h in parts]), rel=1e-12)
    np.testing.assert_allclose(hg.grad, np.mean([h.grad for h in parts], axis=0), rtol=1e-10)
    assert hg.n_solves == 3 and len(hg.coef) == 3
    # And against finite differences of the whole CV criterion.
    fd = []
    for s in (1, -1):
        th = np.asarray(theta) + s * 1e-5
        fd.append(hypergradient(prob, crit, th, solver=TIGHT).value)
    np.testing.assert_allclose(hg.grad[0], (fd[0] - fd[1]) / 2e-5, rtol=1e-5)


# ------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_clear_errors():
    Xt, yt, Xv, yv = _data()
    bad = Xt.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        hyper.lasso(bad, yt)
    with pytest.raises(ValueError, match="one entry per row"):
        hyper.lasso(Xt, yt[:-1])
    prob = hyper.lasso(Xt, yt)
    with pytest.raises(ValueError, match="1 hyperparameter"):
        hypergradient(prob, HeldOutMSE(Xv, yv), [0.0, 1.0])
    with pytest.raises(ValueError, match="finite"):
        hypergradient(prob, HeldOutMSE(Xv, yv), [np.inf])
    with pytest.raises(ValueError, match="features"):
        hypergradient(prob, HeldOutMSE(Xv[:, :3], yv), [0.0])
    with pytest.raises(ValueError, match="Unknown method"):
        hypergradient(prob, HeldOutMSE(Xv, yv), [0.0], method="magic")
    with pytest.raises(ValueError, match="labels"):
        hyper.sparse_logistic(Xt, yt)


def test_unconverged_inner_solver_warns_with_numbers():
    Xt, yt, Xv, yv = _data()
    prob = hyper.lasso(Xt, yt)
    with pytest.warns(hyper.InnerSolverWarning, match=r"KKT violation [0-9.e-]+ > tol"):
        hypergradient(prob, HeldOutMSE(Xv, yv), [np.log(0.01)], solver=ProxCD(max_epochs=2))


def test_singular_restricted_system_raises():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(10, 30)), rng.normal(size=10)
    prob = hyper.ridge(X, y)  # p > n: XᵀX is singular, μ = e^-40 does not fix it
    with pytest.raises(dargmin.SingularSystemError, match="condition number"):
        hypergradient(prob, HeldOutMSE(X, y), [-40.0])
