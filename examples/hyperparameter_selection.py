"""Select the Lasso's alpha: grid search vs hypergradient descent (vs SURE).

Data: scikit-learn's diabetes data with 100 extra noise features (so that the Lasso has work
to do), split into train / validation / test. The criterion is the validation MSE.

* grid search: 100 alphas, warm-started coordinate descent (what LassoCV does per fold);
* hypergradient descent: gradient steps on log(alpha) with dR/dalpha from implicit
  differentiation restricted to the Lasso's support (dargmin.hyper);
* SURE (Stein's unbiased risk estimate) on the training data, which needs no validation set:
  SURE(α) = ‖y − Xŵ‖² − nσ² + 2σ² |support(ŵ)|, minimized over the same grid.

Run: ``python examples/hyperparameter_selection.py`` (a few seconds).
"""

import time

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np
from sklearn.datasets import load_diabetes
from sklearn.linear_model import LinearRegression
from sklearn.preprocessing import StandardScaler

from dargmin import hyper

rng = np.random.default_rng(0)
X, y = load_diabetes(return_X_y=True)
X = np.hstack([X, rng.normal(size=(X.shape[0], 100)) * X.std()])
X = StandardScaler().fit_transform(X)
perm = rng.permutation(X.shape[0])
tr, va, te = np.array_split(perm, 3)

prob = hyper.lasso(X[tr], y[tr])
crit = hyper.HeldOutMSE(X[va], y[va])


def test_mse(w):
    coef, b = prob.coef_intercept(w)
    return float(np.mean((y[te] - X[te] @ coef - b) ** 2))


# --- grid search -----------------------------------------------------------------------
solver = hyper.SklearnSolver(tol=1e-8)
amax = prob.alpha_max()
grid = np.geomspace(amax, amax / 1000, 100)
t0 = time.perf_counter()
vals, sols = [], []
for a in grid:
    w = solver.solve(prob, [np.log(a)]).coef
    sols.append(w)
    vals.append(float(crit(w, prob)))
t_grid = time.perf_counter() - t0
i = int(np.argmin(vals))
print(
    f"grid search   : alpha={grid[i]:.4g}  val MSE={vals[i]:.1f}  test MSE="
    f"{test_mse(sols[i]):.1f}  (100 solves, {t_grid:.2f} s)"
)

# --- hypergradient descent --------------------------------------------------------------
hyper.hypergradient(prob, crit, hyper.default_log_theta0(prob))  # warm the jit caches
t0 = time.perf_counter()
res = hyper.optimize_hyperparameters(prob, crit, method="implicit", max_iter=50)
t_hyper = time.perf_counter() - t0
w = hyper.SklearnSolver(tol=1e-8).solve(prob, res.log_theta).coef
print(
    f"hypergradient : alpha={np.exp(res.log_theta[0]):.4g}  val MSE={res.value:.1f}  "
    f"test MSE={test_mse(w):.1f}  ({res.n_evals} solves, {t_hyper:.2f} s; {res.message})"
)

# --- SURE on the training set ----------------------------------------------------------
# σ² from the residuals of an unpenalized fit on the 10 original features (an estimate
# with n − 11 degrees of freedom); df of the Lasso = size of the support (Zou et al. 2007).
Xtr, ytr = X[tr], y[tr]
ols = LinearRegression().fit(Xtr[:, :10], ytr)
sigma2 = np.sum((ytr - ols.predict(Xtr[:, :10])) ** 2) / (len(tr) - 11)
sure = []
for w in sols:
    coef, b = prob.coef_intercept(w)
    rss = np.sum((ytr - Xtr @ coef - b) ** 2)
    sure.append(rss - len(tr) * sigma2 + 2 * sigma2 * (np.count_nonzero(coef) + 1))
j = int(np.argmin(sure))
print(
    f"SURE (train)  : alpha={grid[j]:.4g}  val MSE={vals[j]:.1f}  test MSE={test_mse(sols[j]):.1f}"
)
