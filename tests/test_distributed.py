"""Data-parallel training (2 CPU processes on gloo) against one process, and the
cached-sample placement policy."""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import jkoflow
from jkoflow import JKOConfig, train_jko
from jkoflow.cache import cache_bytes, choose_cache_device
from jkoflow.distributed import Group, launched

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
    checkpoint_every=4,
    chunk_size=100,  # several gather rounds per push
    dtype="float64",
)  # 2 blocks × 6 steps, refine 4 × 3: 24 steps


class _Stop(Exception):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, world: int, port: int, config: dict, data: tuple, out: str, stop_at: int, resume: bool
):
    """One rank: trains with ``config`` and saves its losses and flow to out/rank{rank}.pt."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    losses = []

    def callback(record):
        losses.append(record["loss"])
        if len(losses) == stop_at:
            raise _Stop

    with launched("cpu") as group:  # joins the group made above, leaves it at the end
        assert group.size == world and group.rank == rank
        try:
            flow, history = train_jko(
                *data,
                config=JKOConfig(**config),
                checkpoint=Path(out) / "trainer.pt",
                resume=resume,
                callback=callback,
            )
        except _Stop:
            return
    torch.save(
        {"losses": losses, "flow": flow.state_dict(), "history": history.to_dict()}, f"{out}/rank{rank}.pt"
    )


def _spawn(tmp: Path, config: JKOConfig, data: tuple, stop_at: int = 0, resume: bool = False) -> list[dict]:
    args = (2, _free_port(), config.to_dict(), data, str(tmp), stop_at, resume)
    mp.spawn(_worker, args=args, nprocs=2, join=True)
    if stop_at:
        return []
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def data():
    x = jkoflow.datasets.load("8gaussians", n=3000, seed=0)
    return jkoflow.datasets.split(x, 0.1, 0.1, seed=0)


@pytest.fixture(scope="module")
def single(data):
    """The one-process run with the same seed and global batch."""
    flow, history = train_jko(*data, config=CONFIG)
    return [r["loss"] for r in history.iterations], flow.state_dict(), history


def _assert_same_run(ranks: list[dict], single) -> None:
    losses, state, history = single
    assert len(losses) == 24
    for got in ranks:  # every rank took the same steps and holds the same flow
        assert [r["loss"] for r in got["history"]["iterations"]] == pytest.approx(losses, rel=1e-9, abs=0)
        assert got["flow"].keys() == state.keys()
        for key in state:
            torch.testing.assert_close(got["flow"][key], state[key], rtol=1e-8, atol=1e-10)
        final = got["history"]["stages"][-1]
        assert final["test_nll"] == pytest.approx(history.stages[-1]["test_nll"], rel=1e-9)
        assert [b["w2"] for b in final["blocks"]] == pytest.approx(
            [b["w2"] for b in history.blocks], rel=1e-8
        )


@needs_gloo
def test_two_processes_match_one(data, single, tmp_path):
    _assert_same_run(_spawn(tmp_path, CONFIG, data), single)


@needs_gloo
def test_two_processes_resume_to_the_same_result(data, single, tmp_path):
    _spawn(tmp_path, CONFIG, data, stop_at=15)  # killed after step 15, checkpoint at step 12
    assert (tmp_path / "trainer.pt").is_file()
    _assert_same_run(_spawn(tmp_path, CONFIG, data, resume=True), single)


@needs_gloo
def test_ranks_agree_on_the_time_budget(data, tmp_path):
    config = dataclasses.replace(CONFIG, iters=10_000, max_seconds=0.3, refine=())
    ranks = _spawn(tmp_path, config, data)
    a, b = (r["history"] for r in ranks)
    assert a["stopped_by"] == b["stopped_by"] == "budget"
    assert 0 < len(a["iterations"]) < 2 * 10_000
    assert [r["loss"] for r in a["iterations"]] == [r["loss"] for r in b["iterations"]]
    assert [r["seconds"] for r in a["iterations"]] == [r["seconds"] for r in b["iterations"]]


def _cli(args: list[str], launcher: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *launcher, "-m", "jkoflow", "train", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


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
    one = _cli([*args, "--out", str(tmp_path / "one")], [])
    assert one.returncode == 0, one.stderr
    port = str(_free_port())
    torchrun = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port]
    two = _cli([*args, "--out", str(tmp_path / "two")], torchrun)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("test NLL") == 1  # one report, from rank 0
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )
    log = (tmp_path / "two" / "log.csv").read_text().splitlines()
    assert len(log) == 1 + 4 and log[0].startswith("stage,")  # one header, each step once
    s1, s2 = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("one", "two"))
    assert s2["test_nll"] == pytest.approx(s1["test_nll"], rel=1e-9)
    assert s2["n_batches"] == s1["n_batches"] == 4
    again = _cli([*args, "--out", str(tmp_path / "two")], torchrun)  # rank 0 refuses: all ranks stop
    assert again.returncode != 0
    assert again.stderr.count("already holds a run") == 1


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
        [{k: v for k, v in b.items() if k != "seconds"} for b in h.blocks] for h in (history_a, history_b)
    ]
    assert timeless[0] == timeless[1]
    for key, value in flow_a.state_dict().items():
        assert torch.equal(value, flow_b.state_dict()[key])
