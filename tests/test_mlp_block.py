"""The free-form MLP block: exact closed-form divergence, Hutchinson only in training."""

import pytest
import torch

import blocks
import jkoflow
from blocks import MLPBlock


def _block(dim=3, activation="tanh", hutchinson=False, seed=0) -> MLPBlock:
    torch.manual_seed(seed)
    block = blocks.make("mlp", dim=dim, width=8, depth=2, activation=activation, hutchinson=hutchinson)
    block = block.double()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return block


@pytest.mark.parametrize("activation", sorted(blocks.mlp.ACTIVATIONS))
def test_divergence_for_every_activation(activation):
    block = _block(activation=activation).eval()
    z = torch.randn(4, 3, dtype=torch.float64)
    div = block(z, 0.7)[1].detach()
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda x: block.velocity(x[None], 0.7)[0], z[i])
        assert float(div[i]) == pytest.approx(float(jac.trace()), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("activation", sorted(blocks.mlp.ACTIVATIONS))
def test_closed_form_divergence_and_its_gradients_match_autograd(activation):
    """The closed form equals the autograd trace (blocks.divergence_exact), and so
    do its gradients in the weights and the input, in float64."""
    block = _block(activation=activation)
    z = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    v, div = block(z, 0.4)
    v_ref = block.velocity(z, 0.4)
    div_ref = blocks.divergence_exact(v_ref, z, create_graph=True)
    assert torch.allclose(v, v_ref, rtol=1e-12, atol=1e-14)
    assert torch.allclose(div, div_ref, rtol=1e-10, atol=1e-12)
    weights = torch.linspace(-1.0, 2.0, 6, dtype=torch.float64)
    inputs = [z, *block.parameters()]
    mine = torch.autograd.grad((weights * div).sum() + v.pow(2).sum(), inputs)
    reference = torch.autograd.grad((weights * div_ref).sum() + v_ref.pow(2).sum(), inputs)
    for a, b in zip(mine, reference, strict=True):
        assert float((a - b).abs().max()) <= 1e-10 * (1 + float(b.abs().max()))


@pytest.mark.parametrize(("dim", "width", "depth"), [(2, 32, 1), (43, 16, 0), (5, 7, 3)])
def test_parameter_count_and_config(dim, width, depth):
    block = blocks.make("mlp", dim=dim, width=width, depth=depth, activation="silu")
    count = sum(p.numel() for p in block.parameters())
    assert count == (2 * dim + 1) * width + depth * width**2 + (depth + 1) * width + dim
    rebuilt = blocks.make("mlp", **block.config())
    assert rebuilt.config() == block.config() and rebuilt.config()["activation"] == "silu"


def test_hutchinson_only_in_training_with_grad():
    block = _block(hutchinson=True)
    z = torch.randn(6, 3, dtype=torch.float64)
    exact = _block(hutchinson=False).eval()(z, 0.3)[1].detach()
    torch.manual_seed(1)
    estimate = block.train()(z, 0.3)[1]
    assert estimate.requires_grad and not torch.allclose(estimate, exact, atol=1e-3)
    with torch.no_grad():  # pushing and NLL: exact even in training mode
        assert torch.allclose(block(z, 0.3)[1], exact, rtol=1e-12)
    assert torch.allclose(block.eval()(z, 0.3)[1], exact, rtol=1e-12)  # eval mode: exact
    torch.manual_seed(2)  # rows are independent: 4000 copies of z get 4000 independent probes
    many = block.train()(z.repeat(4000, 1), 0.3)[1].detach().view(4000, 6)
    error = (many.mean(0) - exact).abs()
    assert bool((error < 4 * many.std(0) / 4000**0.5).all())  # unbiased: within 4 standard errors
    assert float(many.std(0).min()) > 0.05  # yet noisy per probe


def test_hutchinson_trains_and_reports_exact_nll():
    x = jkoflow.datasets.load("moons", n=1500, seed=0)
    config = jkoflow.JKOConfig(
        block="mlp",
        block_options={"hutchinson": True},
        width=8,
        iters=10,
        batch_size=128,
        max_blocks=1,
        eval_steps=4,
    )
    flow, history = jkoflow.train_jko(x, config=config)
    assert flow.blocks[0].hutchinson and not flow.blocks[0].training
    exact = blocks.make("mlp", **{**flow.blocks[0].config(), "hutchinson": False}).to(flow.shift)
    exact.load_state_dict(flow.blocks[0].state_dict())
    reference = jkoflow.Flow(2, [exact], steps=flow.steps).to(flow.shift)
    x = torch.as_tensor(x[:300], dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(flow.log_prob(x), reference.log_prob(x))
    assert history.blocks[0]["loss_last"] < history.blocks[0]["loss_first"]


def test_gradients_reach_the_weights_and_the_input():
    block = _block().train()
    z = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    out = jkoflow.integrate(block, z, 3)
    (out.logdet.sum() + out.kinetic.sum()).backward()
    assert z.grad is not None and float(z.grad.abs().sum()) > 0
    assert all(p.grad is not None for p in block.parameters())
    assert float(block.net[0].weight.grad.abs().sum()) > 0  # through the divergence's second derivative


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 0}, "width must be an integer"),
        ({"depth": -1}, "depth must be an integer"),
        ({"activation": "relu"}, "activation must be one of"),
        ({"hutchinson": "yes"}, "hutchinson must be"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        blocks.make("mlp", dim=2, **kwargs)
    with pytest.raises(jkoflow.InputError, match=f"cannot build a 'mlp' block: mlp block: {match}"):
        jkoflow.JKOConfig(block="mlp", block_options=kwargs).make_block(2)
