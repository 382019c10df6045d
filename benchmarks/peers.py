r"""(g) Peers side by side: jkoflow, the OT-Flow baseline, zuko's NSF and CNF and
torchcfm's I-CFM and OT-CFM, trained on the same split for the same
training-time budget, one after the other in one process (the suite's
``--threads``, 1 by default), each evaluated by its exact test log-likelihood.

Run with ``python -m benchmarks --only peers`` (options ``--data``,
``--seconds``, ``--seeds``, ``--methods``, ``--out``); the peers need the
optional extra ``pip install -e ".[peers]"`` (zuko, torchcfm), and
``--methods jkoflow,otflow`` runs without it.

Data: :func:`jkoflow.datasets.load_split` with the default data settings
(``n_samples`` rows drawn and split 80/10/10 with the seed; checkerboard by
default). Each seed draws its own data and split, as ``jkoflow train --seed``
does, and seeds every method's initialisation and mini-batches.

Methods and their settings (sources in :mod:`benchmarks.peer_models`):

* ``jkoflow`` — the default command ``jkoflow train --data NAME``:
  ``JKOConfig(seed=s, max_seconds=budget)``, otherwise the defaults.
* ``otflow`` — ``train_otflow`` with ``OTFlowConfig`` defaults, the
  published toy preset for the data name (``OTFLOW_PRESETS``, as the command
  line applies it) and ``max_seconds=budget``. Onken et al., "OT-Flow",
  https://arxiv.org/abs/2006.00104.
* ``nsf``, ``cnf`` (zuko) and ``icfm``, ``otcfm`` (torchcfm): their
  documented defaults, on standardised data; the best-validation weights are
  kept (OT-Flow does the same).

Training clock: each method's own optimisation time; evaluation is excluded.
The NLL-vs-seconds curve is the validation NLL that the trainers record on the
whole validation set — jkoflow after every block, OT-Flow every ``val_every``
steps — and, for the peers, the validation NLL on the first ``val_rows``
validation rows (4000: a standard error of about 0.015 nats; the full set
would cost ~20 s per check for an ODE peer) every ``seconds/curve_points`` of
training; the peers keep their best weights on that subset.

Test NLL, exact for every method, with its check:

* jkoflow, OT-Flow: exact Hessian trace, fixed-step RK4 at the flow's
  ``eval_steps`` per block; check = NLL change when the steps are doubled
  (:func:`jkoflow.metrics.step_doubling_change`), float32 as jkoflow reports.
* NSF: analytic log-determinant, exact (no check needed).
* CNF: exact trace, zuko's adaptive dopri5 at atol 1e-6, rtol 1e-5, in
  float64; check = NLL change at 10× tighter tolerances.
* I-CFM, OT-CFM: exact divergence by autograd, ODE integrated backwards by
  fixed-step RK4 (64 steps), in float64; check = NLL change at 128 steps.

The peers' checks use the first :data:`ODE_CHECK_ROWS` test rows (a paired
difference). The RK4 check uses the first :data:`jkoflow.metrics.STEP_CHECK_ROWS` test rows,
as jkoflow's own reports do.
Writes ``peers.md``/``peers.csv`` (one row per method, mean over seeds),
``peers_runs.csv`` (one row per method and seed), ``peers_curves.csv`` and
``peers.png`` (validation NLL vs training seconds, every method) to ``out``.
"""

from __future__ import annotations

import copy
import csv
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from jkoflow import Flow, JKOConfig, OTFlowConfig, train_jko, train_otflow
from jkoflow.datasets import load_split
from jkoflow.metrics import STEP_CHECK_ROWS, nll, parameter_count, step_doubling_change
from jkoflow.otflow import OTFLOW_PRESETS

from .common import Column, Table
from .peer_models import PEERS, Peer, missing_packages

__all__ = ["METHODS", "SIZES", "MethodResult", "check_methods", "run"]

