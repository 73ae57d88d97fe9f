"""Training the frozen-backbone heads with cached features vs recomputing the backbone every epoch.

    .venv/bin/python benchmarks/heads.py --home HOME --labels CORPUS/labels.parquet   # a labelled home
    .venv/bin/python benchmarks/heads.py --quick                                        # random images, 64 px

Both sides train the same heads (region linear and MLP, metal decoder, screw head) for the same
epochs on the same batches of the same images (no validation, so nothing else differs):

- cached: ``FeatureStore.compute`` once (one backbone pass per image, float16, memmaps on disk), then
  every epoch of every head reads the cached features;
- recomputed: ``LiveFeatures``, the backbone runs on every batch of every epoch of every head.

Target: cached >= 5x faster. Prints a markdown table and the command that made it.

``--windows CROP`` measures the dense heads' training windows instead (``HeadConfig.dense_crop``): the metal
decoder and the screw head trained on the same cached features, whole images against CROP px windows
(``tasks.heads.training.DenseCrop``), same images, epochs and batches, in milliseconds per image and epoch:

    .venv/bin/python benchmarks/heads.py --windows 256 --size 512 --images 96 --epochs 2
"""
from __future__ import annotations

import argparse
import platform
import shlex
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dax_models.augment import Letterbox  # noqa: E402
from dax_models.backbones import (
    create_backbone,  # noqa: E402
    resolve_device,
)
from tasks.heads.data import HeadDataset  # noqa: E402
from tasks.heads.features import FeatureStore, LiveFeatures
from tasks.heads.training import fit_classifier, fit_screw_head, fit_segmenter
from tasks.label_schema import BODY_REGIONS  # noqa: E402


def synthetic_dataset(n: int, size: int, seed: int = 0) -> HeadDataset:
    """Random images with random labels, masks and screws: the heads' cost does not depend on content."""
    rng = np.random.default_rng(seed)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    screws = []
    for i in range(n):
        r, c = rng.integers(0, size - 8, 2)
        masks[i, r:r + 8, c:c + 8] = True
        k = int(rng.integers(0, 4))
        screws.append(rng.uniform(0, size, (k, 4)))
    boxes = [Letterbox(size, size, size, size, size, 0, 0)] * n
    return HeadDataset(size=size, keys=[f"k{i}" for i in range(n)], images=torch.rand(n, 1, size, size).half(),
                       regions=torch.as_tensor(rng.integers(0, len(BODY_REGIONS), n)), masks=masks, screws=screws,
                       native_screws=screws, boxes=boxes, splits=np.asarray(["train"] * n),
                       patient_keys=[f"p{i}" for i in range(n)])


def train_all_heads(source, data: HeadDataset, epochs: int, device) -> None:
    """Every head once, ``epochs`` epochs each, on all images (the same work on both sides)."""
    idx = np.arange(len(data))
    common = {"epochs": epochs, "seed": 0, "device": device}
    fit_classifier(source, "last4", idx, data.regions, len(BODY_REGIONS), kind="linear", batch_size=64, **common)
    fit_classifier(source, "pooled", idx, data.regions, len(BODY_REGIONS), kind="mlp", batch_size=64, **common)
    fit_segmenter(source, idx, data.masks, data.size, batch_size=32, **common)
    fit_screw_head(source, idx, data.screws, data.size, batch_size=32, **common)


def time_dense_heads(store, data: HeadDataset, epochs: int, crop: int, hidden: int, device) -> dict[str, float]:
    """Milliseconds per training image and epoch of the metal decoder and the screw head (``crop`` 0: whole images)."""
    idx = np.arange(len(data))
    common = {"epochs": epochs, "seed": 0, "device": device, "hidden": hidden, "crop": crop, "batch_size": 32}
    spent = {}
    for name, fit, target in (("metal", fit_segmenter, data.masks), ("screws", fit_screw_head, data.screws)):
        began = time.perf_counter()
        fit(store, idx, target, data.size, **common)
        spent[name] = (time.perf_counter() - began) / (epochs * len(idx)) * 1000
    return spent


