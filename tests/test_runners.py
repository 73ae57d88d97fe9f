"""flows.runners: ingestion's process pool shares the flow run's API instead of starting one per worker."""
from __future__ import annotations

import os
import sys

from prefect import flow, task

from flows.runners import SharedAPIProcessPool, ingest_task_runner


@task
def worker_view() -> dict:
    """What a pool worker sees: its Prefect API and whether it loaded Prefect's server (to start its own)."""
    from prefect.settings import PREFECT_API_URL

    return {"pid": os.getpid(), "api": PREFECT_API_URL.value(), "own_server": "prefect.server.api.server" in sys.modules}


def test_the_pool_workers_use_the_flow_runs_ephemeral_api(monkeypatch):
    """No PREFECT_API_URL (tests/conftest.py: an ephemeral API in a throw-away Prefect home, as `dax` on one
    machine): each spawned worker used to start an API of its own, about 15 s on 2 cores (BENCHMARKS.md)."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    runner = ingest_task_runner("process", 2)
    assert isinstance(runner, SharedAPIProcessPool)

    @flow(task_runner=runner)
    def two_workers() -> tuple[str, list[dict]]:
        from prefect.context import FlowRunContext
        from prefect.settings import PREFECT_API_URL

        assert PREFECT_API_URL.value() is None                       # the flow run's own settings stay as they are
        futures = [worker_view.submit() for _ in range(2)]
        return str(FlowRunContext.get().client.api_url), [f.result() for f in futures]

    api, views = two_workers()
    assert api.startswith("http://127.0.0.1:")
    for view in views:
        assert view["api"] == api and not view["own_server"], view
        assert view["pid"] != os.getpid()
