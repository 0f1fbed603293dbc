"""Stein's unbiased risk estimate for image restoration, its gradient SUGAR, and tuning.

For ``y = Φw₀ + ε``, ``ε ~ N(0, σ²I)`` with ``n`` pixels, and the prediction
``μ̂(y) = Φŵ_θ(y)``,

.. math::

    \\mathrm{SURE}(\\theta) = \\|y - \\hat\\mu\\|^2 - n\\sigma^2 + 2\\sigma^2\\,
        \\widehat{\\mathrm{df}}, \\qquad
    \\mathbb E\\,\\mathrm{SURE} = \\mathbb E\\,\\|\\Phi\\hat w_\\theta(y) - \\Phi w_0\\|^2

(denoising: ``n ×`` the mean squared error). The divergence ``df = tr ∂μ̂/∂y`` is
estimated with ``K`` fixed Gaussian probes ``z_k``:

* Monte-Carlo: ``df = mean_k ⟨Φ ∂_yŵ[z_k], z_k⟩`` (forward-mode derivative of the
  iterations in ``y``);
* finite-difference Monte-Carlo: ``df = mean_k ⟨Φŵ(y + δz_k) − Φŵ(y), z_k⟩/δ`` (one extra
  solve per probe; Ramani, Blu & Unser, 2008).

SUGAR (Deledalle, Vaiter, Fadili & Peyré, 2014) is the ``θ``-gradient of the
finite-difference SURE,

.. math::

    \\nabla_\\theta \\mathrm{SURE} = -2\\,(\\Phi\\partial_\\theta\\hat w(y))^\\top(y - \\hat\\mu)
        + \\frac{2\\sigma^2}{\\delta K}\\sum_k
          \\Phi(\\partial_\\theta\\hat w(y+\\delta z_k) - \\partial_\\theta\\hat w(y))^\\top z_k,

with ``∂_θŵ`` from forward-mode differentiation of the primal-dual iterations: ``(1 + K)``
solves, each with its ``θ``-tangents (``≈ 4×`` one solve for one parameter and one probe).
With a fixed iteration count (``ChambollePock(tol=0, max_iter=k)``) all of this is the
risk of, and the gradient for, the ``k``-th iterate (iterative SURE / SUGAR).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
import scipy.optimize

from dargmin.hyper import default_delta
from dargmin.imaging._problem import RestorationProblem
from dargmin.imaging._solver import ChambollePock, PDResult, solve, solve_jvp


class SureValue(NamedTuple):
    """A risk estimate at one ``θ``.

    Attributes
    ----------
    value
        ``SURE(θ)``.
    df
        The divergence estimate.
    grad
        ``∇_θ SURE`` (SUGAR) or ``None``.
    w
        The estimate ``ŵ_θ(y)``.
    n_solves
        Primal-dual solves run (those with tangents counted once).
    """

    value: float
    df: float
    grad: np.ndarray | None
    w: np.ndarray
    n_solves: int


class TuneResult(NamedTuple):
    """Output of :meth:`ImageSURE.tune`.

    Attributes
    ----------
    theta
        The selected ``θ*``.
    value
        ``SURE(θ*)``.
    w
        ``ŵ_{θ*}(y)``.
    history
        ``[(θ, SURE(θ)), …]`` for every evaluation (the monitor's record).
    n_evals
        SUGAR evaluations.
    seconds
        Wall time.
    message
        SciPy's termination message.
    """

    theta: np.ndarray
    value: float
    w: np.ndarray
    history: list[tuple[np.ndarray, float]]
    n_evals: int
    seconds: float
    message: str


@dataclass
class ImageSURE:
    """SURE, finite-difference SURE and SUGAR of ``ŵ_θ(y)`` for one problem and one image.

    The probes are drawn once (``seed``), so the estimates are deterministic functions of
    ``θ``; every solve is warm-started from the previous one at the same observation
    (``y`` or ``y + δz_k``), with its tangents.

    Parameters
    ----------
    problem
        A :class:`~dargmin.imaging.RestorationProblem`.
    y
        The observation.
    sigma
        The noise standard deviation ``σ > 0`` (known).
    n_probes
        ``K``, the number of Gaussian probes.
    delta
        Finite-difference step (default :func:`dargmin.hyper.default_delta`:
        ``2σ n^{-0.3}``).
    seed
        Seed of the probes.
    solver
        The :class:`~dargmin.imaging.ChambollePock` configuration of every solve.
    warm_start
        Start every solve from the previous one at the same observation. Faster, but an
        estimate then depends (within the solver tolerance) on the path of evaluations;
        ``False`` makes it a function of ``θ`` alone (finite differences in ``θ``).

    Examples
    --------
    >>> import numpy as np
    >>> from dargmin.imaging import tv_denoising
    >>> rng = np.random.default_rng(0)
    >>> x = np.zeros((16, 16)); x[4:12, 4:12] = 1.0
    >>> est = ImageSURE(tv_denoising(), x + 0.2 * rng.normal(size=x.shape), sigma=0.2)
    >>> r = est.sugar([0.1])
    >>> r.n_solves, r.grad.shape
    (2, (1,))
    """

    problem: RestorationProblem
    y: Any
    sigma: float
    n_probes: int = 1
    delta: float | None = None
    seed: int = 0
    solver: ChambollePock = field(default_factory=ChambollePock)
    warm_start: bool = True
    _warm: dict[str, PDResult] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        s = float(self.sigma)
        if not (np.isfinite(s) and s > 0):
            raise ValueError(
                f"sigma (the noise standard deviation) must be finite and > 0, got {s}."
            )
        if int(self.n_probes) < 1:
            raise ValueError(f"n_probes must be >= 1, got {self.n_probes}.")
        if self.delta is not None and not (np.isfinite(self.delta) and self.delta > 0):
            raise ValueError(f"delta must be finite and > 0, got {self.delta}.")
        y, _ = self.problem.check(self.y, np.ones(self.problem.n_params))
        self.y = y
        self.n = int(y.size)
        self.step = default_delta(s, self.n) if self.delta is None else float(self.delta)
        # A spawn key of our own: ``default_rng(seed)`` would hand a user who drew the noise
        # with the same seed probes equal to the noise, and a biased SURE.
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(0x1A6E,)))
        self.probes = jnp.asarray(rng.standard_normal((int(self.n_probes), *y.shape)), y.dtype)

    # -- solves, warm-started per observation
    def _solve(self, key: str, y: Any, theta: Any, tangents: bool) -> PDResult:
        init = self._warm.get(key) if self.warm_start else None
        if tangents:
            res = solve_jvp(self.problem, y, theta, solver=self.solver, init=init)
        else:
            res = solve(self.problem, y, theta, solver=self.solver, init=init)
            if init is not None and init.w_dot is not None:  # keep the tangents for later
                res = res._replace(w_dot=init.w_dot, p_dot=init.p_dot)
        self._warm[key] = res
        return res

    def _fit(self, w: Any) -> Any:
        return self.problem.forward.apply(w)

    def _theta(self, theta: Any) -> np.ndarray:
        return np.asarray(self.problem.check(self.y, theta)[1])

    def _tangent_fits(self, res: PDResult) -> Any:
        # Φ applied to each tangent (solve_jvp always returns them).
        assert res.w_dot is not None
        return jnp.stack([self._fit(t) for t in res.w_dot])

    # -- estimates
    def monte_carlo(self, theta: Any) -> SureValue:
        """``SURE(θ)`` with the Monte-Carlo divergence ``mean_k ⟨Φ∂_yŵ[z_k], z_k⟩`` (one
        solve with ``K`` tangents in ``y``)."""
        th = self._theta(theta)
        res = solve_jvp(
            self.problem, self.y, th, y_dots=self.probes, solver=self.solver,
            init=self._warm.get("y") if self.warm_start else None,
        )  # fmt: skip
        Jz = self._tangent_fits(res)
        df = float(jnp.mean(jnp.sum(Jz * self.probes, axis=tuple(range(1, Jz.ndim)))))
        r = self.y - self._fit(res.w)
        s2 = self.sigma**2
        value = float(jnp.vdot(r, r)) - self.n * s2 + 2.0 * s2 * df
        return SureValue(value, df, None, np.asarray(res.w), 1)

    def finite_difference(self, theta: Any) -> SureValue:
        """``SURE(θ)`` with the finite-difference divergence (``1 + K`` solves)."""
        return self._fd(theta, tangents=False)

    def sugar(self, theta: Any) -> SureValue:
        """The finite-difference ``SURE(θ)`` and its ``θ``-gradient SUGAR (``1 + K``
        solves, each with its ``θ``-tangents)."""
        return self._fd(theta, tangents=True)

    def _fd(self, theta: Any, tangents: bool) -> SureValue:
        th = self._theta(theta)
        K, s2, d = self.probes.shape[0], self.sigma**2, self.step
        base = self._solve("y", self.y, th, tangents)
        fit = self._fit(base.w)
        r = self.y - fit
        df_k: list[float] = []
        dfit = self._tangent_fits(base) if tangents else None  # (P, *shape)
        grad = None if dfit is None else -2.0 * jnp.tensordot(dfit, r, axes=r.ndim)
        for k in range(K):
            z = self.probes[k]
            res = self._solve(f"z{k}", self.y + d * z, th, tangents)
            df_k.append(float(jnp.vdot(self._fit(res.w) - fit, z)) / d)
            if grad is not None and dfit is not None:
                dfit_k = self._tangent_fits(res)
                grad = grad + (2.0 * s2 / (d * K)) * jnp.tensordot(dfit_k - dfit, z, axes=z.ndim)
        df = float(np.mean(df_k))
        value = float(jnp.vdot(r, r)) - self.n * s2 + 2.0 * s2 * df
        g = None if grad is None else np.asarray(grad)
        return SureValue(value, df, g, np.asarray(base.w), 1 + K)

    def _coarse_start(
        self,
        x0: np.ndarray,
        factors: Sequence[float],
        scale: float,
        record: Callable[[np.ndarray, SureValue], None],  # (log θ, its estimate)
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`tune`'s start from a few SURE values along ``θ₀``'s scaling: the new
        ``log θ`` and BFGS's initial inverse Hessian (or ``None``).

        ``θ₀`` itself (factor 1) gets a SUGAR evaluation, whose slope along the scaling
        says on which side the minimum lies: the factors on the other side are skipped
        (large weights are the slow solves). The others get finite-difference SURE values
        (no tangents), and a parabola in ``log c`` is fitted to the values and the slope."""
        t = np.sort(np.log(np.asarray(factors, dtype=float)))
        if t.ndim != 1 or t.size < 3 or not np.all(np.isfinite(t)) or not np.any(t == 0.0):
            raise ValueError(
                f"coarse must hold at least 3 positive factors, 1 among them, got {factors!r}."
            )
        at_start = self.sugar(np.exp(x0))
        record(x0, at_start)
        assert at_start.grad is not None
        slope = float(np.dot(at_start.grad, np.exp(x0))) * scale  # d SURE / d log c at c = 1
        rows, values, states = (
            [[0.0, 0.0, 1.0]],
            [at_start.value * scale],
            [(0.0, dict(self._warm))],
        )
        # Nearest first, so that each solve is warm-started from its neighbour.
        side = t[t > 0] if slope < 0 else t[t < 0][::-1]
        for tj in side:
            value = self.finite_difference(np.exp(x0 + tj))
            record(x0 + tj, value)
            rows.append([tj * tj, tj, 1.0])
            values.append(value.value * scale)
            states.append((float(tj), dict(self._warm)))
        # f(t) = a t² + b t + c through the values, with f'(0) = b = the SUGAR slope.
        rows.append([0.0, 1.0, 0.0])
        values.append(slope)
        a, b, _ = np.linalg.lstsq(np.asarray(rows), np.asarray(values), rcond=None)[0]
        ts = np.array([0.0, *side])
        if a > 0:
            t_min, curvature = float(np.clip(-b / (2.0 * a), ts.min(), ts.max())), 2.0 * a
        else:
            t_min, curvature = float(ts[int(np.argmin(values[:-1]))]), None
        self._warm = dict(min(states, key=lambda st: abs(st[0] - t_min))[1])
        if curvature is None:
            return x0 + t_min, None
        # Along u = 1/√n (all weights scaled together) the curvature in log θ is f''/n;
        # elsewhere SciPy's default, the identity.
        n = x0.size
        u = np.full((n, 1), 1.0 / np.sqrt(n))
        hess_inv0 = np.eye(n) + (n / curvature - 1.0) * (u @ u.T)
        return x0 + t_min, hess_inv0

    @staticmethod
    def _bfgs(
        fun: Callable[[np.ndarray], tuple[float, np.ndarray]],
        x0: np.ndarray,
        options: dict[str, Any],
        ftol: float,
        cache: dict[bytes, SureValue],
    ) -> tuple[np.ndarray, str]:
        """SciPy's BFGS on ``fun`` from ``x0``, stopped early when the estimate is flat:
        a new point whose value is within ``ftol`` of the best so far (either side).

        SciPy's BFGS has no test on the objective's change, and its Wolfe line search keeps
        asking for points on a noisy plateau (three evaluations in one iteration were seen
        at the bottom of a one-probe SURE, all within 0.002 % of each other)."""
        best = [fun(x0)[0]]

        def flat_aware(x: np.ndarray) -> tuple[float, np.ndarray]:
            fresh = np.asarray(x).tobytes() not in cache
            value, grad = fun(x)
            if fresh and abs(value - best[0]) < ftol:
                raise _Flat
            best[0] = min(best[0], value)
            return value, grad

        try:
            opt = scipy.optimize.minimize(flat_aware, x0, jac=True, method="BFGS", options=options)
            return np.asarray(opt.x), str(opt.message)
        except _Flat:
            key = min(cache, key=lambda k: cache[k].value)
            return np.frombuffer(key, dtype=x0.dtype).reshape(x0.shape), (
                f"SURE flat: a new point within ftol = {ftol:g} (of SURE/(nσ²)) of the best"
            )

    def grid(self, thetas: Sequence[Any], *, progress: bool = False) -> np.ndarray:
        """Finite-difference ``SURE`` on a sequence of ``θ`` (warm-started in order)."""
        it = _progress(thetas, progress, "SURE grid")
        return np.array([self.finite_difference(t).value for t in it])

    def tune(
        self,
        theta0: Any,
        *,
        gtol: float = 1e-3,
        xrtol: float = 1e-3,
        ftol: float = 1e-4,
        maxiter: int = 50,
        progress: bool = True,
        monitor: Callable[[np.ndarray, float], None] | None = None,
        coarse: Sequence[float] | None = None,
    ) -> TuneResult:
        """Minimize the finite-difference SURE over ``θ > 0`` by BFGS on ``log θ`` with
        SUGAR gradients.

        The objective given to SciPy is ``SURE/(nσ²)`` (order 1), so ``gtol`` bounds its
        gradient in ``log θ``.

        Parameters
        ----------
        theta0
            The starting weights.
        gtol, xrtol, maxiter
            SciPy BFGS options: gradient norm, relative step in ``log θ`` (below the
            solver's precision, further steps only chase the noise of the estimate), and
            iterations.
        ftol
            Stop, returning the best point seen, when a new evaluation of ``SURE/(nσ²)`` is
            within ``ftol`` of the best so far: the estimate is flat there, to a per-pixel
            risk change of ``ftol·σ²`` (≈ 0.003 dB of PSNR at ``1e-4`` on TV denoising,
            whose risk is ≈ 0.1σ² per pixel; far below the scatter of a one-probe SURE's
            minimizer). ``0`` turns the test off.
        progress
            Show a tqdm progress bar (one tick per SUGAR evaluation, with ``θ`` and SURE).
        monitor
            Called with ``(θ, SURE(θ))`` after every evaluation.
        coarse
            Factors ``c_j`` (at least 3, 1 among them, e.g. ``(0.5, 1, 2)``) of a start
            along ``θ₀``'s scaling (all weights scaled together): SUGAR at ``θ₀``, whose
            slope along the scaling tells on which side the minimum lies, then the
            finite-difference SURE, without tangents (half a SUGAR evaluation each), at the
            ``c_j·θ₀`` on that side only. BFGS then starts at the minimum of the parabola in
            ``log c`` fitted to these values and the slope (clipped to their range; their
            best point if the parabola is not convex), with its curvature as the initial
            inverse Hessian along the scaling direction, warm-started from the nearest of
            them. Fewer SUGAR evaluations when ``θ₀`` is off by a factor (``tune / 30-point
            grid`` in ``benchmarks/results/sugar_imaging.md``). ``None``: start at ``θ₀``.

        Returns
        -------
        TuneResult
            ``history`` and ``n_evals`` include the coarse evaluations.

        Examples
        --------
        >>> import numpy as np
        >>> from dargmin.imaging import tv_denoising
        >>> y = np.kron([[0.0, 1.0], [1.0, 0.0]], np.ones((8, 8)))         # a checkerboard
        >>> y = y + 0.2 * np.random.default_rng(1).normal(size=y.shape)
        >>> res = ImageSURE(tv_denoising(), y, 0.2).tune([0.2], coarse=(0.5, 1, 2), progress=False)
        >>> bool(res.theta[0] > 0), res.n_evals >= 3
        (True, True)
        """
        t0 = time.perf_counter()
        scale = 1.0 / (self.n * self.sigma**2)
        history: list[tuple[np.ndarray, float]] = []
        bar = _bar(progress, maxiter)
        cache: dict[bytes, SureValue] = {}

        def record(log_theta: np.ndarray, r: SureValue) -> None:
            th = np.exp(log_theta)
            history.append((th, r.value))
            if r.grad is not None:
                cache[np.asarray(log_theta).tobytes()] = r
            if monitor is not None:
                monitor(th, r.value)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(theta=np.array2string(th, precision=4), sure=f"{r.value:.5g}")

        def fun(log_theta: np.ndarray) -> tuple[float, np.ndarray]:
            key = np.asarray(log_theta).tobytes()
            if key not in cache:
                record(log_theta, self.sugar(np.exp(log_theta)))
            r = cache[key]
            assert r.grad is not None
            # d/d log θ = θ · d/dθ.
            return r.value * scale, np.asarray(r.grad) * np.exp(log_theta) * scale

        x0 = np.log(self._theta(theta0))
        options: dict[str, Any] = {"gtol": gtol, "xrtol": xrtol, "maxiter": maxiter}
        if coarse is not None:
            x0, hess_inv0 = self._coarse_start(x0, coarse, scale, record)
            if hess_inv0 is not None:
                options["hess_inv0"] = hess_inv0
        try:
            opt_x, message = self._bfgs(fun, x0, options, ftol, cache)
        finally:
            if bar is not None:
                bar.close()
        best = cache.get(np.asarray(opt_x).tobytes())
        theta = np.exp(opt_x)
        if best is None:
            best = self.sugar(theta)
        return TuneResult(
            theta, best.value, best.w, history, len(history), time.perf_counter() - t0,
            message,
        )  # fmt: skip


class _Flat(Exception):
    """Raised inside BFGS's objective to stop :meth:`ImageSURE.tune` on a flat estimate."""


def _bar(progress: bool, total: int) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="SUGAR + BFGS", unit="eval", leave=False)


def _progress(items: Sequence[Any], progress: bool, desc: str) -> Any:
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)
