"""Prefect events the pipeline emits: what an ingestion added, and when enough is new to retrain.

``dax.ingest.completed`` after every ingestion run (counts only); ``dax.catalog.ready-for-retraining``
when the catalog holds at least ``retrain_after_images`` images more than it did when the last
pretraining selected its data (``HOME/pretrain/*/prepare.json``). The ``retrain`` deployment's trigger
in ``prefect.yaml`` listens for the second one. The resource is the catalog, named by a digest of the
home folder's path (no path in the event).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tasks.ingest.catalog import open_snapshot

__all__ = ["INGEST_COMPLETED", "READY_FOR_RETRAINING", "catalog_resource", "emit_ingest_events",
           "images_since_pretraining"]

INGEST_COMPLETED = "dax.ingest.completed"
READY_FOR_RETRAINING = "dax.catalog.ready-for-retraining"


def catalog_resource(home: Path) -> dict[str, str]:
    digest = hashlib.sha256(str(Path(home).resolve()).encode()).hexdigest()[:16]
    return {"prefect.resource.id": f"dax.catalog.{digest}", "prefect.resource.name": "dax-catalog"}


def catalog_images(home: Path) -> int:
    con = open_snapshot(home)
    try:
        return int(con.sql("SELECT count(*) FROM images").fetchall()[0][0])
    finally:
        con.close()


def images_since_pretraining(home: Path) -> tuple[int, int]:
    """(images in the catalog now, images added since the last pretraining selected its data)."""
    total = catalog_images(home)
    jobs = sorted(Path(home).glob("pretrain/*/prepare.json"), key=lambda p: p.stat().st_mtime)
    before = json.loads(jobs[-1].read_text()).get("catalog_images", 0) if jobs else 0
    return total, max(0, total - before)


def emit_ingest_events(home: Path, summary: dict, retrain_after_images: int) -> dict:
    from prefect.events import emit_event

    total, new = images_since_pretraining(home)
    payload = {"images_added": int(summary.get("images", 0)), "files": int(summary.get("files", 0)),
               "quarantined": int(summary.get("quarantined", 0)), "catalog_images": total,
               "images_since_pretraining": new, "retrain_after_images": retrain_after_images}
    resource = catalog_resource(home)
    emit_event(event=INGEST_COMPLETED, resource=resource, payload=payload)
    ready = retrain_after_images > 0 and new >= retrain_after_images and payload["images_added"] > 0
    if ready:
        emit_event(event=READY_FOR_RETRAINING, resource=resource, payload=payload)
    return payload | {"ready_for_retraining": ready}
