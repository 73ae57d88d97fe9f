"""Ingestion speed and memory, each figure beside its baseline, on one synthetic corpus, in one run.

    .venv/bin/python benchmarks/ingest.py            # updates BENCHMARKS.md
    .venv/bin/python benchmarks/ingest.py --quick    # a smaller corpus, prints only

Per core (one process), on the same files:
  (a) the bound: pydicom read + pixel decode + the raw pixels written to a tar;
  (b) deid's stock loop, one file at a time, as a typical user runs it (get_identifiers +
      replace_identifiers with deid's default recipe, saving each file);
  (c) DAX's ingestion steps end to end (survey + ingest batches: triage, burned-in text check and
      cleaning, de-identification with the project recipe, normalization, shard writing).
Then (c) again on the deid plans the first (c) stored (a later run on the same home), (c) with 2 worker
processes against 1, the peak memory of (c) on the corpus and on 10x it, (a), (b) and (c) on the 10x
corpus (a fresh home meets new header structures ever more rarely), and the RLE Lossless decoders
(pylibjpeg-rle, a dependency, against pydicom's own) on the corpus' RLE files.
"""
from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from benchmarks_md import write_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DAX_DEID_SECRET", "benchmark-secret-0123456789abcdef")
from tasks.home import configure  # noqa: E402

configure(Path(tempfile.gettempdir()) / "dax-benchmark-home")  # quiet defaults: no telemetry, deid logs errors only

import pydicom  # noqa: E402

from tasks.ingest.deidentify import load_key  # noqa: E402
from tasks.ingest.steps import IngestConfig, ingest_batch, survey_batch  # noqa: E402
from tasks.ingest.survey import list_files  # noqa: E402
from tasks.ingest.triage import list_source  # noqa: E402
from tasks.synth.study import PRESETS, generate_study  # noqa: E402


def _generate(out: str, first: int, last: int) -> None:
    for index in range(first, last):
        generate_study(Path(out), 0, index, PRESETS["demo"])


def make_corpus(out: Path, studies: int) -> list[Path]:
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_generate, [str(out)] * studies, range(studies), range(1, studies + 1)))
    return [out / p for p in list_source(out)]


def bound(files: list[Path], scratch: Path) -> float:
    began = time.perf_counter()
    with tarfile.open(scratch / "bound.tar", "w") as tar:
        for i, path in enumerate(files):
            data = pydicom.dcmread(path).pixel_array.tobytes()
            info = tarfile.TarInfo(f"{i:07d}.raw")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return time.perf_counter() - began


def rle_decoders(files: list[Path]) -> tuple[int, dict[str, float]]:
    """Seconds to decode every RLE Lossless file with each plugin: (frames, {plugin: seconds})."""
    from pydicom.pixels.decoders import RLELosslessDecoder
    from pydicom.uid import RLELossless

    datasets = [ds for ds in map(pydicom.dcmread, files) if ds.file_meta.TransferSyntaxUID == RLELossless]
    frames = sum(int(ds.get("NumberOfFrames", 1) or 1) for ds in datasets)
    seconds = {}
    for plugin in ("pydicom", "pylibjpeg"):
        began = time.perf_counter()
        for ds in datasets:
            RLELosslessDecoder.as_array(ds, decoding_plugin=plugin)
        seconds[plugin] = time.perf_counter() - began
    return frames, seconds


def in_fresh_process(function, *args):
    """``function(*args)`` in a new process: deid keeps every dataset it parsed in a module cache, which
    worker processes forked later would inherit (measured: it slowed the 2-worker run by 12 %)."""
    with ProcessPoolExecutor(1) as pool:
        return pool.submit(function, *args).result()


def deid_stock(files: list[Path], scratch: Path) -> float:
    import deid.dicom.parser
    import deid.dicom.tags
    from deid.dicom import get_identifiers, replace_identifiers

    out = scratch / "deid"
    out.mkdir()
    remembered = deid.dicom.parser.get_tag
    deid.dicom.parser.get_tag = deid.dicom.tags.get_tag  # stock deid: not the lookup tasks.ingest.deid_plan remembers
    try:
        began = time.perf_counter()
        for path in files:
            ids = get_identifiers([str(path)])
            replace_identifiers(dicom_files=[str(path)], ids=ids, save=True, output_folder=str(out), overwrite=True)
        return time.perf_counter() - began
    finally:
        deid.dicom.parser.get_tag = remembered


def dax_steps(source: str, relpaths: list[str], shard_dir: str, batch: int = 32) -> tuple[float, float]:
    """Survey + ingest batches in this process; returns (seconds, peak RSS MB of this process).

    Each measured configuration starts with an empty de-identification plan store of its own (next to
    its shards), shared by its worker processes, as one `dax ingest` run on a new home would."""
    config = IngestConfig(plan_cache=str(Path(shard_dir) / "plans"))
    began = time.perf_counter()
    wanted = set(relpaths)
    listed = [item for item in list_files(Path(source), load_key()) if item.relpath in wanted]
    for i in range(0, len(listed), batch):
        surveyed = survey_batch(Path(source), listed[i: i + batch])
        ingest_batch(Path(source), Path(shard_dir), surveyed, "benchmark", config)
    return time.perf_counter() - began, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dax_in_fresh_process(source: Path, relpaths: list[str], scratch: Path, name: str,
                         plans_from: Path | None = None) -> tuple[float, float]:
    """``dax_steps`` in a new process; ``plans_from``: a plan store to start from (a home that ran before)."""
    shard_dir = scratch / name
    shard_dir.mkdir()
    if plans_from is not None:
        shutil.copytree(plans_from / "plans", shard_dir / "plans")
    return in_fresh_process(dax_steps, str(source), relpaths, str(shard_dir))


