"""CV folds of ``dargmin.hyper`` spread over 8 simulated CPU devices
(``tests/test_hyper_sharded.py`` starts this script in a subprocess, because the device
count is fixed when JAX starts).

The folds' support systems are solved in one batched call whose fold axis is sharded over
the devices (``dargmin.hyper._support_solve.SHARD_FOLDS``); with the flag off the same
batch runs on one device. Prints one JSON object with both results of each check.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import json
import warnings

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402 (after the device count is set)
from sklearn.datasets import make_regression  # noqa: E402
from sklearn.model_selection import KFold  # noqa: E402

from dargmin.hyper import (  # noqa: E402
    CrossVal,
    HeldOutMSE,
    LassoHyperCV,
    elastic_net,
    hypergradient,
    lasso,
)
from dargmin.hyper import _support_solve as hg_module  # noqa: E402


def _both(fn):
    """``fn()`` with the fold axis sharded over the devices, then on one device."""
    hg_module.SHARD_FOLDS = True
    sharded = fn()
    hg_module.SHARD_FOLDS = False
    single = fn()
    hg_module.SHARD_FOLDS = True
    return {"sharded": sharded, "single": single}


def main() -> None:
    X, y = make_regression(90, 40, n_informative=6, noise=5.0, random_state=0)
    # 5 folds on 8 devices: the batch is padded with 3 identity systems.
    crit = CrossVal(HeldOutMSE, cv=KFold(5))
    prob = lasso(X, y)
    theta = np.log([0.1 * prob.alpha_max()])

    def lasso_grad():
        res = hypergradient(prob, crit, theta)
        return [res.value, *res.grad.tolist()]

    enet = elastic_net(X, y)
    theta_en = np.array([np.log(0.05 * enet.alpha_max()), np.log(0.3)])

    def enet_grad():
        res = hypergradient(enet, crit, theta_en)
        return [res.value, *res.grad.tolist()]

    def lasso_fit():
        est = LassoHyperCV(cv=KFold(5), n_path=5, max_iter=4).fit(X, y)
        return [est.alpha_, *est.coef_.tolist()]

    # Where the batch goes: the placed arrays' sharding and the devices they span.
    Hs = np.stack([np.eye(16)] * 5)
    Bs = np.zeros((5, 16, 1))
    placed = hg_module._place_folds(Hs, Bs)
    out = {
        "devices": jax.device_count(),
        "placed_shape": list(placed[0].shape),
        "placed_spec": str(placed[0].sharding.spec),
        "placed_devices": len(placed[0].sharding.device_set),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["lasso_grad"] = _both(lasso_grad)
        out["enet_grad"] = _both(enet_grad)
        out["lasso_fit"] = _both(lasso_fit)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
