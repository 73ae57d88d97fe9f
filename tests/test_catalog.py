"""The DuckDB catalog: schema, atomic batches, known hashes, published snapshots, queries, the report."""
from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pytest

from tasks.ingest.catalog import (
    CATALOG_FILE,
    NO_SNAPSHOT_MESSAGE,
    SCHEMA_VERSION,
    SNAPSHOT_FILE,
    TABLES,
    Catalog,
    QueryError,
    ReadOnlyQueryError,
    SnapshotMissingError,
    open_snapshot,
    query,
    scrub_reason,
)
from tasks.ingest.report import write_report

REPO = Path(__file__).resolve().parents[1]
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON if VENV_PYTHON.exists() else sys.executable)
SCRIPT_REASON = "bad header <script>alert('x')</script> & more"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def batch(run_id: str, prefix: str, n_files: int = 3, frames: int = 2, shard: str | None = None):
    """n_files ingested files with `frames` images each in one shard, plus one quarantined and one skipped."""
    shard = shard or f"dax-{prefix}-000000.tar"
    sources, images = [], []
    for i in range(n_files):
        source = sha(f"{prefix}-file-{i}")
        sources.append({"sha256": source, "status": "ingested", "size_bytes": 1000, "modality": "XA",
                        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.12.1", "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                        "frames": frames, "samples": frames, "pixel_rule": "none", "run_id": run_id})
        for f in range(frames):
            images.append({"key": f"{prefix}_{i:04d}_{f:04d}", "shard": shard, "source_sha256": source, "frame": f,
                           "patient_key": f"DAX-P{i % 2}", "study_key": f"DAX-S{i}", "series_key": f"DAX-R{i}",
                           "modality": "XA", "manufacturer": "Siemens" if i % 2 else "Philips", "model": "Cios $5$",
                           "rows": 256, "cols": 256, "orig_rows": 976, "orig_cols": 976, "frames": frames,
                           "pixel_spacing_mm": 0.5, "study_date": dt.date(2015, 3 + i, 1), "series_date": "20150301",
                           "normalization": {"method": "neglog", "c": 1234.5}, "pixel_rule": "none",
                           "run_id": run_id})
    sources.append({"sha256": sha(f"{prefix}-bad"), "status": "quarantined", "reason": SCRIPT_REASON,
                    "size_bytes": 10, "run_id": run_id})
    sources.append({"sha256": sha(f"{prefix}-ct"), "status": "skipped", "reason": "modality CT not ingested",
                    "size_bytes": 20, "modality": "CT", "run_id": run_id})
    shards = [{"name": shard, "sha256": sha(shard), "samples": len(images), "bytes": 123_456, "run_id": run_id}]
    return sources, images, shards


def one_run(catalog: Catalog, run_id: str, prefix: str, **kwargs) -> None:
    catalog.start_run(run_id, f"flow-{run_id}", "0.1.0", sha("recipe"), "fp-1234", {"batch_size": 64})
    sources, images, shards = batch(run_id, prefix, **kwargs)
    catalog.record_batch(sources, images, shards)
    catalog.finish_run(run_id, "completed", {"files": len(sources), "ingested": len(sources) - 2, "duplicates": 0,
                                             "skipped": 1, "quarantined": 1, "images": len(images), "shards": 1},
                       seconds=2.5)


def count(home: Path, table: str) -> int:
    return int(json.loads(query(home, f"SELECT count(*) AS n FROM {table}", "json"))[0]["n"])


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    return tmp_path / "dax-home"


def test_schema_created(home: Path):
    with Catalog.open(home) as catalog:
        con = catalog._connection
        tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        assert {"meta", "sources", "images", "shards", "source_files", "runs"} <= tables
        for table, columns in TABLES.items():
            got = [r[0] for r in con.execute(
                "SELECT column_name FROM duckdb_columns() WHERE table_name = ? ORDER BY column_index", [table]
            ).fetchall()]
            assert got == [c[0] for c in columns]
        assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
        with pytest.raises(duckdb.ConstraintException):   # the status CHECK
            con.execute("INSERT INTO sources (sha256, status, run_id) VALUES ('x', 'lost', 'r')")
    with Catalog.open(home) as catalog:                      # reopening is idempotent
        assert catalog.shard_names() == set()
    assert (home / CATALOG_FILE).exists()