def dax_two_workers(source: Path, relpaths: list[str], scratch: Path) -> float:
    shard_dir = scratch / "two"
    shard_dir.mkdir()
    halves = [relpaths[0::2], relpaths[1::2]]
    began = time.perf_counter()
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(dax_steps, [str(source)] * 2, halves, [str(shard_dir)] * 2))
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--studies", type=int, default=None)
    args = parser.parse_args()
    studies = args.studies or (10 if args.quick else 40)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = make_corpus(tmp / "corpus", studies)
        relpaths = [p.relative_to(tmp / "corpus").as_posix() for p in files]
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        n = len(files)
        print(f"corpus: {studies} demo studies, {n} files, {megabytes:.0f} MB", flush=True)

        results = {}
        for name, run in (("a", lambda: bound(files, tmp)), ("b", lambda: in_fresh_process(deid_stock, files, tmp)),
                          ("c", lambda: dax_in_fresh_process(tmp / "corpus", relpaths, tmp, "one")[0])):
            seconds = run()
            results[name] = seconds
            print(f"({name}) {n / seconds:.1f} files/s, {megabytes / seconds:.1f} MB/s", flush=True)
        warm = dax_in_fresh_process(tmp / "corpus", relpaths, tmp, "warm", plans_from=tmp / "one")[0]
        print(f"(c) with the plans of (c): {n / warm:.1f} files/s", flush=True)
        two = dax_two_workers(tmp / "corpus", relpaths, tmp)
        print(f"(c) 2 workers: {n / two:.1f} files/s", flush=True)

        _, peak_small = dax_in_fresh_process(tmp / "corpus", relpaths, tmp, "mem1")
        big = tmp / "corpus10"
        big_files = make_corpus(big, studies * 10) if not args.quick else []
        at_scale = {}
        if big_files:
            # The bound once before (c) and once after, the faster kept: (c)'s share of it is the lower one.
            bound_before = bound(big_files, tmp)
            at_scale["c"], peak_big = dax_in_fresh_process(big, [p.relative_to(big).as_posix() for p in big_files],
                                                           tmp, "mem10")
            at_scale["a"] = min(bound_before, bound(big_files, tmp))
            (tmp / "big").mkdir()
            at_scale["b"] = in_fresh_process(deid_stock, big_files, tmp / "big")
            big_megabytes = sum(p.stat().st_size for p in big_files) / 1e6
        else:
            peak_big = float("nan")
        print(f"peak RSS: {peak_small:.0f} MB on {n} files, {peak_big:.0f} MB on {len(big_files)} files", flush=True)
        rle_frames, rle = rle_decoders(files)

    a, b, c = (n / results[k] for k in "abc")
    rows = [
        "| what (per core unless said) | files/s | MB/s | against |",
        "| --- | --- | --- | --- |",
        f"| (a) bound: pydicom read + decode + raw pixels to a tar | {a:.1f} | {a * megabytes / n:.1f} | |",
        f"| (b) deid stock `replace_identifiers` loop, one file at a time | {b:.1f} | {b * megabytes / n:.1f} | |",
        f"| (c) DAX ingestion steps end to end | {c:.1f} | {c * megabytes / n:.1f} | "
        f"{c / b:.2f}x (b) (target 3x), {c / a:.0%} of (a) (target 50 %) |",
        f"| (c) again, on the deid plans (c) stored (a home that has seen these devices) | {n / warm:.1f} | "
        f"{megabytes / warm:.1f} | {results['c'] / warm * c / b:.2f}x (b), {results['c'] / warm * c / a:.0%} of (a) |",
        f"| (c) with 2 worker processes | {n / two:.1f} | {megabytes / two:.1f} | {results['c'] / two:.2f}x one worker "
        f"(target 1.7x) |",
        f"| (c) peak memory, {n} files vs {len(big_files)} files | {peak_small:.0f} MB | {peak_big:.0f} MB | "
        f"target: flat |",
    ]
    if at_scale:
        big_n = len(big_files)
        a10, b10, c10 = (big_n / at_scale[k] for k in "abc")
        rows.append(f"| (c) on the 10x corpus ({big_n} files, a fresh home: its plans amortize) | {c10:.1f} | "
                    f"{c10 * big_megabytes / big_n:.1f} | {c10 / b10:.2f}x (b) ({b10:.1f} files/s), "
                    f"{c10 / a10:.0%} of (a) ({a10:.1f} files/s) on the same files |")
    if rle_frames:
        rows.append(f"| RLE Lossless decode, {rle_frames} frames: pylibjpeg-rle vs pydicom's own decoder | "
                    f"{rle_frames / rle['pylibjpeg']:.0f} frames/s | | {rle['pydicom'] / rle['pylibjpeg']:.1f}x "
                    f"({rle_frames / rle['pydicom']:.0f} frames/s) |")
    table = "\n".join(rows)
    print(table)
    if not args.quick:
        update_benchmarks_md(table, f"{studies} demo studies, {n} files, {megabytes:.0f} MB")


def update_benchmarks_md(table: str, corpus: str) -> None:
    write_section("ingest", "Ingestion (`benchmarks/ingest.py`)",
                  f"Measured on {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; corpus: {corpus}.\n\n{table}")


if __name__ == "__main__":
    main()
