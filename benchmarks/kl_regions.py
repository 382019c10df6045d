"""Where a flow's KL to a known density sits: by the data's log-density and by mixture component.

Run: ``python -m benchmarks.kl_regions RUN_DIR [RUN_DIR ...]`` on finished
runs whose data have a known density (a target spec, checkerboard,
8gaussians). On the run's own test split, with q the flow's density and p the
data's, the pointwise log-ratio r(x) = log p(x) − log q(x) has mean
KL(p ‖ q), the KL the run reports (:func:`jkoflow.metrics.data_kl`). The
script splits that mean:

* by the quintiles of log p (lowest density first): where the model is short
  of density (r > 0) or has more than the data (r < 0);
* for a Gaussian mixture (:class:`~jkoflow.datasets.targets.GaussianMixture`),
  over the points whose most likely component is j, and over the points
  *between* components, where no component's posterior reaches
  :data:`CLEAR_POSTERIOR`;
* and it states the mass the model puts where the data are rare: the
  fraction of model samples whose log p lies below the 1 % quantile of
  log p on the test split (1 % for a perfect model).

Writes a Markdown table to stdout (one row per run).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from jkoflow import datasets
from jkoflow.datasets.targets import GaussianMixture, Target
from jkoflow.errors import InputError
from jkoflow.flow import Flow
from jkoflow.run import RunFiles, load_data

__all__ = ["CLEAR_POSTERIOR", "KLRegions", "kl_regions", "main", "markdown", "rare_mass", "run_regions"]

CLEAR_POSTERIOR = 0.99
"""A point is *between* components when no component's posterior reaches this."""

QUANTILES = 5
"""The number of equal-count bins of log p."""

RARE_QUANTILE = 0.01
"""The data's log-density quantile under which a point counts as rare."""


class KLRegions(NamedTuple):
    """The KL of a flow split by region (nats; every entry a mean of r = log p − log q).

    ``kl``: over all points; ``by_quantile``: over the :data:`QUANTILES` equal-count
    bins of log p, lowest first; ``by_component``: over the points whose most
    likely mixture component is j (empty for other targets); ``between``: (share
    of points, mean r) over the points between components (None for other
    targets); ``rare_mass``: the model's mass below the data's 1 % quantile.
    """

    kl: float
    by_quantile: list[float]
    by_component: list[float]
    between: tuple[float, float] | None
    rare_mass: float


def rare_mass(flow: Flow, target: Target, threshold: float, n: int, seed: int) -> float:
    """The fraction of ``n`` samples of ``flow`` with log p below ``threshold``."""
    with torch.no_grad():
        samples = flow.sample(n, torch.Generator().manual_seed(seed))
    return float(np.mean(target.log_prob(samples.double().numpy()) < threshold))


def kl_regions(
    flow: Flow, target: Target, x: np.ndarray, n_samples: int = 20_000, seed: int = 0
) -> KLRegions:
    """The split of KL(p ‖ flow) on the points ``x`` (n, d) drawn from ``target``."""
    log_p = target.log_prob(x)
    with torch.no_grad():
        log_q = flow.log_prob(torch.as_tensor(x, dtype=flow.shift.dtype)).double().numpy()
    r = log_p - log_q
    bins = np.array_split(np.argsort(log_p, kind="stable"), QUANTILES)
    by_quantile = [float(r[b].mean()) for b in bins]
    by_component: list[float] = []
    between = None
    if isinstance(target, GaussianMixture):
        joint = target.joint_log_probs(x)
        posterior = np.exp(joint - log_p[:, None])
        nearest = joint.argmax(axis=1)
        by_component = [float(r[nearest == j].mean()) for j in range(len(target.weights))]
        mixed = posterior.max(axis=1) < CLEAR_POSTERIOR
        between = (float(mixed.mean()), float(r[mixed].mean()) if mixed.any() else 0.0)
    rare = rare_mass(flow, target, float(np.quantile(log_p, RARE_QUANTILE)), n_samples, seed)
    return KLRegions(float(r.mean()), by_quantile, by_component, between, rare)


def run_regions(root: str | Path, n_samples: int = 20_000) -> KLRegions:
    """:func:`kl_regions` of the finished run in ``root`` on its test split."""
    files = RunFiles(root).require()
    data = files.data_config()
    if not datasets.is_target(data.name):
        raise InputError(f"{root}: its data {data.name!r} have no known density")
    _, _, x_test = load_data(data)
    return kl_regions(files.load_flow(), datasets.target(data.name), x_test, n_samples, data.seed)


def markdown(rows: dict[str, KLRegions]) -> str:
    """One table row per run: KL, the quintile split, the component split, between, rare mass."""
    head = "| run | KL | by log p quintile (low → high) | by component | between: share, KL | rare mass |"
    lines = [head, "| --- | --- | --- | --- | --- | --- |"]
    for name, found in rows.items():
        cells: list[Any] = [
            f"{found.kl:.4f}",
            " / ".join(f"{v:+.4f}" for v in found.by_quantile),
            " / ".join(f"{v:+.4f}" for v in found.by_component) or "–",
            f"{found.between[0]:.3f}, {found.between[1]:+.4f}" if found.between else "–",
            f"{found.rare_mass:.4f} (data {RARE_QUANTILE:g})",
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.kl_regions", description=__doc__.split("\n")[0]
    )
    parser.add_argument("runs", nargs="+", help="finished run directories")
    parser.add_argument("--samples", type=int, default=20_000, help="model samples for the rare mass")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        rows = {run: run_regions(run, args.samples) for run in args.runs}
    except InputError as error:  # a missing, unfinished or unknown-density run: one line
        print(f"kl_regions: {error}", file=sys.stderr)
        return 2
    print(markdown(rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
