"""The monolithic OT-Flow baseline, the training budgets, and `jkoflow compare`."""

import csv
import json
import math
import re

import pytest
import torch

from jkoflow import InputError, JKOConfig, OTFlowConfig, datasets, train_jko, train_otflow
from jkoflow.cli import main
from jkoflow.compare import COLUMNS, time_to_reach
from jkoflow.metrics import nll
from jkoflow.objectives import otflow_loss

TINY = {"width": 8, "iters": 60, "batch_size": 128, "val_every": 10, "train_steps": 2, "eval_steps": 4}


@pytest.fixture(scope="module")
def data():
    return datasets.split(datasets.load("moons", n=3000, seed=0), seed=0)


@pytest.fixture(scope="module")
def trained(data):
    train, val, _ = data
    return train_otflow(train, val, config=OTFlowConfig(**TINY, alpha_c=8.0, alpha_r=1.0, seed=2))


def test_training_lowers_the_validation_nll(trained, data):
    flow, history = trained
    vals = [r["val_nll"] for r in history.validations]
    assert len(vals) == 6 and vals[-1] < vals[0] - 0.2
    assert history.n_batches == 60 and history.stopped_by == "iters"
    assert all(r["hjb"] > 0 for r in history.iterations)
    assert len(flow) == 1 and flow.steps == 4


def test_best_validation_weights_are_kept(trained, data):
    flow, history = trained
    _, val, _ = data
    assert history.best["val_nll"] == min(r["val_nll"] for r in history.validations)
    assert nll(flow, val) == pytest.approx(history.best["val_nll"], abs=1e-6)
    assert not any(p.requires_grad for p in flow.parameters())


def test_loss_terms_match_their_definition(data):
    train, _, _ = data
    flow, _ = train_otflow(train, data[1], config=OTFlowConfig(**{**TINY, "iters": 1}))
    x = torch.as_tensor(train[:256], dtype=torch.float32)
    terms = otflow_loss(flow.blocks[0], x, 4, alpha_c=3.0, alpha_r=0.5)
    assert float(terms.loss) == pytest.approx(
        float(3.0 * terms.nll + terms.transport + 0.5 * terms.hjb), rel=1e-6
    )
    assert float(terms.nll) == pytest.approx(-float(flow.log_prob(x).mean()), rel=1e-5)  # eval steps = 4
    no_hjb = otflow_loss(flow.blocks[0], x, 4, alpha_c=3.0, alpha_r=0.0)
    assert float(no_hjb.hjb) == 0.0


def test_plateau_drops_the_lr_and_stops(data):
    train, val, _ = data
    config = OTFlowConfig(
        **{**TINY, "iters": 400, "val_every": 1}, lr=1e-9, patience=1, max_drops=2, lr_drop=0.5, compile="off"
    )
    _, history = train_otflow(train, val, config=config)
    lrs = sorted({r["lr"] for r in history.iterations}, reverse=True)
    assert lrs == pytest.approx([1e-9, 5e-10, 2.5e-10])
    assert history.stopped_by == "lr_drops" and history.n_batches < 400


def test_time_budget(data):
    train, val, _ = data
    _, history = train_otflow(train, val, config=OTFlowConfig(**{**TINY, "iters": 10_000}, max_seconds=0.5))
    assert history.stopped_by == "max_seconds" and history.n_batches < 10_000
    assert history.validations[-1]["n_batches"] == history.n_batches


