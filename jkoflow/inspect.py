r"""What each block of a flow does, as numbers: the data pushed block by block,
N(0, I) pulled back block by block, trajectories through every block and the
log-density on a 2-D grid. :mod:`jkoflow.figures` draws them; this module
never imports matplotlib, so every figure's content can be tested as numbers.

For a flow T = T_L ∘ … ∘ T_1 ∘ S (S the fixed standardisation) and data x,
the states of the per-block pushforward are z_0 = S(x), z_k = T_k(z_{k−1}):
exactly what ``flow.head(k)(x)`` returns. Block k moves the data by

.. math::
    W_k = \sqrt{E‖z_k − z_{k−1}‖²},

and the flow of its first k blocks has the negative log-likelihood
NLL_k = −E[log N(z_k; 0, I) + Σ_{j≤k} ℓ_j − Σ log scale] (nats), as in the
JKO-iFlow figures of Xu, Cheng, Xie, "Invertible normalizing flow neural
networks by JKO scheme", https://arxiv.org/abs/2212.14424.

Everything is computed under :func:`torch.no_grad` in the flow's dtype and on
its device; states are in the standardised coordinates of the blocks.

Example:
    >>> import torch, blocks, jkoflow
    >>> from jkoflow.inspect import pushforward, trajectories
    >>> _ = torch.manual_seed(0)
    >>> flow = jkoflow.Flow(2, [blocks.make("otflow", dim=2, width=8) for _ in range(2)], steps=4)
    >>> x = torch.randn(100, 2)
    >>> pushed = pushforward(flow, x)
    >>> len(pushed.states), pushed.movement.shape, pushed.nll.shape
    (3, torch.Size([2]), torch.Size([3]))
    >>> bool(torch.equal(pushed.states[1], flow.head(1)(x)[0]))
    True
    >>> trajectories(flow, x).paths.shape  # (blocks, steps + 1, points, d)
    torch.Size([2, 5, 100, 2])
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from blocks import TimeSlice

from .errors import InputError
from .flow import Flow, as_data_tensor
from .objectives import gaussian_log_prob
from .ode import integrate

__all__ = [
    "DensityGrid",
    "Pushforward",
    "Trajectories",
    "density_grid",
    "panel_indices",
    "parent_boundaries",
    "principal_axes",
    "project",
    "pullback",
    "pushforward",
    "trajectories",
]


class Pushforward(NamedTuple):
    """The data after 0, 1, …, L blocks.

    Attributes:
        states: L + 1 tensors (n, d): z_0 = S(x) and z_k = T_k(z_{k−1}).
        movement: W_k = sqrt(E‖z_k − z_{k−1}‖²) of blocks k = 1..L, shape (L,).
        nll: NLL (nats) of the flow's first k blocks on x, k = 0..L, shape (L + 1,).

    Example:
        >>> from jkoflow.inspect import pushforward
        >>> flow = jkoflow.Flow(2, [blocks.make("otflow", dim=2, width=8) for _ in range(2)], steps=4)
        >>> x = torch.randn(100, 2)
        >>> pushed = pushforward(flow, x)
        >>> len(pushed.states), bool(torch.equal(pushed.states[2], flow(x)[0]))
        (3, True)
        >>> step = (pushed.states[1] - pushed.states[0]).pow(2).sum(1).mean().sqrt()
        >>> bool(torch.isclose(pushed.movement[0], step))  # W_1
        True
        >>> bool(torch.isclose(pushed.nll[-1], -flow.log_prob(x).mean().detach(), atol=1e-5))
        True

    References:
        | Normalizing flow neural networks by JKO scheme (Xu et al., 2023)
        | https://arxiv.org/abs/2212.14424
    """

    states: list[Tensor]
    movement: Tensor
    nll: Tensor


def pushforward(flow: Flow, x: Any) -> Pushforward:
    """Pushes ``x`` (n, d) through the flow block by block, each block with its
    own RK4 steps (``flow.block_steps(k)``); ``states[k]`` equals ``flow.head(k)(x)[0]``."""
    x = as_data_tensor(x, flow.dim, flow.shift)
    with torch.no_grad():
        z, logdet = flow.standardize(x)
        states, nll = [z], [-(gaussian_log_prob(z) + logdet).mean()]
        for k, block in enumerate(flow.blocks):
            out = integrate(block, z, flow.block_steps(k))
            z, logdet = out.z, logdet + out.logdet
            states.append(z)
            nll.append(-(gaussian_log_prob(z) + logdet).mean())
    steps = [(b - a).pow(2).sum(1).mean().sqrt() for a, b in itertools.pairwise(states)]
    movement = torch.stack(steps) if steps else z.new_zeros(0)  # a flow with no blocks moves nothing
    return Pushforward(states, movement, torch.stack(nll))


def pullback(flow: Flow, z: Any) -> list[Tensor]:
    """N(0, I) samples ``z`` (n, d) pulled back block by block, in the blocks'
    coordinates: ``states[L] = z`` and ``states[k−1] = T_k⁻¹(states[k])``, so
    ``states[k]`` is a sample of the model's distribution of z_k and
    ``flow.unstandardize(states[0])`` equals ``flow.inverse(z)`` (each block at
    its own RK4 steps)."""
    z = as_data_tensor(z, flow.dim, flow.shift, what="z")
    states = [z]
    with torch.no_grad():
        for k in reversed(range(len(flow))):
            states.append(integrate(flow.blocks[k], states[-1], flow.block_steps(k), t0=1.0, t1=0.0).z)
    return states[::-1]


class Trajectories(NamedTuple):
    """Paths of points through every block, sampled at the RK4 grid times.

    Attributes:
        paths: Shape (L, steps + 1, n, d): ``paths[k − 1, i]`` is the state at
            time i/steps of block k; ``paths[k − 1, −1] == paths[k, 0]``.

    Example:
        >>> from jkoflow.inspect import Trajectories, trajectories
        >>> flow = jkoflow.Flow(2, [blocks.make("otflow", dim=2, width=8) for _ in range(2)], steps=4)
        >>> x = torch.randn(50, 2)
        >>> paths = trajectories(flow, x).paths
        >>> paths.shape, bool(torch.equal(paths[-1, -1], flow(x)[0]))
        (torch.Size([2, 5, 50, 2]), True)
        >>> corner = torch.tensor([[[[0.0, 0.0]], [[1.0, 0.0]], [[1.0, 1.0]]]])  # one path, one block
        >>> round(float(Trajectories(corner).straightness()), 4)  # length 2 over distance √2
        1.4142
    """

    paths: Tensor

    def straightness(self, boundaries: list[int] | None = None) -> Tensor:
        """Mean path length (polylines through the grid points) over mean
        end-to-end distance, for each run of blocks between consecutive
        ``boundaries`` (default: each block; e.g. :func:`parent_boundaries`
        for the parents of a refined flow). 1 for straight paths, larger for
        curved ones, NaN for blocks that move nothing."""
        paths = self.paths
        spans = range(len(paths) + 1) if boundaries is None else boundaries
        lengths = (paths[:, 1:] - paths[:, :-1]).norm(dim=-1).sum(1)  # (L, n)
        ratios = [
            lengths[a:b].sum(0).mean() / (paths[b - 1, -1] - paths[a, 0]).norm(dim=-1).mean()
            for a, b in itertools.pairwise(spans)
        ]
        return torch.stack(ratios) if ratios else paths.new_zeros(0)


def trajectories(flow: Flow, x: Any, steps: int | None = None) -> Trajectories:
    """Integrates S(x) (n, d) through every block one RK4 step at a time on a
    grid of ``steps`` steps per block, recording the state after every step.
    The default is the flow's largest per-block count (``flow.step_counts``),
    so when all blocks share one count the paths end exactly at the flow's
    pushes; more steps show the curves of a flow evaluated with few."""
    steps = max(flow.steps, *flow.step_counts) if steps is None else steps
    z = flow.standardize(as_data_tensor(x, flow.dim, flow.shift))[0]
    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64).tolist()
    paths = []
    with torch.no_grad():
        for block in flow.blocks:
            states = [z]
            for t0, t1 in itertools.pairwise(grid):
                states.append(integrate(block, states[-1], 1, t0=t0, t1=t1).z)
            paths.append(torch.stack(states))
            z = states[-1]
    return Trajectories(torch.stack(paths) if paths else z.new_zeros(0, steps + 1, *z.shape))


class DensityGrid(NamedTuple):
    """log p on the centres of a regular grid of a 2-D flow, in data coordinates.

    Attributes:
        x_edges, y_edges: Cell edges, shapes (nx + 1,), (ny + 1,).
        log_prob: log p at the cell centres, shape (ny, nx) (row j is y-cell j).

    Example:
        >>> import numpy as np
        >>> from jkoflow.inspect import DensityGrid, density_grid
        >>> flow = jkoflow.Flow(2, [blocks.make("otflow", dim=2, width=8)], steps=2)
        >>> grid = density_grid(flow, ((-6.0, 6.0), (-6.0, 6.0)), cells=40)
        >>> grid.log_prob.shape, round(grid.mass(), 3)  # a density: ∫ p ≈ 1 on the box
        ((40, 40), 1.0)
        >>> two = DensityGrid(np.array([0.0, 1.0, 2.0]), np.array([0.0, 1.0]), np.log([[0.25, 0.75]]))
        >>> two.centres().tolist(), two.mass()
        ([[0.5, 0.5], [1.5, 0.5]], 1.0)
    """

    x_edges: np.ndarray
    y_edges: np.ndarray
    log_prob: np.ndarray

    def centres(self) -> np.ndarray:
        """The cell centres (ny·nx, 2), row-major in y (the order of ``log_prob``)."""
        cx = 0.5 * (self.x_edges[1:] + self.x_edges[:-1])
        cy = 0.5 * (self.y_edges[1:] + self.y_edges[:-1])
        gx, gy = np.meshgrid(cx, cy)
        return np.stack([gx.ravel(), gy.ravel()], axis=1)

    def mass(self) -> float:
        """Σ p · cell area: the midpoint rule for ∫ p over the grid's box."""
        area = np.diff(self.x_edges)[None, :] * np.diff(self.y_edges)[:, None]
        return float((np.exp(self.log_prob) * area).sum())


