"""Evaluation of the heads on held-out patients, at NATIVE resolution (where the labels live).

- ``metal``: Dice and IoU of the prediction cut out of the letterbox and resized to the detector grid,
  averaged over test images that show metal; ``dice_all`` over every test image.
- ``screws``: predictions mapped back to NATIVE pixels, then DAX's metrics (``screw_metrics``): mean L1
  (Manhattan) error of matched heads and tips, mean head->tip angle error, precision/recall/F1.
  Matching gate: a prediction matches a true screw only when its mean endpoint L1 error,
  (L1(head) + L1(tip)) / 2, is at most ``gate`` (5 %) of the image's native long side
  (49 px at DAX's 976 px): a detection that far off is a false positive plus a false negative,
  not a localisation error that would swamp the L1 means. Images are grouped by native long side
  for the gate and the groups pooled (sums of TP/FP/FN, L1 and angle means weighted by matches).
- ``region``: softmax probabilities of a classifier head (``classifier_probabilities``).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from dax_models.augment import Letterbox, mask_to_native
from dax_models.heads import decode_screws
from dax_models.metrics import detection_scores, screw_metrics, segmentation_metrics
from tasks.heads.data import HeadDataset

__all__ = ["PATIENT_STATISTICS", "batches", "classifier_probabilities", "evaluate_screws", "native_screw_metrics",
           "native_segmentation_metrics", "patient_interval", "predict_masks", "predict_screws",
           "screw_counts_per_image", "screw_metrics_at_native"]


def batches(idx: np.ndarray, batch_size: int, generator: torch.Generator | None) -> list[np.ndarray]:
    """Shuffled near-equal batches (never a batch of 1 when there are 2 or more samples: BatchNorm)."""
    idx = np.asarray(idx)
    if generator is not None:
        idx = idx[torch.randperm(len(idx), generator=generator).numpy()]
    count = max(1, math.ceil(len(idx) / batch_size))
    return [b for b in np.array_split(idx, count) if len(b)]


def classifier_probabilities(head: nn.Module, source, part: str, idx: np.ndarray, device,
                         batch_size: int = 1024) -> np.ndarray:
    """Softmax probabilities (n, C) of ``head`` on rows ``idx``."""
    was_training = head.training
    head.eval()
    out = []
    with torch.no_grad():
        for b in batches(idx, batch_size, None):
            out.append(torch.softmax(head(source.get(part, b, device)).float(), dim=1).cpu())
    head.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


def predict_masks(decoder: nn.Module, source, idx: np.ndarray, size: int, device, batch_size: int = 32) -> torch.Tensor:
    """Metal probabilities (n, S, S) float32 on CPU."""
    decoder.eval()
    out = []
    with torch.no_grad():
        for b in batches(idx, batch_size, None):
            out.append(torch.sigmoid(decoder(source.get("maps", b, device), (size, size))[:, 0].float()).cpu())
    return torch.cat(out) if out else torch.zeros(0, size, size)


def predict_screws(head: nn.Module, source, idx: np.ndarray, size: int, device, threshold: float = 0.05,
                   max_screws: int = 20, batch_size: int = 32) -> list[list[dict]]:
    """Per image the decoded screws in INPUT pixels (score >= ``threshold``), best first."""
    head.eval()
    result: list[list[dict]] = []
    with torch.no_grad():
        for b in batches(idx, batch_size, None):
            out = head(source.get("maps", b, device))
            result += decode_screws({k: v.float().cpu() for k, v in out.items()}, (size, size),
                                    max_screws=max_screws, threshold=threshold)
    return result


def native_segmentation_metrics(probabilities: torch.Tensor, data: HeadDataset, idx: Sequence[int]) -> dict:
    """Dice and IoU at NATIVE resolution: over test images with metal ('dice', 'iou'), and over all;
    ``per_image_dice``: each image's Dice, NaN for images without metal (for ``patient_interval``)."""
    per_image = []
    for p, i in zip(probabilities, idx):
        pred = mask_to_native(p, data.boxes[i])
        truth = data.native_mask(i)
        m = segmentation_metrics(torch.from_numpy(pred), torch.from_numpy(truth))
        per_image.append((bool(truth.any()), m["dice"], m["iou"]))
    with_metal = [(d, j) for has, d, j in per_image if has]
    mean = (lambda v: float(np.mean(v)) if len(v) else float("nan"))
    return {"dice": mean([d for d, _ in with_metal]), "iou": mean([j for _, j in with_metal]),
            "dice_all": mean([d for _, d, _ in per_image]), "iou_all": mean([j for _, _, j in per_image]),
            "test_with_metal": len(with_metal),
            "per_image_dice": [d if has else float("nan") for has, d, _ in per_image]}


def native_screw_metrics(predictions: Sequence[Sequence[dict]], data: HeadDataset, idx: Sequence[int],
                         score_threshold: float = 0.5, gate: float = 0.05) -> dict:
    """DAX's screw metrics at NATIVE resolution for images ``idx`` of ``data`` (predictions in INPUT pixels):
    ``screw_metrics_at_native`` on their letterboxes and native labels."""
    return screw_metrics_at_native(predictions, [data.boxes[i] for i in idx], [data.native_screws[i] for i in idx],
                                   score_threshold, gate)


