"""The step control: a block that fits its RK4 discretisation (step-doubling
change ≥ step_tol or relative inversion error ≥ inversion_tol) trains on with
doubled train steps and doubled eval steps (its step factor in the flow), and
is then checked at its own eval steps; a run where it never acts is unchanged."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

import jkoflow
from jkoflow import JKOConfig, JKOHistory, JKOTrainer, datasets, integrate
from jkoflow.metrics import data_scale, inversion_error, step_doubling_change
from jkoflow.run import summarize
from jkoflow.samples import TAIL_FRACTION
from jkoflow.scheduler import ROUND_TRIP_MARGIN, fits_its_steps, hold_steps

from .analytic_blocks import LinearBlock
from .configs import first_pass
from .test_trainer import _same_weights

# one train step and two eval steps per block, a large h and lr: the block
# fits the coarse map (relative inversion error 1.1e-4 > 1e-4 at 1 train step)
CONFIG = first_pass(
    block="otflow", width=16, iters=40, batch_size=256, train_steps=1, eval_steps=2, max_blocks=1,
    ter_eps=1e-9, lr=0.05, h0=10.0,
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


# checks every 10 steps: the block's step-doubling change is below 1e-3 up to
# step 40 and over it from step 50 on (1.2e-3, 2.7e-3, 5.6e-3, ...; 6.0e-3 after 80)
CHECKED = dataclasses.replace(CONFIG, iters=80, val_every=10, inversion_tol=1e9)


def test_a_block_that_begins_to_fit_its_steps_stops_and_keeps_its_best_valid_weights(data):
    unchecked = JKOTrainer(*data, config=dataclasses.replace(CHECKED, val_every=0, step_doublings=0))
    assert unchecked.add_block().step_doubling_change > 5e-3  # trained to the end, it fits its steps
    trainer = JKOTrainer(*data, config=dataclasses.replace(CHECKED, step_doublings=0))
    record = trainer.add_block()
    checks = trainer.history.iterations
    assert record.n_batches == 50 == len(checks)  # stopped at the first invalid check
    assert abs(record.step_doubling_change) < CHECKED.step_tol  # the weights of a valid check
    assert [r["iter"] + 1 for r in checks if "val_nll" in r] == [10, 20, 30, 40]  # step 50's is not logged
    # all 300 validation rows are checked: the record is the check at step 40, the best
    assert record.val_nll == min(r["val_nll"] for r in checks if "val_nll" in r) == checks[39]["val_nll"]


def test_a_block_that_begins_to_fit_its_steps_trains_on_at_doubled_steps(data):
    trainer = JKOTrainer(*data, config=CHECKED)
    record = trainer.add_block()
    assert (record.step_doublings, record.train_steps, record.eval_steps) == (1, 2, 4)
    assert trainer.flow.steps_factors == (2,)
    assert record.n_batches == 50 + 50  # on from step 50 to the stretched 80 + 20
    assert abs(record.step_doubling_change) < CHECKED.step_tol
    assert record.val_nll < trainer.history.iterations[39]["val_nll"] - 0.1  # it trained on


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


# two blocks at lr 0.01 that the control only measures (step_doublings=0),
# then a reparametrisation at stage_lr 0.1: block 1 ends at a lower validation
# NLL but a relative inversion error of 2.8e-4 > 1e-4 (not converged), block 2
# converged and 0.06 nats lower
RETRAINED = first_pass(
    block="otflow", width=16, iters=40, batch_size=256, train_steps=1, eval_steps=2, max_blocks=2,
    ter_eps=1e-9, lr=0.01, h0=10.0, stage_lr=0.1, step_doublings=0, reparam_tol=1e-9, val_every=10,
)  # fmt: skip


def test_a_retrained_block_that_ends_unconverged_gets_its_weights_back(data):
    trainer = JKOTrainer(*data, config=RETRAINED)
    first = trainer.grow().blocks
    weights = [copy.deepcopy(b.state_dict()) for b in trainer.flow.blocks]
    put, kept = trainer.reparametrize(1)[0].blocks
    assert put.put_back and put.n_batches > 0 and not kept.put_back
    back = trainer.flow.blocks[0].state_dict()
    assert all(torch.equal(back[name], value) for name, value in weights[0].items())
    assert not all(torch.equal(trainer.flow.blocks[1].state_dict()[n], v) for n, v in weights[1].items())
    assert (put.val_nll, put.inversion_error) == (first[0].val_nll, first[0].inversion_error)
    assert kept.val_nll < first[1].val_nll - 0.05 and kept.inversion_error < RETRAINED.inversion_tol
    assert trainer.flow.steps_factors == (1, 1) and put.eval_steps == 2 and put.step_doublings == 0
    saved = JKOHistory.from_dict(json.loads(json.dumps(trainer.history.to_dict())))
    assert [b.put_back for b in saved.stages[1].blocks] == [True, False]
    summary = summarize(trainer.flow, trainer.history, data[2], 0.0)
    assert [b["put_back"] for b in summary["blocks"]] == [
        b.put_back for b in trainer.history.selected_blocks()
    ]


def test_a_retrained_block_no_better_than_before_is_put_back(data):
    # stage_lr 0.05 from two blocks at h0 2: block 1's retraining never beats
    # the flow before it (its best check is the one before its first step),
    # block 2's ends 0.17 nats lower
    config = dataclasses.replace(RETRAINED, h0=2.0, stage_lr=0.05, step_doublings=2, inversion_tol=1e9)
    trainer = JKOTrainer(*data, config=config)
    first = trainer.grow().blocks
    weights = copy.deepcopy(trainer.flow.blocks[0].state_dict())
    put, kept = trainer.reparametrize(1)[0].blocks
    assert put.put_back and put.step_doubling_change < config.step_tol and not kept.put_back
    back = trainer.flow.blocks[0].state_dict()
    assert all(torch.equal(back[name], value) for name, value in weights.items())
    assert put.val_nll == first[0].val_nll and kept.val_nll < first[1].val_nll - 0.1


def test_a_block_put_back_after_an_interruption_is_the_same(data, tmp_path):
    whole = JKOTrainer(*data, config=RETRAINED)
    whole.grow()
    expected = whole.reparametrize(1)[0].blocks
    path = tmp_path / "trainer.pt"

    def stop(record: dict) -> None:
        if (record["stage"], record["block"], record["iter"]) == (1, 0, 6):  # block 1 of reparam 1
            raise KeyboardInterrupt

    half = JKOTrainer(
        *data, config=dataclasses.replace(RETRAINED, checkpoint_every=4), checkpoint=path, callback=stop
    )
    half.grow()
    with pytest.raises(KeyboardInterrupt):
        half.reparametrize(1)
    again = JKOTrainer.resume(path, *data)
    assert again.block is not None and again.block.before is not None and again.block.before_factor == 1
    records = again.reparametrize(1)[0].blocks
    assert [r.put_back for r in records] == [True, False] and _same_weights(again.flow, whole.flow)
    assert [r.val_nll for r in records] == [r.val_nll for r in expected]


def test_the_step_control_settings_are_checked():
    with pytest.raises(Exception, match="step_tol"):
        JKOConfig(step_tol=0.0)
    with pytest.raises(Exception, match="step_doublings"):
        JKOConfig(step_doublings=-1)


# -- the round trip of the flow up to a block -------------------------------------------


def round_trip_by_hand(flow: jkoflow.Flow, x_train, x_val) -> float:
    """The trainer's round-trip estimate of the whole ``flow``, by hand with
    Flow.forward and Flow.inverse: the TAIL_FRACTION of training rows
    farthest out in S(x) and the validation rows nearer in, each stratum
    weighted by its share of the training set, over the validation rows' scale."""
    x_train, x_val = (torch.as_tensor(x).to(flow.shift) for x in (x_train, x_val))
    with torch.no_grad():
        radii, index = (
            flow.standardize(x_train)[0].norm(dim=1).topk(max(1, round(TAIL_FRACTION * len(x_train))))
        )
        far = flow.standardize(x_val)[0].norm(dim=1) >= radii[-1]
        errors = [(flow.inverse(flow(x)[0]) - x).norm(dim=1) for x in (x_val, x_train[index])]
    share = len(index) / len(x_train)
    mean = (1 - share) * errors[0][~far].mean() + share * errors[1].mean()
    return float(mean) / float((x_val - flow.shift).pow(2).sum(1).mean().div(flow.dim).sqrt())


