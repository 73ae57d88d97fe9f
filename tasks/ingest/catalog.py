"""The DAX catalog: what went in, what was refused and why, in DuckDB.

Two files live in the DAX home folder:

``catalog.duckdb``
    The working catalog. Exactly one process writes it: the ingest flow, through `Catalog`, and only
    while a run writes (``with Catalog.open(home) as catalog: ...``). DuckDB allows one read-write
    process *or* many read-only ones, and a read-only open from another process fails while the
    writer holds the file ("Could not set lock on file"), so auditors never open this file.

``catalog-snapshot.duckdb``
    The published, read-only copy auditors query (`open_snapshot`, `query`, the HTML report). The
    writer builds it with ``ATTACH`` + ``COPY FROM DATABASE`` into a temporary file in the same
    folder, then ``os.replace``-s it over the old one: a reader sees either the old or the new
    snapshot, never half of one, and a reader that holds the old one open keeps reading it (POSIX
    rename keeps the old inode alive) until it closes.

No PHI is stored: files are named by SHA-256 only, people, studies and series by keyed pseudonyms.
`Catalog.record_batch` enforces the parts of that it can check: columns outside the schema are
dropped (never stored), hashes must be hex SHA-256, shard names must be bare file names, and refusal
reasons are scrubbed of anything that looks like a path or a non-registry UID.
"""
from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from tasks.fileio import fsync_directory

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
CATALOG_FILE = "catalog.duckdb"
SNAPSHOT_FILE = "catalog-snapshot.duckdb"
_SNAPSHOT_TMP_PREFIX = ".catalog-snapshot."
_SNAPSHOT_TMP_SUFFIX = ".tmp.duckdb"
NO_SNAPSHOT_MESSAGE = "no catalog snapshot yet: run `dax ingest` first"
STATUSES = ("ingested", "duplicate", "skipped", "quarantined")
COUNT_COLUMNS = ("files", "unchanged", "surveyed", "ingested", "duplicates", "skipped", "quarantined", "images",
                 "shards")
FORMATS = ("table", "csv", "json")

