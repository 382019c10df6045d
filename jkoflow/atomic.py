"""Atomic file writes: every file jkoflow writes goes through :func:`atomic_path`.

The content is written to a temporary file with a unique name in the target's
directory (``tempfile.mkstemp``, so two processes never share one), flushed to
disk, then renamed over the target (``os.replace``, atomic on POSIX). A reader
therefore sees either the old file or the complete new one, never a truncated
one; on any failure the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["TEMP_SUFFIX", "atomic_path", "atomic_write", "is_temp_of", "publish", "temp_next_to"]

TEMP_SUFFIX = ".tmp"
"""Every temporary file is named ``.<target name>.<random><TEMP_SUFFIX><target suffix>``."""


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def is_temp_of(candidate: str, name: str) -> bool:
    """Whether the file name ``candidate`` is a temporary file of the target ``name``.

    >>> is_temp_of(".flow.pt.k2j3.tmp.pt", "flow.pt"), is_temp_of("flow.pt", "flow.pt")
    (True, False)
    """
    return candidate.startswith(_temp_prefix(Path(name))) and TEMP_SUFFIX in candidate[len(name) + 2 :]


def _default_mode() -> int:
    """0o666 less the process's umask: the mode ``open`` gives a new file."""
    mask = os.umask(0o22)
    os.umask(mask)
    return 0o666 & ~mask


def temp_next_to(path: str | os.PathLike) -> Path:
    """A new, empty temporary file with a unique name in ``path``'s directory and
    ``path``'s suffix, to be published by :func:`publish` (or removed)."""
    path = Path(path)
    handle, name = tempfile.mkstemp(
        prefix=_temp_prefix(path), suffix=TEMP_SUFFIX + path.suffix, dir=path.parent
    )
    os.close(handle)
    os.chmod(name, _default_mode())  # mkstemp makes it private; give it the usual mode
    return Path(name)


def publish(tmp: Path, path: str | os.PathLike) -> None:
    """Syncs the finished temporary file ``tmp`` to disk and renames it over ``path``."""
    with open(tmp, "rb+") as file:
        os.fsync(file.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to ``path`` with the same suffix (so that
    writers that look at the extension, e.g. matplotlib's ``savefig`` or
    ``np.save``, behave as for ``path``); when the block ends without error the
    file there is published over ``path``, otherwise it is removed."""
    tmp = temp_next_to(path)
    try:
        yield tmp
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", newline: str | None = None) -> Iterator[IO]:
    """Yields an open file (``mode`` ``"w"`` or ``"wb"``) whose content replaces
    ``path`` atomically when the block ends without error (:func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, mode, newline=newline) as file:
        yield file
        file.flush()
