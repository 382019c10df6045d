"""One block of the JKO scheme: its objective, its optimisation on the shared
loop (:func:`jkoflow.loop.optimize`) and its record (docs/design.md, "The
scheduler and its stages").

Block k minimises, over samples x of p_{k−1} (shape (n, d)),

    KL((T_k)#p_{k−1} ‖ N(0, I)) + W2²(p_{k−1}, p_k)/(2h_k)

(:func:`~jkoflow.objectives.jko_loss`), by Adam with a cosine learning-rate
decay from lr to lr·lr_final_factor. After training it is frozen, every set is
pushed through it and its movement and relative movement are measured on the
validation set:

    W_k = sqrt(E‖T_k(x) − x‖²),   Ter(k) = E‖T_k(x) − x‖² / E‖T_k(x)‖².

Reference: Xu, Cheng, Xie, "Normalizing flow neural networks by JKO scheme",
https://arxiv.org/abs/2212.14424.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

import torch
from torch import Tensor
from tqdm.auto import tqdm

from blocks import Block, time_slices

from . import distributed
from .checkpoint import BlockProgress
from .compiling import stepper_at, training_stepper
from .config import VALIDATION_ROWS, JKOConfig
from .errors import TrainingError
from .loop import (
    FAULTS,
    Bar,
    Checkpoints,
    Hook,
    Objective,
    Plateau,
    Records,
    Rollback,
    Step,
    optimize,
    snapshot_parts,
    valid_check,
)
from .objectives import JKOLoss, jko_loss
from .ode import Stepper
from .placement import Placement
from .records import GROWING, BlockRecord, JKOHistory, Selection, StageRecord, movement_spread
from .samples import Pushed
from .stages import BlockPlan, Slice, reparametrize

if TYPE_CHECKING:
    from .trainer import JKOTrainer

__all__ = [
    "IdleBlock",
    "JKOHistory",
    "Measured",
    "Trained",
    "block_record",
    "check_rows",
    "consider",
    "fit_block",
    "fits_its_steps",
    "flow_nll",
    "hold_steps",
    "idle_gain",
    "is_idle",
    "movement_spread",
    "new_block",
    "push_checked",
    "push_rest",
    "relative_movement",
    "reparametrize",
    "run_loop",
    "stop_if_interrupted",
]


class JKOObjective:
    """The JKO loss of one block on mini-batches of ``x`` drawn by ``generator``,
    on this process or, in a process group, sharded over the ranks
    (:mod:`jkoflow.distributed`: the result equals one process's)."""

    def __init__(
        self,
        block: Block,
        plan: BlockPlan,
        x: Tensor,
        config: JKOConfig,
        generator: torch.Generator,
        placement: Placement,
        step: Callable[[], int],
    ) -> None:
        self.block, self.h, self.iters, self.x = block, plan.h, plan.iters, x
        self.peak = config.lr if plan.start == "new" else config.stage_lr or config.lr
        self.train_steps = plan.train_steps or config.train_steps
        self.config, self.generator, self.placement = config, generator, placement
        self.batch = config.batch_for(len(x))
        self.step = step  # mini-batches taken so far (seeds the ranks' noise)
        self.stepper = training_stepper(block, config.compile, config.iters, config.max_seconds)
        self.parallel = distributed.data_parallel(block, placement.group, placement.device)

    def lr(self, it: int, scale: float) -> float:
        """scale·(lr_f + (lr − lr_f)(1 + cos(π·it/iters))/2), lr_f = lr·lr_final_factor,
        lr = ``config.lr`` for a new block and ``config.stage_lr`` for one
        retrained from its weights (reparam, refine)."""
        lr, final = self.peak, self.peak * self.config.lr_final_factor
        return scale * (final + (lr - final) * (1 + math.cos(math.pi * it / self.iters)) / 2)

    def current_stepper(self) -> Stepper:
        """The RK4 step of this mini-batch, by the run's mini-batches so far
        (:func:`~jkoflow.compiling.stepper_at`: eager first, then ``self.stepper``)."""
        return stepper_at(self.stepper, self.step())

    def loss(self) -> tuple[Tensor, dict[str, Tensor]]:
        config, x = self.config, self.x
        index = torch.randint(len(x), (self.batch,), generator=self.generator)
        stepper = self.current_stepper()
        if self.parallel is None:
            batch = self.placement.compute(x[index.to(x.device)])
            terms = jko_loss(self.block, batch, self.h, self.train_steps, config.transport, stepper)  # type: ignore[arg-type]
            return terms.loss, terms._asdict()
        group = self.placement.group
        start, stop = group.shard(len(index))
        batch = self.placement.compute(x[index[start:stop].to(x.device)])
        weight = group.size * (stop - start) / len(index)
        with group.step_rng(config.seed, self.step(), self.placement.device):
            local = self.parallel(batch, self.h, self.train_steps, config.transport, weight, stepper)
        return local[0], JKOLoss(*(group.sum(local.detach()) / group.size))._asdict()


def new_block(k: int, dim: int, config: JKOConfig, previous: Block | None) -> Block:
    """Block k, seeded by (seed, k); warm-started from ``previous`` if allowed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed * 7919 + k)
        block = config.make_block(dim, k)
    same = previous is not None and type(previous) is type(block) and previous.config() == block.config()
    if config.warm_start and same:
        block.load_state_dict(previous.state_dict())
    return block.requires_grad_(True)


_new_block = new_block  # the name tests and older scripts use


def _shown(h: float | None) -> str:
    """h for progress lines; ``none`` for a block without the W2 term."""
    return "none" if h is None else f"{h:.3g}"


def _rollback(
    trainer: JKOTrainer,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: BlockProgress,
    label: str,
) -> Rollback:
    """Rolls ``module`` (block k, or the blocks a stage trains jointly: ``label``
    in messages) back to its last snapshot after a non-finite step, records
    the fault and warns; raises TrainingError once the retries are spent."""
    k, config, history = progress.index, trainer.config, trainer.history
    stage = len(history.stages) - 1

    def give_up(fault: str, it: int) -> NoReturn:
        trainer.save()
        raise TrainingError(
            f"{label}: {FAULTS[fault][1]} at step {it} after {progress.retries} "
            f"retries (lr scaled by {progress.lr_scale:.3g}); the {k} blocks before it are finished",
            block_index=k,
        )

    def report(fault: str, it: int) -> None:
        fields = ("stage", "block", "iter", "fault", "resumed_at", "lr_scale")
        history.faults.append(
            dict(zip(fields, (stage, k, it, fault, progress.iter, progress.lr_scale), strict=True))
        )
        warnings.warn(
            f"{label}: {FAULTS[fault][0]} at step {it}; rolled back to step {progress.iter} "
            f"with the lr scaled by {progress.lr_scale:.3g} (retry {progress.retries}/{config.nan_retries})",
            RuntimeWarning,
            stacklevel=6,
        )

    parts = snapshot_parts(module, optimizer, trainer.generator, history.iterations, progress, trainer.budget)
    return Rollback(progress, parts, config.nan_retries, config.nan_lr_factor, give_up, report)


def _optimize_block(
    trainer: JKOTrainer, block: Block, plan: BlockPlan, cached: dict[str, Pushed], judged: bool = False
) -> BlockProgress:
    """Adam steps on the JKO loss of block ``plan.index`` (training samples
    ``cached["train"]``) on :func:`run_loop`, with early stopping on the
    validation NLL of ``cached["val"]`` (:func:`_plateau`; with ``judged``
    also :class:`IdleBlock`)."""
    objective = JKOObjective(
        block,
        plan,
        cached["train"].x,
        trainer.config,
        trainer.generator,
        trainer.placement,
        lambda: trainer.budget.batches,
    )

    def plateau(progress: BlockProgress) -> list[Hook]:
        return _plateau(trainer, block, plan, progress, cached["val"], judged)

    return run_loop(trainer, block, objective, plan, plateau, f"block {plan.index + 1}")


def run_loop(
    trainer: JKOTrainer,
    module: torch.nn.Module,
    objective: Objective,
    plan: BlockPlan,
    plateau: Callable[[BlockProgress], list[Hook]],
    label: str,
) -> BlockProgress:
    """Adam steps on ``objective`` over ``module``'s parameters for ``plan.iters``
    steps on the shared loop with the trainer's hooks (early stopping from
    ``plateau``, interrupt, budget, records, progress bar ``label``,
    checkpoints), continuing the trainer's saved progress of unit
    ``plan.index`` if it has one; a non-finite step rolls back."""
    k, config, history = plan.index, trainer.config, trainer.history
    module.train()
    optimizer = torch.optim.Adam(module.parameters(), lr=config.lr)
    if trainer.block is None or trainer.block.index != k:
        trainer.block = BlockProgress(k)
    progress = trainer.block
    if progress.optimizer is not None:
        optimizer.load_state_dict(progress.optimizer)
    trainer.optimizer = optimizer
    rollback = _rollback(trainer, module, optimizer, progress, label)
    stage = len(history.stages) - 1

    def record(step: Step) -> dict[str, float | int]:
        fields = {"stage": stage, "block": k, "iter": step.it, **step.terms, "lr": step.lr}
        fields["seconds"] = progress.seconds
        checks = progress.checks
        if checks and checks[-1][0] == step.it + 1 and valid_check(checks[-1]):  # a check of the model
            budget = trainer.budget
            fields.update(
                val_nll=progress.checks[-1][1], n_batches=budget.batches, train_seconds=budget.seconds
            )
        return fields

    def postfix(step: Step) -> dict[str, str] | None:
        return {"loss": f"{step.terms['loss']:.4f}", "h": _shown(plan.h)} if step.it % 10 == 0 else None

    hooks = [
        *plateau(progress),
        trainer.interrupt,
        trainer.budget,
        Records(history.iterations, record, trainer.callback),
        Bar(progress, plan.iters, label, trainer.progress, postfix, leave=False),
        Checkpoints(progress, plan.iters, config.checkpoint_every, rollback, trainer.save),
    ]
    rollback.snapshot()  # after the early-stopping check before the first step, which it keeps
    optimize(objective, optimizer, progress, plan.iters, rollback, hooks)
    module.eval()
    trainer.optimizer, progress.optimizer = None, None
    return progress


def _plateau(
    trainer: JKOTrainer,
    block: Block,
    plan: BlockPlan,
    progress: BlockProgress,
    val: Pushed,
    judged: bool = False,
) -> list[Hook]:
    """The early-stopping hooks of a block (none with ``val_every=0``): the
    validation NLL, on the first :data:`~jkoflow.config.VALIDATION_ROWS`
    validation rows, of the flow as it stands with this block, i.e. through
    the block (at its own RK4 steps) and the blocks after it that the stage
    has not retrained yet (:func:`_tail`): a retrained block is kept only
    where it makes the whole flow better. With ``judged`` (a block the
    growth rule judges by Ter and gain) also :class:`IdleBlock`, on the
    block's Ter on the same rows."""
    config, k = trainer.config, progress.index
    if not config.val_every:
        return []
    rows, tail = check_rows(val), _tail(trainer, plan)
    latest: dict[str, float] = {}

    def val_nll() -> tuple[float, float, bool]:
        nll, stderr, valid, latest["ter"] = flow_nll(trainer, k, rows, tail)
        return nll, stderr, valid

    hooks: list[Hook] = [Plateau(progress, block, config.val_every, config.patience, plan.iters, val_nll)]
    if judged:
        hooks.append(IdleBlock(progress, config, plan.iters, lambda: latest.get("ter", math.inf)))
    return hooks


