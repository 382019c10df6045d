"""Block types with analytic flows, registered for the tests."""

from __future__ import annotations

import torch
from torch import nn

import blocks


@blocks.register("test-linear")
class LinearBlock(blocks.Block):
    """v(z, t) = z Bᵀ: the time-1 map is z ↦ expm(B) z, log det = tr B."""

    def __init__(self, dim: int, width: int = 0, depth: int = 0):
        super().__init__()
        self.dim = dim
        self.B = nn.Parameter(torch.zeros(dim, dim))

    def forward(self, z, t):
        return z @ self.B.T, self.B.trace().expand(z.shape[0])

    def config(self):
        return {"dim": self.dim}


@blocks.register("test-constant")
class ConstantBlock(blocks.Block):
    """v(z, t) = c: straight paths, so the kinetic and endpoint costs agree."""

    def __init__(self, dim: int, width: int = 0, depth: int = 0):
        super().__init__()
        self.dim = dim
        self.c = nn.Parameter(torch.zeros(dim))

    def forward(self, z, t):
        return self.c.expand_as(z), z.new_zeros(z.shape[0])

    def config(self):
        return {"dim": self.dim}
