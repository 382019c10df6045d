"""The block-wise JKO trainer (DESIGN.md §2, §4).

Block k minimises KL((T_k)#p_{k−1} ‖ N(0, I)) + W2²(p_{k−1}, p_k)/(2h_k) on
samples of p_{k−1} cached after pushing the data through the frozen blocks
before it, so training memory does not grow with k. After each block the
train, validation and (optional) test sets are pushed once, in chunks, and the
block's movement is measured on the validation set:

    W_k = sqrt(E‖T_k(x) − x‖²),   Ter(k) = E‖T_k(x) − x‖² / E‖T_k(x)‖².

Blocks are added until Ter(k) < ε or the flow holds ``max_blocks`` blocks.
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

from blocks import Block

from .config import JKOConfig, resolve_dtype
from .errors import InputError
from .flow import Flow, as_data_tensor, chunked
from .objectives import gaussian_log_prob, jko_loss
from .ode import integrate

__all__ = ["JKOHistory", "train_jko"]


@dataclass
class JKOHistory:
    """What :func:`train_jko` did, JSON-able via :meth:`to_dict`.

    Attributes:
        config: The :class:`JKOConfig` as a dict.
        blocks: One record per trained block: ``index``, ``h``, ``w2``, ``ter``,
            ``val_nll`` (and ``test_nll`` when a test set was given),
            ``n_batches``, ``seconds`` (training and pushing), ``loss_first``,
            ``loss_last``.
        iterations: One record per optimisation step: ``block``, ``iter``,
            ``loss``, ``kl``, ``transport``, ``lr``, ``seconds``.
        stopped_by: ``"ter"`` (Ter(k) < ε) or ``"max_blocks"``.
    """

    config: dict[str, Any]
    blocks: list[dict[str, Any]] = field(default_factory=list)
    iterations: list[dict[str, Any]] = field(default_factory=list)
    stopped_by: str = ""

    @property
    def n_batches(self) -> int:
        return sum(b["n_batches"] for b in self.blocks)

    @property
    def train_seconds(self) -> float:
        return sum(b["seconds"] for b in self.blocks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "blocks": self.blocks,
            "iterations": self.iterations,
            "stopped_by": self.stopped_by,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JKOHistory:
        return cls(data["config"], data["blocks"], data["iterations"], data.get("stopped_by", ""))


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
) -> tuple[Flow, JKOHistory]:
    """Trains a flow block by block with the JKO scheme.

    Arguments:
        x_train: Training data, array-like (n, d).
        x_val: Validation data (n_val, d) for W_k, Ter(k) and NLL; by default a
            seeded 10 % of ``x_train`` is held out.
        x_test: Optional test data; its NLL is then recorded per block.
        config: A :class:`JKOConfig` (defaults if omitted).
        flow: A flow to extend: new blocks are appended after its blocks, on
            data pushed through it (incremental training).
        progress: Show progress bars and a line per block.
        callback: Called with every per-iteration record.

    Returns:
        ``(flow, history)``: the trained :class:`Flow` (frozen blocks, eval
        steps ``config.eval_steps``) and a :class:`JKOHistory`.

    Example:
        >>> import numpy as np, jkoflow
        >>> x = jkoflow.datasets.load("8gaussians", n=3000)
        >>> cfg = jkoflow.JKOConfig(width=8, iters=5, batch_size=256, max_blocks=1)
        >>> flow, history = jkoflow.train_jko(x, config=cfg)
        >>> len(flow), len(history.iterations)
        (1, 5)
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
        flow = _new_flow(x_train, config)
    flow = flow.to(device=like.device, dtype=like.dtype)

    with torch.no_grad():
        sets = {"train": x_train, "val": x_val}
        if x_test is not None:
            sets["test"] = as_data_tensor(x_test, dim, like, "test data")
        cached = {name: _Cached(*flow(x, config.chunk_size)) for name, x in sets.items()}

    history = JKOHistory(config.to_dict())
    generator = torch.Generator().manual_seed(config.seed)
    history.stopped_by = "max_blocks"
    for k in range(len(flow), config.max_blocks):
        start = time.perf_counter()
        h = config.step_size(k)
        block = _new_block(k, dim, config, previous=flow.blocks[-1] if len(flow) else None).to(like)
        losses = _train_block(block, k, cached["train"].x, h, config, generator, history, progress, callback)
        block.requires_grad_(False)
        flow.append(block)
        with torch.no_grad():
            moved = {name: _push(block, c, flow.steps, config.chunk_size) for name, c in cached.items()}
            step = (moved["val"].x - cached["val"].x).pow(2).sum(1).mean()
            cached = moved
            record = {
                "index": k,
                "h": h,
                "w2": float(step.sqrt()),
                "ter": float(step / cached["val"].x.pow(2).sum(1).mean()),
                "val_nll": cached["val"].nll(),
                "n_batches": config.iters,
                "seconds": time.perf_counter() - start,
                "loss_first": losses[0],
                "loss_last": losses[-1],
            }
            if "test" in cached:
                record["test_nll"] = cached["test"].nll()
        history.blocks.append(record)
        if progress:
            tqdm.write(
                f"block {k + 1}: h={h:.3g}  W={record['w2']:.4f}  Ter={record['ter']:.4f}  "
                f"val NLL={record['val_nll']:.4f}  ({record['seconds']:.1f} s)"
            )
        if record["ter"] < config.ter_eps:
            history.stopped_by = "ter"
            break
    flow.eval()
    return flow, history


