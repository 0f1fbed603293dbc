"""The linear-system layer: strategies, reused factorizations and checked results."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

import dargmin
from dargmin import linear_solvers as ls

MATRIX = jnp.asarray(np.diag([1.0, 2.0, 4.0, 0.0]))  # singular: the last direction is null
TAGS = (lx.symmetric_tag, lx.positive_semidefinite_tag)


def test_factorization_reused_solves_match_numpy():
    a = jnp.asarray(np.random.default_rng(0).normal(size=(5, 5)))
    system = ls.factorize(lx.MatrixLinearOperator(a), ls.LU())
    for seed in range(3):
        b = jnp.asarray(np.random.default_rng(seed + 1).normal(size=5))
        np.testing.assert_allclose(system.solve(b), np.linalg.solve(a, b), rtol=1e-10)


def test_looser_krylov_strategy_reuses_the_prepared_operator():
    a = jnp.asarray(np.diag(np.arange(1.0, 7.0)))
    system = ls.factorize(lx.MatrixLinearOperator(a, TAGS), ls.CG())
    loose = system.with_strategy(ls.CG(rtol=0.1))
    assert loose.state is system.state  # not linearised again
    b = jnp.ones(6)
    # rtol=0.1: the residual of the loose solve is within 10 % of ‖b‖.
    assert float(jnp.linalg.norm(a @ loose.solve(b) - b)) <= 0.1 * float(jnp.linalg.norm(b))


def test_batch_with_a_truncating_member_and_a_failing_member_is_refused():
    # Member 0 only truncates (a warning: rank 3 of 4); member 1 holds NaN (an error). The
    # batch must be refused whatever the order in which the members are judged.
    system = ls.factorize(lx.MatrixLinearOperator(MATRIX, TAGS), ls.LeastSquares())
    rhs = jnp.stack([jnp.ones(4), jnp.full(4, jnp.nan)])
    with pytest.raises(Exception) as info:
        jax.vmap(system.solve)(rhs)
    assert dargmin.failure_reason(info.value) == "singular"
    assert "batch member (1,)" in str(info.value)


def test_truncating_least_squares_warns_with_rank_and_dropped_norm():
    system = ls.factorize(lx.MatrixLinearOperator(MATRIX, TAGS), ls.LeastSquares())
    with pytest.warns(
        dargmin.DargminWarning,
        match=r"rank 3 of 4 and dropped a part of norm 1 of the right-hand side \(relative 0.5\)",
    ):
        x = system.solve(jnp.ones(4))
    np.testing.assert_allclose(x, [1.0, 0.5, 0.25, 0.0])  # the minimum-norm solution
