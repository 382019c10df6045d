"""The ``jkoflow`` command line: the only place that parses arguments.

Exit status: 0 success, 2 bad input (one line on stderr), 1 failed training or
a file system error (one line naming the path), 130 interrupted (Ctrl-C; a
train run can be resumed with --resume).

Start-up: this module imports neither torch nor the trainers at import time.
Each sub-command's options are added when that sub-command is parsed (they
are read from the config dataclasses, which need torch), and the commands
import what they use, so ``jkoflow -h`` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .errors import InputError, TrainingError

if TYPE_CHECKING:
    from .config import DataConfig, JKOConfig
    from .flow import Flow
    from .run import RunFiles

__all__ = ["main"]

TRAIN_HELP = {
    "block": "block type, one of blocks.names(), or auto: mlp in d <= 4, otflow above",
    "block_types": "block type of each block, for mixed flows; the last one repeats (default: --block)",
    "width": "hidden width m of each block",
    "depth": "hidden m x m layers M after the opening layer (0: by block type, mlp 2, otflow 1)",
    "h0": "JKO step size of the first block",
    "rho": "growth factor: h_k = min(h0 * rho^k, h_max)",
    "h_max": "largest step size",
    "max_blocks": "largest number of blocks",
    "ter_eps": "stop once Ter(k) = E|T(x)-x|^2 / E|T(x)|^2 falls below this (and the gain below --gain-eps)",
    "gain_eps": "stop by Ter only once the block also gained less validation NLL than this (0: Ter alone)",
    "iters": "Adam steps per block",
    "batch_size": "mini-batch size (0: automatic, min(default, training rows))",
    "lr": "initial learning rate of each block",
    "lr_final_factor": "cosine decay of the lr to lr * this factor",
    "warm_start": "start block k from the weights of block k-1",
    "train_steps": "RK4 steps per block while training",
    "eval_steps": "RK4 steps per block for pushing, NLL and sampling",
    "transport": "transport cost: 'path' (kinetic energy) or 'endpoint' (|T(x)-x|^2/2)",
    "reparam_iters": "reparametrisation iterations of h after the initial pass (0: none)",
    "reparam_tol": "stop reparametrising once max|W_k - mean W|/mean W is below this",
    "reparam_eta": "damping of the h update h_k += eta (h*_k - h_k)",
    "reparam_rule": "target h*: 'ratio' (h_k mean(W)/W_k) or 'arclength' (equal W along the cumulative time)",
    "h_min": "smallest step size allowed by the reparametrisation",
    "refine": "refinement stages: cut every block into C time slices (one C per stage; --refine alone: none)",
    "stage_iters": "Adam steps per block in reparametrisation/refinement stages (0: --iters)",
    "stage_lr": "initial lr of blocks retrained from their weights in those stages (0: --lr)",
    "free_block": "end with a free block: one more block trained on the KL alone, without the W2 term",
    "finetune_iters": "end with this many Adam steps of all blocks together on the NLL (0: none)",
    "finetune_lr": "initial lr of that fine-tuning",
    "stage_epochs": "most passes over the training set per retrained block and in fine-tuning (0: no bound)",
    "val_every": "Adam steps between a block's early-stopping checks of the validation NLL (0: none)",
    "patience": "stop a block once this many checks in a row are above its best by 2 standard errors",
    "max_batches": "stop training after this many mini-batches in all (0: no limit)",
    "max_seconds": "stop training after this many seconds of optimisation (0: no limit)",
    "checkpoint_every": "Adam steps between checkpoints inside a block (0: at block ends only)",
    "nan_retries": "retries of a block after a non-finite loss or gradient",
    "nan_lr_factor": "factor on the lr at each such retry",
    "standardize": "standardise the data (NLL is still reported in data space)",
    "chunk_size": "rows per chunk when pushing and evaluating",
    "cache_device": "where cached pushed samples live: auto (device if they fit), device, host",
    "compile": "torch.compile the training RK4 step: auto (compilable blocks, --iters >= 300), on, off",
    "device": "torch device: cpu, cuda, cuda:N (with torchrun, cuda means cuda:LOCAL_RANK)",
    "dtype": "float32 or float64",
}
DATA_HELP = {
    "n_samples": "number of samples drawn from a toy or target spec",
    "val_fraction": "fraction of rows held out for validation",
    "test_fraction": "fraction of rows held out for testing",
    "data_root": "directory of the tabular sets (power/data.npy, ...; default: $JKOFLOW_DATA or data)",
}
OTFLOW_HELP = {
    "block": "block type (a potential block when --alpha-r > 0)",
    "width": "hidden width m of the block",
    "depth": "ResNet layers M after the opening layer",
    "alpha_c": "weight of the NLL term (preset per toy)",
    "alpha_r": "weight of the HJB residual term (preset per toy)",
    "iters": "Adam steps (mini-batches)",
    "max_seconds": "stop after this many training seconds (0: no limit)",
    "batch_size": "mini-batch size (0: automatic, min(default, training rows))",
    "lr": "initial learning rate",
    "lr_drop": "factor applied to the lr when the validation NLL stalls",
    "patience": "validation checks without improvement before an lr drop",
    "max_drops": "stop after this many lr drops",
    "val_every": "iterations between validation checks",
    "train_steps": "RK4 steps while training (preset per toy)",
    "eval_steps": "RK4 steps for validation, NLL and sampling (preset per toy)",
    "standardize": "standardise the data (NLL is still reported in data space)",
    "chunk_size": "rows per chunk when evaluating",
    "compile": "torch.compile the training RK4 step: auto (compilable blocks, --iters >= 300), on, off",
    "device": "torch device: cpu, cuda, cuda:N",
    "dtype": "float32 or float64",
}
CONFIG_FILE_KEYS = {"method", "data", "train", "otflow", "threads", "versions"}


def _data_choices() -> str:
    """The help text of ``--data``."""
    from . import datasets

    return (
        f"toy name ({', '.join(datasets.TOY_NAMES)}), target spec "
        "(gmm:d=8,k=5,seed=0, banana:d=8,b=0.25, powerlaw:d=7,k=4,seed=0), "
        f"tabular set ({', '.join(datasets.TABULAR_NAMES)}) or a .npy/.csv file"
    )


def _choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of the config options that take a name."""
    from .compiling import COMPILE_MODES
    from .config import CACHE_POLICIES, DTYPES

    return {
        "transport": ("path", "endpoint"),
        "reparam_rule": ("ratio", "arclength"),
        "dtype": tuple(DTYPES),
        "cache_device": CACHE_POLICIES,
        "compile": COMPILE_MODES,
    }


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit status 2.

    ``options`` (sub-commands only) adds the parser's arguments when it is
    first used, so that building the top-level parser imports nothing heavy.
    """

    def __init__(
        self, *args: Any, options: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._options = options

    def _populate(self) -> None:
        if self._options is not None:
            options, self._options = self._options, None
            options(self)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        self._populate()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._populate()
        return super().format_help()

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_config_options(parser: argparse.ArgumentParser, cls: type, help: dict[str, str]) -> None:
    """One ``--option`` per documented field of the config dataclass ``cls``;
    unset options stay None so that a --config file or the default applies."""
    from .config import DEFAULT_STAGES, FIRST_PASS

    choices = _choices()
    for field in dataclasses.fields(cls):
        if field.name not in help:
            continue
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        text = f"{help[field.name]} (default: {default})"
        if default is None and field.name in FIRST_PASS:  # a stage setting: by the block type
            by_type = "; ".join(
                f"{name} blocks: {_shown(plan[field.name])}" for name, plan in DEFAULT_STAGES.items()
            )
            text = f"{help[field.name]} (default: {by_type}; other types: {_shown(FIRST_PASS[field.name])})"
            default = FIRST_PASS[field.name]
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif isinstance(default, tuple):  # tuple[int, ...] or tuple[str, ...]; none given: ()
            kind = str if "str" in str(field.type) else int
            metavar = "NAME" if kind is str else "C"
            parser.add_argument(flag, type=kind, nargs="*", metavar=metavar, default=None, help=text)
        else:
            parser.add_argument(
                flag, type=type(default), choices=choices.get(field.name), default=None, help=text
            )


def _shown(value: Any) -> str:
    """A default as a user types it: ``2`` for (2,), ``none`` for ()."""
    return " ".join(map(str, value)) or "none" if isinstance(value, tuple) else str(value)


def _build_parser() -> argparse.ArgumentParser:
    """The top-level parser; each sub-command's options are added when it is parsed."""
    parser = _Parser(prog="jkoflow", description="Block-wise JKO training of continuous normalizing flows.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (help, options) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help, options=options)
    return parser


def _train_options(train: argparse.ArgumentParser) -> None:
    from .config import JKOConfig

    _add_run_options(train, "data and train", resumable=True)
    _add_config_options(train, JKOConfig, TRAIN_HELP)
    _add_common(train)


def _otflow_options(otflow: argparse.ArgumentParser) -> None:
    from .otflow import OTFlowConfig

    _add_run_options(otflow, "data and otflow")
    _add_config_options(otflow, OTFlowConfig, OTFLOW_HELP)
    _add_common(otflow)


def _compare_options(comp: argparse.ArgumentParser) -> None:
    _add_run_options(comp, "data, train and otflow")
    comp.add_argument("--width", type=int, default=None, help="hidden width of both models (same capacity)")
    comp.add_argument("--budget-batches", type=int, default=None, help="the same mini-batch budget for both")
    comp.add_argument(
        "--budget-seconds", type=float, default=None, help="the same training-time budget for both"
    )
    _add_device(comp, "of both trainers", default=None)
    _add_common(comp)


def _sample_options(sample: argparse.ArgumentParser) -> None:
    sample.add_argument("run", help="run directory")
    sample.add_argument("-n", type=int, required=True, help="number of samples")
    sample.add_argument("-o", "--output", required=True, help="output .npy file")
    sample.add_argument("--seed", type=int, default=0, help="seed of the latent draws")
    _add_device(sample, "to sample on")
    _add_common(sample)


def _eval_options(evaluate: argparse.ArgumentParser) -> None:
    evaluate.add_argument("run", help="run directory")
    evaluate.add_argument("--data", help="data to evaluate on (default: the run's own test split)")
    evaluate.add_argument("--data-root", help="directory of the tabular sets (default: the run's)")
    evaluate.add_argument(
        "--n-samples", type=int, default=20000, help="samples drawn when --data is a toy or target spec"
    )
    evaluate.add_argument("--seed", type=int, default=1, help="seed when --data is a toy or target spec")
    evaluate.add_argument(
        "--eval-steps",
        type=int,
        default=None,
        help="base RK4 steps per block (default: the run's); a block whose steps the trainer's "
        "step control doubled keeps that multiple of the base",
    )
    _add_device(evaluate, "to evaluate on")
    _add_common(evaluate)


def _plot_options(plot: argparse.ArgumentParser) -> None:
    plot.add_argument("run", help="run directory")
    _add_device(plot, "to sample on")
    _add_common(plot)


def _add_run_options(parser: argparse.ArgumentParser, sections: str, resumable: bool = False) -> None:
    """The options of a verb that creates a run: --data, --out, --config, --seed,
    --overwrite and the data options; with ``resumable`` also --resume DIR instead of --out."""
    from .config import DataConfig

    parser.add_argument("--data", help=_data_choices())
    if resumable:
        where = parser.add_mutually_exclusive_group(required=True)
        where.add_argument("--out", help="directory to create")
        where.add_argument(
            "--resume",
            metavar="DIR",
            help="continue the run in DIR from its last checkpoint (options: only budgets, "
            "checkpointing, --lr, --chunk-size; a larger --max-blocks adds blocks to a finished run)",
        )
    else:
        parser.add_argument("--out", required=True, help="directory to create")
    parser.add_argument("--config", help=f"JSON file with {sections} sections (e.g. a run's config.json)")
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of data, split, initialisation and batches"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace what --out already holds")
    _add_config_options(parser, DataConfig, DATA_HELP)


