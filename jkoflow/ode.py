r"""The one integrator of jkoflow: fixed-step RK4 over the augmented state.

For a block with velocity v and divergence div v, :func:`integrate` solves
(DESIGN.md §1)

.. math::
    \dot z = v(z, t), \quad \dot ℓ = \nabla\cdot v(z, t), \quad \dot L = ½‖v(z, t)‖²

from t0 to t1 with torchdiffeq's fixed-grid ``rk4`` (3/8 rule), ``steps`` equal
steps, no adjoint. Going forward in time (0 → 1), ℓ(1) = log|det ∇T(x)| and
L(1) is the kinetic energy of the path; going backward (1 → 0) gives T⁻¹.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torchdiffeq import odeint

from blocks import Block

__all__ = ["ODEResult", "integrate"]


class ODEResult(NamedTuple):
    """End state of :func:`integrate`.

    Attributes:
        z: State at t1, shape (n, d).
        logdet: ∫ div v dt from t0 to t1, shape (n,).
        kinetic: ∫ ½‖v‖² dt from t0 to t1, shape (n,) (negative when t1 < t0).
    """

    z: Tensor
    logdet: Tensor
    kinetic: Tensor


class _Augmented(torch.nn.Module):
    """Right-hand side of the augmented ODE for torchdiffeq."""

    def __init__(self, block: Block):
        super().__init__()
        self.block = block

    def forward(self, t: Tensor, state: tuple[Tensor, Tensor, Tensor]):
        v, div = self.block(state[0], t)
        return v, div, 0.5 * v.pow(2).sum(1)


def integrate(
    block: Block,
    x: Tensor,
    steps: int,
    t0: float = 0.0,
    t1: float = 1.0,
) -> ODEResult:
    """Integrates ``block`` from ``t0`` to ``t1`` in ``steps`` RK4 steps.

    Arguments:
        block: Any :class:`blocks.Block`.
        x: Initial states, shape (n, d).
        steps: Number of equal RK4 steps (≥ 1).
        t0, t1: Start and end time; ``t1 < t0`` integrates backward.

    Returns:
        :class:`ODEResult` with z(t1), ∫div v and ∫½‖v‖² over [t0, t1].
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    zeros = x.new_zeros(x.shape[0])
    grid = torch.linspace(t0, t1, steps + 1, dtype=x.dtype, device=x.device)
    z, logdet, kinetic = odeint(_Augmented(block), (x, zeros, zeros), grid, method="rk4")
    return ODEResult(z[-1], logdet[-1], kinetic[-1])
