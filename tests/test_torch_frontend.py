"""dargmin.torch: implicit derivatives of torch solvers against closed forms, finite
differences of re-solves and properties; the refusals with the JAX side's words."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import dargmin  # noqa: E402
import dargmin.torch as dt  # noqa: E402

F64 = torch.float64


def ridge_data(dtype: torch.dtype = F64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(30, 5, generator=generator, dtype=dtype)
    y = X @ torch.arange(1.0, 6.0, dtype=dtype) + 0.1 * torch.randn(
        30, generator=generator, dtype=dtype
    )
    return X, y


def ridge_objective(w, lam, X, y):
    return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * lam * (w**2).sum()


def ridge_closed_form(lam, X, y):
    """``(XᵀX + λI)⁻¹ Xᵀy``, differentiated by torch through linalg.solve (independent)."""
    return torch.linalg.solve(X.T @ X + lam * torch.eye(X.shape[1], dtype=X.dtype), X.T @ y)


def ridge_solver(linear_solver: str = "auto", **options):
    @dt.argmin(ridge_objective, linear_solver=linear_solver, **options)
    def solve(init, lam, X, y):
        return ridge_closed_form(lam, X, y)

    return solve


SOLVERS = ["auto", "lu", "lstsq", "cg", "minres", "gmres"]


@pytest.mark.parametrize("linear_solver", SOLVERS)
def test_ridge_forward_and_reverse_match_closed_form(linear_solver):
    X, y = ridge_data()
    lam = torch.tensor(0.7, dtype=F64)
    solve = ridge_solver(linear_solver)
    expected = torch.func.jacrev(ridge_closed_form)(lam, X, y)
    forward = torch.func.jacfwd(solve, argnums=1)(None, lam, X, y)
    reverse = torch.func.jacrev(solve, argnums=1)(None, lam, X, y)
    torch.testing.assert_close(forward, expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(reverse, expected, rtol=1e-8, atol=1e-10)
    # Reverse mode with respect to the data (a matrix parameter) too.
    grad_X = torch.func.grad(lambda X: solve(None, lam, X, y).sum())(X)
    expected_X = torch.func.grad(lambda X: ridge_closed_form(lam, X, y).sum())(X)
    torch.testing.assert_close(grad_X, expected_X, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("linear_solver", ["auto", "cg"])
def test_second_derivatives_match_closed_form(linear_solver):
    X, y = ridge_data()
    solve = ridge_solver(linear_solver)
    lam = torch.tensor(0.7, dtype=F64)
    expected = torch.func.hessian(lambda l: ridge_closed_form(l, X, y).sum())(lam)
    hessian = torch.func.hessian(lambda l: solve(None, l, X, y).sum())(lam)
    rev_rev = torch.func.jacrev(torch.func.jacrev(lambda l: solve(None, l, X, y).sum()))(lam)
    torch.testing.assert_close(hessian, expected, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(rev_rev, expected, rtol=1e-7, atol=1e-12)
    # Double backward with create_graph, and a third derivative.
    leaf = lam.clone().requires_grad_()
    (first,) = torch.autograd.grad(solve(None, leaf, X, y).sum(), leaf, create_graph=True)
    (second,) = torch.autograd.grad(first, leaf)
    torch.testing.assert_close(second, expected, rtol=1e-7, atol=1e-12)


def test_higher_derivatives_of_a_scalar_root():
    """x*(a) = √a: x' = a^{-1/2}/2, x'' = −a^{-3/2}/4, x''' = 3a^{-5/2}/8."""

    @dt.root(lambda x, a: x**2 - a)
    def sqrt(init, a):
        return a.sqrt()

    a = torch.tensor(4.0, dtype=F64, requires_grad=True)
    (d1,) = torch.autograd.grad(sqrt(None, a), a, create_graph=True)
    (d2,) = torch.autograd.grad(d1, a, create_graph=True)
    (d3,) = torch.autograd.grad(d2, a)
    assert d1.item() == pytest.approx(0.25, rel=1e-12)
    assert d2.item() == pytest.approx(-1 / 32, rel=1e-12)
    assert d3.item() == pytest.approx(3 / 8 * 4.0**-2.5, rel=1e-12)


def test_forward_over_forward_is_refused_not_wrong():
    solve = ridge_solver()
    X, y = ridge_data()
    lam = torch.tensor(0.7, dtype=F64)
    with pytest.raises(NotImplementedError, match="forward mode over forward mode"):
        torch.func.jacfwd(torch.func.jacfwd(lambda l: solve(None, l, X, y).sum()))(lam)


def test_fixed_point_and_gmres_root():
    T = lambda x, a: 0.5 * (x + a / x)  # noqa: E731 - Heron's map, fixed point √a

    @dt.fixed_point(T)
    def heron(init, a):
        x = init
        for _ in range(40):
            x = T(x, a)
        return x

    a = torch.tensor([4.0, 9.0, 16.0], dtype=F64)
    jac = torch.func.jacrev(lambda a: heron(torch.ones(3, dtype=F64), a))(a)
    torch.testing.assert_close(jac, torch.diag(0.5 / a.sqrt()))

    @dt.root(lambda x, a: x**3 - a, linear_solver="gmres")
    def cube_root(init, a):
        return a ** (1 / 3)

    jac = torch.func.jacfwd(lambda a: cube_root(None, a))(a)
    torch.testing.assert_close(jac, torch.diag(a ** (-2 / 3) / 3))


def test_vmap_over_parameters_and_batched_refusal_names_the_member():
    X, y = ridge_data()
    lams = torch.tensor([0.3, 1.0, 2.5], dtype=F64)
    solve = ridge_solver()
    grads = torch.func.vmap(torch.func.grad(lambda l: solve(None, l, X, y).sum()))(lams)
    expected = torch.stack(
        [torch.func.grad(lambda l: ridge_closed_form(l, X, y).sum())(l) for l in lams]
    )
    torch.testing.assert_close(grads, expected)

    @dt.argmin(ridge_objective)
    def sometimes_unconverged(init, lam, X, y):
        w = ridge_closed_form(lam, X, y)
        return w + 0.01 if lam.item() > 2 else w

    with pytest.raises(dargmin.NonStationaryPointError, match=r"batch member \(2,\)"):
        torch.func.vmap(torch.func.grad(lambda l: sometimes_unconverged(None, l, X, y).sum()))(lams)


class Quadratic(torch.nn.Module):
    """``f(x) = ½ xᵀ(LLᵀ + I)x − bᵀx``: minimizer ``(LLᵀ + I)⁻¹ b``."""

    def __init__(self, n: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.L = torch.nn.Parameter(torch.randn(n, n, generator=generator, dtype=F64))
        self.b = torch.nn.Parameter(torch.randn(n, generator=generator, dtype=F64))

    def matrix(self) -> torch.Tensor:
        return self.L @ self.L.T + torch.eye(self.L.shape[0], dtype=F64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x @ (self.matrix() @ x) - self.b @ x


def test_nn_module_parameter_dict():
    module = Quadratic(4)
    params = dict(module.named_parameters())

    @dt.argmin(module)  # the module itself is the objective, called by functional_call
    def solve(init, params):
        return torch.linalg.solve(
            params["L"] @ params["L"].T + torch.eye(4, dtype=F64), params["b"]
        )

    x = solve(None, params)
    loss = (x**2).sum()
    grads = torch.autograd.grad(loss, list(params.values()))
    closed = torch.linalg.solve(module.matrix(), module.b)
    expected = torch.autograd.grad((closed**2).sum(), list(params.values()))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)


def _tanh_objective(x, params, stabilizer=1.0):
    hidden = torch.tanh(params["w1"] @ x + params["b1"])
    return (params["w2"] @ hidden).reshape(()) + stabilizer * (x**2).sum() / 16


def _newton_solve(params, steps=15):
    x = torch.zeros(1, dtype=F64)
    for _ in range(steps):
        grad = torch.func.grad(_tanh_objective)(x, params)
        x = x - torch.linalg.solve(torch.func.hessian(_tanh_objective)(x, params), grad)
    return x


def test_mlp_input_argmin_matches_finite_differences_of_re_solves():
    generator = torch.Generator().manual_seed(0)
    params = {
        "w1": torch.rand(3, 1, generator=generator, dtype=F64) * 2 - 1,
        "b1": torch.rand(3, generator=generator, dtype=F64) * 2 - 1,
        "w2": (torch.rand(1, 3, generator=generator, dtype=F64) * 2 - 1) / 3**0.5,
    }

    @dt.argmin(_tanh_objective)
    def solve(init, params):
        return _newton_solve(params)

    jac = torch.func.jacrev(lambda p: solve(None, p))(params)
    assert torch.func.grad(_tanh_objective)(solve(None, params), params).abs().max() < 1e-12
    delta = 1e-5
    for name, value in params.items():
        for i in range(value.numel()):
            shifted = []
            for sign in (1, -1):
                moved = {k: v.clone() for k, v in params.items()}
                moved[name].view(-1)[i] += sign * delta
                shifted.append(_newton_solve(moved))
            fd = (shifted[0] - shifted[1]) / (2 * delta)
            assert jac[name].reshape(1, -1)[:, i].item() == pytest.approx(fd.item(), abs=1e-8)


def test_refuses_unconverged_saddle_and_singular_with_the_numbers():
    X, y = ridge_data()
    lam = torch.tensor(0.7, dtype=F64)

    for linear_solver in ("auto", "cg"):

        @dt.argmin(ridge_objective, linear_solver=linear_solver)
        def unconverged(init, lam, X, y):
            return ridge_closed_form(lam, X, y) + 0.01

        with pytest.raises(dargmin.NonStationaryPointError, match="Newton step") as info:
            torch.func.grad(lambda l: unconverged(None, l, X, y).sum())(lam)
        assert dargmin.failure_reason(info.value) == "not_stationary"

    @dt.argmin(lambda x, a: (x[0] ** 2 - x[1] ** 2) * a)
    def saddle(init, a):
        return torch.zeros(2, dtype=F64)

    with pytest.raises(dargmin.SingularSystemError, match="smallest eigenvalue is -2") as info:
        torch.func.grad(lambda a: saddle(None, a).sum())(torch.tensor(1.0, dtype=F64))
    assert dargmin.failure_reason(info.value) == "not_minimum"

    @dt.argmin(lambda x, a: a * (x[0] + x[1]) ** 2)
    def flat(init, a):
        return torch.zeros(2, dtype=F64)

    with pytest.raises(dargmin.SingularSystemError) as info:
        torch.func.grad(lambda a: flat(None, a).sum())(torch.tensor(1.0, dtype=F64))
    assert dargmin.failure_reason(info.value) == "singular"


def test_warn_mode_warns_and_returns():
    X, y = ridge_data()

    @dt.argmin(ridge_objective, check="warn")
    def unconverged(init, lam, X, y):
        return ridge_closed_form(lam, X, y) + 1e-3

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grad = torch.func.grad(lambda l: unconverged(None, l, X, y).sum())(
            torch.tensor(0.7, dtype=F64)
        )
    assert torch.isfinite(grad)
    assert any(issubclass(w.category, dargmin.DargminWarning) for w in caught)


def test_float32_within_stated_tolerance():
    """float32: the derivative agrees with the float64 closed form to 1e-4 relative
    (condition number of XᵀX + λI ≈ 10, rounding ~1e-7 amplified by solver and check)."""
    X, y = ridge_data(torch.float32)
    lam = torch.tensor(0.7, dtype=torch.float32)
    for linear_solver in ("auto", "cg"):
        jac = torch.func.jacrev(ridge_solver(linear_solver), argnums=1)(None, lam, X, y)
        assert jac.dtype == torch.float32
        expected = torch.func.jacrev(ridge_closed_form)(lam.double(), X.double(), y.double())
        torch.testing.assert_close(jac.double(), expected, rtol=1e-4, atol=1e-6)


def test_import_without_torch_names_the_extra():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import dargmin\n"
        "try:\n    import dargmin.torch\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "dargmin[torch]" in out.stdout


def test_cg_first_order_backward_refuses_a_saddle():
    """The fast first-order path uses the derivative's own CG run as the curvature probe."""

    @dt.argmin(lambda x, a: a * (x[0] ** 2 - x[1] ** 2) + (x[2:] ** 2).sum(), linear_solver="cg")
    def saddle(init, a):
        return torch.zeros(4, dtype=F64)

    a = torch.tensor(1.0, dtype=F64, requires_grad=True)
    with pytest.raises(dargmin.SingularSystemError) as info:
        torch.autograd.grad(saddle(None, a).sum(), a)
    assert dargmin.failure_reason(info.value) == "not_minimum"