def _add_device(parser: argparse.ArgumentParser, what: str, default: str | None = "cpu") -> None:
    """--device and --dtype of a command (for a trained flow, --dtype defaults to the flow's own)."""
    shown = default or "the config's"
    parser.add_argument("--device", default=default, help=f"torch device {what}: cpu, cuda, cuda:N ({shown})")
    parser.add_argument("--dtype", choices=_choices()["dtype"], default=None, help="float32 or float64")


def _loaded_flow(files: RunFiles, args: argparse.Namespace) -> Flow:
    """The run's flow on ``--device``, in ``--dtype`` when given."""
    from .config import DTYPES, resolve_device

    flow = files.load_flow(resolve_device(args.device))
    return flow if args.dtype is None else flow.to(dtype=DTYPES[args.dtype])


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: fastest for small ops on few cores)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _sections(args: argparse.Namespace) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The config file's sections and the options given on the command line."""
    from .run import read_json

    sections: dict[str, dict[str, Any]] = {"data": {}, "train": {}, "otflow": {}}
    if args.config:
        loaded = read_json(args.config)
        if not isinstance(loaded, dict):
            raise InputError(
                f"{args.config} must hold a JSON object with 'data' and 'train'/'otflow' sections"
            )
        unknown = sorted(set(loaded) - CONFIG_FILE_KEYS)
        if unknown:
            raise InputError(
                f"{args.config}: unknown keys {', '.join(unknown)}; expected data, train, otflow"
            )
        for key in sections:
            section = loaded.get(key, {})
            if not isinstance(section, dict):
                raise InputError(
                    f"{args.config}: the {key!r} section must be a JSON object, got {json.dumps(section)}"
                )
            sections[key].update(section)
    given = {k: v for k, v in vars(args).items() if v is not None}
    if "data" in given:
        sections["data"]["name"] = given["data"]
    if "name" not in sections["data"]:
        raise InputError("no data given: pass --data NAME|FILE or a --config file with a data section")
    if "seed" in given:
        for section in sections.values():
            section["seed"] = given["seed"]
    return sections, given


