"""The batched QP layer (dargmin.constrained.solve_qp).

Truths: central differences of re-solves (by an independent solver, SciPy's trust-constr,
where the solve itself is also compared), an external solver's duals (Clarabel) giving the
same derivative, a peer layer (cvxpylayers) where installed, and the refusals.
"""

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dargmin.constrained import (
    Clarabel,
    DegenerateActiveSetError,
    InfeasibleSolutionError,
    solve_qp,
)
from dargmin.errors import failure_reason


def random_qp(seed, n=6, batch=()):
    """qpth's setting: Q = LLᵀ + 1e-3 I, n/2 inequalities, n/5 equalities, feasible."""
    rng = np.random.default_rng(seed)
    m, p = n // 2, max(n // 5, 1)
    L = rng.standard_normal((*batch, n, n))
    Q = L @ np.swapaxes(L, -1, -2) + 1e-3 * np.eye(n)
    q = rng.standard_normal((*batch, n))
    A = rng.standard_normal((*batch, p, n))
    x0 = rng.standard_normal((*batch, n))
    G = rng.standard_normal((*batch, m, n))
    b = np.einsum("...ij,...j->...i", A, x0)
    h = np.einsum("...ij,...j->...i", G, x0) + rng.uniform(size=(*batch, m))
    return tuple(jnp.asarray(v) for v in (Q, q, A, b, G, h))


def scipy_qp(Q, q, A, b, G, h):
    """An independent solver (SciPy trust-constr): the re-solves of the differences."""
    from scipy.optimize import LinearConstraint, minimize

    Q, q, A, b, G, h = (np.asarray(v) for v in (Q, q, A, b, G, h))
    constraints = [LinearConstraint(A, b, b), LinearConstraint(G, -np.inf, h)]
    res = minimize(
        lambda x: 0.5 * x @ Q @ x + q @ x,
        np.zeros(q.size),
        jac=lambda x: Q @ x + q,
        hess=lambda x: Q,
        constraints=constraints,
        method="trust-constr",
        options={"gtol": 1e-13, "xtol": 1e-13, "maxiter": 5000},
    )
    return res.x


PROBLEM = random_qp(0)

_CALLED = r"(?:body|condition|to_apply|calls|branch_computations)=\{?((?:%?[\w.\-]+(?:, )?)+)"


def independent_lapack_calls(hlo: str) -> list[tuple[str, str]]:
    """Pairs of LAPACK custom calls (or control-flow ops whose computations hold one) in
    the same HLO computation with no data path between them: XLA:CPU may run those at once."""
    comps = re.split(r"\n(?=(?:ENTRY )?%?[\w.\-]+ \(.*\) -> .*\{\n)", hlo)

    def name(comp: str) -> str:
        head = comp.split(" ", 2)
        return (head[1] if head[0] == "ENTRY" else head[0]).lstrip("%")

    def called(text: str) -> set[str]:
        return {c.strip().lstrip("%") for g in re.findall(_CALLED, text) for c in g.split(",")}

    holds = {name(c): "lapack_" in c for c in comps}
    calls = {name(c): called(c) for c in comps}
    for _ in comps:  # propagate through nested computations
        holds = {c: holds[c] or any(holds.get(x, False) for x in calls[c]) for c in holds}
    found = []
    for comp in comps:
        deps, nodes = {}, []
        for line in comp.split("\n")[1:]:
            match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)", line)
            if not match:
                continue
            var, rest = match.groups()
            deps[var] = set(re.findall(r"%([\w.\-]+)", rest))
            if "lapack_" in rest or any(holds.get(x, False) for x in called(rest)):
                nodes.append(var)

        def ancestors(var: str) -> set[str]:
            seen, stack = set(), list(deps.get(var, ()))
            while stack:
                u = stack.pop()
                if u not in seen:
                    seen.add(u)
                    stack.extend(deps.get(u, ()))
            return seen

        up = {v: ancestors(v) for v in nodes}
        found += [
            (a, b) for a, b in itertools.combinations(nodes, 2) if a not in up[b] and b not in up[a]
        ]
    return found


def test_solution_matches_scipy_and_converges():
    sol = solve_qp(*PROBLEM)
    assert bool(sol.info.converged)
    assert float(sol.info.primal_residual) < 1e-10 and float(sol.info.dual_residual) < 1e-9
    np.testing.assert_allclose(sol.x, scipy_qp(*PROBLEM), atol=1e-6)
    assert float(jnp.min(sol.ineq_dual)) >= 0.0


