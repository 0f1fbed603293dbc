"""The input that minimizes a small tanh network, in PyTorch, and when dargmin refuses.

The network is ``nn.Sequential(Linear(1→3), Tanh, Linear(3→1, no bias))``; its input ``x``
is minimized by ``torch.optim.Adam`` (lr 0.5, 350 steps from 0), and θ is the network's
parameter dict. ``dargmin.torch.argmin(objective)`` decorates the Adam loop; the objective
calls the module through ``torch.func.functional_call``.

(a) With the stabilizer ``x²/16`` a minimum exists: ``dx*/dθ`` by ``torch.func.jacrev``
    through the solution matches central finite differences (δ = 1e-4) of re-optimized
    solutions (Adam, then Newton steps to 1e-12).
(b) Without it, for some weights the minimum is at −∞: Adam walks off until tanh
    saturates, the gradient and the curvature are small but not zero. The implicit formula
    would return a number; dargmin refuses and says why.
(c) With ``x ∈ R³`` through a ``Linear(3→2)`` bottleneck the Hessian is singular (the
    network is constant along the null space of W₁) and Adam has not converged: naive
    inversion gives derivatives ~1e15 where finite differences give ~1; dargmin refuses.

Weights that show (b) and (c) are found by scanning seeds (PyTorch's default
initialization). ``DARGMIN_FAST=1``: in (b) and (c) finite differences for the first
layer's weights only,
and one step budget in (b).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

try:
    import torch
    from torch import nn
except ImportError:  # the example needs the optional extra
    print("This example needs PyTorch: pip install 'dargmin[torch]'. Skipped.")
    sys.exit(0)

import dargmin
import dargmin.torch as dt

torch.set_default_dtype(torch.float64)
Params = dict[str, torch.Tensor]
ADAM_LR = 0.5
ADAM_STEPS = 350
FD_STEP = 1e-4
FAST = bool(os.environ.get("DARGMIN_FAST"))
# In (b) and (c) the finite differences only show the size of the optimizer's sensitivity:
# under DARGMIN_FAST=1 the first layer's weights are enough.
FD_ONLY = "0.weight" if FAST else None


def make_network(seed: int, n_in: int = 1, n_hidden: int = 3) -> nn.Module:
    """PyTorch's default initialization, U(−1/√fan_in, 1/√fan_in), from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, n_hidden), nn.Tanh(), nn.Linear(n_hidden, 1, bias=False))


def make_objective(
    net: nn.Module, stabilizer: float
) -> Callable[[torch.Tensor, Params], torch.Tensor]:
    """``f_θ(x) = net_θ(x) + stabilizer · ‖x‖²/16`` (a scalar)."""
    call = dt.module_function(net, reduce_to_scalar=True)

    def objective(x: torch.Tensor, params: Params) -> torch.Tensor:
        return call(x, params) + stabilizer * (x**2).sum() / 16.0

    return objective


def adam(objective: Callable, params: Params, n_in: int, steps: int = ADAM_STEPS) -> torch.Tensor:
    """``torch.optim.Adam`` on ``x`` from 0, a fixed number of steps (the seed case)."""
    x = torch.zeros(n_in, requires_grad=True)
    optimizer = torch.optim.Adam([x], lr=ADAM_LR)
    for _ in range(steps):
        optimizer.zero_grad()
        objective(x, params).backward()
        optimizer.step()
    return x.detach()


def tight_solve(
    objective: Callable, params: Params, n_in: int, start: torch.Tensor | None = None
) -> torch.Tensor:
    """Newton steps from ``start`` (default: Adam's solution): finite differences need the
    solution to ~1e-12. The re-solves of the finite differences start from the unperturbed
    solution, 1e-4 away: Newton's quadratic convergence needs no new Adam run."""
    x = adam(objective, params, n_in, ADAM_STEPS) if start is None else start
    for _ in range(8):  # quadratic convergence from ~1e-4: 8 steps reach rounding
        grad = torch.func.grad(objective)(x, params)
        hess = torch.func.hessian(objective)(x, params)
        x = x - torch.linalg.solve(hess, grad)
    return x


def finite_differences(
    solve: Callable[[Params], torch.Tensor], params: Params, only: str | None = None
) -> torch.Tensor:
    """Central differences of re-solved problems: an ``(n_x, n_params)`` matrix (or the
    columns of the parameter ``only``)."""
    columns = []
    for name, value in params.items():
        if only is not None and name != only:
            continue
        for i in range(value.numel()):
            shifted = []
            for sign in (1.0, -1.0):
                moved = {k: v.clone() for k, v in params.items()}
                moved[name].view(-1)[i] += sign * FD_STEP
                shifted.append(solve(moved))
            columns.append((shifted[0] - shifted[1]) / (2 * FD_STEP))
    return torch.stack(columns, dim=1)


def flat_jacobian(jac: Params) -> torch.Tensor:
    """A dict of Jacobian blocks of a vector ``x`` as one ``(n_x, n_params)`` matrix."""
    n_x = next(iter(jac.values())).shape[0]
    return torch.cat([block.reshape(n_x, -1) for block in jac.values()], dim=1)


def naive_ift(objective: Callable, x: torch.Tensor, params: Params) -> torch.Tensor:
    """``−H⁻¹ ∂²f/∂x∂θ`` with no questions asked (a hand-rolled implicit derivative)."""
    hess = torch.func.hessian(objective)(x, params)
    mixed = flat_jacobian(torch.func.jacrev(torch.func.grad(objective), argnums=1)(x, params))
    return -torch.linalg.solve(hess, mixed)


def decorated_adam(objective: Callable, n_in: int) -> Callable[[None, Params], torch.Tensor]:
    @dt.argmin(objective)
    def solve(init: None, params: Params) -> torch.Tensor:
        return adam(objective, params, n_in)

    return solve


