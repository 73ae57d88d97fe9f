"""The one MLflow module: where the store is, what models are called, how they are found and logged.

Every model DAX makes is registered here, under one of three names:

    dax-backbone-<arch>          a DINO-pretrained backbone (``backbone_model``)
    dax-head-<task>-<arch>       a head trained on a frozen backbone (``head_model``; tagged dax.backbone)
    models:/<name>@<alias>       aliases: candidate (new), champion / challenger (``tasks.release.promotion``)

MLflow runs live in the experiments ``dax-pretrain`` and ``dax-heads``. The store is embedded by default:
a SQLite store and an artifact folder under the DAX home.

``MLFLOW_TRACKING_URI`` wins when it is set (an MLflow server past one machine); otherwise the store
is ``sqlite:///$DAX_HOME/mlflow.db`` and experiments keep their artifacts in
``$DAX_HOME/mlartifacts/`` (MLflow's own default would be ``./mlruns`` in whatever folder the command
runs from). The registry lives in the same store. ``RunLogger`` writes metrics of a run that another
process opened (the torchrun ranks, the Prefect tasks), by run id, in batches.

The home's store follows the installed MLflow, as Prefect's embedded database does: a store written by an
older MLflow is copied aside (``mlflow.db.schema-<revision>.bak``) and migrated by ``mlflow db upgrade`` the
first time a newer MLflow opens it (``upgrade_home_store``); one written by a newer MLflow is refused with
what to do (``StoreError``), never downgraded.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import sqlite3
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

__all__ = ["DEFAULT_BACKBONE", "HEADS_EXPERIMENT", "PIP_REQUIREMENTS", "PRETRAIN_EXPERIMENT", "RunLogger",
           "StoreError", "UnknownModel", "backbone_model", "backbone_uri", "configure_tracking", "ensure_experiment",
           "head_model", "head_uri", "home_store", "alias_best_heads", "best_heads", "HEADLINE", "log_torch_model",
           "require_registry", "resolve_model", "tracking_uri", "upgrade_home_store"]

PRETRAIN_EXPERIMENT = "dax-pretrain"
HEADS_EXPERIMENT = "dax-heads"


def backbone_model(arch: str) -> str:
    """The registered name of a DINO backbone of architecture ``arch``."""
    return f"dax-backbone-{arch}"


def head_model(task: str, arch: str) -> str:
    """The registered name of a ``task`` head trained on a backbone of architecture ``arch``."""
    return f"dax-head-{task}-{arch}"


def backbone_uri(arch: str, alias: str) -> str:
    return f"models:/{backbone_model(arch)}@{alias}"


def head_uri(task: str, arch: str, alias: str) -> str:
    return f"models:/{head_model(task, arch)}@{alias}"


DEFAULT_BACKBONE = backbone_uri("vit_tiny_patch16", "candidate")   # what `dax pretrain` makes by default

# Passing requirements skips MLflow's slow inference (field notes); the models need this code installed.
PIP_REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1", "timm>=1.0,<1.1", "dax"]


# Marks an MLFLOW_TRACKING_URI that DAX derived from a home (not one the user set), so that another
# home later in the same process gets its own store instead of inheriting the first one's.
_FROM_HOME = "DAX_TRACKING_URI_FROM_HOME"
log = logging.getLogger("dax.registry")


def _user_tracking_uri() -> str | None:
    """MLFLOW_TRACKING_URI where the user set it (not one DAX derived from a home), else None."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri if uri and os.environ.get(_FROM_HOME) != "1" else None


def home_store(home: Path) -> Path:
    """The home's own MLflow store, an SQLite file."""
    return Path(home).resolve() / "mlflow.db"


def tracking_uri(home: Path) -> str:
    return _user_tracking_uri() or f"sqlite:///{home_store(home)}"


class StoreError(RuntimeError):
    """The home's MLflow store cannot be opened by this environment's MLflow (written by a newer one)."""


class UnknownModel(LookupError):
    """A model URI that is not ``models:/...`` or names no registered version (no such name, alias or version)."""


