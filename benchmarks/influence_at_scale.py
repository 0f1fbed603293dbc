"""Influence at network scale: accuracy and time of the approximations, memory vs size.

1. Accuracy: on a small over-parameterized MLP (softmax cross-entropy, L2 = damping), the
   train × query influence scores of Arnoldi (low rank), EK-FAC, K-FAC, EK-FAC-preconditioned
   CG and LiSSA against the exact ones from the dense Hessian and the dense Gauss–Newton
   matrix (Pearson correlation), with the exact block-diagonal inverse as the ceiling of
   per-layer methods, and the time of fit + scores (second, warm run; the first includes
   compilation).
2. Convolutions: the same on a small CNN trained on sklearn's digits (KFC factors for the
   ``Conv2d`` layers), then against retraining: refits without single examples and without
   random subsets, correlation of predicted and actual query-loss changes and the linear
   datamodeling score.
3. Memory: peak resident memory of an Arnoldi fit (Lanczos basis ``m × p``) against the
   parameter count, up to 10⁷ parameters, each size in a fresh subprocess (float32), next
   to the analytic ``(m + k + 2) · p`` numbers.
4. Peer: pyDVL's influence module (PyTorch) if importable (see ``_PEER_NOTE`` for how it
   installs): its exact, CG, Arnoldi and EK-FAC influences on the MLP of part 1, accuracy
   vs the exact scores and time, interleaved with dargmin's. ``--peer-only`` reruns this
   part alone and replaces its section of the results.

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
from typing import Any

FAST = os.environ.get("DARGMIN_FAST") == "1"
# `--peer-only`: rerun the pyDVL comparison alone and replace that section of the results.
PEER_ONLY = "--peer-only" in sys.argv
REFIT_STEPS = 1500
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


def _train_lbfgs(objective: Any, params: Any, steps: int) -> Any:
    """``steps`` L-BFGS iterations on ``objective`` (one compiled loop)."""
    import jax
    import optax

    optimizer = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def body(_: int, carry: tuple) -> tuple:
        p, state = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = optimizer.update(
            grad, state, p, value=value, grad=grad, value_fn=objective
        )
        return optax.apply_updates(p, updates), state

    return jax.jit(lambda p: jax.lax.fori_loop(0, steps, body, (p, optimizer.init(p)))[0])(params)


def _block_diagonal(exact: Any, model: Any) -> Any:
    """The exact inverse of the layer-block-diagonal part of ``exact``'s matrix: the best
    any per-layer (block-diagonal) method such as K-FAC/EK-FAC can do."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from dargmin.influence import ExactInverseCurvature
    from dargmin.influence._kfac import _layers

    sizes = [
        sum(leaf.size for leaf in jax.tree_util.tree_leaves(eqx.filter(layer, eqx.is_array)))
        for layer in _layers(model)
    ]
    mask = jnp.zeros_like(exact.matrix)
    start = 0
    for size in sizes:  # a layer's arrays are contiguous in the flat vector
        mask = mask.at[start : start + size, start : start + size].set(1.0)
        start += size
    return ExactInverseCurvature(exact.problem, exact.damping, exact.matrix * mask)


def _pearsons(scores: Any, reference: Any) -> tuple[float, float]:
    """Pearson over all train × query entries, and the mean of the per-query Pearsons."""
    import numpy as np

    scores, reference = np.asarray(scores), np.asarray(reference)
    overall = float(np.corrcoef(scores.ravel(), reference.ravel())[0, 1])
    per_query = [np.corrcoef(scores[:, j], reference[:, j])[0, 1] for j in range(scores.shape[1])]
    return overall, float(np.mean(per_query))


def _comparison_rows(
    methods: list[tuple[str, Any, Any, str]],
    model: Any,
    loader: Any,
    queries: Any,
    exact_h: Any,
    exact_gn: Any,
    prefix: str,
) -> list[str]:
    """One markdown row per method: Pearson vs exact H and GN scores, and the time."""
    import jax

    from dargmin.errors import DargminError
    from dargmin.influence import influence_scores

    rows = []
    for name, strategy, curvature, label in methods:
        try:
            if hasattr(strategy, "fit"):
                influence_scores(strategy.fit(curvature, model, loader), loader, queries)
                start = time.perf_counter()
                scores = influence_scores(strategy.fit(curvature, model, loader), loader, queries)
            else:  # an already fitted inverse (the block-diagonal reference)
                start = time.perf_counter()
                scores = influence_scores(strategy, loader, queries)
            jax.block_until_ready(scores)
            seconds = time.perf_counter() - start
        except DargminError as error:  # a refusal (e.g. LiSSA diverged) is a result
            rows.append(f"| {prefix} | {name} | {label} | refused: {error.reason} | | | |")
            continue
        vs_h, _ = _pearsons(scores, exact_h)
        vs_gn, per_query_gn = _pearsons(scores, exact_gn)
        rows.append(
            f"| {prefix} | {name} | {label} | {vs_h:.3f} | {vs_gn:.3f} | {per_query_gn:.3f} | "
            f"{seconds:.3f} |"
        )
        print(rows[-1], flush=True)
    return rows


