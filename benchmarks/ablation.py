"""Ablation of the JKO stages: what each stage of the recipe buys, per data set.

``python -m benchmarks.ablation --data checkerboard,8gaussians,gmm:d=8,k=5,seed=0
--seeds 0,1,2,3`` trains the recipe (:data:`RECIPE`: the initial pass, one
reparametrisation iteration, one refinement stage with c = 2 and a free block,
every later stage with ``stage_iters`` Adam steps per block, then 600 steps
of joint fine-tuning) on each data set and seed and reads, from the run's
stage records, the flow after each stage:

* ``first pass``: the initial stage (blocks until Ter(k) < ε);
* ``+ reparam``, ``+ refine``, ``+ free block``, ``+ fine-tune``: after each
  later stage, at the same architecture (the stages retrain and split the
  same blocks);
* ``full recipe``: the flow the run returns, the best candidate by
  validation NLL (:class:`jkoflow.records.Selection`).

Each row states the test NLL and, for data with a known density, the KL left
(test NLL − H, H = −E_test[log p_data]), and the mini-batches and training
seconds spent up to that point; mean ± sd over the seeds. Writes
``ablation.csv`` (one row per data set, seed and row) and ``ablation.md``.

Reference: Xu, Cheng, Xie, JKO-iFlow, https://arxiv.org/abs/2212.14424
(reparametrisation, refinement and the free block).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jkoflow import JKOConfig, JKOHistory, datasets, train_jko

from .jko_study import _entropy, _mean_sd, _write_csv

__all__ = ["RECIPE", "STAGE_ROWS", "ablation", "main", "stage_rows"]

RECIPE: dict[str, Any] = {
    "reparam_iters": 1,
    "refine": (2,),
    "free_block": True,
    "stage_iters": 400,
    "finetune_iters": 600,
    "finetune_lr": 1e-3,
}
"""JKOConfig fields of the recipe (the defaults otherwise; every stage field is
given, so the recipe does not follow the block type's default stages)."""

STAGE_ROWS = {
    "initial": "first pass",
    "reparam": "+ reparam",
    "refine": "+ refine",
    "free": "+ free block",
    "finetune": "+ fine-tune",
}
"""Stage kind → the row it ends."""


def stage_rows(history: JKOHistory, entropy: float | None) -> list[dict[str, Any]]:
    """The ablation rows of one run: after each stage (the last of its kind),
    then the selected flow; batches and seconds are cumulative."""
    rows, batches, seconds = {}, 0, 0.0
    for stage in history.stages:
        batches, seconds = batches + stage.n_batches, seconds + stage.seconds
        if stage.kind in STAGE_ROWS and stage.blocks:
            rows[STAGE_ROWS[stage.kind]] = (stage.test_nll, batches, seconds)
    rows["full recipe"] = (history.selected.test_nll, batches, seconds)
    return [
        {
            "row": name,
            "test_nll": nll,
            "kl_left": None if entropy is None else nll - entropy,
            "n_batches": n,
            "train_seconds": s,
            "selected": history.selected.stage if name == "full recipe" else "",
        }
        for name, (nll, n, s) in rows.items()
    ]


def _markdown(rows: list[dict[str, Any]], seeds: Sequence[int]) -> str:
    lines = [
        f"Mean ± sd over seeds {', '.join(map(str, seeds))}; batches and seconds up to the row.",
        "",
        "| data | row | test NLL | KL left | batches | train s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for data in dict.fromkeys(r["data"] for r in rows):
        for name in dict.fromkeys(r["row"] for r in rows if r["data"] == data):
            group = [r for r in rows if r["data"] == data and r["row"] == name]
            cells = [_mean_sd([r[k] for r in group]) for k in ("test_nll", "kl_left")]
            cells += [f"{np.mean([r[k] for r in group]):.0f}" for k in ("n_batches", "train_seconds")]
            lines.append(f"| {data} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ablation(
    data: Sequence[str], seeds: Sequence[int], n: int, out: Path, base: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Trains the recipe on every data set and seed; writes and returns the
    rows. ``base``: JKOConfig fields changed on top of the recipe (a shorter run)."""
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for name in data:
        for seed in seeds:
            x_train, x_val, x_test = datasets.load_split(name, n=n, seed=seed)
            _, history = train_jko(
                x_train, x_val, x_test, config=JKOConfig(seed=seed, **{**RECIPE, **(base or {})})
            )
            found = stage_rows(history, _entropy(name, x_test))
            rows += [{"data": name, "seed": seed, **r} for r in found]
            print(f"{name} seed {seed}: " + ", ".join(f"{r['row']} {r['test_nll']:.4f}" for r in found))
            _write_csv(out / "ablation.csv", rows)  # kept up to date as it goes
    (out / "ablation.md").write_text(_markdown(rows, seeds))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ablation", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="checkerboard,8gaussians,gmm:d=8,k=5,seed=0")
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--n-samples", type=int, default=120_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/ablation")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = [d for d in args.data.split(";" if ";" in args.data else ",") if d]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = ablation(_join_specs(data), seeds, args.n_samples, Path(args.out))
    print(_markdown(rows, seeds))
    return 0


def _join_specs(parts: list[str]) -> list[str]:
    """Comma-split data names with target specs glued back: ``gmm:d=8``, ``k=5`` → ``gmm:d=8,k=5``."""
    names: list[str] = []
    for part in parts:
        if "=" in part and ":" not in part and names:
            names[-1] += "," + part
        else:
            names.append(part)
    return names


if __name__ == "__main__":
    sys.exit(main())
