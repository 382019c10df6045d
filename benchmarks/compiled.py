r"""(e) The compiled RK4 step (:mod:`jkoflow.compiling`) on one JKO training step.

Times one training step (``jko_loss`` + backward + Adam, JKOConfig defaults:
the block ``auto`` picks at each dimension of ``dims``, at its default
depth: ``mlp`` at d = 2, ``otflow`` at d = 8) with the eager
:func:`jkoflow.ode.rk4_step` and with the :class:`jkoflow.compiling.CompiledStep`
that ``compile="auto"`` trains with: the first compiled step (compilation,
or loading torch's on-disk cache), the median step after it, and the first
step of a second, freshly built block of the same architecture (does each
new block of a flow pay the compilation again?). Opt-in (``--only compile``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

import blocks
from jkoflow import JKOConfig
from jkoflow.compiling import CompiledStep
from jkoflow.objectives import jko_loss
from jkoflow.ode import Stepper, rk4_step

from .common import BATCH, Column, Table, interleaved_medians

__all__ = ["SIZES", "run"]

SIZES = {
    "full": {"dims": (2, 8), "repeats": 10},
    "quick": {"dims": (2, 8), "repeats": 3},
    "smoke": {"dims": (2, 8), "repeats": 1, "width": 4, "batch": 16},
}

COLUMNS = [
    Column("block", "block"),
    Column("variant", "variant"),
    Column("first_step_s", "first step s", ".2f"),
    Column("ms_per_step", "ms / step after it", ".1f"),
    Column("speedup", "eager ÷ this", ".2f"),
    Column("break_even_steps", "steps to pay back compilation", ".0f"),
]


def _make(dim: int, width: int, config: JKOConfig, seed: int) -> blocks.Block:
    torch.manual_seed(seed)
    name = config.block_type(0, dim)
    return blocks.make(name, dim=dim, width=width, depth=config.depth_for(name))


def _step(block: blocks.Block, x: torch.Tensor, config: JKOConfig, stepper: Stepper) -> Callable[[], None]:
    optimizer = torch.optim.Adam(block.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        jko_loss(block, x, config.h0, config.train_steps, stepper=stepper).loss.backward()
        optimizer.step()

    return step


def _first(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def run(
    dims: tuple[int, ...] = (2, 8),
    width: int | None = None,
    batch: int | None = None,
    repeats: int = 10,
    backend: str = "inductor",
) -> Table:
    """Times eager and compiled training steps of the ``auto`` block at each
    dimension of ``dims``; ``backend`` is torch.compile's (tests use "eager")."""
    config = JKOConfig()
    width, batch = width or config.width, batch or BATCH
    title = f"(e) the compiled RK4 step ({backend}) on one JKO training step (width {width}, batch {batch})"
    table = Table("compile", title, COLUMNS)
    for dim in dims:
        table.rows.extend(_rows(dim, width, batch, repeats, backend, config))
    table.notes = [
        f"{torch.get_num_threads()} torch thread(s), float32, {config.train_steps} RK4 steps, median of "
        f"{repeats} steps (round-robin). 'steps to pay back': (first step − median) / (eager − median).",
    ]
    return table


def _rows(
    dim: int, width: int, batch: int, repeats: int, backend: str, config: JKOConfig
) -> list[dict[str, Any]]:
    x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(0))
    eager = _step(_make(dim, width, config, 0), x, config, rk4_step)
    compiled = _step(_make(dim, width, config, 0), x, config, CompiledStep(backend))
    first = {"eager": _first(eager), "compiled": _first(compiled)}
    second = _step(_make(dim, width, config, 1), x, config, CompiledStep(backend))
    first["compiled, new block"] = _first(second)
    seconds = interleaved_medians(
        {"eager": eager, "compiled": compiled, "compiled, new block": second}, repeats
    )
    block = f"{config.block_type(0, dim)}, d = {dim}"
    rows = []
    for name, median in seconds.items():
        saved = seconds["eager"] - median
        extra = max(first[name] - median, 0.0)  # a first step faster than the median costs nothing
        rows.append(
            {
                "block": block,
                "variant": name,
                "first_step_s": first[name],
                "ms_per_step": 1e3 * median,
                "speedup": seconds["eager"] / median,
                "break_even_steps": extra / saved if name != "eager" and saved > 0 else None,
            }
        )
    return rows
