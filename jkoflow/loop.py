"""The one optimisation loop that the JKO blocks and the OT-Flow baseline run on.

:func:`optimize` takes Adam steps on an :class:`Objective` (learning-rate
schedule and mini-batch loss) until the step count is reached or a hook says
stop. Everything else is a piece passed in: a :class:`Rollback` that restores
the last good state after a non-finite loss or gradient (with the learning
rate scaled by ``lr_factor``, at most ``retries`` times), and :class:`Hook`
objects for the interrupt vote, budgets, per-step records, the progress bar,
validation and checkpoints (docs/design.md, "The scheduler and its stages").

References: Xu, Cheng, Xie, JKO-iFlow, https://arxiv.org/abs/2212.14424;
Onken et al., OT-Flow, https://arxiv.org/abs/2006.00104.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import BlockProgress

__all__ = [
    "DIVERGENCE_FACTOR",
    "FAULTS",
    "Bar",
    "Budget",
    "Checkpoints",
    "Hook",
    "Interrupt",
    "Objective",
    "Plateau",
    "Records",
    "Rollback",
    "Step",
    "loss_fault",
    "optimize",
    "snapshot_parts",
    "valid_check",
]


@dataclass
class Step:
    """One finished Adam step: its index, learning rate, loss terms (floats,
    ``terms["loss"]`` the optimised one), seconds and whether to stop after it.

    Example:
        >>> from jkoflow.loop import Step
        >>> step = Step(it=3, lr=0.05, terms={"loss": 1.5, "kl": 1.25}, seconds=0.01)
        >>> step.terms["loss"], step.stop
        (1.5, False)
    """

    it: int
    lr: float
    terms: dict[str, float]
    seconds: float
    stop: bool = False


class Objective(Protocol):
    """What :func:`optimize` minimises.

    Example:
        >>> from jkoflow.checkpoint import BlockProgress
        >>> from jkoflow.loop import Rollback, optimize
        >>> w = torch.nn.Parameter(torch.tensor([3.0]))
        >>> class Quadratic:  # J(w) = w², lr 0.1·scale: SGD steps w ← 0.8·w
        ...     def lr(self, it, scale):
        ...         return 0.1 * scale
        ...     def loss(self):
        ...         loss = (w**2).sum()
        ...         return loss, {"loss": loss}
        >>> def give_up(fault, it):
        ...     raise RuntimeError(fault)
        >>> progress = BlockProgress(index=0)
        >>> rollback = Rollback(progress, [], retries=0, lr_factor=0.5, give_up=give_up, report=print)
        >>> optimize(Quadratic(), torch.optim.SGD([w], lr=0.1), progress, 3, rollback, [])
        >>> progress.iter, [round(loss, 4) for loss in progress.losses], round(w.item(), 4)
        (3, [9.0, 5.76, 3.6864], 1.536)
    """

    def lr(self, it: int, scale: float) -> float:
        """The learning rate of step ``it``, times the rollback ``scale``."""

    def loss(self) -> tuple[Tensor, dict[str, Tensor]]:
        """A fresh mini-batch's (tensor to backpropagate, loss terms with ``"loss"``)."""


class Hook:
    """A piece around the loop; every method is a no-op unless overridden.

    Example:
        >>> from jkoflow.checkpoint import BlockProgress
        >>> from jkoflow.loop import Hook, Rollback, optimize
        >>> class StopAt(Hook):  # stops once the loss is below 5
        ...     def __init__(self):
        ...         self.seen = []
        ...     def after_step(self, step):
        ...         self.seen.append(step.it)
        ...     def done(self):
        ...         return bool(progress.losses) and progress.losses[-1] < 5
        >>> w = torch.nn.Parameter(torch.tensor([3.0]))
        >>> class Quadratic:
        ...     def lr(self, it, scale):
        ...         return 0.1
        ...     def loss(self):
        ...         loss = (w**2).sum()
        ...         return loss, {"loss": loss}
        >>> def give_up(fault, it):
        ...     raise RuntimeError(fault)
        >>> progress, hook = BlockProgress(index=0), StopAt()
        >>> rollback = Rollback(progress, [], retries=0, lr_factor=0.5, give_up=give_up, report=print)
        >>> optimize(Quadratic(), torch.optim.SGD([w], lr=0.1), progress, 10, rollback, [hook])
        >>> hook.seen, [round(loss, 4) for loss in progress.losses]  # 9, 5.76, then 3.6864 < 5
        ([0, 1, 2], [9.0, 5.76, 3.6864])
    """

    def done(self) -> bool:
        """Whether to stop before the next step."""
        return False

    def measure(self, step: Step) -> None:
        """Called first after a step, before the progress counts it (may change
        ``step.seconds`` and ``step.stop``)."""

    def after_step(self, step: Step) -> None:
        """Called after the progress counted the step."""

    def after_rollback(self) -> None:
        """Called after a rollback."""

    def close(self) -> None:
        """Called once the loop ends normally."""