def check_rows(val: Pushed) -> Pushed:
    """The validation rows an early-stopping check measures: the first
    :data:`~jkoflow.config.VALIDATION_ROWS` of ``val``."""
    return val.head(min(len(val.x), VALIDATION_ROWS))


def flow_nll(
    trainer: JKOTrainer, k: int, rows: Pushed, tail: list[tuple[Block, int]]
) -> tuple[float, float, bool, float]:
    """``rows`` (samples of p_{k−1}) pushed through block ``k`` at its own RK4
    steps and then through ``tail`` (:func:`_tail`): (their NLL, its standard
    error, whether block ``k``'s step-doubling change on them is below
    ``step_tol`` (:func:`push_checked`), block ``k``'s Ter on them)."""
    with torch.no_grad():
        pushed, valid = push_checked(trainer, k, rows)
        ter = relative_movement(rows.x, pushed.x)
        for later, steps in tail:
            pushed = trainer.samples.push_block(later, pushed, steps)
        return (*pushed.nll_with_stderr(), valid, ter)


def relative_movement(x: Tensor, moved: Tensor) -> float:
    """Ter = E‖T(x) − x‖² / E‖T(x)‖² of samples ``x`` (n, d) moved to ``moved``."""
    return float((moved - x).pow(2).sum(1).mean() / moved.pow(2).sum(1).mean())


