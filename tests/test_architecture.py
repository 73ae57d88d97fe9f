"""The architecture as import-linter contracts (pyproject.toml): kept, and able to fail."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = str(Path(sys.executable).with_name("lint-imports"))


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          timeout=300)


def test_the_contracts_are_kept():
    result = lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.fixture(scope="module")
def copy_of_the_code(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("layout")
    for package in ("flows", "tasks", "dax_models"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


@pytest.mark.parametrize("module, statement, contract", [
    ("dax_models/metrics.py", "import mlflow", "dax_models is pure torch"),
    ("dax_models/heads.py", "from tasks.home import dax_home", "layers: flows over tasks"),
    ("tasks/ingest/catalog.py", "from flows.runners import ingest_task_runner", "layers: flows over tasks"),
    ("tasks/heads/data.py", "from tasks.synth.study import PRESETS", "no stage imports tasks.synth"),
    ("tasks/release/predict.py", "from tasks.heads.training import run_task", "prediction does not import training"),
    ("tasks/ingest/shards.py", "from tasks.pretrain.data import read_samples", "stages in order"),
    # prediction's fallback key (no secret: a random one) is out of ingestion's reach
    ("tasks/ingest/deidentify.py", "from tasks.release.predict import prediction_key", "stages in order"),
])
def test_a_forbidden_import_breaks_a_contract(copy_of_the_code: Path, module: str, statement: str, contract: str):
    path = copy_of_the_code / module
    original = path.read_text()
    path.write_text(original + f"\n{statement}  # noqa\n")
    try:
        result = lint(copy_of_the_code)
    finally:
        path.write_text(original)
    assert result.returncode != 0
    broken = [line for line in result.stdout.splitlines() if line.rstrip().endswith("BROKEN")]
    assert any(contract in line for line in broken), result.stdout
    assert len(broken) == 1, result.stdout