def _config(
    cls: type, section: dict[str, Any], given: dict[str, Any], preset: dict[str, Any] | None = None
) -> Any:
    """``cls`` from its preset, then the config file's section, then the command line."""
    from .config import config_from_dict

    names = {f.name for f in dataclasses.fields(cls)} - {"name", "seed"}
    if not isinstance(section, dict):
        raise InputError(f"{cls.__name__} settings must be a JSON object, got {type(section).__name__}")
    values = {**(preset or {}), **section, **{k: v for k, v in given.items() if k in names}}
    return config_from_dict(cls, values)


def _train(args: argparse.Namespace) -> None:
    from .config import DataConfig, JKOConfig
    from .distributed import launched
    from .run import load_data, run_jko

    if args.resume is not None:
        data_config, config = _resumed_configs(args)
        args.out = args.resume
    else:
        sections, given = _sections(args)
        data_config = _config(DataConfig, sections["data"], given)
        config = _config(JKOConfig, sections["train"], given)
    try:
        with launched(config.device) as group:  # a process group when run by torchrun
            summary = run_jko(
                args.out,
                data_config,
                config,
                load_data(data_config),
                args.threads,
                args.overwrite,
                not args.quiet,
                resume=args.resume is not None,
                reset_lr=args.resume is not None and args.lr is not None,
            )
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"the trainer's state is saved; continue with: jkoflow train --resume {args.out}"
        ) from None
    if not group.is_main:
        return
    print(_train_line(args.out, summary))
    _warn_steps(summary)