def ask_dargmin(objective: Callable, params: Params, n_in: int) -> None:
    """Ask for dx*/dθ; print the refusal when dargmin refuses."""
    solve = decorated_adam(objective, n_in)
    try:
        jac = torch.func.jacrev(lambda p: solve(None, p))(params)
        print("  dargmin returned (unexpected):", flat_jacobian(jac))
    except dargmin.DargminError as err:
        print(f"  dargmin refused ({type(err).__name__}, reason {dargmin.failure_reason(err)}):")
        print(f"    {err}")


def statistics(objective: Callable, x: torch.Tensor, params: Params) -> dict[str, float]:
    grad = torch.func.grad(objective)(x, params)
    eigenvalues = torch.linalg.eigvalsh(torch.func.hessian(objective)(x, params))
    return {
        "grad": float(grad.norm()),
        "min_eig": float(eigenvalues[0]),
        "max_eig": float(eigenvalues[-1]),
        "x": float(x.abs().max()),
    }


def scan_seeds(
    n_in: int,
    n_hidden: int,
    accept: Callable[[Callable, torch.Tensor, Params], bool],
    max_seed: int,
) -> int:
    """The first seed whose unstabilized Adam solution passes ``accept``."""
    for seed in range(max_seed):
        net = make_network(seed, n_in, n_hidden)
        params = {k: v.detach() for k, v in net.named_parameters()}
        objective = make_objective(net, 0.0)
        if accept(objective, adam(objective, params, n_in), params):
            return seed
    raise RuntimeError(f"no seed below {max_seed} shows the failure")


def part_a() -> float:
    print("(a) stabilized objective net_θ(x) + x²/16, seed 0")
    net = make_network(0)
    params = {k: v.detach() for k, v in net.named_parameters()}
    objective = make_objective(net, 1.0)
    solve = decorated_adam(objective, 1)
    x = solve(None, params)
    print(f"  Adam solution x* = {float(x[0]):.10f}")
    jac = flat_jacobian(torch.func.jacrev(lambda p: solve(None, p))(params))
    x_tight = tight_solve(objective, params, 1)
    jac_fd = finite_differences(lambda p: tight_solve(objective, p, 1, x_tight), params)
    names = [f"{k}[{i}]" for k, v in params.items() for i in range(v.numel())]
    print(f"  {'θ':>10} {'dargmin jacrev':>16} {'FD (δ=1e-4)':>16}")
    for j, name in enumerate(names):
        print(f"  {name:>10} {float(jac[0, j]):16.10f} {float(jac_fd[0, j]):16.10f}")
    rel = float((jac - jac_fd).abs().max() / jac_fd.abs().max())
    print(f"  max |dargmin − FD| / max |FD| = {rel:.2e}")
    assert rel < 1e-5, rel
    return rel


def part_b() -> None:
    print("\n(b) no stabilizer: the minimum is at −∞ for some weights, Adam walks off")

    def runs_off(objective: Callable, x: torch.Tensor, params: Params) -> bool:
        s = statistics(objective, x, params)
        return s["x"] > 5 and 1e-5 < s["grad"] < 1e-3 and 1e-5 < s["max_eig"] < 1e-3

    seed = scan_seeds(1, 3, runs_off, max_seed=200)
    net = make_network(seed)
    params = {k: v.detach() for k, v in net.named_parameters()}
    objective = make_objective(net, 0.0)
    x = adam(objective, params, 1)
    s = statistics(objective, x, params)
    print(f"  first seed that runs off: {seed}; x = {float(x[0]):.4f}")
    print(f"  f'(x) = {s['grad']:.3e}, f''(x) = {s['max_eig']:.3e}")
    naive = float(naive_ift(objective, x, params).abs().max())
    print(f"  naive −f''⁻¹ ∂f'/∂θ (largest entry): {naive:.3e}")
    for steps in (ADAM_STEPS,) if FAST else (ADAM_STEPS, 2 * ADAM_STEPS):
        fd = finite_differences(
            lambda p, steps=steps: adam(objective, p, 1, steps), params, only=FD_ONLY
        )
        largest = float(fd.abs().max())
        print(f"  FD of Adam's output after {steps} steps (largest entry): {largest:.3e}")
    ask_dargmin(objective, params, 1)


def part_c() -> None:
    print("\n(c) x ∈ R³ through a Linear(3→2) bottleneck, no stabilizer, Adam not converged")

    def singular_and_unconverged(objective: Callable, x: torch.Tensor, params: Params) -> bool:
        s = statistics(objective, x, params)
        return 1e-5 < s["grad"] < 1e-3 and float(naive_ift(objective, x, params).abs().max()) > 1e12

    seed = scan_seeds(3, 2, singular_and_unconverged, max_seed=200)
    net = make_network(seed, 3, 2)
    params = {k: v.detach() for k, v in net.named_parameters()}
    objective = make_objective(net, 0.0)
    x = adam(objective, params, 3)
    s = statistics(objective, x, params)
    print(f"  seed {seed}: x = {[round(float(v), 3) for v in x]}, ‖∇f(x)‖ = {s['grad']:.3e}")
    naive = naive_ift(objective, x, params)
    fd = finite_differences(lambda p: adam(objective, p, 3), params, only=FD_ONLY)
    print(f"  naive Hessian inversion: largest |dx/dθ| = {float(naive.abs().max()):.3e}")
    print(f"  FD of Adam's output:     largest |dx/dθ| = {float(fd.abs().max()):.3e}")
    ask_dargmin(objective, params, 3)


if __name__ == "__main__":
    part_a()
    part_b()
    part_c()
