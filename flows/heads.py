"""Flow `heads`: small heads on a FROZEN backbone, against its random-init twin, over seeds.

    labelled images at size S (tasks.head_data)  ->  features once per backbone, cached under
    HOME/cache/features (mapped: pretrained, random-init)  ->  fan-out (backbone x task x seed) with
    .map(): one Prefect task per branch trains, evaluates, logs a child MLflow run and registers the
    pretrained branch's head as dax-head-<task>-<arch> (tagged dax.backbone=<name>/<version>)
    ->  alias `candidate` on the best-validation seed of each task  ->  results table (pretrained,
    random-init, paper) as MLflow table + markdown + CSV, figures, a Prefect markdown artifact

The random-init twin is ``create_backbone(arch, in_chans)`` after ``torch.manual_seed(random_seed)``
(seed 0 by default: the very initialisation DINO pretraining starts from with its default seed), so the
comparison measures what pretraining added. Metrics: ``tasks.head_training``'s module docstring.
Nothing identifying is logged: the label file is named by its sha256, images by catalog keys only in
files that stay under the home (no path, no DICOM value goes to MLflow or Prefect).
"""
from __future__ import annotations

import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from flows.home import configure
from tasks.head_training import resolve_model as resolve_backbone
from tasks.tracking import configure_tracking, ensure_experiment

__all__ = ["DEFAULT_BACKBONE", "EXPERIMENT", "PAPER", "ROWS", "heads", "resolve_backbone", "results_table"]

EXPERIMENT = "dax-heads"
DEFAULT_BACKBONE = "models:/dax-backbone-vit_tiny_patch16@candidate"
HEADS_DIR = "heads"
BRANCHES_AT_ONCE = 2          # the flow's thread pool: branches trained at the same time

# (task, metric, label, unit): "%" metrics are fractions shown as percentages
ROWS = [
    ("region", "accuracy", "accuracy (linear, last-4 CLS / pooled)", "%"),
    ("region", "precision", "precision (macro)", "%"),
    ("region", "recall", "recall (macro)", "%"),
    ("region", "f1", "F1 (macro)", "%"),
    ("region", "linear_pooled_accuracy", "accuracy (linear, pooled)", "%"),
    ("region", "mlp_accuracy", "accuracy (MLP, pooled)", "%"),
    ("region", "knn_accuracy", "accuracy (kNN k=20, T=0.07)", "%"),
    ("region", "fewshot1_accuracy", "accuracy (1-shot linear)", "%"),
    ("region", "fewshot5_accuracy", "accuracy (5-shot linear)", "%"),
    ("region", "fewshot10_accuracy", "accuracy (10-shot linear)", "%"),
    ("region", "e2e_accuracy", "accuracy (supervised end-to-end from this init)", "%"),
    ("metal", "dice", "Dice (native, images with metal)", "%"),
    ("metal", "iou", "IoU (native, images with metal)", "%"),
    ("metal", "dice_all", "Dice (native, all images)", "%"),
    ("screws", "head_l1_px", "head L1 error (native px)", "px"),
    ("screws", "tip_l1_px", "tip L1 error (native px)", "px"),
    ("screws", "angle_deg", "angle error (deg)", "deg"),
    ("screws", "precision", "precision", "%"),
    ("screws", "recall", "recall", "%"),
    ("screws", "f1", "F1", "%"),
]
# DAX (the paper), for the same tasks on its clinical data; screw errors at 976 px images
PAPER = {
    ("region", "accuracy"): "96.9 %", ("region", "precision"): "97.0 %", ("region", "recall"): "97.0 %",
    ("metal", "dice"): "94.1 %",
    ("screws", "head_l1_px"): "3.28 px (at 976 px)", ("screws", "tip_l1_px"): "7.86 px (at 976 px)",
    ("screws", "angle_deg"): "1.22 deg",
}


def _stats(values: list[float]) -> tuple[float, float, int]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return float("nan"), float("nan"), 0
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)


def _format(mean: float, sd: float, unit: str) -> str:
    if not math.isfinite(mean):
        return "n/a"
    if unit == "%":
        return f"{100 * mean:.1f} ± {100 * sd:.1f} %"
    return f"{mean:.2f} ± {sd:.2f} {unit}"


def results_table(results: list[dict], tasks: tuple[str, ...]) -> list[dict]:
    """Rows (task, metric): pretrained and random-init mean ± sd over seeds, and the paper's number."""
    rows = []
    for task_name, metric, label, unit in ROWS:
        if task_name not in tasks:
            continue
        row = {"task": task_name, "metric": metric, "label": label, "paper": PAPER.get((task_name, metric), "")}
        ran = False
        for role in ("pretrained", "random"):
            branches = [r for r in results if r["role"] == role and r["task"] == task_name]
            values = [r["metrics"].get(metric) for r in branches]
            ran = ran or any(metric in r["metrics"] or metric in r.get("undefined", ()) for r in branches)
            mean, sd, n = _stats([v for v in values if v is not None])
            row.update({role: _format(mean, sd, unit), f"{role}_mean": mean, f"{role}_sd": sd, f"{role}_n": n})
        if ran:   # a metric that was computed but undefined (no matched screw: NaN) shows as n/a
            rows.append(row)
    return rows


