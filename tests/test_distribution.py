"""jkoflow.distribution: a flow as a torch.distributions Distribution and Transform."""

import copy
import doctest
from pathlib import Path

import pytest
import torch
from torch.distributions import Independent, Normal, TransformedDistribution, constraints

from jkoflow import Flow, FlowDistribution, FlowTransform, InputError


@pytest.fixture
def flow(random_otflow):
    """Two random float64 OT-Flow blocks in d = 3 behind a standardisation."""
    made = [random_otflow(dim=3, seed=s) for s in (0, 1)]
    shift, scale = torch.tensor([0.5, -1.0, 2.0]).double(), torch.tensor([1.5, 0.7, 2.0]).double()
    return Flow(3, made, steps=8, shift=shift, scale=scale)


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_log_prob_is_the_flows_for_any_batch_shape(flow):
    p = FlowDistribution(flow)
    assert p.event_shape == (3,) and p.batch_shape == () and p.support is constraints.real_vector
    assert p.arg_constraints == {} and p.has_rsample
    x = _x(4, 5, 3)
    log_p = p.log_prob(x)
    assert log_p.shape == (4, 5)
    assert torch.allclose(log_p, flow.log_prob(x.reshape(20, 3)).reshape(4, 5), atol=1e-13)
    assert torch.allclose(p.log_prob(x[0, 0]), flow.log_prob(x[0, :1])[0], atol=1e-13)


def test_transformed_normal_has_the_flows_log_density(flow):
    T = FlowTransform(flow)
    assert T.bijective and T.domain is constraints.real_vector and T.codomain is constraints.real_vector
    base = Independent(Normal(torch.zeros(3).double(), torch.ones(3).double()), 1)
    p = TransformedDistribution(base, T.inv)
    x = _x(64, 3, seed=1) * 2
    with torch.no_grad():
        assert (p.log_prob(x) - flow.log_prob(x)).abs().max() < 1e-10
        assert (T.inv(T(x)) - x).abs().max() < 1e-6  # RK4 inversion error at 8 steps
        assert (T(T.inv(x)) - x).abs().max() < 1e-6
    assert p.event_shape == (3,)


def test_log_abs_det_jacobian_is_the_log_determinant_of_the_map(flow):
    T = FlowTransform(flow.with_steps(32))
    x = _x(5, 3, seed=2)
    logdet = T.log_abs_det_jacobian(x, T(x))
    for i in range(5):  # the ODE's log-determinant against autograd's Jacobian of the RK4 map
        jac = torch.autograd.functional.jacobian(lambda row: T(row[None])[0], x[i])
        assert float(logdet[i].detach()) == pytest.approx(float(torch.linalg.slogdet(jac)[1]), abs=1e-6)


def test_log_abs_det_jacobian_reuses_only_the_last_pair(flow):
    T = FlowTransform(flow)
    x, other = _x(10, 3, seed=3), _x(10, 3, seed=4)
    with torch.no_grad():
        z = T(x)
        cached = T.log_abs_det_jacobian(x, z)
        assert torch.equal(cached, flow(x)[1])
        assert torch.equal(T.log_abs_det_jacobian(other, T.inv(other)), flow(other)[1])
        assert torch.equal(T.log_abs_det_jacobian(x, z), cached)  # recomputed: same numbers


def test_with_cache_keeps_torchs_cache_semantics(flow):
    T, same, other = FlowTransform(flow), FlowTransform(flow), FlowTransform(flow.head(1))
    assert T.with_cache(0) is T and same == T and other != T
    cached = T.with_cache(1)
    x = _x(6, 3, seed=7)
    with torch.no_grad():
        z = cached(x)
        assert cached.inv(z) is x  # torch's one-entry cache: no inverse integration
        assert not torch.equal(T.inv(z), x)  # without it, the RK4 inverse (≈ x, not bitwise)
        assert torch.allclose(T.inv(z), x, atol=1e-6)


def test_rsample_is_differentiable_through_the_reparametrisation(flow):
    p = FlowDistribution(flow)
    weight = flow.blocks[0].K0

    def mean_square(w):
        with torch.no_grad():
            weight.copy_(w)
        torch.manual_seed(5)
        return p.rsample((50,)).pow(2).sum(1).mean()

    w0 = weight.detach().clone()
    loss = mean_square(w0)
    (grad,) = torch.autograd.grad(loss, weight)
    direction = torch.randn_like(w0)
    eps = 1e-6
    finite = (mean_square(w0 + eps * direction) - mean_square(w0 - eps * direction)) / (2 * eps)
    assert float((grad * direction).sum()) == pytest.approx(float(finite.detach()), rel=1e-5)
    assert grad.abs().sum() > 0


def test_sample_shapes_and_no_gradient(flow):
    p = FlowDistribution(flow)
    torch.manual_seed(6)
    x = p.sample((7, 2))
    assert x.shape == (7, 2, 3) and x.dtype == torch.float64 and not x.requires_grad
    torch.manual_seed(6)
    assert torch.allclose(p.rsample((7, 2)), x, atol=0)  # the same draws: T⁻¹ of randn
    torch.manual_seed(6)
    assert torch.equal(x.reshape(14, 3), flow.inverse(torch.randn(14, 3, dtype=torch.float64)).detach())
    batched = p.expand((4,))
    assert batched.batch_shape == (4,) and batched.sample((2,)).shape == (2, 4, 3)
    assert batched.log_prob(_x(3)).shape == (4,) and batched.log_prob(_x(2, 4, 3)).shape == (2, 4)
    assert FlowDistribution(copy.deepcopy(flow).float()).sample((3,)).dtype == torch.float32


def test_validate_args(flow):
    strict, lax = FlowDistribution(flow, validate_args=True), FlowDistribution(flow, validate_args=False)
    bad = _x(4, 3)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="support"):
        strict.log_prob(bad)
    with pytest.raises(ValueError):
        strict.log_prob(_x(4, 2))
    with pytest.raises(InputError, match="NaN"):  # the flow itself still refuses it
        lax.log_prob(bad)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 3\)"):
        lax.log_prob(_x(4, 2))
    with pytest.raises(TypeError, match=r"jkoflow\.Flow"):
        FlowDistribution(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"jkoflow\.Flow"):
        FlowTransform("flow")


def test_the_documented_example_runs():
    """docs/figures.md: the flow as an importance-sampling proposal and as a VAE prior."""
    doc = Path(__file__).resolve().parent.parent / "docs" / "figures.md"
    result = doctest.testfile(str(doc), module_relative=False, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 10 and result.failed == 0
