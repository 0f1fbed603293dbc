"""Tests for dargmin.finite_differences against closed forms, JAX autodiff and SciPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.differentiate import derivative as scipy_derivative

from dargmin.finite_differences import (
    GradientCheckReport,
    check_gradients,
    directional_derivative_fd,
    finite_difference_derivative,
    gradient_fd,
    hessian_fd,
    hvp_fd,
    jacobian_fd,
)

SEED_POINT = jnp.array([1.5, 0.5])
# Closed form values of the seed example at (1.5, 0.5), to 4 decimals.
SEED_VALUE = 2.0167
SEED_GRADIENT = np.array([3.0118, -13.7239])
ONE_SIDED_AND_CENTRAL = ("forward", "backward", "central")


def seed_function(x: jax.Array) -> jax.Array:
    """y = (sin(x1/x2) + x1/x2 - exp(x2)) * (x1/x2 - exp(x2))."""
    ratio = x[0] / x[1]
    return (jnp.sin(ratio) + ratio - jnp.exp(x[1])) * (ratio - jnp.exp(x[1]))


def seed_gradient_closed_form(x: np.ndarray) -> np.ndarray:
    # Hand-derived: y = a * b with a = sin(r) + r - e, b = r - e, r = x1/x2, e = exp(x2).
    x1, x2 = float(x[0]), float(x[1])
    r, e = x1 / x2, np.exp(x2)
    a, b = np.sin(r) + r - e, r - e
    dr = np.array([1.0 / x2, -x1 / x2**2])
    de = np.array([0.0, e])
    da = (np.cos(r) + 1.0) * dr - de
    db = dr - de
    return da * b + a * db


def test_seed_value_and_closed_form_gradient() -> None:
    # The quoted figures are truncated to 4 decimals (2.01664..., -13.72396...), so compare
    # within 1e-4 rather than by rounding.
    assert abs(float(seed_function(SEED_POINT)) - SEED_VALUE) < 1e-4
    np.testing.assert_allclose(
        seed_gradient_closed_form(np.asarray(SEED_POINT)), SEED_GRADIENT, atol=1e-4
    )
    np.testing.assert_allclose(jax.grad(seed_function)(SEED_POINT), SEED_GRADIENT, atol=1e-4)


def test_seed_gradient_every_method() -> None:
    for method in (*ONE_SIDED_AND_CENTRAL, "richardson"):
        estimate = jax.jit(lambda x: gradient_fd(seed_function, x, method=method))(SEED_POINT)
        np.testing.assert_allclose(estimate, SEED_GRADIENT, atol=1e-4, err_msg=method)


def test_seed_richardson_matches_closed_form_tightly() -> None:
    exact = seed_gradient_closed_form(np.asarray(SEED_POINT))
    estimate = gradient_fd(seed_function, SEED_POINT, method="richardson")
    np.testing.assert_allclose(estimate, exact, rtol=1e-10)


@pytest.mark.parametrize(
    ("method", "expected_ratio"), [("forward", 2.0), ("backward", 2.0), ("central", 4.0)]
)
def test_error_order_when_step_is_halved(method: str, expected_ratio: float) -> None:
    exact = seed_gradient_closed_form(np.asarray(SEED_POINT))

    def error(step: float) -> np.ndarray:
        estimate = gradient_fd(seed_function, SEED_POINT, method=method, step=step)
        return np.abs(np.asarray(estimate) - exact)

    # Steps large enough that truncation dominates round-off by many orders of magnitude.
    ratios = error(2e-3) / error(1e-3)
    np.testing.assert_allclose(ratios, expected_ratio, rtol=0.05)


SMOOTH_CASES = {
    # name: (NumPy function for SciPy, JAX function, exact derivative, point)
    "sin": (np.sin, jnp.sin, np.cos, 1.0),
    "t3_log_t": (
        lambda t: np.log(t) * t**3,
        lambda t: jnp.log(t) * t**3,
        lambda t: t**2 + 3 * t**2 * np.log(t),
        0.7,
    ),
    "rational": (
        lambda t: 1.0 / (1.0 + t**2),
        lambda t: 1.0 / (1.0 + t**2),
        lambda t: -2 * t / (1 + t**2) ** 2,
        2.0,
    ),
}


@pytest.mark.parametrize("name", list(SMOOTH_CASES))
def test_richardson_and_scipy_both_reach_1e10(name: str) -> None:
    f_np, f_jax, df, x0 = SMOOTH_CASES[name]
    exact = df(x0)
    ours = float(finite_difference_derivative(f_jax, x0, method="richardson"))
    reference = scipy_derivative(f_np, x0, tolerances={"rtol": 1e-13, "atol": 0.0})
    assert reference.success
    assert abs(ours - exact) <= 1e-10 * abs(exact)
    assert abs(float(reference.df) - exact) <= 1e-10 * abs(exact)


def test_richardson_ignores_steps_outside_the_domain() -> None:
    # At x = 0.05 the coarsest step 0.1 evaluates log of a negative number (NaN); the
    # selection must fall back to finer steps.
    estimate = finite_difference_derivative(jnp.log, 0.05, method="richardson")
    np.testing.assert_allclose(estimate, 20.0, rtol=1e-9)


def test_richardson_large_argument_uses_fine_steps() -> None:
    # max(1, |x|) scaling makes the first step 10 at x = 100; still accurate.
    estimate = finite_difference_derivative(jnp.sin, 100.0, method="richardson")
    np.testing.assert_allclose(estimate, np.cos(100.0), rtol=1e-9)


def test_scalar_derivative_pytree_output_and_jit() -> None:
    def f(t):
        return {"a": jnp.array([t**2, jnp.sin(t)]), "b": jnp.exp(t)}

    result = jax.jit(lambda t: finite_difference_derivative(f, t, method="central"))(0.3)
    np.testing.assert_allclose(result["a"], [0.6, np.cos(0.3)], rtol=1e-9)
    np.testing.assert_allclose(result["b"], np.exp(0.3), rtol=1e-9)


@pytest.mark.parametrize(
    ("method", "rtol"),
    [("forward", 1e-3), ("backward", 1e-3), ("central", 3e-5), ("richardson", 3e-5)],
)
def test_float32_accuracy_and_dtype(method: str, rtol: float) -> None:
    estimate = finite_difference_derivative(jnp.exp, jnp.float32(0.5), method=method)
    assert estimate.dtype == jnp.float32
    np.testing.assert_allclose(estimate, np.exp(0.5), rtol=rtol)


def test_invalid_method_and_order() -> None:
    with pytest.raises(ValueError, match="method"):
        finite_difference_derivative(jnp.sin, 0.0, method="sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="order"):
        finite_difference_derivative(jnp.sin, 0.0, method="central", order=4)
    with pytest.raises(ValueError, match="even"):
        finite_difference_derivative(jnp.sin, 0.0, method="richardson", order=3)


def test_richardson_order_two_is_best_central_difference() -> None:
    # One tableau column: no extrapolation, so accuracy is only that of central differences.
    estimate = finite_difference_derivative(jnp.exp, 1.0, method="richardson", order=2)
    error = abs(float(estimate) - np.e) / np.e
    assert 1e-14 < error < 1e-8


def test_directional_derivative_matches_jvp_on_pytrees() -> None:
    def f(p):
        return {"y": jnp.tanh(p["w"] @ p["x"]), "s": jnp.sum(p["x"] ** 3)}

    rng = np.random.default_rng(0)
    p = {"w": jnp.asarray(rng.standard_normal((2, 3))), "x": jnp.asarray(rng.standard_normal(3))}
    v = {"w": jnp.asarray(rng.standard_normal((2, 3))), "x": jnp.asarray(rng.standard_normal(3))}
    _, expected = jax.jvp(f, (p,), (v,))
    result = directional_derivative_fd(f, p, v, method="richardson")
    for key in ("y", "s"):
        np.testing.assert_allclose(result[key], expected[key], rtol=1e-9, atol=1e-12)
    zero = jax.tree_util.tree_map(jnp.zeros_like, v)
    assert float(jnp.max(jnp.abs(directional_derivative_fd(f, p, zero)["y"]))) == 0.0


def test_jacobian_fd_layout_matches_jacfwd() -> None:
    def f(p):
        return {"u": p["a"] * p["b"], "v": jnp.sin(p["a"]).sum()}

    p = {"a": jnp.array([[0.3, -0.2], [1.0, 0.5]]), "b": jnp.array(2.0)}
    expected = jax.jacfwd(f)(p)
    result = jacobian_fd(f, p, method="central")
    assert jax.tree_util.tree_structure(result) == jax.tree_util.tree_structure(expected)
    for got, want in zip(
        jax.tree_util.tree_leaves(result), jax.tree_util.tree_leaves(expected), strict=True
    ):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-9)


def test_hessian_fd_both_variants_match_closed_form() -> None:
    def f(x):
        return x[0] ** 2 * x[1] + jnp.exp(x[0] * x[1])

    x = jnp.array([0.4, -0.7])
    exp_term = np.exp(0.4 * -0.7)
    exact = np.array(
        [
            [2 * -0.7 + 0.49 * exp_term, 2 * 0.4 + exp_term * (1 + 0.4 * -0.7)],
            [2 * 0.4 + exp_term * (1 + 0.4 * -0.7), 0.16 * exp_term],
        ]
    )
    from_autodiff = hessian_fd(f, x, method="central")
    np.testing.assert_allclose(from_autodiff, exact, rtol=1e-8)
    np.testing.assert_array_equal(from_autodiff, from_autodiff.T)
    nested = jax.jit(
        lambda x: hessian_fd(f, x, method="richardson", gradient="finite_differences")
    )(x)
    np.testing.assert_allclose(nested, exact, rtol=1e-6, atol=1e-9)


def test_hessian_fd_pytree_layout() -> None:
    def f(p):
        return jnp.sum(jnp.sin(p["a"])) * p["b"] ** 2

    p = {"a": jnp.array([0.1, 0.2, 0.3]), "b": jnp.array(1.5)}
    expected = jax.hessian(f)(p)
    result = hessian_fd(f, p)
    assert result["a"]["b"].shape == (3,)
    assert result["a"]["a"].shape == (3, 3)
    for got, want in zip(
        jax.tree_util.tree_leaves(result), jax.tree_util.tree_leaves(expected), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-10)


def test_hvp_fd_forward_and_central_against_autodiff() -> None:
    x = jnp.array([1.5, 0.5])
    v = jnp.array([0.3, -1.0])
    exact = jax.hessian(seed_function)(x) @ v
    forward = hvp_fd(seed_function, x, v)
    central = hvp_fd(seed_function, x, v, method="central")
    forward_error = float(jnp.max(jnp.abs(forward - exact)))
    central_error = float(jnp.max(jnp.abs(central - exact)))
    assert forward_error < 1e-5 * float(jnp.max(jnp.abs(exact)))
    assert central_error < forward_error
    # Explicit step: the forward formula by hand.
    delta = 1e-4
    by_hand = (jax.grad(seed_function)(x + delta * v) - jax.grad(seed_function)(x)) / delta
    np.testing.assert_allclose(hvp_fd(seed_function, x, v, step=delta), by_hand, rtol=1e-9)


def test_check_grads_passes_on_correct_gradient() -> None:
    report = check_gradients(seed_function, SEED_POINT)
    assert isinstance(report, GradientCheckReport)
    assert report.passed
    assert report.max_rel_error < 1e-9
    assert "PASSED" in str(report)
    pytree_report = check_gradients(
        lambda p: {"y": jnp.sin(p["u"]) * p["v"]}, {"u": jnp.ones(2), "v": jnp.array(2.0)}
    )
    assert pytree_report.passed
    assert {leaf.name for leaf in pytree_report.leaves} == {"['y']['u']", "['y']['v']"}


def test_check_grads_catches_wrong_custom_jvp() -> None:
    @jax.custom_jvp
    def wrong_square(x):
        return jnp.sum(x**2)

    @wrong_square.defjvp
    def wrong_square_jvp(primals, tangents):
        (x,), (dx,) = primals, tangents
        # Deliberately wrong: derivative of sum(x^2) is 2x, not 2.1x.
        return wrong_square(x), jnp.sum(2.1 * x * dx)

    x = jnp.array([1.0, -2.0, 0.5])
    with pytest.raises(AssertionError, match="FAILED"):
        check_gradients(wrong_square, x)
    report = check_gradients(wrong_square, x, raise_on_failure=False)
    assert not report.passed
    np.testing.assert_allclose(report.max_rel_error, 0.05, rtol=1e-6)
    assert "NO" in str(report)


def test_old_name_check_grads_warns_and_gives_the_same_report() -> None:
    import dargmin

    with pytest.warns(DeprecationWarning, match="check_gradients"):
        old = dargmin.check_grads(seed_function, SEED_POINT)
    new = check_gradients(seed_function, SEED_POINT)
    assert old.passed and new.passed
    assert old.max_abs_error == new.max_abs_error