def _markdown(rows: list[dict], header: list[str]) -> str:
    lines = header + ["", "| task | metric | pretrained (mean ± sd) | random-init (mean ± sd) | DAX paper |",
                      "|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['label']} | {r['pretrained']} | {r['random']} | {r['paper']} |" for r in rows]
    return "\n".join(lines)


def _sha256(path: Path) -> str:
    from tasks.fileio import sha256_file
    return sha256_file(path)


@task(name="head-features", cache_policy=NONE, task_run_name="features-{role}")
def features_task(role: str, backbone, images, cache_dir: str, data_digest: str, parts: tuple, device: str,
                  batch_size: int) -> str:
    from tasks.head_training import compute_features
    return compute_features(role, backbone, images, cache_dir, data_digest, parts, device, batch_size)


@task(name="train-head", cache_policy=NONE, task_run_name="{task_name}-{role}-seed{seed}")
def branch_task(role: str, task_name: str, seed: int, data, stores: dict, backbones: dict, config, arch: str,
                experiment_id: str, parent_run_id: str, backbone_ref: str, figures_dir: str, register: bool,
                figure_seed: int) -> dict:
    from tasks.head_training import train_branch
    return train_branch(role, task_name, seed, data, stores, backbones, config, arch, experiment_id, parent_run_id,
                        backbone_ref, figures_dir, register=register, figures=seed == figure_seed)


