"""Influence at network scale: accuracy and time of the approximations, memory vs size.

1. Accuracy: on a small over-parameterized MLP (softmax cross-entropy, L2 = damping), the
   train × query influence scores of Arnoldi (low rank), EK-FAC, K-FAC and LiSSA against the
   exact ones from the dense Hessian (Pearson correlation), and the time of fit + scores
   (second, warm run; the first includes compilation).
2. Memory: peak resident memory of an Arnoldi fit (Lanczos basis ``m × p``) against the
   parameter count, up to 10⁷ parameters, each size in a fresh subprocess (float32), next
   to the analytic ``(m + k + 2) · p`` numbers.
3. Peer: pyDVL's influence module (PyTorch) if importable; otherwise a note.

``DARGMIN_FAST=1`` runs tiny sizes (smoke test). Results: benchmarks/results/influence_at_scale.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

FAST = os.environ.get("DARGMIN_FAST") == "1"
RESULTS = Path(os.environ.get("DARGMIN_OUTPUT_DIR", Path(__file__).parent / "results"))


def _memory_worker(width: int, rank: int, iterations: int) -> None:
    """One Arnoldi fit on a 2-hidden-layer MLP of the given width; prints JSON."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from dargmin.influence import Arnoldi, Hessian

    inputs, classes, batch, batches = 256, 10, 32, 2
    model = eqx.nn.MLP(inputs, classes, width, 2, key=jax.random.PRNGKey(0))
    keys = jax.random.split(jax.random.PRNGKey(1), batches)
    loader = [
        {
            "x": jax.random.normal(k, (batch, inputs)),
            "y": jax.random.randint(k, (batch,), 0, classes),
        }
        for k in keys
    ]

    def loss(m: eqx.Module, b: dict) -> jax.Array:
        z = jax.vmap(m)(b["x"])
        picked = jnp.take_along_axis(z, b["y"][:, None], axis=1)[:, 0]
        return jnp.sum(jax.nn.logsumexp(z, axis=1) - picked)

    params = sum(x.size for x in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array)))
    jax.block_until_ready(loader)
    strategy = Arnoldi(rank=rank, num_iterations=iterations, damping=1e-3)
    # Warm-up on the same shapes, so that compilation's own memory is not counted.
    jax.block_until_ready(strategy.fit(Hessian(loss), model, loader).eigenvectors)
    page = os.sysconf("SC_PAGE_SIZE")

    def resident() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * page

    # The peak resident set during the fit, sampled every 2 ms (ru_maxrss is a high-water
    # mark of the whole process, import and compilation included).
    peak = [resident()]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident())
            time.sleep(0.002)

    before = resident()
    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    fitted = strategy.fit(Hessian(loss), model, loader)
    jax.block_until_ready(fitted.eigenvectors)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    after = peak[0]
    print(
        json.dumps(
            {
                "params": int(params),
                "seconds": seconds,
                "peak_before": before,
                "peak_after": after,
                "top": float(fitted.eigenvalues[0]),
                "steps": fitted.krylov_dimension,
            }
        )
    )


