"""Peak memory of training and evaluating on large data sets (issue: chunked pushes).

Runs ``jkoflow train`` and ``jkoflow eval`` in fresh subprocesses on
(a) 10^6 checkerboard points (d = 2) and (b) 10^5 points of a correlated
Gaussian in d = 43, and prints each child's peak resident memory (ru_maxrss)
and wall-clock. Few Adam steps: the point is memory, not quality.

    python benchmarks/large_data.py [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

COMMON = ["--iters", "50", "--max-blocks", "2", "--ter-eps", "1e-9", "--quiet", "--threads", "1"]


def _run(args: list[str]) -> tuple[float, float]:
    """Runs ``python -m jkoflow ARGS`` in a child; returns (peak RSS in GiB, seconds)."""
    script = (
        "import resource, subprocess, sys;"
        "subprocess.run(sys.argv[1:], check=True);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", script, sys.executable, "-m", "jkoflow", *args],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    peak_kib = int(out.stdout.strip().splitlines()[-1])
    return peak_kib / 2**20, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for the runs (default: a temporary one)")
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="jkoflow-large-"))
    root.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(0)
    d = 43
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    np.save(root / "gauss43.npy", (rng.normal(size=(100_000, d)) @ mixing).astype(np.float32))

    cases = [
        ("checkerboard, 10^6 × 2", ["--data", "checkerboard", "--n-samples", "1000000"]),
        ("gaussian, 10^5 × 43", ["--data", str(root / "gauss43.npy")]),
    ]
    print(f"{'data':<24} {'step':<6} {'peak RSS (GiB)':>15} {'seconds':>9}")
    for i, (name, data) in enumerate(cases):
        run = root / f"run{i}"
        for step, argv in (
            ("train", ["train", *data, "--out", str(run), "--overwrite", *COMMON]),
            ("eval", ["eval", str(run), "--threads", "1"]),
        ):
            peak, seconds = _run(argv)
            print(f"{name:<24} {step:<6} {peak:>15.2f} {seconds:>9.0f}")


if __name__ == "__main__":
    main()
