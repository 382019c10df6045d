"""Reparametrisation of h_k, refinement by time slices, and the stage records."""

import json

import pytest
import torch

import blocks
from jkoflow import Flow, InputError, JKOConfig, datasets, integrate, train_jko
from jkoflow.cli import main
from jkoflow.config import DEFAULT_STAGES, FIRST_PASS
from jkoflow.metrics import nll
from jkoflow.scheduler import movement_spread, reparametrize

from .analytic_blocks import LinearBlock
from .configs import first_pass

TINY = {
    "block": "otflow",
    "width": 8,
    "depth": 1,
    "iters": 20,
    "batch_size": 128,
    "train_steps": 2,
    "eval_steps": 4,
    "max_blocks": 2,
}


def test_reparametrize_formula_and_clipping():
    h = reparametrize([1.0, 2.0, 4.0], [1.0, 2.0, 3.0], eta=0.5, h_min=0.1, h_max=10.0)
    assert h == pytest.approx([1.5, 2.0, 4.0 + 0.5 * (8.0 / 3.0 - 4.0)])
    assert reparametrize([1.0, 0.6], [0.01, 100.0], eta=1.0, h_min=0.5, h_max=4.0) == [4.0, 0.5]
    assert movement_spread([1.0, 2.0, 3.0]) == pytest.approx(0.5)
    assert movement_spread([2.0, 2.0]) == 0.0


