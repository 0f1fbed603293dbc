"""Set-up shared by ``tv_denoising_sugar.py`` and ``tv_deblurring_sugar.py``: float64, the
camera image, the output folder and the four-panel figure.

A package, not a script: ``tests/test_examples.py`` runs ``examples/*.py`` only. The examples
import it as ``tv_sugar_common`` (Python puts the script's folder on ``sys.path``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
from skimage import data, img_as_float

FAST = os.environ.get("DARGMIN_FAST") == "1"
OUT = Path(os.environ.get("DARGMIN_OUTPUT_DIR", "."))


def camera() -> np.ndarray:
    """scikit-image's camera in grey, 256² by 2 × 2 block means (fast mode: a 32² crop with
    edges and texture)."""
    x = img_as_float(data.camera()).reshape(256, 2, 256, 2).mean(axis=(1, 3))
    return x[88:120, 108:140] if FAST else x


def save_figure(
    name: str,
    images: Sequence[tuple[np.ndarray, str]],
    curves: Sequence[tuple[np.ndarray, Sequence[float], str, str]],
    theta_star: float,
    *,
    log_y: bool = False,
) -> Path:
    """Three images (original, observation, restored) and the risk curves against ``θ``
    (``(θ grid, values, style, label)``), with ``θ*`` marked; saved to ``OUT/name``."""
    fig, ax = plt.subplots(1, 4, figsize=(16, 4))
    for a, (img, title) in zip(ax[:3], images, strict=True):
        a.imshow(np.clip(np.asarray(img), 0, 1), cmap="gray", vmin=0, vmax=1)
        a.set_title(title)
        a.axis("off")
    plot = ax[3].loglog if log_y else ax[3].semilogx
    for grid, values, style, label in curves:
        plot(grid, values, style, label=label)
    ax[3].axvline(theta_star, color="k", ls="--", label="θ* (SUGAR + BFGS)")
    ax[3].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no label clutter
    ax[3].set_xlabel("θ")
    ax[3].legend(fontsize=8)
    ax[3].set_title("risk estimate vs true risk")
    fig.tight_layout()
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")
    return path
