r"""The ``finetune`` stage: the blocks of a run trained together on the NLL
(docs/design.md, "The scheduler and its stages").

The JKO stages train each block on its own, on samples pushed through the
frozen blocks before it. Fine-tuning then trains blocks k₀ … L−1 (every
block this run trained) jointly on the negative log-likelihood of the
whole flow,

.. math::
    J(θ_{k_0}, …, θ_{L−1}) = E_x\big[½‖T(x)‖² − \textstyle\sum_k ℓ_k(x)\big] + \tfrac d2 \log 2π,
    \qquad T = T_{L−1}∘…∘T_{k_0},

with x (n, d) the data pushed through the frozen blocks before k₀ (whose
log-determinant does not depend on θ and is left out), every block at its
own train steps (``train_steps`` times its step factor), by Adam with a
cosine decay from ``finetune_lr`` to ``finetune_lr·lr_final_factor``.
There is no W2 term; what keeps the blocks regular is that the stage starts
from the JKO solution at a small learning rate and that early stopping
(:class:`~jkoflow.loop.Plateau`) keeps the weights of the best *valid*
check of the whole flow's validation NLL, valid meaning every block's
step-doubling change below ``step_tol``; where a check is not, the blocks
over it train on at doubled RK4 steps (:func:`_train_with_step_control`).
The fine-tuned flow is a candidate
like any stage's: the run keeps it only where its validation NLL is lower.

Reference: Onken et al., OT-Flow (https://arxiv.org/abs/2006.00104) train
one flow end to end on this likelihood; Xu, Cheng, Xie, JKO-iFlow
(https://arxiv.org/abs/2212.14424) train block by block, which this stage
follows with a short end-to-end pass.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from blocks import Block

from . import distributed
from .checkpoint import BlockProgress
from .compiling import training_stepper
from .config import VALIDATION_ROWS, JKOConfig
from .loop import Plateau, valid_check
from .objectives import gaussian_log_prob
from .ode import Stepper, integrate, rk4_step
from .placement import Placement
from .records import StageRecord
from .samples import Pushed
from .scheduler import (
    block_record,
    finest_train_steps,
    fits_its_steps,
    hold_steps,
    next_phase,
    push_checked,
    push_rest,
    run_loop,
    stop_if_interrupted,
)
from .stages import BlockPlan

if TYPE_CHECKING:
    from .trainer import JKOTrainer

__all__ = ["MARGIN", "JointNLL", "JointObjective", "fit_joint", "wants_finetune"]


class JointNLL(nn.Module):
    """The NLL of a batch through ``blocks`` in order as one module call, so
    that DistributedDataParallel sees one forward and one backward per step.

    ``forward(x, steps, weight)``: x (n, d), block j at ``steps[j]`` RK4 steps
    (by ``stepper``); returns weight·mean(−log N(T(x); 0, I) − Σ_j ℓ_j(x)), a scalar.

    Example:
        >>> import blocks
        >>> from jkoflow.finetune import JointNLL
        >>> pair = [blocks.make("otflow", dim=2, width=4) for _ in range(2)]
        >>> flow, x = jkoflow.Flow(2, pair, steps=2), torch.randn(8, 2)
        >>> bool(torch.isclose(JointNLL(pair)(x, [2, 2], 1.0), -flow.log_prob(x).mean()))
        True
    """

    def __init__(self, blocks: list[Block], stepper: Stepper = rk4_step) -> None:
        super().__init__()
        self.blocks, self.stepper = nn.ModuleList(blocks), stepper

    def forward(self, x: Tensor, steps: list[int], weight: float) -> Tensor:
        z, logdet = x, x.new_zeros(len(x))
        for block, n in zip(self.blocks, steps, strict=True):
            out = integrate(block, z, n, stepper=self.stepper)
            z, logdet = out.z, logdet + out.logdet
        return -(gaussian_log_prob(z) + logdet).mean() * weight


class JointObjective:
    """The NLL (:class:`JointNLL`) of mini-batches of ``x`` (n, d) drawn by
    ``generator`` through ``blocks`` in order, block j at ``steps[j]`` RK4
    steps, on this process or, in a process group, sharded over the ranks
    (:mod:`jkoflow.distributed`: the result equals one process's).

    Example:
        >>> import blocks
        >>> from jkoflow.finetune import JointObjective
        >>> from jkoflow.placement import resolve_placement
        >>> config = jkoflow.JKOConfig(batch_size=16, finetune_lr=0.01)
        >>> pair = [blocks.make("otflow", dim=2, width=4) for _ in range(2)]
        >>> objective = JointObjective(pair, [2, 2], torch.randn(40, 2), config,
        ...                            torch.Generator().manual_seed(0), resolve_placement(config), iters=10)
        >>> loss, terms = objective.loss()
        >>> bool(loss == terms["loss"]), objective.lr(0, 1.0)  # the cosine starts at finetune_lr
        (True, 0.01)
    """

    def __init__(
        self,
        blocks: list[Block],
        steps: list[int],
        x: Tensor,
        config: JKOConfig,
        generator: torch.Generator,
        placement: Placement,
        iters: int,
        step: Callable[[], int] = lambda: 0,
    ) -> None:
        self.steps, self.x, self.iters, self.step = steps, x, iters, step  # step: mini-batches so far
        self.config, self.generator, self.placement = config, generator, placement
        self.batch = config.batch_for(len(x))
        compilable = all(block.compilable for block in blocks)
        mode = config.compile if compilable else "off"
        stepper = training_stepper(blocks[0], mode, iters, config.max_seconds)  # this stage's steps
        self.nll = JointNLL(blocks, stepper)
        self.parallel = distributed.data_parallel(self.nll, placement.group, placement.device, self.nll)

    def lr(self, it: int, scale: float) -> float:
        """scale·(lr_f + (lr − lr_f)(1 + cos(π·it/iters))/2), lr = ``finetune_lr``,
        lr_f = lr·``lr_final_factor``."""
        lr = self.config.finetune_lr
        final = lr * self.config.lr_final_factor
        return scale * (final + (lr - final) * (1 + math.cos(math.pi * it / self.iters)) / 2)

    def loss(self) -> tuple[Tensor, dict[str, Tensor]]:
        index = torch.randint(len(self.x), (self.batch,), generator=self.generator)
        if self.parallel is None:
            nll = self.nll(self.placement.compute(self.x[index.to(self.x.device)]), self.steps, 1.0)
            return nll, {"loss": nll}
        group = self.placement.group
        start, stop = group.shard(len(index))
        batch = self.placement.compute(self.x[index[start:stop].to(self.x.device)])
        weight = group.size * (stop - start) / len(index)
        with group.step_rng(self.config.seed, self.step(), self.placement.device):  # the ranks' own noise
            local = self.parallel(batch, self.steps, weight)
        return local, {"loss": group.sum(local.detach()) / group.size}


def wants_finetune(config: JKOConfig, last_stage: str | None) -> bool:
    """Whether a finished run resumed with ``config`` whose last stage is of
    kind ``last_stage`` gets a ``finetune`` stage: ``finetune_iters > 0`` and
    the last stage is not already one (nor missing)."""
    return config.finetune_iters > 0 and last_stage not in (None, "finetune")


def _plateau(
    trainer: JKOTrainer,
    tuned: nn.Module,
    plan: BlockPlan,
    progress: BlockProgress,
    val: Pushed,
    failed: set[int],
) -> list[Plateau]:
    """Early stopping on the whole flow's validation NLL (first
    :data:`~jkoflow.config.VALIDATION_ROWS` rows); a check is valid when every
    fine-tuned block's step-doubling change is below ``step_tol``. Each check
    leaves in ``failed`` the blocks whose change was not."""
    config = trainer.config
    if not config.val_every:
        return []
    rows = val.head(min(len(val.x), VALIDATION_ROWS))

    def val_nll() -> tuple[float, float, bool]:
        pushed = rows
        failed.clear()
        with torch.no_grad():
            for k in range(plan.index, len(trainer.flow)):
                pushed, ok = push_checked(trainer, k, pushed)
                if not ok:
                    failed.add(k)
        return (*pushed.nll_with_stderr(), not failed)

    return [Plateau(progress, tuned, config.val_every, config.patience, plan.iters, val_nll)]


def _train_with_step_control(
    trainer: JKOTrainer, objective: JointObjective, plan: BlockPlan, cached: dict[str, Pushed]
) -> BlockProgress:
    """Trains the blocks of ``objective`` jointly on ``plan``; while an
    early-stopping check finds blocks fitting their RK4 discretisation (the
    phase then stops there and puts back the weights of the best converged
    check) and ``step_doublings`` allow (train steps up to
    ``train_steps·2^step_doublings``), doubles those blocks' train and eval
    steps and trains on for a quarter of ``plan.iters`` more steps (the cosine
    stretched to the new total), as the block step control
    (:func:`jkoflow.scheduler.fit_block`) does. Joint steps at a learning rate
    that sharpens the map outrun a coarse RK4 map first; at finer steps they
    go on lowering the NLL of the model instead of stopping."""
    flow, first, failed = trainer.flow, plan.index, set()
    cap = finest_train_steps(trainer.config)

    def plateau(progress: BlockProgress) -> list[Plateau]:
        return _plateau(trainer, objective.nll, plan, progress, cached["val"], failed)

    while True:
        progress = run_loop(trainer, objective.nll, objective, plan, plateau, "fine-tuning")
        diverted = bool(progress.checks) and not valid_check(progress.checks[-1])
        grow = sorted(k for k in failed if objective.steps[k - first] < cap)
        if not diverted or not grow or trainer.budget.done():
            return progress
        for k in grow:
            flow.set_steps_factor(k, 2 * flow.steps_factors[k])
            objective.steps[k - first] *= 2
        plan = next_phase(plan, progress)
        objective.iters = plan.iters


def _push_converged(
    trainer: JKOTrainer, k: int, cached: dict[str, Pushed]
) -> tuple[dict[str, Pushed], float, float, float]:
    """Every set pushed through the fine-tuned block ``k`` at the steps
    :func:`~jkoflow.scheduler.hold_steps` gives it: its step factor doubled
    (its evaluation, not its training) while it does not fit its RK4 steps
    or the flow's round trip up to it is too large, at most ``step_doublings``
    times, so the NLL is the model's and the flow inverts. Returns (the
    samples of p_k, the step-doubling change, the inversion error, the round
    trip)."""
    measured, trip = hold_steps(trainer, k, cached, fits_its_steps(trainer, k, cached))
    return push_rest(trainer, k, cached, measured.val), measured.change, measured.error, trip


MARGIN = 4
"""A block enters fine-tuning at doubled steps when its step-doubling change is
at least ``step_tol / MARGIN``: joint steps on the NLL would soon push it over."""


def _refine_near_tolerance(trainer: JKOTrainer, first: int) -> None:
    """Doubles the step factor (train and eval steps) of every block from
    ``first`` on whose recorded step-doubling change is at least
    ``step_tol / MARGIN``. A block close to the tolerance is the first the
    joint NLL steps would drive to fit its RK4 map (on checkerboard, blocks at
    6.5e-4 and 7.6e-4 crossed 1e-3 within 100–200 joint steps); at twice the
    steps its error is about 16 times smaller."""
    flow, tol = trainer.flow, trainer.config.step_tol / MARGIN
    for record in trainer.history.flow_blocks(len(flow)):
        if record.index >= first and abs(record.step_doubling_change or 0.0) >= tol:
            flow.set_steps_factor(record.index, 2 * flow.steps_factors[record.index])


def fit_joint(
    trainer: JKOTrainer, stage: StageRecord, plan: BlockPlan, cached: dict[str, Pushed]
) -> dict[str, Pushed]:
    """Trains blocks ``plan.index`` … L−1 of the flow jointly on the NLL for
    ``plan.iters`` Adam steps, more where the step control
    (:func:`_train_with_step_control`) doubles blocks' RK4 steps (samples
    ``cached``: the data pushed through
    the frozen blocks before them), freezes them, pushes every set through
    them, appends a record per block to ``stage`` (the stage's steps and
    seconds on the last one), writes a checkpoint and returns the samples
    of the whole flow."""
    flow, config, first = trainer.flow, trainer.config, plan.index
    if trainer.block is None or trainer.block.index != first:  # not resumed: its factors are in the flow
        _refine_near_tolerance(trainer, first)
    elif trainer.block.iters:  # resumed in a phase the step control extended
        plan = dataclasses.replace(plan, iters=trainer.block.iters)
    blocks = list(flow.blocks[first:])
    steps = [config.train_steps * f for f in flow.steps_factors[first:]]
    for block in blocks:  # before DistributedDataParallel, which needs trainable parameters
        block.requires_grad_(True)
    objective = JointObjective(
        blocks,
        steps,
        cached["train"].x,
        config,
        trainer.generator,
        trainer.placement,
        plan.iters,
        lambda: trainer.budget.batches,
    )
    tuned = objective.nll  # the blocks, as one module
    progress = _train_with_step_control(trainer, objective, plan, cached)
    tuned.requires_grad_(False)
    tick, pushes, measures = time.perf_counter(), [cached], []
    for k in range(first, len(flow)):
        moved, *measured = _push_converged(trainer, k, pushes[-1])
        pushes.append(moved)
        measures.append(measured)
    progress.seconds += time.perf_counter() - tick
    for j, (change, error, trip) in enumerate(measures):
        spent = progress if j == len(measures) - 1 else None  # the stage's steps, on its last record
        record = block_record(
            trainer,
            first + j,
            None,
            pushes[j],
            pushes[j + 1],
            spent,
            change,
            error,
            objective.steps[j],
            round_trip=trip,
        )
        stage.blocks.append(record)
    trainer.block = None
    trainer.save()
    if trainer.progress:
        tqdm.write(
            f"[{stage.name}] blocks {first + 1}–{len(flow)}: val NLL={record.val_nll:.4f} "
            f"after {progress.iter} joint steps ({progress.seconds:.1f} s)"
        )
    stop_if_interrupted(trainer)
    return pushes[-1]
