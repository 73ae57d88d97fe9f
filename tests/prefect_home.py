"""Throw-away Prefect homes for the tests that run the `dax` CLI, with their database already made.

Each command run with a new PREFECT_HOME starts Prefect's temporary server on an empty folder, which
creates and migrates prefect.db first: about 6 s on 2 cores, per home. The tests copy one empty database,
migrated once per session by Prefect's own CLI, into each new home instead. The homes stay separate, and
what a command writes there is still only its own."""
from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

PREFECT = str(Path(sys.executable).with_name("prefect"))


@functools.cache
def _empty_database() -> Path:
    home = Path(tempfile.mkdtemp(prefix="dax-test-prefect-empty-"))
    atexit.register(shutil.rmtree, home, True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")} | {"PREFECT_HOME": str(home)}
    done = subprocess.run([PREFECT, "server", "database", "upgrade", "-y"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and (home / "prefect.db").is_file(), f"{done.stdout}\n{done.stderr}"
    return home / "prefect.db"


def prefect_home(folder: Path) -> str:
    """``folder`` as a PREFECT_HOME; on first use it gets a copy of the session's empty, migrated database."""
    folder = Path(folder)
    if not (folder / "prefect.db").exists():
        folder.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(_empty_database())) as source, \
                contextlib.closing(sqlite3.connect(folder / "prefect.db")) as copy:
            source.backup(copy)      # a consistent copy, whatever SQLite's journal holds
    return str(folder)
