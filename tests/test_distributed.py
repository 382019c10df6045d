"""Data-parallel training (2 CPU processes on gloo) against one process, and the
cached-sample placement policy."""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import jkoflow
import jkoflow.distributed
import jkoflow.scheduler
from jkoflow import DataConfig, JKOConfig, train_jko
from jkoflow.cache import cache_bytes, choose_cache_device
from jkoflow.checkpoint import load_state
from jkoflow.distributed import Group, launched
from jkoflow.run import load_data, run_jko

ROOT = Path(__file__).resolve().parents[1]

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with gloo is unavailable",
)

CONFIG = JKOConfig(
    width=8,
    iters=6,
    batch_size=63,  # odd: the two ranks take 31 and 32 rows
    train_steps=2,
    eval_steps=2,
    max_blocks=2,
    ter_eps=1e-9,
    refine=(2,),
    stage_iters=3,
    finetune_iters=5,
    checkpoint_every=4,
    chunk_size=200,  # several gather rounds per push of the training rows
    dtype="float64",
)  # 2 blocks × 6 steps, refine 4 × 3, fine-tuning 5: 29 steps


class _Stop(Exception):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stopper(stop_at: int, ctrl_c_at: int = 0):
    """A callback that raises _Stop at the ``stop_at``-th step and presses Ctrl-C
    (SIGINT to this process) at the ``ctrl_c_at``-th (never for 0)."""
    steps = []

    def callback(record):
        steps.append(record)
        if len(steps) == stop_at:
            raise _Stop
        if len(steps) == ctrl_c_at:
            os.kill(os.getpid(), signal.SIGINT)

    return callback


def _faulty(real, faults: dict[int, str]):
    """``real`` (jko_loss) with a NaN loss or NaN gradient at the calls in ``faults``."""
    calls = []

    def loss(block, x, *args, **kwargs):
        terms = real(block, x, *args, **kwargs)
        calls.append(1)
        kind = faults.get(len(calls))
        if kind == "loss":
            return terms._replace(loss=terms.loss * float("nan"))
        if kind == "gradient":
            p = next(block.parameters())
            return terms._replace(loss=terms.loss + 0 * torch.sqrt(p - p).sum())
        return terms

    return loss


def _worker(rank: int, world: int, port: int, data: tuple, jobs: list[dict]):
    """One rank: runs the ``jobs`` in order in one process group. A training job
    (``config``, ``out``, optional ``stop_at``, ``resume``) saves this rank's
    history and flow to out/rank{rank}.pt; a ``run_jko`` job records in
    out/rank{rank}.txt the InputError that run_jko raised."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    jkoflow.distributed.join("gloo", rank, world, timeout=datetime.timedelta(seconds=120))
    try:
        _jobs(rank, world, data, jobs)
    finally:
        jkoflow.distributed.leave()
    (Path(jobs[0]["out"]).parent / f"threads{rank}.txt").write_text(str(_gloo_threads()))


def _gloo_threads() -> int:
    """This process's gloo threads (their names in /proc; -1 without /proc)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return -1
    return sum("gloo" in (task / "comm").read_text() for task in tasks.iterdir())


