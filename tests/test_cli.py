"""The `dax` command's conventions: choices as enums that match the stages' own lists, --version."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import Device, ImageFormat, Modality, Preset, Runner, Task
from tasks.heads.training import TASKS
from tasks.ingest.shards import IMAGE_FORMATS
from tasks.ingest.triage import DEFAULT_MODALITIES
from tasks.synth.study import PRESETS

DAX = str(Path(sys.executable).with_name("dax"))


def test_the_choices_are_the_stages_own():
    assert {p.value for p in Preset} == set(PRESETS)
    assert {f.value for f in ImageFormat} == set(IMAGE_FORMATS)
    assert [t.value for t in Task] == list(TASKS)
    assert {r.value for r in Runner} == {"process", "dask"}           # flows.runners.ingest_task_runner
    assert {d.value for d in Device} == {"auto", "cpu", "cuda"}
    assert tuple(m.value for m in Modality) == DEFAULT_MODALITIES


def test_version_and_a_refused_choice():
    version = subprocess.run([DAX, "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("dax 0.1.0")
    refused = subprocess.run([DAX, "synth", "out", "--preset", "huge"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "huge" in refused.stderr and "demo" in refused.stderr


def test_help_text_reads_as_sentences_not_as_the_source_wraps_it():
    from typer.testing import CliRunner

    from flows.cli import app

    listing = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "300"}).output
    assert "phi.parquet (the run's Prefect state goes to HOME)." in listing        # its docstring wraps there
    assert "before `prefect deploy --all`: the Variables prefect.yaml reads (dax_home_id" in listing
    predict = CliRunner().invoke(app, ["predict", "--help"], env={"COLUMNS": "300"}).output
    assert ".png overlay. Per task, the best head under ALIAS" in predict


HEAVY = ("torch", "torchvision", "mlflow", "prefect", "pydicom", "numpy")


def test_parsing_a_command_imports_no_heavy_module():
    """`dax --help`, a command's --help and the CLI's error handler load none of torch, mlflow, prefect
    (BENCHMARKS.md, start-up: the error handler once imported every stage's error class, about 4 s)."""
    code = ("import sys\nfrom flows.cli import app, user_errors\nwith user_errors():\n    pass\n"
            "for args in (['--help'], ['ingest', '--help'], ['predict', '--help'], ['--version']):\n"
            "    try:\n        app(args=args, prog_name='dax')\n    except SystemExit as exit_:\n"
            "        assert exit_.code == 0, (args, exit_.code)\n"
            f"print('loaded:', *(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "loaded:"


def test_the_stages_errors_are_still_one_line_and_exit_code_2(capsys):
    import typer

    from flows.cli import user_errors
    from tasks.heads.training import HeadConfigError
    from tasks.ingest.deidentify import DeidError
    from tasks.pretrain.main_dino import ConfigError
    from tasks.release.registry import StoreError, UnknownModel

    for error in (DeidError("no de-identification secret: ..."), ConfigError("unknown setting"),
                  NotADirectoryError("not a folder"), StoreError("written by a newer MLflow"),
                  HeadConfigError("unknown head settings: x"), UnknownModel("no registered model models:/x@y")):
        with pytest.raises(typer.Exit) as stopped, user_errors():
            raise error
        assert stopped.value.exit_code == 2
        assert capsys.readouterr().out == f"error: {error}\n"
    with pytest.raises(KeyError), user_errors():          # anything else is not a user error
        raise KeyError("a bug")


def test_a_refused_promotion_says_which_figures_held_it_back(capsys):
    """The demo's last line on promotion names the figures below their floor or the champion, not just the alias."""
    from flows.cli import _print_retrained

    rows = [{"metric": "region.accuracy (floor)", "candidate": 0.056, "champion": 0.352, "verdict": "not above floor"},
            {"metric": "metal.dice", "candidate": 0.4, "champion": 0.3, "verdict": "better"}]
    _print_retrained({"backbone": "models:/dax-backbone-vit_tiny_patch16/1", "results_markdown": "| table |",
                      "promotion": {"alias": "challenger", "rows": rows}})
    line = " ".join(capsys.readouterr().out.split())                  # the console wraps long lines
    assert "@challenger: region.accuracy (floor) 0.056 against 0.352 (not above floor)" in line
    assert "metal.dice" not in line                                   # figures that did not hold it back


def test_pretrain_epochs_from_either_option_and_a_disagreement_refused(tmp_path):
    """`--set epochs=N` once lost to the unset `--epochs` (None): the run silently kept the config's epochs."""
    import typer

    from flows.cli import pretrain_overrides

    assert pretrain_overrides(["epochs=12", "augment.jitter=0"], None) == {"epochs": 12, "augment.jitter": 0}
    assert pretrain_overrides([], 3) == {"epochs": 3}
    assert pretrain_overrides(["epochs=3"], 3) == {"epochs": 3}
    assert pretrain_overrides([], None) == {}
    with pytest.raises(typer.BadParameter, match="--epochs 3 and --set epochs=12 disagree"):
        pretrain_overrides(["epochs=12"], 3)
    refused = subprocess.run([DAX, "pretrain", "--home", str(tmp_path / "home"), "--epochs", "3", "--set", "epochs=12"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "disagree" in refused.stderr
    assert not (tmp_path / "home").exists()                           # refused before the home is made


def test_missing_inputs_are_refused_in_one_line_before_prefects_api_starts(tmp_path):
    """`dax heads` before any `dax pretrain` once ended in MLflow's traceback after 18 s of Prefect's API; a head
    config typo, a home not ingested yet and a resume without a job started the API too (15-23 s, and a traceback
    logged before the line). Now each is one line before Prefect's API starts, and a home without an MLflow store
    is not given one."""
    import os

    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "unused-prefect-home"), COLUMNS="300")
    env = {k: v for k, v in env.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    labels, home = tmp_path / "labels.parquet", tmp_path / "home"
    labels.write_bytes(b"")

    def dax(*args: str) -> str:
        done = subprocess.run([DAX, *args, "--home", str(home)], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
        return done.stdout.strip()

    missing = dax("heads", "--labels", str(tmp_path / "gone.parquet"))
    assert missing == "error: the labels file (--labels) does not exist"
    assert dax("heads", "--labels", str(labels)) == "error: no catalog snapshot yet: run `dax ingest` first"
    assert dax("pretrain", "--resume", "last") == "error: no pretraining job to resume under this home"
    from tasks.ingest.catalog import snapshot_path

    snapshot_path(home).write_bytes(b"")          # as if ingested: a config, then the registry, is what is missing
    assert dax("heads", "--labels", str(labels), "--config", "nosuch").startswith("error: no head config 'nosuch'")
    assert dax("heads", "--labels", str(labels)).startswith(f"error: nothing is registered in {home}")
    assert dax("predict", str(labels)).startswith(f"error: nothing is registered in {home}")
    assert not (home / "mlflow.db").exists() and not (tmp_path / "unused-prefect-home" / "prefect.db").exists()
