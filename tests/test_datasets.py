"""Tests for jkoflow.datasets: toy generators, file loading, splitting."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from jkoflow.datasets import TOY_NAMES, TOYS, load, load_array, split, toy
from jkoflow.errors import InputError

EXPECTED_NAMES = (
    "checkerboard",
    "8gaussians",
    "moons",
    "rings",
    "pinwheel",
    "swissroll",
    "2spirals",
    "circles",
)


def test_toy_names_order_and_registry():
    assert TOY_NAMES == EXPECTED_NAMES
    assert tuple(TOYS) == EXPECTED_NAMES


@pytest.mark.parametrize("name", EXPECTED_NAMES)
@pytest.mark.parametrize("n", [1, 7, 1001])
def test_toy_shape_finite_reproducible(name, n):
    a = TOYS[name](n, np.random.default_rng(3))
    b = TOYS[name](n, np.random.default_rng(3))
    c = TOYS[name](n, np.random.default_rng(4))
    assert a.shape == (n, 2)
    assert a.dtype == np.float64
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    if n > 1:
        assert not np.array_equal(a, c)


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_toy_leaves_global_rng_untouched(name):
    np.random.seed(0)
    expected = np.random.random()
    np.random.seed(0)
    TOYS[name](500, np.random.default_rng(1))
    toy(name, 500, 1)
    load(name, n=500, seed=1)
    assert np.random.random() == expected


def test_load_toy_matches_default_rng_and_seeds_differ():
    x = load("moons", n=2000, seed=5)
    np.testing.assert_array_equal(x, TOYS["moons"](2000, np.random.default_rng(5)))
    np.testing.assert_array_equal(x, toy("moons", 2000, 5))
    assert not np.array_equal(x, load("moons", n=2000, seed=6))


def test_checkerboard_support_and_mean():
    x = toy("checkerboard", 100_000, 0)
    assert (np.abs(x) <= 4.0).all()
    h = np.floor(x / 2.0)
    # The construction puts points only on squares with floor(x1/2) + floor(x2/2) even.
    assert ((h[:, 0] + h[:, 1]) % 2 == 0).all()
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=0.05)
    # All 8 black squares are populated roughly equally.
    _, counts = np.unique(h, axis=0, return_counts=True)
    assert len(counts) == 8
    np.testing.assert_allclose(counts / len(x), 1 / 8, atol=0.01)


def test_8gaussians_cluster_near_centres():
    x = toy("8gaussians", 50_000, 0)
    s = 1 / math.sqrt(2)
    centres = 4.0 * np.array([(1, 0), (-1, 0), (0, 1), (0, -1), (s, s), (s, -s), (-s, s), (-s, -s)]) / 1.414
    d = np.linalg.norm(x[:, None, :] - centres[None], axis=2).min(axis=1)
    expected = 0.5 / 1.414 * math.sqrt(math.pi / 2)  # Rayleigh mean
    assert abs(d.mean() - expected) < 0.05 * expected


def test_rings_radii_have_four_peaks():
    x = toy("rings", 40_000, 0)
    r = np.linalg.norm(x, axis=1)
    peaks = (3.0, 2.4, 1.65, 0.75)
    edges = np.arange(0.0, 3.6, 0.05)
    hist, _ = np.histogram(r, bins=edges)
    centres = 0.5 * (edges[:-1] + edges[1:])
    for p in peaks:
        window = np.abs(centres - p) < 0.3
        assert abs(centres[window][np.argmax(hist[window])] - p) <= 0.1
        assert abs(np.mean(np.abs(r - p) < 0.25) - 0.25) < 0.02
    # Troughs between rings are nearly empty compared with the peaks.
    for lo, hi in zip(peaks[1:], peaks[:-1], strict=True):
        mid = 0.5 * (lo + hi)
        assert hist[np.argmin(np.abs(centres - mid))] < 0.05 * hist.max()


def test_moons_and_circles_geometry():
    m = toy("moons", 20_000, 0)
    np.testing.assert_allclose(m.mean(axis=0), [0.0, 0.3], atol=0.05)  # (0.5, 0.25)*2 + (-1, -0.2)
    c = toy("circles", 20_000, 0)
    r = np.linalg.norm(c, axis=1)
    assert abs(np.mean(np.abs(r - 3.0) < 0.5) - 0.5) < 0.02
    assert abs(np.mean(np.abs(r - 1.5) < 0.5) - 0.5) < 0.02


@pytest.mark.parametrize(
    "call, phrase",
    [
        (lambda: toy("nope", 10, 0), "unknown toy"),
        (lambda: toy("moons", 0, 0), "positive integer"),
        (lambda: toy("moons", 10, -1), "seed"),
        (lambda: load("moons", n=0), "positive integer"),
        (lambda: load("moons", n=2.5), "positive integer"),
        (lambda: load("moons", seed=-3), "seed"),
        (lambda: load("no_such_dataset"), "unknown data 'no_such_dataset'"),
        (lambda: load("missing_file.npy"), "data file not found"),
    ],
)
def test_toy_and_load_bad_inputs(call, phrase):
    with pytest.raises(InputError, match=re.escape(phrase)) as err:
        call()
    assert "\n" not in str(err.value)


def test_unknown_data_message_lists_toys_and_suffixes():
    with pytest.raises(InputError) as err:
        load("mooons")
    msg = str(err.value)
    assert "moons" in msg and ".npy" in msg and ".csv" in msg and "\n" not in msg


def test_datasets_imports_numpy_and_stdlib_only():
    import ast

    import jkoflow.datasets as pkg

    allowed_top = {"numpy", "__future__"} | set(sys.stdlib_module_names)
    for path in Path(pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] in allowed_top, (path.name, alias.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    assert node.module.split(".")[0] in allowed_top, (path.name, node.module)
                elif node.level == 2:  # from ..x import: only the errors module
                    assert node.module == "errors", (path.name, node.module)


# --------------------------------------------------------------------------- split


def _rows(a: np.ndarray) -> list[tuple]:
    return sorted(map(tuple, a.tolist()))


def test_split_sizes_disjoint_union():
    x = np.arange(200, dtype=np.float64).reshape(100, 2)
    tr, va, te = split(x, val_fraction=0.1, test_fraction=0.2, seed=1)
    assert (len(tr), len(va), len(te)) == (70, 10, 20)
    assert all(p.shape[1] == 2 for p in (tr, va, te))
    sets = [set(map(tuple, p.tolist())) for p in (tr, va, te)]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert _rows(np.concatenate([tr, va, te])) == _rows(x)
    # The split is a shuffle, not the original order.
    assert not np.array_equal(np.concatenate([tr, va, te]), x)


def test_split_reproducible_and_seed_dependent():
    x = toy("moons", 500, 0)
    a = split(x, seed=3)
    b = split(x, seed=3)
    c = split(x, seed=4)
    for p, q in zip(a, b, strict=True):
        np.testing.assert_array_equal(p, q)
    assert not np.array_equal(a[0], c[0])


def test_split_minimum_rows():
    tr, va, te = split(np.ones((3, 1)), val_fraction=0.34, test_fraction=0.34)
    assert (len(tr), len(va), len(te)) == (1, 1, 1)


@pytest.mark.parametrize(
    "kwargs, phrase",
    [
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"test_fraction": -0.1}, "test_fraction"),
        ({"test_fraction": float("nan")}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "sum below 1"),
        ({"val_fraction": 0.6, "test_fraction": 0.7}, "sum below 1"),
        ({"seed": -1}, "seed"),
    ],
)
def test_split_bad_fractions(kwargs, phrase):
    with pytest.raises(InputError, match=re.escape(phrase)) as err:
        split(np.zeros((100, 2)), **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("n_rows", [1, 2, 5])
def test_split_too_few_rows(n_rows):
    with pytest.raises(InputError, match=f"too few rows to split: {n_rows} rows") as err:
        split(np.zeros((n_rows, 2)))
    assert "\n" not in str(err.value)


def test_split_rejects_non_2d():
    with pytest.raises(InputError, match="2-D"):
        split(np.zeros(100))


# --------------------------------------------------------------------------- files


def test_npy_round_trip(tmp_path):
    x = np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32)
    p = tmp_path / "data.npy"
    np.save(p, x)
    y = load_array(p)
    assert y.dtype == np.float64 and y.shape == (50, 3)
    np.testing.assert_array_equal(y, x.astype(np.float64))
    np.testing.assert_array_equal(load(str(p)), y)
    np.testing.assert_array_equal(load(p, n=5), y)  # n is ignored for files


def test_npy_integer_dtype_is_converted(tmp_path):
    p = tmp_path / "ints.npy"
    np.save(p, np.arange(6).reshape(3, 2))
    y = load_array(p)
    assert y.dtype == np.float64
    np.testing.assert_array_equal(y, [[0, 1], [2, 3], [4, 5]])


@pytest.mark.parametrize("header", [None, "x,y,z"])
def test_csv_round_trip(tmp_path, header):
    x = np.random.default_rng(1).standard_normal((40, 3))
    p = tmp_path / "data.csv"
    np.savetxt(p, x, delimiter=",", fmt="%.17g", header=header or "", comments="")
    if header is None:  # savetxt with header="" still writes nothing extra
        assert p.read_text().splitlines()[0][0] in "-0123456789"
    y = load_array(p)
    assert y.dtype == np.float64 and y.shape == (40, 3)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(load(str(p)), x)


def test_csv_single_column_and_blank_lines(tmp_path):
    p = tmp_path / "col.csv"
    p.write_text("value\n1\n\n2.5\n-3e2\n")
    np.testing.assert_array_equal(load_array(p), [[1.0], [2.5], [-300.0]])


def _write(tmp_path: Path, name: str, content: object) -> Path:
    p = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(p, content)
    elif isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content)
    return p


NAN_ROWS = np.array([[1.0, 2.0], [np.nan, 0.0], [3.0, np.nan], [4.0, 5.0]])
INF_ROWS = np.array([[1.0, 2.0], [np.inf, 0.0], [3.0, 4.0]])


@pytest.mark.parametrize(
    "name, content, phrase",
    [
        ("missing.npy", None, "data file not found"),
        ("data.txt", "1,2\n3,4\n", "unsupported data file extension '.txt'"),
        ("one_d.npy", np.arange(5.0), "shape (5,)"),
        ("three_d.npy", np.zeros((2, 3, 4)), "shape (2, 3, 4)"),
        ("nan.npy", NAN_ROWS, "2 row(s) with NaN or infinite"),
        ("inf.npy", INF_ROWS, "1 row(s) with NaN or infinite"),
        ("nan.csv", "1,2\nnan,3\n", "1 row(s) with NaN or infinite"),
        ("corrupt.npy", np.random.default_rng(0).bytes(256), "not a valid .npy file"),
        ("truncated.npy", b"\x93NUMPY\x01\x00v\x00{'descr': '<f8', 'fortran_order'", "not a valid .npy"),
        ("empty.csv", "", "no data rows"),
        ("header_only.csv", "a,b\n", "no data rows"),
        ("body.csv", "a,b\n1,2\n3,oops\n", "non-numeric value 'oops' at line 3"),
        ("ragged.csv", "1,2\n3\n", "line 2"),
        ("zero_rows.npy", np.zeros((0, 2)), "zero rows"),
        ("strings.npy", np.array([["a", "b"]]), "non-numeric dtype"),
        ("bools.npy", np.ones((2, 2), dtype=bool), "non-numeric dtype"),
        ("complex.npy", np.ones((2, 2), dtype=complex), "non-numeric dtype"),
        ("objects.npy", "OBJECT", "holds Python objects"),
    ],
)
def test_load_array_bad_inputs(tmp_path, name, content, phrase):
    if content is None:
        p = tmp_path / name
    elif isinstance(content, str) and content == "OBJECT":
        p = tmp_path / name
        np.save(p, np.array([[{"a": 1}]], dtype=object), allow_pickle=True)
    else:
        p = _write(tmp_path, name, content)
    with pytest.raises(InputError, match=re.escape(phrase)) as err:
        load_array(p)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.strip() == msg and msg


def test_unsupported_extension_lists_supported(tmp_path):
    p = _write(tmp_path, "data.txt", "1,2\n")
    with pytest.raises(InputError) as err:
        load(p)
    assert ".npy" in str(err.value) and ".csv" in str(err.value)


def test_directory_is_rejected(tmp_path):
    d = tmp_path / "dir.npy"
    d.mkdir()
    with pytest.raises(InputError, match="not a file"):
        load_array(d)
