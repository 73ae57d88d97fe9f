"""Recipes for the supervised ceilings: architectures trained end to end with a task's head, from random init.

    .venv/bin/python benchmarks/ceilings.py --home HOME resnet18:96:8:1e-3 vit_tiny_patch16:96:8:3e-4
    .venv/bin/python benchmarks/ceilings.py --home HOME --task metal --max-images 250 resnet18:512:10:3e-4
    .venv/bin/python benchmarks/ceilings.py --home HOME --task metal frozen:resnet18:512:60 frozen:JOB:512:60

Each recipe is ARCH:SIDE:EPOCHS:LR (a ceiling) or, for metal and screws, frozen:BACKBONE:SIDE:EPOCHS[:LR]: the
task's frozen head for EPOCHS on the cached maps of BACKBONE, an architecture (its random init, the ceiling's own
starting point) or a pretraining job folder (its final teacher), beside the ceilings at the same budget; LR is the
head's (default: the head config's ``seg_lr`` / ``screw_lr``). Maps are computed once per backbone and side.
The labelled images of HOME (its ``corpus/labels.parquet``, or ``--labels``);
the patient split is the home's, seed 0, best validation epoch.

- ``--task region`` (default): the images are loaded once at ``--size`` (the region size, 224) and resized per
  batch to SIDE (``tasks.heads.training.train_end_to_end``, batch 32); test accuracy, validation accuracy,
  macro F1 and minutes.
- ``--task metal`` / ``screws``: the images at SIDE (the dense size, 512 in the demo), at most ``--max-images``
  (the demo's ``dense_max_images``: 250), and ``tasks.heads.training.dense_ceiling`` with the head config
  ``--config`` (windows, batch, hidden channels, head learning rate); LR is the backbone's. Metal: Dice at native
  resolution on test images with metal; screws: recall, precision, head / tip L1 and angle at native resolution.
  A frozen recipe trains the same head with the same config (``seg_epochs`` / ``screw_epochs`` = EPOCHS), its lr
  column the head's; a frozen metal row also gives the head's Dice on the training and the test images with metal
  at the input size (underfitting when the two are level, overfitting when training is far above).
  ``--set KEY=VALUE`` overrides any head config field for every recipe (``seg_hidden=64``, ``dense_crop=0``).

Prints one markdown row per recipe (metal and screws: with the 95 % interval of the headline figure resampling
test patients, and after the table each row minus the first, paired on the same images). Not a speed figure: it
finds what caps a task (a head whose ceiling is low cannot be rescued by pretraining) within a CPU budget
(docs/experiments.md, sections 9, 10, 12 and 33).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def recipe_backbone(name: str, side: int):
    """(backbone, what it is) for a recipe: a job folder's final teacher ('pretrained (JOB)'), or an
    architecture's random init, seed 0 ('random init'), where every ceiling starts."""
    import torch

    from dax_models.backbones import create_backbone
    from tasks.pretrain.main_dino import teacher_backbone

    if Path(name).is_dir():
        return teacher_backbone(Path(name)), f"pretrained ({Path(name).name})"
    torch.manual_seed(0)
    return create_backbone(name, 1, img_size=min(side, 224)), "random init"


