"""The integrator: analytic flows, reversibility, log-determinant and kinetic energy."""

import pytest
import torch

from jkoflow import integrate
from jkoflow.objectives import jko_loss

from .analytic_blocks import ConstantBlock, LinearBlock


@torch.no_grad()
def test_linear_flow_matches_matrix_exponential():
    torch.manual_seed(0)
    block = LinearBlock(3).double()
    with torch.no_grad():
        block.B.copy_(0.4 * torch.randn(3, 3, dtype=torch.float64))
    x = torch.randn(20, 3, dtype=torch.float64)
    z, logdet, kinetic, _ = integrate(block, x, steps=32)
    expected = x @ torch.linalg.matrix_exp(block.B).T
    assert float((z - expected).abs().max()) < 1e-9
    assert torch.allclose(logdet, block.B.trace().expand(20), atol=1e-12)
    # kinetic = ∫ ½‖B e^{tB} x‖² dt by composite Simpson on a fine grid
    ts = torch.linspace(0, 1, 2001, dtype=torch.float64)
    speeds = torch.stack(
        [0.5 * (x @ (block.B @ torch.linalg.matrix_exp(t * block.B)).T).pow(2).sum(1) for t in ts]
    )
    weights = torch.ones(2001, dtype=torch.float64)
    weights[1:-1:2], weights[2:-1:2] = 4, 2
    simpson = (weights[:, None] * speeds).sum(0) / (3 * 2000)
    assert torch.allclose(kinetic, simpson, rtol=1e-8)


@torch.no_grad()
def test_rk4_error_is_fourth_order(random_otflow):
    block = random_otflow(scale=0.5)
    x = torch.randn(50, 2, dtype=torch.float64)
    ref = integrate(block, x, steps=256).z
    errors = [float((integrate(block, x, steps=s).z - ref).abs().max()) for s in (8, 16)]
    assert 10 < errors[0] / errors[1] < 24  # 2^4 = 16


@torch.no_grad()
def test_backward_integration_inverts_forward(random_otflow):
    block = random_otflow()
    x = torch.randn(64, 2, dtype=torch.float64)
    z, logdet, kinetic, _ = integrate(block, x, steps=64)
    back = integrate(block, z, steps=64, t0=1.0, t1=0.0)
    assert float((back.z - x).abs().max()) < 1e-7
    assert torch.allclose(back.logdet, -logdet, atol=1e-8)
    assert torch.allclose(back.kinetic, -kinetic, atol=1e-8)


def test_logdet_matches_jacobian_of_the_map(random_otflow):
    block = random_otflow(dim=3, width=6)
    x = torch.randn(4, 3, dtype=torch.float64)
    logdet = integrate(block, x, steps=64).logdet.detach()
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda p: integrate(block, p[None], steps=64).z[0], x[i])
        assert float(logdet[i]) == pytest.approx(float(torch.linalg.slogdet(jac)[1]), abs=1e-7)


@torch.no_grad()
def test_path_and_endpoint_costs_agree_on_straight_paths():
    block = ConstantBlock(2).double()
    with torch.no_grad():
        block.c.copy_(torch.tensor([0.6, -0.8], dtype=torch.float64))
    x = torch.randn(32, 2, dtype=torch.float64)
    path = jko_loss(block, x, h=2.0, steps=3, transport="path")
    endpoint = jko_loss(block, x, h=2.0, steps=3, transport="endpoint")
    assert float(path.transport) == pytest.approx(0.5, rel=1e-12)
    assert float(endpoint.transport) == pytest.approx(0.5, rel=1e-12)
    expected_kl = float((0.5 * (x + block.c).pow(2).sum(1)).mean())
    assert float(path.kl) == pytest.approx(expected_kl, rel=1e-12)
    assert float(path.loss) == pytest.approx(expected_kl + 0.25, rel=1e-12)


def test_jko_loss_rejects_unknown_transport():
    with pytest.raises(ValueError, match="transport"):
        jko_loss(ConstantBlock(2), torch.zeros(3, 2), 1.0, 2, transport="nope")


@pytest.mark.parametrize("steps", [0, -1, 1.5, True])
def test_integrate_rejects_bad_steps(steps):
    with pytest.raises(ValueError, match="steps"):
        integrate(ConstantBlock(2), torch.zeros(3, 2), steps)


@torch.no_grad()
def test_hjb_residual_of_a_static_quadratic():
    """Φ = c‖x‖²/2: v = −cx, x(t) = x0 e^{−ct}, R = ∫½c²‖x‖² dt = c‖x0‖²(1 − e^{−2c})/4."""
    from .analytic_blocks import QuadraticPotential

    c = 0.7
    x = torch.randn(16, 3, dtype=torch.float64)
    out = integrate(QuadraticPotential(3, c=c), x, steps=64, hjb=True)
    expected = c * x.pow(2).sum(1) * (1 - torch.exp(torch.tensor(-2 * c, dtype=torch.float64))) / 4
    assert torch.allclose(out.hjb, expected, rtol=1e-8)
    assert torch.allclose(out.z, x * torch.exp(torch.tensor(-c, dtype=torch.float64)), rtol=1e-8)
    assert torch.allclose(out.logdet, torch.full((16,), -3 * c, dtype=torch.float64))


@torch.no_grad()
def test_hjb_residual_vanishes_on_an_exact_solution():
    """Φ = c‖x‖²/(2(1 + at)): ∂tΦ = −ac‖x‖²/(2(1+at)²) equals ½‖∇Φ‖² = c²‖x‖²/(2(1+at)²) iff c = −a."""
    from .analytic_blocks import QuadraticPotential

    block = QuadraticPotential(2, c=-0.5, a=0.5)
    x = torch.randn(10, 2, dtype=torch.float64)
    out = integrate(block, x, steps=8, hjb=True)
    assert float(out.hjb.abs().max()) < 1e-14
    assert float(out.kinetic.min()) > 0


def test_hjb_needs_a_potential_block():
    with pytest.raises(ValueError, match="needs a potential block"):
        integrate(ConstantBlock(2), torch.zeros(3, 2), 2, hjb=True)


@pytest.mark.parametrize("hjb", [False, True])
@torch.no_grad()
def test_rk4_matches_torchdiffeq_rk4(random_otflow, hjb):
    """Our RK4 is torchdiffeq's fixed-grid ``rk4`` (3/8 rule), forward and backward in time."""
    from torchdiffeq import odeint

    block = random_otflow(dim=3, width=6)
    x = torch.randn(40, 3, dtype=torch.float64)

    def rhs(t, state):
        grad_x, dphi_dt, laplacian = block.derivatives(state[0], t)
        speed2 = grad_x.pow(2).sum(1)
        rates = (-grad_x, -laplacian, 0.5 * speed2, (dphi_dt - 0.5 * speed2).abs())
        return rates if hjb else rates[:3]

    for t0, t1 in ((0.0, 1.0), (1.0, 0.0)):
        zeros = x.new_zeros(40)
        grid = torch.linspace(t0, t1, 6, dtype=torch.float64)
        reference = [
            part[-1] for part in odeint(rhs, (x,) + (zeros,) * (3 if hjb else 2), grid, method="rk4")
        ]
        ours = integrate(block, x, 5, t0=t0, t1=t1, hjb=hjb)
        for mine, theirs in zip(ours, reference, strict=False):
            assert float((mine - theirs).abs().max()) < 1e-12 * (1 + float(theirs.abs().max()))
