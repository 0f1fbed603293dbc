"""Regressions of dargmin.hyper: degenerate data, duplicate columns, deprecated names."""

import warnings

import numpy as np
import pytest
from sklearn.datasets import load_diabetes, make_regression
from sklearn.linear_model import Lasso, LassoCV
from sklearn.model_selection import KFold, cross_val_score
from sklearn.preprocessing import PolynomialFeatures, StandardScaler

import dargmin
from dargmin import hyper
from dargmin.hyper import HeldOutMSE, ImplicitForward, ImplicitSupport, LassoHyperCV, ProxCD

TIGHT = ProxCD(tol=1e-14, max_epochs=200_000)


# ------------------------------------------------------------------ degenerate data
@pytest.mark.parametrize(
    ("case", "cause"),
    [("zero_y", "y is all zero"), ("constant_y", "y is constant"), ("zero_X", "X is all zero")],
)
def test_estimator_on_null_model_data_warns_and_reports_a_sensible_alpha(case, cause):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(30, 4)), np.zeros(30)
    if case == "constant_y":
        y = np.full(30, 2.5)
    elif case == "zero_X":
        X, y = np.zeros((30, 4)), rng.normal(size=30)
    with pytest.warns(dargmin.DargminWarning, match=cause):
        est = LassoHyperCV(cv=3).fit(X, y)
    assert est.alpha_ == pytest.approx(1.0)  # the top of the box; α_max = 0 falls back to 1
    assert np.all(est.coef_ == 0)
    assert est.intercept_ == pytest.approx(y.mean())
    np.testing.assert_allclose(est.predict(X), y.mean())


def test_default_box_of_a_null_model_problem_is_finite():
    prob = hyper.lasso(np.zeros((10, 3)), np.ones(10))
    lo, hi = hyper.default_bounds(prob)
    assert np.exp(lo[0]) == pytest.approx(1e-4) and np.exp(hi[0]) == pytest.approx(1.0)


# ------------------------------------------------------------------ duplicate columns
def _split_solution(prob_reduced, theta, keep, dup_of, sign):
    """A Lasso solution of the problem with column ``dup_of`` duplicated (times ``sign``):
    the reduced solution with the weight of ``dup_of`` split between both copies."""
    w = TIGHT.solve(prob_reduced, theta).coef
    assert w[dup_of] != 0
    full = np.zeros(w.size + 1)
    full[keep] = w
    full[dup_of] = 0.3 * w[dup_of]
    full[-1] = sign * 0.7 * w[dup_of]
    return full


def _fd(prob, crit, theta, h=1e-5):
    vals = [float(crit(TIGHT.solve(prob, theta + s * h).coef, prob)) for s in (1, -1)]
    return (vals[0] - vals[1]) / (2 * h)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_duplicate_active_columns_min_norm_hypergradient(sign):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 8))
    y = X[:, :3] @ [2.0, -1.0, 1.5] + 0.5 * rng.normal(size=80)
    Xd = np.hstack([X, sign * X[:, [0]]])  # exact duplicate of column 0 (up to sign)
    tr, va = slice(0, 40), slice(40, 80)
    reduced, full = hyper.lasso(X[tr], y[tr]), hyper.lasso(Xd[tr], y[tr])
    crit_r, crit_f = HeldOutMSE(X[va], y[va]), HeldOutMSE(Xd[va], y[va])
    theta = np.array([np.log(reduced.alpha_max() / 8)])
    w = _split_solution(reduced, theta, np.arange(8), 0, sign)
    assert hyper.kkt_violation(full, w, theta) < 1e-10  # a solution with both copies active
    fd = _fd(reduced, crit_r, theta)  # the prediction (hence R) is that of the reduced problem
    _, g1, info1 = ImplicitSupport().compute(full, crit_f, theta, w)
    _, g2, _ = ImplicitForward(tol=1e-13, max_iter=100_000).compute(full, crit_f, theta, w)
    assert abs(fd) > 1e-3
    np.testing.assert_allclose(g1[0], fd, rtol=1e-5)
    np.testing.assert_allclose(g2[0], g1[0], rtol=1e-6)  # the two methods agree
    s = int(np.count_nonzero(w))
    assert info1["support_rank"] == s - 1
    assert f"rank {s - 1} of |S| = {s}" in info1["notes"][0]
    # Through the public entry point, with the solver started at the split solution.
    hg = hyper.hypergradient(full, crit_f, theta, solver=TIGHT, w0=w)
    np.testing.assert_allclose(hg.grad[0], fd, rtol=1e-5)
    assert hg.info["support_rank"] == s - 1 and hg.info["notes"]
    # A criterion of the non-unique coefficients themselves has no hypergradient.
    with pytest.raises(dargmin.SingularSystemError, match="not in its range"):
        ImplicitSupport().compute(full, hyper.CustomCriterion(lambda ww, p: ww[0]), theta, w)


def _diabetes_poly():
    X, y = load_diabetes(return_X_y=True)
    Xp = StandardScaler().fit_transform(PolynomialFeatures(2, include_bias=False).fit_transform(X))
    return Xp, y


