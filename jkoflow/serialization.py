"""Checkpoint files: tensors, numbers and JSON strings written with
``torch.save`` atomically and read back with ``torch.load(weights_only=True)``,
so that loading a file never runs pickled code.

Every file is a dict with a ``format`` name and a format ``version``; reading
checks both and turns every failure into a one-line :class:`InputError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .errors import InputError

__all__ = ["read_payload", "write_payload"]


def write_payload(payload: dict[str, Any], path: str | os.PathLike) -> None:
    """Writes ``payload`` to ``path`` atomically: a temporary file in the same
    directory, flushed to disk, then renamed over ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as file:
        torch.save(payload, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


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
