"""The steps around the pretraining loop, as plain functions and as Prefect tasks.

    prepare_job: catalog query -> selection; labels -> the kNN monitor's held-out images; job folder
    open_run: the MLflow run (params, config, query, dataset input with the manifest digest, commit)
    run_training: the loop in this process, or ``torchrun --nproc_per_node N -m tasks.pretrain.main_dino JOB``
    register_backbone: the final teacher backbone -> ``dax-backbone-<arch>@candidate``; attention maps

Held-out images: when labels are given, the patients of the ``test`` split (tasks.ingest.labels) are removed
from the pretraining selection; the kNN monitor classifies them against a bank of ``train``-split
images, and the heads are evaluated on the same patients later.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NONE

from dax_models.augment import XrayEvalTransform
from dax_models.heads import MODEL_POLARITY
from tasks.fileio import sha256_file
from tasks.ingest.events import catalog_images
from tasks.ingest.labels import load_labels
from tasks.label_schema import BODY_REGIONS
from tasks.pretrain.data import Selection, SelectionError, read_samples, select_images
from tasks.pretrain.main_dino import (
    PretrainConfig,
    load_config,
    read_job,
    teacher_backbone,
    train,
    write_job,
)
from tasks.pretrain.monitor import end_margins, knn_thumbnails, margin_lines
from tasks.release.registry import (
    PRETRAIN_EXPERIMENT,
    backbone_model,
    ensure_experiment,
    log_torch_model,
)
from tasks.version import code_version, git_commit

log = logging.getLogger("dax.pretrain")

__all__ = ["attention_figure", "build_knn_probe", "eval_images", "knn_probe_rows", "latest_job", "open_run",
           "prepare_job", "register_backbone", "resumable_job", "run_training"]


def _spread(keys: list[str], limit: int) -> list[str]:
    """At most ``limit`` keys, spread evenly over the sorted list (deterministic)."""
    keys = sorted(keys)
    if len(keys) <= limit:
        return keys
    return [keys[i] for i in np.linspace(0, len(keys) - 1, limit).round().astype(int)]


def eval_images(shard_dir: Path, rows: list[dict], size: int) -> tuple[torch.Tensor, list[str]]:
    """Evaluation views (N, 1, size, size, float16) of the given catalog rows, in the rows' order."""
    by_shard: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        by_shard[row["shard"]].append(row["key"])
    transform = XrayEvalTransform(size=size)
    views = {key: transform(pixels).to(torch.float16) for key, pixels, _ in read_samples(shard_dir, by_shard)}
    keys = [row["key"] for row in rows if row["key"] in views]
    return torch.stack([views[k] for k in keys]), keys


def knn_probe_rows(rows: list[dict], config: PretrainConfig) -> tuple[list[dict], list[dict], list[dict]]:
    """The labelled rows of a selection -> (held-out rows, the kNN bank's rows, its queries' rows).

    Held out: the ``test`` split's patients; the bank is spread over the ``train`` split's images
    (``knn_max_bank``), the queries over the held-out ones (``knn_max_queries``), deterministically.
    """
    held_out = [r for r in rows if r["split"] == "test"]
    bank_keys = set(_spread([r["key"] for r in rows if r["split"] == "train"], config.knn_max_bank))
    query_keys = set(_spread([r["key"] for r in held_out], config.knn_max_queries))
    return held_out, [r for r in rows if r["key"] in bank_keys], [r for r in rows if r["key"] in query_keys]


def build_knn_probe(shard_dir: Path, bank_rows: list[dict], query_rows: list[dict], size: int) -> dict:
    """The kNN monitor's data (``knn.pt``): bank and query images at ``size`` px, their region indices and
    which held-out patient each query is (0..P-1, for ``knn_margin``)."""
    classes = list(BODY_REGIONS)
    knn = {"classes": classes}
    for name, chosen_rows in (("bank", bank_rows), ("queries", query_rows)):
        images, keys = eval_images(shard_dir, chosen_rows, size)
        region = {r["key"]: r["region"] for r in chosen_rows}
        knn[name] = images
        knn["bank_labels" if name == "bank" else "query_labels"] = torch.tensor(
            [classes.index(region[k]) for k in keys])
        if name == "queries":
            patient = {r["key"]: r["patient_key"] for r in chosen_rows}
            _, index = np.unique([patient[k] for k in keys], return_inverse=True)
            knn["query_patients"] = torch.from_numpy(index.astype(np.int64))
    return knn


