r"""A free-form block: v = MLP([x, t]) with its exact divergence in closed form
(docs/design.md, "Blocks").

The FFJORD-style comparison to the OT-Flow potential block: no structure on
the field. The Jacobian ∂u_i/∂x of every hidden layer is carried forward with
the layer (O(m²d) per sample and layer, as OT-Flow's trace), so the
divergence needs no autograd pass and training back-propagates through plain
tensor operations once. It shares nothing with OT-Flow's internals.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .base import Block, time_column
from .divergence import divergence_hutchinson
from .registry import register

__all__ = ["ACTIVATIONS", "MLPBlock"]

#: Activations an :class:`MLPBlock` accepts by name; all are smooth, as the
#: divergence is differentiated once more in training.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "silu": nn.SiLU,
    "elu": nn.ELU,
}

#: σ'(a) of each activation from its input a and output σ(a).
SLOPES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "tanh": lambda a, s: 1 - s * s,
    "softplus": lambda a, s: torch.sigmoid(a),
    "silu": lambda a, s: torch.sigmoid(a) * (1 + a - s),
    "elu": lambda a, s: torch.where(a > 0, torch.ones_like(s), s + 1),
}


@register("mlp")
class MLPBlock(Block):
    r"""Free-form velocity v(x, t) = MLP([x, t]) with an autograd divergence.

    .. math::
        u_0 = σ(W_0 [x, t] + b_0), \quad u_i = σ(W_i u_{i-1} + b_i),\ i = 1..M,
        \quad v = W_{M+1} u_M + b_{M+1},

    with M = ``depth`` hidden m×m layers after the opening layer (as for
    ``otflow``), so (2d + 1)m + M·m² + (M + 1)m + d parameters. The last
    layer starts at zero: the block starts as the identity map.

    The divergence is exact and in closed form: with D_i = diag σ'(a_i) of
    the pre-activations a_i, the hidden Jacobians J_0 = D_0 W_0^x and
    J_i = D_i W_i J_{i−1} (each (n, d, m), carried with the layers) give

    .. math:: \nabla_x\cdot v = \operatorname{tr}(W_{M+1} J_M) = \sum_{j,k} (W_{M+1})_{jk} (J_M)_{kj},

    so the forward pass is plain tensor algebra: no autograd pass is needed
    to evaluate it, training differentiates it once, and it can be compiled
    (:attr:`compilable`). With ``hutchinson=True``, while the block is in
    training mode and gradients are being recorded, a one-probe Rademacher
    estimate by autograd is used instead (fresh probes at every evaluation).
    Evaluation, pushing and NLL — in ``eval()`` mode or under
    :func:`torch.no_grad` — are always exact.

    Arguments:
        dim: State dimension d.
        width: Hidden width m.
        depth: Number M ≥ 0 of hidden m×m layers after the opening layer.
        activation: One of :data:`ACTIVATIONS` (default ``"tanh"``).
        hutchinson: Train on the Hutchinson estimate of the divergence.

    Example:
        >>> import torch, blocks
        >>> blk = blocks.make("mlp", dim=2, width=8, depth=1)
        >>> v, div = blk(torch.randn(5, 2), 0.5)
        >>> v.shape, div.shape, bool((v == 0).all())  # zero last layer: v = 0
        (torch.Size([5, 2]), torch.Size([5]), True)

    References:
        | FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative Models
        | (Grathwohl et al., 2019)
        | https://arxiv.org/abs/1810.01367

        | A Stochastic Estimator of the Trace of the Influence Matrix for Laplacian
        | Smoothing Splines (Hutchinson, 1989)
        | https://doi.org/10.1080/03610918908812806
    """

    def __init__(
        self, dim: int, width: int = 32, depth: int = 1, activation: str = "tanh", hutchinson: bool = False
    ) -> None:
        super().__init__()
        for key, value, least in (("dim", dim, 1), ("width", width, 1), ("depth", depth, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"mlp block: {key} must be an integer ≥ {least}, got {value!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"mlp block: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}"
            )
        if not isinstance(hutchinson, bool):
            raise ValueError(f"mlp block: hutchinson must be true or false, got {hutchinson!r}")
        self.dim, self.width, self.depth = dim, width, depth
        self.activation, self.hutchinson = activation, hutchinson
        self.compilable = not hutchinson  # the Hutchinson estimate calls autograd inside forward
        sizes = [dim + 1] + [width] * (depth + 1)
        layers: list[nn.Module] = []
        for fan_in, fan_out in itertools.pairwise(sizes):
            layers += [nn.Linear(fan_in, fan_out), ACTIVATIONS[activation]()]
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Hidden layers uniform in ±1/√fan_in (weights and biases), the last
        layer zero, so v = 0 and the block is the identity map until trained."""
        with torch.no_grad():
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    bound = 1.0 / math.sqrt(layer.in_features)
                    layer.weight.uniform_(-bound, bound, generator=generator)
                    layer.bias.uniform_(-bound, bound, generator=generator)
            self.net[-1].weight.zero_()
            self.net[-1].bias.zero_()

    def config(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "width": self.width,
            "depth": self.depth,
            "activation": self.activation,
            "hutchinson": self.hutchinson,
        }

    def velocity(self, z: Tensor, t: float | Tensor) -> Tensor:
        """v(z, t) only, shape (n, d)."""
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"mlp block: expected z of shape (n, {self.dim}), got {tuple(z.shape)}")
        return self.net(torch.cat([z, time_column(t, z)], dim=1))

    def forward(self, z: Tensor, t: float | Tensor) -> tuple[Tensor, Tensor]:
        """v (n, d) and its divergence (n,): exact in closed form, or a
        Hutchinson estimate in training (see the class docstring)."""
        if self.hutchinson and self.training and torch.is_grad_enabled():
            with torch.enable_grad():
                x = z if z.requires_grad else z.detach().requires_grad_(True)
                v = self.velocity(x, t)
                return v, divergence_hutchinson(v, x, create_graph=True)
        return self.velocity_and_divergence(z, t)

    def velocity_and_divergence(self, z: Tensor, t: float | Tensor) -> tuple[Tensor, Tensor]:
        """v (n, d) and the exact tr ∂v/∂z (n,), carrying the hidden Jacobians
        J_i = ∂u_i/∂z in an (n, d, m) layout (one GEMM per layer)."""
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"mlp block: expected z of shape (n, {self.dim}), got {tuple(z.shape)}")
        linears = [layer for layer in self.net if isinstance(layer, nn.Linear)]
        act, slope = self.net[1], SLOPES[self.activation]
        first = linears[0]
        a = torch.addmm(first.bias, torch.cat([z, time_column(t, z)], dim=1), first.weight.T)
        u = act(a)
        jac = slope(a, u).unsqueeze(1) * first.weight[:, : self.dim].T  # (n, d, m)
        for layer in linears[1:-1]:
            a = torch.addmm(layer.bias, u, layer.weight.T)
            u = act(a)
            # one (n·d × m)(m × m) GEMM, folded by hand: whether torch.matmul folds a 3-d @ 2-d
            # product depends on the weight's requires_grad, and the two paths round apart
            jac = slope(a, u).unsqueeze(1) * (jac.flatten(0, 1) @ layer.weight.T).view_as(jac)
        last = linears[-1]
        v = torch.addmm(last.bias, u, last.weight.T)
        return v, (jac * last.weight).sum((1, 2))
