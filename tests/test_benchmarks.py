"""The benchmark suite's smoke path (tiny sizes), so that it cannot rot, and its measuring tools."""

import csv
import time

import pytest
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
    assert [r["variant"] for r in table.rows] == ["eager", "compiled", "compiled, new block"] * 2
    assert [r["block"] for r in table.rows[::3]] == ["mlp, d = 2", "otflow, d = 8"]
    assert all(r["ms_per_step"] > 0 and r["first_step_s"] > 0 for r in table.rows)
    assert table.rows[0]["speedup"] == 1.0 and table.rows[3]["speedup"] == 1.0


def _png(path):
    with open(path, "rb") as handle:
        return handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_peers_jkoflow_and_otflow_smoke(tmp_path, capsys):
    argv = ["--only", "peers", "--size", "smoke", "--methods", "jkoflow,otflow", "--out", str(tmp_path)]
    assert run.main(argv) == 0
    assert "(g) peers on checkerboard, 2 s of training per method" in capsys.readouterr().out
    rows = _rows(tmp_path / "peers.csv")
    assert [r["method"] for r in rows] == ["jkoflow (default command)", "OT-Flow baseline"]
    truth = 3.4657  # log 32, the checkerboard's entropy
    for r in rows:
        assert truth - 0.1 < float(r["test_nll"]) < 6.0
        assert r["check"].startswith("RK4 ") and float(r["check_max_abs"]) < 0.05
        assert int(r["n_parameters"]) > 0 and float(r["n_batches"]) > 0
        assert 2.0 <= float(r["train_seconds"]) < 20.0  # the budget is spent, then training stops
    runs = _rows(tmp_path / "peers_runs.csv")
    assert {(r["method"], r["seed"]) for r in runs} == {("jkoflow", "0"), ("otflow", "0")}
    curves = _rows(tmp_path / "peers_curves.csv")
    assert {r["method"] for r in curves} == {"jkoflow", "otflow"}
    for method in ("jkoflow", "otflow"):
        seconds = [float(r["seconds"]) for r in curves if r["method"] == method]
        assert seconds == sorted(seconds) and seconds[0] > 0
    assert _png(tmp_path / "peers.png")
    assert "True density's test NLL: 3.46" in (tmp_path / "peers.md").read_text()


def test_peers_refuses_missing_packages_before_writing(tmp_path, capsys, monkeypatch):
    from benchmarks import peers

    monkeypatch.setattr(peers, "missing_packages", lambda _: ["zuko"])
    out = tmp_path / "out"
    assert run.main(["--only", "peers", "--methods", "jkoflow,nsf", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        'benchmarks: error: the peers need zuko, not installed: pip install -e ".[peers]" '
        "(or --methods jkoflow,otflow)"
    ]
    assert not out.exists()
    assert run.main(["--only", "peers", "--methods", "jkoflow,nope", "--out", str(out)]) == 2
    assert run.main(["--only", "peers", "--seeds", "0,x", "--out", str(out)]) == 2
    assert run.main(["--only", "peers", "--seconds", "0", "--out", str(out)]) == 2
    assert not out.exists()


def test_cfm_log_prob_is_exact_for_a_linear_field():
    """du/dt = A u from N(0, I) at t = 0 gives u(1) ~ N(0, e^A e^Aᵀ): the ODE
    log-density with the autograd divergence must match it to the tolerance."""
    from benchmarks.peer_models import cfm_log_prob

    gen = torch.Generator().manual_seed(0)
    a = 0.5 * torch.randn(2, 2, generator=gen, dtype=torch.float64)
    velocity = torch.nn.Linear(3, 2, bias=False).double()
    with torch.no_grad():
        velocity.weight.copy_(torch.cat([a, torch.zeros(2, 1, dtype=torch.float64)], 1))
    m = torch.linalg.matrix_exp(a)
    truth = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64), m @ m.T)
    x = truth.sample((500,))
    with torch.no_grad():
        log_p = cfm_log_prob(velocity, x, steps=64)
        coarse = cfm_log_prob(velocity, x, steps=4)
    error = (log_p - truth.log_prob(x)).abs().max()
    assert error < 1e-8 < (coarse - truth.log_prob(x)).abs().max()  # RK4 converges to the truth


