"""Floors: what the heads must beat without any backbone, on the same images, splits and metrics.

- ``region``: a logistic regression on 32 x 32 thumbnails (the linear probe's floor: ``accuracy``,
  ``precision``, ``recall``, ``f1``; ``fit_classifier``'s linear head, standardised inputs, best
  validation epoch) and DINO's weighted kNN (k=20, T=0.07) on 16 x 16 thumbnails (``knn_accuracy``).
- ``metal``: the best intensity threshold relative to each image's own range (the evaluation images are
  min-max scaled over their region of interest, so a threshold on them is one on the image's range), and
  the side of it metal is on, both chosen by mean Dice on training images that show metal; scored like
  the decoder, at native resolution (``native_segmentation_metrics``).
- ``screws``: no non-learned baseline: none.

Thumbnails are area averages of the letterboxed evaluation images (``HeadDataset.images``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dax_models.metrics import classification_metrics, dice, knn_classify
from tasks.heads.data import HeadDataset
from tasks.heads.evaluation import classifier_probabilities, native_segmentation_metrics
from tasks.heads.training import TaskResult, fit_classifier

__all__ = ["FLOOR_TASKS", "ThumbnailFeatures", "metal_threshold_floor", "region_floors", "run_floor"]

FLOOR_TASKS = ("region", "metal")
THRESHOLDS = np.round(np.arange(0.05, 0.96, 0.05), 2)


class ThumbnailFeatures:
    """``FeatureStore``'s ``get`` over thumbnails: part ``"t<side>"`` is the (n, side * side) area-averaged image."""

    def __init__(self, images: torch.Tensor, sides=(16, 32)):
        self.parts = {f"t{s}": F.adaptive_avg_pool2d(images.float(), s).flatten(1) for s in sides}

    def get(self, part: str, idx, device="cpu") -> torch.Tensor:
        return self.parts[part][torch.as_tensor(np.asarray(idx, dtype=np.int64))].to(device)


def region_floors(data: HeadDataset, config, seed: int, train: np.ndarray, val: np.ndarray,
                  test: np.ndarray) -> dict[str, float]:
    """Logistic regression on 32 x 32 thumbnails and kNN on 16 x 16 ones (module docstring)."""
    num_classes = len(data.classes)
    labels = data.regions
    thumbs = ThumbnailFeatures(data.images)
    head, _ = fit_classifier(thumbs, "t32", train, labels, num_classes, kind="linear", epochs=config.linear_epochs,
                             lr=config.linear_lr, weight_decay=config.weight_decay, batch_size=config.batch_size,
                             seed=seed, val_idx=val, eval_every=config.eval_every)
    probs = classifier_probabilities(head, thumbs, "t32", test, "cpu")
    metrics = classification_metrics(probs.argmax(1), labels[test], num_classes)
    result = {k: float(metrics[k]) for k in ("accuracy", "precision", "recall", "f1")}
    result["per_image_correct"] = (probs.argmax(1) == labels[test].numpy()).astype(float).tolist()
    knn = knn_classify(thumbs.get("t16", train), labels[train], thumbs.get("t16", test), num_classes,
                       k=config.knn_k, temperature=config.knn_temperature)
    result["knn_accuracy"] = float((knn.cpu() == labels[test]).float().mean())
    return result


def metal_threshold_floor(data: HeadDataset, train: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """The best (threshold, side) on training images with metal, scored at native resolution on ``test``."""
    with_metal = np.asarray([int(i) for i in train if bool(data.masks[i].any())], dtype=np.int64)
    if not len(with_metal):
        raise ValueError("the metal floor needs training images that show metal")
    images = data.images[with_metal, 0].float()
    truth = data.masks[with_metal]
    best = (-1.0, 0.5, 1)
    for t in THRESHOLDS:
        for side in (1, -1):                      # metal brighter (+1) or darker (-1) than the threshold
            pred = images > t if side > 0 else images < t
            score = dice(pred, truth)
            if score > best[0]:
                best = (score, float(t), side)
    _, threshold, side = best
    x = data.images[test, 0].float()
    probabilities = ((x > threshold) if side > 0 else (x < threshold)).float()
    metrics = native_segmentation_metrics(probabilities, data, test)
    per_image = metrics.pop("per_image_dice")
    return {**{k: float(v) for k, v in metrics.items()}, "threshold": threshold, "metal_side": float(side),
            "per_image_dice": per_image}


def run_floor(task: str, seed: int, data: HeadDataset, config) -> TaskResult:
    """The floor of ``task`` (region or metal) on ``data``'s splits, as a ``TaskResult`` without a head and with a
    NaN validation score (no floor is a candidate for registration)."""
    if task not in FLOOR_TASKS:
        raise ValueError(f"no floor for {task!r}; floors: {', '.join(FLOOR_TASKS)}")
    train, val, test = data.indices("train"), data.indices("val"), data.indices("test")
    if task == "region":
        metrics = region_floors(data, config, seed, train, val, test)
        return TaskResult("region", seed, metrics, float("nan"), per_image={"accuracy": metrics.pop("per_image_correct")})
    metrics = metal_threshold_floor(data, train, test)
    return TaskResult("metal", seed, metrics, float("nan"), per_image={"dice": metrics.pop("per_image_dice")})
