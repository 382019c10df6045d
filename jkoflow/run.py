"""The run directory (docs/design.md, "The run directory"): what a training run
leaves on disk and how commands read it back.

    .jkoflow-run.json  the marker: the run's identity and the manifest of the
                    files jkoflow wrote here (:mod:`jkoflow.rundir`); written first
    .jkoflow.lock   locked (flock) while a process trains in the directory

    config.json     data and trainer configs, library versions, threads
    flow.pt         the flow the run returns: the best candidate by validation NLL
                    (weights + JSON config, no pickled code)
    flow-*.pt       the flow after each stage (flow-initial.pt, flow-reparam-1.pt, …)
    trainer.pt      the JKO trainer's state, for --resume (jkoflow.checkpoint)
    flow-partial.pt the finished blocks, when training stopped on non-finite losses
    history.json    per-block records and every iteration
    log.csv         per-iteration log (OT-Flow: per validation), written while training
    summary.json    test NLL, blocks, batches, seconds, per-block figures
    *.png           plots
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import datasets, distributed
from .atomic import atomic_path, atomic_write, publish, temp_next_to
from .checkpoint import load_state
from .config import DataConfig, JKOConfig, TrainingConfig, config_from_dict
from .errors import InputError, TrainingError
from .figures import flow_figure_names, write_flow_figures
from .flow import Flow
from .metrics import (
    STEP_CHECK_ROWS,
    data_kl,
    data_scale,
    inversion_error,
    nll,
    parameter_count,
    step_doubling_change,
)
from .otflow import OTFlowConfig, train_otflow
from .plots import plot_h_per_block, plot_samples, plot_validation_curve, plot_w2_per_block
from .preflight import Resume, check_resume, check_training
from .records import JKOHistory
from .rundir import RunDir, check_out_path
from .trainer import train_jko

__all__ = [
    "IterationLog",
    "RunFiles",
    "check_jko",
    "check_otflow",
    "flow_figures",
    "load_data",
    "prepare_run_dir",
    "read_json",
    "run_jko",
    "run_otflow",
    "stage_checkpoint",
    "step_range",
    "summarize",
    "target_kl",
    "versions",
    "write_json",
    "write_plots",
]


class RunFiles:
    """Paths of the files in a run directory.

    Example:
        >>> import tempfile
        >>> from jkoflow.run import RunFiles
        >>> files = RunFiles("runs/8gaussians")
        >>> files.flow.as_posix(), files.trainer.name, files.log.name
        ('runs/8gaussians/flow.pt', 'trainer.pt', 'log.csv')
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     try:
        ...         RunFiles(tmp).require()
        ...     except jkoflow.InputError as error:
        ...         print(str(error).endswith("is not a finished jkoflow run: config.json is missing"))
        True
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.config = self.root / "config.json"
        self.flow = self.root / "flow.pt"
        self.history = self.root / "history.json"
        self.log = self.root / "log.csv"
        self.summary = self.root / "summary.json"
        self.w2_plot = self.root / "w2_per_block.png"
        self.h_plot = self.root / "h_per_block.png"
        self.val_plot = self.root / "val_nll.png"
        self.samples_plot = self.root / "samples.png"
        self.trainer = self.root / "trainer.pt"
        self.partial_flow = self.root / "flow-partial.pt"

    def require(self) -> RunFiles:
        """Checks that this is a finished run directory."""
        if not self.root.is_dir():
            raise InputError(f"run directory not found: {self.root}")
        for path in (self.config, self.flow):
            if not path.is_file():
                raise InputError(f"{self.root} is not a finished jkoflow run: {path.name} is missing")
        return self

    def load_flow(self, device: str | torch.device = "cpu") -> Flow:
        return Flow.load(self.flow, map_location=device)

    def record(self) -> dict[str, Any]:
        """config.json as a dict with a ``data`` section; InputError when damaged."""
        record = read_json(self.config)
        if not isinstance(record, dict) or not isinstance(record.get("data"), dict):
            raise InputError(f"{self.config} is damaged: no 'data' section")
        return record

    def data_config(self) -> DataConfig:
        return config_from_dict(DataConfig, self.record()["data"])

    def method(self) -> str:
        """``"jko"`` or ``"otflow"``: which trainer made the run."""
        return self.record().get("method", "jko")

    def history_record(self) -> dict[str, Any]:
        """history.json as a dict with the per-stage (JKO) or per-validation
        (OT-Flow) records the plots need; InputError when damaged."""
        history = read_json(self.history)
        if not isinstance(history, dict) or not (
            isinstance(history.get("stages"), list) or isinstance(history.get("validations"), list)
        ):
            raise InputError(f"{self.history} is damaged: no 'stages' or 'validations' list")
        return history


