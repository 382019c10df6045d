"""Block types with analytic flows, registered for the tests."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

import blocks


@blocks.register("test-linear")
class LinearBlock(blocks.Block):
    """v(z, t) = z Bᵀ: the time-1 map is z ↦ expm(B) z, log det = tr B."""

    def __init__(self, dim: int, width: int = 0, depth: int = 0) -> None:
        super().__init__()
        self.dim = dim
        self.B = nn.Parameter(torch.zeros(dim, dim))

    def forward(self, z: Tensor, t: float | Tensor) -> tuple[Tensor, Tensor]:
        return z @ self.B.T, self.B.trace().expand(z.shape[0])

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim}


@blocks.register("test-constant")
class ConstantBlock(blocks.Block):
    """v(z, t) = c: straight paths, so the kinetic and endpoint costs agree."""

    def __init__(self, dim: int, width: int = 0, depth: int = 0) -> None:
        super().__init__()
        self.dim = dim
        self.c = nn.Parameter(torch.zeros(dim))

    def forward(self, z: Tensor, t: float | Tensor) -> tuple[Tensor, Tensor]:
        return self.c.expand_as(z), z.new_zeros(z.shape[0])

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim}


@blocks.register("test-quadratic-potential")
class QuadraticPotential(blocks.PotentialBlock):
    """Φ(x, t) = c‖x‖²/(2(1 + a·t)). With a = 0 it is static (v = −cx); with
    c = −a it solves ∂tΦ − ½‖∇Φ‖² = 0 exactly."""

    def __init__(self, dim: int, c: float = 1.0, a: float = 0.0) -> None:
        super().__init__()
        self.dim, self.c, self.a = dim, c, a
        self.dummy = nn.Parameter(torch.zeros(()))

    def _scale(self, z: Tensor, t: float | Tensor) -> tuple[Tensor, Tensor]:
        t = blocks.time_column(t, z)[:, 0]
        return self.c / (1.0 + self.a * t), t

    def potential(self, z: Tensor, t: float | Tensor) -> Tensor:
        scale, _ = self._scale(z, t)
        return 0.5 * scale * z.pow(2).sum(1)

    def derivatives(self, z: Tensor, t: float | Tensor) -> blocks.PotentialDerivatives:
        scale, _ = self._scale(z, t)
        dscale = -self.a * scale**2 / self.c  # d/dt c/(1 + at)
        return blocks.PotentialDerivatives(
            scale[:, None] * z, 0.5 * dscale * z.pow(2).sum(1), scale * z.shape[1] + 0 * self.dummy
        )

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim, "c": self.c, "a": self.a}
