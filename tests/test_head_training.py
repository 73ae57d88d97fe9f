"""Frozen-backbone heads: letterbox geometry, cached features, heads that learn, the fan-out flow.

The corpus tests run on real shards (``small_corpus`` copied into the heads' home by ``heads_corpus``),
with a backbone registered by a real 3-step DINO pretraining and the real MLflow SQLite store.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from dax_models.augment import Letterbox, XrayEvalTransform, mask_to_input, mask_to_native
from dax_models.backbones import create_backbone, extract
from dax_models.metrics import segmentation_metrics
from tasks.heads.data import load_head_dataset, shown_mask, shown_screws, unseen_pixels
from tasks.heads.evaluation import evaluate_screws, predict_masks, predict_screws
from tasks.heads.features import FeatureStore, LiveFeatures
from tasks.heads.training import (
    HeadConfig,
    TrainedMaps,
    fit_classifier,
    fit_screw_head,
    fit_segmenter,
    load_head_config,
    run_task,
    train_end_to_end,
)
from tasks.ingest.normalize import AIR_CLIP_SHARE, air_clipped, blanked_boxes
from tasks.label_schema import BODY_REGIONS, png_to_mask

pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tests/conftest.py

# --- geometry and features (no corpus) ------------------------------------------------------------------

@pytest.mark.parametrize("native, stored, size", [((1500, 2200), (698, 1024), 128), ((450, 375), (128, 107), 64),
                                                  ((256, 256), (128, 128), 64)])
def test_the_letterbox_maps_native_points_and_masks_both_ways(native, stored, size):
    box = Letterbox.for_stored(*native, *stored, size)
    assert box.top + box.new_h <= size and box.left + box.new_w <= size and max(box.new_h, box.new_w) == size
    points = np.array([[0.0, 0.0], [native[1], native[0]], [native[1] / 3, native[0] * 0.7]])
    mapped = box.to_input(points)
    np.testing.assert_allclose(mapped[0], [box.left, box.top])
    np.testing.assert_allclose(mapped[1], [box.left + box.new_w, box.top + box.new_h])
    np.testing.assert_allclose(box.to_native(mapped), points, atol=1e-9)
    screws = np.array([[10.0, 20.0, 30.0, 40.0, 0.9]])
    np.testing.assert_allclose(box.screws_to_native(box.screws_to_input(screws)), screws, atol=1e-9)
    # a rectangle survives the trip native -> letterbox -> native (up to one input pixel at the edges)
    mask = np.zeros(native, dtype=bool)
    r0, r1, c0, c1 = native[0] // 4, native[0] // 2, native[1] // 3, native[1] * 3 // 4
    mask[r0:r1, c0:c1] = True
    small = mask_to_input(mask, box)
    assert small.shape == (size, size) and not small[:box.top].any() and not small[:, :box.left].any()
    back = mask_to_native(small.float(), box)
    assert back.shape == native
    assert segmentation_metrics(torch.from_numpy(back), torch.from_numpy(mask))["iou"] > 0.8


@pytest.mark.parametrize("arch", ["vit_tiny_patch16", "resnet18"])
def test_one_backbone_pass_gives_the_three_feature_views(arch):
    torch.manual_seed(0)
    backbone = create_backbone(arch, 1, img_size=32).eval()
    x = torch.rand(2, 1, 32, 32)
    out = extract(backbone, x)
    with torch.no_grad():
        torch.testing.assert_close(out["pooled"], backbone(x))
        torch.testing.assert_close(out["last4"], backbone.last4(x))
        for got, want in zip(out["maps"], backbone.feature_maps(x), strict=True):
            torch.testing.assert_close(got, want)
        # the probe reads 4 levels: ViT the last 4 CLS tokens, ResNet the 4 stages' average pools (not the final one)
        levels = 4 * backbone.embed_dim if arch.startswith("vit") else sum(backbone.feature_channels)
        assert out["last4"].shape == (2, levels) and levels > out["pooled"].shape[1]
        if not arch.startswith("vit"):
            torch.testing.assert_close(out["last4"][:, -backbone.embed_dim:], out["pooled"])
        # heads registered before the rename ask for "cls4" and get the same features
        torch.testing.assert_close(extract(backbone, x, ("cls4",))["cls4"], out["last4"])


def test_features_are_computed_once_cached_on_disk_and_reused(tmp_path):
    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny_patch16", 1, img_size=32)
    images = torch.rand(10, 1, 32, 32).to(torch.float16)
    calls = []
    backbone.model.patch_embed.register_forward_hook(lambda *_: calls.append(1))
    first = FeatureStore.compute(backbone, images, batch_size=4, cache_dir=tmp_path)
    assert len(calls) == 3                                    # ceil(10 / 4) batches, one pass each
    again = FeatureStore.compute(backbone, images, batch_size=4, cache_dir=tmp_path)
    assert len(calls) == 3 and again.path == first.path       # a cache hit: no backbone pass
    assert isinstance(again.maps[0], np.memmap) and again.arrays["pooled"].dtype == np.float16
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]
    live = LiveFeatures(backbone, images)
    idx = [7, 2, 5]
    for part in ("pooled", "last4"):
        torch.testing.assert_close(again.get(part, idx), live.get(part, idx), atol=2e-2, rtol=1e-2)
    for cached, computed in zip(again.get("maps", idx), live.get("maps", idx), strict=True):
        torch.testing.assert_close(cached, computed, atol=2e-2, rtol=1e-2)
    other = create_backbone("vit_tiny_patch16", 1, img_size=32)   # other weights: another entry
    FeatureStore.compute(other, images, batch_size=4, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2


# --- on the corpus ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus64(heads_corpus):
    return load_head_dataset(heads_corpus.home, heads_corpus.labels, size=64)


def test_the_dataset_follows_the_letterbox_and_splits_by_patient(corpus64):
    data = corpus64
    n = len(data)
    assert data.images.shape == (n, 1, 64, 64) and data.images.dtype == torch.float16
    assert data.masks.shape == (n, 64, 64) and data.masks.dtype == torch.bool
    assert set(data.regions.tolist()) <= set(range(len(BODY_REGIONS)))
    for patient in set(data.patient_keys):
        assert len({s for s, p in zip(data.splits, data.patient_keys) if p == patient}) == 1
    with_screws = [i for i in range(n) if len(data.screws[i])]
    assert with_screws
    for i in with_screws:
        np.testing.assert_allclose(data.boxes[i].screws_to_native(data.screws[i]), data.native_screws[i], atol=1e-6)
        assert ((data.screws[i] >= 0) & (data.screws[i] <= 64)).all()
    assert data.masks.any()
    for i in range(n):   # the letterboxed mask is the native label mask, resized and padded
        native, box = data.native_mask(i), data.boxes[i]
        assert native.shape == (box.native_h, box.native_w)
        ys, xs = np.nonzero(data.masks[i].numpy())
        assert ((ys >= box.top) & (ys < box.top + box.new_h) & (xs >= box.left) & (xs < box.left + box.new_w)).all()
        for x, y in box.to_native(np.stack([xs + 0.5, ys + 0.5], axis=1)):   # each positive pixel's centre
            sx, sy = (1 / s for s in box.scale)                                 # is on native metal
            window = native[int(max(0, y - sy)):int(y + sy) + 1, int(max(0, x - sx)):int(x + sx) + 1]
            assert window.any()


def test_the_truth_is_what_the_image_shows_cleaned_text_hides_metal_and_screws():
    """Blanked burned-in text reads as air in the models' view: metal and screw points inside a cleaned box
    (on the grid asked for, rounded outwards) are not in the heads' truth."""
    params = {"rows": 100, "cols": 200, "blanked": [[10, 5, 31, 9]]}        # normalized size's pixels
    assert blanked_boxes(params, 100, 200) == [(10, 5, 31, 9)]
    assert blanked_boxes(params, 300, 300) == [(15, 15, 47, 27)]            # native grid: 1.5x, 3x; outwards
    assert blanked_boxes({"rows": 10, "cols": 10, "blanked": [[0, 8, 10, 10]]}, 15, 15) == [(0, 12, 15, 15)]
    assert blanked_boxes(None, 10, 10) == [] and blanked_boxes({"rows": 10}, 10, 10) == []
    mask, unseen = np.ones((20, 30), dtype=bool), np.zeros((20, 30), dtype=bool)
    unseen[3:7, 2:5] = True
    shown = shown_mask(mask, unseen)
    assert mask.all() and not shown[3:7, 2:5].any() and shown.sum() == 600 - 12       # the label is untouched
    assert shown_mask(mask, np.zeros_like(unseen)) is mask and shown_mask(~unseen, unseen) is not mask
    screws = np.array([[1, 1, 1.9, 2.9], [3, 4, 10, 10], [10, 10, 4.9, 6.9], [10, 10, 5, 7], [40, 1, 2, 2]],
                      dtype=np.float64)
    np.testing.assert_array_equal(shown_screws(screws, unseen), screws[[0, 3, 4]])   # head or tip on an unseen pixel
    np.testing.assert_array_equal(shown_screws(screws, np.zeros_like(unseen)), screws)


