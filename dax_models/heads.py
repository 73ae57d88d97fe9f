"""Small task heads trained on FROZEN backbone features.

Heads take feature tensors, not the backbone, so features can be computed once
and cached:
- ``pooled`` (B, D) or the ViT last-4-CLS concatenation (B, 4D): :class:`LinearHead`,
  :class:`MLPHead`;
- multi-level maps, a list of (B, C_i, H_i, W_i): :class:`SegmentationDecoder`,
  :class:`ScrewHead`, both built on :class:`DenseDecoder` (FPN / DPT-style reassembly to stride 4).

Each dense head has an ORACLE of its target space: the ground truth encoded as the head's targets on its
grid and decoded back by its own post-processing (``mask_logits_on_grid`` + ``upsample_logits``;
``screw_targets`` + ``decode_screws``). ``tests/test_dense_oracle.py`` holds them to the paper's range at
native resolution, so a head whose output grid cannot represent the truth fails CI.

Screw convention (as :mod:`dax_models.metrics`): a screw is a head (x, y) and a tip
(x, y) in pixels of the input image given to the backbone (x = column, y = row).

ScrewHead output units, on the decoder's map of size (h, w) for an input of (H, W);
stride (s_y, s_x) = (H / h, W / w):
- ``heatmap`` (B, 1, h, w): logits of the screw-midpoint heatmap;
- ``offset`` (B, 2, h, w): (x, y) sub-cell offset of the midpoint in map cells,
  ``mid / stride - cell``: in [0, 1) in the midpoint's own cell, beyond it for a screw moved to a free
  neighbour cell (``screw_targets``);
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
    "DenseDecoder",
    "SegmentationDecoder",
    "ScrewHead",
    "map_strides",
    "mask_logits_on_grid",
    "screw_targets",
    "upsample_logits",
    "screw_loss",
    "decode_screws",
    "FrozenHead",
    "MODEL_POLARITY",
    "POLARITIES",
    "head_polarity",
]

POLARITIES = ("attenuation", "display")   # the images a head reads: bone and metal bright everywhere, or as shown
MODEL_POLARITY = "attenuation"            # what pretraining and heads read now (tasks.ingest.normalize.model_view)


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


# ------------------------------------------------------------------------ decoder
def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _resample(channels: int, factor: float) -> nn.Module:
    """Learned resampling by a power-of-two ``factor`` (> 1 finer, < 1 coarser), as DPT reassembles ViT tokens:
    a transposed conv with kernel = stride to go finer, a strided conv to go coarser."""
    if factor == 1:
        return nn.Identity()
    step = round(factor if factor > 1 else 1 / factor)
    if 2 ** round(math.log2(step)) != step:
        raise ValueError(f"levels must differ from their pyramid stride by a power of two, not {factor}")
    if factor > 1:
        return nn.ConvTranspose2d(channels, channels, step, stride=step)
    return nn.Conv2d(channels, channels, step, stride=step)


class DenseDecoder(nn.Module):
    """Frozen multi-level features -> one map at stride ``out_stride`` of the input (4: the dense heads' grid).

    ``in_strides``: each level's stride in input pixels, finest first: ResNet stages 1-4 [4, 8, 16, 32],
    ViT blocks [16] * 4. Level i is standardised (BatchNorm over the frozen channels: frozen DINO features
    have a few channels of large scale), projected to ``hidden`` channels (1x1) and brought to the pyramid
    stride ``out_stride * 2**i`` by a learned resampling (DPT's reassembly for ViTs; nothing to do for
    ResNets). A top-down path (FPN) then merges them from the coarsest: upsample x2 (bilinear) + the finer
    level, 3x3 conv-BN-ReLU. Output: (B, hidden, H_0, W_0), H_0 = the finest pyramid level's size
    (input / out_stride).

    Stride 4 is what the screw targets need and the metal decoder refines further (``tests/test_dense_oracle.py``):
    touching screws and thin metal are not represented at stride 16 (the ViT's own grid).
    """

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[float], hidden: int = 64,
                 out_stride: int = 4, standardize: bool = True):
        super().__init__()
        if len(in_channels) == 0 or len(in_channels) != len(in_strides):
            raise ValueError(f"need one stride per level: {list(in_channels)} channels, {list(in_strides)} strides")
        self.in_channels, self.in_strides = list(in_channels), [float(s) for s in in_strides]
        self.out_stride, self.out_channels = int(out_stride), hidden
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(c) if standardize else nn.Identity(), nn.Conv2d(c, hidden, 1),
                          _resample(hidden, s / (out_stride * 2 ** i)))
            for i, (c, s) in enumerate(zip(in_channels, in_strides)))
        self.merge = nn.ModuleList(_conv_bn_relu(hidden, hidden) for _ in range(len(in_channels)))

    def forward(self, feature_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(feature_maps) != len(self.lateral):
            raise ValueError(f"expected {len(self.lateral)} feature maps, got {len(feature_maps)}")
        levels = [lateral(f) for f, lateral in zip(feature_maps, self.lateral)]
        x = self.merge[-1](levels[-1])
        for level, merge in zip(reversed(levels[:-1]), reversed(list(self.merge)[:-1])):
            x = merge(F.interpolate(x, size=level.shape[-2:], mode="bilinear", align_corners=False) + level)
        return x


def map_strides(feature_maps: Sequence[torch.Tensor], input_size: int) -> list[float]:
    """Each level's stride in input pixels (input side / map side), finest first: what ``DenseDecoder`` is built with."""
    return [float(input_size) / int(f.shape[-1]) for f in feature_maps]


# ------------------------------------------------------------------- segmentation
def upsample_logits(logits: torch.Tensor, output_size: Sequence[int]) -> torch.Tensor:
    """The segmentation post-processing: logits on the decoder's grid -> logits at the input size (bilinear)."""
    return F.interpolate(logits, size=tuple(output_size), mode="bilinear", align_corners=False)


def mask_logits_on_grid(masks: torch.Tensor, stride: int, eps: float = 1e-3) -> torch.Tensor:
    """The ORACLE of the segmentation target space: (B, S, S) input masks -> the logits a perfect decoder would
    give on its grid (the metal fraction of each stride x stride cell, as a logit). Decoded by the head's own
    ``upsample_logits`` and sigmoid > 0.5, it shows how much of the truth that grid can hold."""
    fraction = F.avg_pool2d(masks.float()[:, None], stride) if stride > 1 else masks.float()[:, None]
    return torch.logit(fraction.clamp(eps, 1 - eps))


class SegmentationDecoder(nn.Module):
    """:class:`DenseDecoder` (stride 4) + learned x2 upsamplings down to stride ``out_stride`` (2 by default: a
    transposed conv halving the channels, then 3x3 conv-BN-ReLU) + 1x1 conv to ``num_classes`` logits, which
    ``upsample_logits`` brings to the input size. Stride 2, not 4: K-wires and thin plates seen at 512 px are
    1-3 px wide, and the metal oracle at stride 4 of 512 px stays under Dice 0.95 (0.94; 0.997 at stride 2).
    """

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[float], hidden: int = 64,
                 num_classes: int = 1, out_stride: int = 2):
        super().__init__()
        if out_stride not in (1, 2, 4):
            raise ValueError(f"out_stride must be 1, 2 or 4, not {out_stride}")
        self.out_stride = int(out_stride)
        self.decoder = DenseDecoder(in_channels, in_strides, hidden, out_stride=4)
        stages, channels = [], hidden
        for _ in range(int(math.log2(4 // out_stride))):
            finer = max(8, channels // 2)
            stages += [nn.ConvTranspose2d(channels, finer, 2, stride=2), _conv_bn_relu(finer, finer)]
            channels = finer
        self.refine = nn.Sequential(*stages)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def grid_logits(self, feature_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits on the decoder's own grid: (B, num_classes, H / out_stride, W / out_stride)."""
        return self.classifier(self.refine(self.decoder(feature_maps)))

    def forward(self, feature_maps: Sequence[torch.Tensor],
                output_size: Sequence[int]) -> torch.Tensor:
        """Feature maps -> logits (B, num_classes, *output_size)."""
        return upsample_logits(self.grid_logits(feature_maps), output_size)


# ------------------------------------------------------------------------- screws
class ScrewHead(nn.Module):
    """CenterNet-style screw keypoints on :class:`DenseDecoder`'s stride-``out_stride`` map (units: module
    docstring): a shared 3x3 conv-ReLU, then 1x1 convs to the midpoint heatmap, its sub-cell offset and the
    head/tip vectors, so head and tip stay paired per screw.

    forward(feature_maps) -> {"heatmap": (B,1,h,w) logits, "offset": (B,2,h,w), "vectors": (B,4,h,w)},
    (h, w) = input / out_stride.
    """

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[float], hidden: int = 64,
                 out_stride: int = 4, prior: float = 0.1):
        super().__init__()
        self.out_stride = int(out_stride)
        self.decoder = DenseDecoder(in_channels, in_strides, hidden, out_stride)
        self.shared = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(inplace=True))
        self.heatmap = nn.Conv2d(hidden, 1, 1)
        self.offset = nn.Conv2d(hidden, 2, 1)
        self.vectors = nn.Conv2d(hidden, 4, 1)
        # CenterNet: heatmap bias so that sigmoid(bias) = prior (-2.19 for 0.1)
        nn.init.constant_(self.heatmap.bias, -math.log((1 - prior) / prior))

    def forward(self, feature_maps: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        x = self.shared(self.decoder(feature_maps))
        return {"heatmap": self.heatmap(x), "offset": self.offset(x), "vectors": self.vectors(x)}


def _free_cell(taken: torch.Tensor, cx: int, cy: int, fx: float, fy: float, reach: int = 2) -> tuple[int, int] | None:
    """The free cell nearest to the exact midpoint (fx, fy) (in cells) within ``reach`` of (cx, cy), or None."""
    h, w = taken.shape
    best, best_d = None, float("inf")
    for y in range(max(0, cy - reach), min(h, cy + reach + 1)):
        for x in range(max(0, cx - reach), min(w, cx + reach + 1)):
            d = (x + 0.5 - fx) ** 2 + (y + 0.5 - fy) ** 2
            if not taken[y, x] and d < best_d:
                best, best_d = (x, y), d
    return best


def screw_targets(screws_per_image: Sequence[Any], input_size: Sequence[int],
                  map_size: Sequence[int], sigma: float = 2.0, reach: int = 2) -> dict[str, torch.Tensor]:
    """Dense training targets for :class:`ScrewHead`.

    screws_per_image: per image, screws in any form of ``metrics.as_screw_arrays``
    (e.g. an (N, 4) array of [head_x, head_y, tip_x, tip_y] in input pixels).
    input_size = (H, W), map_size = (h, w) of the head's map; sigma in map cells.

    Returns (float32, on CPU):
    - heatmap (B, 1, h, w): per screw a Gaussian exp(-d^2 / (2 sigma^2)) centred on its cell (peak exactly 1),
      max over screws;
    - offset (B, 2, h, w), vectors (B, 4, h, w): regression targets at positive cells;
    - mask (B, 1, h, w): 1 at the screws' cells, else 0;
    - num_screws (B,) int64: screws encoded.
    A screw's cell is the one holding its midpoint; when another screw already holds it (touching or
    overlapping screws), the nearest free cell within ``reach`` cells (0: none, the screw is lost), and its offset, ``mid / stride - cell``, then
    lies outside [0, 1) by what it takes to reach the midpoint: every screw keeps its own peak, which the
    decoder's 3 x 3 NMS keeps (two peaks of 1 in adjacent cells are both local maxima). Screws whose
    midpoint lies outside [0, W] x [0, H], or with no free cell near, are skipped.
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
            fx, fy = mx / sx, my / sy
            cell = _free_cell(mask[b, 0], min(int(math.floor(fx)), w - 1), min(int(math.floor(fy)), h - 1), fx, fy,
                              reach)
            if cell is None:
                continue
            cx, cy = cell
            g = torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2.0 * sigma ** 2))
            heatmap[b, 0] = torch.maximum(heatmap[b, 0], g)
            offset[b, :, cy, cx] = torch.tensor([fx - cx, fy - cy])
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
    size and polarity, the classes (region) and the screw score threshold. ``forward`` takes the features:
    (B, D) for 'pooled'/'last4', the list of maps for 'maps'.

    ``polarity``: the images it was trained on, "attenuation" (bone and metal bright on every modality,
    the models' view) or "display" (as each device shows them). Heads saved before the attribute existed
    were trained on the display polarity: read it with ``head_polarity``.
    """

    def __init__(self, task: str, head: nn.Module, features: str, size: int, arch: str,
                 classes: Sequence[str] | None = None, threshold: float = 0.5, info: dict | None = None,
                 polarity: str = MODEL_POLARITY):
        super().__init__()
        if polarity not in POLARITIES:
            raise ValueError(f"polarity must be one of {POLARITIES}, not {polarity!r}")
        self.task, self.head, self.features, self.size, self.arch = task, head, features, int(size), arch
        self.classes = list(classes) if classes else None
        self.threshold = float(threshold)
        self.info = dict(info or {})
        self.polarity = polarity

    def forward(self, features):
        if self.task == "metal":
            return self.head(features, (self.size, self.size))
        return self.head(features)


def head_polarity(head: nn.Module) -> str:
    """The polarity a (possibly older) saved head was trained on; "display" for heads from before it was kept."""
    return getattr(head, "polarity", "display")