def _linear_flow(a: float, b: float, factor0: int) -> jkoflow.Flow:
    """Block 0 contracts coordinate 0 by e^(−a) (v = −a z₀), block 1 expands it
    again by e^b: block 1's RK4 error lies along the coordinate block 0's
    inverse stretches by e^a, so it is small against block 1's own input
    scale and large against the data's."""
    first, second = LinearBlock(2).double(), LinearBlock(2).double()
    with torch.no_grad():
        first.B.copy_(torch.diag(torch.tensor([-a, 0.0])))
        second.B.copy_(torch.diag(torch.tensor([b, 0.0])))
    return jkoflow.Flow(2, [first, second], steps=2, steps_factors=[factor0, 1]).double()


ROUND_TRIP = first_pass(dtype="float64", device="cpu", train_steps=2, eval_steps=2, inversion_tol=1e-3)


def _frozen(factor0: int) -> tuple[JKOTrainer, dict, torch.Tensor]:
    x = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    trainer = JKOTrainer(x[:3000], x[3000:], config=ROUND_TRIP, flow=_linear_flow(3.0, 1.5, factor0))
    return trainer, trainer.samples.base(1), x


def _trip(trainer: JKOTrainer, k: int, cached: dict, val) -> float:
    """The trainer's round trip of blocks 0 … k, ``cached`` the samples before block k."""
    samples = trainer.samples
    return samples.round_trip_error(k, val, samples.push(k, samples.tail_of(cached["train"])))


