"""Configs for the tests that train one thing at a time."""

from __future__ import annotations

from typing import Any

from jkoflow import JKOConfig
from jkoflow.config import FIRST_PASS


def first_pass(**fields: Any) -> JKOConfig:
    """A JKOConfig of ``fields`` whose stage fields not given are those of the
    first pass alone (:data:`~jkoflow.config.FIRST_PASS`), whatever the block
    type: a test of one stage runs that stage and no other."""
    return JKOConfig(**{**FIRST_PASS, **fields})
