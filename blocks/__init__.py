"""Block types for jkoflow: the block protocol, a registry by name, and the
block types shipped with the library (docs/design.md, "Blocks").

Example:
    >>> import blocks
    >>> {"mlp", "otflow", "timeslice"} <= set(blocks.names())
    True
"""

from .base import Block, PotentialBlock, PotentialDerivatives, time_column
from .divergence import divergence_exact, divergence_hutchinson
from .mlp import MLPBlock
from .otflow import OTFlowBlock, logcosh
from .registry import get, make, names, register, spec
from .timeslice import TimeSlice, time_slices

__all__ = [
    "Block",
    "MLPBlock",
    "OTFlowBlock",
    "PotentialBlock",
    "PotentialDerivatives",
    "TimeSlice",
    "divergence_exact",
    "divergence_hutchinson",
    "get",
    "logcosh",
    "make",
    "names",
    "register",
    "spec",
    "time_column",
    "time_slices",
]