def windows_table(store, data: HeadDataset, args, device) -> None:
    """``--windows``: whole images against windows, one run, one table."""
    whole = time_dense_heads(store, data, args.epochs, 0, args.hidden, device)
    windows = time_dense_heads(store, data, args.epochs, args.windows, args.hidden, device)
    command = " ".join(["benchmarks/heads.py", *map(shlex.quote, sys.argv[1:])])
    print(f"Measured on {torch.get_num_threads()} threads ({device}), torch {torch.__version__}, {date.today()}; "
          f"{len(data)} images at {args.size} px, {args.arch} features cached, {args.hidden} decoder channels, "
          f"{args.epochs} epochs.\n")
    print(f"| head | whole {args.size} px images (ms per image-epoch) | {args.windows} px windows | speed-up |\n"
          "| --- | --- | --- | --- |")
    for name in whole:
        print(f"| {name} | {whole[name]:.1f} | {windows[name]:.1f} | {whole[name] / windows[name]:.1f}x |")
    print(f"\nCommand: `.venv/bin/python {command}`")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", help="a DAX home with ingested, labelled images (else random images)")
    parser.add_argument("--labels", help="the corpus' labels.parquet (with --home)")
    parser.add_argument("--arch", default="vit_tiny_patch16")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--images", type=int, default=256, help="random images when no home is given")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's); 1 on a busy shared machine")
    parser.add_argument("--quick", action="store_true", help="64 random images at 64 px, 5 epochs")
    parser.add_argument("--windows", type=int, default=0, metavar="CROP",
                        help="time the dense heads on whole images against CROP px training windows instead")
    parser.add_argument("--hidden", type=int, default=32, help="dense decoder channels (with --windows)")
    args = parser.parse_args()
    if args.quick:
        args.images, args.size, args.epochs, args.home = 64, 64, 5, None
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.home:
        from tasks.heads.data import load_head_dataset
        data = load_head_dataset(Path(args.home), Path(args.labels), size=args.size)
        what = f"{len(data)} labelled images of the home"
    else:
        data = synthetic_dataset(args.images, args.size)
        what = f"{len(data)} random images"
    torch.manual_seed(0)
    backbone = create_backbone(args.arch, 1, img_size=args.size).to(device).eval()

    with tempfile.TemporaryDirectory() as cache:
        began = time.perf_counter()
        store = FeatureStore.compute(backbone, data.images, device=device, cache_dir=Path(cache),
                                     data_digest=data.digest)
        extract_s = time.perf_counter() - began
        if args.windows:
            windows_table(store, data, args, device)
            return
        train_all_heads(store, data, args.epochs, device)
        cached_s = time.perf_counter() - began
        feature_mb = store.nbytes / 2 ** 20
    began = time.perf_counter()
    train_all_heads(LiveFeatures(backbone, data.images, device), data, args.epochs, device)
    live_s = time.perf_counter() - began

    command = " ".join(["benchmarks/heads.py", *map(shlex.quote, sys.argv[1:])])
    print(f"Measured on {torch.get_num_threads()} threads ({device}), Python {platform.python_version()}, "
          f"torch {torch.__version__}, {date.today()}; {what} at {args.size} px, {args.arch}, "
          f"4 heads x {args.epochs} epochs.\n")
    print("| what | seconds | against |\n| --- | --- | --- |")
    print(f"| heads on cached features (one backbone pass: {extract_s:.1f} s, {feature_mb:.1f} MiB float16 "
          f"memmaps; then 4 heads x {args.epochs} epochs) | {cached_s:.1f} | {live_s / cached_s:.1f}x faster "
          f"(target 5x) |")
    print(f"| the same heads, backbone recomputed every batch of every epoch | {live_s:.1f} | |")
    print(f"\nCommand: `.venv/bin/python {command}`")


if __name__ == "__main__":
    main()
