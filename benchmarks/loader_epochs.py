"""Pretraining's loader across epochs: one DataLoader for the whole run against a new one per epoch, in one run.

    .venv/bin/python benchmarks/loader_epochs.py --home dax-home      # an ingested home (e.g. after make demo)

The training loop used to build a DataLoader per epoch; its spawned workers import torch before their first
batch, every epoch. ``train_loader(..., epochs=N)`` spans the epochs with one set of workers. Both ways make
the same batches (tests/test_pretrain.py checks it); this times them, the demo-cpu config's batch, crops and
workers, with no training step, so what differs is only the workers' start. The two ways alternate
(``--rounds`` of each), and the script prints the seconds per run and per epoch.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", type=Path, required=True, help="an ingested DAX home")
    parser.add_argument("--epochs", type=int, default=6, help="the demo's demo-cpu runs 6")
    parser.add_argument("--steps", type=int, default=4, help="batches per epoch")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from tasks.home import configure
    configure(args.home)
    from dax_models.augment import XrayMultiCrop
    from tasks.pretrain.data import select_images, train_loader
    from tasks.pretrain.main_dino import load_config

    config = load_config("demo-cpu", {})
    selection = select_images(args.home.resolve())
    transform = XrayMultiCrop(config.augment)
    common = dict(batch_size=config.batch_size, steps_per_epoch=args.steps, workers=config.workers)

    def per_epoch() -> int:
        return sum(1 for e in range(args.epochs) for _ in train_loader(selection, transform, epoch=e, **common))

    def one_loader() -> int:
        return sum(1 for _ in train_loader(selection, transform, epoch=0, epochs=args.epochs, **common))

    seconds = {"a loader per epoch": [], "one loader": []}
    for _ in range(args.rounds):
        for name, run in (("a loader per epoch", per_epoch), ("one loader", one_loader)):
            began = time.perf_counter()
            assert run() == args.epochs * args.steps
            seconds[name].append(time.perf_counter() - began)
    print(f"{args.epochs} epochs of {args.steps} batches of {config.batch_size} ({config.arch} demo-cpu crops), "
          f"{config.workers} workers, median of {args.rounds}:")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"  {name:20s} {median:6.1f} s  ({median / args.epochs:.1f} s per epoch; runs: "
              + ", ".join(f"{v:.1f}" for v in values) + ")")


if __name__ == "__main__":
    main()
