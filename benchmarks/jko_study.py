"""Why does the JKO scheme stall? Per-block diagnostics over seeds and candidate cures.

Run: ``python -m benchmarks.jko_study --data checkerboard --seeds 0,1,2,3
--variants default,width64 --out runs/study`` (1 torch thread unless
``--threads``). For every variant (a set of :class:`jkoflow.JKOConfig` fields
changed from the defaults, :data:`VARIANTS`) and seed it trains a flow with
the configured pipeline (:func:`jkoflow.trainer.run_pipeline`, the default
command's) on ``load_split(data, n, seed)`` and records, per block of every
stage:

* the test NLL before and after the block, and, for data with a known density,
  the KL still left, KL_k = NLL_k − H with H = −E_test[log p_data]
  (otherwise the NLL: the same differences);
* its movement W_k = sqrt(E‖T_k(x) − x‖²), Ter(k) and its step h_k;
* its training curve: first and last loss, and the drop of the mean loss from
  the second-to-last to the last tenth of its steps against twice the
  standard error of the last tenth (``still_improving``: under-fitted when
  true, at a plateau when false), and the final KL and transport/h terms
  (``transport_share`` = (transport/h) / loss: a large share means the W2
  term holds the block back);
* its step-doubling change (validation NLL with the block at 2·steps minus at
  steps).

Writes ``study_blocks.csv`` (one row per variant, seed, stage and block),
``study.csv``/``study.md`` (per variant: mean ± sd over seeds of the final
test NLL and KL left, blocks, batches, seconds, the largest step-doubling
change) into ``--out``.

Reference: Xu, Cheng, Xie, JKO-iFlow, https://arxiv.org/abs/2212.14424.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jkoflow import JKOConfig, datasets
from jkoflow.config import FIRST_PASS
from jkoflow.records import JKOHistory
from jkoflow.trainer import JKOTrainer, run_pipeline

__all__ = ["VARIANTS", "block_rows", "curve_stats", "main", "study"]

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "width64": {"width": 64},
    "depth2": {"depth": 2},
    "iters2400": {"iters": 2400},
    "warm": {"warm_start": True},
    "lr0.02": {"lr": 0.02},
    "h0-1": {"h0": 1.0},
    "h0-20": {"h0": 20.0},
    "ter1e-3": {"ter_eps": 1e-3},
    "steps8": {"train_steps": 8, "eval_steps": 16},
    "reparam2": {"reparam_iters": 2},
    "refine2": {"refine": (2,)},
}
"""Candidate cures: JKOConfig fields changed from the defaults."""


def curve_stats(losses: Sequence[float]) -> dict[str, float | bool]:
    """First and last loss, and whether the mean of the last tenth of the steps
    is below the tenth before it by more than twice its standard error.

    >>> s = curve_stats([5.0 - 0.01 * i for i in range(100)])
    >>> s["still_improving"], round(s["last_drop"], 6)
    (True, 0.1)
    >>> curve_stats([1.0, 1.1] * 50)["still_improving"]
    False
    """
    x = np.asarray(losses, dtype=float)
    tenth = max(1, len(x) // 10)
    last, before = x[-tenth:], x[-2 * tenth : -tenth] if len(x) >= 2 * tenth else x[:tenth]
    drop = float(before.mean() - last.mean())
    noise = float(last.std(ddof=1) / math.sqrt(len(last))) if len(last) > 1 else 0.0
    return {
        "loss_first": float(x[0]),
        "loss_last": float(x[-1]),
        "last_drop": drop,
        "still_improving": bool(drop > 2 * noise),
    }


def _entropy(data: str, x_test: np.ndarray) -> float | None:
    """H = −E_test[log p_data], when the data have a known density."""
    return float(-datasets.target(data).log_prob(x_test).mean()) if datasets.is_target(data) else None


def block_rows(history: JKOHistory, nll_before: float, entropy: float | None) -> list[dict[str, Any]]:
    """One row per block of every stage of ``history`` (see the module docstring);
    ``nll_before`` is the test NLL of the flow before the stage's first block
    for the initial stage (the flow with no block)."""
    rows = []
    for s, stage in enumerate(history.stages):
        previous = nll_before if stage.kind in ("initial", "extend") else None
        for block in stage.blocks:
            steps = [r for r in history.iterations if r["stage"] == s and r["block"] == block.index]
            curve = curve_stats([r["loss"] for r in steps]) if steps else {}
            last = steps[-1] if steps else {}
            share = None
            if last and block.h and last["loss"]:
                share = last["transport"] / block.h / last["loss"]
            after = block.test_nll
            rows.append(
                {
                    "stage": stage.name,
                    "block": block.index + 1,
                    "h": block.h,
                    "movement": block.movement,
                    "ter": block.ter,
                    "nll_before": previous,
                    "nll_after": after,
                    "kl_left_before": None if previous is None or entropy is None else previous - entropy,
                    "kl_left_after": None if after is None or entropy is None else after - entropy,
                    "step_doubling_change": block.step_doubling_change,
                    "n_batches": block.n_batches,
                    "seconds": block.seconds,
                    **curve,
                    "kl_term_last": last.get("kl"),
                    "transport_share": share,
                }
            )
            previous = after
    return rows


def _run(
    data: str, n: int, seed: int, name: str, base: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Trains one variant on one seed; returns its block rows and its summary."""
    x_train, x_val, x_test = datasets.load_split(data, n=n, seed=seed)
    config = dataclasses.replace(JKOConfig(seed=seed, **{**FIRST_PASS, **base}), **VARIANTS[name])
    trainer = JKOTrainer(x_train, x_val, x_test, config=config)
    x = torch.as_tensor(x_test, dtype=torch.float32)
    with torch.no_grad():
        nll0 = float(-trainer.flow.log_prob(x).mean())
    start = time.perf_counter()
    run_pipeline(trainer)
    wall = time.perf_counter() - start
    entropy = _entropy(data, x_test)
    rows = [{"variant": name, "seed": seed, **r} for r in block_rows(trainer.history, nll0, entropy)]
    last = trainer.history.stages[-1]
    summary = {
        "variant": name,
        "seed": seed,
        "test_nll": last.test_nll,
        "kl_left": None if entropy is None else last.test_nll - entropy,
        "n_blocks": len(trainer.flow),
        "n_batches": trainer.history.n_batches,
        "train_seconds": trainer.history.train_seconds,
        "wall_seconds": wall,
        "max_step_doubling": max(abs(r["step_doubling_change"] or 0.0) for r in rows),
    }
    return rows, summary


