"""The adversarial matrix of the torch front end ("never a silent wrong derivative").

Every torch linear solver × every pathology × every torch transformation. Each cell asserts
exactly one of:

(a) a correct derivative, against an exact truth to a stated tolerance;
(b) a typed refusal: a ``dargmin.DargminError`` with the right reason code (under ``vmap``
    naming the bad batch member);
(c) with ``check="warn"`` (the second block), a ``DargminWarning`` with the reason code and
    a measured number;
(d) for forward over forward (refused by design), the documented ``NotImplementedError``.

Where the mathematics allows a correct number or a refusal (an ill-conditioned but
invertible system) the cell accepts exactly those two, never "anything".

The problem (as on the JAX side, ``tests/test_adversarial_matrix.py``): minimize
``f(x, θ; B) = ½ xᵀBx + ¼ Σ x⁴ − θᵀx`` over ``x ∈ R⁸``. A case picks ``x*`` and a Hessian
``A = Q diag(λ) Qᵀ``, and sets ``B = A − 3 diag(x*²)``, ``θ = Bx* + x*³``: ``x*`` is then
stationary with Hessian ``A``. The solver returns its ``init`` (the prepared ``x*``), so
each case is data. ``f`` is written without ``@`` so that torch's forward mode also runs
on the zero-size case.

Truth, independent of torch: ``J = dx*/dθ = H⁻¹`` with ``H = B + 3 diag(x*²)`` formed and
inverted at 60 digits (mpmath) from the stored float64 entries, so that the truth at
condition 1e12 is that of the matrix the front end actually sees; for ``s(θ) = wᵀx*(θ)``,
differentiating ``H(x*(θ)) J(θ) = I`` once more gives

    ∂²s/∂θ² = −Jᵀ diag(6 x* ⊙ Jᵀw) J,

itself checked against finite differences of a Newton re-solve in numpy (last test).

==============  ============================================================================
converged       the derivative (rel. 1e-10 dense, 1e-6 Krylov: rtol 1.5e-9 × condition 10)
unconverged     refusal ``not_stationary`` (x* + δ, Newton step ‖δ‖ ≈ 3e-2 ≫ tol 1e-4)
nan_x           refusal ``nonfinite`` (the solver returned x with a NaN)
nan_theta       refusal ``nonfinite`` (θ holds a NaN; the solver returned a finite x)
cond1e12        the derivative (1e-3; second derivatives 1e-2) or ``ill_conditioned``/
                ``singular`` (float64 keeps ~4 digits; the default limit is 4.5e13)
cond1e15        the same two (beyond the limit: a refusal is what the check gives)
singular        refusal ``singular``/``ill_conditioned`` (``lstsq``, first order: or the
                minimum-norm derivative pinv(A), 1e-6)
saddle          refusal ``not_minimum`` (one eigenvalue −0.5 among positive ones)
zero_size       an empty derivative of the right shape
==============  ============================================================================

Transformations of ``solve(x0, θ, B)``: ``grad`` (``torch.autograd.grad`` of ``s``: the
first-order backward, whose Krylov path is the short one), ``double_backward`` (a Hessian-
vector product through ``create_graph=True``), ``hessian`` (``torch.func.hessian`` of
``s``: forward over reverse), ``jacrev``, ``jacfwd`` and ``vmap`` (of ``jacfwd``) over a
batch of three whose member 2 is the case (members 0, 1 well posed).

Found by this matrix and fixed in ``dargmin.torch`` (the cells would fail without): a
silent derivative of norm 8e15 from the first-order CG backward at a singular Hessian
(now: the Rayleigh quotients' ratio, a lower bound of the condition number, is judged);
a bare ``LinAlgError`` for NaN in ``x`` (dense), an MKL abort in GMRES on NaN products,
an ``IndexError``/``RuntimeError`` for zero-size ``x``, and Krylov refusals under ``vmap``
that did not name the member.
"""

from __future__ import annotations

import functools
import re
import warnings
from typing import Any, NamedTuple

import numpy as np
import pytest

