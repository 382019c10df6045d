"""Figures of a run: per-block movement W_k and samples, from histories and
arrays; and, from :mod:`jkoflow.figures`, the figures drawn from a flow and
data (per-block pushforward, density, trajectories, corner plot). Never
trains. Uses matplotlib's object API (no pyplot state), so it works headless
and leaves the caller's backend alone."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

from .figures import plot_corner, plot_density, plot_pushforward, plot_trajectories, write_flow_figures
from .records import JKOHistory

__all__ = [
    "plot_comparison",
    "plot_corner",
    "plot_density",
    "plot_h_per_block",
    "plot_pushforward",
    "plot_samples",
    "plot_trajectories",
    "plot_validation_curve",
    "plot_w2_per_block",
    "write_flow_figures",
]


def plot_w2_per_block(history: dict[str, Any], path: str | os.PathLike) -> None:
    """Per-block movement W_k = sqrt(E‖T_k(x) − x‖²) (validation set) for every
    stage (initial pass, reparametrisation iterations, refinements), Ter(k), and
    the NLL: after each block for a single stage, after each stage otherwise.

    ``history`` is ``JKOHistory.to_dict()`` (or an older one with ``w2`` records)."""
    stages = JKOHistory.from_dict(history).stages
    fig = _figure(figsize=(14, 4))
    axes = fig.subplots(1, 3)
    if len(stages) == 1:
        records = stages[0]["blocks"]
        k = np.arange(1, len(records) + 1)
        axes[0].bar(k, [r.movement for r in records], color="tab:blue")
        for x, r in zip(k, records, strict=True):
            axes[0].annotate(f"h={r['h']:.2g}", (x, r.movement), ha="center", va="bottom", fontsize=8)
        axes[0].set_xticks(k)
    else:
        for stage, colour in zip(stages, _colours(len(stages)), strict=True):
            w2 = [r.movement for r in stage.blocks]
            label = f"{stage['name']} (spread {stage['spread']:.2f})"
            axes[0].plot(np.arange(1, len(w2) + 1), w2, "o-", color=colour, label=label, ms=4)
        axes[0].legend(fontsize=7)
    axes[0].set(xlabel="block k", ylabel="$W_k$", title="per-block movement $W_k$ (validation)")

    for stage, colour in zip(stages, _colours(len(stages)), strict=True):
        ter = [r["ter"] for r in stage["blocks"]]
        axes[1].semilogy(np.arange(1, len(ter) + 1), ter, "o-", color=colour, ms=4, label=stage["name"])
    eps = history["config"].get("ter_eps")
    if eps is not None:
        axes[1].axhline(eps, color="gray", ls="--", label=f"stop at Ter < {eps:g}")
    axes[1].legend(fontsize=7)
    axes[1].set(xlabel="block k", ylabel="Ter(k)", title="relative movement Ter(k)")

    if len(stages) == 1:
        records = stages[0]["blocks"]
        x, names = np.arange(1, len(records) + 1), None
        val = [r["val_nll"] for r in records]
        test = [r["test_nll"] for r in records] if all("test_nll" in r for r in records) else None
        axes[2].set(xlabel="block k", title="NLL after block k")
    else:
        x, names = np.arange(len(stages)), [s["name"] for s in stages]
        val = [s["val_nll"] for s in stages]
        test = [s["test_nll"] for s in stages] if all("test_nll" in s for s in stages) else None
        axes[2].set(title="NLL after each stage")
    axes[2].plot(x, val, "o-", label="validation")
    if test is not None:
        axes[2].plot(x, test, "s--", label="test")
    if names is not None:
        axes[2].set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    else:
        axes[2].set_xticks(x)
    axes[2].set(ylabel="NLL (nats)")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_h_per_block(history: dict[str, Any], path: str | os.PathLike) -> None:
    """Step size h_k per block for every stage (log scale)."""
    stages = JKOHistory.from_dict(history).stages
    fig = _figure(figsize=(6, 4))
    ax = fig.subplots()
    for stage, colour in zip(stages, _colours(len(stages)), strict=True):
        h = [r["h"] for r in stage["blocks"]]
        ax.semilogy(np.arange(1, len(h) + 1), h, "o-", color=colour, ms=4, label=stage["name"])
    ax.set(xlabel="block k", ylabel="$h_k$", title="JKO step size per block")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_validation_curve(history: dict[str, Any], path: str | os.PathLike) -> None:
    """Validation NLL of an OT-Flow run against mini-batches and seconds, from
    ``OTFlowHistory.to_dict()``; the kept (best) checkpoint is marked."""
    records, best = history["validations"], history.get("best") or {}
    fig = _figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], "n_batches", "mini-batches"), (axes[1], "seconds", "training seconds")):
        ax.plot([r[key] for r in records], [r["val_nll"] for r in records], "-", color="tab:red")
        if best:
            ax.plot([best[key]], [best["val_nll"]], "k*", ms=10, label=f"kept: {best['val_nll']:.4f}")
            ax.legend()
        ax.set(xlabel=label, ylabel="validation NLL (nats)")
    fig.suptitle("OT-Flow: validation NLL")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_comparison(
    curves: dict[str, dict[str, list[float]]], samples: dict[str, np.ndarray], path: str | os.PathLike
) -> None:
    """NLL against mini-batches and against seconds for several methods, and
    their samples side by side. ``curves[name]`` holds equal-length lists
    ``n_batches``, ``seconds`` and ``nll``."""
    fig = _figure(figsize=(4.2 * (2 + len(samples)), 4))
    axes = fig.subplots(1, 2 + len(samples))
    for (name, curve), colour in zip(curves.items(), ("tab:blue", "tab:red", "tab:green"), strict=False):
        for ax, key in ((axes[0], "n_batches"), (axes[1], "seconds")):
            ax.plot(
                curve[key],
                curve["nll"],
                "o-" if len(curve["nll"]) < 30 else "-",
                color=colour,
                label=name,
                ms=4,
            )
    axes[0].set(xlabel="mini-batches", ylabel="validation NLL (nats)", title="NLL vs mini-batches")
    axes[1].set(xlabel="training seconds", ylabel="validation NLL (nats)", title="NLL vs wall-clock")
    low = min(min(c["nll"]) for c in curves.values())
    for ax in axes[:2]:
        ax.set_ylim(low - 0.05, low + 1.0)
        ax.legend()
    lim = float(max(np.quantile(np.abs(x[:, :2]), 0.999) for x in samples.values())) * 1.05
    for ax, (name, x) in zip(axes[2:], samples.items(), strict=True):
        ax.hist2d(x[:, 0], x[:, 1], bins=200, range=[[-lim, lim], [-lim, lim]], cmap="inferno")
        ax.set(title=f"{name} samples", aspect="equal", xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _figure(figsize: tuple[float, float]) -> Figure:
    """A new matplotlib figure (matplotlib is imported here, at first use, not by ``import jkoflow``)."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def _colours(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return [cmap(v) for v in np.linspace(0.0, 0.85, max(n, 1))][:n]


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
    fig = _figure(figsize=(12, 4))
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