def test_the_round_trip_is_the_whole_flow_s_in_data_units():
    trainer, cached, x = _frozen(8)
    measured = fits_its_steps(trainer, 1, cached)
    trip = _trip(trainer, 1, cached, measured.val)
    assert trip == pytest.approx(round_trip_by_hand(trainer.flow, x[:3000], x[3000:]), rel=1e-9)
    plain = inversion_error(trainer.flow, x[3000:]) / data_scale(trainer.flow, x[3000:])
    assert trip == pytest.approx(plain, rel=0.1)  # Gaussian data: the tail weighs little
    index, radius = trainer.samples.tail()
    assert len(index) == 30 and radius == pytest.approx(float(x[:3000][index].norm(dim=1).min()), rel=1e-3)
    data = trainer.samples.base(0)  # the data, standardised: no block inverts the identity
    assert trainer.samples.round_trip_error(-1, data["val"], trainer.samples.tail_of(data["train"])) < 1e-12


def test_the_round_trip_weighs_the_rows_far_out_by_their_share():
    """Long tails: a validation set that holds none of the rows where the
    flow does not invert sees nothing; the estimate finds them in the
    training rows farthest out and weighs them by their share."""
    trainer, _, _ = _frozen(8)
    samples = trainer.samples

    def trip() -> float:
        samples._base = None  # the sets changed: push them again
        cached = samples.base(1)
        return _trip(trainer, 1, cached, fits_its_steps(trainer, 1, cached).val)

    samples.sets["val"] = samples.sets["val"][:200]  # a small validation set
    near = trip()
    index, _ = samples.tail()
    samples.sets["train"][index] *= 1000  # the far rows far out: RK4's error grows with |x| here
    far = trip()
    x_val = samples.sets["val"]
    plain = inversion_error(trainer.flow, x_val) / data_scale(trainer.flow, x_val)
    assert far > 10 * near and plain == pytest.approx(near, rel=0.1)  # the validation rows alone see nothing
    by_hand = round_trip_by_hand(trainer.flow, trainer.samples.sets["train"], trainer.samples.sets["val"])
    assert far == pytest.approx(by_hand, rel=1e-9)


def test_a_block_whose_composition_does_not_invert_is_evaluated_at_finer_steps():
    trainer, cached, x = _frozen(8)
    measured = fits_its_steps(trainer, 1, cached)
    before = _trip(trainer, 1, cached, measured.val)
    # the provoked fault: the block passes its own check, the flow up to it does not
    assert measured.fits and measured.error < ROUND_TRIP.inversion_tol / 2 < ROUND_TRIP.inversion_tol < before
    held, trip = hold_steps(trainer, 1, cached, measured)
    assert trainer.flow.steps_factors == (8, 2)  # one doubling of block 1's evaluation, block 0 untouched
    assert trip < ROUND_TRIP.inversion_tol / ROUND_TRIP_MARGIN and held.fits
    assert trip == pytest.approx(round_trip_by_hand(trainer.flow, x[:3000], x[3000:]), rel=1e-9)


def test_a_round_trip_the_flow_before_the_block_fails_is_not_the_block_s_to_mend():
    trainer, cached, _ = _frozen(1)  # block 0 at 2 steps: its own round trip fails
    samples = trainer.samples
    assert samples.round_trip_error(0, cached["val"], samples.tail_of(cached["train"])) > 0.1
    measured = fits_its_steps(trainer, 1, cached)
    held, trip = hold_steps(trainer, 1, cached, measured)
    assert held is measured and measured.fits and trip > 0.1  # measured, not held:
    assert trainer.flow.steps_factors == (1, 1)


def test_a_trained_block_is_held_by_its_evaluation_not_its_training(data):
    alone = JKOTrainer(*data, config=dataclasses.replace(CONFIG, step_doublings=0)).add_block()
    # its own inversion error passes a tolerance 1.5 times over it; its round trip
    # (the same rows, the same scale: no standardisation) does not pass half that
    config = dataclasses.replace(CONFIG, inversion_tol=1.5 * alone.inversion_error)
    assert alone.round_trip_error > config.inversion_tol / ROUND_TRIP_MARGIN
    trainer = JKOTrainer(*data, config=config)
    record = trainer.add_block()
    assert record.train_steps == 1 and record.step_doublings == 0 and record.n_batches == alone.n_batches
    assert record.eval_steps == 4 and trainer.flow.steps_factors == (2,)
    assert record.round_trip_error < config.inversion_tol / ROUND_TRIP_MARGIN
    by_hand = round_trip_by_hand(trainer.flow, data[0], data[1])
    assert record.round_trip_error == pytest.approx(by_hand, rel=1e-4)
    assert trainer.history.selected.stage == "initial"
    summary = summarize(trainer.flow, trainer.history, data[2], 0.0)
    assert summary["inversion_error_relative"] < config.inversion_tol / ROUND_TRIP_MARGIN
    assert summary["blocks"][0]["round_trip_error"] == record.round_trip_error


def test_a_flow_that_does_not_invert_is_not_selected(data):
    trainer = JKOTrainer(*data, config=dataclasses.replace(CONFIG, step_doublings=0))
    record = trainer.add_block()
    assert abs(record.step_doubling_change) < CONFIG.step_tol  # its NLL is the model's, but
    assert record.round_trip_error >= CONFIG.inversion_tol  # it does not invert
    assert trainer.history.selected.stage == "gaussian" and trainer.best[1].n_blocks == 0