@pytest.mark.parametrize("count,steps", [(2, 8), (4, 8), (3, 6)])
@torch.no_grad()
def test_time_slices_reproduce_the_parent_rk4_grid(random_otflow, count, steps):
    parents = [random_otflow(seed=1), random_otflow(seed=2)]
    coarse = Flow(2, parents, steps=steps).double()
    fine = Flow(2, [s for p in parents for s in blocks.time_slices(p, count)], steps=steps // count).double()
    x = torch.randn(200, 2, dtype=torch.float64)
    z, logdet = coarse(x)
    z_fine, logdet_fine = fine(x)
    assert float((z - z_fine).abs().max()) < 1e-12
    assert float((logdet - logdet_fine).abs().max()) < 1e-12
    assert float((fine.inverse(z_fine) - coarse.inverse(z)).abs().max()) < 1e-12


@torch.no_grad()
def test_refined_flow_agrees_to_integrator_accuracy_at_full_steps(random_otflow):
    parent = random_otflow(seed=3)
    coarse = Flow(2, [parent], steps=8).double()
    fine = Flow(2, blocks.time_slices(parent, 2), steps=8).double()
    x = torch.randn(200, 2, dtype=torch.float64)
    assert float((coarse.log_prob(x) - fine.log_prob(x)).abs().max()) < 1e-4


@torch.no_grad()
def test_slices_of_slices_flatten_and_compose():
    block = LinearBlock(3).double()
    block.B.copy_(0.5 * torch.randn(3, 3, dtype=torch.float64))
    halves = blocks.time_slices(block, 2)
    quarters = [q for half in halves for q in blocks.time_slices(half, 2)]
    assert [(q.index, q.count) for q in quarters] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert all(type(q.parent) is LinearBlock for q in quarters)  # flattened to the root
    start = torch.randn(10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = start
    for q in quarters:
        out = integrate(q, out, steps=32).z
    expected = start @ torch.linalg.matrix_exp(block.B).T
    assert float((out - expected).abs().max()) < 1e-9


def test_time_slice_save_load_and_bad_arguments(random_otflow, tmp_path):
    flow = Flow(2, blocks.time_slices(blocks.time_slices(random_otflow(), 2)[1], 3), steps=4).double()
    flow.save(tmp_path / "f.pt")
    loaded = Flow.load(tmp_path / "f.pt")
    assert [(b.index, b.count) for b in loaded.blocks] == [(3, 6), (4, 6), (5, 6)]
    x = torch.randn(9, 2, dtype=torch.float64)
    assert torch.equal(loaded.log_prob(x), flow.log_prob(x))
    with pytest.raises(ValueError, match="≥ 2"):
        blocks.time_slices(random_otflow(), 1)
    with pytest.raises(ValueError, match="index"):
        blocks.make("timeslice", dim=2, parent=random_otflow(), index=2, count=2)


@pytest.fixture(scope="module")
def data():
    return datasets.split(datasets.load("8gaussians", n=3000, seed=0), seed=0)


@pytest.fixture(scope="module")
def staged(data):
    seen = []

    def on_stage(history, flow):
        seen.append((history.stages[-1]["name"], len(flow)))

    config = first_pass(**TINY, ter_eps=1e-9, reparam_iters=2, reparam_tol=1e-6, refine=(2,), stage_iters=10)
    flow, history = train_jko(*data, config=config, on_stage=on_stage)
    return flow, history, seen


def test_stages_run_in_order_and_are_recorded(staged, data):
    flow, history, seen = staged
    assert [s["name"] for s in history.stages] == ["initial", "reparam 1", "reparam 2", "refine 1"]
    assert seen == [("initial", 2), ("reparam 1", 2), ("reparam 2", 2), ("refine 1", 4)]
    initial, reparam1, reparam2, refine = history.stages
    expected_h = reparametrize(
        [b["h"] for b in initial["blocks"]], [b.movement for b in initial["blocks"]], 0.5, 0.05, 20
    )
    assert [b["h"] for b in reparam1["blocks"]] == pytest.approx(expected_h)
    assert [b["h"] for b in refine["blocks"]] == pytest.approx(
        [h / 2 for h in [b["h"] for b in reparam2["blocks"]] for _ in (0, 1)]
    )
    assert [(b["parent"], b["slice"]) for b in refine["blocks"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [s["n_batches"] for s in history.stages] == [40, 20, 20, 40]
    assert history.n_batches == 120 == len(history.iterations)
    assert {r["stage"] for r in history.iterations} == {0, 1, 2, 3}
    assert all(isinstance(b, blocks.TimeSlice) for b in flow.blocks)
    for stage in history.stages:
        assert stage["spread"] == pytest.approx(movement_spread([b.movement for b in stage["blocks"]]))
    assert history.blocks == refine["blocks"]
    assert nll(flow, data[2]) == pytest.approx(refine["test_nll"], abs=1e-5)


def test_reparam_stops_once_the_spread_is_small(data):
    config = first_pass(**TINY, ter_eps=1e-9, reparam_iters=3, reparam_tol=100.0)
    _, history = train_jko(*data, config=config)
    assert [s["name"] for s in history.stages] == ["initial"]


def test_stages_leave_an_existing_flow_alone(data):
    flow, _ = train_jko(*data, config=first_pass(**{**TINY, "max_blocks": 1}))
    frozen = [p.clone() for p in flow.parameters()]
    config = first_pass(
        **{**TINY, "max_blocks": 2}, ter_eps=1e-9, reparam_iters=1, reparam_tol=1e-6, refine=(2,)
    )
    flow, history = train_jko(*data, config=config, flow=flow)
    assert type(flow.blocks[0]) is blocks.OTFlowBlock and len(flow) == 3
    assert all(torch.equal(a, b) for a, b in zip(frozen, flow.blocks[0].parameters(), strict=True))
    assert [b["index"] for b in history.stages[-1]["blocks"]] == [1, 2]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"reparam_tol": 0.0}, "reparam_tol must be a positive"),
        ({"reparam_tol": -1.0}, "reparam_tol must be a positive"),
        ({"refine": (1,)}, "refine factors must be integers ≥ 2"),
        ({"refine": (2, 0)}, "refine factors must be integers ≥ 2"),
        ({"h_min": 30.0}, "h_min .* must not exceed h_max"),
        ({"reparam_eta": 0.0}, "reparam_eta"),
        ({"reparam_eta": 1.5}, "reparam_eta"),
        ({"reparam_iters": -1}, "reparam_iters"),
        ({"stage_iters": -5}, "stage_iters"),
    ],
)
def test_stage_config_validation(kwargs, match):
    with pytest.raises(InputError, match=match):
        JKOConfig(**kwargs)


def test_refine_from_json_list():
    assert JKOConfig(refine=[2, 3]).refine == (2, 3)


CLI_TINY = [
    "--data", "8gaussians", "--n-samples", "3000", "--width", "8", "--iters", "15", "--batch-size", "128",
    "--max-blocks", "2", "--ter-eps", "1e-9", "--stage-iters", "5", "--quiet",
]  # fmt: skip


