"""Flow `ingest`: raw C-arm DICOM to de-identified, normalized WebDataset shards cataloged in DuckDB.

    open the catalog (the only writer)  ->  list: stat every file, skip those a survey saw unchanged
    ->  survey: hash + header peek (mapped over batches)  ->  plan: drop what the catalog already holds
    ->  ingest batches (mapped): triage, burned-in text, de-identify, normalize, shard
    ->  record each batch in one transaction  ->  publish the snapshot  ->  events

`nightly` is the same flow with retries, for the scheduled deployment: a run is idempotent and
crash-safe (a rerun adds nothing; a killed run leaves nothing partial), so it is retried whole.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from pathlib import Path

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.futures import as_completed
from prefect.runtime import flow_run
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from deployments.connect import SOURCE_VARIABLE
from flows.runners import ingest_task_runner
from tasks.fileio import sha256_file
from tasks.home import configure
from tasks.ingest.catalog import COUNT_COLUMNS, Catalog
from tasks.ingest.deidentify import DEFAULT_RECIPE, load_key
from tasks.ingest.events import emit_ingest_events
from tasks.ingest.normalize import NormalizeConfig
from tasks.ingest.shards import remove_stale_temporaries
from tasks.ingest.steps import IngestConfig, ingest_batch_task, survey_batch_task
from tasks.ingest.survey import ListedFile, SurveyedFile, list_files, path_key
from tasks.ingest.triage import DEFAULT_MODALITIES
from tasks.version import code_version

SHARDS_DIR = "shards"
REASONS_LOGGED = 10  # distinct (status, reason) lines a run logs; the report and the artifact hold them all


@flow(name="ingest", task_runner=ingest_task_runner())
def ingest(
    source: str,
    home: str | None = None,
    modalities: tuple[str, ...] = DEFAULT_MODALITIES,
    max_size: int = 1024,
    frame_step: int = 1,
    batch_size: int = 32,
    shard_target_mb: int = 1000,
    image_format: str = "npy",
    rehash: bool = False,
    retrain_after_images: int = 1000,
    quarantine_alert_share: float = 0.05,
) -> dict:
    """Ingest every file under ``source`` into ``home`` (default: $DAX_HOME or ./dax-home).

    A file whose path, size and mtime a previous survey saw is skipped unread; ``rehash`` reads them all."""
    began = time.perf_counter()
    if not source:
        raise ValueError(f"no ingestion source: pass one, or set the Prefect Variable {SOURCE_VARIABLE} "
                         "(`dax connect --source FOLDER`) before `prefect deploy`")
    root = configure(home)
    shard_dir = root / SHARDS_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)
    key = load_key()  # fails early and clearly when no secret is configured
    config = IngestConfig(modalities=tuple(modalities), normalize=NormalizeConfig(max_size=max_size, frame_step=frame_step),
                          image_format=image_format, shard_target_bytes=shard_target_mb * 1_000_000,
                          recipe=str(DEFAULT_RECIPE), plan_cache=str(root / "cache" / "deid-plans"))
    run_id = str(flow_run.id or uuid.uuid4())
    logger = get_run_logger()

    with Catalog.open(root) as catalog:
        catalog.start_run(run_id, str(flow_run.id or ""), code_version(), sha256_file(Path(config.recipe)), key.fingerprint,
                          {"modalities": list(modalities), "max_size": max_size, "frame_step": frame_step,
                           "batch_size": batch_size, "shard_target_mb": shard_target_mb, "image_format": image_format,
                           "rehash": rehash,
                           "source_fingerprint": path_key(key, str(Path(source).resolve()))})  # keyed, as paths
        removed = remove_orphans(shard_dir, catalog.shard_names())
        listed = list_files(Path(source), key)
        to_survey = listed if rehash else unchanged_dropped(catalog, listed, config.modalities)
        logger.info("%d files in the source, %d unchanged since a previous survey (not read); %d stale or orphan "
                    "shard files removed", len(listed), len(listed) - len(to_survey), removed)

        with _progress() as progress:
            surveyed = survey(Path(source), to_survey, batch_size, progress)
            counts = Counter(files=len(listed), unchanged=len(listed) - len(to_survey), surveyed=len(surveyed))
            bar = progress.add_task("ingest", total=len(surveyed))
            pending = surveyed
            while pending:  # a wave per copy of an instance: a later copy is a duplicate only if one got in
                todo, duplicates, already, pending = plan(catalog, pending, config.modalities)
                catalog.record_batch([duplicate_row(item, run_id) for item in duplicates], [], [],
                                     files=[item.source_file_row(run_id) for item in duplicates + already])
                counts.update(duplicates=len(duplicates) + len(already))
                progress.update(bar, advance=len(duplicates) + len(already))
                batches = _chunks(todo, batch_size)
                futures = ingest_batch_task.map(unmapped(Path(source)), unmapped(shard_dir), batches,
                                                unmapped(run_id), unmapped(config))
                for future in as_completed(futures):
                    outcome = future.result()
                    catalog.record_batch(outcome.sources, outcome.images, outcome.shards, files=outcome.files)
                    counts.update(Counter(row["status"] for row in outcome.sources))
                    counts.update(images=len(outcome.images), shards=len(outcome.shards))
                    progress.update(bar, advance=len(outcome.sources))
        summary = {name: int(counts[name]) for name in COUNT_COLUMNS}
        catalog.finish_run(run_id, "completed", summary, time.perf_counter() - began)
        reasons = catalog.reasons(run_id)
        snapshot = catalog.publish_snapshot()

    logger.info("ingested %(ingested)d files (%(images)d images, %(shards)d shards); %(duplicates)d duplicates, "
                "%(skipped)d skipped, %(quarantined)d quarantined; %(unchanged)d unchanged, not read", summary)
    for status, reason, files in reasons[:REASONS_LOGGED]:  # scrubbed reasons, as the catalog holds them
        logger.log(logging.WARNING if status == "quarantined" else logging.INFO, "%s, %d file%s: %s", status, files,
                   "" if files == 1 else "s", reason or "(no reason given)")
    if len(reasons) > REASONS_LOGGED:
        logger.info("%d more reasons: `dax catalog report`", len(reasons) - REASONS_LOGGED)
    events = emit_ingest_events(root, summary, retrain_after_images, quarantine_alert_share, reasons)
    if events["quarantine_alert"]:
        logger.warning("%d of the %d files read were quarantined (alert above %.0f %%): see the reasons above or "
                       "`dax catalog report`", summary["quarantined"], summary["surveyed"],
                       100 * quarantine_alert_share)
    create_markdown_artifact(key="ingest-summary", markdown=_summary_markdown(summary, reasons),
                             description="What this ingestion run did (counts and reasons only: no PHI)")
    return summary | {"run_id": run_id, "snapshot": str(snapshot), "seconds": round(time.perf_counter() - began, 2),
                      "ready_for_retraining": events["ready_for_retraining"],
                      "quarantine_alert": events["quarantine_alert"]}


# the scheduled deployment's entry point (prefect.yaml): transient failures (a lost worker, a busy catalog,
# a share that hiccuped) are retried whole, which costs little as unchanged files are not read again
nightly = ingest.with_options(retries=2, retry_delay_seconds=300)


def unchanged_dropped(catalog: Catalog, listed: list[ListedFile], modalities: tuple[str, ...]) -> list[ListedFile]:
    """The listed files without those a survey saw with the same path, size and mtime (never read), but for
    files skipped before for a modality in ``modalities`` (this run's)."""
    unchanged = catalog.unchanged_files([(f.path_key, f.size, f.mtime_ns) for f in listed], modalities)
    return [f for f in listed if f.path_key not in unchanged]


def survey(source: Path, files: list[ListedFile], batch_size: int, progress: Progress) -> list[SurveyedFile]:
    """Hash the files (in parallel batches); results in listing order."""
    bar = progress.add_task("survey", total=len(files))
    batches = _chunks(files, batch_size)
    futures = survey_batch_task.map(unmapped(source), batches)
    for future in as_completed(futures):
        progress.update(bar, advance=len(future.result()))
    return [item for future in futures for item in future.result()]


def plan(catalog: Catalog, surveyed: list[SurveyedFile],
         modalities: tuple[str, ...]) -> tuple[list, list, list, list]:
    """Split surveyed files into (work now, duplicates, files already cataloged, work for later).

    Identity is the file's SHA-256; a file with new bytes whose SOP instance is already ingested (the
    same image exported again, say in another transfer syntax) is a duplicate too: no image is stored
    twice. Of several copies of one instance in this run only the first is tried now; the others wait
    for the next wave, where they are duplicates if the first got in, or the next candidate if not. A file an
    earlier run skipped for its modality is work again for a run that takes that modality (``modalities``).
    """
    known_files = catalog.known_sha256((f.sha256 for f in surveyed), modalities)
    known_instances = catalog.known_instance_keys(f.instance_key for f in surveyed if f.instance_key)
    todo, duplicates, later, already = [], [], [], []
    seen_files: set[str] = set()
    trying: set[str] = set()
    for item in surveyed:
        if item.sha256 in known_files or item.sha256 in seen_files:
            already.append(item)
            continue
        seen_files.add(item.sha256)
        if item.instance_key in known_instances:
            duplicates.append(item)
        elif item.instance_key and item.instance_key in trying:
            later.append(item)
        else:
            trying.add(item.instance_key)
            todo.append(item)
    return todo, duplicates, already, later


def duplicate_row(item: SurveyedFile, run_id: str) -> dict:
    return {"sha256": item.sha256, "size_bytes": item.size, "status": "duplicate", "instance_key": item.instance_key,
            "samples": 0, "run_id": run_id, "reason": "same SOP instance as an already ingested file (re-export)"}


def remove_orphans(shard_dir: Path, cataloged: set[str]) -> int:
    """Delete temporaries and shards that no catalog row references (left by a killed run)."""
    removed = remove_stale_temporaries(shard_dir)
    for shard in shard_dir.glob("*.tar"):
        if shard.name not in cataloged:
            shard.unlink()
            removed += 1
    return removed


def _chunks(items: list, size: int) -> list[list]:
    return [items[i: i + size] for i in range(0, len(items), size)]


def _progress() -> Progress:
    return Progress(TextColumn("{task.description:>7}"), BarColumn(), MofNCompleteColumn(), TextColumn("files"),
                    TimeElapsedColumn())


def _summary_markdown(summary: dict, reasons: list[tuple[str, str, int]]) -> str:
    lines = ["# Ingestion run", "", "| " + " | ".join(COUNT_COLUMNS) + " |",
             "| " + " | ".join("---" for _ in COUNT_COLUMNS) + " |",
             "| " + " | ".join(str(summary[k]) for k in COUNT_COLUMNS) + " |"]
    if reasons:
        lines += ["", "| status | reason | files |", "| --- | --- | --- |"]
        lines += [f"| {status} | {reason} | {count} |" for status, reason, count in reasons]
    return "\n".join(lines)