def test_bridge_taylor_expansion_matches_the_jax_side():
    """A torch objective's Taylor expansion through the bridge equals the one of the same
    objective written in JAX (x*(a) = 1/(1 + a): x_k = (−1)^k k! / (1 + a)^{k+1})."""
    import jax.numpy as jnp

    from dargmin.torch import bridge

    def objective(x, a):
        return 0.5 * ((x - 1.0) ** 2).sum() + 0.5 * a.sum() * (x**2).sum()

    x0, a0 = torch.full((2,), 0.5, dtype=F64), torch.tensor([1.0], dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dargmin.DargminWarning)  # nested forward mode
        te = bridge.taylor_expansion(objective, x0, a0, order=4)
        got = [float(d[0]) for d in te.derivatives(jnp.array([1.0]))]
    assert got == pytest.approx([-1 / 4, 2 / 8, -6 / 16, 24 / 32], rel=1e-10)
    # A Hessian-vector product for the toolbox (here the Hessian is (1 + a) I).
    hvp = bridge.hvp_operator(objective, bridge.to_jax(x0), bridge.to_jax(a0))
    assert np.allclose(np.asarray(hvp(jnp.array([1.0, -2.0]))), [2.0, -4.0])
    # DLPack round trip.
    assert torch.equal(bridge.to_torch(bridge.to_jax(x0)), x0)


