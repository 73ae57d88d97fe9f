"""Where ingestion's CPU work runs: a local process pool by default, a Dask cluster when asked.

    DAX_INGEST_RUNNER=process   (default) ProcessPoolTaskRunner with DAX_INGEST_WORKERS processes (2)
    DAX_INGEST_RUNNER=dask      prefect-dask's DaskTaskRunner: the cluster at DAX_DASK_ADDRESS
                                (tcp://scheduler:8786), else a local cluster of DAX_INGEST_WORKERS
                                single-threaded worker processes

The flow decorator reads these once at import, so a deployment's work pool sets them in its job
variables (``env``); ``dax ingest --runner dask`` sets them for one run.

The process pool's workers use the API of the flow run that feeds them. Without a Prefect server
(``PREFECT_API_URL`` unset: `dax` on one machine), that API is the ephemeral one Prefect started for
the run, and each spawned worker, which takes the run's settings, would start one more of its own on
the same database: about 15 s per worker before its first task on 2 cores (BENCHMARKS.md, start-up).
"""
from __future__ import annotations

import os

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner

__all__ = ["SharedAPIProcessPool", "ingest_task_runner"]


class SharedAPIProcessPool(ProcessPoolTaskRunner):
    """Prefect's ProcessPoolTaskRunner whose workers, under an ephemeral API, get the URL of the API that
    the submitting flow run already talks to (module docstring); with a configured server it is the plain
    runner. Only the settings handed to the workers change: the parent's own stay as they are."""

    def submit(self, task, parameters, wait_for=None, dependencies=None):
        from prefect.context import FlowRunContext
        from prefect.settings import PREFECT_API_URL, temporary_settings

        run = FlowRunContext.get()
        api = run.client.api_url if run is not None and run.client is not None else None
        # the ephemeral API as Prefect starts it: a local server process (not an in-process app)
        if PREFECT_API_URL.value() or api is None or api.host != "127.0.0.1":
            return super().submit(task, parameters, wait_for, dependencies)
        with temporary_settings(updates={PREFECT_API_URL: str(api)}):
            return super().submit(task, parameters, wait_for, dependencies)


def ingest_task_runner(kind: str | None = None, workers: int | None = None, address: str | None = None) -> TaskRunner:
    kind = (kind or os.environ.get("DAX_INGEST_RUNNER") or "process").lower()
    workers = workers or int(os.environ.get("DAX_INGEST_WORKERS") or 2)
    if kind == "process":
        return SharedAPIProcessPool(max_workers=workers)
    if kind == "dask":
        from prefect_dask import DaskTaskRunner
        address = address or os.environ.get("DAX_DASK_ADDRESS")
        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None})
    raise ValueError(f"unknown ingestion runner {kind!r}: use 'process' or 'dask'")
