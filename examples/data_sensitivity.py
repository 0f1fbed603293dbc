"""Which training points matter? Influence functions and approximate leave-one-out.

L2-regularized logistic regression on scikit-learn's breast-cancer data (569 tumours, 30
standardized features), fitted on 400 points. We

1. rank the training points by their influence on the test loss (Koh & Liang, 2017) and
   check the prediction for the most influential one by actually refitting without it;
2. compare the one-Newton-step approximate leave-one-out fits (ALO) and the infinitesimal
   jackknife (IJ) with exact refits for 20 training points;
3. time ALO for all 400 points against refitting.

Run: ``python examples/data_sensitivity.py`` (about 10-20 s, mostly compilation).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_breast_cancer

from dargmin import sensitivity

jax.config.update("jax_enable_x64", True)

N_TRAIN, LAM, N_CHECK = 400, 1.0, 20


def loss(params: dict, example: tuple) -> jax.Array:
    """Logistic loss of one example, labels in {-1, +1}."""
    x, y = example
    return jnp.logaddexp(0.0, -y * (x @ params["coef"] + params["intercept"]))


def penalty(params: dict) -> jax.Array:
    # The intercept is not penalized, as usual.
    return 0.5 * LAM * jnp.sum(params["coef"] ** 2)


def load() -> tuple:
    data = load_breast_cancer()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(data.target))
    x, y = data.data[order], np.where(data.target[order] == 1, 1.0, -1.0)
    train, test = slice(0, N_TRAIN), slice(N_TRAIN, None)
    mean, std = x[train].mean(axis=0), x[train].std(axis=0)
    x = (x - mean) / std  # standardized with training statistics only
    as_jax = jnp.asarray
    return (as_jax(x[train]), as_jax(y[train])), (as_jax(x[test]), as_jax(y[test]))


def make_solver(train: tuple):
    """Newton's method on the weighted objective Σ wᵢ ℓ(θ, zᵢ) + r(θ) (strongly convex)."""
    p = train[0].shape[1]

    def unpack(flat):
        return {"coef": flat[:p], "intercept": flat[p]}

    def objective(flat, weights):
        losses = jax.vmap(loss, in_axes=(None, 0))(unpack(flat), train)
        return jnp.sum(weights * losses) + penalty(unpack(flat))

    @jax.jit
    def solve(weights):
        def step(_, flat):
            grad = jax.grad(objective)(flat, weights)
            return flat - jnp.linalg.solve(jax.hessian(objective)(flat, weights), grad)

        return unpack(jax.lax.fori_loop(0, 30, step, jnp.zeros(p + 1)))

    return solve


def flat(params: dict) -> np.ndarray:
    # Works for one fit and for a stack of fits (leading axis).
    return np.concatenate(
        [np.asarray(params["coef"]), np.asarray(params["intercept"])[..., None]], axis=-1
    )


