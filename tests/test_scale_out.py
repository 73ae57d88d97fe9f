"""Scale-out ingestion: prefect-dask's DaskTaskRunner gives the same catalog as the local process pool.

The real `dax ingest` in subprocesses, on the same tiny export with the same secret, into two homes:
once with `--runner dask` (a local Dask cluster of 2 single-threaded worker processes, built by
flows/runners.py) and once with `--runner process` (ProcessPoolTaskRunner, 2 processes). Small batches
(2 files) make several task runs, so both Dask workers get some.

Every table is compared as content, minus what names the run (run_id, recorded_at). The shards are
compared byte for byte (name, SHA-256, samples, bytes): they can be, because a shard's name comes from
its batch's content (the SHA-256s of the batch's files, tasks/ingest/steps.py:batch_prefix), the batches are
cut by the flow in listing order before any runner sees them, each batch is written by one task into
its own shards in file order, and the tar headers carry fixed mtime/owner/mode (tasks/shards.py). Which
worker ran a batch, and in what order batches finished, changes only the order of catalog inserts.
The decoded pixels per key are compared as well, as the readers of the shards see them.
(torchrun DDP on CPU is covered by tests/test_pretrain.py.)
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks.ingest.catalog import TABLES, open_snapshot
from tasks.ingest.shards import iter_shard
from tasks.synth.study import PRESETS, generate_study
from tests.prefect_home import prefect_home

DAX = str(Path(sys.executable).with_name("dax"))
SECRET = "scale-out-test-secret-0123456789"
VOLATILE = {"run_id", "recorded_at"}
ORDER = {"images": "key", "sources": "sha256", "shards": "name"}


def _ingest(tmp: Path, source: Path, runner: str) -> tuple[Path, str]:
    home = tmp / f"home-{runner}"
    # one Prefect home for both runs (its empty database copied in once); INFO logs show the runner
    env = dict(os.environ, DAX_DEID_SECRET=SECRET, PREFECT_HOME=prefect_home(tmp / "prefect"), COLUMNS="200",
               PREFECT_LOGGING_LEVEL="INFO")
    for name in ("DAX_INGEST_RUNNER", "DAX_DASK_ADDRESS", "DAX_INGEST_WORKERS", "PREFECT_API_URL"):
        env.pop(name, None)
    done = subprocess.run([DAX, "ingest", str(source), "--home", str(home), "--runner", runner, "--workers", "2",
                           "--batch-size", "2", "--max-size", "128"],
                          env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"dax ingest --runner {runner} failed:\n{output[-6000:]}"
    return home, output


def _tables(home: Path) -> dict[str, list[tuple]]:
    con = open_snapshot(home)
    try:
        out = {}
        for table in ("images", "sources", "shards"):
            columns = [name for name, _, _ in TABLES[table] if name not in VOLATILE]
            out[table] = con.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {ORDER[table]}").fetchall()
        return out
    finally:
        con.close()


def _pixels(home: Path) -> dict[str, tuple[np.ndarray, dict]]:
    return {key: (pixels, meta) for shard in sorted((home / "shards").glob("*.tar"))
            for key, pixels, meta in iter_shard(shard)}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dask_runner_gives_the_same_catalog_as_the_process_pool(tmp_path):
    source = tmp_path / "export"
    labels = [row for index in range(3) for row in generate_study(source, 31, index, PRESETS["test"])[0]]
    files = {row["path"] for row in labels}
    assert len(files) >= 5  # several batches of 2: both Dask workers get work

    dask_home, dask_log = _ingest(tmp_path, source, "dask")
    process_home, process_log = _ingest(tmp_path, source, "process")
    # the runner really was the one asked for
    assert "Creating a new Dask cluster with `distributed.deploy.local.LocalCluster`" in dask_log
    assert "Dask" not in process_log

    dask, process = _tables(dask_home), _tables(process_home)
    assert dask["images"], "nothing was ingested"
    assert len({row[0] for row in dask["sources"]}) == len(files)
    assert len(dask["shards"]) >= 3
    for table in ("images", "sources", "shards"):
        assert dask[table] == process[table], f"{table} differs between the dask and process runners"
    for home in (dask_home, process_home):   # what the catalog says is on disk
        on_disk = sorted(p.name for p in (home / "shards").glob("*.tar"))
        assert on_disk == [row[0] for row in dask["shards"]]

    dask_pixels, process_pixels = _pixels(dask_home), _pixels(process_home)
    assert sorted(dask_pixels) == [row[0] for row in dask["images"]]
    assert sorted(process_pixels) == sorted(dask_pixels)
    for key, (pixels, meta) in dask_pixels.items():
        other_pixels, other_meta = process_pixels[key]
        assert pixels.dtype == np.uint16 and np.array_equal(pixels, other_pixels), key
        assert meta == other_meta, key
