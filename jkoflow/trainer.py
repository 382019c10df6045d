"""The JKO scheme step by step: :class:`JKOTrainer`, and :func:`train_jko`,
which runs the configured pipeline on it (docs/design.md, "The scheduler and
its stages").

Block k minimises KL((T_k)#p_{k−1} ‖ N(0, I)) + W2²(p_{k−1}, p_k)/(2h_k) on
samples of p_{k−1} (:mod:`jkoflow.scheduler`). The configured pipeline:

1. ``initial``: blocks with h_k = min(h0·ρ^k, h_max) until Ter(k) < ε, the
   budget is spent or the flow holds ``max_blocks`` blocks;
2. up to ``reparam_iters`` ``reparam`` stages, until the movement spread
   max_k |W_k − W̄|/W̄ < ``reparam_tol``;
3. one ``refine`` stage per entry c of ``refine``;
4. with ``free_block``, a ``free`` stage: one more block without the W2 term;
5. with ``finetune_iters``, a ``finetune`` stage: all the run's blocks
   trained together on the NLL (:mod:`jkoflow.finetune`).

Resuming a finished run with a larger ``max_blocks`` adds an ``extend n``
stage. What each stage trains is a plan of :mod:`jkoflow.stages`.

Reference: Xu, Cheng, Xie, JKO-iFlow, https://arxiv.org/abs/2212.14424.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from blocks import time_slices

from .checkpoint import BlockProgress, TrainerState, data_fingerprint, load_state, save_state
from .config import JKOConfig, resume_config
from .errors import InputError
from .finetune import fit_joint, wants_finetune
from .flow import Flow, as_data_tensor
from .loop import Budget, Interrupt
from .metrics import nll
from .placement import Placement, resolve_placement
from .records import GAUSSIAN, GROWING, BlockRecord, JKOHistory, Selection, StageRecord, movement_spread
from .samples import Pushed, Samples
from .scheduler import consider, fit_block, new_block
from .stages import STAGES, BlockPlan, PlanContext, Slice

__all__ = ["JKOTrainer", "resume_note", "run_pipeline", "train_jko"]

StageCallback = Callable[[JKOHistory, Flow], None]


def _data_sets(
    x_train: Any,
    x_val: Any,
    x_test: Any,
    config: JKOConfig,
    flow: Flow | None,
    place: Placement,
) -> dict[str, Tensor]:
    """The checked train / val (a seeded 10 % of the training rows by default) / test tensors on the host."""
    x_train = torch.as_tensor(x_train)
    dim = flow.dim if flow is not None else (x_train.shape[1] if x_train.dim() == 2 else -1)
    x_train = as_data_tensor(x_train, dim, place.host, "training data")
    if x_val is None:
        perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(config.seed))
        n_val = max(1, len(x_train) // 10)
        x_val, x_train = x_train[perm[:n_val]], x_train[perm[n_val:]]
    sets = {"train": x_train, "val": as_data_tensor(x_val, dim, place.host, "validation data")}
    if x_test is not None:
        sets["test"] = as_data_tensor(x_test, dim, place.host, "test data")
    config.batch_for(len(x_train), place.group.size)
    return sets


class JKOTrainer:
    """One JKO run's state, trained step by step.

    ``add_block(h)`` trains one more block, ``grow()`` adds blocks until the
    stopping rule, ``reparametrize(n)`` and ``refine(c)`` run those stages,
    ``run_stage(kind)`` any stage of :data:`jkoflow.stages.STAGES`; ``flow`` and
    ``history`` are current at any time, ``best`` is the best candidate flow
    so far by validation NLL (:class:`~jkoflow.records.Selection`),
    ``save(path)`` writes a checkpoint and :meth:`resume` continues one exactly.

    Arguments: as :func:`train_jko` (``flow``: frozen blocks to train after).

    Example:
        >>> import jkoflow
        >>> x = jkoflow.datasets.load("8gaussians", n=3000)
        >>> cfg = jkoflow.JKOConfig(width=8, iters=5, batch_size=256)
        >>> trainer = jkoflow.JKOTrainer(x, config=cfg)
        >>> [trainer.add_block(h=h).h for h in (1.0, 2.0)]
        [1.0, 2.0]
        >>> stage = trainer.refine(2)
        >>> len(trainer.flow), [s.name for s in trainer.history.stages]
        (4, ['initial', 'refine 1'])
        >>> flow, selected = trainer.best
        >>> len(flow) == selected.n_blocks, selected.stage in ("gaussian", "initial", "refine 1")
        (True, True)
    """

    def __init__(
        self,
        x_train: Any,
        x_val: Any = None,
        x_test: Any = None,
        config: JKOConfig | None = None,
        flow: Flow | None = None,
        progress: bool = False,
        callback: Callable[[dict[str, Any]], None] | None = None,
        on_stage: StageCallback | None = None,
        checkpoint: str | os.PathLike | None = None,
    ) -> None:
        config = config or JKOConfig()
        host = resolve_placement(config)
        sets = _data_sets(x_train, x_val, x_test, config, flow, host)
        dim = next(iter(sets.values())).shape[1]
        self.config = config = config.resolved(dim)
        self.placement = resolve_placement(config, host.group, sum(len(x) for x in sets.values()), dim)
        fresh = flow is None
        flow = (
            flow if flow is not None else Flow.for_data(sets["train"], config.eval_steps, config.standardize)
        )
        sets = {name: self.placement.keep(x) for name, x in sets.items()}
        self.flow = flow.to(device=self.placement.device, dtype=self.placement.dtype)
        self.samples = Samples(self.flow, sets, self.placement, config.chunk_size)
        self.progress = progress and self.placement.group.is_main
        self.callback, self.on_stage = callback, on_stage
        self.checkpoint = checkpoint  # read by every rank on resume, written by rank 0
        self.first = len(self.flow)  # blocks before this index are frozen input
        self.history = JKOHistory(config.to_dict())
        self.generator = torch.Generator().manual_seed(config.seed)
        self.budget = Budget(config.max_batches, config.max_seconds)
        self.interrupt = Interrupt(self.placement.group)
        self.parents: list[Any] | None = None  # blocks an open refinement stage still cuts
        self.block: BlockProgress | None = None  # the block in training
        self.optimizer: torch.optim.Optimizer | None = None  # its optimizer
        self.finished = False
        self._best: Flow | None = None  # a copy of the selected candidate (history.selected)
        self._carry: tuple[str, int, dict[str, Pushed]] | None = None
        if fresh:
            _consider_gaussian(self)

    @classmethod
    def resume(
        cls,
        checkpoint: str | os.PathLike,
        x_train: Any,
        x_val: Any = None,
        x_test: Any = None,
        config: JKOConfig | None = None,
        reset_lr: bool = False,
        **options: Any,
    ) -> JKOTrainer:
        """The trainer saved in ``checkpoint`` (same data), continuing exactly
        where it stopped; ``config`` may change only :data:`~jkoflow.config.RESUMABLE`
        fields. ``reset_lr``: see :func:`_continue_block`."""
        saved = load_state(checkpoint)
        saved_config = JKOConfig.from_saved(saved.config)
        given = None if config is None else config.resolved(saved.flow.dim)
        config = saved_config if given is None else resume_config(saved_config, given)
        trainer = cls(x_train, x_val, x_test, config, saved.flow, checkpoint=checkpoint, **options)
        _restore(trainer, saved)
        _continue_block(trainer, reset_lr or config.lr != saved_config.lr)
        return trainer

    # -- the scheme, step by step ---------------------------------------------------

    def add_block(self, h: float | None = None) -> BlockRecord:
        """Trains one new block with step ``h`` (default h_k = min(h0·ρ^k, h_max))
        for ``iters`` steps, in the open ``initial``/``extend`` stage."""
        stage = self._growing()
        k = self.first + len(stage.blocks)
        return self._train(
            stage, BlockPlan(k, self.config.step_size(k) if h is None else float(h), self.config.iters)
        )

    def grow(self) -> StageRecord:
        """Adds blocks until Ter(k) < ε, ``max_blocks`` or the budget (the
        ``initial`` stage, or an ``extend`` one after other stages)."""
        return self._run(self._growing())

    def reparametrize(self, iters: int = 1, rule: str | None = None) -> list[StageRecord]:
        """Up to ``iters`` ``reparam`` stages (``rule``: a key of
        :data:`~jkoflow.stages.REPARAM_RULES`, default the config's); stops early
        once the movement spread is below ``reparam_tol`` or the budget is spent."""
        done = []
        for _ in range(iters):
            _refuse_after_free(self.history, "reparam")
            if self.history.open_stage("reparam") is None:
                spread = movement_spread([b.movement for b in self.history.stages[-1].blocks])
                if self.budget.done() or spread < self.config.reparam_tol:
                    break
            done.append(self.run_stage("reparam", rule=rule))
        return done

    def refine(self, c: int) -> StageRecord:
        """Cuts every block into ``c`` time slices, each trained in order at h/c."""
        return self.run_stage("refine", factor=c)

    def run_stage(self, kind: str, factor: int | None = None, rule: str | None = None) -> StageRecord:
        """Runs a stage of ``kind`` (continuing an open one of that kind)."""
        if kind not in STAGES:
            raise InputError(f"unknown stage kind {kind!r}; known: {', '.join(STAGES)}")
        return self._run(self._begin(kind, factor, rule))

    def extend(self) -> StageRecord:
        """Adds blocks to a finished flow on data pushed through all of it."""
        if len(self.flow) >= self.config.max_blocks:
            raise InputError(
                f"training has finished with {len(self.flow)} blocks; set max_blocks above "
                f"{len(self.flow)} to add blocks, or finetune_iters to fine-tune them"
            )
        self.finished = False
        stage = self.run_stage("extend")
        self.finished = True
        self.save()
        return stage

    @property
    def best(self) -> tuple[Flow, Selection] | None:
        """The best candidate so far by validation NLL and its record (None before
        the first): the Gaussian fit of the training set (a fresh trainer's
        first candidate), the flow after each block of a growing stage, the
        whole flow at the end of every other stage (docs/design.md, "The
        scheduler and its stages")."""
        selected = self.history.selected
        if self._best is None or selected is None:
            return None
        return self._best, selected

    # -- stages ---------------------------------------------------------------------

    def _growing(self) -> StageRecord:
        """The open initial/extend stage, else a new one."""
        open_stage = self.history.open_stage()
        growing = open_stage is not None and open_stage.kind in GROWING
        return open_stage if growing else self._begin("extend" if self.history.stages else "initial")

    def _begin(self, kind: str, factor: int | None = None, rule: str | None = None) -> StageRecord:
        """The open stage of ``kind`` (a resumed or stepwise one), else a new stage
        after closing an open one of another kind."""
        history = self.history
        open_stage = history.open_stage()
        if kind == "initial" and history.stages:
            return history.stages[0]
        if open_stage is not None and open_stage.kind == kind:
            return open_stage
        _refuse_after_free(history, kind)
        if open_stage is not None:
            self._close(open_stage)
        if kind in ("extend", "free", "finetune"):
            self.first = _first_of(kind, history, len(self.flow))
        name = "initial" if kind == "initial" else f"{kind} {history.count(kind) + 1}"
        stage = StageRecord(name, kind, factor=factor, rule=rule)
        history.stages.append(stage)
        plan = STAGES[kind](history, stage, self._context())
        if plan.complete:
            stage.h_plan = [b.h for b in plan.blocks]
        if any(isinstance(b.start, Slice) for b in plan.blocks):
            self.parents = list(self.flow.blocks[self.first :])
            del self.flow.blocks[self.first :]
        return stage

    def _context(self) -> PlanContext:
        rows, processes = len(self.samples.sets["train"]), self.placement.group.size
        return PlanContext(self.config, self.first, self.budget.done(), rows, processes)

    def _run(self, stage: StageRecord) -> StageRecord:
        """Trains the blocks the stage's plan gives until it gives none, then closes it."""
        while not stage.complete:
            plan = STAGES[stage.kind](self.history, stage, self._context())
            if not plan.blocks:
                if plan.stopped_by:
                    self.history.stopped_by = plan.stopped_by
                break
            self._train(stage, plan.blocks[0])
        if not stage.complete:
            self.parents = None
            self._close(stage)
        return stage

    def _train(self, stage: StageRecord, plan: BlockPlan) -> BlockRecord:
        """Trains block ``plan.index`` of ``stage`` (building it if it is new)."""
        k, start = plan.index, plan.start
        if len(self.flow) == k and start == "new":
            previous = self.flow.blocks[-1] if len(self.flow) else None
            self.flow.append(new_block(k, self.flow.dim, self.config, previous).to(self.placement.like))
        elif len(self.flow) == k and isinstance(start, Slice):
            assert self.parents is not None
            self.flow.append(
                time_slices(self.parents[start.parent], start.count)[start.piece].to(self.placement.like)
            )
        carry = self._carry
        key = (stage.name, len(stage.blocks))
        if carry is not None and carry[:2] == key:
            cached = carry[2]
        else:
            cached = self.samples.through(self.first, len(stage.blocks))
        fit = fit_joint if start == "joint" else fit_block
        with _stop_on_interrupt(self.interrupt, enabled=self.checkpoint is not None):
            moved = fit(self, stage, plan, cached)
        self._carry = (stage.name, len(stage.blocks), moved)
        return stage.blocks[-1]

    def _close(self, stage: StageRecord) -> None:
        stage.close()
        if stage.blocks and stage.kind not in GROWING:  # a growing stage's blocks were candidates
            consider(self, stage, stage.blocks[-1])
        if self.progress:
            nll = f", test NLL {stage.test_nll:.4f}" if stage.test_nll is not None else ""
            tqdm.write(f"[{stage.name}] {len(stage.blocks)} blocks, W spread {stage.spread:.3f}{nll}")
        if self.on_stage is not None:
            self.on_stage(self.history, self.flow)
        self.save()

    # -- checkpoints ----------------------------------------------------------------

    def state(self) -> TrainerState:
        """A snapshot of the run (:mod:`jkoflow.checkpoint`)."""
        return _state(self)

    def save(self, path: str | os.PathLike | None = None) -> None:
        """Writes the state atomically to ``path`` (default: the checkpoint file; rank 0 only)."""
        path = path if path is not None else self.checkpoint
        if path is not None and self.placement.group.is_main:
            save_state(self.state(), path)


def _consider_gaussian(trainer: JKOTrainer) -> None:
    """Makes the Gaussian fit of the training set (the flow with no blocks and
    a decorrelating standardisation, :meth:`Flow.for_data`) the first
    candidate, so that a run never returns a flow worse than it on the
    validation set; none when the fit is undefined (constant or linearly
    dependent columns)."""
    sets, config = trainer.samples.sets, trainer.config
    try:
        gaussian = Flow.for_data(
            trainer.placement.compute(sets["train"]), config.eval_steps, standardize=True
        )
    except InputError:
        return
    gaussian = gaussian.to(trainer.placement.like).eval()
    val, test = (
        nll(gaussian, sets[name], config.chunk_size) if name in sets else None for name in ("val", "test")
    )
    trainer._best = gaussian
    trainer.history.selected = trainer.history.gaussian = Selection(GAUSSIAN, 0, val, test)


def _first_of(kind: str, history: JKOHistory, n_blocks: int) -> int:
    """The first block a new stage of ``kind`` trains: the flow's next for
    ``extend`` and ``free``; for ``finetune``, the first block the run trained."""
    if kind == "finetune" and history.stages[0].blocks:
        return history.stages[0].blocks[0].index
    return n_blocks


def _refuse_after_free(history: JKOHistory, kind: str) -> None:
    """Reparametrisation and refinement change or split the step sizes h of the
    last stage's blocks; after a ``free`` or ``finetune`` stage there are none."""
    last = history.stages[-1].kind if history.stages else None
    if kind in ("reparam", "refine") and last in ("free", "finetune"):
        what = "the free block" if last == "free" else "fine-tuning"
        raise InputError(f"cannot {kind} after {what}: it has no step size h to change or split")


def _state(trainer: JKOTrainer) -> TrainerState:
    """The trainer's state for :func:`jkoflow.checkpoint.save_state`."""
    if trainer.block is not None and trainer.optimizer is not None:
        trainer.block.optimizer = trainer.optimizer.state_dict()
    return TrainerState(
        config=trainer.config.to_dict(),
        history=trainer.history.to_dict(),
        flow=trainer.flow,
        parents=trainer.parents,
        first=trainer.first,
        batches=trainer.budget.batches,
        seconds=trainer.budget.seconds,
        finished=trainer.finished,
        data={name: data_fingerprint(x) for name, x in trainer.samples.sets.items()},
        block=trainer.block,
        generator=trainer.generator.get_state(),
        torch_rng=torch.get_rng_state(),
        best=trainer._best,
    )


def _continue_block(trainer: JKOTrainer, reset_lr: bool) -> None:
    """The block in training keeps the learning-rate scale and retry count its
    rollbacks left, unless ``reset_lr`` (also set when the resumed config has
    another ``lr``): then it goes on at scale 1 with no retry used. With
    ``progress`` the trainer says which (:func:`resume_note`)."""
    if trainer.block is not None and reset_lr:
        trainer.block.lr_scale, trainer.block.retries = 1.0, 0
    if trainer.progress:
        tqdm.write(resume_note(trainer))


def resume_note(trainer: JKOTrainer) -> str:
    """One line: where a resumed ``trainer`` continues, with which lr scale and retries."""
    block, lr = trainer.block, trainer.config.lr
    if block is None:
        return f"resuming after {len(trainer.flow)} blocks (lr {lr:g})"
    return (
        f"resuming block {block.index + 1} at step {block.iter} with lr {lr:g} × {block.lr_scale:g} "
        f"({block.retries}/{trainer.config.nan_retries} retries used)"
    )


def _restore(trainer: JKOTrainer, state: TrainerState) -> None:
    """Continues ``trainer`` from ``state``, which must have been trained on the same data."""
    for name, x in trainer.samples.sets.items():
        if name not in state.data or not np.allclose(data_fingerprint(x), state.data[name], rtol=1e-9):
            raise InputError(f"the {name} data differ from those the checkpoint was trained on")
    trainer.history = JKOHistory.from_dict({**state.history, "config": trainer.config.to_dict()})
    trainer.parents = [p.to(trainer.placement.like) for p in state.parents] if state.parents else None
    trainer.first, trainer.budget.batches, trainer.budget.seconds = state.first, state.batches, state.seconds
    trainer.finished, trainer.block = state.finished, state.block
    if state.best is not None and trainer.history.selected is not None:
        trainer._best = state.best.to(trainer.placement.like).requires_grad_(False).eval()
    else:  # a checkpoint older than format 3 kept no candidate
        trainer.history.selected = None
    trainer.generator.set_state(state.generator)
    torch.set_rng_state(state.torch_rng)


@contextmanager
def _stop_on_interrupt(interrupt: Interrupt, enabled: bool) -> Iterator[None]:
    """While active, a first Ctrl-C asks the trainer to stop after the current
    Adam step (it then writes its checkpoint and raises KeyboardInterrupt); a
    second Ctrl-C interrupts at once."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def ask_to_stop(signum: int, frame: Any) -> None:
        if interrupt.interrupted:
            raise KeyboardInterrupt
        interrupt.interrupted = True

    previous = signal.signal(signal.SIGINT, ask_to_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_pipeline(trainer: JKOTrainer) -> None:
    """The configured stages, continued where they stand: ``initial``, then up to
    ``reparam_iters`` ``reparam`` stages, then one ``refine`` stage per entry of
    ``refine``, then a ``free`` stage with ``free_block`` and a ``finetune``
    stage with ``finetune_iters``. A finished run resumed with
    ``finetune_iters`` (and a last stage that is not a ``finetune``) gets a
    ``finetune`` stage, after an ``extend`` stage only if its blocks stopped
    at ``max_blocks`` and ``max_blocks`` is now larger; otherwise it gets an
    ``extend`` stage when ``max_blocks`` is above its blocks."""
    history = trainer.history
    if trainer.finished:
        finetune = wants_finetune(trainer.config, history.stages[-1].kind if history.stages else None)
        more = len(trainer.flow) < trainer.config.max_blocks and history.stopped_by == "max_blocks"
        if more or not finetune:
            trainer.extend()  # refuses a finished flow that would get nothing
        if wants_finetune(trainer.config, history.stages[-1].kind):
            trainer.finished = False
            trainer.run_stage("finetune")
            trainer.finished = True
            trainer.save()
        return
    if history.open_stage("extend") is not None:
        trainer.run_stage("extend")
    else:
        trainer.run_stage("initial")
        if history.stages[0].blocks:  # else the flow already had max_blocks blocks
            _later_stages(trainer)
    trainer.finished = True
    trainer.save()


def _later_stages(trainer: JKOTrainer) -> None:
    """The stages after ``initial``; a stage not begun yet is skipped once the budget is spent."""
    history, config = trainer.history, trainer.config
    trainer.reparametrize(config.reparam_iters - history.count("reparam", complete=True))
    for c in config.refine[history.count("refine", complete=True) :]:
        if history.open_stage("refine") is None and trainer.budget.done():
            break
        trainer.refine(c)
    for kind, wanted in (("free", config.free_block), ("finetune", config.finetune_iters > 0)):
        begun = history.open_stage(kind) is not None
        if wanted and not history.count(kind, complete=True) and (begun or not trainer.budget.done()):
            trainer.run_stage(kind)


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
    reset_lr: bool = False,
) -> tuple[Flow, JKOHistory]:
    """Trains a flow block by block with the JKO scheme, then runs the
    reparametrisation and refinement stages that ``config`` asks for
    (:func:`run_pipeline`).

    Arguments:
        x_train, x_val, x_test: Data (n, d); by default a seeded 10 % of
            ``x_train`` is the validation set (W_k, Ter(k), NLL); the test NLL
            is recorded per block when ``x_test`` is given.
        config: A :class:`JKOConfig` (on resume: the checkpoint's, changed only
            in :data:`~jkoflow.config.RESUMABLE` fields).
        flow: A flow to extend: new blocks are trained after its frozen ones.
        progress, callback, on_stage: Progress bars; a call per iteration
            record; ``on_stage(history, flow)`` after each stage.
        checkpoint: The trainer's state file, written atomically at every block
            end, every ``checkpoint_every`` steps and on Ctrl-C.
        resume: Continue from ``checkpoint`` with the same data, exactly; a
            finished run gets blocks until it holds ``max_blocks``.
        reset_lr: On resume, restart the lr scale and retries of the block in
            training (also done when ``config.lr`` differs from the checkpoint's).

    In a process group (:mod:`jkoflow.distributed`) every rank calls this with the
    same arguments and gets one process's result; rank 0 writes ``checkpoint``.
    Returns ``(flow, history)``: the best flow by validation NLL (eval mode;
    ``history.selected`` says which; five steps above do not beat the Gaussian
    fit of x) and a :class:`JKOHistory`. Raises
    TrainingError when a block's steps stay faulty after ``config.nan_retries`` retries.

    Example:
        >>> import jkoflow
        >>> x = jkoflow.datasets.load("8gaussians", n=3000)
        >>> cfg = jkoflow.JKOConfig(width=8, iters=5, batch_size=256, max_blocks=1)
        >>> flow, history = jkoflow.train_jko(x, config=cfg)
        >>> len(history.iterations), len(history.blocks), history.selected.stage, len(flow)
        (5, 1, 'gaussian', 0)
    """
    options = {"progress": progress, "callback": callback, "on_stage": on_stage}
    if resume and checkpoint is None:
        raise InputError("resume needs the checkpoint file to continue from")
    if resume and flow is not None:
        raise InputError("pass either a flow to extend or a checkpoint to resume, not both")
    if resume:
        trainer = JKOTrainer.resume(checkpoint, x_train, x_val, x_test, config, reset_lr, **options)
    else:
        trainer = JKOTrainer(x_train, x_val, x_test, config, flow, checkpoint=checkpoint, **options)
    run_pipeline(trainer)
    best = trainer.best
    return (best[0] if best is not None else trainer.flow.eval()), trainer.history
