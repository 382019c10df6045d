"""The step control: a block that fits its RK4 discretisation (step-doubling
change ≥ step_tol or relative inversion error ≥ inversion_tol) trains on with
doubled train steps; a run where it never acts is unchanged."""

from __future__ import annotations

import dataclasses

import pytest

from jkoflow import JKOConfig, JKOTrainer, datasets
from jkoflow.metrics import step_doubling_change

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


def test_the_control_acts_on_a_block_that_fits_its_steps(data):
    off = JKOTrainer(*data, config=dataclasses.replace(CONFIG, step_doublings=0))
    before = off.add_block()
    assert before.inversion_error >= CONFIG.inversion_tol  # the provoked fault
    assert before.train_steps == 1 and before.step_doublings == 0 and before.n_batches == 40
    on = JKOTrainer(*data, config=CONFIG)
    after = on.add_block()
    assert after.step_doublings == 2 and after.train_steps == 4  # 1 → 2 (still failing) → 4
    assert after.n_batches == 40 + 10 + 12 == len(on.history.iterations)  # each phase: a quarter more
    assert after.inversion_error < CONFIG.inversion_tol and abs(after.step_doubling_change) < CONFIG.step_tol
    assert after.inversion_error < before.inversion_error
    assert step_doubling_change(on.flow, data[1][:10_000]) == pytest.approx(
        after.step_doubling_change, abs=2e-5
    )


def test_a_run_where_the_control_never_acts_is_unchanged(data):
    loose = dataclasses.replace(CONFIG, step_tol=10.0, inversion_tol=10.0)
    a = JKOTrainer(*data, config=loose)
    b = JKOTrainer(*data, config=dataclasses.replace(loose, step_doublings=0))
    ra, rb = a.add_block(), b.add_block()
    assert ra.step_doublings == 0 and ra.train_steps == 1 and ra.n_batches == 40
    assert _same_weights(a.flow, b.flow)
    assert [r["loss"] for r in a.history.iterations] == [r["loss"] for r in b.history.iterations]
    assert (ra.val_nll, ra.step_doubling_change, ra.inversion_error) == (
        rb.val_nll,
        rb.step_doubling_change,
        rb.inversion_error,
    )


def test_a_block_interrupted_in_its_longer_phase_resumes_exactly(data, tmp_path):
    whole = JKOTrainer(*data, config=CONFIG)
    whole.add_block()
    path = tmp_path / "trainer.pt"
    config = dataclasses.replace(CONFIG, checkpoint_every=4)

    def stop(record: dict) -> None:
        if record["iter"] == 54:  # in the third phase (steps 50–61 at 4 train steps)
            raise KeyboardInterrupt

    half = JKOTrainer(*data, config=config, checkpoint=path, callback=stop)
    with pytest.raises(KeyboardInterrupt):
        half.add_block()
    again = JKOTrainer.resume(path, *data)
    assert again.block is not None and again.block.train_steps == 4 and again.block.iters == 62
    record = again.add_block()
    assert _same_weights(again.flow, whole.flow) and record.train_steps == 4
    losses = [r["loss"] for r in again.history.iterations]
    assert losses == [r["loss"] for r in whole.history.iterations]


def test_the_step_control_settings_are_checked():
    with pytest.raises(Exception, match="step_tol"):
        JKOConfig(step_tol=0.0)
    with pytest.raises(Exception, match="step_doublings"):
        JKOConfig(step_doublings=-1)