torch = pytest.importorskip("torch")
mpmath = pytest.importorskip("mpmath")  # a dependency of torch (through sympy)

import dargmin  # noqa: E402
import dargmin.torch as dt  # noqa: E402
from dargmin.errors import failure_reason  # noqa: E402

F64 = torch.float64
N = 8
SOLVERS = ("auto", "cholesky", "lu", "lstsq", "cg", "minres", "gmres")
KRYLOV = ("cg", "minres", "gmres")
STATES = (
    "converged",
    "unconverged",
    "nan_x",
    "nan_theta",
    "cond1e12",
    "cond1e15",
    "singular",
    "saddle",
    "zero_size",
)
TRANSFORMS = ("grad", "double_backward", "hessian", "jacrev", "jacfwd", "vmap")
SECOND_ORDER = ("double_backward", "hessian")
BAD_MEMBER = 2
ILL = frozenset({"ill_conditioned", "singular"})

_RNG = np.random.default_rng(20261202)
_Q = np.linalg.qr(_RNG.standard_normal((N, N)))[0]
_X_STAR = 0.05 * _RNG.standard_normal((3, N))  # one x* per batch member
_W = _RNG.standard_normal(N)  # s(θ) = wᵀx*(θ)
_V = _RNG.standard_normal(N)  # the double backward's direction: (∂²s/∂θ²) v
_DELTA = 1e-2 * _RNG.standard_normal(N)  # the unconverged solver's error


class Problem(NamedTuple):
    x0: np.ndarray  # what the solver returns
    theta: np.ndarray
    B: np.ndarray


# The Hessian's eigenvalues per state: spread over [0.1, 1], over [1/condition, 1], or with
# the smallest replaced by 0 (singular) or −0.5 (saddle).
_SMALLEST = {"singular": 0.0, "saddle": -0.5}


def _spectrum(state: str) -> np.ndarray:
    low = 1.0 / float(state[4:]) if state.startswith("cond") else 0.1
    eigs = np.geomspace(low, 1.0, N)
    eigs[0] = _SMALLEST.get(state, eigs[0])
    return eigs


def make_problem(state: str, member: int = BAD_MEMBER) -> Problem:
    if state == "zero_size":
        return Problem(np.zeros(0), np.zeros(0), np.zeros((0, 0)))
    x_star = _X_STAR[member]
    A = (_Q * _spectrum(state)) @ _Q.T
    B = A - 3.0 * np.diag(x_star**2)
    theta = B @ x_star + x_star**3
    x0 = x_star.copy()
    if state == "unconverged":
        x0 = x_star + _DELTA
    elif state == "nan_x":
        x0[3] = np.nan
    elif state == "nan_theta":
        theta[3] = np.nan
    return Problem(x0, theta, B)


@functools.cache
def truth(state: str, member: int = BAD_MEMBER) -> tuple[np.ndarray, np.ndarray]:
    """(J = dx*/dθ, ∂²(wᵀx*)/∂θ²) at the case's x*, at 60 digits from the float64 data."""
    base = "converged" if state in ("unconverged", "nan_x", "nan_theta") else state
    p = make_problem(base, member)
    with mpmath.workdps(60):
        H = mpmath.matrix(p.B.tolist()) + 3 * mpmath.diag([mpmath.mpf(v) ** 2 for v in p.x0])
        J = np.array((H**-1).tolist(), dtype=float)
    hess = -J.T @ np.diag(6.0 * p.x0 * (J.T @ _W)) @ J
    return J, hess


def pinv_truth(state: str) -> np.ndarray:
    """The minimum-norm derivative pinv(A) of the (exactly) singular Hessian."""
    eigs = _spectrum(state)
    inverse = np.where(eigs == 0.0, 0.0, 1.0 / np.where(eigs == 0.0, 1.0, eigs))
    return (_Q * inverse) @ _Q.T


