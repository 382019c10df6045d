r"""(f) Start-up time: how long a fresh Python process takes to ``import
jkoflow``, to load the whole public API, and to answer ``jkoflow -h``, against
``import torch`` and a bare interpreter.

Every command runs in a new subprocess (nothing cached in the interpreter),
round-robin across the commands so that they all see the same machine load,
and the table gives the median over ``repeats`` rounds. The subprocesses get
this checkout first on ``PYTHONPATH``, so the code measured is this tree's.
The targets (see ``docs/benchmarks.md``): ``jkoflow -h`` under 0.5 s, and
``import jkoflow`` at most 0.3 s more than ``import torch``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .common import Column, Table

__all__ = ["COMMANDS", "SIZES", "run"]

SIZES = {"full": {"repeats": 9}, "quick": {"repeats": 5}, "smoke": {"repeats": 1}}

COMMANDS = {
    "python -c pass": ["-c", "pass"],
    "import torch": ["-c", "import torch"],
    "import jkoflow": ["-c", "import jkoflow"],
    "jkoflow public API": [
        "-c",
        "import jkoflow; from jkoflow import Flow, JKOConfig, train_jko, train_otflow, metrics, plots",
    ],
    "jkoflow -h": ["-m", "jkoflow", "-h"],
}
"""Row label -> the interpreter's arguments."""

COLUMNS = [
    Column("command", "command"),
    Column("median_s", "median s", ".3f"),
    Column("min_s", "min s", ".3f"),
    Column("over_torch_s", "− import torch (s)", "+.3f"),
]


def _seconds(args: list[str], env: dict[str, str]) -> float:
    """Wall-clock seconds of one fresh ``python args...`` (which must exit 0)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def run(repeats: int = 9) -> Table:
    """Times every command of :data:`COMMANDS` ``repeats`` times, round-robin."""
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(max(1, repeats)):
        for name, args in COMMANDS.items():
            times[name].append(_seconds(args, env))
    torch_s = statistics.median(times["import torch"])
    rows = [
        {
            "command": name,
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "over_torch_s": statistics.median(ts) - torch_s,
            "runs": " ".join(f"{t:.3f}" for t in ts),
        }
        for name, ts in times.items()
    ]
    table = Table("startup", f"(f) start-up time, fresh processes, median of {repeats}", COLUMNS, rows)
    table.notes = ["Targets: `jkoflow -h` < 0.5 s; `import jkoflow` ≤ `import torch` + 0.3 s."]
    return table


if __name__ == "__main__":
    print(run(**SIZES["full"]).markdown())