# --- schema --------------------------------------------------------------------------------------------
# (column, DuckDB type, constraint). The Arrow type of each column follows from its DuckDB type.
TABLES: dict[str, tuple[tuple[str, str, str], ...]] = {
    "sources": (
        ("sha256", "VARCHAR", "NOT NULL"),
        ("status", "VARCHAR", "NOT NULL CHECK (status IN ('ingested','duplicate','skipped','quarantined'))"),
        ("reason", "VARCHAR", ""),
        ("size_bytes", "BIGINT", ""),
        ("modality", "VARCHAR", ""),
        ("sop_class_uid", "VARCHAR", ""),
        ("transfer_syntax_uid", "VARCHAR", ""),
        ("frames", "INTEGER", ""),
        ("samples", "INTEGER", ""),
        ("pixel_rule", "VARCHAR", ""),
        ("run_id", "VARCHAR", "NOT NULL"),
        ("recorded_at", "TIMESTAMP", ""),
        # Beyond the brief's DDL, for the ingest flow: keyed pseudonym of the SOP Instance UID
        # ("DAX-" + 16 hex of an HMAC), so a re-exported image (new bytes, same instance) is a duplicate.
        ("instance_key", "VARCHAR", ""),
    ),
    "images": (
        ("key", "VARCHAR", "PRIMARY KEY"),
        ("shard", "VARCHAR", "NOT NULL"),
        ("source_sha256", "VARCHAR", "NOT NULL"),
        ("frame", "INTEGER", ""),
        ("patient_key", "VARCHAR", ""),
        ("study_key", "VARCHAR", ""),
        ("series_key", "VARCHAR", ""),
        ("modality", "VARCHAR", ""),
        ("manufacturer", "VARCHAR", ""),
        ("model", "VARCHAR", ""),
        ("rows", "INTEGER", ""),
        ("cols", "INTEGER", ""),
        ("orig_rows", "INTEGER", ""),
        ("orig_cols", "INTEGER", ""),
        ("frames", "INTEGER", ""),
        ("pixel_spacing_mm", "DOUBLE", ""),
        ("study_date", "DATE", ""),
        ("series_date", "DATE", ""),
        ("normalization", "JSON", ""),
        ("pixel_rule", "VARCHAR", ""),
        ("run_id", "VARCHAR", "NOT NULL"),
    ),
    "shards": (
        ("name", "VARCHAR", "PRIMARY KEY"),
        ("sha256", "VARCHAR", "NOT NULL"),
        ("samples", "INTEGER", ""),
        ("bytes", "BIGINT", ""),
        ("run_id", "VARCHAR", "NOT NULL"),
    ),
    # What the survey saw at a source path, so that a nightly run skips a file it saw before without reading
    # it: a row per (path, size, mtime) surveyed, never updated (a changed file adds a row; the old one stays
    # for audit). The path itself is never stored: ``path_key`` is a keyed fingerprint ("DAX-" + 16 hex of
    # an HMAC of the resolved path), like the other pseudonyms.
    "source_files": (
        ("path_key", "VARCHAR", "NOT NULL"),
        ("size_bytes", "BIGINT", "NOT NULL"),
        ("mtime_ns", "BIGINT", "NOT NULL"),
        ("sha256", "VARCHAR", "NOT NULL"),
        ("run_id", "VARCHAR", "NOT NULL"),
        ("recorded_at", "TIMESTAMP", ""),
    ),
    "runs": (
        ("run_id", "VARCHAR", "PRIMARY KEY"),
        ("flow_run_id", "VARCHAR", ""),
        ("started_at", "TIMESTAMP", ""),
        ("finished_at", "TIMESTAMP", ""),
        ("status", "VARCHAR", ""),
        ("code_version", "VARCHAR", ""),
        ("recipe_sha256", "VARCHAR", ""),
        ("secret_fingerprint", "VARCHAR", ""),
        ("parameters", "JSON", ""),
        ("files", "BIGINT", ""),
        ("unchanged", "BIGINT", ""),      # skipped unread: path, size and mtime as a catalog row has them
        ("surveyed", "BIGINT", ""),       # read and hashed by the survey
        ("ingested", "BIGINT", ""),
        ("duplicates", "BIGINT", ""),
        ("skipped", "BIGINT", ""),
        ("quarantined", "BIGINT", ""),
        ("images", "BIGINT", ""),
        ("shards", "BIGINT", ""),
        ("seconds", "DOUBLE", ""),
    ),
}

_ARROW_TYPES = {
    "VARCHAR": pa.string(), "JSON": pa.string(), "BIGINT": pa.int64(), "INTEGER": pa.int32(),
    "DOUBLE": pa.float64(), "DATE": pa.date32(), "TIMESTAMP": pa.timestamp("us"),
}


def _ddl() -> list[str]:
    statements = ["CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)"]
    for table, columns in TABLES.items():
        body = ",\n  ".join(f'"{name}" {sqltype} {constraint}'.rstrip() for name, sqltype, constraint in columns)
        statements.append(f"CREATE TABLE IF NOT EXISTS {table} (\n  {body}\n)")
    return statements


DDL = _ddl()


# --- errors --------------------------------------------------------------------------------------------
class CatalogError(RuntimeError):
    """A catalog operation that cannot proceed; the message says why and what to do."""


class CatalogBusyError(CatalogError):
    """Another process holds the working catalog for writing."""


class SnapshotMissingError(CatalogError, FileNotFoundError):
    """No snapshot has been published yet."""


class ReadOnlyQueryError(CatalogError, PermissionError):
    """A statement given to `query` that is not a read-only query."""


class QueryError(CatalogError, ValueError):
    """A query `query` cannot answer: DuckDB refused it (a typo, an unknown column), or an unknown format."""


# --- PHI guards ----------------------------------------------------------------------------------------
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PATH_KEY = re.compile(r"DAX-[0-9a-f]{16}")
_QUOTED_PATH = re.compile(r"""(['"])[^'"\n]*[/\\][^'"\n]*\1""")
_TOKEN = re.compile(r"""[^\s'"`()\[\]{},;]+""")
_PATH_START = re.compile(r"^(?:[/\\]|~[/\\]|\.{1,2}[/\\]|[A-Za-z]:[/\\]|file:/)")
_UID_TOKEN = re.compile(r"(?<![\w.])\d+(?:\.\d+){3,}(?![\w.])")
REGISTRY_UID_ROOT = "1.2.840.10008."   # UIDs the DICOM standard defines (transfer syntaxes, SOP classes)
MAX_REASON_CHARS = 500


