"""dargmin.hyper's tuning estimators against scikit-learn's CV estimators, side by side.

Per dataset and estimator pair (``LassoHyperCV`` vs ``LassoCV``, ``ElasticNetHyperCV`` vs
``ElasticNetCV`` with ``l1_ratio`` tuned, ``SparseLogisticHyperCV`` vs
``LogisticRegressionCV(l1_ratios=[1], solver="liblinear")``), on a 70/30 train/test split
with the same 5 folds and one BLAS thread, prints

* the test-score ratio: test MSE (dargmin / scikit-learn, lower is better for dargmin) for
  regression, test accuracy (dargmin / scikit-learn, higher is better) for classification;
* the fit-time ratio of the first fit (includes JAX compilation for the shapes of this
  dataset; compiled code from earlier datasets in the same process is reused) and of the
  compiled fits of fresh estimators on the same data: the median of
  ``DARGMIN_BENCH_REPEATS`` (default 5) fits of each, dargmin's and the peer's interleaved
  (the median of the per-pair ratios, robust to load changes on a shared machine);
* the selected ``alpha`` (``C`` for logistic regression) of both.

The peers run at their default settings (``LassoCV``: 100 alphas, ``tol=1e-4``). Writes
``benchmarks/results/estimators_vs_sklearn.md``. ``DARGMIN_FAST=1`` runs a quick smoke test
on small data.

Run: ``taskset -c 0 python benchmarks/estimators_vs_sklearn.py``
(``DARGMIN_BENCH_ONLY=300x1000,diabetes`` runs the datasets whose names contain one of these
strings; ``DARGMIN_BENCH_LARGE=1`` adds the make_regression 2000x20000 rung, with one
compiled repeat; ``DARGMIN_COMPILATION_CACHE=dir`` turns on JAX's persistent compilation
cache, see :func:`dargmin.hyper.enable_compilation_cache`).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

FAST = os.environ.get("DARGMIN_FAST") == "1"
#: Compiled (second and later) fits of each estimator, interleaved with the peer's; the
#: table reports the fastest of each.
REPEATS = int(os.environ.get("DARGMIN_BENCH_REPEATS", "1" if FAST else "5"))
#: Add the make_regression 2000x20000 rung (slow: LassoCV alone takes tens of seconds).
LARGE = os.environ.get("DARGMIN_BENCH_LARGE") == "1"
#: Optional comma-separated subset of the dataset names to run (e.g. "300x1000,diabetes").
ONLY = [s for s in os.environ.get("DARGMIN_BENCH_ONLY", "").split(",") if s]


def _datasets() -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """``(name, task, X, y)``; the design is standardized, as a user would."""
    from sklearn.datasets import (
        load_breast_cancer,
        load_diabetes,
        make_classification,
        make_regression,
    )
    from sklearn.preprocessing import PolynomialFeatures, StandardScaler

    out = []
    sizes = [(100, 200)] if FAST else [(300, 1000), (1000, 5000)]
    if LARGE and not FAST:
        sizes.append((2000, 20000))
    for n, p in sizes:
        X, y = make_regression(n, p, n_informative=20, noise=10.0, random_state=0)
        out.append((f"make_regression {n}x{p}", "regression", X, y))
    X, y = load_diabetes(return_X_y=True)
    Xp = StandardScaler().fit_transform(PolynomialFeatures(2, include_bias=False).fit_transform(X))
    out.append(("diabetes poly2 (442x65)", "regression", Xp, y))
    X, y = load_breast_cancer(return_X_y=True)
    out.append(("breast_cancer (569x30)", "classification", StandardScaler().fit_transform(X), y))
    n, p = (100, 100) if FAST else (300, 300)
    X, y = make_classification(n, p, n_informative=10, random_state=0)
    out.append((f"make_classification {n}x{p}", "classification", X, y))
    return out


def _pairs(task: str) -> list[tuple[str, Callable[[], Any], Callable[[], Any]]]:
    """``(label, make dargmin estimator, make scikit-learn estimator)``."""
    from sklearn.linear_model import ElasticNetCV, LassoCV, LogisticRegressionCV
    from sklearn.model_selection import KFold, StratifiedKFold

    from dargmin.hyper import ElasticNetHyperCV, LassoHyperCV, SparseLogisticHyperCV

    if task == "regression":
        cv = KFold(5)
        return [
            ("Lasso", lambda: LassoHyperCV(cv=cv), lambda: LassoCV(cv=cv)),
            (
                "ElasticNet",
                lambda: ElasticNetHyperCV(cv=cv),
                lambda: ElasticNetCV(cv=cv, l1_ratio=[0.1, 0.5, 0.9, 1.0]),
            ),
        ]
    cv = StratifiedKFold(5)
    return [
        (
            "SparseLogistic",
            lambda: SparseLogisticHyperCV(cv=cv),
            lambda: LogisticRegressionCV(
                cv=cv, l1_ratios=[1.0], solver="liblinear", Cs=10, use_legacy_attributes=False
            ),
        )
    ]


def _alpha(est: Any, n_train: int) -> float:
    if hasattr(est, "alpha_"):
        return float(est.alpha_)
    # LogisticRegression's C ↔ the per-sample ℓ1 strength alpha = 1/(n C).
    return 1.0 / (n_train * float(np.ravel(est.C_)[0]))


def _timed_fit(make: Callable[[], Any], X: np.ndarray, y: np.ndarray) -> tuple[Any, float]:
    est = make()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X, y)
    return est, time.perf_counter() - t0


def _test_score(est: Any, task: str, X: np.ndarray, y: np.ndarray) -> float:
    if task == "regression":
        return float(np.mean((est.predict(X) - y) ** 2))
    return float(np.mean(est.predict(X) == y))


def main() -> list[dict[str, Any]]:
    from sklearn.model_selection import train_test_split
    from threadpoolctl import threadpool_limits

    if os.environ.get("DARGMIN_COMPILATION_CACHE"):
        from dargmin.hyper import enable_compilation_cache

        enable_compilation_cache(os.environ["DARGMIN_COMPILATION_CACHE"])

    rows = []
    with threadpool_limits(1):
        for name, task, X, y in _datasets():
            if ONLY and not any(key in name for key in ONLY):
                continue
            Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0)
            for label, ours, peer in _pairs(task):
                if X.shape[1] >= 20000 and label != "Lasso":
                    continue  # ElasticNetCV's 4 x 100 paths take many minutes there
                _, t_d1 = _timed_fit(ours, Xtr, ytr)
                s1, t_s1 = _timed_fit(peer, Xtr, ytr)
                # Compiled fits, interleaved and repeated (the median of each, and of the
                # per-pair ratios): on a shared machine the load changes between fits.
                repeats = 1 if X.shape[1] >= 20000 else REPEATS
                times_d, times_s = [], []
                for _ in range(repeats):
                    d2, t = _timed_fit(ours, Xtr, ytr)
                    times_d.append(t)
                    _, t = _timed_fit(peer, Xtr, ytr)
                    times_s.append(t)
                t_d2, t_s2 = float(np.median(times_d)), float(np.median(times_s))
                ratio2 = float(np.median(np.array(times_d) / np.array(times_s)))
                sd, ss = _test_score(d2, task, Xte, yte), _test_score(s1, task, Xte, yte)
                row = {
                    "dataset": name,
                    "pair": label,
                    "metric": "MSE" if task == "regression" else "accuracy",
                    "score_ratio": sd / ss,
                    "time_first": t_d1 / t_s1,
                    "time_second": ratio2,
                    "t_ours": t_d2,
                    "t_peer": t_s2,
                    "alpha_ours": _alpha(d2, len(ytr)),
                    "alpha_peer": _alpha(s1, len(ytr)),
                }
                rows.append(row)
                print(
                    f"{name:28s} {label:15s} test {row['metric']} ratio {row['score_ratio']:.3f}"
                    f"  time ratio first {row['time_first']:.2f}x second "
                    f"{row['time_second']:.2f}x ({t_d2:.2f}s vs {t_s2:.2f}s)  alpha "
                    f"{row['alpha_ours']:.4g} vs {row['alpha_peer']:.4g}",
                    flush=True,
                )
    _write(rows)
    return rows


def _write(rows: list[dict[str, Any]]) -> None:
    lines = [
        "# dargmin.hyper estimators vs scikit-learn's CV estimators",
        "",
        "One BLAS thread, 70/30 train/test split, the same 5 folds, peers at their defaults "
        "(`LassoCV`: 100 alphas, tol 1e-4; `ElasticNetCV`: l1_ratio in {0.1, 0.5, 0.9, 1}; "
        '`LogisticRegressionCV(l1_ratios=[1], solver="liblinear", Cs=10)`). '
        "Score ratio: test MSE dargmin/sklearn (< 1: dargmin better) or test accuracy "
        "dargmin/sklearn (> 1: dargmin better). Time ratio: dargmin/sklearn fit time, first "
        "fit (with JAX compilation for new shapes) and compiled fit (median of the ratios of "
        f"{REPEATS} fits interleaved with the peer's; 1 for 2000x20000). alpha: the "
        "selected per-sample l1 strength (logistic: 1/(n C)).",
        "",
        f"Mode: {'DARGMIN_FAST=1 smoke run (small data)' if FAST else 'full'}.",
        "",
        "| dataset | pair | score ratio | time ratio (1st fit) | time ratio (2nd fit) "
        "| 2nd fit dargmin / sklearn (s) | alpha dargmin | alpha sklearn |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['pair']} | {r['score_ratio']:.3f} ({r['metric']}) "
            f"| {r['time_first']:.2f}x | {r['time_second']:.2f}x "
            f"| {r['t_ours']:.2f} / {r['t_peer']:.2f} "
            f"| {r['alpha_ours']:.4g} | {r['alpha_peer']:.4g} |"
        )
    out_dir = Path(os.environ.get("DARGMIN_OUTPUT_DIR", Path(__file__).parent / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "estimators_vs_sklearn.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out_dir / 'estimators_vs_sklearn.md'}")


if __name__ == "__main__":
    main()
