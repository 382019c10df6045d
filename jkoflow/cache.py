"""Where the JKO trainer keeps its cached pushed samples, and how it streams them.

The trainer holds the train, validation and test sets pushed to p_{k−1} (and,
while pushing, to p_k): 2·Σ n·(d + 1) numbers. Policy (``JKOConfig.cache_device``):

- ``"device"``: on the compute device;
- ``"host"``: in host memory (page-locked when the compute device is CUDA, so
  copies to it are asynchronous); every mini-batch and push chunk is copied to
  the compute device and the pushed chunk copied back;
- ``"auto"``: on the device when it is the CPU, or when those bytes are at most
  :data:`MEMORY_FRACTION` of the device's free memory; otherwise on the host.

Either place gives the same numbers: the arithmetic is the same, only the
place where the samples wait between pushes changes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import CACHE_POLICIES as POLICIES
from .errors import InputError

__all__ = ["MEMORY_FRACTION", "POLICIES", "cache_bytes", "choose_cache_device", "to_compute", "to_store"]

MEMORY_FRACTION = 0.5
"""Share of the device's free memory the cached samples may take under ``"auto"``."""


def cache_bytes(rows: int, dim: int, dtype: torch.dtype) -> int:
    """Bytes of ``rows`` cached samples and log-determinants, twice (p_{k−1} and p_k).

    >>> cache_bytes(1000, 2, torch.float32)
    24000
    """
    return 2 * rows * (dim + 1) * torch.empty(0, dtype=dtype).element_size()


def choose_cache_device(
    policy: str, device: torch.device, nbytes: int, free: int | None = None
) -> torch.device:
    """The device the cached samples live on (see the module docstring).

    Arguments:
        policy: ``"auto"``, ``"device"`` or ``"host"``.
        device: The compute device.
        nbytes: What the cache needs (:func:`cache_bytes`).
        free: Free bytes on ``device``; asked from CUDA when None.

    >>> cuda = torch.device("cuda", 0)
    >>> choose_cache_device("auto", cuda, 10, free=100), choose_cache_device("auto", cuda, 60, free=100)
    (device(type='cuda', index=0), device(type='cpu'))
    """
    if policy not in POLICIES:
        raise InputError(f"cache_device must be one of {', '.join(POLICIES)}, got {policy!r}")
    if policy == "host":
        return torch.device("cpu")
    if policy == "device" or device.type == "cpu":
        return device
    if free is None:
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    return device if nbytes <= MEMORY_FRACTION * free else torch.device("cpu")


def to_compute(x: Tensor, device: torch.device) -> Tensor:
    """``x`` on the compute device (asynchronous from page-locked memory)."""
    return x.to(device, non_blocking=x.is_pinned())


def to_store(x: Tensor, store: torch.device, device: torch.device) -> Tensor:
    """``x`` on the cache device; page-locked there when it is the host of a CUDA device."""
    x = x.to(store)
    if store.type == "cpu" and device.type == "cuda" and not x.is_pinned():
        x = x.pin_memory()
    return x
