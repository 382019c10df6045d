"""Loading user data from ``.npy`` and ``.csv`` files as float64 arrays of shape (n, d)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InputError

__all__ = ["SUPPORTED_SUFFIXES", "load_array"]

SUPPORTED_SUFFIXES: tuple[str, ...] = (".npy", ".csv")


def _one_line(text: object, limit: int = 200) -> str:
    """Collapse ``text`` onto one line and cut it to ``limit`` characters."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _load_npy(path: Path) -> np.ndarray:
    try:
        with path.open("rb") as fh:
            magic = fh.read(6)
    except OSError as exc:
        raise InputError(f"cannot read data file {path}: {_one_line(exc)}") from None
    if magic != b"\x93NUMPY":
        raise InputError(
            f"cannot read data file {path}: not a valid .npy file (no NUMPY header); "
            "expected a file written by numpy.save"
        )
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        if "allow_pickle" in str(exc):
            raise InputError(
                f"cannot read data file {path}: not a valid .npy array of numbers (it holds Python objects); "
                "expected integer or float values"
            ) from None
        raise InputError(
            f"cannot read data file {path}: not a valid .npy file ({_one_line(exc)}); "
            "expected a file written by numpy.save"
        ) from None
    return arr


def _load_csv(path: Path) -> np.ndarray:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read data file {path}: {_one_line(exc)}") from None
    rows: list[list[float]] = []
    header_skipped = False
    width: int | None = None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(",")
        try:
            values = [float(f) for f in fields]
        except ValueError:
            if not rows and not header_skipped:
                header_skipped = True  # a single non-numeric header line is allowed
                continue
            bad = next(f for f in fields if not _is_float(f))
            raise InputError(
                f"non-numeric value {_one_line(bad.strip(), 40)!r} at line {lineno} of {path}; "
                "expected comma-separated numbers (one optional header line)"
            ) from None
        if width is None:
            width = len(values)
        elif len(values) != width:
            raise InputError(
                f"line {lineno} of {path} has {len(values)} values but earlier rows have {width}; "
                "expected the same number of columns in every row"
            )
        rows.append(values)
    if not rows:
        raise InputError(f"data file {path} has no data rows; expected at least one row of numbers")
    return np.asarray(rows, dtype=np.float64)


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def load_array(path: str | os.PathLike[str]) -> np.ndarray:
    """Load a data matrix from a ``.npy`` or ``.csv`` file; returns float64 of shape (n, d).

    A ``.csv`` file holds comma-separated numbers, optionally after one non-numeric
    header line. Raises :class:`InputError` (one-line message) for a missing or
    unreadable file, an unsupported extension, an array that is not 2-D, no rows
    or no columns, a non-numeric dtype, or NaN/inf values.
    """
    try:
        p = Path(path)
    except TypeError:
        raise InputError(f"invalid data path {path!r}: expected a path to a .npy or .csv file") from None
    if not p.exists():
        raise InputError(f"data file not found: {p}")
    if not p.is_file():
        raise InputError(f"data path {p} is not a file; expected a .npy or .csv file")
    suffix = p.suffix.lower()
    if suffix == ".npy":
        arr = _load_npy(p)
    elif suffix == ".csv":
        arr = _load_csv(p)
    else:
        raise InputError(
            f"unsupported data file extension {p.suffix or '(none)'!r} for {p}; "
            f"expected one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    if arr.ndim != 2:
        raise InputError(
            f"data in {p} has shape {tuple(arr.shape)}; expected a 2-D array of shape (n_samples, n_features)"
        )
    if arr.shape[0] == 0:
        raise InputError(f"data in {p} has zero rows (shape {tuple(arr.shape)}); expected at least one row")
    if arr.shape[1] == 0:
        raise InputError(
            f"data in {p} has zero columns (shape {tuple(arr.shape)}); expected at least one feature"
        )
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InputError(f"data in {p} has non-numeric dtype {arr.dtype}; expected integer or float values")
    arr = np.asarray(arr, dtype=np.float64)
    bad_rows = ~np.isfinite(arr).all(axis=1)
    n_bad = int(bad_rows.sum())
    if n_bad:
        first = int(np.flatnonzero(bad_rows)[0])
        raise InputError(
            f"data in {p} has {n_bad} row(s) with NaN or infinite values (first at row {first}); "
            "expected finite numbers"
        )
    return np.ascontiguousarray(arr)
