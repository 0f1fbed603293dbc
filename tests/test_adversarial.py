"""Adversarial cases: each one must give a correct derivative, a typed refusal, or a warning
naming the numbers — never a wrong number returned silently (issue: never-silent).

This file grows into the full matrix (solver × pathology × transformation); the rows below
are the ones fixed so far, each against an independent truth (closed form).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dargmin
from dargmin.diagnostics import failure_reason

jax.config.update("jax_enable_x64", True)


@dargmin.root(lambda x, t: x**3 - t)
def _cube_root(init, t):
    """x* = θ^(1/3) from g(x, θ) = x³ − θ; the member θ = 8 is returned 1 % off (not
    converged), and the member θ = 1e27 has ‖x‖ = 1e9 (converged): reduced over the batch,
    that norm used to loosen the tolerance of every member, so the bad one slipped through."""
    return jnp.where(t == 8.0, 1.01 * jnp.cbrt(t), jnp.cbrt(t))


@pytest.mark.parametrize("transform", ["vmap", "jit_vmap", "vmap_grad"])
def test_vmap_refuses_when_one_member_is_not_converged(transform):
    thetas = jnp.array([1.0, 8.0, 27.0, 1e27])
    derivative = jax.grad(lambda t: _cube_root(None, t))
    batched = jax.vmap(derivative)
    if transform == "jit_vmap":
        batched = jax.jit(batched)
    if transform == "vmap_grad":
        batched = jax.jit(jax.vmap(jax.grad(lambda t: _cube_root(None, t) ** 2)))
    with pytest.raises(Exception, match=r"batch member \(1,\) of a batch") as info:
        jax.block_until_ready(batched(thetas))
    assert failure_reason(info.value) == "not_stationary"


def test_vmap_of_converged_members_matches_closed_form():
    thetas = jnp.array([1.0, 27.0, 2.0, 1e27])
    grads = jax.vmap(jax.grad(lambda t: _cube_root(None, t)))(thetas)
    np.testing.assert_allclose(grads, thetas ** (-2.0 / 3.0) / 3.0, rtol=1e-10)


def test_wrong_solver_output_shape_is_a_shape_error():
    f = lambda w, lam: 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * lam * jnp.sum(w**2)  # noqa: E731

    @dargmin.argmin(f)
    def column_solver(init, lam):
        return (jnp.ones(3) / (1.0 + lam))[:, None]  # (p, 1) instead of (p,)

    with pytest.raises(ValueError, match=r"\(3, 1\).*\(3,\)"):
        jax.grad(lambda l: column_solver(jnp.zeros(3), l).sum())(1.0)


def test_zero_size_solution_is_refused_clearly():
    @dargmin.root(lambda x, t: x - t)
    def solve(init, t):
        return t

    with pytest.raises(ValueError, match="no entries"):
        jax.jacfwd(lambda t: solve(None, t))(jnp.zeros(0))


@pytest.mark.parametrize("order", [1.5, 0, True])
def test_taylor_order_must_be_a_whole_positive_number(order):
    f = lambda x, t: 0.5 * jnp.sum(x**2) - jnp.sum(x) * t  # noqa: E731
    with pytest.raises(ValueError, match="order"):
        dargmin.TaylorExpansion(f, jnp.ones(2), jnp.asarray(1.0), order=order)


def test_minres_gives_the_root_derivative_at_a_saddle():
    # g = ∇f for f(x, t) = ½ xᵀ D x − t·x, D = diag(2, −1): the stationary point x* = t/D is a
    # saddle; root(symmetric=True) with MINRES differentiates it (dx*/dt = 1/D).
    d = jnp.array([2.0, -1.0])

    @dargmin.root(lambda x, t: d * x - t, symmetric=True, linear_solver="minres")
    def solve(init, t):
        return t / d

    jac = jax.jacfwd(lambda t: solve(None, t))(jnp.array([1.0, 3.0]))
    np.testing.assert_allclose(jac, jnp.diag(1.0 / d), rtol=1e-8)
    rev = jax.jacrev(lambda t: solve(None, t))(jnp.array([1.0, 3.0]))
    np.testing.assert_allclose(rev, jnp.diag(1.0 / d), rtol=1e-8)


def test_error_type_and_reason_are_stable_across_calls():
    f = lambda w, lam: 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * lam * jnp.sum(w**2)  # noqa: E731

    @dargmin.argmin(f)
    def solve(init, lam):
        return jnp.full(3, jnp.nan)

    seen = []
    for _ in range(3):
        with pytest.raises(dargmin.DargminError) as info:
            jax.grad(lambda l: solve(None, l).sum())(1.0)
        seen.append((type(info.value), failure_reason(info.value)))
    assert len(set(seen)) == 1, seen
    assert seen[0][1] == "nonfinite"


@pytest.mark.parametrize("linear_solver", ["cholesky", "lu", "qr", "lstsq"])
def test_dense_argmin_refuses_a_saddle_with_one_negative_direction_among_many(linear_solver):
    # f = ½ xᵀ D x − θᵀx with D = diag(1..10, −0.5): the stationary point D⁻¹θ is a saddle.
    # A single random probe used to miss the one negative direction; the eigenvalue cannot.
    d = jnp.concatenate([jnp.arange(1.0, 11.0), jnp.array([-0.5])])
    f = lambda x, t: 0.5 * jnp.sum(d * x**2) - jnp.sum(t * x)  # noqa: E731

    @dargmin.argmin(f, linear_solver=linear_solver)
    def solve(init, t):
        return t / d

    with pytest.raises(dargmin.SingularSystemError, match=r"smallest eigenvalue is -0\.5") as info:
        jax.jacfwd(lambda t: solve(None, t))(jnp.ones(11))
    assert failure_reason(info.value) == "not_minimum"