def test_exact_divergence_is_the_jacobian_trace():
    from benchmarks.peer_models import exact_divergence

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.SELU(), torch.nn.Linear(16, 3)).double()
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    div = exact_divergence(net(x), x)
    traces = [torch.autograd.functional.jacobian(net, row).trace() for row in x.detach()]
    assert torch.allclose(div, torch.stack(traces), atol=1e-12)


def test_peers_smoke(tmp_path):
    """Every peer trains for 1 s and is evaluated by its exact likelihood (needs the extra)."""
    pytest.importorskip("zuko")
    pytest.importorskip("torchcfm")
    from benchmarks import peers

    methods = ["nsf", "cnf", "icfm", "otcfm"]
    table = peers.run(tmp_path, seconds=1.0, methods=methods, n_samples=3000, curve_points=2, progress=False)
    assert [r["method"] for r in table.rows] == ["zuko NSF", "zuko CNF", "torchcfm I-CFM", "torchcfm OT-CFM"]
    for r in table.rows:
        assert 3.4657 - 0.1 < r["test_nll"] < 6.0
        assert r["n_batches"] > 0 and r["train_seconds"] >= 1.0 and r["n_parameters"] > 0
    assert table.rows[0]["check"] == "exact (discrete flow)" and table.rows[0]["check_max_abs"] is None
    assert table.rows[1]["check"].startswith("dopri5 tol 1e-06/1e-05→1e-07/1e-06: ")
    assert all(r["check"].startswith("RK4 64→128 steps: ") for r in table.rows[2:])
    assert all(r["check_max_abs"] < 1e-3 for r in table.rows[1:])
    assert table.rows[0]["n_parameters"] == 22026  # zuko's NSF(2) at its defaults
    curves = _rows(tmp_path / "peers_curves.csv")
    assert sorted({r["method"] for r in curves}) == sorted(methods)
    # one check per 0.5 s of training, and one at the end: a step slower than 0.5 s (a loaded
    # machine) leaves fewer
    assert all(1 <= sum(r["method"] == m for r in curves) <= 2 for m in methods)
    assert _png(tmp_path / "peers.png")


def test_jko_study_rows_chain_and_match_the_entropy(tmp_path):
    """The study's per-block rows: each block starts where the one before it
    ended, KL left = NLL − H for a known density, and the summary is the last
    stage's test NLL."""
    import csv

    from benchmarks.jko_study import study
    from jkoflow import datasets

    base = {"width": 8, "iters": 8, "batch_size": 128, "max_blocks": 2, "ter_eps": 1e-9}
    (summary,) = study("8gaussians", [0], ["default"], 2000, tmp_path, base=base)
    rows = list(csv.DictReader((tmp_path / "study_blocks.csv").open()))
    assert [r["block"] for r in rows] == ["1", "2"]
    assert float(rows[1]["nll_before"]) == pytest.approx(float(rows[0]["nll_after"]), rel=1e-12)
    entropy = -datasets.target("8gaussians").log_prob(datasets.load_split("8gaussians", n=2000)[2]).mean()
    for r in rows:
        assert float(r["kl_left_after"]) == pytest.approx(float(r["nll_after"]) - entropy, rel=1e-9)
    assert summary["test_nll"] == pytest.approx(float(rows[-1]["nll_after"]), rel=1e-12)
    assert "| default |" in (tmp_path / "study.md").read_text()