def _train_line(out: str, summary: dict[str, Any]) -> str:
    """The line ``jkoflow train`` ends with: blocks, how it stopped, the
    selected stage, the test NLL with its step check and the Gaussian fit's."""
    selected = summary["selected"] or {}
    chosen = f"; selected: {selected['stage']}" if selected.get("stage") else ""
    gaussian = (summary.get("gaussian") or {}).get("test_nll")
    floor = f"; Gaussian fit {gaussian:.4f}" if gaussian is not None else ""
    return (
        f"{out}: {summary['n_blocks']} blocks ({summary['stopped_by']}{chosen}), "
        f"test NLL {summary['test_nll']:.4f} nats ({_steps_note(summary, '/block')}{floor}), "
        f"{_inversion_note(summary)}, {summary['train_seconds']:.0f} s"
    )


def _inversion_note(figures: dict[str, Any]) -> str:
    """The inversion error of :func:`jkoflow.run.flow_figures` in data units
    and, where stated, over the data's scale.

    >>> _inversion_note({"inversion_error": 3.4e-4, "inversion_error_relative": 1.9e-4})
    "inversion error 3.40e-04 (1.9e-04 of the data's scale)"
    """
    relative = figures.get("inversion_error_relative")
    scaled = f" ({relative:.1e} of the data's scale)" if relative is not None else ""
    return f"inversion error {figures['inversion_error']:.2e}{scaled}"


