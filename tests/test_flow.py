"""Flow: composition, standardisation, normalisation of the density, save/load."""

import math

import pytest
import torch

import blocks
from jkoflow import Flow, InputError, gaussian_log_prob


@pytest.fixture
def flow(random_otflow):
    return Flow(2, [random_otflow(seed=1), random_otflow(seed=2)], steps=16).double()


def test_empty_flow_is_standard_gaussian():
    flow = Flow(3).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    expected = -0.5 * x.pow(2).sum(1) - 1.5 * math.log(2 * math.pi)
    assert torch.allclose(flow.log_prob(x), expected, atol=1e-14)
    assert torch.allclose(gaussian_log_prob(x), expected, atol=1e-14)


def test_standardisation_is_part_of_the_density():
    shift = torch.tensor([1.0, -2.0], dtype=torch.float64)
    scale = torch.tensor([0.5, 3.0], dtype=torch.float64)
    flow = Flow(2, shift=shift, scale=scale).double()
    x = torch.randn(7, 2, dtype=torch.float64)
    expected = gaussian_log_prob((x - shift) / scale) - scale.log().sum()
    assert torch.allclose(flow.log_prob(x), expected, atol=1e-14)
    assert torch.allclose(flow.inverse(flow(x)[0]), x, atol=1e-14)


@torch.no_grad()
def test_density_agrees_with_sampler(flow):
    """∫_box p(x) dx by the midpoint rule equals the fraction of flow samples in the box."""
    half, cells = 2.5, 150
    centres = -half + (torch.arange(cells, dtype=torch.float64) + 0.5) * (2 * half / cells)
    xx, yy = torch.meshgrid(centres, centres, indexing="ij")
    points = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    mass = float(flow.log_prob(points).exp().sum() * (2 * half / cells) ** 2)
    samples = flow.sample(20000, generator=torch.Generator().manual_seed(0))
    inside = float((samples.abs() <= half).all(1).double().mean())
    assert 0.6 < mass < 0.9  # a box that cuts the density: a non-trivial check
    assert mass == pytest.approx(inside, abs=0.012)  # 4 standard errors


@torch.no_grad()
def test_inverse_round_trip_and_chunking(flow):
    x = torch.randn(300, 2, dtype=torch.float64)
    z, logdet = flow(x)
    z_chunked, logdet_chunked = flow(x, chunk_size=64)
    assert torch.allclose(z, z_chunked, atol=1e-13) and torch.allclose(logdet, logdet_chunked, atol=1e-13)
    assert float((flow.inverse(z, chunk_size=100) - x).norm(dim=1).max()) < 1e-6


