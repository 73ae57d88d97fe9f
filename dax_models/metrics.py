"""Evaluation metrics for the DAX downstream tasks (pure torch / numpy / scipy).

- kNN classification on frozen features: DINO's weighted kNN
  (facebookresearch/dino, ``eval_knn.py``, ``knn_classifier``).
- Classification: accuracy, macro precision / recall / F1, confusion matrix.
- Segmentation: Dice and IoU of boolean masks.
- Screws: Hungarian matching of (head, tip) pairs and the screw-detector metrics
  (JoshuaScheuplein/medical-screw-detector): head / tip Manhattan error in pixels,
  head->tip angle error in degrees, precision / recall / F1.

Screw convention: a screw is a head (x, y) and a tip (x, y) in pixels of the image
given to the backbone (x = column, y = row).
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

__all__ = [
    "knn_classify",
    "knn_accuracy",
    "classification_metrics",
    "dice",
    "iou",
    "segmentation_metrics",
    "as_screw_arrays",
    "ScrewMatch",
    "match_screws",
    "screw_metrics",
]


# --------------------------------------------------------------------------- kNN
@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Weighted kNN predictions, as DINO's ``knn_classifier``.

    Features are L2-normalised; similarity is cosine; the k most similar training
    samples vote for their label with weight ``exp(sim / temperature)``; the class
    with the largest summed weight wins (ties: lowest class index).
    ``k`` is clamped to the number of training samples. Test features are processed
    in chunks of ``chunk_size`` rows (memory ~ chunk_size x N_train).

    Returns: (N_test,) int64 predictions on the device of ``train_features``.
    """
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError("features must be 2-D (N, D)")
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError("train_features and train_labels differ in length")
    device = train_features.device
    train = F.normalize(train_features.float(), dim=1, p=2)
    test = F.normalize(test_features.float().to(device), dim=1, p=2)
    labels = train_labels.to(device=device, dtype=torch.long).view(-1)
    k = max(1, min(int(k), train.shape[0]))
    preds = []
    for start in range(0, test.shape[0], chunk_size):
        chunk = test[start:start + chunk_size]
        sim = chunk @ train.T                                  # (b, N_train)
        top_sim, top_idx = sim.topk(k, dim=1, largest=True, sorted=True)
        weights = (top_sim / temperature).exp()                 # (b, k)
        votes = torch.zeros(chunk.shape[0], num_classes, device=device)
        votes.scatter_add_(1, labels[top_idx], weights)        # sum of weights per class
        preds.append(votes.argmax(dim=1))
    if not preds:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(preds)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 256,
) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of :func:`knn_classify`."""
    pred = knn_classify(train_features, train_labels, test_features, num_classes,
                        k=k, temperature=temperature, chunk_size=chunk_size)
    target = test_labels.to(pred.device).long().view(-1)
    if target.numel() == 0:
        return float("nan")
    return (pred == target).float().mean().item()


# ----------------------------------------------------------------- classification
def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def classification_metrics(pred: Any, target: Any, num_classes: int) -> dict:
    """Accuracy, macro precision / recall / F1 and the confusion matrix.

    ``pred`` and ``target``: integer class indices in [0, num_classes).
    Per class c: precision = TP / (TP + FP), recall = TP / (TP + FN),
    F1 = 2PR / (P + R); a zero denominator gives 0.
    Macro averages run over the classes that occur in ``pred`` or ``target``;
    classes absent from both are excluded (they have no defined P / R).

    Returns keys: accuracy, precision, recall, f1 (floats), num_samples,
    confusion_matrix (nested list, rows = true class, columns = predicted class),
    per_class (dict of lists over all classes: precision, recall, f1, support).
    """
    p = _to_numpy(pred).astype(np.int64).ravel()
    t = _to_numpy(target).astype(np.int64).ravel()
    if p.shape != t.shape:
        raise ValueError(f"pred and target differ in length: {p.shape} vs {t.shape}")
    if p.size and (min(p.min(), t.min()) < 0 or max(p.max(), t.max()) >= num_classes):
        raise ValueError("class index out of range [0, num_classes)")
    cm = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    cm = cm.reshape(num_classes, num_classes)
    tp = np.diag(cm).astype(np.float64)
    n_pred = cm.sum(axis=0).astype(np.float64)
    n_true = cm.sum(axis=1).astype(np.float64)
    precision = np.where(n_pred > 0, tp / np.maximum(n_pred, 1), 0.0)
    recall = np.where(n_true > 0, tp / np.maximum(n_true, 1), 0.0)
    denom = precision + recall
    f1 = np.where(denom > 0, 2 * precision * recall / np.maximum(denom, 1e-300), 0.0)
    present = (n_pred > 0) | (n_true > 0)

    def macro(v: np.ndarray) -> float:
        return float(v[present].mean()) if present.any() else float("nan")

    return {
        "accuracy": float(tp.sum() / p.size) if p.size else float("nan"),
        "precision": macro(precision),
        "recall": macro(recall),
        "f1": macro(f1),
        "num_samples": int(p.size),
        "confusion_matrix": cm.tolist(),
        "per_class": {
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "f1": f1.tolist(),
            "support": n_true.astype(np.int64).tolist(),
        },
    }


# ------------------------------------------------------------------ segmentation
def _masks(x: Any) -> torch.Tensor:
    """(H, W) -> (1, H*W); (B, ...) -> (B, prod(...)) as bool.

    bool / integer inputs: nonzero = foreground; floating inputs: > 0.5.
    """
    m = torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x.detach()
    if m.dtype.is_floating_point:
        m = m > 0.5
    else:
        m = m != 0
    if m.ndim < 2:
        raise ValueError("masks need at least 2 dimensions (H, W)")
    if m.ndim == 2:
        m = m.unsqueeze(0)
    return m.reshape(m.shape[0], -1).cpu()


def _overlap(pred_mask: Any, target_mask: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p, t = _masks(pred_mask), _masks(target_mask)
    if p.shape != t.shape:
        raise ValueError(f"mask shapes differ: {tuple(p.shape)} vs {tuple(t.shape)}")
    inter = (p & t).sum(1).double()
    return inter, p.sum(1).double(), t.sum(1).double()


def _per_image_dice(pred_mask: Any, target_mask: Any) -> torch.Tensor:
    inter, sp, st = _overlap(pred_mask, target_mask)
    denom = sp + st
    return torch.where(denom > 0, 2 * inter / denom.clamp(min=1), torch.ones_like(denom))


def _per_image_iou(pred_mask: Any, target_mask: Any) -> torch.Tensor:
    inter, sp, st = _overlap(pred_mask, target_mask)
    union = sp + st - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def dice(pred_mask: Any, target_mask: Any) -> float:
    """Dice = 2|P & T| / (|P| + |T|), mean over images.

    Shapes: (H, W) is one image; (B, H, W) or (B, 1, H, W) is a batch (first dim).
    bool / integer masks: nonzero = foreground; float masks are thresholded at 0.5.
    Empty prediction and empty target: 1.0 (perfect agreement).
    """
    return _per_image_dice(pred_mask, target_mask).mean().item()


def iou(pred_mask: Any, target_mask: Any) -> float:
    """IoU = |P & T| / |P | T|, mean over images; conventions as :func:`dice`."""
    return _per_image_iou(pred_mask, target_mask).mean().item()


def segmentation_metrics(pred_masks: Any, target_masks: Any) -> dict:
    """``{"dice": float, "iou": float}``, per-image means (see :func:`dice`)."""
    return {"dice": dice(pred_masks, target_masks), "iou": iou(pred_masks, target_masks)}


# ------------------------------------------------------------------------ screws
def as_screw_arrays(screws: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Screws of one image as ``(heads (N, 2), tips (N, 2), scores (N,))`` float64.

    Accepted forms:
    - a sequence of dicts ``{"head": (x, y), "tip": (x, y)[, "score": s]}``
      (the output of ``heads.decode_screws`` for one image);
    - a mapping ``{"heads": (N, 2), "tips": (N, 2)[, "scores": (N,)]}``;
    - an array / tensor (N, 4) of ``[head_x, head_y, tip_x, tip_y]`` rows
      (or (N, 5) with the score last).
    Missing scores are 1.0.
    """
    if isinstance(screws, Mapping):
        heads = _to_numpy(screws["heads"]).astype(np.float64).reshape(-1, 2)
        tips = _to_numpy(screws["tips"]).astype(np.float64).reshape(-1, 2)
        scores = screws.get("scores")
        scores = (np.ones(len(heads)) if scores is None
                  else _to_numpy(scores).astype(np.float64).reshape(-1))
    elif isinstance(screws, (np.ndarray, torch.Tensor)):
        a = _to_numpy(screws).astype(np.float64)
        a = a.reshape(0, 4) if a.size == 0 else a.reshape(len(a), -1)
        heads, tips = a[:, 0:2], a[:, 2:4]
        scores = a[:, 4] if a.shape[1] > 4 else np.ones(len(a))
    else:
        items = list(screws)
        heads = np.array([s["head"] for s in items], dtype=np.float64).reshape(-1, 2)
        tips = np.array([s["tip"] for s in items], dtype=np.float64).reshape(-1, 2)
        scores = np.array([s.get("score", 1.0) for s in items], dtype=np.float64)
    if not (len(heads) == len(tips) == len(scores)):
        raise ValueError("heads, tips and scores differ in length")
    return heads, tips, scores


