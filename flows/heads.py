"""Flow `heads`: small heads on a FROZEN backbone, against its random-init twin and the floors, over seeds.

    labelled images, one view per input size (tasks.heads.data): region at S, metal and screws at dense_size
    ->  features once per (backbone, view), cached under HOME/cache/features (mapped)
    ->  fan-out (backbone x task x seed, and the floors of region and metal x seed): one Prefect task per
        branch trains, evaluates, logs a child MLflow run and registers the pretrained branch's head as
        dax-head-<task>-<arch>; a progress line per branch as it finishes
    ->  alias `candidate` on the best-validation seed of each task (tasks.release.registry)
    ->  results table: floor, random-init, pretrained, ceiling, paper (tasks.heads.results), figures, a
        Prefect artifact

The random-init twin is ``create_backbone(arch, in_chans)`` after ``torch.manual_seed(random_seed)``
(seed 0 by default: the very initialisation DINO pretraining starts from with its default seed), so the
comparison measures what pretraining added. Nothing identifying is logged: the label file is named by
its sha256, images by catalog keys only in files that stay under the home.
"""
from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from dax_models.heads import MODEL_POLARITY
from tasks.fileio import sha256_file
from tasks.heads.floors import FLOOR_TASKS
from tasks.heads.results import log_results, results_markdown, results_table
from tasks.heads.steps import FLOOR, branch_task, features_task
from tasks.home import configure
from tasks.release.registry import (
    DEFAULT_BACKBONE,
    HEADLINE,
    HEADS_EXPERIMENT,
    alias_best_heads,
    configure_tracking,
    ensure_experiment,
    resolve_model,
)

__all__ = ["heads"]

HEADS_DIR = "heads"
VIEW_PARTS = {"region": ("pooled", "last4"), "dense": ("maps",)}   # the features each view's tasks read
BRANCHES_AT_ONCE = 2          # the flow's thread pool: branches trained at the same time
FIGURE_SEED = 0               # the seed whose branches draw figures


