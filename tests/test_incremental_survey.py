"""The nightly ingestion reads only what is new or changed: files a survey saw are skipped unread.

A file is proven unread by changing its bytes behind the survey's back: same size, mtime set back with
``os.utime``. An incremental survey cannot see that change (the point: it never opens the file), so the
catalog keeps its old outcome; ``rehash=True`` reads it and finds the new bytes. A file changed in the
ordinary way (new content, new mtime) is read and ingested again, and the catalog keeps the old rows.
"""
from __future__ import annotations

import os

import duckdb
import pydicom
import pytest
from conftest import CORPUS_SECRET

from tasks.synth.study import PRESETS, generate_study


def _rows(home, sql: str) -> list[tuple]:
    with duckdb.connect(str(home / "catalog-snapshot.duckdb"), read_only=True) as con:
        return con.execute(sql).fetchall()


@pytest.fixture()
def secret(monkeypatch):
    monkeypatch.setenv("DAX_DEID_SECRET", CORPUS_SECRET)


def _ingest(source, home, threads: bool = False, **kwargs) -> dict:
    """The ingest flow; ``threads``: its tasks in this process (no worker pool to start: seconds a run)."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.ingest import ingest

    flow = ingest.with_options(task_runner=ThreadPoolTaskRunner(max_workers=1)) if threads else ingest
    return flow(source=str(source), home=str(home), max_size=96, batch_size=4, retrain_after_images=0, **kwargs)


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


def test_files_skipped_for_their_modality_are_read_by_a_run_that_takes_it(tmp_path, secret):
    """A run that did not take a modality once left its files "seen": every later run skipped them unread, and
    even `rehash` counted their known bytes as already cataloged, so they could never be ingested into that home.
    Only that rejection is reconsidered, and only by a run that takes the modality."""
    source, home = tmp_path / "export", tmp_path / "home"
    for index in range(3):
        generate_study(source, 11, index, PRESETS["test"])
    files = sorted(p for p in source.rglob("*") if p.is_file())
    modalities = {path: str(pydicom.dcmread(path, stop_before_pixels=True).Modality) for path in files}
    taken = sorted(set(modalities.values()))
    assert len(taken) >= 2, modalities                              # the corpus mixes modalities
    first, rest = taken[0], tuple(taken[1:])

    narrow = _ingest(source, home, threads=True, modalities=(first,))
    skipped = sum(1 for m in modalities.values() if m != first)
    assert (narrow["skipped"], narrow["ingested"]) == (skipped, len(files) - skipped)
    again = _ingest(source, home, threads=True, modalities=(first,))        # the same run's settings: nothing read
    assert (again["unchanged"], again["surveyed"]) == (len(files), 0)
    wider = _ingest(source, home, threads=True, modalities=(first, *rest))
    assert (wider["unchanged"], wider["surveyed"], wider["ingested"], wider["duplicates"]) == (
        len(files) - skipped, skipped, skipped, 0)
    assert _rows(home, "SELECT count(DISTINCT source_sha256) FROM images") == [(len(files),)]
    last = _ingest(source, home, threads=True)                              # settled now: nothing read again
    assert (last["unchanged"], last["surveyed"]) == (len(files), 0)
    statuses = _rows(home, "SELECT status, count(*) FROM sources GROUP BY ALL ORDER BY 1")
    assert statuses == [("ingested", len(files)), ("skipped", skipped)]     # the skipped rows stay, for audit
    from tasks.ingest.report import SECTIONS                          # the auditor's report counts each file once
    by_status = next(section.sql for section in SECTIONS if section.key == "status")
    assert [row[:2] for row in _rows(home, by_status)] == [("ingested", len(files))]