STEP_DOUBLING_TOLERANCE = 1e-3
"""Largest |NLL change| when the RK4 steps are doubled that reports accept
(docs/design.md, "Integration")."""


def _steps_note(figures: dict[str, Any], per: str = "") -> str:
    """'8 RK4 steps/block, +0.0002 at 16' from a summary's or eval's figures;
    '8–16 RK4 steps/block, … at twice those' when the blocks' own counts differ."""
    from .run import step_range

    fewest, most = step_range(figures)
    change = f"{figures['step_doubling_change']:+.4f}"
    if fewest == most:
        return f"{fewest} RK4 steps{per}, {change} at {2 * fewest}"
    return f"{fewest}–{most} RK4 steps{per}, {change} at twice those"


def _warn_steps(figures: dict[str, Any]) -> None:
    """One line on stderr when the reported NLL is not converged in the step count."""
    change = figures["step_doubling_change"]
    if abs(change) >= STEP_DOUBLING_TOLERANCE:
        print(
            f"warning: doubling the RK4 steps moves the NLL by {change:+.4f} nats "
            f"(≥ {STEP_DOUBLING_TOLERANCE:g}); evaluate with more steps (jkoflow eval RUN --eval-steps N)",
            file=sys.stderr,
        )


def _resumed_configs(args: argparse.Namespace) -> tuple[DataConfig, JKOConfig]:
    """The data and train configs of the run in ``args.resume``, with the
    options given on the command line."""
    from .config import DataConfig, JKOConfig, config_from_dict
    from .run import RunFiles, read_json

    fixed = [f"--{k.replace('_', '-')}" for k in ("data", "config", "seed", *DATA_HELP) if getattr(args, k)]
    if args.overwrite:
        fixed.append("--overwrite")
    if fixed:
        raise InputError(f"{', '.join(fixed)} cannot be used with --resume (the run keeps its data and seed)")
    saved = read_json(RunFiles(args.resume).config)
    if not isinstance(saved, dict) or saved.get("method") != "jko" or "train" not in saved:
        raise InputError(f"{args.resume} does not hold a jkoflow train run")
    given = {k: v for k, v in vars(args).items() if v is not None}
    train = JKOConfig.saved_fields(saved["train"])  # as it was trained
    return config_from_dict(DataConfig, saved["data"]), _config(JKOConfig, train, given)


def _otflow(args: argparse.Namespace) -> None:
    from .config import DataConfig
    from .otflow import OTFLOW_PRESETS, OTFlowConfig
    from .run import load_data, run_otflow

    sections, given = _sections(args)
    data_config = _config(DataConfig, sections["data"], given)
    config = _config(OTFlowConfig, sections["otflow"], given, OTFLOW_PRESETS.get(data_config.name))
    splits = load_data(data_config)
    summary = run_otflow(args.out, data_config, config, splits, args.threads, args.overwrite, not args.quiet)
    print(
        f"{args.out}: OT-Flow, test NLL {summary['test_nll']:.4f} nats ({_steps_note(summary)}), "
        f"best at {summary['best']['n_batches']} batches, {_inversion_note(summary)}, "
        f"{summary['train_seconds']:.0f} s"
    )
    _warn_steps(summary)


