"""The `dax` command's conventions: choices as enums that match the stages' own lists, --version."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from flows.cli import Device, ImageFormat, Preset, Runner, Task
from tasks.heads.training import TASKS
from tasks.ingest.shards import IMAGE_FORMATS
from tasks.synth.study import PRESETS

DAX = str(Path(sys.executable).with_name("dax"))


def test_the_choices_are_the_stages_own():
    assert {p.value for p in Preset} == set(PRESETS)
    assert {f.value for f in ImageFormat} == set(IMAGE_FORMATS)
    assert [t.value for t in Task] == list(TASKS)
    assert {r.value for r in Runner} == {"process", "dask"}           # flows.runners.ingest_task_runner
    assert {d.value for d in Device} == {"auto", "cpu", "cuda"}


def test_version_and_a_refused_choice():
    version = subprocess.run([DAX, "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("dax 0.1.0")
    refused = subprocess.run([DAX, "synth", "out", "--preset", "huge"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "huge" in refused.stderr and "demo" in refused.stderr