def prepare_run_dir(path: str | os.PathLike, method: str = "jko", overwrite: bool = False) -> RunDir:
    """Makes the run directory ``path`` jkoflow's and locks it (:meth:`RunDir.create`):
    an empty or current-directory path, a file, a non-empty directory that
    jkoflow did not make, and one holding a run without ``overwrite`` are
    refused; with ``overwrite`` the old run's own files are removed first."""
    return RunDir.create(check_out_path(path), method, overwrite)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Writes JSON atomically (:mod:`jkoflow.atomic`)."""
    text = json.dumps(data, indent=2, allow_nan=True) + "\n"
    with atomic_write(path) as file:
        file.write(text)


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read {path} as JSON: {error}") from None


def load_data(config: DataConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (train, val, test) split that a :class:`DataConfig` describes."""
    return datasets.load_split(
        config.name,
        config.n_samples,
        config.seed,
        config.val_fraction,
        config.test_fraction,
        config.data_root,
    )


def target_kl(flow: Flow, data_name: str, x: np.ndarray) -> dict[str, Any]:
    """``{"kl": …, "kl_stderr": …, "kl_rows": n}``: KL(p_data ‖ flow) on the points x
    (n, d) when ``data_name`` has a known density (:func:`datasets.is_target`), else ``{}``."""
    if not datasets.is_target(data_name):
        return {}
    result = data_kl(flow, datasets.target(data_name).log_prob(x), x)
    return {"kl": result.value, "kl_stderr": result.stderr, "kl_rows": result.n}


def _installed(distribution: str) -> str:
    """The installed version of ``distribution``, read from its metadata without
    importing it (importing POT alone takes seconds); ``"unknown"`` if absent."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def versions() -> dict[str, str]:
    """Versions of Python and the libraries that determine a run's numbers."""
    from . import __version__

    return {
        "jkoflow": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchdiffeq": _installed("torchdiffeq"),
        "numpy": np.__version__,
        "pot": _installed("POT"),
    }


class IterationLog:
    """Appends records (JKO iterations or OT-Flow validations) to a CSV file as
    training goes.

    The lines go to a temporary file next to ``path`` that :meth:`close`
    publishes over ``path`` atomically (also when training failed), so that the
    log is never half-written and two processes never share a file.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from jkoflow.run import IterationLog
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = Path(tmp) / "log.csv"
        ...     with IterationLog(path, ("iter", "loss"), [{"iter": 0, "loss": 2.0}]) as log:
        ...         log({"iter": 1, "loss": 1.5, "lr": 0.05})  # fields not in the header are left out
        ...         written_early = path.exists()
        ...     lines = path.read_text().splitlines()
        >>> written_early, lines
        (False, ['iter,loss', '0,2.0', '1,1.5'])
    """

    JKO_FIELDS = ("stage", "block", "iter", "loss", "kl", "transport", "lr", "val_nll", "seconds")
    OTFLOW_FIELDS = ("iter", "n_batches", "seconds", "val_nll", "lr")

    def __init__(
        self, path: str | os.PathLike, fields: tuple[str, ...], records: Iterable[dict[str, Any]] = ()
    ) -> None:
        """Starts the file with a header and ``records`` (e.g. those of a resumed run)."""
        self._path = Path(path)
        self._tmp = temp_next_to(path)
        self._file = open(self._tmp, "w", newline="")  # noqa: SIM115 - closed in close()
        self._writer = csv.DictWriter(self._file, fields, extrasaction="ignore")
        self._writer.writeheader()
        self._writer.writerows(records)
        self._lines = 0

    def __call__(self, record: dict[str, Any]) -> None:
        self._writer.writerow(record)
        self._lines += 1
        if self._lines % 50 == 0:
            self._file.flush()

    def close(self) -> None:
        """Publishes the log over ``path``."""
        if self._file.closed:
            return
        self._file.close()
        try:
            publish(self._tmp, self._path)
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> IterationLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


