"""Hypergradient cost: dargmin's implicit derivative vs JAXopt's ``custom_root`` vs unrolling.

The hypergradient is ``d/dλ L_val(w*(λ))`` with ``w*(λ) = argmin_w L_train(w) + (λ/2)‖w‖²``
for ridge regression and L2-logistic regression with p = 100, 1000, 10000 parameters
(synthetic standard Gaussian features, n = min(2p, 1000) training samples, 500 held out).
Every method uses the same jittable inner solver (gradient descent, fixed number of
iterations and step size) and differs only in how the derivative is obtained:

* ``dargmin cg`` / ``dargmin cholesky``: ``dargmin.argmin`` with that linear solver, with the
  default stationarity check (one extra linear solve before the derivative) and with
  ``check="ignore"``;
* ``jaxopt``: ``jaxopt.implicit_diff.custom_root`` with ``jaxopt.linear_solve.solve_cg``;
* ``unrolled``: ``jax.grad`` through the solver's iterations.

For each: compile time (``lower().compile()``), per-call time, the compiled program's
temporary memory (``memory_analysis()``) and the hypergradient (all methods must agree).
Dense Cholesky is skipped at p = 10000: it would materialize a 10000 x 10000 Hessian column
by column.

Timing: all methods of one case are compiled and warmed up, then called round-robin
(``repeats`` rounds), so that load from other processes hits every method alike; the call
time is the median over rounds and each ratio to JAXopt is the median of the per-round
ratios; the ratio of the fastest calls and that of the median process CPU times are shown
too (under load from others the CPU-time ratio is the steadiest estimate of the intrinsic
cost; pin the run, ``taskset -c 0 python benchmarks/implicit_vs_peers.py``, so that
multi-threaded kernels such as ``eigvalsh`` are not slowed by contention). Sub-10 ms calls
are repeated within one timed sample. Calls go through ``jax.jit`` (users' path; an
ahead-of-time ``Compiled`` object dispatches a program with a host callback through a
slower Python path, ~0.1 ms more per call, which would be charged to the check).
For every dargmin linear solver and case two lines give the target directly::

    check cost: dargmin(check='raise') / jaxopt custom_root = X.XX×
    dargmin(check='ignore') / jaxopt = Y.YY×

(the default correctness check should cost at most 1.1× JAXopt). Writes a markdown table to
``benchmarks/results/implicit_vs_peers.md``.

``DARGMIN_FAST=1``: tiny sizes (p = 50, dense path of ``"auto"``, and p = 300, its CG path)
and 9 rounds, well under a minute; the table then goes to ``$DARGMIN_OUTPUT_DIR`` when that
is set (and is not written otherwise), never over the full results.
"""

from __future__ import annotations

import logging

import jax

jax.config.update("jax_enable_x64", True)
# Keep jaxopt's deprecation chatter out of the table.
logging.getLogger("jax").setLevel(logging.ERROR)

import functools
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import dargmin

warnings.filterwarnings("ignore", category=DeprecationWarning)
from jaxopt.implicit_diff import custom_root
from jaxopt.linear_solve import solve_cg

FAST = os.environ.get("DARGMIN_FAST", "") not in ("", "0")
SIZES = (50, 300) if FAST else (100, 1000, 10_000)
GD_ITERATIONS = 100
LAM = 1.0
# dargmin's default CG tolerance in float64 (10·√eps·1e-2); JAXopt gets the same, since
# jax.scipy's CG default (1e-5) would make it faster by being less accurate.
CG_RTOL = 10 * float(np.finfo(np.float64).eps) ** 0.5 * 1e-2
# ... and its absolute floor (dargmin.linear_solvers.default_tolerances: 1e-3·rtol). On these
# cases both stop after the same number of steps (17/22 ridge, 10/12 logistic at p = 100/1000).
CG_ATOL = 1e-3 * CG_RTOL
RESULTS = Path(__file__).parent / "results" / "implicit_vs_peers.md"
JAXOPT = "jaxopt custom_root (cg)"
# Shortest timed sample: faster calls are repeated within one sample.
SAMPLE_S = 0.01
# What dargmin's default linear_solver="auto" picks for an argmin (dargmin.linear_solvers).
DENSE_MAX_SIZE = 200

