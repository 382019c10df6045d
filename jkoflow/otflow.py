"""The monolithic OT-Flow baseline (docs/design.md, "The OT-Flow baseline").

One block over t ∈ [0, 1], trained jointly with

    J = α_C·E[½‖z(1)‖² − ℓ(1) + (d/2) log 2π] + E[L(1)] + α_R·E[R(1)]

on fresh mini-batches of the training set. It shares the block, the integrator,
the objectives module and :class:`~jkoflow.Flow` with the JKO trainer; only the
objective and the loop differ. Adam with a plateau-based learning-rate drop on
the validation NLL; the best-validation weights (a copy, not a view of the live
parameters) are the result.

Reference: Onken et al., "OT-Flow: Fast and Accurate Continuous Normalizing
Flows via Optimal Transport", AAAI 2021.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np
import torch
from torch import Tensor

import blocks

from .checkpoint import BlockProgress, TrainerState, data_fingerprint, load_state, save_state
from .compiling import stepper_at, training_stepper
from .config import TrainingConfig, check_positive, config_from_dict, resume_config
from .errors import InputError, TrainingError
from .flow import Flow, as_data_tensor
from .loop import (
    FAULTS,
    Bar,
    Budget,
    Checkpoints,
    Hook,
    Interrupt,
    Records,
    Rollback,
    Step,
    optimize,
    snapshot_parts,
)
from .metrics import nll as flow_nll
from .objectives import otflow_loss
from .placement import Placement, resolve_placement
from .trainer import _stop_on_interrupt

__all__ = ["OTFLOW_PRESETS", "OTFlowConfig", "OTFlowHistory", "train_otflow"]

#: Published toy settings (OT-Flow paper / repository) applied by the command
#: line when the data name matches; other data use the OTFlowConfig defaults.
OTFLOW_PRESETS: dict[str, dict[str, Any]] = {
    "checkerboard": {"alpha_c": 15.0, "alpha_r": 2.0, "train_steps": 12, "eval_steps": 16},
    "moons": {"alpha_c": 8.0, "alpha_r": 1.0, "train_steps": 8, "eval_steps": 16},
}


@dataclass(frozen=True)
class OTFlowConfig(TrainingConfig):
    """Settings of the monolithic OT-Flow trainer.

    Shared settings (block, optimisation, integration steps, device) are those
    of :class:`~jkoflow.config.TrainingConfig`. The loss weights are
    ``alpha_c`` (NLL) and ``alpha_r`` (HJB residual, potential blocks only).
    Every ``val_every`` steps the validation NLL is computed at ``eval_steps``
    RK4 steps and the best weights are kept; after ``patience`` checks
    without improvement the lr is multiplied by ``lr_drop`` (at most
    ``max_drops`` times, then training stops).

    Example:
        >>> from jkoflow.otflow import OTFlowConfig
        >>> config = OTFlowConfig(width=16, iters=200, alpha_c=5.0)
        >>> config.train_steps, config.eval_steps, config.alpha_r, config.to_dict()["alpha_c"]
        (8, 16, 1.0, 5.0)
        >>> OTFlowConfig(block="mlp")  # the HJB term needs ∂tΦ
        Traceback (most recent call last):
        jkoflow.errors.InputError: alpha_r > 0 needs a potential block (∂tΦ); 'mlp' is not one

    References:
        | OT-Flow: Fast and Accurate Continuous Normalizing Flows via Optimal Transport (Onken et al., 2021)
        | https://arxiv.org/abs/2006.00104
    """

    iters: int = 3000
    train_steps: int = 8
    eval_steps: int = 16
    alpha_c: float = 10.0
    alpha_r: float = 1.0
    lr_drop: float = 0.5
    patience: int = 4
    max_drops: int = 4
    val_every: int = 50

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, ("alpha_c",), float)
        check_positive(self, ("patience", "val_every"), int)
        if not (isinstance(self.alpha_r, (int, float)) and self.alpha_r >= 0):
            raise InputError(f"alpha_r must be a non-negative number, got {self.alpha_r!r}")
        if not 0 < self.lr_drop < 1:
            raise InputError(f"lr_drop must be in (0, 1), got {self.lr_drop!r}")
        if isinstance(self.max_drops, bool) or not isinstance(self.max_drops, int) or self.max_drops < 0:
            raise InputError(f"max_drops must be a non-negative integer, got {self.max_drops!r}")
        if self.alpha_r > 0 and not issubclass(blocks.get(self.block), blocks.PotentialBlock):
            raise InputError(f"alpha_r > 0 needs a potential block (∂tΦ); {self.block!r} is not one")


@dataclass
class OTFlowHistory:
    """What :func:`train_otflow` did, JSON-able via :meth:`to_dict`.

    Attributes:
        config: The :class:`OTFlowConfig` as a dict.
        iterations: One record per step: ``iter``, ``loss``, ``nll``,
            ``transport``, ``hjb``, ``lr``, ``seconds``.
        validations: One record per check: ``iter``, ``n_batches``,
            ``seconds`` (training time so far), ``val_nll``, ``lr``.
        best: The validation record whose weights were kept.
        stopped_by: ``"iters"``, ``"max_seconds"`` or ``"lr_drops"``.

    Example:
        >>> import json
        >>> from jkoflow.otflow import OTFlowHistory
        >>> history = OTFlowHistory({"iters": 2}, stopped_by="iters")
        >>> history.iterations.append({"iter": 0, "loss": 3.0, "seconds": 0.25})
        >>> history.iterations.append({"iter": 1, "loss": 2.5, "seconds": 0.5})
        >>> history.n_batches, history.train_seconds
        (2, 0.5)
        >>> json.loads(json.dumps(history.to_dict()))["stopped_by"]
        'iters'
    """

    config: dict[str, Any]
    iterations: list[dict[str, Any]] = field(default_factory=list)
    validations: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    stopped_by: str = ""

    @property
    def n_batches(self) -> int:
        return len(self.iterations)

    @property
    def train_seconds(self) -> float:
        return self.iterations[-1]["seconds"] if self.iterations else 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Validation(Hook):
    """Every ``val_every`` steps and after the last one: the validation NLL,
    the best weights so far (a copy) and the plateau drops of the lr."""

    def __init__(
        self,
        flow: Flow,
        x_val: Tensor,
        config: OTFlowConfig,
        history: OTFlowHistory,
        budget: Budget,
        callback: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        self.flow, self.x_val, self.config, self.history, self.budget = flow, x_val, config, history, budget
        self.callback, self.shown = callback, None
        self.state: dict[str, Any] = {
            "best_nll": math.inf,
            "best_state": None,
            "stale": 0,
            "drops": 0,
            "lr": config.lr,
            "exhausted": False,
        }

    def done(self) -> bool:
        return self.state["exhausted"]

    def after_step(self, step: Step) -> None:
        config, state, self.shown = self.config, self.state, None
        last = step.it + 1 == config.iters or self.budget.done()
        if not ((step.it + 1) % config.val_every == 0 or last):
            return
        block = self.flow.blocks[0]
        block.eval()
        val_nll = flow_nll(self.flow, self.x_val, config.chunk_size)
        record = {
            "iter": step.it,
            "n_batches": step.it + 1,
            "seconds": self.budget.seconds,
            "val_nll": val_nll,
            "lr": step.lr,
        }
        self.history.validations.append(record)
        if self.callback is not None:
            self.callback(record)
        self.shown = {"val_nll": f"{val_nll:.4f}", "lr": f"{step.lr:.2g}"}
        if val_nll < state["best_nll"]:
            state.update(best_nll=val_nll, stale=0, best_state=copy.deepcopy(block.state_dict()))
            self.history.best = record
        else:
            state["stale"] += 1
            if state["stale"] >= config.patience:
                if state["drops"] == config.max_drops:
                    state["exhausted"] = True
                else:
                    state.update(drops=state["drops"] + 1, stale=0, lr=state["lr"] * config.lr_drop)

    def snapshot(self) -> tuple[dict[str, Any], int, dict[str, Any]]:
        return copy.deepcopy(self.state), len(self.history.validations), self.history.best

    def restore(self, saved: tuple[dict[str, Any], int, dict[str, Any]]) -> None:
        self.state, n, self.history.best = copy.deepcopy(saved[0]), saved[1], saved[2]
        del self.history.validations[n:]


class _OTFlowObjective:
    """J on fresh mini-batches of the (standardised) training set, at the validator's lr."""

    def __init__(
        self,
        block: blocks.Block,
        x: Tensor,
        config: OTFlowConfig,
        generator: torch.Generator,
        validation: _Validation,
        step: Callable[[], int],
    ) -> None:
        self.block, self.x, self.config, self.generator, self.validation = (
            block,
            x,
            config,
            generator,
            validation,
        )
        self.step = step  # mini-batches taken so far
        self.stepper = training_stepper(block, config.compile, config.iters, config.max_seconds)

    def lr(self, it: int, scale: float) -> float:
        return self.validation.state["lr"] * scale

    def loss(self) -> tuple[Tensor, dict[str, Tensor]]:
        config = self.config
        self.block.train()
        batch = config.batch_for(len(self.x))
        index = torch.randint(len(self.x), (batch,), generator=self.generator).to(self.x.device)
        terms = otflow_loss(
            self.block,
            self.x[index],
            config.train_steps,
            config.alpha_c,
            config.alpha_r,
            stepper_at(self.stepper, self.step()),
        )
        return terms.loss, terms._asdict()


