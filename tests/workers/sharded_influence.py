"""``dargmin.influence`` with a loader of row-sharded batches over 8 simulated CPU devices
(``tests/test_sharding.py`` starts this script in a subprocess).

A small equinox MLP (4 → 8 → 3, 67 parameters) trained on 512 synthetic examples; the
loader yields 2 batches of 256 rows, each split over the 8 devices. Influence scores with
the exact inverse Hessian and with Arnoldi run on the sharded loader and on the same
batches on one device; the worker prints the largest difference, the sharding of the
scores, the collectives moving at least a batch's row count of values in every program
compiled during the sharded run, and the largest array brought to the host (the detectors
of ``sharded_sensitivity.py``).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Sets XLA_FLAGS (8 devices, HLO dump) before JAX starts, and gives the detectors.
import json
import re
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import sharded_sensitivity as detect
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dargmin.influence import Arnoldi, ExactInverse, Hessian, influence_scores

BATCH = 256
BATCHES = 2
WEIGHT_DECAY = 1e-2  # of the mean training loss
DAMPING = WEIGHT_DECAY * BATCH * BATCHES  # the same penalty on the summed loss


def logits(model: eqx.Module, batch: dict) -> jax.Array:
    return jax.vmap(model)(batch["x"])


def loss(model: eqx.Module, batch: dict) -> jax.Array:  # summed cross-entropy
    z = logits(model, batch)
    return jnp.sum(jax.nn.logsumexp(z, 1) - jnp.take_along_axis(z, batch["y"][:, None], 1)[:, 0])


def trained_model(x: np.ndarray, y: np.ndarray) -> eqx.Module:
    model = eqx.nn.MLP(4, 3, 8, 1, activation=jnp.tanh, key=jax.random.PRNGKey(0))
    model = jax.tree_util.tree_map(
        lambda leaf: leaf.astype(jnp.float64) if eqx.is_inexact_array(leaf) else leaf, model
    )
    params, static = eqx.partition(model, eqx.is_inexact_array)
    data = {"x": jnp.asarray(x), "y": jnp.asarray(y)}

    def objective(p):
        penalty = sum(jnp.sum(leaf**2) for leaf in jax.tree_util.tree_leaves(p))
        return loss(eqx.combine(p, static), data) / x.shape[0] + 0.5 * WEIGHT_DECAY * penalty

    @jax.jit
    def train(p):
        return jax.lax.fori_loop(
            0,
            2000,
            lambda _, q: jax.tree_util.tree_map(
                lambda a, g: a - 0.5 * g, q, jax.grad(objective)(q)
            ),
            p,
        )

    return eqx.combine(train(params), static)


def row_indexed(line: str) -> list[str]:
    """The result shapes of a collective instruction that have a batch's row count."""
    result = line.split("=", 1)[1].split(" all-")[0].split(" collective-")[0]
    shapes = re.findall(r"\w+\[([\d,]*)\]", result)
    return [s for s in shapes if str(BATCH) in s.split(",")]


def main() -> None:
    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("rows",))
    rng = np.random.default_rng(1)
    n = BATCH * BATCHES
    x = rng.standard_normal((n, 4))
    y = (np.argmax(x[:, :3] + 0.5 * rng.standard_normal((n, 3)), axis=1)).astype(np.int32)
    model = trained_model(x, y)
    rows = NamedSharding(mesh, P("rows", None))
    labels = NamedSharding(mesh, P("rows"))
    single = [
        {"x": jnp.asarray(x[i : i + BATCH]), "y": jnp.asarray(y[i : i + BATCH])}
        for i in range(0, n, BATCH)
    ]
    sharded = [
        {"x": jax.device_put(b["x"], rows), "y": jax.device_put(b["y"], labels)} for b in single
    ]
    queries = {"x": jnp.asarray(x[:5] + 0.1), "y": jnp.asarray(y[:5])}
    curvature = Hessian(loss)
    methods = {
        "exact": ExactInverse(damping=DAMPING),
        "arnoldi": Arnoldi(rank=10, damping=DAMPING),
    }
    out: dict[str, object] = {"devices": len(devices), "batch": BATCH}
    for name, method in methods.items():
        reference = influence_scores(method.fit(curvature, model, single), single, queries)
        detect.clear_dump()
        with detect.HostTransfers() as transfers:
            scores = influence_scores(method.fit(curvature, model, sharded), sharded, queries)
        moved = [row_indexed(line) for line in detect.dumped_collectives(BATCH)]
        out[name] = {
            "relative_difference": float(
                jnp.max(jnp.abs(scores - reference)) / jnp.max(jnp.abs(reference))
            ),
            "finite": bool(jnp.all(jnp.isfinite(reference))),
            "shape": list(scores.shape),
            "sharding": str(scores.sharding.spec),
            # row-indexed shapes that crossed devices: the batches' (256, 4) and (256,)
            # would be data; (256, 5) are blocks of scores (one row per example, q = 5)
            "moved_shapes": sorted({shape for shapes in moved for shape in shapes}),
            "host_row_indexed": [s for s in transfers if BATCH in s or n in s],
        }
    shutil.rmtree(detect.DUMP, ignore_errors=True)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
