"""Typed records of a JKO run: one per trained block, one per stage, and the
run's history (docs/design.md, "The scheduler and its stages").

A block's *movement* is W_k = sqrt(E‖T_k(x) − x‖²) over the validation samples
of p_{k−1}: the root-mean-square displacement of block k, an upper bound on
the exact Wasserstein-2 distance W2(p_{k−1}, p_k) that :mod:`jkoflow.metrics`
computes. Files written before this module called it ``w2``; the readers
(:meth:`BlockRecord.from_dict`) still accept that key.

Records read like the dicts they replaced (``record["h"] == record.h``), so
scripts written against the dict records keep working.

Reference: Xu, Cheng, Xie, "Normalizing flow neural networks by JKO scheme"
(JKO-iFlow), NeurIPS 2023, https://arxiv.org/abs/2212.14424.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["GAUSSIAN", "BlockRecord", "JKOHistory", "Selection", "StageRecord", "movement_spread"]


class _Readable:
    """``record[name]`` and ``record.get(name)`` for the dataclass fields."""

    def __getitem__(self, name: str) -> Any:
        if name not in self.__dataclass_fields__:  # type: ignore[attr-defined]
            raise KeyError(name)
        return getattr(self, name)

    def __contains__(self, name: str) -> bool:
        return name in self.__dataclass_fields__ and getattr(self, name) is not None  # type: ignore[attr-defined]

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name) if name in self else default


def _compact(record: Any, optional: tuple[str, ...]) -> dict[str, Any]:
    """The record's fields as a dict, without the ``optional`` ones left at None."""
    fields = (f.name for f in dataclasses.fields(record))
    return {
        name: getattr(record, name)
        for name in fields
        if name not in optional or getattr(record, name) is not None
    }


def movement_spread(movements: list[float]) -> float:
    """max_k |S_k − S̄| / S̄ for the per-block movements S_k = W_k.

    >>> movement_spread([1.0, 2.0, 3.0])
    0.5
    """
    s = np.asarray(movements, dtype=float)
    return float(np.abs(s - s.mean()).max() / s.mean())