def _compare(args: argparse.Namespace) -> None:
    from .compare import compare
    from .config import DataConfig, JKOConfig
    from .otflow import OTFLOW_PRESETS, OTFlowConfig

    sections, given = _sections(args)
    budget: dict[str, Any] = {}
    if args.budget_batches is not None:
        if args.budget_batches < 1:
            raise InputError(f"--budget-batches must be a positive integer, got {args.budget_batches}")
        budget["max_batches"] = args.budget_batches
    if args.budget_seconds is not None:
        if not args.budget_seconds > 0:
            raise InputError(f"--budget-seconds must be positive, got {args.budget_seconds}")
        budget["max_seconds"] = args.budget_seconds
    shared = {k: v for k, v in given.items() if k in ("width", "device", "dtype")}
    data_config = _config(DataConfig, sections["data"], given)
    jko_config = _config(JKOConfig, {**sections["train"], **budget}, shared)
    otflow_budget = {"max_seconds": budget.get("max_seconds", 0.0)}
    if "max_batches" in budget:
        otflow_budget["iters"] = budget["max_batches"]
    otflow_config = _config(
        OTFlowConfig, {**sections["otflow"], **otflow_budget}, shared, OTFLOW_PRESETS.get(data_config.name)
    )
    rows = compare(
        args.out, data_config, jko_config, otflow_config, args.threads, args.overwrite, not args.quiet
    )
    for row in rows:
        kl = "" if row["kl"] is None else f"  KL {row['kl']:.4f} ± {row['kl_stderr']:.4f}"
        print(
            f"{row['method']:>8}: test NLL {row['test_nll']:.4f}{kl}  MMD² {row['mmd2']:.2e}  "
            f"W2 {row['w2']:.4f}  {row['n_batches']} batches  {row['train_seconds']:.0f} s"
        )
    print(f"wrote {args.out}/compare.md, compare.csv, compare.png")


def _sample(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from .atomic import atomic_path
    from .config import check_seed
    from .run import RunFiles

    if args.n < 1:
        raise InputError(f"-n must be a positive integer, got {args.n}")
    check_seed(args.seed)
    output = Path(args.output)
    if output.suffix != ".npy":
        raise InputError(f"-o must name a .npy file, got {args.output!r}")
    if not output.parent.is_dir():
        raise InputError(f"-o {args.output}: directory {output.parent} not found")
    if output.is_dir():
        raise InputError(f"-o {args.output} is a directory")
    flow = _loaded_flow(RunFiles(args.run).require(), args)
    _check_sample_size(args.n, flow, output.parent)
    with torch.no_grad():
        x = flow.sample(args.n, generator=torch.Generator().manual_seed(args.seed))
    with atomic_path(output) as tmp:
        np.save(tmp, x.cpu().numpy())
    print(f"wrote {args.n} samples of dimension {flow.dim} to {args.output}")


SAMPLE_MEMORY_FACTOR = 3
"""Copies of the (n, d) samples that sampling holds at once (latent draws, the
integrated chunks, the joined result)."""


def _check_sample_size(n: int, flow: Flow, folder: Path) -> None:
    """InputError when n samples of ``flow`` would not fit in the free memory
    (:data:`SAMPLE_MEMORY_FACTOR` copies) or on the disk of ``folder``."""
    size = n * flow.dim * flow.shift.element_size()
    free_disk = shutil.disk_usage(folder).free
    if size > free_disk:
        raise InputError(
            f"-n {n}: the samples need {size / 2**30:.3g} GiB, {folder} has {free_disk / 2**30:.3g} GiB free"
        )
    try:
        free_memory = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that reports it
        return
    if SAMPLE_MEMORY_FACTOR * size > free_memory:
        raise InputError(
            f"-n {n}: sampling needs about {SAMPLE_MEMORY_FACTOR * size / 2**30:.3g} GiB of memory, "
            f"{free_memory / 2**30:.3g} GiB are free; draw fewer samples per call"
        )


def _eval(args: argparse.Namespace) -> None:
    from .run import RunFiles, write_json
    from .rundir import RunDir

    files = RunFiles(args.run).require()
    with RunDir.open(files.root) as run:  # no eval of a run that a process is training
        result = _evaluate(files, args)
        write_json(run.claim("eval.json"), result)
    print(
        f"NLL {result['nll']:.4f} nats/sample ({_steps_note(result, '/block')}, "
        f"{result['rows']} rows of {result['data']}); {_inversion_note(result)}"
    )
    _warn_steps(result)
    if "kl" in result:
        print(f"KL(data ‖ model) {result['kl']:.4f} ± {result['kl_stderr']:.4f} nats (exact data density)")


def _evaluate(files: RunFiles, args: argparse.Namespace) -> dict[str, Any]:
    """What eval.json holds: NLL and the flow's figures on the data that ``args`` name."""
    from . import datasets
    from .config import check_seed
    from .metrics import nll
    from .run import flow_figures, load_data, target_kl

    flow = _loaded_flow(files, args)
    if args.eval_steps is not None:
        if args.eval_steps < 1:
            raise InputError(f"--eval-steps must be a positive integer, got {args.eval_steps}")
        flow.steps = args.eval_steps
    data_config = files.data_config()
    if args.data_root is not None:
        data_config = dataclasses.replace(data_config, data_root=args.data_root)
    name = data_config.name if args.data is None else args.data
    if name == data_config.name:
        x = load_data(data_config)[2]
        source = f"{data_config.name} (the run's test split)"
    else:
        check_seed(args.seed)
        x = datasets.load(args.data, n=args.n_samples, seed=args.seed, root=data_config.data_root)
        source = args.data
    if x.shape[1] != flow.dim:
        raise InputError(f"data {source} have {x.shape[1]} columns but the flow has dimension {flow.dim}")
    return {
        "data": source,
        "rows": len(x),
        "nll": nll(flow, x),
        **flow_figures(flow, x),
        **target_kl(flow, name, x),
    }


def _plot(args: argparse.Namespace) -> None:
    from .run import RunFiles, load_data, write_plots
    from .rundir import RunDir

    files = RunFiles(args.run).require()
    with RunDir.open(files.root) as run:
        history = files.history_record()
        x_test = load_data(files.data_config())[2]
        flow = _loaded_flow(files, args)
        write_plots(files, flow, history, x_test, seed=files.data_config().seed, run=run)
    print(f"redrew the plots of {files.root}")


SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "train": ("train a block-wise JKO flow", _train_options),
    "otflow": ("train the monolithic OT-Flow baseline", _otflow_options),
    "compare": ("train jkoflow and OT-Flow on the same split; table and plots", _compare_options),
    "sample": ("draw samples from a trained flow", _sample_options),
    "eval": ("test NLL and inversion error of a trained flow", _eval_options),
    "plot": ("redraw a run's plots", _plot_options),
}
"""Sub-command -> (one-line help, the function that adds its options)."""