_COLUMNS = [
    "| damping | method | curvature | Pearson vs exact H | Pearson vs exact GN | "
    "mean per-query Pearson vs exact GN | time (s) |",
    "|---|---|---|---|---|---|---|",
]


def accuracy_table() -> list[str]:
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from dargmin.influence import (
        EKFAC,
        KFAC,
        Arnoldi,
        ExactInverse,
        GaussNewton,
        Hessian,
        LiSSA,
        PreconditionedCG,
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
        "of the n × 8 score matrix with the exact one (dense Hessian H or Gauss–Newton GN + "
        "damping, Cholesky), and the mean over the 8 queries of the per-query Pearson over the "
        "n training points; time = fit + scores, warm (second) run, on a shared 2-core CPU. "
        "K-FAC/EK-FAC approximate GN (the Fisher for softmax cross-entropy), so their yardstick "
        "is the 'vs exact GN' column; 'block-diagonal exact GN' is the exact inverse of the "
        "per-layer blocks of GN, the best any per-layer method can do. 'EK-FAC + PCG k' is "
        "`PreconditionedCG(EKFAC(damping), steps=k)` on GN: k more passes over the data per "
        "solve.",
        "",
        *_COLUMNS,
    ]
    for damping in (1.0, 0.1) if not FAST else (1.0,):
        model = eqx.nn.MLP(d, 2, width, 1, activation=jnp.tanh, key=keys[2], dtype=jnp.float64)
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def objective(p: eqx.Module, damping: float = damping) -> jax.Array:
            penalty = sum(jnp.sum(leaf**2) for leaf in jax.tree_util.tree_leaves(p))
            return loss(eqx.combine(p, static), {"x": x, "y": y}) + 0.5 * damping * penalty

        model = eqx.combine(_train_lbfgs(objective, params, 300), static)
        loader = [{"x": x[i : i + n // 3], "y": y[i : i + n // 3]} for i in range(0, n, n // 3)]
        hessian, gauss_newton = Hessian(loss), GaussNewton(logits, cross_entropy)
        exact_gn_inverse = ExactInverse(damping).fit(gauss_newton, model, loader)
        exact_h = influence_scores(
            ExactInverse(damping).fit(hessian, model, loader), loader, queries
        )
        exact_gn = influence_scores(exact_gn_inverse, loader, queries)
        p = int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(params)))
        methods = [
            ("exact H", ExactInverse(damping), hessian, "H"),
            ("exact GN", ExactInverse(damping), gauss_newton, "GN"),
            (f"Arnoldi rank 10 (p = {p})", Arnoldi(rank=10, damping=damping), hessian, "H"),
            (f"Arnoldi rank 30 (p = {p})", Arnoldi(rank=30, damping=damping), hessian, "H"),
            ("block-diagonal exact GN", _block_diagonal(exact_gn_inverse, model), None, "GN"),
            ("EK-FAC", EKFAC(damping), gauss_newton, "GN"),
            ("K-FAC", KFAC(damping), gauss_newton, "GN"),
            ("EK-FAC", EKFAC(damping), hessian, "empirical Fisher"),
            ("EK-FAC + PCG 2", PreconditionedCG(EKFAC(damping), steps=2), gauss_newton, "GN"),
            ("EK-FAC + PCG 4", PreconditionedCG(EKFAC(damping), steps=4), gauss_newton, "GN"),
            ("EK-FAC + PCG 8", PreconditionedCG(EKFAC(damping), steps=8), gauss_newton, "GN"),
            ("LiSSA depth 1000", LiSSA(damping, depth=1000), hessian, "H"),
        ]
        if not PEER_ONLY:
            lines += _comparison_rows(
                methods, model, loader, queries, exact_h, exact_gn, prefix=str(damping)
            )
        if _pydvl_importable():
            exact = {"h": exact_h, "gn": exact_gn, "loss": loss, "logits": logits}
            exact["cross_entropy"] = cross_entropy
            _PEER_ROWS.extend(peer_rows(model, x, y, loader, queries, damping, exact))
    return lines


def _pydvl_importable() -> bool:
    try:
        import pydvl  # noqa: F401
    except ImportError:
        return False
    return True


def cnn_tables() -> list[str]:
    """EK-FAC/KFC on a small CNN on real data (sklearn digits): against exact influence,
    and against retraining without single examples and without random subsets."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from scipy.stats import spearmanr
    from sklearn.datasets import load_digits

    from dargmin.errors import DargminError
    from dargmin.influence import (
        EKFAC,
        KFAC,
        Arnoldi,
        ExactInverse,
        GaussNewton,
        Hessian,
        PreconditionedCG,
        influence_scores,
    )

    jax.config.update("jax_enable_x64", True)
    n, num_queries, damping = (60, 6, 1.0) if FAST else (200, 20, 1.0)
    removals, subset_size = (4, 5) if FAST else (30, 10)
    digits = load_digits()
    images, labels = jnp.asarray(digits.images[:, None] / 16.0), jnp.asarray(digits.target)
    train = {"x": images[:n], "y": labels[:n]}
    queries = {"x": images[-num_queries:], "y": labels[-num_queries:]}

    class CNN(eqx.Module):
        first: eqx.nn.Conv2d
        second: eqx.nn.Conv2d
        head: eqx.nn.Linear

        def __init__(self, key: jax.Array) -> None:
            k1, k2, k3 = jax.random.split(key, 3)
            self.first = eqx.nn.Conv2d(1, 3, 3, stride=2, padding=1, key=k1, dtype=jnp.float64)
            self.second = eqx.nn.Conv2d(3, 4, 3, stride=2, padding=1, key=k2, dtype=jnp.float64)
            self.head = eqx.nn.Linear(16, 10, key=k3, dtype=jnp.float64)

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.head(jnp.tanh(self.second(jnp.tanh(self.first(x)))).ravel())

    def logits(m: eqx.Module, b: dict) -> jax.Array:
        return jax.vmap(m)(b["x"])

    def example_losses(z: jax.Array, b: dict) -> jax.Array:
        return jax.nn.logsumexp(z, axis=1) - jnp.take_along_axis(z, b["y"][:, None], axis=1)[:, 0]

    def cross_entropy(z: jax.Array, b: dict) -> jax.Array:
        return jnp.sum(example_losses(z, b))

    def loss(m: eqx.Module, b: dict) -> jax.Array:
        return cross_entropy(logits(m, b), b)

    model = CNN(jax.random.PRNGKey(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def objective(p: eqx.Module, weights: jax.Array) -> jax.Array:
        penalty = sum(jnp.sum(leaf**2) for leaf in jax.tree_util.tree_leaves(p))
        z = logits(eqx.combine(p, static), train)
        return weights @ example_losses(z, train) + 0.5 * damping * penalty

    full = jnp.ones(n)
    params = _train_lbfgs(lambda p: objective(p, full), params, 1000)
    gradient_norm = float(optax.tree.norm(jax.grad(objective)(params, full)))
    model = eqx.combine(params, static)
    size = int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(params)))
    loader = [{k: v[i : i + 50] for k, v in train.items()} for i in range(0, n, 50)]
    hessian, gauss_newton = Hessian(loss), GaussNewton(logits, cross_entropy)
    exact_gn_inverse = ExactInverse(damping).fit(gauss_newton, model, loader)
    exact_h = influence_scores(ExactInverse(damping).fit(hessian, model, loader), loader, queries)
    exact_gn = influence_scores(exact_gn_inverse, loader, queries)
    methods = [
        ("exact H", ExactInverse(damping), hessian, "H"),
        ("exact GN", ExactInverse(damping), gauss_newton, "GN"),
        ("Arnoldi rank 30", Arnoldi(rank=30, damping=damping), hessian, "H"),
        ("block-diagonal exact GN", _block_diagonal(exact_gn_inverse, model), None, "GN"),
        ("EK-FAC (KFC)", EKFAC(damping), gauss_newton, "GN"),
        ("K-FAC (KFC)", KFAC(damping), gauss_newton, "GN"),
        ("EK-FAC (KFC)", EKFAC(damping), hessian, "empirical Fisher"),
        ("EK-FAC + PCG 4", PreconditionedCG(EKFAC(damping), steps=4), gauss_newton, "GN"),
        ("EK-FAC + PCG 10", PreconditionedCG(EKFAC(damping), steps=10), gauss_newton, "GN"),
        # CG on the Hessian itself, preconditioned by EK-FAC on the empirical Fisher.
        ("EK-FAC + PCG 10", PreconditionedCG(EKFAC(damping), steps=10), hessian, "H"),
    ]
    lines = [
        "## Convolutions (KFC) on a small CNN, real data",
        "",
        f"sklearn digits (8×8, 10 classes), n = {n} training images, {num_queries} held-out "
        "queries; CNN Conv2d(1→3, 3×3, stride 2, pad 1) → tanh → Conv2d(3→4, 3×3, stride 2, "
        f"pad 1) → tanh → Linear(16→10), p = {size}; softmax cross-entropy + L2 = damping "
        f"{damping}, 1000 L-BFGS steps (gradient norm {gradient_norm:.1e}); batches of 50. "
        "Columns as above.",
        "",
        *_COLUMNS,
        *_comparison_rows(methods, model, loader, queries, exact_h, exact_gn, str(damping)),
    ]

    # Retraining ground truth: warm-started L-BFGS on the objective without the removed
    # examples (weights 0), to the same tolerance, vmapped over the removals.
    rng = np.random.default_rng(0)
    singles = rng.choice(n, size=removals, replace=False)
    subsets = np.stack([rng.choice(n, size=subset_size, replace=False) for _ in range(removals)])
    masks = np.ones((2 * removals, n))
    masks[np.arange(removals), singles] = 0.0
    for row, subset in enumerate(subsets):
        masks[removals + row, subset] = 0.0

    @jax.jit
    def retrain(weights: jax.Array) -> tuple[jax.Array, jax.Array]:
        refit = _train_lbfgs(lambda p: objective(p, weights), params, REFIT_STEPS)
        query_losses = example_losses(logits(eqx.combine(refit, static), queries), queries)
        return query_losses, optax.tree.norm(jax.grad(objective)(refit, weights))

    # One compiled refit applied mask by mask: a vmap over the masks (batched line-search
    # loops and convolution kernels) had not finished after 20 minutes on the shared CPU.
    start = time.perf_counter()
    results = [retrain(jnp.asarray(mask)) for mask in masks]
    refit_losses = jnp.stack([losses for losses, _ in results])
    refit_norms = jnp.stack([norm for _, norm in results])
    retrain_seconds = time.perf_counter() - start
    base = example_losses(logits(model, queries), queries)
    actual = np.asarray(refit_losses - base)  # (2 · removals, queries)
    lines += [
        "",
        "### Against retraining (the ground truth)",
        "",
        f"{removals} single training images removed (chosen at random) and {removals} random "
        f"subsets of {subset_size} removed; each refit by {REFIT_STEPS} L-BFGS steps warm-started "
        f"at the fitted model (final gradient norm: median "
        f"{float(jnp.median(refit_norms)):.1e}, largest {float(jnp.max(refit_norms)):.1e}; "
        f"{2 * removals} refits in {retrain_seconds:.0f} s). Predicted change of query loss "
        "j = −Σ_{i removed} score_ij. 'Pearson' is over all (removal, query) pairs; 'LDS' "
        "(linear datamodeling score) is the Spearman correlation over the subsets of the "
        "predicted and actual change, averaged over the queries.",
        "",
        "| method | curvature | Pearson, single removals | Pearson, subsets | LDS (subsets) |",
        "|---|---|---|---|---|",
    ]
    removal_matrix = jnp.asarray(1.0 - masks)  # (2 · removals, n)
    for name, strategy, curvature, label in methods:
        fitted = (
            strategy if not hasattr(strategy, "fit") else strategy.fit(curvature, model, loader)
        )
        try:
            scores = influence_scores(fitted, loader, queries)
        except DargminError as error:  # e.g. CG on an indefinite Hessian
            lines.append(f"| {name} | {label} | refused: {error.reason} | | |")
            continue
        predicted = np.asarray(-(removal_matrix @ scores))
        single = np.corrcoef(predicted[:removals].ravel(), actual[:removals].ravel())[0, 1]
        group = np.corrcoef(predicted[removals:].ravel(), actual[removals:].ravel())[0, 1]
        lds = np.mean(
            [
                spearmanr(predicted[removals:, j], actual[removals:, j]).statistic
                for j in range(num_queries)
            ]
        )
        lines.append(f"| {name} | {label} | {single:.3f} | {group:.3f} | {lds:.3f} |")
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


_PEER_NOTE = (
    "pyDVL 0.10.0 cannot be installed next to dargmin with `pip install pydvl`: it pins "
    "`numpy<2` while jax 0.10.2 requires `numpy>=2.0`, so pip would downgrade numpy to "
    "1.26.4 (and add pandas, cvxpy, numcodecs<0.16) and break JAX. Its influence module does "
    "run on numpy 2: installed with `pip install --no-deps --target DIR pydvl==0.10.0 "
    "pyDeprecate more-itertools` plus `pip install --target DIR 'dask[distributed]' zarr`, "
    "and put on `PYTHONPATH=DIR`."
)


def _torch_mlp(model: Any) -> Any:
    """The equinox MLP ``d → width → 2`` (tanh) as a float64 ``torch.nn.Sequential`` with
    the same weights."""
    import numpy as np
    import torch

    first, last = model.layers
    net = torch.nn.Sequential(
        torch.nn.Linear(first.in_features, first.out_features),
        torch.nn.Tanh(),
        torch.nn.Linear(last.in_features, last.out_features),
    ).double()
    with torch.no_grad():
        for layer, source in ((net[0], first), (net[2], last)):
            layer.weight.copy_(torch.from_numpy(np.array(source.weight)))
            layer.bias.copy_(torch.from_numpy(np.array(source.bias)))
    return net


def peer_rows(
    model: Any, x: Any, y: Any, loader: Any, queries: Any, damping: float, exact: dict
) -> list[str]:
    """pyDVL's influence methods next to dargmin's on the same trained MLP and data.

    pyDVL's Hessian is that of the MEAN loss, ``H/n``, plus its ``regularization`` r; dargmin's
    is the summed loss plus ``damping``, so ``r = damping / n`` gives the same inverse up to
    the factor ``n`` (Pearson does not see scale). Times are interleaved (dargmin, pyDVL,
    ×5) and the median is kept; fit + all n × 8 scores.
    """
    import jax
    import numpy as np
    import torch
    from pydvl.influence.torch import ArnoldiInfluence, CgInfluence, DirectInfluence, EkfacInfluence

    from dargmin.influence import (
        EKFAC,
        Arnoldi,
        ExactInverse,
        GaussNewton,
        Hessian,
        PreconditionedCG,
        influence_scores,
    )

    torch.set_num_threads(1)
    n = int(x.shape[0])
    net = _torch_mlp(model)
    data = torch.utils.data.TensorDataset(
        torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y)).long()
    )
    # pyDVL's Hessian-vector products average the batches' mean losses with equal weights,
    # so batches of unequal size change its matrix (measured: with dargmin's batches of
    # 13, 13, 13, 1 its CG scores correlate 0.045 with its own DirectInfluence, with equal
    # batches 1.000); it gets equal batches of n / 2.
    torch_loader = torch.utils.data.DataLoader(data, batch_size=n // 2)
    x_query = torch.from_numpy(np.array(queries["x"]))
    y_query = torch.from_numpy(np.array(queries["y"])).long()
    x_train, y_train = data.tensors
    loss = torch.nn.functional.cross_entropy
    r = damping / n
    hessian = Hessian(exact["loss"])
    gauss_newton = GaussNewton(exact["logits"], exact["cross_entropy"])
    pairs = [
        (
            "exact (Direct / ExactInverse on H)",
            lambda: DirectInfluence(net, loss, regularization=r),
            ExactInverse(damping),
            hessian,
        ),
        (
            "CG (pyDVL CgInfluence / dargmin EK-FAC + PCG 8 on H)",
            lambda: CgInfluence(net, loss, regularization=r, rtol=1e-10, atol=1e-12),
            PreconditionedCG(EKFAC(damping), steps=8),
            hessian,
        ),
        (
            "Arnoldi rank 10",
            lambda: ArnoldiInfluence(net, loss, regularization=r, rank=10),
            Arnoldi(rank=10, damping=damping),
            hessian,
        ),
        (
            "EK-FAC (GN; pyDVL in float32)",
            lambda model32: EkfacInfluence(model32, hessian_regularization=r),
            EKFAC(damping),
            gauss_newton,
        ),
    ]

    def ours(strategy: Any, curvature: Any) -> Any:
        scores = influence_scores(strategy.fit(curvature, model, loader), loader, queries)
        return np.asarray(jax.block_until_ready(scores))

    def theirs(make: Any) -> Any:
        influence = make().fit(torch_loader)
        # (n_queries, n_train) -> (n_train, n_queries), like dargmin's
        return influence.influences(x_query, y_query, x_train, y_train).detach().numpy().T

    def theirs_float32(make: Any) -> Any:
        # pyDVL 0.10's EK-FAC builds float32 factors internally and fails on a float64
        # model ("expected scalar type Double but found Float"): it runs on float32 copies.
        influence = make(net32).fit(loader32)
        return (
            influence.influences(x_query.float(), y_query, x_train.float(), y_train)
            .detach()
            .numpy()
            .T.astype(np.float64)
        )

    net32 = _torch_mlp(model).float()
    loader32 = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_train.float(), y_train), batch_size=n // 2
    )
    rows = []
    for name, make, strategy, curvature in pairs:
        run_theirs = theirs_float32 if "float32" in name else theirs
        ours(strategy, curvature), run_theirs(make)  # warm-up (compilation, first calls)
        times: dict[str, list[float]] = {"dargmin": [], "pyDVL": []}
        for _ in range(5):
            start = time.perf_counter()
            our_scores = ours(strategy, curvature)
            times["dargmin"].append(time.perf_counter() - start)
            start = time.perf_counter()
            their_scores = run_theirs(make)
            times["pyDVL"].append(time.perf_counter() - start)
        for library, scores in (("dargmin", our_scores), ("pyDVL", their_scores)):
            vs_h, _ = _pearsons(scores, exact["h"])
            vs_gn, _ = _pearsons(scores, exact["gn"])
            seconds = float(np.median(times[library]))
            rows.append(
                f"| {damping} | {name} | {library} | {vs_h:.3f} | {vs_gn:.3f} | {seconds:.4f} | "
                f"{seconds / float(np.median(times['dargmin'])):.2f} |"
            )
            print(rows[-1], flush=True)
    return rows


_PEER_ROWS: list[str] = []


def peer_lines() -> list[str]:
    try:
        import pydvl  # noqa: F401
    except ImportError:
        return ["## Peer: pyDVL", "", "Not run: pyDVL is not importable. " + _PEER_NOTE]
    return [
        "## Peer: pyDVL (influence module, PyTorch)",
        "",
        _PEER_NOTE,
        "",
        "The MLP of the first table (same trained weights copied into a float64 "
        "`torch.nn.Sequential`, same data and 8 queries; pyDVL gets 2 equal batches of n / 2: "
        "its Hessian-vector products weight every batch's mean loss equally, and with "
        "dargmin's batches of 13, 13, 13, 1 its CG scores correlated 0.045 with its own "
        "DirectInfluence on a test MLP, 1.000 with equal batches). pyDVL's Hessian is that "
        "of the mean loss, so its regularization is damping / n (the same inverse up to the "
        "factor n, which Pearson ignores). Score signs: pyDVL's 'up' influence is the negative of "
        "dargmin's d f_j / d w_i; the columns show Pearson of the scores as returned. "
        "pyDVL's CG is unpreconditioned, run to rtol 1e-10 / atol 1e-12 (at most its "
        "default 10·p iterations); dargmin's is 8 passes of EK-FAC-preconditioned CG. "
        "pyDVL's Arnoldi, at its default `use_woodbury=False`, inverts on the top-10 "
        "eigenvectors only, V(D + r)⁻¹Vᵀ; dargmin's adds (I − VVᵀ)/damping on the rest "
        "(pyDVL's `use_woodbury=True` is that inverse; not run here). Time: "
        "fit + n × 8 scores, median of 5 runs interleaved in one process (torch on 1 thread, "
        "JAX as configured), pinned to one core of a loaded 2-core machine; ratio = pyDVL / "
        "dargmin.",
        "",
        "| damping | method | library | Pearson vs exact H | Pearson vs exact GN | time (s) | "
        "time / dargmin |",
        "|---|---|---|---|---|---|---|",
        *_PEER_ROWS,
    ]


def main() -> None:
    if PEER_ONLY:
        accuracy_table()
        path = RESULTS / "influence_at_scale.md"
        kept = path.read_text().split("## Peer: pyDVL")[0]
        path.write_text(kept + "\n".join(peer_lines()) + "\n")
        print("\n".join(peer_lines()))
        return
    lines = ["# Influence at network scale", ""]
    if FAST:
        lines += ["(DARGMIN_FAST=1 smoke run: tiny sizes.)", ""]
    lines += [*accuracy_table(), "", *cnn_tables(), "", *memory_table(), "", *peer_lines()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "influence_at_scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-worker":
        _memory_worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