def test_air_that_clips_the_detector_hides_the_metal_in_front_of_it():
    """The view's lowest value held by a plateau (the detector's clipped air) shows nothing: metal there is no
    truth. A noisy minimum is no plateau, and the cleaned boxes (0 in the view) are neither the minimum nor in it."""
    rng = np.random.default_rng(0)
    view = rng.integers(20_000, 60_000, size=(40, 50), dtype=np.uint16)
    assert not air_clipped(view, None).any()                           # a few pixels at the minimum: not clipped
    view[:, :10] = 5_000                                               # clipped air: 20 % of the image
    params = {"rows": 40, "cols": 50, "blanked": [[40, 0, 50, 8]]}
    view[0:8, 40:50] = 0                                               # a cleaned box reads 0 in the models' view
    clipped = air_clipped(view, params)
    assert clipped[:, :10].all() and clipped.sum() == 400               # the plateau, not the box
    small = view.copy()
    small[:, :10] = rng.integers(20_000, 60_000, size=(40, 10))
    small[0, 0:int(AIR_CLIP_SHARE * 40 * 50) // 2] = 1_000              # under the share: not a plateau
    assert not air_clipped(small, params).any()
    # on the native grid (twice the stored one): the box rounded outwards and the plateau, pixel for pixel
    unseen = unseen_pixels(view, params, 80, 100)
    assert unseen[:, :20].all() and unseen[0:16, 80:100].all() and unseen.sum() == 80 * 20 + 16 * 20


def test_the_corpus_truth_is_the_label_less_what_no_pixel_shows(heads_corpus, corpus64):
    """On the ingested corpus: each native mask is exactly the label's metal less the unseen pixels (the boxes
    cleaned of burned-in text, in native pixels, and clipped air); neither the letterboxed mask nor a screw point
    lies there; and the label file has metal under a cleaned box on some image and in front of clipped air on some
    fluoroscopy image (what the images do not show: the test fails if either rule goes)."""
    from collections import defaultdict

    import pyarrow.parquet as pq

    from tasks.ingest.labels import load_labels
    from tasks.pretrain.data import read_samples

    data = corpus64
    labels = load_labels(heads_corpus.home, heads_corpus.labels, ("metal_mask_png",)).to_pylist()
    assert [r["key"] for r in labels] == data.keys
    assert pq.read_table(heads_corpus.labels, columns=["burned_in_text"]).column(0).to_pylist().count(True) >= 1
    by_shard = defaultdict(list)
    for row in labels:
        by_shard[row["shard"]].append(row["key"])
    with_boxes, hidden_metal, in_clipped_air = 0, 0, []
    for key, view, meta in read_samples(heads_corpus.home / "shards", by_shard):
        i = data.keys.index(key)
        box, raw, params = data.boxes[i], labels[i]["metal_mask_png"], meta.get("normalization")
        unseen = unseen_pixels(view, params, box.native_h, box.native_w)
        label = png_to_mask(raw) if raw else np.zeros((box.native_h, box.native_w), dtype=bool)
        native = data.native_mask(i)
        np.testing.assert_array_equal(native, label & ~unseen)
        for points in (data.native_screws[i][:, :2], data.native_screws[i][:, 2:]):
            assert not unseen[points[:, 1].astype(int), points[:, 0].astype(int)].any()
        boxed = np.zeros_like(unseen)
        boxes = blanked_boxes(params, box.native_h, box.native_w)
        with_boxes += bool(boxes)
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= box.native_w and 0 <= y0 < y1 <= box.native_h
            assert not native[y0:y1, x0:x1].any()
            hidden_metal += bool(label[y0:y1, x0:x1].any())
            (ix0, iy0), (ix1, iy1) = box.to_input(np.array([[x0, y0], [x1, y1]]))
            assert not data.masks[i, int(np.ceil(iy0)):int(iy1), int(np.ceil(ix0)):int(ix1)].any()
            for points in (data.native_screws[i][:, :2], data.native_screws[i][:, 2:]):
                assert not ((points[:, 0] >= x0) & (points[:, 0] < x1) & (points[:, 1] >= y0) &
                            (points[:, 1] < y1)).any()
            boxed[y0:y1, x0:x1] = True
        if (label & unseen & ~boxed).any():
            in_clipped_air.append(params["modality"])
    assert with_boxes >= 1
    assert hidden_metal >= 1, "the test corpus should have metal under cleaned text"
    assert in_clipped_air and set(in_clipped_air) <= {"RF", "XA"}, in_clipped_air


def _metal_contrast(image: np.ndarray, mask: np.ndarray, box: Letterbox) -> float:
    """Mean inside the metal mask minus the mean of the rest of the image's field (the letterbox's content)."""
    field = np.zeros(mask.shape, bool)
    field[box.top:box.top + box.new_h, box.left:box.left + box.new_w] = True
    return float(image[mask].mean() - image[field & ~mask].mean())


def test_the_heads_see_metal_bright_on_every_modality(heads_corpus):
    """The models' view (tasks.ingest.normalize.model_view) shows attenuation bright on fluoroscopy and
    radiography alike, where the stored display shows metal dark on XA and RF: one polarity to learn."""
    from tasks.ingest.catalog import open_snapshot
    from tasks.ingest.shards import iter_shard

    data = load_head_dataset(heads_corpus.home, heads_corpus.labels, size=128)
    con = open_snapshot(heads_corpus.home)
    try:
        rows = con.execute("SELECT key, modality, shard FROM images").fetchall()
    finally:
        con.close()
    modality = {key: m for key, m, _ in rows}
    displayed = {}                                   # the stored display polarity, through the same letterbox
    for shard in sorted({shard for _, _, shard in rows}):
        for key, pixels, _ in iter_shard(heads_corpus.home / "shards" / shard):
            displayed[key] = pixels
    seen, view, display = Counter(), Counter(), Counter()
    for i, key in enumerate(data.keys):
        mask = data.masks[i].numpy()
        if mask.sum() < 3:
            continue
        family = "fluoroscopy" if modality[key] in ("XA", "RF") else "radiography"
        seen[family] += 1
        view[family] += _metal_contrast(data.images[i, 0].float().numpy(), mask, data.boxes[i]) > 0
        shown = XrayEvalTransform(size=128)(displayed[key])[0].numpy()
        display[family] += _metal_contrast(shown, mask, data.boxes[i]) > 0
    assert seen["fluoroscopy"] >= 5 and seen["radiography"] >= 2, seen
    for family in seen:    # 128 px: thin metal blurs into bone; 84-100 % per modality on the evaluation corpus
        assert view[family] >= 0.7 * seen[family], (family, view, display, seen)
    assert display["fluoroscopy"] <= 0.25 * seen["fluoroscopy"], (view, display, seen)   # what the view corrects
    assert display["radiography"] == view["radiography"]                                 # shown as they are
    # the feature cache's key follows the pixels: the same keys and geometry in another view are other data
    assert dataclasses.replace(data, images=1 - data.images).digest != data.digest


def test_heads_learn_on_the_training_split(heads_env, corpus64):
    """Each head, trained on cached features of the registered backbone, fits its training images far
    better than the same head untrained (region: than always answering the majority class)."""
    data = corpus64
    backbone = mlflow.pytorch.load_model(heads_env.backbone, map_location="cpu")
    store = FeatureStore.compute(backbone, data.images, cache_dir=heads_env.home / "cache" / "features",
                                 data_digest=data.digest)
    train = data.indices("train")
    labels = data.regions

    head, _ = fit_classifier(store, "last4", train, labels, len(BODY_REGIONS), epochs=150, lr=3e-3, seed=0)
    with torch.no_grad():
        fit = (head(store.get("last4", train)).argmax(1) == labels[train]).float().mean().item()
    majority = Counter(labels[train].tolist()).most_common(1)[0][1] / len(train)
    assert fit > majority + 0.25, (fit, majority)

    metal = np.asarray([i for i in train if data.masks[i].any()])
    trained, _ = fit_segmenter(store, train, data.masks, 64, epochs=60, lr=3e-3, batch_size=16, seed=0)
    untrained, _ = fit_segmenter(store, train, data.masks, 64, epochs=0, seed=0)
    dice = {name: segmentation_metrics(predict_masks(m, store, metal, 64, "cpu") > 0.5, data.masks[metal])["dice"]
            for name, m in (("trained", trained), ("untrained", untrained))}
    assert dice["trained"] > max(2 * dice["untrained"], dice["untrained"] + 0.1), dice

    trained, _ = fit_screw_head(store, train, data.screws, 64, epochs=60, lr=3e-3, batch_size=16, seed=0)
    untrained, _ = fit_screw_head(store, train, data.screws, 64, epochs=0, seed=0)
    f1 = {name: evaluate_screws(predict_screws(m, store, train, 64, "cpu"), data, train, gate=0.05)[1]["f1"]
          for name, m in (("trained", trained), ("untrained", untrained))}
    assert f1["trained"] > f1["untrained"] + 0.1, f1


def _split_covering_every_test_class(data) -> np.ndarray:
    """Patients, in key order, go to 'test' while every class they show is still shown by the others and
    test holds under a third of the images; the rest to 'train' (by patient, as the real split)."""
    patients = sorted(set(data.patient_keys))
    images = {p: [i for i, q in enumerate(data.patient_keys) if q == p] for p in patients}
    test: set[str] = set()
    for patient in patients:
        rest = {int(data.regions[i]) for q in patients if q not in test | {patient} for i in images[q]}
        classes = {int(data.regions[i]) for i in images[patient]}
        if classes <= rest and sum(len(images[q]) for q in test | {patient}) < len(data) / 3:
            test.add(patient)
    return np.asarray(["test" if p in test else "train" for p in data.patient_keys])


def test_heads_beat_the_random_init_twin_given_a_backbone_with_a_clear_signal(heads_corpus):
    """A backbone whose features carry the labels (the twin trained end to end on every labelled image:
    the test images' labels leak into it on purpose) gives frozen heads that beat the untouched
    random-init twin on held-out patients; through the same `run_task` each branch of the flow runs.
    The patients are re-split so that every test class is also in training (24 studies are too few
    for the hash split to guarantee it)."""
    data = load_head_dataset(heads_corpus.home, heads_corpus.labels, size=32, masks=False)
    data = dataclasses.replace(data, splits=_split_covering_every_test_class(data))
    assert len(data.indices("test")) >= 8
    torch.manual_seed(0)
    twin = create_backbone("vit_tiny_patch16", 1, img_size=32)
    everything = np.arange(len(data))
    fitted, signal = train_end_to_end(twin, data, everything, None, everything, epochs=27, lr=3e-4, batch_size=32,
                                      seed=0, device="cpu", return_model=True, augment=False)
    assert fitted["accuracy"] > 0.8, fitted                   # it did take the labels in
    config = HeadConfig(size=32, linear_epochs=50, mlp_epochs=50, few_shot=(), e2e_epochs=0)
    results = {}
    for name, backbone in (("signal", signal), ("random", twin)):
        store = FeatureStore.compute(backbone, data.images, parts=("pooled", "last4"))
        results[name] = run_task("region", 0, data, store, config, "vit_tiny_patch16").metrics
    for metric in ("accuracy", "knn_accuracy", "linear_pooled_accuracy"):
        assert results["signal"][metric] > results["random"][metric] + 0.2, (metric, results)


def test_head_config_numbers_are_checked_as_the_pretraining_configs():
    """PyYAML reads ``1e-3`` (no dot) as a string: as a number setting it is the number (deployments.checked_numbers);
    a word is refused by name."""
    assert load_head_config("demo", {"linear_lr": "1e-3"}).linear_lr == 1e-3
    with pytest.raises(ValueError, match=re.escape("seg_epochs must be a whole number, not 'many'")):
        load_head_config("demo", {"seg_epochs": "many"})


def test_the_heads_flow_keeps_an_override_size_and_refuses_a_disagreement():
    """The flow's ``size`` parameter left out once replaced an override's ``size`` with None, which the loader
    then skipped: ``heads_eval.py --set size=64`` silently ran the region heads at the config's 96 px."""
    from flows.heads import head_config

    assert load_head_config("demo").size == 96
    assert head_config("demo", {"size": 64}, None).size == 64
    assert head_config("demo", {"seg_epochs": 2}, 80).size == 80
    assert head_config("demo", {"size": 64}, 64).size == 64
    assert head_config("demo", None, None).size == 96
    with pytest.raises(ValueError, match="size 80 and the override size=64 disagree"):
        head_config("demo", {"size": 64}, 80)


def test_every_shipped_head_config_loads():
    """The head configs under deployments/heads/ load by name; the evaluation's reads every labelled image for
    metal and screws, where the demo's reads a subset to fit its 30 minutes."""
    names = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "deployments" / "heads").glob("*.yaml"))
    assert {"demo", "eval"} <= set(names)
    configs = {name: load_head_config(name) for name in names}
    assert configs["eval"].dense_max_images is None and configs["demo"].dense_max_images
    assert configs["eval"].size == configs["demo"].size and configs["eval"].seg_hidden == configs["demo"].seg_hidden