STAGE_KEYS = ("name", "kind", "factor", "spread", "val_nll", "test_nll", "n_batches", "seconds")


def stage_checkpoint(files: RunFiles, stage: dict[str, Any]) -> Path:
    """Path of the checkpoint written after ``stage``: ``flow-initial.pt``,
    ``flow-reparam-1.pt``, ``flow-refine-1.pt``, …"""
    return files.root / ("flow-" + stage["name"].replace(" ", "-") + ".pt")


INVERSION_ROWS = STEP_CHECK_ROWS
"""Rows of the evaluated data on which the inversion error is measured: as
many as the trainer's round-trip checks use on the validation set."""


def flow_figures(flow: Flow, x: np.ndarray) -> dict[str, Any]:
    """Figures of a flow that every report states: the base RK4 steps of its
    evaluation (``eval_steps``) and each block's own (``block_eval_steps``:
    the base times the block's step factor), the NLL change when they are
    doubled (on the first :data:`STEP_CHECK_ROWS` rows of ``x``), its
    inversion error E‖x − T⁻¹(T(x))‖ on the first :data:`INVERSION_ROWS`
    rows, in data units and over the data's per-coordinate scale
    sqrt(E‖x − μ‖²/d) (``inversion_error_relative``, the scale the
    trainer's round-trip checks use) and its parameter count."""
    rows = min(len(x), INVERSION_ROWS)
    check_rows = min(len(x), STEP_CHECK_ROWS)
    error = inversion_error(flow, x[:rows])
    return {
        "eval_steps": flow.steps,
        "block_eval_steps": list(flow.step_counts),
        "step_doubling_change": step_doubling_change(flow, x[:check_rows]),
        "step_check_rows": check_rows,
        "inversion_error": error,
        "inversion_error_relative": error / data_scale(flow, x[:rows]),
        "inversion_error_rows": rows,
        "n_parameters": parameter_count(flow),
    }


def step_range(figures: dict[str, Any]) -> tuple[int, int]:
    """(fewest, most) RK4 steps of a block in :func:`flow_figures` output; the
    base ``eval_steps`` for figures written before blocks had their own.

    >>> step_range({"eval_steps": 8, "block_eval_steps": [8, 16, 8]}), step_range({"eval_steps": 4})
    ((8, 16), (4, 4))
    """
    counts = figures.get("block_eval_steps") or [figures["eval_steps"]]
    return min(counts), max(counts)


def summarize(flow: Flow, history: JKOHistory, x_test: np.ndarray, wall_seconds: float) -> dict[str, Any]:
    """summary.json of a JKO run: test NLL (nats, constant included, at the
    flow's eval steps), blocks, batches, seconds and per-block figures of
    ``flow``, the selected candidate (``selected``: its stage, blocks and NLLs)
    and the Gaussian fit it is measured against (``gaussian``)."""
    records = history.selected_blocks()
    last = records[-1] if records else {}
    log_scale = -float(flow.standardize_logdet())
    summary = {
        "test_nll": last.get("test_nll", history.selected.test_nll if history.selected else None),
        "selected": history.selected.to_dict() if history.selected else None,
        "gaussian": history.gaussian.to_dict() if history.gaussian else None,
        "n_blocks": len(flow),
        "stopped_by": history.stopped_by,
        "train_seconds": history.train_seconds,
        "wall_seconds": wall_seconds,
        "n_batches": history.n_batches,
        **flow_figures(flow, x_test),
        "blocks": [
            {
                key: b[key]
                for key in (
                    "h",
                    "movement",
                    "ter",
                    "n_batches",
                    "seconds",
                    "val_nll",
                    "test_nll",
                    "step_doubling_change",
                    "inversion_error",
                    "round_trip_error",
                    "train_steps",
                    "eval_steps",
                    "step_doublings",
                    "put_back",
                )
                if key in b
            }
            for b in records
        ],
        "stages": [
            {
                **{key: s[key] for key in STAGE_KEYS if key in s},
                "n_blocks": len(s["blocks"]),
                "h": [b["h"] for b in s["blocks"]],
                "movement": [b.movement for b in s.blocks],
            }
            for s in history.stages
        ],
    }
    if log_scale != 0.0 and summary["test_nll"] is not None:
        summary["test_nll_standardized"] = summary["test_nll"] - log_scale
    return summary


