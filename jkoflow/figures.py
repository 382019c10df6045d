"""Figures that look inside a flow: the per-block pushforward and pullback,
the density (d = 2), trajectories through every block and a corner plot
(d > 2). The numbers come from :mod:`jkoflow.inspect`; this module only draws
them with matplotlib's object API (no pyplot state, imported when a figure
is drawn), so it works headless and leaves the caller's backend alone.

Every ``plot_*`` function takes a flow and data and returns the
:class:`matplotlib.figure.Figure`; :func:`write_flow_figures` draws all that
apply and writes them into a directory (what ``jkoflow train``, ``otflow``
and ``plot`` do). Points are subsampled (``max_points``) and grids kept
coarse so that the figures cost a small fraction of a run.

Example:
    >>> import torch, blocks, jkoflow
    >>> from jkoflow.figures import plot_pushforward
    >>> flow = jkoflow.Flow(2, [blocks.make("otflow", dim=2, width=8) for _ in range(3)], steps=2)
    >>> fig = plot_pushforward(flow, torch.randn(200, 2))
    >>> len(fig.axes), fig.axes[1].get_title().splitlines()[0]  # 2 rows of 4 panels
    (8, '1 block')
"""

from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from . import datasets
from .atomic import atomic_path
from .errors import InputError
from .flow import Flow, as_data_tensor
from .inspect import (
    Trajectories,
    density_grid,
    panel_indices,
    parent_boundaries,
    principal_axes,
    project,
    pullback,
    pushforward,
    trajectories,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "FIGURE_FILES",
    "PATH_STEPS",
    "flow_figure_names",
    "plot_corner",
    "plot_density",
    "plot_pushforward",
    "plot_trajectories",
    "save_figure",
    "write_flow_figures",
]

FIGURE_FILES = MappingProxyType(
    {
        "pushforward": "blocks_pushforward.png",
        "trajectories": "trajectories.png",
        "density": "density.png",
        "corner": "corner.png",
    }
)
"""File names of the figures :func:`write_flow_figures` writes."""


def _subsample(x: Tensor, n: int, seed: int) -> Tensor:
    """At most ``n`` rows of ``x``, chosen at random with a seeded generator."""
    if len(x) <= n:
        return x
    keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[keep.to(x.device)]


def _normal(flow: Flow, n: int, seed: int) -> Tensor:
    """n seeded N(0, I) samples in the flow's dtype, on its device."""
    z = torch.randn(n, flow.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return z.to(flow.shift)


def _numpy(x: Tensor) -> np.ndarray:
    return x.detach().double().cpu().numpy()


def _limit(points: list[np.ndarray]) -> float:
    """A symmetric axis limit holding 99.5 % of every panel's points and N(0, I)'s 3σ."""
    return 1.05 * max(3.0, *(float(np.quantile(np.abs(p), 0.995)) for p in points))


def _scatter(ax: Axes, points: np.ndarray, title: str, lim: float, colour: str) -> None:
    ax.scatter(points[:, 0], points[:, 1], s=1.0, alpha=0.4, color=colour, lw=0, rasterized=True)
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xticks=[], yticks=[])
    ax.set_title(title, fontsize=8)


def plot_pushforward(
    flow: Flow, x: Any, max_panels: int = 8, max_points: int = 3000, seed: int = 0
) -> Figure:
    """Two rows of panels after k = 0, …, L blocks (all when L + 1 ≤
    ``max_panels``, else evenly chosen, at parent-block boundaries for a
    refined flow, always with 0 and L). Top: the data pushed, z_k, titled with
    W_k and the NLL of the first k blocks on those points. Bottom: N(0, I)
    pulled back, the model's z_k. For d > 2 every panel shows the same
    projection on the first two principal axes of z_0 = S(x)."""
    from matplotlib.figure import Figure

    x = as_data_tensor(x, flow.dim, flow.shift)
    axes_2d = principal_axes(flow.standardize(x)[0])
    x = _subsample(x, max_points, seed)
    pushed = pushforward(flow, x)
    pulled = pullback(flow, _normal(flow, len(x), seed + 1))
    ks = panel_indices(len(flow), max_panels, parent_boundaries(flow))
    rows = [[_numpy(project(states[k], axes_2d)) for k in ks] for states in (pushed.states, pulled)]
    lim = _limit(rows[0] + rows[1])
    fig = Figure(figsize=(max(2.2 * len(ks), 5.5), 5.2), layout="constrained")
    grid = fig.subplots(2, len(ks), squeeze=False)
    for col, k in enumerate(ks):
        moved = "" if k == 0 else f"$W_{{{k}}}$={float(pushed.movement[k - 1]):.3g}  "
        title = f"{k} block{'s' * (k != 1)}\n{moved}NLL={float(pushed.nll[k]):.3f}"
        _scatter(grid[0, col], rows[0][col], title, lim, "tab:blue")
        _scatter(grid[1, col], rows[1][col], f"model $z_{{{k}}}$", lim, "tab:red")
    where = "" if flow.dim == 2 else "\nprojected on the first two principal axes of the data"
    grid[0, 0].set_ylabel("data → latent", fontsize=8)
    grid[1, 0].set_ylabel("N(0, I) → data", fontsize=8)
    count = f"{len(flow)} block{'s' * (len(flow) != 1)}"
    fig.suptitle(f"per-block pushforward of {len(x)} points, {count}{where}", fontsize=9)
    return fig