class ScrewMatch(NamedTuple):
    """Result of :func:`match_screws` for one image.

    pred_idx, true_idx: matched pairs, indices into the ORIGINAL prediction / truth
    arrays (before the score threshold). num_pred: predictions kept by the score
    threshold. num_true: true screws.
    """
    pred_idx: np.ndarray
    true_idx: np.ndarray
    num_pred: int
    num_true: int


def match_screws(
    pred_heads: Any,
    pred_tips: Any,
    pred_scores: Any,
    true_heads: Any,
    true_tips: Any,
    score_threshold: float = 0.5,
    max_distance: float | None = None,
) -> ScrewMatch:
    """One-to-one Hungarian matching of predicted to true screws of one image.

    Predictions with score < ``score_threshold`` are dropped first (``pred_scores``
    None keeps all). Cost = L1(head) + L1(tip) (Manhattan, pixels), minimised by
    ``scipy.optimize.linear_sum_assignment``. Without ``max_distance`` every kept
    prediction is paired while truths remain, however far apart. With
    ``max_distance``, a pair whose mean endpoint L1, (L1(head) + L1(tip)) / 2,
    exceeds it cannot match: the assignment maximises the number of allowed pairs,
    then minimises their total cost; a prediction left unpaired is a false
    positive, a truth left unpaired a false negative.
    """
    ph = _to_numpy(pred_heads).astype(np.float64).reshape(-1, 2)
    pt = _to_numpy(pred_tips).astype(np.float64).reshape(-1, 2)
    th = _to_numpy(true_heads).astype(np.float64).reshape(-1, 2)
    tt = _to_numpy(true_tips).astype(np.float64).reshape(-1, 2)
    if pred_scores is None:
        keep = np.arange(len(ph))
    else:
        sc = _to_numpy(pred_scores).astype(np.float64).reshape(-1)
        keep = np.flatnonzero(sc >= score_threshold)
    empty = np.zeros(0, dtype=np.int64)
    if len(keep) == 0 or len(th) == 0:
        return ScrewMatch(empty, empty, int(len(keep)), int(len(th)))
    cost = (np.abs(ph[keep, None, :] - th[None, :, :]).sum(-1)
            + np.abs(pt[keep, None, :] - tt[None, :, :]).sum(-1))   # (P, T)
    if max_distance is None:
        rows, cols = linear_sum_assignment(cost)
    else:
        feasible = cost / 2.0 <= max_distance
        # an infeasible pair costs more than all feasible pairs together: the
        # assignment first maximises the number of feasible pairs, then their cost
        big = cost[feasible].sum() + 1.0
        rows, cols = linear_sum_assignment(np.where(feasible, cost, big))
        ok = feasible[rows, cols]
        rows, cols = rows[ok], cols[ok]
    order = np.argsort(cols, kind="stable")
    return ScrewMatch(keep[rows[order]].astype(np.int64), cols[order].astype(np.int64),
                      int(len(keep)), int(len(th)))