def write_plots(
    files: RunFiles,
    flow: Flow,
    history: dict[str, Any],
    x_test: np.ndarray,
    seed: int = 0,
    run: RunDir | None = None,
) -> None:
    """The run's figures, each written atomically (and entered in ``run``'s
    manifest): for a JKO run w2_per_block.png and h_per_block.png, for an
    OT-Flow run val_nll.png; for data of 2 or more columns samples.png (test
    data, model samples, test data pushed to the latent space); and the
    figures of :func:`jkoflow.figures.write_flow_figures` (per-block
    pushforward, trajectories, density or corner plot)."""
    figures: list[tuple[Path, Callable[[Path], None]]] = []
    if "stages" in history:
        figures += [
            (files.w2_plot, lambda path: plot_w2_per_block(history, path)),
            (files.h_plot, lambda path: plot_h_per_block(history, path)),
        ]
    else:
        figures.append((files.val_plot, lambda path: plot_validation_curve(history, path)))
    if flow.dim >= 2:
        n = min(len(x_test), 20000)
        with torch.no_grad():
            model = flow.sample(n, generator=torch.Generator().manual_seed(seed)).cpu().numpy()
            latent = flow(x_test[:n])[0].cpu().numpy()
        figures.append((files.samples_plot, lambda path: plot_samples(x_test[:n], model, latent, path)))
    for path, draw in figures:
        if run is not None:
            run.claim(path.name)
        with atomic_path(path) as tmp:
            draw(tmp)
    if run is not None:
        for name in flow_figure_names(flow.dim):
            run.claim(name)
    write_flow_figures(flow, x_test, files.root, target=files.data_config().name, seed=seed)


def _start_run(
    out: str | os.PathLike,
    overwrite: bool,
    record: dict[str, Any],
    threads: int,
    resume: bool = False,
) -> tuple[RunFiles, RunDir]:
    """Takes the run directory (a new one, or with ``resume`` the existing one,
    locked either way) and writes config.json (``record`` and the versions)."""
    run = RunDir.open(out) if resume else prepare_run_dir(out, record["method"], overwrite)
    try:
        write_json(run.claim("config.json"), {**record, "threads": threads, "versions": versions()})
    except BaseException:
        run.release()
        raise
    return RunFiles(run.root), run


def _finish_run(
    files: RunFiles,
    run: RunDir,
    flow: Flow,
    history: dict[str, Any],
    summary: dict[str, Any],
    x_test: np.ndarray,
    seed: int,
) -> dict[str, Any]:
    """Writes the flow, history, summary and plots of a finished run; returns the
    summary. A flow whose test NLL or inversion error is not finite is a failed
    run (TrainingError), not a finished one: nothing is written for it."""
    figures = {key: summary.get(key) for key in ("test_nll", "inversion_error")}
    if not all(value is not None and math.isfinite(value) for value in figures.values()):
        raise TrainingError(
            f"the trained flow is not usable (test NLL {figures['test_nll']}, inversion error "
            f"{figures['inversion_error']}); train again with a lower --lr",
            block_index=len(flow),
        )
    flow.save(run.claim(files.flow.name))
    write_json(run.claim(files.history.name), history)
    write_json(run.claim(files.summary.name), summary)
    write_plots(files, flow.cpu(), history, x_test, seed=seed, run=run)
    return summary


