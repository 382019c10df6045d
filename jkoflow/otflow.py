"""The monolithic OT-Flow baseline (DESIGN.md §5).

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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import blocks

from .config import TrainingConfig, check_positive, resolve_device, resolve_dtype
from .errors import InputError
from .flow import Flow, as_data_tensor
from .metrics import nll as flow_nll
from .objectives import otflow_loss

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


def train_otflow(
    x_train: Any,
    x_val: Any,
    config: OTFlowConfig | None = None,
    progress: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Flow, OTFlowHistory]:
    """Trains one OT-Flow block over [0, 1] (DESIGN.md §5).

    Arguments:
        x_train, x_val: Training and validation data, array-like (n, d).
        config: An :class:`OTFlowConfig` (defaults if omitted).
        progress: Show a progress bar.
        callback: Called with every validation record.

    Returns:
        ``(flow, history)``: a one-block :class:`Flow` with the best-validation
        weights (eval steps ``config.eval_steps``) and an :class:`OTFlowHistory`.
    """
    config = config or OTFlowConfig()
    like = torch.empty(0, dtype=resolve_dtype(config.dtype), device=resolve_device(config.device))
    x_train = torch.as_tensor(x_train)
    dim = x_train.shape[1] if x_train.dim() == 2 else -1
    x_train = as_data_tensor(x_train, dim, like, "training data")
    x_val = as_data_tensor(x_val, dim, like, "validation data")
    if len(x_train) < config.batch_size:
        raise InputError(
            f"the training set has {len(x_train)} rows but batch_size is {config.batch_size}; "
            "lower the batch size or give more data"
        )
    flow = Flow.for_data(x_train, config.eval_steps, config.standardize)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        block = config.make_block(dim)
    flow.append(block.to(like))
    x_train = flow.standardize(x_train)[0]
    log_scale = float(flow.scale.log().sum())

    history = OTFlowHistory(config.to_dict())
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(block.parameters(), lr=config.lr)
    best_nll, best_state, stale, drops = math.inf, None, 0, 0
    history.stopped_by = "iters"
    elapsed = 0.0
    bar = tqdm(range(config.iters), desc="OT-Flow", disable=not progress, dynamic_ncols=True)
    for it in bar:
        start = time.perf_counter()
        block.train()
        index = torch.randint(len(x_train), (config.batch_size,), generator=generator).to(x_train.device)
        terms = otflow_loss(block, x_train[index], config.train_steps, config.alpha_c, config.alpha_r)
        loss = float(terms.loss.detach())
        if not np.isfinite(loss):
            raise FloatingPointError(f"OT-Flow: the loss became {loss} at iteration {it}; try a lower lr")
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        optimizer.step()
        elapsed += time.perf_counter() - start
        history.iterations.append(
            {
                "iter": it,
                "loss": loss,
                "nll": float(terms.nll.detach()) + log_scale,
                "transport": float(terms.transport.detach()),
                "hjb": float(terms.hjb.detach()),
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": elapsed,
            }
        )
        last = it + 1 == config.iters or (config.max_seconds > 0 and elapsed >= config.max_seconds)
        if (it + 1) % config.val_every == 0 or last:
            block.eval()
            val_nll = flow_nll(flow, x_val, config.chunk_size)
            record = {
                "iter": it,
                "n_batches": it + 1,
                "seconds": elapsed,
                "val_nll": val_nll,
                "lr": optimizer.param_groups[0]["lr"],
            }
            history.validations.append(record)
            if callback is not None:
                callback(record)
            bar.set_postfix(val_nll=f"{val_nll:.4f}", lr=f"{record['lr']:.2g}")
            if val_nll < best_nll:
                best_nll, stale, history.best = val_nll, 0, record
                best_state = copy.deepcopy(block.state_dict())  # a real copy, not a view
            else:
                stale += 1
                if stale >= config.patience:
                    if drops == config.max_drops:
                        history.stopped_by = "lr_drops"
                        break
                    drops, stale = drops + 1, 0
                    for group in optimizer.param_groups:
                        group["lr"] *= config.lr_drop
        if config.max_seconds > 0 and elapsed >= config.max_seconds:
            history.stopped_by = "max_seconds"
            break
    bar.close()
    if best_state is not None:
        block.load_state_dict(best_state)
    block.requires_grad_(False)
    flow.eval()
    return flow, history
