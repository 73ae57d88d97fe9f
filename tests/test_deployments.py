"""prefect.yaml against a real Prefect server, as an operator deploys it, with nothing edited in the file.

No mocks: `prefect server start` in a subprocess (its own PREFECT_HOME, SQLite), the CLI of the venv
(`deployments/work_pools.sh`, `dax connect`, `prefect deploy --all`, `prefect deployment run`, `prefect
worker start --run-once`) and Prefect's client for what the server holds (deployments, automations, flow
runs, events). The workers start in another folder, so the pull step (`set_working_directory` to
$DAX_CODE_DIR) is what makes the entrypoints found, and take the home from $DAX_HOME as shipped.

The story: the nightly deployment ingests a generated export (with two bad files: the quarantine alert
reaches a webhook); its ready-for-retraining event starts the retrain deployment, which pretrains and
registers a backbone; a second nightly run adds nothing and reads no file (their bytes were changed
behind its back, size and mtime kept: a run that read them would quarantine them).
"""
from __future__ import annotations

import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar
from uuid import UUID, uuid4

import pytest
import yaml
from conftest import TINY_DINO

from tasks.ingest.events import INGEST_COMPLETED, QUARANTINE_ALERT, READY_FOR_RETRAINING
from tests.prefect_home import prefect_home

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect")
DAX = str(BIN / "dax")
SECRET = "deployments-test-secret-0123456789"
# deployment -> (flow name, entrypoint, work pool)
EXPECTED = {
    "ingest-nightly": ("ingest", "flows/ingest.py:nightly", "dax-cpu"),
    "retrain": ("retrain", "flows/pipeline.py:retrain", "dax-gpu"),
    "retrain-resnet50": ("retrain", "flows/pipeline.py:retrain", "dax-gpu"),
    "heads": ("heads", "flows/heads.py:heads", "dax-cpu"),
    "pipeline": ("pipeline", "flows/pipeline.py:pipeline", "dax-cpu"),
}


def _spec() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


# --- the file itself (fast) ---------------------------------------------------------------------
def test_prefect_yaml_declares_the_deployments_without_placeholders():
    spec = _spec()
    assert spec["name"] == "dax" and spec["prefect-version"] == "3.8.8"
    assert not spec.get("build") and not spec.get("push")
    assert spec["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $DAX_CODE_DIR }}"}}]
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == set(EXPECTED)
    for name, (_, entrypoint, pool) in EXPECTED.items():
        deployment = deployments[name]
        assert deployment["entrypoint"] == entrypoint
        assert deployment["work_pool"]["name"] == pool
        assert deployment["parameters"]["home"] is None                     # the worker's $DAX_HOME
        # no made-up path a run would fail on: sources come from the Variable `dax connect` sets
        assert "/srv" not in json.dumps(deployment["parameters"]), name
    assert deployments["ingest-nightly"]["parameters"]["source"] == "{{ prefect.variables.dax_ingest_source }}"
    assert deployments["ingest-nightly"]["schedules"] == [{"cron": "0 2 * * *", "timezone": "UTC", "active": True}]
    assert deployments["ingest-nightly"]["work_pool"]["job_variables"]["env"]["DAX_INGEST_RUNNER"] == "process"
    # one config per retrain run, labels optional (no placeholder)
    for name in ("retrain", "retrain-resnet50"):
        assert len(deployments[name]["parameters"]["configs"]) == 1 and deployments[name]["parameters"]["labels"] is None
        [trigger] = deployments[name]["triggers"]
        assert trigger["expect"] == [READY_FOR_RETRAINING] and trigger["posture"] == "Reactive"
        assert trigger["match"] == {"prefect.resource.id": "dax.home.{{ prefect.variables.dax_home_id }}"}
    # the secret is never part of a deployment (the server stores job variables in clear)
    assert "DAX_DEID_SECRET" not in json.dumps(spec["deployments"])

    # the nightly entry point retries; the interactive `dax ingest` flow does not
    from prefect.flows import load_flow_from_entrypoint

    nightly = load_flow_from_entrypoint(str(REPO / "flows/ingest.py") + ":nightly")
    assert nightly.name == "ingest" and nightly.retries == 2 and nightly.retry_delay_seconds > 0

    # the trigger is valid for Prefect's own schema (what `prefect deploy` builds the automation from)
    from prefect.cli.deploy._triggers import _initialize_deployment_triggers

    [built] = _initialize_deployment_triggers("retrain", [dict(deployments["retrain"]["triggers"][0])])
    built.set_deployment_id(uuid4())
    automation = built.as_automation()
    assert automation.trigger.expect == {READY_FOR_RETRAINING} and automation.trigger.threshold == 1
    assert [action.type for action in automation.actions] == ["run-deployment"]


