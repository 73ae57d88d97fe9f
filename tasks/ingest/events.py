"""Prefect events the pipeline emits: what an ingestion added, when enough is new to retrain, and when
too much of a run was quarantined.

- ``dax.ingest.completed`` after every ingestion run (counts only);
- ``dax.catalog.ready-for-retraining`` when the catalog holds at least ``retrain_after_images`` images more
  than it did when the last pretraining selected its data (``HOME/pretrain/*/prepare.json``); the
  ``retrain`` deployments' trigger in ``prefect.yaml`` listens for it;
- ``dax.ingest.quarantine-alert`` when the files quarantined are more than ``quarantine_alert_share`` of the
  files the run read (a new device burning text into its pixels, a broken export); the automation that
  ``dax connect --notify`` creates turns it into a notification.

The resource of every event is the home, ``dax.home.<id>`` (`tasks.home.home_id`: random, made once per
home), so a trigger listens to one home only; no path, file name or identifier is ever in an event.
"""
from __future__ import annotations

import json
from pathlib import Path

from tasks.home import home_id
from tasks.ingest.catalog import open_snapshot

__all__ = ["INGEST_COMPLETED", "QUARANTINE_ALERT", "READY_FOR_RETRAINING", "emit_ingest_events", "home_resource",
           "images_since_pretraining"]

INGEST_COMPLETED = "dax.ingest.completed"
READY_FOR_RETRAINING = "dax.catalog.ready-for-retraining"
QUARANTINE_ALERT = "dax.ingest.quarantine-alert"


def home_resource(home: Path) -> dict[str, str]:
    return {"prefect.resource.id": f"dax.home.{home_id(home)}", "prefect.resource.name": "dax-home"}


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


def quarantined_share(summary: dict) -> float:
    """Files quarantined over files read by this run (unchanged files, never read, do not count)."""
    surveyed = int(summary.get("surveyed", 0))
    return int(summary.get("quarantined", 0)) / surveyed if surveyed else 0.0


def emit_ingest_events(home: Path, summary: dict, retrain_after_images: int, quarantine_alert_share: float = 1.0,
                       reasons: list[tuple[str, str, int]] = ()) -> dict:
    """Emit the run's events; ``reasons`` are the catalog's (status, scrubbed reason, files) of the run."""
    from prefect.events import emit_event

    total, new = images_since_pretraining(home)
    payload = {"images_added": int(summary.get("images", 0)), "files": int(summary.get("files", 0)),
               "surveyed": int(summary.get("surveyed", 0)), "quarantined": int(summary.get("quarantined", 0)),
               "catalog_images": total, "images_since_pretraining": new, "retrain_after_images": retrain_after_images}
    resource = home_resource(home)
    emit_event(event=INGEST_COMPLETED, resource=resource, payload=payload)
    ready = retrain_after_images > 0 and new >= retrain_after_images and payload["images_added"] > 0
    if ready:
        emit_event(event=READY_FOR_RETRAINING, resource=resource, payload=payload)
    share = quarantined_share(summary)
    alert = payload["quarantined"] > 0 and share > quarantine_alert_share
    if alert:
        top = [{"reason": reason, "files": files} for status, reason, files in reasons if status == "quarantined"][:5]
        emit_event(event=QUARANTINE_ALERT, resource=resource,
                   payload=payload | {"share": round(share, 4), "threshold": quarantine_alert_share, "reasons": top})
    return payload | {"ready_for_retraining": ready, "quarantine_alert": alert}
