"""The adversarial matrix of the KKT derivative (never a silent wrong derivative).

Every solution state × every transformation of ``constrained_argmin``. Each cell asserts
exactly one of:

(a) the correct derivative, against the closed form below (itself checked against central
    differences of SciPy SLSQP re-solves in ``test_truth_matches_differences_of_resolves``);
(b) the typed refusal with its reason code (eagerly a ``dargmin.DargminError``; under
    ``jax.jit`` JAX wraps it, and ``failure_reason`` must still read the code);
(c) with ``check="warn"``, a ``DargminWarning`` with the reason code and a measured number.

The problem (``x ∈ R³``, one equality, three inequalities; all data, so that one compiled
function per transformation serves every state)::

    min  ½ xᵀBx + ¼ Σ x⁴ − θᵀx   s.t.  a·x = b,  Gx ≤ h

Each state picks ``x*``, an active set and multipliers, and then sets ``θ = Bx* + x*³ +
aν + Gᵀλ``, ``b = a·x*`` and ``h = Gx* + slack``, so that the prepared point is exactly what
the state claims. The "solver" returns the prepared ``(x, ν, λ)``. With ``H = B + 3
diag(x*²)`` and ``C`` the active rows (``a`` and the active rows of ``G``), strict
complementarity and LICQ give ``dx*/dθ = [K⁻¹]ₓₓ`` with ``K = [[H, Cᵀ], [C, 0]]``.

==================  ====================================================================
converged           the derivative (rel. 1e-10)
stopped_early       refusal ``not_stationary``: x* + 1e-3 along the null space of the
                    active rows (feasible, the Lagrangian gradient is 1e-3)
stopped_interior    refusal ``not_stationary``: what an interior point stopped early gives,
                    an active row with slack 1e-4 and multiplier 1 (complementarity fails)
nan                 refusal ``nonfinite``: θ holds a NaN (the solver returned a finite x)
infeasible          refusal ``infeasible``: the active row violated by 1e-2 (stationary)
negative_multiplier refusal ``negative_multiplier``: λ₀ = −0.5 (stationary with it)
licq                refusal ``licq``: the active row duplicated (λ split over both copies)
weakly_active       refusal ``degenerate``: an inequality with slack 0 and multiplier 0
==================  ====================================================================

Transformations: eager ``jax.jvp`` (one direction), ``jax.jit(jax.jacrev)``,
``jax.vmap(jax.jacfwd)`` over a batch whose member 2 is the state (members 0 and 1
converged, other x*; a refusal must name member 2), eager ``jax.jacfwd`` and ``jax.jacrev``.
Two more columns: ``check="warn"`` under ``jax.jit(jax.jacrev)`` (the warning carries the
code and a measured number), and a solver that returns ``x`` alone (duals recovered by
least squares; eager ``jax.jacfwd``), where every state must meet the same fate.
"""

from __future__ import annotations

import functools
import re
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dargmin
from dargmin.constrained import KKTSolution, constrained_argmin
from dargmin.errors import failure_reason

jax.config.update("jax_enable_x64", True)

N = 3
STATES = (
    "converged",
    "stopped_early",
    "stopped_interior",
    "nan",
    "infeasible",
    "negative_multiplier",
    "licq",
    "weakly_active",
)
TRANSFORMS = ("eager_jvp", "jit_jacrev", "vmap_jacfwd", "jacfwd", "jacrev")
BAD_MEMBER = 2
EXPECTED_REASON = {
    "stopped_early": "not_stationary",
    "stopped_interior": "not_stationary",
    "nan": "nonfinite",
    "infeasible": "infeasible",
    "negative_multiplier": "negative_multiplier",
    "licq": "licq",
    "weakly_active": "degenerate",
}

_RNG = np.random.default_rng(7)
_L = _RNG.standard_normal((N, N))
B = _L @ _L.T + 0.5 * np.eye(N)
_A = np.array([1.0, 1.0, 1.0])
_G = np.array([[1.0, -1.0, 0.5], [0.0, 1.0, -1.0], [-1.0, 0.3, 1.0]])
_X_STAR = 0.5 * _RNG.standard_normal((3, N))  # one x* per batch member
_TANGENT = np.array([0.3, -1.0, 0.7])  # the eager_jvp direction


class Prepared(NamedTuple):
    x: np.ndarray  # what the solver returns, with its duals
    nu: np.ndarray
    lam: np.ndarray
    theta: np.ndarray
    G: np.ndarray
    h: np.ndarray
    A: np.ndarray
    b: np.ndarray
    active: tuple[int, ...]  # the active inequalities of the truth


