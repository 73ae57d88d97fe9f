"""DAX's X-ray multi-crop augmentation for DINO, and the matching evaluation transform (pure torch).

Mirrors DINO's ``DataAugmentationDINO`` (facebookresearch/dino, main_dino.py) as DAX adapted it
(JoshuaScheuplein/DAX, ``DataAugmentationV2`` and ``preprocess_image_v2``, "version B"), with every
photometric choice drawn per crop, as DINO draws its colour augmentation:

- Input polarity: attenuation bright (bone and metal bright, air dark), the models' view on every modality
  (``tasks.ingest.normalize.model_view``).
- Intensity step, drawn per crop: with probability ``neglog_p`` DAX's I0 + negative log (``neglog``),
  otherwise a plain min-max scaling (``minmax``); both use the statistics of the ROI of the whole image
  (the image without 1/8 of its size at every border) and give floats in [0, 1], attenuation bright.
  DAX drew the branch once per image, so every view of an image shared it: "which branch" was a feature
  all views agreed on without any anatomy in it, a shortcut that lowers the DINO loss (on the display
  polarity of fluoroscopy the two branches even disagreed on polarity). Drawn per crop, the views
  disagree on it as often as not. Neglog is only drawn for images whose stored values are linear in
  intensity (``linear=True``), from the beam intensity ``full scale - value`` (full scale: the dtype's
  maximum for integer images, 1 for float images): on a log-encoded DX/CR image it would take a second
  log. ``minmax`` is the mapping evaluation, the heads and ``dax predict`` use (``XrayEvalTransform``),
  so training sees it on ``1 - neglog_p`` of the crops (every crop of a log-encoded image).
- Crops: 2 global (224 px, scale 0.14-1) and N local (96 px, scale 0.05-0.14), square only
  (RandomResizedCrop with ratio (1, 1), bicubic, antialiased). With ``min_content`` > 0 a box whose
  share of *content* pixels (min-max value inside (``saturation_band``, 1 - ``saturation_band``): not
  collimator black, not clipped air, not outside the image) is below ``min_content`` is drawn again, up
  to ``crop_tries`` times; then the box with the most content is kept. ``XrayMultiCrop.draws`` tallies
  boxes drawn, rejected and fallen back on (the training loop logs the rejection rate).
- Rotation by U(-180, 180) degrees with p=0.8 on global crop 2 and every local crop, never on global
  crop 1; as in DAX the whole image is rotated about its centre with zero fill before the crop is
  taken. Here only the crop's neighbourhood is resampled (same geometry, a fraction of the cost).
- Horizontal and vertical flips (p=0.5 each); brightness and contrast jitter 0.4 with p=0.8 (no
  saturation, hue or grayscale: the images are gray); gamma drawn log-uniformly from ``gamma`` with
  p=``gamma_p`` (0 in DAX).
- ``blur="sharpness"`` (default, DAX): sharpness factor U(0.8, 1.2) on every crop;
  ``blur="gaussian"`` (DINO): Gaussian blur sigma U(0.1, 2) with p=1.0 / 0.1 / 0.5 on global 1 /
  global 2 / locals; ``blur="none"``.
- Solarization (threshold 0.5 on floats) with p=0.2 on global crop 2 only.
- No ImageNet mean/std normalization: every output is float32 in [0, 1], shape (C, S, S) with C =
  ``in_chans`` (3 = the gray channel copied, DAX's habit).

All randomness comes from torch's global generator, so ``torch.manual_seed`` (and DataLoader worker
seeding) makes the crops reproducible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as tnf
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

__all__ = [
    "CropDraws", "MultiCropConfig", "XrayEvalTransform", "XrayMultiCrop",
    "Letterbox", "full_scale", "letterbox_geometry", "mask_to_input", "mask_to_native", "minmax", "neglog",
    "to_image_tensor",
]

NEGLOG_EPS = 1e-6
GAUSSIAN_KERNEL = 13           # covers +-3 sigma for DINO's largest sigma (2.0)
GAUSSIAN_BLUR_P = (1.0, 0.1, 0.5)   # DINO: global 1, global 2, local crops


@dataclass(frozen=True)
class MultiCropConfig:
    global_size: int = 224
    local_size: int = 96
    local_crops: int = 6
    global_scale: tuple[float, float] = (0.14, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.14)
    neglog_p: float = 0.5          # per crop, images stored linear in intensity only: DAX's I0 + neg-log, else min-max
    rotation_p: float = 0.8        # global crop 2 and local crops only
    rotation_degrees: float = 180.0
    flip_p: float = 0.5            # horizontal and vertical, each
    jitter: float = 0.4            # brightness and contrast
    jitter_p: float = 0.8
    gamma: tuple[float, float] = (0.67, 1.5)   # gamma drawn log-uniformly from this range ...
    gamma_p: float = 0.0                       # ... with this probability per crop (DAX: none)
    blur: str = "sharpness"        # "sharpness" (DAX), "gaussian" (DINO) or "none"
    sharpness: float = 0.2         # sharpness factor drawn from U(1 - sharpness, 1 + sharpness)
    solarize_p: float = 0.2        # global crop 2 only
    in_chans: int = 1              # 1, or 3 (gray copied)
    decode_size: int | None = None  # if set, first shrink the image so its long side is at most this
    min_content: float = 0.0       # redraw a box with less than this share of content pixels (0: never)
    crop_tries: int = 10           # boxes drawn per crop at most; then the one with the most content
    saturation_band: float = 0.02  # min-max values within this of 0 or 1 are not content

    def __post_init__(self) -> None:
        if self.blur not in ("sharpness", "gaussian", "none"):
            raise ValueError(f"blur must be 'sharpness', 'gaussian' or 'none', not {self.blur!r}")
        if self.in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, not {self.in_chans}")
        if self.local_crops < 0:
            raise ValueError("local_crops must be >= 0")
        if not 0.0 <= self.min_content <= 1.0:
            raise ValueError(f"min_content must be in [0, 1], not {self.min_content}")
        if self.crop_tries < 1:
            raise ValueError("crop_tries must be >= 1")
        if not 0.0 < self.gamma[0] <= self.gamma[1]:
            raise ValueError(f"gamma must be a range (low, high) with 0 < low <= high, not {self.gamma}")


@dataclass
class CropDraws:
    """A tally of crop boxes: drawn, rejected for too little content, crops that kept their best rejected box."""

    drawn: int = 0
    rejected: int = 0
    fallback: int = 0

    def add(self, other: CropDraws) -> None:
        self.drawn, self.rejected, self.fallback = (self.drawn + other.drawn, self.rejected + other.rejected,
                                                    self.fallback + other.fallback)

    def since(self, before: CropDraws) -> CropDraws:
        return CropDraws(self.drawn - before.drawn, self.rejected - before.rejected, self.fallback - before.fallback)

    @property
    def rejection_rate(self) -> float:
        return self.rejected / self.drawn if self.drawn else 0.0


# ----------------------------------------------------------------------------- intensity step

def to_image_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A (H, W) or (1, H, W) numpy array or tensor of any real dtype as a float32 (H, W) tensor."""
    if isinstance(image, np.ndarray):
        array = np.asarray(image, dtype=np.float32)
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    elif isinstance(image, torch.Tensor):
        tensor = image.to(torch.float32)
    else:
        raise TypeError(f"expected a numpy array or a torch tensor, not {type(image).__name__}")
    if tensor.ndim == 3 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 2 or tensor.shape[0] < 1 or tensor.shape[1] < 1:
        raise ValueError(f"expected a gray image (H, W) or (1, H, W), got shape {tuple(image.shape)}")
    return tensor


