"""Stages of the JKO scheme as plans (docs/design.md, "The scheduler and its stages").

A stage kind is a pure function ``plan(history, stage, context) -> Plan``: from
the records so far (the run's :class:`~jkoflow.records.JKOHistory`, the open
:class:`~jkoflow.records.StageRecord`) and the config it gives the blocks the
stage still has to train, as :class:`BlockPlan` entries (index, h, Adam
steps, how the block starts), or none and why it stopped. The trainer calls
it again after every block, so a resumed stage continues where it stood.
:data:`STAGES` maps each kind to its plan, the way torchdiffeq maps solver
names to solvers: adding a stage kind means adding one function.

- ``initial`` / ``extend``: one new block at a time, h_k = min(h0·ρ^k, h_max),
  until Ter(k) < ε, a budget is spent, or the flow holds ``max_blocks`` blocks.
- ``reparam``: every block of the previous stage retrained from its weights
  with h_k ← clip(h_k + η(h*_k − h_k), h_min, h_max), h* given by a rule of
  :data:`REPARAM_RULES` (:func:`reparametrize`).
- ``refine``: every block of the previous stage cut into c time slices
  (``blocks.time_slices``), each trained in order at h_k/c.
- ``free``: one new block after all the others, trained without the W2 term
  (``h=None``, h → ∞): JKO-iFlow's final *free block*, which minimises the KL
  left after the scheme on its own.
- ``finetune``: every block the run trained, trained together on the NLL of
  the whole flow (one unit, ``start="joint"``; :mod:`jkoflow.finetune`).

Reference: Xu, Cheng, Xie, JKO-iFlow, https://arxiv.org/abs/2212.14424
(reparametrisation and refinement, its section 3).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .records import BlockRecord, JKOHistory, StageRecord

if TYPE_CHECKING:
    from .config import JKOConfig

__all__ = [
    "REPARAM_RULES",
    "STAGES",
    "BlockPlan",
    "Plan",
    "PlanContext",
    "Slice",
    "reparametrize",
]


@dataclass(frozen=True)
class Slice:
    """A block that starts as time slice ``piece`` of ``count`` of parent ``parent``.

    Example:
        >>> from jkoflow.records import BlockRecord, JKOHistory, StageRecord
        >>> from jkoflow.stages import STAGES, PlanContext, Slice
        >>> parent = BlockRecord(0, 2.0, 1.0, 0.1, 2.5, 5, 0.5, 3.0, 2.6, 0)
        >>> history = JKOHistory({}, [StageRecord("initial", "initial", [parent], complete=True),
        ...                           StageRecord("refine 1", "refine", factor=2)])
        >>> context = PlanContext(jkoflow.JKOConfig().resolved(dim=2), first=0)
        >>> plan = STAGES["refine"](history, history.stages[1], context)
        >>> [b.start for b in plan.blocks]  # block 0 cut into two halves
        [Slice(parent=0, count=2, piece=0), Slice(parent=0, count=2, piece=1)]
    """

    parent: int
    count: int
    piece: int


@dataclass(frozen=True)
class BlockPlan:
    """One block a stage trains next.

    Attributes:
        index: Its index k in the flow.
        h: Its step size; None to train it without the W2 term.
        iters: Adam steps.
        start: ``"new"`` (a freshly initialised block k), ``"keep"`` (the
            flow's block k, from its weights), a :class:`Slice`, or
            ``"joint"`` (blocks k, k+1, … to the flow's last, from their
            weights, trained together).
        train_steps: RK4 steps in training (None: the config's).

    Example:
        >>> from jkoflow.records import BlockRecord, JKOHistory, StageRecord
        >>> from jkoflow.stages import STAGES, PlanContext
        >>> config = jkoflow.JKOConfig(stage_iters=7, reparam_eta=1.0)
        >>> done = [BlockRecord(k, 1.0, s, 0.1, 2.5, 5, 0.5, 3.0, 2.6, 0) for k, s in enumerate([1.0, 3.0])]
        >>> history = JKOHistory({}, [StageRecord("initial", "initial", done, complete=True),
        ...                           StageRecord("reparam 1", "reparam")])
        >>> for block in STAGES["reparam"](history, history.stages[1], PlanContext(config, first=0)).blocks:
        ...     print(block)  # h*_k = h_k·S̄/S_k: the block that moved less gets the larger step
        BlockPlan(index=0, h=2.0, iters=7, start='keep', train_steps=None)
        BlockPlan(index=1, h=0.6666666666666666, iters=7, start='keep', train_steps=None)

    References:
        | Normalizing flow neural networks by JKO scheme (Xu et al., 2023)
        | https://arxiv.org/abs/2212.14424
    """

    index: int
    h: float | None
    iters: int
    start: str | Slice = "new"
    train_steps: int | None = None


@dataclass(frozen=True)
class Plan:
    """The blocks a stage still trains, or none and ``stopped_by``; ``complete``
    when they are all of the stage's remaining blocks (not one at a time).

    Example:
        >>> from jkoflow.records import BlockRecord, JKOHistory, StageRecord
        >>> from jkoflow.stages import STAGES, PlanContext
        >>> config = jkoflow.JKOConfig(h0=1.0, rho=2.0, iters=5, ter_eps=0.01)
        >>> history = JKOHistory({}, [StageRecord("initial", "initial")])
        >>> stage, context = history.stages[0], PlanContext(config, first=0)
        >>> plan = STAGES["initial"](history, stage, context)  # one new block at a time
        >>> plan.blocks, plan.stopped_by
        ([BlockPlan(index=0, h=1.0, iters=5, start='new', train_steps=None)], '')
        >>> stage.blocks.append(BlockRecord(0, 1.0, 0.9, 0.5, 2.5, 5, 0.5, 3.0, 2.6, 0))
        >>> STAGES["initial"](history, stage, context).blocks  # h_1 = h0·ρ
        [BlockPlan(index=1, h=2.0, iters=5, start='new', train_steps=None)]
        >>> stage.blocks.append(BlockRecord(1, 2.0, 0.1, 0.001, 2.4, 5, 0.5, 2.6, 2.5, 0))
        >>> STAGES["initial"](history, stage, context).blocks  # Ter(1) < ε, but it gained 0.1 nats
        [BlockPlan(index=2, h=4.0, iters=5, start='new', train_steps=None)]
        >>> stage.blocks.append(BlockRecord(2, 4.0, 0.1, 0.001, 2.398, 5, 0.5, 2.4, 2.4, 0))
        >>> STAGES["initial"](history, stage, context).stopped_by  # Ter(2) < ε and a gain < gain_eps
        'ter'
    """

    blocks: list[BlockPlan] = field(default_factory=list)
    stopped_by: str = ""
    complete: bool = False


@dataclass(frozen=True)
class PlanContext:
    """What a plan may read besides the records: the config, the index of the
    first block this run trains, whether the budget is spent, and the rows of
    the training set and processes sharing its batches (for
    :meth:`stage_steps`; 0 rows: no bound).

    Example:
        >>> from jkoflow.records import BlockRecord, JKOHistory, StageRecord
        >>> from jkoflow.stages import STAGES, PlanContext
        >>> config = jkoflow.JKOConfig(h0=1.0, rho=2.0, iters=5)
        >>> record = BlockRecord(3, 1.0, 0.9, 0.5, 2.5, 5, 0.5, 3.0, 2.6, 0)
        >>> history = JKOHistory({}, [StageRecord("extend 1", "extend", [record])])
        >>> stage, plan = history.stages[0], STAGES["extend"]
        >>> plan(history, stage, PlanContext(config, first=3)).blocks[0].index  # this stage trained block 3
        4
        >>> plan(history, stage, PlanContext(config, first=3, out_of_budget=True)).stopped_by
        'budget'
    """

    config: JKOConfig
    first: int
    out_of_budget: bool = False
    rows: int = 0
    processes: int = 1

    def stage_steps(self, iters: int) -> int:
        """``iters`` Adam steps of a stage after the first pass, bounded by
        ``config.stage_epochs`` passes over the training set at the batch
        ``config.batch_for`` gives: min(iters, ceil(stage_epochs · rows /
        batch)); ``iters`` where ``stage_epochs`` is 0 or ``rows`` unknown.

        >>> from jkoflow.stages import PlanContext
        >>> config = jkoflow.JKOConfig(batch_size=0)  # batch min(1024, rows)
        >>> [PlanContext(config, 0, rows=n).stage_steps(3000) for n in (96_000, 1280, 5000, 0)]
        [3000, 125, 489, 3000]
        """
        config = self.config
        if not (config.stage_epochs and self.rows):
            return iters
        return min(
            iters, math.ceil(config.stage_epochs * self.rows / config.batch_for(self.rows, self.processes))
        )


PlanFn = Callable[[JKOHistory, StageRecord, PlanContext], Plan]


def _ratio(h: np.ndarray, s: np.ndarray) -> np.ndarray:
    """h*_k = h_k·S̄/S_k: each block on its own toward the mean movement."""
    return h * s.mean() / s


def _arclength(h: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The blocks as segments of one curve, times t_k = Σ_{j≤k} h_j, arc lengths
    D_k = Σ_{j≤k} S_j; h* cuts the same total time into segments of equal arc
    length, t*_k = D⁻¹(k·D_L/L) by linear interpolation, h*_k = t*_k − t*_{k−1}."""
    times = np.concatenate([[0.0], np.cumsum(h)])
    arc = np.concatenate([[0.0], np.cumsum(s)])
    return np.diff(np.interp(np.linspace(0.0, arc[-1], len(s) + 1), arc, times))


REPARAM_RULES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "ratio": _ratio,
    "arclength": _arclength,
}
"""Reparametrisation rules: ``rule(h, S) -> h*``, arrays of shape (L,)."""


def reparametrize(
    h: list[float], w2: list[float], eta: float, h_min: float, h_max: float, rule: str = "ratio"
) -> list[float]:
    """One step h_k ← clip(h_k + η(h*_k − h_k), h_min, h_max) toward equal
    movements S_k = W_k (``w2``: the movements), h* from ``REPARAM_RULES[rule]``.

    >>> reparametrize([1.0, 1.0], [1.0, 3.0], eta=1.0, h_min=0.1, h_max=10.0)
    [2.0, 0.6666666666666666]
    """
    if rule not in REPARAM_RULES:
        raise ValueError(f"rule must be one of {', '.join(map(repr, REPARAM_RULES))}, got {rule!r}")
    s = np.maximum(np.asarray(w2, dtype=float), 1e-12)
    hs = np.asarray(h, dtype=float)
    target = REPARAM_RULES[rule](hs, s)
    return [float(v) for v in np.clip(hs + eta * (target - hs), h_min, h_max)]


def _previous(history: JKOHistory, stage: StageRecord) -> StageRecord:
    """The stage before ``stage``."""
    return history.stages[history.stages.index(stage) - 1]


def _remaining(
    stage: StageRecord, hs: list[float | None], iters: int, first: int, start: Callable[[int], Any]
) -> Plan:
    """The blocks of an all-planned stage after those it has trained."""
    done = len(stage.blocks)
    return Plan([BlockPlan(first + p, hs[p], iters, start(p)) for p in range(done, len(hs))], complete=True)


def _stalled(records: list[BlockRecord], config: JKOConfig) -> bool:
    """Whether the last block of a growing stage moved less than Ter(k) < ε and,
    with ``gain_eps > 0`` and a block before it in the stage, also lowered the
    validation NLL by less than ``gain_eps`` nats: the scheme has nothing left
    to move *and* nothing left to gain."""
    if not records or records[-1].ter >= config.ter_eps:
        return False
    if not config.gain_eps or len(records) < 2:
        return True
    return records[-2].val_nll - records[-1].val_nll < config.gain_eps


def plan_grow(history: JKOHistory, stage: StageRecord, context: PlanContext) -> Plan:
    """One new block with h_k = min(h0·ρ^k, h_max), unless the last one stalled
    (:func:`_stalled`: Ter(k) < ε and a validation gain under ``gain_eps``),
    the budget is spent or ``max_blocks`` are reached."""
    config, records = context.config, stage.blocks
    if _stalled(records, config):
        return Plan(stopped_by="ter")
    if records and context.out_of_budget:
        return Plan(stopped_by="budget")
    k = context.first + len(records)
    if k >= config.max_blocks:
        return Plan(stopped_by="max_blocks")
    return Plan([BlockPlan(k, config.step_size(k), config.iters, "new")])


def plan_reparam(history: JKOHistory, stage: StageRecord, context: PlanContext) -> Plan:
    """Every block of the previous stage again, from its weights, at the h
    :func:`reparametrize` gives from that stage's h and movements (rule:
    ``stage.rule``, else ``config.reparam_rule``), for the stage's steps
    (:meth:`PlanContext.stage_steps` of ``stage_iters``)."""
    config, last = context.config, _previous(history, stage).blocks
    hs = reparametrize(
        [b.h for b in last],
        [b.movement for b in last],
        config.reparam_eta,
        config.h_min,
        config.h_max,
        stage.rule or config.reparam_rule,
    )
    return _remaining(stage, hs, context.stage_steps(config.retrain_iters), context.first, lambda p: "keep")


def plan_refine(history: JKOHistory, stage: StageRecord, context: PlanContext) -> Plan:
    """Every block of the previous stage cut into c = ``stage.factor`` time
    slices, slice j of block k starting as that slice, at h_k/c, for the
    stage's steps (:meth:`PlanContext.stage_steps` of ``stage_iters``)."""
    count = stage.factor or 2
    hs = [
        None if b.h is None else b.h / count for b in _previous(history, stage).blocks for _ in range(count)
    ]
    iters = context.stage_steps(context.config.retrain_iters)
    return _remaining(stage, hs, iters, context.first, lambda p: Slice(p // count, count, p % count))


def plan_free(history: JKOHistory, stage: StageRecord, context: PlanContext) -> Plan:
    """One new block after the flow's last, with ``h=None`` (no W2 term) and
    ``iters`` Adam steps, unless the budget is spent before it starts."""
    if not stage.blocks and context.out_of_budget:
        return Plan(stopped_by="budget")
    return _remaining(stage, [None], context.config.iters, context.first, lambda p: "new")


def plan_finetune(history: JKOHistory, stage: StageRecord, context: PlanContext) -> Plan:
    """The blocks from ``context.first`` (the first the run trained) to the
    flow's last as one joint unit with ``finetune_iters`` Adam steps (at most
    :meth:`PlanContext.stage_steps`), unless the budget is spent before it
    starts."""
    if not stage.blocks and context.out_of_budget:
        return Plan(stopped_by="budget")
    iters = context.stage_steps(context.config.finetune_iters)
    return _remaining(stage, [None], iters, context.first, lambda p: "joint")


STAGES: dict[str, PlanFn] = {
    "initial": plan_grow,
    "extend": plan_grow,
    "reparam": plan_reparam,
    "refine": plan_refine,
    "free": plan_free,
    "finetune": plan_finetune,
}
"""Stage kinds and their plans."""
