"""dargmin.imaging's derivatives on bad and borderline input: every cell of the grid

    {solve_jvp (forward-mode iterative), implicit_solver (fixed point)}
  × {converged, stopped early, NaN in y, θ ≤ 0 or non-finite, wrong shapes, huge θ, θ → 0}
  × {eager, jax.jit, jax.vmap over θ with one bad member, jax.jacfwd / jax.grad}

asserts exactly one of: the derivative is right (central finite differences of tight
re-solves, at a step checked against half of it, or a closed form), the typed refusal
(a DargminError with its reason code, wrapped by JAX under jit), or a DargminWarning that
names the numbers. Tiny problems (12 × 12 TV denoising, an 8-sample fused lasso): the grid
is about the verdicts, not the size.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dargmin.errors import DargminError, DargminWarning, failure_reason
from dargmin.imaging import (
    ChambollePock,
    FFTBlur,
    TVSecondOrder,
    generalized_lasso,
    implicit_solver,
    solve,
    solve_jvp,
    tv_deblurring,
    tv_denoising,
)

CFG = ChambollePock(tol=1e-9, max_iter=20_000)
EARLY = ChambollePock(tol=1e-9, max_iter=20)
TIGHT = ChambollePock(tol=1e-13, max_iter=200_000)
TV = tv_denoising()
FUSED = generalized_lasso(np.diff(np.eye(8), axis=0))
Y1 = np.array([0.0, 0.1, 0.0, 2.0, 2.1, 2.0, 1.0, 1.2])  # three pieces, jumps ≫ θ
HUGE, TINY = 1e3, 1e-6


def _image(n=12):
    x = np.zeros((n, n))
    x[3:9, 3:9] = 1.0
    return x + 0.2 * np.random.default_rng(3).normal(size=x.shape)


Y = _image()
Y_NAN = Y.copy()
Y_NAN[2, 5] = np.nan


def _quiet(f, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DargminWarning)
        return f(*a, **k)


@functools.cache
def _fd(theta: float, rel: float = 1e-3) -> np.ndarray:
    """``∂ŵ/∂θ`` of TV denoising by central differences of tight re-solves, at a step
    ``h = rel·θ`` checked against ``h/2`` (they agree: above rounding, below the next kink)."""

    def diff(h):
        up = _quiet(solve, TV, Y, theta + h, solver=TIGHT).w
        down = _quiet(solve, TV, Y, theta - h, solver=TIGHT).w
        return np.asarray(up - down) / (2 * h)

    fd, half = diff(rel * theta), diff(rel * theta / 2)
    scale = max(np.linalg.norm(fd), np.linalg.norm(Y - Y.mean()) / theta)
    assert np.linalg.norm(fd - half) <= 2e-4 * scale, "finite-difference step not checked"
    return fd


# The fused lasso's derivative in closed form: each flat piece moves by θ·(its number of
# lower neighbours − higher ones)/(its length). At θ = 0.2 the pieces are the three
# plateaus of Y1; at θ ≤ 0.02 every sample is its own piece (−Dᵀsign(Dy)).
_D = np.diff(np.eye(8), axis=0)
FUSED_02 = np.array([1 / 3] * 3 + [-2 / 3] * 3 + [0.5, 0.5])
FUSED_SMALL = -_D.T @ np.sign(_D @ Y1)


def _close(derivative, fd, rtol=2e-3):
    derivative = np.asarray(derivative).reshape(np.shape(fd))
    assert np.linalg.norm(derivative - fd) <= rtol * np.linalg.norm(fd), np.linalg.norm(
        derivative - fd
    ) / np.linalg.norm(fd)


def _refused(reason, f, *args, typed=True):
    with pytest.raises(Exception) as err:
        jax.block_until_ready(f(*args))
    assert failure_reason(err.value) == reason, str(err.value)[:300]
    if typed:  # eager: the dargmin type itself; under jit JAX wraps it (reason kept)
        assert isinstance(err.value, DargminError)
    return str(err.value)


# Each mode once: the compiled functions are shared by the cells (a compile costs seconds).
def _jvp(y, t, cfg=CFG):
    return solve_jvp(TV, y, t, solver=cfg).w_dot[0]


JIT_JVP = jax.jit(_jvp)
VMAP_JVP = jax.jit(jax.vmap(_jvp, in_axes=(None, 0)))
JACFWD = jax.jit(jax.jacfwd(lambda t, y: solve(TV, y, t, solver=CFG).w))
JIT_EARLY = jax.jit(functools.partial(_jvp, cfg=EARLY))
IMPLICIT = implicit_solver(FUSED, CFG)
IMP_JAC = jax.jacfwd(IMPLICIT)
IMP_JIT = jax.jit(IMP_JAC)
IMP_VMAP = jax.jit(jax.vmap(IMP_JAC, in_axes=(0, None)))


def _grad_implicit(t, y):
    # reverse mode through the implicit rule (dargmin.fixed_point transposes its solve)
    return jax.jacrev(IMPLICIT)(t, y)


# ------------------------------------------------------------------- solve_jvp: converged
def test_solve_jvp_converged_is_the_derivative_in_every_mode():
    fd = _fd(0.1)
    _close(_quiet(solve_jvp, TV, Y, 0.1, solver=CFG).w_dot[0], fd)  # eager
    _close(JIT_JVP(Y, jnp.array([0.1])), fd)  # jit
    both = VMAP_JVP(Y, jnp.array([[0.1], [0.05]]))  # vmap over θ
    _close(both[0], fd)
    _close(both[1], _fd(0.05))
    _close(JACFWD(jnp.array([0.1]), Y)[..., 0], fd)  # jacfwd through solve's loop


def test_solve_reverse_mode_is_refused_by_jax_not_answered():
    # The forward-mode loop has no transpose: JAX refuses (an internal assertion on the
    # warning's cond, or its while_loop message); implicit_solver supports jax.grad.
    with pytest.raises((ValueError, AssertionError)):
        jax.grad(lambda t: solve(TV, Y, t, solver=CFG).w.sum())(jnp.array([0.1]))


# --------------------------------------------------------------- solve_jvp: stopped early
def test_solve_jvp_stopped_early_warns_with_the_gap_in_every_mode():
    gap = r"stopped after 20 iterations with duality gap [0-9.e+-]+ \(relative [0-9.e+-]+\)"
    with pytest.warns(DargminWarning, match="solve_jvp: Chambolle–Pock " + gap):
        solve_jvp(TV, Y, 0.1, solver=EARLY)
    with pytest.warns(DargminWarning, match=gap):
        jax.block_until_ready(JIT_EARLY(Y, jnp.array([0.1])))
    # vmap: the member that stops early is named, the converged one (θ = TINY) is not
    # (θ = 0.1 needs 120 iterations to tol = 1e-6 here, θ = TINY 10)
    early = jax.jit(jax.vmap(functools.partial(_jvp, cfg=ChambollePock(tol=1e-6, max_iter=60))))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        jax.block_until_ready(early(jnp.stack([Y, Y]), jnp.array([[0.1], [TINY]])))
    texts = [str(w.message) for w in seen if "duality gap" in str(w.message)]
    assert texts and all("batch member (0,)" in t for t in texts), texts
    with pytest.warns(DargminWarning, match=gap):  # jacfwd through solve
        jax.jacfwd(lambda t: solve(TV, Y, t, solver=EARLY).w)(jnp.array([0.1]))


# ------------------------------------------------------------------ solve_jvp: NaN in y
def test_solve_jvp_nan_pixel_is_refused_in_every_mode():
    msg = _refused("nonfinite", solve_jvp, TV, Y_NAN, 0.1)
    assert "1 non-finite pixel(s) (first at index [2, 5])" in msg
    _refused("nonfinite", JIT_JVP, Y_NAN, jnp.array([0.1]), typed=False)
    batch = jax.jit(jax.vmap(_jvp))  # one bad image in a batch
    msg = _refused(
        "nonfinite", batch, jnp.stack([Y, Y_NAN]), jnp.array([[0.1], [0.1]]), typed=False
    )
    assert "batch member(s) (1,)" in msg
    _refused("nonfinite", JACFWD, jnp.array([0.1]), Y_NAN, typed=False)


# ---------------------------------------------------------------- solve_jvp: bad θ
@pytest.mark.parametrize(
    ("theta", "reason"),
    [(0.0, "out_of_domain"), (-0.1, "out_of_domain"), (np.inf, "nonfinite"), (np.nan, "nonfinite")],
)
def test_solve_jvp_bad_theta_is_refused_in_every_mode(theta, reason):
    msg = _refused(reason, solve_jvp, TV, Y, theta)
    assert "theta (the regularization weights) must be finite and > 0" in msg
    _refused(reason, JIT_JVP, Y, jnp.array([theta]), typed=False)
    msg = _refused(reason, VMAP_JVP, Y, jnp.array([[0.1], [theta]]), typed=False)
    assert "batch member(s) (1,)" in msg  # the bad member, named; not the good one
    _refused(reason, JACFWD, jnp.array([theta]), Y, typed=False)


# ------------------------------------------------------------- solve_jvp: wrong shapes
def test_solve_jvp_wrong_shapes_are_refused_while_tracing():
    blur = tv_deblurring(FFTBlur.gaussian((12, 12), 1.0))
    cases = [
        (lambda: solve_jvp(blur, np.ones((12, 13)), 0.1), "blur was built for (12, 12)"),
        (lambda: solve_jvp(TV, np.ones((12, 12, 3)), 0.1), "2-D grey image"),
        (lambda: solve_jvp(TV, Y, [0.1, 0.2]), "theta must have 1 entry"),
        (lambda: solve_jvp(TV, Y, 0.1, y_dots=np.ones((1, 12, 11))), "y_dots"),
        (lambda: solve_jvp(FUSED, np.ones(7), 0.1), "to match D of shape (7, 8)"),
        # the same refusals from inside jit / vmap / jacfwd (shapes are static)
        (lambda: JIT_JVP(np.ones((12, 12, 3)), jnp.array([0.1])), "2-D grey image"),
        (lambda: VMAP_JVP(Y, jnp.ones((2, 2))), "theta must have 1 entry"),
        (lambda: jax.jacfwd(lambda t: solve(blur, np.ones((13, 12)), t).w)(0.1), "blur"),
    ]
    for call, text in cases:
        msg = _refused("bad_shape", call)
        assert text in msg, msg


# ------------------------------------------------- solve_jvp: two weights (TV-TV²)
def test_second_order_tv_derivative_and_refusals_in_every_mode():
    # The two-weight penalty on its own operator: the θ-derivative against checked central
    # differences, eager and through one jit(vmap) program; a bad member of a batch named;
    # a one-entry θ and a 2 × 2 image refused while tracing; a NaN pixel refused.
    prob, theta = tv_denoising(TVSecondOrder()), np.array([0.08, 0.03])
    y8 = Y[2:10, 2:10]  # small: the checked differences need tight re-solves

    def derivative(th, y=y8):
        return solve_jvp(prob, y, th, solver=CFG).w_dot

    batched = jax.jit(jax.vmap(lambda th: derivative(th)))
    for j in range(2):
        e = np.zeros(2)
        e[j] = 1e-4 * theta[j]

        def diff(step, e=e):
            up = _quiet(solve, prob, y8, theta + step * e, solver=TIGHT).w
            down = _quiet(solve, prob, y8, theta - step * e, solver=TIGHT).w
            return np.asarray(up - down) / (2 * step * e[j])

        fd, half = diff(1.0), diff(0.5)
        assert np.linalg.norm(fd - half) <= 1e-3 * np.linalg.norm(fd), "step not checked"
        _close(_quiet(derivative, theta)[j], fd)
        _close(batched(jnp.stack([theta, 2 * theta]))[0, j], fd)
    msg = _refused("out_of_domain", batched, jnp.array([theta, [0.08, -0.01]]), typed=False)
    assert "batch member(s) (1,)" in msg
    assert "theta must have 2 entries" in _refused("bad_shape", derivative, np.array([0.1]))
    assert "at least 3 × 3" in _refused("bad_shape", derivative, theta, np.ones((2, 2)))
    _refused("nonfinite", derivative, theta, Y_NAN[:8, :8])


# ----------------------------------------------------------------- solve_jvp: huge θ
def test_solve_jvp_huge_theta_constant_solution_has_zero_derivative():
    # Above the largest useful weight the solution is the mean: ∂ŵ/∂θ = 0 exactly.
    scale = np.linalg.norm(Y - Y.mean()) / HUGE  # ‖ŵ − y‖/θ, the derivative's natural size
    fd = _fd(HUGE)
    res = solve_jvp(TV, Y, HUGE, solver=CFG)
    assert float(jnp.ptp(res.w)) < 1e-8 and np.linalg.norm(fd) <= 1e-6 * scale
    modes = (JIT_JVP(Y, jnp.array([HUGE])), VMAP_JVP(Y, jnp.array([[0.1], [HUGE]]))[1],
             JACFWD(jnp.array([HUGE]), Y)[..., 0])  # fmt: skip
    for d in (res.w_dot[0], *modes):
        assert float(jnp.linalg.norm(d)) <= 1e-6 * scale


# ----------------------------------------------------------------- solve_jvp: θ → 0
def test_solve_jvp_theta_near_zero_warns_then_is_right_with_tangent_tol():
    # At θ → 0, P(ŵ) ∝ θ: the relative gap certifies w but not w − y ∝ θ, and the iterate's
    # derivative after the few iterations the gap needs is off (measured: 1.5 %). Warned:
    fd = _fd(TINY, rel=0.05)
    moving = r"tangents still changed by [0-9.e+-]+ \(relative\) over the last 10 iterations"
    with pytest.warns(DargminWarning, match=moving):
        solve_jvp(TV, Y, TINY, solver=CFG)
    with pytest.warns(DargminWarning, match=moving):
        jax.block_until_ready(JIT_JVP(Y, jnp.array([TINY])))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        jax.block_until_ready(VMAP_JVP(Y, jnp.array([[0.1], [TINY]])))
    texts = [str(w.message) for w in seen if "tangents still changed" in str(w.message)]
    assert texts and all("batch member (1,)" in t for t in texts), texts
    with pytest.warns(DargminWarning, match=moving):  # jacfwd through solve: the same rule
        jax.block_until_ready(JACFWD(jnp.array([TINY]), Y))
    # ... and with tangent_tol the loop runs until the tangents settle: the derivative.
    settled = ChambollePock(tol=1e-9, max_iter=20_000, tangent_tol=1e-6)
    _close(solve_jvp(TV, Y, TINY, solver=settled).w_dot[0], fd, rtol=2e-3)
    # θ = 0 itself is outside the domain (refused above); the limit is y, reached:
    assert float(jnp.max(jnp.abs(solve(TV, Y, TINY, solver=CFG).w - Y))) < 1e-4


# ------------------------------------------------------------------------ implicit_solver
def test_implicit_converged_is_the_derivative_in_every_mode():
    w = np.asarray(IMPLICIT(jnp.array([0.2]), Y1))  # the closed form's premise: 3 plateaus
    assert (
        max(np.ptp(w[:3]), np.ptp(w[3:6]), np.ptp(w[6:]))
        < 1e-6
        < np.min(np.abs(np.diff(w)[[2, 5]]))
    )
    _close(IMP_JAC(jnp.array([0.2]), Y1)[:, 0], FUSED_02, rtol=1e-6)  # eager
    _close(IMP_JIT(jnp.array([0.2]), Y1)[:, 0], FUSED_02, rtol=1e-6)  # jit
    both = IMP_VMAP(jnp.array([[0.2], [0.02]]), Y1)  # vmap over θ
    _close(both[0, :, 0], FUSED_02, rtol=1e-6)
    _close(both[1, :, 0], FUSED_SMALL, rtol=1e-6)
    _close(_grad_implicit(jnp.array([0.2]), Y1)[:, 0], FUSED_02, rtol=1e-6)  # reverse mode


def test_implicit_on_2d_tv_singular_system_refused_or_minimum_norm_derivative():
    # 2-D TV: Dᵀ = −div has a kernel, the dual is not unique and (I − ∂T) is singular. The
    # default (dense here) solve refuses it; the minimum-norm solve warns with its rank and
    # its w part is the derivative (central differences of tight re-solves, step checked).
    y, theta = Y[3:9, 2:8], 0.2
    _refused("singular", jax.jacfwd(implicit_solver(TV, CFG)), jnp.array([theta]), y)
    with pytest.warns(DargminWarning, match="least-squares .* used rank"):
        f = implicit_solver(TV, CFG, linear_solver="lstsq")
        d = jax.jacfwd(f)(jnp.array([theta]), y)[..., 0]

    def diff(h):
        up, down = (_quiet(solve, TV, y, theta + s * h, solver=TIGHT).w for s in (1, -1))
        return np.asarray(up - down) / (2 * h)

    fd = diff(1e-4 * theta)
    assert np.linalg.norm(fd - diff(5e-5 * theta)) <= 1e-6 * np.linalg.norm(fd)
    _close(d, fd, rtol=1e-4)


def test_implicit_stopped_early_warns_and_its_derivative_is_refused():
    f = implicit_solver(FUSED, ChambollePock(tol=1e-12, max_iter=10))
    with pytest.warns(DargminWarning, match="implicit_solver: Chambolle–Pock stopped after 10"):
        jax.block_until_ready(f(jnp.array([0.2]), Y1))
    with pytest.warns(DargminWarning, match="duality gap"):
        _refused("not_stationary", jax.jacfwd(f), jnp.array([0.2]), Y1)
    with pytest.warns(DargminWarning, match="duality gap"):
        _refused("not_stationary", jax.jit(jax.jacfwd(f)), jnp.array([0.2]), Y1, typed=False)


@pytest.mark.parametrize(
    ("theta", "y", "reason"),
    [(0.2, np.where(np.arange(8) == 4, np.nan, Y1), "nonfinite"), (-0.2, Y1, "out_of_domain"),
     (np.inf, Y1, "nonfinite")],
)  # fmt: skip
def test_implicit_bad_input_is_refused_in_every_mode(theta, y, reason):
    # Before this grid, the primal at θ < 0 was a silent number and NaN pixels a silent NaN.
    _refused(reason, IMPLICIT, jnp.array([theta]), y)  # eager, no derivative asked
    _refused(reason, IMP_JAC, jnp.array([theta]), y)
    _refused(reason, IMP_JIT, jnp.array([theta]), y, typed=False)
    msg = _refused(reason, IMP_VMAP, jnp.array([[0.2], [theta]]), y, typed=False)
    assert "batch member(s)" in msg
    _refused(reason, _grad_implicit, jnp.array([theta]), y)


def test_implicit_wrong_shapes_are_refused():
    _refused("bad_shape", IMPLICIT, jnp.array([0.2]), Y1[:7])
    _refused("bad_shape", IMP_JIT, jnp.array([0.2, 0.1]), Y1)
    _refused("bad_shape", IMP_VMAP, jnp.ones((2, 2)), Y1)


def test_implicit_theta_limits_match_closed_forms():
    # θ → 0: ŵ = y − θDᵀsign(Dy), so ∂ŵ/∂θ = −Dᵀsign(Dy); huge θ: the mean, derivative 0.
    closed = FUSED_SMALL
    for d in (IMP_JAC(jnp.array([1e-7]), Y1), IMP_JIT(jnp.array([1e-7]), Y1),
              IMP_VMAP(jnp.array([[0.2], [1e-7]]), Y1)[1]):  # fmt: skip
        np.testing.assert_allclose(np.asarray(d)[:, 0], closed, atol=1e-6)
    for d in (IMP_JAC(jnp.array([HUGE]), Y1), IMP_VMAP(jnp.array([[0.2], [HUGE]]), Y1)[1],
              _grad_implicit(jnp.array([HUGE]), Y1)):  # fmt: skip
        assert float(jnp.max(jnp.abs(d))) < 1e-9
    np.testing.assert_allclose(IMPLICIT(jnp.array([HUGE]), Y1), np.full(8, Y1.mean()), atol=1e-9)