def _new_flow(x_train: Tensor, config: JKOConfig) -> Flow:
    dim = x_train.shape[1]
    if not config.standardize:
        return Flow(dim, steps=config.eval_steps)
    scale = x_train.std(0)
    if (scale <= 0).any():
        column = int((scale <= 0).nonzero()[0])
        raise InputError(f"cannot standardise: column {column} of the training data is constant")
    return Flow(dim, steps=config.eval_steps, shift=x_train.mean(0), scale=scale)


def _new_block(k: int, dim: int, config: JKOConfig, previous: Block | None) -> Block:
    """Block k, seeded by (seed, k); warm-started from ``previous`` if allowed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed * 7919 + k)
        block = config.make_block(dim)
    same = previous is not None and type(previous) is type(block) and previous.config() == block.config()
    if config.warm_start and same:
        block.load_state_dict(previous.state_dict())
    return block.requires_grad_(True)


def _train_block(
    block: Block,
    k: int,
    x: Tensor,
    h: float,
    config: JKOConfig,
    generator: torch.Generator,
    history: JKOHistory,
    progress: bool,
    callback: Callable[[dict[str, Any]], None] | None,
) -> list[float]:
    """``config.iters`` Adam steps on the JKO loss of block k; returns the losses."""
    block.train()
    optimizer = torch.optim.Adam(block.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.iters, eta_min=config.lr * config.lr_final_factor
    )
    losses = []
    start = time.perf_counter()
    bar = tqdm(
        range(config.iters), desc=f"block {k + 1}", disable=not progress, leave=False, dynamic_ncols=True
    )
    for it in bar:
        index = torch.randint(len(x), (config.batch_size,), generator=generator).to(x.device)
        terms = jko_loss(block, x[index], h, config.train_steps, config.transport)  # type: ignore[arg-type]
        loss = float(terms.loss.detach())
        if not np.isfinite(loss):
            raise FloatingPointError(
                f"block {k + 1}: the loss became {loss} at iteration {it}; try a lower lr or more train_steps"
            )
        lr = optimizer.param_groups[0]["lr"]
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        optimizer.step()
        schedule.step()
        record = {
            "block": k,
            "iter": it,
            "loss": loss,
            "kl": float(terms.kl.detach()),
            "transport": float(terms.transport.detach()),
            "lr": lr,
            "seconds": time.perf_counter() - start,
        }
        history.iterations.append(record)
        losses.append(loss)
        if callback is not None:
            callback(record)
        if it % 10 == 0:
            bar.set_postfix(loss=f"{loss:.4f}", h=f"{h:.3g}")
    bar.close()
    return losses


def _push(block: Block, cached: _Cached, steps: int, chunk_size: int) -> _Cached:
    """Samples of p_k from those of p_{k−1}: x ↦ T_k(x), logdet += ℓ_k(x)."""
    z, logdet, _ = chunked(lambda part: integrate(block, part, steps), cached.x, chunk_size)
    return _Cached(z, cached.logdet + logdet)
