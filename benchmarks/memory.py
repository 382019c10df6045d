r"""(c) Peak memory while training block k, k = 1..K: it must not grow with k.

Block k trains on samples of p_{k−1} cached after pushing the data through the
frozen blocks 1..k−1 (docs/design.md, "The JKO step"), so nothing of the earlier blocks is on the
autograd tape. Each block is added by one incremental call
``train_jko(x, flow=flow, config=JKOConfig(max_blocks=k))`` (push the sets
through the flow so far, train block k, push them through block k).

Method: torch's CPU allocator reports every allocation and free to the
profiler (``torch.profiler.profile(profile_memory=True)``); the exported trace
carries the running total of bytes allocated since the profiler started, and
its maximum is the peak of the memory the call allocated on top of what was
already alive. Process RSS (``ru_maxrss``) cannot be reset between blocks and
is dominated by the torch libraries, and tracemalloc does not see torch's
allocator, so neither can show growth with k.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from jkoflow import JKOConfig, datasets, train_jko
from jkoflow.config import FIRST_PASS

from .common import BATCH, Column, Table

__all__ = ["SIZES", "peak_allocated", "run"]

SIZES = {
    "full": {"n_blocks": 6, "n_samples": 20_000, "iters": 10},
    "quick": {"n_blocks": 4, "n_samples": 2_000, "iters": 2},
    "smoke": {"n_blocks": 2, "n_samples": 400, "iters": 2, "width": 8, "batch_size": 64},
}

COLUMNS = [
    Column("block", "block k"),
    Column("peak_mb", "peak allocated MB", ".1f"),
    Column("of_block_1", "÷ block 1", ".3f"),
    Column("seconds", "seconds", ".1f"),
]


def peak_allocated(fn: Callable[[], object]) -> tuple[float, object]:
    """Peak bytes allocated by torch's CPU allocator during ``fn()`` (above what was alive
    before it), read from the profiler's memory events; returns ``(bytes, fn())``."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return float(max(totals, default=0)), result


def run(
    n_blocks: int = 6,
    n_samples: int = 20_000,
    iters: int = 10,
    width: int | None = None,
    batch_size: int | None = None,
    data: str = "checkerboard",
    seed: int = 0,
) -> Table:
    """Trains ``n_blocks`` blocks one call at a time and records each call's peak."""
    base = JKOConfig()
    options = {"width": width or base.width, "batch_size": batch_size or BATCH}
    x = datasets.load(data, n=n_samples, seed=seed)
    x_train, x_val, _ = datasets.split(x, seed=seed)
    title = (
        f"(c) peak memory while training block k ({data}, width {options['width']}, "
        f"batch {options['batch_size']}, {iters} Adam steps per block)"
    )
    table = Table("memory", title, COLUMNS)
    flow = None
    for k in range(1, n_blocks + 1):
        config = JKOConfig(max_blocks=k, iters=iters, ter_eps=1e-12, seed=seed, **{**FIRST_PASS, **options})
        start = time.perf_counter()
        peak, (flow, _) = peak_allocated(lambda f=flow, c=config: train_jko(x_train, x_val, flow=f, config=c))
        seconds = time.perf_counter() - start
        table.rows.append({"block": k, "peak_bytes": peak, "peak_mb": peak / 2**20, "seconds": seconds})
    first = table.rows[0]["peak_bytes"]
    for row in table.rows:
        row["of_block_1"] = row["peak_bytes"] / first
    table.notes = [
        f"{len(x_train)} training and {len(x_val)} validation points; {torch.get_num_threads()} torch "
        "thread(s), float32. Peak: maximum of torch's CPU-allocator total during the call "
        "(torch.profiler memory events), above the memory alive before it; each call pushes the data "
        "through the k − 1 frozen blocks, trains block k and pushes the data through it. Seconds include "
        "the profiler's overhead.",
    ]
    return table
