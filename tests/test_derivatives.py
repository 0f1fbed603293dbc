"""Tests for dargmin.derivatives against dense JAX/NumPy references."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dargmin.derivatives import (
    gauss_newton_vector_product,
    hessian_vector_product,
    jacobian,
    jvp_from_vjps,
    rayleigh_quotient,
    solve_cg,
)


def _random_spd(n: int, seed: int, condition: float = 100.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.geomspace(1.0, condition, n)) @ q.T


def _rosenbrock_tree(params: dict) -> jax.Array:
    x, y = params["x"], params["y"]
    return jnp.sum(100.0 * (y - x**2) ** 2 + (1.0 - x) ** 2) + jnp.sum(jnp.sin(x) * y)


def _tree_allclose(a, b, **kwargs) -> bool:
    return all(
        np.allclose(u, w, **kwargs)
        for u, w in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def test_hvp_matches_dense_hessian_on_array() -> None:
    def f(x, scale):
        return scale * jnp.sum(jnp.exp(x) * jnp.roll(x, 1)) + jnp.sum(x**4)

    x = jnp.linspace(-1.0, 1.0, 5)
    v = jnp.arange(1.0, 6.0)
    expected = jax.hessian(f)(x, 2.0) @ v
    np.testing.assert_allclose(hessian_vector_product(f, x, v, 2.0), expected, rtol=1e-12)


def test_hvp_on_pytree_matches_flattened_hessian() -> None:
    params = {"x": jnp.array([0.5, -1.0, 2.0]), "y": jnp.array([1.0, 0.3, -0.2])}
    v = {"x": jnp.array([1.0, 2.0, -1.0]), "y": jnp.array([0.5, 0.0, 3.0])}
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    flat_v, _ = jax.flatten_util.ravel_pytree(v)
    dense = jax.hessian(lambda z: _rosenbrock_tree(unravel(z)))(flat) @ flat_v
    result = jax.flatten_util.ravel_pytree(hessian_vector_product(_rosenbrock_tree, params, v))[0]
    np.testing.assert_allclose(result, dense, rtol=1e-12)


def test_hvp_float32_keeps_dtype() -> None:
    x = jnp.ones(3, jnp.float32)
    result = hessian_vector_product(lambda z: jnp.sum(z**3), x, x)
    assert result.dtype == jnp.float32
    np.testing.assert_allclose(result, 6.0 * np.ones(3), rtol=1e-6)


def test_gauss_newton_matches_explicit_jt_h_j() -> None:
    rng = np.random.default_rng(0)
    weights = jnp.asarray(rng.standard_normal((4, 3)))
    w = jnp.asarray(rng.standard_normal(3))
    v = jnp.asarray(rng.standard_normal(3))
    targets = jnp.asarray(rng.standard_normal(4))

    def model(w):
        return jnp.tanh(weights @ w)

    def loss(z):
        return jnp.sum(jnp.logaddexp(0.0, z) - targets * z) + 0.25 * jnp.sum(z**4)

    jac = jax.jacfwd(model)(w)
    loss_hessian = jax.hessian(loss)(model(w))
    expected = jac.T @ loss_hessian @ jac @ v
    np.testing.assert_allclose(gauss_newton_vector_product(model, loss, w, v), expected, rtol=1e-12)


def test_gauss_newton_equals_hessian_for_linear_model() -> None:
    # With a linear model the dropped term vanishes, so GN equals the full Hessian.
    a = jnp.array([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]])
    w = jnp.array([0.3, -0.2, 0.1])
    v = jnp.array([1.0, -1.0, 2.0])

    def loss(z):
        return jnp.sum(jnp.cosh(z))

    full = jax.hessian(lambda w: loss(a @ w))(w) @ v
    np.testing.assert_allclose(gauss_newton_vector_product(lambda w: a @ w, loss, w, v), full)


@pytest.mark.parametrize(
    ("in_size", "out_size"), [(2, 5), (5, 2), (3, 3)], ids=["tall", "wide", "square"]
)
def test_jacobian_modes_agree(in_size: int, out_size: int) -> None:
    rng = np.random.default_rng(in_size * 10 + out_size)
    matrix = jnp.asarray(rng.standard_normal((out_size, in_size)))

    def f(x):
        return jnp.sin(matrix @ x) * jnp.sum(x**2)

    x = jnp.asarray(rng.standard_normal(in_size))
    reference = jax.jacfwd(f)(x)
    for mode in ("auto", "forward", "reverse"):
        np.testing.assert_allclose(jacobian(f, x, mode=mode), reference, rtol=1e-12)


def test_jacobian_auto_picks_mode_by_size() -> None:
    # Forward mode batches JVPs over inputs, reverse mode VJPs over outputs; the traced
    # programs differ, so comparing them shows which one "auto" chose.
    def wide(x):  # 5 inputs -> 1 output: reverse is cheaper
        return jnp.sum(jnp.sin(x) ** 2)[None]

    def tall(x):  # 2 inputs -> 6 outputs: forward is cheaper
        return jnp.stack([jnp.sin(x), x**2, x**3]).ravel()

    def program(fn, x):
        return str(jax.make_jaxpr(fn)(x))

    x5, x2 = jnp.arange(5.0), jnp.arange(2.0)
    assert program(jax.jacrev(wide), x5) != program(jax.jacfwd(wide), x5)
    assert program(lambda x: jacobian(wide, x), x5) == program(jax.jacrev(wide), x5)
    assert program(lambda x: jacobian(tall, x), x2) == program(jax.jacfwd(tall), x2)


def test_jacobian_pytree_layout_and_bad_mode() -> None:
    params = {"a": jnp.ones(2), "b": jnp.array(3.0)}

    def f(p):
        return {"u": p["a"] * p["b"], "v": jnp.sum(p["a"])}

    result = jacobian(f, params, mode="reverse")
    assert _tree_allclose(result, jax.jacfwd(f)(params))
    assert result["u"]["a"].shape == (2, 2)
    with pytest.raises(ValueError, match="mode"):
        jacobian(f, params, mode="sideways")  # type: ignore[arg-type]


def test_jvp_from_vjps_matches_jax_jvp() -> None:
    def f(p):
        return {"out": jnp.tanh(p["w"] @ p["x"]), "norm": jnp.sum(p["x"] ** 2)}

    rng = np.random.default_rng(1)
    p = {"w": jnp.asarray(rng.standard_normal((3, 4))), "x": jnp.asarray(rng.standard_normal(4))}
    t = {"w": jnp.asarray(rng.standard_normal((3, 4))), "x": jnp.asarray(rng.standard_normal(4))}
    primal, tangent = jvp_from_vjps(f, p, t)
    expected_primal, expected_tangent = jax.jvp(f, (p,), (t,))
    assert _tree_allclose(primal, expected_primal, rtol=1e-14)
    assert _tree_allclose(tangent, expected_tangent, rtol=1e-12)


def test_jvp_from_vjps_under_jit() -> None:
    x = jnp.array([0.1, 0.7])
    v = jnp.array([1.0, -2.0])
    _, tangent = jax.jit(lambda x, v: jvp_from_vjps(jnp.exp, x, v))(x, v)
    np.testing.assert_allclose(tangent, jnp.exp(x) * v, rtol=1e-14)


def test_rayleigh_quotient_of_eigenvector_is_eigenvalue() -> None:
    matrix = _random_spd(6, seed=2)
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    for i in (0, 3, 5):
        quotient = rayleigh_quotient(lambda v: jnp.asarray(matrix) @ v, 2.5 * eigenvectors[:, i])
        np.testing.assert_allclose(quotient, eigenvalues[i], rtol=1e-12)


def test_rayleigh_quotient_pytree_and_bounds() -> None:
    scales = {"a": jnp.array([1.0, 4.0]), "b": jnp.array([[2.0, 9.0]])}
    v = {"a": jnp.array([1.0, 1.0]), "b": jnp.array([[0.0, 2.0]])}
    quotient = rayleigh_quotient(lambda t: jax.tree_util.tree_map(jnp.multiply, scales, t), v)
    np.testing.assert_allclose(quotient, (1.0 + 4.0 + 9.0 * 4.0) / 6.0)
    assert 1.0 <= float(quotient) <= 9.0


def test_solve_cg_matches_dense_solve() -> None:
    matrix = jnp.asarray(_random_spd(30, seed=3, condition=1e3))
    b = jnp.asarray(np.random.default_rng(4).standard_normal(30))
    x = solve_cg(lambda v: matrix @ v, b)
    np.testing.assert_allclose(x, jnp.linalg.solve(matrix, b), rtol=1e-7, atol=1e-9)


def test_solve_cg_pytree_jit_and_x0() -> None:
    a = jnp.asarray(_random_spd(3, seed=5))
    b_vec = jnp.asarray(_random_spd(2, seed=6))

    def matvec(t):
        # Block-diagonal SPD operator on a two-leaf pytree.
        return {"p": a @ t["p"], "q": b_vec @ t["q"]}

    rhs = {"p": jnp.array([1.0, 2.0, 3.0]), "q": jnp.array([-1.0, 0.5])}
    expected = {"p": jnp.linalg.solve(a, rhs["p"]), "q": jnp.linalg.solve(b_vec, rhs["q"])}
    solved = jax.jit(lambda r: solve_cg(matvec, r))(rhs)
    assert _tree_allclose(solved, expected, rtol=1e-8)
    # Starting at the solution needs no iterations.
    info = solve_cg(matvec, rhs, x0=expected, throw=False)
    assert bool(info.converged)
    assert int(info.num_steps) <= 1


def test_solve_cg_float32() -> None:
    matrix = jnp.asarray(_random_spd(10, seed=7), jnp.float32)
    b = jnp.ones(10, jnp.float32)
    x = solve_cg(lambda v: matrix @ v, b)
    assert x.dtype == jnp.float32
    np.testing.assert_allclose(matrix @ x, b, atol=1e-3)


def test_solve_cg_non_convergence_raises_with_advice() -> None:
    matrix = jnp.asarray(_random_spd(50, seed=8, condition=1e6))
    b = jnp.ones(50)
    with pytest.raises(eqx.EquinoxRuntimeError, match="Increase max_steps"):
        solve_cg(lambda v: matrix @ v, b, max_steps=3)
    info = solve_cg(lambda v: matrix @ v, b, max_steps=3, throw=False)
    assert not bool(info.converged)
    assert int(info.num_steps) == 3
