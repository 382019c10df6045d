"""Figures of a run: per-block movement W_k and samples. Reads histories and
arrays only; never trains. Uses matplotlib's object API (no pyplot state), so
it works headless and leaves the caller's backend alone."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from matplotlib.figure import Figure

__all__ = ["plot_samples", "plot_w2_per_block"]


def plot_w2_per_block(history: dict[str, Any], path: str | os.PathLike) -> None:
    """Bars of W_k = sqrt(E‖T_k(x) − x‖²) per block with Ter(k) and the
    validation NLL after each block, from a history dict (``JKOHistory.to_dict``)."""
    records = history["blocks"]
    k = np.arange(1, len(records) + 1)
    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    axes[0].bar(k, [r["w2"] for r in records], color="tab:blue")
    for x, r in zip(k, records, strict=True):
        axes[0].annotate(f"h={r['h']:.2g}", (x, r["w2"]), ha="center", va="bottom", fontsize=8)
    axes[0].set(xlabel="block k", ylabel="$W_k$", title="per-block movement $W_k$ (validation)")
    eps = history["config"].get("ter_eps")
    axes[1].semilogy(k, [r["ter"] for r in records], "o-", color="tab:orange")
    if eps is not None:
        axes[1].axhline(eps, color="gray", ls="--", label=f"stop at Ter < {eps:g}")
        axes[1].legend()
    axes[1].set(xlabel="block k", ylabel="Ter(k)", title="relative movement Ter(k)")
    axes[2].plot(k, [r["val_nll"] for r in records], "o-", label="validation")
    if all("test_nll" in r for r in records):
        axes[2].plot(k, [r["test_nll"] for r in records], "s--", label="test")
    axes[2].set(xlabel="block k", ylabel="NLL (nats)", title="NLL after block k")
    axes[2].legend()
    for ax in axes:
        ax.set_xticks(k)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_samples(
    data: np.ndarray,
    model: np.ndarray,
    latent: np.ndarray,
    path: str | os.PathLike,
    dims: tuple[int, int] = (0, 1),
) -> None:
    """Three panels: data, model samples T⁻¹(z), and the data pushed to the
    latent space T(x) (which should look like N(0, I)). 2-D histograms of the
    coordinates ``dims``."""
    i, j = dims
    fig = Figure(figsize=(12, 4))
    axes = fig.subplots(1, 3)
    lim = float(np.quantile(np.abs(np.concatenate([data[:, [i, j]], model[:, [i, j]]])), 0.999)) * 1.05
    panels = [
        (data, "data", lim),
        (model, "model samples $T^{-1}(z)$", lim),
        (latent, "pushed data $T(x)$", 4.0),
    ]
    for ax, (points, title, bound) in zip(axes, panels, strict=True):
        ax.hist2d(
            points[:, i], points[:, j], bins=200, range=[[-bound, bound], [-bound, bound]], cmap="inferno"
        )
        ax.set(title=title, aspect="equal", xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
