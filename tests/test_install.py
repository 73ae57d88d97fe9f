"""A plain (non-editable) `pip install .` works from any folder: configs, recipes and the torchrun entry are
found as package data and by module name, never through the checkout.

The package is built as a wheel and installed with pip into a fresh venv; its dependencies come from the
test's own environment (a ``.pth`` line: reinstalling torch and the rest from the index would add minutes
and test pip, not DAX). The commands then run in an empty folder, and the test checks that they imported
DAX from the fresh venv, not from this checkout.
"""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_PRETRAINING = ["--epochs", "1", "--set", "steps_per_epoch=2", "--set", "batch_size=4",
                    "--set", "augment.global_size=32", "--set", "augment.local_size=16",
                    "--set", "augment.local_crops=2", "--set", "augment.decode_size=64", "--set", "workers=0",
                    "--set", "knn_size=32", "--set", "checkpoint_every=1000"]


def run(args: list, cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_a_plain_install_runs_synth_ingest_and_pretrain_from_an_empty_folder(tmp_path: Path):
    wheels, venv, work = tmp_path / "wheels", tmp_path / "venv", tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "DAX_", "MLFLOW_TRACKING"))}
    # an empty Prefect home, as a new user's: the first command makes and migrates its database
    env.update(DAX_DEID_SECRET="install-test-secret-0123456789abcdef", PREFECT_HOME=str(tmp_path / "prefect"))
    source = tmp_path / "source"       # a copy: building in the checkout would leave build/ there
    for name in ("flows", "tasks", "dax_models", "deployments"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", wheels, source],
        tmp_path, env)
    (wheel,) = wheels.glob("dax-*.whl")
    run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env)
    fresh = next(venv.glob("lib/python*/site-packages"))
    (fresh / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")   # torch & co, not dax
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--quiet", wheel], tmp_path, env)
    where = run([python, "-c", "import tasks, flows, deployments; print(tasks.__file__, flows.__file__, "
                                "deployments.__file__)"], work, env).stdout.split()
    assert all(Path(p).is_relative_to(fresh) for p in where), where     # the installed copy, not the checkout

    dax = venv / "bin" / "dax"
    assert "dax 0.1.0" in run([dax, "--version"], work, env).stdout
    env["DAX_HOME"] = "home"          # the home of every command below, as --home would name it
    run([dax, "synth", "corpus", "--preset", "test", "--studies", "2", "--workers", "1"], work, env)
    run([dax, "ingest", "corpus/dicom", "--workers", "1", "--max-size", "128"], work, env)
    out = run([dax, "pretrain", "--config", "demo-cpu", "--device", "cpu", *TINY_PRETRAINING], work, env).stdout
    assert "pretraining finished" in out and "registered models:/dax-backbone-vit_tiny_patch16" in out, out
    assert sorted(p.name for p in work.iterdir()) == ["corpus", "home"]     # nothing written beside them
