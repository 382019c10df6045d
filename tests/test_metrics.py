"""Metrics on cases with known answers."""

import math

import numpy as np
import pytest
import torch

from jkoflow import Flow
from jkoflow.metrics import (
    data_kl,
    inversion_error,
    kl_divergence,
    mmd2,
    nll,
    nll_difference,
    parameter_count,
    step_doubling_change,
    wasserstein2,
)

from .analytic_blocks import LinearBlock


def test_w2_of_a_translated_cloud_is_the_shift():
    x = np.random.default_rng(0).normal(size=(400, 3))
    shift = np.array([0.3, -1.2, 0.5])
    result = wasserstein2(x, x + shift)
    assert result.method == "exact"
    assert result.value == pytest.approx(np.linalg.norm(shift), rel=1e-9)
    assert wasserstein2(x, x).value == pytest.approx(0.0, abs=1e-6)  # sqrt of a ~1e-16 residual


def test_w2_between_two_gaussians():
    """W2(N(0, 1), N(0, 4)) = |1 − 2| = 1 in one dimension (Gaussian closed form)."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2000, 1)), 2.0 * rng.normal(size=(2000, 1))
    assert wasserstein2(a, b).value == pytest.approx(1.0, abs=0.06)


def test_sliced_w2_is_labelled_and_smaller():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(500, 2)), rng.normal(size=(500, 2)) + np.array([1.0, 0.0])
    exact, sliced = wasserstein2(x, y, method="exact"), wasserstein2(x, y, method="sliced")
    assert sliced.method == "sliced" and sliced.value < exact.value
    assert wasserstein2(x, y, max_exact=100).method == "sliced"
    with pytest.raises(ValueError, match="method"):
        wasserstein2(x, y, method="fast")


def test_mmd_matches_the_gaussian_closed_form():
    """x ~ N(0, s²I), y ~ N(μ, s²I), kernel width σ:
    MMD² = 2c(1 − exp(−‖μ‖²/(2(σ² + 2s²)))), c = (σ²/(σ² + 2s²))^{d/2}."""
    rng = np.random.default_rng(3)
    d, s, sigma, mu = 2, 1.0, 1.5, np.array([1.0, 0.5])
    x, y = s * rng.normal(size=(3000, d)), s * rng.normal(size=(3000, d)) + mu
    c = (sigma**2 / (sigma**2 + 2 * s**2)) ** (d / 2)
    expected = 2 * c * (1 - math.exp(-(mu @ mu) / (2 * (sigma**2 + 2 * s**2))))
    result = mmd2(x, y, bandwidth=sigma)
    assert result.bandwidth == sigma and result.bandwidth_rule == "given"
    assert result.mmd2 == pytest.approx(expected, abs=0.01)


def test_mmd_of_same_distribution_is_near_zero_and_unbiased():
    rng = np.random.default_rng(4)
    values = [
        mmd2(rng.normal(size=(300, 2)), rng.normal(size=(300, 2)), bandwidth=1.0).mmd2 for _ in range(20)
    ]
    assert abs(np.mean(values)) < 3 * np.std(values) / math.sqrt(20)  # unbiased: centred at 0
    assert min(values) < 0 < max(values)  # the unbiased estimator takes both signs
    shifted = mmd2(rng.normal(size=(300, 2)), rng.normal(size=(300, 2)) + 1.0)
    assert shifted.bandwidth_rule == "median heuristic" and shifted.mmd2 > 0.05


@torch.no_grad()
def test_flow_metrics_on_an_empty_flow():
    flow = Flow(2).double()
    x = torch.randn(1000, 2, dtype=torch.float64)
    assert nll(flow, x) == pytest.approx(
        float(0.5 * x.pow(2).sum(1).mean() + math.log(2 * math.pi)), rel=1e-12
    )
    assert inversion_error(flow, x) == 0.0
    assert parameter_count(flow) == 0


def test_kl_between_two_gaussians():
    """KL(N(0, 1) ‖ N(μ, σ²)) = log σ + (1 + μ²)/(2σ²) − ½, estimated on samples of p."""
    mu, sigma = 0.7, 1.6
    x = np.random.default_rng(0).standard_normal(200_000)
    log_p = -0.5 * x**2 - 0.5 * math.log(2 * math.pi)
    log_q = -0.5 * ((x - mu) / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    result = kl_divergence(log_p, torch.from_numpy(log_q))
    exact = math.log(sigma) + (1 + mu**2) / (2 * sigma**2) - 0.5
    assert result.n == 200_000 and abs(result.value - exact) < 4 * result.stderr
    assert result.stderr == pytest.approx(np.std(log_p - log_q, ddof=1) / math.sqrt(200_000), rel=1e-12)
    assert 1e-4 < result.stderr < 2e-3
    with pytest.raises(ValueError, match="one shape"):
        kl_divergence(log_p, log_q[:-1])


@torch.no_grad()
def test_data_kl_of_an_empty_flow_is_the_gaussian_kl():
    """An empty flow is N(0, I); data N(m, s² I) in d = 3 give
    KL = d (s² − 1 − 2 log s)/2 + ‖m‖²/2."""
    m, s, d = np.array([0.5, -1.0, 0.2]), 0.8, 3
    x = m + s * np.random.default_rng(1).standard_normal((100_000, d))
    log_p = (-0.5 * ((x - m) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)).sum(1)
    result = data_kl(Flow(d).double(), log_p, x)
    exact = d * (s**2 - 1 - 2 * math.log(s)) / 2 + 0.5 * (m**2).sum()
    assert abs(result.value - exact) < 4 * result.stderr and result.stderr < 0.01


def _rk4_linear_map(b: torch.Tensor, steps: int) -> torch.Tensor:
    """The matrix of ``steps`` RK4 steps of dz/dt = B z over [0, 1]:
    R(B/steps)^steps with R(A) = I + A + A²/2 + A³/6 + A⁴/24."""
    a = b / steps
    eye = torch.eye(len(b), dtype=b.dtype)
    r = eye + a + a @ a / 2 + a @ a @ a / 6 + a @ a @ a @ a / 24
    return torch.linalg.matrix_power(r, steps)


@torch.no_grad()
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_step_doubling_change_is_the_rk4_error_of_a_linear_flow(steps):
    """v = Bz: the log-det is tr B at any step count, so the change is
    E[½‖M_2s x‖² − ½‖M_s x‖²] with M_s the RK4 matrix above; it shrinks ~16×
    per doubling (fourth order)."""
    block = LinearBlock(2).double()
    block.B.copy_(torch.tensor([[-0.9, 1.7], [-0.4, 0.6]], dtype=torch.float64))
    x = torch.randn(500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    flow = Flow(2, [block], steps=steps).double()

    def half_sq(s):
        return 0.5 * (x @ _rk4_linear_map(block.B, s).T).pow(2).sum(1).mean().item()

    expected = half_sq(2 * steps) - half_sq(steps)
    change = step_doubling_change(flow, x)
    assert change == pytest.approx(expected, rel=1e-9) and abs(change) > 1e-7
    assert abs(step_doubling_change(flow.with_steps(2 * steps), x)) < abs(change) / 8


@torch.no_grad()
def test_nll_difference_is_paired():
    """N(0, I) against the standardised Gaussian N(m, diag s²): per point,
    NLL_a − NLL_b = ½‖x‖² − ½‖(x − m)/s‖² − Σ log s; the result is their mean
    and std/√n, and a flow against itself gives exactly 0 ± 0."""
    x = 0.5 + 1.5 * torch.randn(4000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    m, s = torch.tensor([0.5, 0.4], dtype=torch.float64), torch.tensor([1.5, 1.2], dtype=torch.float64)
    a, b = Flow(2).double(), Flow(2, shift=m, scale=s).double()
    per_point = 0.5 * x.pow(2).sum(1) - 0.5 * ((x - m) / s).pow(2).sum(1) - s.log().sum()
    result = nll_difference(a, b, x)
    assert result.n == 4000 and result.value == pytest.approx(float(per_point.mean()), rel=1e-12)
    assert result.stderr == pytest.approx(float(per_point.std() / math.sqrt(4000)), rel=1e-10)
    assert result.value == pytest.approx(nll(a, x) - nll(b, x), rel=1e-12) and result.value > 0.1
    assert nll_difference(b, b, x) == (0.0, 0.0, 4000)
