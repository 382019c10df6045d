"""The MAF tabular loaders on tiny files in each format: column drops, splits, standardisation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from jkoflow.cli import main
from jkoflow.datasets import data_root, load, load_split, load_tabular
from jkoflow.errors import InputError

# un-standardised value ≈ slope·output + offset; the noise amplitude added to each kept POWER column
POWER_KEPT = [0, 2, 4, 5, 6, 7]
POWER_NOISE = [0.001, 0.01, 1.0, 1.0, 1.0, 0.0]


def _fit(z: np.ndarray, raw: np.ndarray) -> tuple[float, np.ndarray]:
    """Least squares raw ≈ a z + b; returns (correlation, residuals)."""
    a, b = np.polyfit(z, raw, 1)
    return float(np.corrcoef(z, raw)[0, 1]), raw - (a * z + b)


def test_power_drops_shuffles_adds_noise_and_standardises(tmp_path):
    n = 400
    rng = np.random.default_rng(0)
    raw = 100.0 * rng.standard_normal((n, 8))
    raw[:, 7] = np.arange(n)  # time: no noise, so it identifies the rows
    (tmp_path / "power").mkdir()
    np.save(tmp_path / "power" / "data.npy", raw)
    train, val, test = load_tabular("power", tmp_path)
    assert (len(train), len(val), len(test)) == (324, 36, 40) and train.shape[1] == 6
    fit = np.vstack([train, val])
    np.testing.assert_allclose(fit.mean(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(fit.std(0), 1.0, rtol=1e-12)
    everything = np.vstack([train, val, test])
    ids = np.argsort(np.argsort(everything[:, 5]))  # time is the row id, standardised (monotone)
    np.testing.assert_array_equal(ids, np.random.RandomState(42).permutation(n))  # the MAF shuffle, seed 42
    for k, (column, noise) in enumerate(zip(POWER_KEPT, POWER_NOISE, strict=True)):
        corr, residual = _fit(everything[:, k], raw[ids, column])
        assert corr > 0.999
        assert residual.std() == pytest.approx(noise / np.sqrt(12), rel=0.2, abs=1e-9)  # U(0, noise)


def test_gas_drops_labels_and_correlated_columns(tmp_path):
    pd = pytest.importorskip("pandas")
    n = 300
    rng = np.random.default_rng(1)
    s = rng.standard_normal((n, 4))
    frame = pd.DataFrame(
        {
            "Time": np.arange(n, dtype=float),
            "Meth": rng.random(n),
            "Eth": rng.random(n),
            "s1": s[:, 0],
            "s2": s[:, 1],
            "s3": 2.0 * s[:, 0] + 0.01 * rng.standard_normal(n),  # corr(s1, s3) > 0.98
            "s4": s[:, 2],
            "s5": s[:, 3],
        }
    )
    (tmp_path / "gas").mkdir()
    frame.to_pickle(tmp_path / "gas" / "ethylene_CO.pickle")
    train, val, test = load_tabular("gas", tmp_path)
    assert (len(train), len(val), len(test)) == (243, 27, 30) and train.shape[1] == 4
    kept = frame[["s2", "s3", "s4", "s5"]].to_numpy()  # s1 is the first crowded column
    expected = (kept - kept.mean(0)) / kept.std(0, ddof=1)  # all rows, ddof 1, no shuffle
    np.testing.assert_allclose(np.vstack([train, val, test]), expected, rtol=1e-12, atol=1e-12)


def test_hepmass_keeps_positives_and_drops_discrete_features(tmp_path):
    pytest.importorskip("pandas")
    rng = np.random.default_rng(2)

    def table(n: int, extra: bool) -> np.ndarray:
        label = (np.arange(n) % 2).astype(float)
        features = rng.standard_normal((n, 4))
        features[:, 2] = np.where(rng.random(n) < 0.3, -5.0, features[:, 2])  # min value repeated
        columns = [label[:, None], features] + ([rng.standard_normal((n, 1))] if extra else [])
        return np.hstack(columns)

    train_raw, test_raw = table(200, False), table(60, True)
    (tmp_path / "hepmass").mkdir()
    header = "# label,f0,f1,f2,f3"
    np.savetxt(tmp_path / "hepmass" / "1000_train.csv", train_raw, delimiter=",", header=header, comments="")
    np.savetxt(tmp_path / "hepmass" / "1000_test.csv", test_raw, delimiter=",", header=header + ",mass",
               comments="")  # fmt: skip
    train, val, test = load_tabular("hepmass", tmp_path)
    positives = train_raw[train_raw[:, 0] == 1, 1:]
    mean, std = positives.mean(0), positives.std(0, ddof=1)
    expected_train = ((positives - mean) / std)[:, [0, 1, 3]]  # f2 dropped
    expected_test = ((test_raw[test_raw[:, 0] == 1, 1:5] - mean) / std)[:, [0, 1, 3]]
    assert (len(train), len(val), len(test)) == (90, 10, 30)
    np.testing.assert_allclose(np.vstack([train, val]), expected_train, rtol=1e-12)
    np.testing.assert_allclose(test, expected_test, rtol=1e-12)


def test_miniboone_tail_split_and_train_val_statistics(tmp_path):
    raw = np.random.default_rng(3).standard_normal((100, 5)) * [1, 2, 3, 4, 5] + 7
    (tmp_path / "miniboone").mkdir()
    np.save(tmp_path / "miniboone" / "data.npy", raw)
    train, val, test = load_tabular("miniboone", tmp_path)
    assert (len(train), len(val), len(test)) == (81, 9, 10)
    mean, std = raw[:90].mean(0), raw[:90].std(0)
    np.testing.assert_allclose(test, (raw[90:] - mean) / std, rtol=1e-12)
    np.testing.assert_allclose(val, (raw[81:90] - mean) / std, rtol=1e-12)
    assert load("miniboone", root=tmp_path).shape == (100, 5)
    splits = load_split("miniboone", root=tmp_path, val_fraction=0.3, seed=5)  # fractions unused
    assert [len(p) for p in splits] == [81, 9, 10]


def test_bsds300_reads_the_three_arrays(tmp_path):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(4)
    parts = {"train": rng.random((30, 63)), "validation": rng.random((5, 63)), "test": rng.random((7, 63))}
    (tmp_path / "BSDS300").mkdir()
    with h5py.File(tmp_path / "BSDS300" / "BSDS300.hdf5", "w") as f:
        for key, value in parts.items():
            f[key] = value.astype(np.float32)
    for got, key in zip(load_tabular("bsds300", tmp_path), parts, strict=True):
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, parts[key].astype(np.float32))


def test_missing_file_and_missing_extra(tmp_path, monkeypatch):
    with pytest.raises(InputError, match=r"POWER data file not found: .*power/data\.npy") as info:
        load_tabular("power", tmp_path)
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match=r"1000_train\.csv"):
        load_split("hepmass", root=tmp_path)
    monkeypatch.setenv("JKOFLOW_DATA", str(tmp_path / "elsewhere"))
    assert data_root() == tmp_path / "elsewhere" and data_root("x") == Path("x")
    (tmp_path / "BSDS300").mkdir()
    (tmp_path / "BSDS300" / "BSDS300.hdf5").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py now fails
    with pytest.raises(InputError, match=r"pip install 'jkoflow\[tabular\]'"):
        load_tabular("bsds300", tmp_path)


def test_cli_trains_on_a_tabular_set_and_reports_a_missing_file(tmp_path, capsys):
    raw = np.random.default_rng(5).standard_normal((600, 3))
    (tmp_path / "miniboone").mkdir()
    np.save(tmp_path / "miniboone" / "data.npy", raw)
    out = tmp_path / "run"
    tiny = ["--width", "4", "--iters", "3", "--batch-size", "64", "--max-blocks", "1", "--quiet"]
    assert main(["train", "--data", "miniboone", "--data-root", str(tmp_path), "--out", str(out), *tiny]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "kl" not in summary and np.isfinite(summary["test_nll"])
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["data_root"] == str(tmp_path)
    assert main(["eval", str(out)]) == 0
    assert json.loads((out / "eval.json").read_text())["rows"] == 60
    capsys.readouterr()
    code = main(
        ["train", "--data", "power", "--data-root", str(tmp_path), "--out", str(tmp_path / "p"), *tiny]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "power/data.npy" in err
    assert not (tmp_path / "p").exists()