def prepare_job(home: Path, job_dir: Path, config: PretrainConfig, where: str | None, labels: Path | None,
                device: str = "auto") -> dict:
    """Select the images, build the kNN monitor's data, write the job folder; returns a summary."""
    selection = select_images(home, where)
    summary = {"selected": len(selection.keys), "shards": len(selection.shards), "catalog_images": catalog_images(home),
               "query_digest": selection.digest}     # what the query selected, before holding out test patients
    if labels is not None:
        chosen = set(selection.keys)
        rows = [r for r in load_labels(home, labels, ("region",)).to_pylist() if r["key"] in chosen]
        held_out, bank_rows, query_rows = knn_probe_rows(rows, config)
        if not bank_rows or not query_rows:
            patients = len({r["patient_key"] for r in rows})
            raise SelectionError(f"the kNN monitor (--labels) needs labelled images of training and of held-out (test) "
                                 f"patients; this selection gives {len(bank_rows)} training and {len(query_rows)} "
                                 f"held-out images of {patients} labelled patients: select more patients, or "
                                 "pretrain without --labels")
        selection = selection.without(r["key"] for r in held_out)
        knn = build_knn_probe(Path(selection.shard_dir), bank_rows, query_rows, config.knn_size)
        job_dir.mkdir(parents=True, exist_ok=True)
        torch.save(knn, job_dir / "knn.pt")
        classes = len(knn["classes"])
        counts = np.bincount(knn["query_labels"].numpy(), minlength=classes)
        summary.update(held_out=len(held_out), knn_bank=len(knn["bank"]), knn_queries=len(knn["queries"]),
                       chance_uniform=1.0 / classes, chance_majority=float(counts.max() / max(counts.sum(), 1)),
                       knn_thumbnails=knn_thumbnails(knn), knn_patients=int(knn["query_patients"].unique().numel()))
    if not selection.keys:
        raise SelectionError("nothing left to pretrain on after holding out the test patients")
    write_job(job_dir, config, selection, device=device)
    summary.update(trained_on=len(selection.keys), digest=selection.digest)
    (job_dir / "prepare.json").write_text(json.dumps(summary, indent=2))
    return summary


def open_run(home: Path, job_dir: Path, run_name: str | None = None) -> str:
    """Create the MLflow run for a job folder; log params, config, query, lineage and commit."""
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    job, config, selection = read_job(job_dir)
    prepared = json.loads((job_dir / "prepare.json").read_text())
    experiment = ensure_experiment(PRETRAIN_EXPERIMENT, home)
    with mlflow.start_run(experiment_id=experiment, run_name=run_name or f"{config.name}-{config.arch}") as run:
        flat = {k: v for k, v in config.to_dict().items() if k != "augment"}
        flat.update({f"augment.{k}": v for k, v in config.to_dict()["augment"].items()})
        mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
        mlflow.log_params({"device": job["device"], "images": len(selection.keys), "shards": len(selection.shards),
                           "polarity": MODEL_POLARITY})
        mlflow.set_tags({"dax.catalog_query": selection.where, "dax.manifest_digest": selection.digest,
                         "mlflow.source.git.commit": git_commit() or "unknown", "dax.code_version": code_version(),
                         "dax.job": job_dir.name})
        mlflow.log_dict(config.to_dict(), "config.json")
        mlflow.log_dict(selection.manifest(), "dataset/manifest.json")
        mlflow.log_dict(prepared, "dataset/prepare.json")
        dataset = MetaDataset(LocalArtifactDatasetSource(Path(selection.shard_dir).resolve().as_uri()),
                              name=f"dax-shards:{selection.where}"[:200], digest=selection.digest[:36])
        mlflow.log_input(dataset, context="pretraining")
        references = {"knn_chance_uniform": "chance_uniform", "knn_chance_majority": "chance_majority",
                      "knn_accuracy_thumbnails": "knn_thumbnails"}   # the kNN monitor's yardsticks
        mlflow.log_metrics({metric: prepared[key] for metric, key in references.items() if key in prepared})
        run_id = run.info.run_id
    job["run_id"] = run_id
    (job_dir / "job.json").write_text(json.dumps(job, indent=2, default=str))
    return run_id


