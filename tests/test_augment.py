"""DAX's X-ray multi-crop augmentation: the intensity step, the crops, and the evaluation transform."""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from dax_models.augment import (
    MultiCropConfig,
    XrayEvalTransform,
    XrayMultiCrop,
    _rotated_resized_crop,
    full_scale,
    letterbox_geometry,
    minmax,
    neglog,
)

SMALL = dict(global_size=32, local_size=16, local_crops=3)
# every random step off: the crops are pure geometry on the intensity-normalized image
PLAIN = dict(neglog_p=0.0, rotation_p=0.0, flip_p=0.0, jitter_p=0.0, blur="none", solarize_p=0.0)


def _known_image(border: float) -> torch.Tensor:
    """8x8: ROI (rows/cols 1..6, 36 pixels) = 35 pixels at 100 and one at 10000; border = ``border``."""
    img = torch.full((8, 8), float(border))
    img[1:7, 1:7] = 100.0
    img[6, 6] = 10000.0
    return img


def _pattern(h: int, w: int, seed: int = 0) -> np.ndarray:
    """An asymmetric uint16 test image: a ramp, a bright blob off-centre, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = 8000 + 30000 * xx / w + 20000 * np.exp(-((yy - 0.3 * h) ** 2 + (xx - 0.7 * w) ** 2) / (0.1 * h * w))
    return np.clip(img + rng.normal(0, 500, (h, w)), 0, 65535).astype(np.uint16)


# ----------------------------------------------------------------------------- intensity step

def test_neglog_matches_the_formula_by_hand():
    # ROI: median 100; mean 375; population std sqrt((35*100^2 + 10000^2)/36 - 375^2) = 1626.9;
    # c = 100 + 3 * 1626.9 = 4980.8. The 10000 pixel is clipped to c: -log(1) = 0 is the ROI's min,
    # -log(100/c) = 3.908 its max. A border pixel at 1000 (inside the range) -> log(c/1000)/log(c/100).
    mean = (35 * 100 + 10000) / 36
    c = 100 + 3 * math.sqrt((35 * 100**2 + 10000**2) / 36 - mean**2)
    assert c == pytest.approx(4980.8, abs=0.1)
    out = neglog(_known_image(border=1000.0))
    roi = out[1:7, 1:7]
    assert float(roi[5, 5]) == 0.0 and (roi.reshape(-1)[:35] == 1.0).all()
    expected = math.log(c / 1000) / math.log(c / 100)
    assert expected == pytest.approx(0.4108, abs=1e-4)
    assert (out[0] - expected).abs().max() < 1e-5      # (a sample std would give 0.4129)


def test_neglog_roi_ignores_the_border_and_clips():
    plain = neglog(_known_image(border=1000.0))
    for border, value in ((60000.0, 0.0), (0.0, 1.0)):   # above c: -log(1) = 0; zero: -log(eps), clipped
        img = _known_image(border=border)
        img[0, 3] = 1000.0
        out = neglog(img)
        torch.testing.assert_close(out[1:7, 1:7], plain[1:7, 1:7])
        assert float(out[0, 3]) == pytest.approx(float(plain[0, 0]), abs=1e-6)   # c unchanged
        assert torch.isfinite(out).all() and (out[7] == value).all()


def test_minmax_uses_the_roi_and_keeps_polarity():
    out = minmax(_known_image(border=1000.0))
    assert float(out[1, 1]) == 0.0 and float(out[6, 6]) == 1.0          # 100 dark, 10000 bright
    assert float(out[0, 0]) == pytest.approx(900 / 9900)
    assert (minmax(_known_image(border=60000.0))[0] == 1).all()
    assert (minmax(torch.full((9, 9), 7.0)) == 0).all()                  # flat: zeros, not NaN


# ----------------------------------------------------------------------------- multi-crop

@pytest.mark.parametrize(("in_chans", "blur"), [(1, "sharpness"), (3, "gaussian")])
def test_crops_count_shape_dtype_range(in_chans, blur):
    crops = XrayMultiCrop(MultiCropConfig(**SMALL, in_chans=in_chans, blur=blur))(_pattern(80, 120))
    assert len(crops) == 2 + 3
    assert [tuple(c.shape) for c in crops] == [(in_chans, 32, 32)] * 2 + [(in_chans, 16, 16)] * 3
    for c in crops:
        assert c.dtype == torch.float32 and c.min() >= 0 and c.max() <= 1
        assert c.std() > 0
        if in_chans == 3:
            assert torch.equal(c[0], c[1]) and torch.equal(c[0], c[2])


def test_same_seed_same_crops_other_seed_other_crops():
    transform, image = XrayMultiCrop(MultiCropConfig(**SMALL)), _pattern(90, 70)

    def crops(seed):
        torch.manual_seed(seed)
        return transform(image)

    first, again, other = crops(0), crops(0), crops(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    transform = pickle.loads(pickle.dumps(transform))       # as DataLoader workers get it
    assert all(torch.equal(a, b) for a, b in zip(first, crops(0)))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))
    assert not torch.equal(first[2], first[3])          # local crops differ from each other


def test_plain_pipeline_is_the_normalized_image_no_mean_std():
    image = _pattern(48, 48)
    attenuation = torch.from_numpy(image.astype(np.float32))
    # neglog reads the beam intensity: in the attenuation-bright input, full scale minus the value
    for p, expected in ((0.0, minmax(attenuation)), (1.0, neglog(65535.0 - attenuation))):
        config = MultiCropConfig(**{**PLAIN, "neglog_p": p}, global_size=48, local_size=48, local_crops=1,
                                 global_scale=(1.0, 1.0), local_scale=(1.0, 1.0))
        for crop in XrayMultiCrop(config)(image):
            torch.testing.assert_close(crop[0], expected, atol=1e-6, rtol=0)
    for crop in XrayMultiCrop(MultiCropConfig(**SMALL))(np.full((40, 60), 1234, np.uint16)):
        assert crop.std() == 0 and 0 <= crop.min() <= 1   # a constant image stays constant


def test_solarization_on_floats_only_on_global_crop_two():
    image = _pattern(48, 48)
    config = MultiCropConfig(**{**PLAIN, "solarize_p": 1.0}, global_size=48, local_size=48, local_crops=1,
                             global_scale=(1.0, 1.0), local_scale=(1.0, 1.0))
    g1, g2, local = XrayMultiCrop(config)(image)
    x = minmax(torch.from_numpy(image.astype(np.float32)))
    torch.testing.assert_close(g1[0], x, atol=1e-6, rtol=0)
    torch.testing.assert_close(g2[0], torch.where(x >= 0.5, 1 - x, x), atol=1e-6, rtol=0)
    torch.testing.assert_close(local[0], x, atol=1e-6, rtol=0)


def _corners(crop: torch.Tensor) -> torch.Tensor:
    return torch.stack([crop[0, 0, 0], crop[0, 0, -1], crop[0, -1, 0], crop[0, -1, -1]])


@pytest.mark.parametrize("rotation_p", [1.0, 0.0])
def test_global_crop_one_is_never_rotated(rotation_p):
    # ROI from 1000 to 3000 (a dark dot in the middle), everything else bright: corners >= 0.5
    # unless rotation zero-fills them. Whole-image crops: any angle off multiples of 90 shows fill.
    image = np.full((64, 64), 3000, np.uint16)
    image[10:54, 10:54] = np.linspace(2000, 3000, 44, dtype=np.uint16)[None, :]
    image[32, 32] = 1000
    config = MultiCropConfig(**{**PLAIN, "rotation_p": rotation_p}, **SMALL,
                             global_scale=(1.0, 1.0), local_scale=(1.0, 1.0))
    transform, filled = XrayMultiCrop(config), 0
    for seed in range(6):
        torch.manual_seed(seed)
        g1, *rotatable = transform(image)
        assert _corners(g1).min() >= 0.45
        filled += sum(int(_corners(c).min() < 0.05) for c in rotatable)
    assert filled >= (20 if rotation_p else 0) and (filled == 0) == (rotation_p == 0)


@pytest.mark.parametrize("angle", [30.0, -100.0, 137.0])
def test_rotated_crop_matches_rotating_the_whole_image(angle):
    yy, xx = torch.meshgrid(torch.arange(60.0), torch.arange(80.0), indexing="ij")
    img = (0.5 + 0.3 * torch.sin(xx / 7) * torch.cos(yy / 11))[None]
    whole = F.rotate(img, angle, interpolation=InterpolationMode.BILINEAR, fill=0)
    for top, left, side, size in ((5, 10, 40, 40), (0, 0, 60, 60), (10, 30, 50, 20)):
        ref = F.resized_crop(whole, top, left, side, side, [size, size],
                             interpolation=InterpolationMode.BICUBIC, antialias=True)
        ours = _rotated_resized_crop(img, top, left, side, size, angle)
        assert ours.shape == (1, size, size)
        assert (ours - ref).abs().mean() < 0.01      # differences at the zero-fill edge, and from
        assert (ours - ref).abs().median() < (1e-5 if size == side else 3e-3)  # resizing before rotating


@pytest.mark.parametrize("image", [
    _pattern(50, 130), _pattern(130, 50), _pattern(17, 23),
    _pattern(70, 40).astype(np.float32) / 65535, _pattern(40, 70).astype(np.float64),
    torch.from_numpy(_pattern(45, 61).astype(np.float32))[None],
], ids=["wide", "tall", "tiny", "float32-unit", "float64", "tensor-1hw"])
def test_any_size_and_dtype(image):
    crops = XrayMultiCrop(MultiCropConfig(**SMALL, in_chans=3))(image)
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(c.dtype == torch.float32 and c.min() >= 0 and c.max() <= 1 for c in crops)


def test_decode_size_shrinks_once_and_never_enlarges():
    shrink = XrayMultiCrop(MultiCropConfig(**SMALL, decode_size=64))
    assert tuple(shrink.prepare(_pattern(200, 300)).minmax.shape) == (1, 43, 64)
    assert tuple(shrink.prepare(_pattern(30, 50)).minmax.shape) == (1, 30, 50)


def test_config_is_checked():
    with pytest.raises(ValueError):
        MultiCropConfig(blur="median")
    with pytest.raises(ValueError):
        MultiCropConfig(in_chans=2)
    with pytest.raises(ValueError):
        MultiCropConfig(min_content=1.5)
    with pytest.raises(ValueError):
        MultiCropConfig(gamma=(1.5, 0.5))


def _air_and_anatomy() -> np.ndarray:
    """48 x 48, attenuation bright and linear in intensity: clipped air (dark) on the left third, a ramp of
    anatomy on the right (beam intensity 2000 to 12000 of 65535)."""
    image = np.empty((48, 48), np.uint16)
    image[:, :16] = 65535 - 60000
    image[:, 16:] = 65535 - np.linspace(2000, 12000, 32, dtype=np.uint16)[None, :]
    return image


def _branches(crops: list[torch.Tensor]) -> list[str]:
    """Which intensity map each whole-image crop came from: both show air black, but min-max keeps the thin
    anatomy near white (>= 0.83) where neglog spreads it (its most transparent part near 0.4)."""
    return ["minmax" if float(c[0, :, -3:].mean()) > 0.7 else "neglog" for c in crops]


def test_neglog_and_minmax_agree_on_polarity():
    """Both intensity maps show attenuation bright: air darkest, the thickest anatomy brightest."""
    image = torch.from_numpy(_air_and_anatomy().astype(np.float32))
    for out in (minmax(image), neglog(65535.0 - image)):
        air, anatomy = out[:, :16].mean(), out[:, 16:]
        assert air < 0.05 and float(anatomy[:, 0].mean()) > float(anatomy[:, -1].mean()) > air + 0.3


def test_the_intensity_branch_is_drawn_per_crop_and_neglog_only_for_linear_images():
    config = MultiCropConfig(**{**PLAIN, "neglog_p": 0.5}, global_size=48, local_size=48, local_crops=4,
                             global_scale=(1.0, 1.0), local_scale=(1.0, 1.0))
    transform, image = XrayMultiCrop(config), _air_and_anatomy()
    mixed, seen = 0, set()
    for seed in range(8):
        torch.manual_seed(seed)
        branches = _branches(transform(image))
        mixed += len(set(branches)) > 1          # two crops of one image in different branches
        seen.update(branches)
        torch.manual_seed(seed)
        assert set(_branches(transform(image, linear=False))) == {"minmax"}   # log-encoded: no second log
    assert seen == {"minmax", "neglog"} and mixed >= 6


def _collimated(side: int = 96, field: int = 40) -> np.ndarray:
    """A collimated image: black outside a central square field that holds a ramp of anatomy."""
    image = np.zeros((side, side), np.uint16)
    lo = (side - field) // 2
    image[lo:lo + field, lo:lo + field] = np.linspace(1000, 5000, field, dtype=np.uint16)[None, :]
    image[lo, lo] = 5200     # the ramp's top stays below the saturation band
    return image


@pytest.mark.parametrize("rotation_p", [0.0, 1.0])
def test_crop_rejection_keeps_crops_inside_the_collimated_field(rotation_p):
    image = _collimated()
    plain = {**PLAIN, "rotation_p": rotation_p}

    def black_shares(min_content: float) -> tuple[np.ndarray, XrayMultiCrop]:
        config = MultiCropConfig(**plain, global_size=32, local_size=16, local_crops=6, min_content=min_content,
                                 crop_tries=100)
        transform, shares = XrayMultiCrop(config), []
        for seed in range(20):
            torch.manual_seed(seed)
            shares += [float((c < 0.02).float().mean()) for c in transform(image)[2:]]
        return np.array(shares), transform

    free, unchecked = black_shares(0.0)
    kept, checked = black_shares(0.5)
    assert unchecked.draws.rejected == 0 and unchecked.draws.drawn == 20 * 8
    # most local crops of this image are collimator, unless rejected; a kept one is at most about half black
    assert free.mean() > 0.5 and kept.mean() < 0.3 and kept.max() < 0.55
    assert checked.draws.rejected > 0 and checked.draws.fallback == 0
    assert 0 < checked.draws.rejection_rate < 1


def test_crop_rejection_falls_back_to_the_best_box_on_an_empty_image():
    config = MultiCropConfig(**SMALL, min_content=0.5, crop_tries=3)
    transform = XrayMultiCrop(config)
    crops = transform(np.zeros((40, 60), np.uint16))      # no content anywhere: every crop falls back
    assert len(crops) == 5 and transform.draws.fallback == 5 and transform.draws.rejected == 15


def test_gamma_is_drawn_per_crop():
    image = _pattern(48, 48)
    config = MultiCropConfig(**PLAIN, gamma_p=1.0, global_size=48, local_size=48, local_crops=3,
                             global_scale=(1.0, 1.0), local_scale=(1.0, 1.0))
    torch.manual_seed(0)
    crops = XrayMultiCrop(config)(image)
    x = minmax(torch.from_numpy(image.astype(np.float32)))
    means = {round(float(c.mean()), 4) for c in crops}
    assert len(means) == len(crops) and all(not torch.allclose(c[0], x, atol=1e-3) for c in crops)


# ----------------------------------------------------------------------------- evaluation

def test_eval_transform_deterministic_letterboxed():
    image = _pattern(50, 100)
    transform = XrayEvalTransform(size=64, in_chans=3)
    torch.manual_seed(0)
    first = transform(image)
    torch.manual_seed(1)
    assert torch.equal(first, transform(image))
    assert first.shape == (3, 64, 64) and first.dtype == torch.float32
    assert first.min() >= 0 and first.max() <= 1 and torch.equal(first[0], first[2])
    assert letterbox_geometry(50, 100, 64) == (32, 64, 16, 0)
    assert (first[:, :16] == 0).all() and (first[:, 48:] == 0).all() and first[:, 16:48].std() > 0
    square = XrayEvalTransform(size=32, neglog=True)(_pattern(32, 32))
    torch.testing.assert_close(square[0], neglog(65535.0 - torch.from_numpy(_pattern(32, 32).astype(np.float32))))
    assert full_scale(_pattern(4, 4)) == 65535.0 and full_scale(torch.zeros(2, 2)) == 1.0
