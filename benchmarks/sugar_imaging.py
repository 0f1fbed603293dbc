"""TV denoising / deblurring tuned by SURE + SUGAR + BFGS vs the oracle, and the solver vs
scikit-image's ``denoise_tv_chambolle``.

For each image (scikit-image's camera and astronaut in grey, 256² by 2 × 2 block means) and
noise level σ:

* noisy input: PSNR / SSIM of ``y``;
* oracle: ``θ`` minimizing the true MSE on a fine geometric grid (24 points on
  [0.3σ, 1.5σ], warm-started solves);
* SUGAR: BFGS on ``log θ`` with the finite-difference Monte-Carlo SURE and its gradient
  (one probe), warm starts, started by ``coarse=(0.5, 1, 2)``: SUGAR at ``σ``, FD-SURE at
  ``σ/2`` or ``2σ`` (the side its slope points to), BFGS from the parabola's minimum, and
  stopped when a new value is within ``ftol = 1e-4`` of ``nσ²`` of the best (all counted in
  the time); its time vs a 30-point grid of the same SURE (warm-started);
* one SUGAR evaluation vs one solve (both cold, compiled, same ``θ``);
* two-parameter penalties (TV-TV²: TV plus second-order TV; Huber TV) tuned by SUGAR,
  against the best single-parameter (TV) oracle.

Deblurring: the camera image with a periodic Gaussian blur (width 1.5 px) and σ = 0.02;
SURE estimates the prediction risk ``‖Φ(ŵ − w₀)‖²``, the oracle minimizes the MSE of ``ŵ``.

Peer: ``skimage.restoration.denoise_tv_chambolle`` at 512² (same objective
``½‖y − w‖² + weight·TV(w)``): time and objective at its default tolerance and at a tight
one, vs our solver stopped by its duality gap at 1e-6 relative.

Cost of one SUGAR evaluation (issue 14: ≤ 4.5× a solve): for denoising and deblurring, one
solve and one SUGAR evaluation (two solves, each with its θ-tangent), both cold and compiled,
best of 3; and the cost of one iteration with a θ-tangent against a plain one (fixed
iteration count, so the two run the same iterations). Measured in CPU time (process time,
XLA single-threaded): the machine is shared, and CPU time is what other load disturbs least.

Usage: ``taskset -c 0 python benchmarks/sugar_imaging.py`` (``DARGMIN_FAST=1``: a 64² crop,
one image, small grids); writes ``benchmarks/results/sugar_imaging.md``. ``python
benchmarks/sugar_imaging.py cost`` runs only the cost rows and prints them (to compare two
versions of dargmin on one machine).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

# One XLA thread: CPU time then measures the work, not the waiting for busy cores.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np

from dargmin.errors import DargminWarning
from dargmin.imaging import (
    ChambollePock,
    FFTBlur,
    HuberTV,
    ImageSURE,
    TVSecondOrder,
    solve,
    solve_jvp,
    tv_deblurring,
    tv_denoising,
)

FAST = os.environ.get("DARGMIN_FAST") == "1"
OUT = Path(__file__).resolve().parent / "results" / "sugar_imaging.md"
warnings.simplefilter("ignore", DargminWarning)  # gap warnings are reported in the table

try:
    from skimage import color, data, img_as_float
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    from skimage.restoration import denoise_tv_chambolle
except ImportError:  # the peer and the images are optional: say so and stop
    print("scikit-image is not installed (pip install scikit-image): nothing to benchmark.")
    raise SystemExit(0) from None


def load(name: str, size: int) -> np.ndarray:
    img = getattr(data, name)()
    img = img_as_float(color.rgb2gray(img) if img.ndim == 3 else img)
    f = img.shape[0] // size
    img = img[: f * size, : f * size].reshape(size, f, size, f).mean(axis=(1, 3))
    return img


def metrics(x: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    w = np.asarray(w)
    return (
        float(peak_signal_noise_ratio(x, w, data_range=1.0)),
        float(structural_similarity(x, w, data_range=1.0)),
    )


def timed(f, *a, **k):
    t = time.perf_counter()
    out = f(*a, **k)
    jax.block_until_ready(getattr(out, "w", out))
    return out, time.perf_counter() - t


def cpu_timed(f, *a, **k) -> float:
    """Best of 3 CPU times of ``f(*a, **k)`` (after one call that compiles)."""
    jax.block_until_ready(getattr(f(*a, **k), "w", None))
    best = np.inf
    for _ in range(3):
        t = time.process_time()
        jax.block_until_ready(getattr(f(*a, **k), "w", None))
        best = min(best, time.process_time() - t)
    return best


def cost_row(label, prob, y, sigma, theta, cfg):
    """One SUGAR evaluation / one solve (cold), and one tangent iteration / one plain one."""
    cold = ImageSURE(prob, y, sigma, solver=cfg, warm_start=False)
    t_solve = cpu_timed(solve, prob, y, theta, solver=cfg)
    t_sugar = cpu_timed(cold.sugar, [theta])
    n_it = int(solve(prob, y, theta, solver=cfg).n_iter)
    fixed = ChambollePock(tol=0.0, max_iter=1000)  # the same 1000 iterations in both
    t_plain = cpu_timed(solve, prob, y, theta, solver=fixed)
    t_tangent = cpu_timed(solve_jvp, prob, y, theta, solver=fixed)
    return {
        "case": label,
        "n_iter": n_it,
        "solve_s": t_solve,
        "sugar_s": t_sugar,
        "ratio": t_sugar / t_solve,
        "step_ratio": t_tangent / t_plain,
    }


def cost_rows(size, blur_size, rng):
    """At the sizes and configurations of the tables below (denoising 256², deblurring 128²)."""
    x = load("camera", size)
    cfg = ChambollePock(tol=1e-6, max_iter=20000)
    rows = [cost_row(f"denoising {size}², σ=0.1", tv_denoising(),
                     x + 0.1 * rng.normal(size=x.shape), 0.1, 0.08, cfg)]  # fmt: skip
    x = load("camera", blur_size)
    blur = FFTBlur.gaussian(x.shape, 1.5)
    yb = np.asarray(blur.apply(x)) + 0.02 * rng.normal(size=x.shape)
    blur_cfg = ChambollePock(tol=1e-5, max_iter=20000)
    rows.append(cost_row(f"deblurring {blur_size}², 1.5 px, σ=0.02", tv_deblurring(blur), yb,
                         0.02, 0.0022, blur_cfg))  # fmt: skip
    for r in rows:
        print(r, flush=True)
    return rows


def oracle(prob, x, y, thetas, cfg):
    best, prev = (-np.inf, None, None), None
    for t in thetas:
        prev = solve(prob, y, t, solver=cfg, init=prev)
        p = metrics(x, prev.w)[0]
        if p > best[0]:
            best = (p, float(t), np.asarray(prev.w))
    return best


def denoising_rows(name, x, sigma, cfg, n_oracle, n_grid, rng):
    y = x + sigma * rng.normal(size=x.shape)
    prob = tv_denoising()
    row = {"case": f"{name} {x.shape[0]}², σ={sigma}"}
    row["noisy"] = metrics(x, y)
    thetas = np.geomspace(0.3 * sigma, 1.5 * sigma, n_oracle)  # steps of 7 %
    _, th_or, w_or = oracle(prob, x, y, thetas, cfg)
    row["oracle"] = (*metrics(x, w_or), th_or)
    # cost of one SUGAR evaluation vs one solve, cold and compiled
    solve(prob, y, sigma, solver=cfg)
    ImageSURE(prob, y, sigma, solver=cfg, warm_start=False).sugar([sigma])
    # best of 3 for each: the machine is shared, and the minimum is the least disturbed
    t_solve = min(timed(solve, prob, y, sigma, solver=cfg)[1] for _ in range(3))
    cold = ImageSURE(prob, y, sigma, solver=cfg, warm_start=False)
    t_sugar = min(timed(cold.sugar, [sigma])[1] for _ in range(3))
    row["sugar_cost"] = t_sugar / t_solve
    # tuning vs a 30-point grid of the same SURE, both timed with their functions compiled
    # (warm-started solves, with and without tangents, trace apart from cold ones)
    ImageSURE(prob, y, sigma, solver=cfg).tune([sigma], progress=False, maxiter=1,
                                               coarse=(0.5, 1.0, 2.0))  # fmt: skip
    ImageSURE(prob, y, sigma, solver=cfg).grid([[sigma], [0.9 * sigma]])
    est = ImageSURE(prob, y, sigma, solver=cfg)
    # Started by SUGAR at σ and one FD-SURE value at σ/2 or 2σ (counted in the time); xrtol =
    # 1e-2 in log θ (1–2.5 % in θ): the one-probe SURE's own minimizer scatters more than that.
    res = est.tune([sigma], progress=False, coarse=(0.5, 1.0, 2.0), xrtol=1e-2)
    row["sugar"] = (*metrics(x, res.w), float(res.theta[0]))
    row["tune_s"], row["n_evals"] = res.seconds, res.n_evals
    grid_est = ImageSURE(prob, y, sigma, solver=cfg)
    grid = np.geomspace(0.15 * sigma, 2.5 * sigma, n_grid)
    t = time.perf_counter()
    vals = grid_est.grid([[g] for g in grid])
    row["grid_s"] = time.perf_counter() - t
    row["grid_theta"] = float(grid[int(np.argmin(vals))])
    # two parameters, started from the single-parameter SUGAR optimum
    th1 = float(res.theta[0])
    for label, pen, th0 in (
        # TV-TV²: the first-order weight lowered and a second-order one added (the mix that
        # wins on a coarse true-MSE grid at 256², θ₀ ≈ 0.5-0.8 θ_TV, θ₁ ≈ 0.1-0.2 θ_TV).
        ("TV-TV²", TVSecondOrder(), [0.65 * th1, 0.15 * th1]),
        ("Huber TV", HuberTV(), [th1, 0.5 * sigma]),
    ):
        est2 = ImageSURE(tv_denoising(pen), y, sigma, solver=cfg)
        r2 = est2.tune(th0, progress=False)
        row[label] = (*metrics(x, r2.w), r2.theta.round(4).tolist(), r2.seconds, r2.n_evals)
    return row


def deblurring_row(x, sigma, width, cfg, n_oracle, rng):
    blur = FFTBlur.gaussian(x.shape, width)
    y = np.asarray(blur.apply(x)) + sigma * rng.normal(size=x.shape)
    prob = tv_deblurring(blur)
    row = {"case": f"camera {x.shape[0]}², blur {width} px, σ={sigma}"}
    row["noisy"] = metrics(x, y)
    thetas = np.geomspace(3e-4, 0.03, n_oracle)
    _, th_or, w_or = oracle(prob, x, y, thetas, cfg)
    row["oracle"] = (*metrics(x, w_or), th_or)
    est = ImageSURE(prob, y, sigma, solver=cfg)
    res = est.tune([0.003], progress=False)
    row["sugar"] = (*metrics(x, res.w), float(res.theta[0]))
    row["tune_s"], row["n_evals"] = res.seconds, res.n_evals
    return row


def skimage_row(x, sigma, rng, weight=0.1, reps=5):
    """Ours to a certified relative gap of 1e-6 vs scikit-image (default eps, and 2000
    iterations at eps=1e-9), interleaved in one process, median of ``reps`` wall times (run
    the script under ``taskset -c 0`` on a shared machine)."""
    y = x + sigma * rng.normal(size=x.shape)
    prob = tv_denoising()
    th = np.array([weight])
    P = lambda w: float(prob.objective(jax.numpy.asarray(w), jax.numpy.asarray(y), th))  # noqa: E731
    it_tight = 300 if FAST else 2000
    cfg = ChambollePock(tol=1e-6, max_iter=20000)
    solve(prob, y, weight, solver=cfg)  # compile
    t_ours, t_sk, t_sk2 = [], [], []
    for _ in range(1 if FAST else reps):
        ours, t = timed(solve, prob, y, weight, solver=cfg)
        t_ours.append(t)
        sk, t = timed(denoise_tv_chambolle, y, weight=weight)
        t_sk.append(t)
        sk2, t = timed(denoise_tv_chambolle, y, weight=weight, eps=1e-9, max_num_iter=it_tight)
        t_sk2.append(t)
    # A certified lower bound on the optimum: the dual objective of a tight solve.
    tight = solve(prob, y, weight, solver=ChambollePock(tol=1e-9, max_iter=50000))
    p_star = float(tight.primal) - float(tight.gap)
    return {
        "size": x.shape[0],
        "sk": (float(np.median(t_sk)), (P(sk) - p_star) / p_star),
        "sk_tight": (float(np.median(t_sk2)), (P(sk2) - p_star) / p_star, it_tight),
        "ours": (float(np.median(t_ours)), (P(ours.w) - p_star) / p_star, int(ours.n_iter),
                 float(ours.gap) / p_star),
        "ratio": float(np.median(np.array(t_ours) / np.array(t_sk2))),
    }  # fmt: skip


def main() -> None:
    rng = np.random.default_rng(2024)
    size = 64 if FAST else 256
    costs = cost_rows(64 if FAST else 256, 64 if FAST else 128, np.random.default_rng(7))
    if sys.argv[1:] == ["cost"]:
        return
    cfg = ChambollePock(tol=1e-6, max_iter=20000)
    cases = [("camera", 0.1)] if FAST else [
        ("camera", 0.05), ("camera", 0.1), ("astronaut", 0.1),
    ]  # fmt: skip
    n_oracle, n_grid = (12, 10) if FAST else (24, 30)
    rows = []
    for name, sigma in cases:
        rows.append(denoising_rows(name, load(name, size), sigma, cfg, n_oracle, n_grid, rng))
        print(rows[-1], flush=True)
    blur_cfg = ChambollePock(tol=1e-5, max_iter=5000 if FAST else 20000)
    deb = deblurring_row(load("camera", 64 if FAST else 128), 0.02, 1.5, blur_cfg, n_oracle, rng)
    print(deb, flush=True)
    sk = skimage_row(load("camera", 128 if FAST else 512), 0.1, rng)
    print(sk, flush=True)

    lines = [
        "# SURE / SUGAR tuning of TV restoration (`benchmarks/sugar_imaging.py`)",
        "",
        f"Mode: {'fast smoke run (DARGMIN_FAST=1)' if FAST else 'full'}; float64 on the "
        "CPU; Chambolle–Pock stopped at a relative duality gap of 1e-6 (deblurring 1e-5); "
        "one Gaussian probe.",
        "",
        "## Denoising: PSNR (dB) / SSIM",
        "",
        "| case | noisy | oracle θ | oracle | SUGAR θ* | SUGAR | ΔPSNR vs oracle | "
        "SUGAR eval / solve | tuning s (evals) | 30-grid s | tuning / grid |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['noisy'][0]:.2f} / {r['noisy'][1]:.3f} | {r['oracle'][2]:.4f} "
            f"| {r['oracle'][0]:.2f} / {r['oracle'][1]:.3f} | {r['sugar'][2]:.4f} | "
            f"{r['sugar'][0]:.2f} / {r['sugar'][1]:.3f} | {r['sugar'][0] - r['oracle'][0]:+.3f} "
            f"| {r['sugar_cost']:.2f}× | {r['tune_s']:.1f} ({r['n_evals']}) | "
            f"{r['grid_s']:.1f} | {r['tune_s'] / r['grid_s']:.2f} |"
        )
    lines += [
        "",
        "## Cost of one SUGAR evaluation (cold, compiled; CPU time, best of 3)",
        "",
        "One SUGAR evaluation = two solves (at y and y + δz), each with its θ-tangent.",
        "",
        "| case | iterations | solve s | SUGAR eval s | SUGAR eval / solve | "
        "tangent iteration / plain iteration |",
        "|---|---|---|---|---|---|",
    ]
    for c in costs:
        lines.append(
            f"| {c['case']} | {c['n_iter']} | {c['solve_s']:.3f} | {c['sugar_s']:.3f} | "
            f"{c['ratio']:.2f}× | {c['step_ratio']:.2f}× |"
        )
    lines += [
        "",
        "## Two parameters (SUGAR + BFGS) vs the best single-parameter TV oracle",
        "",
        "| case | TV oracle | TV-TV² θ* | PSNR / SSIM | gain | tuning s (evals) | Huber TV θ* | "
        "PSNR / SSIM | gain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, b = r["TV-TV²"], r["Huber TV"]
        a_cells = (
            f"{a[2]} | {a[0]:.2f} / {a[1]:.3f} | {a[0] - r['oracle'][0]:+.3f} dB | "
            f"{a[3]:.0f} ({a[4]})"
        )
        lines.append(
            f"| {r['case']} | {r['oracle'][0]:.2f} | {a_cells} | {b[2]} | "
            f"{b[0]:.2f} / {b[1]:.3f} | {b[0] - r['oracle'][0]:+.3f} dB |"
        )
    lines += [
        "",
        "## Deblurring (SURE of the prediction Φŵ; oracle on the MSE of ŵ)",
        "",
        "| case | blurred+noisy | oracle θ | oracle | SUGAR θ* | SUGAR | ΔPSNR | "
        "tuning s (evals) |",
        "|---|---|---|---|---|---|---|---|",
        f"| {deb['case']} | {deb['noisy'][0]:.2f} / {deb['noisy'][1]:.3f} | "
        f"{deb['oracle'][2]:.4f} | {deb['oracle'][0]:.2f} / {deb['oracle'][1]:.3f} | "
        f"{deb['sugar'][2]:.4f} | {deb['sugar'][0]:.2f} / {deb['sugar'][1]:.3f} | "
        f"{deb['sugar'][0] - deb['oracle'][0]:+.3f} | {deb['tune_s']:.1f} ({deb['n_evals']}) |",
        "",
        f"## Solver vs scikit-image `denoise_tv_chambolle` ({sk['size']}², weight 0.1, σ = 0.1)",
        "",
        "Relative objective excess over a certified lower bound of the optimum (the dual "
        "objective of a solve to a relative gap of 1e-9); wall time, median of "
        f"{1 if FAST else 5} interleaved run(s).",
        "",
        "| solver | time (s) | (P − P*)/P* ≤ |",
        "|---|---|---|",
        f"| scikit-image, default eps=2e-4 | {sk['sk'][0]:.3f} | {sk['sk'][1]:.2e} |",
        f"| scikit-image, eps=1e-9, {sk['sk_tight'][2]} iterations | {sk['sk_tight'][0]:.3f} | "
        f"{sk['sk_tight'][1]:.2e} |",
        f"| dargmin Chambolle–Pock, gap ≤ 1e-6 ({sk['ours'][2]} iterations) | "
        f"{sk['ours'][0]:.3f} | {sk['ours'][1]:.2e} |",
        "",
        f"dargmin / scikit-image ({sk['sk_tight'][2]} iterations): {sk['ratio']:.2f}× the time "
        "(median of the per-run ratios).",
        "",
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