COMMANDS = {
    "train": _train,
    "otflow": _otflow,
    "compare": _compare,
    "sample": _sample,
    "eval": _eval,
    "plot": _plot,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    args = _build_parser().parse_args(argv)
    if args.threads < 1:
        print(f"jkoflow: error: --threads must be a positive integer, got {args.threads}", file=sys.stderr)
        return 2
    import torch

    from .distributed import world_from_env

    torch.set_num_threads(args.threads)
    main_rank = True
    try:
        size, rank, _ = world_from_env()
        main_rank = rank == 0  # under torchrun, the ranks agree; only rank 0 reports
        if size > 1 and args.command != "train":
            raise InputError(f"only 'train' runs on several processes; run '{args.command}' as one process")
        COMMANDS[args.command](args)
    except BaseException as error:
        status, line = _failure(error)
        if main_rank:
            print(line, file=sys.stderr)
        return status
    return 0


def _failure(error: BaseException) -> tuple[int, str]:
    """The exit status and the one stderr line of a failed command: 2 for bad
    input, 1 for failed training, a file system error (naming the path) or
    memory running out, 130 for Ctrl-C; anything else is a bug and re-raised."""
    if isinstance(error, InputError):
        return 2, f"jkoflow: error: {error}"
    if isinstance(error, TrainingError):
        return 1, f"jkoflow: training failed: {error}"
    if isinstance(error, KeyboardInterrupt):
        return 130, "jkoflow: interrupted" + (f"; {error}" if str(error) else "")
    if isinstance(error, OSError):
        path = f" {error.filename}" if error.filename is not None else ""
        reason = error.strerror or " ".join(str(error).split())
        return 1, f"jkoflow: error: cannot access{path}: {reason}"
    if isinstance(error, MemoryError):
        return 1, "jkoflow: error: out of memory; use smaller data, batches or -n"
    raise error


if __name__ == "__main__":
    sys.exit(main())