def train_otflow(
    x_train: Any,
    x_val: Any,
    config: OTFlowConfig | None = None,
    progress: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
) -> tuple[Flow, OTFlowHistory]:
    """Trains one OT-Flow block over [0, 1] (Onken et al., https://arxiv.org/abs/2006.00104)
    on the shared loop (:func:`jkoflow.loop.optimize`).

    Arguments:
        x_train, x_val: Training and validation data, array-like (n, d).
        config: An :class:`OTFlowConfig` (defaults if omitted; on resume the
            checkpoint's, which ``config`` may change only in budgets and fault handling).
        progress: Show a progress bar.
        callback: Called with every validation record.
        checkpoint: A file for the trainer's state, written every
            ``config.checkpoint_every`` steps, on Ctrl-C and at the end.
        resume: Continue from ``checkpoint`` with the same data, exactly.

    Returns:
        ``(flow, history)``: a one-block :class:`Flow` with the best-validation
        weights (eval steps ``config.eval_steps``) and an :class:`OTFlowHistory`.

    Raises:
        TrainingError: The loss or gradient stayed non-finite after
            ``config.nan_retries`` rollbacks (each scales the lr by ``nan_lr_factor``).
    """
    saved = _load(checkpoint, resume)
    if saved is not None:
        config = resume_config(
            config_from_dict(OTFlowConfig, saved.config),
            config or config_from_dict(OTFlowConfig, saved.config),
        )
    config = config or OTFlowConfig()
    place = resolve_placement(config)
    x_train = torch.as_tensor(x_train)
    dim = x_train.shape[1] if x_train.dim() == 2 else -1
    x_train = as_data_tensor(x_train, dim, place.like, "training data")
    x_val = as_data_tensor(x_val, dim, place.like, "validation data")
    config.batch_for(len(x_train))
    run = _OTFlowRun(x_train, x_val, config, place, saved.flow if saved else None, checkpoint, callback)
    if saved is not None:
        run.restore(saved)
    if not run.finished:
        with _stop_on_interrupt(run.interrupt, enabled=checkpoint is not None):
            run.train(progress)
    return run.flow, run.history


