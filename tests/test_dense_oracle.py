"""Oracle round trips of the dense heads (tasks.heads.oracle) on demo-preset labels: the ground truth encoded
as each head's targets on its output grid, decoded by its own post-processing, scored at NATIVE resolution.

These guard the design: a head whose target space cannot represent the truth fails here, whatever it learns.
The thresholds are the issue's (metal Dice >= 0.95; screws recall and precision >= 0.97, head and tip
L1 <= 1.5 native px, angle <= 1 degree) at the demo's dense input (512 px) and the heads' own strides (metal 2, screws 4); the
old design (stride 16 of a 224 px input) is checked to fail them, so the test can fail.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dax_models.augment import Letterbox
from dax_models.heads import ScrewHead, SegmentationDecoder
from tasks.heads.data import screw_rows
from tasks.heads.oracle import metal_oracle, screw_oracle
from tasks.label_schema import png_to_mask
from tasks.synth.study import PRESETS, generate_study

STUDIES = 24          # ~270 images, ~300 screws of the demo preset (half-size detectors, 490-1000 px)


@pytest.fixture(scope="module")
def demo_labels(tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle-corpus")
    rows = []
    for index in range(STUDIES):
        rows += generate_study(root, 17, index, PRESETS["demo"])[0]
    return rows


def _geometry(rows, size):
    boxes = [Letterbox.of(r["rows"], r["cols"], size) for r in rows]
    return boxes, [png_to_mask(r["metal_mask_png"]) for r in rows], [screw_rows(r["screws"]) for r in rows]


VIT_TI = ([192] * 4, [16.0] * 4)                       # channels and strides of the maps each head reads
RESNET18 = ([64, 128, 256, 512], [4.0, 8.0, 16.0, 32.0])


@pytest.mark.parametrize("levels", [VIT_TI, RESNET18])
def test_heads_output_grids(levels):
    maps = [torch.zeros(1, c, int(512 / s), int(512 / s)) for c, s in zip(*levels)]
    assert SegmentationDecoder(*levels, hidden=16).grid_logits(maps).shape[-1] == 512 // 2
    assert ScrewHead(*levels, hidden=16)(maps)["heatmap"].shape[-1] == 512 // 4


def test_metal_oracle_at_the_decoders_stride_of_512_px(demo_labels):
    stride = SegmentationDecoder(*VIT_TI).out_stride
    boxes, masks, _ = _geometry(demo_labels, 512)
    result = metal_oracle(masks, boxes, stride=stride)
    assert result["images"] >= 50
    assert result["dice"] >= 0.95, result
    old_boxes, _, _ = _geometry(demo_labels, 224)
    assert metal_oracle(masks, old_boxes, stride=16)["dice"] < 0.6      # the ViT's own grid cannot
    assert metal_oracle(masks, boxes, stride=4)["dice"] < 0.95          # stride 4 misses K-wires (0.94)


def test_screw_oracle_at_the_heads_stride_of_512_px(demo_labels):
    stride = ScrewHead(*VIT_TI).out_stride
    boxes, _, screws = _geometry(demo_labels, 512)
    assert sum(len(s) for s in screws) >= 100
    result = screw_oracle(screws, boxes, stride=stride)
    assert result["num_true"] == sum(len(s) for s in screws)
    assert result["recall"] >= 0.97 and result["precision"] >= 0.97, result
    assert result["head_l1_px"] <= 1.5 and result["tip_l1_px"] <= 1.5 and result["angle_deg"] <= 1.0, result
    old_boxes, _, _ = _geometry(demo_labels, 224)
    # the old design: one peak per stride-16 cell, a screw sharing its cell is lost
    assert screw_oracle(screws, old_boxes, stride=16, reach=0)["recall"] < 0.97


def test_touching_screws_keep_their_own_peaks():
    # two screws whose midpoints share a stride-4 cell, and a third 1 px away: all three come back
    screws = np.array([[100.0, 100.0, 140.0, 104.0], [101.0, 103.0, 139.0, 99.0], [102.0, 101.0, 141.0, 102.0]])
    box = Letterbox.of(512, 512, 512)
    result = screw_oracle([screws], [box], stride=4)
    assert (result["tp"], result["fp"], result["fn"]) == (3, 0, 0)
    assert result["head_l1_px"] < 1e-3 and result["tip_l1_px"] < 1e-3
    assert screw_oracle([screws], [box], stride=4, reach=0)["recall"] < 0.7     # without moving to a free cell