def accuracy_table() -> list[str]:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from dargmin.errors import DargminError
    from dargmin.influence import (
        EKFAC,
        KFAC,
        Arnoldi,
        ExactInverse,
        GaussNewton,
        Hessian,
        LiSSA,
        influence_scores,
    )

    jax.config.update("jax_enable_x64", True)
    n, d, width = (24, 3, 8) if FAST else (40, 5, 16)
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    x = jax.random.normal(keys[0], (n, d))
    y = (x @ jnp.linspace(-1.0, 1.0, d) + 0.5 * jax.random.normal(keys[1], (n,)) > 0).astype(int)
    queries = {"x": jax.random.normal(keys[3], (8, d)), "y": jnp.arange(8) % 2}

    def logits(m: eqx.Module, b: dict) -> jax.Array:
        return jax.vmap(m)(b["x"])

    def cross_entropy(z: jax.Array, b: dict) -> jax.Array:
        picked = jnp.take_along_axis(z, b["y"][:, None], axis=1)[:, 0]
        return jnp.sum(jax.nn.logsumexp(z, axis=1) - picked)

    def loss(m: eqx.Module, b: dict) -> jax.Array:
        return cross_entropy(logits(m, b), b)

    lines = [
        "## Accuracy and time on a small MLP",
        "",
        f"MLP {d}→{width}→2 (tanh), n = {n} training points, 8 queries, batches of "
        f"{n // 3}; trained by 300 L-BFGS steps on the loss + L2 = damping. Pearson correlation "
        "of the n × 8 score matrix with the exact one (dense Hessian + damping, Cholesky); "
        "time = fit + scores, warm (second) run, on a shared 2-core CPU.",
        "",
        "| damping | method | curvature | Pearson vs exact H | Pearson vs exact GN | time (s) "
        "| exact time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for damping in (1.0, 0.1) if not FAST else (1.0,):
        model = eqx.nn.MLP(d, 2, width, 1, activation=jnp.tanh, key=keys[2], dtype=jnp.float64)
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def objective(p: eqx.Module, damping: float = damping) -> jax.Array:
            penalty = sum(jnp.sum(leaf**2) for leaf in jax.tree_util.tree_leaves(p))
            return loss(eqx.combine(p, static), {"x": x, "y": y}) + 0.5 * damping * penalty

        opt = optax.lbfgs()
        vg = optax.value_and_grad_from_state(objective)

        def body(_: int, carry: tuple, objective=objective, vg=vg) -> tuple:
            p, s = carry
            v, g = vg(p, state=s)
            u, s = opt.update(g, s, p, value=v, grad=g, value_fn=objective)
            return optax.apply_updates(p, u), s

        params = jax.jit(lambda p, body=body: jax.lax.fori_loop(0, 300, body, (p, opt.init(p)))[0])(
            params
        )
        model = eqx.combine(params, static)
        loader = [{"x": x[i : i + n // 3], "y": y[i : i + n // 3]} for i in range(0, n, n // 3)]
        hessian, gauss_newton = Hessian(loss), GaussNewton(logits, cross_entropy)

        def run(strategy: object, curvature: object) -> tuple[np.ndarray, float]:
            influence_scores(strategy.fit(curvature, model, loader), loader, queries)  # warm-up
            start = time.perf_counter()
            scores = influence_scores(strategy.fit(curvature, model, loader), loader, queries)
            return np.asarray(scores).ravel(), time.perf_counter() - start

        exact_h, exact_time = run(ExactInverse(damping), hessian)
        exact_gn, _ = run(ExactInverse(damping), gauss_newton)
        p = int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(params)))
        methods = [
            (f"Arnoldi rank 10 (p = {p})", Arnoldi(rank=10, damping=damping), hessian, "H"),
            (f"Arnoldi rank 30 (p = {p})", Arnoldi(rank=30, damping=damping), hessian, "H"),
            ("EK-FAC", EKFAC(damping), gauss_newton, "GN"),
            ("K-FAC", KFAC(damping), gauss_newton, "GN"),
            ("EK-FAC", EKFAC(damping), hessian, "empirical Fisher"),
            ("LiSSA depth 1000", LiSSA(damping, depth=1000), hessian, "H"),
            ("exact GN", ExactInverse(damping), gauss_newton, "GN"),
        ]
        for name, strategy, curvature, label in methods:
            try:
                scores, seconds = run(strategy, curvature)
            except DargminError as error:  # a refusal (e.g. LiSSA diverged) is a result
                lines.append(f"| {damping} | {name} | {label} | refused: {error.reason} | | | |")
                continue
            corr_h = np.corrcoef(scores, exact_h)[0, 1]
            corr_gn = np.corrcoef(scores, exact_gn)[0, 1]
            lines.append(
                f"| {damping} | {name} | {label} | {corr_h:.3f} | {corr_gn:.3f} | "
                f"{seconds:.3f} | {exact_time:.3f} |"
            )
            print(lines[-1], flush=True)
    return lines


def memory_table() -> list[str]:
    widths = [32, 128] if FAST else [64, 300, 1000, 3000]
    rank, iterations = (4, 8) if FAST else (10, 20)
    lines = [
        "## Memory of an Arnoldi fit vs parameter count (CPU, float32)",
        "",
        f"MLP 256→w→w→10, 2 batches of 32, rank {rank}, {iterations} Lanczos steps; each size "
        "in a fresh subprocess after a warm-up fit (compilation excluded). Peak = growth of "
        "the resident set during the fit (sampled every 2 ms); analytic = (m + k + 2)·p·4 "
        "bytes (Lanczos basis, eigenvectors, two vectors in flight).",
        "",
        "| parameters | Lanczos steps | fit time (s) | peak growth (MB) | analytic (MB) | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for width in widths:
        out = subprocess.run(
            [sys.executable, __file__, "--memory-worker", str(width), str(rank), str(iterations)],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "JAX_ENABLE_X64": "0"},
        )
        if out.returncode != 0:
            lines.append(f"| width {width} | failed: {out.stderr.strip().splitlines()[-1]} |||||")
            continue
        result = json.loads(out.stdout.strip().splitlines()[-1])
        growth = (result["peak_after"] - result["peak_before"]) / 2**20
        analytic = (result["steps"] + rank + 2) * result["params"] * 4 / 2**20
        lines.append(
            f"| {result['params']:,} | {result['steps']} | {result['seconds']:.1f} | {growth:.0f} "
            f"| {analytic:.0f} | "
            f"{growth / analytic:.2f} |"
        )
        print(lines[-1], flush=True)
    return lines


def peer_lines() -> list[str]:
    try:
        import pydvl  # noqa: F401
    except ImportError:
        return [
            "## Peer: pyDVL",
            "",
            "Not run: pyDVL is not installed. `pip install pydvl` (0.10.0) would not pull a "
            "different torch but would downgrade numpy (to 1.26.4) and add pandas and cvxpy "
            "to the shared environment, so it was not installed.",
        ]
    return ["## Peer: pyDVL", "", "pyDVL is importable but the comparison is not written yet."]


def main() -> None:
    lines = ["# Influence at network scale", ""]
    if FAST:
        lines += ["(DARGMIN_FAST=1 smoke run: tiny sizes.)", ""]
    lines += [*accuracy_table(), "", *memory_table(), "", *peer_lines()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "influence_at_scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-worker":
        _memory_worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
