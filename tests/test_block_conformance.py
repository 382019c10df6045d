"""The block contract (blocks/base.py), checked for every block type the library ships.

A new block type in ``blocks/`` is picked up here automatically; ``timeslice``
(which wraps a parent) is checked through the refinement test of every type.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import blocks
import jkoflow
from jkoflow import Flow

from .configs import first_pass

LIBRARY = [
    name
    for name in blocks.names()
    if blocks.get(name).__module__.startswith("blocks.") and name != "timeslice"
]


def test_the_library_ships_two_block_types():
    assert {"otflow", "mlp"} <= set(LIBRARY)


def _random(name: str, dim: int = 3, seed: int = 0, scale: float = 0.3) -> blocks.Block:
    """A float64 block of type ``name`` moved off its (near-identity) initial weights."""
    torch.manual_seed(seed)
    block = blocks.make(name, dim=dim, width=8, depth=2).double()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(scale * torch.randn_like(p))
    return block


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max().detach() / b.abs().max().detach())


@pytest.mark.parametrize("name", LIBRARY)
@pytest.mark.parametrize("dim", [1, 2, 5])
def test_divergence_matches_autograd_jacobian_trace(name, dim):
    block = _random(name, dim).eval()
    z = torch.randn(6, dim, dtype=torch.float64)
    t = torch.rand(6, dtype=torch.float64)  # one time per row
    v, div = block(z, t)
    assert v.shape == (6, dim) and div.shape == (6,) and v.dtype == div.dtype == torch.float64
    for i in range(len(z)):
        jac = torch.autograd.functional.jacobian(lambda x, i=i: block(x[None], t[i : i + 1])[0][0], z[i])
        assert abs(float(div[i].detach()) - float(jac.trace())) <= 1e-10 * max(1.0, abs(float(jac.trace())))
    v_scalar, div_scalar = block(z, 0.25)  # a float time is the same as a column of it
    v_column, div_column = block(z, torch.full((6,), 0.25, dtype=torch.float64))
    assert _rel(v_scalar, v_column) < 1e-14 and _rel(div_scalar, div_column) < 1e-14


@pytest.mark.parametrize("name", LIBRARY)
def test_divergence_is_exact_and_detached_under_no_grad(name):
    block = _random(name).train()  # training mode: no_grad must still be exact
    z = torch.randn(5, 3, dtype=torch.float64)
    v_grad, div_grad = block(z, 0.5)
    with torch.no_grad():
        v, div = block(z, 0.5)
    assert not v.requires_grad and not div.requires_grad
    assert _rel(v, v_grad) < 1e-14 and _rel(div, div_grad) < 1e-14


@pytest.mark.parametrize("name", LIBRARY)
def test_starts_near_the_identity(name):
    torch.manual_seed(0)
    block = blocks.make(name, dim=2, width=16, depth=1)
    with torch.no_grad():
        v, _ = block(torch.randn(100, 2), 0.3)
    assert float(v.norm(dim=1).mean()) < 0.2


@pytest.mark.parametrize("name", LIBRARY)
@pytest.mark.parametrize("count", [2, 3])
def test_time_slices_reproduce_the_block(name, count):
    """c slices with steps/c RK4 steps each follow the parent's RK4 grid: equal to rounding."""
    block = _random(name, dim=2, scale=0.2)
    steps = 6
    whole = Flow(2, [block], steps=steps).double()
    sliced = Flow(2, blocks.time_slices(block, count), steps=steps // count).double()
    x = torch.randn(50, 2, dtype=torch.float64)
    with torch.no_grad():
        z, logdet = whole(x)
        z_sliced, logdet_sliced = sliced(x)
        assert float((z - z_sliced).abs().max()) < 1e-10
        assert float((logdet - logdet_sliced).abs().max()) < 1e-10
        assert float((sliced.inverse(z_sliced) - whole.inverse(z)).abs().max()) < 1e-10
        assert float((whole.inverse(z) - x).abs().max()) < 1e-3  # a real map, inverted to RK4 accuracy


@pytest.mark.parametrize("name", LIBRARY)
def test_save_load_round_trip(name, tmp_path):
    block = _random(name, dim=2)
    flow = Flow(2, [block, *blocks.time_slices(_random(name, dim=2, seed=1), 2)], steps=4).double()
    flow.save(tmp_path / "flow.pt")
    loaded = Flow.load(tmp_path / "flow.pt")
    assert [type(b) for b in loaded.blocks] == [type(b) for b in flow.blocks]
    assert loaded.config() == flow.config()
    x = torch.randn(20, 2, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(loaded.log_prob(x), flow.log_prob(x))


@pytest.mark.parametrize("name", LIBRARY)
def test_training_lowers_the_jko_loss(name):
    x = jkoflow.datasets.load("8gaussians", n=2000, seed=0)
    losses: list[float] = []
    config = first_pass(
        block=name, width=8, iters=25, batch_size=256, max_blocks=1, lr=0.02, train_steps=2, eval_steps=4
    )
    flow, history = jkoflow.train_jko(x, config=config, callback=lambda r: losses.append(r["loss"]))
    assert len(losses) == 25 and type(flow.blocks[0]).name == name
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < first - 0.5, (first, last)
    with torch.no_grad():
        identity_nll = float(-jkoflow.Flow(2).double().log_prob(torch.as_tensor(x)).mean())
    assert history.blocks[0]["val_nll"] < identity_nll


@pytest.mark.parametrize("name", LIBRARY)
def test_dtype_and_device_moves(name):
    block = _random(name, dim=2)
    z = torch.randn(7, 2, dtype=torch.float64)
    v64, div64 = block(z, 0.5)
    single = block.to(torch.float32)
    v32, div32 = single(z.float(), 0.5)
    assert v32.dtype == div32.dtype == torch.float32
    assert _rel(v32.double(), v64) < 1e-5 and _rel(div32.double(), div64) < 1e-5
    again = single.double()
    assert _rel(again(z, 0.5)[1], div64) < 1e-6  # float32 weights, read back in float64
    if torch.cuda.is_available():
        cuda = again.to("cuda")
        v_cuda, div_cuda = cuda(z.cuda(), torch.tensor(0.5, device="cuda", dtype=torch.float64))
        assert v_cuda.device.type == div_cuda.device.type == "cuda"
        assert _rel(div_cuda.cpu(), again.cpu()(z, 0.5)[1]) < 1e-10
