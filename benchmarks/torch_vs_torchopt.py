"""dargmin.torch against torchopt's implicit differentiation and against unrolling.

1. The hypergradient ``dR/d log λ`` of a held-out logistic loss ``R(w*(λ))`` through an
   L2-regularized logistic regression ``w*(λ) = argmin mean log(1 + exp(−y·Xw)) + λ/2 ‖w‖²``
   at p = 100, 1000, 10 000 features:
   * dargmin.torch, its check on: ``root(optimality, positive_definite=True)`` with the
     hand-written gradient torchopt is given, and ``argmin(objective)`` (the gradient and
     Hessian products by differentiating the objective), both with ``CG(rtol)``;
   * torchopt: ``custom_root(optimality, solve=solve_cg(rtol))`` (the same CG tolerance);
   * unrolling 100 steps of gradient descent (step 1/L) and backpropagating through them.
   Both implicit methods wrap a solver that returns the precomputed solution (an L-BFGS
   solve, not timed), so their per-call time is the derivative: the backward pass. The
   unrolled time is its forward (100 steps, building the graph) plus backward.
   Memory: on CUDA, ``torch.cuda.max_memory_allocated`` during the call; on CPU (torch has
   no allocator statistics there) the peak of the tensor memory allocated during the call
   and alive at once, from ``torch.profiler``'s allocation events.
2. Second derivatives on a 1-D problem, ``x*(θ) = argmin x⁴/4 + x²/2 − θx``
   (``x³ + x = θ``), against the closed form ``x'' = −6x/(3x² + 1)³``: torchopt's backward
   treats ``x*`` as a constant when differentiated again, so its second derivative is wrong.

``DARGMIN_FAST=1``: p = 100 and 1000 only, fewer repetitions. Results go to
``benchmarks/results/torch_vs_torchopt.md`` (or ``$DARGMIN_OUTPUT_DIR``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import dargmin.torch as dt

try:  # the peer is optional
    import torchopt
except ImportError:  # pragma: no cover
    torchopt = None

torch.set_default_dtype(torch.float64)
# One thread: on a shared machine, two BLAS threads made timings swing 2-3x between runs.
torch.set_num_threads(1)
FAST = bool(os.environ.get("DARGMIN_FAST"))
SIZES = (100, 1000) if FAST else (100, 1000, 10_000)
REPEATS = 3 if FAST else 15
CG_RTOL = 1e-6
UNROLL_STEPS = 100
LOG_LAM = math.log(0.1)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_data(p: int, n: int = 400) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(p)
    X = torch.randn(2 * n, p, generator=generator) / math.sqrt(p)
    w_true = torch.randn(p, generator=generator)
    y = torch.sign(X @ w_true + 0.3 * torch.randn(2 * n, generator=generator))
    return tuple(t.to(DEVICE) for t in (X[:n], y[:n], X[n:], y[n:]))


def inner_objective(
    w: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    return F.softplus(-y * (X @ w)).mean() + 0.5 * log_lam.exp() * (w @ w)


def optimality(
    w: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """The gradient of the inner objective, written out (torchopt differentiates it)."""
    return X.T @ (-y * torch.sigmoid(-y * (X @ w))) / X.shape[0] + log_lam.exp() * w


def held_out(w: torch.Tensor, X_val: torch.Tensor, y_val: torch.Tensor) -> torch.Tensor:
    return F.softplus(-y_val * (X_val @ w)).mean()


def lbfgs_solve(log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    w = torch.zeros(X.shape[1], device=X.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [w],
        lr=1,
        max_iter=1000,
        tolerance_grad=1e-12,
        tolerance_change=0,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = inner_objective(w, log_lam.detach(), X, y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach()


def _peak_allocated(call: Callable[[], torch.Tensor]) -> int:
    """Peak bytes of tensor memory allocated during one call and alive at the same time
    (from the allocation events of ``torch.profiler`` with ``profile_memory=True``: torch
    keeps no CPU allocator statistics). The event tree is a private profiler interface:
    0 is returned if it is unavailable."""
    try:
        from torch._C._profiler import _EventType

        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
            call()
        sizes: list[tuple[int, int]] = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation:
                sizes.append((node.start_time_ns, node.extra_fields.alloc_size))
            stack.extend(node.children)
    except Exception:  # the private interface changed: report no number rather than fail
        return 0
    current = peak = 0
    for _, size in sorted(sizes):  # frees are negative sizes
        current += size
        peak = max(peak, current)
    return peak


def measure(
    calls: dict[str, Callable[[], torch.Tensor]],
) -> dict[str, tuple[float, int, torch.Tensor]]:
    """Per method: the fastest of ``REPEATS`` calls in seconds (methods interleaved, so that
    load from other processes hits them alike), the peak memory of one call in bytes (see
    the module docstring) and the result."""
    results = {name: call() for name, call in calls.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(REPEATS):
        for name, call in calls.items():
            start = time.perf_counter()
            results[name] = call()
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    memory = {}
    for name, call in calls.items():
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            call()
            torch.cuda.synchronize()
            memory[name] = torch.cuda.max_memory_allocated() - base
        else:
            memory[name] = _peak_allocated(call)
    return {name: (min(times[name]), memory[name], results[name]) for name in calls}


def hypergradient_dargmin(
    w_star: torch.Tensor, data: tuple[torch.Tensor, ...], *, from_objective: bool
) -> Callable[[], torch.Tensor]:
    """dargmin.torch with CG at ``CG_RTOL``, its check on: ``argmin(objective)`` (the
    Hessian by differentiating the objective twice) or ``root(optimality)`` with the same
    hand-written gradient that torchopt is given."""
    X, y, X_val, y_val = data
    cg = dt.CG(rtol=CG_RTOL)
    if from_objective:
        decorate = dt.argmin(inner_objective, linear_solver=cg)
    else:
        decorate = dt.root(optimality, linear_solver=cg, positive_definite=True)

    @decorate
    def solve(init: None, log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return w_star

    def call() -> torch.Tensor:
        log_lam = torch.tensor(LOG_LAM, device=DEVICE, requires_grad=True)
        return torch.autograd.grad(held_out(solve(None, log_lam, X, y), X_val, y_val), log_lam)[0]

    return call


def hypergradient_torchopt(
    w_star: torch.Tensor, data: tuple[torch.Tensor, ...]
) -> Callable[[], torch.Tensor]:
    X, y, X_val, y_val = data
    assert torchopt is not None

    @torchopt.diff.implicit.custom_root(
        optimality, argnums=1, solve=torchopt.linear_solve.solve_cg(rtol=CG_RTOL)
    )
    def solve(
        w: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        return w_star.clone()

    def call() -> torch.Tensor:
        log_lam = torch.tensor(LOG_LAM, device=DEVICE, requires_grad=True)
        w = solve(torch.zeros_like(w_star), log_lam, X, y)
        return torch.autograd.grad(held_out(w, X_val, y_val), log_lam)[0]

    return call


def hypergradient_unrolled(data: tuple[torch.Tensor, ...]) -> Callable[[], torch.Tensor]:
    X, y, X_val, y_val = data
    lam = math.exp(LOG_LAM)
    step = 1.0 / (float(torch.linalg.matrix_norm(X, 2)) ** 2 / (4 * X.shape[0]) + lam)

    def call() -> torch.Tensor:
        log_lam = torch.tensor(LOG_LAM, device=DEVICE, requires_grad=True)
        w = torch.zeros(X.shape[1], device=DEVICE)
        for _ in range(UNROLL_STEPS):
            w = w - step * optimality(w, log_lam, X, y)
        return torch.autograd.grad(held_out(w, X_val, y_val), log_lam)[0]

    return call


def hypergradient_table() -> list[str]:
    rows = [
        "| p | dargmin root(g) | dargmin argmin(f) | torchopt | ratio root(g) / torchopt "
        "| ratio argmin(f) / torchopt | unrolled 100 steps | memory dargmin root(g) "
        "| memory torchopt | memory unrolled | unrolled / dargmin memory "
        "| max difference of the hypergradients |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in SIZES:
        data = make_data(p)
        w_star = lbfgs_solve(torch.tensor(LOG_LAM, device=DEVICE), data[0], data[1])
        calls = {
            "root": hypergradient_dargmin(w_star, data, from_objective=False),
            "argmin": hypergradient_dargmin(w_star, data, from_objective=True),
            "unrolled": hypergradient_unrolled(data),
        }
        if torchopt is not None:
            calls["torchopt"] = hypergradient_torchopt(w_star, data)
        r = measure(calls)

        def ms(name: str) -> str:
            return f"{r[name][0] * 1e3:.2f} ms" if name in r else "–"

        def mib(name: str) -> str:
            return f"{r[name][1] / 2**20:.3f} MiB" if name in r else "–"

        def ratio(name: str) -> str:
            return f"{r[name][0] / r['torchopt'][0]:.2f}×" if "torchopt" in r else "–"

        implicit = [float(r[name][2]) for name in ("root", "argmin", "torchopt") if name in r]
        spread = max(implicit) - min(implicit)
        rows.append(
            f"| {p} | {ms('root')} | {ms('argmin')} | {ms('torchopt')} | {ratio('root')} "
            f"| {ratio('argmin')} | {ms('unrolled')} | {mib('root')} | {mib('torchopt')} "
            f"| {mib('unrolled')} | {r['unrolled'][1] / max(r['root'][1], 1):.1f}× "
            f"| {spread:.1e} |"
        )
        print(rows[-1])
        print(
            f"  hypergradient: implicit {float(r['root'][2]):.8g}, "
            f"unrolled {float(r['unrolled'][2]):.8g}"
        )
    return rows


def second_derivative_table() -> list[str]:
    theta0 = 2.0
    x0 = 1.0  # x³ + x = 2 at x = 1
    truth = -6 * x0 / (3 * x0**2 + 1) ** 3

    def quartic(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return (x**4 / 4 + x**2 / 2 - theta * x).sum()

    def cubic(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return x**3 + x - theta

    def newton(theta: torch.Tensor) -> torch.Tensor:
        x = torch.ones(1)
        for _ in range(50):
            x = x - cubic(x, theta.detach()) / (3 * x**2 + 1)
        return x

    @dt.argmin(quartic)
    def solve_dargmin(init: None, theta: torch.Tensor) -> torch.Tensor:
        return newton(theta)

    def second(solve: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, float]:
        theta = torch.tensor([theta0], requires_grad=True)
        (first,) = torch.autograd.grad(solve(theta).sum(), theta, create_graph=True)
        (d2,) = torch.autograd.grad(first.sum(), theta)
        return float(first), float(d2)

    rows = [
        f"Second derivative of x*(θ) for x³ + x = θ at θ = {theta0} (x* = 1): "
        f"truth x' = 0.25, x'' = {truth:.6g}.",
        "",
        "| method | x' | x'' | error of x'' |",
        "|---|---|---|---|",
    ]
    d1, d2 = second(lambda th: solve_dargmin(None, th))
    rows.append(f"| dargmin.torch | {d1:.6g} | {d2:.6g} | {abs(d2 - truth):.1e} |")
    if torchopt is not None:

        @torchopt.diff.implicit.custom_root(cubic, argnums=1)
        def solve_torchopt(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
            return newton(theta)

        d1, d2 = second(lambda th: solve_torchopt(torch.ones(1), th))
        rows.append(f"| torchopt | {d1:.6g} | {d2:.6g} | {abs(d2 - truth):.1e} |")
    for row in rows[2:]:
        print(row)
    return rows


def main() -> None:
    print(f"device: {DEVICE}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    hyper = hypergradient_table()
    second = second_derivative_table()
    memory_note = (
        "torch.cuda.max_memory_allocated during one call"
        if DEVICE.type == "cuda"
        else "peak of the tensor memory allocated during one call and alive at once, from "
        "torch.profiler's allocation events (CPU: torch keeps no allocator statistics)"
    )
    text = "\n".join(
        [
            "# dargmin.torch vs torchopt vs unrolling",
            "",
            "Generated by `benchmarks/torch_vs_torchopt.py` "
            f"({'DARGMIN_FAST smoke run' if FAST else 'full run'}); "
            f"device {DEVICE}, torch {torch.__version__}"
            + (
                f", torchopt {torchopt.__version__}"
                if torchopt is not None
                else ", torchopt absent"
            )
            + f", {torch.get_num_threads()} threads, float64.",
            "",
            "## Hypergradient of a held-out logistic loss through L2 logistic regression",
            "",
            f"n = 400 training and 400 validation samples, λ = 0.1, CG rtol = {CG_RTOL:g} for both "
            f"implicit methods (dargmin with its check on), unrolling {UNROLL_STEPS} gradient "
            f"steps of size 1/L. Fastest of {REPEATS} interleaved calls. Memory: {memory_note}.",
            "",
            *hyper,
            "",
            "## Second derivatives",
            "",
            *second,
            "",
        ]
    )
    out_dir = Path(os.environ.get("DARGMIN_OUTPUT_DIR", Path(__file__).parent / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "torch_vs_torchopt.md").write_text(text)
    print(f"wrote {out_dir / 'torch_vs_torchopt.md'}")


if __name__ == "__main__":
    main()