def prepare(state: str, member: int = BAD_MEMBER) -> Prepared:
    """The data of one state (members 0 and 1 of a vmap batch are ``converged``)."""
    x_star = _X_STAR[member]
    G = _G.copy()
    lam = np.array([1.0, 0.0, 0.0])
    slack = np.array([0.0, 0.3, 0.4])
    nu = np.array([0.7])
    x = x_star.copy()
    if state == "stopped_interior":
        slack[0] = 1e-4
    elif state == "negative_multiplier":
        lam[0] = -0.5
    elif state == "licq":
        G[2] = G[0]
        lam[[0, 2]] = 0.5
        slack[2] = 0.0
    elif state == "weakly_active":
        slack[1] = 0.0
    theta = B @ x_star + x_star**3 + _A * nu[0] + G.T @ lam
    h = G @ x_star + slack
    if state == "stopped_early":
        direction = np.cross(_A, G[0])
        x = x_star + 1e-3 * direction / np.linalg.norm(direction)
    elif state == "nan":
        theta[1] = np.nan
    elif state == "infeasible":
        h[0] -= 1e-2
    return Prepared(x, nu, lam, theta, G, h, _A[None, :], np.array([_A @ x_star]), (0,))


def truth(member: int) -> np.ndarray:
    """``dx*/dθ`` of the converged state, by the KKT matrix of its active set (numpy)."""
    p = prepare("converged", member)
    H = B + 3.0 * np.diag(p.x**2)
    C = np.vstack([p.A, p.G[list(p.active)]])
    K = np.block([[H, C.T], [C, np.zeros((C.shape[0], C.shape[0]))]])
    return np.linalg.inv(K)[:N, :N]


def objective(x, theta, G, h, A, b):
    return 0.5 * x @ jnp.asarray(B) @ x + 0.25 * jnp.sum(x**4) - theta @ x


def eq(x, theta, G, h, A, b):
    return A @ x - b


def ineq(x, theta, G, h, A, b):
    return G @ x - h


@functools.cache
def solver(check: str = "raise"):
    @constrained_argmin(objective, eq=eq, ineq=ineq, check=check)
    def solve(init, theta, G, h, A, b):
        return KKTSolution(*init)  # the prepared point: every state is data

    return lambda init, theta, *data: solve(init, theta, *data).x


def _transform(transform: str, check: str):
    solve = solver(check)
    if transform == "eager_jvp":
        tangent = jnp.asarray(_TANGENT)
        return lambda init, theta, *data: jax.jvp(
            lambda t: solve(init, t, *data), (theta,), (tangent,)
        )[1]
    if transform == "jit_jacrev":
        return jax.jit(jax.jacrev(solve, argnums=1))
    if transform == "vmap_jacfwd":
        return jax.vmap(jax.jacfwd(solve, argnums=1))
    if transform == "jacfwd":
        return jax.jacfwd(solve, argnums=1)
    if transform == "jacrev":
        return jax.jacrev(solve, argnums=1)
    raise ValueError(transform)


def arguments(state: str, transform: str) -> tuple:
    def pack(p: Prepared) -> tuple:
        return ((p.x, p.nu, p.lam), p.theta, p.G, p.h, p.A, p.b)

    if transform != "vmap_jacfwd":
        return jax.tree_util.tree_map(jnp.asarray, pack(prepare(state)))
    members = [pack(prepare("converged", m)) for m in (0, 1)] + [pack(prepare(state))]
    return jax.tree_util.tree_map(lambda *leaves: jnp.asarray(np.stack(leaves)), *members)


def expected_value(transform: str) -> np.ndarray:
    if transform == "eager_jvp":
        return truth(BAD_MEMBER) @ _TANGENT
    if transform == "vmap_jacfwd":
        return np.stack([truth(m) for m in range(3)])
    return truth(BAD_MEMBER)


@functools.cache
def transformed(transform: str, check: str = "raise"):
    """Compiled once and warmed up on the converged data: users meet a refusal after
    successful calls, and it must stay typed and right on a warm cache."""
    fn = _transform(transform, check)
    run(fn, arguments("converged", transform))  # judged by the "converged" cell
    return fn


def run(fn, args):
    try:
        return "value", np.asarray(jax.block_until_ready(fn(*args)))
    except Exception as err:  # the outcome is judged, whatever it is
        return "error", err


