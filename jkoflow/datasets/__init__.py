"""Data: the 2-D toy densities, synthetic targets with exact densities, the MAF
tabular benchmarks, ``.npy``/``.csv`` files, and a seeded train/val/test split.

numpy only (pandas/h5py for two tabular sets): this package imports neither torch
nor any model code.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path

import numpy as np

from ..errors import InputError
from .files import SUPPORTED_SUFFIXES, load_array
from .tabular import TABULAR_NAMES, data_root, load_tabular
from .targets import Target, is_target, target
from .toys import TOYS, toy

__all__ = [
    "TABULAR_NAMES",
    "TOYS",
    "TOY_NAMES",
    "Target",
    "data_root",
    "is_target",
    "load",
    "load_array",
    "load_split",
    "load_tabular",
    "split",
    "target",
    "toy",
]

TOY_NAMES: tuple[str, ...] = tuple(TOYS)
_KINDS = (
    f"a toy name ({', '.join(TOY_NAMES)}), a target spec "
    "(gmm:d=8,k=5,seed=0, banana:d=8,b=0.25 or powerlaw:d=7,k=4,seed=0), "
    f"a tabular set ({', '.join(TABULAR_NAMES)}) or a path to a .npy or .csv file"
)


def _check_int(value: object, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "positive" if minimum == 1 else "non-negative"
        raise InputError(f"invalid {what}={value!r}: expected a {kind} integer")
    return int(value)


def load(
    name_or_path: str | os.PathLike[str],
    n: int = 120_000,
    seed: int = 0,
    root: str | os.PathLike[str] | None = None,
) -> np.ndarray:
    """Load a data set as float64 of shape (n, d).

    A toy name (see ``TOY_NAMES``) gives ``n`` samples of shape (n, 2) drawn from
    ``np.random.default_rng(seed)``, a target spec (``gmm:d=8,k=5,seed=0``,
    ``banana:d=8``; see :mod:`.targets`) ``n`` samples of shape (n, d) drawn the same
    way, a tabular name (``TABULAR_NAMES``) all its preprocessed rows (train, val
    and test stacked; read under ``root``, see :func:`load_tabular`); otherwise
    ``name_or_path`` is a path to a
    ``.npy`` or ``.csv`` file, read by :func:`load_array` (``n`` and ``seed`` unused).

    Example:
        >>> x = load("moons", n=1000, seed=0)
        >>> x.shape, x.dtype
        ((1000, 2), dtype('float64'))
        >>> bool((load("moons", n=1000, seed=0) == x).all())
        True
    """
    n = _check_int(n, "n", 1)
    seed = _check_int(seed, "seed", 0)
    if isinstance(name_or_path, str) and name_or_path in TOYS:
        return toy(name_or_path, n, np.random.default_rng(seed))
    if is_target(name_or_path):
        return target(name_or_path).sample(n, np.random.default_rng(seed))
    if isinstance(name_or_path, str) and name_or_path in TABULAR_NAMES:
        return np.concatenate(load_tabular(name_or_path, root))
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise InputError(f"invalid data {name_or_path!r}: expected {_KINDS}")
    path = Path(name_or_path)
    if path.exists() or path.suffix.lower() in SUPPORTED_SUFFIXES:
        return load_array(path)
    raise InputError(f"unknown data {str(name_or_path)!r}: expected {_KINDS}")


def load_split(
    name_or_path: str | os.PathLike[str],
    n: int = 120_000,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    root: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test): the standard split of a tabular set (the fractions and
    ``seed`` unused), else :func:`split` of :func:`load` ``(name_or_path, n, seed)``."""
    if isinstance(name_or_path, str) and name_or_path in TABULAR_NAMES:
        return load_tabular(name_or_path, root)
    return split(load(name_or_path, n=n, seed=seed), val_fraction, test_fraction, seed=seed)


def split(
    x: np.ndarray, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shuffle the rows of ``x`` (shape (n, d)) with ``seed`` and split into (train, val, test).

    The parts have ``round(n*val_fraction)``, ``round(n*test_fraction)`` and the remaining
    rows; each part is a copy of shape (n_part, d). Both fractions must lie in (0, 1) with
    sum < 1, and every part must receive at least one row.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise InputError(f"cannot split data of shape {tuple(x.shape)}: expected a 2-D array (n, d)")
    for what, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if (
            isinstance(frac, bool)
            or not isinstance(frac, numbers.Real)
            or not np.isfinite(frac)
            or not 0.0 < frac < 1.0
        ):
            raise InputError(f"invalid {what}={frac!r}: expected a number strictly between 0 and 1")
    if val_fraction + test_fraction >= 1.0:
        raise InputError(
            f"val_fraction + test_fraction = {val_fraction + test_fraction:g}: expected a sum below 1"
        )
    seed = _check_int(seed, "seed", 0)
    n = x.shape[0]
    n_val = round(n * float(val_fraction))
    n_test = round(n * float(test_fraction))
    n_train = n - n_val - n_test
    if min(n_train, n_val, n_test) < 1:
        raise InputError(
            f"too few rows to split: {n} rows give train/val/test sizes {n_train}/{n_val}/{n_test}; "
            "expected at least one row in each part"
        )
    perm = np.random.default_rng(seed).permutation(n)
    return x[perm[:n_train]], x[perm[n_train : n_train + n_val]], x[perm[n_train + n_val :]]