class Stateful(Protocol):
    def snapshot(self) -> Any: ...
    def restore(self, state: Any) -> None: ...


def optimize(
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    progress: BlockProgress,
    iters: int,
    rollback: Rollback,
    hooks: Sequence[Hook],
) -> None:
    """Adam steps on ``objective`` until ``progress.iter`` reaches ``iters`` or a
    hook is done; a non-finite or diverged loss (:func:`loss_fault`) or a
    non-finite gradient is handed to ``rollback``."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    while progress.iter < iters and not any(hook.done() for hook in hooks):
        it, tick = progress.iter, time.perf_counter()
        lr = objective.lr(it, progress.lr_scale)
        for group in optimizer.param_groups:
            group["lr"] = lr
        target, terms = objective.loss()
        optimizer.zero_grad(set_to_none=True)
        loss = float(terms["loss"].detach())  # read once: the fault check and the records use it
        fault = loss_fault(loss, progress.losses[:1])
        if fault is None:
            target.backward()
            if not all(torch.isfinite(p.grad).all() for p in params if p.grad is not None):
                fault = "gradient"
        if fault is not None:
            rollback.recover(fault, it)
            for hook in hooks:
                hook.after_rollback()
            continue
        optimizer.step()
        step = Step(it, lr, {"loss": loss}, time.perf_counter() - tick)
        for hook in hooks:
            hook.measure(step)
        step.terms.update({name: float(t.detach()) for name, t in terms.items() if name != "loss"})
        progress.count(loss, step.seconds)
        for hook in hooks:
            hook.after_step(step)
    for hook in hooks:
        hook.close()


DIVERGENCE_FACTOR = 10.0
"""A finite loss counts as diverged once it exceeds the loop's first loss J₀ by
more than ``DIVERGENCE_FACTOR · max(1, |J₀|)`` (:func:`loss_fault`)."""


def loss_fault(loss: float, first: Sequence[float]) -> str | None:
    """``"loss"`` for a non-finite loss, ``"divergence"`` for a finite one above
    J₀ + :data:`DIVERGENCE_FACTOR`·max(1, |J₀|), with J₀ = ``first[0]`` the
    loss of the loop's first step (a block or OT-Flow starts near the identity
    map, and training lowers the loss from there); else None.

    >>> loss_fault(3.0, [2.5]), loss_fault(1e30, [2.5])
    (None, 'divergence')
    >>> loss_fault(float("nan"), [])
    'loss'
    """
    if not math.isfinite(loss):
        return "loss"
    if first and loss > first[0] + DIVERGENCE_FACTOR * max(1.0, abs(first[0])):
        return "divergence"
    return None


FAULTS: dict[str, tuple[str, str]] = {
    "loss": ("non-finite loss", "the loss was not finite"),
    "gradient": ("non-finite gradient", "the gradient was not finite"),
    "divergence": ("diverged loss", f"the loss diverged (above J₀ + {DIVERGENCE_FACTOR:g}·max(1, |J₀|))"),
}
"""Fault kind -> (what a retry's warning calls it, what the final error says)."""


# -- rollback -------------------------------------------------------------------


class _Module:
    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def snapshot(self) -> dict[str, Any]:
        return copy.deepcopy(self.module.state_dict())

    def restore(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state)


class _Optimizer:
    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def snapshot(self) -> dict[str, Any]:
        return copy.deepcopy(self.optimizer.state_dict())

    def restore(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(copy.deepcopy(state))


class _Length:
    """A list that a rollback truncates to its length at the snapshot."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def snapshot(self) -> int:
        return len(self.items)

    def restore(self, state: int) -> None:
        del self.items[state:]


class _Generator:
    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def snapshot(self) -> Tensor:
        return self.generator.get_state()

    def restore(self, state: Tensor) -> None:
        self.generator.set_state(state)


def snapshot_parts(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    records: list[Any],
    *others: Stateful,
) -> list[Stateful]:
    """The usual state a rollback restores: weights, Adam state, the mini-batch
    generator, the per-step records, and ``others`` (progress, budget, …)."""
    return [_Module(module), _Optimizer(optimizer), *others, _Length(records), _Generator(generator)]


@dataclass
class Rollback:
    """Restores ``parts`` to their last :meth:`snapshot` after a non-finite
    loss or gradient, then multiplies ``progress.lr_scale`` by ``lr_factor``
    and counts a retry; ``give_up(fault, it)`` raises once ``retries`` are
    spent, ``report(fault, it)`` is told of every retry.

    Example:
        >>> from jkoflow.checkpoint import BlockProgress
        >>> from jkoflow.loop import Rollback
        >>> def give_up(fault, it):
        ...     raise RuntimeError(f"{fault} at step {it}")
        >>> def report(fault, it):
        ...     print(f"retry after a {fault} fault at step {it}")
        >>> progress = BlockProgress(index=0)
        >>> rollback = Rollback(progress, [progress], 1, lr_factor=0.5, give_up=give_up, report=report)
        >>> rollback.snapshot()
        >>> progress.count(2.0, 0.1)
        >>> rollback.recover("loss", 1)
        retry after a loss fault at step 1
        >>> progress.iter, progress.losses, progress.lr_scale, progress.retries
        (0, [], 0.5, 1)
        >>> rollback.recover("gradient", 1)
        Traceback (most recent call last):
        RuntimeError: gradient at step 1
    """

    progress: BlockProgress
    parts: list[Stateful]
    retries: int
    lr_factor: float
    give_up: Callable[[str, int], NoReturn]
    report: Callable[[str, int], None]
    good: list[Any] = field(default_factory=list)

    def snapshot(self) -> None:
        self.good = [part.snapshot() for part in self.parts]

    def recover(self, fault: str, it: int) -> None:
        for part, state in zip(self.parts, self.good, strict=True):
            part.restore(state)
        if self.progress.retries >= self.retries:
            self.give_up(fault, it)
        self.progress.retries += 1
        self.progress.lr_scale *= self.lr_factor
        self.report(fault, it)


# -- hooks ----------------------------------------------------------------------


@dataclass
class Budget(Hook):
    """Stops once ``max_batches`` steps or ``max_seconds`` seconds (0: no limit)
    are spent, counted over every loop this object is passed to.

    Example:
        >>> from jkoflow.loop import Budget, Step
        >>> budget = Budget(max_batches=2)
        >>> for it in range(2):
        ...     print(budget.done())
        ...     budget.after_step(Step(it, 0.1, {"loss": 1.0}, seconds=0.25))
        False
        False
        >>> budget.done(), budget.batches, budget.seconds
        (True, 2, 0.5)
    """

    max_batches: int = 0
    max_seconds: float = 0.0
    batches: int = 0
    seconds: float = 0.0

    def done(self) -> bool:
        return (self.max_batches > 0 and self.batches >= self.max_batches) or (
            self.max_seconds > 0 and self.seconds >= self.max_seconds
        )

    def after_step(self, step: Step) -> None:
        self.batches += 1
        self.seconds += step.seconds

    def snapshot(self) -> tuple[int, float]:
        return self.batches, self.seconds

    def restore(self, state: tuple[int, float]) -> None:
        self.batches, self.seconds = state


class Interrupt(Hook):
    """The Ctrl-C vote: after every step the ranks agree on the step's time and
    on whether any of them was asked to stop (``interrupted``, set by a signal
    handler); a stop then reaches every rank after the same step.

    Example:
        >>> from jkoflow import distributed
        >>> from jkoflow.loop import Interrupt, Step
        >>> hook = Interrupt(distributed.current())  # one process: the vote is its own
        >>> step = Step(0, 0.1, {"loss": 1.0}, seconds=0.25)
        >>> hook.measure(step)
        >>> step.stop
        False
        >>> hook.interrupted = True  # what the SIGINT handler does
        >>> hook.measure(step)
        >>> step.stop, step.seconds
        (True, 0.25)
    """

    def __init__(self, group: distributed.Group) -> None:
        self.group = group
        self.interrupted = False

    def measure(self, step: Step) -> None:
        step.seconds, stop = self.group.agree(step.seconds, self.interrupted)
        self.interrupted = self.interrupted or stop
        step.stop = stop


class Plateau(Hook):
    """Early stopping on a validation number ``measure() -> (value, stderr,
    valid)`` (lower is better; ``stderr`` its standard error; ``valid``
    whether the number is the model's, e.g. converged in the RK4 steps):
    measured before the first step, after every ``every`` steps and after
    the last (``iters``), recorded as ``[step, value, stderr, valid]`` in
    ``progress.checks``. The weights of ``module`` at the best valid check
    are kept in ``progress.best`` and put back when the loop ends.

    The loop stops (a) in the second half of the steps, once the last
    ``patience`` checks are all worse than the best by more than twice their
    standard error: the block overfits (a check within the noise of the best
    does not stop it, so a block on plentiful data trains its whole schedule,
    whose lowest learning rates gain most); (b) at any step, at an invalid
    check after a valid one: the block has begun to fit its discretisation,
    and training on only deepens it. Measuring counts as the step's time.

    Example:
        >>> from jkoflow.checkpoint import BlockProgress
        >>> from jkoflow.loop import Plateau, Step
        >>> module, progress = torch.nn.Linear(1, 1), BlockProgress(index=0)
        >>> numbers = [(3.0, 0.1), (2.0, 0.1), (2.1, 0.1), (2.5, 0.1), (2.25, 0.1)]
        >>> values = ((value, stderr, True) for value, stderr in numbers)  # all valid
        >>> hook = Plateau(progress, module, 1, 2, 8, lambda: next(values))  # checks at step 0
        >>> for it in range(4):
        ...     progress.count(1.0, 0.1)
        ...     hook.measure(Step(it, 0.1, {"loss": 1.0}, seconds=0.1))
        ...     print(it + 1, hook.done())  # 2.1 is within 2 stderr of 2.0; 2.5 and 2.25 are not
        1 False
        2 False
        3 False
        4 True
        >>> progress, values = BlockProgress(index=0), iter([(2.0, 0.1, True), (1.0, 0.1, False)])
        >>> hook = Plateau(progress, module, 1, 2, 8, lambda: next(values))
        >>> progress.count(1.0, 0.1)
        >>> hook.measure(Step(0, 0.1, {"loss": 1.0}, seconds=0.1))  # 1.0 is not the model's
        >>> hook.best(), hook.done()
        (2.0, True)
    """

    def __init__(
        self,
        progress: BlockProgress,
        module: torch.nn.Module,
        every: int,
        patience: int,
        iters: int,
        measure: Callable[[], tuple[float, float, bool]],
    ) -> None:
        self.progress, self.module, self.every, self.patience = progress, module, every, patience
        self.iters, self.value = iters, measure
        if not progress.checks:
            self._check(progress.iter)

    def _check(self, it: int) -> None:
        value, stderr, valid = self.value()
        if valid and value < self.best():
            self.progress.best = copy.deepcopy(self.module.state_dict())
        self.progress.checks.append([it, float(value), float(stderr), float(bool(valid))])

    def best(self) -> float:
        """The lowest valid value checked so far (inf before the first)."""
        return min((check[1] for check in self.progress.checks if valid_check(check)), default=math.inf)

    def overfits(self) -> bool:
        """Whether the last ``patience`` checks are all above best + 2·stderr."""
        checks = self.progress.checks
        if len(checks) < self.patience:
            return False
        best = self.best()
        return all(check[1] > best + 2 * check[2] for check in checks[-self.patience :])

    def done(self) -> bool:
        checks = self.progress.checks
        diverted = bool(checks) and not valid_check(checks[-1]) and self.best() < math.inf
        return diverted or (2 * self.progress.iter >= self.iters and self.overfits())

    def measure(self, step: Step) -> None:
        it = step.it + 1  # the step count once this step is counted
        if it % self.every == 0 or it == self.iters:
            tick = time.perf_counter()
            self._check(it)
            step.seconds += time.perf_counter() - tick

    def close(self) -> None:
        last = self.progress.checks[-1]
        if self.progress.best is not None and not (valid_check(last) and last[1] <= self.best()):
            self.module.load_state_dict(self.progress.best)


def valid_check(check: list[float]) -> bool:
    """Whether an early-stopping check ``[step, value, stderr, valid]`` is
    valid (checks saved before the flag have three entries and are)."""
    return len(check) < 4 or bool(check[3])


@dataclass
class Records(Hook):
    """Appends ``make(step)`` to ``records`` after every step and passes it to ``callback``.

    Example:
        >>> from jkoflow.loop import Records, Step
        >>> records = []
        >>> make = lambda step: {"iter": step.it, "loss": step.terms["loss"]}
        >>> hook = Records(records, make, callback=print)
        >>> hook.after_step(Step(3, 0.1, {"loss": 1.5}, seconds=0.2))
        {'iter': 3, 'loss': 1.5}
        >>> records
        [{'iter': 3, 'loss': 1.5}]
    """

    records: list[dict[str, Any]]
    make: Callable[[Step], dict[str, Any]]
    callback: Callable[[dict[str, Any]], None] | None = None

    def after_step(self, step: Step) -> None:
        record = self.make(step)
        self.records.append(record)
        if self.callback is not None:
            self.callback(record)


class Bar(Hook):
    """A tqdm progress bar over the steps; ``postfix(step)`` may return the
    bar's postfix dict for a step.

    Example:
        >>> from jkoflow.checkpoint import BlockProgress
        >>> from jkoflow.loop import Bar, Step
        >>> progress = BlockProgress(index=0, iter=1)
        >>> shown = lambda step: {"loss": f"{step.terms['loss']:.2f}"}
        >>> bar = Bar(progress, iters=4, desc="block 1", enabled=True, postfix=shown, leave=False)
        >>> progress.count(1.0, 0.1)
        >>> bar.after_step(Step(1, 0.1, {"loss": 1.0}, seconds=0.1))
        >>> bar.bar.n, bar.bar.total, bar.bar.postfix
        (2, 4, 'loss=1.00')
        >>> bar.close()
    """

    def __init__(
        self,
        progress: BlockProgress,
        iters: int,
        desc: str,
        enabled: bool,
        postfix: Callable[[Step], dict[str, str] | None],
        leave: bool = True,
    ) -> None:
        self.progress, self.iters, self.postfix = progress, iters, postfix
        self.bar = tqdm(
            total=iters,
            initial=progress.iter,
            desc=desc,
            disable=not enabled,
            leave=leave,
            dynamic_ncols=True,
        )

    def after_step(self, step: Step) -> None:
        self.bar.update()
        shown = self.postfix(step)
        if shown:
            self.bar.set_postfix(shown)

    def after_rollback(self) -> None:
        self.bar.reset(total=self.iters)
        self.bar.update(self.progress.iter)

    def close(self) -> None:
        self.bar.close()


class Checkpoints(Hook):
    """Every ``every`` steps (0: never) inside the loop, and after a step the
    ranks agreed to stop at, takes a rollback snapshot and calls ``save``; a
    stop then raises KeyboardInterrupt.

    Example:
        >>> from jkoflow.checkpoint import BlockProgress
        >>> from jkoflow.loop import Checkpoints, Rollback, Step
        >>> def give_up(fault, it):
        ...     raise RuntimeError(fault)
        >>> progress, saved = BlockProgress(index=0), []
        >>> rollback = Rollback(progress, [progress], 0, 0.5, give_up=give_up, report=print)
        >>> save = lambda: saved.append(progress.iter)
        >>> hook = Checkpoints(progress, iters=6, every=2, rollback=rollback, save=save)
        >>> for it in range(6):
        ...     progress.count(1.0, 0.1)
        ...     hook.after_step(Step(it, 0.1, {"loss": 1.0}, seconds=0.1))
        >>> saved  # every 2 steps, but not after the last one (6 = iters)
        [2, 4]
        >>> try:  # the ranks agreed to stop after this step
        ...     hook.after_step(Step(6, 0.1, {"loss": 1.0}, seconds=0.1, stop=True))
        ... except KeyboardInterrupt:
        ...     print("saved, then stopped")
        saved, then stopped
        >>> saved
        [2, 4, 6]
    """

    def __init__(
        self, progress: BlockProgress, iters: int, every: int, rollback: Rollback, save: Callable[[], None]
    ) -> None:
        self.progress, self.iters, self.every, self.rollback, self.save = (
            progress,
            iters,
            every,
            rollback,
            save,
        )

    def after_step(self, step: Step) -> None:
        done = self.progress.iter
        if step.stop or (self.every and done % self.every == 0 and done < self.iters):
            self.rollback.snapshot()
            self.save()
            if step.stop:
                raise KeyboardInterrupt
