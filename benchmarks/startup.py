"""The `dax` command's fixed cost before any work: each figure beside its baseline, in one run.

    .venv/bin/python benchmarks/startup.py               # 5 runs of each, prints a markdown report
    .venv/bin/python benchmarks/startup.py --repeat 3 --json startup.json

Every figure is the median [min-max] over ``--repeat`` fresh processes, the variants interleaved so
that a load that comes and goes (a shared 2-core machine) falls on all of them alike:

  (a) the floor: ``python -c pass``; ``dax --version``; ``dax --help``; the modules a command's parsing
      loads (torch, mlflow, prefect: none);
  (b) ``python -X importtime``: ``import flows.cli`` (what every command pays) and ``import flows.ingest``
      (what `dax ingest` adds), split into our own modules and the third-party packages each pulled in;
  (c) ``dax catalog sql "SELECT 1"`` on a home without a snapshot (a fast command that ends in a user
      error) and (d) ``dax ingest`` of an EMPTY source into a fresh home (a throw-away secret; its Prefect
      home inside that home, as a first run has), each as now ("new") and with the CLI's error handler as
      it was ("baseline": ``user_errors`` imported every stage's error class up front, among them
      ``tasks.pretrain.main_dino``, which loads torchvision and torch._dynamo); (d) once more on the same
      home (its Prefect database made). (d) is split into python start, imports, the ephemeral Prefect
      API's start, Prefect's flow-run set-up, the flow's own body (ours) and the exit (stopping the API);
  (e) the task-runner pool's start, as ingestion meets it on its first batch: a flow on ingestion's pool
      (``flows.runners.ingest_task_runner("process", 2)``) submits one task per worker; each worker is
      spawned, loads Prefect, runs the task, which imports ``tasks.ingest.steps`` (the ingest tasks'
      module). Baseline: Prefect's plain ProcessPoolTaskRunner, as before, whose workers, handed the flow
      run's settings without an API URL, each start an ephemeral API of their own first.

The children are this script itself (``--child``), which stamps the wall clock at each phase: around
the import of ``flows.ingest`` and of Prefect's server module, ``SubprocessASGIServer.start`` and the
flow function's body (wrapped in place, nothing else changed).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
DAX = str(Path(sys.executable).with_name("dax"))
OURS = ("flows", "tasks", "dax_models", "deployments")
HEAVY = ("torch", "torchvision", "mlflow", "prefect", "numpy", "pydicom", "duckdb")
THROWAWAY_SECRET = "0f" * 32           # benchmark runs only: synthetic nothing, an empty source
# the CLI's error handler as it was before this benchmark (flows/cli.py at 7425d65)
BASELINE_ERROR_MODULES = ("tasks.ingest.catalog", "tasks.ingest.deidentify", "tasks.ingest.labels",
                          "tasks.pretrain.main_dino", "tasks.release.predict", "tasks.synth.corpus")


# --- the children ----------------------------------------------------------------------------------------

STAMPS: list[tuple[str, float]] = []


def stamp(name: str) -> None:
    STAMPS.append((name, time.time()))


def _baseline_user_errors():
    """``flows.cli.user_errors`` as it was: every stage's error class imported before the command's work."""
    from contextlib import contextmanager
    from importlib import import_module

    import typer

    from flows.cli import USER_ERRORS, console

    @contextmanager
    def user_errors():
        stamp("error handler entered")
        types = tuple(getattr(import_module(m), USER_ERRORS[m]) for m in BASELINE_ERROR_MODULES)
        stamp("error classes imported")
        try:
            yield
        except (*types, NotADirectoryError, FileNotFoundError) as error:
            console.print(f"[red]error:[/] {error}", highlight=False)
            raise typer.Exit(2) from None
    return user_errors


def _stamped_user_errors(original):
    from contextlib import contextmanager

    @contextmanager
    def user_errors():
        stamp("error handler entered")
        stamp("error classes imported")
        with original():
            yield
    return user_errors


class _ImportStamps:
    """A meta-path finder that stamps the end of chosen imports and then calls a hook on the module."""

    def __init__(self, hooks: dict):
        self.hooks = hooks

    def find_spec(self, name, path=None, target=None):
        if name not in self.hooks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        exec_module, hook = spec.loader.exec_module, self.hooks.pop(name)

        def stamped(module):
            stamp(f"import {name} begins")
            exec_module(module)
            stamp(f"import {name} ends")
            hook(module)
        spec.loader.exec_module = stamped
        return spec


def _wrap_flow_body(module) -> None:
    import functools

    flow = module.ingest
    body = flow.fn

    @functools.wraps(body)
    def stamped(*args, **kwargs):
        stamp("flow body begins")
        try:
            return body(*args, **kwargs)
        finally:
            stamp("flow body ends")
    flow.fn = stamped


def _wrap_server_start(module) -> None:
    server = module.SubprocessASGIServer
    start = server.start

    def stamped(self, *args, **kwargs):
        begun = not self.running
        if begun:
            stamp("API start begins")
        try:
            return start(self, *args, **kwargs)
        finally:
            if begun:
                stamp("API start ends")
    server.start = stamped


def child_cli(variant: str, args: list[str], stamps_path: Path) -> int:
    """Run ``dax ARGS`` in this process, as the `dax` script does, with the phases stamped."""
    stamp("python started")
    sys.meta_path.insert(0, _ImportStamps({"flows.ingest": _wrap_flow_body,
                                           "prefect.server.api.server": _wrap_server_start}))
    import flows.cli
    stamp("flows.cli imported")
    flows.cli.user_errors = (_baseline_user_errors() if variant == "baseline"
                             else _stamped_user_errors(flows.cli.user_errors))
    try:
        code = flows.cli.app(args=args, prog_name="dax", standalone_mode=False) or 0
    except SystemExit as exit_:
        code = exit_.code or 0
    stamp("command returned")
    stamps_path.write_text(json.dumps(STAMPS))
    return int(code)


def _worker_started() -> None:
    """The pool's initializer, in each worker after Prefect's own: stamps it and Prefect's API start there."""
    stamp("worker initialized")
    sys.meta_path.insert(0, _ImportStamps({"prefect.server.api.server": _wrap_server_start}))


