"""Every check that can refuse a run, done before anything is created or changed.

:func:`check_training` builds what training would build first: the device, the
data as tensors in the run's dtype, the standardisation and the first blocks.
:func:`check_resume` reads (never writes) the run directory and the trainer's
state of a run to continue and decides what resuming it means. A run whose
checks pass is then started in its directory (:mod:`jkoflow.rundir`); one
whose checks fail leaves the disk as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .checkpoint import TrainerState, data_fingerprint, load_state
from .config import JKOConfig, TrainingConfig, resolve_device, resolve_dtype, resume_config
from .errors import InputError
from .finetune import wants_finetune
from .flow import Flow
from .serialization import reading_content

__all__ = ["Resume", "check_resume", "check_training", "data_tensor"]


def data_tensor(x: np.ndarray | Tensor, dim: int, dtype: torch.dtype, what: str) -> Tensor:
    """``x`` as an (n, dim) CPU tensor of ``dtype``; InputError for another
    shape, for NaN or infinite values, and for values that ``dtype`` cannot hold."""
    x = torch.as_tensor(np.asarray(x))
    if not x.is_floating_point():
        x = x.double()
    if x.dim() != 2 or x.shape[1] != dim or len(x) == 0:
        raise InputError(f"{what} must have shape (n, {dim}) with n ≥ 1, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise InputError(f"{what} hold NaN or infinite values")
    cast = x.to(dtype)
    if not torch.isfinite(cast).all():
        name = str(dtype).removeprefix("torch.")
        raise InputError(
            f"{what} hold values up to {float(x.abs().max()):.3g}, beyond the range of {name} "
            f"(±{torch.finfo(dtype).max:.3g}); use --dtype float64 or rescale the data"
        )
    return cast


def check_training(
    config: TrainingConfig,
    splits: tuple[np.ndarray, np.ndarray, np.ndarray],
    n_blocks: int = 1,
    processes: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Checks that ``config`` can start training on ``splits`` (train, val,
    test): the device exists, the data fit the dtype, the batch fits the
    training set (and the ``processes``), the standardisation is defined and
    the first ``n_blocks`` blocks can be built on the device. Returns the
    splits as tensors in the config's dtype (on the CPU)."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype)
    first = np.asarray(splits[0])
    dim = first.shape[1] if first.ndim == 2 else -1
    tensors = tuple(
        data_tensor(x, dim, dtype, f"the {name} data")
        for x, name in zip(splits, ("training", "validation", "test"), strict=True)
    )
    config.batch_for(len(tensors[0]), processes)
    Flow.for_data(tensors[0], config.eval_steps, config.standardize)
    for k in range(n_blocks):
        config.make_block(dim, k).to(device=device, dtype=dtype)
    return tensors


@dataclass(frozen=True)
class Resume:
    """What resuming a run means.

    Attributes:
        config: The run's config with the options given for the resumed run.
        state: The trainer's saved state.
        finalize: The state is finished and ``config`` adds no block, but the
            run's final files are missing: write them from the state, train nothing.

    Example:
        >>> import dataclasses, tempfile
        >>> from pathlib import Path
        >>> from jkoflow.checkpoint import TrainerState, data_fingerprint, save_state
        >>> from jkoflow.preflight import check_resume
        >>> data = (torch.randn(40, 2), torch.randn(10, 2), torch.randn(10, 2))
        >>> config = jkoflow.JKOConfig(width=4, max_blocks=1)
        >>> flow = jkoflow.Flow(2, [config.make_block(2, 0)], steps=2)
        >>> state = TrainerState(  # a finished one-block run
        ...     config=config.to_dict(), history={"stages": []}, flow=flow, parents=None, first=0,
        ...     batches=5, seconds=0.1, finished=True, block=None,
        ...     data={name: data_fingerprint(x) for name, x in zip(("train", "val", "test"), data)},
        ...     generator=torch.Generator().get_state(), torch_rng=torch.get_rng_state(),
        ... )
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     trainer = Path(tmp) / "trainer.pt"
        ...     save_state(state, trainer)
        ...     more = check_resume(trainer, (), dataclasses.replace(config, max_blocks=2), data)
        ...     final = check_resume(trainer, (Path(tmp) / "flow.pt",), config, data)
        >>> more.finalize, more.config.max_blocks, len(more.state.flow)  # train a second block
        (False, 2, 1)
        >>> final.finalize  # finished, no new block, flow.pt missing: write the final files
        True
    """

    config: JKOConfig
    state: TrainerState
    finalize: bool


def check_resume(
    trainer: Path, finals: tuple[Path, ...], config: JKOConfig, data: tuple[Tensor, Tensor, Tensor]
) -> Resume:
    """Checks that the run whose trainer state is ``trainer`` can continue with
    ``config`` (which may differ only in resumable options) on the same
    ``data`` (train, val, test as :func:`check_training` returns them): refuses
    lowering ``max_blocks`` below a half-trained block, and a finished run that
    would get no new block while its final files ``finals`` all exist."""
    if not trainer.is_file():
        raise InputError(f"nothing to resume in {trainer.parent}: {trainer.name} not found")
    with reading_content(trainer, "training checkpoint"):
        state = load_state(trainer)
        saved = JKOConfig.from_saved(state.config)
        open_kind = state.history["stages"][-1]["kind"] if state.history["stages"] else "initial"
        for name, x in zip(("train", "val", "test"), data, strict=True):
            if not np.allclose(data_fingerprint(x), state.data[name], rtol=1e-9):
                raise InputError(f"the {name} data differ from those {trainer} was trained on")
    dim = state.flow.dim
    config = resume_config(saved.resolved(dim), config.resolved(dim))
    if state.finished:
        if len(state.flow) < config.max_blocks or wants_finetune(config, open_kind):
            return Resume(config, state, finalize=False)
        if all(path.is_file() for path in finals):
            raise InputError(
                f"training in {trainer.parent} has finished with {len(state.flow)} blocks; pass "
                f"--max-blocks above {len(state.flow)} to add blocks, or --finetune-iters N to fine-tune them"
            )
        return Resume(config, state, finalize=True)
    block = state.block
    if block is not None and open_kind in ("initial", "extend") and block.index >= config.max_blocks:
        raise InputError(
            f"{trainer.parent} stopped while training block {block.index + 1}; resume with "
            f"--max-blocks {block.index + 1} or more (a half-trained block is not kept)"
        )
    return Resume(config, state, finalize=False)
