"""The benchmark suite's smoke path (tiny sizes), so that it cannot rot, and its measuring tools."""

import csv
import time

import torch

from benchmarks import run
from benchmarks.common import interleaved_medians
from benchmarks.memory import peak_allocated


def _rows(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_suite_smoke_run(tmp_path, capsys):
    threads = str(torch.get_num_threads())
    argv = [
        "--size",
        "smoke",
        "--only",
        "trace,step,memory,nll,startup",
        "--out",
        str(tmp_path),
        "--threads",
        threads,
    ]
    assert run.main(argv) == 0
    printed = capsys.readouterr().out
    for name in ("trace", "step", "memory", "nll", "startup"):
        assert (tmp_path / f"{name}.md").read_text() in (tmp_path / "results.md").read_text()
        assert f"{name}.csv" in {p.name for p in tmp_path.iterdir()}
    assert "(a) velocity + divergence" in printed and "(d) time to NLL" in printed

    trace = _rows(tmp_path / "trace.csv")
    assert {(r["d"], r["m"], r["pass"]) for r in trace} == {
        (d, "8", p) for d in ("2", "3") for p in ("fwd", "fwd+bwd")
    }
    for r in trace:  # the closed form agrees with autograd; timings and rates are positive
        assert float(r["closed_vs_autograd"]) < 1e-5
        assert float(r["closed_us"]) > 0 and float(r["gemm_gflops"]) > 0 and float(r["autograd_ratio"]) > 0
        assert 0 < float(r["hutch_rel_err"]) < 10

    step = _rows(tmp_path / "step.csv")
    assert [r["method"] for r in step] == ["JKO block", "OT-Flow"]
    assert float(step[0]["ratio"]) == 1.0 and float(step[1]["ms_per_step"]) > 0

    memory = _rows(tmp_path / "memory.csv")
    assert [r["block"] for r in memory] == ["1", "2"]
    assert float(memory[0]["peak_bytes"]) > 0
    assert abs(float(memory[1]["of_block_1"]) - 1.0) < 0.1  # block 2 trains on cached samples

    nll = _rows(tmp_path / "nll.csv")
    assert [r["method"] for r in nll] == ["jkoflow", "OT-Flow"]
    assert all(float(r["n_batches"]) == 4 for r in nll)

    startup = {r["command"]: r for r in _rows(tmp_path / "startup.csv")}
    assert set(startup) == {
        "python -c pass",
        "import torch",
        "import jkoflow",
        "jkoflow public API",
        "jkoflow -h",
    }
    assert all(float(r["median_s"]) > 0 for r in startup.values())  # every command ran and exited 0
    assert float(startup["import torch"]["over_torch_s"]) == 0.0


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert run.main(["--only", "trace,nope", "--out", str(tmp_path)]) == 2
    assert "--only takes names from" in capsys.readouterr().err
    assert run.main(["--threads", "0", "--out", str(tmp_path)]) == 2


def test_peak_allocated_sees_a_known_allocation():
    def allocate():
        a = torch.ones(1_000_000)  # 4 MB alive at once with b
        b = torch.ones(1_000_000)
        del a, b
        return torch.ones(10).sum()

    peak, result = peak_allocated(allocate)
    assert 8e6 <= peak < 8.5e6
    assert float(result) == 10.0


def test_interleaved_medians_orders_by_cost():
    seconds = interleaved_medians({"short": lambda: time.sleep(0.001), "long": lambda: time.sleep(0.05)}, 3)
    assert set(seconds) == {"short", "long"}
    assert seconds["short"] >= 0.001 and seconds["long"] >= 0.05  # sleep never returns early
    assert seconds["long"] > seconds["short"]


def test_compile_benchmark_smoke():
    from benchmarks import compiled

    table = compiled.run(**compiled.SIZES["smoke"], backend="eager")  # dynamo only: no code generation
    assert [r["variant"] for r in table.rows] == ["eager", "compiled", "compiled, new block"]
    assert all(r["ms_per_step"] > 0 and r["first_step_s"] > 0 for r in table.rows)
    assert table.rows[0]["speedup"] == 1.0
