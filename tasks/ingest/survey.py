"""Survey: what a batch of source files is, before anything is decoded.

Each file is hashed (SHA-256: the catalog's name for it) and its header peeked at for the SOP Instance
UID, kept only as a keyed pseudonym (``instance_key``): the flow skips files the catalog already holds
and re-exports of instances it already ingested. Paths stay on the ingestion side.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom

from tasks.fileio import sha256_file
from tasks.ingest.deidentify import DeidKey, load_key

__all__ = ["SurveyedFile", "instance_key", "survey_batch"]


@dataclass(frozen=True)
class SurveyedFile:
    relpath: str          # stays on the ingestion side: never logged, never cataloged
    sha256: str
    size: int
    instance_key: str | None  # keyed pseudonym of the SOP Instance UID, when the header is readable



def instance_key(key: DeidKey, sop_instance_uid: str) -> str:
    return key.pseudonym("instance", sop_instance_uid)


def survey_batch(source: Path, relpaths: list[str]) -> list[SurveyedFile]:
    """Hash every file and read the SOP Instance UID from its header (pixel data not read)."""
    key = load_key()
    surveyed = []
    for relpath in relpaths:
        path = Path(source, relpath)
        uid = None
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            uid = str(header.get("SOPInstanceUID", "") or "") or None
        except Exception:  # noqa: BLE001 - any unreadable file is triaged properly by ingest_batch
            pass
        surveyed.append(SurveyedFile(relpath, sha256_file(path), path.stat().st_size,
                                     instance_key(key, uid) if uid else None))
    return surveyed
