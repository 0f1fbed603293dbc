"""dargmin.influence: inverse-curvature products over data loaders, K-FAC/EK-FAC, SLQ and
influence scores, checked against dense Hessians, closed forms and leave-one-out refits."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from dargmin.curvature import lanczos_extreme_eigenvalues
from dargmin.errors import SingularSystemError
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
    spectral_density,
)


def _pearson(a: jax.Array, b: jax.Array) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def _logits(model: eqx.Module, batch: dict) -> jax.Array:
    return jax.vmap(model)(batch["x"])


def _cross_entropy(logits: jax.Array, batch: dict) -> jax.Array:
    picked = jnp.take_along_axis(logits, batch["y"][:, None], axis=1)[:, 0]
    return jnp.sum(jax.nn.logsumexp(logits, axis=1) - picked)


def _loss(model: eqx.Module, batch: dict) -> jax.Array:
    return _cross_entropy(_logits(model, batch), batch)


def _split(data: dict, size: int) -> list[dict]:
    n = data["x"].shape[0]
    return [{k: v[i : i + size] for k, v in data.items()} for i in range(0, n, size)]


def _train(model: eqx.Module, data: dict, damping: float, steps: int = 150) -> eqx.Module:
    """L-BFGS on the sum of losses + damping/2 ‖θ‖² (one compiled loop)."""
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def objective(p: eqx.Module) -> jax.Array:
        penalty = sum(jnp.sum(leaf**2) for leaf in jax.tree_util.tree_leaves(p))
        return _loss(eqx.combine(p, static), data) + 0.5 * damping * penalty

    optimizer = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def body(_: int, carry: tuple) -> tuple:
        p, state = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = optimizer.update(
            grad, state, p, value=value, grad=grad, value_fn=objective
        )
        return optax.apply_updates(p, updates), state

    run = jax.jit(lambda p: jax.lax.fori_loop(0, steps, body, (p, optimizer.init(p)))[0])
    params = run(params)
    gradient_norm = float(optax.tree.norm(jax.grad(objective)(params)))
    assert gradient_norm < 1e-6, gradient_norm  # a fitted model: influence is a derivative
    return eqx.combine(params, static)


DAMPING = 1.0


@pytest.fixture(scope="module")
def mlp_problem() -> dict:
    """An over-parameterized MLP (p = 50 > n = 24): a few large curvature directions and a
    bulk near zero, the usual shape of a network's Hessian spectrum."""
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    x = jax.random.normal(keys[0], (24, 3))
    y = (x @ jnp.array([1.0, -2.0, 0.5]) + 0.5 * jax.random.normal(keys[1], (24,)) > 0).astype(
        jnp.int32
    )
    model = eqx.nn.MLP(3, 2, 8, 1, activation=jnp.tanh, key=keys[2], dtype=jnp.float64)
    model = _train(model, {"x": x, "y": y}, DAMPING)
    queries = {"x": jax.random.normal(keys[3], (8, 3)), "y": jnp.arange(8) % 2}
    loader = _split({"x": x, "y": y}, 8)
    hessian = Hessian(_loss)
    exact = ExactInverse(DAMPING).fit(hessian, model, loader)
    return {
        "model": model,
        "loader": loader,
        "queries": queries,
        "hessian": hessian,
        "gauss_newton": GaussNewton(_logits, _cross_entropy),
        "exact": exact,
        "exact_scores": influence_scores(exact, loader, queries),
    }


