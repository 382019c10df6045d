r"""Training objectives, both on the one integrator.

The JKO step (docs/design.md, "The JKO step"; block k, step h_k):

.. math::
    J_k(θ) = E_{x∼p_{k-1}}\big[½‖T_k(x)‖² − ℓ_k(x)\big] + \frac{1}{h_k} E\,[C_k(x)]

with the transport cost C_k = L_k = ∫½‖v‖² dt (``"path"``, the dynamic
Benamou–Brenier form) or C_k = ½‖T_k(x) − x‖² (``"endpoint"``).

The monolithic OT-Flow objective (docs/design.md, "The OT-Flow baseline"; one block over [0, 1]):

.. math::
    J(θ) = α_C\,E\big[½‖z(1)‖² − ℓ(1) + \tfrac d2 \log 2π\big] + E[L(1)] + α_R\,E[R(1)]

with R the integrated HJB residual |∂tΦ − ½‖∇Φ‖²| (potential blocks only).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

from torch import Tensor

from blocks import Block

from .ode import Stepper, integrate, rk4_step

__all__ = ["JKOLoss", "OTFlowLoss", "Transport", "gaussian_log_prob", "jko_loss", "otflow_loss"]

Transport = Literal["path", "endpoint"]


class JKOLoss(NamedTuple):
    """Value of the JKO objective on a batch (scalars).

    Attributes:
        loss: kl + transport / h (kl alone for h = None), the quantity minimised.
        kl: E[½‖T(x)‖² − ℓ(x)], KL((T)#p ‖ N(0, I)) up to a θ-free constant.
        transport: E[C(x)], the W2²/2 proxy.

    Example:
        >>> import torch, blocks
        >>> from jkoflow import jko_loss
        >>> terms = jko_loss(blocks.make("otflow", dim=2, width=8), torch.randn(64, 2), h=5.0, steps=2)
        >>> bool(torch.isclose(terms.loss, terms.kl + terms.transport / 5.0))
        True
    """

    loss: Tensor
    kl: Tensor
    transport: Tensor


def gaussian_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) = −½‖z‖² − (d/2) log 2π for z (n, d); returns (n,)."""
    return -0.5 * z.pow(2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


def jko_loss(
    block: Block,
    x: Tensor,
    h: float | None,
    steps: int,
    transport: Transport = "path",
    stepper: Stepper = rk4_step,
) -> JKOLoss:
    r"""The JKO step objective J_k on a batch ``x`` (n, d) with step size ``h``,

    .. math:: J_k = E\big[½‖T_k(x)‖² − ℓ_k(x)\big] + \frac{1}{h} E[C_k(x)],

    integrated with ``steps`` RK4 steps (``stepper``: :func:`~jkoflow.ode.rk4_step`
    or a compiled copy, :mod:`jkoflow.compiling`); ``transport`` chooses C_k (``"path"``:
    ∫½‖v‖² dt, ``"endpoint"``: ½‖T_k(x) − x‖²). ``h=None`` (h → ∞) drops the
    transport term: the *free block* of JKO-iFlow, trained on the KL alone
    (the cost is still returned). Returns :class:`JKOLoss` (scalars).

    References:
        | The Variational Formulation of the Fokker-Planck Equation (Jordan, Kinderlehrer & Otto, 1998)
        | https://doi.org/10.1137/S0036141096303359

        | Normalizing flow neural networks by JKO scheme (Xu et al., 2023)
        | https://arxiv.org/abs/2212.14424
    """
    out = integrate(block, x, steps, stepper=stepper)
    z = out.z
    kl = (0.5 * z.pow(2).sum(1) - out.logdet).mean()
    if transport == "path":
        cost = out.kinetic.mean()
    elif transport == "endpoint":
        cost = 0.5 * (z - x).pow(2).sum(1).mean()
    else:
        raise ValueError(f"transport must be 'path' or 'endpoint', got {transport!r}")
    return JKOLoss(kl if h is None else kl + cost / h, kl, cost)


class OTFlowLoss(NamedTuple):
    """Value of the OT-Flow objective on a batch (scalars).

    Attributes:
        loss: α_C·nll + transport + α_R·hjb, the quantity minimised.
        nll: E[−log p(x)] in nats, constant included (at the training steps).
        transport: E[L], the kinetic energy.
        hjb: E[R], the HJB residual (0 when α_R = 0, not integrated then).

    Example:
        >>> import torch, blocks
        >>> from jkoflow import otflow_loss
        >>> terms = otflow_loss(blocks.make("otflow", dim=2, width=8), torch.randn(64, 2), 4, 10.0, 1.0)
        >>> bool(torch.isclose(terms.loss, 10.0 * terms.nll + terms.transport + terms.hjb))
        True
    """

    loss: Tensor
    nll: Tensor
    transport: Tensor
    hjb: Tensor


def otflow_loss(
    block: Block, x: Tensor, steps: int, alpha_c: float, alpha_r: float, stepper: Stepper = rk4_step
) -> OTFlowLoss:
    r"""The OT-Flow objective on a batch ``x`` (n, d),

    .. math:: J = α_C\,E\big[−\log p(x)\big] + E[L(1)] + α_R\,E[R(1)],

    integrated with ``steps`` RK4 steps by ``stepper``; α_R > 0 needs a potential block (it
    integrates the HJB residual R). Returns :class:`OTFlowLoss` (scalars).

    References:
        | OT-Flow: Fast and Accurate Continuous Normalizing Flows via Optimal Transport (Onken et al., 2021)
        | https://arxiv.org/abs/2006.00104
    """
    out = integrate(block, x, steps, hjb=alpha_r > 0, stepper=stepper)
    nll = -(gaussian_log_prob(out.z) + out.logdet).mean()
    transport = out.kinetic.mean()
    hjb = out.hjb.mean() if out.hjb is not None else transport.new_zeros(())
    return OTFlowLoss(alpha_c * nll + transport + alpha_r * hjb, nll, transport, hjb)
