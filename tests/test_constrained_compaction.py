"""The compacted batched loop (dargmin.constrained._compaction): under vmap it must give
exactly what vmap of a plain while_loop gives, whatever members stay active."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dargmin.constrained._compaction import compacted_while

jax.config.update("jax_enable_x64", True)


def _active(state):
    count, value, _ = state
    return (count < 40) & (value > 1.0)


def _body(operands, state):
    # A member-dependent number of passes: the value shrinks by its own factor, plus a
    # running product that depends on every pass (a wrong gather or scatter shows).
    factor, offset = operands
    count, value, trace = state
    return count + 1, value * factor, trace * 1.5 + offset


def _plain(operands, state):
    return jax.lax.while_loop(_active, lambda s: _body(operands, s), state)


def _compacted(operands, state, stages=None):
    kwargs = {} if stages is None else {"stages": stages}
    return compacted_while(_active, _body, operands, state, **kwargs)


def _states(values):
    values = jnp.asarray(values, jnp.float64)
    return (jnp.zeros(values.shape, jnp.int32), values, jnp.ones(values.shape))


@pytest.mark.parametrize("size", [1, 2, 7, 8, 33, 130])
def test_matches_a_plain_loop_for_every_batch_size(size):
    rng = np.random.default_rng(size)
    # Most members finish in 1-3 passes, a few (spread through the batch) take many.
    values = rng.uniform(0.5, 8.0, size)
    values[rng.choice(size, max(1, size // 9), replace=False)] = 1e6
    factors = jnp.asarray(rng.uniform(0.3, 0.6, size))
    offsets = jnp.asarray(rng.normal(size=size))
    want = jax.vmap(_plain)((factors, offsets), _states(values))
    got = jax.jit(jax.vmap(_compacted))((factors, offsets), _states(values))
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@settings(max_examples=25, deadline=None)
@given(
    values=st.lists(st.floats(0.1, 1e5), min_size=1, max_size=40),
    first=st.integers(0, 4),
    fraction=st.sampled_from([0.9, 0.5, 0.25, 0.05]),
)
def test_matches_a_plain_loop_for_any_stages(values, first, fraction):
    factors = jnp.full((len(values),), 0.5)
    offsets = jnp.arange(len(values), dtype=jnp.float64)
    stages = ((first, 1.0), (2, fraction), (None, fraction / 2))
    want = jax.vmap(_plain)((factors, offsets), _states(values))
    got = jax.vmap(lambda o, s: _compacted(o, s, stages))((factors, offsets), _states(values))
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_shared_operands_nested_vmap_and_unbatched_calls():
    values = jnp.array([[3.0, 1e4, 0.5], [7.0, 2.0, 1e3]])
    factor = jnp.asarray(0.5)  # shared by every member: not gathered
    offsets = jnp.array([1.0, -2.0, 0.25])  # batched over the inner axis only

    def run(loop, v):
        return jax.vmap(lambda o, s: loop((factor, o), s))(offsets, _states(v))

    want = jax.vmap(lambda v: run(_plain, v))(values)
    got = jax.vmap(lambda v: run(_compacted, v))(values)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # No vmap at all: the plain loop.
    one = _compacted((factor, offsets[0]), _states(values[0, 0]))
    np.testing.assert_array_equal(np.asarray(one[1]), np.asarray(want[1][0, 0]))


def test_gradients_flow_around_the_loop_when_its_inputs_are_frozen():
    # The solver's use: its inputs are stop_gradient-ed, the derivative comes from
    # elsewhere; grad, jacfwd and hessian must trace through the custom_vmap.
    def f(x):
        state = _states(jax.lax.stop_gradient(x) * 10.0)
        out = jax.vmap(_compacted)((jnp.full(x.shape, 0.5), jnp.zeros(x.shape)), state)
        return jnp.sum(out[1] * x**2)

    x = jnp.array([0.3, 2.0, 5.0])
    out = jax.vmap(_plain)((jnp.full(x.shape, 0.5), jnp.zeros(x.shape)), _states(x * 10.0))
    np.testing.assert_allclose(jax.grad(f)(x), 2 * x * out[1], rtol=1e-14)
    np.testing.assert_allclose(jax.jacfwd(f)(x), 2 * x * out[1], rtol=1e-14)
    np.testing.assert_allclose(jax.hessian(f)(x), jnp.diag(2 * out[1]), rtol=1e-14)