def expected_value(state: str, transform: str, *, pinv: bool = False) -> np.ndarray:
    if state == "zero_size":
        shapes = {"grad": (0,), "double_backward": (0,), "vmap": (3, 0, 0)}
        return np.zeros(shapes.get(transform, (0, 0)))
    J = pinv_truth(state) if pinv else truth(state)[0]
    if transform == "grad":
        return J.T @ _W
    if transform == "double_backward":
        return truth(state)[1] @ _V
    if transform == "hessian":
        return truth(state)[1]
    if transform == "vmap":
        return np.stack([truth("converged", 0)[0], truth("converged", 1)[0], J])
    return J


# ---------------------------------------------------------------------------------------
# The decorated solvers and the transformations
# ---------------------------------------------------------------------------------------


def objective(x, theta, B):
    # No `@`: torch's forward mode fails on an empty matmul inside torch.func.grad.
    return 0.5 * (x[:, None] * B * x[None, :]).sum() + 0.25 * (x**4).sum() - (theta * x).sum()


@functools.cache
def solver(linear_solver: str, check: str = "raise"):
    @dt.argmin(objective, linear_solver=linear_solver, check=check)
    def solve(init, theta, B):
        return init  # the prepared x*: every case is data

    return solve


def _tensor(array: np.ndarray) -> Any:
    return torch.as_tensor(np.ascontiguousarray(array), dtype=F64)


def arguments(state: str, transform: str) -> tuple[Any, ...]:
    if transform != "vmap":
        return tuple(map(_tensor, make_problem(state)))
    good = "zero_size" if state == "zero_size" else "converged"
    members = [make_problem(good, 0), make_problem(good, 1), make_problem(state)]
    return tuple(_tensor(np.stack(leaves)) for leaves in zip(*members, strict=True))


def apply(solve, transform: str, x0, theta, B):
    n = theta.shape[-1]
    w, v = _tensor(_W[:n]), _tensor(_V[:n])
    if transform in ("grad", "double_backward"):
        leaf = theta.clone().requires_grad_()
        first_order = transform == "grad"
        (g,) = torch.autograd.grad(w @ solve(x0, leaf, B), leaf, create_graph=not first_order)
        if first_order:
            return g
        if not g.requires_grad:  # a constant gradient (the empty case): torch's convention
            return torch.zeros_like(leaf)
        return torch.autograd.grad(g @ v, leaf)[0]
    if transform == "hessian":
        return torch.func.hessian(lambda t: (w * solve(x0, t, B)).sum())(theta)
    if transform == "jacrev":
        return torch.func.jacrev(solve, argnums=1)(x0, theta, B)
    if transform == "jacfwd":
        return torch.func.jacfwd(solve, argnums=1)(x0, theta, B)
    if transform == "vmap":
        return torch.func.vmap(torch.func.jacfwd(solve, argnums=1))(x0, theta, B)
    raise ValueError(transform)


def run(linear_solver: str, state: str, transform: str, check: str = "raise"):
    try:
        value = apply(solver(linear_solver, check), transform, *arguments(state, transform))
        return "value", value.detach().numpy()
    except Exception as err:  # the outcome is judged, whatever it is
        return "error", err


# ---------------------------------------------------------------------------------------
# What each cell must do, decided from the mathematics
# ---------------------------------------------------------------------------------------


class Expect(NamedTuple):
    value_rtol: float | None  # a number is acceptable if within this relative error
    reasons: frozenset[str]  # a refusal is acceptable with one of these codes
    pinv_rtol: float | None = None  # the minimum-norm derivative is acceptable (singular)


def expectation(linear_solver: str, state: str, transform: str) -> Expect:
    if state == "converged":
        return Expect(1e-6 if linear_solver in KRYLOV else 1e-10, frozenset())
    if state == "unconverged":
        return Expect(None, frozenset({"not_stationary"}))
    if state in ("nan_x", "nan_theta"):
        return Expect(None, frozenset({"nonfinite"}))
    if state in ("cond1e12", "cond1e15"):
        return Expect(1e-2 if transform in SECOND_ORDER else 1e-3, ILL)
    if state == "singular":
        first_order = transform not in SECOND_ORDER
        return Expect(
            None, ILL, pinv_rtol=1e-6 if linear_solver == "lstsq" and first_order else None
        )
    if state == "saddle":
        return Expect(None, frozenset({"not_minimum"}))
    if state == "zero_size":
        return Expect(0.0, frozenset())
    raise ValueError(state)


