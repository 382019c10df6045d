r"""Time slices of a block, the generic refinement of docs/design.md,
"The scheduler and its stages".

Slice j of c of a block with velocity v is the block

.. math:: v_j(x, t) = \tfrac{1}{c}\, v\big(x, \tfrac{j + t}{c}\big), \qquad t ∈ [0, 1],

whose time-1 map is the parent's flow from t = j/c to (j+1)/c. The c slices
composed in order reproduce the parent map exactly; with ``steps / c`` RK4
steps each they even reproduce the parent's RK4 grid. This works for any
block type: the slice only calls the parent through the block protocol.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor

from .base import Block
from .registry import make, register, spec

__all__ = ["TimeSlice", "time_slices"]


@register("timeslice")
class TimeSlice(Block):
    """Slice ``index`` of ``count`` of a parent block (its own copy of the weights).

    Arguments:
        dim: State dimension d (must equal the parent's).
        parent: The parent block, or its spec ``{"type": name, "config": {...}}``.
        index: Slice number j in 0..count−1.
        count: Number of slices c ≥ 2.

    Example:
        >>> import blocks
        >>> parent = blocks.make("otflow", dim=2, width=8)
        >>> halves = blocks.time_slices(parent, 2)
        >>> [(s.index, s.count) for s in halves]
        [(0, 2), (1, 2)]

    References:
        | Normalizing flow neural networks by JKO scheme (Xu et al., 2023)
        | https://arxiv.org/abs/2212.14424
    """

    def __init__(self, dim: int, parent: Block | dict[str, Any], index: int, count: int) -> None:
        super().__init__()
        if isinstance(parent, dict):
            parent = make(parent["type"], **parent["config"])
        if not isinstance(parent, Block):
            raise TypeError(f"timeslice parent must be a Block or a block spec, got {type(parent).__name__}")
        if parent.dim != dim:
            raise ValueError(f"timeslice: dim {dim} differs from the parent's dimension {parent.dim}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 2:
            raise ValueError(f"timeslice: count must be an integer ≥ 2, got {count!r}")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            raise ValueError(f"timeslice: index must be an integer in [0, {count}), got {index!r}")
        self.dim, self.index, self.count = dim, index, count
        self.parent = parent
        self.compilable = parent.compilable

    def forward(self, z: Tensor, t: float | Tensor) -> tuple[Tensor, Tensor]:
        v, div = self.parent(z, (self.index + t) / self.count)
        return v / self.count, div / self.count

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim, "parent": spec(self.parent), "index": self.index, "count": self.count}

    def extra_repr(self) -> str:
        return f"index={self.index}, count={self.count}"


def time_slices(block: Block, count: int) -> list[Block]:
    """Splits ``block`` into ``count`` time slices, each with its own copy of the
    weights, whose composition in order is the block's map. A slice of a slice
    is flattened to a slice of the root block: slice j of c of slice i of c'
    is slice i·c + j of c'·c.

    Example:
        >>> import torch, blocks
        >>> from jkoflow import integrate
        >>> parent, x = blocks.make("otflow", dim=2, width=8), torch.randn(5, 2)
        >>> z = x
        >>> for piece in blocks.time_slices(parent, 2):  # 4 RK4 steps each = the parent's 8-step grid
        ...     z = integrate(piece, z, 4).z
        >>> bool(torch.allclose(z, integrate(parent, x, 8).z, atol=1e-6))
        True

    References:
        | Normalizing flow neural networks by JKO scheme (Xu et al., 2023)
        | https://arxiv.org/abs/2212.14424
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise ValueError(f"refinement factor must be an integer ≥ 2, got {count!r}")
    root, first, total = block, 0, count
    if isinstance(block, TimeSlice):
        root, first, total = block.parent, block.index * count, block.count * count
    return [TimeSlice(root.dim, copy.deepcopy(root), first + j, total) for j in range(count)]