def test_a_schema_1_catalog_is_migrated(home: Path):
    """Catalogs written before the incremental survey: no `source_files`, no `unchanged`/`surveyed` counts."""
    with Catalog.open(home) as catalog:
        con = catalog._connection
        con.execute("DROP TABLE source_files")
        con.execute("ALTER TABLE runs DROP COLUMN unchanged")
        con.execute("ALTER TABLE runs DROP COLUMN surveyed")
        con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    with Catalog.open(home) as catalog:
        catalog.start_run("r1", None, None, None, None, {})
        catalog.finish_run("r1", "completed", {"files": 3, "unchanged": 2, "surveyed": 1}, 0.1)
        con = catalog._connection
        assert con.execute("SELECT files, unchanged, surveyed FROM runs").fetchall() == [(3, 2, 1)]
        assert con.execute("SELECT count(*) FROM source_files").fetchone()[0] == 0
        assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)


def test_record_batch_is_atomic(home: Path):
    with Catalog.open(home) as catalog:
        catalog.start_run("r1", None, "0.1.0", sha("recipe"), "fp", {})
        sources, images, shards = batch("r1", "a")
        catalog.record_batch(sources, images, shards)
        # a second batch whose images repeat a key already stored: nothing of it may land
        sources2, images2, shards2 = batch("r1", "b", shard="dax-b-000000.tar")
        images2[-1]["key"] = images[0]["key"]
        with pytest.raises(duckdb.ConstraintException):
            catalog.record_batch(sources2, images2, shards2)
        con = catalog._connection
        assert con.execute("SELECT count(*) FROM sources").fetchone()[0] == len(sources)
        assert con.execute("SELECT count(*) FROM images").fetchone()[0] == len(images)
        assert catalog.shard_names() == {"dax-a-000000.tar"}
        assert catalog.known_sha256(s["sha256"] for s in sources2) == set()
        # and the connection is usable after the rollback
        catalog.record_batch(*batch("r1", "c", shard="dax-c-000000.tar"))
        assert catalog.shard_names() == {"dax-a-000000.tar", "dax-c-000000.tar"}


def test_phi_guards(home: Path):
    reason = "InvalidDicomError: File '/data/SMITH^JOHN/img 1.dcm' (uid 1.3.12.2.1107.5.4.5.1234) ts 1.2.840.10008.1.2.1"
    scrubbed = scrub_reason(reason)
    assert "SMITH" not in scrubbed and "1.3.12.2.1107" not in scrubbed and "1.2.840.10008.1.2.1" in scrubbed
    with Catalog.open(home) as catalog:
        catalog.start_run("r1", None, None, None, None, {"source": "/hospital/SMITH_JOHN", "workers": 2})
        params = json.loads(catalog._connection.execute("SELECT parameters FROM runs").fetchone()[0])
        assert params == {"source": "<path>", "workers": 2}
        with pytest.raises(ValueError, match="SHA-256"):
            catalog.record_batch([{"sha256": "/data/x.dcm", "status": "ingested", "run_id": "r1"}], [], [])
        with pytest.raises(ValueError, match="bare file name"):
            catalog.record_batch([], [], [{"name": "/data/shards/x.tar", "sha256": sha("x"), "run_id": "r1"}])
        with pytest.raises(ValueError, match="keyed fingerprint"):
            catalog.record_batch([], [], [], files=[{"path_key": "/data/SMITH^JOHN/img 1.dcm", "size_bytes": 1,
                                                     "mtime_ns": 1, "sha256": sha("x"), "run_id": "r1"}])
        # columns outside the schema are never stored
        catalog.record_batch([{"sha256": sha("f"), "status": "ingested", "run_id": "r1", "relpath": "SMITH/1.dcm"}],
                             [], [])
        columns = [r[0] for r in catalog._connection.execute("DESCRIBE sources").fetchall()]
        assert "relpath" not in columns
        assert catalog._connection.execute("SELECT count(*) FROM sources").fetchone()[0] == 1


def test_known_sha256_50k(home: Path):
    stored = [sha(f"stored-{i}") for i in range(50_000)]
    with Catalog.open(home) as catalog:
        catalog.start_run("r1", None, None, None, None, {})
        catalog.record_batch([{"sha256": h, "status": "ingested" if i % 3 else "quarantined", "run_id": "r1"}
                              for i, h in enumerate(stored)], [], [])
        probe = stored[::2] + [sha(f"new-{i}") for i in range(25_000)]
        known = catalog.known_sha256(iter(probe))
        assert known == set(stored[::2])
        assert catalog.known_sha256([]) == set()


