"""Where ingestion's CPU work runs: a local process pool by default, a Dask cluster when asked.

    DAX_INGEST_RUNNER=process   (default) ProcessPoolTaskRunner with DAX_INGEST_WORKERS processes (2)
    DAX_INGEST_RUNNER=dask      prefect-dask's DaskTaskRunner: the cluster at DAX_DASK_ADDRESS
                                (tcp://scheduler:8786), else a local cluster of DAX_INGEST_WORKERS
                                single-threaded worker processes

The flow decorator reads these once at import, so a deployment's work pool sets them in its job
variables (``env``); ``dax ingest --runner dask`` sets them for one run.
"""
from __future__ import annotations

import os

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner

__all__ = ["ingest_task_runner"]


def ingest_task_runner(kind: str | None = None, workers: int | None = None, address: str | None = None) -> TaskRunner:
    kind = (kind or os.environ.get("DAX_INGEST_RUNNER") or "process").lower()
    workers = workers or int(os.environ.get("DAX_INGEST_WORKERS") or 2)
    if kind == "process":
        return ProcessPoolTaskRunner(max_workers=workers)
    if kind == "dask":
        from prefect_dask import DaskTaskRunner
        address = address or os.environ.get("DAX_DASK_ADDRESS")
        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None})
    raise ValueError(f"unknown ingestion runner {kind!r}: use 'process' or 'dask'")
