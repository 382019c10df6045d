"""Bad input, end to end: every command refuses it with its exit status and one
stderr line, without a traceback, and leaves every file that existed as it was
(issue 15). Rows run ``jkoflow.cli.main`` in-process unless marked as a
subprocess (the real top-level handler and a lock held by another process).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import jkoflow
from jkoflow import atomic
from jkoflow.checkpoint import load_state
from jkoflow.cli import main
from jkoflow.config import DataConfig, JKOConfig
from jkoflow.errors import InputError
from jkoflow.otflow import OTFlowConfig
from jkoflow.run import IterationLog, run_jko, run_otflow
from jkoflow.rundir import LOCK, MARKER, RunDir

REPO = Path(__file__).resolve().parents[1]
SMALL_OT = ["--iters", "5", "--batch-size", "128", "--width", "8", "--n-samples", "3000", "--quiet"]
TINY = [*SMALL_OT, "--max-blocks", "1"]
NEW = ["--data", "checkerboard", "--out", "new", *TINY]
"""A tiny run into a new directory; a row adds the one bad option."""
NEW_OT = ["--data", "checkerboard", "--out", "new", *SMALL_OT]
CMP = ["--n-samples", "3000", "--quiet"]
"""compare takes its training options from --config."""
CMP_CFG = {
    "train": {"iters": 5, "batch_size": 128, "max_blocks": 1},
    "otflow": {"iters": 5, "batch_size": 128},
}


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with the sha256 of its content ("dir" for folders)."""
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny JKO run."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert main(["train", "--data", "checkerboard", "--out", str(out), *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def midblock(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped by Ctrl-C at step 3 of its second block (of 2)."""
    out = tmp_path_factory.mktemp("mid") / "run"
    logged = IterationLog.__call__

    def interrupt_in_block_2(self: IterationLog, record: dict) -> None:
        logged(self, record)
        if record["block"] == 1 and record["iter"] == 2:
            signal.raise_signal(signal.SIGINT)

    args = ["train", "--data", "checkerboard", "--out", str(out), *TINY, "--max-blocks", "2"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(IterationLog, "__call__", interrupt_in_block_2)
        assert main([*args, "--checkpoint-every", "1"]) == 130
    assert load_state(out / "trainer.pt").block.index == 1
    return out


def _write(path: str, content: object) -> None:
    Path(path).write_text(content if isinstance(content, str) else json.dumps(content))


def _data(name: str, edit: Callable[[np.ndarray], None]) -> None:
    x = np.random.default_rng(0).normal(size=(3000, 2))
    edit(x)
    np.save(name, x)


def _edit_flow(path: str, edit: Callable[[dict], None]) -> None:
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(payload, path)


def _first_weight(state: dict) -> str:
    return next((k for k in state if k.startswith("blocks.")), "mix")  # a Gaussian-fit flow has no blocks


def _edit_trainer(edit: Callable[[dict], None]) -> Callable[[], None]:
    return lambda: _edit_flow("b/trainer.pt", edit)


def _train_then_edit_data(data: str, out: str) -> None:
    """A finished run on the data file ``data`` whose rows are then changed."""
    _data(data, lambda x: None)
    assert main(["train", "--data", data, "--out", out, *TINY]) == 0
    _data(data, lambda x: x.__imul__(1.001))


def _hold_lock(path: str) -> subprocess.Popen:
    """Another process that holds the flock of ``path`` until killed."""
    code = "import fcntl,sys,time; f=open(sys.argv[1],'a'); fcntl.flock(f,fcntl.LOCK_EX); print(1,flush=True)"
    code += "; time.sleep(60)"
    process = subprocess.Popen([sys.executable, "-c", code, path], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "1"
    return process


def _no_space(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every atomic publish fails as on a full disk."""

    def full(tmp: Path, path: str | os.PathLike) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(atomic, "publish", full)
    monkeypatch.setattr(jkoflow.run, "publish", full)


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input: the command line (in the workspace; ``b`` is a copy of a
    finished run), what to prepare, the exit status and text in the one line."""

    id: str
    argv: list[str]
    status: int
    match: str
    setup: Callable[[], object] | None = None
    subprocess: bool = False
    creates: bool = False
    """The command fails after starting its run: new files are allowed, changed ones not."""


CONST = ("const.npy", lambda x: x.__setitem__((slice(None), 1), 3.0))
HUGE = ("huge.npy", lambda x: x.__imul__(1e39))
NAN = ("nan.npy", lambda x: x.__setitem__((5, 0), np.nan))
CFG = {"data": {"name": "checkerboard", "n_samples": 3000}}

CASES = [
    # --- train: the run directory -------------------------------------------------------
    Case(
        "overwrite-foreign-dir",
        ["train", *NEW[:2], "--out", "p", "--overwrite", *TINY],
        2,
        "p is not empty and was not made by jkoflow",
        lambda: (os.mkdir("p"), _write("p/config.json", "{}"), _write("p/notes.txt", "x")),
    ),
    Case("out-empty", ["train", *NEW[:2], "--out", "", "--overwrite", *TINY], 2, "--out is empty"),
    Case("out-dot", ["train", *NEW[:2], "--out", ".", "--overwrite", *TINY], 2, "is the current directory"),
    Case(
        "out-cwd-absolute",
        ["train", *NEW[:2], "--out", "../" + "WS", "--overwrite", *TINY],
        2,
        "is the current directory",
    ),
    Case(
        "out-is-a-file",
        ["train", *NEW[:2], "--out", "f.txt", *TINY],
        2,
        "exists and is not a directory",
        lambda: _write("f.txt", "x"),
    ),
    Case(
        "out-holds-run",
        ["train", *NEW[:2], "--out", "b", *TINY],
        2,
        "b already holds a run (jko); pass --overwrite to replace it, --resume to continue it",
    ),
    Case(
        "overwrite-then-bad-batch",
        ["train", *NEW[:2], "--out", "b", "--overwrite", *TINY, "--batch-size", "100000"],
        2,
        "has 2400 rows but batch_size is 100000",
    ),
    Case(
        "out-under-a-file",
        ["train", *NEW[:2], "--out", "f.txt/run", *TINY],
        1,
        "cannot access f.txt/run: Not a directory",
        lambda: _write("f.txt", "x"),
    ),
    # --- train: checks before anything is created ------------------------------------------
    Case("batch-above-rows", [*["train"], *NEW, "--batch-size", "100000"], 2, "batch_size is 100000"),
    Case(
        "overflow-float32",
        ["train", "--data", "huge.npy", "--out", "new", *TINY],
        2,
        "beyond the range of float32",
        lambda: _data(*HUGE),
    ),
    Case(
        "nan-in-data",
        ["train", "--data", "nan.npy", "--out", "new", *TINY],
        2,
        "NaN or infinite",
        lambda: _data(*NAN),
    ),
    Case(
        "constant-column-standardize",
        ["train", "--data", "const.npy", "--out", "new", *TINY, "--standardize"],
        2,
        "column 1 of the training data is constant",
        lambda: _data(*CONST),
    ),
    Case("seed-int64-max", ["train", *NEW, "--seed", "9223372036854775807"], 2, "seed must be an integer in"),
    Case("seed-negative", ["train", *NEW, "--seed", "-1"], 2, "seed must be an integer in"),
    Case("device-meta", ["train", *NEW, "--device", "meta"], 2, "device must be like"),
    Case("device-bogus", ["train", *NEW, "--device", "gpu0"], 2, "device must be like"),
    Case("device-cuda-missing", ["train", *NEW, "--device", "cuda:7"], 2, "cuda:7"),
    Case("lr-inf", ["train", *NEW, "--lr", "inf"], 2, "lr must be a finite number, got inf"),
    Case("lr-negative", ["train", *NEW, "--lr", "-1"], 2, "lr must be a positive number"),
    Case("lr-nan", ["train", *NEW, "--lr", "nan"], 2, "lr must be a finite number, got nan"),
    Case("h0-nan", ["train", *NEW, "--h0", "nan"], 2, "h0 must be a finite number"),
    Case(
        "max-seconds-inf", ["train", *NEW, "--max-seconds", "inf"], 2, "max_seconds must be a finite number"
    ),
    Case("data-missing-file", ["train", "--data", "missing.npy", "--out", "new", *TINY], 2, "missing.npy"),
    # --- train: --config content ------------------------------------------------------------
    Case(
        "config-data-null",
        ["train", "--config", "c.json", "--out", "new", *TINY],
        2,
        "the 'data' section must be a JSON object, got null",
        lambda: _write("c.json", {"data": None}),
    ),
    Case(
        "config-train-list",
        ["train", "--config", "c.json", "--out", "new", *TINY],
        2,
        "the 'train' section must be a JSON object, got []",
        lambda: _write("c.json", {**CFG, "train": []}),
    ),
    Case(
        "config-value-type",
        ["train", "--config", "c.json", "--out", "new", *TINY],
        2,
        "lr_final_factor must be a finite number, got 'x'",
        lambda: _write("c.json", {**CFG, "train": {"lr_final_factor": "x"}}),
    ),
    Case(
        "config-seed-float",
        ["train", "--config", "c.json", "--out", "new", *TINY],
        2,
        "seed must be an integer",
        lambda: _write("c.json", {"data": {"name": "moons", "seed": 1.5}}),
    ),
    Case(
        "config-not-object",
        ["train", "--config", "c.json", "--out", "new", *TINY],
        2,
        "must hold a JSON object",
        lambda: _write("c.json", [1, 2]),
    ),
    Case(
        "config-broken-json",
        ["train", "--config", "c.json", "--out", "new", *TINY],
        2,
        "cannot read c.json as JSON",
        lambda: _write("c.json", "{"),
    ),
    Case("config-missing", ["train", "--config", "nope.json", "--out", "new", *TINY], 2, "file not found"),
    # --- train --resume ---------------------------------------------------------------------------
    Case(
        "resume-fixed-option",
        ["train", "--resume", "b", "--width", "16", "--quiet"],
        2,
        "cannot change width",
    ),
    Case("resume-finished", ["train", "--resume", "b", "--quiet"], 2, "has finished with 1 blocks"),
    Case(
        "resume-with-seed",
        ["train", "--resume", "b", "--seed", "3"],
        2,
        "--seed cannot be used with --resume",
    ),
    Case(
        "resume-data-changed",
        ["train", "--resume", "r", "--max-blocks", "2", "--quiet"],
        2,
        "the train data differ from those r/trainer.pt was trained on",
        lambda: _train_then_edit_data("d.npy", "r"),
    ),
    Case(
        "resume-config-train-list",
        ["train", "--resume", "b", "--max-blocks", "2"],
        2,
        "JKOConfig settings must be a JSON object, got list",
        lambda: _write("b/config.json", {**json.loads(Path("b/config.json").read_text()), "train": []}),
    ),
    Case("resume-nothing", ["train", "--resume", "nothing"], 2, "file not found: nothing/config.json"),
    Case("resume-lr-inf", ["train", "--resume", "b", "--lr", "inf"], 2, "lr must be a finite number"),
    Case(
        "resume-trainer-missing-key",
        ["train", "--resume", "b", "--max-blocks", "2", "--quiet"],
        2,
        "training checkpoint b/trainer.pt is damaged (KeyError: 'state')",
        _edit_trainer(lambda p: p.pop("state")),
    ),
    Case(
        "resume-trainer-wrong-shape",
        ["train", "--resume", "b", "--max-blocks", "2", "--quiet"],
        2,
        "the flow in b/trainer.pt is damaged (RuntimeError: Error(s) in loading state_dict",
        _edit_trainer(
            lambda p: p["flow"]["state"].__setitem__(_first_weight(p["flow"]["state"]), torch.zeros(3, 3))
        ),
    ),
    Case(
        "resume-trainer-wrong-dtype",
        ["train", "--resume", "b", "--max-blocks", "2", "--quiet"],
        2,
        "is not a torch.float32 tensor",
        _edit_trainer(
            lambda p: p["flow"]["state"].__setitem__(
                _first_weight(p["flow"]["state"]),
                p["flow"]["state"][_first_weight(p["flow"]["state"])].long(),
            )
        ),
    ),
    Case(
        "resume-in-use",
        ["train", "--resume", "b", "--max-blocks", "2", "--quiet"],
        2,
        "b is in use by another jkoflow process",
        lambda: _hold_lock("b/" + LOCK),
    ),
    Case(
        "resume-in-use-subprocess",
        ["train", "--resume", "b", "--max-blocks", "2", "--quiet"],
        2,
        "b is in use by another jkoflow process",
        lambda: _hold_lock("b/" + LOCK),
        subprocess=True,
    ),
    Case(
        "overwrite-in-use",
        ["train", *NEW[:2], "--out", "b", "--overwrite", *TINY],
        2,
        "b is in use by another jkoflow process",
        lambda: _hold_lock("b/" + LOCK),
    ),
    # --- otflow -------------------------------------------------------------------------------------
    Case(
        "otflow-foreign-dir",
        ["otflow", *NEW_OT[:2], "--out", "p", "--overwrite", *SMALL_OT],
        2,
        "not made by jkoflow",
        lambda: (os.mkdir("p"), _write("p/notes.txt", "x")),
    ),
    Case("otflow-batch-above-rows", ["otflow", *NEW_OT, "--batch-size", "100000"], 2, "batch_size is 100000"),
    Case("otflow-lr-inf", ["otflow", *NEW_OT, "--lr", "inf"], 2, "lr must be a finite number"),
    Case("otflow-device-meta", ["otflow", *NEW_OT, "--device", "meta"], 2, "device must be like"),
    Case("otflow-alpha-c", ["otflow", *NEW_OT, "--alpha-c", "-1"], 2, "alpha_c must be a positive number"),
    Case("otflow-out-empty", ["otflow", *NEW_OT[:2], "--out", "", *SMALL_OT], 2, "--out is empty"),
    Case(
        "otflow-overflow",
        ["otflow", "--data", "huge.npy", "--out", "new", *SMALL_OT],
        2,
        "beyond the range",
        lambda: _data(*HUGE),
    ),
    Case(
        "otflow-divergence",
        ["otflow", *NEW_OT, "--lr", "10000"],
        1,
        "jkoflow: training failed: OT-Flow: the loss was not finite at step 1 after 3 retries",
        creates=True,
    ),
    # --- compare --------------------------------------------------------------------------------------
    Case(
        "compare-budget-zero",
        ["compare", *NEW[:4], *CMP, "--budget-batches", "0"],
        2,
        "--budget-batches must be",
    ),
    Case(
        "compare-batch-above-rows",
        ["compare", "--config", "c.json", "--out", "new", *CMP],
        2,
        "batch_size is 100000",
        lambda: _write("c.json", {**CFG, "train": {"batch_size": 100000}}),
    ),
    Case(
        "compare-constant-column",
        ["compare", "--config", "c.json", "--data", "const.npy", "--out", "new", *CMP],
        2,
        "is constant",
        lambda: (_data(*CONST), _write("c.json", {**CMP_CFG, "otflow": {"standardize": True}})),
    ),
    Case(
        "compare-out-holds-run",
        ["compare", *NEW[:2], "--out", "b", *CMP],
        2,
        "b already holds a run (jko); pass --overwrite to replace it",
    ),
    Case(
        "compare-out-foreign",
        ["compare", *NEW[:2], "--out", "p", "--overwrite", *CMP],
        2,
        "not made by jkoflow",
        lambda: (os.mkdir("p"), _write("p/compare.md", "mine")),
    ),
    Case("compare-out-dot", ["compare", *NEW[:2], "--out", ".", *CMP], 2, "is the current directory"),
    Case("compare-device-meta", ["compare", *NEW[:4], *CMP, "--device", "meta"], 2, "device must be like"),
    # --- eval ---------------------------------------------------------------------------------------------
    Case("eval-missing-dir", ["eval", "nothing"], 2, "run directory not found"),
    Case("eval-no-flow", ["eval", "b"], 2, "flow.pt is missing", lambda: os.remove("b/flow.pt")),
    Case("eval-steps-zero", ["eval", "b", "--eval-steps", "0"], 2, "--eval-steps must be a positive integer"),
    Case(
        "eval-wrong-dim",
        ["eval", "b", "--data", "gmm:d=3,k=2,seed=0", "--n-samples", "100"],
        2,
        "3 columns but the flow has dimension 2",
    ),
    Case(
        "eval-flow-missing-key",
        ["eval", "b"],
        2,
        "the flow in b/flow.pt is damaged (KeyError: 'shift')",
        lambda: _edit_flow("b/flow.pt", lambda p: p["state"].pop("shift")),
    ),
    Case(
        "eval-flow-wrong-shape",
        ["eval", "b"],
        2,
        "b/flow.pt is damaged (RuntimeError: Error(s) in loading state_dict for Flow: size mismatch",
        lambda: _edit_flow(
            "b/flow.pt", lambda p: p["state"].__setitem__(_first_weight(p["state"]), torch.zeros(5))
        ),
    ),
    Case(
        "eval-flow-wrong-dtype",
        ["eval", "b"],
        2,
        "is not a torch.float32 tensor",
        lambda: _edit_flow("b/flow.pt", lambda p: p["state"].__setitem__("scale", p["state"]["scale"].int())),
    ),
    Case(
        "eval-flow-bad-config",
        ["eval", "b"],
        2,
        "b/flow.pt is damaged",
        lambda: _edit_flow("b/flow.pt", lambda p: p.__setitem__("config", json.dumps({"dim": 2}))),
    ),
    Case(
        "eval-config-damaged",
        ["eval", "b"],
        2,
        "b/config.json is damaged: no 'data' section",
        lambda: _write("b/config.json", {"method": "jko", "data": None}),
    ),
    Case("eval-device-meta", ["eval", "b", "--device", "meta"], 2, "device must be like"),
    Case(
        "eval-seed-range", ["eval", "b", "--data", "moons", "--seed", "-4"], 2, "seed must be an integer in"
    ),
    Case(
        "eval-in-use",
        ["eval", "b"],
        2,
        "b is in use by another jkoflow process",
        lambda: _hold_lock("b/" + LOCK),
    ),
    # --- sample ------------------------------------------------------------------------------------------
    Case("sample-n-float", ["sample", "b", "-n", "1e12", "-o", "s.npy"], 2, "invalid int value: '1e12'"),
    Case("sample-n-huge", ["sample", "b", "-n", "1000000000000", "-o", "s.npy"], 2, "-n 1000000000000:"),
    Case("sample-n-zero", ["sample", "b", "-n", "0", "-o", "s.npy"], 2, "-n must be a positive integer"),
    Case(
        "sample-missing-dir",
        ["sample", "b", "-n", "5", "-o", "missing/s.npy"],
        2,
        "directory missing not found",
    ),
    Case(
        "sample-missing-dir-subprocess",
        ["sample", "b", "-n", "5", "-o", "missing/s.npy"],
        2,
        "directory missing not found",
        subprocess=True,
    ),
    Case("sample-not-npy", ["sample", "b", "-n", "5", "-o", "s.txt"], 2, "-o must name a .npy file"),
    Case("sample-seed-range", ["sample", "b", "-n", "5", "-o", "s.npy", "--seed", "-1"], 2, "seed must be"),
    Case("sample-no-run", ["sample", "nothing", "-n", "5", "-o", "s.npy"], 2, "run directory not found"),
    Case(
        "sample-damaged-flow",
        ["sample", "b", "-n", "5", "-o", "s.npy"],
        2,
        "is damaged",
        lambda: _edit_flow("b/flow.pt", lambda p: p.pop("state")),
    ),
    # --- plot ----------------------------------------------------------------------------------------------
    Case("plot-missing-dir", ["plot", "nothing"], 2, "run directory not found"),
    Case(
        "plot-broken-history",
        ["plot", "b"],
        2,
        "cannot read b/history.json as JSON",
        lambda: _write("b/history.json", "{"),
    ),
    Case(
        "plot-in-use",
        ["plot", "b"],
        2,
        "b is in use by another jkoflow process",
        lambda: _hold_lock("b/" + LOCK),
    ),
    Case(
        "plot-history-damaged",
        ["plot", "b"],
        2,
        "b/history.json is damaged: no 'stages' or 'validations' list",
        lambda: _write("b/history.json", {"stages": 3}),
    ),
    Case("plot-device-meta", ["plot", "b", "--device", "meta"], 2, "device must be like"),
]


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base: Path) -> Path:
    """The current directory of a row: ``WS/`` holding ``b``, a copy of a finished run."""
    ws = tmp_path / "WS"
    ws.mkdir()
    shutil.copytree(base, ws / "b")
    monkeypatch.chdir(ws)
    return ws


def _run(case: Case, capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    if not case.subprocess:
        capsys.readouterr()
        try:
            status = main(case.argv)
        except SystemExit as exit_:  # argparse refuses the command line
            status = exit_.code
        return status, capsys.readouterr().err.splitlines()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "jkoflow", *case.argv], capture_output=True, text=True, env=env
    )
    return done.returncode, done.stderr.splitlines()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_changes_nothing(case: Case, workspace: Path, capsys: pytest.CaptureFixture) -> None:
    if case.id == "device-cuda-missing" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    held = case.setup() if case.setup else None
    before = _snapshot(workspace)
    try:
        status, lines = _run(case, capsys)
    finally:
        if isinstance(held, subprocess.Popen):
            held.kill()
            held.wait()
    assert (status, len(lines)) == (case.status, 1), lines
    assert case.match in lines[0] and "Traceback" not in lines[0], lines[0]
    assert (lines[0].startswith("jkoflow") and ": error: " in lines[0]) or case.status == 1
    after = _snapshot(workspace)
    assert {path: after.get(path) for path in before} == before
    assert case.creates or after == before
    assert not [path for path in after if ".tmp" in path]


def test_table_covers_every_command() -> None:
    commands = {c.argv[0] for c in CASES}
    assert commands == {"train", "otflow", "compare", "eval", "sample", "plot"}
    assert len(CASES) + len(API_CASES) >= 40


# --- the Python API ------------------------------------------------------------------------------

SPLITS = tuple(np.random.default_rng(0).normal(size=(n, 2)) for n in (300, 50, 50))
SMALL = {"iters": 5, "batch_size": 64, "width": 8, "max_blocks": 1}

API_CASES = [
    ("jko-lr-inf", lambda: JKOConfig(lr=float("inf")), "lr must be a finite number"),
    ("jko-type", lambda: JKOConfig(lr_final_factor="x"), "lr_final_factor must be a finite number"),
    ("jko-seed", lambda: JKOConfig(seed=2**63 - 1), "seed must be an integer in"),
    ("jko-device", lambda: JKOConfig(device="meta"), "device must be like"),
    ("jko-bool", lambda: JKOConfig(warm_start=1), "warm_start must be true or false"),
    ("data-seed", lambda: DataConfig(seed=-1), "seed must be an integer in"),
    ("otflow-nan", lambda: OTFlowConfig(alpha_r=float("nan")), "alpha_r must be a finite number"),
    (
        "run-jko-out-empty",
        lambda: run_jko("", DataConfig(), JKOConfig(**SMALL), SPLITS, progress=False),
        "--out is empty",
    ),
    (
        "run-jko-batch",
        lambda: run_jko(
            "new", DataConfig(), JKOConfig(**{**SMALL, "batch_size": 400}), SPLITS, progress=False
        ),
        "batch_size is 400",
    ),
    (
        "run-otflow-foreign",
        lambda: run_otflow(
            "b",
            DataConfig(),
            OTFlowConfig(iters=5, batch_size=64, width=8),
            SPLITS,
            overwrite=True,
            progress=False,
        ),
        "was not made by jkoflow",
    ),
    ("flow-load-damaged", lambda: jkoflow.Flow.load("b/flow.pt"), "is damaged"),
]


@pytest.mark.parametrize("call,match", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_refuses_bad_input(
    call: Callable[[], object], match: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    os.mkdir("b")
    _write("b/notes.txt", "x")
    np.save("b/flow.pt", np.zeros(3))  # not a flow
    _edit_flow_payload = {"format": "jkoflow.flow", "version": 1, "config": "{}", "state": {}}
    torch.save(_edit_flow_payload, "b/flow.pt")
    before = _snapshot(tmp_path)
    with pytest.raises(InputError) as caught:
        call()
    assert match in str(caught.value) and "\n" not in str(caught.value)
    assert _snapshot(tmp_path) == before


# --- what a refused or repaired run leaves behind -----------------------------------------------


def test_resume_mid_block_with_fewer_blocks_is_refused(midblock: Path, capsys: pytest.CaptureFixture) -> None:
    before = _snapshot(midblock)
    assert main(["train", "--resume", str(midblock), "--max-blocks", "1", "--quiet"]) == 2
    line = capsys.readouterr().err.strip()
    tail = "stopped while training block 2; resume with --max-blocks 2 or more"
    assert line.endswith(tail + " (a half-trained block is not kept)")
    assert _snapshot(midblock) == before


def test_resume_writes_the_missing_final_files(
    workspace: Path, base: Path, capsys: pytest.CaptureFixture
) -> None:
    for name in ("flow.pt", "summary.json", "samples.png"):
        os.remove(f"b/{name}")
    trainer = _snapshot(workspace)["b/trainer.pt"]
    assert main(["train", "--resume", "b", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert _snapshot(workspace)["b/trainer.pt"] == trainer  # nothing trained
    summary, original = (json.loads(Path(p, "summary.json").read_text()) for p in ("b", base))
    assert summary["test_nll"] == original["test_nll"] and summary["n_batches"] == original["n_batches"] == 5
    x = torch.randn(50, 2)
    assert torch.equal(
        jkoflow.Flow.load("b/flow.pt").log_prob(x), jkoflow.Flow.load(base / "flow.pt").log_prob(x)
    )
    assert Path("b/samples.png").is_file()


def test_overwrite_removes_only_what_jkoflow_wrote(workspace: Path, capsys: pytest.CaptureFixture) -> None:
    _write("b/notes.txt", "mine")
    os.mkdir("b/mine")
    _write("b/mine/flow.pt", "mine too")
    _write("b/.flow.pt.left.tmp.pt", "a temporary file of a killed run")
    marker = json.loads(Path("b", MARKER).read_text())
    assert main(["train", "--data", "moons", "--out", "b", "--overwrite", *TINY]) == 0
    assert Path("b/notes.txt").read_text() == "mine" and Path("b/mine/flow.pt").read_text() == "mine too"
    assert not Path("b/.flow.pt.left.tmp.pt").exists()
    new = json.loads(Path("b", MARKER).read_text())
    assert (
        new["run_id"] != marker["run_id"]
        and json.loads(Path("b/config.json").read_text())["data"]["name"] == "moons"
    )
    assert set(os.listdir("b")) == {*new["files"], MARKER, "notes.txt", "mine"}


def test_full_disk_gives_one_line_and_leaves_no_temporary_file(
    workspace: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    np.save("s.npy", np.arange(3.0))
    before = _snapshot(workspace)
    _no_space(monkeypatch)
    assert main(["sample", "b", "-n", "5", "-o", "s.npy"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "jkoflow: error: cannot access s.npy: No space left on device"
    ]
    assert _snapshot(workspace) == before
    assert main(["train", "--data", "checkerboard", "--out", "new", *TINY]) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("jkoflow: error: cannot access new/") and line.endswith(
        ": No space left on device"
    )
    assert not [p for p in workspace.rglob("*") if ".tmp" in p.name]
    monkeypatch.undo()
    monkeypatch.chdir(workspace)
    assert main(["train", "--data", "checkerboard", "--out", "new", "--overwrite", *TINY]) == 0


def test_one_column_data_train_and_plot(workspace: Path, capsys: pytest.CaptureFixture) -> None:
    np.save("one.npy", np.random.default_rng(1).normal(size=(3000, 1)))
    assert main(["train", "--data", "one.npy", "--out", "one", *TINY]) == 0
    assert main(["plot", "one"]) == 0
    assert main(["sample", "one", "-n", "7", "-o", "one.npy"]) == 0
    assert np.load("one.npy").shape == (7, 1) and Path("one/w2_per_block.png").is_file()
    assert capsys.readouterr().err == ""


def test_lock_is_held_while_training_and_released(workspace: Path) -> None:
    with RunDir.open("b") as run:
        with pytest.raises(InputError, match="b is in use by another jkoflow process"):
            RunDir.open("b")
        run.claim("extra.txt")
    RunDir.open("b").release()
    assert "extra.txt" in json.loads(Path("b", MARKER).read_text())["files"]
