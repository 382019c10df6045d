"""--device and --dtype on the commands that read a trained flow."""

import json

import numpy as np
import pytest
import torch

from jkoflow.cli import main
from jkoflow.run import RunFiles

TINY = [
    "--n-samples", "1500", "--width", "8", "--iters", "4", "--batch-size", "64", "--train-steps", "2",
    "--eval-steps", "2", "--max-blocks", "1", "--quiet", "--cache-device", "host",
]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "g8"
    assert main(["train", "--data", "8gaussians", "--out", str(out), "--dtype", "float32", *TINY]) == 0
    return out


def test_train_records_device_dtype_and_cache(run_dir):
    train = json.loads(RunFiles(run_dir).config.read_text())["train"]
    assert (train["device"], train["dtype"], train["cache_device"]) == ("cpu", "float32", "host")


def test_eval_and_sample_in_another_dtype(run_dir, tmp_path, capsys):
    assert main(["eval", str(run_dir), "--device", "cpu"]) == 0
    own = json.loads((run_dir / "eval.json").read_text())["nll"]
    assert main(["eval", str(run_dir), "--device", "cpu", "--dtype", "float64"]) == 0
    wide = json.loads((run_dir / "eval.json").read_text())["nll"]
    assert wide == pytest.approx(own, abs=1e-4) and wide != own  # the same flow, computed in float64
    for dtype in ("float32", "float64"):
        out = tmp_path / f"{dtype}.npy"
        assert main(["sample", str(run_dir), "-n", "50", "-o", str(out), "--dtype", dtype]) == 0
        assert np.load(out).dtype == np.dtype(dtype) and np.load(out).shape == (50, 2)
    assert main(["plot", str(run_dir), "--device", "cpu"]) == 0


def test_missing_gpu_exits_2_and_writes_nothing(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "gpu"
    assert main(["train", "--data", "moons", "--out", str(out), "--device", "cuda", *TINY]) == 2
    assert "torch sees no CUDA GPU" in capsys.readouterr().err and not out.exists()
    assert main(["otflow", "--data", "moons", "--out", str(out), "--device", "cuda:1", "--iters", "2"]) == 2
    assert not out.exists()


@pytest.mark.parametrize("command", ["eval", "sample", "plot"])
def test_bad_device_exits_2_with_one_line(run_dir, tmp_path, capsys, command):
    extra = ["-n", "5", "-o", str(tmp_path / "x.npy")] if command == "sample" else []
    assert main([command, str(run_dir), *extra, "--device", "gpu7"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "device must be like 'cpu', 'cuda' or 'cuda:0'" in err


def test_only_train_runs_under_torchrun(run_dir, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["eval", str(run_dir)]) == 2
    assert "only 'train' runs on several processes" in capsys.readouterr().err
