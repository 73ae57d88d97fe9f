"""Pipeline steps of the ingest flow, as plain functions and their Prefect tasks.

    survey_batch   hash each file, peek at its header (tasks.ingest.survey): the flow drops what the catalog
                   already holds (files unchanged since a previous survey never reach it: tasks.ingest.survey)
    ingest_batch   per file: read -> triage -> burned-in text -> de-identify -> normalize -> shard

Both take a batch of files (never one task per file: Prefect strains at thousands of task runs) and
return plain rows; the flow is the catalog's only writer. Nothing here logs or returns a path: files
are named by SHA-256. A file is processed whole in memory before any of its samples is written, so a
file that fails half-way leaves nothing behind in a shard.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from tasks.ingest.burned_in import assess, black_level, clean
from tasks.ingest.deidentify import DEFAULT_RECIPE, DeidKey, deidentify, load_key
from tasks.ingest.normalize import (
    NormalizeConfig,
    PixelDataError,
    decode_frames,
    normalize,
)
from tasks.ingest.shards import ShardSink
from tasks.ingest.survey import SurveyedFile, instance_key, survey_batch
from tasks.ingest.triage import DEFAULT_MODALITIES, Rejected, check_header, read_dicom


@dataclass(frozen=True)
class IngestConfig:
    modalities: tuple[str, ...] = DEFAULT_MODALITIES
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    image_format: str = "npy"                  # uint16 .npy (fast), or "png" (16-bit, ~20 % smaller)
    shard_target_bytes: int = 1_000_000_000
    recipe: str = str(DEFAULT_RECIPE)
    # folder of deid plans shared by worker processes and runs (tasks.ingest.deid_plan.PlanStore; the flow
    # uses HOME/cache/deid-plans); None: each worker records its own plans with deid
    plan_cache: str | None = None

    def __post_init__(self):
        unknown = sorted(set(self.modalities) - set(DEFAULT_MODALITIES))
        if unknown or not self.modalities:
            raise ValueError(f"ingestion takes modalities among {', '.join(DEFAULT_MODALITIES)}, not "
                             f"{', '.join(unknown) or 'none'}")


@dataclass
class BatchOutcome:
    sources: list[dict]
    images: list[dict]
    shards: list[dict]
    seconds: float
    files: list[dict] = field(default_factory=list)   # `source_files` rows: what the next survey skips


def batch_prefix(files: list[SurveyedFile]) -> str:
    """Shard name prefix from the batch's content: a re-run of the same batch rewrites the same shards."""
    return "dax-" + hashlib.sha256("".join(sorted(f.sha256 for f in files)).encode()).hexdigest()[:16]


def ingest_batch(source: Path, shard_dir: Path, files: list[SurveyedFile], run_id: str,
                 config: IngestConfig) -> BatchOutcome:
    began = time.perf_counter()
    key = load_key()
    sources, images = [], []
    with ShardSink(shard_dir, batch_prefix(files), config.shard_target_bytes, config.image_format) as sink:
        for item in files:
            row = {"sha256": item.sha256, "size_bytes": item.size, "run_id": run_id, "instance_key": item.instance_key,
                   "status": "ingested", "reason": None, "samples": 0}
            try:
                samples, facts = prepare_file(Path(source, item.relpath), item.sha256, key, config)
            except Rejected as rejected:
                row.update(rejected.facts, status=rejected.status, reason=rejected.reason)
            except Exception as error:  # noqa: BLE001 - a bad file never stops the run
                row.update(status="quarantined", reason=f"unexpected error while ingesting ({type(error).__name__})")
            else:
                for sample_key, pixels, metadata, catalog_row in samples:
                    sink.write(sample_key, pixels, metadata)
                    images.append(catalog_row | {"run_id": run_id})
                row.update(facts, samples=len(samples))
            sources.append(row)
        shards = sink.close()
    shard_of = _shard_of_keys(shards, images)
    for image in images:
        image["shard"] = shard_of[image["key"]]
    return BatchOutcome(sources, images, [s.__dict__ | {"run_id": run_id} for s in shards],
                        time.perf_counter() - began, [item.source_file_row(run_id) for item in files if item.path_key])


