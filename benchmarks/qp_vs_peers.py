"""QP layers: dargmin.constrained.solve_qp vs qpth, cvxpylayers and jaxopt.OSQP.

Random strictly convex QPs in qpth's setting: ``Q = LLᵀ + 1e-3·I`` (``L`` standard
Gaussian), ``n`` variables, ``n/2`` inequalities ``Gx ≤ h`` and ``n/5`` equalities
``Ax = b``, feasible by construction (``b = Ax₀``, ``h = Gx₀ + u``, ``u ~ U(0, 1)``).
For each size and batch, every installed library (peers with their default settings):

* ms per forward solve and per forward + backward (gradient of ``Σx`` in all arguments),
  one thread (XLA and torch pinned to one), median of repeats after a warm-up call;
* the gradient's relative error in ``(q, h)`` against the exact KKT gradient (a dense
  NumPy solve of the KKT matrix on the active set of a 1e-10-accurate solution), whose
  exactness is confirmed by central differences of re-solves on batch member 0;
* a degenerate set (weakly active constraint, duplicated equality, infeasible instance):
  each library's outcome, ``correct``, ``clear error``, ``NaN`` or ``silently wrong``;
* layer construction time (cvxpylayers canonicalizes; dargmin has no construction step,
  its first-call compilation time is shown instead).

``DARGMIN_FAST=1``: n = 10 (batch 1) and 20 (batch 4), a smoke run of a few minutes; the table then
goes to ``$DARGMIN_OUTPUT_DIR`` when set (else nowhere). Otherwise it is written to
``benchmarks/results/qp_vs_peers.md``. Peers are optional (skipped with a note).
"""

from __future__ import annotations

import os

# One thread for every library (the setting): set before XLA and torch start.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import logging
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)
logging.getLogger("jax").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")

from dargmin.constrained import solve_qp

FAST = os.environ.get("DARGMIN_FAST", "") not in ("", "0")
RESULTS = Path(__file__).parent / "results" / "qp_vs_peers.md"
CASES = (
    [(10, 1), (20, 4)]
    if FAST
    else [(10, 1), (10, 128), (50, 1), (50, 128), (100, 1), (100, 128), (500, 1), (500, 8)]
)
REPEATS = 3

Problem = tuple[np.ndarray, ...]  # Q, q, A, b, G, h with a leading batch axis


