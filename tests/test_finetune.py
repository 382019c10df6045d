"""The finetune stage (jkoflow.finetune): every block of the run trained
together on the NLL of the whole flow, recorded, selected only where it is
better, resumable, refused where it cannot run."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import jkoflow
from jkoflow import InputError, JKOConfig, JKOTrainer, datasets, train_jko
from jkoflow.finetune import MARGIN, JointObjective
from jkoflow.metrics import nll, step_doubling_change
from jkoflow.placement import resolve_placement
from jkoflow.scheduler import ROUND_TRIP_MARGIN

from .configs import first_pass
from .test_step_control import round_trip_by_hand
from .test_trainer import _same_weights, stop_and_resume

CONFIG = first_pass(
    width=8, iters=40, batch_size=256, train_steps=2, eval_steps=4, max_blocks=2, ter_eps=1e-9,
    val_every=10, finetune_iters=40, finetune_lr=0.01,
)  # fmt: skip


@pytest.fixture(scope="module")
def data():
    return datasets.load_split("checkerboard", n=3000, seed=0)


def test_the_joint_objective_is_the_flow_s_nll_at_the_train_steps():
    torch.manual_seed(0)
    config = first_pass(width=4, batch_size=32, dtype="float64")
    flow = jkoflow.Flow(2, [config.make_block(2, k) for k in range(2)], steps=3).double()
    x = torch.randn(32, 2, dtype=torch.float64)
    generator = torch.Generator().manual_seed(5)
    objective = JointObjective(list(flow.blocks), [3, 3], x, config, generator, resolve_placement(config), 10)
    rows = torch.randint(32, (32,), generator=torch.Generator().manual_seed(5))
    loss, terms = objective.loss()
    expected = -flow.log_prob(x[rows]).mean()  # no standardisation: the flow is the blocks alone
    assert (
        float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-10) and terms["loss"] is loss
    )
    assert objective.lr(0, 1.0) == config.finetune_lr
    assert objective.lr(10, 1.0) == pytest.approx(config.finetune_lr * config.lr_final_factor, rel=1e-12)
    loss.backward()  # gradients reach every block
    assert all(
        any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in b.parameters()) for b in flow.blocks
    )


def test_fine_tuning_lowers_the_whole_flow_s_nll_and_is_selected(data):
    trainer = JKOTrainer(*data, config=CONFIG)
    trainer.grow()
    before = trainer.history.stages[0].blocks[-1]
    stage = trainer.run_stage("finetune")
    assert stage.name == "finetune 1" and stage.complete and [b.index for b in stage.blocks] == [0, 1]
    assert all(b.h is None for b in stage.blocks)
    first, last = stage.blocks
    assert first.n_batches == 0 and last.n_batches == stage.n_batches <= CONFIG.finetune_iters
    assert stage.n_batches >= CONFIG.finetune_iters // 2  # early stopping acts in the second half only
    assert last.loss_last < last.loss_first
    assert last.val_nll < before.val_nll - 0.01  # the joint steps gain over the block-wise flow
    assert last.val_nll == pytest.approx(float(nll(trainer.flow, data[1])), abs=1e-5)
    assert (
        abs(first.step_doubling_change) < CONFIG.step_tol and abs(last.step_doubling_change) < CONFIG.step_tol
    )
    by_hand = round_trip_by_hand(trainer.flow, data[0], data[1])
    assert last.round_trip_error == pytest.approx(by_hand, rel=1e-4)
    assert max(first.round_trip_error, last.round_trip_error) < CONFIG.inversion_tol / ROUND_TRIP_MARGIN
    selected = trainer.history.selected
    assert selected.stage == "finetune 1" and selected.n_blocks == 2 and selected.val_nll == last.val_nll
    assert _same_weights(trainer.best[0], trainer.flow)
    checks = [r for r in trainer.history.iterations if r["stage"] == 1 and "val_nll" in r]
    assert checks and all(r["block"] == 0 for r in checks)  # the joint unit is logged as block 0
    with pytest.raises(InputError, match="after fine-tuning"):
        trainer.reparametrize(1)
    with pytest.raises(InputError, match="after fine-tuning"):
        trainer.refine(2)


def test_fine_tuning_leaves_the_frozen_input_blocks_alone(data):
    base = JKOTrainer(*data, config=dataclasses.replace(CONFIG, max_blocks=1))
    base.grow()
    frozen = base.flow
    trainer = JKOTrainer(*data, config=CONFIG, flow=frozen)
    trainer.grow()  # block 2 on data pushed through the frozen block 1
    kept = {k: v.clone() for k, v in trainer.flow.blocks[0].state_dict().items()}
    stage = trainer.run_stage("finetune")
    assert [b.index for b in stage.blocks] == [1]
    assert all(torch.equal(v, trainer.flow.blocks[0].state_dict()[k]) for k, v in kept.items())


def test_the_pipeline_ends_with_fine_tuning_and_resumes_in_it_exactly(data, tmp_path):
    config = dataclasses.replace(CONFIG, free_block=True, checkpoint_every=5)
    _, history = train_jko(*data, config=config)
    assert [s.name for s in history.stages] == ["initial", "free 1", "finetune 1"]
    assert [b.index for b in history.stages[-1].blocks] == [0, 1, 2]
    resumed = stop_and_resume(data, config, tmp_path / "run.pt", stage=2, it=17)  # in the fine-tuning
    assert [r["loss"] for r in resumed.iterations] == [r["loss"] for r in history.iterations]
    assert resumed.selected == history.selected
    numbers = [
        [(b.val_nll, b.test_nll, b.n_batches) for b in h.stages[-1].blocks] for h in (resumed, history)
    ]
    assert numbers[0] == numbers[1]


SHARPENING = dataclasses.replace(CONFIG, finetune_iters=80, finetune_lr=0.1, checkpoint_every=5)
"""A fine-tuning whose joint steps outrun the blocks' 2 RK4 steps: before the
step control it stopped at its first check, keeping the flow it began with."""


def test_a_fine_tuning_that_outruns_its_rk4_steps_trains_on_at_doubled_steps(data):
    trainer = JKOTrainer(*data, config=SHARPENING)
    trainer.grow()
    before = trainer.history.stages[0].blocks[-1]
    stage = trainer.run_stage("finetune")
    doubled = [k for k, f in enumerate(trainer.flow.steps_factors) if f > 1]
    assert doubled and stage.n_batches > SHARPENING.finetune_iters  # trained on, for more steps
    assert [b.train_steps for b in stage.blocks] == [
        SHARPENING.train_steps * f for f in trainer.flow.steps_factors
    ]
    assert all(abs(b.step_doubling_change) < SHARPENING.step_tol for b in stage.blocks)
    assert stage.blocks[-1].val_nll < before.val_nll - 0.2  # the sharper flow is the model's
    assert stage.blocks[-1].val_nll == pytest.approx(float(nll(trainer.flow, data[1])), abs=1e-5)


def test_a_fine_tuning_resumes_exactly_in_a_phase_at_doubled_steps(data, tmp_path):
    config = dataclasses.replace(SHARPENING, max_blocks=2)
    _, history = train_jko(*data, config=config)
    total = history.stages[-1].n_batches
    assert total > config.finetune_iters
    resumed = stop_and_resume(data, config, tmp_path / "run.pt", stage=1, it=total - 3)  # the last phase
    assert [r["loss"] for r in resumed.iterations] == [r["loss"] for r in history.iterations]
    numbers = [
        [(b.val_nll, b.train_steps, b.n_batches) for b in h.stages[-1].blocks] for h in (resumed, history)
    ]
    assert numbers[0] == numbers[1]


def test_bad_fine_tuning_settings_are_refused():
    with pytest.raises(InputError, match="finetune_iters"):
        JKOConfig(finetune_iters=-1)
    with pytest.raises(InputError, match="finetune_lr"):
        JKOConfig(finetune_lr=0.0)


def test_a_finished_run_is_fine_tuned_on_resume(data, tmp_path):
    config = dataclasses.replace(CONFIG, finetune_iters=0)  # stops at max_blocks
    path = tmp_path / "run.pt"
    train_jko(*data, config=config, checkpoint=path)
    with pytest.raises(InputError, match="finetune_iters to fine-tune them"):
        train_jko(*data, checkpoint=path, resume=True)  # finished, nothing to add
    tuned = dataclasses.replace(config, finetune_iters=30)
    flow, history = train_jko(*data, config=tuned, checkpoint=path, resume=True)
    assert [s.name for s in history.stages] == ["initial", "finetune 1"]
    assert history.stages[-1].n_batches == 30 and history.selected.stage == "finetune 1"
    assert float(nll(flow, data[1])) == pytest.approx(history.selected.val_nll, abs=1e-5)  # the tuned flow
    with pytest.raises(InputError, match="has finished"):  # already fine-tuned: nothing to add
        train_jko(*data, config=tuned, checkpoint=path, resume=True)


def test_a_run_stopped_by_ter_is_fine_tuned_not_extended(data, tmp_path):
    config = dataclasses.replace(CONFIG, finetune_iters=0, max_blocks=3, ter_eps=10.0)
    path = tmp_path / "run.pt"
    _, history = train_jko(*data, config=config, checkpoint=path)
    assert history.stopped_by == "ter" and len(history.blocks) == 1
    tuned = dataclasses.replace(config, finetune_iters=20)
    _, history = train_jko(*data, config=tuned, checkpoint=path, resume=True)
    assert [s.name for s in history.stages] == ["initial", "finetune 1"]


def test_the_command_line_fine_tunes_a_finished_run(tmp_path):
    from jkoflow.cli import main

    tiny = [
        "--n-samples",
        "3000",
        "--width",
        "8",
        "--iters",
        "20",
        "--batch-size",
        "128",
        "--max-blocks",
        "1",
    ]
    out = tmp_path / "run"
    assert main(["train", "--data", "8gaussians", "--out", str(out), *tiny, "--quiet"]) == 0
    before = json.loads((out / "summary.json").read_text())
    assert main(["train", "--resume", str(out), "--finetune-iters", "20", "--quiet"]) == 0
    after = json.loads((out / "summary.json").read_text())
    history = json.loads((out / "history.json").read_text())
    assert [s["name"] for s in history["stages"]] == ["initial", "finetune 1"]
    assert after["n_batches"] == before["n_batches"] + 20
    assert main(["train", "--resume", str(out), "--finetune-iters", "20", "--quiet"]) == 2  # nothing to add


def test_a_fine_tuned_block_off_its_steps_is_evaluated_at_doubled_steps(data):
    trainer = JKOTrainer(*data, config=dataclasses.replace(CONFIG, max_blocks=1, val_every=0))
    trainer.grow()
    assert trainer.flow.steps_factors == (1,)
    trainer.config = dataclasses.replace(trainer.config, step_tol=1e-12)  # no block fits so tight a tolerance
    trainer.history.stages[0].blocks[0].step_doubling_change = 0.0  # nor is it near it before (no MARGIN)
    (record,) = trainer.run_stage("finetune").blocks
    assert trainer.flow.steps_factors == (4,) and record.eval_steps == 16  # doubled twice (step_doublings)
    assert record.train_steps == 2 and record.step_doublings == 0  # its training was not changed
    assert record.val_nll == pytest.approx(float(nll(trainer.flow, data[1])), abs=1e-5)  # at 16 steps
    assert record.step_doubling_change == pytest.approx(step_doubling_change(trainer.flow, data[1]), abs=2e-5)


def test_a_block_near_the_rk4_tolerance_is_fine_tuned_at_doubled_steps(data):
    trainer = JKOTrainer(*data, config=dataclasses.replace(CONFIG, finetune_iters=5))
    trainer.grow()
    first, second = trainer.history.stages[0].blocks
    first.step_doubling_change = CONFIG.step_tol / MARGIN  # as close to the tolerance as doubles
    second.step_doubling_change = CONFIG.step_tol / MARGIN / 2
    stage = trainer.run_stage("finetune")
    assert trainer.flow.steps_factors == (2, 1)
    assert [b.train_steps for b in stage.blocks] == [4, 2] and [b.eval_steps for b in stage.blocks] == [8, 4]