def density_grid(
    flow: Flow, bounds: tuple[tuple[float, float], tuple[float, float]], cells: int = 80
) -> DensityGrid:
    """log p of a 2-D ``flow`` on ``cells`` × ``cells`` cells covering the box
    ``bounds = ((x_lo, x_hi), (y_lo, y_hi))``."""
    if flow.dim != 2:
        raise InputError(f"a density grid needs a 2-D flow, got dimension {flow.dim}")
    (x_lo, x_hi), (y_lo, y_hi) = bounds
    if not (x_lo < x_hi and y_lo < y_hi):
        raise InputError(f"empty grid box {bounds}")
    x_edges, y_edges = np.linspace(x_lo, x_hi, cells + 1), np.linspace(y_lo, y_hi, cells + 1)
    grid = DensityGrid(x_edges, y_edges, np.empty((cells, cells)))
    with torch.no_grad():
        log_p = flow.log_prob(grid.centres()).double().cpu().numpy()
    return grid._replace(log_prob=log_p.reshape(cells, cells))


def principal_axes(x: Tensor) -> Tensor:
    """The first two principal axes of ``x`` (n, d) as orthonormal columns (d, 2),
    each signed so that its largest component is positive; the identity's
    first two columns for d = 2 (the coordinates themselves)."""
    d = x.shape[1]
    if d <= 2:
        return torch.eye(d, 2, dtype=x.dtype, device=x.device)
    centred = x - x.mean(0)
    axes = torch.linalg.svd(centred, full_matrices=False).Vh[:2].T
    signs = axes.gather(0, axes.abs().argmax(0, keepdim=True)).sign()
    return axes * signs


