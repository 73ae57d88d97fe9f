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


HOME_ID_FILE = "home-id"


def home_id(root: str | os.PathLike) -> str:
    """This home's id: 16 random hex digits made on first use and kept in ``HOME/home-id``.

    Events name their home by it (``dax.home.<id>``), so a deployment's trigger can listen to one home
    only: a staging home on the same Prefect server never starts production's retraining. Random, not a
    digest of the path: two machines may mount different homes at the same path.
    """
    path = Path(root) / HOME_ID_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{HOME_ID_FILE}.{os.getpid()}.{os.urandom(4).hex()}")
    tmp.write_text(os.urandom(8).hex() + "\n")
    try:
        os.link(tmp, path)    # atomic and exclusive: of two first users, one id wins, whole
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text().strip()
