"""Labels for evaluation: the generator's ``labels.parquet`` joined to the catalog's images, split by patient.

The synthetic corpus labels each source file and frame (``sha256``, ``frame``) with its body region,
metal mask and screws. The catalog names each ingested sample by a pseudonymous key and keeps the
source file's ``sha256`` and frame index, so the join needs no path and no identifier: the label
file's ``path`` column (which carries planted PHI in folder names) is never read.

Splits are by patient, never by image: a patient's pseudonymous key is hashed to a number in [0, 1)
and compared with the split fractions, so a patient is in the same split in every run, every process
and every task (pretraining's kNN monitor and the heads share it).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import duckdb
import pyarrow as pa

from tasks.ingest.catalog import open_snapshot
from tasks.label_schema import LABEL_COLUMNS

__all__ = ["LabelError", "SPLITS", "load_labels", "patient_split"]

SPLITS = {"train": 0.7, "val": 0.1, "test": 0.2}


class LabelError(ValueError):
    """The label file is missing, unreadable or matches no ingested image."""


def patient_split(patient_key: str, fractions: dict[str, float] = SPLITS) -> str:
    """'train', 'val' or 'test' for a patient, from a hash of its pseudonymous key."""
    u = int.from_bytes(hashlib.sha256(f"dax-split:{patient_key}".encode()).digest()[:8], "big") / 2 ** 64
    edge = 0.0
    for name, fraction in fractions.items():
        edge += fraction
        if u < edge:
            return name
    return list(fractions)[-1]


def load_labels(home: Path, labels_path: Path, columns: tuple[str, ...] = ("region",),
                where: str | None = None) -> pa.Table:
    """One row per labelled catalog image: key, shard, patient_key, split, size columns and ``columns``.

    ``where`` is an optional filter on the catalog's ``images`` table (same syntax as pretraining's).
    """
    labels_path = Path(labels_path)
    if not labels_path.is_file():
        raise LabelError(f"no label file at {labels_path.name!r} (give the corpus' labels.parquet)")
    unknown = set(columns) - set(LABEL_COLUMNS)
    if unknown:
        raise LabelError(f"unknown label columns: {sorted(unknown)}")
    con = open_snapshot(home)
    try:
        images = con.sql(
            "SELECT key, shard, source_sha256, frame, patient_key, rows, cols, orig_rows, orig_cols FROM images"
            + (f" WHERE {where}" if where else "")).to_arrow_table()
    finally:
        con.close()
    local = duckdb.connect(":memory:")
    try:
        local.register("images_view", images)
        wanted = ", ".join(f"l.{c}" for c in columns)
        table = local.sql(
            f"SELECT i.key, i.shard, i.patient_key, i.rows, i.cols, i.orig_rows, i.orig_cols, {wanted} "
            "FROM images_view i JOIN read_parquet($path) l ON l.sha256 = i.source_sha256 AND l.frame = i.frame "
            "ORDER BY i.key", params={"path": str(labels_path)}).to_arrow_table()
    except duckdb.Error as error:
        raise LabelError(f"cannot read the label file {labels_path.name!r}: {error}") from None
    finally:
        local.close()
    if table.num_rows == 0:
        raise LabelError("the label file matches no ingested image (was this corpus ingested into this home?)")
    splits = pa.array([patient_split(p) for p in table.column("patient_key").to_pylist()])
    return table.append_column("split", splits)