METHODS = ("jkoflow", "otflow", *PEERS)
LABELS = {"jkoflow": "jkoflow (default command)", "otflow": "OT-Flow baseline"} | {
    name: peer.label for name, peer in PEERS.items()
}
SIZES = {
    "full": {"n_samples": 120_000, "seconds": 240.0},
    "quick": {"n_samples": 120_000, "seconds": 30.0},
    "smoke": {"n_samples": 3_000, "seconds": 2.0, "curve_points": 3},
}
ODE_CHECK_ROWS = 2000
"""Test rows of the tolerance check of an ODE peer."""

COLUMNS = [
    Column("method", "method"),
    Column("test_nll", "test NLL", ".4f"),
    Column("test_nll_sd", "± sd", ".4f"),
    Column("check", "check (NLL change)"),
    Column("n_parameters", "params"),
    Column("n_batches", "batches", ".0f"),
    Column("batch_size", "batch"),
    Column("train_seconds", "train s", ".0f"),
    Column("n_seeds", "seeds"),
]


@dataclass
class MethodResult:
    """One method trained on one seed: its test NLL, the check of that number
    (``check``: the change, ``check_kind``: how it was measured), size, budget
    used and its validation curve (``curve``: (n_batches, seconds, val_nll))."""

    method: str
    seed: int
    test_nll: float
    check: float | None
    check_kind: str
    n_parameters: int
    n_batches: int
    batch_size: int
    train_seconds: float
    curve: list[tuple[float, float, float]] = field(default_factory=list)


