"""The nightly ingestion reads only what is new or changed: files a survey saw are skipped unread.

A file is proven unread by changing its bytes behind the survey's back: same size, mtime set back with
``os.utime``. An incremental survey cannot see that change (the point: it never opens the file), so the
catalog keeps its old outcome; ``rehash=True`` reads it and finds the new bytes. A file changed in the
ordinary way (new content, new mtime) is read and ingested again, and the catalog keeps the old rows.
"""
from __future__ import annotations

import os

import duckdb
import pytest
from conftest import CORPUS_SECRET

from tasks.synth.study import PRESETS, generate_study


def _rows(home, sql: str) -> list[tuple]:
    with duckdb.connect(str(home / "catalog-snapshot.duckdb"), read_only=True) as con:
        return con.execute(sql).fetchall()


@pytest.fixture()
def secret(monkeypatch):
    monkeypatch.setenv("DAX_DEID_SECRET", CORPUS_SECRET)


def _ingest(source, home, **kwargs) -> dict:
    from flows.ingest import ingest

    return ingest(source=str(source), home=str(home), max_size=96, batch_size=4, retrain_after_images=0, **kwargs)


def test_unchanged_files_are_not_read_changed_ones_are_and_rehash_reads_all(tmp_path, secret):
    source, home = tmp_path / "export", tmp_path / "home"
    labels = []
    for index in range(3):
        labels += generate_study(source, 11, index, PRESETS["test"])[0]
    files = sorted(p for p in source.rglob("*") if p.is_file())

    first = _ingest(source, home)
    assert first["files"] == len(files) and first["unchanged"] == 0 and first["surveyed"] == len(files)
    assert first["ingested"] > 0 and first["quarantined"] == 0
    # the catalog keeps one fingerprint per file, never its path or name
    fingerprints = _rows(home, "SELECT path_key, size_bytes, mtime_ns FROM source_files")
    assert len(fingerprints) == len(files)
    assert all(key.startswith("DAX-") and len(key) == 20 for key, _, _ in fingerprints)
    names = {part for path in files for part in path.relative_to(tmp_path).parts}
    dump = repr(_rows(home, "SELECT * FROM source_files")) + repr(_rows(home, "SELECT * FROM runs"))
    assert not [name for name in names if name in dump]

    # bytes changed behind the survey's back: same size, same mtime
    hidden = files[0]
    stat = hidden.stat()
    hidden.write_bytes(b"\0" * stat.st_size)
    os.utime(hidden, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    second = _ingest(source, home)
    assert (second["unchanged"], second["surveyed"], second["ingested"], second["quarantined"]) == (len(files), 0, 0, 0)
    assert _rows(home, "SELECT count(*) FROM source_files") == [(len(files),)]

    # an ordinary change: another image at the same path (new bytes, new mtime) is read and ingested
    changed = files[1]
    other = tmp_path / "other"
    generate_study(other, 11, 7, PRESETS["test"])
    replacement = sorted(p for p in other.rglob("*.dcm"))[0]
    changed.write_bytes(replacement.read_bytes())
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    images_before = _rows(home, "SELECT count(*) FROM images")[0][0]
    sources_before = _rows(home, "SELECT count(*) FROM sources")[0][0]
    third = _ingest(source, home)
    assert (third["unchanged"], third["surveyed"], third["ingested"]) == (len(files) - 1, 1, 1)
    assert _rows(home, "SELECT count(*) FROM sources")[0][0] == sources_before + 1       # the old row stays
    assert _rows(home, "SELECT count(*) FROM images")[0][0] > images_before
    assert _rows(home, "SELECT count(*), count(DISTINCT path_key) FROM source_files") == [(len(files) + 1, len(files))]

    # rehash reads every file: the hidden change is found (not DICOM any more: quarantined)
    fourth = _ingest(source, home, rehash=True)
    assert (fourth["unchanged"], fourth["surveyed"], fourth["quarantined"]) == (0, len(files), 1)
    assert fourth["duplicates"] == len(files) - 1
    [(reason,)] = _rows(home, f"SELECT reason FROM sources WHERE run_id = '{fourth['run_id']}' "
                              "AND status = 'quarantined'")
    assert "not a DICOM file" in reason
    counted = _rows(home, "SELECT unchanged, surveyed FROM runs ORDER BY started_at")
    assert counted == [(0, len(files)), (len(files), 0), (len(files) - 1, 1), (0, len(files))]
