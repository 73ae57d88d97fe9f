"""Hand-computed checks of dax_models.metrics (kNN, classification, segmentation, screws)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dax_models.metrics import (
    as_screw_arrays,
    classification_metrics,
    dice,
    iou,
    knn_accuracy,
    knn_classify,
    match_screws,
    screw_metrics,
    segmentation_metrics,
)


# ----------------------------------------------------------------------------- kNN
def _dino_knn_reference(train, train_labels, test, k, T, num_classes):
    """DINO eval_knn.knn_classifier's prediction, one chunk, one-hot formulation."""
    train = torch.nn.functional.normalize(train, dim=1)
    test = torch.nn.functional.normalize(test, dim=1)
    sim = test @ train.T
    dist, idx = sim.topk(k, dim=1, largest=True, sorted=True)
    neighbours = train_labels.view(1, -1).expand(test.shape[0], -1).gather(1, idx)
    one_hot = torch.zeros(test.shape[0] * k, num_classes).scatter_(1, neighbours.reshape(-1, 1), 1)
    probs = (one_hot.view(test.shape[0], k, num_classes) * (dist / T).exp().unsqueeze(-1)).sum(1)
    return probs.argmax(1)


def test_knn_weights_beat_majority_when_k_exceeds_class_size():
    # class 0: 5 points at angle ~0; class 1: 30 points at angle ~90 deg. k=20 > 5.
    g = torch.Generator().manual_seed(0)
    a0 = 0.05 * torch.randn(5, generator=g)
    a1 = math.pi / 2 + 0.05 * torch.randn(30, generator=g)
    angles = torch.cat([a0, a1])
    train = torch.stack([angles.cos(), angles.sin()], 1) * 3.0   # norm must not matter
    labels = torch.tensor([0] * 5 + [1] * 30)
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    pred = knn_classify(train, labels, test, num_classes=2, k=20, temperature=0.07)
    # 15 of the 20 neighbours of test[0] are class 1, but exp(sim / T) favours class 0
    assert pred.tolist() == [0, 1]
    assert knn_accuracy(train, labels, test, torch.tensor([0, 1]), 2, k=20) == 1.0


def test_knn_temperature_by_hand():
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    train = torch.tensor([[1.0, 0.0], [c, s], [c, -s]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.0]])
    # T=1: class 0 gets e^1 = 2.72, class 1 gets 2 e^0.866 = 4.75
    assert knn_classify(train, labels, test, 2, k=3, temperature=1.0).tolist() == [1]
    # T=0.07: e^14.29 = 1.6e6 vs 2 e^12.37 = 4.7e5
    assert knn_classify(train, labels, test, 2, k=3, temperature=0.07).tolist() == [0]
    # k larger than the training set is clamped
    assert knn_classify(train, labels, test, 2, k=50, temperature=1.0).tolist() == [1]


def test_knn_matches_dino_reference_and_chunking():
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(60, 8, generator=g), torch.randn(17, 8, generator=g)
    labels = torch.randint(0, 4, (60,), generator=g)
    ref = _dino_knn_reference(train, labels, test, k=10, T=0.07, num_classes=4)
    for chunk in (3, 256):
        out = knn_classify(train, labels, test, 4, k=10, temperature=0.07, chunk_size=chunk)
        assert torch.equal(out, ref)


