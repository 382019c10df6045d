"""Checkpoint and resume, recovery from non-finite losses, and repeatable runs."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import jkoflow
import jkoflow.scheduler
from jkoflow import InputError, JKOConfig, train_jko
from jkoflow.checkpoint import FORMAT_VERSION, load_state
from jkoflow.cli import main
from jkoflow.errors import TrainingError
from jkoflow.flow import Flow
from jkoflow.loop import FAULTS
from jkoflow.trainer import resume_note

CONFIG = JKOConfig(
    width=8,
    iters=12,
    batch_size=64,
    train_steps=2,
    eval_steps=4,
    max_blocks=2,
    ter_eps=1e-9,
    reparam_iters=1,
    reparam_tol=1e-6,
    refine=(2,),
    stage_iters=6,
    checkpoint_every=3,
)  # 2 blocks × 12 steps, reparam 2 × 6, refine 4 × 6: 60 steps


@pytest.fixture(scope="module")
def data():
    x = jkoflow.datasets.load("8gaussians", n=3000, seed=0)
    return jkoflow.datasets.split(x, 0.1, 0.1, seed=0)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted run (with checkpoints, which must not change it)."""
    path = tmp_path_factory.mktemp("ref") / "trainer.pt"
    flow, history = train_jko(*data, config=CONFIG, checkpoint=path)
    return flow, history, path


class _Kill(Exception):
    pass


def _killed_at(count: int):
    """A callback that stops training abruptly at its ``count``-th step."""
    seen = []

    def callback(record):
        seen.append(record)
        if len(seen) == count:
            raise _Kill

    return callback


