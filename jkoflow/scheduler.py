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
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from blocks import Block, time_slices

from .config import JKOConfig, resolve_dtype
from .errors import InputError
from .flow import Flow, as_data_tensor, chunked
from .objectives import gaussian_log_prob, jko_loss
from .ode import integrate

__all__ = ["JKOHistory", "movement_spread", "reparametrize", "train_jko"]

StageCallback = Callable[["JKOHistory", Flow], None]


@dataclass
class JKOHistory:
    """What :func:`train_jko` did, JSON-able via :meth:`to_dict`.

    Attributes:
        config: The :class:`JKOConfig` as a dict.
        stages: One record per stage: ``name`` (``"initial"``, ``"reparam 1"``,
            …, ``"refine 1"``, …), ``kind``, ``blocks`` (one record per block
            of the flow after that stage: ``index``, ``h``, ``w2``, ``ter``,
            ``val_nll``, ``test_nll`` when a test set was given, ``n_batches``,
            ``seconds``, ``loss_first``, ``loss_last``; refined blocks also
            ``parent`` and ``slice``), ``spread`` (max |W_k − W̄|/W̄),
            ``val_nll``, ``test_nll``, ``n_batches``, ``seconds``.
        iterations: One record per optimisation step: ``stage``, ``block``,
            ``iter``, ``loss``, ``kl``, ``transport``, ``lr``, ``seconds``.
        stopped_by: How the initial pass ended: ``"ter"``, ``"max_blocks"`` or
            ``"budget"`` (``max_batches`` / ``max_seconds`` spent).
    """

    config: dict[str, Any]
    stages: list[dict[str, Any]] = field(default_factory=list)
    iterations: list[dict[str, Any]] = field(default_factory=list)
    stopped_by: str = ""

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
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JKOHistory:
        return cls(data["config"], data["stages"], data["iterations"], data.get("stopped_by", ""))


def movement_spread(w2: list[float]) -> float:
    """max_k |S_k − S̄| / S̄ for the per-block movements S_k = W_k."""
    s = np.asarray(w2, dtype=float)
    return float(np.abs(s - s.mean()).max() / s.mean())


