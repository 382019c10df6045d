"""The public API: every exported name resolves, lazily, and start-up stays light
(what `import jkoflow` and `jkoflow -h` import; the timings are in benchmarks/startup.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import jkoflow

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "numpy", "ot", "scipy", "matplotlib", "torchdiffeq")


def _modules_after(code: str) -> dict[str, bool]:
    """Which heavy modules a fresh interpreter has loaded after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_exported_name_resolves_and_is_listed():
    for name in jkoflow.__all__:
        assert getattr(jkoflow, name) is not None
    assert set(jkoflow.__all__) <= set(dir(jkoflow))
    assert {"TrainingError", "InputError", "metrics", "plots", "datasets", "train_jko", "Flow"} <= set(
        jkoflow.__all__
    )


def test_from_import_gives_the_defining_objects():
    from jkoflow import Flow, TrainingError, metrics, plots
    from jkoflow.errors import TrainingError as defined
    from jkoflow.flow import Flow as flow_class

    assert TrainingError is defined and Flow is flow_class
    assert metrics.__name__ == "jkoflow.metrics" and plots.__name__ == "jkoflow.plots"
    assert issubclass(TrainingError, RuntimeError)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        jkoflow.nope  # noqa: B018
    assert not hasattr(jkoflow, "nope")


def test_import_jkoflow_loads_nothing_heavy():
    assert not any(_modules_after("import jkoflow").values())


def test_help_builds_the_parser_without_torch():
    code = "\n".join(
        [
            "from jkoflow.cli import main",
            "try:",
            "    main(['-h'])",
            "except SystemExit as end:",
            "    assert not end.code",
        ]
    )
    loaded = _modules_after(code)
    assert not any(loaded.values()), loaded


def test_the_public_api_loads_pot_scipy_matplotlib_only_when_used():
    loaded = _modules_after("from jkoflow import Flow, JKOConfig, train_jko, train_otflow, metrics, plots")
    assert loaded["torch"]
    assert not (loaded["ot"] or loaded["scipy"] or loaded["matplotlib"] or loaded["torchdiffeq"]), loaded


def test_a_run_records_library_versions_without_importing_them():
    import ot
    import torchdiffeq

    from jkoflow.run import versions

    recorded = versions()
    assert recorded["pot"] == ot.__version__ and recorded["torchdiffeq"] == torchdiffeq.__version__
    # importing POT takes seconds, and a training run does not need it
    assert not _modules_after("from jkoflow.run import versions\nversions()")["ot"]


def test_subcommand_help_lists_the_config_options(capsys):
    from jkoflow.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["train", "-h"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    iters = f"Adam steps per block (default: {jkoflow.JKOConfig().iters})"
    assert "--reparam-rule {ratio,arclength}" in text and iters in " ".join(text.split())