def random_qps(n: int, batch: int, seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    m, p = n // 2, max(n // 5, 1)
    L = rng.standard_normal((batch, n, n))
    Q = L @ np.swapaxes(L, -1, -2) + 1e-3 * np.eye(n)
    q = rng.standard_normal((batch, n))
    A = rng.standard_normal((batch, p, n))
    x0 = rng.standard_normal((batch, n))
    G = rng.standard_normal((batch, m, n))
    b = np.einsum("bij,bj->bi", A, x0)
    h = np.einsum("bij,bj->bi", G, x0) + rng.uniform(size=(batch, m))
    return Q, q, A, b, G, h


def exact_gradient(problem: Problem, x: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """d(Σx)/d(q, h) per member from the KKT matrix on the active set (NumPy, float64)."""
    Q, q, A, _, G, h = problem
    out = []
    for i in range(q.shape[0]):
        slack = h[i] - G[i] @ x[i]
        active = lam[i] > slack
        GA = G[i][active]
        n, p, k = q.shape[1], A.shape[1], GA.shape[0]
        K = np.block(
            [
                [Q[i], A[i].T, GA.T],
                [A[i], np.zeros((p, p)), np.zeros((p, k))],
                [GA, np.zeros((k, p)), np.zeros((k, k))],
            ]
        )
        w = np.linalg.solve(K, np.concatenate([np.ones(n), np.zeros(p + k)]))
        grad_h = np.zeros(h.shape[1])
        grad_h[active] = w[n + p :]
        out.append(np.concatenate([-w[:n], grad_h]))
    return np.asarray(out)


def relative_errors(grads: np.ndarray, exact: np.ndarray) -> np.ndarray:
    return np.linalg.norm(grads - exact, axis=1) / np.maximum(np.linalg.norm(exact, axis=1), 1e-300)


def median_ms(fn: Callable[[], Any], repeats: int = REPEATS) -> float:
    start = time.perf_counter()
    fn()  # warm-up (compilation)
    if time.perf_counter() - start > 5.0:
        repeats = 1  # a slow peer (cvxpylayers on a large batch): one timed call
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


# --------------------------------------------------------------------------------------
# Libraries: each returns (forward fn, forward+backward fn returning grads of (q, h))
# --------------------------------------------------------------------------------------


def dargmin_layer(
    problem: Problem, dtype: str = "float64", check: str = "raise"
) -> tuple[Callable, Callable]:
    # On the default device (benchmarks/qp_gpu.py runs it on a GPU, also in float32).
    args = tuple(jnp.asarray(a, dtype=dtype) for a in problem)
    forward = jax.jit(lambda *a: solve_qp(*a, check=check).x)
    loss = jax.jit(
        jax.grad(lambda *a: solve_qp(*a, check=check).x.sum(), argnums=(0, 1, 2, 3, 4, 5))
    )

    def fwd() -> np.ndarray:
        return np.asarray(jax.block_until_ready(forward(*args)))

    def both() -> np.ndarray:
        grads = jax.block_until_ready(loss(*args))
        return np.concatenate([np.asarray(grads[1]), np.asarray(grads[5])], axis=1)

    return fwd, both


def qpth_layer(problem: Problem) -> tuple[Callable, Callable]:
    import torch
    from qpth.qp import QPFunction

    torch.set_num_threads(1)
    tensors = [torch.tensor(a, dtype=torch.float64) for a in problem]
    Q, q, A, b, G, h = tensors

    def fwd() -> np.ndarray:
        with torch.no_grad():
            return QPFunction(verbose=-1)(Q, q, G, h, A, b).numpy()

    def both() -> np.ndarray:
        leaves = [t.clone().requires_grad_(True) for t in tensors]
        Qr, qr, Ar, br, Gr, hr = leaves
        QPFunction(verbose=-1)(Qr, qr, Gr, hr, Ar, br).sum().backward()
        return np.concatenate([qr.grad.numpy(), hr.grad.numpy()], axis=1)

    return fwd, both


def cvxpylayers_layer(problem: Problem) -> tuple[Callable, Callable, float]:
    import cvxpy as cp
    from cvxpylayers.jax import CvxpyLayer

    Q, q, A, b, G, h = problem
    n, p, m = q.shape[1], A.shape[1], G.shape[1]
    start = time.perf_counter()
    x = cp.Variable(n)
    L_p = cp.Parameter((n, n))
    q_p, A_p, b_p = cp.Parameter(n), cp.Parameter((p, n)), cp.Parameter(p)
    G_p, h_p = cp.Parameter((m, n)), cp.Parameter(m)
    objective = 0.5 * cp.sum_squares(L_p.T @ x) + 0.5e-3 * cp.sum_squares(x) + q_p @ x
    prob = cp.Problem(cp.Minimize(objective), [A_p @ x == b_p, G_p @ x <= h_p])
    layer = CvxpyLayer(prob, parameters=[L_p, q_p, A_p, b_p, G_p, h_p], variables=[x])
    construction = time.perf_counter() - start
    L = np.linalg.cholesky(Q - 1e-3 * np.eye(n) + 1e-12 * np.eye(n))
    args = [jnp.asarray(a) for a in (L, q, A, b, G, h)]

    def fwd() -> np.ndarray:
        return np.asarray(layer(*args)[0])

    grad = jax.grad(lambda *a: layer(*a)[0].sum(), argnums=(1, 5))

    def both() -> np.ndarray:
        gq, gh = grad(*args)
        return np.concatenate([np.asarray(gq), np.asarray(gh)], axis=1)

    return fwd, both, construction


def jaxopt_layer(problem: Problem) -> tuple[Callable, Callable]:
    from jaxopt import OSQP

    args = tuple(jnp.asarray(a) for a in problem)

    def solve_one(Q, q, A, b, G, h):
        return OSQP().run(params_obj=(Q, q), params_eq=(A, b), params_ineq=(G, h)).params.primal

    forward = jax.jit(jax.vmap(solve_one))
    grad = jax.jit(jax.grad(lambda *a: jax.vmap(solve_one)(*a).sum(), argnums=(1, 5)))

    def fwd() -> np.ndarray:
        return np.asarray(jax.block_until_ready(forward(*args)))

    def both() -> np.ndarray:
        gq, gh = jax.block_until_ready(grad(*args))
        return np.concatenate([np.asarray(gq), np.asarray(gh)], axis=1)

    return fwd, both


def available(name: str) -> bool:
    try:
        __import__(name)
        return True
    except Exception:
        return False


PEERS: dict[str, Callable[[Problem], tuple]] = {}
if available("qpth") and available("torch"):
    PEERS["qpth"] = qpth_layer
if available("cvxpylayers.jax"):
    PEERS["cvxpylayers"] = cvxpylayers_layer
if available("jaxopt"):
    PEERS["jaxopt.OSQP"] = jaxopt_layer


def peer_runs(name: str, n: int, batch: int) -> bool:
    # cvxpylayers solves a batch one problem at a time (seconds per member at n = 500).
    return not (name == "cvxpylayers" and n * batch > 12800)


# --------------------------------------------------------------------------------------
# The runs
# --------------------------------------------------------------------------------------


def timing_rows() -> tuple[list[str], list[str]]:
    rows, notes = [], []
    for n, batch in CASES:
        problem = random_qps(n, batch)
        sol = solve_qp(*(jnp.asarray(a) for a in problem))
        exact = exact_gradient(problem, np.asarray(sol.x), np.asarray(sol.ineq_dual))
        # The exact gradient, confirmed by central differences of re-solves (member 0, q).
        direction = np.random.default_rng(1).standard_normal(n)
        one = tuple(jnp.asarray(a[:1]) for a in problem)
        step = 1e-6
        plus = solve_qp(one[0], one[1] + step * direction, *one[2:]).x.sum()
        minus = solve_qp(one[0], one[1] - step * direction, *one[2:]).x.sum()
        fd = float(plus - minus) / (2 * step)
        fd_error = abs(fd - exact[0, :n] @ direction) / abs(fd)
        start = time.perf_counter()
        fwd, both = dargmin_layer(problem)
        both()
        compile_s = time.perf_counter() - start
        ours = (median_ms(fwd), median_ms(both))
        errors = relative_errors(both(), exact)
        rows.append(
            f"| {n} | {batch} | dargmin | {ours[0]:.1f} | {ours[1]:.1f} | 1.00× | "
            f"{np.median(errors):.1e} | {np.max(errors):.1e} | "
            f"{int(np.sum(errors > 1e-3))}/{batch} |"
        )
        notes.append(
            f"n = {n}, batch {batch}: exact KKT gradient vs central differences of re-solves: "
            f"{fd_error:.1e}; all {batch} forward solves converged: "
            f"{bool(np.all(np.asarray(sol.info.converged)))}; dargmin compile {compile_s:.1f} s."
        )
        print(rows[-1], flush=True)
        for name, make in PEERS.items():
            if not peer_runs(name, n, batch):
                rows.append(f"| {n} | {batch} | {name} | skipped (minutes per run) | | | | | |")
                continue
            try:
                made = make(problem)
                fwd_p, both_p = made[0], made[1]
                theirs = (median_ms(fwd_p), median_ms(both_p))
                errors = relative_errors(both_p(), exact)
                ratio = theirs[1] / ours[1]
                rows.append(
                    f"| {n} | {batch} | {name} | {theirs[0]:.1f} | {theirs[1]:.1f} | "
                    f"{ratio:.2f}× | {np.median(errors):.1e} | {np.max(errors):.1e} | "
                    f"{int(np.sum(errors > 1e-3))}/{batch} |"
                )
            except Exception as err:
                rows.append(
                    f"| {n} | {batch} | {name} | failed: {type(err).__name__}: "
                    f"{str(err).splitlines()[0][:80]} | | | | | |"
                )
            print(rows[-1], flush=True)
    return rows, notes


def degenerate_cases() -> dict[str, tuple[Problem, np.ndarray | None]]:
    """Three small instances (with x₁ = x₂ as an equality) and the reference gradient of Σx
    in (q, h) (``None``: no gradient exists)."""
    eye, equal = np.eye(2)[None], np.array([[[1.0, -1.0]]])
    q, zero = np.array([[-1.0, -1.0]]), np.array([[0.0]])
    return {
        # The unconstrained minimizer (1, 1) lies on x₁ + x₂ ≤ 2: active with λ = 0.
        "weakly active inequality": (
            (eye, q, equal, zero, np.array([[[1.0, 1.0]]]), np.array([[2.0]])),
            None,
        ),
        # x₁ = x₂ written twice (rank-deficient A), consistent: t = −(q₁ + q₂)/2, Σx = 2t,
        # x₁ ≤ 5 inactive: d/dq = (−1, −1), d/dh = 0.
        "duplicated equality": (
            (
                eye,
                np.array([[-1.0, -2.0]]),
                np.concatenate([equal, equal], axis=1),
                np.zeros((1, 2)),
                np.array([[[1.0, 0.0]]]),
                np.array([[5.0]]),
            ),
            np.array([[-1.0, -1.0, 0.0]]),
        ),
        # x₁ ≤ −1 and −x₁ ≤ −1.
        "infeasible": (
            (eye, q, equal, zero, np.array([[[1.0, 0.0], [-1.0, 0.0]]]), np.array([[-1.0, -1.0]])),
            None,
        ),
    }


def classify(run: Callable[[], np.ndarray], reference: np.ndarray | None, kind: str) -> str:
    try:
        grads = run()
    except Exception as err:
        return f"clear error ({type(err).__name__})"
    if not np.all(np.isfinite(grads)):
        return "NaN"
    if reference is None:
        if kind == "weakly active inequality":
            return f"silent: {np.round(grads.ravel(), 3).tolist()}"
        return f"silently wrong: {np.round(grads.ravel(), 3).tolist()}"
    error = np.linalg.norm(grads - reference) / np.linalg.norm(reference)
    return "correct" if error < 1e-4 else f"silently wrong (error {error:.2g})"


def degenerate_rows() -> list[str]:
    rows = []
    for kind, (problem, reference) in degenerate_cases().items():
        args = tuple(jnp.asarray(a) for a in problem)

        def ours(**options: Any) -> np.ndarray:
            grads = jax.grad(
                lambda q, h: solve_qp(*args[:1], q, *args[2:5], h, **options).x.sum(),
                argnums=(0, 1),
            )(args[1], args[5])
            return np.concatenate([np.asarray(grads[0]), np.asarray(grads[1])], axis=1)

        outcomes = {"dargmin (default)": classify(ours, reference, kind)}
        if kind == "weakly active inequality":
            outcomes["dargmin degenerate='active'"] = classify(
                lambda: ours(degenerate="active"), np.array([[0.0, 0.0, 1.0]]), kind
            )
            outcomes["dargmin degenerate='inactive'"] = classify(
                lambda: ours(degenerate="inactive"), np.array([[-1.0, -1.0, 0.0]]), kind
            )
        if kind == "duplicated equality":
            outcomes["dargmin linear_solver='lstsq'"] = classify(
                lambda: ours(linear_solver="lstsq"), reference, kind
            )
        for name, make in PEERS.items():
            try:
                both = make(problem)[1]
            except Exception as err:
                outcomes[name] = f"clear error ({type(err).__name__})"
                continue
            outcomes[name] = classify(both, reference, kind)
        for library, outcome in outcomes.items():
            rows.append(f"| {kind} | {library} | {outcome} |")
            print(rows[-1], flush=True)
    return rows


def construction_rows() -> list[str]:
    rows = []
    sizes = [10] if FAST else [10, 50, 100, 500]
    for n in sizes:
        problem = random_qps(n, 1)
        start = time.perf_counter()
        dargmin_layer(problem)[1]()
        ours = time.perf_counter() - start
        theirs = "not installed"
        if "cvxpylayers" in PEERS:
            theirs = f"{cvxpylayers_layer(problem)[2]:.2f} s"
        rows.append(f"| {n} | none (first call with compilation: {ours:.1f} s) | {theirs} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    start = time.perf_counter()
    missing = [p for p in ("qpth", "cvxpylayers", "jaxopt.OSQP") if p not in PEERS]
    timing, notes = timing_rows()
    degenerate = degenerate_rows()
    construction = construction_rows()
    table = "\n".join(
        [
            "# QP layers: dargmin.constrained.solve_qp vs peers",
            "",
            "Random strictly convex QPs (Q = LLᵀ + 1e-3·I, n/2 inequalities, n/5 equalities),"
            " one thread, float64. Times are the median of repeats (ms); `ratio` is the "
            "peer's forward + backward time over dargmin's (above 1: dargmin faster). "
            "Gradient errors are relative, of d(Σx)/d(q, h), against the exact KKT gradient; "
            "peers with their default settings.",
            "",
            f"Mode: {'DARGMIN_FAST smoke run' if FAST else 'full'}; "
            f"peers not installed: {', '.join(missing) or 'none'}.",
            "",
            "| n | batch | library | forward ms | forward + backward ms | ratio | "
            "median grad error | max grad error | members off > 1e-3 |",
            "|---|---|---|---|---|---|---|---|---|",
            *timing,
            "",
            *[f"- {note}" for note in notes],
            "",
            "## Degenerate set",
            "",
            "| case | library | outcome |",
            "|---|---|---|",
            *degenerate,
            "",
            "## Layer construction",
            "",
            "| n | dargmin | cvxpylayers (canonicalization) |",
            "|---|---|---|",
            *construction,
            "",
        ]
    )
    output_dir = os.environ.get("DARGMIN_OUTPUT_DIR")
    if FAST:
        results = Path(output_dir) / RESULTS.name if output_dir else None
    else:
        results = RESULTS
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(table)
    print(f"total {time.perf_counter() - start:.0f} s; written to {results or '(nothing)'}")


if __name__ == "__main__":
    main()
