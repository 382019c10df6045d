"""Root pytest configuration: the doctests of jkoflow/ and blocks/ see ``torch``,
``jkoflow`` and ``blocks`` without importing them, and start from fixed seeds
(the tests' own seeding is in tests/conftest.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import blocks
import jkoflow


@pytest.fixture(autouse=True)
def _doctest_setup(request: pytest.FixtureRequest, doctest_namespace: dict) -> None:
    """Puts torch, jkoflow and blocks in every doctest's namespace and seeds its random draws."""
    doctest_namespace.update(torch=torch, jkoflow=jkoflow, blocks=blocks)
    if isinstance(request.node, pytest.DoctestItem):
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)