def test_cli_stages_write_checkpoints_and_plots(tmp_path):
    out = tmp_path / "run"
    args = ["train", *CLI_TINY, "--reparam-iters", "1", "--reparam-tol", "1e-6", "--refine", "2", "2"]
    assert main([*args, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["initial", "reparam 1", "refine 1", "refine 2"]
    assert [s["n_blocks"] for s in summary["stages"]] == [2, 2, 4, 8]
    assert summary["n_blocks"] == 8 and len(summary["blocks"]) == 8
    sizes = {
        name: len(Flow.load(out / f"flow-{name}.pt"))
        for name in ("initial", "reparam-1", "refine-1", "refine-2")
    }
    assert sizes == {"initial": 2, "reparam-1": 2, "refine-1": 4, "refine-2": 8}
    for png in ("w2_per_block.png", "h_per_block.png", "samples.png"):
        (out / png).unlink()
    assert main(["plot", str(out)]) == 0
    assert all((out / png).stat().st_size > 10_000 for png in ("w2_per_block.png", "h_per_block.png"))


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--refine", "1"], "refine factors"),
        (["--reparam-tol", "0"], "reparam_tol"),
        (["--h-min", "30"], "must not exceed h_max"),
    ],
)
def test_cli_stage_bad_input(tmp_path, capsys, extra, match):
    assert main(["train", *CLI_TINY, *extra, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err


def test_a_full_flow_gets_no_new_blocks_or_stages(data):
    flow, _ = train_jko(*data, config=first_pass(**{**TINY, "max_blocks": 1}))
    config = first_pass(**{**TINY, "max_blocks": 1}, reparam_iters=2, refine=(2,))
    same, history = train_jko(*data, config=config, flow=flow)
    assert len(same) == 1 and [s["name"] for s in history.stages] == ["initial"] and history.blocks == []


def test_arclength_rule_cuts_the_time_into_equal_movements():
    # times 0, 1, 2 with arc lengths 0, 3, 4: equal thirds of arc length 2 end at t = 2/3 and t = 2
    h = reparametrize([1.0, 1.0], [3.0, 1.0], eta=1.0, h_min=0.01, h_max=10.0, rule="arclength")
    assert h == pytest.approx([2 / 3, 4 / 3], rel=1e-12)
    h3 = reparametrize(
        [5.0, 7.5, 11.25], [1.78, 0.19, 0.01], eta=1.0, h_min=0.01, h_max=100.0, rule="arclength"
    )
    assert sum(h3) == pytest.approx(23.75, rel=1e-12)  # the total time is kept
    assert h3[0] == pytest.approx(5.0 * (1.98 / 3) / 1.78, rel=1e-12)  # inside the first segment
    half = reparametrize([1.0, 1.0], [3.0, 1.0], eta=0.5, h_min=0.01, h_max=10.0, rule="arclength")
    assert half == pytest.approx([1 - 1 / 6, 1 + 1 / 6], rel=1e-12)
    equal = reparametrize([0.5, 2.0, 1.0], [1.0, 1.0, 1.0], eta=1.0, h_min=0.01, h_max=10.0, rule="arclength")
    assert equal == pytest.approx([0.5, 2.0, 1.0], rel=1e-12)  # equal movements are a fixed point
    with pytest.raises(ValueError, match="rule must be"):
        reparametrize([1.0], [1.0], 1.0, 0.1, 1.0, rule="median")


def test_reparam_rule_reaches_the_trainer(data):
    config = first_pass(
        **TINY, ter_eps=1e-9, reparam_iters=1, reparam_tol=1e-6, stage_iters=5, reparam_rule="arclength"
    )
    _, history = train_jko(*data, config=config)
    initial, reparam = history.stages
    h, w2 = [b["h"] for b in initial["blocks"]], [b.movement for b in initial["blocks"]]
    expected = reparametrize(h, w2, 0.5, 0.05, 20, rule="arclength")
    assert [b["h"] for b in reparam["blocks"]] == pytest.approx(expected, rel=1e-12)
    assert reparam["h_plan"] == pytest.approx(expected, rel=1e-12)
    assert expected != pytest.approx(reparametrize(h, w2, 0.5, 0.05, 20), rel=1e-3)  # the rules differ here


# -- the stages a run gets by default ---------------------------------------------


def test_the_default_stages_follow_the_block_type():
    assert JKOConfig().stages_for(2) == FIRST_PASS  # mlp blocks: the first pass alone
    assert JKOConfig().stages_for(8) == DEFAULT_STAGES["otflow"]
    assert JKOConfig(block="otflow").stages_for(2) == DEFAULT_STAGES["otflow"]
    given = JKOConfig(refine=(), finetune_lr=0.01).stages_for(8)
    assert given == {**DEFAULT_STAGES["otflow"], "refine": (), "finetune_lr": 0.01}  # a given field wins
    assert JKOConfig(block_types=("otflow", "mlp")).stages_for(8) == FIRST_PASS  # a mixed flow
    assert JKOConfig(block="otflow", block_types=("otflow",)).stages_for(3) == DEFAULT_STAGES["otflow"]
    resolved = JKOConfig().resolved(8)
    assert (resolved.reparam_iters, resolved.refine, resolved.retrain_iters) == (1, (2,), 400)
    with pytest.raises(ValueError, match="resolve the config"):
        _ = JKOConfig().retrain_iters


def test_a_run_records_and_resumes_the_stages_it_got_by_default(tmp_path):
    """An 8-d run with otflow blocks gets reparametrisation, refinement and
    fine-tuning without naming them; config.json records them, so the run
    resumes (and reports itself finished) without naming them either."""
    out = tmp_path / "run"
    tiny = ["--data", "gmm:d=8,k=2,seed=0", "--n-samples", "1500", "--width", "4", "--iters", "6",
            "--batch-size", "128", "--max-blocks", "1", "--train-steps", "2", "--eval-steps", "4",
            "--stage-iters", "3", "--finetune-iters", "4", "--val-every", "0", "--quiet"]  # fmt: skip
    assert main(["train", *tiny, "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())["train"]
    expected = {**DEFAULT_STAGES["otflow"], "refine": [2], "stage_iters": 3, "finetune_iters": 4}
    assert {name: config[name] for name in FIRST_PASS} == expected
    summary = json.loads((out / "summary.json").read_text())
    # one block: the reparametrisation has no spread to even out and stops at once
    assert [s["name"] for s in summary["stages"]] == ["initial", "refine 1", "finetune 1"]
    assert main(["train", "--resume", str(out), "--quiet"]) == 2  # finished: nothing left to do


def test_refine_given_without_factors_means_none(tmp_path):
    out = tmp_path / "run"
    tiny = ["--data", "gmm:d=8,k=2,seed=0", "--n-samples", "1500", "--width", "4", "--iters", "6",
            "--batch-size", "128", "--max-blocks", "1", "--train-steps", "2", "--eval-steps", "4",
            "--reparam-iters", "0", "--finetune-iters", "0", "--refine", "--quiet"]  # fmt: skip
    assert main(["train", *tiny, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["initial"]


@pytest.mark.parametrize("epochs,steps", [(2, [20, 38 + 38, 38]), (0, [20, 50 + 50, 50])])
def test_later_stages_pass_over_the_training_set_at_most_stage_epochs_times(data, epochs, steps):
    """2400 training rows at batch 128: two passes are ceil(2·2400/128) = 38
    steps, for each retrained slice and for the fine-tuning; the first pass
    is not bounded; 0 is no bound."""
    config = first_pass(
        **{**TINY, "max_blocks": 1}, ter_eps=1e-9, refine=(2,), stage_iters=50, finetune_iters=50,
        val_every=0, stage_epochs=epochs,
    )  # fmt: skip
    _, history = train_jko(*data, config=config)
    assert [s["name"] for s in history.stages] == ["initial", "refine 1", "finetune 1"]
    assert [s["n_batches"] for s in history.stages] == steps
    assert JKOConfig.from_saved({"ter_eps": 0.05}).stage_epochs == 0  # runs saved before the bound
    with pytest.raises(InputError, match="stage_epochs"):
        JKOConfig(stage_epochs=-1)
