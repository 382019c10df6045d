"""Ownership and locking of a run directory.

A directory is jkoflow's only when jkoflow made it: the first file written in
it is the marker :data:`MARKER`, a JSON object with the run's identity (a random
``run_id``, the ``method``, the creation time, the jkoflow version) and the
manifest ``files``: every name jkoflow has written (or is about to write)
there, entered *before* the file is written. ``--overwrite`` removes exactly
those files (and their temporary files), never anything else.

While a process trains in a directory it holds an exclusive OS lock
(``fcntl.flock``) on :data:`LOCK`; the kernel drops it when the process ends,
however it ends. A second process that asks for it is refused at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import IO, Any

from .atomic import atomic_write, is_temp_of
from .errors import InputError

__all__ = ["LOCK", "MARKER", "RunDir", "check_out_path"]

MARKER = ".jkoflow-run.json"
LOCK = ".jkoflow.lock"


def check_out_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path; InputError for an empty path or the current directory."""
    text = os.fspath(path)
    if not text.strip():
        raise InputError("--out is empty; name a directory for the run")
    resolved = Path(text).expanduser().resolve()
    if resolved == Path.cwd().resolve():
        raise InputError(f"--out {text!r} is the current directory; name a new directory for the run")
    if resolved == Path(resolved.anchor):
        raise InputError(f"--out {text!r} is a file system root; name a new directory for the run")
    return Path(text)


class RunDir:
    """A run directory that this process has locked (:meth:`create` or :meth:`open`).

    Use it as a context manager (or call :meth:`release`); :meth:`claim` enters a
    file in the manifest before it is written.

    >>> import tempfile, pathlib
    >>> with RunDir.create(pathlib.Path(tempfile.mkdtemp()) / "run", "jko") as run:
    ...     _ = run.claim("config.json")
    ...     sorted(run.marker["files"]), run.marker["method"]
    (['.jkoflow.lock', 'config.json'], 'jko')
    """

    def __init__(self, root: Path, lock: IO, marker: dict[str, Any]) -> None:
        self.root = root
        self._lock = lock
        self.marker = marker

    @staticmethod
    def read_marker(root: str | os.PathLike) -> dict[str, Any] | None:
        """The marker of ``root``, None when there is none; InputError when damaged."""
        path = Path(root) / MARKER
        if not path.is_file():
            return None
        try:
            marker = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InputError(f"the jkoflow marker {path} is damaged: {error}") from None
        files = marker.get("files") if isinstance(marker, dict) else None
        if not isinstance(files, list) or not all(isinstance(f, str) and "/" not in f for f in files):
            raise InputError(f"the jkoflow marker {path} is damaged: no list of file names")
        return marker

    @classmethod
    def check_new(cls, root: Path, overwrite: bool) -> None:
        """Refuses (InputError) a ``root`` that a new run may not be created in:
        a file, a directory not made by jkoflow that is not empty, or one holding
        a jkoflow run without ``overwrite``. Reads only."""
        if root.exists() and not root.is_dir():
            raise InputError(f"--out {root} exists and is not a directory")
        if not root.is_dir() or not _contents(root):
            return
        marker = cls.read_marker(root)
        if marker is None:
            raise InputError(
                f"{root} is not empty and was not made by jkoflow; choose a new or empty --out "
                "(--overwrite only replaces jkoflow's own runs)"
            )
        if not overwrite:
            method = marker.get("method")
            held = "a comparison" if method == "compare" else f"a run ({method})"
            resume = ", --resume to continue it" if method == "jko" else ""
            raise InputError(
                f"{root} already holds {held}; pass --overwrite to replace it{resume}, "
                "or choose another --out"
            )

    @classmethod
    def create(cls, root: str | os.PathLike, method: str, overwrite: bool = False) -> RunDir:
        """Makes (or, with ``overwrite``, takes over) ``root`` for a new run: checks
        it (:meth:`check_new`), locks it, removes the old run's files, then
        writes the new marker first."""
        root = Path(root)
        cls.check_new(root, overwrite)
        made = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
        lock = _lock(root)
        try:
            cls.check_new(root, overwrite)  # again, now that no other process can change it
            old = cls.read_marker(root)
            if old is not None:
                _remove_owned(root, old)
            from . import __version__

            marker = {
                "run_id": secrets.token_hex(8),
                "method": method,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "jkoflow": __version__,
                "files": [LOCK],
            }
            run = cls(root, lock, marker)
            run._write_marker()
        except BaseException:
            lock.close()
            if made and not _contents(root):  # leave no trace of a run that never started
                shutil.rmtree(root)
            raise
        return run

    @classmethod
    def open(cls, root: str | os.PathLike) -> RunDir:
        """Locks the existing run directory ``root`` (e.g. to resume it or to add
        eval.json); a run from before markers gets one listing nothing."""
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"run directory not found: {root}")
        marker = cls.read_marker(root)
        lock = _lock(root)
        if marker is None:
            marker = {"run_id": None, "method": None, "files": []}
        return cls(root, lock, marker)

    def claim(self, name: str) -> Path:
        """Enters ``name`` (a file directly in the directory) in the manifest;
        returns its path."""
        if name not in self.marker["files"]:
            self.marker["files"].append(name)
            if self.marker.get("run_id") is not None:
                self._write_marker()
        return self.root / name

    def _write_marker(self) -> None:
        with atomic_write(self.root / MARKER) as file:
            json.dump(self.marker, file, indent=2)

    def release(self) -> None:
        """Drops the lock."""
        self._lock.close()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _lock(root: Path) -> IO:
    """An open handle on ``root``'s lock file holding an exclusive flock."""
    handle = open(root / LOCK, "a")  # noqa: SIM115 - closed by RunDir.release
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise InputError(f"{root} is in use by another jkoflow process") from None
    return handle


def _contents(root: Path) -> list[str]:
    """The names in ``root`` other than the lock file and temporary files of the
    marker: what makes a directory not empty."""
    return [name for name in os.listdir(root) if name != LOCK and not is_temp_of(name, MARKER)]


def _remove_owned(root: Path, marker: dict[str, Any]) -> None:
    """Removes the plain files ``marker`` lists and their temporary files, then
    the marker itself; nothing else in ``root`` is touched."""
    owned = [name for name in marker["files"] if name != LOCK]
    for entry in root.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            continue
        if entry.name in owned or any(is_temp_of(entry.name, name) for name in owned):
            entry.unlink()
    (root / MARKER).unlink(missing_ok=True)