def test_ablation_rows_follow_the_stages_and_the_selection(tmp_path):
    """One row per stage kind, cumulative batches, and the full recipe is the selected flow."""
    from benchmarks.ablation import ablation
    from jkoflow import datasets

    base = {
        "width": 8, "iters": 10, "stage_iters": 5, "batch_size": 128, "max_blocks": 2, "ter_eps": 1e-9,
        "finetune_iters": 8,
    }  # fmt: skip
    rows = ablation(["8gaussians"], [0], 2000, tmp_path, base=base)
    names = ["first pass", "+ reparam", "+ refine", "+ free block", "+ fine-tune", "full recipe"]
    assert [r["row"] for r in rows] == names
    assert [r["n_batches"] for r in rows] == [20, 30, 50, 60, 68, 68]  # 2×10, 2×5, 4×5, 10, 8
    entropy = -datasets.target("8gaussians").log_prob(datasets.load_split("8gaussians", n=2000)[2]).mean()
    assert rows[0]["kl_left"] == pytest.approx(rows[0]["test_nll"] - float(entropy), rel=1e-9)
    best = {r["row"]: r["test_nll"] for r in rows[:-1]}
    assert rows[-1]["test_nll"] in best.values() and rows[-1]["selected"]
    assert "| 8gaussians | + free block |" in (tmp_path / "ablation.md").read_text()


def test_kl_regions_of_a_perfect_model_are_zero_and_its_rare_mass_the_quantile():
    """A flow with no blocks is N(0, I): on a one-component mixture N(0, I) every
    split of the KL is 0 and 1 % of its samples fall under the data's 1 % quantile."""
    import numpy as np

    from benchmarks.kl_regions import kl_regions
    from jkoflow import Flow
    from jkoflow.datasets.targets import GaussianMixture

    standard = GaussianMixture(np.zeros((1, 3)), np.eye(3)[None], np.ones(1))
    found = kl_regions(Flow(3, [], steps=2), standard, standard.sample(50_000, seed=0), n_samples=50_000)
    assert abs(found.kl) < 1e-6 and max(map(abs, found.by_quantile + found.by_component)) < 1e-6
    assert found.between == (0.0, 0.0)  # one component: every posterior is 1
    assert found.rare_mass == pytest.approx(0.01, abs=0.002)  # sd of the estimate ≈ 6e-4


def test_kl_regions_split_the_kl_of_a_gaussian_fit_to_a_mixture():
    """N(0, I) against a two-component mixture: the splits are the means of
    log p − log N over the points of each quintile, component and the mixed set."""
    import numpy as np

    from benchmarks.kl_regions import CLEAR_POSTERIOR, kl_regions
    from jkoflow import Flow, datasets

    gmm = datasets.target("gmm:d=2,k=2,seed=1")
    x = gmm.sample(5000, seed=2)
    found = kl_regions(Flow(2, [], steps=2), gmm, x, n_samples=4000)
    r = gmm.log_prob(x) + 0.5 * (x**2).sum(1) + np.log(2 * np.pi)
    assert found.kl == pytest.approx(r.mean(), abs=1e-5)
    order = np.argsort(gmm.log_prob(x))
    assert found.by_quantile == pytest.approx(
        [r[order[i * 1000 : (i + 1) * 1000]].mean() for i in range(5)], abs=1e-5
    )
    joint = gmm.joint_log_probs(x)
    assert found.by_component == pytest.approx([r[joint.argmax(1) == j].mean() for j in range(2)], abs=1e-5)
    mixed = np.exp(joint - gmm.log_prob(x)[:, None]).max(1) < CLEAR_POSTERIOR
    assert found.between == pytest.approx((mixed.mean(), r[mixed].mean()), abs=1e-5)
    assert 0 < found.between[0] < 1 and found.kl > 0.1


def test_kl_regions_refuses_a_run_it_cannot_read_in_one_line(tmp_path, capsys):
    """A missing run directory and a run on data without a known density: exit 2, one line each."""
    import json

    from benchmarks.kl_regions import main

    assert main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"kl_regions: run directory not found: {tmp_path / 'missing'}"
    ]
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data": {"name": "moons"}}))
    (run / "flow.pt").write_bytes(b"")
    assert main([str(run)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"kl_regions: {run}: its data 'moons' have no known density"
