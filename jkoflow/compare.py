"""``jkoflow compare``: a block-wise JKO flow and the monolithic OT-Flow
baseline trained on the same split and seed, measured with the same metrics.

Writes into the output directory: ``jko/`` and ``otflow/`` (ordinary run
directories), ``compare.csv``, ``compare.md`` and ``compare.png``.
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_path, atomic_write
from .config import DataConfig, JKOConfig
from .flow import Flow
from .metrics import KLResult, mmd2, nll_difference, wasserstein2
from .otflow import OTFlowConfig
from .plots import plot_comparison
from .run import (
    RunFiles,
    check_jko,
    check_otflow,
    load_data,
    read_json,
    run_jko,
    run_otflow,
    step_range,
    target_kl,
)
from .rundir import RunDir, check_out_path

__all__ = ["COLUMNS", "below_everywhere", "best_so_far", "compare", "time_to_reach", "write_comparison"]

COLUMNS = (
    "method",
    "test_nll",
    "step_doubling_change",
    "kl",
    "kl_stderr",
    "mmd2",
    "w2",
    "inversion_error",
    "n_parameters",
    "n_batches",
    "train_seconds",
    "sample_seconds_per_10k",
)


OUTPUTS = ("compare.csv", "compare.md", "compare.png")
"""The files a comparison writes next to its two run directories."""


def time_to_reach(curve: dict[str, list[float]], target: float) -> float | None:
    """The first ``seconds`` at which ``curve["nll"]`` is ≤ ``target`` (None if never)."""
    for seconds, value in zip(curve["seconds"], curve["nll"], strict=True):
        if value <= target:
            return seconds
    return None


def _jko_curve(history: dict[str, Any]) -> dict[str, list[float]]:
    """Validation NLL after every block of every stage, at cumulative batches/seconds."""
    curve: dict[str, list[float]] = {"n_batches": [], "seconds": [], "nll": [], "test_nll": []}
    batches = seconds = 0.0
    for stage in history["stages"]:
        for block in stage["blocks"]:
            batches, seconds = batches + block["n_batches"], seconds + block["seconds"]
            curve["n_batches"].append(batches)
            curve["seconds"].append(seconds)
            curve["nll"].append(block["val_nll"])
            curve["test_nll"].append(block.get("test_nll", np.nan))
    return curve


def _jko_checks(history: dict[str, Any]) -> dict[str, list[float]]:
    """The validation NLL at every early-stopping check of every block (the
    flow up to the block), at cumulative batches/seconds: jkoflow's curve in
    the comparison plot (the block ends, :func:`_jko_curve`, without checks)."""
    records = [r for r in history["iterations"] if "val_nll" in r]
    if not records:
        return _jko_curve(history)
    return {
        "n_batches": [r["n_batches"] for r in records],
        "seconds": [r["train_seconds"] for r in records],
        "nll": [r["val_nll"] for r in records],
    }


def best_so_far(curve: dict[str, list[float]], seconds: float) -> float:
    """The lowest ``curve["nll"]`` at or before ``seconds`` (inf before its first point)."""
    values = [v for t, v in zip(curve["seconds"], curve["nll"], strict=True) if t <= seconds]
    return min(values, default=float("inf"))


def below_everywhere(jko: dict[str, list[float]], otflow: dict[str, list[float]]) -> tuple[bool, float]:
    """Whether jkoflow's best validation NLL so far is below OT-Flow's at
    every OT-Flow validation time, and the largest gap jkoflow − OT-Flow
    there (negative: jkoflow is lower everywhere).

    >>> jko = {"seconds": [1.0, 5.0], "nll": [4.0, 3.5]}
    >>> below_everywhere(jko, {"seconds": [2.0, 6.0], "nll": [5.0, 3.6]})
    (True, -0.10000000000000009)
    """
    gaps = [best_so_far(jko, t) - best_so_far(otflow, t) for t in otflow["seconds"]]
    worst = max(gaps, default=float("nan"))
    return bool(gaps) and worst < 0, worst


def _otflow_curve(history: dict[str, Any]) -> dict[str, list[float]]:
    records = history["validations"]
    return {key: [r[key] for r in records] for key in ("n_batches", "seconds")} | {
        "nll": [r["val_nll"] for r in records]
    }


def compare(
    out: str | os.PathLike,
    data_config: DataConfig,
    jko_config: JKOConfig,
    otflow_config: OTFlowConfig,
    threads: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Trains both methods on the split of ``data_config`` into ``out/jko`` and
    ``out/otflow``, then writes the comparison (:func:`write_comparison`)."""
    root = check_out_path(out)
    RunDir.check_new(root, overwrite)
    splits = load_data(data_config)
    check_jko(root / "jko", data_config, jko_config, splits, overwrite)
    check_otflow(root / "otflow", otflow_config, splits, overwrite)
    with RunDir.create(root, "compare", overwrite) as run:
        for name in OUTPUTS:
            run.claim(name)
        run_jko(root / "jko", data_config, jko_config, splits, threads, overwrite, progress)
        run_otflow(root / "otflow", data_config, otflow_config, splits, threads, overwrite, progress)
        return write_comparison(root)