def test_instance_keys_and_reasons(home: Path):
    with Catalog.open(home) as catalog:
        one_run(catalog, "r1", "a")
        catalog.record_batch([{"sha256": sha("re"), "status": "duplicate", "instance_key": "DAX-0123456789abcdef",
                               "reason": "same SOP instance as an already ingested file (re-export)", "run_id": "r1"}],
                             [], [])
        catalog.record_batch([{"sha256": sha("good"), "status": "ingested", "instance_key": "DAX-00000000000000aa",
                               "run_id": "r1"},
                              {"sha256": sha("bad"), "status": "quarantined", "instance_key": "DAX-00000000000000bb",
                               "reason": "no pixel data", "run_id": "r1"}], [], [])
        # only an ingested copy makes a later copy of the same instance a duplicate
        assert catalog.known_instance_keys(["DAX-0123456789abcdef", "DAX-ffffffffffffffff", "DAX-00000000000000aa",
                                            "DAX-00000000000000bb"]) == {"DAX-00000000000000aa"}
        assert catalog.reasons("r1") == [
            ("duplicate", "same SOP instance as an already ingested file (re-export)", 1),
            ("quarantined", SCRIPT_REASON, 1), ("quarantined", "no pixel data", 1),
            ("skipped", "modality CT not ingested", 1)]
        with pytest.raises(ValueError, match="pseudonym"):
            catalog.record_batch([{"sha256": sha("x"), "status": "duplicate", "run_id": "r1",
                                   "instance_key": "1.3.12.2.1107.5.4.5.1234"}], [], [])


def test_no_snapshot_yet(home: Path):
    with pytest.raises(SnapshotMissingError, match="run `dax ingest` first"):
        open_snapshot(home)
    with pytest.raises(SnapshotMissingError) as error:
        query(home, "SELECT 1")
    assert str(error.value) == NO_SNAPSHOT_MESSAGE


