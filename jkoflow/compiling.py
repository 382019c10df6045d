"""The compiled RK4 step of training (:func:`torch.compile`, docs/design.md, "Integration").

A training step integrates its block over ``train_steps`` RK4 steps and
back-propagates through them. In eager mode each step is some hundred small
tensor operations, and their per-operation cost, not arithmetic, bounds a
step on a CPU. Compiling :func:`jkoflow.ode.rk4_step` fuses them: on a 2-vCPU
VM (1 thread, d = 2, width 32, batch 1024, 4 RK4 steps) an ``mlp`` training
step takes 14 ms instead of 29–33 ms at depth 1, and 21.5 ms instead of
41–44 ms at the default depth 2. Compiling costs about 15 s the first time
a block architecture is seen and about 3 s once torch's on-disk cache holds it;
the compiled code then serves every block of that architecture, every RK4 step
and every step count.

Only blocks whose :attr:`~blocks.Block.compilable` is true (their forward
is plain tensor algebra: the ``mlp`` block's closed-form divergence, the
``otflow`` block's trace recursion with its hand-written autograd Functions,
29 ms instead of 55 ms per step at d = 8) are
compiled. A compilation that fails (no C++ compiler, an unsupported
platform) warns once and trains on eagerly: the numbers are the same to
rounding either way. Evaluation, pushing and sampling stay eager.

Example:
    >>> import blocks
    >>> from jkoflow.compiling import training_stepper
    >>> from jkoflow.ode import rk4_step
    >>> training_stepper(blocks.make("mlp", dim=2, hutchinson=True), "auto", iters=1200) is rk4_step
    True
    >>> training_stepper(blocks.make("mlp", dim=2), "auto", iters=20) is rk4_step  # too short to pay
    True
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from blocks import Block

from .errors import InputError
from .ode import Stepper, rk4_step

__all__ = [
    "COMPILE_MIN_ITERS",
    "COMPILE_MIN_SECONDS",
    "COMPILE_MODES",
    "EAGER_BATCHES",
    "RECOMPILE_LIMIT",
    "CompiledStep",
    "stepper_at",
    "training_stepper",
]

COMPILE_MODES = ("auto", "on", "off")
"""Values of :attr:`jkoflow.TrainingConfig.compile`."""
COMPILE_MIN_ITERS = 300
"""``"auto"`` compiles the training step of a compilable block trained for at
least this many Adam steps: 300 steps save about 5 s, what a compilation
costs once cached (a cold one pays back within a block of the default 1200)."""
EAGER_BATCHES = 100
"""A run (JKO or OT-Flow baseline) takes its first mini-batches with the eager
step (:func:`stepper_at`), so that its first validation check (after 100
steps, 4–5 s) comes before the compilation (15–30 s on a cold cache, 5–10 s
with a warm one): a user sees the validation NLL fall at once, and both
curves of ``jkoflow compare`` start there."""
RECOMPILE_LIMIT = 64
"""How many graphs of the RK4 step (one per block architecture, dtype,
device and HJB flag) a process may compile: torch's default of 8 would send
a notebook or a test session that trains more architectures back to eager
steps. Raised only around this step's calls."""
COMPILE_MIN_SECONDS = 60.0
"""``"auto"`` does not compile a run whose time budget (``max_seconds > 0``) is
shorter than this: a cold compilation would take a third of it."""


class CompiledStep:
    """:func:`jkoflow.ode.rk4_step` compiled by :func:`torch.compile` (whole
    graph, ``backend`` inductor by default), with the same signature; it falls
    back to the eager step, with one warning, if compiling fails.

    Example:
        >>> from jkoflow.compiling import CompiledStep
        >>> CompiledStep().fallback is None  # nothing compiled until the first call
        True
    """

    def __init__(self, backend: str = "inductor") -> None:
        self.compiled = torch.compile(rk4_step, fullgraph=True, backend=backend)
        self.fallback: str | None = None

    def __call__(
        self, block: Block, z: Tensor, t: Tensor, dt: Tensor, hjb: bool = False
    ) -> tuple[Tensor, ...]:
        if self.fallback is None:
            try:
                with _recompile_limit(RECOMPILE_LIMIT):
                    return self.compiled(block, z, t, dt, hjb)
            except Exception as error:  # a platform that cannot compile: train on eagerly
                self.fallback = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                warnings.warn(
                    f"torch.compile of the RK4 step failed ({self.fallback}); training eagerly "
                    "(set compile='off' to skip the attempt)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return rk4_step(block, z, t, dt, hjb)

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a CompiledStep is not picklable; build a new one where it is needed")


def _recompile_limit(limit: int) -> Any:
    """A context in which dynamo may compile ``limit`` graphs of one function
    (its option is ``recompile_limit``, ``cache_size_limit`` before torch 2.6)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{name: limit})


def stepper_at(stepper: Stepper, batches: int) -> Stepper:
    """The RK4 step of a run's mini-batch after ``batches`` of them: the eager
    :func:`~jkoflow.ode.rk4_step` for the first :data:`EAGER_BATCHES`, then
    ``stepper`` (compiled or not).

    Example:
        >>> from jkoflow.compiling import CompiledStep, stepper_at
        >>> from jkoflow.ode import rk4_step
        >>> compiled = CompiledStep()
        >>> stepper_at(compiled, 0) is rk4_step, stepper_at(compiled, EAGER_BATCHES) is compiled
        (True, True)
    """
    return stepper if batches >= EAGER_BATCHES else rk4_step


def training_stepper(block: Block, mode: str, iters: int, max_seconds: float = 0.0) -> Stepper:
    """The RK4 step to train ``block`` with for ``iters`` Adam steps within
    ``max_seconds`` (0: no limit): a :class:`CompiledStep` when ``mode`` is
    ``"on"``, or ``"auto"`` and the block is :attr:`~blocks.Block.compilable`,
    ``iters`` ≥ :data:`COMPILE_MIN_ITERS` and the time budget is none or at
    least :data:`COMPILE_MIN_SECONDS`; else the eager
    :func:`~jkoflow.ode.rk4_step`. ``"on"`` with a block that is not
    compilable raises InputError."""
    if mode not in COMPILE_MODES:
        raise InputError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if mode == "on" and not block.compilable:
        raise InputError(
            f"compile='on' needs a compilable block; {type(block).__name__} is not "
            "(its forward calls autograd); use compile='auto' or 'off'"
        )
    short = iters < COMPILE_MIN_ITERS or 0 < max_seconds < COMPILE_MIN_SECONDS
    if mode == "off" or not block.compilable or (mode == "auto" and short):
        return rk4_step
    return CompiledStep()
