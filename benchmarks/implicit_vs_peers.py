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

For each: compile time (``lower().compile()``), per-call time (median over repeats after a
warm-up call), the compiled program's temporary memory (``memory_analysis()``) and the
hypergradient (all methods must agree). Dense Cholesky is skipped at p = 10000: it would
materialize a 10000 x 10000 Hessian column by column. Writes a markdown table to
``benchmarks/results/implicit_vs_peers.md``.
"""

from __future__ import annotations

import logging

import jax

jax.config.update("jax_enable_x64", True)
# Keep jaxopt's deprecation chatter out of the table.
logging.getLogger("jax").setLevel(logging.ERROR)

import functools
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

SIZES = (100, 1000, 10_000)
GD_ITERATIONS = 100
LAM = 1.0
# dargmin's default CG tolerance in float64 (10·√eps·1e-2); JAXopt gets the same, since
# jax.scipy's CG default (1e-5) would make it faster by being less accurate.
CG_RTOL = 10 * float(np.finfo(np.float64).eps) ** 0.5 * 1e-2
RESULTS = Path(__file__).parent / "results" / "implicit_vs_peers.md"

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
        jax.grad(objective), solve=functools.partial(solve_cg, tol=CG_RTOL, atol=CG_RTOL)
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


def measure(fn: Callable[..., jax.Array], args: tuple, repeats: int) -> tuple[float, ...]:
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    temp = int(getattr(memory, "temp_size_in_bytes", -1)) if memory is not None else -1
    value = float(compiled(*args).block_until_ready())  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        compiled(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    return compile_s, statistics.median(times), min(times), temp, value


def run() -> list[Measurement]:
    rows = []
    for problem in ("ridge", "logistic"):
        for p in SIZES:
            data = make_data(problem, p)
            args = (jnp.asarray(LAM), *data)
            repeats = 9 if p < 10_000 else 5
            for method, fn in make_methods(problem, data).items():
                compile_s, call_s, best_s, temp, value = measure(fn, args, repeats)
                row = Measurement(
                    problem, p, data[0].shape[0], method, compile_s, call_s, best_s, temp, value
                )
                rows.append(row)
                print(
                    f"{problem:8} p={p:<6} {method:30} compile {compile_s:6.2f} s  "
                    f"call {1e3 * call_s:9.2f} ms  temp {temp / 2**20:8.2f} MiB  "
                    f"hypergrad {value:+.10e}",
                    flush=True,
                )
    return rows


def markdown(rows: list[Measurement]) -> str:
    lines = [
        "# Hypergradient through an argmin: dargmin vs JAXopt `custom_root` vs unrolling",
        "",
        f"Machine: {platform.processor() or platform.machine()}, JAX {jax.__version__} on "
        f"{jax.devices()[0].platform.upper()}, float64; inner solver: gradient descent, "
        f"{GD_ITERATIONS} iterations, step 1/L; λ = {LAM}; CG rtol = {CG_RTOL:.1e} for both "
        "dargmin and JAXopt. Call time: median over repeats after a warm-up (compile time "
        "separate), and the fastest repeat (less sensitive to other load on the machine). "
        "Memory: `temp_size_in_bytes` of the compiled hypergradient program. "
        "Ratios are relative to `dargmin cg` (default check). Max rel. diff: largest relative "
        "difference of the hypergradient from `dargmin cg` (default check).",
        "",
        "| problem | p | n | method | compile (s) | call (ms) | min (ms) | time / dargmin cg "
        "| temp memory (MiB) | max rel. diff |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for problem in ("ridge", "logistic"):
        for p in SIZES:
            group = [r for r in rows if r.problem == problem and r.p == p]
            ref = next(r for r in group if r.method == "dargmin cg")
            for r in group:
                rel = abs(r.hypergrad - ref.hypergrad) / abs(ref.hypergrad)
                lines.append(
                    f"| {problem} | {p} | {r.n} | {r.method} | {r.compile_s:.2f} "
                    f"| {1e3 * r.call_s:.2f} | {1e3 * r.best_s:.2f} | {r.call_s / ref.call_s:.2f} "
                    f"| {r.temp_bytes / 2**20:.2f} | {rel:.1e} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    start = time.perf_counter()
    rows = run()
    table = markdown(rows)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(table)
    print()
    print(table)
    print(f"total {time.perf_counter() - start:.0f} s; written to {RESULTS}")


if __name__ == "__main__":
    main()
