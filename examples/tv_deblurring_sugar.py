"""TV deblurring with the weight θ tuned by SURE + SUGAR (no clean image needed).

The camera image of scikit-image (grey, 256² by 2 × 2 block means) is blurred by a known
periodic Gaussian kernel (width 1.5 px, applied by FFT) and gets Gaussian noise of known
σ = 0.02. The estimate is ``ŵ_θ(y) = argmin_w ½‖y − k ⊛ w‖² + θ‖∇w‖₁,₂`` (Chambolle–Pock,
the data term's prox exact in the Fourier basis).

SURE estimates the prediction risk ``‖k ⊛ (ŵ_θ − x)‖²`` from ``y`` alone; SUGAR (its
θ-gradient by forward-mode differentiation of the iterations) drives BFGS. A grid of θ
compares SURE with the true prediction risk and the true MSE of ``ŵ`` (the oracle).

The figure (original, blurred + noisy, restored at θ*, SURE vs true risk) is written to
``$DARGMIN_OUTPUT_DIR/tv_deblurring_sugar.png`` (default: the current directory).
Run: ``python examples/tv_deblurring_sugar.py`` (a few minutes on 2 CPU cores;
``DARGMIN_FAST=1``: a 32² crop, a few seconds). Needs scikit-image and matplotlib.
"""

import warnings

import numpy as np
from skimage.metrics import peak_signal_noise_ratio
from tv_sugar_common import FAST, camera, save_figure  # float64, Agg, the output folder

from dargmin.errors import DargminWarning
from dargmin.imaging import ChambollePock, FFTBlur, ImageSURE, solve, tv_deblurring

warnings.simplefilter("ignore", DargminWarning)  # a capped solve says so; the fast mode caps

x = camera()  # 256² (fast mode: a 32² crop)
sigma, width = 0.02, 1.5
blur = FFTBlur.gaussian(x.shape, width)
y = np.asarray(blur.apply(x)) + sigma * np.random.default_rng(1).normal(size=x.shape)

prob = tv_deblurring(blur)
cfg = ChambollePock(tol=1e-5, max_iter=1500 if FAST else 20000)
est = ImageSURE(prob, y, sigma, solver=cfg)
res = est.tune([0.003], progress=not FAST, maxiter=5 if FAST else 50)
print(
    f"SUGAR + BFGS: θ* = {res.theta[0]:.4f} after {res.n_evals} evaluations ({res.seconds:.1f} s)"
)

grid = np.geomspace(3e-4, 0.03, 5 if FAST else 20)
sure_vals = est.grid([[t] for t in grid]) / y.size
pred_risk, mse, prev = [], [], None
for t in grid:
    prev = solve(prob, y, t, solver=cfg, init=prev)
    w = np.asarray(prev.w)
    pred_risk.append(float(np.mean((np.asarray(blur.apply(w)) - np.asarray(blur.apply(x))) ** 2)))
    mse.append(float(np.mean((w - x) ** 2)))
i_or = int(np.argmin(mse))
psnr = lambda w: peak_signal_noise_ratio(x, np.clip(np.asarray(w), 0, 1), data_range=1.0)  # noqa: E731
print(f"blurred+noisy : PSNR {psnr(y):.2f} dB")
print(f"SUGAR θ*      : PSNR {psnr(res.w):.2f} dB")
print(f"grid oracle θ={grid[i_or]:.4f}: PSNR {10 * np.log10(1 / mse[i_or]):.2f} dB")

save_figure(
    "tv_deblurring_sugar.png",
    [(x, "original"), (y, f"blurred + noisy ({psnr(y):.1f} dB)"),
     (res.w, f"TV at θ* = {res.theta[0]:.3f} ({psnr(res.w):.1f} dB)")],
    [(grid, sure_vals, "o-", "SURE / n (from y)"),
     (grid, pred_risk, "s-", "true prediction risk / n"), (grid, mse, "^-", "true MSE of ŵ")],
    res.theta[0],
    log_y=True,
)  # fmt: skip