def test_the_supervised_bound_trains_and_tests_at_its_own_smaller_side(heads_corpus):
    """``e2e_size`` shrinks the end-to-end bound's images (never enlarges them): every image the copied
    backbone sees, in training and in testing, is at that side."""
    assert HeadConfig(size=224).e2e_side == 96
    assert HeadConfig(size=32).e2e_side == 32                       # at most the region size
    assert HeadConfig(size=224, e2e_size=None).e2e_side == 224
    data = load_head_dataset(heads_corpus.home, heads_corpus.labels, size=32, masks=False)
    torch.manual_seed(0)
    twin = create_backbone("resnet18", 1, img_size=32)
    seen = []
    twin.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    train, val, test = np.array_split(np.arange(len(data)), 3)
    result = train_end_to_end(twin, data, train, val, test, epochs=1, lr=3e-4, batch_size=16, seed=0, device="cpu",
                              size=16)
    assert seen and set(seen) == {(16, 16)}, set(seen)
    assert 0.0 <= result["accuracy"] <= 1.0


def test_the_dense_ceiling_trains_a_copy_of_the_backbone_on_windows_and_learns(corpus64):
    """``TrainedMaps``: the segmentation head's end-to-end run trains a copy of the backbone with it (the twin is
    untouched), runs it on the training windows while it trains and on whole images when it is scored, and fits
    the training images' metal far better than the same run untrained."""
    data = corpus64
    train = data.indices("train")
    torch.manual_seed(0)
    twin = create_backbone("resnet18", 1, img_size=64)
    before = {k: v.clone() for k, v in twin.state_dict().items()}

    def fit(epochs, crop=0, seen=None):
        source = TrainedMaps(twin, data.images, "cpu", lr=1e-3)
        if seen is not None:
            stem = source.backbone.model.conv1       # every pass of the backbone starts here
            stem.register_forward_pre_hook(lambda m, a: seen.append((m.training, tuple(a[0].shape[-2:]))))
        decoder, _ = fit_segmenter(source, train, data.masks, 64, epochs=epochs, lr=3e-3, batch_size=16, seed=0,
                                   crop=crop, val_idx=train[:8], eval_every=1)
        return source, decoder

    seen = []
    windowed, _ = fit(1, crop=32, seen=seen)
    assert {shape for training, shape in seen if training} == {(32, 32)}
    assert {shape for training, shape in seen if not training} == {(64, 64)}
    assert all(torch.equal(before[k], v) for k, v in twin.state_dict().items())          # the twin is untouched
    assert any(not torch.equal(before[k], v) for k, v in windowed.backbone.state_dict().items())

    metal = np.asarray([i for i in train if data.masks[i].any()])
    dice = {}
    for name, epochs in (("trained", 30), ("untrained", 0)):
        source, decoder = fit(epochs)
        dice[name] = segmentation_metrics(predict_masks(decoder, source, metal, 64, "cpu") > 0.5,
                                          data.masks[metal])["dice"]
    assert dice["trained"] > max(2 * dice["untrained"], dice["untrained"] + 0.3), dice


