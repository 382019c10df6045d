"""OT-Flow potential block: closed-form derivatives against torch autograd in float64."""

import pytest
import torch

import blocks
from blocks import OTFlowBlock, logcosh

SHAPES = [(1, 4, 1), (2, 8, 1), (2, 16, 2), (3, 7, 3), (5, 12, 2), (8, 6, 4)]


def _block(dim: int, width: int, depth: int, seed: int = 0) -> OTFlowBlock:
    torch.manual_seed(seed)
    block = blocks.make("otflow", dim=dim, width=width, depth=depth).double()
    with torch.no_grad():  # move every parameter off its special initial value
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return block


def _autograd(block: OTFlowBlock, z: torch.Tensor, t: torch.Tensor):
    s = torch.cat([z, t[:, None]], 1).requires_grad_(True)
    phi = block.potential(s[:, :-1], s[:, -1])
    grad = torch.autograd.grad(phi.sum(), s, create_graph=True)[0]
    lap = sum(torch.autograd.grad(grad[:, k].sum(), s, retain_graph=True)[0][:, k] for k in range(z.shape[1]))
    return grad[:, :-1], grad[:, -1], lap


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max().detach() / b.abs().max().detach())


@pytest.mark.parametrize("dim,width,depth", SHAPES)
def test_closed_form_matches_autograd(dim, width, depth):
    block = _block(dim, width, depth)
    gen = torch.Generator().manual_seed(dim * 100 + width)
    z = 1.5 * torch.randn(17, dim, generator=gen, dtype=torch.float64)
    t = torch.rand(17, generator=gen, dtype=torch.float64)
    grad, dt, lap = _autograd(block, z, t)
    closed = block.derivatives(z, t)
    assert _rel(closed.grad_x, grad) < 1e-10
    assert _rel(closed.dphi_dt, dt) < 1e-10
    assert _rel(closed.laplacian, lap) < 1e-10
    v, div = block(z, t)
    assert torch.equal(v, -closed.grad_x)
    assert torch.equal(div, -closed.laplacian)


def test_divergence_is_trace_of_velocity_jacobian():
    block = _block(3, 10, 2)
    z = torch.randn(5, 3, dtype=torch.float64)
    for i in range(5):
        jac = torch.autograd.functional.jacobian(lambda x: block(x[None], 0.3)[0][0], z[i])
        div = block(z[i : i + 1], 0.3)[1].detach()
        assert float(div) == pytest.approx(float(jac.trace()), rel=1e-10)


def test_scalar_and_vector_time_agree():
    block = _block(2, 8, 2)
    z = torch.randn(6, 2, dtype=torch.float64)
    a = block(z, 0.25)
    b = block(z, torch.full((6,), 0.25, dtype=torch.float64))
    c = block(z, torch.tensor(0.25, dtype=torch.float64))
    for x, y, w in zip(a, b, c, strict=True):
        assert torch.equal(x, y) and torch.equal(x, w)


def test_default_rank_and_config_round_trip():
    assert blocks.make("otflow", dim=2).rank == 3
    assert blocks.make("otflow", dim=43).rank == 10
    block = blocks.make("otflow", dim=4, width=9, depth=3)
    assert block.config() == {"dim": 4, "width": 9, "depth": 3, "rank": 5}
    clone = OTFlowBlock(**block.config())
    assert sum(p.numel() for p in clone.parameters()) == sum(p.numel() for p in block.parameters())


def test_parameter_gradients_flow_through_closed_form():
    block = _block(2, 6, 2)
    z = torch.randn(8, 2, dtype=torch.float64)

    def loss_of(params):
        out = torch.func.functional_call(block, params, (z, 0.5))
        return out[0].pow(2).sum() + out[1].sum()

    params = {k: v.detach().clone() for k, v in block.named_parameters()}
    grads = torch.func.grad(loss_of)(params)
    # finite differences on a few entries of every parameter
    for name, p in params.items():
        flat = p.reshape(-1)
        for idx in range(min(3, flat.numel())):
            eps = 1e-6
            plus = {k: v.clone() for k, v in params.items()}
            minus = {k: v.clone() for k, v in params.items()}
            plus[name].reshape(-1)[idx] += eps
            minus[name].reshape(-1)[idx] -= eps
            numeric = (loss_of(plus) - loss_of(minus)) / (2 * eps)
            assert float(grads[name].reshape(-1)[idx]) == pytest.approx(float(numeric), rel=1e-6, abs=1e-8)


def test_logcosh_is_overflow_safe():
    x = torch.tensor([-1e4, -50.0, 0.0, 3.0, 1e4], dtype=torch.float32)
    y = logcosh(x)
    assert torch.isfinite(y).all()
    expected = torch.log(torch.cosh(torch.tensor(3.0, dtype=torch.float64))) + torch.log(torch.tensor(2.0))
    assert float(y[3]) == pytest.approx(float(expected), rel=1e-6)
    assert float(y[0]) == pytest.approx(1e4, rel=1e-7)  # log(e^x + e^-x) = |x| + log1p(e^{-2|x|})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dim": 0}, "dim"),
        ({"dim": 2, "width": -1}, "width"),
        ({"dim": 2, "depth": 0}, "depth"),
        ({"dim": 2, "rank": 4}, "rank"),
        ({"dim": 2.5}, "dim"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        blocks.make("otflow", **kwargs)


def test_registry():
    assert "otflow" in blocks.names()
    assert blocks.get("otflow") is OTFlowBlock
    with pytest.raises(ValueError, match="unknown block type 'nope'"):
        blocks.make("nope", dim=2)
    with pytest.raises(ValueError, match="already registered"):
        blocks.register("otflow")(type("Other", (OTFlowBlock,), {}))
    with pytest.raises(ValueError, match=r"expected z of shape \(n, 2\)"):
        blocks.make("otflow", dim=2)(torch.zeros(3, 3), 0.0)


@pytest.mark.parametrize("update", [True, False])
def test_jacobian_layer_backward_matches_finite_differences(update):
    from blocks.otflow import _JacobianLayer

    gen = torch.Generator().manual_seed(3)
    jac, K, slope, curv = (
        torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(True)
        for shape in ((4, 3, 5), (5, 5), (4, 5), (4, 5))
    )

    def f(jac, K, slope, curv):
        trace, new, _, _ = _JacobianLayer.apply(jac, K, slope, curv, 0.5, update)
        return (trace, new) if update else trace

    assert torch.autograd.gradcheck(f, (jac, K, slope, curv))
    trace, new, kj, _ = _JacobianLayer.apply(jac, K, slope, curv, 0.5, update)
    assert torch.allclose(kj, jac @ K.T)
    assert torch.allclose(trace, 0.5 * (curv * (jac @ K.T).pow(2).sum(1)).sum(1))
    if update:
        assert torch.allclose(new, jac + 0.5 * slope[:, None] * (jac @ K.T))