@flow(name="heads", task_runner=ThreadPoolTaskRunner(max_workers=BRANCHES_AT_ONCE))
def heads(
    backbone: str = DEFAULT_BACKBONE,
    home: str | None = None,
    labels: str | None = None,
    seeds: int = 3,
    tasks: tuple[str, ...] = ("region", "metal", "screws"),
    size: int = 224,
    where: str | None = None,
    max_images: int | None = None,
    overrides: dict | None = None,
    alias: str = "candidate",
    register_heads: bool = True,
    random_seed: int = 0,
    torch_threads: int | None = None,
) -> dict:
    """Train and evaluate the heads of ``tasks`` on ``backbone`` and on its random-init twin, ``seeds`` seeds each.

    ``labels``: the corpus' ``labels.parquet``; ``where``: a filter on the catalog's ``images``;
    ``overrides``: ``tasks.head_training.HeadConfig`` fields (epochs, learning rates, device, ...).
    ``torch_threads``: intra-op threads while the flow runs (default: the cores shared by the 2 branches
    that run at once; restored at the end). Returns a summary with the results table (rows
    task/metric; pretrained, random-init, paper).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(torch_threads or max(1, (os.cpu_count() or 2) // BRANCHES_AT_ONCE))
    try:
        return _heads(backbone, home, labels, seeds, tasks, size, where, max_images, overrides, alias, register_heads,
                      random_seed)
    finally:
        torch.set_num_threads(before)


def _heads(backbone, home, labels, seeds, tasks, size, where, max_images, overrides, alias, register,
           random_seed) -> dict:
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from dax_models.backbones import create_backbone
    from tasks.head_data import load_head_dataset
    from tasks.head_training import TASKS, HeadConfig

    began = time.perf_counter()
    root = configure(home)
    configure_tracking(root)
    logger = get_run_logger()
    tasks = tuple(tasks)
    if not tasks or set(tasks) - set(TASKS):
        raise ValueError(f"tasks must be among {', '.join(TASKS)}")
    if labels is None:
        raise ValueError("the heads need labels: give the corpus' labels.parquet")
    if seeds < 1:
        raise ValueError("seeds must be >= 1")
    config = HeadConfig.from_dict({**(overrides or {}), "size": size})
    name, version = resolve_backbone(backbone)
    backbone_ref = f"{name}/{version}"
    pretrained = mlflow.pytorch.load_model(f"models:/{name}/{version}", map_location="cpu").eval()
    arch = pretrained.arch
    torch.manual_seed(random_seed)
    twin = create_backbone(arch, pretrained.in_chans, img_size=size).eval()

    data = load_head_dataset(root, Path(labels), size=size, where=where, masks="metal" in tasks,
                             max_images=max_images)
    summary_data = data.summary()
    logger.info("%(images)d labelled images of %(patients)d patients at %(size)d px: %(train_images)d train, "
                "%(val_images)d val, %(test_images)d test", summary_data)
    parts = tuple(p for p, wanted in (("pooled", "region" in tasks), ("cls4", "region" in tasks),
                                      ("maps", bool(set(tasks) & {"metal", "screws"}))) if wanted)
    roles = ["pretrained", "random"]
    models = {"pretrained": pretrained, "random": twin}
    cache_dir = root / "cache" / "features"
    feature_futures = features_task.map(roles, [models[r] for r in roles], unmapped(quote(data.images)),
                                        unmapped(str(cache_dir)), unmapped(data.digest), unmapped(parts),
                                        unmapped(config.device), unmapped(config.feature_batch))
    stores = {role: future.result() for role, future in zip(roles, feature_futures)}

    job = f"{arch}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}"
    figures_dir = root / HEADS_DIR / job / "figures"
    experiment = ensure_experiment(EXPERIMENT, root)
    client = MlflowClient()
    with mlflow.start_run(experiment_id=experiment, run_name=f"heads-{arch}") as run:
        mlflow.set_tags({"dax.backbone": backbone_ref, "dax.job": job})
        mlflow.log_params({"backbone": backbone_ref, "arch": arch, "seeds": seeds, "tasks": ",".join(tasks),
                           "random_seed": random_seed, "labels_sha256": _sha256(Path(labels))[:16],
                           "where": (where or "TRUE")[:500],
                           **{f"config.{k}": str(v)[:500] for k, v in config.to_dict().items() if k != "size"},
                           "size": size})
        mlflow.log_dict(summary_data, "dataset/summary.json")
        specs = [(role, task_name, seed) for role in roles for task_name in tasks for seed in range(seeds)]
        futures = branch_task.map([s[0] for s in specs], [s[1] for s in specs], [s[2] for s in specs],
                                  unmapped(quote(data)), unmapped(stores), unmapped(quote(models)),
                                  unmapped(config), unmapped(arch), unmapped(experiment), unmapped(run.info.run_id),
                                  unmapped(backbone_ref), unmapped(str(figures_dir)), unmapped(register),
                                  unmapped(0))
        results = [future.result() for future in futures]

        registered = {}
        for task_name in tasks:
            candidates = [r for r in results if r["role"] == "pretrained" and r["task"] == task_name and r["version"]]
            if not candidates:
                continue
            best = max(candidates, key=lambda r: (r["val_score"] if math.isfinite(r["val_score"]) else -math.inf,
                                                  -r["seed"]))
            client.set_registered_model_alias(best["model"], alias, best["version"])
            registered[task_name] = {"model": best["model"], "version": best["version"], "seed": best["seed"],
                                     "alias": alias, "uri": f"models:/{best['model']}@{alias}",
                                     "versions": sorted((r["version"] for r in candidates), key=int)}

        rows = results_table(results, tasks)
        header = [f"# Frozen-backbone heads: {backbone_ref} vs random-init {arch}", "",
                  f"{summary_data['images']} labelled images ({summary_data['patients']} patients) at {size} px; "
                  f"train {summary_data['train_images']}, val {summary_data['val_images']}, test "
                  f"{summary_data['test_images']} images (split by patient); {seeds} seed(s); MLflow run "
                  f"`{run.info.run_id}`. Screw errors are at each image's native resolution (DAX: 976 px)."]
        markdown = _markdown(rows, header)
        if registered:
            markdown += "\n\nregistered: " + ", ".join(f"`{v['uri']}` = version {v['version']} (seed {v['seed']})"
                                                       for v in registered.values())
        mlflow.log_table({k: [r[k] for r in rows] for k in ("task", "metric", "label", "pretrained", "random", "paper",
                                                             "pretrained_mean", "pretrained_sd", "random_mean",
                                                             "random_sd")}, "results/heads_table.json")
        mlflow.log_text(markdown, "results/heads.md")
        mlflow.log_text(_csv(rows), "results/heads.csv")
        flat = {}
        for r in rows:
            for role in ("pretrained", "random"):
                if math.isfinite(r[f"{role}_mean"]):
                    flat[f"{role}.{r['task']}.{r['metric']}.mean"] = r[f"{role}_mean"]
                    flat[f"{role}.{r['task']}.{r['metric']}.sd"] = r[f"{role}_sd"]
        mlflow.log_metrics(flat)
        figures = sorted({f for r in results for f in r["figures"]})
        for path in figures:
            mlflow.log_artifact(path, "figures")
    create_markdown_artifact(markdown, key="heads-summary", description="Frozen-backbone heads vs random-init")
    logger.info("heads done: %d branches, %d heads registered", len(results), sum(1 for r in results if r["version"]))
    return {"run_id": run.info.run_id, "backbone": backbone_ref, "arch": arch, "data": summary_data, "table": rows,
            "markdown": markdown, "registered": registered, "branches": results, "figures": figures,
            "seconds": round(time.perf_counter() - began, 1)}


def _csv(rows: list[dict]) -> str:
    import csv
    import io
    out = io.StringIO()
    keys = ["task", "metric", "label", "pretrained_mean", "pretrained_sd", "pretrained_n", "random_mean", "random_sd",
            "random_n", "paper"]
    writer = csv.DictWriter(out, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
