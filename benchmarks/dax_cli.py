"""The ``dax`` command as the benchmarks run it: the real CLI in a subprocess, the one installed beside this
interpreter, so a benchmark measures what a user runs."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

DAX = str(Path(sys.executable).with_name("dax"))


def dax(*args: str, env: dict | None = None) -> float:
    """Run ``dax *args`` with ``env`` set on top of this process's environment; the seconds it took. A failure
    exits naming the command, with the end of its output."""
    began = time.perf_counter()
    done = subprocess.run([DAX, *args], env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        sys.exit(f"dax {args[0]} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - began
