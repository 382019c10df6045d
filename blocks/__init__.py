"""Block types for jkoflow: the block protocol, a registry by name, and the
block types shipped with the library.

Example:
    >>> import blocks
    >>> "otflow" in blocks.names()
    True
"""

from .base import Block, PotentialBlock, PotentialDerivatives, time_column
from .divergence import divergence_exact, divergence_hutchinson
from .otflow import OTFlowBlock, logcosh
from .registry import get, make, names, register
from .timeslice import TimeSlice, time_slices

__all__ = [
    "Block",
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
    "time_column",
    "time_slices",
]
