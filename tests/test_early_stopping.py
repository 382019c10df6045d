"""Early stopping of JKO blocks on the validation NLL (jkoflow.loop.Plateau),
and the automatic mini-batch size on small training sets."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import jkoflow
from jkoflow import JKOConfig, JKOTrainer, OTFlowConfig, datasets, train_jko, train_otflow
from jkoflow.metrics import nll

from .configs import first_pass

# 240 training rows, 8-d: a width-32 block overfits them within a few hundred steps
SMALL = datasets.load_split("gmm:d=8,k=5,seed=0", n=300, seed=0)
CONFIG = first_pass(
    iters=300,
    val_every=25,
    patience=2,
    max_blocks=1,
    train_steps=2,
    eval_steps=4,
    step_doublings=0,
    compile="off",  # what is tested is the early stopping, not the compiled step
)


class _Kill(Exception):
    pass


def test_a_block_on_small_data_stops_early_and_keeps_its_best_weights():
    trainer = JKOTrainer(*SMALL, config=CONFIG)
    before = nll(trainer.flow, SMALL[1])  # the flow before the block: the standard normal
    record = trainer.add_block()
    assert record.n_batches < CONFIG.iters  # stopped on the plateau, not by the step count
    checks = trainer.history.stages[0].blocks[0]  # the record, for its numbers
    val = nll(trainer.flow, SMALL[1])
    assert val == pytest.approx(record.val_nll, abs=1e-5)
    assert val <= before + 1e-5  # never worse on the validation rows than before the block
    full = JKOTrainer(*SMALL, config=dataclasses.replace(CONFIG, val_every=0)).add_block()
    assert full.n_batches == CONFIG.iters  # without checks every step is taken
    assert record.val_nll < full.val_nll  # and the block overfits: its validation NLL is worse
    assert checks.test_nll < full.test_nll


def test_the_checks_and_best_weights_survive_a_kill_and_resume(tmp_path):
    config = dataclasses.replace(CONFIG, checkpoint_every=10)
    reference = train_jko(*SMALL, config=config)
    seen: list[dict] = []

    def kill_at_step_37(record: dict) -> None:
        seen.append(record)
        if len(seen) == 37:
            raise _Kill

    path = tmp_path / "trainer.pt"
    with pytest.raises(_Kill):
        train_jko(*SMALL, config=config, checkpoint=path, callback=kill_at_step_37)
    saved = jkoflow.checkpoint.load_state(path)
    assert [check[0] for check in saved.block.checks] == [0, 25] and saved.block.best is not None
    flow, history = train_jko(*SMALL, config=config, checkpoint=path, resume=True)
    assert [r["loss"] for r in history.iterations] == [r["loss"] for r in reference[1].iterations]
    assert all(
        torch.equal(a, b)
        for a, b in zip(flow.state_dict().values(), reference[0].state_dict().values(), strict=True)
    )


def test_the_batch_size_adapts_to_a_small_training_set():
    rows = len(SMALL[0])
    assert JKOConfig().batch_for(rows) == rows and JKOConfig().batch_for(10**6) == 1024
    assert OTFlowConfig().batch_for(rows) == rows and OTFlowConfig().batch_for(10**6) == 2048
    with pytest.raises(jkoflow.InputError, match=f"has {rows} rows but batch_size is 4096"):
        JKOConfig(batch_size=4096).batch_for(rows)
    config = OTFlowConfig(width=8, iters=20, val_every=10, train_steps=2, eval_steps=4, alpha_r=0.0)
    flow, history = train_otflow(SMALL[0], SMALL[1], config)  # 240 rows < the default 2048
    assert history.n_batches == 20 and torch.isfinite(flow.log_prob(torch.as_tensor(SMALL[2]))).all()


@pytest.mark.parametrize("kwargs", [{"val_every": -1}, {"patience": 0}, {"batch_size": -2}])
def test_bad_early_stopping_settings_are_refused(kwargs):
    with pytest.raises(jkoflow.InputError, match=next(iter(kwargs))):
        JKOConfig(**kwargs)


def test_a_retrained_block_is_kept_only_where_the_whole_flow_improves(monkeypatch):
    """A reparametrisation to h = 1e-4 pulls every retrained block toward the
    identity: without checks the stage makes the flow worse; with them each
    block keeps its old weights unless the whole flow gets better."""
    import numpy as np

    from jkoflow.stages import REPARAM_RULES

    monkeypatch.setitem(REPARAM_RULES, "shrink", lambda h, s: np.full_like(h, 1e-4))
    data = datasets.load_split("8gaussians", n=2000, seed=1)
    config = first_pass(
        block="otflow", width=8, iters=60, batch_size=128, train_steps=2, eval_steps=4, max_blocks=2,
        ter_eps=1e-9,
        reparam_iters=1, reparam_tol=1e-9, reparam_eta=1.0, h_min=1e-4, reparam_rule="shrink",
        val_every=10, patience=2, stage_lr=0.05,
    )  # fmt: skip
    _, unchecked = train_jko(*data, config=dataclasses.replace(config, val_every=0))
    assert unchecked.stages[1].val_nll > unchecked.stages[0].val_nll + 0.05
    _, checked = train_jko(*data, config=config)
    initial, reparam = checked.stages
    assert reparam.val_nll <= initial.val_nll + 1e-5
    assert all(b.n_batches < 60 for b in reparam.blocks)  # each stopped on its plateau


def test_an_idle_block_stops_at_a_quarter_of_its_steps_and_ends_the_stage():
    """Data N(0, 4I) and a long first step (h0 = 100): the first block
    (judged by Ter alone) contracts them to about N(0, I) in its whole
    schedule; the second has nothing left to move or gain, so it stops at its
    check after a quarter of its steps, and the growth rule ends the stage."""
    rng = np.random.default_rng(0)
    x_train, x_val, x_test = (2 * rng.standard_normal((n, 2)).astype("float32") for n in (4000, 2000, 2000))
    config = jkoflow.JKOConfig(
        block="mlp", width=8, iters=200, batch_size=256, val_every=25, max_blocks=4, h0=100.0, seed=0
    )
    _, history = jkoflow.train_jko(x_train, x_val, x_test, config=config)
    first, second = history.stages[0].blocks
    assert first.ter > config.ter_eps and first.n_batches == 200
    assert second.n_batches == 50  # checks at 25 and 50; 4·50 ≥ 200
    assert second.ter < config.ter_eps and abs(first.val_nll - second.val_nll) < config.gain_eps
    assert history.stopped_by == "ter" and len(history.stages[0].blocks) == 2
    assert second.step_doublings == 0 and abs(second.step_doubling_change) < config.step_tol
    assert history.selected.stage == "gaussian"  # on Gaussian data the Gaussian fit is the best flow
