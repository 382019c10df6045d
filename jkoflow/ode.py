r"""The one integrator of jkoflow: fixed-step RK4 over the augmented state.

For a block with velocity v and divergence div v, :func:`integrate` solves
(docs/design.md, "Integration")

.. math::
    \dot z = v(z, t), \quad \dot ℓ = \nabla\cdot v(z, t), \quad \dot L = ½‖v(z, t)‖²,

and for potential blocks on request the HJB residual
:math:`\dot R = |∂_tΦ − ½‖∇_xΦ‖²|`, from t0 to t1 in ``steps`` equal steps of
the classical Runge–Kutta method in its 3/8 form (:func:`rk4_step`, the
scheme of torchdiffeq's fixed-grid ``rk4``), no adjoint. Going forward in
time (0 → 1), ℓ(1) = log|det ∇T(x)| and L(1) is the kinetic energy of the
path; going backward (1 → 0) gives T⁻¹.

Only z enters the right-hand side; ℓ, L and R are running integrals. One step
is a plain function of tensors (times included), so that a trainer can hand
:func:`integrate` a compiled copy of it (:mod:`jkoflow.compiling`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from blocks import Block, PotentialBlock

__all__ = ["ODEResult", "Stepper", "integrate", "rk4_step"]

Stepper = Callable[[Block, Tensor, Tensor, Tensor, bool], tuple[Tensor, ...]]
"""The signature of :func:`rk4_step` (and of a compiled copy of it)."""


class ODEResult(NamedTuple):
    """End state of :func:`integrate`.

    Attributes:
        z: State at t1, shape (n, d).
        logdet: ∫ div v dt from t0 to t1, shape (n,).
        kinetic: ∫ ½‖v‖² dt from t0 to t1, shape (n,) (negative when t1 < t0).
        hjb: ∫ |∂_tΦ − ½‖∇Φ‖²| dt, shape (n,), when asked for; else None.

    Example:
        >>> import torch, blocks
        >>> from jkoflow import integrate
        >>> out = integrate(blocks.make("otflow", dim=2, width=8), torch.randn(6, 2), steps=4, hjb=True)
        >>> out.z.shape, out.logdet.shape, out.kinetic.shape, out.hjb.shape
        (torch.Size([6, 2]), torch.Size([6]), torch.Size([6]), torch.Size([6]))
    """

    z: Tensor
    logdet: Tensor
    kinetic: Tensor
    hjb: Tensor | None = None


def _rates(block: Block, z: Tensor, t: Tensor, hjb: bool) -> tuple[Tensor, ...]:
    """Right-hand side (v, div v, ½‖v‖²[, |∂tΦ − ½‖∇Φ‖²|]) of the augmented ODE."""
    if not hjb:
        v, div = block(z, t)
        return v, div, 0.5 * v.pow(2).sum(1)
    grad_x, dphi_dt, laplacian = block.derivatives(z, t)  # type: ignore[attr-defined]
    speed2 = grad_x.pow(2).sum(1)
    return -grad_x, -laplacian, 0.5 * speed2, (dphi_dt - 0.5 * speed2).abs()


def rk4_step(block: Block, z: Tensor, t: Tensor, dt: Tensor, hjb: bool = False) -> tuple[Tensor, ...]:
    r"""The increments of (z, ℓ, L[, R]) over one RK4 step from t to t + dt (3/8 rule):

    .. math::
        k_1 = f(t, z),\quad k_2 = f(t + \tfrac{h}{3}, z + \tfrac{h}{3} k_1),\quad
        k_3 = f(t + \tfrac{2h}{3}, z + h(k_2 − \tfrac13 k_1)),\quad
        k_4 = f(t + h, z + h(k_1 − k_2 + k_3)),\quad
        Δ = \tfrac{h}{8}(k_1 + 3k_2 + 3k_3 + k_4),

    with f the augmented right-hand side; only its z part feeds the stages.
    ``t`` and ``dt`` are 0-d tensors (a compiled copy then serves every step).

    Example:
        >>> import torch, blocks
        >>> from jkoflow.ode import rk4_step
        >>> blk = blocks.make("otflow", dim=2, width=8)
        >>> dz, dlogdet, dkinetic = rk4_step(blk, torch.randn(3, 2), torch.tensor(0.0), torch.tensor(0.5))
        >>> dz.shape, dlogdet.shape, dkinetic.shape
        (torch.Size([3, 2]), torch.Size([3]), torch.Size([3]))

    References:
        | Beitrag zur näherungsweisen Integration totaler Differentialgleichungen (Kutta, 1901)
    """
    third = 1.0 / 3.0
    k1 = _rates(block, z, t, hjb)
    k2 = _rates(block, z + dt * k1[0] * third, t + dt * third, hjb)
    k3 = _rates(block, z + dt * (k2[0] - k1[0] * third), t + dt * (2 * third), hjb)
    k4 = _rates(block, z + dt * (k1[0] - k2[0] + k3[0]), t + dt, hjb)
    return tuple((a + 3 * (b + c) + e) * (dt * 0.125) for a, b, c, e in zip(k1, k2, k3, k4, strict=True))


def integrate(
    block: Block,
    x: Tensor,
    steps: int,
    t0: float = 0.0,
    t1: float = 1.0,
    hjb: bool = False,
    stepper: Stepper = rk4_step,
) -> ODEResult:
    """Integrates ``block`` from ``t0`` to ``t1`` in ``steps`` RK4 steps.

    Arguments:
        block: Any :class:`blocks.Block`.
        x: Initial states, shape (n, d).
        steps: Number of equal RK4 steps (≥ 1).
        t0, t1: Start and end time; ``t1 < t0`` integrates backward.
        hjb: Also integrate the HJB residual (potential blocks only).
        stepper: The step function, :func:`rk4_step` or a compiled copy of it.

    Returns:
        :class:`ODEResult` with z(t1), ∫div v, ∫½‖v‖² (and ∫HJB) over [t0, t1].

    Example:
        >>> import torch, blocks
        >>> from jkoflow import integrate
        >>> blk, x = blocks.make("otflow", dim=2, width=8), torch.randn(5, 2)
        >>> back = integrate(blk, integrate(blk, x, 8).z, 8, t0=1.0, t1=0.0)  # T⁻¹(T(x))
        >>> bool(torch.allclose(back.z, x, atol=1e-5))
        True

    References:
        | Neural Ordinary Differential Equations (Chen et al., 2018)
        | https://arxiv.org/abs/1806.07366

        | OT-Flow: Fast and Accurate Continuous Normalizing Flows via Optimal Transport (Onken et al., 2021)
        | https://arxiv.org/abs/2006.00104
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if hjb and not isinstance(block, PotentialBlock):
        raise ValueError(
            f"the HJB term needs a potential block (∂tΦ); block type {type(block).name!r} has none"
        )
    zeros = x.new_zeros(x.shape[0])
    state: tuple[Tensor, ...] = (x, zeros, zeros, zeros) if hjb else (x, zeros, zeros)
    grid = torch.linspace(t0, t1, steps + 1, dtype=x.dtype, device=x.device)
    for i in range(steps):
        increments = stepper(block, state[0], grid[i], grid[i + 1] - grid[i], hjb)
        state = tuple(s + ds for s, ds in zip(state, increments, strict=True))
    return ODEResult(*state)
