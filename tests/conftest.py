"""Shared test fixtures."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import pytest
import torch

import blocks

from . import analytic_blocks  # noqa: F401  (registers the analytic test blocks)

# One intra-op thread: tiny tensors run many times faster than with OpenMP's
# default spin-waiting threads on a few shared cores, and results do not
# depend on the machine's core count.
torch.set_num_threads(1)

SEED = 0
"""Every test starts from this seed of torch, numpy and random."""


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Seeds torch, numpy's global generator and random before every test, so
    that a test's numbers do not depend on which tests ran before it."""
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    random.seed(SEED)


@pytest.fixture
def random_otflow() -> Callable[..., blocks.OTFlowBlock]:
    """A float64 OT-Flow block with non-trivial weights."""

    def make(
        dim: int = 2, width: int = 8, depth: int = 2, seed: int = 0, scale: float = 0.3
    ) -> blocks.OTFlowBlock:
        torch.manual_seed(seed)
        block = blocks.make("otflow", dim=dim, width=width, depth=depth).double()
        with torch.no_grad():
            for p in block.parameters():
                p.add_(scale * torch.randn_like(p))
            block.w.mul_(0.3)  # a gentle field: |v| ~ 1, so RK4 is in its asymptotic regime
            block.A.mul_(0.5)
        return block

    return make