def test_exact_inverse_and_scores_match_the_dense_hessian(mlp_problem: dict) -> None:
    model, loader, queries = mlp_problem["model"], mlp_problem["loader"], mlp_problem["queries"]
    arrays, static = eqx.partition(model, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(arrays)
    data = {k: jnp.concatenate([b[k] for b in loader]) for k in ("x", "y")}

    def total(f: jax.Array, batch: dict) -> jax.Array:
        return _loss(eqx.combine(unravel(f), static), batch)

    # Independent of the loader loop: jax.hessian of the whole-data loss.
    dense = jax.hessian(total)(flat, data) + DAMPING * jnp.eye(flat.size)
    np.testing.assert_allclose(mlp_problem["exact"].matrix, dense, atol=1e-10)
    per_example = jax.vmap(lambda ex: jax.grad(total)(flat, jax.tree.map(lambda a: a[None], ex)))
    expected = -per_example(data) @ jnp.linalg.solve(dense, per_example(queries).T)
    np.testing.assert_allclose(mlp_problem["exact_scores"], expected, rtol=1e-8, atol=1e-12)


def test_arnoldi_scores_correlate_with_exact_influence(mlp_problem: dict) -> None:
    inverse = Arnoldi(rank=20, num_iterations=40, damping=DAMPING).fit(
        mlp_problem["hessian"], mlp_problem["model"], mlp_problem["loader"]
    )
    # The Ritz values are eigenvalues of the dense matrix, certified by their residuals.
    dense = np.linalg.eigvalsh(np.asarray(mlp_problem["exact"].matrix))[::-1] - DAMPING
    np.testing.assert_allclose(inverse.eigenvalues[:5], dense[:5], rtol=1e-8)
    assert float(jnp.max(inverse.residuals[:5])) < 1e-6
    scores = influence_scores(inverse, mlp_problem["loader"], mlp_problem["queries"])
    assert _pearson(scores, mlp_problem["exact_scores"]) >= 0.95


def test_ekfac_scores_on_a_multilayer_network(mlp_problem: dict) -> None:
    # EK-FAC is block diagonal over the layers and diagonal in each layer's Kronecker
    # eigenbasis. Measured here against the exact inverse of the same Gauss-Newton matrix
    # (Pearson): EK-FAC 0.92, the exact block-diagonal inverse 0.96 (the ceiling of any
    # per-layer method), so the cross-layer blocks cost about 0.04 and the diagonal in the
    # eigenbasis about 0.03 (benchmarks/results/influence_at_scale.md). Conjugate
    # gradients on the exact matrix, preconditioned by EK-FAC, remove both.
    model, loader, queries = mlp_problem["model"], mlp_problem["loader"], mlp_problem["queries"]
    gauss_newton = mlp_problem["gauss_newton"]
    ekfac_scores = influence_scores(
        EKFAC(DAMPING).fit(gauss_newton, model, loader), loader, queries
    )
    exact_gn = influence_scores(
        ExactInverse(DAMPING).fit(gauss_newton, model, loader), loader, queries
    )
    assert _pearson(ekfac_scores, exact_gn) >= 0.9
    assert _pearson(ekfac_scores, mlp_problem["exact_scores"]) >= 0.85
    refined = PreconditionedCG(EKFAC(DAMPING), steps=3).fit(gauss_newton, model, loader)
    refined_scores = influence_scores(refined, loader, queries)
    assert _pearson(refined_scores, exact_gn) >= 0.99
    assert _pearson(refined_scores, mlp_problem["exact_scores"]) >= 0.98


def test_kfac_and_ekfac_are_exact_for_linear_least_squares() -> None:
    # For z = W a + b and squared loss, the Gauss-Newton matrix is (Σ āāᵀ) ⊗ I: a single
    # Kronecker product, so K-FAC and EK-FAC must reproduce the exact inverse.
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    x, y = jax.random.normal(keys[0], (30, 3)), jax.random.normal(keys[1], (30, 2))
    model = eqx.nn.Linear(3, 2, key=keys[2], dtype=jnp.float64)
    squared = lambda z, b: 0.5 * jnp.sum((z - b["y"]) ** 2)  # noqa: E731
    loader = _split({"x": x, "y": y}, 10)
    vectors = jax.random.normal(keys[3], (3, 8))
    exact = ExactInverse(0.1).fit(Hessian(lambda m, b: squared(_logits(m, b), b)), model, loader)
    for strategy in (KFAC(0.1), EKFAC(0.1)):
        fitted = strategy.fit(GaussNewton(_logits, squared), model, loader)
        np.testing.assert_allclose(
            fitted.solve_flat(vectors), exact.solve_flat(vectors), rtol=1e-10, atol=1e-12
        )


def test_lissa_converges_to_the_exact_inverse_and_refuses_divergence(mlp_problem: dict) -> None:
    model, hessian = mlp_problem["model"], mlp_problem["hessian"]
    full_batch = [{k: jnp.concatenate([b[k] for b in mlp_problem["loader"]]) for k in ("x", "y")}]
    rhs = jax.random.normal(jax.random.PRNGKey(2), (2, mlp_problem["exact"].problem.size))
    # Deterministic (one batch) Neumann series: x - h_t/s = M^(t+1) x with
    # M = I - (H + λ)/s, so |error| <= ρ^(t+1)‖x‖, ρ = 1 - (μ + λ)/s (μ: smallest eigenvalue
    # of H); the estimate averages h_t/s over t = depth/2 + 1, ..., depth.
    depth = 1000
    fitted = LiSSA(DAMPING, depth=depth).fit(hessian, model, full_batch)
    exact = mlp_problem["exact"].solve_flat(rhs)
    smallest = float(np.linalg.eigvalsh(np.asarray(mlp_problem["exact"].matrix))[0])
    bound = (1.0 - smallest / fitted.scale) ** (depth // 2 + 2)
    errors = np.linalg.norm(fitted.solve_flat(rhs) - exact, axis=1)
    assert np.all(errors <= bound * np.linalg.norm(exact, axis=1) * (1 + 1e-6))
    assert bound < 0.05  # the bound above is not vacuous
    # Minibatch LiSSA: noisy, but its scores still follow the exact ones.
    minibatch = LiSSA(DAMPING, depth=300).fit(hessian, model, mlp_problem["loader"])
    scores = influence_scores(minibatch, mlp_problem["loader"], mlp_problem["queries"])
    assert _pearson(scores, mlp_problem["exact_scores"]) >= 0.9
    with pytest.raises(SingularSystemError, match="LiSSA diverged"):
        LiSSA(DAMPING, scale=0.1, depth=50).fit(hessian, model, full_batch).solve_flat(rhs)


def test_host_lanczos_agrees_with_curvature_lanczos(mlp_problem: dict) -> None:
    # On one in-memory batch the traced Lanczos of dargmin.curvature applies too.
    problem = mlp_problem["exact"].problem
    batch = mlp_problem["loader"][0]
    inverse = Arnoldi(rank=3, num_iterations=30, project=True).fit(
        mlp_problem["hessian"], mlp_problem["model"], [batch]
    )
    reference = lanczos_extreme_eigenvalues(
        lambda v: problem.products(batch, v[None])[0], jnp.ones(problem.size), k=3
    )
    np.testing.assert_allclose(inverse.eigenvalues, reference.largest, rtol=1e-8)


def test_slq_spectrum_and_traces(mlp_problem: dict) -> None:
    model, loader = mlp_problem["model"], mlp_problem["loader"]
    matrix = np.asarray(mlp_problem["exact"].matrix) - DAMPING * np.eye(50)
    spectrum = np.linalg.eigvalsh(matrix)
    # With m = p the quadrature nodes are eigenvalues of H.
    density = spectral_density(
        mlp_problem["hessian"], model, loader, num_probes=2, num_iterations=50
    )
    weighted = density.nodes[density.weights > 1e-12]
    gaps = np.min(np.abs(weighted[:, None] - spectrum[None]), axis=1)
    assert gaps.max() < 1e-6 * np.abs(spectrum).max()
    np.testing.assert_allclose(density.weights.sum(axis=1), 1.0, rtol=1e-10)
    # Hutchinson + Gauss quadrature: unbiased for tr(H); the error is the probes' variance.
    rough = spectral_density(mlp_problem["hessian"], model, loader, num_probes=6, num_iterations=12)
    spread = np.sqrt(2 * (np.sum(matrix**2) - np.sum(np.diag(matrix) ** 2)) / 6)
    assert abs(rough.trace() - np.trace(matrix)) < 4 * spread
    grid = np.linspace(spectrum[0] - 5, spectrum[-1] + 5, 4000)
    integral = np.sum(rough.density(grid, 0.5)) * (grid[1] - grid[0])
    assert abs(integral - 1.0) < 1e-3
    # The Gauss-Newton matrix is positive semidefinite: no node below rounding.
    gn = spectral_density(
        mlp_problem["gauss_newton"], model, loader, num_probes=1, num_iterations=20
    )
    assert gn.nodes.min() > -1e-8 * gn.nodes.max()


def test_scores_predict_leave_one_out_refits() -> None:
    """Retraining ground truth: L2 logistic regression refitted without each example."""
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    n, damping = 40, 1.0
    x = jax.random.normal(keys[0], (n, 3))
    y = (x @ jnp.array([1.5, -1.0, 0.5]) + jax.random.normal(keys[1], (n,)) > 0).astype(jnp.int32)
    model = eqx.nn.Linear(3, 2, key=keys[2], dtype=jnp.float64)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    flat0, unravel = ravel_pytree(params)
    query = {"x": jax.random.normal(keys[3], (5, 3)), "y": jnp.arange(5) % 2}

    def example_losses(flat: jax.Array, data: dict) -> jax.Array:
        m = eqx.combine(unravel(flat), static)
        z = _logits(m, data)
        return jax.nn.logsumexp(z, axis=1) - jnp.take_along_axis(z, data["y"][:, None], 1)[:, 0]

    def refit(weights: jax.Array) -> jax.Array:
        def objective(f: jax.Array) -> jax.Array:
            return weights @ example_losses(f, {"x": x, "y": y}) + 0.5 * damping * f @ f

        def newton(_: int, f: jax.Array) -> jax.Array:  # strongly convex: Newton converges
            return f - jnp.linalg.solve(jax.hessian(objective)(f), jax.grad(objective)(f))

        return jax.lax.fori_loop(0, 25, newton, flat0)

    fitted = refit(jnp.ones(n))
    refits = jax.jit(jax.vmap(refit))(1.0 - jnp.eye(n))
    query_losses = lambda f: example_losses(f, query)  # noqa: E731
    actual = jax.vmap(query_losses)(refits) - query_losses(fitted)  # (n, queries)
    model = eqx.combine(unravel(fitted), static)
    loader = _split({"x": x, "y": y}, 10)
    curvature = GaussNewton(_logits, _cross_entropy)  # equal to the Hessian for this model
    exact = influence_scores(ExactInverse(damping).fit(curvature, model, loader), loader, query)
    # Removing example i changes the query loss by about -score_i.
    assert _pearson(-exact, actual) >= 0.95
    for strategy in (EKFAC(damping), Arnoldi(rank=4, damping=damping)):
        scores = influence_scores(strategy.fit(curvature, model, loader), loader, query)
        assert _pearson(scores, exact) >= 0.95, type(strategy).__name__
        assert _pearson(-scores, actual) >= 0.95, type(strategy).__name__


def test_loaders_and_layers_are_validated(mlp_problem: dict) -> None:
    model, loader = mlp_problem["model"], mlp_problem["loader"]
    with pytest.raises(TypeError, match="one-shot iterator"):
        ExactInverse(DAMPING).fit(mlp_problem["hessian"], model, iter(loader))
    # A function returning a fresh iterator is a valid loader.
    fitted = ExactInverse(DAMPING).fit(mlp_problem["hessian"], model, lambda: iter(loader))
    np.testing.assert_allclose(fitted.matrix, mlp_problem["exact"].matrix, atol=1e-12)
    weights = {"w": jnp.ones(3)}
    linear = Hessian(lambda p, b: jnp.sum((b["x"] @ p["w"]) ** 2))
    with pytest.raises(TypeError, match=r"eqx\.nn\.Linear"):
        EKFAC(0.1).fit(linear, weights, [{"x": jnp.eye(3)}])
    with pytest.raises(ValueError, match="damping"):
        Arnoldi(project=False, damping=0.0)