PATH_STEPS = 8
"""At least this many RK4 steps per block for the trajectories, so that a
flow evaluated with few steps (a refined flow's slices) still shows curves."""


def _colour_key(fig: Figure, ax: Axes, n_blocks: int, colours: list) -> None:
    """A colour bar with one colour per block."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.ticker import MaxNLocator

    norm = BoundaryNorm(np.arange(0.5, n_blocks + 1.5), n_blocks)
    bar = fig.colorbar(ScalarMappable(norm, ListedColormap(colours)), ax=ax, fraction=0.046)
    ticks = MaxNLocator(nbins=8, integer=True, min_n_ticks=1).tick_values(1, n_blocks)
    bar.set_ticks([t for t in ticks if 1 <= t <= n_blocks])
    bar.set_label("block k", fontsize=8)
    bar.ax.tick_params(labelsize=7)


def _straightness_bars(ax: Axes, flow: Flow, paths: Trajectories, colours: list) -> None:
    """Straightness per block, or per parent block for a refined flow."""
    from matplotlib.ticker import MaxNLocator

    boundaries = parent_boundaries(flow)
    refined = len(boundaries) < len(flow) + 1
    values = _numpy(paths.straightness(boundaries if refined else None))
    k = np.arange(1, len(values) + 1)
    firsts = boundaries[:-1] if refined else range(len(flow))
    ax.bar(k, values - 1.0, bottom=1.0, color=[colours[i] for i in firsts], width=0.8)
    if len(values) <= 16:
        for kk, value in zip(k, values, strict=True):
            ax.annotate(f"{value:.4f}", (kk, value), ha="center", va="bottom", fontsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=16))
    what = "parent block (its time slices together)" if refined else "block k"
    ax.set(xlabel=what, ylabel="path length / end-to-end distance", title="straightness (1 = straight)")


def plot_trajectories(flow: Flow, x: Any, n_paths: int = 300, seed: int = 0) -> Figure:
    """Left: ``n_paths`` paths of S(x) through every block (polylines through
    the points of an RK4 grid of max(:data:`PATH_STEPS`, the flow's largest
    per-block count) steps per block, projected as in
    :func:`plot_pushforward` for d > 2), each block's
    part in its own colour. Right: the measured straightness, mean path length
    / mean end-to-end distance (1 = straight), of each block, or of each parent
    block of a refined flow."""
    import matplotlib
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    x = as_data_tensor(x, flow.dim, flow.shift)
    axes_2d = principal_axes(flow.standardize(x)[0])
    paths = trajectories(
        flow, _subsample(x, n_paths, seed), steps=max(PATH_STEPS, flow.steps, *flow.step_counts)
    )
    flat = _numpy(project(paths.paths, axes_2d))  # (L, steps + 1, n, 2)
    colours = [matplotlib.colormaps["viridis"](v) for v in np.linspace(0.0, 0.9, max(len(flow), 1))]
    fig = Figure(figsize=(11, 4.6), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=(1.2, 1))
    for k, colour in enumerate(colours[: len(flow)]):
        segments = flat[k].transpose(1, 0, 2)  # (n, steps + 1, 2): one polyline per path
        left.add_collection(LineCollection(segments, colors=[colour], linewidths=0.5, alpha=0.6))
    if len(flow):
        left.plot(flat[0, 0, :, 0], flat[0, 0, :, 1], ".", ms=1.5, color="k", label="start")
        left.autoscale()
        _colour_key(fig, left, len(flow), colours)
        _straightness_bars(right, flow, paths, colours)
    left.set(aspect="equal", title=f"{flat.shape[2]} trajectories, coloured by block")
    return fig


def _box(x: np.ndarray, margin: float = 0.15) -> tuple[tuple[float, float], tuple[float, float]]:
    """The 0.1 %–99.9 % quantile box of 2-D points, widened by ``margin`` on each side."""
    lo, hi = np.quantile(x, 0.001, axis=0), np.quantile(x, 0.999, axis=0)
    pad = margin * (hi - lo)
    return ((lo[0] - pad[0], hi[0] + pad[0]), (lo[1] - pad[1], hi[1] + pad[1]))


def plot_density(
    flow: Flow, x: Any, target: str | None = None, cells: int = 80, span: float = 12.0
) -> Figure:
    """d = 2: the model's log-density on ``cells`` × ``cells`` cells over the
    data's box, beside the true log-density when ``target`` names a data set
    with a known density (:func:`jkoflow.datasets.is_target`), and the data's
    histogram (density) on the same cells. Log-densities share a colour scale
    clipped ``span`` nats below the model's maximum."""
    from matplotlib.figure import Figure

    data = _numpy(as_data_tensor(x, flow.dim, flow.shift))
    grid = density_grid(flow, _box(data), cells)
    extent = (*grid.x_edges[[0, -1]], *grid.y_edges[[0, -1]])
    top = float(grid.log_prob.max())
    panels = [(grid.log_prob, f"model log-density (mass on the box {grid.mass():.3f})")]
    if target is not None and datasets.is_target(target):
        truth = datasets.target(target).log_prob(grid.centres()).reshape(grid.log_prob.shape)
        panels.append((truth, f"true log-density of {target}"))
    fig = Figure(figsize=(4.4 * (len(panels) + 1), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels) + 1, squeeze=False)[0]
    for ax, (values, title) in zip(axes, panels, strict=False):
        shown = np.clip(values, top - span, None)
        image = ax.imshow(shown, origin="lower", extent=extent, cmap="viridis", vmin=top - span, vmax=top)
        ax.set(title=title, aspect="equal")
    fig.colorbar(image, ax=list(axes[: len(panels)]), fraction=0.03, label="log p (nats)")
    counts, _, _ = np.histogram2d(data[:, 0], data[:, 1], bins=[grid.x_edges, grid.y_edges], density=True)
    axes[-1].imshow(counts.T, origin="lower", extent=extent, cmap="viridis")
    axes[-1].set(title=f"data histogram ({len(data)} points)", aspect="equal")
    return fig