def _rel_error(value: np.ndarray, reference: np.ndarray) -> float:
    if reference.size == 0:
        return 0.0 if value.shape == reference.shape else np.inf
    return float(np.linalg.norm(value - reference) / np.linalg.norm(reference))


def _sentence(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err)[:300]}"


def judge(linear_solver: str, state: str, transform: str, outcome) -> None:
    expect = expectation(linear_solver, state, transform)
    kind, payload = outcome
    if kind == "value":
        truth_value = expected_value(state, transform)
        assert payload.shape == truth_value.shape, f"shape {payload.shape} ≠ {truth_value.shape}"
        if expect.pinv_rtol is not None:
            pinv_err = _rel_error(payload, expected_value(state, transform, pinv=True))
            assert pinv_err <= expect.pinv_rtol, (
                f"a number that is not the minimum-norm derivative: rel. error {pinv_err:.2g}"
            )
            return
        err = _rel_error(payload, truth_value)
        assert expect.value_rtol is not None, (
            f"returned a number silently where a refusal {sorted(expect.reasons)} is due: "
            f"‖value‖ = {np.linalg.norm(payload):.3g}, rel. error vs the truth {err:.2g}"
        )
        assert err <= expect.value_rtol, (
            f"returned a wrong number silently: rel. error {err:.2g} > {expect.value_rtol:g}"
        )
        return
    assert expect.reasons, f"refused a well-defined derivative: {_sentence(payload)}"
    assert isinstance(payload, dargmin.DargminError), f"not a typed refusal: {_sentence(payload)}"
    assert failure_reason(payload) in expect.reasons, (
        f"reason {failure_reason(payload)!r}, expected one of {sorted(expect.reasons)}: "
        f"{_sentence(payload)}"
    )
    assert str(payload).startswith("dargmin.argmin"), _sentence(payload)
    if transform == "vmap":
        assert re.search(rf"member \({BAD_MEMBER},\)", str(payload)), (
            f"the batch refusal does not name member {BAD_MEMBER}: {_sentence(payload)}"
        )


def _cells():
    for linear_solver in SOLVERS:
        for transform in TRANSFORMS:
            for state in STATES:
                yield pytest.param(
                    linear_solver, state, transform, id=f"{linear_solver}-{transform}-{state}"
                )


@pytest.mark.parametrize(("linear_solver", "state", "transform"), list(_cells()))
def test_matrix(linear_solver, state, transform):
    with warnings.catch_warnings():
        # A DargminWarning in raise mode would be a verdict not given: make it fail loudly.
        warnings.simplefilter("error", dargmin.DargminWarning)
        outcome = run(linear_solver, state, transform)
    judge(linear_solver, state, transform, outcome)


# ---------------------------------------------------------------------------------------
# Forward over forward: refused by design, for every solver (the message is documented)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("linear_solver", SOLVERS)
def test_forward_over_forward_is_refused(linear_solver):
    solve = solver(linear_solver)
    x0, theta, B = arguments("converged", "jacfwd")
    w = _tensor(_W)
    with pytest.raises(NotImplementedError, match="forward mode over forward mode"):
        torch.func.jacfwd(torch.func.jacfwd(lambda t: (w * solve(x0, t, B)).sum()))(theta)


# ---------------------------------------------------------------------------------------
# check="warn": a DargminWarning with the reason code and a measured number
# ---------------------------------------------------------------------------------------

WARN_SOLVERS = ("cholesky", "lstsq", "cg", "minres")
WARN_STATES = ("converged", "unconverged", "nan_theta", "cond1e15", "singular", "saddle")
# "‖g‖ = 1.73", "is -0.5", "at least 3e15", "left the residual at 0.518"
_MEASURED = re.compile(r"(=|\bis|\bleast|\bat)\s+-?\d")