def idle_gain(checks: list[list[float]]) -> float:
    """The validation NLL a block gained over its check before the first step:
    the first valid check minus the best valid one (0 without two of them)."""
    valid = [check[1] for check in checks if valid_check(check)]
    return valid[0] - min(valid) if len(valid) >= 2 else 0.0


def is_idle(ter: float, checks: list[list[float]], config: JKOConfig) -> bool:
    """Whether a block with relative movement ``ter`` and early-stopping
    ``checks`` is idle: Ter < ``ter_eps`` and :func:`idle_gain` < ``gain_eps``."""
    return ter < config.ter_eps and idle_gain(checks) < config.gain_eps


class IdleBlock(Hook):
    """Ends a new block that has nothing to do: from a quarter of its ``iters``
    steps on, once its latest early-stopping check found it moving Ter < ε
    (``ter_eps``, measured by ``ter()``) and its validation NLL no more than
    ``gain_eps`` below the check before its first step (:func:`idle_gain`).
    The growth rule (:func:`jkoflow.stages.plan_grow`: Ter < ε and a gain
    under ``gain_eps``) would end the stage with such a block; training it
    on only spends time, and on an idle block the optimiser's only lever
    left is the RK4 error (its step control would then double its steps).

    Example:
        >>> from jkoflow import JKOConfig
        >>> from jkoflow.checkpoint import BlockProgress
        >>> from jkoflow.scheduler import IdleBlock
        >>> progress = BlockProgress(index=2)
        >>> progress.checks = [[0, 3.520, 0.01, 1.0], [100, 3.519, 0.01, 1.0]]
        >>> hook = IdleBlock(progress, JKOConfig(), iters=400, ter=lambda: 1e-4)
        >>> hook.done()  # gained 0.001 < 0.005 and Ter 1e-4 < 0.01, but before step 100
        False
        >>> progress.iter = 100
        >>> hook.done()
        True
    """

    def __init__(
        self, progress: BlockProgress, config: JKOConfig, iters: int, ter: Callable[[], float]
    ) -> None:
        self.progress, self.config, self.iters, self.ter = progress, config, iters, ter

    def done(self) -> bool:
        if 4 * self.progress.iter < self.iters or len(self.progress.checks) < 2:
            return False
        return is_idle(self.ter(), self.progress.checks, self.config)


