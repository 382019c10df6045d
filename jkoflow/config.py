"""Configuration dataclasses. Each is JSON-able (``asdict``) and saved with every
run; invalid values raise :class:`~jkoflow.errors.InputError` on construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

import blocks
from blocks import Block

from .errors import InputError

__all__ = [
    "AUTO_BLOCK",
    "DEFAULT_DEPTHS",
    "DEFAULT_STAGES",
    "FIRST_PASS",
    "MLP_MAX_DIM",
    "RESUMABLE",
    "SEED_MAX",
    "VALIDATION_ROWS",
    "DataConfig",
    "JKOConfig",
    "TrainingConfig",
    "auto_block_type",
    "check_positive",
    "check_types",
    "config_from_dict",
    "resolve_device",
    "resolve_dtype",
    "resume_config",
]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
CACHE_POLICIES = ("auto", "device", "host")
DEVICE_TYPES = ("cpu", "cuda")
VALIDATION_ROWS = 4096
"""Validation rows an early-stopping check of a JKO block measures (the first ones)."""
SEED_MAX = 2**32 - 1
"""Largest seed: seeds are 32-bit, as numpy's, so that the seeds derived from
them (per block, per step and rank) fit torch's 64-bit generators."""


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype named ``"float32"`` or ``"float64"``."""
    try:
        return DTYPES[name]
    except KeyError:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}") from None


def parse_device(name: object) -> torch.device:
    """The torch device named ``name``: only CPU and CUDA devices (``"cpu"``,
    ``"cuda"``, ``"cuda:N"``) can train and evaluate flows."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise InputError(f"device must be like 'cpu', 'cuda' or 'cuda:0', got {name!r}")
    return device


def resolve_device(name: str) -> torch.device:
    """The torch device named ``name`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``); a
    CUDA device must exist on this machine."""
    device = parse_device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"device {name!r} asked for, but torch sees no CUDA GPU on this machine")
        if device.index is not None and device.index >= count:
            raise InputError(f"device {name!r} asked for, but torch sees {count} CUDA GPU(s)")
    return device


def _kind(f: dataclasses.Field) -> type | None:
    """The type a config field holds, read from its default."""
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return type(default) if isinstance(default, (bool, int, float, str, dict, tuple)) else None


KIND_NAMES = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}


def check_types(config: Any) -> None:
    """Raises InputError unless every field of the dataclass ``config`` holds a
    value of its default's type (an int also for a float field; floats finite),
    so that JSON such as ``"lr": "x"`` or ``"seed": 1.5`` is refused by name."""
    for f in dataclasses.fields(config):
        kind, value = _kind(f), getattr(config, f.name)
        if kind is None:
            continue
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind)
        if not ok:
            what = KIND_NAMES.get(kind, "a " + ("list" if kind is tuple else "JSON object"))
            raise InputError(f"{f.name} must be {what}, got {value!r}")


