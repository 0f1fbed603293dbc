"""Convergence plots (matplotlib is imported lazily: ``pip install dargmin[plot]``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from dargmin.hyper._optimizers import Monitor


def plot_convergence(monitors: Mapping[str, Monitor], *, axes: Any = None, theta_index: int = 0):
    """Plot best-so-far criterion vs time and the path of ``log θ`` for several searches.

    Parameters
    ----------
    monitors
        ``{label: Monitor}``, e.g. ``{"grid search": grid_monitor, "hypergradient": res.monitor}``.
    axes
        Two matplotlib axes; created (side by side) when ``None``.
    theta_index
        Which hyperparameter to draw in the path panel.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> m = Monitor(); m.record([0.0], 2.0); m.record([-1.0], 1.0)
    >>> fig = plot_convergence({"gd": m})   # doctest: +SKIP
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plot_convergence needs matplotlib: pip install 'dargmin[plot]'."
        ) from err
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    else:
        fig = axes[0].figure
    for label, mon in monitors.items():
        vals = np.asarray(mon.values, dtype=float)
        # Best-so-far: what a user of each search would hold at that time.
        best = np.minimum.accumulate(np.where(np.isfinite(vals), vals, np.inf))
        axes[0].plot(mon.times, best, marker=".", label=label)
        path = [t[theta_index] for t in mon.log_thetas]
        axes[1].plot(np.arange(len(path)), path, marker=".", label=label)
    axes[0].set_xlabel("time (s)")
    axes[0].set_ylabel("best criterion so far")
    axes[0].set_yscale("log")
    axes[1].set_xlabel("evaluation")
    axes[1].set_ylabel(f"log θ[{theta_index}]")
    axes[0].legend()
    fig.tight_layout()
    return fig
