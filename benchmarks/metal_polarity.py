"""Does metal's polarity cap the frozen metal head? The same head, budget, images and seeds on the same cached-feature
recipe, with the images in the models' view (attenuation bright on every modality,
``tasks.ingest.normalize.model_view``, what the heads read since it exists) and as the devices display them (RF/XA
frames inverted back inside their letterbox: fluoroscopy shows metal dark, radiography bright), on a home
``heads_eval.py`` ingested.

    .venv/bin/python benchmarks/metal_polarity.py --home /tmp/he/home --labels /tmp/he/eval-corpus/labels.parquet \\
        --backbone models:/dax-backbone-resnet18/1

A measurement for docs/experiments.md, sections 16 and 17; nothing is written or registered. On homes ingested
since the cleaned burned-in text is recorded (section 18) the "as displayed" rows show those boxes white, not black
(inverted back from the models' 0): a small difference from the display, left as is.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def as_displayed(data, modality: dict[str, str]):
    """The dense view's images with the frames ``model_view`` inverted (their display shows attenuation dark:
    fluoroscopy) inverted back inside their letterbox (padding stays 0)."""
    from tasks.ingest.normalize import attenuation_bright

    images = data.images.clone()
    flipped = 0
    for i, key in enumerate(data.keys):
        if not attenuation_bright({"modality": modality.get(key)}):
            b = data.boxes[i]
            field = images[i, 0, b.top:b.top + b.new_h, b.left:b.left + b.new_w]
            images[i, 0, b.top:b.top + b.new_h, b.left:b.left + b.new_w] = 1 - field
            flipped += 1
    return images, flipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--home", type=Path, required=True, help="a home heads_eval.py ingested (its --out/home)")
    parser.add_argument("--labels", type=Path, required=True, help="the evaluation corpus' labels.parquet")
    parser.add_argument("--backbone", required=True, help="the registered backbone")
    parser.add_argument("--config", default="demo", help="head config (dense_size, dense_max_images, seg_epochs)")
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()

    import mlflow
    import numpy as np
    import torch

    from dax_models.backbones import create_backbone
    from tasks.heads.data import load_head_dataset
    from tasks.heads.features import FeatureStore
    from tasks.heads.training import load_head_config, run_task
    from tasks.ingest.catalog import open_snapshot
    from tasks.release.registry import configure_tracking, resolve_model

    configure_tracking(args.home)
    name, version = resolve_model(args.backbone)
    pretrained = mlflow.pytorch.load_model(f"models:/{name}/{version}", map_location="cpu").eval()
    config = load_head_config(args.config)
    torch.manual_seed(0)
    random_init = create_backbone(pretrained.arch, pretrained.in_chans, img_size=config.dense_size).eval()
    con = open_snapshot(args.home)
    modality = dict(con.sql("SELECT key, modality FROM images").fetchall())
    con.close()
    data = load_head_dataset(args.home, args.labels, size=config.dense_size, max_images=config.dense_max_images)
    displayed, flipped = as_displayed(data, modality)
    print(f"{len(data)} images at {config.dense_size} px, {flipped} of them RF/XA (inverted in the display rows)\n")
    print("| images | backbone | metal Dice, images with metal (mean of seeds) | per seed |\n|---|---|---|---|")
    for label, images in (("as displayed", displayed), ("models' view (attenuation bright)", data.images)):
        view = dataclasses.replace(data, images=images)
        for role, backbone in (("pretrained", pretrained), ("random init", random_init)):
            store = FeatureStore.compute(backbone, images, parts=("maps",))
            dice = [run_task("metal", seed, view, store, config, backbone.arch).metrics["dice"]
                    for seed in range(args.seeds)]
            print(f"| {label} | {role} | {np.mean(dice):.3f} | {', '.join(f'{d:.3f}' for d in dice)} |", flush=True)
    print("\ncommand: python benchmarks/metal_polarity.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