def _roi(img: torch.Tensor) -> torch.Tensor:
    """The image without 1/8 of its height and width at every border (DAX's ROI)."""
    h, w = img.shape[-2:]
    bh, bw = h // 8, w // 8
    return img[..., bh:h - bh, bw:w - bw]


def _scale_to_unit(img: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    span = float(hi - lo)
    if not math.isfinite(span) or span <= 0.0:
        return torch.zeros_like(img)
    return ((img - lo) / span).clamp_(0.0, 1.0)


def minmax(img: torch.Tensor) -> torch.Tensor:
    """(H, W) -> (H, W) in [0, 1]: linear scaling from the ROI's min and max, clipped.

    The non-neglog branch of DAX's version B; keeps the input's polarity. A flat ROI gives zeros.
    """
    roi = _roi(img)
    return _scale_to_unit(img, roi.min(), roi.max())


def full_scale(image: np.ndarray | torch.Tensor) -> float:
    """The value of no beam intensity in an attenuation-bright image: the dtype's maximum for integer
    images (65535 for normalized uint16), 1.0 for float images."""
    dtype = image.dtype
    if isinstance(image, torch.Tensor):
        return float(torch.iinfo(dtype).max) if not dtype.is_floating_point else 1.0
    return float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0


def neglog(img: torch.Tensor, eps: float = NEGLOG_EPS) -> torch.Tensor:
    """(H, W) beam intensity -> (H, W) attenuation in [0, 1]: DAX's I0 normalization and negative log.

    I0 is estimated from the ROI as c = median(ROI) + 3 * std(ROI) (lower median as torch.median,
    population std as numpy's default); x = -log(max(min(img, c) / c, eps)); then min-max scaling
    with the ROI's min and max of x, clipped to [0, 1]. A flat result gives zeros.
    """
    roi = _roi(img)
    c = roi.median() + 3.0 * roi.std(correction=0)
    c = torch.clamp(c, min=torch.finfo(torch.float32).tiny)
    x = -torch.log(torch.clamp(torch.minimum(img, c) / c, min=eps))
    roi_x = _roi(x)
    return _scale_to_unit(x, roi_x.min(), roi_x.max())


def _shrink(img: torch.Tensor, max_side: int | None) -> torch.Tensor:
    """(H, W) shrunk (antialiased bilinear) so the long side is at most ``max_side``; never enlarged."""
    h, w = img.shape[-2:]
    if max_side is None or max(h, w) <= max_side:
        return img
    factor = max_side / max(h, w)
    size = [max(1, round(h * factor)), max(1, round(w * factor))]
    return F.resize(img[None], size, interpolation=InterpolationMode.BILINEAR, antialias=True)[0]


# ----------------------------------------------------------------------------- geometry

def _source_centre(h: int, w: int, top: float, left: float, side: float, angle: float) -> tuple[float, float]:
    """(x, y) in the (h, w) image of the centre of a box on the canvas rotated by ``angle`` about its centre."""
    a = math.radians(angle)
    cos, sin = math.cos(a), math.sin(a)
    # crop centre on the rotated canvas, relative to the canvas centre (x right, y down)
    dx, dy = left + side / 2 - w / 2, top + side / 2 - h / 2
    # inverse rotation: where a canvas point comes from in the original image
    return w / 2 + cos * dx - sin * dy, h / 2 + sin * dx + cos * dy


def _rotated_resized_crop(img: torch.Tensor, top: int, left: int, side: int, size: int,
                          angle: float) -> torch.Tensor:
    """``F.resized_crop(F.rotate(img, angle, BILINEAR, fill=0), top, left, side, side, size)``, cheaply.

    ``img`` is (1, H, W). The rotation is about the image centre (counter-clockwise for positive
    angles, as ``F.rotate``); the crop box is on the rotated canvas. Only the box's pre-image (its
    bounding box plus a margin for the resampling kernels, zero-padded outside the image) is cut,
    resized by size/side (bicubic, antialiased), then rotated by bilinear sampling at output
    resolution.
    """
    _, h, w = img.shape
    a = math.radians(angle)
    cos, sin = math.cos(a), math.sin(a)
    sx, sy = _source_centre(h, w, top, left, side, angle)

    margin = 2 * math.ceil(side / size) + 2
    half = side / 2 * (abs(cos) + abs(sin)) + margin
    x0, y0 = math.floor(sx - half), math.floor(sy - half)
    x1, y1 = math.ceil(sx + half), math.ceil(sy + half)
    patch = img.new_zeros((1, y1 - y0, x1 - x0))
    iy0, iy1, ix0, ix1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
    if iy0 < iy1 and ix0 < ix1:
        patch[:, iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = img[:, iy0:iy1, ix0:ix1]

    f = size / side
    ph, pw = patch.shape[-2:]
    nh, nw = max(1, round(ph * f)), max(1, round(pw * f))
    patch = F.resize(patch, [nh, nw], interpolation=InterpolationMode.BICUBIC, antialias=True)
    fy, fx = nh / ph, nw / pw

    # output pixel centres relative to the output centre, in output pixels
    k = torch.arange(size, dtype=torch.float32) + 0.5 - size / 2
    v, u = torch.meshgrid(k, k, indexing="ij")
    px = (sx - x0) * fx + (cos * u - sin * v) * (fx / f)
    py = (sy - y0) * fy + (sin * u + cos * v) * (fy / f)
    grid = torch.stack((2 * px / nw - 1, 2 * py / nh - 1), dim=-1)[None]
    out = tnf.grid_sample(patch[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0]


class _RandomSharpness:
    """DAX's sharpness jitter: factor U(1 - amount, 1 + amount), applied with probability ``p``."""

    def __init__(self, amount: float, p: float = 1.0) -> None:
        self.amount, self.p = amount, p

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.p < 1.0 and torch.rand(1).item() >= self.p:
            return img
        factor = torch.empty(1).uniform_(1.0 - self.amount, 1.0 + self.amount).item()
        return F.adjust_sharpness(img, factor)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(amount={self.amount}, p={self.p})"


class _RandomGamma:
    """x ** g with g drawn log-uniformly from ``(low, high)``, applied with probability ``p`` (x in [0, 1])."""

    def __init__(self, low: float, high: float, p: float) -> None:
        self.low, self.high, self.p = low, high, p

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.p <= 0.0 or torch.rand(1).item() >= self.p:
            return img
        g = math.exp(torch.empty(1).uniform_(math.log(self.low), math.log(self.high)).item())
        return img.clamp(0.0, 1.0).pow(g)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(low={self.low}, high={self.high}, p={self.p})"


def _expand(img: torch.Tensor, in_chans: int) -> torch.Tensor:
    img = img.clamp(0.0, 1.0).to(torch.float32)
    return img.repeat(in_chans, 1, 1) if in_chans != 1 else img.contiguous()


# ----------------------------------------------------------------------------- training views

class _Intensities:
    """One image's two intensity maps (neglog made on first use) and its content table, made once per image."""

    def __init__(self, img: torch.Tensor, saturation_band: float, scale: float = 1.0) -> None:
        self.image, self.full_scale = img, scale
        self.minmax = minmax(img)[None]
        self.saturation_band = saturation_band
        self._neglog: torch.Tensor | None = None
        self._table: torch.Tensor | None = None

    @property
    def neglog(self) -> torch.Tensor:
        if self._neglog is None:
            self._neglog = neglog(self.full_scale - self.image)[None]   # from the beam intensity
        return self._neglog

    @property
    def table(self) -> torch.Tensor:
        """Summed-area table of the content pixels (made on first use: configs without rejection never
        need it): the content of any axis-aligned box in four look-ups."""
        if self._table is None:
            band = self.saturation_band
            content = (self.minmax[0] > band) & (self.minmax[0] < 1.0 - band)
            self._table = tnf.pad(content.to(torch.float64).cumsum(0).cumsum(1), (1, 0, 1, 0))
        return self._table

    def content(self, cx: float, cy: float, side: float) -> float:
        """The share of content pixels in the side x side square centred at (cx, cy); outside the image is none."""
        h, w = self.image.shape
        y0, x0 = max(0, round(cy - side / 2)), max(0, round(cx - side / 2))
        y1, x1 = min(h, round(cy + side / 2)), min(w, round(cx + side / 2))
        if y1 <= y0 or x1 <= x0:
            return 0.0
        t = self.table
        inside = t[y1, x1] - t[y0, x1] - t[y1, x0] + t[y0, x0]
        return float(inside) / (side * side)


class XrayMultiCrop:
    """Callable: a gray image -> ``[global1, global2, local1, ..., localN]`` float32 tensors in [0, 1].

    Input: numpy or torch, (H, W) or (1, H, W), uint16 or float in [0, 1], any size, attenuation bright; and
    ``linear``: whether its values are linear in intensity (neglog is drawn only then).
    Output: ``2 + config.local_crops`` tensors (C, S, S), globals first (S = ``global_size``, then
    ``local_size``), C = ``in_chans``. ``draws`` tallies the crop boxes this instance drew (per process).
    """

    def __init__(self, config: MultiCropConfig = MultiCropConfig()) -> None:
        self.config = cfg = config
        self.draws = CropDraws()
        self.global_crop = v2.RandomResizedCrop(cfg.global_size, scale=cfg.global_scale, ratio=(1.0, 1.0),
                                                interpolation=InterpolationMode.BICUBIC, antialias=True)
        self.local_crop = v2.RandomResizedCrop(cfg.local_size, scale=cfg.local_scale, ratio=(1.0, 1.0),
                                               interpolation=InterpolationMode.BICUBIC, antialias=True)
        self.rotation = v2.RandomRotation(cfg.rotation_degrees)
        flip_and_jitter = [
            v2.RandomHorizontalFlip(p=cfg.flip_p),
            v2.RandomVerticalFlip(p=cfg.flip_p),
            v2.RandomApply([v2.ColorJitter(brightness=cfg.jitter, contrast=cfg.jitter)], p=cfg.jitter_p),
            _RandomGamma(*cfg.gamma, p=cfg.gamma_p),
        ]
        blur = [self._blur(p) for p in GAUSSIAN_BLUR_P]
        self.global_transfo1 = v2.Compose([*flip_and_jitter, *blur[0]])
        self.global_transfo2 = v2.Compose([*flip_and_jitter, *blur[1],
                                           v2.RandomSolarize(threshold=0.5, p=cfg.solarize_p)])
        self.local_transfo = v2.Compose([*flip_and_jitter, *blur[2]])

    def _blur(self, gaussian_p: float) -> list:
        if self.config.blur == "sharpness":
            return [_RandomSharpness(self.config.sharpness, p=1.0)]
        if self.config.blur == "gaussian":
            return [v2.RandomApply([v2.GaussianBlur(GAUSSIAN_KERNEL, sigma=(0.1, 2.0))], p=gaussian_p)]
        return []

    def prepare(self, image: np.ndarray | torch.Tensor) -> _Intensities:
        """The image once per call: shrunk to ``decode_size``, its intensity maps and content table."""
        return _Intensities(_shrink(to_image_tensor(image), self.config.decode_size), self.config.saturation_band,
                            full_scale(image))

    def _intensity(self, maps: _Intensities, linear: bool) -> torch.Tensor:
        """This crop's intensity map: neglog with probability ``neglog_p`` if the image is linear, else min-max."""
        if linear and self.config.neglog_p > 0.0 and torch.rand(1).item() < self.config.neglog_p:
            return maps.neglog
        return maps.minmax

    def _box(self, maps: _Intensities, crop: v2.RandomResizedCrop, rotate: bool) -> tuple[dict, float | None]:
        """A crop box (and its rotation angle, None for none) with enough content, or the best of ``crop_tries``."""
        cfg, img = self.config, maps.minmax
        h, w = img.shape[-2:]
        best, best_content = None, -1.0
        for _ in range(cfg.crop_tries):
            box = crop.make_params([img])
            angle = None
            if rotate and torch.rand(1).item() < cfg.rotation_p:
                angle = float(self.rotation.make_params([img])["angle"])
            self.draws.drawn += 1
            if cfg.min_content <= 0.0:
                return box, angle
            side = box["height"]
            cx, cy = _source_centre(h, w, box["top"], box["left"], side, angle or 0.0)
            content = maps.content(cx, cy, side)
            if content >= cfg.min_content:
                return box, angle
            self.draws.rejected += 1
            if content > best_content:
                best, best_content = (box, angle), content
        self.draws.fallback += 1
        return best

    def _crop(self, maps: _Intensities, crop: v2.RandomResizedCrop, rotate: bool, linear: bool) -> torch.Tensor:
        img = self._intensity(maps, linear)
        box, angle = self._box(maps, crop, rotate)
        if angle is not None:
            out = _rotated_resized_crop(img, box["top"], box["left"], box["height"], crop.size[0], angle)
        else:
            out = F.resized_crop(img, **box, size=list(crop.size), interpolation=crop.interpolation,
                                 antialias=True)
        return out.clamp(0.0, 1.0)      # bicubic overshoot, before the photometric steps

    def __call__(self, image: np.ndarray | torch.Tensor, linear: bool = True) -> list[torch.Tensor]:
        maps = self.prepare(image)
        c = self.config.in_chans
        crops = [_expand(self.global_transfo1(self._crop(maps, self.global_crop, False, linear)), c),
                 _expand(self.global_transfo2(self._crop(maps, self.global_crop, True, linear)), c)]
        for _ in range(self.config.local_crops):
            crops.append(_expand(self.local_transfo(self._crop(maps, self.local_crop, True, linear)), c))
        return crops

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


# ----------------------------------------------------------------------------- evaluation view

def letterbox_geometry(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """Where a (height, width) image lands in ``XrayEvalTransform``'s square: (new_h, new_w, top, left).

    The image is resized so its long side is ``size`` (aspect kept), then centred; a pixel
    coordinate p (x or y, pixel edges) maps to p * new / old + offset.
    """
    factor = size / max(height, width)
    new_h, new_w = max(1, round(height * factor)), max(1, round(width * factor))
    return new_h, new_w, (size - new_h) // 2, (size - new_w) // 2


@dataclass(frozen=True)
class Letterbox:
    """The map between NATIVE pixel coordinates (h x w) and the S x S letterboxed input."""

    native_h: int
    native_w: int
    size: int
    new_h: int
    new_w: int
    top: int
    left: int

    @classmethod
    def of(cls, native_h: int, native_w: int, size: int) -> "Letterbox":
        """The geometry ``XrayEvalTransform(size)`` gives an image whose native grid is h x w.

        The stored image has the native aspect ratio (ingestion keeps it, up to rounding), so the
        letterbox computed on the native size is the one computed on the stored size (checked in
        ``load_head_dataset``).
        """
        new_h, new_w, top, left = letterbox_geometry(int(native_h), int(native_w), int(size))
        return cls(int(native_h), int(native_w), int(size), new_h, new_w, top, left)

    @classmethod
    def for_stored(cls, native_h: int, native_w: int, stored_h: int, stored_w: int, size: int) -> "Letterbox":
        """The geometry of an image stored at (stored_h, stored_w) (resized from the native grid at
        ingestion, aspect kept up to rounding) and letterboxed to ``size`` by ``XrayEvalTransform``:
        the square's content is what the stored image became, its extent maps onto the native grid."""
        new_h, new_w, top, left = letterbox_geometry(int(stored_h), int(stored_w), int(size))
        return cls(int(native_h), int(native_w), int(size), new_h, new_w, top, left)

    @property
    def scale(self) -> tuple[float, float]:
        """(sx, sy): input pixels per native pixel along x (columns) and y (rows)."""
        return self.new_w / self.native_w, self.new_h / self.native_h

    def to_input(self, points: np.ndarray) -> np.ndarray:
        """(..., 2) native (x, y) -> input (x, y)."""
        p = np.asarray(points, dtype=np.float64)
        sx, sy = self.scale
        return np.stack([p[..., 0] * sx + self.left, p[..., 1] * sy + self.top], axis=-1)

    def to_native(self, points: np.ndarray) -> np.ndarray:
        """(..., 2) input (x, y) -> native (x, y): the inverse of ``to_input``."""
        p = np.asarray(points, dtype=np.float64)
        sx, sy = self.scale
        return np.stack([(p[..., 0] - self.left) / sx, (p[..., 1] - self.top) / sy], axis=-1)

    def screws_to_native(self, screws: np.ndarray) -> np.ndarray:
        """(K, 4) [hx, hy, tx, ty] input -> native (extra columns, e.g. a score, are kept)."""
        s = np.asarray(screws, dtype=np.float64).reshape(-1, np.shape(screws)[-1] if np.size(screws) else 4)
        out = s.copy()
        out[:, 0:2] = self.to_native(s[:, 0:2])
        out[:, 2:4] = self.to_native(s[:, 2:4])
        return out

    def screws_to_input(self, screws: np.ndarray) -> np.ndarray:
        s = np.asarray(screws, dtype=np.float64).reshape(-1, np.shape(screws)[-1] if np.size(screws) else 4)
        out = s.copy()
        out[:, 0:2] = self.to_input(s[:, 0:2])
        out[:, 2:4] = self.to_input(s[:, 2:4])
        return out

    def as_row(self) -> list[int]:
        return [self.native_h, self.native_w, self.size, self.new_h, self.new_w, self.top, self.left]


def mask_to_input(mask: np.ndarray, box: Letterbox) -> torch.Tensor:
    """A NATIVE (h, w) bool mask -> (S, S) bool in the letterbox (area-weighted resize, > 0.5)."""
    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    if m.shape[-2:] != (box.native_h, box.native_w):
        raise ValueError(f"mask is {tuple(m.shape[-2:])}, native grid is {(box.native_h, box.native_w)}")
    small = tnf.interpolate(m, size=(box.new_h, box.new_w), mode="bilinear", antialias=True, align_corners=False)
    out = torch.zeros(box.size, box.size, dtype=torch.bool)
    out[box.top:box.top + box.new_h, box.left:box.left + box.new_w] = small[0, 0] > 0.5
    return out


def mask_to_native(probability: torch.Tensor, box: Letterbox, threshold: float = 0.5) -> np.ndarray:
    """An (S, S) probability map of the input -> NATIVE (h, w) bool mask (padding cut, bilinear resize)."""
    p = probability.float().reshape(box.size, box.size)
    inner = p[box.top:box.top + box.new_h, box.left:box.left + box.new_w][None, None]
    native = tnf.interpolate(inner, size=(box.native_h, box.native_w), mode="bilinear", align_corners=False)
    return (native[0, 0] > threshold).numpy()


class XrayEvalTransform:
    """Callable: a gray image -> one float32 tensor (C, size, size) in [0, 1], deterministic.

    Input: as ``XrayMultiCrop``'s (attenuation bright). Intensity: min-max over the ROI (the deterministic
    branch of training) by default, DAX's neglog of the beam intensity with ``neglog=True``. Geometry: the
    whole image, resized (antialiased bilinear) so its long side is ``size``, centred and zero-padded to a
    square (no distortion; the same zero fill rotated training crops show); ``letterbox_geometry`` gives the
    mapping for masks and keypoints.
    """

    def __init__(self, size: int = 224, neglog: bool = False, in_chans: int = 1) -> None:
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, not {in_chans}")
        self.size, self.neglog, self.in_chans = size, neglog, in_chans

    def __call__(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        img = to_image_tensor(image)
        h, w = img.shape
        new_h, new_w, top, left = letterbox_geometry(h, w, self.size)
        img = F.resize(img[None], [new_h, new_w], interpolation=InterpolationMode.BILINEAR, antialias=True)[0]
        img = neglog(full_scale(image) - img) if self.neglog else minmax(img)
        out = img.new_zeros((1, self.size, self.size))
        out[0, top:top + new_h, left:left + new_w] = img
        return _expand(out, self.in_chans)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, neglog={self.neglog}, in_chans={self.in_chans})"