def run_training(job_dir: Path, nproc_per_node: int = 1, resume: bool = False, stop_after: int | None = None) -> dict:
    """Train in this process (one device) or under torchrun (DDP, ``nproc_per_node`` ranks)."""
    job = json.loads((job_dir / "job.json").read_text())
    job.update(resume=resume, stop_after=stop_after)
    (job_dir / "job.json").write_text(json.dumps(job, indent=2, default=str))
    if nproc_per_node <= 1:
        return train(job_dir)
    # --log-dir: torchrun's per-rank files (error.json of a failed rank) stay with the job, not in a new
    # /tmp/torchelastic_* folder per run that nothing removes
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
               f"--log-dir={job_dir / 'torchrun'}", "-m", "tasks.pretrain.main_dino", str(job_dir)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    with open(job_dir / "torchrun.log", "w") as out:
        completed = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    if completed.returncode != 0:
        tail = (job_dir / "torchrun.log").read_text().splitlines()[-15:]
        raise RuntimeError("torchrun failed (exit %d):\n%s" % (completed.returncode, "\n".join(tail)))
    return json.loads((job_dir / "result.json").read_text())


def attention_figure(backbone, images: torch.Tensor, path: Path) -> Path:
    """DINO's picture: the last block's CLS attention over the patches, per image (mean and 3 heads)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = images.float()
    attention = backbone.last_self_attention(x)[:, :, 0, 1:]          # (B, heads, patches)
    p = backbone.patch_size
    h, w = x.shape[-2] // p, x.shape[-1] // p
    attention = attention.reshape(len(x), -1, h, w)
    attention = torch.nn.functional.interpolate(attention, scale_factor=p, mode="nearest")
    heads = min(3, attention.shape[1])
    fig, axes = plt.subplots(len(x), 2 + heads, figsize=(2.2 * (2 + heads), 2.2 * len(x)), squeeze=False)
    for i in range(len(x)):
        panels = [("image", x[i, 0], "gray"), ("mean attention", attention[i].mean(0), "inferno")]
        panels += [(f"head {j}", attention[i, j], "inferno") for j in range(heads)]
        for ax, (title, img, cmap) in zip(axes[i], panels):
            ax.imshow(img.numpy(), cmap=cmap)
            ax.set_axis_off()
            if i == 0:
                ax.set_title(title, fontsize=9)
    fig.suptitle("last-block self-attention of the [CLS] token (teacher)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def register_backbone(job_dir: Path, alias: str = "candidate") -> dict:
    """Log the final teacher backbone to the job's MLflow run and register it under ``alias``."""
    import mlflow
    from mlflow.tracking import MlflowClient

    job, config, selection = read_job(job_dir)
    result = json.loads((job_dir / "result.json").read_text())
    backbone = teacher_backbone(job_dir)
    name = backbone_model(config.arch)
    client = MlflowClient()
    with mlflow.start_run(run_id=job["run_id"]):
        info = log_torch_model(
            backbone, "backbone", name,
            metadata={"arch": config.arch, "in_chans": config.in_chans, "input": "gray float [0,1], (B,1,H,W)",
                      "manifest_digest": selection.digest, "steps": result["step"]})
        figure = None
        if backbone.kind == "vit":
            knn_file = job_dir / "knn.pt"
            if knn_file.is_file():
                images = torch.load(knn_file, weights_only=False)["queries"][:4]
            else:
                rows = [{"key": k, "shard": s} for k, s in _first_rows(selection, 4)]
                images, _ = eval_images(Path(selection.shard_dir), rows, config.knn_size)
            size = max(config.knn_size, 2 * config.augment.global_size)
            images = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear")
            figure = attention_figure(backbone, images, job_dir / "attention.png")
            mlflow.log_artifact(str(figure), "figures")
        if result.get("knn"):
            mlflow.log_dict(result["knn"], "knn_history.json")
        facts = {k: result[k] for k in ("teacher_init_weight", "teacher_centre_step", "crop_rejection_rate")
                 if result.get(k) is not None}
        if facts:
            mlflow.log_metrics(facts)
        if result.get("precision"):
            mlflow.set_tag("dax.precision", result["precision"])     # what the config's precision resolved to
        mlflow.log_metrics({f"{metric}{end}": margin[key] for metric, _, _, margin in end_margins(result)
                            for end, key in (("", "margin"), ("_low", "low"), ("_high", "high"))})
    version = str(info.registered_model_version)
    client.set_registered_model_alias(name, alias, version)
    for key, value in {"dax.manifest_digest": selection.digest, "dax.config": config.name,
                       "dax.status": result["status"], "dax.steps": str(result["step"])}.items():
        client.set_model_version_tag(name, version, key, value)
    registered = {"model": name, "version": version, "alias": alias, "uri": f"models:/{name}@{alias}",
                  "figure": str(figure) if figure else None}
    (job_dir / "registered.json").write_text(json.dumps(registered, indent=2))
    return registered


