"""The heads stage's steps, as the ``heads`` flow maps them: features once per backbone, then one
branch per (backbone, task, seed) that trains, evaluates, logs a child MLflow run and registers the
pretrained branch's head (``tasks.release.registry``).

Nothing identifying is logged: images are named by catalog keys only in files that stay under the
home (no path, no DICOM value goes to MLflow or Prefect).
"""
from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NONE

from dax_models.backbones import Backbone
from tasks.heads.data import HeadDataset
from tasks.heads.features import FeatureStore, compute_features
from tasks.heads.figures import task_figures
from tasks.heads.floors import run_floor
from tasks.heads.training import HeadConfig, run_task, task_view
from tasks.release.registry import head_model, log_torch_model

__all__ = ["FLOOR", "branch_task", "features_task", "train_branch"]

FLOOR = "floor"                   # the role of the branches that train no head: the floors (tasks.heads.floors)

_MLFLOW_LOCK = threading.Lock()   # one MLflow writer at a time among the flow's threads (SQLite store)


def train_branch(role: str, task: str, seed: int, views: dict[str, HeadDataset], stores: dict[str, str],
                 backbones: dict[str, Backbone], config: HeadConfig, arch: str, experiment_id: str,
                 parent_run_id: str, backbone_ref: str, figures_dir: str, register: bool = True,
                 figures: bool = True) -> dict:
    """One branch of the fan-out: train and evaluate ``task`` with ``seed`` on ``role``'s cached features
    (``stores["<role>:<view>"]``, the view of ``task_view``), or the task's floor when ``role`` is 'floor';
    log a child MLflow run; register the head (``dax-head-<task>-<arch>``, tagged with the backbone's
    ``name/version``) when ``role`` is 'pretrained' and ``register``. Returns metrics and the version."""
    import mlflow
    from mlflow.tracking import MlflowClient

    data = views[task_view(task)]
    if role == FLOOR:
        result = run_floor(task, seed, data, config)
    else:
        store = FeatureStore.open(Path(stores[f"{role}:{task_view(task)}"]))
        if store is None:
            raise FileNotFoundError(f"the feature cache of the {role} backbone is incomplete")
        result = run_task(task, seed, data, store, config, arch, backbone=backbones.get(role))
    label = f"{role}-seed{seed}"
    paths = task_figures(result, data, Path(figures_dir), label) if figures else []
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    client = MlflowClient()
    model_name = head_model(task, arch)
    version = None
    with _MLFLOW_LOCK:
        run = client.create_run(experiment_id, run_name=f"{task}-{role}-seed{seed}",
                                tags={"mlflow.parentRunId": parent_run_id, "dax.task": task, "dax.role": role,
                                      "dax.seed": str(seed), "dax.backbone": {"pretrained": backbone_ref,
                                                                              FLOOR: "none"}.get(role, f"random-init {arch}")})
        run_id = run.info.run_id
        client.log_batch(run_id, params=_params({"task": task, "role": role, "seed": seed, "size": data.size}))
        RunMetrics(client, run_id).log({**metrics, "val_score": result.val_score})
        for path in paths:
            client.log_artifact(run_id, str(path), "figures")
        if role == "pretrained" and register and result.head is not None:
            with mlflow.start_run(run_id=run_id):
                info = log_torch_model(
                    result.head, "head", model_name,
                    metadata={"task": task, "arch": arch, "features": result.head.features, "size": data.size,
                              "classes": list(result.head.classes or []), "threshold": result.head.threshold,
                              "backbone": backbone_ref, "seed": seed})
            version = str(info.registered_model_version)
            tags = {"dax.backbone": backbone_ref, "dax.task": task, "dax.seed": str(seed), "dax.size": str(data.size),
                    "dax.features": result.head.features, "dax.val_score": f"{result.val_score:.6g}"}
            tags.update({f"metric.{k}": f"{v:.6g}" for k, v in metrics.items()})
            for key, value in tags.items():
                client.set_model_version_tag(model_name, version, key, value)
        client.set_terminated(run_id)
    undefined = sorted(k for k, v in result.metrics.items() if isinstance(v, float) and not math.isfinite(v))
    return {"role": role, "task": task, "seed": seed, "metrics": metrics, "undefined": undefined,
            "val_score": result.val_score, "per_image": result.per_image,
            "test_patients": _patient_numbers([data.patient_keys[i] for i in data.indices("test")]),
            "model": model_name if version else None, "version": version, "run_id": run_id,
            "figures": [str(p) for p in paths]}


def _patient_numbers(keys: list[str]) -> list[int]:
    """Patients of the test images as numbers (0, 1, ... in key order): enough to resample patients, no key leaves."""
    return np.unique(np.asarray(keys), return_inverse=True)[1].astype(int).tolist()


class RunMetrics:
    """Metrics of one run in one batch (MLflow keys: letters, digits, _ - . / and spaces)."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def log(self, metrics: dict[str, float], step: int = 0) -> None:
        import time as _time

        from mlflow.entities import Metric
        now = int(_time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)


def _params(values: dict) -> list:
    from mlflow.entities import Param
    return [Param(k, str(v)[:500]) for k, v in values.items()]


features_task = task(compute_features, name="head-features", cache_policy=NONE, task_run_name="features-{role}-{view}")
branch_task = task(train_branch, name="train-head", cache_policy=NONE, task_run_name="{task}-{role}-seed{seed}")