def _first_import_in_worker() -> dict:
    """A pool task: the worker's stamps so far, then what importing the ingest tasks' module costs in a
    fresh worker (the real ingest tasks live there, so the pool's workers load it first)."""
    worker = sys.modules["__main__"]       # this function travels by value: the worker's own module stamps
    worker.stamp("task body begins")
    import tasks.ingest.steps  # noqa: F401
    worker.stamp("tasks.ingest.steps imported")
    return {"pid": os.getpid(), "stamps": worker.STAMPS}


def child_pool(variant: str, home: Path, stamps_path: Path) -> int:
    """A flow that submits one task per worker of ingestion's pool (``flows.runners``; "baseline": Prefect's
    plain ProcessPoolTaskRunner, whose workers each start an ephemeral API of their own), stamped."""
    stamp("python started")
    from tasks.home import configure

    configure(home)
    sys.meta_path.insert(0, _ImportStamps({"prefect.server.api.server": _wrap_server_start}))
    from prefect import flow, task
    from prefect.task_runners import ProcessPoolTaskRunner

    from flows.runners import ingest_task_runner
    stamp("prefect imported")
    kind = ProcessPoolTaskRunner if variant == "baseline" else type(ingest_task_runner("process", 2))
    runner = kind(max_workers=2, initializer=_worker_started)       # as ingest_task_runner makes it, stamped
    first_import = task(_first_import_in_worker)

    @flow(name="startup-benchmark-pool", task_runner=runner)
    def pool_start() -> list[dict]:
        stamp("flow body begins")
        futures = [first_import.submit() for _ in range(2)]
        results = [f.result() for f in futures]
        stamp("pool tasks done")
        return results

    workers = pool_start()
    stamp("command returned")
    stamps_path.write_text(json.dumps({"stamps": STAMPS, "workers": workers}))
    return 0


