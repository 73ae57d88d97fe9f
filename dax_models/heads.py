"""Small task heads trained on FROZEN backbone features.

Heads take feature tensors, not the backbone, so features can be computed once
and cached:
- ``pooled`` (B, D) or the ViT last-4-CLS concatenation (B, 4D): :class:`LinearHead`,
  :class:`MLPHead`;
- multi-level maps, a list of (B, C_i, H_i, W_i): :class:`SegmentationDecoder`,
  :class:`ScrewHead`, both built on :class:`FeatureFusion`.

Screw convention (as :mod:`dax_models.metrics`): a screw is a head (x, y) and a tip
(x, y) in pixels of the input image given to the backbone (x = column, y = row).

ScrewHead output units, on the fused map of size (h, w) for an input of (H, W);
stride (s_y, s_x) = (H / h, W / w):
- ``heatmap`` (B, 1, h, w): logits of the screw-midpoint heatmap;
- ``offset`` (B, 2, h, w): (x, y) sub-cell offset of the midpoint in map cells,
  ``mid / stride - floor(mid / stride)``, in [0, 1);
- ``vectors`` (B, 4, h, w): (head - mid, tip - mid) as (dx / W, dy / H, dx / W, dy / H),
  i.e. fractions of the input size (independent of the backbone stride).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dax_models.metrics import as_screw_arrays

__all__ = [
    "LinearHead",
    "MLPHead",
    "FeatureFusion",
    "SegmentationDecoder",
    "ScrewHead",
    "screw_targets",
    "screw_loss",
    "decode_screws",
    "FrozenHead",
]


# ------------------------------------------------------------------ classification
class LinearHead(nn.Module):
    """Linear classifier on pooled features (DINO linear-eval init: N(0, 0.01), bias 0).

    ``standardize=True`` puts a BatchNorm1d without affine parameters before the
    linear layer (per-feature standardisation with running statistics).
    """

    def __init__(self, in_dim: int, num_classes: int, standardize: bool = False):
        super().__init__()
        self.norm = nn.BatchNorm1d(in_dim, affine=False) if standardize else nn.Identity()
        self.linear = nn.Linear(in_dim, num_classes)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> logits (B, num_classes)."""
        return self.linear(self.norm(features))


