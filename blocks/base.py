"""The block protocol: what every block type provides to the rest of jkoflow.

A block is a time-dependent velocity field on R^d, integrated over t ∈ [0, 1].
The integrator, the objectives, the scheduler and :class:`jkoflow.Flow` only use
the members documented on :class:`Block`; they never look inside a block.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["Block", "PotentialBlock", "PotentialDerivatives", "time_column"]


class Block(nn.Module, abc.ABC):
    r"""Base class of all block types.

    A block maps a batch of states and a time to the velocity and its exact
    divergence,

    .. math:: (z, t) \mapsto \big(v(z, t),\ \nabla_z \cdot v(z, t)\big).

    Subclasses implement :meth:`forward` and :meth:`config`, and are registered
    by name with :func:`blocks.register` so that configs and checkpoints can
    refer to them.

    Attributes:
        name: The registry name, set by :func:`blocks.register`.
        dim: The dimension d of the state.
    """

    name: ClassVar[str] = ""
    dim: int

    @abc.abstractmethod
    def forward(self, z: Tensor, t: float | Tensor) -> tuple[Tensor, Tensor]:
        """Velocity and exact divergence.

        Arguments:
            z: States, shape (n, d), any floating dtype.
            t: Time in [0, 1]: a float, a 0-d tensor or an (n,) tensor.

        Returns:
            ``(v, div)`` of shapes (n, d) and (n,), dtype and device of ``z``.
        """

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-able constructor arguments: ``type(self)(**self.config())`` is a
        block of the same architecture (weights are in the state dict)."""

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config().items())


class PotentialDerivatives(NamedTuple):
    """Derivatives of a potential Φ at a batch of points (x, t).

    Attributes:
        grad_x: ∇_x Φ, shape (n, d).
        dphi_dt: ∂_t Φ, shape (n,).
        laplacian: tr ∇_x² Φ (spatial Hessian trace), shape (n,).
    """

    grad_x: Tensor
    dphi_dt: Tensor
    laplacian: Tensor


class PotentialBlock(Block):
    """A block whose velocity is v = −∇_x Φ(x, t) for a scalar potential Φ.

    Subclasses implement :meth:`potential` and :meth:`derivatives`; the
    velocity, divergence (−tr ∇_x² Φ) and the HJB residual ∂_tΦ − ½‖∇_xΦ‖²
    used by the OT-Flow baseline follow from them.
    """

    @abc.abstractmethod
    def potential(self, z: Tensor, t: float | Tensor) -> Tensor:
        """Φ(z, t) for z (n, d) and t scalar or (n,); returns (n,)."""

    @abc.abstractmethod
    def derivatives(self, z: Tensor, t: float | Tensor) -> PotentialDerivatives:
        """∇_x Φ, ∂_t Φ and tr ∇_x² Φ, exactly."""

    def forward(self, z: Tensor, t: float | Tensor) -> tuple[Tensor, Tensor]:
        """v = −∇_x Φ (n, d) and div v = −tr ∇_x² Φ (n,)."""
        grad_x, _, laplacian = self.derivatives(z, t)
        return -grad_x, -laplacian


def time_column(t: float | Tensor, z: Tensor) -> Tensor:
    """The time as an (n, 1) column matching ``z`` (n, d) in dtype and device."""
    t = torch.as_tensor(t, dtype=z.dtype, device=z.device)
    if t.dim() == 0:
        return t.expand(z.shape[0], 1)
    if t.shape != (z.shape[0],):
        raise ValueError(f"t must be a scalar or of shape ({z.shape[0]},), got {tuple(t.shape)}")
    return t.unsqueeze(1)