def test_derivatives_in_every_argument_match_differences_of_resolves():
    # Reverse mode in all six arguments at once, and forward mode along one direction in
    # all of them, against central differences of SciPy re-solves (an independent solver).
    rng = np.random.default_rng(1)
    weights = jnp.asarray(rng.standard_normal(PROBLEM[1].size))
    directions = [rng.standard_normal(a.shape) for a in PROBLEM]
    directions[0] = directions[0] + directions[0].T  # Q enters through its symmetric part

    def loss(*args):
        return weights @ solve_qp(*args).x

    grads = jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))(*PROBLEM)
    tangent = jax.jvp(loss, PROBLEM, tuple(jnp.asarray(d) for d in directions))[1]
    step = 1e-5

    def difference(which):
        values = []
        for sign in (1, -1):
            args = [np.asarray(a) for a in PROBLEM]
            for i in which:
                args[i] = args[i] + sign * step * directions[i]
            values.append(float(np.asarray(weights) @ scipy_qp(*args)))
        return (values[0] - values[1]) / (2 * step)

    for i in range(6):
        got = float(jnp.vdot(grads[i], directions[i]))
        np.testing.assert_allclose(got, difference([i]), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(tangent), difference(range(6)), rtol=1e-4, atol=1e-6)


def test_batched_reverse_agrees_with_member_and_external_solver():
    batch = random_qp(3, n=5, batch=(3,))
    Q, q, A, b, G, h = batch

    def loss(q, h, solver=None):
        return solve_qp(Q, q, A, b, G, h, solver=solver).x.sum()

    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
    grads = grad_fn(q, h)
    # No two batched LAPACK calls may run side by side (jaxlib 0.10's batched kernels
    # deadlock XLA's CPU thread pool then): every pair must be ordered by a data path.
    assert independent_lapack_calls(grad_fn.lower(q, h).compile().as_text()) == []
    member = jax.grad(lambda q, h: solve_qp(Q[1], q, A[1], b[1], G[1], h).x.sum(), argnums=(0, 1))(
        q[1], h[1]
    )
    np.testing.assert_allclose(grads[0][1], member[0], atol=1e-9)
    np.testing.assert_allclose(grads[1][1], member[1], atol=1e-9)
    pytest.importorskip("clarabel")
    external = jax.grad(lambda q, h: loss(q, h, Clarabel()), argnums=(0, 1))(q, h)
    np.testing.assert_allclose(external[0], grads[0], atol=1e-7)
    np.testing.assert_allclose(external[1], grads[1], atol=1e-7)