def _record(method: str, data_config: DataConfig, section: str, config: TrainingConfig) -> dict[str, Any]:
    return {"method": method, "data": data_config.to_dict(), section: config.to_dict()}


def check_jko(
    out: str | os.PathLike,
    data_config: DataConfig,
    config: JKOConfig,
    splits: tuple[np.ndarray, np.ndarray, np.ndarray],
    overwrite: bool = False,
    resume: bool = False,
    processes: int = 1,
) -> Resume | None:
    """Every check of :func:`run_jko` that can refuse the run; reads, never writes.
    Returns what resuming means with ``resume``, else None."""
    data = check_training(config, splits, max(1, len(config.block_types)), processes)
    return _check_run_dir(out, data_config, config.resolved(data[0].shape[1]), data, overwrite, resume)


def _check_run_dir(
    out: str | os.PathLike,
    data_config: DataConfig,
    config: JKOConfig,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    overwrite: bool,
    resume: bool,
) -> Resume | None:
    """The checks of :func:`check_jko` on the run directory (rank 0's alone)."""
    if not resume:
        RunDir.check_new(check_out_path(out), overwrite)
        return None
    files = RunFiles(out)
    if not files.trainer.is_file():
        raise InputError(f"nothing to resume in {files.root}: {files.trainer.name} not found")
    if files.data_config() != data_config:
        raise InputError(f"cannot change the data when resuming {files.root}")
    return check_resume(files.trainer, (files.flow, files.history, files.summary), config, data)


def run_jko(
    out: str | os.PathLike,
    data_config: DataConfig,
    config: JKOConfig,
    splits: tuple[np.ndarray, np.ndarray, np.ndarray],
    threads: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = False,
    reset_lr: bool = False,
) -> dict[str, Any]:
    """Trains a JKO flow and writes its run directory; returns the summary.

    Every check that can refuse the run (:func:`check_jko`) runs before the
    directory is created or changed; the directory is locked while training.
    The trainer's state is kept in ``trainer.pt``. With ``resume``, training
    continues from it (``config`` may differ from the run's only in
    :data:`~jkoflow.config.RESUMABLE` options; a finished run with a larger
    ``max_blocks`` gets more blocks; a finished run whose final files are
    missing gets them). If a block's loss stays non-finite, the finished
    blocks are written to ``flow-partial.pt`` and TrainingError is raised.

    In a process group (:mod:`jkoflow.distributed`) every rank trains its share
    of each mini-batch; rank 0 alone locks and writes the run directory and
    returns the summary, the other ranks return an empty dict.
    """
    group = distributed.current()
    data = check_training(config, splits, max(1, len(config.block_types)), group.size)
    config = config.resolved(data[0].shape[1])  # the stages it runs, as config.json records them
    if not group.is_main:
        return _follow_jko(out, config, splits, group, resume=resume, reset_lr=reset_lr)
    failed = True
    try:  # the run directory is rank 0's: it checks, locks and writes it
        plan = _check_run_dir(out, data_config, config, data, overwrite, resume)
        files, run = _start_run(out, overwrite, _record("jko", data_config, "train", config), threads, resume)
        failed = False
    finally:
        group.any(failed)  # the other ranks wait for the run directory
    with run:
        if plan is not None and plan.finalize:
            best = plan.state.best
            flow = best if best is not None else plan.state.flow
            history = JKOHistory.from_dict(plan.state.history)
            start = time.perf_counter()
        else:
            done = plan.state.history["iterations"] if plan is not None else []
            start = time.perf_counter()
            flow, history = _train_in(files, run, config, splits, progress, done, resume, reset_lr)
        summary = summarize(flow, history, splits[2], time.perf_counter() - start)
        summary.update(target_kl(flow, data_config.name, splits[2]))
        return _finish_run(files, run, flow, history.to_dict(), summary, splits[2], data_config.seed)