def scrub_reason(reason: str | None) -> str | None:
    """A refusal reason safe to store: path-like tokens and non-registry UIDs masked, length capped.

    Reasons are meant to come from a fixed vocabulary, but some carry library error text, which can
    quote a file path (hospital folder names hold patient names) or an instance UID.
    """
    if reason is None:
        return None
    text = _QUOTED_PATH.sub(lambda m: f"{m.group(1)}<path>{m.group(1)}", str(reason))   # paths with spaces
    text = _TOKEN.sub(lambda m: "<path>" if _is_path(m.group(0)) else m.group(0), text)
    text = _UID_TOKEN.sub(lambda m: m.group(0) if m.group(0).startswith(REGISTRY_UID_ROOT) else "<uid>", text)
    return text[:MAX_REASON_CHARS]


def _is_path(token: str) -> bool:
    """A token that looks like a file path: two separators, or a leading root, home, dot or drive."""
    return len(token) > 1 and (token.count("/") + token.count("\\") >= 2 or bool(_PATH_START.match(token)))


def _check_sha256(table: str, column: str, value: Any) -> None:
    if value is not None and not (isinstance(value, str) and _SHA256.fullmatch(value)):
        raise ValueError(f"{table}.{column} must be a lowercase hex SHA-256 (got a {type(value).__name__} "
                         f"of length {len(value) if isinstance(value, str) else '?'})")


def _check_bare_name(table: str, column: str, value: Any) -> None:
    if isinstance(value, str) and ("/" in value or "\\" in value or value in ("", ".", "..")):
        raise ValueError(f"{table}.{column} must be a bare file name, never a path")


# --- value conversion ----------------------------------------------------------------------------------
def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):          # numpy scalars and arrays
        return value.tolist()
    if isinstance(value, (dt.date, dt.datetime, dt.time)):
        return value.isoformat()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, os.PathLike):
        return "<path>"
    return str(value)