@dataclass
class BlockRecord(_Readable):
    """One trained block, measured on the pushed validation (and test) sets.

    Attributes:
        index: The block's index k in the flow (0-based).
        h: Its step size h_k; None for a block trained without the W2 term.
        movement: W_k = sqrt(E‖T_k(x) − x‖²) on the validation samples.
        ter: Ter(k) = E‖T_k(x) − x‖² / E‖T_k(x)‖².
        val_nll: Validation NLL (nats) of the flow up to and including block k.
        n_batches: Adam steps spent on the block in this stage.
        seconds: Seconds spent on it (optimisation and pushes).
        loss_first, loss_last: The first and last training loss (None: no step).
        retries: Rollbacks after non-finite losses or gradients.
        step_doubling_change: Validation NLL with the block at 2·eval_steps
            RK4 steps minus that at eval_steps (its integration error).
        inversion_error: E‖x − T_k⁻¹(T_k(x))‖ / sqrt(E‖x‖²/d) on the same
            validation rows: the block's round-trip error relative to the
            per-coordinate scale of its input.
        round_trip_error: E‖x − T⁻¹(T(x))‖ / sqrt(E‖x − μ‖²/d) for T the
            flow's first k + 1 blocks and x the data (μ the training mean),
            estimated from the validation rows and the training rows
            farthest out (:meth:`jkoflow.samples.Samples.round_trip_error`):
            the round trip of the flow up to this block, relative to the
            data's scale; None in records written before it was measured.
        train_steps: RK4 steps per block its last training phase used.
        step_doublings: How often the step control doubled them (0: never acted).
        eval_steps: RK4 steps the flow integrates the block with (its base
            steps times the block's step factor, which each doubling doubles);
            None in records written before blocks had their own eval steps.
        test_nll: Test NLL, when a test set was given.
        parent, slice: For a time slice of a refinement stage, the index of
            the block it was cut from (among the trained ones) and which slice.
        put_back: For a block the stage retrained from its weights: True when
            the retrained block ended no better than the block before the
            stage (validation NLL of the flow with it, or not converged in
            its RK4 steps), so its weights and RK4 steps from before the
            stage were put back.

    Example:
        >>> from jkoflow.records import BlockRecord
        >>> record = BlockRecord(index=0, h=1.0, movement=0.8, ter=0.05, val_nll=2.9, n_batches=5,
        ...                      seconds=0.1, loss_first=3.2, loss_last=2.95, retries=0)
        >>> record["h"], record.get("test_nll"), "test_nll" in record
        (1.0, None, False)
        >>> old = {**record.to_dict(), "w2": 0.8}
        >>> del old["movement"]  # a record written before the movement was called so
        >>> BlockRecord.from_dict(old) == record
        True

    References:
        | Normalizing flow neural networks by JKO scheme (Xu et al., 2023)
        | https://arxiv.org/abs/2212.14424
    """

    index: int
    h: float | None
    movement: float
    ter: float
    val_nll: float
    n_batches: int
    seconds: float
    loss_first: float | None
    loss_last: float | None
    retries: int
    step_doubling_change: float = 0.0
    test_nll: float | None = None
    parent: int | None = None
    slice: int | None = None
    inversion_error: float | None = None
    round_trip_error: float | None = None
    train_steps: int | None = None
    step_doublings: int = 0
    eval_steps: int | None = None
    put_back: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (the optional fields only when set)."""
        return _compact(
            self,
            (
                "test_nll",
                "parent",
                "slice",
                "inversion_error",
                "round_trip_error",
                "train_steps",
                "eval_steps",
            ),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BlockRecord:
        """Reads :meth:`to_dict` output, and old records that call the movement ``w2``."""
        data = dict(data)
        if "movement" not in data and "w2" in data:
            data["movement"] = data.pop("w2")
        return cls(**data)


@dataclass
class StageRecord(_Readable):
    """One stage of the scheme (:mod:`jkoflow.stages`).

    Attributes:
        name: Unique name, ``"initial"``, ``"reparam 1"``, ``"refine 2"``, ``"extend 1"``, ….
        kind: The stage kind, a key of :data:`jkoflow.stages.STAGES`.
        blocks: The records of the blocks this stage trained, in order.
        complete: Whether the stage has ended.
        h_plan: The planned h per block (stages that plan all their blocks up front).
        factor: The slice count c of a refinement stage.
        rule: The reparametrisation rule, when not the config's.
        spread: max_k |W_k − W̄|/W̄ over ``blocks``.
        val_nll, test_nll: The NLL after the stage's last block.
        n_batches, seconds: Spent by the stage.

    Example:
        >>> from jkoflow.records import BlockRecord, StageRecord
        >>> def block(k, movement):
        ...     return BlockRecord(k, 1.0, movement, 0.1, 3.0 - k, 5, 0.5, 3.5, 3.0, 0)
        >>> stage = StageRecord("initial", "initial", [block(0, 1.0), block(1, 2.0), block(2, 3.0)])
        >>> stage.close()
        >>> stage.complete, stage.spread, stage.n_batches, stage.seconds, stage.val_nll
        (True, 0.5, 15, 1.5, 1.0)
        >>> StageRecord.from_dict(stage.to_dict()) == stage
        True
    """

    name: str
    kind: str
    blocks: list[BlockRecord] = field(default_factory=list)
    complete: bool = False
    h_plan: list[float | None] | None = None
    factor: int | None = None
    rule: str | None = None
    spread: float | None = None
    val_nll: float | None = None
    test_nll: float | None = None
    n_batches: int = 0
    seconds: float = 0.0

    def close(self) -> None:
        """Fills in the totals from the block records and marks the stage complete."""
        records = self.blocks
        self.spread = movement_spread([b.movement for b in records]) if records else 0.0
        self.n_batches = sum(b.n_batches for b in records)
        self.seconds = sum(b.seconds for b in records)
        if records:
            self.val_nll, self.test_nll = records[-1].val_nll, records[-1].test_nll
        self.complete = True

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (the optional fields only when set)."""
        optional = ("h_plan", "factor", "rule", "spread", "val_nll", "test_nll")
        return {**_compact(self, optional), "blocks": [b.to_dict() for b in self.blocks]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageRecord:
        fields = {f.name for f in dataclasses.fields(cls)}
        known = {key: value for key, value in data.items() if key in fields}
        known["blocks"] = [BlockRecord.from_dict(b) for b in data.get("blocks", [])]
        return cls(**known)


GAUSSIAN = "gaussian"
"""The stage name of the Gaussian-fit candidate (:class:`Selection`)."""

GROWING = ("initial", "extend")
"""Stage kinds that add blocks one at a time: each prefix of their flow is a candidate."""


@dataclass(frozen=True)
class Selection(_Readable):
    """The candidate flow a run returns: the best one by validation NLL.

    Candidates are the Gaussian fit of the training set (stage
    :data:`GAUSSIAN`, no blocks: the floor of a run), the flow after every
    block of a growing stage (``initial``, ``extend``: the first ``n_blocks``
    blocks) and the whole flow at the end of every other stage; a later
    candidate replaces the kept one only when its validation NLL is strictly
    lower, so more budget never returns a worse flow (by validation NLL).

    Attributes:
        stage: Name of the stage it came from.
        n_blocks: Its number of blocks.
        val_nll, test_nll: Its validation and test NLL (test: None without a test set).

    Example:
        >>> Selection("initial", 2, 3.6, 3.61).to_dict()
        {'stage': 'initial', 'n_blocks': 2, 'val_nll': 3.6, 'test_nll': 3.61}
    """

    stage: str
    n_blocks: int
    val_nll: float
    test_nll: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Selection:
        return cls(**data)


@dataclass
class JKOHistory:
    """What a JKO run did, JSON-able via :meth:`to_dict`.

    Attributes:
        config: The :class:`~jkoflow.JKOConfig` as a dict.
        stages: One :class:`StageRecord` per stage, in order.
        iterations: One dict per optimisation step: ``stage``, ``block``,
            ``iter``, ``loss``, ``kl``, ``transport``, ``lr``, ``seconds``.
        stopped_by: How the last growing stage ended: ``"ter"``,
            ``"max_blocks"`` or ``"budget"``.
        faults: One dict per non-finite loss or gradient: ``stage``, ``block``,
            ``iter``, ``fault``, ``resumed_at``, ``lr_scale``.
        selected: The best candidate so far by validation NLL (:class:`Selection`).
        gaussian: The Gaussian fit of the training set as a candidate (stage
            :data:`GAUSSIAN`, its validation and test NLL), kept after a trained
            flow replaces it: the floor a run's flow is measured against; None
            for a run that does not start from it (a given input flow, an
            undefined fit, or a run saved before it was recorded).

    Example:
        >>> import json
        >>> from jkoflow.records import BlockRecord, JKOHistory, StageRecord
        >>> first = BlockRecord(0, 1.0, 0.9, 0.2, 2.8, 5, 0.5, 3.5, 3.0, 0)
        >>> history = JKOHistory({"h0": 1.0}, [StageRecord("initial", "initial", [first], complete=True),
        ...                                     StageRecord("refine 1", "refine", factor=2)])
        >>> history.count("refine"), history.count("refine", complete=True), history.open_stage().name
        (1, 0, 'refine 1')
        >>> [b.index for b in history.blocks], history.n_batches  # the open stage has no blocks yet
        ([], 0)
        >>> JKOHistory.from_dict(json.loads(json.dumps(history.to_dict()))) == history
        True
    """

    config: dict[str, Any]
    stages: list[StageRecord] = field(default_factory=list)
    iterations: list[dict[str, Any]] = field(default_factory=list)
    stopped_by: str = ""
    faults: list[dict[str, Any]] = field(default_factory=list)
    selected: Selection | None = None
    gaussian: Selection | None = None

    @property
    def blocks(self) -> list[BlockRecord]:
        """Per-block records of the final flow (the last stage)."""
        return self.stages[-1].blocks if self.stages else []

    @property
    def n_batches(self) -> int:
        return sum(s.n_batches for s in self.stages)

    @property
    def train_seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    def count(self, kind: str, complete: bool = False) -> int:
        """How many stages of ``kind`` there are (only complete ones if ``complete``)."""
        return sum(s.kind == kind and (s.complete or not complete) for s in self.stages)

    def open_stage(self, kind: str | None = None) -> StageRecord | None:
        """The last stage if it is not complete (and of ``kind``, when given)."""
        last = self.stages[-1] if self.stages else None
        if last is None or last.complete or (kind is not None and last.kind != kind):
            return None
        return last

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "stages": [s.to_dict() for s in self.stages],
            "iterations": self.iterations,
            "stopped_by": self.stopped_by,
            "faults": self.faults,
            "selected": self.selected.to_dict() if self.selected else None,
            "gaussian": self.gaussian.to_dict() if self.gaussian else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JKOHistory:
        """Reads :meth:`to_dict` output, and history files written with ``w2`` records."""
        return cls(
            data["config"],
            [StageRecord.from_dict(s) for s in data["stages"]],
            data["iterations"],
            data.get("stopped_by", ""),
            data.get("faults", []),
            Selection.from_dict(data["selected"]) if data.get("selected") else None,
            Selection.from_dict(data["gaussian"]) if data.get("gaussian") else None,
        )

    def flow_blocks(self, n_blocks: int) -> list[BlockRecord]:
        """The latest records of the current flow's first ``n_blocks`` blocks."""
        return _blocks_of(self.stages, n_blocks) if self.stages else []

    def selected_blocks(self) -> list[BlockRecord]:
        """Per-block records of the selected flow (of the final one without a
        selection): the selected stage's blocks before ``n_blocks``, after the
        records of the stage before for blocks that stage did not train."""
        if self.selected is None:
            return self.blocks
        if self.selected.stage == GAUSSIAN:
            return []
        at = [s.name for s in self.stages].index(self.selected.stage)
        return _blocks_of(self.stages[: at + 1], self.selected.n_blocks)


def _blocks_of(stages: list[StageRecord], n_blocks: int) -> list[BlockRecord]:
    """Records of blocks 0 … ``n_blocks``−1 of the flow at the end of ``stages[-1]``."""
    records = [b for b in stages[-1].blocks if b.index < n_blocks]
    lowest = min((b.index for b in records), default=n_blocks)
    if lowest > 0 and len(stages) > 1:
        records = _blocks_of(stages[:-1], lowest) + records
    return records
