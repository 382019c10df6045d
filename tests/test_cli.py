"""The command line: a tiny end-to-end run, the run directory, and bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest

from jkoflow.cli import _train_line, main
from jkoflow.datasets import target
from jkoflow.run import RunFiles, load_data

TINY = [
    "--n-samples", "3000", "--width", "8", "--depth", "1", "--iters", "15", "--batch-size", "128",
    "--train-steps", "2", "--eval-steps", "4", "--max-blocks", "2", "--ter-eps", "1e-9", "--quiet",
]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "g8"
    assert main(["train", "--data", "8gaussians", "--out", str(out), *TINY]) == 0
    return out


def test_train_writes_the_run_directory(run_dir):
    for name in (
        "config.json",
        "summary.json",
        "history.json",
        "log.csv",
        "flow.pt",
        "w2_per_block.png",
        "samples.png",
    ):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["n_blocks"] == 2 and summary["n_batches"] == 30
    assert summary["eval_steps"] == 4 and summary["stopped_by"] == "max_blocks"
    assert 2.0 < summary["test_nll"] < 6.0 and summary["inversion_error"] < 1e-3
    assert summary["train_seconds"] > 0
    assert (
        summary["gaussian"]["stage"] == "gaussian" and summary["gaussian"]["test_nll"] > summary["test_nll"]
    )
    x_test = load_data(RunFiles(run_dir).data_config())[2][: summary["inversion_error_rows"]]
    scale = float(np.sqrt(((x_test - x_test.mean(0)) ** 2).sum(1).mean() / 2))  # mean ≈ the training mean
    assert summary["inversion_error_relative"] == pytest.approx(summary["inversion_error"] / scale, rel=0.05)
    line = _train_line(str(run_dir), summary)
    assert f"test NLL {summary['test_nll']:.4f} nats (4 RK4 steps/block" in line
    assert f"({summary['inversion_error_relative']:.1e} of the data's scale)" in line
    assert line.count(f"; Gaussian fit {summary['gaussian']['test_nll']:.4f}), ") == 1
    for block in summary["blocks"]:
        assert set(block) >= {"h", "movement", "ter", "n_batches", "seconds"}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["data"]["name"] == "8gaussians" and config["train"]["width"] == 8
    assert config["versions"]["torch"] and config["threads"] == 1
    log = (run_dir / "log.csv").read_text().splitlines()
    assert log[0].startswith("stage,block,iter,loss") and len(log) == 31


def test_eval_reproduces_the_summary(run_dir, capsys):
    assert main(["eval", str(run_dir)]) == 0
    assert "NLL" in capsys.readouterr().out
    result = json.loads((run_dir / "eval.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert result["nll"] == pytest.approx(summary["test_nll"], abs=1e-5)
    # 8gaussians has a known density: KL(data ‖ model) = E[log p_data] + NLL on the same test points
    x_test = load_data(RunFiles(run_dir).data_config())[2]
    log_p = target("8gaussians").log_prob(x_test)
    assert summary["kl_rows"] == result["kl_rows"] == len(x_test)
    assert summary["kl"] == pytest.approx(log_p.mean() + summary["test_nll"], abs=1e-5)
    assert result["kl"] == pytest.approx(summary["kl"], abs=1e-6) and 0 < result["kl_stderr"] < 0.1
    assert summary["kl"] > 0
    assert main(["eval", str(run_dir), "--eval-steps", "8"]) == 0
    finer = json.loads((run_dir / "eval.json").read_text())
    assert finer["eval_steps"] == 8 and abs(finer["nll"] - result["nll"]) < 0.05
    assert result["step_check_rows"] == len(x_test) < 10_000
    assert finer["nll"] - result["nll"] == pytest.approx(result["step_doubling_change"], abs=1e-5)
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--eval-steps", "1"]) == 0
    coarse, printed = json.loads((run_dir / "eval.json").read_text()), capsys.readouterr()
    out, err = printed.out, printed.err
    assert f"1 RK4 steps/block, {coarse['step_doubling_change']:+.4f} at 2," in out
    assert ("warning: doubling the RK4 steps" in err) == (abs(coarse["step_doubling_change"]) >= 1e-3)


def test_sample_and_plot(run_dir, tmp_path):
    out = tmp_path / "x.npy"
    assert main(["sample", str(run_dir), "-n", "500", "-o", str(out)]) == 0
    x = np.load(out)
    assert x.shape == (500, 2) and np.isfinite(x).all()
    (run_dir / "samples.png").unlink()
    assert main(["plot", str(run_dir)]) == 0
    assert (run_dir / "samples.png").stat().st_size > 10_000


def test_config_file_reruns_a_run(run_dir, tmp_path):
    out = tmp_path / "again"
    assert main(["train", "--config", str(run_dir / "config.json"), "--out", str(out), "--quiet"]) == 0
    a = json.loads((run_dir / "summary.json").read_text())
    b = json.loads((out / "summary.json").read_text())
    assert a["test_nll"] == b["test_nll"]  # same seed, same config: same numbers


def _bad_files(tmp_path):
    np.save(tmp_path / "vec.npy", np.zeros(50))
    bad = np.zeros((50, 2))
    bad[7] = np.inf
    np.save(tmp_path / "inf.npy", bad)
    np.save(tmp_path / "few.npy", np.random.default_rng(0).normal(size=(40, 2)))
    (tmp_path / "junk.npy").write_bytes(b"garbage")
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "config.json").write_text("{}")
    (tmp_path / "cfg.json").write_text(json.dumps({"train": {"widht": 3}}))
    (tmp_path / "data.txt").write_text("1 2\n3 4\n")
    (tmp_path / "dir.npy").mkdir()
    (tmp_path / "nan.csv").write_text("1,2\n3,nan\n5,6\n")
    np.save(tmp_path / "three.npy", np.zeros((3, 2)))


@pytest.mark.parametrize(
    "args,match",
    [
        (["--data", "nosuchdata"], "unknown data 'nosuchdata'"),
        (["--data", "{t}/missing.npy"], "not found"),
        (["--data", "{t}/junk.npy"], "junk.npy"),
        (["--data", "{t}/vec.npy"], "2-D"),
        (["--data", "{t}/inf.npy"], "NaN or inf"),
        (["--data", "{t}/few.npy", "--batch-size", "64"], "batch_size is 64"),
        (["--data", "moons", "--out", "{t}/existing"], "was not made by jkoflow"),
        (["--data", "moons", "--h0", "0"], "h0 must be a positive"),
        (["--data", "moons", "--width", "-3"], "width must be a positive"),
        (["--data", "moons", "--train-steps", "0"], "train_steps must be a positive"),
        (["--data", "moons", "--config", "{t}/cfg.json"], "unknown JKOConfig keys: widht"),
        (["--data", "moons", "--block", "nope"], "unknown block type 'nope'"),
        (["--data", "{t}/data.txt"], "unsupported data file extension '.txt'"),
        (["--data", "{t}/dir.npy"], "is not a file"),
        (["--data", "{t}/nan.csv"], "NaN or inf"),
        (["--data", "{t}/three.npy"], "too few rows to split"),
        (["--data", "moons", "--n-samples", "0"], "n_samples must be a positive"),
        (["--data", "moons", "--batch-size", "-3"], "batch_size must be a non-negative"),
        (["--data", "moons", "--eval-steps", "0"], "eval_steps must be a positive"),
        (["--data", "moons", "--h-max", "-1"], "h_max must be a positive"),
        (["--data", "moons", "--checkpoint-every", "-1"], "checkpoint_every must be a non-negative"),
        (["--data", "moons", "--nan-lr-factor", "1.5"], "nan_lr_factor must be in (0, 1)"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, args, match):
    _bad_files(tmp_path)
    args = [a.format(t=tmp_path) for a in args]
    if "--out" not in args and "--resume" not in args:
        args += ["--out", str(tmp_path / "run")]
    assert main(["train", *TINY, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err and "Traceback" not in err


def test_bad_input_via_argparse_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--data", "moons", "--out", "x", "--iters", "many"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "invalid int value" in err and "\n" not in err


def test_sample_and_eval_bad_input(run_dir, tmp_path, capsys):
    assert main(["sample", str(tmp_path / "nothing"), "-n", "5", "-o", str(tmp_path / "a.npy")]) == 2
    assert main(["sample", str(run_dir), "-n", "0", "-o", str(tmp_path / "a.npy")]) == 2
    assert main(["eval", str(run_dir), "--data", "nosuchdata"]) == 2
    np.save(tmp_path / "three.npy", np.zeros((10, 3)))
    assert main(["eval", str(run_dir), "--data", str(tmp_path / "three.npy")]) == 2
    err = capsys.readouterr().err
    assert "run directory not found" in err and "3 columns" in err


def test_bad_block_options_leave_no_run_directory(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"train": {"block_options": {"colour": "red"}}}))
    assert main(["train", *TINY, "--data", "moons", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    assert "colour" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_module_entry_point_exit_status(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "jkoflow", "train", "--data", "nosuchdata", "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "unknown data" in result.stderr
    assert not (tmp_path / "r").exists()  # nothing is created for a run that cannot start


def test_the_steps_note_states_the_blocks_own_counts():
    from jkoflow.cli import _steps_note

    same = {"eval_steps": 8, "block_eval_steps": [8, 8], "step_doubling_change": 2e-4}
    assert _steps_note(same, "/block") == "8 RK4 steps/block, +0.0002 at 16"
    raised = {"eval_steps": 8, "block_eval_steps": [16, 8, 32], "step_doubling_change": -1e-4}
    assert _steps_note(raised, "/block") == "8–32 RK4 steps/block, -0.0001 at twice those"
    older = {"eval_steps": 4, "step_doubling_change": 0.0}  # a summary written before per-block counts
    assert _steps_note(older) == "4 RK4 steps, +0.0000 at 8"
