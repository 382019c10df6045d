"""Metrics on cases with known answers."""

import math

import numpy as np
import pytest
import torch

from jkoflow import Flow
from jkoflow.metrics import data_kl, inversion_error, kl_divergence, mmd2, nll, parameter_count, wasserstein2


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
