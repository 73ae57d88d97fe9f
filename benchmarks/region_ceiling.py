"""Recipes for the region task's supervised ceiling: architectures trained end to end, from random init.

    .venv/bin/python benchmarks/region_ceiling.py --home HOME resnet18:96:8:1e-3 vit_tiny_patch16:96:8:3e-4

Each recipe is ARCH:SIDE:EPOCHS:LR. The labelled images of HOME (its ``corpus/labels.parquet``, or
``--labels``) are loaded once at ``--size`` (the region size, 224) and resized per batch to SIDE
(``tasks.heads.training.train_end_to_end``, the bound the heads flow and ``heads_eval.py`` run); the
patient split is the home's, seed 0, batch 32, best validation epoch. Prints one markdown row per recipe:
test accuracy, validation accuracy, macro F1 and minutes. Not a speed figure: it finds a recipe whose
bound is a ceiling (above the floors) within a CPU budget (docs/experiments.md, section 9).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--home", type=Path, required=True, help="an ingested home with labels")
    parser.add_argument("--labels", type=Path, default=None, help="labels.parquet (default: HOME/corpus/)")
    parser.add_argument("--size", type=int, default=224, help="the side the images are loaded at")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("recipes", nargs="+", metavar="ARCH:SIDE:EPOCHS:LR")
    args = parser.parse_args()

    import torch

    from dax_models.backbones import create_backbone
    from tasks.heads.data import load_head_dataset
    from tasks.heads.training import train_end_to_end

    recipes = []
    for recipe in args.recipes:
        arch, side, epochs, lr = recipe.split(":")
        recipes.append((arch, int(side), int(epochs), float(lr)))
    torch.set_num_threads(args.threads)
    data = load_head_dataset(args.home, args.labels or args.home / "corpus" / "labels.parquet", size=args.size,
                             masks=False)
    train, val, test = data.indices("train"), data.indices("val"), data.indices("test")
    print(f"{len(train)} train, {len(val)} val, {len(test)} test images (split by patient), loaded at {args.size} px\n")
    print("| architecture | side (px) | epochs | lr | test accuracy | val accuracy | macro F1 | minutes |\n"
          "|---|---|---|---|---|---|---|---|", flush=True)
    for arch, side, epochs, lr in recipes:
        torch.manual_seed(0)
        twin = create_backbone(arch, 1, img_size=side)
        began = time.perf_counter()
        result = train_end_to_end(twin, data, train, val, test, epochs, lr, 32, 0, "cpu", size=side)
        print(f"| {arch} | {side} | {epochs} | {lr:g} | {result['accuracy']:.1%} | {result['val_accuracy']:.1%} | "
              f"{result['f1']:.3f} | {(time.perf_counter() - began) / 60:.1f} |", flush=True)


if __name__ == "__main__":
    main()
