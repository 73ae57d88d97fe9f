"""The DAX home folder and the embedded defaults that live in it.

Everything a single machine needs sits under ``DAX_HOME`` (default ``./dax-home``): the Prefect
ephemeral API's database, later the catalog, shards and the MLflow store. Standard settings a user
has already set (``PREFECT_HOME``, ``PREFECT_API_URL``, ``MLFLOW_TRACKING_URI``) are never overridden.
Call `configure()` before importing prefect.
"""
from __future__ import annotations

import os
from pathlib import Path

# No telemetry or hub look-ups from a pipeline that handles patient data.
QUIET_DEFAULTS = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "MESSAGELEVEL": "ERROR",  # deid's own logger prints everything to stdout by default
    # Prefect's ephemeral API gets 20 s to start by default: too short on a busy 2-core machine
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def dax_home(home: str | os.PathLike | None = None) -> Path:
    return Path(home or os.environ.get("DAX_HOME") or "dax-home").resolve()


def configure(home: str | os.PathLike | None = None) -> Path:
    """Resolve the home folder and set the embedded defaults that are not set already."""
    root = dax_home(home)
    root.mkdir(parents=True, exist_ok=True)
    for name, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("PREFECT_HOME", str(root / "prefect"))
    return root
