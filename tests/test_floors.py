"""Floors (tasks.heads.floors), patient-resampled intervals, the dense heads' training windows and the split check,
on small hand-made data (CPU, seconds)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dax_models.augment import Letterbox
from tasks.heads.data import HeadDataError, HeadDataset
from tasks.heads.evaluation import patient_interval
from tasks.heads.floors import metal_threshold_floor, region_floors
from tasks.heads.training import DenseCrop, HeadConfig, run_task
from tasks.label_schema import BODY_REGIONS, mask_to_png

SIZE = 32


def _dataset(n: int = 24, seed: int = 0, metal_dark: bool = False) -> HeadDataset:
    """Images whose region shows as a horizontal band (class c: band at row 3c) and whose metal is a square
    brighter (or darker) than the anatomy; 3 images per patient, patients split 2:1:1 train/val/test."""
    rng = np.random.default_rng(seed)
    images = torch.full((n, 1, SIZE, SIZE), 0.4) + 0.05 * torch.from_numpy(rng.standard_normal((n, 1, SIZE, SIZE))).float()
    regions = torch.as_tensor([i % 3 for i in range(n)])
    masks = torch.zeros(n, SIZE, SIZE, dtype=torch.bool)
    for i in range(n):
        c = int(regions[i])
        images[i, 0, 6 * c + 4:6 * c + 8] += 0.3
        r, col = rng.integers(4, 20, 2)
        masks[i, r:r + 8, col:col + 8] = True
        images[i, 0][masks[i]] = 0.05 if metal_dark else 0.95
    patients = [f"p{i // 3}" for i in range(n)]
    split_of = {p: ("train", "train", "val", "test")[k % 4] for k, p in enumerate(dict.fromkeys(patients))}
    box = Letterbox.of(SIZE, SIZE, SIZE)
    return HeadDataset(size=SIZE, keys=[f"k{i}" for i in range(n)], images=images.clamp(0, 1).half(), regions=regions,
                       masks=masks, screws=[np.zeros((0, 4))] * n, native_screws=[np.zeros((0, 4))] * n,
                       boxes=[box] * n, splits=np.asarray([split_of[p] for p in patients]), patient_keys=patients,
                       mask_pngs=[mask_to_png(m.numpy()) for m in masks], classes=tuple(BODY_REGIONS[:3]))


@pytest.mark.parametrize("metal_dark", [False, True])
def test_the_metal_floor_finds_the_threshold_and_the_side_of_it(metal_dark):
    data = _dataset(metal_dark=metal_dark)
    floor = metal_threshold_floor(data, data.indices("train"), data.indices("test"))
    assert floor["metal_side"] == (-1.0 if metal_dark else 1.0)
    assert floor["dice"] > 0.95 and len(floor["per_image_dice"]) == len(data.indices("test"))
    blank = _dataset()
    blank.images[:] = 0.4                                    # nothing to threshold: the floor is low
    assert metal_threshold_floor(blank, blank.indices("train"), blank.indices("test"))["dice"] < 0.5


def test_the_region_floors_read_thumbnails():
    data = _dataset(n=48)
    config = HeadConfig(linear_epochs=60, linear_lr=1e-2, knn_k=5)
    floors = region_floors(data, config, 0, data.indices("train"), data.indices("val"), data.indices("test"))
    assert floors["accuracy"] > 0.9 and floors["knn_accuracy"] > 0.9        # the band is in the thumbnails
    shuffled = _dataset(n=48)
    shuffled.regions[:] = shuffled.regions[torch.randperm(48, generator=torch.Generator().manual_seed(0))]
    low = region_floors(shuffled, config, 0, data.indices("train"), data.indices("val"), data.indices("test"))
    assert low["accuracy"] < 0.7                                             # labels without a picture


def test_patient_interval_resamples_patients_and_pairs_methods():
    patients = [p for p in range(10) for _ in range(5)]
    good = {"accuracy": [1.0] * 45 + [0.0] * 5}
    interval = patient_interval(good, patients, "accuracy")
    assert interval["patients"] == 10 and interval["value"] == pytest.approx(0.9)
    assert interval["low"] < 0.9 < interval["high"] <= 1.0                  # one patient all wrong: resampled
    floor = {"accuracy": [0.0, 1.0] * 25}
    paired = patient_interval(good, patients, "accuracy", minus=floor)
    assert paired["value"] == pytest.approx(0.4) and paired["low"] > 0
    counts = {"tp": [2] * 10, "fp": [0] * 10, "fn": [0] * 9 + [2]}
    assert patient_interval(counts, list(range(10)), "recall")["value"] == pytest.approx(20 / 22)
    assert patient_interval(counts, list(range(10)), "precision")["high"] == 1.0


@pytest.mark.parametrize("strides", [[16.0] * 4, [4.0, 8.0, 16.0, 32.0]])
def test_dense_crops_cut_every_level_where_the_input_is_cut(strides):
    window = DenseCrop(512, 256, strides, torch.Generator().manual_seed(0))
    assert window.crop == 256 and window.align == max(strides)
    maps = [torch.arange(512 // int(s)).float().view(1, 1, 1, -1).expand(1, 1, 512 // int(s), -1) for s in strides]
    for _ in range(20):
        top, left = window.draw()
        assert top % window.align == 0 and 0 <= left <= 256
        for level, s in zip(window.maps(maps, top, left), strides):
            assert level.shape[-1] == 256 / s and level[0, 0, 0, 0] == left / s   # the column the input starts at
    assert DenseCrop(512, 0, strides, torch.Generator()).crop == 512             # 0: whole images


def test_a_task_without_training_or_test_images_is_refused_naming_the_counts():
    """The heads flow checks every task's view before computing features (tasks of a two-patient corpus ended in
    a ValueError traceback, exit 1, after the features); `run_task` keeps the same check."""
    data = _dataset()
    data.check_splits("metal")                                # 3 images per patient, patients 2:1:1
    data.splits[data.splits == "test"] = "val"
    with pytest.raises(HeadDataError, match=r"the metal task needs training and test images \(got 12 and 0 of 8 "
                                            r"patients\): label more patients"):
        data.check_splits("metal")
    with pytest.raises(HeadDataError, match="the region task needs training and test images"):
        run_task("region", 0, data, None, HeadConfig(), "resnet18")
