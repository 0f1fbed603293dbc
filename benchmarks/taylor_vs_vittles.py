"""Benchmark: Taylor series of an optimum — vittles vs nested jvp vs dargmin.TaylorExpansion.

Objective (vittles' seed case 1): ``f(x, θ) = ½ xᵀAx + mean(x − 0.5)⁵ · mean(θ − 0.5)⁵`` with
``A = RRᵀ + I`` (``R`` uniform), ``θ₀ = 0``, ``Δ = 0.1·U(0,1)^m``, sizes ``dim × hyperdim``.
For orders ``k = 1..4`` we time the directional derivatives ``x_1..x_k`` of ``x*(θ₀+tΔ)``:

(a) vittles 0.173 ``ParametricSensitivityTaylorExpansion.optimization_objective(...)`` then
    ``.evaluate_input_derivs(Δ, max_order=k)`` (autograd; run in its own virtual environment,
    ``benchmarks/.venv-vittles``, created on first use, because it needs numpy<2 and
    scipy<1.14), its Hessian passed in (the same matrix for everyone);
(b) nested ``jax.jvp`` (k levels) through a ``dargmin.argmin``-decorated solver, jitted (the
    k-th derivative only; the decorator re-forms and re-factorizes the Hessian at every level;
    above 200 unknowns its default CG solver is timed too and the faster one kept);
(c) ``dargmin.TaylorExpansion.derivatives(Δ, order=k)`` (Hessian factorized once at setup).

Times are medians over repeats on one thread (XLA and BLAS single-threaded), (b) and (c)
interleaved call by call so that background load hits both alike; compilation and
setup are reported separately. Results: ``benchmarks/results/taylor_vs_vittles.md``.

Run: ``python benchmarks/taylor_vs_vittles.py`` (full, a few minutes) or ``--quick``.
"""

from __future__ import annotations

import os

# Single-threaded before JAX / NumPy load their thread pools.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import dargmin
from dargmin.taylor import TaylorExpansion

jax.config.update("jax_enable_x64", True)

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-vittles"
RESULTS = HERE / "results" / "taylor_vs_vittles.md"
MAX_ORDER = 4
VITTLES_REQUIREMENTS = ("vittles==0.173", "numpy<2", "scipy<1.14", "autograd")

# The vittles half, run with the vittles venv's interpreter; it reads and writes files only.
VITTLES_WORKER = textwrap.dedent(
    """
    import json, sys, time
    import autograd.numpy as anp
    import numpy as np
    from vittles import ParametricSensitivityTaylorExpansion

    data = np.load(sys.argv[1])
    a, x0, theta0, delta, hess = (data[k] for k in ("a", "x0", "theta0", "delta", "hess"))
    max_order, budget = int(data["max_order"]), float(data["budget"])

    def objective(x, theta):
        return (0.5 * x @ a @ x
                + anp.mean(x - 0.5) ** 5 * anp.mean(theta - 0.5) ** 5)

    start = time.perf_counter()
    expansion = ParametricSensitivityTaylorExpansion.optimization_objective(
        objective, x0, theta0, order=max_order, hess0=hess)
    setup = time.perf_counter() - start
    times, derivs = {}, None
    for k in range(1, max_order + 1):
        samples, spent = [], 0.0
        while len(samples) < 3 or (spent < budget and len(samples) < 50):
            start = time.perf_counter()
            out = expansion.evaluate_input_derivs(delta, max_order=k)
            samples.append(time.perf_counter() - start)
            spent += samples[-1]
        times[k] = float(np.median(samples))
        derivs = out
    np.savez(sys.argv[2], *derivs)
    with open(sys.argv[3], "w") as fh:
        json.dump({"setup": setup, "times": times}, fh)
    """
)