def push_checked(trainer: JKOTrainer, k: int, rows: Pushed) -> tuple[Pushed, bool]:
    """``rows`` pushed through block ``k`` at its own RK4 steps, and whether its
    step-doubling change on them is below ``step_tol`` (an early-stopping
    check's validity)."""
    pushed = trainer.samples.push(k, rows)
    change = trainer.samples.step_doubling_change(k, rows, pushed)
    return pushed, abs(change) < trainer.config.step_tol


def _tail(trainer: JKOTrainer, plan: BlockPlan) -> list[tuple[Block, int]]:
    """The blocks (with their RK4 steps) that follow block ``plan.index`` in
    the flow until the stage retrains them: the flow's later blocks for a
    block retrained in place, the rest of its parent and the later parents
    for a refinement slice, none for a new block (it is the flow's last)."""
    flow, start = trainer.flow, plan.start
    if start == "keep":
        return [(flow.blocks[j], flow.block_steps(j)) for j in range(plan.index + 1, len(flow))]
    if isinstance(start, Slice) and trainer.parents is not None:
        rest = time_slices(trainer.parents[start.parent], start.count)[start.piece + 1 :]
        return [(b, flow.steps) for b in [*rest, *trainer.parents[start.parent + 1 :]]]
    return []


class Measured(NamedTuple):
    """A frozen block measured at its own RK4 steps (:func:`fits_its_steps`)."""

    val: Pushed  # the validation samples of p_k
    change: float  # step-doubling change of the validation NLL
    error: float  # the block's own relative inversion error
    fits: bool  # both below the config's tolerances