def reparametrize(h: list[float], w2: list[float], eta: float, h_min: float, h_max: float) -> list[float]:
    """One step of h_k ← clip(h_k + η(h_k·S̄/S_k − h_k), h_min, h_max) with S_k = W_k."""
    s = np.asarray(w2, dtype=float)
    hs = np.asarray(h, dtype=float)
    moved = hs + eta * (hs * s.mean() / np.maximum(s, 1e-12) - hs)
    return [float(v) for v in np.clip(moved, h_min, h_max)]


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
) -> tuple[Flow, JKOHistory]:
    """Trains a flow block by block with the JKO scheme, then runs the
    reparametrisation and refinement stages that ``config`` asks for.

    Arguments:
        x_train: Training data, array-like (n, d).
        x_val: Validation data (n_val, d) for W_k, Ter(k) and NLL; by default a
            seeded 10 % of ``x_train`` is held out.
        x_test: Optional test data; its NLL is then recorded per block.
        config: A :class:`JKOConfig` (defaults if omitted).
        flow: A flow to extend: new blocks are appended after its blocks, on
            data pushed through it (incremental training). Its blocks stay
            frozen; later stages only change the new blocks.
        progress: Show progress bars and a line per block.
        callback: Called with every per-iteration record.
        on_stage: Called as ``on_stage(history, flow)`` after each stage (the
            stage just ended is ``history.stages[-1]``), e.g. to save a
            checkpoint per stage.

    Returns:
        ``(flow, history)``: the trained :class:`Flow` (frozen blocks, eval
        steps ``config.eval_steps``) and a :class:`JKOHistory`.

    Example:
        >>> import numpy as np, jkoflow
        >>> x = jkoflow.datasets.load("8gaussians", n=3000)
        >>> cfg = jkoflow.JKOConfig(width=8, iters=5, batch_size=256, max_blocks=1)
        >>> flow, history = jkoflow.train_jko(x, config=cfg)
        >>> len(flow), len(history.iterations), history.stages[0]["name"]
        (1, 5, 'initial')
    """
    config = config or JKOConfig()
    like = torch.empty(0, dtype=resolve_dtype(config.dtype), device=config.device)
    x_train = torch.as_tensor(x_train)
    dim = flow.dim if flow is not None else (x_train.shape[1] if x_train.dim() == 2 else -1)
    x_train = as_data_tensor(x_train, dim, like, "training data")
    if x_val is None:
        perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(config.seed))
        n_val = max(1, len(x_train) // 10)
        x_val, x_train = x_train[perm[:n_val]], x_train[perm[n_val:]]
    x_val = as_data_tensor(x_val, dim, like, "validation data")
    if len(x_train) < config.batch_size:
        raise InputError(
            f"the training set has {len(x_train)} rows but batch_size is {config.batch_size}; "
            "lower the batch size or give more data"
        )
    if flow is None:
        flow = Flow.for_data(x_train, config.eval_steps, config.standardize)
    flow = flow.to(device=like.device, dtype=like.dtype)
    with torch.no_grad():
        sets = {"train": x_train, "val": x_val}
        if x_test is not None:
            sets["test"] = as_data_tensor(x_test, dim, like, "test data")
        base = {name: _Cached(*flow(x, config.chunk_size)) for name, x in sets.items()}

    trainer = _Trainer(flow, base, config, like, progress, callback, on_stage)
    trainer.initial_pass()
    if not trainer.history.blocks:  # the flow already had max_blocks blocks
        return flow.eval(), trainer.history
    for _ in range(config.reparam_iters):
        if (
            trainer.out_of_budget()
            or movement_spread([b["w2"] for b in trainer.history.blocks]) < config.reparam_tol
        ):
            break
        trainer.reparam_stage()
    for count in config.refine:
        if trainer.out_of_budget():
            break
        trainer.refine_stage(count)
    flow.eval()
    return flow, trainer.history


class _Trainer:
    """State shared by the stages of one :func:`train_jko` call."""

    def __init__(
        self,
        flow: Flow,
        base: dict[str, _Cached],
        config: JKOConfig,
        like: Tensor,
        progress: bool,
        callback: Callable[[dict[str, Any]], None] | None,
        on_stage: StageCallback | None,
    ):
        self.flow, self.base, self.config, self.like = flow, base, config, like
        self.first = len(flow)  # blocks before this index are frozen input
        self.progress, self.callback, self.on_stage = progress, callback, on_stage
        self.history = JKOHistory(config.to_dict())
        self.generator = torch.Generator().manual_seed(config.seed)
        self.batches, self.seconds = 0, 0.0  # spent on optimisation so far

    def out_of_budget(self) -> bool:
        config = self.config
        return (config.max_batches > 0 and self.batches >= config.max_batches) or (
            config.max_seconds > 0 and self.seconds >= config.max_seconds
        )

    # -- stages -----------------------------------------------------------------

    def initial_pass(self) -> None:
        stage = self._open_stage("initial", "initial")
        cached = self.base
        self.history.stopped_by = "max_blocks"
        for k in range(self.first, self.config.max_blocks):
            previous = self.flow.blocks[-1] if len(self.flow) else None
            block = _new_block(k, self.flow.dim, self.config, previous).to(self.like)
            self.flow.append(block)
            cached, record = self._fit(block, k, self.config.step_size(k), cached, self.config.iters)
            stage["blocks"].append(record)
            if record["ter"] < self.config.ter_eps:
                self.history.stopped_by = "ter"
                break
            if self.out_of_budget():
                self.history.stopped_by = "budget"
                break
        self._close_stage(stage)

    def reparam_stage(self) -> None:
        last = self.history.blocks
        hs = reparametrize(
            [b["h"] for b in last],
            [b["w2"] for b in last],
            self.config.reparam_eta,
            self.config.h_min,
            self.config.h_max,
        )
        n = sum(s["kind"] == "reparam" for s in self.history.stages) + 1
        stage = self._open_stage(f"reparam {n}", "reparam")
        cached = self.base
        for block, h, old in zip(self.flow.blocks[self.first :], hs, last, strict=True):
            cached, record = self._fit(block, old["index"], h, cached, self.config.retrain_iters)
            stage["blocks"].append(record)
        self._close_stage(stage)

    def refine_stage(self, count: int) -> None:
        last = self.history.blocks
        old_blocks = list(self.flow.blocks[self.first :])
        del self.flow.blocks[self.first :]
        n = sum(s["kind"] == "refine" for s in self.history.stages) + 1
        stage = self._open_stage(f"refine {n}", "refine", factor=count)
        cached = self.base
        for parent, (block, old) in enumerate(zip(old_blocks, last, strict=True)):
            for j, piece in enumerate(time_slices(block, count)):
                piece = piece.to(self.like)
                self.flow.append(piece)
                k = len(self.flow) - 1
                cached, record = self._fit(piece, k, old["h"] / count, cached, self.config.retrain_iters)
                record.update(parent=parent, slice=j)
                stage["blocks"].append(record)
        self._close_stage(stage)

    # -- one block --------------------------------------------------------------

    def _fit(
        self, block: Block, k: int, h: float, cached: dict[str, _Cached], iters: int
    ) -> tuple[dict[str, _Cached], dict[str, Any]]:
        """Trains ``block`` (index k) for ``iters`` steps (fewer once the budget is
        spent) on samples of p_{k−1}, freezes it, pushes every set through it
        and measures its movement."""
        start = time.perf_counter()
        block.requires_grad_(True)
        losses = self._optimize(block, k, h, cached["train"].x, iters)
        block.requires_grad_(False)
        with torch.no_grad():
            moved = {
                name: _push(block, c, self.flow.steps, self.config.chunk_size) for name, c in cached.items()
            }
            step = (moved["val"].x - cached["val"].x).pow(2).sum(1).mean()
            record = {
                "index": k,
                "h": h,
                "w2": float(step.sqrt()),
                "ter": float(step / moved["val"].x.pow(2).sum(1).mean()),
                "val_nll": moved["val"].nll(),
                "n_batches": len(losses),
                "seconds": time.perf_counter() - start,
                "loss_first": losses[0] if losses else None,
                "loss_last": losses[-1] if losses else None,
            }
            if "test" in moved:
                record["test_nll"] = moved["test"].nll()
        if self.progress:
            tqdm.write(
                f"[{self.history.stages[-1]['name']}] block {k + 1}: h={h:.3g}  W={record['w2']:.4f}  "
                f"Ter={record['ter']:.4f}  val NLL={record['val_nll']:.4f}  ({record['seconds']:.1f} s)"
            )
        return moved, record

    def _optimize(self, block: Block, k: int, h: float, x: Tensor, iters: int) -> list[float]:
        """``iters`` Adam steps on the JKO loss of block k; returns the losses."""
        config = self.config
        block.train()
        optimizer = torch.optim.Adam(block.parameters(), lr=config.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=iters, eta_min=config.lr * config.lr_final_factor
        )
        stage = len(self.history.stages) - 1
        losses = []
        start = time.perf_counter()
        bar = tqdm(
            range(iters), desc=f"block {k + 1}", disable=not self.progress, leave=False, dynamic_ncols=True
        )
        for it in bar:
            if self.out_of_budget():  # the block keeps the weights it has
                break
            tick = time.perf_counter()
            index = torch.randint(len(x), (config.batch_size,), generator=self.generator).to(x.device)
            terms = jko_loss(block, x[index], h, config.train_steps, config.transport)  # type: ignore[arg-type]
            loss = float(terms.loss.detach())
            if not np.isfinite(loss):
                raise FloatingPointError(
                    f"block {k + 1}: the loss became {loss} at iteration {it}; "
                    "try a lower lr or more train_steps"
                )
            lr = optimizer.param_groups[0]["lr"]
            optimizer.zero_grad(set_to_none=True)
            terms.loss.backward()
            optimizer.step()
            schedule.step()
            self.batches += 1
            self.seconds += time.perf_counter() - tick
            record = {
                "stage": stage,
                "block": k,
                "iter": it,
                "loss": loss,
                "kl": float(terms.kl.detach()),
                "transport": float(terms.transport.detach()),
                "lr": lr,
                "seconds": time.perf_counter() - start,
            }
            self.history.iterations.append(record)
            losses.append(loss)
            if self.callback is not None:
                self.callback(record)
            if it % 10 == 0:
                bar.set_postfix(loss=f"{loss:.4f}", h=f"{h:.3g}")
        bar.close()
        block.eval()
        return losses

    # -- records ----------------------------------------------------------------

    def _open_stage(self, name: str, kind: str, **extra: Any) -> dict[str, Any]:
        stage = {"name": name, "kind": kind, **extra, "blocks": []}
        self.history.stages.append(stage)
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
        if self.progress:
            nll = f", test NLL {stage['test_nll']:.4f}" if "test_nll" in stage else ""
            tqdm.write(f"[{stage['name']}] {len(records)} blocks, W spread {stage['spread']:.3f}{nll}")
        if self.on_stage is not None:
            self.on_stage(self.history, self.flow)


def _new_block(k: int, dim: int, config: JKOConfig, previous: Block | None) -> Block:
    """Block k, seeded by (seed, k); warm-started from ``previous`` if allowed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed * 7919 + k)
        block = config.make_block(dim, k)
    same = previous is not None and type(previous) is type(block) and previous.config() == block.config()
    if config.warm_start and same:
        block.load_state_dict(previous.state_dict())
    return block.requires_grad_(True)


def _push(block: Block, cached: _Cached, steps: int, chunk_size: int) -> _Cached:
    """Samples of p_k from those of p_{k−1}: x ↦ T_k(x), logdet += ℓ_k(x)."""
    out = chunked(lambda part: integrate(block, part, steps), cached.x, chunk_size)
    return _Cached(out.z, cached.logdet + out.logdet)
