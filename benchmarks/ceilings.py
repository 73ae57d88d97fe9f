"""Recipes for the supervised ceilings: architectures trained end to end with a task's head, from random init.

    .venv/bin/python benchmarks/ceilings.py --home HOME resnet18:96:8:1e-3 vit_tiny_patch16:96:8:3e-4
    .venv/bin/python benchmarks/ceilings.py --home HOME --task metal --max-images 250 resnet18:512:10:3e-4

Each recipe is ARCH:SIDE:EPOCHS:LR. The labelled images of HOME (its ``corpus/labels.parquet``, or ``--labels``);
the patient split is the home's, seed 0, best validation epoch.

- ``--task region`` (default): the images are loaded once at ``--size`` (the region size, 224) and resized per
  batch to SIDE (``tasks.heads.training.train_end_to_end``, batch 32); test accuracy, validation accuracy,
  macro F1 and minutes.
- ``--task metal`` / ``screws``: the images at SIDE (the dense size, 512 in the demo), at most ``--max-images``
  (the demo's ``dense_max_images``: 250), and ``tasks.heads.training.dense_ceiling`` with the head config
  ``--config`` (windows, batch, hidden channels, head learning rate); LR is the backbone's. Metal: Dice at native
  resolution on test images with metal; screws: recall, precision, head / tip L1 and angle at native resolution.

Prints one markdown row per recipe. Not a speed figure: it finds what caps a task (a head whose ceiling is low
cannot be rescued by pretraining) within a CPU budget (docs/experiments.md, sections 9 and 10).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--home", type=Path, required=True, help="an ingested home with labels")
    parser.add_argument("--labels", type=Path, default=None, help="labels.parquet (default: HOME/corpus/)")
    parser.add_argument("--task", choices=("region", "metal", "screws"), default="region")
    parser.add_argument("--size", type=int, default=224, help="region: the side the images are loaded at")
    parser.add_argument("--max-images", type=int, default=250, help="metal, screws: an evenly spread subset")
    parser.add_argument("--config", default="demo", help="metal, screws: the head config (deployments/heads/)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("recipes", nargs="+", metavar="ARCH:SIDE:EPOCHS:LR")
    args = parser.parse_args()

    import torch

    from dax_models.backbones import create_backbone
    from tasks.heads.data import load_head_dataset
    from tasks.heads.training import dense_ceiling, load_head_config, train_end_to_end

    recipes = []
    for recipe in args.recipes:
        arch, side, epochs, lr = recipe.split(":")
        recipes.append((arch, int(side), int(epochs), float(lr)))
    torch.set_num_threads(args.threads)
    labels = args.labels or args.home / "corpus" / "labels.parquet"
    if args.task == "region":
        data = load_head_dataset(args.home, labels, size=args.size, masks=False)
        print(f"{len(data.indices('train'))} train, {len(data.indices('val'))} val, {len(data.indices('test'))} test "
              f"images (split by patient), loaded at {args.size} px\n")
        header = ("| architecture | side (px) | epochs | lr | test accuracy | val accuracy | macro F1 | minutes |\n"
                  "|---|---|---|---|---|---|---|---|")
    else:
        loaded = {}
        header = {"metal": "| architecture | side (px) | epochs | lr | Dice (native) | val Dice | IoU | minutes |\n"
                           "|---|---|---|---|---|---|---|---|",
                  "screws": "| architecture | side (px) | epochs | lr | recall | precision | head / tip L1 (px) | "
                            "angle (deg) | minutes |\n|---|---|---|---|---|---|---|---|---|"}[args.task]
    print(header, flush=True)
    for arch, side, epochs, lr in recipes:
        torch.manual_seed(0)
        twin = create_backbone(arch, 1, img_size=min(side, 224))
        began = time.perf_counter()
        if args.task == "region":
            train, val, test = data.indices("train"), data.indices("val"), data.indices("test")
            result = train_end_to_end(twin, data, train, val, test, epochs, lr, 32, 0, "cpu", size=side)
            print(f"| {arch} | {side} | {epochs} | {lr:g} | {result['accuracy']:.1%} | {result['val_accuracy']:.1%} | "
                  f"{result['f1']:.3f} | {(time.perf_counter() - began) / 60:.1f} |", flush=True)
            continue
        if side not in loaded:
            loaded[side] = load_head_dataset(args.home, labels, size=side, max_images=args.max_images)
            print(f"<!-- {len(loaded[side])} images at {side} px: {len(loaded[side].indices('train'))} train, "
                  f"{len(loaded[side].indices('test'))} test (split by patient) -->", flush=True)
        config = load_head_config(args.config, {"dense_size": side, "e2e_epochs": epochs, "e2e_lr": lr,
                                                "device": "cpu"})
        result = dense_ceiling(args.task, 0, loaded[side], twin, config)
        minutes = (time.perf_counter() - began) / 60
        m = result.metrics
        if args.task == "metal":
            print(f"| {arch} | {side} | {epochs} | {lr:g} | {m['dice']:.1%} | {result.val_score:.1%} | "
                  f"{m['iou']:.1%} | {minutes:.1f} |", flush=True)
        else:
            print(f"| {arch} | {side} | {epochs} | {lr:g} | {m['recall']:.1%} | {m['precision']:.1%} | "
                  f"{m['head_l1_px']:.1f} / {m['tip_l1_px']:.1f} | {m['angle_deg']:.1f} | {minutes:.1f} |", flush=True)


if __name__ == "__main__":
    main()