@flow(name="heads", task_runner=ThreadPoolTaskRunner(max_workers=BRANCHES_AT_ONCE))
def heads(
    backbone: str = DEFAULT_BACKBONE,
    home: str | None = None,
    labels: str | None = None,
    seeds: int = 3,
    tasks: tuple[str, ...] = ("region", "metal", "screws"),
    size: int | None = None,
    where: str | None = None,
    max_images: int | None = None,
    config: str | None = None,
    overrides: dict | None = None,
    alias: str = "candidate",
    register_heads: bool = True,
    random_seed: int = 0,
    torch_threads: int | None = None,
) -> dict:
    """Train and evaluate the heads of ``tasks`` on ``backbone`` and on its random-init twin, ``seeds`` seeds each.

    ``labels``: the corpus' ``labels.parquet``; ``where``: a filter on the catalog's ``images``;
    ``config``: a head config of ``deployments/heads/`` (``demo``) or a YAML file, default the
    ``HeadConfig`` defaults; ``overrides`` and ``size`` on top of it. ``torch_threads``: intra-op threads
    while the flow runs (default: the cores shared by the branches that run at once; restored at the
    end). Returns a summary with the results table (rows task/metric; pretrained, random-init, paper).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(torch_threads or max(1, (os.cpu_count() or 2) // BRANCHES_AT_ONCE))
    try:
        return _heads(backbone, home, labels, seeds, tuple(tasks), size, where, max_images, config, overrides, alias,
                      register_heads, random_seed)
    finally:
        torch.set_num_threads(before)


def _heads(backbone, home, labels, seeds, tasks, size, where, max_images, config_name, overrides, alias, register,
           random_seed) -> dict:
    import mlflow
    import torch

    from dax_models.backbones import create_backbone
    from tasks.heads.training import TASKS, task_view

    began = time.perf_counter()
    root = configure(home)
    configure_tracking(root)
    logger = get_run_logger()
    if not tasks or set(tasks) - set(TASKS):
        raise ValueError(f"tasks must be among {', '.join(TASKS)}")
    if labels is None:
        raise ValueError("the heads need labels: give the corpus' labels.parquet")
    if seeds < 1:
        raise ValueError("seeds must be >= 1")
    config = head_config(config_name, overrides, size)
    size = config.size
    name, version = resolve_model(backbone)
    backbone_ref = f"{name}/{version}"
    pretrained = mlflow.pytorch.load_model(f"models:/{name}/{version}", map_location="cpu").eval()
    arch = pretrained.arch
    torch.manual_seed(random_seed)
    twin = create_backbone(arch, pretrained.in_chans, img_size=size).eval()

    views = _load_views(root, Path(labels), tasks, config, where, max_images)
    for task in tasks:                  # before any feature is computed: a split without images cannot be scored
        views[task_view(task)].check_splits(task)
    summary_data = _views_summary(views, config)
    logger.info("%(images)d labelled images of %(patients)d patients (region at %(size)d px, metal and screws at "
                "%(dense_size)d px): %(train_images)d train, %(val_images)d val, %(test_images)d test", summary_data)
    roles = ["pretrained", "random"]
    models = {"pretrained": pretrained, "random": twin}
    wanted = [(role, view) for role in roles for view in views]
    digests = {view: data.digest for view, data in views.items()}   # hashes the images: once per view, not per role
    feature_futures = features_task.map([r for r, _ in wanted], [v for _, v in wanted],
                                        [models[r] for r, _ in wanted], [quote(views[v].images) for _, v in wanted],
                                        unmapped(str(root / "cache" / "features")),
                                        [digests[v] for _, v in wanted], [VIEW_PARTS[v] for _, v in wanted],
                                        unmapped(config.device), unmapped(config.feature_batch))
    stores = {f"{role}:{view}": future.result() for (role, view), future in zip(wanted, feature_futures)}

    job = f"{arch}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}"
    figures_dir = root / HEADS_DIR / job / "figures"
    experiment = ensure_experiment(HEADS_EXPERIMENT, root)
    with mlflow.start_run(experiment_id=experiment, run_name=f"heads-{arch}") as run:
        mlflow.set_tags({"dax.backbone": backbone_ref, "dax.job": job})
        mlflow.log_params({"backbone": backbone_ref, "arch": arch, "seeds": seeds, "tasks": ",".join(tasks),
                           "random_seed": random_seed, "labels_sha256": sha256_file(Path(labels))[:16],
                           "polarity": MODEL_POLARITY,
                           "where": (where or "TRUE")[:500],
                           **{f"config.{k}": str(v)[:500] for k, v in config.to_dict().items() if k != "size"},
                           "size": size})
        mlflow.log_dict(summary_data, "dataset/summary.json")
        specs = [(role, task_name, seed) for role in roles for task_name in tasks for seed in range(seeds)]
        specs += [(FLOOR, task_name, seed) for task_name in tasks if task_name in FLOOR_TASKS for seed in range(seeds)]
        futures = branch_task.map([s[0] for s in specs], [s[1] for s in specs], [s[2] for s in specs],
                                  unmapped(quote(views)), unmapped(stores), unmapped(quote(models)),
                                  unmapped(config), unmapped(arch), unmapped(experiment), unmapped(run.info.run_id),
                                  unmapped(backbone_ref), unmapped(str(figures_dir)), unmapped(register),
                                  [s[2] == FIGURE_SEED and s[0] != FLOOR for s in specs])
        results = _collect(futures, logger)
        registered = alias_best_heads(results, tasks, alias)

        rows = results_table(results, tasks)
        header = [f"# Frozen-backbone heads: {backbone_ref} vs random-init {arch}", "",
                  (f"{summary_data['images']} labelled images ({summary_data['patients']} patients), region at {size} "
                   f"px, metal and screws at {config.dense_size} px; train {summary_data['train_images']}, val "
                   f"{summary_data['val_images']}, test {summary_data['test_images']} images (split by patient); "
                   f"{seeds} seed(s); MLflow run `{run.info.run_id}`. Screw errors are at each image's native "
                   "resolution (DAX: 976 px).")]
        markdown = results_markdown(rows, header)
        if registered:
            markdown += "\n\nregistered: " + ", ".join(f"`{v['uri']}` = version {v['version']} (seed {v['seed']})"
                                                       for v in registered.values())
        log_results(rows, markdown)
        figures = sorted({f for r in results for f in r["figures"]})
        for path in figures:
            mlflow.log_artifact(path, "figures")
    create_markdown_artifact(markdown, key="heads-summary", description="Frozen-backbone heads vs random-init")
    logger.info("heads done: %d branches, %d heads registered", len(results), sum(1 for r in results if r["version"]))
    return {"run_id": run.info.run_id, "backbone": backbone_ref, "arch": arch, "data": summary_data, "table": rows,
            "markdown": markdown, "registered": registered, "branches": results, "figures": figures,
            "seconds": round(time.perf_counter() - began, 1)}


def head_config(config_name: str | None, overrides: dict | None, size: int | None):
    """The named head config with ``overrides`` on top and ``size`` (the region input size) when given
    (``deployments.with_setting``: left out, an override's ``size`` stays; both given must agree)."""
    from deployments import with_setting
    from tasks.heads.training import load_head_config

    return load_head_config(config_name, with_setting(overrides, "size", size))


def _collect(futures: list, logger) -> list[dict]:
    """The branches' results in submission order, with a progress line per branch as it finishes."""
    from prefect.futures import as_completed

    order = {future.task_run_id: i for i, future in enumerate(futures)}
    results: list = [None] * len(futures)
    for done, future in enumerate(as_completed(futures), start=1):
        r = results[order[future.task_run_id]] = future.result()
        value = r["metrics"].get(HEADLINE[r["task"]], float("nan"))
        logger.info("heads %d/%d done: %s on %s, seed %d: %s %.3f", done, len(futures), r["task"], r["role"],
                    r["seed"], HEADLINE[r["task"]], value)
    return results


def _load_views(root: Path, labels: Path, tasks, config, where, max_images) -> dict:
    """The labelled images each task reads (``tasks.heads.training.task_view``): ``region`` at ``config.size``,
    ``dense`` at ``config.dense_size`` with the metal masks, at most ``config.dense_max_images`` of them."""
    from tasks.heads.data import load_head_dataset
    from tasks.heads.training import task_view

    sizes = {"region": config.size, "dense": config.dense_size}
    dense_limits = [n for n in (max_images, config.dense_max_images) if n]
    limits = {"region": max_images, "dense": min(dense_limits) if dense_limits else None}
    return {view: load_head_dataset(root, labels, size=sizes[view], where=where, max_images=limits[view],
                                    masks=view == "dense" and "metal" in tasks)
            for view in dict.fromkeys(task_view(t) for t in tasks)}


def _views_summary(views: dict, config) -> dict:
    """One dataset summary for the log and MLflow: counts of the first view, screws and metal of the dense one."""
    first = next(iter(views.values())).summary()
    dense = views["dense"].summary() if "dense" in views else {}
    return {**first, "size": config.size, "dense_size": config.dense_size,
            **{k: dense[k] for k in ("screws", "with_metal") if k in dense},
            **({"dense_images": dense["images"]} if dense else {})}
