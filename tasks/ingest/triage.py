"""Triage: what each source file is, from its bytes and its header, before anything else touches it.

Files are only ever read. A file is named in logs, the catalog and errors by its SHA-256, never by its
path: hospital exports put patient names and record numbers into folder and file names.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

DEFAULT_MODALITIES = ("XA", "RF", "DX", "CR")

# Image storage SOP classes of projection X-ray (PS3.4 Annex B): what DAX learns from.
IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.12.1": "X-Ray Angiographic Image Storage",
    "1.2.840.10008.5.1.4.1.1.12.1.1": "Enhanced XA Image Storage",
    "1.2.840.10008.5.1.4.1.1.12.2": "X-Ray Radiofluoroscopic Image Storage",
    "1.2.840.10008.5.1.4.1.1.12.2.1": "Enhanced XRF Image Storage",
}

STATUSES = ("ingested", "duplicate", "skipped", "quarantined")


class Rejected(Exception):
    """A file that will not be ingested; ``status`` is 'skipped' or 'quarantined', ``reason`` has no PHI;
    ``facts``: the `sources` columns known when it was rejected."""

    def __init__(self, status: str, reason: str, **facts):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.facts = facts


def check_source(source: Path) -> None:
    """Raise NotADirectoryError (naming no path: export paths can carry names) unless ``source`` is a folder."""
    if not Path(source).is_dir():
        raise NotADirectoryError("the ingestion source " + ("must be a folder" if Path(source).exists()
                                                            else "does not exist"))


def list_source(source: Path) -> Iterator[str]:
    """Every regular file under ``source`` as a sorted POSIX path relative to it (symlinks skipped)."""
    source = Path(source)
    check_source(source)
    for directory, subdirs, names in os.walk(source, followlinks=False):
        subdirs.sort()
        for name in sorted(names):
            path = Path(directory, name)
            if path.is_file() and not path.is_symlink():
                yield path.relative_to(source).as_posix()


@dataclass(frozen=True)
class Header:
    """The facts triage needs from a file's header (nothing identifying)."""

    modality: str
    sop_class_uid: str
    transfer_syntax_uid: str
    frames: int


def read_dicom(path: Path) -> pydicom.FileDataset:
    """Read a whole DICOM file, turning every way it can fail into a `Rejected` with a clear reason."""
    if path.stat().st_size == 0:
        raise Rejected("quarantined", "empty file")
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        raise Rejected("quarantined", "not a DICOM file (no DICM prefix and no readable data set)") from None
    except (EOFError, ValueError, OSError, KeyError, TypeError, AttributeError, NotImplementedError) as error:
        raise Rejected("quarantined", f"truncated or malformed DICOM ({type(error).__name__})") from None


def check_header(ds: pydicom.Dataset, modalities: tuple[str, ...]) -> Header:
    """Accept image SOP classes of the configured modalities; anything else is skipped with a reason."""
    file_meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID", "") or (file_meta.get("MediaStorageSOPClassUID", "") if file_meta else ""))
    transfer_syntax = str(file_meta.get("TransferSyntaxUID", "")) if file_meta else ""
    modality = str(ds.get("Modality", "") or "")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise Rejected("quarantined", "unreadable Number of Frames") from None
    if sop_class == "1.2.840.10008.1.3.10":
        raise Rejected("skipped", "DICOMDIR (a media directory, not an image)")
    if sop_class not in IMAGE_SOP_CLASSES:
        name = UID(sop_class).name if sop_class else "none"
        raise Rejected("skipped", f"SOP class {sop_class or '-'} ({name}) is not a projection X-ray image")
    if modality not in modalities:   # the one rejection recorded with its modality: a run that takes it reads it
        raise Rejected("skipped", f"modality {modality or '-'} is not among the configured {','.join(modalities)}",
                       modality=modality, sop_class_uid=sop_class, transfer_syntax_uid=transfer_syntax, frames=frames)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise Rejected("quarantined", "no pixel data")
    return Header(modality, sop_class, transfer_syntax, frames)
