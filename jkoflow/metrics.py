"""Evaluation metrics (docs/design.md, "Evaluation and metrics"). Functions of flows and sample arrays;
none knows how a flow was trained."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from .flow import Flow, as_data_tensor

__all__ = [
    "STEP_CHECK_ROWS",
    "KLResult",
    "MMDResult",
    "W2Result",
    "data_kl",
    "data_scale",
    "inversion_error",
    "kl_divergence",
    "mmd2",
    "nll",
    "nll_difference",
    "parameter_count",
    "step_doubling_change",
    "stratified_mean",
    "wasserstein2",
]


@torch.no_grad()
def nll(flow: Flow, x: Any, chunk_size: int = 16384) -> float:
    """Mean negative log-likelihood −E[log p(x)] in nats per sample, the
    Gaussian constant included, each block at its own RK4 steps
    (``flow.block_steps(k)``)."""
    x = as_data_tensor(x, flow.dim, flow.shift)
    return float(-flow.log_prob(x, chunk_size).mean())


STEP_CHECK_ROWS = 10_000
"""Rows on which reports measure the step-doubling change of an NLL."""


def step_doubling_change(flow: Flow, x: Any, chunk_size: int = 16384) -> float:
    """NLL(x) with every block at twice its RK4 steps (``flow.with_steps(2·steps)``,
    step factors kept) minus NLL(x) at its own (nats per sample): the
    integration error of a reported NLL. Reports ask for
    |change| < 1e-3 (docs/design.md, "Integration"); a flow trained with too few steps can fit the
    discrete map rather than the ODE, and then this is large.

    Example:
        >>> import torch, blocks, jkoflow
        >>> flow = jkoflow.Flow(2, [blocks.make("otflow", dim=2, width=8)], steps=4)
        >>> abs(step_doubling_change(flow, torch.randn(100, 2))) < 1e-3
        True
    """
    return nll(flow.with_steps(2 * flow.steps), x, chunk_size) - nll(flow, x, chunk_size)


@torch.no_grad()
def inversion_error(flow: Flow, x: Any, chunk_size: int = 16384) -> float:
    """Mean round-trip error E‖x − T⁻¹(T(x))‖ (Euclidean norm, data units)."""
    x = as_data_tensor(x, flow.dim, flow.shift)
    z, _ = flow(x, chunk_size)
    return float((flow.inverse(z, chunk_size) - x).norm(dim=1).mean())


@torch.no_grad()
def data_scale(flow: Flow, x: Any) -> float:
    """sqrt(E‖x − μ‖²/d): the per-coordinate scale of data rows ``x`` (n, d)
    about the flow's ``shift`` μ (the training mean), in data units.

    Example:
        >>> import torch, jkoflow
        >>> x = torch.tensor([[3.0, 0.0], [-3.0, 0.0]])
        >>> round(data_scale(jkoflow.Flow.for_data(x, steps=2), x), 6)  # sqrt(9/2)
        2.12132
    """
    x = as_data_tensor(x, flow.dim, flow.shift)
    return float((x - flow.shift).pow(2).sum(1).mean().div(flow.dim).sqrt())


def stratified_mean(bulk: Any, far: Any, tail: Any, share: float) -> float:
    """(1 − q)·mean(bulk[~far]) + q·mean(tail): the mean of a quantity over a
    population estimated in two strata, the rows far out (share q of the
    population, all measured: ``tail``) and the rest (a sample ``bulk``
    without its rows in the far stratum, ``far`` True). On long-tailed data a
    mean is made by a few rows far out that a plain sample holds too few of.
    A sample with no row in the near stratum gives the tail's mean.

    Example:
        >>> stratified_mean([1.0, 3.0, 50.0], [False, False, True], [40.0, 60.0], share=0.1)
        6.8
    """
    bulk, tail = (torch.as_tensor(v, dtype=torch.float64) for v in (bulk, tail))
    near = bulk[~torch.as_tensor(far, dtype=torch.bool, device=bulk.device)]
    if not len(near):
        return float(tail.mean())
    return float((1 - share) * near.mean() + share * tail.mean())


class KLResult(NamedTuple):
    """A Monte Carlo KL estimate (nats) with its standard error, from ``n`` points.

    Example:
        >>> import numpy as np
        >>> from jkoflow.metrics import kl_divergence
        >>> kl_divergence(np.array([-1.0, -2.0, -3.0]), np.array([-1.5, -2.5, -3.5]))
        KLResult(value=0.5, stderr=0.0, n=3)
    """

    value: float
    stderr: float
    n: int


def kl_divergence(log_p_data: Any, log_p_model: Any) -> KLResult:
    """KL(p_data ‖ p_model) = E[log p_data(x) − log p_model(x)] estimated on points
    x ~ p_data: ``log_p_data`` and ``log_p_model`` are the two log-densities at the
    same n points (shape (n,), nats); stderr = std(diff)/sqrt(n) (ddof 1).

    Example:
        >>> kl_divergence([0.0, -1.0], [-1.0, -2.0])
        KLResult(value=1.0, stderr=0.0, n=2)
    """
    a, b = (
        np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64)
        for v in (log_p_data, log_p_model)
    )
    if a.ndim != 1 or a.shape != b.shape or len(a) < 2:
        raise ValueError(
            f"need two log-density vectors of one shape (n,), n ≥ 2; got {a.shape} and {b.shape}"
        )
    diff = a - b
    return KLResult(float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff))), len(diff))


@torch.no_grad()
def data_kl(flow: Flow, log_p_data: Any, x: Any, chunk_size: int = 16384) -> KLResult:
    """KL(p_data ‖ flow) on samples x (n, d) of p_data whose exact log-density at x is
    ``log_p_data`` (n,)."""
    x = as_data_tensor(x, flow.dim, flow.shift)
    return kl_divergence(log_p_data, flow.log_prob(x, chunk_size))


@torch.no_grad()
def nll_difference(flow_a: Flow, flow_b: Flow, x: Any, chunk_size: int = 16384) -> KLResult:
    """NLL_a − NLL_b on the same points with its paired standard error:
    E[log p_b(x) − log p_a(x)] ± std/√n, the estimator of :func:`kl_divergence`
    (so a :class:`KLResult`). Pairing removes the spread of log p over the
    points, so it is far tighter than two separately estimated NLLs."""
    log_p = [f.log_prob(as_data_tensor(x, f.dim, f.shift), chunk_size) for f in (flow_a, flow_b)]
    return kl_divergence(log_p[1], log_p[0])


def parameter_count(flow: Flow) -> int:
    """Number of scalar parameters of all blocks."""
    return sum(p.numel() for p in flow.parameters())


class MMDResult(NamedTuple):
    """Unbiased MMD² with a Gaussian kernel and the bandwidth σ it used.

    Example:
        >>> import numpy as np
        >>> from jkoflow.metrics import mmd2
        >>> rng = np.random.default_rng(0)
        >>> same = mmd2(rng.normal(size=(500, 2)), rng.normal(size=(500, 2)), bandwidth=1.0)
        >>> moved = mmd2(rng.normal(size=(500, 2)), rng.normal(size=(500, 2)) + 1.0, bandwidth=1.0)
        >>> bool(abs(same.mmd2) < 0.01 < moved.mmd2), moved.bandwidth_rule
        (True, 'given')
    """

    mmd2: float
    bandwidth: float
    bandwidth_rule: str


class W2Result(NamedTuple):
    """A Wasserstein distance and how it was computed: ``"exact"`` is W2 from
    ``ot.emd2``; ``"sliced"`` is the sliced W2 (a lower bound, not W2).

    Example:
        >>> import numpy as np
        >>> from jkoflow.metrics import wasserstein2
        >>> x = np.random.default_rng(0).normal(size=(200, 2))
        >>> result = wasserstein2(x, x + np.array([3.0, 4.0]))  # a translation by 5
        >>> round(result.value, 6), result.method, result.n
        (5.0, 'exact', 200)
    """

    value: float
    method: str
    n: int


def _as_array(x: Any) -> np.ndarray:
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"samples must be a 2-D array (n, d), got shape {x.shape}")
    return x.astype(np.float64)


def _kernel_sum(x: torch.Tensor, y: torch.Tensor, gamma: float, chunk: int = 2048) -> float:
    return float(
        sum(torch.exp(-gamma * torch.cdist(part, y).square()).sum() for part in torch.split(x, chunk))
    )


def mmd2(
    x: Any, y: Any, bandwidth: float | None = None, max_median_points: int = 2000, seed: int = 0
) -> MMDResult:
    r"""Unbiased MMD² between samples x (m, d) and y (n, d),

    .. math::
        \frac{1}{m(m-1)}\sum_{i≠j} k(x_i, x_j) + \frac{1}{n(n-1)}\sum_{i≠j} k(y_i, y_j)
        − \frac{2}{mn}\sum_{i,j} k(x_i, y_j), \qquad k(a, b) = e^{−‖a−b‖²/(2σ²)}.

    σ is ``bandwidth`` when given, else the median pairwise distance of the
    pooled samples (at most ``max_median_points`` of them, seeded).

    References:
        | A Kernel Two-Sample Test (Gretton et al., 2012)
        | https://jmlr.org/papers/v13/gretton12a.html
    """
    xa, ya = _as_array(x), _as_array(y)
    if len(xa) < 2 or len(ya) < 2:
        raise ValueError("MMD needs at least two samples on each side")
    rule = "given"
    if bandwidth is None:
        pooled = np.concatenate([xa, ya])
        rng = np.random.default_rng(seed)
        pick = pooled[rng.choice(len(pooled), min(len(pooled), max_median_points), replace=False)]
        distances = torch.pdist(torch.from_numpy(pick))
        bandwidth, rule = float(distances.median()), "median heuristic"
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth}")
    gamma = 1.0 / (2.0 * bandwidth**2)
    xt, yt = torch.from_numpy(xa), torch.from_numpy(ya)
    m, n = len(xt), len(yt)
    kxx = (_kernel_sum(xt, xt, gamma) - m) / (m * (m - 1))  # the diagonal k(x_i, x_i) = 1 removed
    kyy = (_kernel_sum(yt, yt, gamma) - n) / (n * (n - 1))
    kxy = _kernel_sum(xt, yt, gamma) / (m * n)
    return MMDResult(kxx + kyy - 2.0 * kxy, bandwidth, rule)


def wasserstein2(
    x: Any, y: Any, method: str = "auto", max_exact: int = 3000, projections: int = 500, seed: int = 0
) -> W2Result:
    """Wasserstein-2 distance between the empirical measures of x (m, d) and y
    (n, d) with uniform weights.

    ``method="exact"``: W2 = sqrt(min_π Σ π_ij ‖x_i − y_j‖²) by ``ot.emd2``
    (numItermax 1e7). ``"sliced"``: the sliced W2 of ``ot.sliced_wasserstein_distance``
    over ``projections`` random directions, a different (smaller) quantity.
    ``"auto"``: exact up to ``max_exact`` points per side, sliced beyond.

    References:
        | POT: Python Optimal Transport (Flamary et al., 2021)
        | https://jmlr.org/papers/v22/20-451.html
    """
    import ot  # POT: imported at first use, not by `import jkoflow`

    xa, ya = _as_array(x), _as_array(y)
    if method == "auto":
        method = "exact" if max(len(xa), len(ya)) <= max_exact else "sliced"
    if method == "exact":
        cost = ot.dist(xa, ya, metric="sqeuclidean")
        value = float(
            np.sqrt(max(ot.emd2(ot.unif(len(xa)), ot.unif(len(ya)), cost, numItermax=10_000_000), 0.0))
        )
    elif method == "sliced":
        value = float(ot.sliced_wasserstein_distance(xa, ya, n_projections=projections, p=2, seed=seed))
    else:
        raise ValueError(f"method must be 'auto', 'exact' or 'sliced', got {method!r}")
    return W2Result(value, method, min(len(xa), len(ya)))