def test_vmap_over_a_torch_optim_solver():
    """A torch.optim loop cannot run under vmap: it runs once per batch member, and the
    batched Jacobian equals −H⁻¹ ∂²f/∂x∂a member by member."""

    def f(x, a):
        return ((x - a) ** 4).sum() + (x**2).sum()

    @dt.argmin(f)
    def solve(init, a):
        x = torch.zeros(2, dtype=F64, requires_grad=True)
        opt = torch.optim.LBFGS(
            [x],
            tolerance_grad=1e-14,
            tolerance_change=0,
            max_iter=200,
            line_search_fn="strong_wolfe",
        )

        def closure():
            opt.zero_grad()
            loss = f(x, a)
            loss.backward()
            return loss

        opt.step(closure)
        return x.detach()

    A = torch.tensor([[1.0, 2.0], [0.5, -1.0], [0.0, 3.0]], dtype=F64)
    jac = torch.func.vmap(torch.func.jacrev(lambda a: solve(None, a)))(A)
    for a, got in zip(A, jac, strict=True):
        x = solve(None, a)
        hess = torch.func.hessian(f)(x, a)
        mixed = torch.func.jacrev(torch.func.grad(f), argnums=1)(x, a)
        torch.testing.assert_close(got, -torch.linalg.solve(hess, mixed))
