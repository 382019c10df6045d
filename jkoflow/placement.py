"""Where a run computes and keeps its samples, resolved once (docs/design.md,
"The scheduler and its stages"; :mod:`jkoflow.cache` for the cache policy).

:func:`resolve_placement` turns a config's ``device``, ``dtype`` and (JKO)
``cache_device`` plus the process group into one frozen :class:`Placement`;
the trainers read nothing else about devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import distributed
from .cache import cache_bytes, choose_cache_device, to_compute, to_store
from .config import resolve_device, resolve_dtype

__all__ = ["Placement", "resolve_placement"]


@dataclass(frozen=True)
class Placement:
    """Attributes:
    device: The compute device of this rank.
    dtype: The floating-point dtype of the blocks and samples.
    store: Where cached samples live (:mod:`jkoflow.cache`).
    group: This process's place among the ranks.

    Example:
        >>> from jkoflow.placement import resolve_placement
        >>> place = resolve_placement(jkoflow.JKOConfig(device="cpu", dtype="float64"))
        >>> place.device, place.dtype, place.store, place.group.size
        (device(type='cpu'), torch.float64, device(type='cpu'), 1)
        >>> torch.ones(3).to(place.like).dtype, place.keep(torch.ones(3)).device
        (torch.float64, device(type='cpu'))
    """

    device: torch.device
    dtype: torch.dtype
    store: torch.device
    group: distributed.Group

    @property
    def like(self) -> Tensor:
        """An empty tensor of the compute device and dtype (for ``.to(like)``)."""
        return torch.empty(0, dtype=self.dtype, device=self.device)

    @property
    def host(self) -> Tensor:
        """An empty tensor of the dtype on the CPU."""
        return torch.empty(0, dtype=self.dtype)

    def compute(self, x: Tensor) -> Tensor:
        """``x`` on the compute device."""
        return to_compute(x, self.device)

    def keep(self, x: Tensor) -> Tensor:
        """``x`` on the cache device."""
        return to_store(x, self.store, self.device)


def resolve_placement(
    config: Any,  # a TrainingConfig, JKOConfig or OTFlowConfig
    group: distributed.Group | None = None,
    rows: int = 0,
    dim: int = 0,
) -> Placement:
    """The placement of a run of ``config`` in ``group`` (default: the current
    one). With ``rows`` cached samples of dimension ``dim`` and a config with a
    ``cache_device`` policy, the cache device follows that policy; otherwise
    samples stay on the compute device."""
    group = group or distributed.current()
    dtype = resolve_dtype(config.dtype)
    device = group.device(str(resolve_device(config.device)))
    policy = getattr(config, "cache_device", "device")
    store = choose_cache_device(policy, device, cache_bytes(rows, dim, dtype)) if rows else device
    return Placement(device, dtype, store, group)
