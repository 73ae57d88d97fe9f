"""MLflow, embedded by default: a SQLite store and an artifact folder under the DAX home.

``MLFLOW_TRACKING_URI`` wins when it is set (an MLflow server past one machine); otherwise the store
is ``sqlite:///$DAX_HOME/mlflow.db`` and experiments keep their artifacts in
``$DAX_HOME/mlartifacts/`` (MLflow's own default would be ``./mlruns`` in whatever folder the command
runs from). The registry lives in the same store. ``RunLogger`` writes metrics of a run that another
process opened (the torchrun ranks, the Prefect tasks), by run id, in batches.
"""
from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

__all__ = ["RunLogger", "code_version", "git_commit", "configure_tracking", "ensure_experiment", "tracking_uri",
           "log_torch_model", "PIP_REQUIREMENTS"]

# Passing requirements skips MLflow's slow inference (field notes); the models need this code installed.
PIP_REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1", "timm>=1.0,<1.1", "dax"]


# Marks an MLFLOW_TRACKING_URI that DAX derived from a home (not one the user set), so that another
# home later in the same process gets its own store instead of inheriting the first one's.
_FROM_HOME = "DAX_TRACKING_URI_FROM_HOME"


def tracking_uri(home: Path) -> str:
    user_set = os.environ.get("MLFLOW_TRACKING_URI") and os.environ.get(_FROM_HOME) != "1"
    return os.environ["MLFLOW_TRACKING_URI"] if user_set else f"sqlite:///{Path(home).resolve() / 'mlflow.db'}"


def configure_tracking(home: Path) -> str:
    import mlflow
    user_set = bool(os.environ.get("MLFLOW_TRACKING_URI")) and os.environ.get(_FROM_HOME) != "1"
    uri = tracking_uri(home)
    if not user_set:
        os.environ[_FROM_HOME] = "1"
    os.environ["MLFLOW_TRACKING_URI"] = uri        # child processes (torchrun ranks) see the same store
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(os.environ.get("MLFLOW_REGISTRY_URI") or uri)
    return uri


def ensure_experiment(name: str, home: Path) -> str:
    """The experiment's id, created on first use (artifacts under the home when the store is local)."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri(home).startswith(("sqlite:", "file:")):      # a local store: artifacts beside it, not in ./mlruns
        location = (Path(home).resolve() / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


class _DropPickleCaution(logging.Filter):
    """Drops MLflow's per-call caution about pickled models: DAX logs pickles on purpose (its own modules,
    not torch.export programs; field notes), says so once in the README, and logs a model per head."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "by Pickle or CloudPickle format" not in record.getMessage()


def log_torch_model(model, name: str, registered_model_name: str, metadata: dict):
    """``mlflow.pytorch.log_model`` as DAX logs every model: pickled, with ``PIP_REQUIREMENTS``, registered,
    inside the active run; returns MLflow's ModelInfo."""
    import mlflow.pytorch

    caution = _DropPickleCaution()
    logger = logging.getLogger("mlflow.pytorch")
    logger.addFilter(caution)
    try:
        return mlflow.pytorch.log_model(model, name=name, serialization_format="pickle",
                                        pip_requirements=PIP_REQUIREMENTS,
                                        registered_model_name=registered_model_name, metadata=metadata)
    finally:
        logger.removeFilter(caution)


def git_commit() -> str | None:
    """The git commit of the code that runs, with '+dirty' for uncommitted changes; None outside a checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def code_version() -> str:
    """'dax <package version> (<commit>)': what the catalog's runs and the MLflow runs record."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        package = version("dax")
    except PackageNotFoundError:
        package = "unknown"
    commit = git_commit()
    return f"dax {package}" + (f" ({commit[:12]}{'+dirty' if commit.endswith('+dirty') else ''})" if commit else "")


class RunLogger:
    """Metrics, tags and artifacts for one MLflow run, from any process that can reach the store."""

    def __init__(self, run_id: str):
        from mlflow.tracking import MlflowClient
        self.run_id = run_id
        self.client = MlflowClient()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items() if value is not None]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)