class MLPHead(nn.Module):
    """Linear -> ReLU -> Dropout -> Linear on pooled features; optional standardisation."""

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 512,
                 dropout: float = 0.0, standardize: bool = False):
        super().__init__()
        self.norm = nn.BatchNorm1d(in_dim, affine=False) if standardize else nn.Identity()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> logits (B, num_classes)."""
        return self.net(self.norm(features))


# ------------------------------------------------------------------------- fusion
def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FeatureFusion(nn.Module):
    """Light FPN-like fusion of multi-level feature maps.

    Per level a BatchNorm over the frozen feature's channels (``standardize``, as the linear
    heads standardise their inputs: frozen DINO features have a few channels of large scale
    that a 1x1 conv trained for a few epochs does not undo) and a 1x1 conv to ``hidden``
    channels; all levels bilinearly resized to the finest level (largest H_i * W_i); combined
    by sum (``mode="sum"``) or channel concatenation (``mode="concat"``); then ``num_convs`` x
    (3x3 conv + BN + ReLU).
    Output: (B, hidden, H_f, W_f) at the finest level's size. Levels may share a size
    (ViT) or differ (ResNet stages).
    """

    def __init__(self, in_channels: Sequence[int], hidden: int = 64,
                 mode: str = "sum", num_convs: int = 2, standardize: bool = True):
        super().__init__()
        if mode not in ("sum", "concat"):
            raise ValueError(f"mode must be 'sum' or 'concat', not {mode!r}")
        if len(in_channels) == 0:
            raise ValueError("in_channels is empty")
        self.in_channels = list(in_channels)
        self.mode = mode
        self.out_channels = hidden
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(c), nn.Conv2d(c, hidden, 1)) if standardize else nn.Conv2d(c, hidden, 1)
            for c in in_channels)
        cin = hidden * len(in_channels) if mode == "concat" else hidden
        self.convs = nn.Sequential(*[_conv_bn_relu(cin if i == 0 else hidden, hidden)
                                     for i in range(num_convs)])

    def forward(self, feature_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(feature_maps) != len(self.lateral):
            raise ValueError(f"expected {len(self.lateral)} feature maps, got {len(feature_maps)}")
        size = max((f.shape[-2:] for f in feature_maps), key=lambda s: s[0] * s[1])
        size = tuple(size)
        levels = []
        for f, conv in zip(feature_maps, self.lateral):
            x = conv(f)
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            levels.append(x)
        x = torch.stack(levels).sum(0) if self.mode == "sum" else torch.cat(levels, 1)
        return self.convs(x)


# ------------------------------------------------------------------- segmentation
class SegmentationDecoder(nn.Module):
    """:class:`FeatureFusion` + 1x1 conv to ``num_classes`` logits, resized to the input."""

    def __init__(self, in_channels: Sequence[int], hidden: int = 64,
                 num_classes: int = 1, mode: str = "sum"):
        super().__init__()
        self.fusion = FeatureFusion(in_channels, hidden, mode=mode)
        self.classifier = nn.Conv2d(hidden, num_classes, 1)

    def forward(self, feature_maps: Sequence[torch.Tensor],
                output_size: Sequence[int]) -> torch.Tensor:
        """Feature maps -> logits (B, num_classes, *output_size), bilinear upsampling."""
        logits = self.classifier(self.fusion(feature_maps))
        return F.interpolate(logits, size=tuple(output_size), mode="bilinear",
                             align_corners=False)


# ------------------------------------------------------------------------- screws
def _branch(hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(hidden, out, 1))


class ScrewHead(nn.Module):
    """CenterNet-style screw keypoint head on the fused map (units: module docstring).

    forward(feature_maps) -> {"heatmap": (B,1,h,w) logits, "offset": (B,2,h,w),
    "vectors": (B,4,h,w)}, (h, w) = the finest level's size.
    """

    def __init__(self, in_channels: Sequence[int], hidden: int = 64, mode: str = "sum",
                 prior: float = 0.1):
        super().__init__()
        self.fusion = FeatureFusion(in_channels, hidden, mode=mode)
        self.heatmap = _branch(hidden, 1)
        self.offset = _branch(hidden, 2)
        self.vectors = _branch(hidden, 4)
        # CenterNet: heatmap bias so that sigmoid(bias) = prior (-2.19 for 0.1)
        nn.init.constant_(self.heatmap[-1].bias, -math.log((1 - prior) / prior))

    def forward(self, feature_maps: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        x = self.fusion(feature_maps)
        return {"heatmap": self.heatmap(x), "offset": self.offset(x), "vectors": self.vectors(x)}


def screw_targets(screws_per_image: Sequence[Any], input_size: Sequence[int],
                  map_size: Sequence[int], sigma: float = 1.0) -> dict[str, torch.Tensor]:
    """Dense training targets for :class:`ScrewHead`.

    screws_per_image: per image, screws in any form of ``metrics.as_screw_arrays``
    (e.g. an (N, 4) array of [head_x, head_y, tip_x, tip_y] in input pixels).
    input_size = (H, W), map_size = (h, w) of the fused map; sigma in map cells.

    Returns (float32, on CPU):
    - heatmap (B, 1, h, w): per screw a Gaussian exp(-d^2 / (2 sigma^2)) centred on
      the midpoint's cell (peak exactly 1), max over screws;
    - offset (B, 2, h, w), vectors (B, 4, h, w): regression targets at positive cells;
    - mask (B, 1, h, w): 1 at the midpoint cells, else 0;
    - num_screws (B,) int64: screws encoded.
    Screws whose midpoint lies outside [0, W] x [0, H] are skipped. Two screws in the
    same cell: the later one's regression targets win.
    """
    H, W = (float(v) for v in input_size)
    h, w = (int(v) for v in map_size)
    sy, sx = H / h, W / w
    B = len(screws_per_image)
    heatmap = torch.zeros(B, 1, h, w)
    offset = torch.zeros(B, 2, h, w)
    vectors = torch.zeros(B, 4, h, w)
    mask = torch.zeros(B, 1, h, w)
    num = torch.zeros(B, dtype=torch.long)
    ys = torch.arange(h, dtype=torch.float32).view(h, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, w)
    for b, screws in enumerate(screws_per_image):
        heads, tips, _ = as_screw_arrays(screws)
        for (hx, hy), (tx, ty) in zip(heads.tolist(), tips.tolist()):
            mx, my = (hx + tx) / 2.0, (hy + ty) / 2.0
            if not (0.0 <= mx <= W and 0.0 <= my <= H):
                continue
            cx = min(int(math.floor(mx / sx)), w - 1)
            cy = min(int(math.floor(my / sy)), h - 1)
            g = torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2.0 * sigma ** 2))
            heatmap[b, 0] = torch.maximum(heatmap[b, 0], g)
            offset[b, :, cy, cx] = torch.tensor([mx / sx - cx, my / sy - cy])
            vectors[b, :, cy, cx] = torch.tensor([(hx - mx) / W, (hy - my) / H,
                                                  (tx - mx) / W, (ty - my) / H])
            mask[b, 0, cy, cx] = 1.0
            num[b] += 1
    return {"heatmap": heatmap, "offset": offset, "vectors": vectors, "mask": mask,
            "num_screws": num}


def _focal_loss(logits: torch.Tensor, gt: torch.Tensor, pos: torch.Tensor,
                alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """CenterNet's penalty-reduced pixel-wise focal loss, normalised by #positives."""
    p = torch.sigmoid(logits)
    log_p, log_1mp = F.logsigmoid(logits), F.logsigmoid(-logits)
    pos_loss = (log_p * (1 - p) ** alpha * pos).sum()
    neg_loss = (log_1mp * p ** alpha * (1 - gt) ** beta * (1 - pos)).sum()
    num_pos = pos.sum()
    return -(pos_loss + neg_loss) / num_pos.clamp(min=1.0)


