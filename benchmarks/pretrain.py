"""Pretraining throughput on CPU: the loader beside the training step it feeds, per architecture, in one run.

    .venv/bin/python benchmarks/pretrain.py                   # makes a corpus, updates BENCHMARKS.md
    .venv/bin/python benchmarks/pretrain.py --home dax-home   # on an ingested home (e.g. after make demo)
    .venv/bin/python benchmarks/pretrain.py --quick           # fewer steps, prints only

For ViT-Ti/16 and ResNet-18 with the demo-cpu config (2 x 96 px global + 4 x 48 px local crops,
DAX's full multi-crop augmentation, 16-bit images decoded from the shards):
  - loader images/s in one process (= per worker) and with the config's 2 DataLoader workers;
  - training images/s of the DINO step alone (student + teacher + loss + backward + AdamW + EMA) on
    batches already in memory;
  - the loader's margin: loader images/s (2 workers) / training images/s (target >= 2);
  - end to end: ``tasks.pretrain.main_dino.train`` for a few epochs (loader and training share the 2 cores);
  - peak resident memory of each measurement's process (its loader workers not included);
  - the same DINO step under bf16 autocast (what ``precision: bf16`` gives on a CPU), beside fp32;
  - for ResNets, the DINO step with the backbone in the contiguous layout (the baseline of ``Backbone``'s
    channels-last ResNets), beside the channels-last one.
Each architecture is measured in a fresh process, so peaks do not mix.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks_md import write_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ARCHS = ("vit_tiny_patch16", "resnet18")


def make_home(scratch: Path, studies: int) -> Path:
    dax = str(Path(sys.executable).with_name("dax"))
    env = dict(os.environ, DAX_DEID_SECRET="benchmark-secret-0123456789abcdef", PREFECT_HOME=str(scratch / "prefect"))
    subprocess.run([dax, "synth", str(scratch / "corpus"), "--studies", str(studies), "--preset", "demo"],
                   env=env, check=True, capture_output=True)
    subprocess.run([dax, "ingest", str(scratch / "corpus" / "dicom"), "--home", str(scratch / "home")],
                   env=env, check=True, capture_output=True)
    return scratch / "home"


def measure(arch: str, home: str, steps: int) -> dict:
    """One architecture, in this (fresh) process."""
    import torch

    from tasks.home import configure
    configure(home)
    from dax_models.augment import XrayMultiCrop
    from dax_models.backbones import ARCHITECTURES
    from tasks.pretrain.data import select_images, train_loader
    from tasks.pretrain.main_dino import (
        Dist,
        build_training,
        dino_step,
        load_config,
        train,
        write_job,
    )

    config = load_config("demo-cpu", {"arch": arch, "knn_every": 0, "checkpoint_every": 10 ** 9})
    selection = select_images(Path(home))
    transform = XrayMultiCrop(config.augment)
    batch = config.batch_size

    def loader_rate(workers: int, batches: int) -> float:
        it = iter(train_loader(selection, transform, batch, batches + 1, epoch=0, workers=workers))
        next(it)                                   # workers started, first batch in
        began = time.perf_counter()
        n = sum(1 for _ in it)
        return n * batch / (time.perf_counter() - began)

    loader_one = loader_rate(0, max(2, steps // 2))
    loader_workers = loader_rate(config.workers, steps)

    crops = next(iter(train_loader(selection, transform, batch, 1, epoch=0, workers=0)))

    def step_rate(precision: str, contiguous: bool = False) -> float:
        """Images/s of the DINO step alone on ``crops`` (2 warm-up steps, then ``steps`` timed); ``contiguous``:
        with the backbones in the contiguous layout, as before ResNets went channels-last."""
        t = build_training(config, Dist(0, 1, 0, torch.device("cpu")), precision)
        if contiguous:
            for model in (t.student_plain, t.teacher):
                model.backbone.use_channels_last(False)
        kwargs = dict(lr=1e-4, weight_decay=0.04, momentum=0.996, teacher_temp=0.04, epoch=1)
        for _ in range(2):
            dino_step(t, crops, **kwargs)
        began = time.perf_counter()
        for _ in range(steps):
            dino_step(t, crops, **kwargs)
        return steps * batch / (time.perf_counter() - began)

    training = step_rate("fp32")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # before bf16's models add theirs
    training_bf16 = step_rate("bf16")   # the same step under bf16 autocast
    training_contiguous = step_rate("fp32", contiguous=True) if ARCHITECTURES[arch].kind == "resnet" else None

    job = Path(tempfile.mkdtemp(prefix="dax-bench-job-"))
    config.epochs, config.steps_per_epoch, config.log_every = 2, steps, 10 ** 9
    write_job(job, config, selection, device="cpu")
    began = time.perf_counter()
    train(job)
    end_to_end = 2 * steps * batch / (time.perf_counter() - began)
    return {"arch": arch, "loader_one": loader_one, "loader_workers": loader_workers, "training": training,
            "training_bf16": training_bf16, "training_contiguous": training_contiguous, "end_to_end": end_to_end,
            "peak_mb": peak_mb,
            "workers": config.workers, "batch": batch, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", type=Path, help="an ingested DAX home (default: make one from 40 demo studies)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)   # arch home steps: the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], int(args.one[2]))))
        return
    scratch = Path(tempfile.mkdtemp(prefix="dax-bench-pretrain-"))
    home = args.home.resolve() if args.home else make_home(scratch, 10 if args.quick else 40)
    steps = 4 if args.quick else 12
    rows = []
    for arch in ARCHS:
        out = subprocess.run([sys.executable, __file__, "--one", arch, str(home), str(steps)], check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    lines = ["| backbone | loader, 1 process (img/s) | loader, 2 workers (img/s) | DINO step (img/s) "
             "| loader margin | end to end (img/s) | peak RSS (MB) | DINO step, bf16 autocast (img/s) "
             "| DINO step, contiguous layout (img/s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        contiguous = r["training_contiguous"]
        lines.append(f"| {r['arch']} | {r['loader_one']:.0f} | {r['loader_workers']:.0f} | {r['training']:.1f} "
                     f"| {r['loader_workers'] / r['training']:.1f}x | {r['end_to_end']:.1f} | {r['peak_mb']:.0f} "
                     f"| {r['training_bf16']:.1f} ({r['training_bf16'] / r['training']:.2f}x fp32) | "
                     + (f"{contiguous:.1f} (channels-last {r['training'] / contiguous:.2f}x it) |" if contiguous
                        else "- (no convolutions to lay out) |"))
    table = "\n".join(lines)
    print(table)
    if not args.quick:
        update_benchmarks_md(table, f"demo-cpu config, batch {rows[0]['batch']}, {rows[0]['threads']} torch threads, "
                                    f"fp32 unless said, {steps} steps per measurement",
                             shlex.join([".venv/bin/python", "benchmarks/pretrain.py", *sys.argv[1:]]))


def update_benchmarks_md(table: str, setup: str, command: str) -> None:
    write_section("pretrain", "Pretraining (`benchmarks/pretrain.py`)",
                  f"Measured on {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; {setup}.\n"
                  f"Command: `{command}`\n\n{table}")


if __name__ == "__main__":
    main()
