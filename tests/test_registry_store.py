"""The home's MLflow store across MLflow versions: an older one is backed up and migrated, a newer one refused.

Real SQLite stores and MLflow's own migrations: the older store is made the way MLflow makes a new one, stopped
one migration short of the installed MLflow's schema, with a registered model in it that must survive.
"""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tasks.release import registry
from tasks.release.registry import (StoreError, UnknownModel, configure_tracking, require_registry, resolve_model,
                                    upgrade_home_store)


def _revision(db: Path) -> str:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT version_num FROM alembic_version").fetchone()[0]


def _older_store(db: Path) -> str:
    """A store one migration behind this MLflow (its initial tables, then its migrations but the last),
    holding a registered model; returns its revision."""
    import sqlalchemy
    from alembic import command
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config
    from mlflow.store.tracking.dbmodels.initial_models import Base

    engine = sqlalchemy.create_engine(f"sqlite:///{db}")
    Base.metadata.create_all(engine)
    config = _get_alembic_config(str(engine.url))
    script = ScriptDirectory.from_config(config)
    before = script.get_revision(script.get_current_head()).down_revision
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, before)
    engine.dispose()
    with sqlite3.connect(db) as con:
        con.execute("INSERT INTO registered_models (name, creation_time, last_updated_time) "
                    "VALUES ('dax-backbone-kept', 1, 1)")
    return before


@pytest.fixture
def home_tracking(monkeypatch):
    """configure_tracking as a fresh process runs it: no tracking URI set; MLflow's URIs restored after."""
    uris = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "DAX_TRACKING_URI_FROM_HOME"):
        monkeypatch.delenv(key, raising=False)
    yield
    for key in ("MLFLOW_TRACKING_URI", "DAX_TRACKING_URI_FROM_HOME"):    # configure_tracking set them
        os.environ.pop(key, None)
    mlflow.set_tracking_uri(uris[0])
    mlflow.set_registry_uri(uris[1])


def test_a_store_from_an_older_mlflow_is_backed_up_and_migrated_with_its_models(tmp_path, home_tracking):
    # MLflow alone refuses such a store ("out-of-date database schema") when the newer migrations alter tables
    # only (3.18 over 3.17), and migrates it in place, with no copy, when they add a table
    db = tmp_path / "mlflow.db"
    before = _older_store(db)
    configure_tracking(tmp_path)
    head, _ = registry._mlflow_revisions()
    backup = tmp_path / f"mlflow.db.schema-{before}.bak"
    assert _revision(db) == head != before and _revision(backup) == before
    assert MlflowClient().get_registered_model("dax-backbone-kept").name == "dax-backbone-kept"
    assert MlflowClient().create_registered_model("dax-backbone-new").name == "dax-backbone-new"
    assert upgrade_home_store(db) is None                        # done once: the next process finds it current
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db", backup.name]


def test_a_store_from_a_newer_mlflow_is_refused_and_left_as_it_is(tmp_path, home_tracking):
    db = tmp_path / "mlflow.db"
    MlflowClient(f"sqlite:///{db}", registry_uri=f"sqlite:///{db}").create_registered_model("dax-backbone-kept")
    with sqlite3.connect(db) as con:
        con.execute("UPDATE alembic_version SET version_num = 'f0f0f0f0f0f0'")   # a revision this MLflow never had
    written = db.read_bytes()

    with pytest.raises(StoreError, match="written by a newer MLflow") as refused:
        configure_tracking(tmp_path)
    assert "pip install -U" in str(refused.value) and "never downgraded" in str(refused.value)
    assert db.read_bytes() == written and sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]


def test_no_store_yet_and_a_current_store_are_left_to_mlflow(tmp_path, home_tracking):
    db = tmp_path / "mlflow.db"
    assert upgrade_home_store(db) is None and not db.exists()
    configure_tracking(tmp_path)
    MlflowClient().create_registered_model("dax-backbone-first")     # MLflow makes the store at its own schema
    written = db.read_bytes()
    assert upgrade_home_store(db) is None and db.read_bytes() == written


def test_an_unknown_model_is_refused_with_what_the_registry_holds(tmp_path, home_tracking):
    """A URI that names no registered version raises UnknownModel, naming the models of its kind with their aliases
    (MLflow itself says "Registered Model with name=... not found" or "alias ... not found", two error codes)."""
    home = tmp_path / "home"
    with pytest.raises(UnknownModel, match="the home has no MLflow store yet"):
        require_registry(home)
    assert not (home / "mlflow.db").exists()                  # refused, not given an empty store
    configure_tracking(home)
    client = MlflowClient()
    client.create_registered_model("dax-backbone-resnet18")
    version = client.create_model_version("dax-backbone-resnet18", source=str(tmp_path / "model")).version
    client.set_registered_model_alias("dax-backbone-resnet18", "candidate", version)
    assert require_registry(home) == mlflow.get_tracking_uri()
    assert resolve_model("models:/dax-backbone-resnet18@candidate") == ("dax-backbone-resnet18", "1")
    assert resolve_model("models:/dax-backbone-resnet18/1") == ("dax-backbone-resnet18", "1")
    held = "registered here: models:/dax-backbone-resnet18 @candidate"
    for uri in ("models:/dax-backbone-vit_tiny_patch16@candidate", "models:/dax-backbone-resnet18@champion",
                "models:/dax-backbone-resnet18/2"):
        with pytest.raises(UnknownModel, match=f"no registered model {uri} \\({held}\\)"):
            resolve_model(uri)
    with pytest.raises(UnknownModel, match="no dax-head-metal-\\* model is registered here"):
        resolve_model("models:/dax-head-metal-resnet18@candidate")
    for not_a_uri in ("dax-backbone-resnet18", "models:/dax-backbone-resnet18/latest"):
        with pytest.raises(UnknownModel, match="models:/<name>@<alias>|cannot read a model name"):
            resolve_model(not_a_uri)