def project(z: Tensor, axes: Tensor) -> Tensor:
    """z (…, d) in the 2-D coordinates of orthonormal ``axes`` (d, 2): z · axes,
    without centring, so N(0, I_d) projects to N(0, I_2)."""
    return z @ axes


def parent_boundaries(flow: Flow) -> list[int]:
    """The numbers of blocks k (0..L) after which a parent block is complete:
    a refined flow's time slices of one parent count as one block."""
    starts = [
        k for k, block in enumerate(flow.blocks) if not isinstance(block, TimeSlice) or block.index == 0
    ]
    return sorted({*starts, len(flow)})


def panel_indices(n_blocks: int, max_panels: int = 8, boundaries: list[int] | None = None) -> list[int]:
    """Which k = 0..L to show: all when L + 1 ≤ ``max_panels``; otherwise
    ``max_panels`` evenly spaced ones among ``boundaries`` (default: every k),
    always including 0 and L."""
    if n_blocks + 1 <= max_panels:
        return list(range(n_blocks + 1))
    candidates = sorted({0, n_blocks, *(range(n_blocks + 1) if boundaries is None else boundaries)})
    if len(candidates) > max_panels:
        picks = np.unique(np.round(np.linspace(0, len(candidates) - 1, max_panels)).astype(int))
        candidates = [candidates[i] for i in picks]
    return candidates