def _first_rows(selection: Selection, n: int) -> list[tuple[str, str]]:
    from tasks.ingest.catalog import open_snapshot
    home = Path(selection.shard_dir).parent
    con = open_snapshot(home)
    try:
        keys = list(selection.keys[:n])
        return con.sql("SELECT key, shard FROM images WHERE list_contains($keys, key) ORDER BY key",
                       params={"keys": keys}).fetchall()
    finally:
        con.close()


# --- jobs under the home -----------------------------------------------------------------------------
JOBS_DIR = "pretrain"


def latest_job(root: Path) -> Path:
    jobs = sorted((root / JOBS_DIR).glob("*/job.json"), key=lambda p: p.stat().st_mtime)
    if not jobs:
        raise FileNotFoundError("no pretraining job to resume under this home")
    return jobs[-1].parent


def resumable_job(root: Path, name: str) -> Path:
    """The job ``resume`` names under the home (``last``: the latest); FileNotFoundError when there is none."""
    job_dir = latest_job(root) if name == "last" else root / JOBS_DIR / name
    if not (job_dir / "job.json").is_file():
        raise FileNotFoundError(f"no pretraining job {name!r} under this home")
    return job_dir


def summary_markdown(summary: dict) -> str:
    """The ``pretrain-summary`` artifact: status, kNN per epoch beside its yardsticks, the registration."""
    prepared, registered, knn = summary["prepared"], summary["registered"], summary.get("knn") or []
    lines = [f"# Pretraining {summary['job']}", "", f"status **{summary['status']}**, {summary['step']} of "
             f"{summary['total_steps']} steps, {summary['seconds']} s, MLflow run `{summary['run_id']}`", ""]
    if knn:
        lines += ["| epoch | kNN accuracy, teacher (held-out patients) | student | teacher, layout readout |",
                  "|---|---|---|---|"]
        lines += [f"| {k['epoch']} | {k['knn_accuracy']:.3f} | {_accuracy(k, 'knn_accuracy_student')} | "
                  f"{_accuracy(k, 'knn_accuracy_layout')} |" for k in knn]
        lines += ["", f"chance: {prepared.get('chance_uniform', 0):.3f} (uniform), "
                      f"{prepared.get('chance_majority', 0):.3f} (majority class)"]
        if "knn_thumbnails" in prepared:
            lines[-1] += f"; the same kNN on 16x16 pixel thumbnails: {prepared['knn_thumbnails']:.3f}"
        lines += [f"\n{what}: {text}" for what, text in margin_lines(summary)]
    if registered:
        lines += ["", f"registered `{registered['uri']}` (version {registered['version']})"]
    return "\n".join(lines)


def _accuracy(knn_row: dict, key: str) -> str:
    """A kNN accuracy of a monitor row (``knn_accuracy_student``, ``knn_accuracy_layout``); "-" in rows of runs
    from before it was scored."""
    value = knn_row.get(key)
    return f"{value:.3f}" if value is not None else "-"


class PretrainingUnfinished(RuntimeError):
    """A pretraining that registered nothing (stopped, collapsed): never reused by the cache."""

    def __init__(self, summary: dict):
        super().__init__(f"pretraining {summary.get('status')}: nothing registered")
        self.summary = summary


def pretraining_cache_key(_context, parameters: dict) -> str:
    """Prefect's cache key of a pretraining: the home, the resolved config (overrides applied), the manifest
    digest of the catalog selection and the label file's hash (its test patients are held out). The same
    key means the same training data and settings, so a finished job's backbone is reused."""
    root = Path(parameters["home"])
    labels = parameters.get("labels")
    identity = {"home": str(root.resolve()),
                "config": load_config(parameters["config"], parameters.get("overrides")).to_dict(),
                "data": select_images(root, parameters.get("where")).digest,
                "labels": sha256_file(Path(labels)) if labels else None}
    return "dax-pretrain-" + hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


# --- Prefect tasks --------------------------------------------------------------------------------------
prepare_job_task = task(prepare_job, name="select-images", cache_policy=NONE)
open_run_task = task(open_run, name="open-mlflow-run", cache_policy=NONE)
run_training_task = task(run_training, name="train-dino", cache_policy=NONE)
register_backbone_task = task(register_backbone, name="register-backbone", cache_policy=NONE)