def _sentence(err: BaseException) -> str:
    text = str(err)
    start = text.find("dargmin.")
    return f"{type(err).__name__}: {text[start : start + 300] if start >= 0 else text[:300]}"


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("state", STATES)
def test_matrix(state, transform):
    kind, payload = run(transformed(transform), arguments(state, transform))
    if state == "converged":
        assert kind == "value", f"refused a well-defined derivative: {_sentence(payload)}"
        reference = expected_value(transform)
        err = np.linalg.norm(payload - reference) / np.linalg.norm(reference)
        assert err <= 1e-10, f"wrong derivative: rel. error {err:.2g}"
        return
    assert kind == "error", (
        f"returned a number silently where the refusal {EXPECTED_REASON[state]!r} is due: "
        f"{np.asarray(payload).round(4).tolist()}"
    )
    assert failure_reason(payload) == EXPECTED_REASON[state], _sentence(payload)
    assert "dargmin.constrained_argmin" in str(payload), _sentence(payload)
    if transform != "jit_jacrev":
        # Eager callers get the typed error (kkt_solution restores it from JAX's wrapper).
        assert isinstance(payload, dargmin.DargminError), _sentence(payload)
    if transform == "vmap_jacfwd":
        assert re.search(rf"member \({BAD_MEMBER},\)", str(payload)), _sentence(payload)
        assert not re.search(r"members? \((0|1),\)", str(payload)), _sentence(payload)


@functools.cache
def primal_only_jacobian():
    """A solver that returns ``x`` alone: the duals are recovered by least squares."""

    @constrained_argmin(objective, eq=eq, ineq=ineq)
    def solve(init, theta, G, h, A, b):
        return init[0]

    return jax.jacfwd(solve, argnums=1)


@pytest.mark.parametrize("state", STATES)
def test_recovered_duals(state):
    """The same states when the solver gives no multipliers (eager jacfwd)."""
    kind, payload = run(primal_only_jacobian(), arguments(state, "jacfwd"))
    if state == "converged":
        assert kind == "value", f"refused a well-defined derivative: {_sentence(payload)}"
        np.testing.assert_allclose(payload, truth(BAD_MEMBER), rtol=1e-10)
        return
    assert kind == "error", (
        f"returned a number silently where the refusal {EXPECTED_REASON[state]!r} is due: "
        f"{np.asarray(payload).round(4).tolist()}"
    )
    assert isinstance(payload, dargmin.DargminError), _sentence(payload)
    assert failure_reason(payload) == EXPECTED_REASON[state], _sentence(payload)


_MEASURED = re.compile(r"(=|\bis)\s+-?(\d|nan|inf)")  # "λ = -0.5", "is 0.01"


@pytest.mark.parametrize("state", STATES)
def test_warn_mode(state):
    fn = transformed("jit_jacrev", check="warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kind, payload = run(fn, arguments(state, "jit_jacrev"))
    ours = [str(w.message) for w in caught if issubclass(w.category, dargmin.DargminWarning)]
    if state == "converged":
        assert not ours, f"false alarm: {ours[0][:300]}"
        assert kind == "value"
        np.testing.assert_allclose(payload, truth(BAD_MEMBER), rtol=1e-10)
        return
    assert ours, f"no DargminWarning; the call gave {kind}"
    assert f"[reason: {EXPECTED_REASON[state]}]" in ours[0], ours[0][:300]
    assert _MEASURED.search(ours[0]), f"the warning names no measured number: {ours[0][:300]}"


def test_truth_matches_differences_of_resolves():
    """The closed form against central differences of SLSQP re-solves (independent)."""
    from scipy.optimize import minimize

    p = prepare("converged", BAD_MEMBER)

    def resolve(theta: np.ndarray) -> np.ndarray:
        result = minimize(
            lambda x: 0.5 * x @ B @ x + 0.25 * np.sum(x**4) - theta @ x,
            p.x,
            jac=lambda x: B @ x + x**3 - theta,
            constraints=[
                {"type": "eq", "fun": lambda x: p.A @ x - p.b, "jac": lambda x: p.A},
                {"type": "ineq", "fun": lambda x: p.h - p.G @ x, "jac": lambda x: -p.G},
            ],
            method="SLSQP",
            options={"ftol": 1e-15, "maxiter": 200},
        )
        assert result.success, result.message
        return result.x

    np.testing.assert_allclose(resolve(p.theta), p.x, atol=1e-9)  # the prepared x* is it
    step = 1e-5
    columns = [
        (resolve(p.theta + step * e) - resolve(p.theta - step * e)) / (2 * step) for e in np.eye(N)
    ]
    np.testing.assert_allclose(np.stack(columns, axis=1), truth(BAD_MEMBER), atol=1e-6)