def screw_metrics_at_native(predictions: Sequence[Sequence[dict]], boxes: Sequence[Letterbox],
                            truths: Sequence[np.ndarray], score_threshold: float = 0.5, gate: float = 0.05) -> dict:
    """DAX's screw metrics at NATIVE resolution (predictions in INPUT pixels, truths (K, 4) in native pixels).

    Each image's predictions are mapped back with its ``Letterbox``; images are grouped by native long
    side so the gate is ``gate`` x long side in each group; groups are pooled (module docstring).
    ``gate_px`` is the gate in native pixels, averaged over images.
    """
    groups: dict[int, tuple[list, list]] = {}
    for pred, box, truth in zip(predictions, boxes, truths):
        rows = np.asarray([[*p["head"], *p["tip"], p["score"]] for p in pred], dtype=np.float64).reshape(-1, 5)
        native = box.screws_to_native(rows) if len(rows) else rows
        side = max(box.native_h, box.native_w)
        groups.setdefault(side, ([], []))
        groups[side][0].append(native)
        groups[side][1].append(truth)
    tp = fp = fn = n_pred = n_true = 0
    sums = {"head_l1_px": 0.0, "tip_l1_px": 0.0, "angle_deg": 0.0}
    weights = dict.fromkeys(sums, 0)
    for side, (preds, truths_of_side) in sorted(groups.items()):
        m = screw_metrics(preds, truths_of_side, score_threshold=score_threshold, max_distance=gate * side)
        tp, fp, fn = tp + m["tp"], fp + m["fp"], fn + m["fn"]
        n_pred, n_true = n_pred + m["num_pred"], n_true + m["num_true"]
        for key in sums:
            if m["tp"] and not math.isnan(m[key]):
                sums[key] += m[key] * m["tp"]
                weights[key] += m["tp"]
    precision, recall, f1 = detection_scores(tp, n_pred, n_true)
    result = {key: (sums[key] / weights[key] if weights[key] else float("nan")) for key in sums}
    gate_px = [gate * side for side, (preds, _) in groups.items() for _ in preds]
    result.update(precision=float(precision), recall=float(recall), f1=float(f1), tp=int(tp), fp=int(fp), fn=int(fn),
                  num_pred=int(n_pred), num_true=int(n_true), num_images=len(boxes),
                  gate_px=float(np.mean(gate_px)) if gate_px else float("nan"))
    return result


def screw_counts_per_image(predictions: Sequence[Sequence[dict]], data: HeadDataset, idx: Sequence[int],
                           score_threshold: float, gate: float) -> dict[str, list[float]]:
    """Each image's matched (tp), spurious (fp) and missed (fn) screws, as ``native_screw_metrics`` counts them."""
    counts: dict[str, list[float]] = {"tp": [], "fp": [], "fn": []}
    for pred, i in zip(predictions, idx):
        m = native_screw_metrics([pred], data, [i], score_threshold=score_threshold, gate=gate)
        for key, values in counts.items():
            values.append(float(m[key]))
    return counts


def _ratio(key: str):
    """recall = tp / (tp + fn), precision = tp / (tp + fp) over pooled per-image counts."""
    other = {"recall": "fn", "precision": "fp"}[key]
    return lambda v, rows: v["tp"][rows].sum() / max(1.0, v["tp"][rows].sum() + v[other][rows].sum())


PATIENT_STATISTICS = {
    "accuracy": lambda v, rows: float(np.nanmean(v["accuracy"][rows])),
    "dice": lambda v, rows: float(np.nanmean(v["dice"][rows])),
    "recall": _ratio("recall"),
    "precision": _ratio("precision"),
}


def patient_interval(per_image: dict[str, Sequence[float]], patients: Sequence[str], metric: str,
                     minus: dict[str, Sequence[float]] | None = None, draws: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float]:
    """A 95 % percentile-bootstrap interval of ``metric`` (``PATIENT_STATISTICS``) resampling PATIENTS, not images
    (a patient's images are not independent). With ``minus`` (the same images scored by another method, e.g. a
    floor) the interval is of the paired difference. Returns {"value", "low", "high", "patients"}."""
    statistic = PATIENT_STATISTICS[metric]
    values = {k: np.asarray(v, dtype=np.float64) for k, v in per_image.items()}
    other = {k: np.asarray(v, dtype=np.float64) for k, v in (minus or {}).items()}
    keys = sorted(set(patients))
    rows_of = {p: np.flatnonzero(np.asarray(patients) == p) for p in keys}

    def score(rows: np.ndarray) -> float:
        return statistic(values, rows) - (statistic(other, rows) if minus is not None else 0.0)

    everything = np.arange(len(patients))
    rng = np.random.default_rng(seed)
    samples = []
    with np.errstate(all="ignore"):
        for _ in range(draws):
            picked = rng.integers(0, len(keys), len(keys))
            samples.append(score(np.concatenate([rows_of[keys[j]] for j in picked])))
        samples = np.asarray(samples)
        samples = samples[np.isfinite(samples)]
        tail = 100 * (1 - level) / 2
        low, high = (np.percentile(samples, [tail, 100 - tail]) if len(samples) else (float("nan"),) * 2)
        return {"value": float(score(everything)), "low": float(low), "high": float(high), "patients": len(keys)}


def evaluate_screws(predictions, data: HeadDataset, idx, gate: float, thresholds=None) -> tuple[float, dict]:
    """The score threshold with the best F1 (ties: the higher threshold) and its metrics."""
    best_t, best = 0.5, None
    for t in thresholds if thresholds is not None else np.round(np.arange(0.1, 0.91, 0.1), 2):
        m = native_screw_metrics(predictions, data, idx, score_threshold=float(t), gate=gate)
        if best is None or m["f1"] >= best["f1"]:
            best_t, best = float(t), m
    return best_t, best