def write_comparison(out: str | os.PathLike, n_metric: int = 2000) -> list[dict[str, Any]]:
    """Reads the finished runs ``out/jko`` and ``out/otflow`` and writes
    ``compare.csv``, ``compare.md`` and ``compare.png``; returns the table rows
    (one dict per method, keys ``COLUMNS``).

    MMD² uses one Gaussian bandwidth for both methods (the median heuristic on
    the test data, stated in compare.md); W2 is exact (``ot.emd2``) between
    ``n_metric`` model samples and ``n_metric`` test points.
    """
    root = Path(out)
    runs = {"jkoflow": RunFiles(root / "jko").require(), "OT-Flow": RunFiles(root / "otflow").require()}
    data_config = runs["jkoflow"].data_config()
    x_test = load_data(data_config)[2]
    summaries = {name: read_json(files.summary) for name, files in runs.items()}
    n = min(n_metric, len(x_test) // 2)
    bandwidth = mmd2(x_test[:n], x_test[n : 2 * n]).bandwidth
    rows, samples, flows = [], {}, {}
    for name, files in runs.items():
        flow = flows[name] = files.load_flow()
        row, samples[name] = _method_row(name, flow, summaries[name], data_config, x_test, n, bandwidth)
        rows.append(row)
    jko_history = read_json(runs["jkoflow"].history)
    curves = {
        "jkoflow": _jko_curve(jko_history),
        "OT-Flow": _otflow_curve(read_json(runs["OT-Flow"].history)),
    }
    checks = {"jkoflow": _jko_checks(jko_history), "OT-Flow": curves["OT-Flow"]}
    with atomic_write(root / "compare.csv", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with atomic_path(root / "compare.png") as tmp:
        plot_comparison(checks, samples, tmp)
    paired = nll_difference(flows["jkoflow"], flows["OT-Flow"], x_test)
    text = _markdown(rows, curves, summaries, data_config, bandwidth, n, paired)
    below, gap = below_everywhere(checks["jkoflow"], checks["OT-Flow"])
    text += (
        f"\njkoflow's best validation NLL so far is {'below' if below else 'not below'} OT-Flow's at every "
        f"OT-Flow validation time (largest difference jkoflow − OT-Flow: {gap:+.4f} nats).\n"
    )
    with atomic_write(root / "compare.md") as handle:
        handle.write(text)
    return rows


def _method_row(
    name: str,
    flow: Flow,
    summary: dict[str, Any],
    data_config: DataConfig,
    x_test: np.ndarray,
    n: int,
    bandwidth: float,
) -> tuple[dict[str, Any], np.ndarray]:
    """One method's row of the table (keys ``COLUMNS``) and its 10 000 samples."""
    with torch.no_grad():
        start = time.perf_counter()
        drawn = flow.sample(10_000, generator=torch.Generator().manual_seed(data_config.seed)).cpu().numpy()
        sample_seconds = time.perf_counter() - start
    kl = target_kl(flow, data_config.name, x_test)
    row = {
        "method": name,
        "test_nll": summary["test_nll"],
        "step_doubling_change": summary["step_doubling_change"],
        "kl": kl.get("kl"),
        "kl_stderr": kl.get("kl_stderr"),
        "mmd2": mmd2(drawn[:n], x_test[:n], bandwidth=bandwidth).mmd2,
        "w2": wasserstein2(drawn[:n], x_test[:n], method="exact").value,
        "inversion_error": summary["inversion_error"],
        "n_parameters": summary["n_parameters"],
        "n_batches": summary["n_batches"],
        "train_seconds": summary["train_seconds"],
        "sample_seconds_per_10k": sample_seconds,
    }
    return row, drawn


def _timing(
    rows: list[dict[str, Any]],
    curves: dict[str, dict[str, list[float]]],
    summaries: dict[str, dict[str, Any]],
) -> list[str]:
    """When each method reached the other's NLL, for compare.md."""
    target = summaries["OT-Flow"]["test_nll"]
    best = summaries["OT-Flow"]["best"]
    jko_curve = dict(curves["jkoflow"], nll=curves["jkoflow"]["test_nll"])
    reached = time_to_reach(jko_curve, target)
    lines = [
        f"OT-Flow kept its best validation checkpoint at {best['n_batches']} batches, "
        f"{best['seconds']:.0f} s (test NLL {target:.4f})."
    ]
    if reached is None:
        lines.append(f"jkoflow did not reach that test NLL ({rows[0]['test_nll']:.4f} at the end).")
    else:
        ratio = reached / best["seconds"] if best["seconds"] > 0 else float("inf")
        lines.append(
            f"jkoflow reached test NLL ≤ {target:.4f} after {reached:.0f} s of training: "
            f"{ratio:.2f} × OT-Flow's time to its best checkpoint."
        )
    jko_val = curves["jkoflow"]["nll"][-1]
    caught = time_to_reach(curves["OT-Flow"], jko_val)
    jko_seconds = curves["jkoflow"]["seconds"][-1]
    if caught is None:
        lines.append(f"OT-Flow's validation NLL never reached jkoflow's final {jko_val:.4f}.")
    else:
        lines.append(
            f"OT-Flow's validation NLL first reached jkoflow's final {jko_val:.4f} after {caught:.0f} s "
            f"(jkoflow: {jko_seconds:.0f} s, ratio {caught / jko_seconds:.1f})."
        )
    return lines


def _markdown(
    rows: list[dict[str, Any]],
    curves: dict[str, dict[str, list[float]]],
    summaries: dict[str, dict[str, Any]],
    data_config: DataConfig,
    bandwidth: float,
    n: int,
    paired: KLResult,
) -> str:
    steps = {name: "–".join(dict.fromkeys(map(str, step_range(s)))) for name, s in summaries.items()}
    has_kl = rows[0]["kl"] is not None
    kl_head, kl_rule = (" KL(data ‖ model) (nats) |", " --- |") if has_kl else ("", "")
    lines = [
        f"# jkoflow vs OT-Flow on {data_config.name} (seed {data_config.seed})",
        "",
        f"| method | test NLL (nats) | NLL change at 2× steps |{kl_head} MMD² | W2 | inversion error "
        "| params | mini-batches | train s | sample s / 10k |",
        f"| --- | --- | --- |{kl_rule} --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        kl = f" {r['kl']:.4f} ± {r['kl_stderr']:.4f} |" if has_kl else ""
        lines.append(
            f"| {r['method']} | {r['test_nll']:.4f} | {r['step_doubling_change']:+.4f} |{kl} "
            f"{r['mmd2']:.2e} | {r['w2']:.4f} | "
            f"{r['inversion_error']:.1e} | {r['n_parameters']} | {r['n_batches']} | "
            f"{r['train_seconds']:.0f} | {r['sample_seconds_per_10k']:.2f} |"
        )
    lines += [
        "",
        f"Test NLL with {steps['jkoflow']} (jkoflow, per block) and {steps['OT-Flow']} (OT-Flow) RK4 steps, "
        "Gaussian constant included; the next column is the NLL at twice those steps minus it "
        f"(first {summaries['jkoflow']['step_check_rows']} test points). "
        "MMD²: unbiased, Gaussian kernel with bandwidth "
        f"σ = {bandwidth:.4f} (median heuristic on the test data), {n} model samples vs {n} test points. "
        f"W2: exact (POT `ot.emd2`), {n} vs {n} points."
        + (
            " KL(data ‖ model) = E[log p_data − log p_model] over the test split "
            "(exact data density), ± its standard error."
            if has_kl
            else ""
        ),
        "",
        f"Test NLL jkoflow − OT-Flow: {paired.value:+.4f} ± {paired.stderr:.4f} nats "
        f"(paired over the {paired.n} test points, ± one standard error).",
        "",
    ]
    lines += _timing(rows, curves, summaries)
    return "\n".join(lines) + "\n"