Data = tuple[jax.Array, jax.Array, jax.Array, jax.Array]


def ridge_loss(w: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    return 0.5 * jnp.mean((x @ w - y) ** 2)


def logistic_loss(w: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.logaddexp(0.0, -y * (x @ w)))


LOSSES = {"ridge": ridge_loss, "logistic": logistic_loss}
# Upper bound of the loss curvature per unit of ‖X‖²/n: 1 for squares, 1/4 for logistic.
CURVATURE = {"ridge": 1.0, "logistic": 0.25}


def make_data(problem: str, p: int, seed: int = 0) -> Data:
    rng = np.random.default_rng(seed)
    n = min(2 * p, 1000)
    x = rng.standard_normal((n + 500, p))
    w_true = rng.standard_normal(p)
    signal = x @ w_true
    if problem == "ridge":
        y = signal + 0.5 * rng.standard_normal(n + 500)
    else:
        y = np.where(signal + 0.5 * rng.standard_normal(n + 500) > 0, 1.0, -1.0)
    return jnp.asarray(x[:n]), jnp.asarray(y[:n]), jnp.asarray(x[n:]), jnp.asarray(y[n:])


def make_objective(problem: str) -> Callable[..., jax.Array]:
    loss = LOSSES[problem]

    def objective(w: jax.Array, lam: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
        return loss(w, x, y) + 0.5 * lam * jnp.sum(w**2)

    return objective


def make_gd(objective: Callable[..., jax.Array], step: float) -> Callable[..., jax.Array]:
    """Fixed-step gradient descent: jittable, differentiable (for unrolling), same for all."""

    def gd(init: jax.Array, lam: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
        def body(_: int, w: jax.Array) -> jax.Array:
            return w - step * jax.grad(objective)(w, lam, x, y)

        return jax.lax.fori_loop(0, GD_ITERATIONS, body, init)

    return gd


def make_methods(problem: str, data: Data) -> dict[str, Callable[..., jax.Array]]:
    """Hypergradient functions ``(lam, x_tr, y_tr, x_val, y_val) -> dL_val/dλ`` per method."""
    objective = make_objective(problem)
    x_tr = np.asarray(data[0])
    # Step 1/L with L = c·‖X‖²/n + λ. GD contracts at rate 1 - μ/L on the row space of X
    # (where w stays, starting from 0); with λ = 1 that is below 0.8, so 100 steps converge.
    lipschitz = CURVATURE[problem] * np.linalg.norm(x_tr, 2) ** 2 / x_tr.shape[0] + LAM
    gd = make_gd(objective, 1.0 / lipschitz)
    loss = LOSSES[problem]
    p = x_tr.shape[1]

    def hypergradient(solve: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
        def val_loss(lam: jax.Array, x: jax.Array, y: jax.Array, xv: jax.Array, yv: jax.Array):
            return loss(solve(jnp.zeros(p), lam, x, y), xv, yv)

        return jax.grad(val_loss)

    methods: dict[str, Callable[..., jax.Array]] = {}
    for solver_name in ("cg", "cholesky"):
        if solver_name == "cholesky" and p > 2000:
            continue
        for check in ("raise", "ignore"):
            decorated = dargmin.argmin(objective, linear_solver=solver_name, check=check)(gd)
            label = f"dargmin {solver_name}" + (" (no check)" if check == "ignore" else "")
            methods[label] = hypergradient(decorated)
    jaxopt_solve = custom_root(
        jax.grad(objective), solve=functools.partial(solve_cg, tol=CG_RTOL, atol=CG_ATOL)
    )(gd)
    methods["jaxopt custom_root (cg)"] = hypergradient(jaxopt_solve)
    methods["unrolled"] = hypergradient(gd)
    return methods


@dataclass
class Measurement:
    problem: str
    p: int
    n: int
    method: str
    compile_s: float
    call_s: float
    best_s: float
    temp_bytes: int
    hypergrad: float
    ratio_jaxopt: float  # median over rounds of (this call time) / (JAXopt's, same round)
    min_ratio_jaxopt: float  # fastest call / JAXopt's fastest call
    cpu_ratio_jaxopt: float  # median process CPU time / JAXopt's


def measure_case(
    fns: dict[str, Callable[..., jax.Array]], args: tuple, repeats: int
) -> dict[str, tuple]:
    """Compile every method, warm up, then time them round-robin.

    Returns per method
    ``(compile_s, median_s, min_s, temp_bytes, value, ratio, min_ratio, cpu_ratio)``:
    ``ratio`` is the median over rounds of the call time divided by JAXopt's in the same
    round, ``min_ratio`` the ratio of the fastest calls, ``cpu_ratio`` the ratio of the
    median process CPU times (what the call costs, not counting time the process waited
    for a core: the steadiest of the three on a loaded machine). Interleaving the methods keeps the
    ratios meaningful on a shared machine, where absolute times drift with other people's
    load; a sample of a sub-millisecond call repeats it until the sample lasts
    ``SAMPLE_S``, so one preemption does not decide it.
    """
    compiled, compile_s, temp, value, inner = {}, {}, {}, {}, {}
    for name, fn in fns.items():
        start = time.perf_counter()
        jitted = jax.jit(fn)
        ahead_of_time = jitted.lower(*args).compile()
        compile_s[name] = time.perf_counter() - start
        memory = ahead_of_time.memory_analysis()
        temp[name] = int(getattr(memory, "temp_size_in_bytes", -1)) if memory else -1
        # Timed through jax.jit, the way users call a function: an ahead-of-time
        # ``Compiled`` object has no C++ dispatch path for a program that contains a host
        # callback (the check's), and its Python path adds a fixed ~0.1 ms per call
        # (measured at p = 100: JAXopt's own program with one never-taken callback became
        # 1.16-1.30x slower called through ``Compiled``, 0.95-1.0x through jax.jit).
        compiled[name] = jitted
        value[name] = float(jitted(*args).block_until_ready())  # warm-up (and compile)
        start = time.perf_counter()
        compiled[name](*args).block_until_ready()
        inner[name] = max(1, min(100, int(SAMPLE_S / (time.perf_counter() - start))))
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, call in compiled.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(inner[name]):
                call(*args).block_until_ready()
            cpu[name].append((time.process_time() - start_cpu) / inner[name])
            times[name].append((time.perf_counter() - start) / inner[name])
    ref, ref_cpu = times[JAXOPT], statistics.median(cpu[JAXOPT])
    return {
        name: (
            compile_s[name],
            statistics.median(t),
            min(t),
            temp[name],
            value[name],
            statistics.median(a / b for a, b in zip(t, ref, strict=True)),
            min(t) / min(ref),
            statistics.median(cpu[name]) / ref_cpu,
        )
        for name, t in times.items()
    }


def check_cost_lines(problem: str, p: int, group: list[Measurement]) -> list[str]:
    """The two ratios the target is read from, per dargmin linear solver of one case."""
    by_method = {r.method: r for r in group}
    lines = []
    for solver in ("cholesky", "cg"):
        checked = by_method.get(f"dargmin {solver}")
        unchecked = by_method.get(f"dargmin {solver} (no check)")
        if checked is None or unchecked is None:
            continue
        default = (solver == "cholesky") == (p <= DENSE_MAX_SIZE)
        label = f"{problem} p={p} {solver}{' (auto default)' if default else ''}"
        lines.append(
            f"{label}: check cost: dargmin(check='raise') / jaxopt custom_root = "
            f"{checked.ratio_jaxopt:.2f}× (fastest calls: {checked.min_ratio_jaxopt:.2f}×, "
            f"CPU time: {checked.cpu_ratio_jaxopt:.2f}×)"
        )
        lines.append(
            f"{label}: dargmin(check='ignore') / jaxopt = {unchecked.ratio_jaxopt:.2f}× "
            f"(fastest calls: {unchecked.min_ratio_jaxopt:.2f}×, "
            f"CPU time: {unchecked.cpu_ratio_jaxopt:.2f}×)"
        )
    return lines


def run() -> list[Measurement]:
    rows = []
    for problem in ("ridge", "logistic"):
        for p in SIZES:
            data = make_data(problem, p)
            args = (jnp.asarray(LAM), *data)
            repeats = 9 if FAST else (15 if p < 10_000 else 5)
            results = measure_case(make_methods(problem, data), args, repeats)
            group = []
            for method, measured in results.items():
                row = Measurement(problem, p, data[0].shape[0], method, *measured)
                compile_s, call_s, _, temp, value, ratio, _, cpu_ratio = measured
                group.append(row)
                print(
                    f"{problem:8} p={p:<6} {method:30} compile {compile_s:6.2f} s  "
                    f"call {1e3 * call_s:9.2f} ms  / jaxopt {ratio:5.2f} (CPU {cpu_ratio:5.2f})  "
                    f"temp {temp / 2**20:8.2f} MiB  hypergrad {value:+.10e}",
                    flush=True,
                )
            for line in check_cost_lines(problem, p, group):
                print(line, flush=True)
            rows.extend(group)
    return rows


def markdown(rows: list[Measurement]) -> str:
    lines = [
        "# Hypergradient through an argmin: dargmin vs JAXopt `custom_root` vs unrolling",
        "",
        f"Machine: {platform.processor() or platform.machine()}, JAX {jax.__version__} on "
        f"{jax.devices()[0].platform.upper()}, float64; inner solver: gradient descent, "
        f"{GD_ITERATIONS} iterations, step 1/L; λ = {LAM}; CG rtol = {CG_RTOL:.1e}, "
        f"atol = {CG_ATOL:.1e} for both "
        "dargmin and JAXopt. Call time: median over repeats after a warm-up (compile time "
        "separate), and the fastest repeat (less sensitive to other load on the machine); the "
        "methods of one case are called round-robin. `/ jaxopt`: median over rounds of the "
        "call time divided by JAXopt's in the same round (the target: dargmin with its "
        "default check ≤ 1.1×); calls under 10 ms are repeated within one timed sample. "
        "`CPU`: ratio of median process CPU times (steadiest under load; run pinned, e.g. "
        "`taskset -c 0`, so that multi-threaded kernels do not inflate it). "
        "`auto` marks the solver dargmin's default picks at that size. "
        "Memory: `temp_size_in_bytes` of the compiled hypergradient program. "
        "Max rel. diff: relative difference of the hypergradient from `dargmin cg` "
        "(default check).",
        "",
        "| problem | p | n | method | compile (s) | call (ms) | min (ms) | / jaxopt "
        "| min / jaxopt min | CPU / jaxopt CPU | temp memory (MiB) | max rel. diff |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for problem in ("ridge", "logistic"):
        for p in SIZES:
            group = [r for r in rows if r.problem == problem and r.p == p]
            ref = next(r for r in group if r.method == "dargmin cg")
            for r in group:
                rel = abs(r.hypergrad - ref.hypergrad) / abs(ref.hypergrad)
                default = r.method.startswith("dargmin") and (
                    ("cholesky" in r.method) == (p <= DENSE_MAX_SIZE)
                )
                method = f"{r.method}{' (auto)' if default else ''}"
                lines.append(
                    f"| {problem} | {p} | {r.n} | {method} | {r.compile_s:.2f} "
                    f"| {1e3 * r.call_s:.2f} | {1e3 * r.best_s:.2f} | {r.ratio_jaxopt:.2f} "
                    f"| {r.min_ratio_jaxopt:.2f} | {r.cpu_ratio_jaxopt:.2f} "
                    f"| {r.temp_bytes / 2**20:.2f} | {rel:.1e} |"
                )
    lines += ["", "Check cost (target ≤ 1.1×):", "", "```"]
    for problem in ("ridge", "logistic"):
        for p in SIZES:
            group = [r for r in rows if r.problem == problem and r.p == p]
            lines += check_cost_lines(problem, p, group)
    lines.append("```")
    return "\n".join(lines) + "\n"


def main() -> None:
    start = time.perf_counter()
    rows = run()
    table = markdown(rows)
    print()
    print(table)
    if FAST:
        # Never overwrite the full results with the tiny sizes.
        output_dir = os.environ.get("DARGMIN_OUTPUT_DIR")
        results = Path(output_dir) / RESULTS.name if output_dir else None
    else:
        results = RESULTS
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(table)
    print(f"total {time.perf_counter() - start:.0f} s; written to {results or '(nothing)'}")


if __name__ == "__main__":
    main()
