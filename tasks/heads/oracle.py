"""Oracles of the dense heads' target spaces: how well a PERFECT head of a given design could do.

The ground truth, in native pixels, goes the way a prediction comes back, in reverse: into the letterboxed
input (``Letterbox``), encoded as the head's training targets on its output grid, decoded by the head's
own post-processing, mapped back to the native detector grid and scored there with the metrics the
heads are reported with. Whatever the features, no trained head of that design can beat its oracle, so
the oracle is what caps a figure when the design is wrong (a stride-16 grid for 10-px-wide metal).

- ``metal_oracle``: the metal fraction of each cell of the decoder's grid, as logits
  (``mask_logits_on_grid``) -> ``upsample_logits`` -> sigmoid > 0.5 -> ``mask_to_native``; Dice and IoU
  over images with metal (``native_segmentation_metrics``' convention).
- ``screw_oracle``: ``screw_targets`` on the head's grid used as its outputs (the heatmap as logits) ->
  ``decode_screws`` -> ``screw_metrics_at_native`` with the evaluation's matching gate.

``tests/test_dense_oracle.py`` holds both to the paper's range on demo-preset labels.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dax_models.augment import Letterbox, mask_to_input, mask_to_native
from dax_models.heads import decode_screws, mask_logits_on_grid, screw_targets, upsample_logits
from dax_models.metrics import segmentation_metrics
from tasks.heads.evaluation import screw_metrics_at_native

__all__ = ["metal_oracle", "screw_oracle"]


def metal_oracle(native_masks: Sequence[np.ndarray], boxes: Sequence[Letterbox], stride: int) -> dict:
    """Dice / IoU at native resolution of the perfect metal decoder whose logits live at ``stride`` of the input,
    over the images that show metal (``images``: how many)."""
    dice, iou = [], []
    for mask, box in zip(native_masks, boxes):
        if not mask.any():
            continue
        logits = mask_logits_on_grid(mask_to_input(mask, box)[None], stride)
        probability = torch.sigmoid(upsample_logits(logits, (box.size, box.size)))[0, 0]
        m = segmentation_metrics(torch.from_numpy(mask_to_native(probability, box)), torch.from_numpy(mask))
        dice.append(m["dice"])
        iou.append(m["iou"])
    return {"dice": float(np.mean(dice)) if dice else float("nan"), "iou": float(np.mean(iou)) if iou else float("nan"),
            "images": len(dice)}


def _perfect_outputs(targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"heatmap": torch.logit(targets["heatmap"].clamp(1e-4, 1 - 1e-4)), "offset": targets["offset"],
            "vectors": targets["vectors"]}


def screw_oracle(native_screws: Sequence[np.ndarray], boxes: Sequence[Letterbox], stride: int, gate: float = 0.05,
                 sigma: float = 2.0, reach: int = 2, max_screws: int = 50) -> dict:
    """Precision, recall, head/tip L1 (native px) and angle of the perfect screw head on a stride-``stride`` grid,
    with the evaluation's matching gate (a share of each image's native long side); ``reach`` as ``screw_targets``'."""
    predictions = []
    for screws, box in zip(native_screws, boxes):
        grid = (box.size // stride, box.size // stride)
        targets = screw_targets([box.screws_to_input(screws)], (box.size, box.size), grid, sigma=sigma, reach=reach)
        predictions += decode_screws(_perfect_outputs(targets), (box.size, box.size), max_screws=max_screws,
                                     threshold=0.5)
    return screw_metrics_at_native(predictions, boxes, native_screws, score_threshold=0.5, gate=gate)