def _load(checkpoint: str | os.PathLike | None, resume: bool) -> TrainerState | None:
    if not resume:
        return None
    if checkpoint is None:
        raise InputError("resume needs the checkpoint file to continue from")
    return load_state(checkpoint, trainer="otflow")


class _OTFlowRun:
    """One OT-Flow run: its block, optimiser, generator, history and the loop's pieces."""

    def __init__(
        self,
        x_train: Tensor,
        x_val: Tensor,
        config: OTFlowConfig,
        place: Placement,
        flow: Flow | None,
        checkpoint: str | os.PathLike | None,
        callback: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        if flow is None:
            flow = Flow.for_data(x_train, config.eval_steps, config.standardize)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                block = config.make_block(x_train.shape[1])
            flow.append(block.to(place.like))
        self.flow = flow.to(place.like)
        self.block = self.flow.blocks[0].requires_grad_(True)
        self.data = {"train": data_fingerprint(x_train), "val": data_fingerprint(x_val)}
        self.x_train = self.flow.standardize(x_train)[0]
        self.config, self.checkpoint, self.place = config, checkpoint, place
        self.history = OTFlowHistory(config.to_dict())
        self.generator = torch.Generator().manual_seed(config.seed)
        self.optimizer = torch.optim.Adam(self.block.parameters(), lr=config.lr)
        self.progress = BlockProgress(0)
        self.budget = Budget(0, config.max_seconds)
        self.interrupt = Interrupt(place.group)
        self.validation = _Validation(self.flow, x_val, config, self.history, self.budget, callback)
        self.finished = False

    def _rollback(self) -> Rollback:
        """Back to the last snapshot after a non-finite step, with a lower lr;
        TrainingError once ``nan_retries`` are spent."""
        progress = self.progress

        def give_up(fault: str, it: int) -> NoReturn:
            self.save()
            raise TrainingError(
                f"OT-Flow: {FAULTS[fault][1]} at step {it} after {progress.retries} retries "
                f"(lr scaled by {progress.lr_scale:.3g}); try a lower lr",
                block_index=0,
            )

        def report(fault: str, it: int) -> None:
            warnings.warn(
                f"OT-Flow: {FAULTS[fault][0]} at step {it}; rolled back to step {progress.iter} "
                f"with the lr scaled by {progress.lr_scale:.3g}",
                RuntimeWarning,
                stacklevel=5,
            )

        parts = snapshot_parts(
            self.block,
            self.optimizer,
            self.generator,
            self.history.iterations,
            progress,
            self.budget,
            self.validation,
        )
        return Rollback(progress, parts, self.config.nan_retries, self.config.nan_lr_factor, give_up, report)

    def _record(self, step: Step) -> dict[str, Any]:
        """The per-step record: ``iter``, ``loss``, ``nll`` (of the data, nats),
        ``transport``, ``hjb``, ``lr``, ``seconds``."""
        t, log_scale = step.terms, -float(self.flow.standardize_logdet())
        return {
            "iter": step.it,
            "loss": t["loss"],
            "nll": t["nll"] + log_scale,
            "transport": t["transport"],
            "hjb": t["hjb"],
            "lr": step.lr,
            "seconds": self.progress.seconds,
        }

    def train(self, show: bool) -> None:
        """Runs the loop until ``iters``, the time budget or the last lr drop, then keeps the best weights."""
        config, history = self.config, self.history
        rollback = self._rollback()
        rollback.snapshot()
        hooks = [
            self.interrupt,
            self.budget,
            Records(history.iterations, self._record),
            self.validation,
            Bar(self.progress, config.iters, "OT-Flow", show, lambda step: self.validation.shown),
            Checkpoints(self.progress, config.iters, config.checkpoint_every, rollback, self.save),
        ]
        objective = _OTFlowObjective(
            self.block, self.x_train, config, self.generator, self.validation, lambda: self.progress.iter
        )
        optimize(objective, self.optimizer, self.progress, config.iters, rollback, hooks)
        history.stopped_by = (
            "lr_drops" if self.validation.done() else "max_seconds" if self.budget.done() else "iters"
        )
        if self.validation.state["best_state"] is not None:
            self.block.load_state_dict(self.validation.state["best_state"])
        self.block.requires_grad_(False)
        self.flow.eval()
        self.finished = True
        self.save()

    def save(self) -> None:
        if self.checkpoint is None:
            return
        self.progress.optimizer = self.optimizer.state_dict()
        state = TrainerState(
            config=self.config.to_dict(),
            history=self.history.to_dict(),
            flow=self.flow,
            parents=None,
            first=0,
            batches=self.budget.batches,
            seconds=self.budget.seconds,
            finished=self.finished,
            data=self.data,
            block=self.progress,
            generator=self.generator.get_state(),
            torch_rng=torch.get_rng_state(),
            trainer="otflow",
            extra=self.validation.state,
        )
        save_state(state, self.checkpoint)
        self.progress.optimizer = None

    def restore(self, state: TrainerState) -> None:
        for name, found in self.data.items():
            if name not in state.data or not np.allclose(found, state.data[name], rtol=1e-9):
                raise InputError(f"the {name} data differ from those the checkpoint was trained on")
        saved = state.history
        self.history.iterations[:] = saved["iterations"]
        self.history.validations[:] = saved["validations"]
        self.history.best, self.history.stopped_by = saved["best"], saved["stopped_by"]
        assert state.block is not None
        self.progress = state.block
        if self.progress.optimizer is not None:
            self.optimizer.load_state_dict(self.progress.optimizer)
        self.progress.optimizer = None
        self.budget.batches, self.budget.seconds = state.batches, state.seconds
        self.validation.state = dict(state.extra)
        self.generator.set_state(state.generator)
        torch.set_rng_state(state.torch_rng)
        self.finished = state.finished
        if self.finished:
            self.block.requires_grad_(False)
            self.flow.eval()
