"""The block-wise JKO trainer: loss decreases, schedule, stopping, pushes, repeatability."""

import dataclasses
import math

import numpy as np
import pytest
import torch

import jkoflow
from jkoflow import InputError, JKOConfig, datasets, train_jko
from jkoflow.metrics import nll

TINY = {"width": 8, "depth": 1, "iters": 30, "batch_size": 128, "lr": 0.03, "train_steps": 2, "eval_steps": 4}


@pytest.fixture(scope="module")
def data():
    x = datasets.load("8gaussians", n=3000, seed=0)
    return datasets.split(x, seed=0)


@pytest.fixture(scope="module")
def trained(data):
    train, val, test = data
    config = JKOConfig(**TINY, max_blocks=3, ter_eps=1e-9, h0=1.0, rho=2.0, h_max=3.0, seed=3)
    return train_jko(train, val, test, config=config)


def test_training_lowers_the_loss_and_the_nll(trained, data):
    _flow, history = trained
    _, _, test = data
    first = history.blocks[0]
    assert first["loss_last"] < first["loss_first"] - 1.0
    gaussian_nll = float(0.5 * (test**2).sum(1).mean() + math.log(2 * math.pi))  # the empty flow
    assert history.blocks[-1]["test_nll"] < gaussian_nll - 1.0
    nlls = [b["val_nll"] for b in history.blocks]
    assert nlls[-1] < nlls[0]


def test_schedule_and_records(trained):
    flow, history = trained
    assert [b["h"] for b in history.blocks] == [1.0, 2.0, 3.0]  # min(h0 rho^k, h_max)
    assert len(flow) == 3 and history.stopped_by == "max_blocks"
    assert history.n_batches == 90 and len(history.iterations) == 90
    assert [r["block"] for r in history.iterations[::30]] == [0, 1, 2]
    for record in history.blocks:
        assert record.movement > 0 and record["ter"] > 0 and record["seconds"] > 0
    # the lr decays by the cosine schedule within each block
    lrs = [r["lr"] for r in history.iterations[:30]]
    assert lrs[0] == pytest.approx(0.03) and lrs[-1] < 0.01


def test_pushed_statistics_match_the_flow(trained, data):
    """The cached pushes give the same NLL and W_k as evaluating the final flow."""
    flow, history = trained
    _, val, test = data
    assert nll(flow, test) == pytest.approx(history.blocks[-1]["test_nll"], abs=1e-5)
    assert nll(flow, val) == pytest.approx(history.blocks[-1]["val_nll"], abs=1e-5)
    with torch.no_grad():
        x = torch.as_tensor(val, dtype=torch.float32)
        for block in flow.blocks[:-1]:
            x = jkoflow.integrate(block, x, flow.steps).z
        moved = jkoflow.integrate(flow.blocks[-1], x, flow.steps).z
    w_last = float((moved - x).pow(2).sum(1).mean().sqrt())
    assert w_last == pytest.approx(history.blocks[-1].movement, rel=1e-4)


def test_each_block_records_its_step_doubling_change(trained, data):
    """Block k's record: the validation NLL with block k alone at 2·steps minus
    that of the flow, recomputed here from the frozen blocks."""
    flow, history = trained
    _, val, _ = data
    from jkoflow.objectives import gaussian_log_prob

    with torch.no_grad():
        x = torch.as_tensor(val, dtype=torch.float32)
        logdet = torch.zeros(len(x))
        for block, record in zip(flow.blocks, history.blocks, strict=True):
            single, doubled = (jkoflow.integrate(block, x, steps) for steps in (flow.steps, 2 * flow.steps))
            nlls = [float(-(gaussian_log_prob(r.z) + logdet + r.logdet).mean()) for r in (doubled, single)]
            assert record["step_doubling_change"] == pytest.approx(nlls[0] - nlls[1], abs=2e-5)
            assert abs(record["step_doubling_change"]) < 0.01  # 4 eval steps suffice for these blocks
            x, logdet = single.z, logdet + single.logdet


def test_blocks_are_frozen(trained):
    flow, _ = trained
    assert not any(p.requires_grad for p in flow.parameters())


def test_ter_rule_stops_early(data):
    train, val, _ = data
    flow, history = train_jko(train, val, config=JKOConfig(**TINY, max_blocks=5, ter_eps=100.0))
    assert len(flow) == 1 and history.stopped_by == "ter"


