"""The JKO trainer's checkpoint: everything needed to continue a run exactly
where it stopped.

A checkpoint holds the flow so far (finished blocks and the current block's
weights), the parents still to be split in a refinement stage, the history,
the budgets spent, the current block's optimisation progress (step, losses,
learning-rate scale, Adam state) and the random number generator states. The
cached pushed samples are not stored: they are recomputed from the data by
the same sequence of pushes, which gives the same numbers.

The file is written atomically and read with ``torch.load(weights_only=True)``
(:mod:`jkoflow.serialization`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from blocks import Block

from .errors import InputError
from .flow import Flow
from .serialization import read_payload, write_payload

__all__ = ["BlockProgress", "TrainerState", "data_fingerprint", "load_state", "save_state"]

FORMAT = "jkoflow.trainer"
FORMAT_VERSION = 4
"""Version 4 adds, for a block a stage retrains from its weights, the block as
it stood before (``block_before``, ``before_factor``, ``before_nll``);
version 3 adds the best candidate flow so far (``best``, the run's
selection); version 2 calls the per-block movement ``movement`` (version 1:
``w2``) and may hold an OT-Flow run (``trainer`` and ``extra``). Files of
versions 1 to 3 still read (without a best flow before version 3)."""
OLDEST_VERSION = 1


@dataclass
class BlockProgress:
    """How far the optimisation of the block in training has got.

    Attributes:
        index: The block's index in the flow.
        iter: Adam steps taken (the next step's index).
        losses: The loss of every step taken.
        lr_scale: Factor on the learning-rate schedule, lowered by each retry
            after a non-finite loss or gradient.
        retries: Retries used on this block.
        seconds: Optimisation seconds spent on this block.
        optimizer: The Adam state dict (None before the first step).
        train_steps, iters: RK4 steps and Adam steps of the current training
            phase when the step control has extended it (0: the plan's).
        checks: ``[step, validation NLL, its standard error, valid]`` of
            every early-stopping check (:class:`jkoflow.loop.Plateau`; valid:
            1.0 when the block's step-doubling change was below ``step_tol``).
        best: The block's weights at the best valid check (None before the first).
        before, before_factor, before_nll: For a block a stage retrains from
            its weights (reparametrisation, refinement) with early stopping
            on: its weights and RK4 step factor when the stage began with it,
            and the validation NLL of the flow with it then (None when it was
            not converged in its steps). The step control puts them back if
            the retrained block ends no better (None, 0, None otherwise).

    Example:
        >>> from jkoflow.checkpoint import BlockProgress
        >>> progress = BlockProgress(index=2)
        >>> progress.count(1.5, 0.25)
        >>> progress.count(1.25, 0.25)
        >>> saved = progress.snapshot()
        >>> progress.count(9.0, 1.0)
        >>> progress.restore(saved)  # a rollback drops the last step
        >>> numbers = progress.numbers()
        >>> numbers["iter"], numbers["losses"], numbers["seconds"], numbers["retries"]
        (2, [1.5, 1.25], 0.5, 0)
    """

    index: int
    iter: int = 0
    losses: list[float] = field(default_factory=list)
    lr_scale: float = 1.0
    retries: int = 0
    seconds: float = 0.0
    optimizer: dict[str, Any] | None = None
    train_steps: int = 0
    iters: int = 0
    checks: list[list[float]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    before: dict[str, Any] | None = None
    before_factor: int = 0
    before_nll: float | None = None

    def count(self, loss: float, seconds: float) -> None:
        """Counts one finished step of ``seconds`` with this ``loss``."""
        self.seconds += seconds
        self.iter += 1
        self.losses.append(loss)

    def snapshot(self) -> tuple[int, int, float, int, dict[str, Any] | None]:
        """What a rollback restores: the step, the number of losses, the
        seconds, the number of checks and the best weights."""
        return self.iter, len(self.losses), self.seconds, len(self.checks), self.best

    def restore(self, state: tuple[int, int, float, int, dict[str, Any] | None]) -> None:
        self.iter, n_losses, self.seconds, n_checks, self.best = state
        del self.losses[n_losses:]
        del self.checks[n_checks:]

    def numbers(self) -> dict[str, Any]:
        """The JSON-able fields (all but the optimizer state and the weights)."""
        tensors = ("optimizer", "best", "before")
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in tensors}


@dataclass
class TrainerState:
    """A snapshot of a trainer (:class:`jkoflow.JKOTrainer` or
    :func:`jkoflow.train_otflow`) between two Adam steps.

    Attributes:
        config: The JKOConfig as a dict.
        history: The JKOHistory as a dict.
        flow: The flow so far; its last block is the one in training when
            ``block`` is set.
        parents: Blocks still to be split by an open refinement stage.
        first: Index of the first block this run trains (earlier ones are frozen).
        batches: Mini-batches spent so far.
        seconds: Optimisation seconds spent so far.
        finished: Whether every stage has ended.
        data: Fingerprint of the data sets (:func:`data_fingerprint`).
        block: Progress of the block in training, if one is.
        generator: State of the mini-batch generator.
        torch_rng: State of torch's global CPU generator.
        trainer: ``"jko"`` or ``"otflow"``.
        extra: Trainer-specific state (tensors, numbers, lists, dicts), e.g.
            OT-Flow's best weights and learning-rate drops.
        best: The best candidate flow so far by validation NLL (the history's
            ``selected``); None before the first candidate and in files of version < 3.

    Example:
        >>> import os, tempfile
        >>> from jkoflow.checkpoint import BlockProgress, TrainerState, data_fingerprint
        >>> from jkoflow.checkpoint import load_state, save_state
        >>> x = torch.randn(50, 2)
        >>> flow = jkoflow.Flow(2, [blocks.make("otflow", dim=2, width=4)], steps=2)
        >>> state = TrainerState(
        ...     config={}, history={"stages": []}, flow=flow, parents=None, first=0, batches=3,
        ...     seconds=0.5, finished=False, data={"train": data_fingerprint(x)},
        ...     block=BlockProgress(0, iter=3, losses=[3.0, 2.5, 2.25]),
        ...     generator=torch.Generator().get_state(), torch_rng=torch.get_rng_state(),
        ... )
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     save_state(state, os.path.join(tmp, "trainer.pt"))
        ...     back = load_state(os.path.join(tmp, "trainer.pt"))
        >>> back.batches, back.block.iter, back.block.losses, back.data["train"][0]
        (3, 3, [3.0, 2.5, 2.25], 50.0)
        >>> bool(torch.equal(back.flow(x)[0], flow(x)[0]))
        True
    """

    config: dict[str, Any]
    history: dict[str, Any]
    flow: Flow
    parents: list[Block] | None
    first: int
    batches: int
    seconds: float
    finished: bool
    data: dict[str, list[float]]
    block: BlockProgress | None
    generator: Tensor
    torch_rng: Tensor
    trainer: str = "jko"
    extra: dict[str, Any] = field(default_factory=dict)
    best: Flow | None = None


def data_fingerprint(x: Tensor) -> list[float]:
    """[rows, Σx, Σx²] in float64: enough to tell data sets apart."""
    x = x.detach().double()
    return [float(len(x)), float(x.sum()), float(x.pow(2).sum())]


def save_state(state: TrainerState, path: str | os.PathLike) -> None:
    """Writes ``state`` to ``path`` atomically."""
    numbers = {
        "first": state.first,
        "batches": state.batches,
        "seconds": state.seconds,
        "finished": state.finished,
        "data": state.data,
        "block": state.block.numbers() if state.block else None,
        "trainer": state.trainer,
    }
    parents = None
    if state.parents:  # only cut into time slices, never integrated: step factors 1
        parents = Flow(state.flow.dim, state.parents, steps=state.flow.steps).to_payload()
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": json.dumps(state.config),
        "history": json.dumps(state.history),
        "state": json.dumps(numbers),
        "flow": state.flow.to_payload(),
        "parents": parents,
        "optimizer": state.block.optimizer if state.block else None,
        "block_best": state.block.best if state.block else None,
        "block_before": state.block.before if state.block else None,
        "generator": state.generator,
        "torch_rng": state.torch_rng,
        "extra": state.extra,
        "best": state.best.to_payload() if state.best is not None else None,
    }
    write_payload(payload, path)


def load_state(path: str | os.PathLike, trainer: str = "jko") -> TrainerState:
    """Reads a checkpoint written by :func:`save_state` (tensors on the CPU), of
    this format version or an older one; InputError if it holds another
    ``trainer``'s run."""
    payload = read_payload(path, FORMAT, FORMAT_VERSION, "training checkpoint", oldest=OLDEST_VERSION)
    numbers = json.loads(payload["state"])
    found = numbers.get("trainer", "jko")
    if found != trainer:
        raise InputError(f"{path} holds a {found!r} run, not a {trainer!r} one")
    flow = Flow.from_payload(payload["flow"], path)
    parents = None
    if payload["parents"] is not None:
        parents = list(Flow.from_payload(payload["parents"], path).blocks)
    block = None
    if numbers["block"] is not None:
        tensors = {"best": payload.get("block_best"), "before": payload.get("block_before")}
        block = BlockProgress(**numbers["block"], optimizer=payload["optimizer"], **tensors)
    return TrainerState(
        config=json.loads(payload["config"]),
        history=json.loads(payload["history"]),
        flow=flow,
        parents=parents,
        first=numbers["first"],
        batches=numbers["batches"],
        seconds=numbers["seconds"],
        finished=numbers["finished"],
        data=numbers["data"],
        block=block,
        generator=payload["generator"],
        torch_rng=payload["torch_rng"],
        trainer=found,
        extra=payload.get("extra") or {},
        best=Flow.from_payload(payload["best"], path) if payload.get("best") is not None else None,
    )