def _same_parameters(a: Flow, b: Flow) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _without_seconds(value):
    """A summary or history with its wall-clock entries removed."""
    if isinstance(value, dict):
        return {k: _without_seconds(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [_without_seconds(v) for v in value]
    return value


def test_checkpointing_does_not_change_training(data, reference):
    flow, history = train_jko(*data, config=CONFIG)
    assert _same_parameters(flow, reference[0])
    assert _without_seconds(history.to_dict()) == _without_seconds(reference[1].to_dict())
    assert [s["name"] for s in history.stages] == ["initial", "reparam 1", "refine 1"]


# killed: mid block 2, mid reparam, at the start of refine, mid refine
@pytest.mark.parametrize("stop", [17, 29, 37, 46])
def test_resume_gives_the_uninterrupted_result(data, reference, tmp_path, stop):
    path = tmp_path / "trainer.pt"
    with pytest.raises(_Kill):
        train_jko(*data, config=CONFIG, checkpoint=path, callback=_killed_at(stop))
    state = load_state(path)
    assert not state.finished and len(state.history["iterations"]) < stop
    flow, history = train_jko(*data, checkpoint=path, resume=True)
    assert _same_parameters(flow, reference[0])
    assert _without_seconds(history.to_dict()) == _without_seconds(reference[1].to_dict())
    assert load_state(path).finished


def test_finished_run_gets_more_blocks(data, reference, tmp_path):
    path = tmp_path / "trainer.pt"
    path.write_bytes(reference[2].read_bytes())
    before = reference[0]  # 4 blocks after refinement
    more = dataclasses.replace(CONFIG, max_blocks=len(before) + 1)
    flow, history = train_jko(*data, config=more, checkpoint=path, resume=True)
    assert len(flow) == len(before) + 1 and history.stages[-1]["name"] == "extend 1"
    for old, new in zip(before.blocks, flow.blocks, strict=False):
        assert all(torch.equal(p, q) for p, q in zip(old.parameters(), new.parameters(), strict=True))
    record = history.stages[-1]["blocks"][0]
    assert record["index"] == len(before) and record["n_batches"] == CONFIG.iters
    assert record["val_nll"] < history.stages[-2]["val_nll"] + 0.05  # trained on pushed data, not noise
    with pytest.raises(InputError, match="finished with 5 blocks"):
        train_jko(*data, config=more, checkpoint=path, resume=True)


def test_resume_refuses_other_settings_and_data(data, tmp_path):
    path = tmp_path / "trainer.pt"
    with pytest.raises(_Kill):
        train_jko(*data, config=CONFIG, checkpoint=path, callback=_killed_at(5))
    with pytest.raises(InputError, match="cannot change width when resuming"):
        train_jko(*data, config=dataclasses.replace(CONFIG, width=9), checkpoint=path, resume=True)
    with pytest.raises(InputError, match="train data differ"):
        train_jko(data[0][:-1], *data[1:], checkpoint=path, resume=True)
    with pytest.raises(InputError, match="training checkpoint not found"):
        train_jko(*data, checkpoint=tmp_path / "none.pt", resume=True)
    flow, _ = train_jko(*data, config=dataclasses.replace(CONFIG, lr=0.02), checkpoint=path, resume=True)
    assert len(flow) == 4  # lr is one of the options a resumed run may change


def test_checkpoint_inside_a_block_holds_its_progress(data, tmp_path):
    path = tmp_path / "trainer.pt"
    with pytest.raises(_Kill):
        train_jko(*data, config=CONFIG, checkpoint=path, callback=_killed_at(17))
    state = load_state(path)  # written after step 3 of block 2 (index 1)
    assert state.block is not None and (state.block.index, state.block.iter) == (1, 3)
    assert len(state.block.losses) == 3 and state.batches == 15
    assert state.block.optimizer is not None and len(state.block.optimizer["state"]) > 0  # Adam moments
    assert len(state.flow) == 2 and state.history["stages"][0]["blocks"][0]["index"] == 0


def _inject(monkeypatch, faulty_calls, kind="loss"):
    """Makes the JKO loss (or its gradient) non-finite on the given calls."""
    real = jkoflow.scheduler.jko_loss
    calls = []

    def loss(block, x, *args, **kwargs):
        terms = real(block, x, *args, **kwargs)
        calls.append(1)
        if not faulty_calls(len(calls)):
            return terms
        if kind == "loss":
            return terms._replace(loss=terms.loss * float("nan"))
        if kind == "divergence":  # finite, far above the block's first loss
            return terms._replace(loss=terms.loss + 1e9)
        p = next(block.parameters())
        return terms._replace(loss=terms.loss + 0 * torch.sqrt(p - p).sum())  # finite value, NaN gradient

    monkeypatch.setattr(jkoflow.scheduler, "jko_loss", loss)


@pytest.mark.parametrize("kind", ["loss", "gradient", "divergence"])
def test_non_finite_step_rolls_back_with_a_lower_lr(data, monkeypatch, kind):
    _inject(monkeypatch, lambda call: call in (8, 9), kind)
    config = dataclasses.replace(CONFIG, reparam_iters=0, refine=(), checkpoint_every=5)
    with pytest.warns(RuntimeWarning, match=f"{FAULTS[kind][0]} at step 7; rolled back to step 5"):
        flow, history = train_jko(*data, config=config)
    faults = history.faults
    assert [(f["block"], f["iter"], f["resumed_at"], f["fault"]) for f in faults] == [
        (0, 7, 5, kind),
        (0, 5, 5, kind),
    ]
    assert [f["lr_scale"] for f in faults] == [0.5, 0.25]
    steps = [r["iter"] for r in history.iterations if r["block"] == 0]
    assert steps == list(range(config.iters))  # the rolled-back steps are redone, not kept twice
    assert history.stages[0]["blocks"][0]["retries"] == 2
    lr = {r["iter"]: r["lr"] for r in history.iterations if r["block"] == 0}
    assert lr[5] == pytest.approx(0.25 * lr_schedule(config, 5), rel=1e-12)
    assert lr[4] == pytest.approx(lr_schedule(config, 4), rel=1e-12)
    assert len(flow) == 2 and torch.isfinite(flow.log_prob(data[2])).all()


def lr_schedule(config: JKOConfig, it: int) -> float:
    import math

    final = config.lr * config.lr_final_factor
    return final + (config.lr - final) * (1 + math.cos(math.pi * it / config.iters)) / 2


def test_persistent_nan_stops_with_the_finished_blocks_saved(data, monkeypatch, tmp_path, capsys):
    _inject(monkeypatch, lambda call: call > 25)  # block 2 fails from its 6th step on
    out = tmp_path / "run"
    args = ["train", "--data", "8gaussians", "--n-samples", "3000", "--out", str(out), "--quiet"]
    args += ["--width", "8", "--iters", "20", "--batch-size", "128", "--train-steps", "2"]
    args += ["--eval-steps", "4", "--max-blocks", "3", "--ter-eps", "1e-9", "--checkpoint-every", "5"]
    with pytest.warns(RuntimeWarning):
        assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert "block 2: the loss was not finite at step 5 after 3 retries" in err and "\n" not in err
    partial = Flow.load(out / "flow-partial.pt")
    assert len(partial) == 1 and torch.isfinite(partial.log_prob(torch.zeros(3, 2))).all()
    history = load_state(out / "trainer.pt").history
    assert len(history["faults"]) == 3 and history["stages"][0]["blocks"][0]["n_batches"] == 20


def test_persistent_nan_raises_training_error(data, monkeypatch):
    _inject(monkeypatch, lambda call: call > 3)
    config = dataclasses.replace(CONFIG, reparam_iters=0, refine=(), nan_retries=1)
    with pytest.warns(RuntimeWarning, match="retry 1/1"), pytest.raises(TrainingError) as info:
        train_jko(*data, config=config)
    assert info.value.block_index == 0 and "the 0 blocks before it are finished" in str(info.value)


def test_bad_checkpoint_files_give_one_line(data, tmp_path, reference):
    good = tmp_path / "good.pt"
    train_jko(*data, config=dataclasses.replace(CONFIG, reparam_iters=0, refine=()), checkpoint=good)
    payload = torch.load(good, weights_only=True)
    newer = tmp_path / "newer.pt"
    torch.save({**payload, "version": FORMAT_VERSION + 1}, newer)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:300])
    reference[0].save(tmp_path / "flow.pt")
    upgrade = f"version {FORMAT_VERSION + 1}; this jkoflow reads version {FORMAT_VERSION}; upgrade"
    cases = {newer: upgrade, truncated: "cannot read"}
    cases[tmp_path / "flow.pt"] = "is not a jkoflow training checkpoint"
    for path, match in cases.items():
        with pytest.raises(InputError, match=match) as info:
            load_state(path)
        assert "\n" not in str(info.value)