def _train_in(
    files: RunFiles,
    run: RunDir,
    config: JKOConfig,
    splits: tuple[np.ndarray, np.ndarray, np.ndarray],
    progress: bool,
    done: list[dict[str, Any]],
    resume: bool,
    reset_lr: bool,
) -> tuple[Flow, JKOHistory]:
    """:func:`train_jko` with the run directory's log, stage checkpoints and
    trainer state."""

    def save_stage(history: JKOHistory, flow: Flow) -> None:  # a checkpoint after every stage
        flow.save(run.claim(stage_checkpoint(files, history.stages[-1]).name))
        write_json(files.history, history.to_dict())

    run.claim(files.history.name)
    run.claim(files.trainer.name)
    with IterationLog(run.claim(files.log.name), IterationLog.JKO_FIELDS, done) as log:
        try:
            return train_jko(
                *splits,
                config=config,
                progress=progress,
                callback=log,
                on_stage=save_stage,
                checkpoint=files.trainer,
                resume=resume,
                reset_lr=reset_lr,
            )
        except TrainingError as error:
            raise _saved_partial(files, run, error) from None


def _saved_partial(files: RunFiles, run: RunDir, error: TrainingError) -> TrainingError:
    """Writes the blocks finished before a failed one to ``flow-partial.pt``; the error to raise."""
    load_state(files.trainer).flow.head(error.block_index).save(run.claim(files.partial_flow.name))
    return TrainingError(
        f"{error}; saved them to {files.partial_flow} (continue with --resume and a lower --lr)",
        error.block_index,
    )


def _follow_jko(
    out: str | os.PathLike,
    config: JKOConfig,
    splits: tuple[np.ndarray, np.ndarray, np.ndarray],
    group: distributed.Group,
    resume: bool,
    reset_lr: bool,
) -> dict[str, Any]:
    """What a rank other than 0 does in :func:`run_jko`: trains in step with
    rank 0 (reading the checkpoint when resuming) and writes nothing."""
    if group.any(False):
        raise InputError(f"rank 0 could not start the run in {out}")
    trainer_file = RunFiles(out).trainer
    train_jko(*splits, config=config, checkpoint=trainer_file, resume=resume, reset_lr=reset_lr)
    return {}


def check_otflow(
    out: str | os.PathLike,
    config: OTFlowConfig,
    splits: tuple[np.ndarray, np.ndarray, np.ndarray],
    overwrite: bool = False,
) -> None:
    """Every check of :func:`run_otflow` that can refuse the run; reads, never writes."""
    check_training(config, splits)
    RunDir.check_new(check_out_path(out), overwrite)


def run_otflow(
    out: str | os.PathLike,
    data_config: DataConfig,
    config: OTFlowConfig,
    splits: tuple[np.ndarray, np.ndarray, np.ndarray],
    threads: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains the monolithic OT-Flow baseline and writes its run directory
    (after every check that can refuse it, :func:`check_otflow`)."""
    x_train, x_val, x_test = splits
    check_otflow(out, config, splits, overwrite)
    files, run = _start_run(out, overwrite, _record("otflow", data_config, "otflow", config), threads)
    with run:
        start = time.perf_counter()
        with IterationLog(run.claim(files.log.name), IterationLog.OTFLOW_FIELDS) as log:
            try:
                flow, history = train_otflow(x_train, x_val, config=config, progress=progress, callback=log)
            except FloatingPointError as error:
                raise TrainingError(str(error), 0) from None
        wall = time.perf_counter() - start
        summary = {
            "test_nll": nll(flow, x_test),
            "n_blocks": 1,
            "stopped_by": history.stopped_by,
            "train_seconds": history.train_seconds,
            "wall_seconds": wall,
            "n_batches": history.n_batches,
            "best": history.best,
            **flow_figures(flow, x_test),
            **target_kl(flow, data_config.name, x_test),
        }
        return _finish_run(files, run, flow, history.to_dict(), summary, x_test, data_config.seed)
