"""The `synth` flow end to end: a real Prefect flow, real DICOM files, real Parquet tables."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest

from flows.synth import synth
from tasks.label_schema import BODY_REGIONS, png_to_mask
from tasks.synth.corpus import (
    DICOM_DIR,
    batch_ranges,
    merge_parts,
    prepare_corpus,
    synthesize_batch,
)
from tasks.synth.study import PRESETS, generate_study

TEST = PRESETS["test"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    result = synth(out=str(out), studies=11, seed=7, preset="test", batch_size=3)
    assert result["studies"] == 11 and result["corpus_images"] == result["images"] > 11
    return out


@pytest.fixture(scope="module")
def labels(corpus):
    return pq.read_table(corpus / "labels.parquet").to_pylist()


@pytest.fixture(scope="module")
def phi(corpus):
    return pq.read_table(corpus / "phi.parquet").to_pylist()


def test_every_region_and_series_kind_is_generated(labels):
    assert {row["region"] for row in labels} == set(BODY_REGIONS)
    assert {row["modality"] for row in labels} <= {"XA", "RF", "DX", "CR"}
    assert {"fluoro", "radiograph"} <= {row["series_kind"] for row in labels}


def test_every_dicom_file_is_labelled_and_labels_agree_with_the_file(corpus, labels):
    files = {p.relative_to(corpus / DICOM_DIR).as_posix() for p in (corpus / DICOM_DIR).rglob("*.dcm")}
    assert files == {row["path"] for row in labels}
    by_path: dict[str, list[dict]] = {}
    for row in labels:
        by_path.setdefault(row["path"], []).append(row)
    for path, rows in by_path.items():
        raw = (corpus / DICOM_DIR / path).read_bytes()
        ds = pydicom.dcmread(corpus / DICOM_DIR / path)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        pixels = ds.pixel_array
        assert pixels.shape[-2:] == (ds.Rows, ds.Columns)
        assert sorted(r["frame"] for r in rows) == list(range(frames))
        for row in rows:
            assert row["sha256"] == hashlib.sha256(raw).hexdigest()
            assert (row["rows"], row["cols"], row["frames"]) == (ds.Rows, ds.Columns, frames)
            assert row["modality"] == ds.Modality
            assert row["transfer_syntax_uid"] == ds.file_meta.TransferSyntaxUID
            assert png_to_mask(row["metal_mask_png"]).shape == (ds.Rows, ds.Columns)


def test_visible_screw_points_lie_on_the_metal_mask(labels):
    checked = 0
    for row in labels:
        mask = png_to_mask(row["metal_mask_png"])
        for screw in row["screws"]:
            if not screw["visible"]:
                continue
            for x, y in ((screw["head_x"], screw["head_y"]), (screw["tip_x"], screw["tip_y"])):
                xi, yi = int(round(x)), int(round(y))
                window = mask[max(yi - 1, 0): yi + 2, max(xi - 1, 0): xi + 2]
                assert window.any(), f"screw point {(x, y)} off the mask in {row['sha256'][:12]}"
                checked += 1
    assert checked > 0, "the test corpus should contain visible screws"


def test_ground_truth_labels_are_not_inside_the_dicom(corpus, labels):
    multiword = [r for r in BODY_REGIONS if " " in r or "-" in r]
    for path in {row["path"] for row in labels}:
        raw = (corpus / DICOM_DIR / path).read_bytes().lower()
        assert not any(region.encode() in raw for region in multiword)


def test_planted_phi_is_listed_for_every_file_and_found_where_it_says(corpus, labels, phi):
    files = {row["path"] for row in labels}
    assert files <= {row["path"] for row in phi}
    kinds = {row["kind"] for row in phi}
    assert {"patient_name", "patient_id", "birth_date"} <= kinds
    for row in phi:
        if row["location"] == "path":
            assert row["value"] in row["path"]
    # the patient's name is in the export's folder names, as in a real hospital export
    assert any(row["location"] == "path" and row["kind"] == "patient_name" for row in phi)


def test_study_is_deterministic_by_seed(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    labels_a, phi_a = generate_study(a, 3, 5, TEST)
    labels_b, phi_b = generate_study(b, 3, 5, TEST)
    labels_c, _ = generate_study(c, 4, 5, TEST)
    assert labels_a == labels_b and phi_a == phi_b
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.dcm"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.dcm"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)
    assert [r["sha256"] for r in labels_a] != [r["sha256"] for r in labels_c]


def test_seed_ranges_and_resume_give_the_same_corpus(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    for out, batches in ((whole, batch_ranges(0, 4, 4)), (split, batch_ranges(0, 2, 1) + batch_ranges(2, 2, 2))):
        prepare_corpus(out, 11, "test", TEST)
        for first, last in batches:
            synthesize_batch(out, 11, first, last, TEST)
        merge_parts(out)
    columns = ["path", "sha256", "frame", "region", "screws"]
    assert pq.read_table(whole / "labels.parquet", columns=columns).to_pylist() == \
        pq.read_table(split / "labels.parquet", columns=columns).to_pylist()
    # a finished batch is not redone
    again = synthesize_batch(split, 11, 2, 4, TEST)
    assert again.resumed and again.images > 0


def test_a_corpus_refuses_a_second_seed(tmp_path):
    prepare_corpus(tmp_path, 1, "test", TEST)
    with pytest.raises(ValueError, match="seed 1"):
        prepare_corpus(tmp_path, 2, "test", TEST)


def test_batches_cover_the_range_exactly():
    assert batch_ranges(5, 7, 3) == [(5, 8), (8, 11), (11, 12)]
    assert batch_ranges(0, 0, 3) == []
    with pytest.raises(ValueError):
        batch_ranges(0, 3, 0)


def test_montage_draws_every_region(corpus, tmp_path):
    from tasks.synth.montage import make_montage

    png = make_montage(corpus, tmp_path / "montage.png")
    image = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(png))
    assert image.shape[0] > 500 and image.std() > 10