def test_snapshot_read_from_another_process_while_writer_holds_catalog(home: Path):
    with Catalog.open(home) as catalog:
        one_run(catalog, "r1", "a")
        snapshot = catalog.publish_snapshot()
        assert snapshot == home / SNAPSHOT_FILE
        assert not list(home.glob(".catalog-snapshot.*"))       # no temporary left behind
        catalog.start_run("r2", None, None, None, None, {})     # the writer is mid-run and holds the file
        catalog.record_batch(*batch("r2", "b", shard="dax-b-000000.tar"))
        script = textwrap.dedent(f"""
            import json, duckdb
            from pathlib import Path
            from tasks.ingest.catalog import query
            home = Path({str(home)!r})
            # the plain read-only open the field notes describe, on the snapshot ...
            con = duckdb.connect(str(home / {SNAPSHOT_FILE!r}), read_only=True)
            direct = con.execute("SELECT count(*) FROM images").fetchone()[0]
            con.close()
            # ... while the working catalog is locked by the writer
            try:
                duckdb.connect(str(home / {CATALOG_FILE!r}), read_only=True)
                locked = False
            except duckdb.IOException as error:
                locked = "lock" in str(error).lower()
            rows = json.loads(query(home, "SELECT count(*) AS n FROM images", "json"))
            print(json.dumps({{"direct": direct, "query": rows[0]["n"], "locked": locked}}))
        """)
        done = subprocess.run([PYTHON, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        seen = json.loads(done.stdout.strip().splitlines()[-1])
        assert seen == {"direct": 6, "query": 6, "locked": True}   # r2's rows are not published yet


def test_second_writer_gets_a_clear_error(home: Path):
    with Catalog.open(home):
        script = ("from pathlib import Path; from tasks.ingest.catalog import Catalog, CatalogBusyError\n"
                  f"try:\n    Catalog.open(Path({str(home)!r}))\nexcept CatalogBusyError as e:\n    print('BUSY', e)")
        done = subprocess.run([PYTHON, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert "BUSY" in done.stdout and "another writer" in done.stdout, done.stderr


def test_reader_keeps_its_snapshot_while_a_new_one_is_published(home: Path):
    with Catalog.open(home) as catalog:
        one_run(catalog, "r1", "a")
        catalog.publish_snapshot()
        reader = open_snapshot(home)
        try:
            assert reader.execute("SELECT count(*) FROM images").fetchone()[0] == 6
            one_run(catalog, "r2", "b", shard="dax-b-000000.tar")
            catalog.publish_snapshot()
            # the open reader still sees the old snapshot, whole and consistent
            assert reader.execute("SELECT count(*) FROM images").fetchone()[0] == 6
            assert reader.execute("SELECT count(*) FROM runs").fetchone()[0] == 1
            assert reader.execute("""SELECT count(*) FROM images i ANTI JOIN sources s
                                     ON i.source_sha256 = s.sha256""").fetchone()[0] == 0
            assert reader.execute("SELECT sum(samples) FROM shards").fetchone()[0] == 6
            # a new open, in this same process, sees the new one
            assert count(home, "images") == 12
            assert count(home, "runs") == 2
        finally:
            reader.close()


def test_query_formats_and_refusals(home: Path):
    with Catalog.open(home) as catalog:
        one_run(catalog, "r1", "a")
        catalog.publish_snapshot()
    sql = "SELECT status, count(*) AS files FROM sources GROUP BY status ORDER BY status"
    table = query(home, sql)
    assert "status" in table and "quarantined" in table and "3 rows" in table
    rows = list(csv.reader(io.StringIO(query(home, sql, "csv"))))
    assert rows == [["status", "files"], ["ingested", "3"], ["quarantined", "1"], ["skipped", "1"]]
    records = json.loads(query(home, sql, "json"))
    assert records == [{"status": "ingested", "files": 3}, {"status": "quarantined", "files": 1},
                       {"status": "skipped", "files": 1}]
    image = json.loads(query(home, "SELECT study_date, normalization FROM images ORDER BY key LIMIT 1", "json"))[0]
    assert image == {"study_date": "2015-03-01", "normalization": {"c": 1234.5, "method": "neglog"}}
    assert "[bold]" in query(home, "SELECT '[bold]x' AS v")          # values are not read as rich markup
    for statement in ("DELETE FROM sources", "INSERT INTO runs (run_id) VALUES ('x')", "DROP TABLE images",
                      "UPDATE sources SET reason = NULL", "COPY sources TO 'leak.csv'",
                      "ATTACH 'other.duckdb' AS o", "SELECT 1; DELETE FROM sources"):
        with pytest.raises(ReadOnlyQueryError, match="read-only"):
            query(home, statement)
    with pytest.raises(QueryError, match="unknown format"):
        query(home, sql, "xml")
    with pytest.raises(QueryError, match="Binder Error.*nope"):      # DuckDB's own words, as one error
        query(home, "SELECT nope FROM images")
    with pytest.raises(QueryError, match="does not parse"):
        query(home, "SELEC 1")
    assert count(home, "sources") == 5


def test_report(home: Path, tmp_path: Path):
    with Catalog.open(home) as catalog:
        one_run(catalog, "r1", "a")
        one_run(catalog, "r2", "b", n_files=2, frames=1, shard="dax-b-000000.tar")
        catalog.publish_snapshot()
    (tmp_path / "report").mkdir()
    out = write_report(home, tmp_path / "report")                    # a folder: the default file name
    assert out == tmp_path / "report" / "catalog-report.html"
    assert write_report(home, tmp_path / "audit.html") == tmp_path / "audit.html"
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<html" in page and page.rstrip().endswith("</html>")
    assert page.count('src="data:image/png;base64,') >= 4
    assert "<script>" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in page
    # totals: 9 files (5 + 4), 8 images (6 + 2), 2 shards, 2 runs
    totals = page.split('id="totals"')[1].split("</section>")[0]
    for value, name in (("9", "files"), ("8", "images"), ("2", "shards"), ("2", "runs"), ("246,912", "shard_bytes")):
        assert f'<div class="v">{value}</div><div class="k">{name}</div>' in totals
    assert "shifted" in page and "Siemens / Cios $5$" in page and "2015-03" in page
    assert "modality CT not ingested" in page and "fp-1234" in page and sha("recipe") in page
    assert "SELECT status, count(*) AS files" in page                # the SQL is shown
    subjects = page.split('id="subjects"')[1].split("</section>")[0]
    assert "<td class=\"num\">2</td><td class=\"num\">3</td><td class=\"num\">3</td>" in subjects
