"""The block-wise JKO trainer (DESIGN.md §2, §4).

Block k minimises KL((T_k)#p_{k−1} ‖ N(0, I)) + W2²(p_{k−1}, p_k)/(2h_k) on
samples of p_{k−1} cached after pushing the data through the frozen blocks
before it, so training memory does not grow with k. After each block the
train, validation and (optional) test sets are pushed once, in chunks, and the
block's movement is measured on the validation set:

    W_k = sqrt(E‖T_k(x) − x‖²),   Ter(k) = E‖T_k(x) − x‖² / E‖T_k(x)‖².

Training runs in stages, each recorded in the history:

1. ``initial``: blocks are added, h_k = min(h0·ρ^k, h_max), until Ter(k) < ε
   or the flow holds ``max_blocks`` blocks.
2. ``reparam i`` (up to ``reparam_iters``): with S_k = W_k and S̄ their mean,
   h_k ← clip(h_k + η(h_k·S̄/S_k − h_k), h_min, h_max); then every block is
   retrained in order from its current weights on freshly pushed samples.
   Stops once the spread max_k |S_k − S̄|/S̄ < ``reparam_tol``.
3. ``refine c`` (one stage per entry of ``refine``): every block is split into
   c time slices (:func:`blocks.time_slices`, the same map before training)
   and each slice is trained in order with step h_k/c.

Resuming a finished run with a larger ``max_blocks`` adds an ``extend n``
stage: new blocks trained like the initial pass on data pushed through the
whole flow. With a checkpoint file the trainer's state is saved at every block
end and every ``checkpoint_every`` steps (:mod:`jkoflow.checkpoint`), and a
resumed run gives the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from blocks import Block, time_slices

from . import distributed
from .cache import cache_bytes, choose_cache_device, to_compute, to_store
from .checkpoint import BlockProgress, TrainerState, data_fingerprint, load_state, save_state
from .config import JKOConfig, config_from_dict, resolve_device, resolve_dtype, resume_config
from .errors import InputError, TrainingError
from .flow import Flow, as_data_tensor, chunked
from .metrics import STEP_CHECK_ROWS
from .objectives import JKOLoss, gaussian_log_prob, jko_loss
from .ode import integrate

__all__ = ["JKOHistory", "movement_spread", "reparametrize", "train_jko"]

StageCallback = Callable[["JKOHistory", Flow], None]


@dataclass
class JKOHistory:
    """What :func:`train_jko` did, JSON-able via :meth:`to_dict`.

    Attributes:
        config: The :class:`JKOConfig` as a dict.
        stages: One record per stage: ``name`` (``"initial"``, ``"reparam 1"``,
            …, ``"refine 1"``, …, ``"extend 1"``, …), ``kind``, ``complete``,
            ``h_plan`` (reparam and refine stages: the planned h per block), ``blocks`` (one record per block
            of the flow after that stage: ``index``, ``h``, ``w2``, ``ter``,
            ``val_nll``, ``test_nll`` when a test set was given,
            ``step_doubling_change`` (the block's RK4 error on the validation
            NLL), ``n_batches``, ``seconds``, ``loss_first``, ``loss_last``,
            ``retries``; refined blocks also
            ``parent`` and ``slice``), ``spread`` (max |W_k − W̄|/W̄),
            ``val_nll``, ``test_nll``, ``n_batches``, ``seconds``.
        iterations: One record per optimisation step: ``stage``, ``block``,
            ``iter``, ``loss``, ``kl``, ``transport``, ``lr``, ``seconds``.
        stopped_by: How the initial pass (or the last extension) ended:
            ``"ter"``, ``"max_blocks"`` or ``"budget"`` (``max_batches`` /
            ``max_seconds`` spent).
        faults: One record per non-finite loss or gradient: ``stage``,
            ``block``, ``iter``, ``fault`` (``"loss"``/``"gradient"``),
            ``resumed_at`` (the step rolled back to) and ``lr_scale`` after.
    """

    config: dict[str, Any]
    stages: list[dict[str, Any]] = field(default_factory=list)
    iterations: list[dict[str, Any]] = field(default_factory=list)
    stopped_by: str = ""
    faults: list[dict[str, Any]] = field(default_factory=list)

    @property
    def blocks(self) -> list[dict[str, Any]]:
        """Per-block records of the final flow (the last stage)."""
        return self.stages[-1]["blocks"] if self.stages else []

    @property
    def n_batches(self) -> int:
        return sum(s["n_batches"] for s in self.stages)

    @property
    def train_seconds(self) -> float:
        return sum(s["seconds"] for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "stages": self.stages,
            "iterations": self.iterations,
            "stopped_by": self.stopped_by,
            "faults": self.faults,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JKOHistory:
        return cls(
            data["config"],
            data["stages"],
            data["iterations"],
            data.get("stopped_by", ""),
            data.get("faults", []),
        )


def movement_spread(w2: list[float]) -> float:
    """max_k |S_k − S̄| / S̄ for the per-block movements S_k = W_k."""
    s = np.asarray(w2, dtype=float)
    return float(np.abs(s - s.mean()).max() / s.mean())


def reparametrize(
    h: list[float], w2: list[float], eta: float, h_min: float, h_max: float, rule: str = "ratio"
) -> list[float]:
    r"""One step h_k ← clip(h_k + η(h*_k − h_k), h_min, h_max) toward equal movements S_k = W_k.

    ``rule="ratio"`` (DESIGN.md §4): h*_k = h_k·S̄/S_k, each block on its own.

    ``rule="arclength"``: the blocks are segments of one curve with times
    t_k = Σ_{j≤k} h_j and arc lengths D_k = Σ_{j≤k} S_j; h* cuts the same total
    time into segments of equal arc length, t*_k = D⁻¹(k·D_L/L) by linear
    interpolation, h*_k = t*_k − t*_{k−1}. A block that moved much gives time to
    the blocks after it, so a last block with little left to move gets work.
    """
    s = np.maximum(np.asarray(w2, dtype=float), 1e-12)
    hs = np.asarray(h, dtype=float)
    if rule == "ratio":
        target = hs * s.mean() / s
    elif rule == "arclength":
        times = np.concatenate([[0.0], np.cumsum(hs)])
        arc = np.concatenate([[0.0], np.cumsum(s)])
        target = np.diff(np.interp(np.linspace(0.0, arc[-1], len(s) + 1), arc, times))
    else:
        raise ValueError(f"rule must be 'ratio' or 'arclength', got {rule!r}")
    return [float(v) for v in np.clip(hs + eta * (target - hs), h_min, h_max)]


@dataclass
class _Cached:
    """Samples of p_k and the accumulated log-determinant of the flow so far."""

    x: Tensor
    logdet: Tensor

    def nll(self) -> float:
        return float(-(gaussian_log_prob(self.x) + self.logdet).mean())


def train_jko(
    x_train: Any,
    x_val: Any = None,
    x_test: Any = None,
    config: JKOConfig | None = None,
    flow: Flow | None = None,
    progress: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
    on_stage: StageCallback | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
) -> tuple[Flow, JKOHistory]:
    """Trains a flow block by block with the JKO scheme, then runs the
    reparametrisation and refinement stages that ``config`` asks for.

    Arguments:
        x_train: Training data, array-like (n, d).
        x_val: Validation data (n_val, d) for W_k, Ter(k) and NLL; by default a
            seeded 10 % of ``x_train`` is held out.
        x_test: Optional test data; its NLL is then recorded per block.
        config: A :class:`JKOConfig` (defaults if omitted; when resuming, the
            checkpoint's config, which ``config`` may change only in
            :data:`~jkoflow.config.RESUMABLE` fields).
        flow: A flow to extend: new blocks are appended after its blocks, on
            data pushed through it (incremental training). Its blocks stay
            frozen; later stages only change the new blocks.
        progress: Show progress bars and a line per block.
        callback: Called with every per-iteration record.
        on_stage: Called as ``on_stage(history, flow)`` after each stage (the
            stage just ended is ``history.stages[-1]``), e.g. to save a
            checkpoint per stage.
        checkpoint: A file for the trainer's state, written atomically at the
            end of every block, every ``config.checkpoint_every`` steps and on
            Ctrl-C (which then stops training with KeyboardInterrupt).
        resume: Continue from ``checkpoint`` with the same data: the result is
            the one of an uninterrupted run. If that run had finished, blocks
            are added until the flow holds ``config.max_blocks`` blocks.

    In an initialised process group (:mod:`jkoflow.distributed`) every rank
    calls this with the same arguments: each trains on its share of every
    mini-batch and pushes its share of the rows; the result matches one
    process with the same ``batch_size``; only rank 0 writes ``checkpoint``
    and shows progress. Cached samples live where ``config.cache_device``
    says (:mod:`jkoflow.cache`).

    Returns:
        ``(flow, history)``: the trained :class:`Flow` (frozen blocks, eval
        steps ``config.eval_steps``) and a :class:`JKOHistory`.

    Raises:
        TrainingError: A block's loss or gradient stayed non-finite after
            ``config.nan_retries`` retries; the checkpoint holds the blocks
            finished before it.

    Example:
        >>> import numpy as np, jkoflow
        >>> x = jkoflow.datasets.load("8gaussians", n=3000)
        >>> cfg = jkoflow.JKOConfig(width=8, iters=5, batch_size=256, max_blocks=1)
        >>> flow, history = jkoflow.train_jko(x, config=cfg)
        >>> len(flow), len(history.iterations), history.stages[0]["name"]
        (1, 5, 'initial')
    """
    saved = None
    if resume:
        if checkpoint is None:
            raise InputError("resume needs the checkpoint file to continue from")
        if flow is not None:
            raise InputError("pass either a flow to extend or a checkpoint to resume, not both")
        saved = load_state(checkpoint)
        saved_config = config_from_dict(JKOConfig, saved.config)
        config = saved_config if config is None else resume_config(saved_config, config)
    config = config or JKOConfig()
    group = distributed.current()
    dtype = resolve_dtype(config.dtype)
    like = torch.empty(0, dtype=dtype, device=group.device(str(resolve_device(config.device))))
    host = torch.empty(0, dtype=dtype)
    x_train = torch.as_tensor(x_train)
    if saved is not None:
        flow = saved.flow
    dim = flow.dim if flow is not None else (x_train.shape[1] if x_train.dim() == 2 else -1)
    x_train = as_data_tensor(x_train, dim, host, "training data")
    if x_val is None:
        perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(config.seed))
        n_val = max(1, len(x_train) // 10)
        x_val, x_train = x_train[perm[:n_val]], x_train[perm[n_val:]]
    sets = {"train": x_train, "val": as_data_tensor(x_val, dim, host, "validation data")}
    if x_test is not None:
        sets["test"] = as_data_tensor(x_test, dim, host, "test data")
    if len(x_train) < config.batch_size:
        raise InputError(
            f"the training set has {len(x_train)} rows but batch_size is {config.batch_size}; "
            "lower the batch size or give more data"
        )
    if config.batch_size < group.size:
        raise InputError(
            f"batch_size ({config.batch_size}) must be at least the number of processes ({group.size})"
        )
    rows = sum(len(x) for x in sets.values())
    store = choose_cache_device(config.cache_device, like.device, cache_bytes(rows, dim, dtype))
    sets = {name: to_store(x, store, like.device) for name, x in sets.items()}
    if flow is None:
        flow = Flow.for_data(x_train, config.eval_steps, config.standardize)
    flow = flow.to(device=like.device, dtype=like.dtype)
    trainer = _Trainer(flow, sets, config, like, progress, callback, on_stage, checkpoint, group)
    if saved is not None:
        trainer.restore(saved)
    with _stop_on_interrupt(trainer, enabled=checkpoint is not None):
        if trainer.finished:
            trainer.extend()
        else:
            trainer.run()
    flow.eval()
    return flow, trainer.history


@contextmanager
def _stop_on_interrupt(trainer: _Trainer, enabled: bool) -> Iterator[None]:
    """While active, a first Ctrl-C asks ``trainer`` to stop after the current
    Adam step (it then writes its checkpoint and raises KeyboardInterrupt); a
    second Ctrl-C interrupts at once."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def ask_to_stop(signum: int, frame: Any) -> None:
        if trainer.interrupted:
            raise KeyboardInterrupt
        trainer.interrupted = True

    previous = signal.signal(signal.SIGINT, ask_to_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _Trainer:
    """State shared by the stages of one :func:`train_jko` call.

    Every stage can be entered afresh or resumed: a stage record that is not
    ``complete`` is continued after its recorded blocks, and the block in
    training continues from its :class:`BlockProgress`.
    """

    def __init__(
        self,
        flow: Flow,
        sets: dict[str, Tensor],
        config: JKOConfig,
        like: Tensor,
        progress: bool,
        callback: Callable[[dict[str, Any]], None] | None,
        on_stage: StageCallback | None,
        checkpoint: str | os.PathLike | None,
        group: distributed.Group,
    ):
        self.flow, self.sets, self.config, self.like = flow, sets, config, like
        self.group, self.device = group, like.device
        self.store = next(iter(sets.values())).device  # where cached samples live (jkoflow.cache)
        self.progress, self.callback, self.on_stage = progress and group.is_main, callback, on_stage
        self.checkpoint = checkpoint  # read by every rank on resume, written by rank 0
        self.first = len(flow)  # blocks before this index are frozen input
        self.history = JKOHistory(config.to_dict())
        self.generator = torch.Generator().manual_seed(config.seed)
        self.batches, self.seconds = 0, 0.0  # spent on optimisation so far
        self.parents: list[Block] | None = None  # blocks an open refinement stage still splits
        self.block: BlockProgress | None = None  # the block in training
        self.finished = False
        self.interrupted = False
        self._base: dict[str, _Cached] | None = None
        self._optimizer: torch.optim.Optimizer | None = None  # the block in training's

    def out_of_budget(self) -> bool:
        config = self.config
        return (config.max_batches > 0 and self.batches >= config.max_batches) or (
            config.max_seconds > 0 and self.seconds >= config.max_seconds
        )

    # -- checkpoints ------------------------------------------------------------

    def state(self) -> TrainerState:
        if self.block is not None and self._optimizer is not None:
            self.block.optimizer = self._optimizer.state_dict()
        return TrainerState(
            config=self.config.to_dict(),
            history=self.history.to_dict(),
            flow=self.flow,
            parents=self.parents,
            first=self.first,
            batches=self.batches,
            seconds=self.seconds,
            finished=self.finished,
            data={name: data_fingerprint(x) for name, x in self.sets.items()},
            block=self.block,
            generator=self.generator.get_state(),
            torch_rng=torch.get_rng_state(),
        )

    def save(self) -> None:
        if self.checkpoint is not None and self.group.is_main:
            save_state(self.state(), self.checkpoint)

    def restore(self, state: TrainerState) -> None:
        for name, x in self.sets.items():
            if name not in state.data or not np.allclose(data_fingerprint(x), state.data[name], rtol=1e-9):
                raise InputError(f"the {name} data differ from those the checkpoint was trained on")
        self.history = JKOHistory.from_dict({**state.history, "config": self.config.to_dict()})
        self.parents = [p.to(self.like) for p in state.parents] if state.parents else None
        self.first, self.batches, self.seconds = state.first, state.batches, state.seconds
        self.finished, self.block = state.finished, state.block
        self.generator.set_state(state.generator)
        torch.set_rng_state(state.torch_rng)

    # -- stages -----------------------------------------------------------------

    def _open(self, kind: str) -> dict[str, Any] | None:
        """The last stage if it is of ``kind`` and not complete (a resumed run)."""
        last = self.history.stages[-1] if self.history.stages else None
        return last if last is not None and last["kind"] == kind and not last.get("complete") else None

    def run(self) -> None:
        """Continues the stages where they stand: the initial pass (or an open
        extension), then reparametrisation, then refinement."""
        extension = self._open("extend")
        if extension is not None:
            self.grow(extension["name"], "extend")
        else:
            self.grow("initial", "initial")
            if self.history.stages[0]["blocks"]:  # else the flow already had max_blocks blocks
                self._reparam_stages()
                self._refine_stages()
        self.finished = True
        self.save()

    def extend(self) -> None:
        """Adds blocks to a finished flow, on data pushed through all of it."""
        if len(self.flow) >= self.config.max_blocks:
            raise InputError(
                f"training has finished with {len(self.flow)} blocks; "
                f"set max_blocks above {len(self.flow)} to add blocks"
            )
        self.first, self._base, self.finished = len(self.flow), None, False
        n = sum(s["kind"] == "extend" for s in self.history.stages) + 1
        self.grow(f"extend {n}", "extend")
        self.finished = True
        self.save()

    def grow(self, name: str, kind: str) -> None:
        """Adds blocks with h_k = min(h0·ρ^k, h_max) until Ter(k) < ε, the flow
        holds ``max_blocks`` blocks or the budget is spent."""
        stage = self._stage(name, kind)
        if stage.get("complete"):
            return
        cached = self._cached(stage)
        config = self.config
        while True:
            records = stage["blocks"]
            if records and records[-1]["ter"] < config.ter_eps:
                self.history.stopped_by = "ter"
                break
            if records and self.out_of_budget():
                self.history.stopped_by = "budget"
                break
            k = self.first + len(records)
            if k >= config.max_blocks:
                self.history.stopped_by = "max_blocks"
                break
            if len(self.flow) == k:
                previous = self.flow.blocks[-1] if len(self.flow) else None
                self.flow.append(_new_block(k, self.flow.dim, config, previous).to(self.like))
            cached = self._fit(stage, k, config.step_size(k), cached, config.iters)
        self._close_stage(stage)

    def _reparam_stages(self) -> None:
        while True:
            if self._open("reparam") is None:
                done = sum(s["kind"] == "reparam" for s in self.history.stages)
                spread = movement_spread([b["w2"] for b in self.history.stages[-1]["blocks"]])
                if (
                    done >= self.config.reparam_iters
                    or self.out_of_budget()
                    or spread < self.config.reparam_tol
                ):
                    return
            self.reparam_stage()

    def _refine_stages(self) -> None:
        done = sum(s["kind"] == "refine" and bool(s.get("complete")) for s in self.history.stages)
        for count in self.config.refine[done:]:
            if self._open("refine") is None and self.out_of_budget():
                return
            self.refine_stage(count)

    def reparam_stage(self) -> None:
        """Retrains every block from its weights with h moved toward the target
        of ``config.reparam_rule`` (:func:`reparametrize`)."""
        stage = self._open("reparam")
        if stage is None:
            last = self.history.stages[-1]
            n = sum(s["kind"] == "reparam" for s in self.history.stages) + 1
            config = self.config
            hs = reparametrize(
                [b["h"] for b in last["blocks"]],
                [b["w2"] for b in last["blocks"]],
                config.reparam_eta,
                config.h_min,
                config.h_max,
                config.reparam_rule,
            )
            stage = self._stage(f"reparam {n}", "reparam", h_plan=hs)
        cached = self._cached(stage)
        for position in range(len(stage["blocks"]), len(stage["h_plan"])):
            k = self.first + position
            cached = self._fit(stage, k, stage["h_plan"][position], cached, self.config.retrain_iters)
        self._close_stage(stage)

    def refine_stage(self, count: int) -> None:
        """Splits every block into ``count`` time slices trained in order at h/count."""
        stage = self._open("refine")
        if stage is None:
            last = self.history.stages[-1]
            n = sum(s["kind"] == "refine" for s in self.history.stages) + 1
            hs = [b["h"] / count for b in last["blocks"] for _ in range(count)]
            self.parents = list(self.flow.blocks[self.first :])
            del self.flow.blocks[self.first :]
            stage = self._stage(f"refine {n}", "refine", factor=count, h_plan=hs)
        assert self.parents is not None
        cached = self._cached(stage)
        for position in range(len(stage["blocks"]), len(stage["h_plan"])):
            k = self.first + position
            parent, piece = divmod(position, count)
            if len(self.flow) == k:
                self.flow.append(time_slices(self.parents[parent], count)[piece].to(self.like))
            cached = self._fit(
                stage,
                k,
                stage["h_plan"][position],
                cached,
                self.config.retrain_iters,
                parent=parent,
                slice=piece,
            )
        self.parents = None
        self._close_stage(stage)

    # -- one block --------------------------------------------------------------

    def _base_samples(self) -> dict[str, _Cached]:
        """The data pushed through the frozen blocks before ``first``."""
        if self._base is None:
            frozen = self.flow.head(self.first)
            with torch.no_grad():
                self._base = {
                    name: _Cached(*self._map(lambda part: frozen(part, self.config.chunk_size), x))
                    for name, x in self.sets.items()
                }
        return self._base

    def _map(self, fn: Callable[[Tensor], Any], x: Tensor) -> tuple[Tensor, Tensor]:
        """(z, ℓ) = ``fn(rows)[:2]`` for the rows of ``x``, ``chunk_size`` rows at a
        time on the compute device, stored on the cache device. With several
        ranks each pushes its shard of the rows and the pieces are gathered."""
        start, stop = self.group.shard(len(x))

        def run(part: Tensor) -> tuple[Tensor, Tensor]:
            z, logdet = fn(to_compute(part, self.device))[:2]
            return z.to(self.store), logdet.to(self.store)

        out = chunked(run, x[start:stop], self.config.chunk_size)
        size = self.config.chunk_size
        return tuple(to_store(self.group.gather_rows(t, len(x), size), self.store, self.device) for t in out)

    def _cached(self, stage: dict[str, Any]) -> dict[str, _Cached]:
        """Samples of p_{k−1} for the next block of ``stage``: the base samples
        pushed through the blocks the stage has finished (the same pushes, so
        the same numbers, as when they were trained)."""
        cached = self._base_samples()
        with torch.no_grad():
            for position in range(len(stage["blocks"])):
                block = self.flow.blocks[self.first + position]
                cached = {name: self._push(block, c) for name, c in cached.items()}
        return cached

    def _push(self, block: Block, cached: _Cached, steps: int | None = None) -> _Cached:
        """Samples of p_k from those of p_{k−1}: x ↦ T_k(x), logdet += ℓ_k(x),
        with ``steps`` RK4 steps (default: the flow's)."""
        steps = steps or self.flow.steps
        z, logdet = self._map(lambda part: integrate(block, part, steps), cached.x)
        return _Cached(z, cached.logdet + logdet)

    def _fit(
        self,
        stage: dict[str, Any],
        k: int,
        h: float,
        cached: dict[str, _Cached],
        iters: int,
        **extra: Any,
    ) -> dict[str, _Cached]:
        """Trains block k for ``iters`` steps (fewer once the budget is spent) on
        samples of p_{k−1}, freezes it, pushes every set through it, records
        its movement in ``stage`` and writes a checkpoint."""
        block = self.flow.blocks[k]
        block.requires_grad_(True)
        progress = self._optimize(block, k, h, cached["train"].x, iters)
        block.requires_grad_(False)
        start = time.perf_counter()
        with torch.no_grad():
            moved = {name: self._push(block, c) for name, c in cached.items()}
            step = (moved["val"].x - cached["val"].x).pow(2).sum(1).mean()
            losses = progress.losses
            record = {
                "index": k,
                "h": h,
                "w2": float(step.sqrt()),
                "ter": float(step / moved["val"].x.pow(2).sum(1).mean()),
                "val_nll": moved["val"].nll(),
                "n_batches": len(losses),
                "seconds": progress.seconds + time.perf_counter() - start,
                "loss_first": losses[0] if losses else None,
                "loss_last": losses[-1] if losses else None,
                "retries": progress.retries,
                **extra,
            }
            if "test" in moved:
                record["test_nll"] = moved["test"].nll()
            record["step_doubling_change"] = self._step_doubling_change(block, cached["val"], moved["val"])
        stage["blocks"].append(record)
        self.block = None
        self.save()
        if self.progress:
            tqdm.write(
                f"[{stage['name']}] block {k + 1}: h={h:.3g}  W={record['w2']:.4f}  "
                f"Ter={record['ter']:.4f}  val NLL={record['val_nll']:.4f} "
                f"({record['step_doubling_change']:+.4f} at {2 * self.flow.steps} steps)  "
                f"({record['seconds']:.1f} s)"
            )
        if self.group.any(self.interrupted):  # decided together: a later Ctrl-C waits for the next check
            self.interrupted = True
            raise KeyboardInterrupt
        return moved

    def _step_doubling_change(self, block: Block, before: _Cached, after: _Cached) -> float:
        """The integration error block k adds to the validation NLL: on the
        first :data:`~jkoflow.metrics.STEP_CHECK_ROWS` rows, the NLL with the
        block at 2·steps RK4 steps minus that at ``steps``. A block that fits
        its discrete RK4 map rather than the ODE shows up here."""
        rows = min(len(before.x), STEP_CHECK_ROWS)
        head = _Cached(before.x[:rows], before.logdet[:rows])
        doubled = self._push(block, head, 2 * self.flow.steps)
        return doubled.nll() - _Cached(after.x[:rows], after.logdet[:rows]).nll()

    def _lr(self, it: int, iters: int, scale: float) -> float:
        """Cosine decay from lr to lr·lr_final_factor over ``iters`` steps, times ``scale``."""
        lr, final = self.config.lr, self.config.lr * self.config.lr_final_factor
        return scale * (final + (lr - final) * (1 + math.cos(math.pi * it / iters)) / 2)

    def _optimize(self, block: Block, k: int, h: float, x: Tensor, iters: int) -> BlockProgress:
        """Adam steps on the JKO loss of block k, continuing its saved progress if
        it has one. A non-finite loss or gradient rolls back to the last good
        state with a lower learning rate."""
        config = self.config
        block.train()
        optimizer = torch.optim.Adam(block.parameters(), lr=config.lr)
        if self.block is None or self.block.index != k:
            self.block = BlockProgress(k)
        progress = self.block
        if progress.optimizer is not None:
            optimizer.load_state_dict(progress.optimizer)
        self._optimizer = optimizer
        parallel = distributed.data_parallel(block, self.group, self.device)
        good = self._snapshot(block, optimizer)
        stage = len(self.history.stages) - 1
        bar = tqdm(
            total=iters,
            initial=progress.iter,
            desc=f"block {k + 1}",
            disable=not self.progress,
            leave=False,
            dynamic_ncols=True,
        )
        while progress.iter < iters and not self.out_of_budget():
            it, tick = progress.iter, time.perf_counter()
            lr = self._lr(it, iters, progress.lr_scale)
            for group in optimizer.param_groups:
                group["lr"] = lr
            index = torch.randint(len(x), (config.batch_size,), generator=self.generator)
            if parallel is None:
                batch = to_compute(x[index.to(x.device)], self.device)
                terms = jko_loss(block, batch, h, config.train_steps, config.transport)  # type: ignore[arg-type]
                target = terms.loss
            else:
                target, terms = self._parallel_loss(parallel, x, index, h)
            optimizer.zero_grad(set_to_none=True)
            fault = "loss" if not torch.isfinite(terms.loss) else None
            if fault is None:
                target.backward()
                if not all(torch.isfinite(p.grad).all() for p in block.parameters() if p.grad is not None):
                    fault = "gradient"
            if fault is not None:
                self._recover(fault, block, optimizer, good, k, it)
                bar.reset(total=iters)
                bar.update(progress.iter)
                continue
            optimizer.step()
            loss = float(terms.loss.detach())
            # the step's time and whether to stop, the same on every rank (the flag
            # may still turn true on one rank later in this step: the next step sees it)
            elapsed, stop = self.group.agree(time.perf_counter() - tick, self.interrupted)
            self.interrupted = self.interrupted or stop
            self.batches += 1
            self.seconds += elapsed
            progress.seconds += elapsed
            progress.iter += 1
            progress.losses.append(loss)
            record = {
                "stage": stage,
                "block": k,
                "iter": it,
                "loss": loss,
                "kl": float(terms.kl.detach()),
                "transport": float(terms.transport.detach()),
                "lr": lr,
                "seconds": progress.seconds,
            }
            self.history.iterations.append(record)
            if self.callback is not None:
                self.callback(record)
            bar.update()
            if it % 10 == 0:
                bar.set_postfix(loss=f"{loss:.4f}", h=f"{h:.3g}")
            every = config.checkpoint_every
            if stop or (every and progress.iter % every == 0 and progress.iter < iters):
                good = self._snapshot(block, optimizer)
                self.save()
                if stop:
                    raise KeyboardInterrupt
        bar.close()
        block.eval()
        self._optimizer, progress.optimizer = None, None
        return progress

    def _parallel_loss(
        self, parallel: torch.nn.Module, x: Tensor, index: Tensor, h: float
    ) -> tuple[Tensor, JKOLoss]:
        """This rank's weighted loss (to backpropagate through DistributedDataParallel)
        on its slice of the global mini-batch ``x[index]``, and the global batch's
        loss terms, equal on every rank (:mod:`jkoflow.distributed`)."""
        config, group = self.config, self.group
        start, stop = group.shard(len(index))
        batch = to_compute(x[index[start:stop].to(x.device)], self.device)
        weight = group.size * (stop - start) / len(index)
        with group.step_rng(config.seed, self.batches, self.device):
            local = parallel(batch, h, config.train_steps, config.transport, weight)
        return local[0], JKOLoss(*(group.sum(local.detach()) / group.size))

    def _snapshot(self, block: Block, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The in-memory state a non-finite step rolls back to."""
        assert self.block is not None
        return {
            "block": copy.deepcopy(block.state_dict()),
            "optimizer": copy.deepcopy(optimizer.state_dict()),
            "iter": self.block.iter,
            "losses": len(self.block.losses),
            "block_seconds": self.block.seconds,
            "iterations": len(self.history.iterations),
            "generator": self.generator.get_state(),
            "batches": self.batches,
            "seconds": self.seconds,
        }

    def _recover(
        self,
        fault: str,
        block: Block,
        optimizer: torch.optim.Optimizer,
        good: dict[str, Any],
        k: int,
        it: int,
    ) -> None:
        """Rolls block k back to ``good`` with a lower learning rate, or raises
        TrainingError once the retries are spent."""
        progress = self.block
        assert progress is not None
        block.load_state_dict(good["block"])
        optimizer.load_state_dict(copy.deepcopy(good["optimizer"]))
        progress.iter = good["iter"]
        del progress.losses[good["losses"] :]
        progress.seconds = good["block_seconds"]
        del self.history.iterations[good["iterations"] :]
        self.generator.set_state(good["generator"])
        self.batches, self.seconds = good["batches"], good["seconds"]
        if progress.retries >= self.config.nan_retries:
            self.save()
            raise TrainingError(
                f"block {k + 1}: the {fault} was not finite at step {it} after {progress.retries} "
                f"retries (lr scaled by {progress.lr_scale:.3g}); the {k} blocks before it are finished",
                block_index=k,
            )
        progress.retries += 1
        progress.lr_scale *= self.config.nan_lr_factor
        self.history.faults.append(
            {"stage": len(self.history.stages) - 1, "block": k, "iter": it, "fault": fault,
             "resumed_at": progress.iter, "lr_scale": progress.lr_scale}
        )  # fmt: skip
        message = (
            f"block {k + 1}: non-finite {fault} at step {it}; rolled back to step {progress.iter} "
            f"with the lr scaled by {progress.lr_scale:.3g} "
            f"(retry {progress.retries}/{self.config.nan_retries})"
        )
        warnings.warn(message, RuntimeWarning, stacklevel=2)

    # -- records ----------------------------------------------------------------

    def _stage(self, name: str, kind: str, **extra: Any) -> dict[str, Any]:
        """The stage record named ``name`` (stage names are unique), a new one if
        there is none yet."""
        stages = self.history.stages
        for stage in stages:
            if stage["name"] == name:
                return stage
        stage = {"name": name, "kind": kind, **extra, "blocks": []}
        stages.append(stage)
        return stage

    def _close_stage(self, stage: dict[str, Any]) -> None:
        records = stage["blocks"]
        stage["spread"] = movement_spread([b["w2"] for b in records]) if records else 0.0
        stage["n_batches"] = sum(b["n_batches"] for b in records)
        stage["seconds"] = sum(b["seconds"] for b in records)
        if records:
            stage["val_nll"] = records[-1]["val_nll"]
            if "test_nll" in records[-1]:
                stage["test_nll"] = records[-1]["test_nll"]
        stage["complete"] = True
        if self.progress:
            nll = f", test NLL {stage['test_nll']:.4f}" if "test_nll" in stage else ""
            tqdm.write(f"[{stage['name']}] {len(records)} blocks, W spread {stage['spread']:.3f}{nll}")
        if self.on_stage is not None:
            self.on_stage(self.history, self.flow)
        self.save()


def _new_block(k: int, dim: int, config: JKOConfig, previous: Block | None) -> Block:
    """Block k, seeded by (seed, k); warm-started from ``previous`` if allowed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed * 7919 + k)
        block = config.make_block(dim, k)
    same = previous is not None and type(previous) is type(block) and previous.config() == block.config()
    if config.warm_start and same:
        block.load_state_dict(previous.state_dict())
    return block.requires_grad_(True)