# -------------------------------------------------------------------- classification
def test_classification_metrics_by_hand():
    target = [0, 0, 1, 1, 2, 2]
    pred = [0, 1, 1, 1, 0, 2]
    m = classification_metrics(torch.tensor(pred), np.array(target), num_classes=4)
    assert m["confusion_matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # class 3 is absent from pred and target: left out of the macro averages
    assert m["precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert m["recall"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert m["f1"] == pytest.approx((1 / 2 + 0.8 + 2 / 3) / 3)
    assert m["per_class"]["support"] == [2, 2, 2, 0]
    assert m["num_samples"] == 6


def test_classification_class_only_predicted_counts_with_zero():
    # class 2 is predicted once but never true: precision 0, recall 0 -> F1 0, included
    m = classification_metrics([0, 1, 2], [0, 1, 1], num_classes=3)
    assert m["precision"] == pytest.approx((1 + 1 + 0) / 3)
    assert m["recall"] == pytest.approx((1 + 0.5 + 0) / 3)


# ---------------------------------------------------------------------- segmentation
def test_dice_iou_small_masks():
    pred = np.zeros((4, 4), bool)
    pred[0:2, 0:2] = True                 # 4 px
    target = np.zeros((4, 4), bool)
    target[0:2, 0:3] = True               # 6 px, overlap 4
    assert dice(pred, target) == pytest.approx(2 * 4 / (4 + 6))
    assert iou(pred, target) == pytest.approx(4 / 6)
    empty = np.zeros((4, 4), bool)
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
    assert dice(empty, target) == 0.0 and iou(pred, empty) == 0.0
    # batch (B, 1, H, W): mean over images of (0.8, 1.0) and (2/3, 1.0)
    batch_p = torch.from_numpy(np.stack([pred, empty]))[:, None]
    batch_t = torch.from_numpy(np.stack([target, empty]))[:, None]
    m = segmentation_metrics(batch_p, batch_t)
    assert m["dice"] == pytest.approx(0.9)
    assert m["iou"] == pytest.approx((2 / 3 + 1) / 2)
    # float masks are thresholded at 0.5
    assert dice(pred.astype(np.float32) * 0.9, target) == pytest.approx(0.8)


# ---------------------------------------------------------------------------- screws
def _one(head, tip, score=1.0):
    return {"head": head, "tip": tip, "score": score}


def test_screw_l1_of_known_offset_and_zero_angle():
    truth = [[_one((10, 20), (10, 60))]]
    pred = [[_one((13, 16), (13, 56), 0.9)]]           # shifted by (+3, -4)
    m = screw_metrics(pred, truth)
    assert m["head_l1_px"] == pytest.approx(7.0)
    assert m["tip_l1_px"] == pytest.approx(7.0)
    assert m["angle_deg"] == pytest.approx(0.0, abs=1e-6)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 0, 0)
    assert m["precision"] == m["recall"] == m["f1"] == 1.0


@pytest.mark.parametrize("tip, angle, tip_l1", [
    ((10, 0), 90.0, 20.0),
    ((10, 10), 45.0, 10.0),
    ((0, -10), 180.0, 20.0),
])
def test_screw_angle_of_known_rotation(tip, angle, tip_l1):
    truth = [{"heads": [[0, 0]], "tips": [[0, 10]]}]
    pred = [{"heads": [[0, 0]], "tips": [tip], "scores": [1.0]}]
    m = screw_metrics(pred, truth)
    assert m["angle_deg"] == pytest.approx(angle, abs=1e-4)
    assert m["head_l1_px"] == 0.0
    assert m["tip_l1_px"] == pytest.approx(tip_l1)


TRUTH = np.array([[10, 10, 10, 50],       # A
                  [100, 10, 100, 50],     # B
                  [200, 200, 240, 200]],  # C
                 dtype=float)


def test_matching_shuffled_order_picks_right_pairs():
    preds = np.array([[201, 201, 241, 199],   # ~C
                      [11, 10, 10, 51],       # ~A
                      [100, 12, 101, 50]],    # ~B
                     dtype=float)
    m = match_screws(preds[:, :2], preds[:, 2:], np.ones(3), TRUTH[:, :2], TRUTH[:, 2:])
    pairs = dict(zip(m.pred_idx.tolist(), m.true_idx.tolist()))
    assert pairs == {0: 2, 1: 0, 2: 1}
    # shuffle the truths as well: pairs follow
    perm = np.array([2, 0, 1])
    m = match_screws(preds[:, :2], preds[:, 2:], None, TRUTH[perm, :2], TRUTH[perm, 2:])
    pairs = dict(zip(m.pred_idx.tolist(), m.true_idx.tolist()))
    assert {p: int(perm[t]) for p, t in pairs.items()} == {0: 2, 1: 0, 2: 1}


def test_matching_missing_and_extra_screw():
    preds = np.array([[400, 400, 400, 440, 0.9],   # extra, far from every truth
                      [201, 201, 241, 199, 0.8],   # ~C: head L1 2, tip L1 2
                      [100, 10, 100, 50, 0.2],     # ~B but below the score threshold
                      [11, 10, 10, 51, 0.7]])      # ~A: head L1 1, tip L1 1
    # gated: the extra one cannot take B. (Gating only after a plain assignment would
    # give 1 TP here: extra->C, ~C->B, ~A->A has the lower total cost, 1382 < 1384.)
    m = screw_metrics([preds], [TRUTH], score_threshold=0.5, max_distance=20)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 1, 1)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["head_l1_px"] == pytest.approx(1.5) and m["tip_l1_px"] == pytest.approx(1.5)
    match = match_screws(preds[:, :2], preds[:, 2:4], preds[:, 4], TRUTH[:, :2], TRUTH[:, 2:],
                         max_distance=20)
    assert dict(zip(match.pred_idx.tolist(), match.true_idx.tolist())) == {3: 0, 1: 2}
    assert match.num_pred == 3 and match.num_true == 3
    # ungated: the Hungarian assignment pairs the extra prediction with B
    m = screw_metrics([preds], [TRUTH], score_threshold=0.5)
    assert (m["tp"], m["fp"], m["fn"]) == (3, 0, 0)
    # missing only: 2 kept predictions for 3 truths
    m = screw_metrics([preds[1:]], [TRUTH])
    assert (m["tp"], m["fp"], m["fn"]) == (2, 0, 1)
    assert m["precision"] == 1.0 and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(0.8)


def test_screw_metrics_empty_images():
    empty = np.zeros((0, 4))
    m = screw_metrics([[], empty], [empty, []])
    assert (m["tp"], m["fp"], m["fn"]) == (0, 0, 0)
    assert m["precision"] == m["recall"] == m["f1"] == 1.0
    assert math.isnan(m["head_l1_px"]) and math.isnan(m["angle_deg"])
    # an image with only a false positive, an empty one, and one with only a miss
    m = screw_metrics([[_one((0, 0), (0, 9))], [], []],
                      [[], [], [_one((5, 5), (5, 20))]])
    assert (m["tp"], m["fp"], m["fn"], m["num_images"]) == (0, 1, 1, 3)
    assert m["precision"] == m["recall"] == m["f1"] == 0.0
    assert math.isnan(m["tip_l1_px"])


def test_as_screw_arrays_forms_agree():
    rows = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.5]])
    a = as_screw_arrays(rows)
    b = as_screw_arrays([_one((1, 2), (3, 4), 0.5)])
    c = as_screw_arrays({"heads": [[1, 2]], "tips": [[3, 4]], "scores": [0.5]})
    for x, y in ((a, b), (a, c)):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)