def test_jko_batch_budget(data):
    train, val, _ = data
    config = JKOConfig(width=8, iters=30, batch_size=128, max_blocks=5, ter_eps=1e-9, max_batches=50)
    flow, history = train_jko(train, val, config=config)
    assert [b["n_batches"] for b in history.blocks] == [30, 20]
    assert history.stopped_by == "budget" and len(flow) == 2
    staged = JKOConfig(
        width=8, iters=30, batch_size=128, max_blocks=2, ter_eps=1e-9, max_batches=60, refine=(2,)
    )
    flow, history = train_jko(train, val, config=staged)
    assert [s["name"] for s in history.stages] == ["initial"]  # the budget ends training before refinement


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"alpha_c": 0.0}, "alpha_c must be a positive"),
        ({"alpha_r": -1.0}, "alpha_r must be a non-negative"),
        ({"lr_drop": 1.5}, "lr_drop"),
        ({"max_seconds": -1.0}, "max_seconds"),
        ({"train_steps": 20, "eval_steps": 10}, "must not exceed"),
        ({"block": "test-linear", "alpha_r": 1.0}, "needs a potential block"),
        ({"block": "nope"}, "unknown block type"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(InputError, match=match):
        OTFlowConfig(**kwargs)


def test_non_potential_blocks_train_without_hjb(data):
    train, val, _ = data
    flow, history = train_otflow(
        train, val, config=OTFlowConfig(**{**TINY, "iters": 5}, block="test-linear", alpha_r=0)
    )
    assert history.n_batches == 5 and len(flow) == 1


def test_time_to_reach():
    curve = {"seconds": [1.0, 2.0, 3.0], "nll": [4.0, 3.5, 3.2]}
    assert time_to_reach(curve, 3.5) == 2.0
    assert time_to_reach(curve, 3.0) is None


CMP = [
    "--data", "checkerboard", "--n-samples", "4000", "--width", "8", "--budget-batches", "40", "--quiet",
]  # fmt: skip


def test_compare_writes_table_and_plot(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(
        json.dumps(
            {
                "train": {"iters": 20, "batch_size": 256, "val_every": 10},
                "otflow": {"batch_size": 256, "val_every": 10},
            }
        )
    )
    out = tmp_path / "cmp"
    assert main(["compare", *CMP, "--config", str(cfg), "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["method"] for r in rows] == ["jkoflow", "OT-Flow"] and tuple(rows[0]) == COLUMNS
    assert [int(r["n_batches"]) for r in rows] == [40, 40]  # the same budget for both
    for row in rows:
        assert 3.0 < float(row["test_nll"]) < 6.0 and float(row["w2"]) > 0
        # checkerboard: log p_data = −log 32 on every test point
        assert float(row["kl"]) == pytest.approx(float(row["test_nll"]) - math.log(32), abs=1e-4)
        assert 0 < float(row["kl_stderr"]) < 0.1
    assert (out / "compare.png").stat().st_size > 10_000
    text = (out / "compare.md").read_text()
    assert "median heuristic" in text and "exact (POT" in text and "| jkoflow |" in text
    checks = [
        r for r in json.loads((out / "jko" / "history.json").read_text())["iterations"] if "val_nll" in r
    ]
    assert [(r["iter"], r["n_batches"]) for r in checks][:2] == [(9, 10), (19, 20)]  # block 1's checks
    assert re.search(
        r"best validation NLL so far is (not )?below OT-Flow's at every OT-Flow validation", text
    )
    assert "KL(data ‖ model) (nats) |" in text and " ± " in text
    paired = re.search(
        r"Test NLL jkoflow − OT-Flow: ([+-][0-9.]+) ± ([0-9.]+) nats \(paired over the (\d+)", text
    )
    nlls = [float(r["test_nll"]) for r in rows]
    assert float(paired[1]) == pytest.approx(nlls[0] - nlls[1], abs=2e-4) and float(paired[2]) > 0
    assert int(paired[3]) == 400  # the test split of 4000 rows
    for row, run in zip(rows, ("jko", "otflow"), strict=True):
        run_summary = json.loads((out / run / "summary.json").read_text())
        assert float(row["step_doubling_change"]) == pytest.approx(run_summary["step_doubling_change"])
        assert abs(run_summary["step_doubling_change"]) < 0.05 and run_summary["step_check_rows"] == 400
    summary = json.loads((out / "otflow" / "summary.json").read_text())
    config = json.loads((out / "otflow" / "config.json").read_text())
    assert config["method"] == "otflow" and config["otflow"]["alpha_c"] == 15.0  # checkerboard preset
    assert summary["n_batches"] == 40
    assert main(["compare", *CMP, "--config", str(cfg), "--out", str(out)]) == 2  # no silent overwrite
    assert main(["eval", str(out / "otflow")]) == 0
    assert main(["plot", str(out / "otflow")]) == 0 and (out / "otflow" / "val_nll.png").is_file()


@pytest.mark.parametrize(
    "args,match",
    [
        (["otflow", "--data", "moons", "--alpha-c", "0"], "alpha_c must be a positive"),
        (["otflow", "--data", "nosuch"], "unknown data"),
        (["compare", "--data", "moons", "--budget-batches", "0"], "--budget-batches must be a positive"),
        (["compare", "--data", "moons", "--budget-seconds", "-1"], "--budget-seconds must be positive"),
    ],
)
def test_cli_bad_input(tmp_path, capsys, args, match):
    assert main([*args, "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err


# -- the shared loop: rollback and resume ------------------------------------------


def _faulty_otflow(monkeypatch, bad_calls):
    """otflow_loss with a NaN loss at the (1-based) calls in ``bad_calls``."""
    import jkoflow.otflow

    real, calls = jkoflow.otflow.otflow_loss, []

    def loss(*args, **kwargs):
        terms = real(*args, **kwargs)
        calls.append(1)
        if bad_calls(len(calls)):
            return terms._replace(loss=terms.loss * float("nan"))
        return terms

    monkeypatch.setattr(jkoflow.otflow, "otflow_loss", loss)


def test_otflow_rolls_back_a_non_finite_loss_with_a_lower_lr(data, monkeypatch):
    train, val, _ = data
    config = OTFlowConfig(**TINY, seed=2, checkpoint_every=20)
    _faulty_otflow(monkeypatch, lambda call: call == 26)  # step 25: back to the snapshot at step 20
    with pytest.warns(RuntimeWarning, match="non-finite loss at step 25; rolled back to step 20"):
        _, history = train_otflow(train, val, config=config)
    assert [r["iter"] for r in history.iterations] == list(range(60))
    lrs = [r["lr"] for r in history.iterations]
    assert lrs[19] == config.lr and lrs[20] == config.lr * config.nan_lr_factor == lrs[-1]
    assert math.isfinite(history.validations[-1]["val_nll"]) and len(history.validations) == 6


def test_otflow_raises_training_error_once_the_retries_are_spent(data, monkeypatch):
    from jkoflow.errors import TrainingError

    train, val, _ = data
    _faulty_otflow(monkeypatch, lambda call: call > 5)
    with (
        pytest.warns(RuntimeWarning, match="retry|rolled back"),
        pytest.raises(TrainingError, match="OT-Flow"),
    ):
        train_otflow(train, val, config=OTFlowConfig(**TINY, nan_retries=2))


def test_otflow_resumes_exactly_after_a_kill(data, tmp_path):
    train, val, _ = data
    options = {**TINY, "val_every": 5, "lr": 0.5, "seed": 3, "patience": 1, "max_drops": 1}
    config = OTFlowConfig(**options, checkpoint_every=10)
    whole, history = train_otflow(train, val, config=config)
    assert history.stopped_by == "lr_drops" and history.validations[3]["lr"] == 0.25  # a drop, then the stop
    path = tmp_path / "otflow.pt"

    def kill(record):
        if record["iter"] == 24:  # after the drop at step 14; the checkpoint holds step 20
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        train_otflow(train, val, config=config, checkpoint=path, callback=kill)
    resumed, again = train_otflow(train, val, config=config, checkpoint=path, resume=True)
    assert all(
        torch.equal(a, b)
        for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True)
    )
    assert [r["loss"] for r in again.iterations] == [r["loss"] for r in history.iterations]
    assert [r["lr"] for r in again.validations] == [r["lr"] for r in history.validations]
    assert again.best["iter"] == history.best["iter"] and again.stopped_by == history.stopped_by
    with pytest.raises(InputError, match="not a 'jko' one"):
        train_jko(train, val, checkpoint=path, resume=True)