def check_methods(methods: Sequence[str]) -> str | None:
    """The one-line reason ``methods`` cannot run here, or None."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        return f"--methods takes names from {','.join(METHODS)}, got {','.join(methods)!r}"
    missing = missing_packages([PEERS[m] for m in methods if m in PEERS])
    if missing:
        return (
            f'the peers need {" and ".join(missing)}, not installed: pip install -e ".[peers]" '
            "(or --methods jkoflow,otflow)"
        )
    return None


def _flow_result(method: str, flow: Flow, x_test: np.ndarray, seed: int) -> dict[str, object]:
    """Test NLL and RK4 step-doubling change of a jkoflow :class:`~jkoflow.Flow`."""
    return {
        "method": method,
        "seed": seed,
        "test_nll": nll(flow, x_test),
        "check": step_doubling_change(flow, x_test[:STEP_CHECK_ROWS]),
        "check_kind": f"RK4 {flow.steps}→{2 * flow.steps} steps",
        "n_parameters": parameter_count(flow),
    }


def _run_jkoflow(split: tuple[np.ndarray, ...], seconds: float, seed: int, data: str) -> MethodResult:
    x_train, x_val, x_test = split
    config = JKOConfig(seed=seed, max_seconds=seconds)
    flow, history = train_jko(x_train, x_val, config=config)
    curve, batches, clock = [], 0.0, 0.0
    for stage in history.stages:
        for block in stage["blocks"]:
            batches, clock = batches + block["n_batches"], clock + block["seconds"]
            curve.append((batches, clock, block["val_nll"]))
    return MethodResult(
        **_flow_result("jkoflow", flow, x_test, seed),
        n_batches=history.n_batches,
        batch_size=config.batch_for(len(x_train)),
        train_seconds=history.train_seconds,
        curve=curve,
    )


def _run_otflow(split: tuple[np.ndarray, ...], seconds: float, seed: int, data: str) -> MethodResult:
    x_train, x_val, x_test = split
    config = OTFlowConfig(seed=seed, max_seconds=seconds, **OTFLOW_PRESETS.get(data, {}))
    flow, history = train_otflow(x_train, x_val, config)
    curve = [(r["n_batches"], r["seconds"], r["val_nll"]) for r in history.validations]
    return MethodResult(
        **_flow_result("otflow", flow, x_test, seed),
        n_batches=history.n_batches,
        batch_size=config.batch_for(len(x_train)),
        train_seconds=history.train_seconds,
        curve=curve,
    )


@torch.no_grad()
def _peer_nll(peer: Peer, model: nn.Module, u: Tensor, log_scale: float, check: bool = False) -> float:
    """Mean NLL in data units of standardised rows u: −E log p(u) + Σ log s."""
    return float(-peer.log_prob(model, u, check).mean()) + log_scale


@dataclass(frozen=True)
class Budget:
    """Training seconds per method and ``curve_points`` validation checks in them."""

    seconds: float
    curve_points: int


def _train_peer(
    peer: Peer, u_train: Tensor, u_val: Tensor, log_scale: float, budget: Budget, seed: int
) -> tuple[nn.Module, list[tuple[float, float, float]], int, float]:
    """Adam on mini-batches of ``u_train`` for ``budget.seconds`` of optimisation
    time; validation NLL at ``budget.curve_points`` evenly spaced times (off the
    clock). Returns the best-validation model, the curve, the batches and the
    seconds spent."""
    torch.manual_seed(seed)  # the peers draw noise and times from torch's global generator,
    np.random.seed(seed)  # and torchcfm's OT plan sampler from numpy's
    model = peer.build(u_train.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=peer.lr)
    generator = torch.Generator().manual_seed(seed)
    seconds, every = budget.seconds, budget.seconds / budget.curve_points
    curve: list[tuple[float, float, float]] = []
    best, best_state, elapsed, batches, due = math.inf, None, 0.0, 0, every
    while elapsed < seconds:
        tick = time.perf_counter()
        model.train()
        index = torch.randint(len(u_train), (peer.batch_size,), generator=generator)
        loss = peer.loss(model, u_train[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        elapsed += time.perf_counter() - tick
        batches += 1
        finite = math.isfinite(float(loss.detach()))
        if elapsed >= due or elapsed >= seconds or not finite:
            due += every
            model.eval()
            val_nll = _peer_nll(peer, model, u_val, log_scale) if finite else math.nan
            curve.append((batches, elapsed, val_nll))
            if val_nll < best:
                best, best_state = val_nll, copy.deepcopy(model.state_dict())
        if not finite:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), curve, batches, elapsed


def _run_peer(
    peer: Peer, split: tuple[np.ndarray, ...], budget: Budget, seed: int, val_rows: int
) -> MethodResult:
    train, val, test = (torch.as_tensor(x, dtype=torch.float32) for x in split)
    mean, std = train.mean(0), train.std(0)
    log_scale = float(std.log().sum())
    u_val = (val[:val_rows] - mean) / std
    model, curve, batches, elapsed = _train_peer(peer, (train - mean) / std, u_val, log_scale, budget, seed)
    model64 = copy.deepcopy(model).double()
    u_test = ((test - mean) / std).double()
    test_nll = _peer_nll(peer, model64, u_test, log_scale)
    check = None
    if peer.check_kind is not None:
        rows = u_test[:ODE_CHECK_ROWS]
        check = _peer_nll(peer, model64, rows, log_scale, True) - _peer_nll(peer, model64, rows, log_scale)
    return MethodResult(
        peer.name,
        seed,
        test_nll,
        check,
        peer.check_kind or "exact (discrete flow)",
        sum(p.numel() for p in model.parameters()),
        batches,
        peer.batch_size,
        elapsed,
        curve,
    )


def _run_method(
    method: str, split: tuple[np.ndarray, ...], budget: Budget, seed: int, data: str, val_rows: int
) -> MethodResult:
    if method in PEERS:
        return _run_peer(PEERS[method], split, budget, seed, val_rows)
    return {"jkoflow": _run_jkoflow, "otflow": _run_otflow}[method](split, budget.seconds, seed, data)


def _true_nll(data: str, x_test: np.ndarray) -> float | None:
    """The test NLL of the data's true density, for a known-density target."""
    from jkoflow.datasets import targets

    if not targets.is_target(data):
        return None
    return float(-np.mean(targets.target(data).log_prob(x_test)))


def _summary_row(method: str, results: list[MethodResult]) -> dict[str, object]:
    """One table row: mean test NLL ± sd over seeds, the largest |check|."""
    nlls = [r.test_nll for r in results]
    checks = [r.check for r in results if r.check is not None]
    worst = max(checks, key=abs) if checks else None
    kind = results[0].check_kind
    return {
        "method": LABELS[method],
        "test_nll": statistics.fmean(nlls),
        "test_nll_sd": statistics.stdev(nlls) if len(nlls) > 1 else None,
        "check": kind if worst is None else f"{kind}: {worst:+.1e}",
        "check_max_abs": None if worst is None else abs(worst),
        "n_parameters": results[0].n_parameters,
        "n_batches": statistics.fmean(r.n_batches for r in results),
        "batch_size": results[0].batch_size,
        "train_seconds": statistics.fmean(r.train_seconds for r in results),
        "n_seeds": len(results),
    }


