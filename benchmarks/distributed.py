"""Training throughput of one JKO block: 1 process vs N processes × 1 thread (gloo).

Every configuration trains the same block (same seed, same global batch) for
``--iters`` Adam steps and reports mini-batch samples per second of
optimisation time (the trainer's own per-step clock, which in a process group
is the slowest rank's). Runs alternate between configurations ``--repeats``
times; the table shows the median.

    PYTHONPATH=$PWD python benchmarks/distributed.py --processes 1 2 --iters 40
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import jkoflow
from jkoflow.distributed import launched


def _worker(rank: int, world: int, port: int, config: dict, n: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if world > 1:
        os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    x = jkoflow.datasets.load("checkerboard", n=n, seed=0)
    splits = jkoflow.datasets.split(x, 0.1, 0.1, seed=0)
    with launched("cpu") as group:
        _, history = jkoflow.train_jko(*splits, config=jkoflow.JKOConfig(**config))
        if group.is_main:
            Path(out).write_text(f"{history.n_batches} {history.train_seconds}")
        if world > 1:
            dist.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(processes: int, config: jkoflow.JKOConfig, n: int) -> float:
    """Samples per second of optimisation with ``processes`` ranks."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.txt")
        mp.spawn(_worker, args=(processes, _free_port(), config.to_dict(), n, out), nprocs=processes)
        batches, seconds = Path(out).read_text().split()
    return int(batches) * config.batch_for(n - 2 * round(0.1 * n)) / float(seconds)  # split 0.8/0.1/0.1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--n-samples", type=int, default=30_000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    config = jkoflow.JKOConfig(width=args.width, iters=args.iters, batch_size=args.batch_size, max_blocks=1)
    rates: dict[int, list[float]] = {p: [] for p in args.processes}
    for _ in range(args.repeats):
        for p in args.processes:
            rates[p].append(measure(p, config, args.n_samples))
    base = statistics.median(rates[args.processes[0]])
    print(
        f"JKO block training, width {args.width}, batch {args.batch_size}, {args.iters} steps, "
        "1 thread per process"
    )
    print(f"| processes | samples/s (median of {args.repeats}) | all runs | vs {args.processes[0]} process |")
    print("| --- | --- | --- | --- |")
    for p, values in rates.items():
        median = statistics.median(values)
        runs = ", ".join(f"{v:.0f}" for v in values)
        print(f"| {p} | {median:.0f} | {runs} | {median / base:.2f}× |")


if __name__ == "__main__":
    main()
