"""Data-parallel training on ``torch.distributed`` (one process per core or GPU).

Launched with ``torchrun --nproc-per-node N -m jkoflow train …``, every process
(rank) runs the same trainer. :func:`launched` (called by the command line, not
at import) starts the process group from torchrun's ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``: gloo on the CPU, nccl on CUDA (rank r then uses ``cuda:LOCAL_RANK``).

Exactness: at every step all ranks draw the same global index vector of
``batch_size`` rows from the shared seeded generator and rank r takes the
contiguous slice :meth:`Group.shard` of it. Rank r's loss is weighted by
W·n_r/B (W ranks, n_r rows of the B-row batch), so the gradient that
DistributedDataParallel averages over the ranks is the gradient of the global
batch mean, the one a single process computes. The per-step control flow
(non-finite-loss rollback, time budget, Ctrl-C) is decided on all-reduced
numbers, so every rank takes the same branch. Pushing a data set is sharded
the same way and the pieces are all-gathered in rank order.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from blocks import Block

from .errors import InputError
from .objectives import Transport, jko_loss
from .ode import Stepper, rk4_step

__all__ = ["Group", "JKOObjective", "current", "data_parallel", "join", "launched", "leave", "world_from_env"]


@dataclass(frozen=True)
class Group:
    """This process's place among the ranks (a single process: rank 0 of 1).

    Attributes:
        rank: Global rank r.
        size: Number of ranks W.
        local_rank: Rank on this node (the CUDA device index).
        backend: ``"gloo"``, ``"nccl"``, or None when not distributed.

    Example:
        >>> from jkoflow.distributed import Group
        >>> group = Group()  # one process
        >>> group.enabled, group.is_main, group.shard(10)
        (False, True, (0, 10))
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """Whether there is more than one rank."""
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """The device this rank computes on: ``"cuda"`` becomes ``cuda:local_rank``
        when distributed; anything else is kept."""
        device = torch.device(name)
        if device.type == "cuda" and device.index is None and self.enabled:
            return torch.device("cuda", self.local_rank)
        return device

    def shard(self, n: int) -> tuple[int, int]:
        """Rows [start, stop) of n that this rank handles: ⌊n·r/W⌋ to ⌊n·(r+1)/W⌋.

        >>> Group(rank=1, size=2).shard(5)
        (2, 5)
        """
        return n * self.rank // self.size, n * (self.rank + 1) // self.size

    def _comm(self, x: Tensor) -> Tensor:
        """``x`` on a device the backend can send from."""
        if self.backend == "nccl":
            return x.to(torch.device("cuda", self.local_rank))
        return x.cpu()

    def _reduce(self, x: Tensor, op: Any) -> Tensor:
        if not self.enabled:
            return x
        y = self._comm(x.detach().clone())
        dist.all_reduce(y, op=op)
        return y.to(x.device)

    def sum(self, x: Tensor) -> Tensor:
        """Σ over the ranks of ``x`` (returned on x's device)."""
        return self._reduce(x, dist.ReduceOp.SUM)

    def max(self, x: Tensor) -> Tensor:
        """Elementwise max over the ranks of ``x`` (returned on x's device)."""
        return self._reduce(x, dist.ReduceOp.MAX)

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank."""
        if not self.enabled:
            return flag
        return bool(self.max(torch.tensor([float(flag)])) > 0)

    def agree(self, seconds: float, flag: bool) -> tuple[float, bool]:
        """The largest ``seconds`` and whether ``flag`` is true on any rank: the
        time a step took and whether to stop, the same on every rank."""
        if not self.enabled:
            return seconds, flag
        agreed = self.max(torch.tensor([seconds, float(flag)], dtype=torch.float64))
        return float(agreed[0]), bool(agreed[1] > 0)

    def gather_rows(self, part: Tensor, n: int, chunk_size: int) -> Tensor:
        """The (n, …) tensor whose row shards (:meth:`shard`) the ranks hold, in
        rank order, on ``part``'s device; sent ``chunk_size`` rows at a time."""
        if not self.enabled:
            return part
        bounds = [n * r // self.size for r in range(self.size + 1)]
        widest = max(bounds[r + 1] - bounds[r] for r in range(self.size))
        out = part.new_empty((n, *part.shape[1:]))
        for offset in range(0, widest, chunk_size):
            rows = min(chunk_size, widest - offset)
            piece = self._comm(part.new_zeros((rows, *part.shape[1:])))
            mine = part[offset : offset + rows]
            piece[: len(mine)] = mine.to(piece.device)
            pieces = [torch.empty_like(piece) for _ in range(self.size)]
            dist.all_gather(pieces, piece)
            for r, got in enumerate(pieces):
                lo = bounds[r] + offset
                hi = min(bounds[r + 1], lo + rows)
                if hi > lo:
                    out[lo:hi] = got[: hi - lo].to(out.device)
        return out

    def step_rng(self, seed: int, step: int, device: torch.device) -> Any:
        """A context in which torch's global generator is seeded by (seed, step,
        rank), so that random draws inside the loss (Hutchinson noise) differ
        between ranks and repeat on resume; a no-op in a single process."""
        if not self.enabled:
            return nullcontext()
        return _seeded((seed * 1_000_003 + step) * 4099 + self.rank, device)


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    devices = [device.index if device.index is not None else 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def current() -> Group:
    """The :class:`Group` of the initialised default process group, else a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return Group()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return Group(dist.get_rank(), dist.get_world_size(), local, str(dist.get_backend()))


def world_from_env() -> tuple[int, int, int]:
    """(WORLD_SIZE, RANK, LOCAL_RANK) as torchrun sets them; (1, 0, 0) without it."""
    try:
        return (
            int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("RANK", "0")),
            int(os.environ.get("LOCAL_RANK", "0")),
        )
    except ValueError:
        raise InputError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (as torchrun sets them)") from None


@contextmanager
def launched(device: str) -> Iterator[Group]:
    """Joins the process group torchrun describes (gloo for a CPU ``device``,
    nccl for CUDA) for the duration of the block, then leaves it. Without
    torchrun (WORLD_SIZE unset or 1), or when a group already exists, it only
    yields the current :class:`Group`."""
    size, rank, local = world_from_env()
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        yield current()
        return
    if not dist.is_available():
        raise InputError("this torch build has no torch.distributed; run a single process")
    cuda = torch.device(device).type == "cuda"
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local)
    join(backend, rank, size)
    try:
        yield current()
    finally:
        leave()


def join(backend: str, rank: int, size: int, timeout: datetime.timedelta | None = None) -> None:
    """Joins the default process group (``init_process_group``) as ``rank`` of
    ``size`` on ``backend``; :func:`leave` leaves it.

    ``torch._dynamo`` is imported first. Imported while a group exists (by
    the first Adam step or DistributedDataParallel), it keeps references to
    the group (torch 2.13), which then outlives :func:`leave` with gloo's
    worker threads; a worker still releasing a collective's tensors while
    the interpreter exits aborts the process ("terminate called without an
    active exception")."""
    import torch._dynamo  # noqa: F401  (before the group: see above)

    dist.init_process_group(backend, rank=rank, world_size=size, timeout=timeout)


def leave() -> None:
    """Leaves the default process group: destroys it and joins its worker threads."""
    dist.destroy_process_group()


class JKOObjective(nn.Module):
    """The whole JKO loss of a block on a batch as one module call, so that
    DistributedDataParallel sees one forward and one backward per step
    (:func:`~jkoflow.objectives.jko_loss` calls the block several times).

    ``forward(x, h, steps, transport, weight, stepper)`` returns ``weight·(loss,
    kl, transport)``, shape (3,), integrated by ``stepper``
    (:func:`~jkoflow.ode.rk4_step` or a compiled copy).

    Example:
        >>> import torch, blocks
        >>> from jkoflow.distributed import JKOObjective
        >>> objective = JKOObjective(blocks.make("otflow", dim=2, width=8))
        >>> objective(torch.randn(32, 2), 5.0, 2, "path", 1.0).shape
        torch.Size([3])
    """

    def __init__(self, block: Block) -> None:
        super().__init__()
        self.block = block

    def forward(
        self,
        x: Tensor,
        h: float | None,
        steps: int,
        transport: Transport,
        weight: float,
        stepper: Stepper = rk4_step,
    ) -> Tensor:
        terms = jko_loss(self.block, x, h, steps, transport, stepper)
        return torch.stack(tuple(terms)) * weight


def data_parallel(
    block: Block | nn.Module, group: Group, device: torch.device, objective: nn.Module | None = None
) -> nn.Module | None:
    """``objective`` (default: ``block``'s :class:`JKOObjective`), a module whose
    forward is the whole loss of a step, wrapped in DistributedDataParallel, or
    None in a single process (which then calls the loss directly). Parameters
    the loss does not depend on (e.g. the constant of a potential) are allowed."""
    if not group.enabled:
        return None
    ids = [device.index if device.index is not None else group.local_rank] if device.type == "cuda" else None
    module = objective if objective is not None else JKOObjective(block)
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)
