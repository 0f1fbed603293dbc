"""Hypergradient descent vs grid search vs random search for the Lasso and weighted Lasso.

Data: correlated Gaussian design (AR(1) columns, ρ = 0.5), 20 non-zero true coefficients,
train/validation/test splits of equal size. Criterion: validation MSE.

(a) grid: 100 α on a geometric grid from α_max to α_max/1000, warm-started scikit-learn
    ``Lasso`` (the LassoCV path strategy); (b) dargmin hypergradient descent (implicit and
    implicit_forward); (c) random search, 30 log-uniform α. Weighted Lasso: p penalties
    optimized by hypergradient descent from the single-α optimum.

Usage: ``python benchmarks/hyper_vs_grid.py [--quick]``; writes
``benchmarks/results/hyper_vs_grid.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np
from threadpoolctl import threadpool_limits

from dargmin import hyper

TOL = 1e-7  # scikit-learn's tol, the same for every method
MAX_ITER = 1000  # scikit-learn's default epoch cap, the same for every method


def make_data(n: int, p: int, seed: int = 0, rho: float = 0.5, snr: float = 3.0):
    rng = np.random.default_rng(seed)
    X = np.empty((3 * n, p))
    X[:, 0] = rng.normal(size=3 * n)
    for j in range(1, p):  # AR(1) columns: corr(X_i, X_j) = ρ^|i-j|
        X[:, j] = rho * X[:, j - 1] + np.sqrt(1 - rho**2) * rng.normal(size=3 * n)
    w = np.zeros(p)
    k = 20  # fixed sparsity: a recoverable signal at both sizes
    idx = rng.choice(p, k, replace=False)
    w[idx] = rng.choice([-1.0, 1.0], k) * rng.uniform(0.5, 2.0, k)
    signal = X @ w
    y = signal + rng.normal(size=3 * n) * np.std(signal) / snr
    return (X[:n], y[:n]), (X[n : 2 * n], y[n : 2 * n]), (X[2 * n :], y[2 * n :])


def test_mse(prob, w, Xte, yte):
    coef, b = prob.coef_intercept(w)
    return float(np.mean((yte - Xte @ coef - b) ** 2))


def grid_search(prob, crit, n_alphas=100):
    solver = hyper.SklearnSolver(tol=TOL, max_iter=MAX_ITER, kkt_tol=np.inf)
    amax = prob.alpha_max()
    mon = hyper.Monitor()
    best = (np.inf, None, None)
    for a in np.geomspace(amax, amax / 1000, n_alphas):
        w = solver.solve(prob, [np.log(a)]).coef  # warm start: the estimator is reused
        v = float(crit(w, prob))
        mon.record([np.log(a)], v)
        if v < best[0]:
            best = (v, np.log(a), w)
    return best, mon


def random_search(prob, crit, n_evals=30, seed=0):
    solver = hyper.SklearnSolver(tol=TOL, max_iter=MAX_ITER, kkt_tol=np.inf)
    amax = prob.alpha_max()
    rng = np.random.default_rng(seed)
    mon = hyper.Monitor()
    best = (np.inf, None, None)
    for la in rng.uniform(np.log(amax / 1000), np.log(amax), n_evals):
        w = solver.solve(prob, [la]).coef
        v = float(crit(w, prob))
        mon.record([la], v)
        if v < best[0]:
            best = (v, la, w)
    return best, mon


def hyper_search(prob, crit, method, theta0=None, max_iter=50):
    solver = hyper.SklearnSolver(tol=TOL, max_iter=MAX_ITER, kkt_tol=np.inf)
    mon = hyper.Monitor()
    res = hyper.optimize_hyperparameters(
        prob, crit, theta0, method=method, solver=solver, max_iter=max_iter, monitor=mon
    )
    w = solver.solve(prob, res.log_theta).coef
    return res, w


def cost_of_one_hypergradient(prob, crit, theta):
    """Seconds of one cold inner solve vs one hypergradient (given the solution)."""
    times = {}
    for _ in range(2):  # the first call warms the jit caches
        t0 = time.perf_counter()
        res = hyper.SklearnSolver(tol=TOL, max_iter=MAX_ITER, kkt_tol=np.inf).solve(prob, theta)
        times["solve"] = time.perf_counter() - t0
        for method in ("implicit", "implicit_forward"):
            hg = hyper.hypergradient(
                prob, crit, theta, method=method, solver=_Fixed(res.coef), tol_jac=1e-8
            )
            times[method] = hg.time_grad
    return times, res.n_iter


class _Fixed:
    """An 'inner solver' returning a precomputed solution (isolates the gradient cost)."""

    name = "fixed"

    def __init__(self, w):
        self.w = w

    def solve(self, problem, log_theta, w0=None):
        return hyper.InnerResult(self.w, 0, 0.0, True, 0.0)


def epochs_vs_sklearn(prob, theta):
    cd = hyper.ProxCD(tol=1e-6)
    cd.solve(prob, theta)  # compile
    r_cd = cd.solve(prob, theta)
    r_sk = hyper.SklearnSolver(tol=1e-10, kkt_tol=np.inf).solve(prob, theta)
    return {
        "dargmin ProxCD": (r_cd.n_iter, r_cd.time, r_cd.kkt),
        "sklearn cd": (r_sk.n_iter, r_sk.time, r_sk.kkt),
    }


def run(n, p, rows, extra):
    (Xtr, ytr), (Xva, yva), (Xte, yte) = make_data(n, p)
    prob = hyper.lasso(Xtr, ytr)
    crit = hyper.HeldOutMSE(Xva, yva)
    # Warm the compilation caches so that timings measure the algorithms.
    hyper.hypergradient(prob, crit, hyper.default_log_theta0(prob), solver="sklearn")
    t0 = time.perf_counter()
    (g_best, _, g_w), g_mon = grid_search(prob, crit)
    g_time = time.perf_counter() - t0
    target = 1.01 * g_best
    tag = f"p={p}, n={n}/{n}/{n}"
    rows.append(
        (
            tag,
            "Lasso",
            "grid 100 (warm-started sklearn)",
            g_best,
            test_mse(prob, g_w, Xte, yte),
            100,
            g_time,
            g_mon.time_to_reach(target),
        )
    )
    for method in ("implicit", "implicit_forward"):
        t0 = time.perf_counter()
        res, w = hyper_search(prob, crit, method)
        wall = time.perf_counter() - t0
        rows.append(
            (
                tag,
                "Lasso",
                f"hypergradient ({method})",
                res.value,
                test_mse(prob, w, Xte, yte),
                res.n_evals,
                wall,
                res.monitor.time_to_reach(target),
            )
        )
        if method == "implicit":
            lasso_theta = res.log_theta
    t0 = time.perf_counter()
    (r_best, _, r_w), r_mon = random_search(prob, crit)
    rows.append(
        (
            tag,
            "Lasso",
            "random search 30",
            r_best,
            test_mse(prob, r_w, Xte, yte),
            30,
            time.perf_counter() - t0,
            r_mon.time_to_reach(target),
        )
    )
    # Weighted Lasso, from the single-α hypergradient optimum.
    wprob = hyper.weighted_lasso(Xtr, ytr)
    theta0 = np.full(p, lasso_theta[0])
    hyper.hypergradient(wprob, crit, theta0, solver="sklearn")  # compile
    t0 = time.perf_counter()
    res, w = hyper_search(wprob, crit, "implicit", theta0=theta0, max_iter=100)
    rows.append(
        (
            tag,
            "weighted Lasso",
            "hypergradient (implicit), from the α optimum",
            res.value,
            test_mse(wprob, w, Xte, yte),
            res.n_evals,
            time.perf_counter() - t0,
            res.monitor.time_to_reach(target),
        )
    )
    times, n_ep = cost_of_one_hypergradient(prob, crit, lasso_theta)
    extra.append(
        f"- {tag}: one cold inner solve (sklearn, tol={TOL:g}, {n_ep} epochs) "
        f"{times['solve'] * 1e3:.1f} ms; hypergradient given ŵ: implicit "
        f"{times['implicit'] * 1e3:.2f} ms ({times['implicit'] / times['solve']:.3f}× a solve),"
        f" implicit_forward {times['implicit_forward'] * 1e3:.2f} ms "
        f"({times['implicit_forward'] / times['solve']:.3f}×)."
    )
    ep = epochs_vs_sklearn(prob, lasso_theta)
    for name, (k, t, kkt) in ep.items():
        extra.append(
            f"- {tag}, {name}: {k} epochs, {t * 1e3:.1f} ms ({t / max(k, 1) * 1e3:.2f} ms/epoch),"
            f" final relative KKT {kkt:.1e}."
        )
    return g_mon


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="p=2000 only")
    args = ap.parse_args()
    sizes = [(100, 2000)] if args.quick else [(100, 2000), (500, 10000)]
    rows, extra = [], []
    # One BLAS thread: stable timings on a shared 2-core machine (OpenBLAS threads otherwise
    # spin against each other and against other processes).
    with threadpool_limits(1):
        for n, p in sizes:
            print(f"running n={n}, p={p} ...", flush=True)
            run(n, p, rows, extra)
    lines = [
        "# Hypergradient descent vs grid / random search (validation MSE)",
        "",
        f"Design: AR(1) correlated Gaussian columns (ρ=0.5), 20 non-zero coefficients, "
        f"SNR 3; inner solver scikit-learn coordinate descent (tol={TOL:g}, max_iter="
        f"{MAX_ITER}) everywhere; "
        "one BLAS thread. 'to 1%' is the time at which the search first reached 1.01× the "
        "best 100-point-grid validation loss.",
        "",
        "| problem | model | search | best val MSE | test MSE | inner solves | wall (s) |"
        " to 1% (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for tag, model, search, val, te, ns, wall, t1 in rows:
        lines.append(
            f"| {tag} | {model} | {search} | {val:.4g} | {te:.4g} | {ns} | {wall:.2f} | {t1:.2f} |"
        )
        print(lines[-1])
    lines += ["", "Cost of one hypergradient and inner-solver speed:", "", *extra]
    print("\n".join(extra))
    out = Path(__file__).parent / "results" / "hyper_vs_grid.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