def test_diabetes_polynomial_lasso_hyper_cv_fits_and_hypergradient_matches_fd():
    Xp, y = _diabetes_poly()
    sex = 1
    corr = np.abs(Xp.T @ Xp[:, sex]) / Xp.shape[0]
    dup = [j for j in np.flatnonzero(corr > 1 - 1e-12) if j != sex]
    assert len(dup) == 1  # sex² is an affine function of the binary sex column
    dup = dup[0]
    sign = float(np.sign(Xp[:, dup] @ Xp[:, sex]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        est = LassoHyperCV(cv=5).fit(Xp, y)
    assert np.isfinite(est.cv_loss_) and 1e-4 < est.alpha_ < 100
    # Hypergradient at a θ where the duplicated pair is in the support.
    keep = [j for j in range(Xp.shape[1]) if j != dup]
    tr, va = slice(0, 300), slice(300, None)
    reduced = hyper.lasso(Xp[tr][:, keep], y[tr])
    crit_r = HeldOutMSE(Xp[va][:, keep], y[va])
    order = [*keep, dup]  # the duplicate as the last column
    full = hyper.lasso(Xp[tr][:, order], y[tr])
    crit_f = HeldOutMSE(Xp[va][:, order], y[va])
    theta = np.array([np.log(0.5)])
    w = _split_solution(reduced, theta, np.arange(len(keep)), sex, sign)
    assert hyper.kkt_violation(full, w, theta) < 1e-9
    fd = _fd(reduced, crit_r, theta)
    _, g1, info = ImplicitSupport().compute(full, crit_f, theta, w)
    _, g2, _ = ImplicitForward(tol=1e-13, max_iter=100_000).compute(full, crit_f, theta, w)
    assert info["support_rank"] < np.count_nonzero(w)
    np.testing.assert_allclose(g1[0], fd, rtol=1e-5)
    np.testing.assert_allclose(g2[0], g1[0], rtol=1e-5)


def test_p_greater_than_n_with_noise_fits_past_a_singular_path_minimum():
    # make_regression 60x150 with noise, 3 folds of 40 rows: the coarse path's best points
    # sit near interpolation, where the inner solution has more active features than the
    # rank of their columns (no hypergradient there). The fit used to stop with
    # SingularSystemError at its starting point; it now starts from the best point with a
    # hypergradient, says so, and its alpha's CV loss (re-solved to 1e-10 by scikit-learn)
    # is no worse than that of LassoCV's grid choice (the peer).
    X, y = make_regression(60, 150, noise=5.0, random_state=0)
    cv = KFold(3)
    with pytest.warns(dargmin.DargminWarning, match="singular support system"):
        est = LassoHyperCV(cv=cv, n_path=5).fit(X, y)
    peer = LassoCV(cv=cv, max_iter=100_000).fit(X, y)

    def cv_mse(alpha: float) -> float:
        model = Lasso(alpha=alpha, tol=1e-10, max_iter=200_000)
        return -cross_val_score(model, X, y, cv=cv, scoring="neg_mean_squared_error").mean()

    assert cv_mse(est.alpha_) <= cv_mse(peer.alpha_)
    np.testing.assert_allclose(est.cv_loss_, cv_mse(est.alpha_), rtol=1e-2)


def test_singular_start_reports_the_real_cause():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(10, 30)), rng.normal(size=10)
    with pytest.raises(dargmin.SingularSystemError, match="starting point"):
        hyper.optimize_hyperparameters(
            hyper.ridge(X, y), HeldOutMSE(X, y), [-40.0], bounds=(-41.0, 0.0)
        )


# ------------------------------------------------------------------ strategies and names
def test_method_strings_map_to_objects():
    assert hyper.resolve("method", "implicit") == ImplicitSupport()
    assert hyper.resolve("method", "reverse", unrolled="fista", tol=1e-8) == hyper.Unrolled(
        "reverse", hyper.FISTA(tol=1e-8, max_iter=10_000)
    )
    assert isinstance(hyper.resolve("optimizer", "gd"), hyper.ProjectedGradientDescent)
    with pytest.raises(ValueError, match="Unknown solver 'newton'"):
        hyper.resolve("solver", "newton")
    with pytest.raises(TypeError, match="solve method"):
        hyper.resolve("solver", object())


def test_problems_and_criteria_are_immutable():
    prob = hyper.lasso(np.eye(3), np.ones(3))
    crit = HeldOutMSE(np.eye(3), np.ones(3))
    for obj, attr in ((prob, "design"), (crit, "X_val"), (hyper.SURE(1.0), "sigma")):
        with pytest.raises(AttributeError):
            setattr(obj, attr, None)


@pytest.mark.parametrize(
    ("name", "replacement"),
    [
        ("HyperGradient", "HypergradientResult"),
        ("sure", "SURE(sigma, df=...).evaluate"),
        ("sugar_gradient", 'SURE(sigma, "finite_difference"'),
        ("lasso_degrees_of_freedom", 'degrees_of_freedom(problem, log_theta, df="exact")'),
        ("monte_carlo_degrees_of_freedom", 'df="monte_carlo"'),
        ("make_solver", 'resolve("solver", solver, problem)'),
    ],
)
def test_deprecated_names_warn_and_name_the_replacement(name, replacement):
    with pytest.warns(DeprecationWarning, match=f"dargmin.hyper.{name} is deprecated") as rec:
        obj = getattr(hyper, name)
    assert replacement in str(rec[0].message)
    assert callable(obj)


def test_deprecated_functions_still_work():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 5))
    y = X[:, 0] + 0.3 * rng.normal(size=30)
    prob, t = hyper.lasso(X, y), [np.log(0.1)]
    with pytest.warns(DeprecationWarning):
        lasso_df = hyper.lasso_degrees_of_freedom
    assert lasso_df(prob, t) == round(hyper.degrees_of_freedom(prob, t))
    with pytest.warns(DeprecationWarning):
        sure = hyper.sure
    assert sure(prob, t, 1.0).value == pytest.approx(hyper.SURE(1.0).evaluate(prob, t).value)
    with pytest.warns(DeprecationWarning):
        make_solver = hyper.make_solver
    assert make_solver("cd", prob) == ProxCD()
