"""Weak scaling of a sharded hypergradient: 1, 2, 4, 8 devices, rows per device fixed.

The held-out hypergradient of an L2 logistic regression through ``dargmin.argmin`` (inner
solver: Newton's method; derivative: CG on Hessian-vector products), with the training rows
sharded over the devices. Each device count runs in its own process (the count is fixed
when JAX starts); on a CPU-only machine the devices are simulated
(``--xla_force_host_platform_device_count``) and share the same cores, so the table shows
what stays flat — the memory per device and the communication per call — not speed. On a
machine with several GPUs the same script (``--platform gpu``) measures real scaling.

Per device count: time per hypergradient (median of repeats), the compiled program's
memory per device (arguments + temporaries, from ``memory_analysis()``), the number of
all-reduces and the bytes they move per call (from the HLO), and whether anything gathers
the data. Writes ``benchmarks/results/scale.md``.

Run: ``python benchmarks/scale.py [--devices 1 2 4 8] [--rows-per-device 50000]``;
``DARGMIN_FAST=1``: small sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

FAST = os.environ.get("DARGMIN_FAST", "") not in ("", "0")
RESULTS = Path(__file__).parent / "results" / "scale.md"
FEATURES = 50
NEWTON_STEPS = 10


def worker(rows_per_device: int, repeats: int) -> dict:
    """Runs inside a process whose device count is already set."""
    import statistics
    import time

    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import dargmin

    devices = jax.devices()
    n = rows_per_device * len(devices)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, FEATURES)) / np.sqrt(FEATURES)
    y = np.where(x @ rng.standard_normal(FEATURES) * 3 + rng.standard_normal(n) > 0, 1.0, -1.0)
    xv = rng.standard_normal((1000, FEATURES)) / np.sqrt(FEATURES)
    yv = np.where(xv[:, 0] > 0, 1.0, -1.0)
    mesh = Mesh(np.array(devices), ("rows",))
    xs = jax.device_put(x, NamedSharding(mesh, P("rows", None)))
    ys = jax.device_put(y, NamedSharding(mesh, P("rows")))

    def objective(w, lam, x, y):
        return jnp.mean(jnp.logaddexp(0.0, -y * (x @ w))) + 0.5 * lam * jnp.sum(w**2)

    @dargmin.argmin(objective, linear_solver="cg")
    def fit(init, lam, x, y):
        def step(w, _):
            g = jax.grad(objective)(w, lam, x, y)
            return w - jnp.linalg.solve(jax.hessian(objective)(w, lam, x, y), g), None

        return jax.lax.scan(step, init, length=NEWTON_STEPS)[0]

    def held_out(lam, x, y):
        w = fit(jnp.zeros(FEATURES), lam, x, y)
        return jnp.mean(jnp.logaddexp(0.0, -yv * (xv @ w)))

    fn = jax.jit(jax.grad(held_out))
    lam = jnp.asarray(1e-2)
    compiled = fn.lower(lam, xs, ys).compile()
    value = float(fn(lam, xs, ys))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(lam, xs, ys).block_until_ready()
        times.append(time.perf_counter() - start)
    hlo = compiled.as_text()
    reduce_bytes = 0
    reduces = 0
    gathers = 0
    for line in hlo.splitlines():
        if "=" not in line:
            continue
        if "all-reduce(" in line or "all-reduce-start(" in line:
            reduces += 1
            for dtype, dims in re.findall(
                r"(f64|f32|s32|pred)\[([\d,]*)\]", line.split("=")[1][:80]
            ):
                size = 1
                for d in filter(None, dims.split(",")):
                    size *= int(d)
                reduce_bytes += size * (8 if dtype == "f64" else 4)
        if "all-gather" in line and str(n) in line:
            gathers += 1
    unsharded = float(fn(lam, jnp.asarray(x), jnp.asarray(y)))
    memory = compiled.memory_analysis()
    per_device = (memory.argument_size_in_bytes + memory.temp_size_in_bytes) if memory else -1
    return {
        "devices": len(devices),
        "rows": n,
        "time_s": statistics.median(times),
        "memory_per_device_bytes": per_device,
        "all_reduces_in_program": reduces,
        "all_reduce_bytes_static": reduce_bytes,
        "gathers_of_data": gathers,
        "hypergradient": value,
        "relative_difference_to_unsharded": abs(value - unsharded) / abs(unsharded),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rows-per-device", type=int, default=2_000 if FAST else 50_000)
    parser.add_argument("--repeats", type=int, default=3 if FAST else 7)
    parser.add_argument("--platform", default="cpu", help="cpu (simulated devices) or gpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        json.dump(worker(args.rows_per_device, args.repeats), sys.stdout)
        return
    rows = []
    for count in args.devices:
        env = dict(os.environ)
        if args.platform == "cpu":
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={count}"
            env["JAX_PLATFORMS"] = "cpu"
        else:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(count))
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--rows-per-device",
            str(args.rows_per_device),
            "--repeats",
            str(args.repeats),
        ]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if run.returncode != 0:
            raise SystemExit(run.stderr[-3000:])
        result = json.loads(run.stdout)
        rows.append(result)
        print(
            f"devices {result['devices']}: rows {result['rows']:>8}  "
            f"time {result['time_s'] * 1e3:9.1f} ms  "
            f"memory/device {result['memory_per_device_bytes'] / 2**20:8.2f} MiB  "
            f"all-reduces {result['all_reduces_in_program']:3d} "
            f"({result['all_reduce_bytes_static']} B each call, static)  "
            f"data gathers {result['gathers_of_data']}  "
            f"dL/dλ {result['hypergradient']:+.10e}"
        )
    spread = max(r["relative_difference_to_unsharded"] for r in rows)
    print(f"max relative difference, sharded vs the same data on one device: {spread:.1e}")
    lines = [
        "# Weak scaling of a sharded hypergradient (dargmin.argmin, CG)",
        "",
        f"Machine: {platform.machine()}, platform {args.platform}"
        + (
            " (simulated devices sharing the same cores: memory and communication are the "
            "point, not time)"
            if args.platform == "cpu"
            else ""
        )
        + f"; L2 logistic regression, {FEATURES} features, {args.rows_per_device} rows per "
        f"device, Newton inner solver ({NEWTON_STEPS} steps), float64.",
        "",
        "| devices | rows | time per hypergradient (ms) | memory per device (MiB) | "
        "all-reduces in program | their static payload (bytes) | all-gathers of data |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['devices']} | {r['rows']} | {r['time_s'] * 1e3:.1f} | "
            f"{r['memory_per_device_bytes'] / 2**20:.2f} | {r['all_reduces_in_program']} | "
            f"{r['all_reduce_bytes_static']} | {r['gathers_of_data']} |"
        )
    lines += [
        "",
        f"Sharded hypergradients equal the same computation on one device to {spread:.1e} "
        "(relative), at every device count.",
    ]
    output = Path(os.environ.get("DARGMIN_OUTPUT_DIR", "")) / "scale.md" if FAST else RESULTS
    if FAST and not os.environ.get("DARGMIN_OUTPUT_DIR"):
        return
    output.write_text("\n".join(lines) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
