"""Evaluation metrics of a trained flow (DESIGN.md §6)."""

from __future__ import annotations

from typing import Any

import torch

from .flow import Flow, as_data_tensor

__all__ = ["inversion_error", "nll", "parameter_count"]


@torch.no_grad()
def nll(flow: Flow, x: Any, chunk_size: int = 16384) -> float:
    """Mean negative log-likelihood −E[log p(x)] in nats per sample, the
    Gaussian constant included, with the flow's ``steps`` RK4 steps per block."""
    x = as_data_tensor(x, flow.dim, flow.shift)
    return float(-flow.log_prob(x, chunk_size).mean())


@torch.no_grad()
def inversion_error(flow: Flow, x: Any, chunk_size: int = 16384) -> float:
    """Mean round-trip error E‖x − T⁻¹(T(x))‖ (Euclidean norm, data units)."""
    x = as_data_tensor(x, flow.dim, flow.shift)
    z, _ = flow(x, chunk_size)
    return float((flow.inverse(z, chunk_size) - x).norm(dim=1).mean())


def parameter_count(flow: Flow) -> int:
    """Number of scalar parameters of all blocks."""
    return sum(p.numel() for p in flow.parameters())
