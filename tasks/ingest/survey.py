"""Survey: what a batch of source files is, before anything is decoded.

Two passes. ``list_files`` stats every file under the source (no byte read) and names its path by a
keyed fingerprint (``path_key``); the flow skips a file whose (path_key, size, mtime) a survey saw before
(the catalog's `source_files`), so a nightly run over a growing export reads only what is new or changed.
``survey_batch`` then reads the rest: each is hashed (SHA-256: the catalog's name for it) and its header
peeked at for the SOP Instance UID, kept only as a keyed pseudonym (``instance_key``): the flow skips files
the catalog already holds and re-exports of instances it already ingested. Paths stay on the ingestion
side: neither a path nor a file name is ever stored, only their keyed fingerprints.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pydicom

from tasks.fileio import sha256_file
from tasks.ingest.deidentify import DeidKey, load_key
from tasks.ingest.triage import list_source

__all__ = ["ListedFile", "SurveyedFile", "instance_key", "list_files", "path_key", "survey_batch"]


@dataclass(frozen=True)
class ListedFile:
    relpath: str          # stays on the ingestion side: never logged, never cataloged
    path_key: str         # keyed fingerprint of the resolved path: what the catalog keeps instead
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class SurveyedFile:
    relpath: str          # stays on the ingestion side: never logged, never cataloged
    sha256: str
    size: int
    instance_key: str | None  # keyed pseudonym of the SOP Instance UID, when the header is readable
    path_key: str | None = None
    mtime_ns: int | None = None

    def source_file_row(self, run_id: str) -> dict:
        """This file's `source_files` row: what the next survey compares its listing with."""
        return {"path_key": self.path_key, "size_bytes": self.size, "mtime_ns": self.mtime_ns,
                "sha256": self.sha256, "run_id": run_id}


def instance_key(key: DeidKey, sop_instance_uid: str) -> str:
    return key.pseudonym("instance", sop_instance_uid)


def path_key(key: DeidKey, resolved_path: str) -> str:
    return key.pseudonym("path", resolved_path)


def list_files(source: Path, key: DeidKey) -> list[ListedFile]:
    """Every regular file under ``source`` (sorted, symlinks skipped) with its size and mtime: metadata only."""
    root = Path(source).resolve()
    listed = []
    for relpath in list_source(root):
        path = os.path.join(root, relpath)
        stat = os.stat(path)
        listed.append(ListedFile(relpath, path_key(key, path), stat.st_size, stat.st_mtime_ns))
    return listed


def survey_batch(source: Path, files: list[ListedFile]) -> list[SurveyedFile]:
    """Hash every file and read the SOP Instance UID from its header (pixel data not read).

    Size and mtime are the listing's, taken before the bytes were read: a file that changes during the
    run shows a new mtime to the next survey, which reads it again."""
    key = load_key()
    surveyed = []
    for item in files:
        path = Path(source, item.relpath)
        uid = None
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            uid = str(header.get("SOPInstanceUID", "") or "") or None
        except Exception:  # noqa: BLE001 - any unreadable file is triaged properly by ingest_batch
            pass
        surveyed.append(SurveyedFile(item.relpath, sha256_file(path), item.size,
                                     instance_key(key, uid) if uid else None, item.path_key, item.mtime_ns))
    return surveyed
