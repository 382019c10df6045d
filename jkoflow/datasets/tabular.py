"""The five tabular benchmarks of Papamakarios et al. (2017, "Masked Autoregressive
Flow for Density Estimation"), read from the files users have in the MAF
preprocessed layout, with that paper's preprocessing and splits, so that test NLLs
are comparable with the published ones::

    ROOT/power/data.npy                                   POWER      d = 6
    ROOT/gas/ethylene_CO.pickle                           GAS        d = 8   (pandas)
    ROOT/hepmass/1000_train.csv, ROOT/hepmass/1000_test.csv   HEPMASS    d = 21  (pandas)
    ROOT/miniboone/data.npy                               MINIBOONE  d = 43
    ROOT/BSDS300/BSDS300.hdf5                             BSDS300    d = 63  (h5py)

ROOT is ``root`` if given, else ``$JKOFLOW_DATA``, else ``data``. "Tail split"
below means: the last ⌊0.1 N⌋ rows are the test set, the last ⌊0.1 N'⌋ of the
N' rows left are the validation set, the rest the training set (no shuffling).

* POWER (8 columns): rows shuffled by ``np.random.RandomState(42)``; columns 1
  (global reactive power) and 3 (global intensity) dropped; uniform noise from the
  same generator added: U(0, 0.001) to global active power, U(0, 0.01) to voltage,
  U(0, 1) to the three sub-meterings, none to time; tail split; standardised with
  the mean and std (ddof 0) of train + validation.
* GAS: a pandas DataFrame; columns Meth, Eth, Time dropped; then, while some column
  has a Pearson correlation > 0.98 with another, the first such column is dropped;
  standardised with the mean and std (ddof 1) of all rows; tail split.
* HEPMASS: only rows of the positive class (first column == 1), first column
  dropped (and the test file's extra last column); standardised with the training
  mean and std (ddof 1); features whose smallest value occurs more than 5 times in
  the training set dropped (the 5 discrete-like features); the last ⌊0.1 N⌋
  training rows are the validation set.
* MINIBOONE (data.npy already has outliers and constant features removed): tail
  split; standardised with the mean and std (ddof 0) of train + validation.
* BSDS300: the ``train``, ``validation`` and ``test`` arrays of the hdf5 file, as
  they are.

numpy only, except pandas (GAS, HEPMASS) and h5py (BSDS300), imported on use:
``pip install "jkoflow[tabular]"``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np

from ..errors import InputError
from .files import load_array

__all__ = ["TABULAR_DIMS", "TABULAR_FILES", "TABULAR_NAMES", "data_root", "load_tabular"]

Splits = tuple[np.ndarray, np.ndarray, np.ndarray]

TABULAR_FILES: dict[str, tuple[str, ...]] = {
    "power": ("power/data.npy",),
    "gas": ("gas/ethylene_CO.pickle",),
    "hepmass": ("hepmass/1000_train.csv", "hepmass/1000_test.csv"),
    "miniboone": ("miniboone/data.npy",),
    "bsds300": ("BSDS300/BSDS300.hdf5",),
}
TABULAR_NAMES: tuple[str, ...] = tuple(TABULAR_FILES)
TABULAR_DIMS: dict[str, int] = {"power": 6, "gas": 8, "hepmass": 21, "miniboone": 43, "bsds300": 63}


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """``root`` if given and non-empty, else ``$JKOFLOW_DATA``, else ``data``."""
    return Path(root or os.environ.get("JKOFLOW_DATA") or "data")


def _require(module: str, name: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise InputError(
            f"reading {name.upper()} needs {module}: pip install 'jkoflow[tabular]' (or {module})"
        ) from None


def _tail_split(x: np.ndarray, name: str) -> Splits:
    n_test = int(0.1 * len(x))
    n_val = int(0.1 * (len(x) - n_test))
    if n_val < 1:
        raise InputError(f"{name.upper()} has {len(x)} rows: too few to split (expected at least 12)")
    rest, test = x[:-n_test], x[-n_test:]
    return rest[:-n_val], rest[-n_val:], test


def _standardise(parts: Splits, mean: np.ndarray, std: np.ndarray) -> Splits:
    train, val, test = ((p - mean) / std for p in parts)
    return train, val, test


def _check_columns(x: np.ndarray, expected: int, path: Path) -> None:
    if x.shape[1] != expected:
        raise InputError(f"{path} has {x.shape[1]} columns; expected {expected} (the MAF preprocessed file)")


def _power(paths: list[Path]) -> Splits:
    data = load_array(paths[0])
    _check_columns(data, 8, paths[0])
    rng = np.random.RandomState(42)
    rng.shuffle(data)
    n = len(data)
    data = np.delete(data, [1, 3], axis=1)  # global reactive power, global intensity
    voltage = 0.01 * rng.rand(n, 1)
    active = 0.001 * rng.rand(n, 1)
    sub_metering = rng.rand(n, 3)
    data += np.hstack([active, voltage, sub_metering, np.zeros((n, 1))])
    parts = _tail_split(data, "power")
    fit = np.vstack(parts[:2])
    return _standardise(parts, fit.mean(0), fit.std(0))


def _gas(paths: list[Path]) -> Splits:
    pd = _require("pandas", "gas")
    try:
        frame = pd.read_pickle(paths[0])
        frame = frame.drop(columns=["Meth", "Eth", "Time"])
        data = frame.to_numpy(dtype=np.float64)
    except (KeyError, ValueError, TypeError, AttributeError) as error:
        raise InputError(
            f"cannot read {paths[0]} as the GAS DataFrame (columns Meth, Eth, Time and sensors): "
            + " ".join(str(error).split())[:120]
        ) from None
    while True:
        above = (np.corrcoef(data, rowvar=False) > 0.98).sum(axis=1)  # counts the column itself
        crowded = np.flatnonzero(above > 1)
        if len(crowded) == 0:
            break
        data = np.delete(data, crowded[0], axis=1)
    data = (data - data.mean(0)) / data.std(0, ddof=1)
    return _tail_split(data, "gas")


def _hepmass(paths: list[Path]) -> Splits:
    pd = _require("pandas", "hepmass")

    def positives(path: Path) -> np.ndarray:
        try:
            x = pd.read_csv(path, index_col=False).to_numpy(dtype=np.float64)
        except ValueError as error:
            message = " ".join(str(error).split())[:120]
            raise InputError(f"cannot read {path} as a CSV of numbers: {message}") from None
        return x[x[:, 0] == 1, 1:]

    train, test = positives(paths[0]), positives(paths[1])
    if test.shape[1] == train.shape[1] + 1:
        test = test[:, :-1]  # the published 1000_test.csv has one column more
    if test.shape[1] != train.shape[1]:
        raise InputError(f"{paths[1]} has {test.shape[1] + 1} columns but {paths[0]} {train.shape[1] + 1}")
    mean, std = train.mean(0), train.std(0, ddof=1)
    train, test = (train - mean) / std, (test - mean) / std
    keep = [j for j in range(train.shape[1]) if np.unique(train[:, j], return_counts=True)[1][0] <= 5]
    train, test = train[:, keep], test[:, keep]
    n_val = int(0.1 * len(train))
    if n_val < 1:
        raise InputError(f"HEPMASS has {len(train)} positive training rows: too few to split")
    return train[:-n_val], train[-n_val:], test


def _miniboone(paths: list[Path]) -> Splits:
    parts = _tail_split(load_array(paths[0]), "miniboone")
    fit = np.vstack(parts[:2])
    return _standardise(parts, fit.mean(0), fit.std(0))


def _bsds300(paths: list[Path]) -> Splits:
    h5py = _require("h5py", "bsds300")
    try:
        with h5py.File(paths[0], "r") as f:
            train, val, test = (
                np.asarray(f[key], dtype=np.float64) for key in ("train", "validation", "test")
            )
    except (OSError, KeyError) as error:
        raise InputError(
            f"cannot read {paths[0]} as BSDS300 (hdf5 with train, validation, test): "
            + " ".join(str(error).split())[:120]
        ) from None
    return train, val, test


_LOADERS: dict[str, Callable[[list[Path]], Splits]] = {
    "power": _power,
    "gas": _gas,
    "hepmass": _hepmass,
    "miniboone": _miniboone,
    "bsds300": _bsds300,
}


def load_tabular(name: str, root: str | os.PathLike[str] | None = None) -> Splits:
    """The preprocessed (train, val, test) splits of the tabular set ``name`` (one of
    ``TABULAR_NAMES``) under :func:`data_root` ``(root)``; float64 arrays (n_part, d).

    References:
        | Masked Autoregressive Flow for Density Estimation (Papamakarios et al., 2017)
        | https://arxiv.org/abs/1705.07057
    """
    if name not in _LOADERS:
        raise InputError(f"unknown tabular data set {name!r}: expected one of {', '.join(TABULAR_NAMES)}")
    base = data_root(root)
    paths = [base / rel for rel in TABULAR_FILES[name]]
    for path in paths:
        if not path.is_file():
            raise InputError(
                f"{name.upper()} data file not found: {path} (expected the MAF layout under "
                f"--data-root or $JKOFLOW_DATA, now {str(base)!r})"
            )
    parts = _LOADERS[name](paths)
    for part in parts:
        if part.ndim != 2 or not np.isfinite(part).all():
            raise InputError(f"{name.upper()} under {base} gives non-finite values after preprocessing")
    return tuple(np.ascontiguousarray(p, dtype=np.float64) for p in parts)  # type: ignore[return-value]