def plot_corner(flow: Flow, x: Any, max_dims: int = 6, max_points: int = 2000, seed: int = 0) -> Figure:
    """d > 2: the first ``max_dims`` coordinates of the data (lower triangle,
    blue) against as many model samples (upper triangle, red), with both
    marginal histograms on the diagonal."""
    from matplotlib.figure import Figure

    data = _numpy(_subsample(as_data_tensor(x, flow.dim, flow.shift), max_points, seed))
    with torch.no_grad():
        model = _numpy(flow.inverse(_normal(flow, len(data), seed + 2)))
    m = min(flow.dim, max_dims)
    lo, hi = np.quantile(data[:, :m], 0.005, axis=0), np.quantile(data[:, :m], 0.995, axis=0)
    lo, hi = lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo)
    fig = Figure(figsize=(1.9 * m, 1.9 * m), layout="constrained")
    grid = fig.subplots(m, m, squeeze=False)
    for i in range(m):
        for j in range(m):
            ax = grid[i, j]
            if i == j:
                bins = np.linspace(lo[i], hi[i], 40)
                ax.hist(data[:, i], bins, density=True, histtype="step", color="tab:blue")
                ax.hist(model[:, i], bins, density=True, histtype="step", color="tab:red")
            else:
                points, colour = (data, "tab:blue") if i > j else (model, "tab:red")
                ax.scatter(points[:, j], points[:, i], s=1.0, alpha=0.3, color=colour, lw=0, rasterized=True)
                ax.set_ylim(lo[i], hi[i])
            ax.set_xlim(lo[j], hi[j])
            ax.tick_params(labelsize=6)
            ax.set(xlabel=f"$x_{{{j}}}$" if i == m - 1 else "", ylabel=f"$x_{{{i}}}$" if j == 0 else "")
    fig.suptitle(f"data (lower, blue) vs model samples (upper, red)\nfirst {m} of {flow.dim} coordinates")
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> None:
    """Writes ``fig`` atomically (:func:`jkoflow.atomic.atomic_path`: a uniquely
    named temporary file beside ``path``, then renamed over it)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")


def flow_figure_names(dim: int) -> list[str]:
    """The files :func:`write_flow_figures` writes for a flow of dimension ``dim``."""
    names = ["pushforward", "trajectories", "density" if dim == 2 else "corner"]
    return [FIGURE_FILES[name] for name in names]


def write_flow_figures(
    flow: Flow, x: Any, directory: str | os.PathLike, target: str | None = None, seed: int = 0
) -> list[Path]:
    """Draws the figures that apply to the flow's dimension into ``directory``
    (names in :data:`FIGURE_FILES`): pushforward and trajectories always,
    density for d = 2 (with the true density when ``target`` has one),
    corner plot for d > 2. Returns the paths written. The directory must exist."""
    if not Path(directory).is_dir():
        raise InputError(f"cannot write figures: {directory} is not a directory")
    drawn = {
        "pushforward": plot_pushforward(flow, x, seed=seed),
        "trajectories": plot_trajectories(flow, x, seed=seed),
    }
    if flow.dim == 2:
        drawn["density"] = plot_density(flow, x, target)
    else:
        drawn["corner"] = plot_corner(flow, x, seed=seed)
    paths = [Path(directory) / FIGURE_FILES[name] for name in drawn]
    for fig, path in zip(drawn.values(), paths, strict=True):
        save_figure(fig, path)
    return paths