def main() -> None:
    train, test = load()
    solve = make_solver(train)
    ones = jnp.ones(N_TRAIN)
    theta = solve(ones)

    def test_loss(params):
        return jnp.mean(jax.vmap(loss, in_axes=(None, 0))(params, test))

    print(f"train n = {N_TRAIN}, test n = {test[1].shape[0]}, p = {train[0].shape[1] + 1}")
    print(f"test loss of the fit: {float(test_loss(theta)):.4f}\n")

    # Approximate leave-one-out fits for all points (one Newton step each; the per-example
    # Hessians of a GLM have rank 1, so Woodbury updates of one factorization suffice).
    alo_timings = []
    for _ in range(2):  # the first call compiles
        start = time.perf_counter()
        alo = sensitivity.approximate_leave_one_out(
            loss, theta, train, regularizer=penalty, method="newton", hessian_rank=1
        )
        jax.block_until_ready(alo)
        alo_timings.append(time.perf_counter() - start)
    alo_first, alo_time = alo_timings

    # 1. Influence on the test loss: d test_loss / d w_i. Removing point i changes the test
    #    loss by about -influence[i]: large positive values are points whose removal would
    #    lower the test loss (harmful), large negative values are helpful points.
    timings = []
    for _ in range(2):  # the first call compiles
        start = time.perf_counter()
        influence = sensitivity.influence_on_function(
            test_loss, loss, theta, train, regularizer=penalty
        )
        influence.block_until_ready()
        timings.append(time.perf_counter() - start)
    print(
        f"influence on the test loss of all {N_TRAIN} points (one Hessian solve): "
        f"{timings[1] * 1e3:.1f} ms (first call, compiling: {timings[0]:.2f} s)"
    )
    order = np.argsort(-np.abs(np.asarray(influence)))
    print("most influential training points; change of the test loss when removed:")
    print("   index  label  influence (IJ)  ALO (Newton)  exact refit")
    for i in order[:5]:
        refit = solve(ones.at[i].set(0.0))
        actual = float(test_loss(refit) - test_loss(theta))
        alo_i = jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], alo)
        by_alo = float(test_loss(alo_i) - test_loss(theta))
        print(
            f"   {i:5d}  {int(train[1][i]):+d}     {-float(influence[i]):+.5f}"
            f"        {by_alo:+.5f}      {actual:+.5f}"
        )
    print()

    # 2. Approximate leave-one-out vs exact refits for N_CHECK points.
    check = np.arange(N_CHECK)
    ij = sensitivity.approximate_leave_one_out(loss, theta, train, regularizer=penalty, method="ij")

    jax.block_until_ready(solve(ones.at[0].set(0.0)))  # compiled already; warm
    start = time.perf_counter()
    exact = [solve(ones.at[i].set(0.0)) for i in check]
    jax.block_until_ready(exact)
    refit_time = (time.perf_counter() - start) / N_CHECK

    exact_flat = np.stack([flat(e) for e in exact])
    alo_flat, ij_flat, full = flat(alo)[check], flat(ij)[check], flat(theta)
    change = np.linalg.norm(exact_flat - full, axis=1)
    alo_err = np.linalg.norm(alo_flat - exact_flat, axis=1)
    ij_err = np.linalg.norm(ij_flat - exact_flat, axis=1)
    print(f"leave-one-out parameters, {N_CHECK} points (‖·‖₂ over all {full.size} parameters):")
    print(f"   refit change ‖θ̂₋ᵢ − θ̂‖     median {np.median(change):.2e}  max {change.max():.2e}")
    print(f"   IJ error                    median {np.median(ij_err):.2e}  max {ij_err.max():.2e}")
    print(
        f"   ALO (Newton) error          median {np.median(alo_err):.2e}  max {alo_err.max():.2e}"
    )

    def held_out_loss(fits_flat):
        p = train[0].shape[1]
        return np.mean(
            [
                float(loss({"coef": f[:p], "intercept": f[p]}, (train[0][i], train[1][i])))
                for i, f in zip(check, fits_flat, strict=True)
            ]
        )

    print(
        f"   LOO CV loss on these points: exact {held_out_loss(exact_flat):.5f}, "
        f"ALO {held_out_loss(alo_flat):.5f}, IJ {held_out_loss(ij_flat):.5f}, "
        f"no refit {held_out_loss([full] * N_CHECK):.5f}"
    )
    cv = sensitivity.approximate_cv_error(loss, theta, train, regularizer=penalty, hessian_rank=1)
    print(f"   ALO CV loss over all {N_TRAIN} points: {float(cv):.5f}\n")

    # 3. Timings.
    print("timings:")
    print(
        f"   ALO for all {N_TRAIN} points: {alo_time * 1e3:.1f} ms (first call {alo_first:.2f} s)"
    )
    print(
        f"   one exact refit (30 Newton steps, compiled): {refit_time * 1e3:.1f} ms; all "
        f"{N_TRAIN} refits ≈ {refit_time * N_TRAIN:.2f} s "
        f"({refit_time * N_TRAIN / alo_time:.0f}× the ALO time)"
    )


if __name__ == "__main__":
    main()
