r"""The one integrator of jkoflow: fixed-step RK4 over the augmented state.

For a block with velocity v and divergence div v, :func:`integrate` solves
(docs/design.md, "Integration")

.. math::
    \dot z = v(z, t), \quad \dot ℓ = \nabla\cdot v(z, t), \quad \dot L = ½‖v(z, t)‖²,

and for potential blocks on request the HJB residual
:math:`\dot R = |∂_tΦ − ½‖∇_xΦ‖²|`, from t0 to t1 with torchdiffeq's
fixed-grid ``rk4`` (3/8 rule), ``steps`` equal steps, no adjoint. Going
forward in time (0 → 1), ℓ(1) = log|det ∇T(x)| and L(1) is the kinetic energy
of the path; going backward (1 → 0) gives T⁻¹.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from blocks import Block, PotentialBlock

__all__ = ["ODEResult", "integrate"]


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


class _Augmented(torch.nn.Module):
    """Right-hand side of the augmented ODE (z, ℓ, L) for torchdiffeq."""

    def __init__(self, block: Block) -> None:
        super().__init__()
        self.block = block

    def forward(self, t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        v, div = self.block(state[0], t)
        return v, div, 0.5 * v.pow(2).sum(1)


class _AugmentedHJB(_Augmented):
    """(z, ℓ, L, R) for a potential block: R accumulates the HJB residual."""

    def forward(self, t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        grad_x, dphi_dt, laplacian = self.block.derivatives(state[0], t)
        speed2 = grad_x.pow(2).sum(1)
        return -grad_x, -laplacian, 0.5 * speed2, (dphi_dt - 0.5 * speed2).abs()


def integrate(
    block: Block,
    x: Tensor,
    steps: int,
    t0: float = 0.0,
    t1: float = 1.0,
    hjb: bool = False,
) -> ODEResult:
    """Integrates ``block`` from ``t0`` to ``t1`` in ``steps`` RK4 steps.

    Arguments:
        block: Any :class:`blocks.Block`.
        x: Initial states, shape (n, d).
        steps: Number of equal RK4 steps (≥ 1).
        t0, t1: Start and end time; ``t1 < t0`` integrates backward.
        hjb: Also integrate the HJB residual (potential blocks only).

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
    from torchdiffeq import odeint  # imported here: it pulls in scipy, which `import jkoflow` does not need

    zeros = x.new_zeros(x.shape[0])
    grid = torch.linspace(t0, t1, steps + 1, dtype=x.dtype, device=x.device)
    if hjb:
        if not isinstance(block, PotentialBlock):
            raise ValueError(
                f"the HJB term needs a potential block (∂tΦ); block type {type(block).name!r} has none"
            )
        out = odeint(_AugmentedHJB(block), (x, zeros, zeros, zeros), grid, method="rk4")
    else:
        out = odeint(_Augmented(block), (x, zeros, zeros), grid, method="rk4")
    return ODEResult(*(part[-1] for part in out))