def configure_tracking(home: Path) -> str:
    import mlflow
    user_set = _user_tracking_uri() is not None
    uri = tracking_uri(home)
    if not user_set:
        os.environ[_FROM_HOME] = "1"
        upgrade_home_store(home_store(home))
    os.environ["MLFLOW_TRACKING_URI"] = uri        # child processes (torchrun ranks) see the same store
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(os.environ.get("MLFLOW_REGISTRY_URI") or uri)
    return uri


def _store_revision(db: Path) -> str | None:
    """The schema revision an MLflow SQLite store records (alembic's), None for a store not made yet."""
    if not db.is_file() or db.stat().st_size == 0:
        return None
    with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as con:
        try:
            row = con.execute("SELECT version_num FROM alembic_version").fetchone()
        except sqlite3.OperationalError:          # no such table: not initialised yet
            return None
    return row[0] if row else None


def require_registry(home: Path) -> str:
    """``configure_tracking`` for a command that only reads the registry: where the registry is the home's own
    store and that has not been made yet, ``UnknownModel`` says so instead of an empty store being made."""
    db = home_store(home)
    if tracking_uri(home) == f"sqlite:///{db}" and not db.is_file():
        raise UnknownModel(f"nothing is registered in {db.parent}: the home has no MLflow store yet "
                           "(`dax pretrain` registers backbones, `dax heads` heads)")
    return configure_tracking(home)


@cache
def _mlflow_revisions() -> tuple[str, frozenset[str]]:
    """(the schema revision this MLflow writes, every revision its migrations know)."""
    import mlflow
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(Path(mlflow.__file__).parent / "store" / "db_migrations"))
    [head] = script.get_heads()
    return head, frozenset(revision.revision for revision in script.walk_revisions())


