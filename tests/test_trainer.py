"""JKOTrainer step by step, the stage and rule registries, typed records and
checkpoint format versions."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

import blocks
import jkoflow
from jkoflow import JKOConfig, JKOTrainer, datasets, train_jko
from jkoflow.checkpoint import FORMAT_VERSION, load_state
from jkoflow.records import BlockRecord, JKOHistory, StageRecord
from jkoflow.stages import REPARAM_RULES, STAGES, BlockPlan, Plan, PlanContext, Slice, reparametrize
from jkoflow.trainer import run_pipeline

FIXTURE = Path(__file__).parent / "data" / "trainer-v1.pt"

CONFIG = JKOConfig(width=8, iters=15, batch_size=128, train_steps=2, eval_steps=4, max_blocks=3, ter_eps=1e-9)


@pytest.fixture(scope="module")
def data():
    train, val, test = datasets.load_split("8gaussians", n=2000, seed=1)
    return train, val, test


def _record(index: int, h: float, movement: float, ter: float = 0.1) -> BlockRecord:
    return BlockRecord(index, h, movement, ter, 3.0, 10, 1.0, 4.0, 3.0, 0)


def stop_and_resume(data, config: JKOConfig, path: Path, stage: int, it: int) -> JKOHistory:
    """The history of a run with checkpoint ``path`` interrupted (Ctrl-C) at step
    ``it`` of stage ``stage`` the first time it gets there, then resumed."""
    stops = iter(range(10_000))

    def stop(record: dict) -> None:
        if record["stage"] == stage and record["iter"] == it and next(stops) == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_jko(*data, config=config, checkpoint=path, callback=stop)
    return train_jko(*data, checkpoint=path, resume=True)[1]


def _same_weights(a: jkoflow.Flow, b: jkoflow.Flow) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- stepwise use ----------------------------------------------------------------


def test_add_block_records_the_given_h_and_keeps_the_stage_open(data):
    trainer = JKOTrainer(*data, config=CONFIG)
    first = trainer.add_block(h=0.7)
    second = trainer.add_block()  # scheduled: h0·ρ^1
    assert (first.h, second.h) == (0.7, CONFIG.step_size(1))
    assert [b.index for b in trainer.history.blocks] == [0, 1] and len(trainer.flow) == 2
    stage = trainer.history.stages[0]
    assert stage.name == "initial" and not stage.complete
    assert len(trainer.history.iterations) == 2 * CONFIG.iters
    assert second.val_nll < first.val_nll + 0.5 and second.movement > 0


def test_grow_stops_by_the_ter_rule_and_by_max_blocks(data):
    stopped = JKOTrainer(*data, config=dataclasses.replace(CONFIG, ter_eps=10.0))
    stage = stopped.grow()
    assert len(stage.blocks) == 1 and stage.complete and stopped.history.stopped_by == "ter"
    full = JKOTrainer(*data, config=dataclasses.replace(CONFIG, max_blocks=2))
    full.add_block(h=1.0)
    stage = full.grow()  # continues the open initial stage
    assert [b.h for b in stage.blocks] == [1.0, CONFIG.step_size(1)]
    assert full.history.stopped_by == "max_blocks" and stage.n_batches == 2 * CONFIG.iters


def test_reparametrize_and_refine_follow_their_plans(data):
    trainer = JKOTrainer(*data, config=dataclasses.replace(CONFIG, reparam_tol=1e-6))
    for h in (1.0, 3.0):
        trainer.add_block(h=h)
    initial = trainer.history.stages[0]
    (reparam,) = trainer.reparametrize(1, rule="arclength")
    assert initial.complete and reparam.name == "reparam 1" and reparam.rule == "arclength"
    expected = reparametrize([1.0, 3.0], [b.movement for b in initial.blocks], 0.5, 0.05, 20.0, "arclength")
    assert [b.h for b in reparam.blocks] == expected == reparam.h_plan
    refine = trainer.refine(2)
    assert refine.factor == 2 and len(trainer.flow) == 4
    assert [b.h for b in refine.blocks] == [expected[0] / 2] * 2 + [expected[1] / 2] * 2
    assert [(b.parent, b.slice) for b in refine.blocks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(isinstance(b, blocks.TimeSlice) for b in trainer.flow.blocks)
    assert trainer.history.n_batches == 8 * CONFIG.iters


def test_stepwise_save_and_resume_continue_exactly(data, tmp_path):
    whole = JKOTrainer(*data, config=CONFIG)
    whole.add_block(h=0.5)
    whole.add_block(h=2.0)
    whole.refine(2)
    path = tmp_path / "half.pt"
    half = JKOTrainer(*data, config=CONFIG)
    half.add_block(h=0.5)
    half.save(path)
    again = JKOTrainer.resume(path, *data)
    again.add_block(h=2.0)
    again.refine(2)
    assert _same_weights(again.flow, whole.flow)
    assert [r["loss"] for r in again.history.iterations] == [r["loss"] for r in whole.history.iterations]
    assert again.history.to_dict()["stages"][0]["blocks"][0]["h"] == 0.5


def test_train_jko_runs_the_pipeline_on_the_trainer(data):
    config = dataclasses.replace(CONFIG, max_blocks=2, reparam_iters=1, reparam_tol=1e-6, refine=(2,))
    flow, history = train_jko(*data, config=config)
    trainer = JKOTrainer(*data, config=config)
    trainer.grow()
    trainer.reparametrize(1)
    trainer.refine(2)
    assert _same_weights(flow, trainer.best[0]) and history.selected == trainer.history.selected
    assert [s.name for s in history.stages] == ["initial", "reparam 1", "refine 1"]


def test_a_new_stage_kind_is_one_function(data, monkeypatch):
    def halve(history: JKOHistory, stage: StageRecord, context: PlanContext) -> Plan:
        last = history.stages[history.stages.index(stage) - 1].blocks
        done = len(stage.blocks)
        plans = [BlockPlan(b.index, b.h / 2, 5, "keep") for b in last]
        return Plan(plans[done:], complete=True)

    monkeypatch.setitem(STAGES, "halve", halve)
    trainer = JKOTrainer(*data, config=CONFIG)
    trainer.add_block(h=2.0)
    stage = trainer.run_stage("halve")
    assert stage.name == "halve 1" and stage.h_plan == [1.0] and [b.n_batches for b in stage.blocks] == [5]
    with pytest.raises(jkoflow.InputError, match="unknown stage kind"):
        trainer.run_stage("nonsense")


# -- plans and rules ---------------------------------------------------------------


def _history(*stages: StageRecord) -> JKOHistory:
    return JKOHistory({}, list(stages))


def test_grow_plan_schedule_and_stops():
    config = JKOConfig(h0=2.0, rho=1.5, h_max=4.0, max_blocks=4, ter_eps=0.05)
    stage = StageRecord("initial", "initial", [_record(0, 2.0, 1.0), _record(1, 3.0, 0.5)])
    plan = STAGES["initial"](_history(stage), stage, PlanContext(config, 0))
    assert plan.blocks == [BlockPlan(2, 4.0, config.iters, "new")]  # min(2·1.5², 4)
    assert (
        STAGES["initial"](_history(stage), stage, PlanContext(config, 0, out_of_budget=True)).stopped_by
        == "budget"
    )
    assert STAGES["initial"](_history(stage), stage, PlanContext(config, 2)).stopped_by == "max_blocks"
    stage.blocks.append(_record(2, 4.0, 0.1, ter=0.01))
    assert STAGES["initial"](_history(stage), stage, PlanContext(config, 0)) == Plan(stopped_by="ter")


def test_the_pass_goes_on_after_a_block_that_moved_little_but_gained():
    config = JKOConfig(h0=2.0, rho=1.5, h_max=4.0, max_blocks=5, ter_eps=0.05, gain_eps=0.005)
    first, second = _record(0, 2.0, 1.0), _record(1, 3.0, 0.1, ter=0.01)
    second.val_nll = first.val_nll - 0.02  # Ter(1) < ε, but 0.02 nats gained
    stage = StageRecord("initial", "initial", [first, second])
    assert STAGES["initial"](_history(stage), stage, PlanContext(config, 0)).blocks[0].index == 2
    alone = dataclasses.replace(config, gain_eps=0.0)  # the Ter rule alone
    assert STAGES["initial"](_history(stage), stage, PlanContext(alone, 0)) == Plan(stopped_by="ter")
    third = _record(2, 4.0, 0.05, ter=0.01)
    third.val_nll = second.val_nll - 0.004
    stage.blocks.append(third)
    assert STAGES["initial"](_history(stage), stage, PlanContext(config, 0)) == Plan(stopped_by="ter")
    assert JKOConfig.from_saved({"ter_eps": 0.05}).gain_eps == 0.0  # runs saved before the rule
    with pytest.raises(jkoflow.InputError, match="gain_eps"):
        JKOConfig(gain_eps=-1.0)


def test_reparam_plan_gives_the_rule_numbers():
    config = JKOConfig(reparam_eta=0.5, h_min=0.05, h_max=20.0, stage_iters=7)
    initial = StageRecord("initial", "initial", [_record(0, 1.0, 1.0), _record(1, 2.0, 3.0)], complete=True)
    reparam = StageRecord("reparam 1", "reparam")
    plan = STAGES["reparam"](_history(initial, reparam), reparam, PlanContext(config, 0))
    # ratio: h* = h·S̄/S = (2, 4/3); h + η(h* − h) = (1.5, 5/3)
    assert [b.h for b in plan.blocks] == pytest.approx([1.5, 5 / 3], rel=1e-15)
    assert [(b.index, b.iters, b.start) for b in plan.blocks] == [(0, 7, "keep"), (1, 7, "keep")]
    reparam.rule = "arclength"  # t = (0, 1, 3), D = (0, 1, 4): t* = (0, 5/3, 3), h* = (5/3, 4/3)
    plan = STAGES["reparam"](_history(initial, reparam), reparam, PlanContext(config, 0))
    assert [b.h for b in plan.blocks] == pytest.approx([4 / 3, 5 / 3], rel=1e-15)
    reparam.blocks.append(_record(0, 4 / 3, 1.0))
    assert [
        b.index for b in STAGES["reparam"](_history(initial, reparam), reparam, PlanContext(config, 0)).blocks
    ] == [1]
    assert set(REPARAM_RULES) == {"ratio", "arclength"}


def test_refine_plan_cuts_every_block_into_slices():
    config = JKOConfig(iters=9, stage_iters=0)  # stage_iters 0: the blocks' iters
    before = StageRecord("initial", "initial", [_record(1, 1.0, 1.0), _record(2, 2.0, 1.0)], complete=True)
    refine = StageRecord("refine 1", "refine", factor=3)
    plan = STAGES["refine"](_history(before, refine), refine, PlanContext(config, 1))
    assert [b.index for b in plan.blocks] == [1, 2, 3, 4, 5, 6] and plan.complete
    assert [b.h for b in plan.blocks] == [1 / 3] * 3 + [2 / 3] * 3
    assert [b.start for b in plan.blocks][2:4] == [Slice(0, 3, 2), Slice(1, 3, 0)]
    assert {b.iters for b in plan.blocks} == {9}


# -- records and checkpoints ---------------------------------------------------------


def test_records_round_trip_and_read_the_old_w2_key():
    record = BlockRecord(
        2, None, 0.25, 0.01, 3.1, 40, 1.5, 4.0, 3.0, 1, 1e-4, test_nll=3.2, parent=1, slice=0
    )
    assert BlockRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    assert "test_nll" not in _record(0, 1.0, 1.0).to_dict() and record["movement"] == 0.25
    old = {"index": 0, "h": 5.0, "w2": 1.78, "ter": 0.3, "val_nll": 3.65, "n_batches": 10, "seconds": 2.0,
           "loss_first": 4.0, "loss_last": 3.0, "retries": 0}  # fmt: skip
    assert BlockRecord.from_dict(old).movement == 1.78
    stage = StageRecord("reparam 1", "reparam", [BlockRecord.from_dict(old)], h_plan=[5.0])
    stage.close()
    history = JKOHistory({"seed": 0}, [stage], [{"loss": 1.0}], "ter", [])
    assert JKOHistory.from_dict(json.loads(json.dumps(history.to_dict()))) == history
    stages = [{"name": "initial", "kind": "initial", "complete": True, "blocks": [old]}]
    legacy = {"config": {}, "stages": stages, "iterations": []}
    assert JKOHistory.from_dict(legacy).blocks[0].movement == 1.78 and stage.spread == 0.0


def test_an_old_checkpoint_resumes_like_an_uninterrupted_run(tmp_path):
    """``trainer-v1.pt`` was written by the code before the records rename
    (format version 1), killed in block 1 of "reparam 1" at step 7."""
    x = datasets.load("8gaussians", n=1500, seed=0)
    config = JKOConfig(  # how the old code trained
        block="otflow", width=8, iters=20, batch_size=128, max_blocks=2, ter_eps=1e-9, train_steps=2,
        eval_steps=4, checkpoint_every=5, **{**JKOConfig.SAVED_DEFAULTS, "reparam_iters": 1},
    )  # fmt: skip
    state = load_state(FIXTURE)
    assert state.block is not None and state.block.iter == 5
    assert "w2" in state.history["stages"][0]["blocks"][0] and state.best is None
    path = tmp_path / "trainer.pt"
    shutil.copy(FIXTURE, path)
    trainer = JKOTrainer.resume(path, x, config=config)
    run_pipeline(trainer)
    history = trainer.history
    whole = JKOTrainer(x, config=config)
    run_pipeline(whole)
    reference = whole.history
    # The fixture's first 5 steps were computed on another CPU, whose float32
    # kernels may round differently: the same run to float32 rounding, not bit
    # for bit; measured here: weights 1.4e-6 relative, losses 4.8e-7 apart.
    sa, sb = trainer.flow.state_dict(), whole.flow.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=1e-6)
    # a version-1 file kept no candidates: the resumed run selects among those after it
    assert history.selected is not None and history.selected.stage == "reparam 1"
    losses = [r["loss"] for r in reference.iterations]
    assert [r["loss"] for r in history.iterations] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    moved = [b.movement for b in reference.stages[0].blocks]
    assert [b.movement for b in history.stages[0].blocks] == pytest.approx(moved, rel=1e-5)
    assert torch.load(path, weights_only=True)["version"] == FORMAT_VERSION


# -- the free block ------------------------------------------------------------------


def test_jko_loss_without_h_is_the_kl_alone():
    torch.manual_seed(0)
    block, x = blocks.make("otflow", dim=2, width=8).double(), torch.randn(64, 2, dtype=torch.float64)
    free, with_h = jkoflow.jko_loss(block, x, None, 2), jkoflow.jko_loss(block, x, 4.0, 2)
    assert torch.equal(free.loss, free.kl) and torch.equal(free.kl, with_h.kl)
    assert torch.equal(free.transport, with_h.transport) and float(free.transport) > 0
    assert float(with_h.loss - free.loss) == pytest.approx(float(with_h.transport) / 4.0, rel=1e-9)


def test_the_free_stage_adds_one_block_without_h_after_all_others(data):
    trainer = JKOTrainer(*data, config=dataclasses.replace(CONFIG, iters=40))
    trainer.add_block(h=1.0)
    before = trainer.history.stages[0].blocks[-1].val_nll
    stage = trainer.run_stage("free")
    (record,) = stage.blocks
    assert stage.name == "free 1" and stage.complete and stage.h_plan == [None]
    assert record.index == 1 and record.h is None and len(trainer.flow) == 2
    assert record.loss_last < record.loss_first  # trained on the KL left after block 1
    assert record.val_nll == pytest.approx(float(jkoflow.metrics.nll(trainer.flow, data[1])), abs=1e-5)
    assert record.val_nll < before
    assert trainer.history.selected.stage == "free 1" and trainer.history.selected.n_blocks == 2
    with pytest.raises(jkoflow.InputError, match="after the free block"):
        trainer.reparametrize(1)
    with pytest.raises(jkoflow.InputError, match="after the free block"):
        trainer.refine(2)


def test_the_pipeline_ends_with_the_free_block_and_resumes_in_it(data, tmp_path):
    config = dataclasses.replace(CONFIG, max_blocks=2, refine=(2,), free_block=True, checkpoint_every=5)
    _, history = train_jko(*data, config=config)
    assert [s.name for s in history.stages] == ["initial", "refine 1", "free 1"]
    assert [b.h for b in history.stages[-1].blocks] == [None]
    resumed = stop_and_resume(data, config, tmp_path / "run.pt", stage=2, it=7)  # in the free block
    assert [r["loss"] for r in resumed.iterations] == [r["loss"] for r in history.iterations]
    assert resumed.selected == history.selected
