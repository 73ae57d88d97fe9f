"""Which readout of a frozen backbone the region's linear head should read: each beside the thumbnail floors, paired.

    .venv/bin/python benchmarks/region_readouts.py --home HOME --backbone models:/dax-backbone-resnet18/1

HOME is an ingested home with labels (``benchmarks/heads_eval.py --out OUT`` leaves one at OUT/home, its labels at
OUT/eval-corpus/labels.parquet: ``--labels``). The images are loaded as the heads flow loads the region view
(the head config's ``size``: 96 px in ``eval``), split by patient as the flow splits them; the pretrained
backbone (registered URI) and its random-init twin (seed 0, as the flow makes it) are run once over them. Each
readout gets the flow's own linear head (``fit_classifier``: standardised inputs, AdamW, the head config's epochs,
lr and weight decay, the best validation epoch) for ``--seeds`` seeds:

- ``last4``: what the registered region head reads today (ResNet: the 4 stages' average pools; ViT: the last 4
  blocks' CLS tokens);
- ``pooled``: the final pool (ViT: the final CLS);
- ``layout``: the last feature map pooled to 3 x 3 cells, each cell L2-normalised (the kNN monitor's layout
  readout, ``tasks.pretrain.monitor.grid_cells``), which keeps where things are, as the thumbnails do;
- ``last4+layout``: both, concatenated.

Floors as the flow's (``tasks.heads.floors.region_floors``): logistic regression on 32 x 32 thumbnails, kNN on
16 x 16. Prints test accuracy (mean +- sd over seeds) per readout and backbone, and, seed 0's heads, each readout
minus the logistic floor, minus ``last4`` and minus random init's on the same test images, with 95 % intervals
resampling test patients (``patient_interval``).

``--splits K`` repeats it on K patient splits of the same images: the home's own, then K - 1 re-partitions by the
same rule on salted pseudonyms (``split_of``: what a fresh de-identification secret does, without ingesting again),
and counts the splits where each pretrained readout is above both floors. ``--readouts last4`` runs only the
registered head's. A finding, not a speed figure (docs/experiments.md, section 36):

    .venv/bin/python benchmarks/region_readouts.py --home OUT/home --labels OUT/eval-corpus/labels.parquet \\
        --backbone models:/dax-backbone-resnet18/1 --readouts last4 --splits 10
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

READOUTS = ("last4", "pooled", "layout", "last4+layout")


def readouts(backbone, images):
    """Every readout of ``READOUTS`` as a ``FeatureStore``: the flow's own feature pass (``FeatureStore.compute``:
    fp16, autocast; ``pooled``, ``last4`` and the maps), the layout cells and the concatenation derived from it."""
    import numpy as np
    import torch

    from tasks.heads.features import FeatureStore
    from tasks.pretrain.monitor import LAYOUT_READOUT, grid_cells

    store = FeatureStore.compute(backbone, images, parts=("pooled", "last4", "maps"))
    level = torch.from_numpy(np.asarray(store.maps[LAYOUT_READOUT["level"] - 1], dtype=np.float32))
    arrays = {"last4": store.arrays["last4"], "pooled": store.arrays["pooled"],
              "layout": grid_cells(level, LAYOUT_READOUT["grid"]).numpy()}
    arrays["last4+layout"] = np.concatenate([arrays["last4"], arrays["layout"]], axis=1)
    return FeatureStore(arrays, [], {"parts": list(READOUTS), "n": len(images)})


def split_of(patient_keys: list[str], split: int):
    """Split 0: the home's own (``patient_split`` of each pseudonym); split k > 0: the same rule on the pseudonym
    salted with k, which re-partitions the patients as a fresh de-identification secret would, without ingesting
    the corpus again."""
    import numpy as np

    from tasks.ingest.labels import patient_split

    return np.asarray([patient_split(key if split == 0 else f"resplit-{split}:{key}") for key in patient_keys])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--home", type=Path, required=True, help="an ingested home with labels")
    parser.add_argument("--labels", type=Path, default=None, help="labels.parquet (default: HOME/corpus/)")
    parser.add_argument("--backbone", required=True, help="a registered backbone URI (models:/NAME/VERSION)")
    parser.add_argument("--config", default="eval", help="the head config (deployments/heads/)")
    parser.add_argument("--readouts", default=",".join(READOUTS), help="comma-separated, of " + ", ".join(READOUTS))
    parser.add_argument("--splits", type=int, default=1, help="patient splits: the home's, then re-partitions")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    chosen = args.readouts.split(",")
    if unknown := set(chosen) - set(READOUTS):
        parser.error(f"unknown readouts: {sorted(unknown)}")

    import mlflow
    import numpy as np
    import torch

    from dax_models.backbones import create_backbone
    from dax_models.metrics import knn_classify
    from tasks.heads.data import load_head_dataset
    from tasks.heads.evaluation import classifier_probabilities, patient_interval
    from tasks.heads.floors import ThumbnailFeatures
    from tasks.heads.training import fit_classifier, load_head_config
    from tasks.home import configure
    from tasks.release.registry import configure_tracking, resolve_model

    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    root = configure(args.home)
    configure_tracking(root)
    config = load_head_config(args.config)
    labels_path = args.labels or args.home / "corpus" / "labels.parquet"
    data = load_head_dataset(root, labels_path, size=config.size, masks=False)
    name, version = resolve_model(args.backbone)
    pretrained = mlflow.pytorch.load_model(f"models:/{name}/{version}", map_location="cpu").eval()
    torch.manual_seed(0)
    twin = create_backbone(pretrained.arch, pretrained.in_chans, img_size=config.size).eval()
    sources = {"pretrained": readouts(pretrained, data.images), "random init": readouts(twin, data.images),
               "thumbnails": ThumbnailFeatures(data.images)}
    print(f"{name}/{version} ({pretrained.arch}): {len(data)} labelled images of {len(set(data.patient_keys))} "
          f"patients at {config.size} px; features in {time.perf_counter() - began:.0f} s; {args.splits} split(s), "
          f"{args.seeds} seed(s) each\n", flush=True)
    num_classes, y = len(data.classes), data.regions
    rows = [("thumbnails", "t32")] + [(role, r) for role in ("pretrained", "random init") for r in chosen]
    summary = []
    for split in range(args.splits):
        splits = split_of(data.patient_keys, split)
        train, val, test = (np.flatnonzero(splits == s) for s in ("train", "val", "test"))
        if not (len(train) and len(val) and len(test)):
            sys.exit(f"split {split} leaves {len(train)} train, {len(val)} val, {len(test)} test images: too few "
                     f"patients ({len(set(data.patient_keys))}) for a split by patient")
        patients = [data.patient_keys[i] for i in test]
        accuracy: dict[tuple, list[float]] = {}
        correct: dict[tuple, list[float]] = {}        # seed 0's per test image, for the paired intervals
        for seed in range(args.seeds):
            for role, part in rows:
                head, _ = fit_classifier(sources[role], part, train, y, num_classes, kind="linear",
                                         epochs=config.linear_epochs, lr=config.linear_lr,
                                         weight_decay=config.weight_decay, batch_size=config.batch_size, seed=seed,
                                         val_idx=val, eval_every=config.eval_every)
                hits = classifier_probabilities(head, sources[role], part, test, "cpu").argmax(1) == y[test].numpy()
                accuracy.setdefault((role, part), []).append(float(hits.mean()))
                if seed == 0:
                    correct[(role, part)] = hits.astype(float).tolist()
        knn = knn_classify(sources["thumbnails"].get("t16", train), y[train], sources["thumbnails"].get("t16", test),
                           num_classes, k=config.knn_k, temperature=config.knn_temperature)
        knn_floor = float((knn.cpu() == y[test]).float().mean())
        which = " (the home's)" if split == 0 else ""
        print(f"## split {split}{which}: {len(train)} train, {len(val)} val, "
              f"{len(test)} test images ({len(set(patients))} test patients); kNN on 16 x 16 thumbnails "
              f"{knn_floor:.1%}\n")
        print("| backbone | readout | dim | test accuracy (mean +- sd, %d seeds) |\n|---|---|---|---|" % args.seeds)
        for role, part in rows:
            values = np.asarray(accuracy[(role, part)])
            dim = int(sources[role].get(part, train[:1]).shape[1])
            label = "t32 (logistic floor)" if role == "thumbnails" else part
            print(f"| {role} | {label} | {dim} | {values.mean():.1%} +- {values.std():.1%} |")
        print("\nseed 0, paired on the same test images (95 % interval resampling test patients):")
        floor = correct[rows[0]]
        for role, part in rows[1:]:
            mine, lines = correct[(role, part)], [f"{role} {part}"]
            others = (("minus the logistic floor", floor), ("minus last4", correct.get((role, "last4"))),
                      ("minus random init's", correct.get(("random init", part))))
            for label, other in others:
                if other is None or other is mine:
                    continue
                d = patient_interval({"accuracy": mine}, patients, "accuracy", minus={"accuracy": other})
                lines.append(f"{label} {d['value']:+.3f} ({d['low']:+.3f} to {d['high']:+.3f})")
                if role == "pretrained" and label == "minus the logistic floor":
                    summary.append((split, part, float(np.mean(accuracy[(role, part)])),
                                    float(np.mean(accuracy[rows[0]])), knn_floor, d))
            print("- " + "; ".join(lines))
        print(f"\n({(time.perf_counter() - began) / 60:.1f} min)\n", flush=True)

    if args.splits > 1:
        print("## Over the splits: the pretrained readouts against both thumbnail floors\n")
        print("| readout | split | accuracy | logistic floor | kNN floor | minus the logistic floor, seed 0 (95 %) |\n"
              "|---|---|---|---|---|---|")
        for split, part, mine, logistic, knn_floor, d in sorted(summary, key=lambda r: (chosen.index(r[1]), r[0])):
            print(f"| {part} | {split} | {mine:.1%} | {logistic:.1%} | {knn_floor:.1%} | {d['value']:+.3f} "
                  f"({d['low']:+.3f} to {d['high']:+.3f}) |")
        for part in chosen:
            mine = [r for r in summary if r[1] == part]
            above = sum(r[2] > max(r[3], r[4]) for r in mine)
            clear = sum(r[5]["low"] > 0 and r[2] > r[4] for r in mine)
            print(f"\n{part}: above both floors (mean over seeds) on {above} of {len(mine)} splits; over the logistic "
                  f"floor with its interval clear of 0 (and above the kNN floor) on {clear} of {len(mine)}")
    print(f"\n{(time.perf_counter() - began) / 60:.1f} min")


if __name__ == "__main__":
    main()
