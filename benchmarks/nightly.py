"""The nightly ingestion over an unchanged export: what a second run costs beside the first, in one run.

    .venv/bin/python benchmarks/nightly.py                 # 100 demo studies, updates BENCHMARKS.md
    .venv/bin/python benchmarks/nightly.py --studies 20    # smaller, prints only

Each run is the real `dax ingest` command in its own process, as a scheduled run starts one, all on one
Prefect home (its database made by a warm-up run that is not counted):

  start-up   `dax ingest` over an empty folder into a fresh home (process start, imports, the ephemeral
             Prefect API, an empty catalog and snapshot), median of 5;
  first      the export into a fresh home;
  second     the same export into the same home, nothing changed, median of 5.

Target (issue 19): (second - start-up) <= 5 % of (first - start-up), and the second run reads no file:
the catalog's `runs.surveyed` (files read and hashed) is 0 for it. tests/test_incremental_survey.py proves
that figure honest (bytes changed behind the survey's back, size and mtime kept, stay unnoticed).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import duckdb
from benchmarks_md import write_section
from dax_cli import dax

ROOT = Path(__file__).resolve().parents[1]
COMMAND = ".venv/bin/python benchmarks/nightly.py"


def last_run(home: Path) -> dict:
    with duckdb.connect(str(home / "catalog-snapshot.duckdb"), read_only=True) as con:
        names = ["files", "unchanged", "surveyed", "ingested", "images", "seconds"]
        row = con.execute(f"SELECT {', '.join(names)} FROM runs ORDER BY started_at DESC LIMIT 1").fetchone()
    return dict(zip(names, row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=100, help="demo studies in the export (>= 100 for the target)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of start-up and second, medians reported")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dax-nightly-") as scratch:
        tmp = Path(scratch)
        env = dict(DAX_DEID_SECRET="benchmark-secret-0123456789abcdef", PREFECT_HOME=str(tmp / "prefect"),
                   COLUMNS="200")
        began = time.perf_counter()
        dax("synth", str(tmp / "corpus"), "--studies", str(args.studies), "--preset", "demo", "--home",
            str(tmp / "synth-home"), env=env)
        export = tmp / "corpus" / "dicom"
        files = sum(1 for p in export.rglob("*") if p.is_file())
        megabytes = sum(p.stat().st_size for p in export.rglob("*") if p.is_file()) / 1e6
        print(f"export: {args.studies} demo studies, {files} files, {megabytes:.0f} MB "
              f"(made in {time.perf_counter() - began:.0f} s)", flush=True)
        empty = tmp / "empty"
        empty.mkdir()
        dax("ingest", str(empty), "--home", str(tmp / "warm-up"), env=env)          # Prefect's database, not counted

        startup = [dax("ingest", str(empty), "--home", str(tmp / f"empty-home-{i}"), env=env)
                   for i in range(args.repeat)]
        print(f"start-up: {statistics.median(startup):.1f} s", flush=True)
        home = tmp / "home"
        first = dax("ingest", str(export), "--home", str(home), env=env)
        first_run = last_run(home)
        print(f"first: {first:.1f} s, {first_run}", flush=True)
        second, second_runs = [], []
        for _ in range(args.repeat):
            second.append(dax("ingest", str(export), "--home", str(home), env=env))
            second_runs.append(last_run(home))
        print(f"second: {statistics.median(second):.1f} s, {second_runs[-1]}", flush=True)

    base = statistics.median(startup)
    share = (statistics.median(second) - base) / (first - base)
    body = statistics.median(run["seconds"] for run in second_runs) / first_run["seconds"]
    read = max(run["surveyed"] for run in second_runs)
    rows = [
        "| run | wall s (median) | flow body s (catalog) | files | unchanged (not read) | read and hashed "
        "| images added |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| start-up: empty folder, fresh home (x{args.repeat}) | {base:.1f} | | 0 | 0 | 0 | 0 |",
        f"| first: the export, fresh home | {first:.1f} | {first_run['seconds']:.1f} | {first_run['files']} | "
        f"{first_run['unchanged']} | {first_run['surveyed']} | {first_run['images']} |",
        f"| second: the same export, same home (x{args.repeat}) | {statistics.median(second):.1f} | "
        f"{statistics.median(run['seconds'] for run in second_runs):.1f} | {second_runs[-1]['files']} | "
        f"{second_runs[-1]['unchanged']} | {read} | {second_runs[-1]['images']} |",
        "",
        f"Second run, start-up subtracted from both: **{100 * share:.1f} %** of the first (target <= 5 %); the "
        f"flow bodies alone (the catalog's `runs.seconds`: listing, the catalog join, snapshot, events): "
        f"**{100 * body:.1f} %**. Files read by the second runs: **{read}** (target 0). Start-up runs: "
        f"{', '.join(f'{s:.1f}' for s in startup)} s; second runs: {', '.join(f'{s:.1f}' for s in second)} s "
        "(what is left of a second run is the process, imports and Prefect's ephemeral API: the start-up).",
    ]
    table = "\n".join(rows)
    print(table)
    if args.studies >= 100:
        update_benchmarks_md(table, f"{args.studies} demo studies, {files} files, {megabytes:.0f} MB")


def update_benchmarks_md(table: str, corpus: str) -> None:
    write_section("nightly", "Nightly ingestion over an unchanged export (`benchmarks/nightly.py`)",
                  f"Measured on {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}, with `{COMMAND}`; export: "
                  f"{corpus}.\n\n{table}")


if __name__ == "__main__":
    main()