def differences(rows: list[dict], metric: str) -> list[str]:
    """Each row minus the first, on the same test images, with its 95 % interval resampling test patients
    (``patient_interval``, paired): the first recipe is the reference (a random-init twin, say)."""
    from tasks.heads.evaluation import patient_interval

    first = rows[0]
    lines = []
    for row in rows[1:]:
        assert row["test_idx"] == first["test_idx"], "rows on different test images cannot be paired"
        d = patient_interval(row["per_image"], row["patients"], metric, minus=first["per_image"])
        lines.append(f"{row['label']} minus {first['label']}: {metric} {d['value']:+.1%} "
                     f"({d['low']:+.1%} to {d['high']:+.1%}, {d['patients']} patients)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--home", type=Path, required=True, help="an ingested home with labels")
    parser.add_argument("--labels", type=Path, default=None, help="labels.parquet (default: HOME/corpus/)")
    parser.add_argument("--task", choices=("region", "metal", "screws"), default="region")
    parser.add_argument("--size", type=int, default=224, help="region: the side the images are loaded at")
    parser.add_argument("--max-images", type=int, default=250, help="metal, screws: an evenly spread subset")
    parser.add_argument("--config", default="demo", help="metal, screws: the head config (deployments/heads/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="metal, screws: override a head config field (repeatable), e.g. seg_hidden=64")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", type=Path, default=None,
                        help="metal, screws: a JSON of every row with its per-image figures and test patients")
    parser.add_argument("recipes", nargs="+", metavar="ARCH:SIDE:EPOCHS:LR")
    args = parser.parse_args()

    import numpy as np
    import torch
    import yaml

    from tasks.heads.data import load_head_dataset
    from dax_models.metrics import segmentation_metrics
    from tasks.heads.evaluation import patient_interval, predict_masks
    from tasks.heads.features import FeatureStore
    from tasks.heads.training import dense_ceiling, load_head_config, run_task, train_end_to_end

    recipes = []
    for recipe in args.recipes:
        if recipe.startswith("frozen:"):
            if args.task == "region":
                parser.error("frozen recipes are for metal and screws (the heads flow trains region's)")
            backbone, side, epochs, *head_lr = recipe.split(":")[1:]
            if len(head_lr) > 1:
                parser.error(f"{recipe}: frozen:BACKBONE:SIDE:EPOCHS[:LR]")
            recipes.append((recipe, backbone, int(side), int(epochs), float(head_lr[0]) if head_lr else None, True))
        else:
            arch, side, epochs, lr = recipe.split(":")
            recipes.append((recipe, arch, int(side), int(epochs), float(lr), False))
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.overrides)}
    torch.set_num_threads(args.threads)
    labels = args.labels or args.home / "corpus" / "labels.parquet"
    if args.task == "region":
        data = load_head_dataset(args.home, labels, size=args.size, masks=False)
        print(f"{len(data.indices('train'))} train, {len(data.indices('val'))} val, {len(data.indices('test'))} test "
              f"images (split by patient), loaded at {args.size} px\n")
        header = ("| architecture | side (px) | epochs | lr | test accuracy | val accuracy | macro F1 | minutes |\n"
                  "|---|---|---|---|---|---|---|---|")
    else:
        loaded, maps = {}, {}
        header = {"metal": "| architecture | side (px) | epochs | lr | Dice (native) | 95 % (patients) | val Dice "
                           "| IoU | train / test Dice (input px) | minutes |\n" + "|---" * 10 + "|",
                  "screws": "| architecture | side (px) | epochs | lr | recall | 95 % (patients) | precision | "
                            "head / tip L1 (px) | angle (deg) | minutes |\n" + "|---" * 10 + "|"}[args.task]
    print(header, flush=True)
    headline = "dice" if args.task == "metal" else "recall"
    rows = []
    for recipe, arch, side, epochs, lr, frozen in recipes:
        began = time.perf_counter()
        twin, origin = recipe_backbone(arch, side)
        if frozen:
            arch = f"frozen {twin.arch}, {origin}" + ("" if lr is None else f", head lr {lr:g}")
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
        if frozen:
            key = "seg_lr" if args.task == "metal" else "screw_lr"
            config = load_head_config(args.config, {**overrides, "dense_size": side, "seg_epochs": epochs,
                                                    "screw_epochs": epochs, "device": "cpu",
                                                    **({} if lr is None else {key: lr})})
            lr = getattr(config, key)
            if (arch_side := (recipe.split(":")[1], side)) not in maps:
                maps.clear()     # one backbone's maps at a time: a few GB at 512 px
                maps[arch_side] = FeatureStore.compute(twin, loaded[side].images, ("maps",), "cpu",
                                                       config.feature_batch)
            result = run_task(args.task, 0, loaded[side], maps[arch_side], config, twin.arch)
            if args.task == "metal":   # the fit: underfitting (train ~ test) or overfitting (train >> test)
                dense = loaded[side]      # images with metal, at the input size; test's probabilities are run_task's
                fitted = np.asarray([int(i) for i in dense.indices("train") if bool(dense.masks[i].any())])
                probs = predict_masks(result.head.head, maps[arch_side], fitted, side, "cpu")
                tested = [j for j, i in enumerate(result.extra["test_idx"]) if bool(dense.masks[i].any())]
                for part, p, idx in (("train", probs, fitted), ("test", result.extra["probabilities"][tested],
                                                                 result.extra["test_idx"][tested])):
                    result.metrics[f"{part}_dice_metal_input"] = segmentation_metrics(p > 0.5, dense.masks[idx])["dice"]
        else:
            config = load_head_config(args.config, {**overrides, "dense_size": side, "e2e_epochs": epochs,
                                                    "e2e_lr": lr, "device": "cpu"})
            result = dense_ceiling(args.task, 0, loaded[side], twin, config)
        minutes = (time.perf_counter() - began) / 60
        m, test = result.metrics, loaded[side].indices("test")
        patients = [loaded[side].patient_keys[i] for i in test]
        interval = patient_interval(result.per_image, patients, headline)
        spread = f"{interval['low']:.1%} to {interval['high']:.1%} ({interval['patients']})"
        rows.append({"recipe": recipe, "label": arch, "metrics": m, "val_score": result.val_score,
                     "per_image": result.per_image, "test_idx": [int(i) for i in test], "patients": patients,
                     "interval": interval, "minutes": minutes})
        if args.out:
            args.out.write_text(json.dumps(rows, indent=1))
        if args.task == "metal":
            fit = (f"{m['train_dice_metal_input']:.1%} / {m['test_dice_metal_input']:.1%}"
                   if "train_dice_metal_input" in m else "-")
            print(f"| {arch} | {side} | {epochs} | {lr:g} | {m['dice']:.1%} | {spread} | {result.val_score:.1%} | "
                  f"{m['iou']:.1%} | {fit} | {minutes:.1f} |", flush=True)
        else:
            print(f"| {arch} | {side} | {epochs} | {lr:g} | {m['recall']:.1%} | {spread} | {m['precision']:.1%} | "
                  f"{m['head_l1_px']:.1f} / {m['tip_l1_px']:.1f} | {m['angle_deg']:.1f} | {minutes:.1f} |", flush=True)
    if len(rows) > 1:
        print("\n" + "\n".join(differences(rows, headline)))


if __name__ == "__main__":
    main()
