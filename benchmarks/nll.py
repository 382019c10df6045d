r"""(d) Time to NLL: the JKO flow vs monolithic OT-Flow on checkerboard, by
:func:`jkoflow.compare.compare` (same split, seed, metrics; ``compare.md``
states when each method reached the other's NLL).

At the trainers' defaults this takes about 30 minutes on 2 CPU cores, so it is
not part of the default suite; ``budget_batches`` gives both the same reduced
mini-batch budget (JKO: ``max_batches``, OT-Flow: ``iters``), as
``jkoflow compare --budget-batches`` does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from jkoflow import JKOConfig, OTFlowConfig
from jkoflow.compare import compare
from jkoflow.config import DataConfig
from jkoflow.otflow import OTFLOW_PRESETS

from .common import Column, Table

__all__ = ["SIZES", "run"]

SIZES = {
    "full": {"budget_batches": 0},
    "quick": {"budget_batches": 200, "n_samples": 20_000},
    "smoke": {"budget_batches": 4, "n_samples": 2_000, "width": 8, "batch_size": 64},
}

COLUMNS = [
    Column("method", "method"),
    Column("test_nll", "test NLL", ".4f"),
    Column("n_batches", "mini-batches"),
    Column("train_seconds", "train s", ".0f"),
    Column("mmd2", "MMD²", ".2e"),
    Column("w2", "W2", ".4f"),
]


def run(
    out: str | Path,
    budget_batches: int = 0,
    n_samples: int | None = None,
    width: int | None = None,
    batch_size: int | None = None,
    data: str = "checkerboard",
    seed: int = 0,
) -> Table:
    """Runs ``compare`` into ``out/compare-<data>`` (overwriting) and returns its table."""
    data_config = DataConfig(name=data, seed=seed, **({"n_samples": n_samples} if n_samples else {}))
    shared = {k: v for k, v in (("width", width), ("batch_size", batch_size)) if v}
    jko = JKOConfig(seed=seed, **shared, **({"max_batches": budget_batches} if budget_batches else {}))
    ot = OTFlowConfig(
        seed=seed,
        **{**OTFLOW_PRESETS.get(data, {}), **shared},
        **({"iters": budget_batches} if budget_batches else {}),
    )
    root = Path(out) / f"compare-{data}"
    rows = compare(root, data_config, jko, ot, torch.get_num_threads(), overwrite=True, progress=False)
    budget = f"{budget_batches} mini-batches each" if budget_batches else "the trainers' defaults"
    table = Table("nll", f"(d) time to NLL on {data}, {budget}", COLUMNS, rows)
    lines = (root / "compare.md").read_text().splitlines()
    table.notes = [line for line in lines if line.startswith(("OT-Flow", "jkoflow", "Test NLL"))]
    table.notes.append(f"Run directories and compare.png: {root}.")
    return table
