"""TV denoising with the weight θ tuned by SURE + SUGAR (no clean image needed).

The camera image of scikit-image (grey, 256² by 2 × 2 block means) gets Gaussian noise of
known σ = 0.1. The estimate is ``ŵ_θ(y) = argmin_w ½‖y − w‖² + θ‖∇w‖₁,₂``, computed by a
jitted Chambolle–Pock solver with a duality-gap certificate (``dargmin.imaging``).

* SURE with a finite-difference Monte-Carlo divergence estimates ``‖ŵ_θ − x‖²`` from ``y``
  alone; SUGAR, its θ-gradient, comes from forward-mode differentiation of the primal-dual
  iterations; BFGS on ``log θ`` minimizes it (progress bar, monitor of (θ, SURE)).
* A grid of θ compares SURE with the true risk (which uses the clean image), and the
  tuned θ* with the oracle.

The figure (original, noisy, restored at θ*, SURE vs true risk) is written to
``$DARGMIN_OUTPUT_DIR/tv_denoising_sugar.png`` (default: the current directory).
Run: ``python examples/tv_denoising_sugar.py`` (about a minute on 2 CPU cores;
``DARGMIN_FAST=1``: a 32² crop, a few seconds). Needs scikit-image and matplotlib.
"""

import warnings

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from tv_sugar_common import FAST, camera, save_figure  # float64, Agg, the output folder

from dargmin.errors import DargminWarning
from dargmin.imaging import ChambollePock, ImageSURE, solve, tv_denoising

x = camera()  # 256² (fast mode: a 32² crop)
sigma = 0.1
y = x + sigma * np.random.default_rng(1).normal(size=x.shape)

prob = tv_denoising()
# tangent_tol: SUGAR needs the derivative of the solution, not of an iterate whose gap is
# small but whose tangents still move (warm starts at a loose tol; the solver warns then).
cfg = ChambollePock(tol=1e-5 if FAST else 1e-6, tangent_tol=1e-3)
est = ImageSURE(prob, y, sigma, solver=cfg)

history = []
res = est.tune([sigma], progress=not FAST, monitor=lambda th, v: history.append((th[0], v)))
print(
    f"SUGAR + BFGS: θ* = {res.theta[0]:.4f} after {res.n_evals} evaluations ({res.seconds:.1f} s)"
)
for th, v in history:
    print(f"  θ = {th:.4f}   SURE/n = {v / y.size:.3e}")

# SURE vs the true risk on a grid (the true risk needs the clean image: for checking only).
grid = np.geomspace(0.2 * sigma, 2.5 * sigma, 6 if FAST else 25)
sure_vals = est.grid([[t] for t in grid]) / y.size
true_vals, prev = [], None
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DargminWarning)
    for t in grid:
        prev = solve(prob, y, t, solver=cfg, init=prev)
        true_vals.append(float(np.mean((np.asarray(prev.w) - x) ** 2)))
i_or = int(np.argmin(true_vals))


def quality(w):
    w = np.asarray(w)
    return peak_signal_noise_ratio(x, w, data_range=1.0), structural_similarity(
        x, w, data_range=1.0
    )


print(f"noisy         : PSNR {quality(y)[0]:.2f} dB, SSIM {quality(y)[1]:.3f}")
print(f"SUGAR θ*      : PSNR {quality(res.w)[0]:.2f} dB, SSIM {quality(res.w)[1]:.3f}")
print(f"grid oracle θ={grid[i_or]:.4f}: true MSE {true_vals[i_or]:.3e} (SURE at θ*: "
      f"{res.value / y.size:.3e})")  # fmt: skip

save_figure(
    "tv_denoising_sugar.png",
    [(x, "original"), (y, f"noisy (σ = {sigma}, {quality(y)[0]:.1f} dB)"),
     (res.w, f"TV at θ* = {res.theta[0]:.3f} ({quality(res.w)[0]:.1f} dB)")],
    [(grid, sure_vals, "o-", "SURE / n (from y)"), (grid, true_vals, "s-", "true MSE")],
    res.theta[0],
)  # fmt: skip