def fits_its_steps(trainer: JKOTrainer, k: int, cached: dict[str, Pushed]) -> Measured:
    """Pushes the validation set through the frozen block ``k`` at its own RK4
    steps (``trainer.flow.block_steps(k)``) and measures it there
    (:class:`Measured`). The other sets are pushed by :func:`push_rest` once
    the block is kept at these steps."""
    samples, config = trainer.samples, trainer.config
    with torch.no_grad():
        moved = samples.push(k, cached["val"])
        change = samples.step_doubling_change(k, cached["val"], moved)
        error = samples.inversion_error(k, cached["val"], moved)
    return Measured(moved, change, error, abs(change) < config.step_tol and error < config.inversion_tol)


ROUND_TRIP_MARGIN = 2
"""The round trip of the flow up to a block is held under
``inversion_tol / ROUND_TRIP_MARGIN``, so that it stays under
``inversion_tol`` on rows the run has not seen: it is a mean over rows, and
on long-tailed data the few rows far out that make it vary from set to set."""


def hold_steps(
    trainer: JKOTrainer, k: int, cached: dict[str, Pushed], measured: Measured
) -> tuple[Measured, float]:
    """Block ``k`` (frozen, ``measured`` at its own steps) and the relative
    round trip of the flow's first k + 1 blocks, estimated from the
    validation rows and the training rows farthest out
    (:meth:`~jkoflow.samples.Samples.round_trip_error`), after doubling the
    block's step factor, its evaluation and not its training, while it does
    not fit its steps or that round trip is at least
    ``inversion_tol / ROUND_TRIP_MARGIN``, at most ``step_doublings`` times.
    Each block's own inversion error can be small while the composition's is
    not (an earlier block's inverse scales a later block's error); at twice
    the steps the block's RK4 error is about 16 times smaller. A round trip
    the flow before block ``k`` already failed is not block ``k``'s to
    mend: it is then measured, not held."""
    config, flow, samples = trainer.config, trainer.flow, trainer.samples
    bound, before, tail = config.inversion_tol / ROUND_TRIP_MARGIN, None, samples.tail_of(cached["train"])
    with torch.no_grad():
        for doubling in range(config.step_doublings + 1):
            if doubling:
                flow.set_steps_factor(k, 2 * flow.steps_factors[k])
                measured = fits_its_steps(trainer, k, cached)
            trip = samples.round_trip_error(k, measured.val, samples.push(k, tail))
            if measured.fits and trip >= bound and before is None:
                before = samples.round_trip_error(k - 1, cached["val"], tail)  # 0 for k = 0
            if measured.fits and (trip < bound or (before is not None and before >= bound)):
                break
    return measured, trip


def push_rest(trainer: JKOTrainer, k: int, cached: dict[str, Pushed], val: Pushed) -> dict[str, Pushed]:
    """Every set pushed through block ``k`` at its own steps, the validation
    set's push ``val`` (from :func:`fits_its_steps`) reused."""
    with torch.no_grad():
        return {name: val if name == "val" else trainer.samples.push(k, c) for name, c in cached.items()}