# --- the parent: runs, phases, summaries --------------------------------------------------------------------

def child_env(**extra: str) -> dict:
    """The environment of a run: no telemetry; Prefect state and MLflow inside the run's own home."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "DAX_HOME", "DAX_DEID_SECRET")}
    env.update(DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true",
               HF_HUB_OFFLINE="1", COLUMNS="200", **extra)
    return env


def timed(cmd: list[str], env: dict, cwd: Path | None = None) -> tuple[float, float, subprocess.CompletedProcess]:
    began = time.time()
    done = subprocess.run(cmd, check=False, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    return began, time.time(), done


def run_cli(variant: str, args: list[str], scratch: Path, expect: int = 0, **env: str) -> dict:
    """One `dax ARGS` child; returns its phases in seconds."""
    stamps_path = scratch / f"stamps-{time.time_ns()}.json"
    began, ended, done = timed([PYTHON, __file__, "--child", "cli", "--variant", variant, "--stamps",
                                str(stamps_path), "--", *args], child_env(**env))
    if done.returncode != expect:
        raise RuntimeError(f"dax {' '.join(args)} ({variant}) exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    at = {}
    for name, t in json.loads(stamps_path.read_text()):
        at.setdefault(name, t)
    return phases(began, ended, at)


# the phase that each stamp ends, in the order they come
PHASES = {
    "python started": "python start",
    "flows.cli imported": "import flows.cli (typer, rich)",
    "import flows.ingest begins": "parsing, configure",
    "import flows.ingest ends": "import flows.ingest (Prefect, torch via webdataset, pydicom, deid...)",
    "error handler entered": "the command's other imports",
    "error classes imported": "the CLI's error handler: stage error classes",
    "import prefect.server.api.server begins": "Prefect: flow set-up before its client",
    "import prefect.server.api.server ends": "Prefect: import of its server module",
    "API start begins": "Prefect: client set-up",
    "API start ends": "Prefect: ephemeral API start (server process, new database, health wait)",
    "flow body begins": "Prefect: flow run set-up",
    "flow body ends": "ours: the ingest flow's body (empty source)",
    "command returned": "Prefect: flow run end; the CLI's summary",
}


def phases(began: float, ended: float, at: dict) -> dict:
    """Consecutive phases between the stamps there are, then the exit (Prefect stops its API at exit)."""
    out, last = {}, began
    for name, t in sorted(at.items(), key=lambda item: item[1]):
        out[PHASES[name]] = t - last
        last = t
    out["exit (Prefect stops the API)"] = ended - last
    out["total"] = ended - began
    return out


def run_pool(variant: str, scratch: Path) -> dict:
    home = scratch / f"pool-home-{time.time_ns()}"
    stamps_path = scratch / f"pool-{time.time_ns()}.json"
    began, ended, done = timed([PYTHON, __file__, "--child", "pool", "--variant", variant, "--home", str(home),
                                "--stamps", str(stamps_path)], child_env(DAX_DEID_SECRET=THROWAWAY_SECRET))
    if done.returncode:
        raise RuntimeError(f"pool child ({variant}) exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    record = json.loads(stamps_path.read_text())
    at = dict(record["stamps"])
    workers = [dict(w["stamps"]) for w in record["workers"]]
    shutil.rmtree(home, ignore_errors=True)

    def per_worker(first: str, last: str) -> float:
        return statistics.median(w[last] - (at[first] if first in at else w[first]) for w in workers)
    out = {"flow body begins -> a worker's process has started (spawn, Prefect)":
               per_worker("flow body begins", "worker initialized"),
           "-> its task begins (baseline: its own ephemeral API first)": per_worker("worker initialized",
                                                                                    "task body begins"),
           "-> tasks.ingest.steps imported in it (ours, with torch via webdataset)":
               per_worker("task body begins", "tasks.ingest.steps imported"),
           "pool: flow body begins -> both tasks done": at["pool tasks done"] - at["flow body begins"],
           "API servers started (parent + workers)": 1.0 + sum("API start begins" in w for w in workers),
           "total (process)": ended - began}
    return out


IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$")


def import_tree(statement: str) -> tuple[float, dict, dict]:
    """``python -X importtime -c STATEMENT``: total seconds, our modules' own time, and the third-party
    packages' cumulative time by (package, the module of ours, or 'python', that imported it)."""
    done = subprocess.run([PYTHON, "-X", "importtime", "-c", statement], check=False, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    rows = []
    for line in done.stderr.splitlines():
        match = IMPORT_LINE.match(line)
        if match:
            rows.append((int(match[1]), int(match[2]), len(match[3]) // 2, match[4]))
    parents = [None] * len(rows)
    for i, (_, _, level, _) in enumerate(rows):      # a module's line comes after its children's
        for j in range(i + 1, len(rows)):
            if rows[j][2] < level:
                parents[i] = j
                break

    def ours(name: str) -> bool:
        return name.split(".")[0] in OURS

    own: dict[str, float] = defaultdict(float)
    third: dict[tuple[str, str], float] = defaultdict(float)
    for i, (self_us, cumulative_us, _, name) in enumerate(rows):
        if ours(name):
            own[name] += self_us / 1e6
            continue
        parent = parents[i]
        if parent is not None and not ours(rows[parent][3]):
            continue                                    # counted in its third-party parent
        third[(name.split(".")[0], rows[parent][3] if parent is not None else "python")] += cumulative_us / 1e6
    total = sum(r[1] for i, r in enumerate(rows) if parents[i] is None) / 1e6
    return total, dict(own), dict(third)


def modules_loaded(args: list[str]) -> list[str]:
    code = ("import sys\nfrom flows.cli import app\ntry:\n    app(args=sys.argv[1:], prog_name='dax')\n"
            "except SystemExit:\n    pass\n"
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)")
    done = subprocess.run([PYTHON, "-c", code, *args], check=False, env=child_env(), capture_output=True, text=True,
                          timeout=120)
    return done.stderr.strip().splitlines()[-1].split() if done.stderr.strip() else []


def summary(values: list[float], unit: str = " s") -> str:
    if not unit:
        return f"{statistics.median(values):g} [{min(values):g}-{max(values):g}]"
    return f"{statistics.median(values):.2f}{unit} [{min(values):.2f}-{max(values):.2f}]"


def table(title: str, columns: dict[str, list[dict]]) -> str:
    labels: list[str] = []
    for runs in columns.values():
        for run in runs:
            labels.extend(k for k in run if k not in labels)
    lines = [f"| {title} | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for label in labels:
        cells = []
        for runs in columns.values():
            values = [run[label] for run in runs if label in run]
            cells.append(summary(values, "" if label.startswith("API servers") else " s") if values else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="Runs of each measurement.")
    parser.add_argument("--json", type=Path, help="Also write every run's figures here.")
    parser.add_argument("--child", choices=["cli", "pool"], help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="new", help=argparse.SUPPRESS)
    parser.add_argument("--stamps", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child == "cli":
        sys.exit(child_cli(options.variant, options.args, options.stamps))
    if options.child == "pool":
        sys.exit(child_pool(options.variant, options.home, options.stamps))

    scratch = Path(tempfile.mkdtemp(prefix="dax-startup-"))
    source = scratch / "empty-source"
    source.mkdir()
    runs: dict[str, list] = defaultdict(list)
    imports: dict[str, list] = defaultdict(list)
    began = time.time()
    try:
        for i in range(options.repeat):
            for name, cmd in (("python -c pass", [PYTHON, "-c", "pass"]), ("dax --version", [DAX, "--version"]),
                              ("dax --help", [DAX, "--help"]), ("dax ingest --help", [DAX, "ingest", "--help"])):
                start, end, done = timed(cmd, child_env())
                assert done.returncode == 0, done.stderr
                runs[name].append({"total": end - start})
            for statement in ("import flows.cli", "import flows.ingest"):
                imports[statement].append(import_tree(statement))
            for variant in ("new", "baseline") if i % 2 == 0 else ("baseline", "new"):
                runs[f"catalog {variant}"].append(run_cli(variant, ["catalog", "sql", "SELECT 1", "--home",
                                                                    str(scratch / "no-snapshot")], scratch, expect=2))
                home = scratch / f"home-{variant}-{i}"
                runs[f"ingest {variant}"].append(run_cli(variant, ["ingest", str(source), "--home", str(home)],
                                                         scratch, DAX_DEID_SECRET=THROWAWAY_SECRET))
                if variant == "new":           # the same home again: its Prefect database exists now
                    runs["ingest again"].append(run_cli(variant, ["ingest", str(source), "--home", str(home)],
                                                        scratch, DAX_DEID_SECRET=THROWAWAY_SECRET))
                shutil.rmtree(home, ignore_errors=True)
            for variant in ("new", "baseline") if i % 2 == 0 else ("baseline", "new"):
                runs[f"pool {variant}"].append(run_pool(variant, scratch))
            print(f"run {i + 1} of {options.repeat} done ({time.time() - began:.0f} s)", file=sys.stderr)
        loaded = {" ".join(args): modules_loaded(args) for args in (["--help"], ["--version"], ["ingest", "--help"],
                                                                    ["predict", "--help"])}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"# `dax` start-up, {options.repeat} runs each, median [min-max] "
          f"({os.cpu_count()} CPUs, load average at the end {os.getloadavg()[0]:.2f})\n")
    print(table("command (wall, fresh process)", {name: runs[name] for name in
                                                  ("python -c pass", "dax --version", "dax --help",
                                                   "dax ingest --help")}))
    print("\nHeavy modules loaded by parsing alone: "
          + "; ".join(f"`dax {args}`: {', '.join(mods) or 'none'}" for args, mods in loaded.items()))
    for statement, trees in imports.items():
        totals = [t[0] for t in trees]
        own_total = [sum(t[1].values()) for t in trees]
        print(f"\n`python -X importtime -c \"{statement}\"`: {summary(totals)} in all; our modules' own time "
              f"{summary(own_total)}. Third-party packages by what of ours imported them (median s):\n")
        keys = sorted({k for t in trees for k in t[2]}, key=lambda k: -statistics.median(t[2].get(k, 0) for t in trees))
        print("| package | imported by | s |\n| --- | --- | --- |")
        for package, importer in keys[:10]:
            print(f"| {package} | {importer} | {statistics.median(t[2].get((package, importer), 0) for t in trees):.2f} |")
    print("\n" + table("`dax catalog sql \"SELECT 1\"` (no snapshot: a user error)",
                       {"new": runs["catalog new"], "baseline": runs["catalog baseline"]}))
    print("\n" + table("`dax ingest EMPTY --home FRESH`", {"new": runs["ingest new"],
                                                          "baseline": runs["ingest baseline"],
                                                          "new, the same home again": runs["ingest again"]}))
    print("\n" + table("ingestion's task-runner pool start (2 process workers, fresh home)",
                       {"new": runs["pool new"], "baseline": runs["pool baseline"]}))
    if options.json:
        options.json.write_text(json.dumps({"runs": runs, "loaded": loaded,
                                            "imports": {k: [[t[0], t[1], {f"{a} <- {b}": v for (a, b), v in t[2].items()}]
                                                            for t in v] for k, v in imports.items()}}, indent=1))


if __name__ == "__main__":
    main()
