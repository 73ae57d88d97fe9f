"""Flow `ingest`: raw C-arm DICOM to de-identified, normalized WebDataset shards cataloged in DuckDB.

    open the catalog (the only writer)  ->  survey: hash + header peek (mapped over batches)
    ->  plan: drop what the catalog already holds  ->  ingest batches (mapped): triage, burned-in text,
    de-identify, normalize, shard  ->  record each batch in one transaction  ->  publish the snapshot
"""
from __future__ import annotations

import hashlib
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

from flows.runners import ingest_task_runner
from tasks.fileio import sha256_file
from tasks.home import configure
from tasks.ingest.catalog import Catalog
from tasks.ingest.deidentify import DEFAULT_RECIPE, load_key
from tasks.ingest.events import emit_ingest_events
from tasks.ingest.normalize import NormalizeConfig
from tasks.ingest.shards import remove_stale_temporaries
from tasks.ingest.steps import IngestConfig, ingest_batch_task, survey_batch_task
from tasks.ingest.survey import SurveyedFile
from tasks.ingest.triage import DEFAULT_MODALITIES, list_source
from tasks.version import code_version

SHARDS_DIR = "shards"


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
    retrain_after_images: int = 1000,
) -> dict:
    """Ingest every file under ``source`` into ``home`` (default: $DAX_HOME or ./dax-home)."""
    began = time.perf_counter()
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
                           "source_fingerprint": hashlib.sha256(str(Path(source).resolve()).encode()).hexdigest()[:16]})
        removed = remove_orphans(shard_dir, catalog.shard_names())
        relpaths = list(list_source(Path(source)))
        logger.info("%d files in the source; %d stale or orphan shard files removed", len(relpaths), removed)

        with _progress() as progress:
            surveyed = survey(Path(source), relpaths, batch_size, progress)
            counts = Counter(files=len(relpaths))
            bar = progress.add_task("ingest", total=len(surveyed))
            pending = surveyed
            while pending:  # a wave per copy of an instance: a later copy is a duplicate only if one got in
                todo, duplicates, already, pending = plan(catalog, pending)
                catalog.record_batch([row | {"run_id": run_id} for row in duplicates], [], [])
                counts.update(duplicates=len(duplicates) + already)
                progress.update(bar, advance=len(duplicates) + already)
                batches = _chunks(todo, batch_size)
                futures = ingest_batch_task.map(unmapped(Path(source)), unmapped(shard_dir), batches,
                                                unmapped(run_id), unmapped(config))
                for future in as_completed(futures):
                    outcome = future.result()
                    catalog.record_batch(outcome.sources, outcome.images, outcome.shards)
                    counts.update(Counter(row["status"] for row in outcome.sources))
                    counts.update(images=len(outcome.images), shards=len(outcome.shards))
                    progress.update(bar, advance=len(outcome.sources))
        summary = {name: int(counts[name]) for name in
                   ("files", "ingested", "duplicates", "skipped", "quarantined", "images", "shards")}
        catalog.finish_run(run_id, "completed", summary, time.perf_counter() - began)
        reasons = catalog.reasons(run_id)
        snapshot = catalog.publish_snapshot()

    logger.info("ingested %(ingested)d files (%(images)d images, %(shards)d shards); %(duplicates)d duplicates, "
                "%(skipped)d skipped, %(quarantined)d quarantined", summary)
    events = emit_ingest_events(root, summary, retrain_after_images)
    create_markdown_artifact(key="ingest-summary", markdown=_summary_markdown(summary, reasons),
                             description="What this ingestion run did (counts and reasons only: no PHI)")
    return summary | {"run_id": run_id, "snapshot": str(snapshot), "seconds": round(time.perf_counter() - began, 2),
                      "ready_for_retraining": events["ready_for_retraining"]}


def survey(source: Path, relpaths: list[str], batch_size: int, progress: Progress) -> list[SurveyedFile]:
    """Hash every file (in parallel batches); results in listing order."""
    bar = progress.add_task("survey", total=len(relpaths))
    batches = _chunks(relpaths, batch_size)
    futures = survey_batch_task.map(unmapped(source), batches)
    for future in as_completed(futures):
        progress.update(bar, advance=len(future.result()))
    return [item for future in futures for item in future.result()]


def plan(catalog: Catalog, surveyed: list[SurveyedFile]) -> tuple[list, list[dict], int, list]:
    """Split surveyed files into (work now, new duplicate rows, files already cataloged, work for later).

    Identity is the file's SHA-256; a file with new bytes whose SOP instance is already ingested (the
    same image exported again, say in another transfer syntax) is a duplicate too: no image is stored
    twice. Of several copies of one instance in this run only the first is tried now; the others wait
    for the next wave, where they are duplicates if the first got in, or the next candidate if not.
    """
    known_files = catalog.known_sha256(f.sha256 for f in surveyed)
    known_instances = catalog.known_instance_keys(f.instance_key for f in surveyed if f.instance_key)
    todo, duplicates, later, already = [], [], [], 0
    seen_files: set[str] = set()
    trying: set[str] = set()
    for item in surveyed:
        if item.sha256 in known_files or item.sha256 in seen_files:
            already += 1
            continue
        seen_files.add(item.sha256)
        if item.instance_key in known_instances:
            duplicates.append({"sha256": item.sha256, "size_bytes": item.size, "status": "duplicate",
                               "instance_key": item.instance_key, "samples": 0,
                               "reason": "same SOP instance as an already ingested file (re-export)"})
        elif item.instance_key and item.instance_key in trying:
            later.append(item)
        else:
            trying.add(item.instance_key)
            todo.append(item)
    return todo, duplicates, already, later


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
    lines = ["# Ingestion run", "", "| files | ingested | duplicates | skipped | quarantined | images | shards |",
             "| --- | --- | --- | --- | --- | --- | --- |",
             "| " + " | ".join(str(summary[k]) for k in ("files", "ingested", "duplicates", "skipped", "quarantined",
                                                         "images", "shards")) + " |"]
    if reasons:
        lines += ["", "| status | reason | files |", "| --- | --- | --- |"]
        lines += [f"| {status} | {reason} | {count} |" for status, reason, count in reasons]
    return "\n".join(lines)