def scrub_parameters(value: Any) -> Any:
    """Run parameters with every path-like string replaced by "<path>" (folder names can hold PHI)."""
    if isinstance(value, Mapping):
        return {str(k): scrub_parameters(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [scrub_parameters(v) for v in value]
    if isinstance(value, os.PathLike) or (isinstance(value, str) and ("/" in value or "\\" in value)):
        return "<path>"
    return value


def _to_json(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=_json_default)


def _to_date(value: Any) -> dt.date | None:
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    text = str(value).strip()
    for fmt in ("%Y%m%d", "%Y-%m-%d"):
        try:
            return dt.datetime.strptime(text, fmt).date()
        except ValueError:
            pass
    raise ValueError(f"not a date: expected YYYYMMDD or YYYY-MM-DD (got {len(text)} characters)")


def _to_timestamp(value: Any) -> dt.datetime | None:
    if value is None or isinstance(value, dt.datetime):
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return value
    return dt.datetime.fromisoformat(str(value))


def _to_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _to_float(value: Any) -> float | None:
    return None if value is None else float(value)


_CONVERT = {"JSON": _to_json, "DATE": _to_date, "TIMESTAMP": _to_timestamp, "BIGINT": _to_int,
            "INTEGER": _to_int, "DOUBLE": _to_float,
            "VARCHAR": lambda v: None if v is None else str(v)}


def _arrow_rows(table: str, rows: Sequence[Mapping[str, Any]], defaults: Mapping[str, Any] | None = None) -> pa.Table:
    """Rows (dicts keyed by column name) as an Arrow table with exactly the catalog table's columns.

    Keys outside the schema are dropped and never stored (their names, not values, are logged).
    """
    columns = TABLES[table]
    names = {name for name, _, _ in columns}
    extra = sorted({key for row in rows for key in row} - names)
    if extra:
        log.warning("catalog: %s columns not in the schema were not stored: %s", table, ", ".join(extra))
    arrays = {}
    for name, sqltype, _ in columns:
        convert = _CONVERT[sqltype]
        default = (defaults or {}).get(name)
        values = []
        for row in rows:
            value = row.get(name)
            if value is None:
                value = default
            try:
                values.append(convert(value))
            except (TypeError, ValueError) as error:
                raise ValueError(f"{table}.{name}: {error}") from None
        arrays[name] = pa.array(values, type=_ARROW_TYPES[sqltype])
    return pa.table(arrays)


def _guard(table: str, rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Copies of the rows with PHI checks applied (see the module docstring)."""
    checked = []
    for row in rows:
        row = dict(row)
        if table == "sources":
            _check_sha256(table, "sha256", row.get("sha256"))
            if row.get("status") not in STATUSES:
                raise ValueError(f"sources.status must be one of {', '.join(STATUSES)}")
            row["reason"] = scrub_reason(row.get("reason"))
            if row.get("instance_key") is not None and _UID_TOKEN.fullmatch(str(row["instance_key"])):
                raise ValueError("sources.instance_key must be a keyed pseudonym, never an original UID")
        elif table == "images":
            _check_sha256(table, "source_sha256", row.get("source_sha256"))
            _check_bare_name(table, "shard", row.get("shard"))
            _check_bare_name(table, "key", row.get("key"))
        elif table == "shards":
            _check_sha256(table, "sha256", row.get("sha256"))
            _check_bare_name(table, "name", row.get("name"))
        elif table == "source_files":
            _check_sha256(table, "sha256", row.get("sha256"))
            if not _PATH_KEY.fullmatch(str(row.get("path_key"))):
                raise ValueError("source_files.path_key must be a keyed fingerprint, never a path")
        checked.append(row)
    return checked


# A `sources` row of a file skipped only because the run did not take its modality (tasks.ingest.triage records
# the modality of that rejection alone), for a run that takes the modalities in the query's first parameter: the
# file is not settled for that run, which reads and ingests it.
_SKIPPED_FOR_ITS_MODALITY = "(s.status = 'skipped' AND coalesce(list_contains($1::VARCHAR[], s.modality), false))"


# --- the writer ----------------------------------------------------------------------------------------
class Catalog:
    """The catalog's single writer. Open it for the duration of one run and close it straight after::

        with Catalog.open(home) as catalog:
            catalog.start_run(...)
            known = catalog.known_sha256(hashes)
            catalog.record_batch(sources, images, shards)     # once per batch
            catalog.finish_run(run_id, "completed", counts, seconds)
            catalog.publish_snapshot()
    """

    def __init__(self, home: Path, con: duckdb.DuckDBPyConnection):
        self.home = Path(home)
        self.path = self.home / CATALOG_FILE
        self._con: duckdb.DuckDBPyConnection | None = con
        self._database = con.execute("SELECT current_database()").fetchone()[0]

    # lifecycle
    @classmethod
    def open(cls, home: Path) -> Catalog:
        home = Path(home)
        home.mkdir(parents=True, exist_ok=True)
        path = home / CATALOG_FILE
        try:
            con = duckdb.connect(str(path))
        except duckdb.IOException as error:
            if "lock" in str(error).lower():
                raise CatalogBusyError(
                    f"the catalog {CATALOG_FILE} is held by another writer (is a `dax ingest` running?); "
                    f"auditors read {SNAPSHOT_FILE} instead") from error
            raise
        try:
            catalog = cls(home, con)
            catalog._migrate()
        except BaseException:
            con.close()
            raise
        return catalog

    def _migrate(self) -> None:
        con = self._connection
        con.begin()
        try:
            con.execute("CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)")
            row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is not None and int(row[0]) > SCHEMA_VERSION:
                raise CatalogError(f"the catalog has schema version {row[0]}, newer than this code's "
                                   f"{SCHEMA_VERSION}: update DAX")
            for statement in DDL:
                con.execute(statement)
            con.execute("ALTER TABLE sources ADD COLUMN IF NOT EXISTS instance_key VARCHAR")  # pre-release files
            for column in ("unchanged", "surveyed"):                                           # schema 1
                con.execute(f"ALTER TABLE runs ADD COLUMN IF NOT EXISTS {column} BIGINT")
            con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
            con.commit()
        except BaseException:
            con.rollback()
            raise

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def _connection(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            raise CatalogError("the catalog is closed")
        return self._con

    # runs
    def start_run(self, run_id: str, flow_run_id: str | None, code_version: str | None,
                  recipe_sha256: str | None, secret_fingerprint: str | None, parameters: dict) -> None:
        """Record a run as 'running'. Parameters must hold no paths (they are stored as JSON)."""
        row = {"run_id": run_id, "flow_run_id": flow_run_id, "started_at": _utcnow(), "status": "running",
               "code_version": code_version, "recipe_sha256": recipe_sha256,
               "secret_fingerprint": secret_fingerprint, "parameters": scrub_parameters(parameters or {})}
        self._insert_in_transaction({"runs": _arrow_rows("runs", [row])})

    def finish_run(self, run_id: str, status: str, counts: Mapping[str, int], seconds: float) -> None:
        """Close a run: its status, the counts (keys from COUNT_COLUMNS) and its wall time."""
        unknown = set(counts) - set(COUNT_COLUMNS)
        if unknown:
            raise ValueError(f"unknown run counts: {', '.join(sorted(unknown))} (expected {', '.join(COUNT_COLUMNS)})")
        assignments = ", ".join(f"{name} = ?" for name in COUNT_COLUMNS)
        values = [_to_int(counts.get(name)) for name in COUNT_COLUMNS]
        con = self._connection
        updated = con.execute(
            f"UPDATE runs SET finished_at = ?, status = ?, seconds = ?, {assignments} WHERE run_id = ?",
            [_utcnow(), status, _to_float(seconds), *values, run_id]).fetchone()[0]
        if updated != 1:
            raise CatalogError(f"no run {run_id!r} to finish: call start_run first")

    # reads the writer needs
    def known_sha256(self, hashes: Iterable[str], modalities: Sequence[str] = ()) -> set[str]:
        """The hashes among ``hashes`` that `sources` already holds, with any status (one hash join), except where
        its only outcome is "skipped" for a modality in ``modalities``, the modalities of a run that takes them."""
        return self._known("sha256", hashes, where=f"NOT {_SKIPPED_FOR_ITS_MODALITY}", params=[list(modalities)])

    def known_instance_keys(self, keys: Iterable[str]) -> set[str]:
        """The instance pseudonyms among ``keys`` whose image is already ingested (a quarantined copy does
        not count: another copy of the same instance may still be good)."""
        return self._known("instance_key", keys, where="s.status = 'ingested'")

    def _known(self, column: str, values: Iterable[str], where: str = "TRUE", params: list | None = None) -> set[str]:
        probe = pa.table({"v": pa.array(list(set(values)), type=pa.string())})
        return self._probe(probe, f"SELECT DISTINCT s.{column} FROM sources s SEMI JOIN {{probe}} p "
                                  f"ON s.{column} = p.v WHERE {where}", params)

    def unchanged_files(self, files: Sequence[tuple[str, int, int]], modalities: Sequence[str] = ()) -> set[str]:
        """The path keys among ``files`` ((path_key, size_bytes, mtime_ns)) that a survey saw before with the
        same size and mtime: the file is what it was then, and its outcome is in the catalog (one join). Not
        settled, so not among them: a file whose only outcome is "skipped" for a modality in ``modalities``
        (an earlier run did not take that modality; this one does)."""
        keys, sizes, mtimes = zip(*files) if files else ((), (), ())
        probe = pa.table({"path_key": pa.array(keys, pa.string()), "size_bytes": pa.array(sizes, pa.int64()),
                          "mtime_ns": pa.array(mtimes, pa.int64())})
        return self._probe(probe, "SELECT DISTINCT p.path_key FROM {probe} p JOIN source_files f "
                                  "USING (path_key, size_bytes, mtime_ns) WHERE EXISTS (SELECT 1 FROM sources s "
                                  f"WHERE s.sha256 = f.sha256 AND NOT {_SKIPPED_FOR_ITS_MODALITY})",
                           [list(modalities)])

    def _probe(self, probe: pa.Table, sql: str, params: list | None = None) -> set:
        """The first column of ``sql`` run with the Arrow table ``probe`` registered as ``{probe}`` (a join
        in DuckDB instead of a parameter per value); empty for an empty probe."""
        if probe.num_rows == 0:
            return set()
        name = f"_dax_probe_{uuid.uuid4().hex}"
        con = self._connection
        con.register(name, probe)
        try:
            rows = con.execute(sql.format(probe=name), params).fetchall()
        finally:
            con.unregister(name)
        return {row[0] for row in rows}

    def reasons(self, run_id: str) -> list[tuple[str, str, int]]:
        """(status, reason, files) for the files of a run that were not ingested, most frequent first."""
        return [tuple(r) for r in self._connection.execute(
            """SELECT status, coalesce(reason, ''), count(*) AS files FROM sources
               WHERE run_id = ? AND status <> 'ingested' GROUP BY ALL ORDER BY status, files DESC, 2""",
            [run_id]).fetchall()]

    def shard_names(self) -> set[str]:
        return {row[0] for row in self._connection.execute("SELECT name FROM shards").fetchall()}

    # writes
    def record_batch(self, sources: list[dict], images: list[dict], shards: list[dict],
                     files: Sequence[dict] = ()) -> None:
        """Insert one batch's rows in one transaction: all of them, or none (the error is raised).

        ``files`` are the batch's `source_files` rows: written with the outcome they stand for, so a file is
        never skipped as unchanged unless its outcome is in the catalog."""
        now = _utcnow()
        tables = {
            "sources": _arrow_rows("sources", _guard("sources", sources), {"recorded_at": now}),
            "shards": _arrow_rows("shards", _guard("shards", shards)),
            "images": _arrow_rows("images", _guard("images", images)),
            "source_files": _arrow_rows("source_files", _guard("source_files", files), {"recorded_at": now}),
        }
        self._insert_in_transaction(tables)

    def _insert_in_transaction(self, tables: Mapping[str, pa.Table]) -> None:
        con = self._connection
        registered = []
        con.begin()
        try:
            for table, rows in tables.items():
                if rows.num_rows == 0:
                    continue
                name = f"_dax_{table}_{uuid.uuid4().hex}"
                con.register(name, rows)
                registered.append(name)
                con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM {name}")
            con.commit()
        except BaseException:
            con.rollback()
            raise
        finally:
            for name in registered:
                con.unregister(name)

    # publication
    def publish_snapshot(self) -> Path:
        """Write a consistent copy of the catalog for auditors and swap it in atomically.

        ``COPY FROM DATABASE`` copies schema and data into a new file under a temporary name in the
        home folder (same file system); ``DETACH`` checkpoints it; fsync; then ``os.replace``.
        """
        con = self._connection
        snapshot = self.home / SNAPSHOT_FILE
        # Only the holder of the main catalog's write lock publishes: any temporary file is a leftover.
        for stale in self.home.glob(f"{_SNAPSHOT_TMP_PREFIX}*"):
            stale.unlink(missing_ok=True)
        tmp = self.home / f"{_SNAPSHOT_TMP_PREFIX}{os.getpid()}.{uuid.uuid4().hex[:8]}{_SNAPSHOT_TMP_SUFFIX}"
        alias = f"dax_snapshot_{uuid.uuid4().hex[:8]}"
        attached = False
        try:
            con.execute(f"ATTACH '{_sql_path(tmp)}' AS {alias}")
            attached = True
            con.execute(f'COPY FROM DATABASE "{self._database}" TO {alias}')
            con.execute(f"INSERT OR REPLACE INTO {alias}.meta VALUES ('snapshot_published_at', ?)",
                        [_utcnow().isoformat(timespec="seconds") + "Z"])
            con.execute(f"DETACH {alias}")
            attached = False
            wal = tmp.with_name(tmp.name + ".wal")
            if wal.exists():  # DETACH checkpoints; a WAL left behind would not travel with the rename
                raise CatalogError("snapshot was not fully checkpointed; not published")
            _fsync(tmp)
            os.chmod(tmp, 0o444)
            os.replace(tmp, snapshot)
            fsync_directory(self.home)
        except BaseException:
            if attached:
                con.execute(f"DETACH {alias}")
            tmp.unlink(missing_ok=True)
            tmp.with_name(tmp.name + ".wal").unlink(missing_ok=True)
            raise
        return snapshot


def _sql_path(path: Path) -> str:
    return str(path).replace("'", "''")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the read side -------------------------------------------------------------------------------------
READ_ONLY_STATEMENTS = ("SELECT", "EXPLAIN")   # SELECT covers WITH, DESCRIBE, SHOW, SUMMARIZE, FROM-first


def snapshot_path(home: Path) -> Path:
    return Path(home) / SNAPSHOT_FILE


def open_snapshot(home: Path) -> duckdb.DuckDBPyConnection:
    """A read-only connection to the published snapshot (its tables are the default schema).

    The snapshot is attached READ_ONLY to a private in-memory database rather than opened with
    ``duckdb.connect(path, read_only=True)``: the Python client caches database instances by path, so
    a second connect in a process that still holds the old snapshot would get the *old* file back
    after a new one was published. External file access is then switched off and the configuration
    locked, so a query cannot read or write files beside the snapshot.
    """
    path = snapshot_path(home)
    if not path.is_file():
        raise SnapshotMissingError(NO_SNAPSHOT_MESSAGE)
    con = duckdb.connect(":memory:")
    try:
        con.execute(f"ATTACH '{_sql_path(path)}' AS snapshot (READ_ONLY)")
        con.execute("USE snapshot")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Raise `ReadOnlyQueryError` unless ``sql`` is exactly one read-only statement."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as error:
        raise QueryError(f"the query does not parse: {error}") from None
    if len(statements) != 1:
        raise ReadOnlyQueryError(f"give exactly one read-only statement (got {len(statements)})")
    kind = statements[0].type.name
    if kind not in READ_ONLY_STATEMENTS:
        raise ReadOnlyQueryError(
            f"refused: the catalog snapshot is read-only and {kind} is not a read-only statement; "
            "only SELECT queries (WITH, DESCRIBE, SHOW, SUMMARIZE) and EXPLAIN are allowed. "
            "The catalog is written by `dax ingest` only.")


def fetch(con: duckdb.DuckDBPyConnection, sql: str) -> tuple[list[str], list[str], list[tuple]]:
    """Run one read-only query: (column names, DuckDB type names, rows)."""
    check_read_only(con, sql)
    try:
        result = con.sql(sql)
        names, types = list(result.columns), [str(t) for t in result.types]
        table = result.to_arrow_table()
    except duckdb.Error as error:
        if "read-only" in str(error):
            raise ReadOnlyQueryError(f"refused: the catalog snapshot is read-only ({error})") from None
        raise QueryError(str(error)) from None
    rows = list(zip(*(table.column(i).to_pylist() for i in range(table.num_columns)))) if table.num_columns else []
    return names, types, rows


def query(home: Path, sql: str, fmt: str = "table") -> str:
    """Run a read-only query on the published snapshot and render it as 'table', 'csv' or 'json'."""
    if fmt not in FORMATS:
        raise QueryError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    con = open_snapshot(home)
    try:
        names, types, rows = fetch(con, sql)
    finally:
        con.close()
    return render(names, types, rows, fmt)


def render(names: list[str], types: list[str], rows: list[tuple], fmt: str) -> str:
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(names)
        writer.writerows([["" if v is None else _text(v) for v in row] for row in rows])
        return out.getvalue()
    if fmt == "json":
        json_columns = {i for i, t in enumerate(types) if t == "JSON"}
        records = [{name: (json.loads(v) if i in json_columns and isinstance(v, str) else v)
                    for i, (name, v) in enumerate(zip(names, row))} for row in rows]
        return json.dumps(records, indent=2, default=_json_default, ensure_ascii=False) + "\n"
    if fmt == "table":
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(show_lines=False, caption=f"{len(rows)} row{'s' if len(rows) != 1 else ''}")
        for name, sqltype in zip(names, types):
            numeric = sqltype in ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "DOUBLE", "FLOAT") \
                or sqltype.startswith("DECIMAL")
            table.add_column(Text(name), justify="right" if numeric else "left", overflow="fold")
        for row in rows:   # Text(): values are never read as rich markup
            table.add_row(*(Text("" if v is None else _text(v)) for v in row))
        out = io.StringIO()
        Console(file=out, width=max(100, min(400, 12 * len(names) + 40)), color_system=None,
                force_terminal=False, highlight=False, soft_wrap=False).print(table)
        return out.getvalue()
    raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")


def _text(value: Any) -> str:
    if isinstance(value, (dt.date, dt.datetime, dt.time)):
        return value.isoformat(sep=" ") if isinstance(value, dt.datetime) else value.isoformat()
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=_json_default)
    return str(value)
