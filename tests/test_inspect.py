"""jkoflow.inspect: the numbers behind the figures come from the flow's own pushes."""

import math

import numpy as np
import pytest
import torch

import blocks
from jkoflow import Flow, InputError
from jkoflow.inspect import (
    density_grid,
    panel_indices,
    parent_boundaries,
    principal_axes,
    project,
    pullback,
    pushforward,
    trajectories,
)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture
def flow3(random_otflow):
    """Three random float64 OT-Flow blocks behind a non-trivial standardisation."""
    made = [random_otflow(dim=3, seed=s) for s in range(3)]
    shift, scale = torch.tensor([1.0, -2.0, 0.5]).double(), torch.tensor([2.0, 0.5, 1.5]).double()
    return Flow(3, made, steps=5, shift=shift, scale=scale)


def _constant(dim, c):
    block = blocks.make("test-constant", dim=dim).double()
    with torch.no_grad():
        block.c.copy_(torch.as_tensor(c, dtype=torch.float64))
    return block


def _linear(B):
    B = torch.as_tensor(B, dtype=torch.float64)
    block = blocks.make("test-linear", dim=B.shape[0]).double()
    with torch.no_grad():
        block.B.copy_(B)
    return block


def test_pushforward_states_are_the_flows_heads(flow3):
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(1)).double() * 2 + 1
    pushed = pushforward(flow3, x)
    assert len(pushed.states) == 4 and pushed.movement.shape == (3,) and pushed.nll.shape == (4,)
    for k in range(4):
        z, _ = flow3.head(k)(x)
        assert torch.equal(pushed.states[k], z)
        assert float(pushed.nll[k]) == pytest.approx(-float(flow3.head(k).log_prob(x).mean()), abs=1e-12)
    for k in range(1, 4):
        step = flow3.head(k)(x)[0] - flow3.head(k - 1)(x)[0]
        assert float(pushed.movement[k - 1]) == pytest.approx(
            float(step.pow(2).sum(1).mean().sqrt()), rel=1e-12
        )
    assert (pushed.movement > 0.05).all()  # the random blocks do move the data


def test_pullback_inverts_block_by_block(flow3):
    z = torch.randn(100, 3, generator=torch.Generator().manual_seed(2)).double()
    states = pullback(flow3, z)
    assert len(states) == 4 and torch.equal(states[3], z)
    assert torch.allclose(flow3.unstandardize(states[0]), flow3.inverse(z), atol=1e-13)
    for k in range(4):  # states[k] = (T_L ∘ … ∘ T_{k+1})⁻¹(z)
        tail = Flow(3, flow3.blocks[k:], steps=flow3.steps).double()
        assert torch.allclose(states[k], tail.inverse(z), atol=1e-13)
    # and pushing states[k - 1] through block k gives states[k] back (RK4 round trip)
    pushed = pushforward(Flow(3, flow3.blocks, steps=flow3.steps).double(), states[0])
    for k in range(4):
        assert (pushed.states[k] - states[k]).abs().max() < 1e-5


def test_trajectories_end_where_the_blocks_push(flow3):
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(3)).double()
    paths = trajectories(flow3, x)
    assert paths.paths.shape == (3, 6, 50, 3) and paths.straightness().shape == (3,)
    pushed = pushforward(flow3, x)
    for k in range(3):
        assert torch.allclose(paths.paths[k, 0], pushed.states[k], atol=1e-13)
        assert torch.allclose(paths.paths[k, -1], pushed.states[k + 1], atol=1e-13)
    assert (paths.straightness() >= 1.0 - 1e-12).all()


def test_straightness_is_one_for_constant_velocity_and_the_arc_ratio_for_a_rotation():
    theta, steps = 1.2, 8
    rotation = _linear([[0.0, -theta], [theta, 0.0]])  # paths are circular arcs of angle θ
    flow = Flow(2, [_constant(2, [0.7, -1.1]), rotation], steps=steps).double()
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(4)).double()
    straightness = trajectories(flow, x).straightness()
    assert float(straightness[0]) == pytest.approx(1.0, abs=1e-12)
    # a polyline of `steps` equal chords of an arc of angle θ over the arc's chord
    expected = steps * math.sin(theta / (2 * steps)) / math.sin(theta / 2)
    assert float(straightness[1]) == pytest.approx(expected, rel=1e-5)
    assert expected > 1.05


def test_density_grid_matches_log_prob_and_integrates_to_one(random_otflow):
    made = [random_otflow(dim=2, seed=s) for s in (5, 6)]
    flow = Flow(
        2, made, steps=6, shift=torch.tensor([0.5, -1.0]).double(), scale=torch.tensor([1.5, 0.7]).double()
    )
    grid = density_grid(flow, ((-9.0, 10.0), (-8.0, 6.0)), cells=160)
    assert grid.log_prob.shape == (160, 160)
    centres = grid.centres()
    assert np.allclose(grid.log_prob.ravel(), flow.log_prob(centres).numpy(), atol=1e-12)
    assert grid.mass() == pytest.approx(1.0, abs=5e-3)
    half = density_grid(flow, ((-9.0, 0.5), (-8.0, 6.0)), cells=80)  # half the box holds less
    assert 0.05 < half.mass() < 0.95


def test_density_grid_orientation_on_an_anisotropic_gaussian():
    # T(x) = diag(e^a, e^b) x, so x ~ N(0, diag(e^−2a, e^−2b)): rows of log_prob run along y
    a, b = 0.3, -0.6
    flow = Flow(2, [_linear([[a, 0.0], [0.0, b]])], steps=8).double()
    grid = density_grid(flow, ((-4.0, 4.0), (-6.0, 6.0)), cells=(40))
    cx = 0.5 * (grid.x_edges[1:] + grid.x_edges[:-1])
    cy = 0.5 * (grid.y_edges[1:] + grid.y_edges[:-1])
    sx, sy = math.exp(-a), math.exp(-b)
    exact = -0.5 * ((cx[None, :] / sx) ** 2 + (cy[:, None] / sy) ** 2) - math.log(2 * math.pi * sx * sy)
    assert np.abs(grid.log_prob - exact).max() < 1e-5  # RK4 error of expm(B) only