# --- the flow ---------------------------------------------------------------------------------------------

def test_the_flow_fans_out_and_registers_every_head_with_its_backbone(heads_flow, heads_env):
    summary = heads_flow
    client = MlflowClient()
    backbone_ref = f"dax-backbone-vit_tiny_patch16/{heads_env.backbone_version}"
    assert summary["backbone"] == backbone_ref
    branches = summary["branches"]
    assert sorted((b["role"], b["task"], b["seed"]) for b in branches) == sorted(
        [(role, task, seed) for role in ("pretrained", "random") for task in ("region", "metal", "screws")
         for seed in (0, 1)] + [("floor", task, seed) for task in ("region", "metal") for seed in (0, 1)])
    for task in ("region", "metal", "screws"):
        name = f"dax-head-{task}-vit_tiny_patch16"
        versions = client.search_model_versions(f"name = '{name}'")
        assert len(versions) == 2                             # the pretrained seeds; random-init is never registered
        for version in versions:
            assert version.tags["dax.backbone"] == backbone_ref
            assert version.tags["dax.task"] == task and "dax.val_score" in version.tags
            assert any(key.startswith("metric.") for key in version.tags)
        candidate = client.get_model_version_by_alias(name, "candidate")
        assert str(candidate.version) in {str(v.version) for v in versions}
        assert summary["registered"][task]["version"] == str(candidate.version)
        head = mlflow.pytorch.load_model(f"models:/{name}@candidate", map_location="cpu")
        assert head.task == task and head.size == 64
    assert all(b["version"] is None for b in branches if b["role"] in ("random", "floor"))

    run = client.get_run(summary["run_id"])
    assert run.data.tags["dax.backbone"] == backbone_ref
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{summary['run_id']}'")
    assert len(children) == 16                                # 12 head branches and 4 floors
    artifacts = {a.path for a in client.list_artifacts(summary["run_id"], "results")}
    assert {"results/heads_table.json", "results/heads.md", "results/heads.csv"} <= artifacts
    figures = {a.path for a in client.list_artifacts(summary["run_id"], "figures")}
    assert {f"figures/{t}-{r}-seed0.png" for t in ("region", "metal", "screws") for r in ("pretrained", "random")} \
        == figures
    assert any(k.startswith("pretrained.region.accuracy") for k in run.data.metrics)
    home = str(heads_env.home)
    assert not any(home in str(v) or str(heads_env.labels.name) in str(v) for v in run.data.params.values())

    rows = {(r["task"], r["metric"]): r for r in summary["table"]}
    assert rows[("region", "accuracy")]["paper"] == "96.9 %" and rows[("metal", "dice")]["paper"] == "94.1 %"
    assert rows[("screws", "head_l1_px")]["paper"].startswith("3.28 px")
    for key in (("region", "accuracy"), ("region", "knn_accuracy"), ("region", "fewshot5_accuracy"),
                ("region", "e2e_accuracy"), ("metal", "dice_all"), ("screws", "f1")):
        row = rows[key]
        assert row["pretrained_n"] == 2 and row["random_n"] == 2 and "±" in row["pretrained"], row
    for key in (("region", "accuracy"), ("region", "knn_accuracy"), ("metal", "dice"), ("metal", "dice_all")):
        assert rows[key]["floor_n"] == 2 and 0 <= rows[key]["floor_mean"] <= 1, rows[key]   # the floors ran
    assert rows[("region", "accuracy")]["ceiling_n"] == 2                 # e2e from random init: the ceiling
    assert rows[("region", "accuracy")]["ceiling_mean"] == rows[("region", "e2e_accuracy")]["random_mean"]
    for key in (("metal", "dice"), ("screws", "recall"), ("screws", "f1")):   # the dense tasks' ceilings ran too
        assert rows[key]["ceiling_n"] == 2, rows[key]
    ceiling_runs = [b for b in branches if b["role"] == "random" and b["task"] == "metal"]
    assert rows[("metal", "dice")]["ceiling_mean"] == pytest.approx(np.mean([b["metrics"]["e2e_dice"]
                                                                              for b in ceiling_runs]))
    assert "| floor | random-init | pretrained | supervised ceiling | DAX paper |" in summary["markdown"]
    table = json.loads(mlflow.artifacts.load_text(f"runs:/{summary['run_id']}/results/heads_table.json"))
    assert {"floor", "pretrained", "random", "ceiling", "paper"} <= set(table["columns"])
    # features: one cache entry per backbone, computed once and shared by every task and seed
    assert len(list((heads_env.home / "cache" / "features").glob("*/meta.json"))) >= 2
