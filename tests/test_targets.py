"""Synthetic targets with exact log-densities: normalisation, sampling, specs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jkoflow.datasets import is_target, load, target, toy
from jkoflow.datasets.targets import Banana, GaussianMixture, parse_spec
from jkoflow.errors import InputError


def _grid_integral(log_prob, box: tuple[float, float, float, float], h: float) -> float:
    """Midpoint rule of exp(log_prob) with cells of side h over [a1, b1] x [a2, b2]."""
    a1, b1, a2, b2 = box
    c1 = a1 + h * (np.arange(round((b1 - a1) / h)) + 0.5)
    c2 = a2 + h * (np.arange(round((b2 - a2) / h)) + 0.5)
    x1, x2 = np.meshgrid(c1, c2, indexing="ij")
    points = np.stack([x1.ravel(), x2.ravel()], axis=1)
    return float(np.exp(log_prob(points)).sum() * h * h)


@pytest.mark.parametrize(
    "name, box, h",
    [
        ("checkerboard", (-5, 5, -5, 5), 0.05),  # cells align with the squares: exact
        ("8gaussians", (-6, 6, -6, 6), 0.03),
        ("gmm:d=2,k=4,seed=3", (-14, 14, -14, 14), 0.05),
        ("banana:d=2,b=0.25", (-14, 14, -6, 50), 0.05),  # x₂ − (x₁² − 4)/4 ~ N(0, 1)
    ],
)
def test_2d_densities_integrate_to_one(name, box, h):
    assert _grid_integral(target(name).log_prob, box, h) == pytest.approx(1.0, abs=1e-7)


def test_gmm_importance_identity_in_dimension_8():
    """E_q[p/q] = 1 for q the same mixture with covariances 1.5 Σ_j, its density
    computed here independently (inverse and slogdet)."""
    gmm = target("gmm:d=8,k=5,seed=0")
    rng = np.random.default_rng(5)
    n = 100_000
    idx = rng.integers(0, 5, size=n)
    x = gmm.means[idx] + math.sqrt(1.5) * np.einsum("nij,nj->ni", gmm.chols[idx], rng.standard_normal((n, 8)))
    parts = []
    for mean, chol in zip(gmm.means, gmm.chols, strict=True):
        cov = 1.5 * chol @ chol.T
        diff = x - mean
        quad = np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff)
        parts.append(math.log(0.2) - 0.5 * quad - 0.5 * np.linalg.slogdet(2 * math.pi * cov)[1])
    log_q = np.logaddexp.reduce(np.stack(parts, axis=1), axis=1)
    w = np.exp(gmm.log_prob(x) - log_q)
    stderr = w.std() / math.sqrt(n)
    assert abs(w.mean() - 1.0) < 4 * stderr and stderr < 0.005


@pytest.mark.parametrize("name", ["banana:d=6,b=0.3", "gmm:d=3,k=2,seed=4"])
def test_importance_identity_in_higher_dimension(name):
    """E_q[p/q] = 1 for a broad Gaussian proposal q (mean and 2x covariance of p)."""
    t = target(name)
    ref = t.sample(50_000, seed=11)
    mean, cov = ref.mean(0), 2.0 * np.cov(ref.T)
    chol = np.linalg.cholesky(cov)
    rng = np.random.default_rng(12)
    z = rng.standard_normal((200_000, t.dim))
    x = mean + z @ chol.T
    log_q = -0.5 * (z**2).sum(1) - np.log(np.diag(chol)).sum() - 0.5 * t.dim * math.log(2 * math.pi)
    w = np.exp(t.log_prob(x) - log_q)
    stderr = w.std() / math.sqrt(len(w))
    assert abs(w.mean() - 1.0) < max(4 * stderr, 1e-3) and stderr < 0.02


def test_gmm_samples_match_mixture_moments():
    gmm = target("gmm:d=5,k=3,seed=2")
    assert isinstance(gmm, GaussianMixture) and gmm.means.shape == (3, 5)
    x = gmm.sample(400_000, seed=0)
    cov_j = np.einsum("kij,klj->kil", gmm.chols, gmm.chols)
    mean = gmm.weights @ gmm.means
    second = np.einsum("k,kij->ij", gmm.weights, cov_j + np.einsum("ki,kj->kij", gmm.means, gmm.means))
    np.testing.assert_allclose(x.mean(0), mean, atol=0.02)
    np.testing.assert_allclose(np.cov(x.T), second - np.outer(mean, mean), atol=0.06)
    eig = np.linalg.eigvalsh(cov_j)
    assert eig.min() >= 0.25 - 1e-12 and eig.max() <= 2.25 + 1e-12  # s ~ U(0.5, 1.5)


def test_gmm_log_prob_of_one_component_is_the_gaussian():
    d = 4
    rng = np.random.default_rng(0)
    chol = np.linalg.cholesky(np.cov(rng.standard_normal((d, 50))) + np.eye(d))
    mean = rng.standard_normal(d)
    gmm = GaussianMixture(mean[None], chol[None], np.ones(1))
    x = rng.standard_normal((10, d))
    cov = chol @ chol.T
    diff = x - mean
    expected = -0.5 * np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff)
    expected -= 0.5 * np.linalg.slogdet(2 * math.pi * cov)[1]
    np.testing.assert_allclose(gmm.log_prob(x), expected, rtol=1e-12)


def test_gmm_joint_log_probs_are_each_weighted_gaussian():
    """Column j is log w_j + log N(x; μ_j, Σ_j) by the inverse and log-determinant
    of Σ_j; their logsumexp is log_prob."""
    gmm = target("gmm:d=3,k=4,seed=5")
    x = gmm.sample(7, seed=1)
    joint = gmm.joint_log_probs(x)
    assert joint.shape == (7, 4)
    for j, (mean, chol, w) in enumerate(zip(gmm.means, gmm.chols, gmm.weights, strict=True)):
        cov, diff = chol @ chol.T, x - mean
        expected = math.log(w) - 0.5 * np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff)
        expected -= 0.5 * np.linalg.slogdet(2 * math.pi * cov)[1]
        np.testing.assert_allclose(joint[:, j], expected, rtol=1e-12)
    np.testing.assert_allclose(np.log(np.exp(joint).sum(axis=1)), gmm.log_prob(x), rtol=1e-12)


def test_banana_moments():
    x = Banana(dim=4, b=0.25).sample(400_000, seed=1)
    np.testing.assert_allclose(x.mean(0), 0.0, atol=0.02)
    np.testing.assert_allclose(x.var(0), [4.0, 3.0, 3.0, 3.0], rtol=0.03)  # 1 + b²·2s⁴ = 3


def test_toy_targets_match_their_generators():
    cb = target("checkerboard")
    x = cb.sample(50_000, seed=3)
    np.testing.assert_array_equal(x, toy("checkerboard", 50_000, 3))
    np.testing.assert_array_equal(cb.log_prob(x), -math.log(32.0))
    outside = np.array([[1.0, -1.0], [-3.0, -1.0], [4.5, 0.5], [0.5, -4.5]])
    assert np.isneginf(cb.log_prob(outside)).all()
    g8 = target("8gaussians")
    y = g8.sample(200_000, seed=4)
    np.testing.assert_array_equal(y, toy("8gaussians", 200_000, 4))
    # separated components: entropy = log 8 + log(2πe σ²), σ = 0.5/1.414
    entropy = math.log(8) + math.log(2 * math.pi * math.e * (0.5 / 1.414) ** 2)
    assert -g8.log_prob(y).mean() == pytest.approx(entropy, abs=0.01)


def test_load_accepts_specs_with_the_data_seed():
    x = load("gmm:d=8,k=5,seed=0", n=1000, seed=7)
    assert x.shape == (1000, 8) and x.dtype == np.float64
    np.testing.assert_array_equal(x, target("gmm:d=8,k=5,seed=0").sample(1000, np.random.default_rng(7)))
    assert not np.array_equal(x, load("gmm:d=8,k=5,seed=0", n=1000, seed=8))
    assert not np.array_equal(x, load("gmm:d=8,k=5,seed=1", n=1000, seed=7))
    assert load("banana:d=3", n=10).shape == (10, 3)


def test_specs_and_names():
    assert parse_spec("gmm:d=8, k=5") == ("gmm", {"d": 8, "k": 5, "seed": 0})
    assert parse_spec("banana") == ("banana", {"d": 2, "b": 0.25})
    for name in ("gmm:d=3", "banana:d=4,b=1", "checkerboard", "8gaussians"):
        assert is_target(name)
    for name in ("moons", "power", "data.npy", 3):
        assert not is_target(name)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("gmm:d=0", "integer ≥ 1"),
        ("gmm:d=2.5", "integer ≥ 1"),
        ("gmm:q=1", "key=value with key in d, k, seed"),
        ("gmm:d", "key=value"),
        ("gmm:k=x", "expected a number"),
        ("banana:d=1", "d ≥ 2"),
        ("banana:b=inf", "finite"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(InputError, match=match):
        target(spec)
    with pytest.raises(InputError, match=match):
        load(spec, n=10)


def test_powerlaw_log_prob_matches_scipy():
    """The factorised density against scipy's t and normal log-densities."""
    stats = pytest.importorskip("scipy.stats")
    t = target("powerlaw:d=6,k=3,seed=2")
    x = t.sample(500, seed=3)
    a = x[:, 0]
    expected = stats.t.logpdf(a, t.latent_dof)
    for i in range(2):
        mean = t.scales[i] * np.sign(a) * np.abs(a) ** t.exponents[i]
        expected += stats.norm.logpdf(x[:, 1 + i], mean, t.noise[i])
    for j in range(3):
        expected += stats.t.logpdf(x[:, 3 + j], t.tail_dofs[j], scale=t.tail_scales[j])
    np.testing.assert_allclose(t.log_prob(x), expected, rtol=1e-12)


def test_powerlaw_samples_follow_the_construction():
    t = target("powerlaw:d=7,k=4,seed=0")
    assert t.dim == 7
    x = t.sample(200_000, seed=1)
    a = x[:, 0]
    resid = x[:, 1:4] - t.scales * np.sign(a)[:, None] * np.abs(a)[:, None] ** t.exponents
    np.testing.assert_allclose(resid.std(0), t.noise, rtol=0.01)
    # t_4: P(|a| > 2) = 0.11612
    assert abs(np.mean(np.abs(a) > 2) - 0.11612) < 0.003
    corr = np.corrcoef(x[:, :4].T)
    assert corr[np.triu_indices(4, 1)].min() > 0.7  # the ridge columns move together
    # 2-D marginal integrates to one: latent and first ridge on a box that holds the mass
    two = target("powerlaw:d=2,k=2,seed=0")
    assert abs(_grid_integral(two.log_prob, (-30, 30, -80, 80), 0.02) - 1.0) < 2e-3


def test_powerlaw_spec_checks():
    assert parse_spec("powerlaw") == ("powerlaw", {"d": 7, "k": 4, "seed": 0})
    with pytest.raises(InputError, match="2 ≤ k ≤ d"):
        target("powerlaw:d=3,k=4")
