"""Shapes, target round trip and tiny overfitting runs of dax_models.heads (CPU, small)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dax_models.heads import (
    DenseDecoder,
    LinearHead,
    MLPHead,
    ScrewHead,
    SegmentationDecoder,
    decode_screws,
    map_strides,
    screw_loss,
    screw_targets,
)
from dax_models.metrics import screw_metrics

INPUT = (64, 64)


def _vit_levels(b=2, d=24):
    """4 ViT blocks' patch tokens at stride 16: equal sizes."""
    return [torch.randn(b, d, 4, 4) for _ in range(4)]


def _resnet_levels(b=2, chans=(8, 16, 32, 64)):
    """ResNet stages 1-4 at strides 4, 8, 16, 32."""
    return [torch.randn(b, c, 64 // s, 64 // s) for c, s in zip(chans, (4, 8, 16, 32))]


SCREWS = [
    np.array([[10.0, 12.0, 30.0, 40.0],       # [head_x, head_y, tip_x, tip_y]
              [50.0, 10.0, 52.5, 33.0]]),
    np.array([[40.0, 55.0, 14.0, 47.0]]),
]


# --------------------------------------------------------------------------- shapes
def test_classification_heads_shapes():
    x = torch.randn(5, 32)
    assert LinearHead(32, 3)(x).shape == (5, 3)
    assert LinearHead(32, 3, standardize=True)(x).shape == (5, 3)
    assert MLPHead(32, 3, hidden=16, dropout=0.1)(x).shape == (5, 3)


@pytest.mark.parametrize("levels", [_vit_levels, _resnet_levels])
def test_dense_heads_shapes(levels):
    feats = levels()
    chans, strides = [f.shape[1] for f in feats], map_strides(feats, INPUT[0])
    grid = (INPUT[0] // 4, INPUT[1] // 4)                   # stride 4 whatever the backbone's strides
    assert DenseDecoder(chans, strides, hidden=16)(feats).shape == (2, 16, *grid)
    seg = SegmentationDecoder(chans, strides, hidden=16)
    assert seg.grid_logits(feats).shape == (2, 1, INPUT[0] // 2, INPUT[1] // 2)
    assert seg(feats, INPUT).shape == (2, 1, *INPUT)
    out = ScrewHead(chans, strides, hidden=16)(feats)
    assert out["heatmap"].shape == (2, 1, *grid)
    assert out["offset"].shape == (2, 2, *grid)
    assert out["vectors"].shape == (2, 4, *grid)


def test_dense_decoder_refuses_levels_off_the_pyramid():
    with pytest.raises(ValueError, match="power of two"):
        DenseDecoder([8], [12.0])
    with pytest.raises(ValueError, match="one stride per level"):
        DenseDecoder([8, 8], [4.0])


# ------------------------------------------------------------------ targets / decode
def _perfect_outputs(t):
    hm = t["heatmap"].clamp(1e-4, 1 - 1e-4)
    return {"heatmap": torch.log(hm / (1 - hm)), "offset": t["offset"], "vectors": t["vectors"]}


@pytest.mark.parametrize("map_size", [(16, 16), (4, 4)])
def test_targets_decode_round_trip(map_size):
    t = screw_targets(SCREWS, INPUT, map_size, sigma=1.0)
    assert t["num_screws"].tolist() == [2, 1]
    assert t["mask"].sum().item() == 3
    assert t["heatmap"].max().item() == 1.0
    decoded = decode_screws(_perfect_outputs(t), INPUT, max_screws=10, threshold=0.3)
    assert [len(d) for d in decoded] == [2, 1]
    for truth, pred in zip(SCREWS, decoded):
        got = sorted((s["head"] + s["tip"]) for s in pred)
        want = sorted(tuple(r) for r in truth.tolist())
        np.testing.assert_allclose(np.array(got), np.array(want), atol=1.0)
    m = screw_metrics(decoded, SCREWS, max_distance=2.0)
    assert (m["tp"], m["fp"], m["fn"]) == (3, 0, 0)
    assert m["head_l1_px"] < 1e-3 and m["angle_deg"] < 1e-2


def test_targets_skip_outside_and_empty_images():
    t = screw_targets([np.zeros((0, 4)), [{"head": (70, 70), "tip": (90, 90)}]], INPUT, (8, 8))
    assert t["num_screws"].tolist() == [0, 0] and t["heatmap"].sum() == 0
    assert decode_screws(_perfect_outputs(t), INPUT) == [[], []]
    out = {"heatmap": torch.zeros(2, 1, 8, 8, requires_grad=True),
           "offset": torch.zeros(2, 2, 8, 8), "vectors": torch.zeros(2, 4, 8, 8)}
    loss = screw_loss(out, t)
    loss.backward()                          # no positives: finite, negatives only
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------- overfitting
def _fit(model, loss_fn, steps, lr=1e-2):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_linear_head_overfits():
    torch.manual_seed(0)
    x, y = torch.randn(16, 32), torch.randint(0, 3, (16,))
    head = LinearHead(32, 3, standardize=True)
    losses = _fit(head, lambda: F.cross_entropy(head(x), y), 40, lr=5e-2)
    assert losses[-1] < losses[0] / 4


def test_segmentation_decoder_overfits():
    torch.manual_seed(0)
    feats = _resnet_levels(chans=(4, 8, 8, 8))
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    masks = torch.stack([((yy - 20) ** 2 + (xx - 30) ** 2 < 150),
                         ((yy - 40) ** 2 + (xx - 25) ** 2 < 300)])[:, None].float()
    dec = SegmentationDecoder([f.shape[1] for f in feats], map_strides(feats, 64), hidden=16)
    losses = _fit(dec, lambda: F.binary_cross_entropy_with_logits(dec(feats, INPUT), masks), 30)
    assert losses[-1] < losses[0] / 3


def test_screw_head_overfits():
    torch.manual_seed(0)
    feats = _resnet_levels(chans=(4, 8, 8, 8))
    head = ScrewHead([f.shape[1] for f in feats], map_strides(feats, 64), hidden=16)
    t = screw_targets(SCREWS, INPUT, (16, 16), sigma=1.0)
    losses = _fit(head, lambda: screw_loss(head(feats), t), 40)
    assert losses[-1] < losses[0] / 3
