r"""Training objectives. The JKO step of DESIGN.md §2:

.. math::
    J_k(θ) = E_{x∼p_{k-1}}\big[½‖T_k(x)‖² − ℓ_k(x)\big] + \frac{1}{h_k} E\,[C_k(x)]

with the transport cost C_k = L_k = ∫½‖v‖² dt (``"path"``, the dynamic
Benamou–Brenier form) or C_k = ½‖T_k(x) − x‖² (``"endpoint"``).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

from torch import Tensor

from blocks import Block

from .ode import integrate

__all__ = ["JKOLoss", "Transport", "gaussian_log_prob", "jko_loss"]

Transport = Literal["path", "endpoint"]


class JKOLoss(NamedTuple):
    """Value of the JKO objective on a batch (scalars).

    Attributes:
        loss: kl + transport / h, the quantity minimised.
        kl: E[½‖T(x)‖² − ℓ(x)], KL((T)#p ‖ N(0, I)) up to a θ-free constant.
        transport: E[C(x)], the W2²/2 proxy.
    """

    loss: Tensor
    kl: Tensor
    transport: Tensor


def gaussian_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) = −½‖z‖² − (d/2) log 2π for z (n, d); returns (n,)."""
    return -0.5 * z.pow(2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


def jko_loss(block: Block, x: Tensor, h: float, steps: int, transport: Transport = "path") -> JKOLoss:
    """The JKO step objective J_k on a batch ``x`` (n, d) with step size ``h``."""
    z, logdet, kinetic = integrate(block, x, steps)
    kl = (0.5 * z.pow(2).sum(1) - logdet).mean()
    if transport == "path":
        cost = kinetic.mean()
    elif transport == "endpoint":
        cost = 0.5 * (z - x).pow(2).sum(1).mean()
    else:
        raise ValueError(f"transport must be 'path' or 'endpoint', got {transport!r}")
    return JKOLoss(kl + cost / h, kl, cost)
