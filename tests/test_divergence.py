"""Autograd divergence helpers against the closed-form OT-Flow trace and explicit Jacobians."""

import pytest
import torch

from blocks import divergence_exact, divergence_hutchinson


def _field(z: torch.Tensor) -> torch.Tensor:
    """A nonlinear, coupled field R^d → R^d."""
    w = torch.linspace(-1.0, 1.0, z.shape[1] ** 2, dtype=z.dtype).reshape(z.shape[1], -1)
    return torch.tanh(z @ w) + z.roll(1, dims=1) * z


@pytest.mark.parametrize("dim", [1, 2, 5])
def test_exact_matches_jacobian_trace(dim):
    gen = torch.Generator().manual_seed(dim)
    z = torch.randn(7, dim, generator=gen, dtype=torch.float64)
    div = divergence_exact(_field(z.requires_grad_(True)), z)
    for i in range(len(z)):
        jac = torch.autograd.functional.jacobian(lambda x: _field(x[None])[0], z[i].detach())
        assert float(div[i]) == pytest.approx(float(jac.trace()), rel=1e-12, abs=1e-12)


def test_exact_matches_otflow_closed_form(random_otflow):
    block = random_otflow(dim=4, width=8, depth=2)
    z = torch.randn(9, 4, dtype=torch.float64).requires_grad_(True)
    v, div = block(z, 0.4)
    rel = (divergence_exact(v, z) - div).abs().max() / div.abs().max()
    assert float(rel.detach()) < 1e-10


def test_exact_is_differentiable():
    z = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    div = divergence_exact(torch.tanh(scale * z), z, create_graph=True)  # Σ_i s(1 − tanh²(s z_i))
    (grad,) = torch.autograd.grad(div.sum(), scale)
    expected = torch.autograd.grad((scale * (1 - torch.tanh(scale * z) ** 2)).sum(), scale)[0]
    assert float(grad) == pytest.approx(float(expected), rel=1e-12)


def test_hutchinson_is_unbiased():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, generator=gen, dtype=torch.float64).requires_grad_(True)
    probes = torch.randint(0, 2, (20000, 3, 4), generator=gen).to(torch.float64) * 2 - 1
    estimate = divergence_hutchinson(_field(z), z, probes)
    exact = divergence_exact(_field(z), z)
    assert torch.allclose(estimate, exact, atol=0.05)
    one = divergence_hutchinson(_field(z), z, probes[0])
    assert not torch.allclose(one, exact, atol=1e-3)  # a single probe is noisy for a non-diagonal Jacobian


def test_bad_input():
    z = torch.randn(3, 2)
    with pytest.raises(ValueError, match="require grad"):
        divergence_exact(z * 2, z)
    z.requires_grad_(True)
    with pytest.raises(ValueError, match="shape"):
        divergence_exact((z * 2)[:, :1], z)
    with pytest.raises(ValueError, match="noise"):
        divergence_hutchinson(z * 2, z, torch.ones(3, 3))
