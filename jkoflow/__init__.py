"""jkoflow: continuous normalizing flows trained block by block with the JKO scheme.

The public names are loaded on first use (PEP 562), so ``import jkoflow`` and
the command line's ``--help`` do not pay for torch, POT or matplotlib until a
name that needs them is touched; ``from jkoflow import Flow`` works as usual.
See ``docs/design.md`` for what the library computes.

Example:
    >>> import jkoflow
    >>> x = jkoflow.datasets.load("checkerboard", n=2000)
    >>> x.shape
    (2000, 2)
    >>> "train_jko" in dir(jkoflow)
    True
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_ATTRIBUTES = {
    "DataConfig": ".config",
    "JKOConfig": ".config",
    "InputError": ".errors",
    "TrainingError": ".errors",
    "Flow": ".flow",
    "FlowDistribution": ".distribution",
    "FlowTransform": ".distribution",
    "JKOLoss": ".objectives",
    "OTFlowLoss": ".objectives",
    "gaussian_log_prob": ".objectives",
    "jko_loss": ".objectives",
    "otflow_loss": ".objectives",
    "ODEResult": ".ode",
    "integrate": ".ode",
    "OTFlowConfig": ".otflow",
    "OTFlowHistory": ".otflow",
    "train_otflow": ".otflow",
    "BlockRecord": ".records",
    "JKOHistory": ".records",
    "Selection": ".records",
    "StageRecord": ".records",
    "JKOTrainer": ".trainer",
    "train_jko": ".trainer",
}
"""Public name -> the module that defines it."""

_SUBMODULES = ("datasets", "metrics", "plots")

__all__ = sorted([*_ATTRIBUTES, *_SUBMODULES])


def __getattr__(name: str) -> Any:
    """Imports the module behind a public name at its first use (PEP 562)."""
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _ATTRIBUTES:
        value = getattr(importlib.import_module(_ATTRIBUTES[name], __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