def _write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _plot(path: Path, results: list[MethodResult], title: str, truth: float | None) -> None:
    """Validation NLL vs training seconds, one colour per method (one line per seed);
    matplotlib's object API, no pyplot state."""
    import matplotlib
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.5))
    ax = fig.subplots()
    colours = dict(zip(METHODS, matplotlib.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    seen: set[str] = set()
    values = [v for r in results for _, _, v in r.curve if math.isfinite(v)]
    for r in results:
        seconds = [s for _, s, _ in r.curve]
        label = None if r.method in seen else LABELS[r.method]
        seen.add(r.method)
        ax.plot(seconds, [v for *_, v in r.curve], "o-", ms=3, color=colours[r.method], label=label)
    if truth is not None:
        ax.axhline(truth, color="k", ls="--", lw=1, label=f"true density ({truth:.3f})")
        values.append(truth)
    if values:
        low = min(values)
        ax.set_ylim(low - 0.05, min(max(values), low + 1.5) + 0.05)
    ax.set_xlabel("training seconds (evaluation excluded)")
    ax.set_ylabel("validation NLL (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, dpi=120, bbox_inches="tight")


def run(
    out: str | Path,
    data: str = "checkerboard",
    seconds: float = 240.0,
    seeds: Sequence[int] = (0,),
    methods: Sequence[str] = METHODS,
    n_samples: int = 120_000,
    curve_points: int = 12,
    val_rows: int = 4000,
    progress: bool = True,
) -> Table:
    """Trains every method in ``methods`` for ``seconds`` of training per seed,
    one after the other, writes the files named in the module docstring into
    ``out`` and returns the summary table. :func:`check_methods` must pass."""
    problem = check_methods(methods)
    if problem is not None:
        raise ValueError(problem)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[MethodResult] = []
    truths = []
    for seed in seeds:
        split = load_split(data, n=n_samples, seed=seed)
        truth = _true_nll(data, split[2])
        if truth is not None:
            truths.append(truth)
        for method in methods:
            result = _run_method(method, split, Budget(seconds, curve_points), seed, data, val_rows)
            results.append(result)
            if progress:
                print(
                    f"peers: {method} seed {seed}: test NLL {result.test_nll:.4f} "
                    f"after {result.train_seconds:.0f} s, {result.n_batches} batches",
                    flush=True,
                )
    rows = [_summary_row(m, [r for r in results if r.method == m]) for m in methods]
    _write_csv(
        out / "peers_runs.csv", [{k: v for k, v in asdict(r).items() if k != "curve"} for r in results]
    )
    _write_csv(
        out / "peers_curves.csv",
        [
            {"method": r.method, "seed": r.seed, "n_batches": b, "seconds": s, "val_nll": v}
            for r in results
            for b, s, v in r.curve
        ],
    )
    truth = statistics.fmean(truths) if truths else None
    seeds_text = f"seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))}"
    title = f"{data}, {seconds:g} s of training per method, {seeds_text}"
    _plot(out / "peers.png", results, title, truth)
    table = Table("peers", f"(g) peers on {title}", COLUMNS, rows)
    if truth is not None:
        table.notes.append(f"True density's test NLL: {truth:.4f} (mean over seeds).")
    table.notes.append(
        f"{torch.get_num_threads()} torch thread(s), methods trained one after the other in one process; "
        "train s: each trainer's training clock, evaluation excluded (jkoflow's also counts pushing the "
        "data through each finished block). Checks: largest |change| over seeds of the reported NLL "
        "when RK4 steps are doubled or the CNF's ODE tolerances made 10× tighter; "
        f"peers' curves on the first {val_rows} validation rows, jkoflow's and OT-Flow's on all."
    )
    table.notes.append(f"Curves: {out / 'peers_curves.csv'}, figure: {out / 'peers.png'}.")
    return table
