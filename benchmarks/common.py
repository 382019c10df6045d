"""Timing, GEMM reference rate and result tables shared by the benchmarks."""

from __future__ import annotations

import csv
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["BATCH", "Column", "Table", "gemm", "interleaved_medians", "median_seconds"]

BATCH = 2048
"""Mini-batch of the per-step benchmarks (step, memory, compile): OT-Flow's
published batch, so both trainers' steps are timed on the same rows. It is
fixed here, not read from ``JKOConfig``, so the tables do not move when the
trainer's defaults do."""


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    return interleaved_medians({"fn": fn}, repeats, warmup)["fn"]


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function, timed round-robin (one call of each per round), so
    that on a shared machine every function sees the same load and their ratios hold."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def gemm(rows: int, inner: int, cols: int, dtype: torch.dtype) -> tuple[Callable[[], Any], float]:
    """A ``torch.mm`` call of a (rows × inner) by an (inner × cols) matrix and its FLOPs
    2·rows·inner·cols (to time the machine's GEMM rate for that shape)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(rows, inner, generator=gen).to(dtype)
    b = torch.randn(inner, cols, generator=gen).to(dtype)
    return (lambda: torch.mm(a, b)), 2.0 * rows * inner * cols


@dataclass(frozen=True)
class Column:
    """A table column: ``key`` in the row dicts, ``header`` and a format spec for markdown."""

    key: str
    header: str
    fmt: str = ""

    def render(self, value: Any) -> str:
        if value is None or (isinstance(value, float) and value != value):
            return "–"
        return format(value, self.fmt) if self.fmt else str(value)


@dataclass
class Table:
    """Rows of one benchmark with its title, columns and notes (method, conditions)."""

    name: str
    title: str
    columns: list[Column]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(c.header for c in self.columns) + " |")
        lines.append("|" + " --- |" * len(self.columns))
        for row in self.rows:
            lines.append("| " + " | ".join(c.render(row.get(c.key)) for c in self.columns) + " |")
        if self.notes:
            lines += ["", *self.notes]
        return "\n".join(lines) + "\n"

    def write(self, out: Path) -> None:
        """Writes ``<name>.csv`` (every row key, full precision) and ``<name>.md``."""
        out.mkdir(parents=True, exist_ok=True)
        keys = list(dict.fromkeys(k for row in self.rows for k in row))
        with open(out / f"{self.name}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, keys)
            writer.writeheader()
            writer.writerows(self.rows)
        (out / f"{self.name}.md").write_text(self.markdown())