def _warned_reason(texts: list[str]) -> str:
    """The reason code of the first DargminWarning, which must name a measured number."""
    assert texts, "no DargminWarning in warn mode"
    assert _MEASURED.search(texts[0]), f"the warning names no measured number: {texts[0][:300]}"
    match = re.search(r"\[reason: (\w+)\]", texts[0])
    return match.group(1) if match else f"no reason code in: {texts[0][:300]}"


@pytest.mark.parametrize("state", WARN_STATES)
@pytest.mark.parametrize("linear_solver", WARN_SOLVERS)
def test_warn_mode(linear_solver, state):
    expect = expectation(linear_solver, state, "jacrev")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcome = run(linear_solver, state, "jacrev", check="warn")
    texts = [str(w.message) for w in caught if issubclass(w.category, dargmin.DargminWarning)]
    if not expect.reasons:  # well posed: no warning, and the right number
        assert texts == [], f"false alarm: {texts[0][:300]}"
        judge(linear_solver, state, "jacrev", outcome)
        return
    assert _warned_reason(texts) in expect.reasons
    if outcome[0] == "error":  # warned, then refused: still typed, still the right code
        assert isinstance(outcome[1], dargmin.DargminError), _sentence(outcome[1])
        assert failure_reason(outcome[1]) in expect.reasons, _sentence(outcome[1])


# ---------------------------------------------------------------------------------------
# The truth itself, against finite differences of re-solving in numpy
# ---------------------------------------------------------------------------------------


def _newton_resolve(p: Problem, theta: np.ndarray) -> np.ndarray:
    """Re-solve ∇f = Bx + x³ − θ = 0 from x* by Newton's method in float64."""
    x = p.x0.copy()
    for _ in range(50):
        step = np.linalg.solve(p.B + 3.0 * np.diag(x**2), p.B @ x + x**3 - theta)
        x -= step
        if np.linalg.norm(step) <= 1e-15 * max(1.0, np.linalg.norm(x)):
            break
    return x


def test_truth_matches_finite_differences_of_resolving():
    p = make_problem("converged")
    J, hess = truth("converged")
    eye = np.eye(N)

    def jacobian_fd(theta: np.ndarray, h: float) -> np.ndarray:
        columns = [
            (_newton_resolve(p, theta + h * e) - _newton_resolve(p, theta - h * e)) / (2 * h)
            for e in eye
        ]
        return np.stack(columns, axis=1)

    # Central differences with one Richardson step (O(h⁴) truncation).
    jac_fd = (4 * jacobian_fd(p.theta, 1e-5) - jacobian_fd(p.theta, 2e-5)) / 3
    np.testing.assert_allclose(jac_fd, J, rtol=0, atol=1e-8 * np.abs(J).max())

    # ∂²s/∂θ² v as the difference of gradients along v (an independent second derivative),
    # with one Richardson step: x* is ~5e-2, so the truncation error of a plain central
    # difference at h = 1e-3 was 5e-3 relative (h = 1e-4 with Richardson: < 1e-6).
    def hv_fd(h: float) -> np.ndarray:
        grad_plus = jacobian_fd(p.theta + h * _V, 1e-5).T @ _W
        grad_minus = jacobian_fd(p.theta - h * _V, 1e-5).T @ _W
        return (grad_plus - grad_minus) / (2 * h)

    hv = (4 * hv_fd(1e-4) - hv_fd(2e-4)) / 3
    np.testing.assert_allclose(hv, hess @ _V, rtol=0, atol=1e-5 * np.abs(hess @ _V).max())
    # and the conditioning cases are what they claim to be
    for state in ("cond1e12", "cond1e15"):
        H = make_problem(state).B + 3.0 * np.diag(make_problem(state).x0 ** 2)
        condition = np.linalg.norm(H, 2) * np.linalg.norm(truth(state)[0], 2)
        assert condition == pytest.approx(float(state[4:]), rel=0.2)