def _mean_sd(values: Sequence[float]) -> str:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if not len(v):
        return "–"
    return f"{v.mean():.4f} ± {v.std(ddof=1):.4f}" if len(v) > 1 else f"{v[0]:.4f}"


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _markdown(summaries: list[dict[str, Any]], seeds: Sequence[int]) -> str:
    head = "| variant | test NLL | KL left | blocks | batches | train s | max \\|step-doubling\\| |"
    lines = [f"Mean ± sd over seeds {', '.join(map(str, seeds))}.", "", head, "|" + " --- |" * 7]
    for name in dict.fromkeys(s["variant"] for s in summaries):
        group = [s for s in summaries if s["variant"] == name]
        cells = [_mean_sd([s[k] for s in group]) for k in ("test_nll", "kl_left")]
        cells += [f"{np.mean([s[k] for s in group]):.1f}" for k in ("n_blocks", "n_batches", "train_seconds")]
        cells.append(f"{max(s['max_step_doubling'] for s in group):.1e}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def study(
    data: str,
    seeds: Sequence[int],
    variants: Sequence[str],
    n: int,
    out: Path,
    base: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Runs every variant on every seed, writes the tables; returns the summaries.
    ``base``: JKOConfig fields changed for every variant (e.g. a shorter run)."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    out.mkdir(parents=True, exist_ok=True)
    rows, summaries = [], []
    for name in variants:
        for seed in seeds:
            block, summary = _run(data, n, seed, name, base or {})
            rows += block
            summaries.append(summary)
            print(f"{name} seed {seed}: test NLL {summary['test_nll']:.4f}, {summary['n_blocks']} blocks")
            _write_csv(out / "study_blocks.csv", rows)  # kept up to date as the study goes
    _write_csv(out / "study.csv", summaries)
    (out / "study.md").write_text(_markdown(summaries, seeds))
    return summaries


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.jko_study", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--data", default="checkerboard")
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument(
        "--variants", default="default", help=f"comma-separated subset of {','.join(VARIANTS)}"
    )
    parser.add_argument("--n-samples", type=int, default=120_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=None, help="Adam steps per block for every variant")
    parser.add_argument("--out", default="runs/study")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    base = {} if args.iters is None else {"iters": args.iters}
    try:
        variants = args.variants.split(",")
        summaries = study(args.data, seeds, variants, args.n_samples, Path(args.out), base)
    except ValueError as error:
        print(f"jko_study: error: {error}", file=sys.stderr)
        return 2
    print(_markdown(summaries, seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
