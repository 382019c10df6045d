r"""The block protocol: what every block type provides to the rest of jkoflow.

A block is a time-dependent velocity field on R^d, integrated over t ∈ [0, 1].
The integrator, the objectives, the scheduler, refinement
(:func:`blocks.time_slices`) and :class:`jkoflow.Flow` (including
``save``/``load``) only use the members listed here; they never look inside a
block, so any registered block type works everywhere a block name is accepted.

The contract of a block type (a :class:`Block` subclass):

* ``forward(z, t) -> (v, div)``: z is (n, d), t a float, a 0-d tensor or an (n,)
  tensor; v is (n, d) and div = ∇_z·v the **exact** divergence, (n,), both in
  the dtype and on the device of z. Rows are independent (no batch coupling).
  It must work with gradients on (training back-propagates through v and div
  to the weights and to z) and under :func:`torch.no_grad` (pushing, NLL,
  sampling; a block needing autograd for div enables it locally and returns
  detached outputs). An estimate of div (e.g. Hutchinson) is allowed only while
  ``self.training`` and gradients are recorded; eval mode is always exact.
* ``config() -> dict``: JSON-able constructor arguments including ``dim``, so
  that ``type(block)(**block.config())`` rebuilds the architecture; all other
  state is in the ``state_dict`` (parameters and buffers), so ``.to()``,
  ``.double()`` and checkpoints need nothing else.
* ``dim``: the state dimension d.
* Construction by name: :meth:`jkoflow.TrainingConfig.make_block` calls
  ``cls(dim=d, width=m, depth=M, **block_options)``, so a type used from a
  config accepts ``width`` and ``depth`` keywords (it may ignore them).
* Registration: ``@blocks.register("name")`` (or ``blocks.register("name", cls)``)
  before a config naming it is built or a checkpoint holding it is loaded.
* Recommended: start near the identity map (v ≈ 0), as each JKO step is a small
  move from the previous distribution.

A :class:`PotentialBlock` (v = −∇_xΦ) also provides Φ and ∂_tΦ, needed only by
the HJB term of the OT-Flow baseline.
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

    Example:
        >>> import torch, blocks
        >>> class Shrink(blocks.Block):  # v = −z, div v = −d
        ...     def __init__(self, dim: int, width: int = 0, depth: int = 0) -> None:
        ...         super().__init__()
        ...         self.dim = dim
        ...     def forward(self, z, t):
        ...         return -z, z.new_full((z.shape[0],), -float(self.dim))
        ...     def config(self):
        ...         return {"dim": self.dim}
        >>> v, div = Shrink(3)(torch.ones(2, 3), 0.0)
        >>> v[0].tolist(), div.tolist()
        ([-1.0, -1.0, -1.0], [-3.0, -3.0])
    """

    name: ClassVar[str] = ""
    dim: int
    compilable: bool = False
    """Whether ``forward`` is plain tensor algebra that :func:`torch.compile`
    can trace whole (no ``torch.autograd.grad`` inside), so that a trainer may
    compile its RK4 step (:mod:`jkoflow.compiling`). Off unless a type says so."""

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

    Example:
        >>> import torch, blocks
        >>> d = blocks.make("otflow", dim=3, width=8).derivatives(torch.randn(4, 3), 0.5)
        >>> d.grad_x.shape, d.dphi_dt.shape, d.laplacian.shape
        (torch.Size([4, 3]), torch.Size([4]), torch.Size([4]))
    """

    grad_x: Tensor
    dphi_dt: Tensor
    laplacian: Tensor


class PotentialBlock(Block):
    """A block whose velocity is v = −∇_x Φ(x, t) for a scalar potential Φ.

    Subclasses implement :meth:`potential` and :meth:`derivatives`; the
    velocity, divergence (−tr ∇_x² Φ) and the HJB residual ∂_tΦ − ½‖∇_xΦ‖²
    used by the OT-Flow baseline follow from them.

    Example:
        >>> import torch, blocks
        >>> blk = blocks.make("otflow", dim=2, width=8)
        >>> z = torch.randn(5, 2)
        >>> v, div = blk(z, 0.3)
        >>> d = blk.derivatives(z, 0.3)
        >>> bool(torch.equal(v, -d.grad_x)), bool(torch.equal(div, -d.laplacian))
        (True, True)

    References:
        | OT-Flow: Fast and Accurate Continuous Normalizing Flows via Optimal Transport (Onken et al., 2021)
        | https://arxiv.org/abs/2006.00104
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