def ensure_vittles_venv() -> Path:
    """Create ``benchmarks/.venv-vittles`` (python3.11, vittles 0.173) if it is missing."""
    python = VENV / "bin" / "python"
    if python.exists():
        return python
    print(f"creating {VENV} (vittles==0.173, numpy<2, scipy<1.14, autograd) ...", flush=True)
    subprocess.run(["python3.11", "-m", "venv", str(VENV)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", *VITTLES_REQUIREMENTS],
        check=True,
    )
    return python


def make_problem(dim: int, hyper: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    r = rng.uniform(size=(dim, dim))
    a_np = r @ r.T + np.eye(dim)
    a = jnp.asarray(a_np)

    def objective(x: jax.Array, theta: jax.Array) -> jax.Array:
        return 0.5 * x @ a @ x + jnp.mean(x - 0.5) ** 5 * jnp.mean(theta - 0.5) ** 5

    theta0 = jnp.zeros(hyper)
    grad = jax.jit(jax.grad(objective))
    hess = jax.jit(jax.hessian(objective))
    x0 = jnp.zeros(dim)
    for _ in range(30):  # Newton to machine precision (the quintic term is a small push)
        x0 = x0 - jnp.linalg.solve(hess(x0, theta0), grad(x0, theta0))
    delta = jnp.asarray(0.1 * rng.uniform(size=hyper))
    return a_np, objective, x0, theta0, delta, np.asarray(hess(x0, theta0))


def median_times(
    fns: dict, budget: float, min_repeats: int = 7, max_repeats: int = 300
) -> dict[str, float]:
    """Median wall time of each function, the functions called in turn (interleaved).

    Interleaving exposes every method to the same background load (this machine is shared),
    so that the ratios stay meaningful even when the absolute times drift.
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    spent = 0.0
    while len(samples[next(iter(fns))]) < min_repeats or (
        spent < budget * len(fns) and len(samples[next(iter(fns))]) < max_repeats
    ):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            samples[name].append(time.perf_counter() - start)
            spent += samples[name][-1]
    return {name: float(np.median(s)) for name, s in samples.items()}


def nested_jvp_fn(objective, order: int, linear_solver: str = "auto"):
    """Jitted ``(x0, θ0, Δ) ↦ d^k/dt^k x*(θ0+tΔ)`` by k nested jvp through dargmin.argmin."""

    # No checks: the fastest nested baseline.
    @dargmin.argmin(objective, check="ignore", linear_solver=linear_solver)
    def solver(init: jax.Array, theta: jax.Array) -> jax.Array:
        return init  # x0 is the exact solution at θ0, the only point evaluated

    def kth(x0, theta0, delta):
        fn = lambda t: solver(x0, theta0 + t * delta)  # noqa: E731
        for _ in range(order):
            fn = (lambda f: lambda t: jax.jvp(f, (t,), (jnp.ones_like(t),))[1])(fn)
        return fn(jnp.zeros((), delta.dtype))

    return jax.jit(kth)


def run_size(dim: int, hyper: int, vittles_python: Path | None, budget: float) -> dict:
    a_np, objective, x0, theta0, delta, hess = make_problem(dim, hyper)
    out: dict = {"size": f"{dim}×{hyper}", "dim": dim, "hyper": hyper}

    start = time.perf_counter()
    te = TaylorExpansion(objective, x0, theta0, order=MAX_ORDER)
    out["dargmin_setup"] = time.perf_counter() - start
    out["dargmin"], out["dargmin_compile"], out["nested"], out["nested_compile"] = {}, {}, {}, {}
    out["nested_solver"] = {}
    ours: list = []
    nested_vals: dict[int, np.ndarray] = {}
    for k in range(1, MAX_ORDER + 1):
        start = time.perf_counter()
        ours = jax.block_until_ready(te.derivatives(delta, order=k))
        out["dargmin_compile"][k] = time.perf_counter() - start

        # dargmin.argmin's "auto" solver is dense up to 200 unknowns and CG beyond; above
        # 200 both are timed and the faster one is the baseline (CG is faster at order 1,
        # dense Cholesky at higher orders; CG is accurate to its 1e-8-ish tolerance only).
        solvers = ["auto"] if dim <= 200 else ["cholesky", "auto"]
        fns = {}
        for name in solvers:
            fns[name] = nested_jvp_fn(objective, k, name)
            start = time.perf_counter()
            value = np.asarray(jax.block_until_ready(fns[name](x0, theta0, delta)))
            if name == solvers[0]:
                nested_vals[k] = value
                out["nested_compile"][k] = time.perf_counter() - start
        # Same protocol for all: compiled once, same device-resident inputs, public call
        # (dargmin's includes its small Python wrapper), result blocked on; interleaved.
        times = median_times(
            {"dargmin": lambda k=k: te.derivatives(delta, order=k)}
            | {name: (lambda fn=fn: fn(x0, theta0, delta)) for name, fn in fns.items()},
            budget,
        )
        out["dargmin"][k] = times["dargmin"]
        best = min(solvers, key=lambda name: times[name])
        out["nested"][k], out["nested_solver"][k] = times[best], best
    ours_np = [np.asarray(v) for v in ours]

    def rel(p: np.ndarray, q: np.ndarray) -> float:
        return float(np.linalg.norm(p - q) / np.linalg.norm(q))

    out["err_nested"] = max(rel(nested_vals[k], ours_np[k - 1]) for k in nested_vals)

    if vittles_python is not None:
        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp)
            (tmp_path / "worker.py").write_text(VITTLES_WORKER)
            np.savez(
                tmp_path / "in.npz",
                a=a_np,
                x0=np.asarray(x0),
                theta0=np.asarray(theta0),
                delta=np.asarray(delta),
                hess=hess,
                max_order=MAX_ORDER,
                budget=budget,
            )
            subprocess.run(
                [str(vittles_python), str(tmp_path / "worker.py")]
                + [str(tmp_path / name) for name in ("in.npz", "derivs.npz", "times.json")],
                check=True,
                env=os.environ.copy(),
            )
            result = json.loads((tmp_path / "times.json").read_text())
            with np.load(tmp_path / "derivs.npz") as data:
                theirs = [data[f"arr_{i}"] for i in range(MAX_ORDER)]
        out["vittles_setup"] = result["setup"]
        out["vittles"] = {int(k): v for k, v in result["times"].items()}
        out["err_vittles"] = max(rel(t, o) for t, o in zip(theirs, ours_np, strict=True))
    return out


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def render(results: list[dict]) -> str:
    lines = [
        "# Taylor expansion of an optimum: vittles vs nested jvp vs dargmin",
        "",
        f"Generated by `benchmarks/taylor_vs_vittles.py` on {platform.processor() or 'CPU'} "
        f"({platform.python_version()}, jax {jax.__version__}), single-threaded XLA/BLAS.",
        "Objective: `½ xᵀAx + mean(x−0.5)⁵·mean(θ−0.5)⁵`, `A = RRᵀ + I`, `θ₀ = 0`, "
        "`Δ = 0.1·U(0,1)`. Times in ms, median over repeats, excluding compilation/setup;",
        "'order k' = all derivatives `x_1..x_k` (vittles, dargmin) or the k-th only (nested).",
        "dargmin and nested jvp are timed interleaved in one process (shared, loaded machine: "
        "absolute times drift, ratios less); vittles runs afterwards in its own process.",
        "Nested jvp: dense Cholesky re-formed and re-factorized at every level (dargmin.argmin's "
        "default up to 200 unknowns); at 1000 unknowns also its default CG, and the faster of "
        "the two is shown ('(CG)' marks CG: faster at order 1, accurate to ~1e-8 only).",
        "",
        "| size | order | vittles | nested jvp | dargmin | vittles/dargmin | nested/dargmin |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for k in range(1, MAX_ORDER + 1):
            ours = res["dargmin"][k]
            vit = res.get("vittles", {}).get(k)
            cg = res["nested_solver"][k] == "auto" and res["dim"] > 200
            lines.append(
                f"| {res['size']} | {k} | {fmt_ms(vit) if vit else '—'} | "
                f"{fmt_ms(res['nested'][k])}{' (CG)' if cg else ''} | {fmt_ms(ours)} | "
                f"{f'{vit / ours:.0f}×' if vit else '—'} | {res['nested'][k] / ours:.1f}× |"
            )
    lines += [
        "",
        "Setup and compilation (ms): dargmin setup = Hessian + factorization + stationarity "
        "check (incl. its compilation); compile = first call of each order; vittles setup = "
        "building the expansion with the Hessian given; agreement = max relative difference "
        "from dargmin over orders 1..4.",
        "",
        "| size | dargmin setup | dargmin compile (k=1..4) | nested compile (k=1..4) "
        "| vittles setup | rel. diff vittles | rel. diff nested |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in results:
        comp = " / ".join(fmt_ms(res["dargmin_compile"][k]) for k in range(1, MAX_ORDER + 1))
        ncomp = " / ".join(fmt_ms(res["nested_compile"][k]) for k in range(1, MAX_ORDER + 1))
        vset = fmt_ms(res["vittles_setup"]) if "vittles_setup" in res else "—"
        verr = f"{res['err_vittles']:.1e}" if "err_vittles" in res else "—"
        lines.append(
            f"| {res['size']} | {fmt_ms(res['dargmin_setup'])} | {comp} | {ncomp} | {vset} | "
            f"{verr} | {res['err_nested']:.1e} |"
        )
    lines += ["", "Marginal cost of order k (dargmin, ms): t(k) − t(k−1).", ""]
    lines += ["| size | k=2 | k=3 | k=4 |", "|---|---|---|---|"]
    for res in results:
        marg = [res["dargmin"][k] - res["dargmin"][k - 1] for k in range(2, MAX_ORDER + 1)]
        lines.append(f"| {res['size']} | " + " | ".join(fmt_ms(m) for m in marg) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes 4×3 and 50×5 only")
    parser.add_argument("--no-vittles", action="store_true", help="skip the vittles part")
    parser.add_argument("--budget", type=float, default=None, help="seconds per timing")
    args = parser.parse_args()
    sizes = [(4, 3), (50, 5)] if args.quick else [(4, 3), (50, 5), (200, 10), (1000, 20)]
    budget = args.budget if args.budget is not None else (0.3 if args.quick else 1.0)
    vittles_python = None if args.no_vittles else ensure_vittles_venv()
    results = []
    for dim, hyper in sizes:
        print(f"size {dim}×{hyper} ...", flush=True)
        res = run_size(dim, hyper, vittles_python, budget)
        for key in ("err_vittles", "err_nested"):
            if key in res and not res[key] <= 1e-8:
                print(f"  WARNING: {key} = {res[key]:.2e} > 1e-8", flush=True)
        results.append(res)
    table = render(results)
    print(table)
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(table)
        print(f"saved {RESULTS}")
    else:
        quick = RESULTS.with_name("taylor_vs_vittles_quick.md")
        quick.write_text(table)
        print(f"saved {quick}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