def test_density_grid_refuses_other_dimensions_and_empty_boxes(flow3, random_otflow):
    with pytest.raises(InputError, match="2-D flow"):
        density_grid(flow3, ((-1, 1), (-1, 1)))
    with pytest.raises(InputError, match="empty grid box"):
        density_grid(Flow(2, [random_otflow()]).double(), ((1, 1), (-1, 1)))


def test_principal_axes_find_the_stretched_directions():
    gen = torch.Generator().manual_seed(7)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))
    x = (
        torch.randn(4000, 5, generator=gen, dtype=torch.float64) * torch.tensor([5.0, 3.0, 1, 0.5, 0.2])
    ) @ q.T
    axes = principal_axes(x + 3.0)  # the mean does not matter
    assert torch.allclose(axes.T @ axes, torch.eye(2, dtype=torch.float64), atol=1e-12)
    assert abs(float(axes[:, 0] @ q[:, 0])) > 0.99 and abs(float(axes[:, 1] @ q[:, 1])) > 0.99
    assert (axes.gather(0, axes.abs().argmax(0, keepdim=True)) > 0).all()  # sign convention
    assert torch.equal(principal_axes(x[:, :2]), torch.eye(2, dtype=torch.float64))
    z = torch.randn(20000, 5, generator=gen, dtype=torch.float64)
    assert torch.allclose(project(z, axes).std(0), torch.ones(2, dtype=torch.float64), atol=0.03)


def test_panel_indices_for_1_to_64_blocks():
    assert panel_indices(0) == [0]
    assert panel_indices(1) == [0, 1]
    assert panel_indices(7) == list(range(8))
    many = panel_indices(64)
    assert len(many) == 8 and many[0] == 0 and many[-1] == 64
    assert max(np.diff(many)) - min(np.diff(many)) <= 1  # evenly spaced
    assert panel_indices(16, 8, [0, 4, 8, 12, 16]) == [0, 4, 8, 12, 16]
    assert panel_indices(64, 8, list(range(0, 65, 4))) == [0, 8, 20, 28, 36, 44, 56, 64]


def test_parent_boundaries_of_a_refined_flow(random_otflow):
    parents = [random_otflow(seed=s) for s in range(3)]
    plain = Flow(2, parents, steps=4).double()
    assert parent_boundaries(plain) == [0, 1, 2, 3]
    refined = Flow(2, [s for p in parents for s in blocks.time_slices(p, 4)], steps=1).double()
    assert parent_boundaries(refined) == [0, 4, 8, 12]
    assert panel_indices(len(refined), 4, parent_boundaries(refined)) == [0, 4, 8, 12]
    # the refined flow's parent-boundary states are the plain flow's (slices compose exactly)
    x = torch.randn(30, 2, generator=torch.Generator().manual_seed(8)).double()
    fine, coarse = pushforward(refined, x), pushforward(plain, x)
    for k in range(4):
        assert torch.allclose(fine.states[4 * k], coarse.states[k], atol=1e-12)


def test_straightness_of_a_refined_flow_per_parent_is_the_parents(random_otflow):
    parents = [random_otflow(seed=s) for s in (9, 10)]
    plain = Flow(2, parents, steps=8).double()
    refined = Flow(2, [s for p in parents for s in blocks.time_slices(p, 4)], steps=2).double()
    x = torch.randn(60, 2, generator=torch.Generator().manual_seed(11)).double()
    fine, coarse = trajectories(refined, x), trajectories(plain, x)
    assert fine.paths.shape == (8, 3, 60, 2)
    per_parent = fine.straightness(parent_boundaries(refined))
    assert torch.allclose(per_parent, coarse.straightness(), atol=1e-12)
    assert (per_parent > 1.0 + 1e-4).all()  # random blocks curve their paths
    # a finer path grid than the flow's: same ends up to the RK4 error, never less curved
    finer = trajectories(plain, x, steps=32)
    assert (finer.paths[-1, -1] - coarse.paths[-1, -1]).abs().max() < 1e-4
    assert (finer.straightness() >= coarse.straightness() - 1e-6).all()


def test_per_block_views_use_each_block_s_own_steps(flow3):
    """With step factors (1, 3, 2) the pushforward, pullback and default
    trajectories follow the flow's own per-block integration."""
    stepped = Flow(3, flow3.blocks, 2, flow3.shift, flow3.scale, steps_factors=[1, 3, 2])
    x = torch.randn(40, 3, dtype=torch.float64)
    pushed = pushforward(stepped, x)
    for k in range(4):
        assert torch.equal(pushed.states[k], stepped.head(k)(x)[0])
    assert not torch.allclose(pushed.states[3], Flow(3, flow3.blocks, 2, flow3.shift, flow3.scale)(x)[0])
    z = torch.randn(40, 3, dtype=torch.float64)
    states = pullback(stepped, z)
    assert torch.allclose(stepped.unstandardize(states[0]), stepped.inverse(z), rtol=0, atol=1e-14)
    assert trajectories(stepped, x).paths.shape == (3, 7, 40, 3)  # the largest count, 2·3 steps
    uniform = Flow(3, flow3.blocks, 2, flow3.shift, flow3.scale, steps_factors=[3, 3, 3])
    assert torch.equal(trajectories(uniform, x).paths[-1, -1], uniform(x)[0])