def check_seed(seed: int) -> None:
    """Raises InputError unless 0 ≤ ``seed`` ≤ :data:`SEED_MAX`."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise InputError(f"seed must be an integer in [0, {SEED_MAX}], got {seed!r}")


def check_positive(config: Any, names: tuple[str, ...], kind: type) -> None:
    """Raises InputError unless every field in ``names`` is a positive ``kind``."""
    for name in names:
        value = getattr(config, name)
        ok_type = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
        if isinstance(value, bool) or not ok_type or not value > 0:
            what = "number" if kind is float else "integer"
            raise InputError(f"{name} must be a positive {what}, got {value!r}")


def _check_nonnegative(config: Any, hints: dict[str, str]) -> None:
    """Raises InputError unless every field in ``hints`` is a number ≥ 0 (the
    hint says what 0 means)."""
    for name, hint in hints.items():
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise InputError(f"{name} must be a non-negative number ({hint}), got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """Where the data of a run come from and how they are split.

    ``name`` is a toy name or a target spec such as ``gmm:d=8,k=5,seed=0``
    (``n_samples`` are drawn with ``seed``) or a path to a ``.npy``/``.csv``
    file of shape (n, d); the rows are split at random (``seed``) into train,
    validation (``val_fraction``) and test (``test_fraction``). A tabular set
    (``power``, ``gas``, ``hepmass``, ``miniboone``, ``bsds300``) is read
    under ``data_root`` (empty: ``$JKOFLOW_DATA``, else ``data``) with its
    standard preprocessing and split.

    Example:
        >>> from jkoflow import DataConfig
        >>> DataConfig("gmm:d=8,k=5,seed=0", n_samples=5000).to_dict()["n_samples"]
        5000
    """

    name: str = "checkerboard"
    n_samples: int = 120_000
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    data_root: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InputError(f"data must be a toy name or a file path, got {self.name!r}")
        if not isinstance(self.data_root, str):
            raise InputError(f"data_root must be a directory path, got {self.data_root!r}")
        check_types(self)
        check_positive(self, ("n_samples",), int)
        check_seed(self.seed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


AUTO_BLOCK = "auto"
"""The block type name a JKO run resolves from the data's dimension (:func:`auto_block_type`)."""
AUTO_BLOCKS = ("mlp", "otflow")
"""The block types ``"auto"`` chooses between."""
MLP_MAX_DIM = 4
"""Largest data dimension at which ``"auto"`` chooses the free-form ``mlp`` block."""


def auto_block_type(dim: int) -> str:
    """The block type of ``block="auto"`` for data of dimension ``dim``.

    ``"mlp"`` (free-form velocity, exact divergence in closed form, a
    compiled training step) for d ≤ :data:`MLP_MAX_DIM`, ``"otflow"`` (the
    OT-Flow potential) above. On checkerboard and 8gaussians the ``mlp``
    block leaves 64 % and 29 % of the KL that the potential leaves in the same
    steps. In d = 8 (gmm) it was no better when its divergence took d autograd
    passes; with the closed form and a compiled step a depth-1 ``mlp`` step
    costs about half an eager ``otflow`` step there (35 against 65 ms, batch
    1024, 1 thread) for the same NLL on seed 0, and a depth-2 one as much as
    ``otflow``; at d = 43 the depth-2 ``mlp`` step is 1.45× dearer. The
    ``otflow`` step now compiles too (29 ms at d = 8). The threshold was set
    by the measurements with the autograd divergence and not moved
    (docs/benchmarks.md, "Block types").

    >>> from jkoflow.config import auto_block_type
    >>> auto_block_type(2), auto_block_type(8)
    ('mlp', 'otflow')
    """
    return AUTO_BLOCKS[0] if dim <= MLP_MAX_DIM else AUTO_BLOCKS[1]


DEFAULT_DEPTHS = {"mlp": 2, "otflow": 1}
"""The depth M of a block of each type when a config says ``depth=0`` (the
JKO trainer's default); a type not listed gets 1. Two hidden m×m layers for
the ``mlp`` block: its compiled training step leaves room for the second in
the time one eager layer took, and on checkerboard it leaves 0.03 nats less
KL (docs/benchmarks.md, "Block types"). One for ``otflow``, OT-Flow's own
ResNet depth."""


FIRST_PASS: dict[str, Any] = {
    "reparam_iters": 0,
    "refine": (),
    "stage_iters": 0,
    "finetune_iters": 0,
    "finetune_lr": 1e-3,
}
"""The stage settings of the first pass alone (no stage after it): what a
:class:`JKOConfig` stage field left at None takes for a block type without
an entry in :data:`DEFAULT_STAGES`."""