def test_same_seed_same_run_different_seed_different_run(data):
    train, val, _ = data
    config = JKOConfig(**{**TINY, "iters": 10}, max_blocks=2, ter_eps=1e-9, seed=5)
    a = train_jko(train, val, config=config)[1]
    b = train_jko(train, val, config=config)[1]
    c = train_jko(train, val, config=JKOConfig(**{**TINY, "iters": 10}, max_blocks=2, ter_eps=1e-9, seed=6))[
        1
    ]
    assert [r["loss"] for r in a.iterations] == [r["loss"] for r in b.iterations]
    assert a.blocks[-1]["val_nll"] == b.blocks[-1]["val_nll"]
    assert [r["loss"] for r in a.iterations] != [r["loss"] for r in c.iterations]


def test_incremental_training_appends_blocks(data, trained):
    train, val, test = data
    config = JKOConfig(**TINY, max_blocks=1, ter_eps=1e-9)
    flow, _ = train_jko(train, val, config=config)
    before = [p.clone() for p in flow.blocks[0].parameters()]
    more = JKOConfig(**TINY, max_blocks=2, ter_eps=1e-9)
    flow2, history = train_jko(train, val, test, config=more, flow=flow)
    assert len(flow2) == 2 and [b["index"] for b in history.blocks] == [1]
    assert history.blocks[0]["h"] == more.step_size(1)
    assert all(torch.equal(p, q) for p, q in zip(before, flow2.blocks[0].parameters(), strict=True))
    assert history.blocks[0]["test_nll"] == pytest.approx(nll(flow2, test), abs=1e-5)


def test_standardisation_keeps_nll_in_data_space(data):
    train, val, test = data
    scaled = [10.0 * part + 3.0 for part in (train, val, test)]
    config = JKOConfig(**TINY, max_blocks=1, standardize=True)
    flow, history = train_jko(*scaled, config=config)
    assert torch.allclose(flow.shift, torch.as_tensor(scaled[0].mean(0), dtype=torch.float32), atol=1e-4)
    # an affine change of units shifts the NLL by exactly log|det| = 2 log 10
    _, history_raw = train_jko(train, val, test, config=JKOConfig(**TINY, max_blocks=1, standardize=True))
    difference = history.blocks[0]["test_nll"] - history_raw.blocks[0]["test_nll"]
    assert difference == pytest.approx(2 * math.log(10.0), abs=1e-3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"h0": 0.0}, "h0 must be a positive"),
        ({"h0": -1.0}, "h0 must be a positive"),
        ({"width": 0}, "width must be a positive"),
        ({"train_steps": 0}, "train_steps must be a positive"),
        ({"train_steps": 8, "eval_steps": 4}, "must not exceed"),
        ({"transport": "euclid"}, "transport"),
        ({"dtype": "float16"}, "dtype"),
        ({"device": "gpu0"}, "device"),
        ({"lr_final_factor": 2.0}, "lr_final_factor"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(InputError, match=match):
        JKOConfig(**kwargs)


def test_bad_data(data):
    train, val, _ = data
    with pytest.raises(InputError, match="batch_size is 4096"):
        train_jko(train, val, config=JKOConfig(batch_size=4096))
    bad = train.copy()
    bad[3, 1] = np.nan
    with pytest.raises(InputError, match="NaN"):
        train_jko(bad, val, config=JKOConfig(**TINY))
    with pytest.raises(InputError, match=r"validation data must have shape \(n, 2\)"):
        train_jko(train, val[:, :1], config=JKOConfig(**TINY))
    with pytest.raises(InputError, match="unknown block type"):
        train_jko(train, val, config=JKOConfig(**{**TINY, "block": "nope"}))


@pytest.mark.parametrize("block", ["otflow", "mlp"])
def test_blocks_start_near_identity_or_warm(block):
    from jkoflow.scheduler import _new_block

    config = JKOConfig(block=block, **TINY)
    cold = _new_block(1, 2, config, previous=None)
    x = torch.randn(64, 2)
    v = cold(x, 0.3)[0].detach()
    # otflow: w = 0 and a small A; mlp: a zero last layer, v = 0
    assert float(v.norm(dim=1).max()) < 0.05 * float(x.norm(dim=1).max())
    previous = _new_block(0, 2, config, previous=None)
    with torch.no_grad():
        for p in previous.parameters():
            p.normal_()
    warm = _new_block(1, 2, dataclasses.replace(config, warm_start=True), previous=previous)
    assert all(torch.equal(a, b) for a, b in zip(warm.parameters(), previous.parameters(), strict=True))
    assert all(p.requires_grad for p in warm.parameters())
    fresh = _new_block(1, 2, config, previous=previous)
    assert float(fresh(x, 0.3)[0].detach().norm(dim=1).max()) < 0.05 * float(x.norm(dim=1).max())
