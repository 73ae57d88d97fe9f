"""Flow `pretrain`: DINO on the shard store, one MLflow run, the teacher registered as a candidate.

    select images (catalog query; labelled test patients held out)  ->  open the MLflow run
    ->  train (this process, or torchrun DDP)  ->  register dax-backbone-<arch>@candidate + attention maps

A job lives in ``HOME/pretrain/<job>/`` (config, selection, checkpoints, history); ``resume`` names a
job whose run was interrupted: it continues from its last checkpoint, in the same MLflow run.
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks.home import configure
from tasks.pretrain.main_dino import load_config
from tasks.pretrain.steps import (
    JOBS_DIR,
    open_run_task,
    prepare_job_task,
    register_backbone_task,
    resumable_job,
    run_training_task,
    summary_markdown,
)
from tasks.release.registry import configure_tracking


@flow(name="pretrain")
def pretrain(
    config: str = "demo-cpu",
    where: str | None = None,
    home: str | None = None,
    labels: str | None = None,
    device: str = "auto",
    nproc_per_node: int = 1,
    resume: str | None = None,
    overrides: dict | None = None,
    stop_after: int | None = None,
) -> dict:
    """Pretrain a DINO backbone on the catalog images matching ``where`` (SQL on ``images``)."""
    began = time.perf_counter()
    root = configure(home)
    configure_tracking(root)
    logger = get_run_logger()
    if resume:
        job_dir = resumable_job(root, resume)
        prepared = json.loads((job_dir / "prepare.json").read_text())
        run_id = json.loads((job_dir / "job.json").read_text())["run_id"]
        logger.info("resuming job %s (MLflow run %s)", job_dir.name, run_id)
    else:
        cfg = load_config(config, overrides)
        job_dir = root / JOBS_DIR / f"{cfg.name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}"
        prepared = prepare_job_task(root, job_dir, cfg, where, Path(labels) if labels else None, device)
        logger.info("selected %d images in %d shards (%d for training)", prepared["selected"], prepared["shards"],
                    prepared["trained_on"])
        run_id = open_run_task(root, job_dir)
    with mlflow.start_run(run_id=run_id, log_system_metrics=True):
        result = run_training_task(job_dir, nproc_per_node, resume=bool(resume), stop_after=stop_after)
    registered = register_backbone_task(job_dir) if result["status"] == "finished" else None
    summary = {"job": job_dir.name, "run_id": run_id, **result, "prepared": prepared, "registered": registered,
               "seconds": round(time.perf_counter() - began, 1)}
    create_markdown_artifact(summary_markdown(summary), key="pretrain-summary", description="DINO pretraining")
    return summary