def upgrade_home_store(db: Path) -> Path | None:
    """Bring a home's MLflow store to the installed MLflow's schema; the backup's path when it migrated one.

    An older store is copied aside first (SQLite's backup, consistent under readers) and migrated with
    ``mlflow db upgrade``, under a lock so that concurrent processes migrate it once. A store from a newer
    MLflow raises ``StoreError``: downgrading would lose what that MLflow wrote."""
    found = _store_revision(db)
    if found is None:
        return None
    head, known = _mlflow_revisions()
    if found == head:
        return None
    import mlflow
    if found not in known:
        raise StoreError(f"the home's MLflow store ({db}) was written by a newer MLflow than this environment's "
                         f"{mlflow.__version__} (schema {found}; this one writes {head}): upgrade MLflow here "
                         f"(`{sys.executable} -m pip install -U 'mlflow>=3,<4'`); a store is never "
                         "downgraded")
    with open(db, "rb") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)                  # another process may be migrating it now
        found = _store_revision(db)
        if found == head:
            return None
        backup = db.with_name(f"{db.name}.schema-{found}.bak")
        with contextlib.closing(sqlite3.connect(db)) as source, contextlib.closing(sqlite3.connect(backup)) as copy:
            source.backup(copy)
        done = subprocess.run([sys.executable, "-m", "mlflow", "db", "upgrade", f"sqlite:///{db}"],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0 or _store_revision(db) != head:
            raise StoreError(f"migrating the home's MLflow store ({db}) from schema {found} to {head} failed; "
                             f"the store before it is in {backup.name}:\n{done.stderr[-2000:]}")
    log.warning("the home's MLflow store was migrated from schema %s to %s for MLflow %s; the store before it: %s",
                found, head, mlflow.__version__, backup.name)
    return backup


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


def resolve_model(uri: str) -> tuple[str, str]:
    """(registered model name, version) of ``models:/<name>@<alias>`` or ``models:/<name>/<version>``."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not uri.startswith("models:/"):
        raise UnknownModel(f"give a registered model URI, not {uri!r}: models:/<name>@<alias> or "
                           "models:/<name>/<version>")
    rest = uri[len("models:/"):]
    if "@" in rest:
        (name, alias), version = rest.split("@", 1), None
    else:
        (name, _, version), alias = rest.rpartition("/"), None
        if not name or not version.isdigit():
            raise UnknownModel(f"cannot read a model name and version from {uri!r}")
    client = MlflowClient()
    try:
        if alias is not None:
            return name, str(client.get_model_version_by_alias(name, alias).version)
        client.get_model_version(name, version)   # raises when it does not exist
        return name, version
    except MlflowException as error:   # no such name or version: RESOURCE_DOES_NOT_EXIST; no such alias: INVALID_...
        if error.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise UnknownModel(f"no registered model {uri} ({_registered_beside(client, name)})") from None


def _registered_beside(client, name: str) -> str:
    """What the registry holds of ``name``'s kind (dax-backbone-*, dax-head-<task>-*), with aliases, for an error."""
    kind = name.rsplit("-", 1)[0] + "-" if name.startswith("dax-") and "-" in name[4:] else name
    found = sorted((m for m in client.search_registered_models(max_results=1000) if m.name.startswith(kind)),
                   key=lambda m: m.name)
    if not found:
        return f"no {kind}* model is registered here: `dax pretrain` registers backbones, `dax heads` heads"
    return "registered here: " + ", ".join(f"models:/{m.name}" + "".join(f" @{a}" for a in sorted(m.aliases))
                                            for m in found)


def alias_best_heads(branches: list[dict], tasks: tuple[str, ...], alias: str) -> dict[str, dict]:
    """Per task, ``alias`` on the registered head of the pretrained seed with the best validation score
    (ties: the lower seed); ``branches`` are the heads flow's branch results. Returns task -> head."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    registered = {}
    for task in tasks:
        candidates = [r for r in branches if r["role"] == "pretrained" and r["task"] == task and r["version"]]
        if not candidates:
            continue
        best = max(candidates, key=lambda r: (r["val_score"] if math.isfinite(r["val_score"]) else -math.inf,
                                              -r["seed"]))
        client.set_registered_model_alias(best["model"], alias, best["version"])
        registered[task] = {"model": best["model"], "version": best["version"], "seed": best["seed"],
                            "alias": alias, "uri": f"models:/{best['model']}@{alias}",
                            "versions": sorted((r["version"] for r in candidates), key=int)}
    return registered


HEADLINE = {"region": "accuracy", "metal": "dice", "screws": "f1"}   # each task's figure, higher is better


def best_heads(tasks, alias: str) -> dict[str, dict]:
    """Per task, the ``alias`` head (``dax-head-<task>-<arch>@<alias>``) of whichever architecture scores best on
    the task's ``HEADLINE`` figure: its backbone version's seed mean (tag ``dax.eval``, written by promotion),
    else the head's own test figure (tag ``metric.<figure>``). Returns task -> {"uri", "model", "version",
    "backbone", "score"}; a task with no such head is absent."""
    import json

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    chosen = {}
    for task in tasks:
        figure = HEADLINE[task]
        names = sorted(m.name for m in _registered_heads(client, task))
        for name in names:
            try:
                head = client.get_model_version_by_alias(name, alias)
            except MlflowException:
                continue
            backbone = head.tags.get("dax.backbone", "")
            score = math.nan
            if "/" in backbone:
                model, _, version = backbone.rpartition("/")
                with contextlib.suppress(MlflowException):
                    score = json.loads(client.get_model_version(model, version).tags.get("dax.eval", "{}")).get(
                        f"{task}.{figure}", math.nan)
            if not math.isfinite(score):
                score = float(head.tags.get(f"metric.{figure}", "nan"))
            if task not in chosen or (math.isfinite(score) and not score <= chosen[task]["score"]):
                chosen[task] = {"uri": f"models:/{name}/{head.version}", "model": name, "version": str(head.version),
                                "backbone": backbone, "score": score}
    return chosen


def head_aliases(tasks) -> list[str]:
    """The aliases that the registered heads of ``tasks`` carry, sorted (empty: none carries one)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    return sorted({alias for task in tasks for model in _registered_heads(client, task) for alias in model.aliases})


def _registered_heads(client, task: str) -> list:
    """The registered models of ``task``'s heads, one per backbone architecture (``dax-head-<task>-*``)."""
    return client.search_registered_models(filter_string=f"name LIKE '{head_model(task, '')}%'")


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
