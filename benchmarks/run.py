"""The benchmark suite's command line: ``python -m benchmarks`` (or ``python benchmarks/run.py``).

Runs the chosen benchmarks at one size preset, prints each table as markdown
and writes ``<name>.csv``, ``<name>.md`` and ``results.md`` (every table, with
the machine, torch version, thread count and load average) to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import compiled, memory, nll, peers, startup, step, trace
from benchmarks.common import Table

__all__ = ["DEFAULT", "NAMES", "main"]

NAMES = ("trace", "step", "memory", "nll", "compile", "startup", "peers")
DEFAULT = (
    "trace",
    "step",
    "memory",
    "startup",
)  # nll (~30 min), compile (~1 min each) and peers (~30 min per seed): opt in with --only


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="jkoflow performance suite: (a) trace cost, (b) training step, (c) memory per block, "
        "(d) time to NLL, (e) torch.compile, (f) start-up time, (g) peers side by side.",
    )
    parser.add_argument(
        "--only",
        default=",".join(DEFAULT),
        help=f"comma-separated subset of {','.join(NAMES)} (default %(default)s)",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", const="quick", dest="size", help="~1 minute smoke run")
    size.add_argument(
        "--size",
        choices=("full", "quick", "smoke"),
        help="size preset (default full; smoke: tiny, for tests)",
    )
    parser.add_argument("--out", default="runs/benchmarks", help="output directory (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default %(default)s)")
    parser.add_argument(
        "--nll-batches",
        type=int,
        default=None,
        help="mini-batch budget of each method in (d); 0: the trainers' defaults (~30 min)",
    )
    group = parser.add_argument_group("peers", "options of the peers benchmark (--only peers)")
    group.add_argument("--data", default="checkerboard", help="data name or spec (default %(default)s)")
    group.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="training-time budget of each method in seconds (default: 240; quick 30, smoke 2)",
    )
    group.add_argument(
        "--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2,3 (default %(default)s)"
    )
    group.add_argument(
        "--methods",
        default=",".join(peers.METHODS),
        help="comma-separated subset of %(default)s",
    )
    return parser


def _peers_options(args: argparse.Namespace) -> tuple[dict[str, Any] | None, str | None]:
    """The keyword arguments of :func:`peers.run` from the command line, or the error line."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        return None, f"--seeds takes comma-separated non-negative integers, got {args.seeds!r}"
    if not seeds or min(seeds) < 0:
        return None, f"--seeds takes comma-separated non-negative integers, got {args.seeds!r}"
    if args.seconds is not None and not args.seconds > 0:
        return None, f"--seconds must be > 0, got {args.seconds!r}"
    problem = peers.check_methods(methods)
    if problem is not None:
        return None, problem
    options = dict(peers.SIZES[args.size])
    if args.seconds is not None:
        options["seconds"] = args.seconds
    return {**options, "data": args.data, "seeds": seeds, "methods": methods}, None


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({capability})"


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.size = args.size or "full"
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in NAMES]
    if unknown or not names:
        print(
            f"benchmarks: error: --only takes names from {','.join(NAMES)}, got {args.only!r}",
            file=sys.stderr,
        )
        return 2
    if args.threads < 1 or (args.nll_batches is not None and args.nll_batches < 0):
        print("benchmarks: error: --threads must be ≥ 1 and --nll-batches ≥ 0", file=sys.stderr)
        return 2
    peer_options = None
    if "peers" in names:
        peer_options, problem = _peers_options(args)
        if problem is not None:
            print(f"benchmarks: error: {problem}", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    header = (
        f"Machine: {_machine()}; {args.threads} torch thread(s); size preset {args.size}; "
        f"load average at start {_load()}"
    )
    print(header, flush=True)
    tables: list[Table] = []
    start = time.perf_counter()
    for name in names:
        tick = time.perf_counter()
        if name == "nll":
            sizes = dict(nll.SIZES[args.size])
            if args.nll_batches is not None:
                sizes["budget_batches"] = args.nll_batches
            table = nll.run(out, **sizes)
        elif name == "peers":
            table = peers.run(out, **peer_options)
        else:
            module = {
                "trace": trace,
                "step": step,
                "memory": memory,
                "compile": compiled,
                "startup": startup,
            }[name]
            table = module.run(**module.SIZES[args.size])
        table.notes.append(f"({time.perf_counter() - tick:.0f} s, load average after: {_load()})")
        table.write(out)
        tables.append(table)
        print("\n" + table.markdown(), flush=True)
    footer = f"Total {time.perf_counter() - start:.0f} s; load average at end {_load()}."
    report = "\n".join([header, "", *(t.markdown() for t in tables), footer])
    (out / "results.md").write_text(report + "\n")
    print(footer + f"\nwrote {out}/results.md and one .csv/.md per table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