DEFAULT_STAGES: dict[str, dict[str, Any]] = {
    "otflow": {
        "reparam_iters": 1,
        "refine": (2,),
        "stage_iters": 400,
        "finetune_iters": 3000,
        "finetune_lr": 3e-3,
    },
}
"""The stages a run whose blocks are all of one type gets by default (a field
given explicitly wins; a mixed flow gets :data:`FIRST_PASS`). The ``otflow`` potential's
greedy pass stalls: on ``gmm:d=8,k=5,seed=0`` every first pass measured
(width 32–128, depth 1–2, lr 0.01–0.1, h0 2–5, 4–8 RK4 steps, batch
1024–4096) ends at KL 0.05–0.08, and only a joint fine-tuning of the blocks
lowers it, the more the more blocks it tunes. One reparametrisation, a
refinement into half steps and 3000 fine-tuning steps from lr 0.003 take it
to KL 0.027 ± 0.003 over seeds 0–3 in 17–23 minutes (docs/benchmarks.md,
"Fine-tuning at finer steps"). The ``mlp`` block's first pass already meets
the toy targets in two minutes and runs alone (:data:`FIRST_PASS`)."""


def _check_count(config: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(f"{name} must be a non-negative integer, got {value!r}")


@dataclass(frozen=True)
class TrainingConfig:
    """Settings shared by the JKO trainer and the OT-Flow baseline.

    ``block`` names a registered block type, built with
    ``blocks.make(block, dim=d, width=width, depth=depth, **block_options)``
    (:meth:`make_block`; ``depth=0`` takes the type's entry of
    :data:`DEFAULT_DEPTHS`; a ``block_options`` entry keyed by a block type this
    config uses holds options for that type only, e.g. ``{"mlp": {"activation":
    "softplus"}}``, and may override ``width`` and ``depth``);
    ``iters`` Adam steps with mini-batches of ``batch_size`` (0: automatic,
    :meth:`batch_for`: min(:attr:`AUTO_BATCH`, training rows)) and initial
    learning rate ``lr``; ``train_steps`` RK4 steps per block in training and
    ``eval_steps`` for evaluation and sampling; training stops after
    ``max_seconds`` of optimisation (0: no limit).

    Compilation (:mod:`jkoflow.compiling`): ``compile="auto"`` trains
    compilable blocks (``mlp``, ``otflow``) with a :func:`torch.compile`-d RK4 step when
    ``iters`` ≥ :data:`~jkoflow.compiling.COMPILE_MIN_ITERS` and
    ``max_seconds`` is 0 or at least
    :data:`~jkoflow.compiling.COMPILE_MIN_SECONDS` (about 2× faster steps on
    a CPU for a one-off cost of 3–20 s), ``"on"`` always, ``"off"`` never;
    the numbers agree to rounding.

    Reliability (:mod:`jkoflow.loop`): with a checkpoint file the trainer's
    state is written every ``checkpoint_every`` Adam steps (0: only at block
    ends / validations); a non-finite loss or gradient rolls back to the last
    good state, multiplies the learning rate by ``nan_lr_factor`` and retries,
    at most ``nan_retries`` times per block.

    Example:
        >>> from jkoflow.config import TrainingConfig
        >>> config = TrainingConfig(block="mlp", width=16, block_options={"mlp": {"activation": "softplus"}})
        >>> block = config.make_block(dim=3)
        >>> type(block).__name__, block.width
        ('MLPBlock', 16)
    """

    block: str = "otflow"
    width: int = 32
    depth: int = 1
    block_options: dict[str, Any] = field(default_factory=dict)
    AUTO_BATCH: ClassVar[int] = 2048
    """The mini-batch size of ``batch_size=0`` when the training set is at least that large."""

    iters: int = 400
    batch_size: int = 0
    lr: float = 0.05
    train_steps: int = 4
    eval_steps: int = 8
    max_seconds: float = 0.0
    standardize: bool = False
    seed: int = 0
    chunk_size: int = 16384
    device: str = "cpu"
    dtype: str = "float32"
    compile: str = "auto"
    checkpoint_every: int = 100
    nan_retries: int = 3
    nan_lr_factor: float = 0.5

    def __post_init__(self) -> None:
        check_types(self)
        check_positive(self, ("lr",), float)
        _check_count(self, ("checkpoint_every", "nan_retries", "batch_size"))
        if not (isinstance(self.nan_lr_factor, (int, float)) and 0 < self.nan_lr_factor < 1):
            raise InputError(f"nan_lr_factor must be in (0, 1), got {self.nan_lr_factor!r}")
        check_positive(self, ("width", "iters", "train_steps", "eval_steps", "chunk_size"), int)
        _check_count(self, ("depth",))
        check_seed(self.seed)
        if self.train_steps > self.eval_steps:
            raise InputError(
                f"train_steps ({self.train_steps}) must not exceed eval_steps ({self.eval_steps})"
            )
        if not (isinstance(self.max_seconds, (int, float)) and self.max_seconds >= 0):
            raise InputError(f"max_seconds must be ≥ 0 (0: no limit), got {self.max_seconds!r}")
        if not isinstance(self.block_options, dict):
            raise InputError(f"block_options must be a dict, got {type(self.block_options).__name__}")
        for name in self.block_types_used():
            if name not in blocks.names():
                raise InputError(
                    f"unknown block type {name!r}; registered types: {', '.join(blocks.names())}"
                )
            if name in self.block_options and not isinstance(self.block_options[name], dict):
                raise InputError(f"block_options[{name!r}] must be a dict of options for {name!r} blocks")
        resolve_dtype(self.dtype)
        parse_device(self.device)
        from .compiling import COMPILE_MODES  # jkoflow.compiling imports blocks and the integrator only

        if self.compile not in COMPILE_MODES:
            raise InputError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")

    def batch_for(self, rows: int, processes: int = 1) -> int:
        """The mini-batch size on a training set of ``rows`` rows: ``batch_size``,
        or with ``batch_size=0`` min(:attr:`AUTO_BATCH`, ``rows``). Raises
        InputError when a given size exceeds ``rows`` or the batch is smaller
        than the number of ``processes``.

        >>> from jkoflow.config import TrainingConfig
        >>> auto, fixed = TrainingConfig(), TrainingConfig(batch_size=64)
        >>> auto.batch_for(1257), auto.batch_for(100_000), fixed.batch_for(1257)
        (1257, 2048, 64)
        """
        batch = self.batch_size or min(self.AUTO_BATCH, rows)
        if rows < batch:
            raise InputError(
                f"the training set has {rows} rows but batch_size is {batch}; "
                "lower the batch size (0: automatic) or give more data"
            )
        if batch < processes:
            raise InputError(f"batch_size ({batch}) must be at least the number of processes ({processes})")
        return batch

    def block_types_used(self) -> tuple[str, ...]:
        """The block type names this config can build."""
        return (self.block,)

    def block_type(self, k: int, dim: int | None = None) -> str:
        """The type name of block k (0-based) for data of dimension ``dim``."""
        return self.block

    def depth_for(self, name: str) -> int:
        """The depth M of a block of type ``name``: ``depth``, or with ``depth=0``
        the type's entry of :data:`DEFAULT_DEPTHS` (1 for a type not listed).

        >>> from jkoflow import JKOConfig
        >>> JKOConfig().depth_for("mlp"), JKOConfig().depth_for("otflow"), JKOConfig(depth=3).depth_for("mlp")
        (2, 1, 3)
        """
        return self.depth or DEFAULT_DEPTHS.get(name, 1)

    def make_block(self, dim: int, k: int = 0) -> Block:
        """A new block k (0-based) of its configured type for data of dimension ``dim``."""
        name = self.block_type(k, dim)
        used = self.block_types_used()
        shared = {key: value for key, value in self.block_options.items() if key not in used}
        options = {
            "width": self.width,
            "depth": self.depth_for(name),
            **shared,
            **self.block_options.get(name, {}),
        }
        try:
            return blocks.make(name, **options, dim=dim)
        except (TypeError, ValueError) as error:
            raise InputError(f"cannot build a {name!r} block: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class JKOConfig(TrainingConfig):
    """Settings of the block-wise JKO trainer (docs/design.md, "The JKO step" and
    "The scheduler and its stages").

    Shared settings (block, optimisation, integration steps, device) are
    those of :class:`TrainingConfig`, except that ``block`` defaults to
    ``"auto"``: the free-form ``mlp`` block in d ≤ :data:`MLP_MAX_DIM`, the
    OT-Flow potential ``otflow`` above (:func:`auto_block_type`), and
    ``depth`` to 0: each type's depth in :data:`DEFAULT_DEPTHS` (``mlp`` 2,
    ``otflow`` 1).

    Schedule: block k (k = 0, 1, …) uses h_k = min(h0·ρ^k, h_max); blocks are
    added until Ter(k) < ``ter_eps`` while the block lowered the validation
    NLL by less than ``gain_eps`` nats (0: Ter alone; the first block of a
    stage is judged by Ter alone), or ``max_blocks`` blocks exist.

    Optimisation per block: ``iters`` Adam steps on mini-batches of
    ``batch_size`` cached pushed samples (0: min(1024, training rows)), lr cosine-decayed from ``lr`` to
    ``lr * lr_final_factor``. Each block starts from its type's initialisation
    (near the identity map for ``otflow``, so the step starts at p_{k−1}); with
    ``warm_start`` block k starts from the weights of block k − 1 instead.

    The defaults (1200 steps of batch 1024 per block) were tuned on
    checkerboard (2 CPU cores, 1 thread) with ``otflow`` blocks: about 110 s
    per block, test NLL 3.59–3.62 nats after 2 blocks over seeds 0–3, where
    400 steps of batch 2048 gave 3.67. More steps of smaller batches paid off
    per second. With the depth-2 ``mlp`` blocks ``"auto"`` picks there and
    their compiled training steps, the default run reaches 3.512–3.523 in
    123–178 s (docs/benchmarks.md, "The default command").

    Mixed flows: with ``block_types`` non-empty, block k is of type
    ``block_types[min(k, len(block_types) − 1)]`` (the last entry repeats) and
    ``block`` is not used; e.g. ``("otflow", "otflow", "mlp")``.

    Early stopping (:class:`jkoflow.loop.Plateau`): before its first step,
    every ``val_every`` Adam steps (0: never) and after its last, a block's
    validation NLL is measured (on up to :data:`VALIDATION_ROWS` rows) with
    its step-doubling change; a check is valid when that change is below
    ``step_tol``. The block keeps its weights at the best valid check; in the
    second half of its steps it stops once its last ``patience`` checks are
    all above the best by more than twice their standard error (it
    overfits), and at any step at an invalid check after a valid one (it has
    begun to fit its RK4 discretisation; the step control then trains on at
    doubled steps from the best valid weights). So ``iters`` is an upper
    bound, a block on small data stops once it overfits, no block is worse
    on the validation rows than the flow before it, and none keeps weights
    whose NLL is its RK4 map's rather than the model's.

    Integration: ``train_steps`` RK4 steps per block in training,
    ``eval_steps`` for pushing, NLL and sampling. Step control
    (docs/design.md, "Integration"): after a block is trained, if its
    step-doubling change is at least ``step_tol`` nats or its relative
    inversion error at least ``inversion_tol``, or one of its checks was
    invalid, it trains on with its train steps doubled for a quarter of its
    Adam steps more, at most ``step_doublings`` times (0: only measure).
    The block kept is then evaluated (not trained) at doubled steps, at most
    ``step_doublings`` times, while the round trip of the flow up to it,
    E‖x − T⁻¹(T(x))‖ over the data's per-coordinate scale (estimated from
    the validation rows and the 1 % of training rows farthest out), is at
    least ``inversion_tol / 2``; a flow whose round trip is at least
    ``inversion_tol`` is not returned.

    Stages after the initial pass (docs/design.md, "The scheduler and its stages";
    :mod:`jkoflow.stages`): up to ``reparam_iters``
    reparametrisation iterations, h_k ← clip(h_k + η(h*_k − h_k), ``h_min``,
    ``h_max``) with η = ``reparam_eta`` and h*_k = h_k·S̄/S_k
    (``reparam_rule="ratio"``) or the equal-arc-length cut of the cumulative
    time (``"arclength"``, :func:`jkoflow.stages.reparametrize`), until the spread
    max|S_k − S̄|/S̄ < ``reparam_tol``; then one refinement stage per entry c of
    ``refine`` (every block split into c time slices trained at h_k/c). Blocks
    retrained in these stages get ``stage_iters`` Adam steps (0: ``iters``),
    with the cosine schedule starting from ``stage_lr`` (0: ``lr``): they
    start trained, and a restart at the new-block ``lr`` would first undo them.
    With ``free_block`` a last ``free`` stage adds one block trained on the
    KL alone, without the W2 term (JKO-iFlow's free block), for ``iters``
    steps. With ``finetune_iters > 0`` a last ``finetune`` stage trains all
    the blocks of the run together on the NLL of the whole flow for that
    many Adam steps, from ``finetune_lr`` (:mod:`jkoflow.finetune`).
    Neither stage passes over the training set more than ``stage_epochs``
    times (0: no bound): a retrained block and the fine-tuning get at most
    ceil(``stage_epochs`` · rows / batch) Adam steps
    (:meth:`jkoflow.stages.PlanContext.stage_steps`).
    On large data the bound does not act (3000 steps of batch 1024 on 96 000
    rows are 32 passes); on a small set, where a step is most of a pass, it
    keeps a stage from running for an hour after it has begun to overfit.

    Default stages: the stage fields ``reparam_iters``, ``refine``,
    ``stage_iters``, ``finetune_iters`` and ``finetune_lr`` left at None take
    the values of the run's block type (:meth:`stages_for`): for ``otflow``
    blocks (``"auto"`` in d > 4) one reparametrisation, a refinement with
    c = 2 at 400 steps per block and 3000 fine-tuning steps from 0.003
    (:data:`DEFAULT_STAGES`); for ``mlp`` blocks, other types and mixed flows
    the first pass alone (:data:`FIRST_PASS`). A trainer runs, and saves, the
    :meth:`resolved` config.

    Budget: training stops once ``max_batches`` mini-batches or
    ``max_seconds`` of training (0: no limit) are spent; the block in training
    then ends early, is pushed and recorded, and no further block or stage runs.

    Reliability: with a checkpoint file, the trainer's state is written at the
    end of every block and every ``checkpoint_every`` Adam steps inside a block
    (0: block ends only). A non-finite loss or gradient rolls the block back to
    its last good state (block start or last checkpoint step), multiplies its
    learning rate by ``nan_lr_factor`` and retries, at most ``nan_retries``
    times per block.

    Memory: ``cache_device`` says where the cached pushed samples live,
    ``"auto"`` (on the compute device when they fit, else in host memory),
    ``"device"`` or ``"host"`` (:mod:`jkoflow.cache`); the numbers do not depend
    on it.

    Options that can change when a run is resumed: :data:`RESUMABLE`.

    Example:
        >>> import jkoflow
        >>> config = jkoflow.JKOConfig(h0=2.0, rho=2.0, h_max=10.0)
        >>> [config.step_size(k) for k in range(4)]  # h_k = min(h0·ρ^k, h_max)
        [2.0, 4.0, 8.0, 10.0]

    References:
        | Normalizing flow neural networks by JKO scheme (Xu et al., 2023)
        | https://arxiv.org/abs/2212.14424
    """

    AUTO_BATCH: ClassVar[int] = 1024
    block: str = AUTO_BLOCK
    depth: int = 0
    SAVED_DEFAULTS: ClassVar[dict[str, Any]] = {
        "val_every": 0,
        "stage_lr": 0.0,
        "gain_eps": 0.0,
        "stage_epochs": 0,
        **FIRST_PASS,
    }
    """Fields added after runs were saved, with the values that train as those
    runs did (no early stopping, stages at ``lr``, the Ter rule alone, no stage
    a run did not name): what a resumed run that lacks them gets (:meth:`from_saved`)."""

    iters: int = 1200
    h0: float = 5.0
    rho: float = 1.5
    h_max: float = 20.0
    max_blocks: int = 8
    ter_eps: float = 0.01
    gain_eps: float = 0.005
    lr_final_factor: float = 0.02
    warm_start: bool = False
    transport: str = "path"
    reparam_iters: int | None = None
    reparam_tol: float = 0.15
    reparam_eta: float = 0.5
    reparam_rule: str = "ratio"
    h_min: float = 0.05
    refine: tuple[int, ...] | None = None
    free_block: bool = False
    block_types: tuple[str, ...] = ()
    stage_iters: int | None = None
    stage_lr: float = 0.01
    max_batches: int = 0
    cache_device: str = "auto"
    step_tol: float = 1e-3
    inversion_tol: float = 1e-4
    step_doublings: int = 2
    val_every: int = 100
    patience: int = 3
    finetune_iters: int | None = None
    finetune_lr: float | None = None
    stage_epochs: int = 100

    def __post_init__(self) -> None:
        for name in ("refine", "block_types"):  # JSON gives lists
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if not isinstance(self.block_types, tuple) or not all(isinstance(b, str) for b in self.block_types):
            raise InputError(f"block_types must be a list of block type names, got {self.block_types!r}")
        super().__post_init__()
        positive = ("h0", "rho", "h_max", "ter_eps", "reparam_tol", "h_min", "step_tol", "inversion_tol")
        check_positive(self, positive, float)
        check_positive(self, ("max_blocks",), int)
        _check_count(self, ("max_batches", "step_doublings", "val_every", "stage_epochs"))
        _check_count(
            self, tuple(n for n in ("reparam_iters", "stage_iters", "finetune_iters") if self._given(n))
        )
        if self._given("finetune_lr"):
            check_positive(self, ("finetune_lr",), float)
        _check_nonnegative(self, {"gain_eps": "0: the Ter rule alone", "stage_lr": "0: lr"})
        check_positive(self, ("patience",), int)
        if not 0 <= self.lr_final_factor <= 1:
            raise InputError(f"lr_final_factor must be in [0, 1], got {self.lr_final_factor!r}")
        if self.h_min > self.h_max:
            raise InputError(f"h_min ({self.h_min}) must not exceed h_max ({self.h_max})")
        if not (isinstance(self.reparam_eta, (int, float)) and 0 < self.reparam_eta <= 1):
            raise InputError(f"reparam_eta must be in (0, 1], got {self.reparam_eta!r}")
        if self._given("refine") and (
            not isinstance(self.refine, tuple)
            or any(isinstance(c, bool) or not isinstance(c, int) or c < 2 for c in self.refine)
        ):
            raise InputError(f"refine factors must be integers ≥ 2, got {self.refine!r}")
        from .stages import REPARAM_RULES  # the registry (jkoflow.stages imports this module)

        if self.reparam_rule not in REPARAM_RULES:
            raise InputError(
                f"reparam_rule must be one of {', '.join(map(repr, REPARAM_RULES))}, "
                f"got {self.reparam_rule!r}"
            )
        if self.transport not in ("path", "endpoint"):
            raise InputError(f"transport must be 'path' or 'endpoint', got {self.transport!r}")
        if self.cache_device not in CACHE_POLICIES:
            raise InputError(
                f"cache_device must be one of {', '.join(CACHE_POLICIES)}, got {self.cache_device!r}"
            )

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> JKOConfig:
        """The config of a saved run (checkpoint or config.json): fields it lacks
        take :attr:`SAVED_DEFAULTS`, so it resumes as it was trained."""
        return config_from_dict(cls, cls.saved_fields(data)) if isinstance(data, dict) else data

    @classmethod
    def saved_fields(cls, data: Any) -> Any:
        """The fields of a saved config with :attr:`SAVED_DEFAULTS` for those it
        lacks (``data`` as it is when it is not a dict, for the checks to refuse)."""
        return {**cls.SAVED_DEFAULTS, **data} if isinstance(data, dict) else data

    def block_types_used(self) -> tuple[str, ...]:
        names = self.block_types or (self.block,)
        resolved = (AUTO_BLOCKS if name == AUTO_BLOCK else (name,) for name in names)
        return tuple(dict.fromkeys(name for group in resolved for name in group))

    def block_type(self, k: int, dim: int | None = None) -> str:
        """The type name of block k (0-based) for data of dimension ``dim``;
        ``"auto"`` resolves by :func:`auto_block_type` and needs ``dim``."""
        name = self.block_types[min(k, len(self.block_types) - 1)] if self.block_types else self.block
        if name != AUTO_BLOCK:
            return name
        if dim is None:
            raise ValueError(f"block {k} is of type 'auto': its type depends on the data dimension dim")
        return auto_block_type(dim)

    def _given(self, name: str) -> bool:
        return getattr(self, name) is not None

    def stages_for(self, dim: int) -> dict[str, Any]:
        """The stage settings a run on data of dimension ``dim`` gets: the
        fields given, and for those left at None the entry of
        :data:`DEFAULT_STAGES` for the type of the run's blocks (a mixed flow,
        or a type without an entry: :data:`FIRST_PASS`).

        >>> from jkoflow import JKOConfig
        >>> JKOConfig().stages_for(2)["finetune_iters"], JKOConfig().stages_for(8)["finetune_iters"]
        (0, 3000)
        >>> JKOConfig(refine=()).stages_for(8)["refine"]  # a given field wins
        ()
        """
        types = {self.block_type(k, dim) for k in range(max(1, len(self.block_types)))}
        plan = DEFAULT_STAGES.get(types.pop(), FIRST_PASS) if len(types) == 1 else FIRST_PASS
        return {
            name: plan[name] if getattr(self, name) is None else getattr(self, name) for name in FIRST_PASS
        }

    def resolved(self, dim: int) -> JKOConfig:
        """This config with every stage field set (:meth:`stages_for`): what a
        trainer on data of dimension ``dim`` runs and saves."""
        return dataclasses.replace(self, **self.stages_for(dim))

    @property
    def retrain_iters(self) -> int:
        """Adam steps per block in reparametrisation and refinement stages
        (of a :meth:`resolved` config)."""
        if self.stage_iters is None:
            raise ValueError("stage_iters is None: resolve the config for the data first (resolved(dim))")
        return self.stage_iters or self.iters

    def step_size(self, k: int) -> float:
        """h_k = min(h0·ρ^k, h_max) for block k (0-based)."""
        return min(self.h0 * self.rho**k, self.h_max)


RESUMABLE = (
    "max_blocks",
    "max_batches",
    "max_seconds",
    "checkpoint_every",
    "nan_retries",
    "nan_lr_factor",
    "lr",
    "chunk_size",
    "cache_device",
    "compile",
    "finetune_iters",
    "finetune_lr",
    "stage_epochs",
)
"""JKOConfig fields a resumed run may change: budgets, checkpointing, fault
handling, the learning rate (e.g. after a run stopped on non-finite losses),
where the cached samples live, ``max_blocks`` (to add blocks to a finished
flow) the fine-tuning and the passes it may take (to fine-tune a finished
flow) and whether the RK4 step is compiled (the numbers agree to rounding)."""


def resume_config(saved: JKOConfig, given: JKOConfig) -> JKOConfig:
    """``given`` if it differs from the config of a checkpoint (``saved``) only in
    :data:`RESUMABLE` fields, or in a ``depth`` that builds the same blocks
    (0 and the types' :data:`DEFAULT_DEPTHS`); InputError otherwise."""
    changed = [
        f.name for f in dataclasses.fields(type(saved)) if getattr(saved, f.name) != getattr(given, f.name)
    ]
    if "depth" in changed and all(  # depth 0 and the type's depth build the same blocks
        saved.depth_for(name) == given.depth_for(name) for name in saved.block_types_used()
    ):
        changed.remove("depth")
    fixed = [name for name in changed if name not in RESUMABLE]
    if fixed:
        raise InputError(
            f"cannot change {', '.join(fixed)} when resuming (they shaped the saved blocks); "
            f"only {', '.join(RESUMABLE)} may change"
        )
    return given


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Builds the dataclass ``cls`` from a dict, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise InputError(f"{cls.__name__} settings must be a JSON object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"unknown {cls.__name__} keys: {', '.join(unknown)}")
    return cls(**data)
