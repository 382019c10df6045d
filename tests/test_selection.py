"""More budget never returns a worse flow: the trainer keeps the best candidate
by validation NLL, returns it, saves it as flow.pt and survives resume with it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from jkoflow import Flow, JKOTrainer, datasets, train_jko
from jkoflow.checkpoint import load_state
from jkoflow.config import DataConfig
from jkoflow.metrics import nll
from jkoflow.records import JKOHistory, Selection
from jkoflow.run import load_data, run_jko
from jkoflow.stages import REPARAM_RULES

from .configs import first_pass
from .test_trainer import _same_weights

CONFIG = first_pass(
    width=8, iters=60, batch_size=128, train_steps=2, eval_steps=4, max_blocks=2, ter_eps=1e-9,
    reparam_iters=1, reparam_tol=1e-9, reparam_eta=1.0, h_min=1e-4, val_every=0,
)  # fmt: skip


@pytest.fixture
def shrink(monkeypatch):
    """A reparametrisation rule that sets every h to h_min = 1e-4: the retrained
    blocks are pulled back toward the identity, so the stage is worse."""
    monkeypatch.setitem(REPARAM_RULES, "shrink", lambda h, s: np.full_like(h, 1e-4))
    return dataclasses.replace(CONFIG, reparam_rule="shrink")


@pytest.fixture(scope="module")
def data():
    return datasets.load_split("8gaussians", n=2000, seed=1)


def test_a_worse_later_stage_returns_the_earlier_flow(data, shrink):
    stage_flows = {}

    def keep(history, flow):
        stage_flows[history.stages[-1].name] = {k: v.clone() for k, v in flow.state_dict().items()}

    flow, history = train_jko(*data, config=shrink, on_stage=keep)
    initial, reparam = history.stages
    assert reparam.name == "reparam 1" and all(b.h == pytest.approx(1e-4) for b in reparam.blocks)
    assert reparam.val_nll > initial.val_nll + 0.05  # the stage made the flow worse
    selected = history.selected
    assert selected == Selection("initial", 2, initial.val_nll, initial.test_nll)
    assert len(flow) == 2 and flow.state_dict().keys() == stage_flows["initial"].keys()
    assert all(torch.equal(v, stage_flows["initial"][k]) for k, v in flow.state_dict().items())
    assert nll(flow, data[1]) == pytest.approx(selected.val_nll, rel=1e-5)
    assert nll(flow, data[2]) == pytest.approx(selected.test_nll, rel=1e-5)


def test_a_prefix_of_the_growing_stage_is_a_candidate(data):
    trainer = JKOTrainer(*data, config=CONFIG)
    first = trainer.add_block(h=1.0)
    assert trainer.best[1] == Selection("initial", 1, first.val_nll, first.test_nll)
    second = trainer.add_block(h=1e-4)  # a tiny step: the block hardly moves
    best_flow, selected = trainer.best
    expect = (
        ("initial", 2, second.val_nll) if second.val_nll < first.val_nll else ("initial", 1, first.val_nll)
    )
    assert (selected.stage, selected.n_blocks, selected.val_nll) == expect
    assert len(best_flow) == selected.n_blocks and best_flow.blocks[0] is not trainer.flow.blocks[0]
    assert _same_weights(best_flow, trainer.flow.head(selected.n_blocks))


def test_the_last_stage_is_returned_when_it_is_best(data, monkeypatch):
    """Two under-trained blocks, then a reparametrisation at the same h with
    more Adam steps: the retrained flow is better and is the one returned."""
    monkeypatch.setitem(REPARAM_RULES, "same", lambda h, s: h)
    config = dataclasses.replace(CONFIG, iters=5, stage_iters=60, reparam_rule="same")
    trainer = JKOTrainer(*data, config=config)
    trainer.grow()
    trainer.reparametrize(1)
    initial, reparam = trainer.history.stages
    assert reparam.val_nll < initial.val_nll - 0.05
    flow, selected = trainer.best
    assert selected == Selection("reparam 1", 2, reparam.val_nll, reparam.test_nll)
    assert _same_weights(flow, trainer.flow)
    returned, history = train_jko(*data, config=config)
    assert _same_weights(returned, trainer.flow) and history.selected == selected


def test_resume_keeps_the_selection_bit_identically(data, shrink, tmp_path):
    whole = JKOTrainer(*data, config=shrink)
    whole.grow()
    whole.reparametrize(1)
    path = tmp_path / "trainer.pt"
    half = JKOTrainer(*data, config=shrink, checkpoint=path)
    half.grow()
    half.run_stage("reparam")  # the worse stage: the selection stays the initial flow
    saved = load_state(path)
    assert saved.best is not None and json.loads(json.dumps(saved.history))["selected"]["stage"] == "initial"
    again = JKOTrainer.resume(path, *data)
    (flow, selected), (reference, expect) = again.best, whole.best
    assert selected == expect and _same_weights(flow, reference) and _same_weights(flow, half.best[0])
    assert flow.blocks[0] is not again.flow.blocks[0]
    again.refine(2)  # continues choosing among the new candidates as the uninterrupted run would
    whole.refine(2)
    assert again.best[1] == whole.best[1] and _same_weights(again.best[0], whole.best[0])


def test_the_summary_and_flow_pt_are_the_selected_flow(tmp_path, shrink):
    data_config = DataConfig("8gaussians", n_samples=2000)
    splits = load_data(data_config)
    out = tmp_path / "run"
    summary = run_jko(out, data_config, shrink, splits, progress=False)
    history = json.loads((out / "history.json").read_text())
    initial = history["stages"][0]
    assert summary["selected"] == history["selected"]
    assert summary["selected"] == {
        "stage": "initial",
        "n_blocks": 2,
        "val_nll": initial["val_nll"],
        "test_nll": initial["test_nll"],
    }
    assert summary["test_nll"] == initial["test_nll"] and summary["n_blocks"] == 2
    assert [b["h"] for b in summary["blocks"]] == [b["h"] for b in initial["blocks"]]
    saved = Flow.load(out / "flow.pt")
    assert _same_weights(saved, Flow.load(out / "flow-initial.pt"))
    assert not _same_weights(saved, Flow.load(out / "flow-reparam-1.pt"))
    assert nll(saved, splits[2]) == pytest.approx(summary["test_nll"], rel=1e-5)


def _gaussian_data(n: int = 500, seed: int = 0) -> np.ndarray:
    """Correlated Gaussian data far from N(0, I): its Gaussian fit beats a briefly trained flow."""
    g = np.random.default_rng(seed)
    a = g.standard_normal((n, 1))
    return np.concatenate([a, 3 * a + 0.1 * g.standard_normal((n, 1)), 5 + 4 * g.standard_normal((n, 3))], 1)


def test_a_run_never_returns_a_flow_worse_than_the_gaussian_fit(tmp_path):
    train, val, test = datasets.split(_gaussian_data(), 0.2, 0.2, seed=0)
    config = dataclasses.replace(CONFIG, reparam_iters=0, iters=10)
    flow, history = train_jko(train, val, test, config=config)
    assert history.selected.stage == "gaussian" and history.selected.n_blocks == 0 and len(flow) == 0
    assert history.stages[0].val_nll > history.selected.val_nll  # the trained blocks lost
    x = torch.as_tensor(train)
    fit = torch.distributions.MultivariateNormal(x.mean(0), torch.cov(x.T))
    t = torch.as_tensor(test)
    assert float(-fit.log_prob(t).mean()) == pytest.approx(history.selected.test_nll, abs=1e-4)
    assert nll(flow, test) == pytest.approx(history.selected.test_nll, abs=1e-5)
    path = tmp_path / "gauss.npy"
    np.save(path, _gaussian_data(seed=1))
    data_config = DataConfig(str(path))
    summary = run_jko(tmp_path / "run", data_config, config, load_data(data_config), progress=False)
    assert summary["selected"]["stage"] == "gaussian" and summary["n_blocks"] == 0 and summary["blocks"] == []
    assert len(Flow.load(tmp_path / "run" / "flow.pt")) == 0
    assert summary["test_nll"] == pytest.approx(summary["selected"]["test_nll"])
    assert summary["gaussian"] == summary["selected"]


def test_the_gaussian_fit_stays_on_record_after_a_trained_flow_replaces_it(data):
    """The floor a user compares the flow with: the Gaussian fit's validation and
    test NLL, recorded and saved although a trained flow was selected."""
    train, val, test = data
    _, history = train_jko(train, val, test, config=dataclasses.replace(CONFIG, reparam_iters=0))
    assert history.selected.stage != "gaussian" and history.gaussian.stage == "gaussian"
    assert history.gaussian.val_nll > history.selected.val_nll
    x, t = torch.as_tensor(train), torch.as_tensor(test)
    fit = torch.distributions.MultivariateNormal(x.mean(0), torch.cov(x.T))
    assert float(-fit.log_prob(t).mean()) == pytest.approx(history.gaussian.test_nll, abs=1e-4)
    assert JKOHistory.from_dict(history.to_dict()).gaussian == history.gaussian


def test_a_flow_not_converged_in_its_rk4_steps_is_not_a_candidate(data):
    """With a step tolerance no block meets (and no doubling allowed), no trained
    flow may be returned: its NLL would be its RK4 map's, not the model's."""
    strict = dataclasses.replace(CONFIG, reparam_iters=0, step_tol=1e-12, step_doublings=0)
    flow, history = train_jko(*data, config=strict)
    assert all(abs(b.step_doubling_change) >= 1e-12 for b in history.blocks)
    assert history.selected.stage == "gaussian" and len(flow) == 0
    loose = dataclasses.replace(strict, step_tol=10.0)
    _, history = train_jko(*data, config=loose)
    assert history.selected.stage == "initial" and history.selected.n_blocks >= 1
