"""Tests for dargmin.curvature against numpy.linalg.eigvalsh and exact traces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dargmin.curvature import (
    EigenEstimate,
    hutch_plus_plus_trace,
    hutchinson_trace,
    lanczos_extreme_eigenvalues,
    spectrum_dense,
)


def _symmetric_with_spectrum(eigenvalues: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((eigenvalues.size, eigenvalues.size)))
    return (q * eigenvalues) @ q.T


def _lanczos_jit(matrix: np.ndarray, k: int, num_iterations: int | None) -> EigenEstimate:
    operator = jnp.asarray(matrix)
    run = jax.jit(
        lambda v0: lanczos_extreme_eigenvalues(
            lambda v: operator @ v, v0, k=k, num_iterations=num_iterations
        )
    )
    return run(jnp.ones(matrix.shape[0]))


@pytest.mark.parametrize("n", [50, 200])
@pytest.mark.parametrize("kind", ["spd", "indefinite"])
def test_lanczos_extremes_match_eigvalsh(n: int, kind: str) -> None:
    rng = np.random.default_rng(n)
    # Well separated extremes (gaps >= 1.5 vs bulk width 2) so 40 iterations converge.
    if kind == "spd":
        bulk, ends = rng.uniform(4.0, 6.0, n - 4), np.array([0.5, 2.0, 9.0, 10.5])
    else:
        bulk, ends = rng.uniform(-1.0, 1.0, n - 4), np.array([-4.0, -2.5, 5.0, 6.5])
    matrix = _symmetric_with_spectrum(np.concatenate([bulk, ends]), seed=n)
    exact = np.linalg.eigvalsh(matrix)
    assert (exact[0] > 0) == (kind == "spd")

    estimate = _lanczos_jit(matrix, k=2, num_iterations=40)
    np.testing.assert_allclose(estimate.smallest, exact[:2], rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(estimate.largest, exact[::-1][:2], rtol=1e-8, atol=1e-8)
    assert float(jnp.max(estimate.smallest_residuals)) < 1e-4
    assert float(jnp.max(estimate.largest_residuals)) < 1e-4
    # The residual of each returned vector, recomputed here, matches the certificate.
    vector = np.asarray(estimate.largest_vectors[0])
    recomputed = np.linalg.norm(matrix @ vector - float(estimate.largest[0]) * vector)
    np.testing.assert_allclose(recomputed, estimate.largest_residuals[0], rtol=1e-3, atol=1e-12)


def test_lanczos_full_dimension_is_exact_and_default_iterations() -> None:
    matrix = _symmetric_with_spectrum(np.linspace(-3.0, 5.0, 50), seed=1)
    exact = np.linalg.eigvalsh(matrix)
    estimate = _lanczos_jit(matrix, k=3, num_iterations=50)
    np.testing.assert_allclose(estimate.smallest, exact[:3], atol=1e-10)
    np.testing.assert_allclose(estimate.largest, exact[::-1][:3], atol=1e-10)
    assert float(jnp.max(estimate.smallest_residuals)) < 1e-8
    # Default iteration count (30 here): Ritz values lie inside the spectrum (interlacing).
    default = _lanczos_jit(matrix, k=1, num_iterations=None)
    assert exact[0] - 1e-10 <= float(default.smallest[0]) <= exact[1]
    assert exact[-2] <= float(default.largest[0]) <= exact[-1] + 1e-10


def test_lanczos_breakdown_gives_no_nan() -> None:
    # Identity: the Krylov space is one-dimensional, so beta_1 = 0 at once.
    identity = jax.jit(lambda v0: lanczos_extreme_eigenvalues(lambda v: v, v0, k=2))(jnp.ones(20))
    np.testing.assert_allclose(identity.smallest, [1.0, 1.0])
    np.testing.assert_allclose(identity.largest, [1.0, 1.0])
    # Three distinct eigenvalues: breakdown after 3 steps, the restarts must find the rest.
    diagonal = jnp.repeat(jnp.array([1.0, 2.0, 3.0]), 5)
    estimate = jax.jit(
        lambda v0: lanczos_extreme_eigenvalues(lambda v: diagonal * v, v0, k=2, num_iterations=15)
    )(jnp.ones(15))
    for array in jax.tree_util.tree_leaves(estimate):
        assert bool(jnp.all(jnp.isfinite(array)))
    np.testing.assert_allclose(estimate.smallest, [1.0, 1.0], atol=1e-10)
    np.testing.assert_allclose(estimate.largest, [3.0, 3.0], atol=1e-10)


def test_lanczos_small_n_pytree_and_float32() -> None:
    scales = {"a": jnp.array([2.0, -1.0]), "b": jnp.array(7.0)}

    def matvec(t):
        return jax.tree_util.tree_map(jnp.multiply, scales, t)

    v0 = {"a": jnp.ones(2), "b": jnp.array(1.0)}
    estimate = jax.jit(lambda v0: lanczos_extreme_eigenvalues(matvec, v0))(v0)  # n = 3 caps m
    np.testing.assert_allclose(estimate.smallest, [-1.0], atol=1e-12)
    np.testing.assert_allclose(estimate.largest, [7.0], atol=1e-12)
    assert estimate.largest_vectors["b"].shape == (1,)
    np.testing.assert_allclose(jnp.abs(estimate.largest_vectors["b"]), [1.0], atol=1e-12)

    diagonal = jnp.arange(1.0, 11.0, dtype=jnp.float32)
    single = jax.jit(lambda v0: lanczos_extreme_eigenvalues(lambda v: diagonal * v, v0))(
        jnp.ones(10, jnp.float32)
    )
    assert single.largest.dtype == jnp.float32
    np.testing.assert_allclose(single.largest, [10.0], rtol=1e-5)
    with pytest.raises(ValueError, match="k must satisfy"):
        lanczos_extreme_eigenvalues(matvec, v0, k=4)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(min_value=2, max_value=12),
    k=st.integers(min_value=1, max_value=2),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_lanczos_certificates_property(n: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    raw = rng.standard_normal((n, n))
    matrix = (raw + raw.T) / 2
    exact = np.linalg.eigvalsh(matrix)
    k = min(k, n)
    # Partial Krylov space (about n / 2) so that the Ritz values are not all exact.
    estimate = lanczos_extreme_eigenvalues(
        lambda v: jnp.asarray(matrix) @ v,
        jnp.asarray(rng.standard_normal(n)),
        k=k,
        num_iterations=max(k, n // 2),
    )
    theta = np.concatenate([estimate.smallest, estimate.largest])
    residuals = np.concatenate([estimate.smallest_residuals, estimate.largest_residuals])
    # Every Ritz value lies in [lambda_min, lambda_max] and within its residual of some
    # eigenvalue (Bauer-Fike / Weyl for symmetric matrices).
    tolerance = 1e-9 * max(1.0, np.abs(exact).max())
    assert np.all(theta >= exact[0] - tolerance)
    assert np.all(theta <= exact[-1] + tolerance)
    distance = np.min(np.abs(theta[:, None] - exact[None, :]), axis=1)
    assert np.all(distance <= residuals + tolerance)


def test_spectrum_dense_matrix_and_matvec() -> None:
    eigenvalues = np.array([-2.0, 0.5, 1.0, 4.0])
    matrix = _symmetric_with_spectrum(eigenvalues, seed=3)
    np.testing.assert_allclose(spectrum_dense(jnp.asarray(matrix)), eigenvalues, atol=1e-12)
    from_matvec = spectrum_dense(lambda v: jnp.asarray(matrix) @ v, 4)
    np.testing.assert_allclose(from_matvec, eigenvalues, atol=1e-12)
    with pytest.raises(ValueError, match="n is required"):
        spectrum_dense(lambda v: v)


def _hutchinson_batch(matrix: jax.Array, keys: jax.Array, num_samples: int) -> jax.Array:
    def one_estimate(key: jax.Array) -> jax.Array:
        return hutchinson_trace(lambda v: matrix @ v, matrix.shape[0], key, num_samples)

    return jax.jit(jax.vmap(one_estimate))(keys)


def test_hutchinson_is_unbiased_within_standard_error() -> None:
    matrix = jnp.asarray(_symmetric_with_spectrum(np.linspace(-1.0, 3.0, 30), seed=4))
    num_keys, num_samples = 400, 5
    estimates = _hutchinson_batch(
        matrix, jax.random.split(jax.random.PRNGKey(0), num_keys), num_samples
    )
    # Exact Rademacher variance of one probe: 2 (||A||_F^2 - sum_i A_ii^2).
    probe_variance = 2.0 * (jnp.sum(matrix**2) - jnp.sum(jnp.diag(matrix) ** 2))
    standard_error = jnp.sqrt(probe_variance / (num_samples * num_keys))
    assert abs(float(jnp.mean(estimates) - jnp.trace(matrix))) < 4.0 * float(standard_error)
    # The spread of the estimates matches the theoretical variance too.
    np.testing.assert_allclose(jnp.var(estimates), probe_variance / num_samples, rtol=0.25)


def test_hutchinson_exact_for_diagonal_and_pytree() -> None:
    # z_i^2 = 1 for Rademacher probes, so any diagonal matrix is estimated exactly.
    scales = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([[3.0, -4.0]])}
    estimate = hutchinson_trace(
        lambda t: jax.tree_util.tree_map(jnp.multiply, scales, t),
        scales,
        jax.random.PRNGKey(1),
        num_samples=3,
    )
    np.testing.assert_allclose(estimate, 2.0, rtol=1e-12)


def test_hutch_plus_plus_exact_on_low_rank_and_beats_hutchinson() -> None:
    rng = np.random.default_rng(5)
    n, budget = 100, 30
    factors = rng.standard_normal((n, 5))
    low_rank = jnp.asarray(factors @ factors.T)
    # rank 5 <= budget / 3: the sketch captures the range exactly.
    exact_estimate = hutch_plus_plus_trace(
        lambda v: low_rank @ v, n, jax.random.PRNGKey(2), num_matvecs=budget
    )
    np.testing.assert_allclose(exact_estimate, jnp.trace(low_rank), rtol=1e-10)

    # Low-rank-dominated PSD matrix: fast spectral decay plus a small full-rank part.
    spectrum = np.concatenate([100.0 * 0.5 ** np.arange(8), 0.05 * np.ones(n - 8)])
    matrix = jnp.asarray(_symmetric_with_spectrum(spectrum, seed=6))
    keys = jax.random.split(jax.random.PRNGKey(3), 50)
    hutchpp = jax.jit(
        jax.vmap(
            lambda key: hutch_plus_plus_trace(lambda v: matrix @ v, n, key, num_matvecs=budget)
        )
    )(keys)
    hutch = _hutchinson_batch(matrix, keys, budget)
    hutchpp_error = float(jnp.mean(jnp.abs(hutchpp - spectrum.sum())))
    hutch_error = float(jnp.mean(jnp.abs(hutch - spectrum.sum())))
    assert hutchpp_error < 0.2 * hutch_error
    assert abs(float(jnp.mean(hutchpp)) - spectrum.sum()) < 0.01 * spectrum.sum()
    with pytest.raises(ValueError, match="num_matvecs"):
        hutch_plus_plus_trace(lambda v: v, 4, jax.random.PRNGKey(0), num_matvecs=2)
