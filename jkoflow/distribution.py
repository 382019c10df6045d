r"""A trained flow as a :mod:`torch.distributions` object, for code that takes a
``Distribution`` (a prior, a proposal, a variational family) or a ``Transform``.

* :class:`FlowDistribution`: the density p(x) of the flow over R^d, event shape
  (d,): ``log_prob`` is :meth:`jkoflow.Flow.log_prob`, ``rsample`` pushes
  N(0, I) draws through T⁻¹ with gradients (reparametrisation), ``sample`` the
  same without them.
* :class:`FlowTransform`: the bijection T: x ↦ z (data → latent) with
  ``log_abs_det_jacobian`` = log|det ∇T(x)|, so that

  .. math:: p(x) = N(T(x); 0, I)\,|\det ∇T(x)|

  is ``TransformedDistribution(Independent(Normal(0, 1), 1), FlowTransform(flow).inv)``.

Both accept any leading batch dimensions, (…, d), and keep the flow's dtype
and device. Gradients flow to the flow's parameters (and to ``x``) wherever
autograd is on.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.distributions import Distribution, Transform, constraints

from .flow import Flow

__all__ = ["FlowDistribution", "FlowTransform"]


def _rows(flow: Flow, value: Tensor) -> Tensor:
    """``value`` (…, d) as rows (n, d), after checking its last dimension."""
    if value.dim() < 1 or value.shape[-1] != flow.dim:
        raise ValueError(f"expected values of shape (..., {flow.dim}), got {tuple(value.shape)}")
    return value.reshape(-1, flow.dim)


class FlowDistribution(Distribution):
    """The distribution of a :class:`jkoflow.Flow`: x = T⁻¹(z), z ~ N(0, I_d).

    Arguments:
        flow: The flow (its weights are used, not copied).
        batch_shape: Batch shape (default ``()``): every batch member is the
            same distribution, as after :meth:`expand`.
        validate_args: As for any ``Distribution`` (``None``: torch's default);
            when on, ``log_prob`` refuses values of the wrong shape or with
            NaN entries with ValueError.

    Example:
        >>> import torch, blocks, jkoflow
        >>> flow = jkoflow.Flow(2, [blocks.make("otflow", dim=2, width=8)], steps=4)
        >>> p = jkoflow.FlowDistribution(flow)
        >>> x = p.sample((5,))
        >>> x.shape, p.log_prob(x).shape, p.event_shape
        (torch.Size([5, 2]), torch.Size([5]), torch.Size([2]))
        >>> bool(torch.allclose(p.log_prob(x), flow.log_prob(x)))
        True
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self, flow: Flow, batch_shape: torch.Size | tuple[int, ...] = (), validate_args: bool | None = None
    ) -> None:
        if not isinstance(flow, Flow):
            raise TypeError(f"FlowDistribution needs a jkoflow.Flow, got {type(flow).__name__}")
        self.flow = flow
        super().__init__(torch.Size(batch_shape), torch.Size([flow.dim]), validate_args=validate_args)

    def expand(self, batch_shape: torch.Size | tuple[int, ...], _instance: Any = None) -> FlowDistribution:
        """The same distribution with batch shape ``batch_shape``."""
        return FlowDistribution(self.flow, batch_shape, validate_args=self._validate_args)

    def log_prob(self, value: Tensor) -> Tensor:
        """log p(value) in nats, shape broadcast(value.shape[:−1], batch_shape)."""
        if self._validate_args:
            self._validate_sample(value)
        log_p = self.flow.log_prob(_rows(self.flow, value)).reshape(value.shape[:-1])
        return log_p.expand(torch.broadcast_shapes(log_p.shape, self.batch_shape))

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        """Draws of shape sample_shape + batch_shape + (d,): z ~ N(0, I) in the
        flow's dtype and on its device (torch's global generator), then T⁻¹(z),
        differentiable with respect to the flow's parameters."""
        shape = self._extended_shape(sample_shape)
        z = torch.randn(shape, dtype=self.flow.shift.dtype, device=self.flow.shift.device)
        return self.flow.inverse(z.reshape(-1, self.flow.dim)).reshape(shape)

    @property
    def transform(self) -> FlowTransform:
        """T (data → latent) as a :class:`FlowTransform`."""
        return FlowTransform(self.flow)


class FlowTransform(Transform):
    """The flow's map T: x ↦ z (data → latent) as a bijective ``Transform`` on
    real vectors; ``.inv`` is T⁻¹ (the generative direction).

    ``log_abs_det_jacobian(x, z)`` is log|det ∇T(x)| (shape (…,)). Calling the
    transform computes it along with z and keeps it for the pair (x, z) just
    returned until the next ``log_abs_det_jacobian`` call, so
    ``TransformedDistribution.log_prob`` integrates each block once, not twice.

    Example:
        >>> import torch, blocks, jkoflow
        >>> from torch.distributions import Independent, Normal, TransformedDistribution
        >>> flow = jkoflow.Flow(2, [blocks.make("otflow", dim=2, width=8)], steps=4).double()
        >>> T = jkoflow.FlowTransform(flow)
        >>> base = Independent(Normal(torch.zeros(2).double(), torch.ones(2).double()), 1)
        >>> p = TransformedDistribution(base, T.inv)
        >>> x = torch.randn(6, 2).double()
        >>> bool(torch.allclose(p.log_prob(x), flow.log_prob(x)))
        True
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, flow: Flow, cache_size: int = 0) -> None:
        if not isinstance(flow, Flow):
            raise TypeError(f"FlowTransform needs a jkoflow.Flow, got {type(flow).__name__}")
        super().__init__(cache_size=cache_size)
        self.flow = flow
        self._last: tuple[Tensor, Tensor, Tensor] | None = None

    def with_cache(self, cache_size: int = 1) -> FlowTransform:
        return self if self._cache_size == cache_size else FlowTransform(self.flow, cache_size)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FlowTransform) and other.flow is self.flow

    def __hash__(self) -> int:
        return hash(id(self.flow))

    def _call(self, x: Tensor) -> Tensor:
        z, logdet = self.flow(_rows(self.flow, x))
        z, logdet = z.reshape(x.shape), logdet.reshape(x.shape[:-1])
        self._last = (x, z, logdet)
        return z

    def _inverse(self, z: Tensor) -> Tensor:
        return self.flow.inverse(_rows(self.flow, z)).reshape(z.shape)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """log|det ∇T(x)|, shape x.shape[:−1]; ``y`` = T(x) is used only to
        recognise the pair of the last call."""
        last, self._last = self._last, None
        if last is not None and last[0] is x and last[1] is y:
            return last[2]
        return self.flow(_rows(self.flow, x))[1].reshape(x.shape[:-1])
