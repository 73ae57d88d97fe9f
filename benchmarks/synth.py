"""Synthetic-corpus generation speed, each figure beside its baseline, in one run.

    .venv/bin/python benchmarks/synth.py              # all sections, updates BENCHMARKS.md
    .venv/bin/python benchmarks/synth.py --quick      # fewer studies, prints only

1. render: one projection with bounding-box culling vs brute force (every primitive over every ray),
   the same phantoms, poses and detectors (identical images; see tests/test_synth_physics.py);
2. per core: studies generated end to end (render, encode, write DICOM, hash, labels) in one process,
   images/s and MB/s, demo and full presets, with peak memory;
3. two worker processes vs one on the same studies;
4. the demo corpus through `dax synth` (Prefect flow, 2 workers), against the 3-minute target.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from benchmarks_md import write_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.label_schema import BODY_REGIONS  # noqa: E402
from tasks.synth.anatomy import build_phantom  # noqa: E402
from tasks.synth.corpus import batch_ranges, synthesize_batch  # noqa: E402
from tasks.synth.devices import DEVICE_MODELS  # noqa: E402
from tasks.synth.geometry import random_pose  # noqa: E402
from tasks.synth.implants import place_implants  # noqa: E402
from tasks.synth.render import render  # noqa: E402
from tasks.synth.study import PRESETS  # noqa: E402


def bench_render(scale: float, repeats: int) -> dict:
    """Mean ms per projection, culled vs brute force, over all regions on a flat-panel detector."""
    detector = next(d.detector for d in DEVICE_MODELS if d.detector.kind == "flat_panel").scaled(scale)
    cases = []
    for i, region in enumerate(BODY_REGIONS):
        rng = np.random.default_rng(i)
        phantom = build_phantom(region, rng)
        cases.append((phantom, place_implants(phantom, rng), random_pose(phantom, detector, rng)))
    timings = {}
    for cull in (True, False):
        began = time.perf_counter()
        for _ in range(repeats):
            for phantom, implants, pose in cases:
                render(phantom, implants, pose, detector, np.random.default_rng(0), 1000.0, cull=cull)
        timings[cull] = (time.perf_counter() - began) / (repeats * len(cases)) * 1000
    return {"detector": f"{detector.rows}x{detector.cols}", "culled_ms": timings[True],
            "brute_ms": timings[False], "speedup": timings[False] / timings[True]}


def _generate(out: str, preset: str, first: int, last: int) -> tuple[int, int, float, float]:
    config = PRESETS[preset]
    began = time.perf_counter()
    result = synthesize_batch(Path(out), 0, first, last, config)
    seconds = time.perf_counter() - began
    size = sum(p.stat().st_size for p in Path(out, "dicom").rglob("*.dcm"))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result.images, size, seconds, peak_mb


def bench_per_core(preset: str, studies: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, ".parts").mkdir()
        with ProcessPoolExecutor(1) as pool:  # a fresh process: its peak memory is this run's alone
            images, size, seconds, peak = pool.submit(_generate, tmp, preset, 0, studies).result()
    return {"preset": preset, "studies": studies, "images": images, "seconds": seconds,
            "images_per_s": images / seconds, "mb_per_s": size / 1e6 / seconds, "peak_mb": peak}


def bench_workers(preset: str, studies: int) -> dict:
    results = {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, ".parts").mkdir()
            began = time.perf_counter()
            with ProcessPoolExecutor(workers) as pool:
                futures = [pool.submit(_generate, tmp, preset, a, b) for a, b in batch_ranges(0, studies, 2)]
                images = sum(f.result()[0] for f in futures)
            results[workers] = images / (time.perf_counter() - began)
    return {"preset": preset, "studies": studies, "one": results[1], "two": results[2],
            "speedup": results[2] / results[1]}


def bench_demo_corpus(studies: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "corpus")
        command = [str(ROOT / ".venv/bin/dax"), "synth", str(out), "--studies", str(studies), "--preset", "demo",
                   "--workers", "2"]
        env = dict(os.environ, PREFECT_HOME=str(Path(tmp, "prefect")), DAX_HOME=str(Path(tmp, "home")))
        began = time.perf_counter()
        completed = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - began
        match = re.search(r"corpus now holds (\d+) images", completed.stdout.replace("\n", " "))
        images = int(match.group(1)) if match else -1
        shutil.rmtree(out, ignore_errors=True)
    return {"studies": studies, "images": images, "seconds": seconds, "images_per_s": images / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer studies; print, do not update BENCHMARKS.md")
    args = parser.parse_args()
    quick = args.quick

    lines = ["| what | figure | baseline | ratio |", "| --- | --- | --- | --- |"]
    for scale in (0.5, 1.0):
        r = bench_render(scale, 1 if quick else 2)
        lines.append(f"| render one {r['detector']} projection (mean of 11 regions with implants) | "
                     f"{r['culled_ms']:.0f} ms culled | {r['brute_ms']:.0f} ms brute force | {r['speedup']:.1f}x |")
        print(lines[-1], flush=True)
    for preset, studies in (("demo", 6 if quick else 22), ("full", 3 if quick else 11)):
        r = bench_per_core(preset, studies)
        lines.append(f"| generate, 1 core, preset {preset} ({r['studies']} studies, {r['images']} images) | "
                     f"{r['images_per_s']:.1f} images/s, {r['mb_per_s']:.1f} MB/s | | peak {r['peak_mb']:.0f} MB |")
        print(lines[-1], flush=True)
    r = bench_workers("demo", 8 if quick else 22)
    lines.append(f"| generate, preset demo ({r['studies']} studies), 2 worker processes vs 1 | "
                 f"{r['two']:.1f} images/s | {r['one']:.1f} images/s | {r['speedup']:.2f}x |")
    print(lines[-1], flush=True)
    if not quick:
        r = bench_demo_corpus(200)
        lines.append(f"| `dax synth --studies 200 --preset demo` (the demo corpus; 2 workers, Prefect flow) | {r['images']} images in "
                     f"{r['seconds']:.0f} s ({r['images_per_s']:.1f} images/s) | target: ~2,000 images < 180 s | |")
        print(lines[-1], flush=True)
        update_benchmarks_md("\n".join(lines))


def update_benchmarks_md(table: str) -> None:
    machine = f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, numpy {np.__version__}"
    write_section("synth", "Synthetic corpus generation (`benchmarks/synth.py`)",
                  f"Measured on {machine}, {time.strftime('%Y-%m-%d')}.\n\n{table}")


if __name__ == "__main__":
    main()
