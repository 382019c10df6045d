"""Checkpoint files: tensors, numbers and JSON strings written with
``torch.save`` atomically and read back with ``torch.load(weights_only=True)``,
so that loading a file never runs pickled code.

Every file is a dict with a ``format`` name and a format ``version``; reading
checks both and turns every failure into a one-line :class:`InputError`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write
from .errors import InputError

__all__ = ["CONTENT_ERRORS", "read_payload", "reading_content", "write_payload"]

CONTENT_ERRORS = (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError)
"""What rebuilding objects from a payload with missing keys, wrong shapes or wrong
types raises (``json``, ``load_state_dict``, dataclass constructors)."""


def write_payload(payload: dict[str, Any], path: str | os.PathLike) -> None:
    """Writes ``payload`` to ``path`` atomically (:mod:`jkoflow.atomic`)."""
    with atomic_write(path, "wb") as file:
        torch.save(payload, file)


@contextlib.contextmanager
def reading_content(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Turns a :data:`CONTENT_ERRORS` exception raised while the block rebuilds
    objects from the payload of ``path`` into one InputError line: a file with
    the right format tag whose content was edited or damaged."""
    try:
        yield
    except InputError:
        raise
    except CONTENT_ERRORS as error:
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        raise InputError(f"{what} {path} is damaged ({reason[:160]}); it cannot be used") from None


def read_payload(
    path: str | os.PathLike,
    fmt: str,
    version: int,
    what: str,
    map_location: str | torch.device = "cpu",
    oldest: int | None = None,
) -> dict[str, Any]:
    """Reads a file written by :func:`write_payload` and checks its format.

    Arguments:
        path: The file.
        fmt: The expected ``format`` entry, e.g. ``"jkoflow.flow"``.
        version: The format version this library reads.
        what: What the file is, for messages (``"flow checkpoint"``).
        map_location: Where tensors are loaded.
        oldest: The oldest format version still read (default: ``version`` only).

    Raises:
        InputError: The file is missing, unreadable, truncated, of another
            format, or of another format version.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for bad files
        text = str(error).strip()
        reason = text.splitlines()[0] if text else type(error).__name__
        raise InputError(f"cannot read {what} {path}: {reason}") from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise InputError(f"{path} is not a jkoflow {what}")
    found = payload.get("version")
    oldest = version if oldest is None else oldest
    if not (isinstance(found, int) and oldest <= found <= version):
        newer = isinstance(found, int) and found > version
        hint = "; upgrade jkoflow to read it" if newer else ""
        raise InputError(
            f"{path} has {what} format version {found}; this jkoflow reads version {version}{hint}"
        )
    return payload