# --- a real server ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`prefect server start` on a free port with a throw-away PREFECT_HOME; stopped after the module."""
    tmp = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "DAX_", "MLFLOW_TRACKING"))}
    quiet = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "COLUMNS": "200"}
    server_env = base | quiet | {"PREFECT_HOME": prefect_home(tmp / "server-home")}
    log = open(tmp / "server.log", "w")
    process = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                               env=server_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the Prefect server did not start:\n{(tmp / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        # the CLI (and workers) talk to that server; their own PREFECT_HOME is another throw-away folder
        cli_env = base | quiet | {"PREFECT_HOME": str(tmp / "cli-home"), "PREFECT_API_URL": url,
                                  "PREFECT": PREFECT, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        yield SimpleNamespace(url=url, env=cli_env, tmp=tmp)
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)   # the group this fixture started: the server and its children
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        except ProcessLookupError:
            pass
        log.close()


def _run(server, *args: str, cwd: Path = REPO, timeout: float = 120, env: dict | None = None):
    done = subprocess.run(list(args), cwd=cwd, env=env or server.env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args[:4])} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


class _Client:
    """Prefect's sync client, pointed at the test server for the duration of a `with`."""

    def __init__(self, url: str):
        self.url = url

    def __enter__(self):
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        self._settings = temporary_settings({PREFECT_API_URL: self.url})
        self._settings.__enter__()
        self._client = get_client(sync_client=True)
        return self._client.__enter__()

    def __exit__(self, *exc):
        try:
            self._client.__exit__(*exc)
        finally:
            self._settings.__exit__(*exc)


class _Webhook(http.server.BaseHTTPRequestHandler):
    """Collects what Prefect's notification block posts (the operator's Slack, Teams or pager)."""

    received: ClassVar[list[dict]] = []

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        _Webhook.received.append(json.loads(self.rfile.read(length) or b"{}"))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def webhook():
    listener = http.server.HTTPServer(("127.0.0.1", 0), _Webhook)
    thread = threading.Thread(target=listener.serve_forever, daemon=True)
    thread.start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{listener.server_address[1]}/", received=_Webhook.received)
    listener.shutdown()


@pytest.fixture(scope="module")
def deployed(server, webhook):
    """What deployments/README.md tells an operator to do: the pools, a notification block, `dax connect`
    (home id, export folder, quarantine alert), then `prefect --no-prompt deploy --all` from the repository root."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    home, source = server.tmp / "home", server.tmp / "export"
    _run(server, "bash", str(REPO / "deployments" / "work_pools.sh"), timeout=60)
    with _Client(server.url):
        CustomWebhookNotificationBlock(name="dax-alerts", url=webhook.url, allow_private_urls=True,
                                       json_data={"subject": "{{subject}}", "body": "{{body}}"}).save("dax-alerts")
    connected = _run(server, DAX, "connect", "--home", str(home), "--source", str(source),
                     "--notify", "custom-webhook/dax-alerts", timeout=120).stdout
    done = _run(server, PREFECT, "--no-prompt", "deploy", "--all", timeout=300)
    return SimpleNamespace(home=home, source=source, home_id=(home / "home-id").read_text().strip(),
                           output=done.stdout, connected=connected)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_deploy_all_registers_pools_schedule_triggers_and_alert(server, deployed):
    listing = _run(server, PREFECT, "deployment", "ls", timeout=60).stdout
    pools = _run(server, PREFECT, "work-pool", "ls", timeout=60).stdout
    assert "dax-cpu" in pools and "dax-gpu" in pools
    assert deployed.home_id in deployed.connected
    missing = subprocess.run([DAX, "connect", "--home", str(deployed.home), "--notify", "custom-webhook/nobody"],
                             env=server.env, capture_output=True, text=True, timeout=120, check=False)
    assert missing.returncode == 2 and "no notification block 'custom-webhook/nobody'" in missing.stdout
    assert "Traceback" not in missing.stdout + missing.stderr
    with _Client(server.url) as client:
        found = {d.name: d for d in client.read_deployments()}
        pools = {name: client.read_work_pool(name) for name in ("dax-cpu", "dax-gpu")}
        automations = client.read_automations()
    assert {name: pool.type for name, pool in pools.items()} == {"dax-cpu": "process", "dax-gpu": "process"}
    assert pools["dax-gpu"].concurrency_limit == 1
    assert set(found) == set(EXPECTED)
    for name, deployment in found.items():
        flow_name, _, pool = EXPECTED[name]
        assert deployment.work_pool_name == pool, name
        assert f"{flow_name}/{name}" in listing
        assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                          {"directory": "{{ $DAX_CODE_DIR }}"}}]  # resolved on the worker

    nightly = found["ingest-nightly"]
    [schedule] = nightly.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 2 * * *", "UTC", True)
    assert nightly.parameters["source"] == str(deployed.source)             # from the Variable, at deploy time
    assert nightly.job_variables["env"]["DAX_INGEST_RUNNER"] == "process"
    assert nightly.global_concurrency_limit.limit == 1

    retrains = [a for a in automations if READY_FOR_RETRAINING in (a.trigger.expect or set())]
    assert sorted(a.actions[0].deployment_id for a in retrains) == sorted(found[n].id for n in ("retrain",
                                                                                                 "retrain-resnet50"))
    for automation in retrains:
        assert automation.enabled and automation.trigger.posture == "Reactive" and automation.trigger.threshold == 1
        # this home's events only: a staging home on the same server never starts these
        assert automation.trigger.match.root == {"prefect.resource.id": f"dax.home.{deployed.home_id}"}
    [alert] = [a for a in automations if QUARANTINE_ALERT in (a.trigger.expect or set())]
    assert alert.trigger.match.root == {"prefect.resource.id": f"dax.home.{deployed.home_id}"}
    assert [action.type for action in alert.actions] == ["send-notification"]


def _worker(server, pool: str, cwd: Path, timeout: float = 300) -> str:
    """One `prefect worker start --run-once` on ``pool``, in another folder, with the operator's worker env."""
    env = server.env | {"DAX_CODE_DIR": str(REPO), "DAX_DEID_SECRET": SECRET, "DAX_HOME": str(server.tmp / "home"),
                        "PREFECT_HOME": str(cwd / f"worker-{pool}")}
    worker = subprocess.run([PREFECT, "worker", "start", "--pool", pool, "--run-once"], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    log = re.sub(r"(?m)^.*(nanobind|leaked).*\n", "", worker.stdout + worker.stderr)[-6000:]
    assert worker.returncode == 0, log
    return log


def _nightly(server, *params: str) -> UUID:
    started = _run(server, PREFECT, "deployment", "run", "ingest/ingest-nightly", *params, timeout=60).stdout
    return UUID(re.search(r"UUID: ([0-9a-f-]{36})", started).group(1))


def _poll(fetch, done, seconds: float = 90, every: float = 1.0):
    deadline, value = time.monotonic() + seconds, None
    while time.monotonic() < deadline:
        value = fetch()
        if done(value):
            return value
        time.sleep(every)
    return value


def _registrations(server, registry, model: str, worker_log: str) -> str:
    """What registered ``model`` and which flow runs ran, for a failure message."""
    with _Client(server.url) as client:
        runs = sorted(client.read_flow_runs(), key=lambda r: r.created)
        flows = {f.id: f.name for f in client.read_flows()}
        deployments = {d.id: d.name for d in client.read_deployments()}
    lines = [f"flow run {flows.get(r.flow_id)}/{deployments.get(r.deployment_id)} {r.name}: {r.state_name}, "
             f"created {r.created:%H:%M:%S}, run count {r.run_count}" for r in runs]
    lines += [f"{model} v{v.version}: mlflow run {v.run_id}, tags {v.tags}"
              for v in registry.search_model_versions(f"name='{model}'")]
    return "\n".join(lines) + "\n" + worker_log


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_nightly_ingests_alerts_triggers_retrain_and_a_second_night_reads_nothing(server, deployed, webhook,
                                                                                   tmp_path):
    from mlflow.tracking import MlflowClient
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.events.filters import EventFilter, EventNameFilter

    from tasks.ingest.catalog import open_snapshot
    from tasks.release.registry import tracking_uri
    from tasks.synth.study import PRESETS, generate_study

    source, home = deployed.source, deployed.home
    images = sum(len(generate_study(source, 21, index, PRESETS["test"])[0]) for index in range(3))
    bad = source / "DOE_JANE_0042"
    bad.mkdir()
    (bad / "notes.txt").write_text("Patient DOE^JANE called\n")
    (bad / "empty.dcm").write_bytes(b"")
    files = sorted(p for p in source.rglob("*") if p.is_file())

    # the operator's choice for this CPU-only test machine: a tiny pretraining (as in the UI's parameters)
    with _Client(server.url) as client:
        retrain = {d.name: d for d in client.read_deployments()}["retrain"]
        client.update_deployment(retrain.id, DeploymentUpdate(parameters={
            **retrain.parameters, "configs": ["demo-cpu"], "device": "cpu", "overrides": TINY_DINO}))

    first = _nightly(server, "--param", "max_size=128", "--param", "retrain_after_images=1")
    worker_log = _worker(server, "dax-cpu", tmp_path)
    with _Client(server.url) as client:
        run = client.read_flow_run(first)
        assert run.state.is_completed(), f"{run.state}\n{worker_log}"
        found = {d.name: d for d in client.read_deployments()}

        # what the flow emitted, as the server recorded it (events are persisted in batches: poll)
        wanted = {INGEST_COMPLETED, READY_FOR_RETRAINING, QUARANTINE_ALERT}
        events = _poll(lambda: client.read_events(EventFilter(event=EventNameFilter(name=sorted(wanted))),
                                                  limit=50).events,
                       lambda page: wanted <= {e.event for e in page})
        by_name = {e.event: e for e in events}
        assert wanted <= set(by_name), f"events seen: {sorted(by_name)}"
        payload = by_name[INGEST_COMPLETED].payload
        assert payload["images_added"] == images and payload["catalog_images"] == images
        assert {e.resource.id for e in events} == {f"dax.home.{deployed.home_id}"}
        assert by_name[QUARANTINE_ALERT].payload["quarantined"] == 2
        dumped = json.dumps([e.model_dump(mode="json") for e in events])
        assert str(server.tmp) not in dumped and "DOE" not in dumped                  # no paths, no names

        # the retrain deployments' automations react with flow runs on dax-gpu
        triggered = {}
        for name in ("retrain", "retrain-resnet50"):
            wanted_id = found[name].id
            triggered[name] = _poll(lambda wanted_id=wanted_id: client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[wanted_id]))), bool)
            assert len(triggered[name]) == 1, f"the ready-for-retraining event did not start {name}"
        # resnet50's run is not for this CPU test: cancel it (an operator would let a GPU worker take it)
        from prefect.states import Cancelled
        client.set_flow_run_state(triggered["retrain-resnet50"][0].id, Cancelled(), force=True)

    # the quarantine alert reaches the operator's webhook (the server's automation sends it)
    received = _poll(lambda: list(webhook.received), bool, seconds=90)
    assert received, "no quarantine notification arrived"
    assert "quarantined 2 of the" in received[0]["body"] and "not a DICOM file" in received[0]["body"]
    assert str(server.tmp) not in json.dumps(received) and "DOE" not in json.dumps(received)

    # a GPU-pool worker takes the triggered retrain, which pretrains on the catalog and registers a backbone
    worker_log = _worker(server, "dax-gpu", tmp_path, timeout=600)
    with _Client(server.url) as client:
        run = client.read_flow_run(triggered["retrain"][0].id)
        assert run.state.is_completed(), f"{run.state}\n{worker_log}"
    registry = MlflowClient(tracking_uri(home), registry_uri=tracking_uri(home))
    version = registry.get_model_version_by_alias("dax-backbone-vit_tiny_patch16", "candidate")
    assert int(version.version) == 1, _registrations(server, registry, "dax-backbone-vit_tiny_patch16", worker_log)

    # night two: every file's bytes changed behind the survey's back (size and mtime kept)
    for path in files:
        stat = path.stat()
        path.write_bytes(b"\0" * stat.st_size)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = _nightly(server, "--param", "max_size=128", "--param", "retrain_after_images=1")
    worker_log = _worker(server, "dax-cpu", tmp_path)
    with _Client(server.url) as client:
        assert client.read_flow_run(second).state.is_completed(), worker_log
    con = open_snapshot(home)
    try:
        assert con.execute("SELECT count(*) FROM images").fetchone()[0] == images
        runs = con.execute("SELECT files, unchanged, surveyed, ingested, quarantined FROM runs "
                           "ORDER BY started_at").fetchall()
    finally:
        con.close()
    assert runs[0][:3] == (len(files), 0, len(files)) and runs[0][3] > 0 and runs[0][4] == 2
    assert runs[1] == (len(files), len(files), 0, 0, 0)          # nothing read, nothing new, nothing quarantined