def _shard_of_keys(shards, images) -> dict[str, str]:
    """Samples are written in order and shards roll over in order: map each key to its shard."""
    mapping, position = {}, 0
    for shard in shards:
        for image in images[position: position + shard.samples]:
            mapping[image["key"]] = shard.name
        position += shard.samples
    return mapping


def prepare_file(path: Path, sha256: str, key: DeidKey, config: IngestConfig):
    """Everything for one file, in memory: returns ([(key, pixels, metadata, catalog row)], source facts)."""
    ds = read_dicom(path)
    header = check_header(ds, config.modalities)
    facts = {"modality": header.modality, "sop_class_uid": header.sop_class_uid,
             "transfer_syntax_uid": header.transfer_syntax_uid, "frames": header.frames}
    try:
        frames = decode_frames(ds)
    except PixelDataError as error:
        raise Rejected("quarantined", str(error)) from None

    verdict = assess(ds, frames, recipe=Path(config.recipe))
    if verdict.action == "review":
        raise Rejected("quarantined", f"needs pixel review: {verdict.reason}")
    if verdict.action == "clean":
        frames = clean(frames, verdict, black_level(ds))
    facts["pixel_rule"] = verdict.rule

    image_key = instance_key(key, str(ds.SOPInstanceUID)).removeprefix("DAX-")
    result = deidentify(ds, key, recipe=Path(config.recipe), reread=lambda: read_dicom(path),  # ds handed over
                        plan_cache=Path(config.plan_cache) if config.plan_cache else None)
    clean_ds = result.dataset
    normalized = normalize(clean_ds, frames, config.normalize, blanked=verdict.blanked)
    for element in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if element in clean_ds:
            delattr(clean_ds, element)
    dicom_json = clean_ds.to_json_dict(bulk_data_threshold=1 << 30, bulk_data_element_handler=lambda _: "")

    shared = {
        "source_sha256": sha256,
        "patient_key": result.patient_key,
        "study_key": result.study_key,
        "series_key": result.series_key,
        "modality": header.modality,
        "manufacturer": str(clean_ds.get("Manufacturer", "") or ""),
        "model": str(clean_ds.get("ManufacturerModelName", "") or ""),
        "frames": header.frames,
        "study_date": _date(clean_ds.get("StudyDate")),
        "series_date": _date(clean_ds.get("SeriesDate")),
        "pixel_rule": verdict.rule,
    }
    samples = []
    for item in normalized:
        sample_key = f"{result.series_key.removeprefix('DAX-')}_{image_key}_{item.frame:04d}"
        spacing = item.params.get("pixel_spacing_out")
        row = shared | {
            "key": sample_key, "frame": item.frame,
            "rows": int(item.pixels.shape[0]), "cols": int(item.pixels.shape[1]),
            "orig_rows": int(item.params["original_rows"]), "orig_cols": int(item.params["original_cols"]),
            "pixel_spacing_mm": float(spacing[0]) if spacing else None,  # row spacing, mm
            "normalization": item.params,
        }
        metadata = row | {"study_date": _iso(row["study_date"]), "series_date": _iso(row["series_date"]),
                          "dicom": dicom_json}
        samples.append((sample_key, item.pixels, metadata, row))
    return samples, facts


def _date(value) -> dt.date | None:
    try:
        return dt.datetime.strptime(str(value), "%Y%m%d").date() if value else None
    except ValueError:
        return None


def _iso(value: dt.date | None) -> str | None:
    return value.isoformat() if value else None


# Prefect tasks. No caching: inputs hold source paths, which must not be hashed into or persisted by
# Prefect's result store; the catalog, not Prefect, remembers what was done.
survey_batch_task = task(survey_batch, name="survey-batch", cache_policy=NO_CACHE)
ingest_batch_task = task(ingest_batch, name="ingest-batch", cache_policy=NO_CACHE)