def test_a_batch_whose_polish_is_compacted_agrees_with_its_members():
    # Batch 40 at n = 30: the polish's members need different numbers of active-set
    # corrections, so its later stages run on gathered subsets (_compaction). Each member
    # must come out as when solved alone, and the LAPACK calls must stay in one chain.
    Q, q, A, b, G, h = random_qp(7, n=30, batch=(40,))

    def loss(q, h):
        return solve_qp(Q, q, A, b, G, h).x.sum()

    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
    assert independent_lapack_calls(grad_fn.lower(q, h).compile().as_text()) == []
    batched = jax.jit(solve_qp)(Q, q, A, b, G, h)
    assert bool(jnp.all(batched.info.converged))
    grads = grad_fn(q, h)
    for i in range(0, 40, 3):
        alone = solve_qp(Q[i], q[i], A[i], b[i], G[i], h[i])
        np.testing.assert_allclose(batched.x[i], alone.x, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(batched.ineq_dual[i], alone.ineq_dual, rtol=1e-8, atol=1e-9)
        member = jax.grad(
            lambda q, h, i=i: solve_qp(Q[i], q, A[i], b[i], G[i], h).x.sum(), argnums=(0, 1)
        )(q[i], h[i])
        np.testing.assert_allclose(grads[0][i], member[0], rtol=1e-8, atol=1e-9)
        np.testing.assert_allclose(grads[1][i], member[1], rtol=1e-8, atol=1e-9)


def test_agrees_with_cvxpylayers():
    cp = pytest.importorskip("cvxpy")
    layers = pytest.importorskip("cvxpylayers.jax")
    Q, q, A, b, G, h = PROBLEM
    n = q.size
    x = cp.Variable(n)
    q_p, h_p = cp.Parameter(n), cp.Parameter(h.size)
    Q_half = np.linalg.cholesky(np.asarray(Q))
    problem = cp.Problem(
        cp.Minimize(0.5 * cp.sum_squares(Q_half.T @ x) + q_p @ x),
        [np.asarray(A) @ x == np.asarray(b), np.asarray(G) @ x <= h_p],
    )
    layer = layers.CvxpyLayer(problem, parameters=[q_p, h_p], variables=[x])
    theirs = jax.grad(lambda q, h: layer(q, h)[0].sum(), argnums=(0, 1))(q, h)
    ours = jax.grad(lambda q, h: solve_qp(Q, q, A, b, G, h).x.sum(), argnums=(0, 1))(q, h)
    # cvxpylayers solves with SCS/Clarabel to ~1e-8 and differentiates with diffcp's LSQR
    np.testing.assert_allclose(theirs[0], ours[0], atol=1e-4)
    np.testing.assert_allclose(theirs[1], ours[1], atol=1e-4)


def test_linear_program_takes_the_primal_path_with_exact_derivative():
    # Q = 0 (no Cholesky): min cᵀx s.t. Σx = t, 0 ≤ x ≤ 1 with c increasing fills the
    # cheapest coordinates: x = (1, t − 1, 0) for 1 < t < 2, so dx/dt = (0, 1, 0).
    c, t = jnp.array([1.0, 2.0, 3.0]), jnp.array([1.5])
    G, h = jnp.concatenate([jnp.eye(3), -jnp.eye(3)]), jnp.concatenate([jnp.ones(3), jnp.zeros(3)])

    def x_of(t):
        return solve_qp(jnp.zeros((3, 3)), c, jnp.ones((1, 3)), t, G, h).x

    sol = solve_qp(jnp.zeros((3, 3)), c, jnp.ones((1, 3)), t, G, h)
    assert bool(sol.info.converged)
    np.testing.assert_allclose(sol.x, [1.0, 0.5, 0.0], atol=1e-9)
    np.testing.assert_allclose(jax.jacobian(x_of)(t)[:, 0], [0.0, 1.0, 0.0], atol=1e-9)


def test_refusals_infeasible_and_degenerate():
    # Both instances have two inequalities (one compilation serves both).
    Q, q = jnp.eye(2), jnp.array([-1.0, -1.0])
    # infeasible: x₁ ≤ -1 and -x₁ ≤ -1
    G, h = jnp.array([[1.0, 0.0], [-1.0, 0.0]]), jnp.array([-1.0, -1.0])
    sol = solve_qp(Q, q, G=G, h=h)
    assert not bool(sol.info.converged)
    with pytest.raises(InfeasibleSolutionError, match="not feasible"):
        jax.grad(lambda h: solve_qp(Q, q, G=G, h=h).x.sum())(h)
    # weakly active: the unconstrained minimizer (1, 1) lies on x₁ + x₂ ≤ 2 (x₁ ≥ -10 idle)
    G, h = jnp.array([[1.0, 1.0], [-1.0, 0.0]]), jnp.array([2.0, 10.0])
    with pytest.raises(DegenerateActiveSetError, match=r"multiplier λ = .* slack") as info:
        jax.grad(lambda h: solve_qp(Q, q, G=G, h=h).x.sum())(h)
    assert failure_reason(info.value) == "degenerate"
    # one-sided derivatives on request: active branch (h decreasing) and inactive (increasing)
    active = jax.grad(lambda h: solve_qp(Q, q, G=G, h=h, degenerate="active").x.sum())(h)
    inactive = jax.grad(lambda h: solve_qp(Q, q, G=G, h=h, degenerate="inactive").x.sum())(h)
    np.testing.assert_allclose(active, [1.0, 0.0], atol=1e-8)  # x = (h/2, h/2) while active
    np.testing.assert_allclose(inactive, [0.0, 0.0], atol=1e-8)


def test_float32_batch_converges_and_agrees_with_float64():
    # float32 (tolerances 1e-5 / 1e-7, scaled by ‖Q‖∞, ‖C‖∞ and ‖x‖∞): every member
    # converges in a few iterations, and the solution and its gradient agree with the
    # float64 ones to float32 accuracy. Before the tests scaled with the data, 7 of these
    # 8 members ended with info.converged false (6 at the iteration limit of 60).
    first, second = random_qp(1, n=30, batch=(4,)), random_qp(2, n=30, batch=(4,))
    problem = tuple(np.concatenate([a, b]) for a, b in zip(first, second, strict=True))
    p64 = tuple(jnp.asarray(a, jnp.float64) for a in problem)
    p32 = tuple(jnp.asarray(a, jnp.float32) for a in problem)
    s64, s32 = solve_qp(*p64), solve_qp(*p32)
    assert s32.x.dtype == jnp.float32
    assert bool(jnp.all(s32.info.converged)) and int(jnp.max(s32.info.iterations)) <= 10
    scale = float(jnp.max(jnp.abs(s64.x)))
    assert float(jnp.max(jnp.abs(s32.x - s64.x))) <= 1e-5 * scale

    def grad(args):
        return jax.grad(lambda q: solve_qp(args[0], q, *args[2:]).x.sum())(args[1])

    g64, g32 = grad(p64), grad(p32)
    assert float(jnp.max(jnp.abs(g32 - g64))) <= 1e-4 * float(jnp.max(jnp.abs(g64)))


def _qp_with_multipliers(seed, n, lam_active):
    """A QP whose solution x* and multipliers are chosen: ``len(lam_active)`` active
    inequalities with those multipliers (λ = 0: weakly active), the others inactive."""
    rng = np.random.default_rng(seed)
    L = rng.standard_normal((n, n))
    Q = L @ L.T + 1e-3 * np.eye(n)
    x, G = rng.standard_normal(n), rng.standard_normal((n // 2, n))
    lam = np.zeros(n // 2)
    lam[: len(lam_active)] = lam_active
    h = G @ x + np.where(np.arange(n // 2) < len(lam_active), 0.0, rng.uniform(0.5, 1.5, n // 2))
    q = -Q @ x - G.T @ lam
    return Q, q, G, h


def test_float32_degeneracy_threshold_refuses_weak_activity_only():
    # float32's degeneracy tolerance (1e-4 relative): an active constraint with a small but
    # genuine multiplier (3e-4 of the largest) is differentiated, its gradient equal to
    # float64's to float32 accuracy (the 1e-3 default refused such members of 1 batch in
    # 16 at n = 100); a constraint active with λ = 0 is still refused in float32.
    Q, q, G, h = _qp_with_multipliers(0, 30, [3.0, 1.0, 3.0 * 3e-4])

    def grad(dtype):
        args = [jnp.asarray(a, dtype) for a in (Q, q, G, h)]
        return jax.grad(lambda q_: solve_qp(args[0], q_, G=args[2], h=args[3]).x.sum())(args[1])

    g64, g32 = grad(jnp.float64), grad(jnp.float32)
    assert float(jnp.max(jnp.abs(g32 - g64))) <= 1e-3 * float(jnp.max(jnp.abs(g64)))
    Q, q, G, h = _qp_with_multipliers(0, 30, [3.0, 1.0, 0.0])
    with pytest.raises(DegenerateActiveSetError, match="weakly active"):
        grad(jnp.float32)


def test_float32_products_are_full_precision():
    # GPUs run float32 matrix products in TF32 by default; the interior point then stalled
    # (an H200, n = 100: equality violation 61). Every product of the solve and of its
    # derivative is lowered at full precision (the CPU ignores the setting, so the
    # lowering, not a GPU run, is the check).
    args = [jnp.asarray(a, jnp.float32) for a in random_qp(0, n=6, batch=(3,))]

    def loss_grad(*a):
        return jax.grad(lambda q: solve_qp(a[0], q, *a[2:]).x.sum())(a[1])

    text = jax.jit(loss_grad).lower(*args).as_text()
    dots = re.findall(r"stablehlo\.dot_general.*", text)
    assert dots and all("HIGHEST" in d for d in dots)


def test_licq_bound_from_the_factors_is_a_lower_bound_and_dependent_rows_are_named():
    # The KKT check skips its SVD when the derivative's factors certify σ_min/σ_max of
    # the active rows above the rank tolerance. Truth: the SVD of those rows.
    from dargmin.constrained import ConstraintQualificationError
    from dargmin.constrained._qp_derivative import _factorize, qp_duals_and_mask
    from dargmin.constrained._settings import KKTSettings

    args = random_qp(3, n=20, batch=(6,))
    sol = solve_qp(*args)

    def bound_and_truth(x, nu, lam, *data):
        nu, lam, mask = qp_duals_and_mask(KKTSettings(), x, nu, lam, data)
        factors = _factorize(mask, data)
        sigma = jnp.linalg.svd(factors.c, compute_uv=False)  # rows off the set are zero
        n_active = data[2].shape[0] + jnp.sum(mask).astype(int)
        return factors.licq, sigma[n_active - 1] / sigma[0]

    bound, truth = jax.vmap(bound_and_truth)(sol.x, sol.eq_dual, sol.ineq_dual, *args)
    assert bool(jnp.all(bound >= 1e-9))  # certified: these members skip the SVD
    assert bool(jnp.all(bound <= truth))
    # A duplicated active row: S is singular, but rounding leaves its computed smallest
    # eigenvalue near 1e-16; the bound must not certify it (the SVD names LICQ, with
    # the rank), in a batch beside a regular member, eagerly and under jit.
    Q, q = jnp.eye(2), jnp.array([-1.0, -1.0])
    G = jnp.array([[[1.0, 1.0], [1.0, 1.0], [-1.0, 0.0]], [[1.0, 1.0], [1.0, -1.0], [-1.0, 0.0]]])
    h = jnp.array([[1.0, 1.0, 10.0], [1.0, 5.0, 10.0]])

    def loss(h):
        return solve_qp(Q, q, G=G, h=h).x.sum()

    with pytest.raises(ConstraintQualificationError, match=r"LICQ.*rank 1") as info:
        jax.grad(loss)(h)
    assert failure_reason(info.value) == "licq"
    # Under jit, a refusal inside the compiled backward pass reaches the user as JAX's
    # runtime error, with the same message and reason.
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"LICQ.*rank 1") as info:
        jax.jit(jax.grad(loss))(h)
    assert failure_reason(info.value) == "licq"


def test_licq_certificate_never_exceeds_the_svd_across_conditioning():
    # The certificate from shifted Cholesky factorizations (no inverse) must stay a lower
    # bound of σ_min/σ_max of the active rows, on both factor paths (the forward's reused
    # factors and the augmented ones), from well conditioned rows to dependent ones and
    # with an ill-conditioned Q. Truth: the SVD of the active rows.
    from dargmin.constrained import InteriorPoint
    from dargmin.constrained._qp_derivative import _factorize, qp_duals_and_mask
    from dargmin.constrained._settings import KKTSettings

    rng = np.random.default_rng(7)
    n, p, m = 12, 4, 6
    certified = 0  # of the regular case's two paths
    for ratio, q_floor in itertools.product([1e-1, 1e-4, 1e-7, 1e-10, 1e-13], [1e-3, 1e-9]):
        # Equality rows with singular values from 1 down to `ratio`.
        u, _ = np.linalg.qr(rng.standard_normal((p, p)))
        w, _ = np.linalg.qr(rng.standard_normal((n, p)))
        A = u @ np.diag(np.geomspace(1.0, ratio, p)) @ w.T
        L = rng.standard_normal((n, n))
        eigvecs, _ = np.linalg.qr(L)
        Q = eigvecs @ np.diag(np.geomspace(10.0, q_floor, n)) @ eigvecs.T
        Q = 0.5 * (Q + Q.T)
        x0 = rng.standard_normal(n)
        G = rng.standard_normal((m, n))
        args = tuple(
            jnp.asarray(v)
            for v in (Q, rng.standard_normal(n), A, A @ x0, G, G @ x0 + rng.uniform(size=m))
        )
        x, nu, lam, _, reuse = InteriorPoint().solve_and_factor(*args)
        nu, lam, mask = qp_duals_and_mask(KKTSettings(), x, nu, lam, args)
        for factors in (_factorize(mask, args, reuse), _factorize(mask, args)):
            sigma = np.linalg.svd(np.asarray(factors.c), compute_uv=False)
            n_active = p + int(np.sum(np.asarray(mask)))
            truth = sigma[n_active - 1] / sigma[0]
            bound = float(factors.licq)
            assert np.isnan(bound) or bound <= truth, (ratio, q_floor, bound, truth)
            if (ratio, q_floor) == (1e-1, 1e-3):
                certified += bool(bound >= 1e-9)
    # The regular case is certified (the SVD skipped), on both paths.
    assert certified == 2


def test_active_set_corrections_cut_iterations_and_keep_the_solution():
    # Truth: the interior point without corrections (its solution and gradient are
    # checked against SciPy and central differences above). The corrections (drop a
    # negative multiplier, add a violated row, solve again) only change when the polish
    # succeeds: the same point, in fewer iterations.
    from dargmin.constrained import InteriorPoint

    args = random_qp(4, n=20, batch=(8,))

    def solve_and_grad(solver):
        # One trace per solver: the solution (aux) and the gradient in h together.
        def loss(h):
            sol = solve_qp(*args[:5], h, solver=solver)
            return sol.x.sum(), sol

        (_, sol), grad = jax.value_and_grad(loss, has_aux=True)(args[5])
        return sol, grad

    plain, plain_grad = solve_and_grad(InteriorPoint(corrections=0))
    fast, fast_grad = solve_and_grad(InteriorPoint())
    assert bool(jnp.all(plain.info.converged)) and bool(jnp.all(fast.info.converged))
    assert int(jnp.max(fast.info.iterations)) <= 2 < int(jnp.max(plain.info.iterations))
    scale = float(jnp.max(jnp.abs(plain.x)))
    np.testing.assert_allclose(fast.x, plain.x, atol=1e-9 * scale)
    np.testing.assert_allclose(fast.ineq_dual, plain.ineq_dual, atol=1e-8 * scale)
    np.testing.assert_allclose(fast_grad, plain_grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("semidefinite", [False, True], ids=["factors-reused", "augmented"])
def test_second_derivative_in_q_matches_differences_of_the_gradient(semidefinite):
    """x*(Q) is nonlinear in Q on a fixed active set: the Hessian of Σ x*² along a
    direction E of Q (forward over reverse) against central differences of the reverse
    gradient (the check's host callback must stay out of the differentiation). A positive
    definite Q takes the derivative that reuses the interior point's factors of Q; a
    semidefinite Q (rank n-1, still a unique minimizer on the constraints) the augmented
    factorization."""
    Q, q, A, b, G, h = random_qp(3, n=8)
    if semidefinite:
        w, U = np.linalg.eigh(np.asarray(Q))
        w[0] = 0.0
        Q = jnp.asarray((U * w) @ U.T)
    E = jnp.asarray(np.random.default_rng(4).standard_normal((8, 8)))

    def loss(t):
        return jnp.sum(solve_qp(Q + t * E, q, A, b, G, h).x ** 2)

    grad = jax.grad(loss)
    second = jax.jacfwd(grad)
    step = 1e-4
    differences = (grad(step) - grad(-step)) / (2 * step)
    assert abs(float(second(0.0))) > 1e-3  # not trivially zero
    np.testing.assert_allclose(second(0.0), differences, rtol=1e-6)


def test_a_skew_part_of_q_changes_nothing_even_in_one_member_of_a_batch():
    """xᵀQx sees only ½(Q + Qᵀ): adding a skew-symmetric matrix to one member of a batch
    (the solver factorizes ½(Q + Qᵀ), formed in the copy to LAPACK's layout) leaves every
    solution and gradient as it was."""
    Q, q, A, b, G, h = random_qp(5, n=12, batch=(3,))
    skew = np.random.default_rng(6).standard_normal((12, 12))
    Q_skewed = Q.at[1].add(jnp.asarray(skew - skew.T))

    def solve_and_grad(Q):
        sol = solve_qp(Q, q, A, b, G, h)
        grad = jax.grad(lambda q: solve_qp(Q, q, A, b, G, h).x.sum())(q)
        return sol.x, grad

    x, grad = solve_and_grad(Q)
    x_skewed, grad_skewed = solve_and_grad(Q_skewed)
    np.testing.assert_allclose(x_skewed, x, atol=1e-9)
    np.testing.assert_allclose(grad_skewed, grad, atol=1e-9)


def test_an_external_solver_reports_the_residual_of_the_symmetric_part_of_q():
    """An external solver gets the caller's Q: with a skew part added, its reported dual
    residual must still be that of ½(Q + Qᵀ), and its solution the same."""
    pytest.importorskip("clarabel")
    Q, q, A, b, G, h = random_qp(5, n=12)
    skew = np.random.default_rng(6).standard_normal((12, 12))
    x = solve_qp(Q, q, A, b, G, h).x
    external = solve_qp(Q + jnp.asarray(skew - skew.T), q, A, b, G, h, solver=Clarabel())
    np.testing.assert_allclose(external.x, x, atol=1e-6)
    assert float(external.info.dual_residual) < 1e-6