@torch.no_grad()
def test_sampling_is_repeatable_and_inverts(flow):
    a = flow.sample(50, generator=torch.Generator().manual_seed(3))
    b = flow.sample(50, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    z = torch.randn(50, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert float((flow(a)[0] - z).abs().max()) < 1e-6


@torch.no_grad()
def test_save_load_round_trip(flow, tmp_path):
    flow.shift.fill_(0.25)
    path = tmp_path / "flow.pt"
    flow.save(path)
    payload = torch.load(path, weights_only=True)  # plain tensors and strings only
    assert payload["format"] == "jkoflow.flow"
    loaded = Flow.load(path)
    assert loaded.shift.dtype == torch.float64 and loaded.steps == 16 and len(loaded) == 2
    x = torch.randn(20, 2, dtype=torch.float64)
    assert torch.equal(loaded.log_prob(x), flow.log_prob(x))
    assert loaded.config() == flow.config()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flow.pt"]  # no temporary file left


@pytest.mark.parametrize(
    "content,match",
    [
        (b"", "cannot read flow checkpoint"),
        (b"not a checkpoint at all", "cannot read flow checkpoint"),
    ],
)
def test_load_rejects_bad_files(tmp_path, content, match):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(InputError, match=match) as info:
        Flow.load(path)
    assert "\n" not in str(info.value)


def test_load_rejects_other_formats_and_versions(tmp_path, flow):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(InputError, match="not a jkoflow flow checkpoint"):
        Flow.load(other)
    path = tmp_path / "flow.pt"
    flow.save(path)
    payload = torch.load(path, weights_only=True)
    payload["version"] = 99
    torch.save(payload, path)
    with pytest.raises(InputError, match="format version 99"):
        Flow.load(path)
    truncated = tmp_path / "truncated.pt"
    flow.save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(InputError, match="cannot read"):
        Flow.load(truncated)
    with pytest.raises(InputError, match="not found"):
        Flow.load(tmp_path / "missing.pt")


def test_bad_inputs_give_clear_errors(flow):
    with pytest.raises(InputError, match=r"shape \(n, 2\)"):
        flow.log_prob(torch.zeros(4, 3))
    with pytest.raises(InputError, match="NaN or infinite"):
        flow.log_prob(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(InputError, match="dimension 3 does not fit"):
        flow.append(blocks.make("otflow", dim=3))
    with pytest.raises(InputError, match="positive integer"):
        flow.sample(0)
    with pytest.raises(InputError, match="steps"):
        Flow(2, steps=0)


def test_saving_an_unregistered_block_type_is_refused(tmp_path):
    from .analytic_blocks import LinearBlock

    class Unregistered(LinearBlock):  # inherits the name "test-linear" but is another class
        pass

    flow = Flow(2, [Unregistered(2)])
    with pytest.raises(InputError, match="Unregistered is not registered"):
        flow.save(tmp_path / "f.pt")
    assert not (tmp_path / "f.pt").exists()


@pytest.mark.parametrize("method", ["log_prob", "forward", "inverse"])
def test_wrong_dimension_is_a_value_error(flow, method):
    with pytest.raises(ValueError, match=r"must have shape \(n, 2\), got \(5, 3\)") as info:
        getattr(flow, method)(torch.zeros(5, 3, dtype=torch.float64))
    assert "\n" not in str(info.value)


def test_head_is_the_first_blocks_with_the_same_standardisation(random_otflow):
    first, second = random_otflow(seed=3), random_otflow(seed=4)
    shift, scale = torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.5])
    flow = Flow(2, [first, second], steps=8, shift=shift, scale=scale).double()
    x = torch.randn(7, 2, dtype=torch.float64)
    head = flow.head(1)
    assert len(head) == 1 and head.blocks[0] is flow.blocks[0] and head.steps == 8
    expected = Flow(2, [first], steps=8, shift=shift, scale=scale).double()
    assert torch.equal(head.log_prob(x), expected.log_prob(x))
    assert torch.equal(flow.head(2).log_prob(x), flow.log_prob(x))
    assert not torch.allclose(head.log_prob(x), flow.log_prob(x))


# -- the decorrelating standardisation -----------------------------------------------


def _correlated(n: int = 4000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 1, generator=g, dtype=torch.float64)
    noise = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return torch.cat([a, 3 * a + 0.1 * noise[:, :1], -a + noise[:, 1:2], 5 + 2 * noise[:, 2:]], 1)


def test_standardised_empty_flow_is_the_full_covariance_gaussian_fit():
    x = _correlated()
    flow = Flow.for_data(x, steps=4, standardize=True)
    z, _ = flow(x)
    eye = torch.eye(4, dtype=torch.float64)
    assert torch.allclose(z.T @ z / (len(z) - 1), eye, atol=1e-10)  # S whitens the training data
    gauss = torch.distributions.MultivariateNormal(x.mean(0), torch.cov(x.T))
    assert torch.allclose(flow.log_prob(x[:100]), gauss.log_prob(x[:100]), rtol=0, atol=1e-10)
    assert torch.allclose(torch.tril(flow.mix), flow.mix)  # M is lower-triangular


def test_decorrelated_flow_inverts_and_saves(tmp_path):
    x = _correlated(seed=1)
    flow = Flow.for_data(x, steps=4, standardize=True)
    flow.append(blocks.make("otflow", dim=4, width=8).double())
    z, logdet = flow(x[:200])
    assert float((flow.inverse(z) - x[:200]).abs().max()) < 1e-8
    ref = torch.func.jacrev(lambda v: flow(v[None])[0][0])(x[0])
    assert float(logdet[0]) == pytest.approx(float(torch.linalg.slogdet(ref)[1]), abs=1e-6)
    flow.save(tmp_path / "f.pt")
    back = Flow.load(tmp_path / "f.pt")
    saved, loaded = flow.state_dict(), back.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert torch.equal(back.mix, flow.mix)
    # the same weights in new memory: equal up to float64 rounding (MKL's
    # kernels may round differently on differently aligned arrays)
    torch.testing.assert_close(back.log_prob(x[:50]), flow.log_prob(x[:50]), rtol=1e-13, atol=1e-13)


def test_a_payload_without_decorrelation_reads_as_the_identity():
    flow = Flow(
        2, [blocks.make("otflow", dim=2, width=8)], steps=4, shift=torch.ones(2), scale=2 * torch.ones(2)
    )
    payload = flow.to_payload()
    del payload["state"]["mix"]
    back = Flow.from_payload(payload)
    x = torch.randn(20, 2)
    assert torch.equal(back.mix, torch.eye(2)) and torch.equal(back.log_prob(x), flow.log_prob(x))


def test_linearly_dependent_columns_cannot_be_standardised():
    x = torch.randn(100, 2, dtype=torch.float64)
    x = torch.cat([x, x.sum(1, keepdim=True)], 1)
    with pytest.raises(InputError, match="linearly dependent"):
        Flow.for_data(x, steps=4, standardize=True)


# -- per-block RK4 steps -----------------------------------------------------------


@pytest.fixture
def stepped(random_otflow):
    """Two blocks at base 2 steps, the second with factor 4 (8 steps), standardised."""
    shift = torch.tensor([0.5, -1.0], dtype=torch.float64)
    scale = torch.tensor([2.0, 0.5], dtype=torch.float64)
    blocks_ = [random_otflow(seed=5), random_otflow(seed=6)]
    return Flow(2, blocks_, steps=2, shift=shift, scale=scale, steps_factors=[1, 4]).double()


@torch.no_grad()
def test_each_block_is_integrated_with_its_own_steps(stepped):
    """log p(x) and T⁻¹ equal integrating block 1 with 2 and block 2 with 8 RK4 steps by hand."""
    from jkoflow import integrate

    assert stepped.steps == 2 and stepped.steps_factors == (1, 4) and stepped.step_counts == (2, 8)
    assert [stepped.block_steps(k) for k in range(2)] == [2, 8]
    x = torch.randn(200, 2, dtype=torch.float64)
    first = integrate(stepped.blocks[0], (x - stepped.shift) / stepped.scale, 2)
    second = integrate(stepped.blocks[1], first.z, 8)
    log_scale = stepped.scale.log().sum()
    expected = gaussian_log_prob(second.z) + first.logdet + second.logdet - log_scale
    assert torch.allclose(stepped.log_prob(x), expected, rtol=0, atol=1e-13)
    z = torch.randn(200, 2, dtype=torch.float64)
    back = integrate(stepped.blocks[1], z, 8, t0=1.0, t1=0.0).z
    back = integrate(stepped.blocks[0], back, 2, t0=1.0, t1=0.0).z * stepped.scale + stepped.shift
    assert torch.allclose(stepped.inverse(z), back, rtol=0, atol=1e-13)
    uniform = Flow(2, stepped.blocks, 2, stepped.shift, stepped.scale)
    assert float((uniform.log_prob(x) - stepped.log_prob(x)).abs().max()) > 1e-7  # the factor counts


@torch.no_grad()
def test_finer_blocks_invert_more_exactly(random_otflow):
    """Base 2 with factors (4, 4) is the flow at 8 steps, and its float64 round
    trip is ~1000× tighter than at 2 steps (RK4: error ∝ steps⁻⁴)."""
    pair = [random_otflow(seed=5), random_otflow(seed=6)]
    coarse = Flow(2, pair, steps=2).double()
    fine = Flow(2, pair, steps=2, steps_factors=[4, 4]).double()
    x = torch.randn(200, 2, dtype=torch.float64)
    assert torch.equal(fine.log_prob(x), Flow(2, pair, steps=8).double().log_prob(x))
    coarse_error = float((coarse.inverse(coarse(x)[0]) - x).norm(dim=1).max())
    fine_error = float((fine.inverse(fine(x)[0]) - x).norm(dim=1).max())
    assert coarse_error > 1e-7 and fine_error < 1e-9


@torch.no_grad()
def test_with_steps_changes_the_base_and_keeps_the_factors(stepped):
    from jkoflow.metrics import nll, step_doubling_change

    doubled = stepped.with_steps(4)
    assert doubled.steps == 4 and doubled.step_counts == (4, 16) and doubled.blocks[1] is stepped.blocks[1]
    by_hand = Flow(2, stepped.blocks, 4, stepped.shift, stepped.scale, steps_factors=[1, 4])
    x = torch.randn(100, 2, dtype=torch.float64)
    assert torch.equal(doubled.log_prob(x), by_hand.log_prob(x))
    assert step_doubling_change(stepped, x) == nll(by_hand, x) - nll(stepped, x)
    head = stepped.head(2).head(1)
    assert head.steps_factors == (1,) and torch.equal(head.log_prob(x), stepped.head(1).log_prob(x))
    assert stepped.head(2).step_counts == (2, 8)


def test_append_and_set_steps_factor(random_otflow):
    flow = Flow(2, [random_otflow(seed=1)], steps=3)
    flow.append(random_otflow(seed=2), steps_factor=2)
    flow.append(random_otflow(seed=3))
    assert flow.steps_factors == (1, 2, 1) and flow.step_counts == (3, 6, 3)
    flow.set_steps_factor(2, 4)
    assert flow.step_counts == (3, 6, 12)
    del flow.blocks[1:]  # how a refinement stage drops the blocks it re-cuts
    assert flow.steps_factors == (1,)
    flow.append(random_otflow(seed=4))  # a new block does not inherit a dropped one's factor
    assert flow.steps_factors == (1, 1)
    flow.steps = 5  # what ``jkoflow eval --eval-steps 5`` does: the base, factors kept
    flow.set_steps_factor(1, 2)
    assert flow.step_counts == (5, 10)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InputError, match="steps_factor must be a positive integer"):
            flow.set_steps_factor(0, bad)
    with pytest.raises(InputError, match="steps_factor must be a positive integer"):
        flow.append(random_otflow(seed=5), steps_factor=0)
    with pytest.raises(InputError, match="2 steps factors given for 1 blocks"):
        Flow(2, [random_otflow(seed=1)], steps_factors=[1, 2])
    assert len(flow) == 2 and flow.steps_factors == (1, 2)