class Trained(NamedTuple):
    """What the step control (:func:`_train_with_step_control`) ends a block with."""

    progress: BlockProgress
    plan: BlockPlan  # the last phase's (its train steps)
    moved: dict[str, Pushed]  # every set pushed through the block
    change: float  # step-doubling change on the validation set
    error: float  # relative inversion error on the validation set
    round_trip: float  # the flow's up to the block, relative (Samples.round_trip_error)
    put_back: bool  # the block from before the stage was put back


def _train_with_step_control(
    trainer: JKOTrainer, block: Block, plan: BlockPlan, cached: dict[str, Pushed], judged: bool = False
) -> Trained:
    """Trains the block on its plan, evaluated at the flow's base steps (step
    factor 1); while it fits its RK4 discretisation (:func:`fits_its_steps`
    fails, or an early-stopping check found its step-doubling change over
    ``step_tol``: the phase then stopped there and put back the weights of
    the best converged check) and ``step_doublings`` allow, trains on with
    the train steps and its step factor doubled (eval steps stay
    ``eval_steps/train_steps`` times the train steps) for a quarter of
    ``plan.iters`` more steps (the cosine schedule stretched to the new
    total, so it resumes at a low learning rate), then checks it again at
    its new eval steps. A resumed block continues the phase it was in (its
    factor is in the checkpoint's flow). A block the growth rule judges
    (``judged``) that is idle (Ter < ε on the validation set and a validation
    gain under ``gain_eps``, :class:`IdleBlock`) is kept at its best
    converged check instead of trained on at finer steps: it ends the stage
    either way. A block retrained from its weights gets them back if it ends
    no better than it began (:func:`_no_better`). The block kept is then
    evaluated at finer steps where it or the flow's round trip up to it
    needs them (:func:`hold_steps`)."""
    config, flow, k = trainer.config, trainer.flow, plan.index
    if trainer.block is None or trainer.block.index != k:
        trainer.block = _first_phase(trainer, plan, cached)
    elif trainer.block.train_steps:  # resumed in a phase the step control extended
        plan = dataclasses.replace(plan, train_steps=trainer.block.train_steps, iters=trainer.block.iters)
    while True:
        block.requires_grad_(True)
        progress = _optimize_block(trainer, block, plan, cached, judged and flow.steps_factors[k] == 1)
        block.requires_grad_(False)
        start = time.perf_counter()
        val, change, error, converged = fits_its_steps(trainer, k, cached)
        valid = all(valid_check(check) for check in progress.checks)
        fits = converged and (
            valid or (judged and is_idle(relative_movement(cached["val"].x, val.x), progress.checks, config))
        )
        steps = plan.train_steps or config.train_steps
        if fits or trainer.budget.done() or steps >= finest_train_steps(config):
            put_back = _no_better(trainer, plan, cached, converged)
            measured = Measured(val, change, error, converged)
            if put_back:
                plan = _put_back(trainer, block, plan)
                measured = fits_its_steps(trainer, k, cached)
            measured, trip = hold_steps(trainer, k, cached, measured)
            moved = push_rest(trainer, k, cached, measured.val)
            progress.seconds += time.perf_counter() - start
            return Trained(progress, plan, moved, measured.change, measured.error, trip, put_back)
        plan = next_phase(plan, progress, train_steps=2 * steps)
        progress.train_steps = plan.train_steps
        flow.set_steps_factor(k, 2 * flow.steps_factors[k])
        progress.seconds += time.perf_counter() - start


def finest_train_steps(config: JKOConfig) -> int:
    """The most RK4 train steps a step control gives a block:
    ``train_steps·2^step_doublings``."""
    return config.train_steps * 2**config.step_doublings


