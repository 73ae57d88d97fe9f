"""Flows `pipeline` and `retrain`: the whole DAG, as subflows.

    pipeline:  ingest  ->  retrain
    retrain:   for each config:  pretrain  ->  heads (fan-out: backbone x task x seed)  ->  promote

- ``ingest`` is idempotent and crash-safe (a rerun adds nothing; a killed run leaves nothing partial),
  so it is retried as a whole.
- ``pretrain`` runs inside a cached Prefect task: the cache key is the config and the data
  (``tasks.pretrain.steps.pretraining_cache_key``), so a rerun on the same data reuses the backbone a
  finished run registered instead of training again. A run that registered nothing fails the task and is
  never cached; interrupted jobs are resumed with ``dax pretrain --resume``.
- ``promote`` compares the new backbone's evaluation table with the current ``@champion`` and sets
  ``@champion`` (match or beat) or ``@challenger`` on the backbone and its heads, with the comparison
  as a Prefect artifact.
"""
from __future__ import annotations

from prefect import flow, get_run_logger, task

from flows.heads import heads
from flows.ingest import ingest
from flows.pretrain import pretrain
from tasks.home import configure
from tasks.pretrain.steps import PretrainingUnfinished, pretraining_cache_key
from tasks.release.promotion import promote_task
from tasks.release.registry import configure_tracking


@task(name="pretrained-backbone", cache_key_fn=pretraining_cache_key, persist_result=True)
def pretrained_backbone(config: str, home: str, where: str | None, labels: str | None, device: str,
                        nproc_per_node: int, overrides: dict | None) -> dict:
    """The pretrain flow's summary, cached on config and data; raises (so nothing is cached) when the run
    registered no backbone."""
    summary = pretrain(config=config, where=where, home=home, labels=labels, device=device,
                       nproc_per_node=nproc_per_node, overrides=overrides)
    if not summary.get("registered"):
        raise PretrainingUnfinished(summary)
    return summary


@flow(name="retrain")
def retrain(
    configs: list[str] = ["demo-cpu"],  # noqa: B006 (Prefect parameters are copied per run)
    where: str | None = None,
    home: str | None = None,
    labels: str | None = None,
    device: str = "auto",
    nproc_per_node: int = 1,
    seeds: int = 3,
    overrides: dict | None = None,
    heads_size: int | None = 160,
    heads_config: str | None = None,
    heads_overrides: dict | None = None,
) -> dict:
    """Pretrain one backbone per config on the catalog selection, train and evaluate its heads, promote.

    Without ``labels`` (a site with no annotations yet) the backbones are pretrained and registered
    ``@candidate``, and heads and promotion are skipped."""
    root = configure(home)
    configure_tracking(root)
    logger = get_run_logger()
    outcomes = []
    for config in configs:
        state = pretrained_backbone(config, str(root), where, labels, device, nproc_per_node, overrides,
                                    return_state=True)
        if state.is_failed():
            error = state.result(raise_on_failure=False)
            if not isinstance(error, PretrainingUnfinished):
                raise error
            outcomes.append({"config": config, "status": error.summary["status"]})
            continue
        pretrained = state.result()
        reused = state.name == "Cached"
        if reused:
            logger.info("%s: a finished run already trained on this data: reusing %s", config,
                        pretrained["registered"]["uri"])
        registered = pretrained["registered"]
        backbone_uri = f"models:/{registered['model']}/{registered['version']}"
        if labels is None:
            logger.info("%s: no labels given: heads and promotion skipped; %s is registered @candidate", config,
                        backbone_uri)
            outcomes.append({"config": config, "backbone": backbone_uri, "reused": reused,
                             "knn": pretrained.get("knn"), "heads": None, "promotion": None})
            continue
        evaluation = heads(backbone=backbone_uri, home=str(root), labels=labels, seeds=seeds, size=heads_size,
                           config=heads_config, overrides=heads_overrides)
        decision = promote_task(registered["model"], registered["version"], evaluation["table"],
                                {h["model"]: h["version"] for h in evaluation["registered"].values()})
        outcomes.append({"config": config, "backbone": backbone_uri, "reused": reused,
                         "knn": pretrained.get("knn"),
                         "knn_thumbnails": pretrained.get("prepared", {}).get("knn_thumbnails"),
                         **{key: pretrained.get(key) for key in ("knn_margin", "knn_layout_margin",
                                                                  "knn_margin_over_thumbnails")},
                         "results": evaluation["table"],
                         "results_markdown": evaluation["markdown"], "heads": evaluation["registered"],
                         "promotion": decision})
    return {"retrained": outcomes}


@flow(name="pipeline")
def pipeline(
    source: str,
    home: str | None = None,
    labels: str | None = None,
    configs: list[str] = ["demo-cpu"],  # noqa: B006
    where: str | None = None,
    device: str = "auto",
    nproc_per_node: int = 1,
    seeds: int = 3,
    overrides: dict | None = None,
    heads_size: int | None = 160,
    heads_config: str | None = None,
    heads_overrides: dict | None = None,
) -> dict:
    """Raw DICOM to a promoted backbone: ingest, then retrain (pretrain, heads, promotion)."""
    root = configure(home)
    ingested = ingest.with_options(retries=1)(source=source, home=str(root), retrain_after_images=0)
    retrained = retrain(configs=configs, where=where, home=str(root), labels=labels, device=device,
                        nproc_per_node=nproc_per_node, seeds=seeds, overrides=overrides, heads_size=heads_size,
                        heads_config=heads_config, heads_overrides=heads_overrides)
    return {"ingest": ingested, **retrained}
