r"""The Flow: an ordered composition of blocks, T = T_L ∘ … ∘ T_1 ∘ S.

S is a fixed affine standardisation x ↦ M (x − shift)/scale, with M a
lower-triangular decorrelating matrix (S is the identity unless the flow was
trained on standardised data), so that every method works in the data space:

.. math::
    \log p(x) = \log N(T(x); 0, I) + \sum_k ℓ_k(x) − \sum_j \log \mathrm{scale}_j + \log|\det M|.

With no blocks, the flow is the Gaussian N(shift, diag(scale)·(MᵀM)⁻¹·diag(scale)):
standardised data give the full-covariance Gaussian fit of the training set.

Block k is integrated with its own number of RK4 steps, ``steps · f_k``: the
flow's base ``steps`` times the block's step factor f_k (1 unless the
trainer's step control raised it; docs/design.md, "Integration").
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

import blocks as block_registry
from blocks import Block

from .errors import InputError
from .objectives import gaussian_log_prob
from .ode import integrate
from .serialization import read_payload, reading_content, write_payload

__all__ = ["Flow", "as_data_tensor", "chunked", "decorrelation"]

FORMAT = "jkoflow.flow"
FORMAT_VERSION = 2
"""Version 2 adds the blocks' step factors (``steps_factors`` in the config);
version-1 files still read, with every factor 1."""
OLDEST_VERSION = 1


def _check_count(value: Any, name: str) -> None:
    """InputError unless ``value`` is a positive integer (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")


def chunked(fn: Callable[[Tensor], Any], x: Tensor, chunk_size: int) -> Any:
    """Applies ``fn`` to row chunks of ``x`` and concatenates the results
    (a tensor or a tuple of tensors, None entries kept) along the first axis."""
    outs = [fn(part) for part in torch.split(x, chunk_size)] if len(x) else [fn(x)]
    if not isinstance(outs[0], tuple):
        return torch.cat(outs)
    joined = [None if parts[0] is None else torch.cat(parts) for parts in zip(*outs, strict=True)]
    return type(outs[0])(*joined) if hasattr(outs[0], "_fields") else tuple(joined)


def as_data_tensor(x: Any, dim: int, like: Tensor, what: str = "x") -> Tensor:
    """``x`` as a finite (n, dim) tensor with the dtype and device of ``like``."""
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        x = x.double()
    if x.dim() != 2 or x.shape[1] != dim:
        raise InputError(f"{what} must have shape (n, {dim}), got {tuple(x.shape)}")
    x = x.to(dtype=like.dtype, device=like.device)
    if not torch.isfinite(x).all():
        raise InputError(f"{what} holds NaN or infinite values")
    return x


def decorrelation(u: Tensor) -> Tensor:
    """M = L⁻¹ (d, d, lower-triangular, in ``u``'s dtype) for the Cholesky factor
    L Lᵀ of the covariance of the centred rows ``u`` (n, d), computed in
    float64, so that the rows M u have identity covariance."""
    v = u.double()
    lower, info = torch.linalg.cholesky_ex(v.T @ v / max(len(v) - 1, 1))
    if info != 0:
        raise InputError(
            "cannot standardise: the columns of the training data are linearly dependent "
            "(their correlation matrix is singular); drop the redundant columns"
        )
    eye = torch.eye(len(lower), dtype=v.dtype, device=v.device)
    return torch.linalg.solve_triangular(lower, eye, upper=False).to(u)


class Flow(nn.Module):
    r"""A continuous normalizing flow made of residual ODE blocks.

    Block k is integrated with n_k = ``steps`` · f_k RK4 steps (f_k its step
    factor, default 1) in every method, forward and backward:

    .. math::
        T(x) = \mathrm{RK4}_{n_L}(v_L) ∘ … ∘ \mathrm{RK4}_{n_1}(v_1) ∘ S(x),
        \quad \log p(x) = \log N(T(x); 0, I) + \sum_k ℓ_k(x) + \log|\det ∇S|,

    where ℓ_k is block k's log-determinant accumulated by the same n_k steps
    and log|det ∇S| = log|det M| − Σ_j log scale_j.

    Arguments:
        dim: Data dimension d.
        blocks: The blocks T_1, …, T_L in the order data pass through them.
        steps: The base RK4 step count of every evaluation (log_prob, sample, …).
        shift, scale: Standardisation (d,), default 0 and 1.
        mix: Decorrelation M (d, d), lower-triangular, default the identity.
        steps_factors: f_k per block (positive integers, default all 1).

    Blocks are added with :meth:`append`; the factors follow the blocks'
    positions (a block put into ``flow.blocks`` directly has factor 1).

    Example:
        >>> import torch, blocks, jkoflow
        >>> flow = jkoflow.Flow(2, [blocks.make("otflow", dim=2, width=8)], steps=4)
        >>> flow.append(blocks.make("otflow", dim=2, width=8), steps_factor=2)
        >>> flow.steps_factors, flow.step_counts, flow.block_steps(1)
        ((1, 2), (4, 8), 8)
        >>> flow.with_steps(8).block_steps(1)  # the base changes, the factors stay
        16
        >>> x = torch.randn(10, 2)
        >>> z, logdet = flow(x)
        >>> bool(torch.allclose(flow.inverse(z), x, atol=1e-4))
        True

    References:
        | FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative Models
        | (Grathwohl et al., 2019)
        | https://arxiv.org/abs/1810.01367
    """

    def __init__(
        self,
        dim: int,
        blocks: Iterable[Block] = (),
        steps: int = 8,
        shift: Tensor | None = None,
        scale: Tensor | None = None,
        mix: Tensor | None = None,
        steps_factors: Iterable[int] | None = None,
    ) -> None:
        super().__init__()
        _check_count(steps, "steps")
        self.dim = dim
        self.steps = steps
        self.blocks = nn.ModuleList()
        self._factors: list[int] = []
        self.register_buffer("shift", torch.zeros(dim) if shift is None else shift.detach().clone())
        self.register_buffer("scale", torch.ones(dim) if scale is None else scale.detach().clone())
        like = {"dtype": self.shift.dtype, "device": self.shift.device}
        self.register_buffer("mix", torch.eye(dim, **like) if mix is None else mix.detach().clone())
        blocks = list(blocks)
        factors = [1] * len(blocks) if steps_factors is None else list(steps_factors)
        if len(factors) != len(blocks):
            raise InputError(f"{len(factors)} steps factors given for {len(blocks)} blocks")
        for block, factor in zip(blocks, factors, strict=True):
            self.append(block, factor)

    @classmethod
    def for_data(cls, x: Tensor, steps: int, standardize: bool = False) -> Flow:
        """An empty flow for data ``x`` (n, d), on its dtype and device. With
        ``standardize`` its fixed map is S(x) = M (x − mean)/std with M = L⁻¹,
        LLᵀ the correlation matrix of ``x`` (Cholesky; computed in float64):
        S whitens ``x``, and the empty flow is the Gaussian fit of ``x``."""
        if not standardize:
            return cls(x.shape[1], steps=steps).to(x)
        scale = x.std(0)
        if (scale <= 0).any():
            column = int((scale <= 0).nonzero()[0])
            raise InputError(f"cannot standardise: column {column} of the training data is constant")
        mix = decorrelation((x - x.mean(0)) / scale)
        return cls(x.shape[1], steps=steps, shift=x.mean(0), scale=scale, mix=mix).to(x)

    def append(self, block: Block, steps_factor: int = 1) -> None:
        """Adds a block at the end (the latent side) of the flow, integrated with
        ``steps · steps_factor`` RK4 steps."""
        if not isinstance(block, Block):
            raise TypeError(f"a Flow holds blocks.Block instances, got {type(block).__name__}")
        if block.dim != self.dim:
            raise InputError(f"block of dimension {block.dim} does not fit a flow of dimension {self.dim}")
        _check_count(steps_factor, "steps_factor")
        factors = [*self.steps_factors, steps_factor]
        self.blocks.append(block)
        self._factors = factors

    @property
    def steps_factors(self) -> tuple[int, ...]:
        """f_k of every block: block k takes ``steps · f_k`` RK4 steps."""
        known = self._factors
        return tuple(known[k] if k < len(known) else 1 for k in range(len(self.blocks)))

    @property
    def step_counts(self) -> tuple[int, ...]:
        """n_k = ``steps · f_k`` of every block."""
        return tuple(self.steps * factor for factor in self.steps_factors)

    def block_steps(self, k: int) -> int:
        """n_k = ``steps · f_k``: the RK4 steps of block ``k`` in every evaluation."""
        return self.steps * self.steps_factors[k]

    def set_steps_factor(self, k: int, factor: int) -> None:
        """Sets f_k of block ``k`` (a positive integer)."""
        _check_count(factor, "steps_factor")
        factors = list(self.steps_factors)
        factors[k] = factor
        self._factors = factors

    def __len__(self) -> int:
        return len(self.blocks)

    def head(self, n: int) -> Flow:
        """The flow of the first ``n`` blocks (the same modules, not copies) with
        the same standardisation, steps and step factors: T_n ∘ … ∘ T_1 ∘ S."""
        return Flow(
            self.dim, self.blocks[:n], self.steps, self.shift, self.scale, self.mix, self.steps_factors[:n]
        )

    def with_steps(self, steps: int) -> Flow:
        """The same blocks (not copies), standardisation and step factors, with
        the base ``steps``: block k then takes ``steps · f_k`` RK4 steps."""
        return Flow(self.dim, self.blocks, steps, self.shift, self.scale, self.mix, self.steps_factors)

    def standardize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """S(x) = M (x − shift)/scale (n, d) and its log-determinant (broadcast to (n,))."""
        u = (x - self.shift) / self.scale
        return u @ self.mix.T, self.standardize_logdet().expand(x.shape[0])

    def standardize_logdet(self) -> Tensor:
        """log|det ∇S| = log|det M| − Σ log scale (a scalar): data-space NLL =
        standardised NLL − this."""
        return self.mix.diagonal().abs().log().sum() - self.scale.log().sum()

    def unstandardize(self, z: Tensor) -> Tensor:
        """S⁻¹(z) = scale · M⁻¹ z + shift for z (n, d)."""
        u = torch.linalg.solve_triangular(self.mix, z.T, upper=False).T
        return u * self.scale + self.shift

    def forward(self, x: Tensor, chunk_size: int = 16384) -> tuple[Tensor, Tensor]:
        """Data → latent: z = T(x) (n, d) and log|det ∇T(x)| (n,)."""
        x = as_data_tensor(x, self.dim, self.shift)

        def run(part: Tensor) -> tuple[Tensor, Tensor]:
            z, logdet = self.standardize(part)
            for k, block in enumerate(self.blocks):
                out = integrate(block, z, self.block_steps(k))
                z, logdet = out.z, logdet + out.logdet
            return z, logdet

        return chunked(run, x, chunk_size)

    def inverse(self, z: Tensor, chunk_size: int = 16384) -> Tensor:
        """Latent → data: x = T⁻¹(z), integrating the blocks backward, last first."""
        z = as_data_tensor(z, self.dim, self.shift, what="z")

        def run(part: Tensor) -> Tensor:
            for k in reversed(range(len(self.blocks))):
                part = integrate(self.blocks[k], part, self.block_steps(k), t0=1.0, t1=0.0).z
            return self.unstandardize(part)

        return chunked(run, z, chunk_size)

    def log_prob(self, x: Tensor, chunk_size: int = 16384) -> Tensor:
        """log p(x) in nats, shape (n,), constant included."""
        z, logdet = self(x, chunk_size)
        return gaussian_log_prob(z) + logdet

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n samples (n, d): z ~ N(0, I) pushed through T⁻¹. A CPU ``generator``
        makes them repeatable."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"number of samples must be a positive integer, got {n!r}")
        z = torch.randn(n, self.dim, generator=generator, dtype=self.shift.dtype)
        return self.inverse(z.to(self.shift.device))

    def config(self) -> dict[str, Any]:
        """JSON-able architecture: dimension, base steps, the blocks' step factors
        and each block's type and config."""
        try:
            specs = [block_registry.spec(block) for block in self.blocks]
        except ValueError as error:
            raise InputError(str(error)) from None
        return {
            "dim": self.dim,
            "steps": self.steps,
            "steps_factors": list(self.steps_factors),
            "blocks": specs,
        }

    def to_payload(self) -> dict[str, Any]:
        """Weights (on the CPU) and the JSON config: what :meth:`save` writes."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "config": json.dumps(self.config()),
            "state": {k: v.detach().cpu() for k, v in self.state_dict().items()},
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any], where: str | os.PathLike = "checkpoint") -> Flow:
        """Rebuilds a flow from :meth:`to_payload`; block types are looked up in
        the :mod:`blocks` registry; a config without step factors (format
        version 1) gives every block factor 1. Edited content (missing keys,
        wrong shapes, non-float or mixed dtypes) raises InputError."""
        with reading_content(where, "the flow in"):
            config = json.loads(payload["config"])
            made = []
            for spec in config["blocks"]:
                try:
                    made.append(block_registry.make(spec["type"], **spec["config"]))
                except (TypeError, ValueError) as error:
                    raise InputError(f"cannot rebuild the flow in {where}: {error}") from None
            state = dict(payload["state"])
            dtype = state["shift"].dtype
            state.setdefault("mix", torch.eye(config["dim"], dtype=dtype))  # files before decorrelation
            for key, value in state.items():
                if not isinstance(value, Tensor) or value.dtype != dtype or not dtype.is_floating_point:
                    raise TypeError(f"entry {key!r} is not a {dtype} tensor")
            flow = cls(config["dim"], made, steps=config["steps"], steps_factors=config.get("steps_factors"))
            flow = flow.to(dtype=dtype, device=state["shift"].device)
            flow.load_state_dict(state)
        return flow

    def save(self, path: str | os.PathLike) -> None:
        """Writes weights and a JSON config atomically (temporary file, then rename)."""
        write_payload(self.to_payload(), path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Flow:
        """Reads a flow written by :meth:`save`. Never unpickles code: the file is
        read with ``torch.load(weights_only=True)``; block types are looked up in
        the :mod:`blocks` registry. Files of format version 1 (before step
        factors) still read."""
        payload = read_payload(path, FORMAT, FORMAT_VERSION, "flow checkpoint", map_location, OLDEST_VERSION)
        return cls.from_payload(payload, path)