def next_phase(plan: BlockPlan, progress: BlockProgress, **changes: Any) -> BlockPlan:
    """The plan of the training phase a step control starts after doubling RK4
    steps: ``plan`` with ``changes`` and a quarter of its Adam steps more (the
    cosine schedule stretched to the new total, so it resumes at a low
    learning rate); ``progress`` records the new total and forgets its checks,
    so the phase is judged at its own, finer steps."""
    plan = dataclasses.replace(plan, iters=plan.iters + max(1, plan.iters // 4), **changes)
    progress.iters, progress.checks, progress.best = plan.iters, [], None
    return plan


def _first_phase(trainer: JKOTrainer, plan: BlockPlan, cached: dict[str, Pushed]) -> BlockProgress:
    """The progress of block ``plan.index`` before its first step, the block
    set to step factor 1. For a block a stage retrains from its weights
    (early stopping on), the progress keeps the block as it stands: its
    weights, its step factor and the validation NLL of the flow with it
    (:func:`_whole_flow_nll`; None when the block is not converged in its
    steps)."""
    flow, k = trainer.flow, plan.index
    progress = BlockProgress(k)
    if plan.start != "new" and trainer.config.val_every:
        nll, valid = _whole_flow_nll(trainer, plan, cached)
        progress.before = copy.deepcopy(flow.blocks[k].state_dict())
        progress.before_factor, progress.before_nll = flow.steps_factors[k], nll if valid else None
    flow.set_steps_factor(k, 1)
    return progress


def _no_better(trainer: JKOTrainer, plan: BlockPlan, cached: dict[str, Pushed], converged: bool) -> bool:
    """Whether a block retrained from its weights (:func:`_first_phase` kept
    them) ends no better than it began: not ``converged`` in its RK4 steps
    (:func:`fits_its_steps`), or the validation NLL of the flow with it not
    below the one with the block before (an unconverged block before is
    beaten by any converged one). Early stopping compares the checks of the
    last phase only, so a block whose steps were doubled is compared here."""
    progress = trainer.block
    if progress is None or progress.before is None:
        return False
    if not converged:
        return True
    if progress.before_nll is None:
        return False
    return not _whole_flow_nll(trainer, plan, cached)[0] < progress.before_nll


def _whole_flow_nll(trainer: JKOTrainer, plan: BlockPlan, cached: dict[str, Pushed]) -> tuple[float, bool]:
    """The validation NLL an early-stopping check of block ``plan.index``
    measures (:func:`flow_nll` on :func:`check_rows` through the
    :func:`_tail`) and whether the block is converged in its steps there."""
    nll, _, valid, _ = flow_nll(trainer, plan.index, check_rows(cached["val"]), _tail(trainer, plan))
    return nll, valid


def _put_back(trainer: JKOTrainer, block: Block, plan: BlockPlan) -> BlockPlan:
    """Gives block ``plan.index`` its weights and step factor from before the
    stage (:func:`_first_phase`); the plan with the train steps of that factor."""
    progress = trainer.block
    assert progress is not None and progress.before is not None
    block.load_state_dict(progress.before)
    trainer.flow.set_steps_factor(plan.index, progress.before_factor)
    return dataclasses.replace(plan, train_steps=trainer.config.train_steps * progress.before_factor)


def _converged(trainer: JKOTrainer, n: int) -> bool:
    """Whether each of the flow's first ``n`` blocks ended with a step-doubling
    change below ``step_tol`` and the round trip of those ``n`` blocks
    below ``inversion_tol``: else the candidate's NLL is its RK4 map's, not
    the model's, or it does not invert, and it is not selectable. (Records
    written before the round trip was measured pass on the blocks' own.)"""
    config, records = trainer.config, trainer.history.flow_blocks(n)
    trip = records[-1].round_trip_error if records else None
    return all(abs(b.step_doubling_change or 0.0) < config.step_tol for b in records) and (
        trip is None or trip < config.inversion_tol
    )


def consider(trainer: JKOTrainer, stage: StageRecord, record: BlockRecord) -> None:
    """Keeps the flow's first ``record.index + 1`` blocks (a copy) as the
    trainer's selection when they are converged in their RK4 steps
    (:func:`_converged`) and their validation NLL is strictly below the
    selected one's (:attr:`JKOTrainer.best`)."""
    selected = trainer.history.selected
    if selected is not None and not record.val_nll < selected.val_nll:
        return
    n = record.index + 1
    if not _converged(trainer, n):
        return
    trainer._best = copy.deepcopy(trainer.flow.head(n)).requires_grad_(False).eval()
    trainer.history.selected = Selection(stage.name, n, record.val_nll, record.test_nll)


def block_record(
    trainer: JKOTrainer,
    k: int,
    h: float | None,
    before: dict[str, Pushed],
    moved: dict[str, Pushed],
    progress: BlockProgress | None,
    change: float,
    error: float,
    train_steps: int,
    start: str | Slice = "new",
    round_trip: float | None = None,
) -> BlockRecord:
    """The :class:`BlockRecord` of block ``k`` from the samples before and after
    it: W_k and Ter(k) on the validation set, the NLLs, the Adam steps and
    seconds of ``progress`` (none: 0) and the RK4 measures (``change``,
    ``error`` and ``round_trip``, from :func:`hold_steps`)."""
    with torch.no_grad():
        step = (moved["val"].x - before["val"].x).pow(2).sum(1).mean()
        ter = relative_movement(before["val"].x, moved["val"].x)
    losses = progress.losses if progress is not None else []
    return BlockRecord(
        index=k,
        h=h,
        movement=float(step.sqrt()),
        ter=ter,
        val_nll=moved["val"].nll(),
        n_batches=len(losses),
        seconds=progress.seconds if progress is not None else 0.0,
        loss_first=losses[0] if losses else None,
        loss_last=losses[-1] if losses else None,
        retries=progress.retries if progress is not None else 0,
        test_nll=moved["test"].nll() if "test" in moved else None,
        parent=start.parent if not isinstance(start, str) else None,
        slice=start.piece if not isinstance(start, str) else None,
        step_doubling_change=change,
        inversion_error=error,
        round_trip_error=round_trip,
        train_steps=train_steps,
        step_doublings=round(math.log2(train_steps / trainer.config.train_steps)),
        eval_steps=trainer.flow.block_steps(k),
    )


def stop_if_interrupted(trainer: JKOTrainer) -> None:
    """Raises KeyboardInterrupt after a unit of training once a rank was asked to stop."""
    if trainer.placement.group.any(trainer.interrupt.interrupted):  # decided together
        trainer.interrupt.interrupted = True
        raise KeyboardInterrupt


def fit_block(
    trainer: JKOTrainer, stage: StageRecord, plan: BlockPlan, cached: dict[str, Pushed]
) -> dict[str, Pushed]:
    """Trains block ``plan.index`` on samples of p_{k−1} (``cached``) under
    the step control, freezes it, pushes every set through it, appends its
    :class:`BlockRecord` to ``stage``, writes a checkpoint and returns the
    samples of p_k."""
    k, config = plan.index, trainer.config
    block = trainer.flow.blocks[k]
    judged = stage.kind in GROWING and plan.start == "new" and bool(stage.blocks) and config.gain_eps > 0
    trained = _train_with_step_control(trainer, block, plan, cached, judged)
    steps, moved = trained.plan.train_steps or config.train_steps, trained.moved
    record = block_record(
        trainer,
        k,
        plan.h,
        cached,
        moved,
        trained.progress,
        trained.change,
        trained.error,
        steps,
        plan.start,
        trained.round_trip,
    )
    record.put_back = trained.put_back
    stage.blocks.append(record)
    if stage.kind in GROWING:  # each prefix of a growing stage is a candidate
        consider(trainer, stage, record)
    trainer.block = None
    trainer.save()
    if trainer.progress:
        tqdm.write(
            f"[{stage.name}] block {k + 1}: h={_shown(plan.h)}  W={record.movement:.4f}  "
            f"Ter={record.ter:.4f}  val NLL={record.val_nll:.4f} "
            f"at {record.eval_steps} steps ({record.step_doubling_change:+.4f} at "
            f"{2 * record.eval_steps}, trained at {steps})  "
            f"({record.seconds:.1f} s)"
            + ("  put back: no better than before the stage" if trained.put_back else "")
        )
    stop_if_interrupted(trainer)
    return moved
