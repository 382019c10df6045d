"""Every script in examples/ runs to the end at tiny sizes (JKOFLOW_EXAMPLE_TINY=1),
so that a change which breaks an example fails the suite."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
NLL = re.compile(r"test NLL[ =:]*(-?\d+\.\d+)")

# What an example must print besides a test NLL (the same-numbers checks of save/load).
EXPECTED = {
    "quickstart.py": ["identical log_prob: True", "reloaded flow with 2 blocks"],
    "custom_block.py": ["2 ridge blocks", "mixed flow ['otflow', 'ridge']"],
}


def _run(path: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "JKOFLOW_EXAMPLE_TINY": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT
    )


def test_every_example_is_covered():
    assert {"quickstart.py", "custom_block.py", "incremental.py"} <= {p.name for p in EXAMPLES}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_tiny(path):
    result = _run(path)
    assert result.returncode == 0, result.stderr[-2000:]
    values = [float(v) for v in NLL.findall(result.stdout)]
    assert values, f"{path.name} printed no test NLL:\n{result.stdout}"
    # a 2-D toy density: a real NLL in nats is finite and of the order of its entropy (≈ 2.8-3.5)
    assert all(math.isfinite(v) and 0.5 < v < 10 for v in values), values
    for text in EXPECTED.get(path.name, []):
        assert text in result.stdout, f"{path.name}: {text!r} not in\n{result.stdout}"


def test_custom_block_reloads_to_the_same_nll():
    out = _run(ROOT / "examples" / "custom_block.py").stdout
    trained = re.search(r"ridge blocks, test NLL (\S+) nats", out).group(1)
    assert re.search(r"reloaded: test NLL (\S+) nats", out).group(1) == trained
