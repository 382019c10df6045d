"""The step control: a block that fits its RK4 discretisation (step-doubling
change ≥ step_tol or relative inversion error ≥ inversion_tol) trains on with
doubled train steps and doubled eval steps (its step factor in the flow), and
is then checked at its own eval steps; a run where it never acts is unchanged."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from jkoflow import JKOConfig, JKOTrainer, datasets, integrate
from jkoflow.metrics import step_doubling_change
from jkoflow.run import summarize

from .test_trainer import _same_weights

# one train step and two eval steps per block, a large h and lr: the block
# fits the coarse map (relative inversion error 1.1e-4 > 1e-4 at 1 train step)
CONFIG = JKOConfig(
    width=16, iters=40, batch_size=256, train_steps=1, eval_steps=2, max_blocks=1, ter_eps=1e-9,
    lr=0.05, h0=10.0,
)  # fmt: skip


@pytest.fixture(scope="module")
def data():
    return datasets.load_split("checkerboard", n=3000, seed=1)


def _relative_round_trip(block, x, steps: int) -> float:
    """E‖x − T⁻¹(T(x))‖ / sqrt(E‖x‖²/d) of one block at ``steps`` RK4 steps, by hand."""
    with torch.no_grad():
        back = integrate(block, integrate(block, x, steps).z, steps, t0=1.0, t1=0.0).z
    return float((back - x).norm(dim=1).mean() / x.pow(2).sum(1).mean().div(x.shape[1]).sqrt())


def test_the_control_acts_on_a_block_that_fits_its_steps(data):
    off = JKOTrainer(*data, config=dataclasses.replace(CONFIG, step_doublings=0))
    before = off.add_block()
    assert before.inversion_error >= CONFIG.inversion_tol  # the provoked fault
    assert before.train_steps == 1 and before.eval_steps == 2 and before.step_doublings == 0
    assert before.n_batches == 40 and off.flow.steps_factors == (1,)
    on = JKOTrainer(*data, config=CONFIG)
    after = on.add_block()
    # 1 train / 2 eval steps fails; 2 train / 4 eval steps (factor 2) passes
    assert after.step_doublings == 1 and after.train_steps == 2 and after.eval_steps == 4
    assert on.flow.steps == 2 and on.flow.steps_factors == (2,) and on.flow.step_counts == (4,)
    assert after.n_batches == 40 + 10 == len(on.history.iterations)  # the phase: a quarter more
    assert after.inversion_error < CONFIG.inversion_tol and abs(after.step_doubling_change) < CONFIG.step_tol
    x_val = torch.as_tensor(data[1]).float()
    block = on.flow.blocks[0]
    assert after.inversion_error == pytest.approx(_relative_round_trip(block, x_val, 4), rel=1e-6)
    assert _relative_round_trip(block, x_val, 2) > 10 * after.inversion_error  # at the base it would fail
    assert step_doubling_change(on.flow, data[1]) == pytest.approx(after.step_doubling_change, abs=2e-5)
    summary = summarize(on.flow, on.history, data[2], 0.0)
    assert summary["eval_steps"] == 2 and summary["block_eval_steps"] == [4]
    assert summary["blocks"][0]["eval_steps"] == 4 and summary["blocks"][0]["train_steps"] == 2


# the block still fails after one doubling (relative inversion error 3.4e-6), passes after two
TIGHT = dataclasses.replace(CONFIG, inversion_tol=1e-6)


def test_each_doubling_doubles_the_block_s_eval_steps(data):
    trainer = JKOTrainer(*data, config=TIGHT)
    record = trainer.add_block()
    assert (record.step_doublings, record.train_steps, record.eval_steps) == (2, 4, 8)
    assert trainer.flow.steps_factors == (4,) and record.n_batches == 40 + 10 + 12
    assert record.inversion_error < TIGHT.inversion_tol and abs(record.step_doubling_change) < TIGHT.step_tol
    x_val = torch.as_tensor(data[1]).float()
    assert record.inversion_error == pytest.approx(
        _relative_round_trip(trainer.flow.blocks[0], x_val, 8), rel=1e-6
    )


def test_a_run_where_the_control_never_acts_is_unchanged(data):
    loose = dataclasses.replace(CONFIG, step_tol=10.0, inversion_tol=10.0)
    a = JKOTrainer(*data, config=loose)
    b = JKOTrainer(*data, config=dataclasses.replace(loose, step_doublings=0))
    ra, rb = a.add_block(), b.add_block()
    assert ra.step_doublings == 0 and ra.train_steps == 1 and ra.eval_steps == 2 and ra.n_batches == 40
    assert a.flow.steps_factors == (1,)
    assert _same_weights(a.flow, b.flow)
    assert [r["loss"] for r in a.history.iterations] == [r["loss"] for r in b.history.iterations]
    assert (ra.val_nll, ra.step_doubling_change, ra.inversion_error) == (
        rb.val_nll,
        rb.step_doubling_change,
        rb.inversion_error,
    )


def test_a_block_interrupted_in_its_longer_phase_resumes_exactly(data, tmp_path):
    whole = JKOTrainer(*data, config=TIGHT)
    expected = whole.add_block()
    path = tmp_path / "trainer.pt"
    config = dataclasses.replace(TIGHT, checkpoint_every=4)

    def stop(record: dict) -> None:
        if record["iter"] == 54:  # in the third phase (steps 50–61 at 4 train and 8 eval steps)
            raise KeyboardInterrupt

    half = JKOTrainer(*data, config=config, checkpoint=path, callback=stop)
    with pytest.raises(KeyboardInterrupt):
        half.add_block()
    again = JKOTrainer.resume(path, *data)
    assert again.block is not None and again.block.train_steps == 4 and again.block.iters == 62
    assert again.flow.steps_factors == (4,)  # the phase's eval factor came back with the flow
    record = again.add_block()
    assert _same_weights(again.flow, whole.flow) and record.train_steps == 4 and record.eval_steps == 8
    losses = [r["loss"] for r in again.history.iterations]
    assert losses == [r["loss"] for r in whole.history.iterations]
    assert (record.val_nll, record.step_doubling_change, record.inversion_error) == (
        expected.val_nll,
        expected.step_doubling_change,
        expected.inversion_error,
    )


def test_the_step_control_settings_are_checked():
    with pytest.raises(Exception, match="step_tol"):
        JKOConfig(step_tol=0.0)
    with pytest.raises(Exception, match="step_doublings"):
        JKOConfig(step_doublings=-1)