def _angle_deg(v1: np.ndarray, v2: np.ndarray) -> np.ndarray:
    """Angle between rows of v1 and v2 in degrees; NaN where a vector has length 0."""
    n1, n2 = np.linalg.norm(v1, axis=1), np.linalg.norm(v2, axis=1)
    ok = (n1 > 0) & (n2 > 0)
    cos = np.full(len(v1), np.nan)
    cos[ok] = (v1[ok] * v2[ok]).sum(1) / (n1[ok] * n2[ok])
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def detection_scores(tp: int, n_pred: int, n_true: int) -> tuple[float, float, float]:
    """Precision, recall, F1 from counts; nothing predicted and nothing to find scores 1.0, other empty
    denominators 0."""
    if n_pred == 0 and n_true == 0:
        return 1.0, 1.0, 1.0
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1


def screw_metrics(
    predictions: Sequence[Any],
    truths: Sequence[Any],
    score_threshold: float = 0.5,
    max_distance: float | None = None,
) -> dict:
    """Screw-detection metrics over a list of images.

    ``predictions[i]`` / ``truths[i]``: the screws of image i in any form accepted by
    :func:`as_screw_arrays` (truth scores are ignored). Per image, predictions are
    matched to truths by :func:`match_screws`.

    Returns:
    - head_l1_px, tip_l1_px: mean |dx| + |dy| (pixels) over matched screws;
    - angle_deg: mean angle between predicted and true head->tip directions over
      matched screws (arccos of the clipped cosine; pairs with a zero-length
      direction are left out);
    - precision = TP / (TP + FP), recall = TP / (TP + FN), f1 (TP = matched,
      FP = unmatched kept predictions, FN = unmatched truths). A zero denominator
      gives 0, except with no predictions and no truths at all: all three are 1.0;
    - tp, fp, fn, num_pred, num_true, num_images (ints).
    The L1 and angle values are NaN when nothing is matched.
    """
    if len(predictions) != len(truths):
        raise ValueError("predictions and truths differ in number of images")
    head_err, tip_err, angles = [], [], []
    tp = n_pred = n_true = 0
    for pred, true in zip(predictions, truths):
        ph, pt, ps = as_screw_arrays(pred)
        th, tt, _ = as_screw_arrays(true)
        m = match_screws(ph, pt, ps, th, tt, score_threshold=score_threshold,
                         max_distance=max_distance)
        tp += len(m.pred_idx)
        n_pred += m.num_pred
        n_true += m.num_true
        if len(m.pred_idx):
            a, b = m.pred_idx, m.true_idx
            head_err.append(np.abs(ph[a] - th[b]).sum(1))
            tip_err.append(np.abs(pt[a] - tt[b]).sum(1))
            angles.append(_angle_deg(pt[a] - ph[a], tt[b] - th[b]))
    fp, fn = n_pred - tp, n_true - tp

    def mean(parts: list) -> float:
        if not parts:
            return float("nan")
        v = np.concatenate(parts)
        v = v[~np.isnan(v)]
        return float(v.mean()) if v.size else float("nan")

    precision, recall, f1 = detection_scores(tp, n_pred, n_true)
    return {
        "head_l1_px": mean(head_err),
        "tip_l1_px": mean(tip_err),
        "angle_deg": mean(angles),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "tp": int(tp),
        "fp": int(fp),
        "fn": int(fn),
        "num_pred": int(n_pred),
        "num_true": int(n_true),
        "num_images": len(truths),
    }
