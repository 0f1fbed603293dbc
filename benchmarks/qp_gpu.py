"""QP layers on a GPU: dargmin.constrained.solve_qp (JAX) against qpth (PyTorch), same device.

qpth's home ground is a CUDA GPU (its paper's batched QP layer). This script solves the same
random strictly convex QPs as ``qp_vs_peers.py`` (``Q = LLᵀ + 1e-3·I``, ``n/2`` inequalities,
``n/5`` equalities) with both libraries on the default accelerator and prints, per size,
batch and precision:

* ms per forward solve and per forward + backward (gradient of ``Σx`` in all six inputs),
  median of repeats after two warm-up calls, each call synchronized with the device;
* the gradient's relative error in ``(q, h)`` against the exact KKT gradient (NumPy, float64,
  on the active set of dargmin's float64 solution), median and worst over the batch.

Run on a machine with a GPU (JAX and PyTorch with CUDA, qpth importable):
``python benchmarks/qp_gpu.py``; the table is printed and written to
``$DARGMIN_OUTPUT_DIR/qp_gpu.md`` when that is set. ``DARGMIN_FAST=1``: a small smoke run (on
the CPU where there is no GPU). The measured table is in ``benchmarks/results/qp_gpu.md``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, str(Path(__file__).parent))

from qp_vs_peers import dargmin_layer, exact_gradient, random_qps, relative_errors

from dargmin.constrained import solve_qp

FAST = os.environ.get("DARGMIN_FAST", "") not in ("", "0")
#: (n, batch, precisions)
CASES = (
    [(10, 4, ("float64", "float32")), (20, 8, ("float64",))]
    if FAST
    else [
        (10, 128, ("float64", "float32")),
        (100, 128, ("float64", "float32")),
        (500, 8, ("float64",)),
        (500, 128, ("float64", "float32")),
        (1000, 32, ("float64",)),
    ]
)
if os.environ.get("DARGMIN_QP_GPU_CASES"):
    # e.g. "100x128:float32,500x8:float64"
    CASES = []
    for item in os.environ["DARGMIN_QP_GPU_CASES"].split(","):
        size, dtype = item.split(":")
        n_, batch_ = (int(v) for v in size.split("x"))
        CASES.append((n_, batch_, (dtype,)))
REPEATS = 5


def median_ms(fn: Callable[[], Any]) -> float:
    fn()
    fn()  # two warm-ups: compilation, then caches and autotuning
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def qpth_layer(problem: tuple, dtype: str) -> tuple[Callable, Callable]:
    import torch
    from qpth.qp import QPFunction

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = getattr(torch, dtype)
    tensors = [torch.tensor(a, dtype=tdtype, device=device) for a in problem]

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def fwd() -> np.ndarray:
        with torch.no_grad():
            x = QPFunction(verbose=-1)(tensors[0], tensors[1], *tensors[4:], *tensors[2:4])
        sync()
        return x.cpu().numpy()

    def both() -> np.ndarray:
        leaves = [t.clone().requires_grad_(True) for t in tensors]
        Qr, qr, Ar, br, Gr, hr = leaves
        QPFunction(verbose=-1)(Qr, qr, Gr, hr, Ar, br).sum().backward()
        sync()
        return np.concatenate([qr.grad.cpu().numpy(), hr.grad.cpu().numpy()], axis=1)

    return fwd, both


def devices() -> str:
    out = [f"JAX {jax.__version__} on {jax.devices()[0].device_kind}"]
    try:
        import torch

        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        out.append(f"PyTorch {torch.__version__} on {name}")
    except Exception as err:  # pragma: no cover - no torch there
        out.append(f"PyTorch unavailable ({type(err).__name__})")
    return "; ".join(out)


def main() -> None:
    lines = [
        "# QP layers on a GPU: dargmin vs qpth",
        "",
        devices() + ".",
        "",
        "| n | batch | precision | library | forward (ms) | forward + backward (ms) "
        "| qpth / dargmin (fwd + bwd) | grad rel. error median | worst |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    out_dir = os.environ.get("DARGMIN_OUTPUT_DIR")

    def flush() -> None:
        if out_dir:
            Path(out_dir, "qp_gpu.md").write_text("\n".join(lines) + "\n")

    for n, batch, precisions in CASES:
        problem = random_qps(n, batch)
        sol = solve_qp(*(jnp.asarray(a) for a in problem))
        exact = exact_gradient(problem, np.asarray(sol.x), np.asarray(sol.ineq_dual))
        for dtype in precisions:
            results = {}
            for name, make in (("dargmin", dargmin_layer), ("qpth", qpth_layer)):
                try:
                    fwd, both = make(problem, dtype)
                    times = (median_ms(fwd), median_ms(both))
                    errors = relative_errors(both().astype(np.float64), exact)
                    results[name] = (times, errors)
                except Exception as err:
                    results[name] = (None, f"{type(err).__name__}: {str(err).splitlines()[0]}")
                    if name == "dargmin":
                        # The refusal, then the same layer with check="warn": its time and
                        # the accuracy of the derivatives it would have refused.
                        text = str(err).strip().splitlines()[-1]
                        lines.append(f"<!-- n={n} batch={batch} {dtype} refusal: {text[:400]} -->")
                        print(lines[-1], flush=True)
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            fwd, both = dargmin_layer(problem, dtype, check="warn")
                            times = (median_ms(fwd), median_ms(both))
                            errors = relative_errors(both().astype(np.float64), exact)
                        results["dargmin (check='warn')"] = (times, errors)
                        results["dargmin"] = (None, "refused by the KKT check (see the note)")
            for name, (times, errors) in results.items():
                if times is None:
                    row = f"| {n} | {batch} | {dtype} | {name} | failed: {errors[:90]} | | | | |"
                else:
                    ours = results["dargmin"][0] or results.get("dargmin (check='warn')", [None])[0]
                    ratio = f"{times[1] / ours[1]:.2f}×" if ours is not None else "-"
                    row = (
                        f"| {n} | {batch} | {dtype} | {name} | {times[0]:.1f} | {times[1]:.1f} | "
                        f"{ratio} | {np.median(errors):.1e} | {np.max(errors):.1e} |"
                    )
                lines.append(row)
                print(row, flush=True)
            flush()


if __name__ == "__main__":
    main()