TINY = [
    "--data", "8gaussians", "--n-samples", "4000", "--width", "8", "--iters", "40", "--batch-size", "512",
    "--train-steps", "2", "--eval-steps", "4", "--max-blocks", "2", "--ter-eps", "1e-9",
    "--checkpoint-every", "5", "--quiet",
]  # fmt: skip


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "jkoflow", "train", *args], stderr=subprocess.PIPE, text=True, env=env
    )


def _wait_for_checkpoint(out: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    """Waits until the run has written a checkpoint inside a block."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        try:
            state = load_state(out / "trainer.pt")
        except InputError:  # not written yet
            time.sleep(0.05)
            continue
        if state.block is not None and state.block.iter >= 5:
            return
        time.sleep(0.05)
    raise AssertionError("no checkpoint inside a block")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "ref"
    process = _cli(*TINY, "--out", str(out))
    assert process.wait(timeout=300) == 0, process.stderr.read()
    return out


def _assert_same_run(a: Path, b: Path) -> None:
    assert _same_parameters(Flow.load(a / "flow.pt"), Flow.load(b / "flow.pt"))
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert _without_seconds(sa) == _without_seconds(sb)
    log_a, log_b = ((d / "log.csv").read_text().splitlines() for d in (a, b))
    strip = [line.rsplit(",", 1)[0] for line in log_a], [line.rsplit(",", 1)[0] for line in log_b]
    assert strip[0] == strip[1]  # the same steps, once each (seconds column dropped)


def test_sigkill_then_resume_equals_an_uninterrupted_run(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    process = _cli(*TINY, "--out", str(out))
    _wait_for_checkpoint(out, process)
    process.kill()  # SIGKILL: no chance to clean up
    process.wait()
    assert not (out / "summary.json").exists()
    resumed = _cli("--resume", str(out), "--quiet")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    _assert_same_run(out, uninterrupted)


def test_ctrl_c_stops_cleanly_and_resumes(uninterrupted, tmp_path):
    out = tmp_path / "interrupted"
    process = _cli(*TINY, "--out", str(out))
    _wait_for_checkpoint(out, process)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    err = process.stderr.read().strip()
    assert err.endswith(f"continue with: jkoflow train --resume {out}") and "Traceback" not in err
    state = load_state(out / "trainer.pt")
    assert state.block is not None and not state.finished
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    _assert_same_run(out, uninterrupted)


def test_resume_extends_a_finished_cli_run(uninterrupted, tmp_path, capsys):
    out = tmp_path / "more"
    for name in ("config.json", "trainer.pt", "log.csv"):
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_bytes((uninterrupted / name).read_bytes())
    assert main(["train", "--resume", str(out), "--max-blocks", "3", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_blocks"] == 3 and summary["stages"][-1]["name"] == "extend 1"
    assert json.loads((out / "config.json").read_text())["train"]["max_blocks"] == 3
    assert main(["train", "--resume", str(out), "--width", "9", "--quiet"]) == 2
    assert main(["train", "--resume", str(out), "--data", "moons", "--quiet"]) == 2
    assert main(["train", "--resume", str(tmp_path / "nothing"), "--quiet"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "cannot change width when resuming" in err[0]
    assert "--data cannot be used with --resume" in err[1]
    assert "file not found" in err[2]


def test_same_seed_same_summary(tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        assert main(["train", *TINY, "--iters", "10", "--out", str(out)]) == 0
    _assert_same_run(*runs)
    config = json.loads((runs[0] / "config.json").read_text())
    assert config["train"]["seed"] == 0 and config["data"]["seed"] == 0
    assert {"jkoflow", "torch", "numpy", "pot", "torchdiffeq", "python"} <= set(config["versions"])


def test_a_finite_divergence_stops_the_run_like_nan(tmp_path, capsys):
    """--lr 30 makes the loss grow without bound while it stays finite: that is
    a fault (rolled back, then TrainingError and exit 1), not a finished run."""
    out = tmp_path / "run"
    args = ["train", "--data", "8gaussians", "--n-samples", "3000", "--out", str(out), "--quiet"]
    args += ["--width", "8", "--iters", "20", "--batch-size", "128", "--max-blocks", "1", "--lr", "30"]
    with pytest.warns(RuntimeWarning, match="diverged loss|non-finite"):
        assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert "block 1:" in err and "after 3 retries" in err and "\n" not in err
    assert not (out / "flow.pt").exists() and not (out / "summary.json").exists()
    faults = load_state(out / "trainer.pt").history["faults"]
    assert len(faults) == 3 and {f["fault"] for f in faults} <= {"loss", "gradient", "divergence"}


def test_resume_says_and_resets_the_lr_scale(data, monkeypatch, tmp_path):
    """A run that spent its retries resumes at the saved lr scale unless a new
    lr is given; the note says which scale and how many retries."""
    _inject(monkeypatch, lambda call: call > 3)
    config = dataclasses.replace(CONFIG, reparam_iters=0, refine=(), nan_retries=1, max_blocks=1)
    state = tmp_path / "state.pt"
    with pytest.warns(RuntimeWarning), pytest.raises(TrainingError):
        train_jko(*data, config=config, checkpoint=state)
    monkeypatch.undo()
    kept = jkoflow.JKOTrainer.resume(state, *data)
    assert (kept.block.lr_scale, kept.block.retries) == (0.5, 1)
    assert resume_note(kept) == "resuming block 1 at step 3 with lr 0.05 × 0.5 (1/1 retries used)"
    reset = jkoflow.JKOTrainer.resume(state, *data, reset_lr=True)
    assert (reset.block.lr_scale, reset.block.retries) == (1.0, 0)
    other = jkoflow.JKOTrainer.resume(state, *data, config=dataclasses.replace(config, lr=0.01))
    assert other.block.lr_scale == 1.0 and "lr 0.01 × 1 (0/1 retries used)" in resume_note(other)
    flow, history = train_jko(*data, checkpoint=state, resume=True, reset_lr=True)
    assert len(flow) == 1 and history.blocks[0].n_batches == config.iters


def test_a_flow_with_a_non_finite_nll_is_a_failed_run(tmp_path, monkeypatch, capsys):
    import jkoflow.run

    real = jkoflow.run.summarize
    monkeypatch.setattr(jkoflow.run, "summarize", lambda *a: {**real(*a), "test_nll": float("inf")})
    out = tmp_path / "run"
    args = ["train", "--data", "8gaussians", "--n-samples", "3000", "--out", str(out), "--quiet"]
    args += ["--width", "8", "--iters", "5", "--batch-size", "128", "--max-blocks", "1"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert "the trained flow is not usable (test NLL inf" in err and "\n" not in err
    assert not (out / "flow.pt").exists() and not (out / "summary.json").exists()
