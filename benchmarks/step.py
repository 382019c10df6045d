r"""(b) One training step: a JKO block vs monolithic OT-Flow, same block, width and batch.

JKO: :func:`jkoflow.objectives.jko_loss` (path transport, ``JKOConfig`` train
steps) + backward + Adam. OT-Flow: :func:`jkoflow.objectives.otflow_loss` with
its HJB term (``OTFlowConfig`` train steps, α_C and α_R) + backward + Adam.

Integrator overhead: one RK4 step evaluates the block 4 times, so the forward
of ``integrate(block, x, steps)`` (no grad) is compared with 4·steps forward
calls of the block alone: overhead = t_integrate / (4·steps·t_block) − 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import blocks
from jkoflow import JKOConfig, OTFlowConfig
from jkoflow.objectives import jko_loss, otflow_loss
from jkoflow.ode import integrate

from .common import BATCH, Column, Table, interleaved_medians

__all__ = ["SIZES", "run"]

SIZES = {
    "full": {"dims": (2, 43), "repeats": 5},
    "quick": {"dims": (2, 43), "repeats": 2},
    "smoke": {"dims": (2,), "repeats": 1, "width": 8, "batch": 32},
}

COLUMNS = [
    Column("d", "d"),
    Column("method", "method"),
    Column("rk4_steps", "RK4 steps"),
    Column("ms_per_step", "ms / training step", ".1f"),
    Column("ratio", "÷ JKO step", ".2f"),
    Column("integrator_overhead", "integrator overhead", ".1%"),
]


def _stepper(block: torch.nn.Module, loss_fn: Callable[[], Any]) -> Callable[[], None]:
    optimizer = torch.optim.Adam(block.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn().loss.backward()
        optimizer.step()

    return step


def _time_one_dim(
    d: int, width: int, batch: int, repeats: int, seed: int, jko: JKOConfig, ot: OTFlowConfig
) -> dict[str, float]:
    x = torch.randn(batch, d, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    depth = jko.depth_for(ot.block)
    jko_block, ot_block = (blocks.make(ot.block, dim=d, width=width, depth=depth) for _ in range(2))
    ot_block.load_state_dict(jko_block.state_dict())

    def forward_integrate() -> None:
        with torch.no_grad():
            integrate(jko_block, x, jko.train_steps)

    def forward_block() -> None:
        with torch.no_grad():
            for _ in range(4 * jko.train_steps):
                jko_block(x, 0.5)

    calls = {
        "JKO block": _stepper(jko_block, lambda: jko_loss(jko_block, x, jko.h0, jko.train_steps)),
        "OT-Flow": _stepper(
            ot_block, lambda: otflow_loss(ot_block, x, ot.train_steps, ot.alpha_c, ot.alpha_r)
        ),
        "integrate": forward_integrate,
        "block": forward_block,
    }
    return interleaved_medians(calls, repeats)


def run(
    dims: tuple[int, ...] = (2, 43),
    width: int | None = None,
    batch: int | None = None,
    repeats: int = 5,
    seed: int = 0,
) -> Table:
    """Times one training step of each method for every d; returns the table."""
    jko, ot = JKOConfig(), OTFlowConfig()
    width = width or jko.width
    batch = batch or BATCH
    depth = jko.depth_for(ot.block)
    table = Table("step", f"(b) one training step, width {width}, depth {depth}, batch {batch}", COLUMNS)
    for d in dims:
        seconds = _time_one_dim(d, width, batch, repeats, seed, jko, ot)
        overhead = seconds["integrate"] / seconds["block"] - 1.0
        steps = {"JKO block": jko.train_steps, "OT-Flow": ot.train_steps}
        for name in ("JKO block", "OT-Flow"):
            table.rows.append(
                {
                    "d": d,
                    "method": name,
                    "rk4_steps": steps[name],
                    "width": width,
                    "batch": batch,
                    "ms_per_step": 1e3 * seconds[name],
                    "ratio": seconds[name] / seconds["JKO block"],
                    "integrator_overhead": overhead if name == "JKO block" else None,
                }
            )
    table.notes = [
        f"{torch.get_num_threads()} torch thread(s), float32, median of {repeats} steps after one warm-up, "
        "timed round-robin. JKO: jko_loss (path transport, h = "
        f"{jko.h0}) + backward + Adam; OT-Flow: otflow_loss with α_C = {ot.alpha_c}, α_R = {ot.alpha_r} "
        "(HJB term on) + backward + Adam; RK4 steps are each trainer's defaults.",
        "Integrator overhead: forward of integrate() vs 4·steps forward calls of the block alone "
        "(torchdiffeq's RK4 bookkeeping: state tuples, linear combinations, time grid).",
    ]
    return table