def _masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean |pred - target| over positive cells and channels (0 without positives)."""
    m = mask.expand_as(pred)
    return (torch.abs(pred - target) * m).sum() / m.sum().clamp(min=1.0)


def screw_loss(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
               offset_weight: float = 1.0, vector_weight: float = 10.0,
               return_parts: bool = False):
    """Focal loss on the heatmap + weighted L1 on offset / vectors at positive cells.

    total = focal + offset_weight * L1(offset) + vector_weight * L1(vectors); the L1
    terms are means over positive cells and channels; the focal term is normalised
    by the number of positive cells in the batch (CenterNet). ``vectors`` are
    fractions of the input size, hence the larger default weight (0.01 = 2.6 px at 256).
    Returns the scalar total, or (total, {"heatmap", "offset", "vectors"}) with
    ``return_parts``.
    """
    dev = outputs["heatmap"].device
    t = {k: v.to(dev) for k, v in targets.items() if isinstance(v, torch.Tensor)}
    mask = t["mask"].to(outputs["heatmap"].dtype)
    hm = _focal_loss(outputs["heatmap"], t["heatmap"], mask)
    off = _masked_l1(outputs["offset"], t["offset"], mask)
    vec = _masked_l1(outputs["vectors"], t["vectors"], mask)
    total = hm + offset_weight * off + vector_weight * vec
    if return_parts:
        return total, {"heatmap": hm.detach(), "offset": off.detach(), "vectors": vec.detach()}
    return total


@torch.no_grad()
def decode_screws(outputs: dict[str, torch.Tensor], input_size: Sequence[int],
                  max_screws: int = 10, threshold: float = 0.3) -> list[list[dict]]:
    """ScrewHead outputs -> per image a list of {"head": (x, y), "tip": (x, y), "score"}.

    Peaks: cells equal to their 3x3 max-pool (local-maximum NMS) of sigmoid(heatmap);
    the ``max_screws`` highest with score >= ``threshold`` are kept, best first.
    Coordinates are input pixels (x = column, y = row); plain Python floats.
    """
    H, W = (float(v) for v in input_size)
    heat = torch.sigmoid(outputs["heatmap"].float())
    B, _, h, w = heat.shape
    sy, sx = H / h, W / w
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    k = min(int(max_screws), h * w)
    scores, idx = peaks.view(B, -1).topk(k, dim=1)
    offset = outputs["offset"].float().view(B, 2, -1)
    vectors = outputs["vectors"].float().view(B, 4, -1)
    result = []
    for b in range(B):
        screws = []
        for score, i in zip(scores[b].tolist(), idx[b].tolist()):
            if score < threshold:
                break
            cy, cx = divmod(i, w)
            ox, oy = offset[b, :, i].tolist()
            v = vectors[b, :, i].tolist()
            mx, my = (cx + ox) * sx, (cy + oy) * sy
            screws.append({"head": (mx + v[0] * W, my + v[1] * H),
                           "tip": (mx + v[2] * W, my + v[3] * H),
                           "score": float(score)})
        result.append(screws)
    return result


class FrozenHead(nn.Module):
    """A trained head with what it needs to be used again: the task, the features it reads, the input
    size, the classes (region) and the screw score threshold. ``forward`` takes the features:
    (B, D) for 'pooled'/'cls4', the list of maps for 'maps'."""

    def __init__(self, task: str, head: nn.Module, features: str, size: int, arch: str,
                 classes: Sequence[str] | None = None, threshold: float = 0.5, info: dict | None = None):
        super().__init__()
        self.task, self.head, self.features, self.size, self.arch = task, head, features, int(size), arch
        self.classes = list(classes) if classes else None
        self.threshold = float(threshold)
        self.info = dict(info or {})

    def forward(self, features):
        if self.task == "metal":
            return self.head(features, (self.size, self.size))
        return self.head(features)