def _jobs(rank: int, world: int, data: tuple, jobs: list[dict]) -> None:
    """The jobs of :func:`_worker` on this rank, in the group it joined."""
    with launched("cpu") as group:  # the group made by the worker
        assert group.size == world and group.rank == rank
        for job in jobs:
            out, config = Path(job["out"]), JKOConfig(**job["config"])
            if job.get("run_jko"):
                try:
                    run_jko(out, DataConfig("8gaussians"), config, data, progress=False)
                except jkoflow.InputError as error:
                    (out / f"rank{rank}.txt").write_text(str(error))
                continue
            real = jkoflow.distributed.jko_loss
            if rank in job.get("faults_on", ()):
                jkoflow.distributed.jko_loss = _faulty(real, FAULTS)
            callback = _stopper(job.get("stop_at", 0), job.get("ctrl_c_at", {}).get(rank, 0))
            try:
                flow, history = train_jko(
                    *data,
                    config=config,
                    checkpoint=out / "trainer.pt",
                    resume=job.get("resume", False),
                    callback=callback,
                )
            except (_Stop, KeyboardInterrupt):
                continue
            finally:
                jkoflow.distributed.jko_loss = real
            torch.save({"flow": flow.state_dict(), "history": history.to_dict()}, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def data():
    x = jkoflow.datasets.load("8gaussians", n=3000, seed=0)
    return jkoflow.datasets.split(x, 0.1, 0.1, seed=0)


@pytest.fixture(scope="module")
def single(data):
    """The one-process run with the same seed and global batch."""
    flow, history = train_jko(*data, config=CONFIG)
    return [r["loss"] for r in history.iterations], flow.state_dict(), history


BUDGET = dataclasses.replace(CONFIG, iters=10_000, max_seconds=0.3, refine=())
FAULTS = {8: "gradient", 9: "loss"}  # block 2: step 1, then step 0 (after the rollback to step 0) fail
FAULTY = dataclasses.replace(CONFIG, refine=(), checkpoint_every=5)
HUTCHINSON = dataclasses.replace(CONFIG, block="mlp", block_options={"mlp": {"hutchinson": True}}, refine=())


@pytest.fixture(scope="module")
def two(data, tmp_path_factory):
    """The jobs of the tests below, run by 2 processes on gloo (one start-up)."""
    root = tmp_path_factory.mktemp("two")
    for name in ("full", "resumed", "killed", "killed-ft", "ctrl-c", "budget", "taken", "mlp", "faults"):
        (root / name).mkdir()
    (root / "taken" / "config.json").write_text("{}")  # a run directory rank 0 refuses
    jobs = [
        {"config": CONFIG.to_dict(), "out": str(root / "full")},
        {"config": CONFIG.to_dict(), "out": str(root / "resumed"), "stop_at": 15},  # checkpoint at step 12
        {"config": CONFIG.to_dict(), "out": str(root / "resumed"), "resume": True},
        {"config": CONFIG.to_dict(), "out": str(root / "killed"), "stop_at": 15},  # resumed by one process
        {
            "config": CONFIG.to_dict(),
            "out": str(root / "killed-ft"),
            "stop_at": 29,
        },  # in the fine-tuning, after its checkpoint at step 4
        {"config": CONFIG.to_dict(), "out": str(root / "ctrl-c"), "ctrl_c_at": {1: 9}},  # on rank 1 only
        {"config": BUDGET.to_dict(), "out": str(root / "budget")},
        {"config": FAULTY.to_dict(), "out": str(root / "faults"), "faults_on": [1]},  # rank 1 only
        {"config": HUTCHINSON.to_dict(), "out": str(root / "mlp")},
        {"config": CONFIG.to_dict(), "out": str(root / "taken"), "run_jko": True},
    ]
    mp.spawn(_worker, args=(2, _free_port(), data, jobs), nprocs=2, join=True)
    return root


def _ranks(out: Path) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _assert_same_run(ranks: list[dict], single) -> None:
    losses, state, history = single
    assert len(losses) == 29
    for got in ranks:  # every rank took the same steps and holds the same flow
        assert [r["loss"] for r in got["history"]["iterations"]] == pytest.approx(losses, rel=1e-9, abs=0)
        assert got["flow"].keys() == state.keys()
        for key in state:
            torch.testing.assert_close(got["flow"][key], state[key], rtol=1e-8, atol=1e-10)
        final = got["history"]["stages"][-1]
        assert final["test_nll"] == pytest.approx(history.stages[-1]["test_nll"], rel=1e-9)
        assert [b["movement"] for b in final["blocks"]] == pytest.approx(
            [b.movement for b in history.blocks], rel=1e-8
        )


@needs_gloo
def test_leaving_the_group_ends_its_gloo_threads(two):
    """Nothing keeps the group alive after leave(): its worker threads end,
    and none is left to release a collective's tensors while the interpreter
    exits (an abort)."""
    counts = [int((two / f"threads{r}.txt").read_text()) for r in range(2)]
    if counts == [-1, -1]:
        pytest.skip("no /proc to count threads in")
    assert counts == [0, 0]


@needs_gloo
def test_two_processes_match_one(two, single):
    _assert_same_run(_ranks(two / "full"), single)


@needs_gloo
def test_two_processes_resume_to_the_same_result(two, single):
    _assert_same_run(_ranks(two / "resumed"), single)


@needs_gloo
def test_one_process_resumes_a_two_process_run(two, single, data):
    flow, history = train_jko(*data, checkpoint=two / "killed" / "trainer.pt", resume=True)
    _assert_same_run([{"flow": flow.state_dict(), "history": history.to_dict()}], single)


@needs_gloo
def test_one_process_resumes_a_two_process_run_stopped_in_its_fine_tuning(two, single, data):
    state = load_state(two / "killed-ft" / "trainer.pt")
    stage = state.history["stages"][-1]  # the checkpoint after fine-tuning step 4
    assert stage["kind"] == "finetune" and not stage["complete"] and state.block.iter == 4
    flow, history = train_jko(*data, checkpoint=two / "killed-ft" / "trainer.pt", resume=True)
    _assert_same_run([{"flow": flow.state_dict(), "history": history.to_dict()}], single)


@needs_gloo
def test_ctrl_c_on_one_rank_stops_all_at_the_same_step(two, single, data):
    state = load_state(two / "ctrl-c" / "trainer.pt")  # written by rank 0 after rank 1's Ctrl-C
    assert len(state.history["iterations"]) == 10  # pressed after step 9's vote: both stop after step 10
    flow, history = train_jko(*data, checkpoint=two / "ctrl-c" / "trainer.pt", resume=True)
    _assert_same_run([{"flow": flow.state_dict(), "history": history.to_dict()}], single)


@needs_gloo
def test_non_finite_steps_on_one_rank_roll_back_all_like_one_process(two, data, monkeypatch):
    monkeypatch.setattr(jkoflow.scheduler, "jko_loss", _faulty(jkoflow.scheduler.jko_loss, FAULTS))
    with pytest.warns(RuntimeWarning, match="rolled back to step 0"):
        _, one = train_jko(*data, config=FAULTY)
    faults = [(f["block"], f["iter"], f["resumed_at"], f["fault"]) for f in one.faults]
    assert faults == [(1, 1, 0, "gradient"), (1, 0, 0, "loss")]
    for got in _ranks(two / "faults"):
        assert got["history"]["faults"] == one.faults
        losses = [r["loss"] for r in got["history"]["iterations"]]
        assert losses == pytest.approx([r["loss"] for r in one.iterations], rel=1e-9, abs=0)


@needs_gloo
def test_stochastic_divergence_trains_with_rank_wise_noise(two, data):
    a, b = (r["history"] for r in _ranks(two / "mlp"))
    losses = [r["loss"] for r in a["iterations"]]
    assert len(losses) == 17 and all(map(math.isfinite, losses))
    assert losses == [r["loss"] for r in b["iterations"]]  # the all-reduced loss, equal on both ranks
    one = train_jko(*data, config=HUTCHINSON)[1]  # other noise, the same distribution
    assert a["stages"][-1]["test_nll"] == pytest.approx(one.stages[-1]["test_nll"], abs=0.2)


@needs_gloo
def test_ranks_agree_on_the_time_budget(two):
    a, b = (r["history"] for r in _ranks(two / "budget"))
    assert a["stopped_by"] == b["stopped_by"] == "budget"
    assert 0 < len(a["iterations"]) < 2 * 10_000
    assert [r["loss"] for r in a["iterations"]] == [r["loss"] for r in b["iterations"]]
    assert [r["seconds"] for r in a["iterations"]] == [r["seconds"] for r in b["iterations"]]


@needs_gloo
def test_all_ranks_stop_when_rank_0_cannot_start_the_run(two):
    assert "was not made by jkoflow" in (two / "taken" / "rank0.txt").read_text()
    assert "rank 0 could not start the run" in (two / "taken" / "rank1.txt").read_text()


def _cli(args: list[str], launcher: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *launcher, "-m", "jkoflow", "train", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


RUN_FILES = {
    "config.json",
    "flow.pt",
    "flow-initial.pt",
    "history.json",
    "log.csv",
    "summary.json",
    "trainer.pt",
}
RUN_FILES |= {"w2_per_block.png", "h_per_block.png", "samples.png", ".jkoflow-run.json", ".jkoflow.lock"}
RUN_FILES |= {"blocks_pushforward.png", "trajectories.png", "density.png"}  # jkoflow.figures


@needs_gloo
def test_torchrun_cli_writes_only_rank_0s_run(tmp_path):
    args = [
        "--data",
        "8gaussians",
        "--n-samples",
        "1500",
        "--width",
        "8",
        "--iters",
        "4",
        "--batch-size",
        "63",
    ]
    args += ["--max-blocks", "1", "--train-steps", "2", "--eval-steps", "2", "--dtype", "float64", "--quiet"]
    port = str(_free_port())
    torchrun = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port]
    two = _cli([*args, "--out", str(tmp_path / "two")], torchrun)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("test NLL") == 1  # one report, from rank 0
    assert {p.name for p in (tmp_path / "two").iterdir()} == RUN_FILES
    manifest = json.loads((tmp_path / "two" / ".jkoflow-run.json").read_text())["files"]
    assert {*manifest, ".jkoflow-run.json"} == RUN_FILES  # rank 0 entered every file it wrote
    log = (tmp_path / "two" / "log.csv").read_text().splitlines()
    assert len(log) == 1 + 4 and log[0].startswith("stage,")  # one header, each step once
    data_config = DataConfig("8gaussians", n_samples=1500)
    config = JKOConfig(
        width=8, iters=4, batch_size=63, max_blocks=1, train_steps=2, eval_steps=2, dtype="float64"
    )
    _, history = train_jko(*load_data(data_config), config=config)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["test_nll"] == pytest.approx(history.selected.test_nll, rel=1e-9)
    assert summary["selected"]["stage"] == history.selected.stage
    two_history = json.loads((tmp_path / "two" / "history.json").read_text())
    assert two_history["stages"][0]["blocks"][0]["test_nll"] == pytest.approx(
        history.blocks[-1]["test_nll"], rel=1e-9
    )
    assert summary["n_batches"] == 4


def test_shards_cover_the_rows_in_order():
    for n in (0, 1, 5, 64):
        bounds = [Group(rank=r, size=3).shard(n) for r in range(3)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    single = Group()
    x = torch.arange(6.0).reshape(3, 2)
    assert single.gather_rows(x, 3, 2) is x and single.sum(x) is x and not single.enabled
    assert single.agree(1.5, True) == (1.5, True)
    assert Group(rank=1, size=2, local_rank=1).device("cuda") == torch.device("cuda", 1)
    assert Group().device("cuda") == torch.device("cuda")


def test_cache_policy():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    need = cache_bytes(10_000, 2, torch.float64)
    assert need == 2 * 10_000 * 3 * 8
    assert choose_cache_device("auto", cpu, need) == cpu  # the CPU is its own host
    assert choose_cache_device("auto", cuda, need, free=2 * need) == cuda  # fits in half the free memory
    assert choose_cache_device("auto", cuda, need, free=2 * need - 1) == cpu
    assert choose_cache_device("host", cuda, need, free=10 * need) == cpu
    assert choose_cache_device("device", cuda, need, free=0) == cuda
    with pytest.raises(jkoflow.InputError, match="cache_device must be one of"):
        JKOConfig(cache_device="disk")


def test_host_cache_gives_the_same_numbers(data):
    config = dataclasses.replace(CONFIG, refine=(), dtype="float32", chunk_size=128)
    flow_a, history_a = train_jko(*data, config=dataclasses.replace(config, cache_device="device"))
    flow_b, history_b = train_jko(*data, config=dataclasses.replace(config, cache_device="host"))
    assert [r["loss"] for r in history_a.iterations] == [r["loss"] for r in history_b.iterations]
    timeless = [
        [{k: v for k, v in b.to_dict().items() if k != "seconds"} for b in h.blocks]
        for h in (history_a, history_b)
    ]
    assert timeless[0] == timeless[1]
    for key, value in flow_a.state_dict().items():
        assert torch.equal(value, flow_b.state_dict()[key])