@torch.no_grad()
def test_save_load_keeps_the_step_factors(stepped, tmp_path):
    path = tmp_path / "flow.pt"
    stepped.save(path)
    payload = torch.load(path, weights_only=True)
    assert payload["version"] == 2 and '"steps_factors": [1, 4]' in payload["config"]
    loaded = Flow.load(path)
    assert loaded.steps == 2 and loaded.steps_factors == (1, 4) and loaded.config() == stepped.config()
    x = torch.randn(50, 2, dtype=torch.float64)
    assert torch.equal(loaded.log_prob(x), stepped.log_prob(x))
    edited = tmp_path / "edited.pt"
    payload["config"] = payload["config"].replace('"steps_factors": [1, 4]', '"steps_factors": [1, 0]')
    torch.save(payload, edited)
    with pytest.raises(InputError, match="steps_factor must be a positive integer, got 0"):
        Flow.load(edited)


@torch.no_grad()
def test_a_version_1_file_reads_with_every_factor_1(stepped, tmp_path):
    """A file written before step factors existed: version 1, no ``steps_factors``."""
    import json

    payload = stepped.to_payload()
    config = json.loads(payload["config"])
    del config["steps_factors"]
    state = {k: v for k, v in payload["state"].items() if k != "mix"}  # nor a decorrelation
    path = tmp_path / "old.pt"
    torch.save({**payload, "version": 1, "config": json.dumps(config), "state": state}, path)
    loaded = Flow.load(path)
    assert loaded.steps == 2 and loaded.steps_factors == (1, 1)
    x = torch.randn(50, 2, dtype=torch.float64)
    uniform = Flow(2, stepped.blocks, 2, stepped.shift, stepped.scale)
    assert torch.equal(loaded.log_prob(x), uniform.log_prob(x))
