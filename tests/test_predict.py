"""`predict`: never-ingested DICOM in, predictions on the ORIGINAL pixel grid out, named by sha256."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pydicom
import pytest
import torch
from conftest import heads_tracking
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from torch import nn

from dax_models.backbones import Backbone
from dax_models.heads import FrozenHead, head_polarity
from tasks.fileio import sha256_file
from tasks.label_schema import BODY_REGIONS
from tasks.release.predict import (
    LoadedModels,
    PredictError,
    load_models,
    predict,
    predict_file,
    prepare_dicom,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tests/conftest.py

PHI = ("Doe^Jane", "MRN-0042", "19700101")
HEX16 = re.compile(r"^[0-9a-f]{16}(_mask)?\.(json|png)$")


def write_dicom(path, rows=1500, cols=2200, block=(300, 700, 1300, 1900), pixels=True, photometric="MONOCHROME2",
                modality="CR"):
    """A CR image with PHI in its header (and its file name, chosen by the caller), 12-bit, a bright block."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.Manufacturer = modality, "Nowhere Medical"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.StudyDate = PHI[0], PHI[1], PHI[2], "20240102"
    if pixels:
        r0, r1, c0, c1 = block
        image = np.full((rows, cols), 900, np.uint16) + (np.arange(cols, dtype=np.uint16) // 20)[None]
        image[r0:r1, c0:c1] = 3000
        if photometric == "MONOCHROME1":
            image = 4095 - image
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = image.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


class ImageAsFeatures(nn.Module):
    """A stand-in timm model: its one 'feature map' is the input image itself (stride 1)."""

    num_features = 1

    def forward(self, x):
        return self.forward_head(x)

    def forward_intermediates(self, x, indices=None, **_):
        return x, [x]

    def forward_head(self, x):
        return x.mean((2, 3))


class BrightMask(nn.Module):
    def forward(self, maps, size):
        return (maps[0] > 0.5).float() * 20 - 10


class CentroidScrew(nn.Module):
    """One screw centred on the bright pixels' centroid, head 0.05 of the width to the left, tip to the right."""

    def forward(self, maps):
        x = maps[0]
        b, _, h, w = x.shape
        weight = (x > 0.5).float()
        ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        cx = (weight[0, 0] * xs).sum() / weight.sum()
        cy = (weight[0, 0] * ys).sum() / weight.sum()
        heat = torch.full((b, 1, h, w), -10.0)
        heat[0, 0, int(cy), int(cx)] = 10.0
        offset = torch.zeros(b, 2, h, w)
        offset[0, 0], offset[0, 1] = cx - int(cx), cy - int(cy)
        vectors = torch.zeros(b, 4, h, w)
        vectors[0, 0], vectors[0, 2] = -0.05, 0.05
        return {"heatmap": heat, "offset": offset, "vectors": vectors}


def stub_models(size=128):
    backbone = Backbone("resnet18", ImageAsFeatures(), 1)
    region = nn.Linear(1, len(BODY_REGIONS))
    with torch.no_grad():
        region.weight.zero_()
        region.bias.copy_(torch.arange(len(BODY_REGIONS), dtype=torch.float32))
    heads = {"region": FrozenHead("region", region, "pooled", size, "stub", classes=BODY_REGIONS),
             "metal": FrozenHead("metal", BrightMask(), "maps", size, "stub"),
             "screws": FrozenHead("screws", CentroidScrew(), "maps", size, "stub", threshold=0.5)}
    return LoadedModels({"stub/1": backbone}, heads, {task: {"head": "stub", "backbone": "stub/1"} for task in heads})


def test_each_head_reads_the_polarity_it_was_trained_on(tmp_path, monkeypatch):
    """On fluoroscopy (XA displays attenuation dark) a head trained on the models' view sees the image
    inverted: the block shown bright is dark to it, so a bright-pixel metal head marks the rest; a head
    saved before heads kept their polarity sees it as displayed and marks the block."""
    monkeypatch.setenv("DAX_DEID_SECRET", "test-secret-0123456789")
    source = write_dicom(tmp_path / "Doe^Jane MRN-0042.dcm", modality="XA")
    truth = np.zeros((1500, 2200), bool)
    truth[300:700, 1300:1900] = True
    masks = {}
    for polarity in ("attenuation", "display"):
        models = stub_models()
        if polarity == "display":
            del models.heads["metal"].polarity          # as unpickled from a head saved before the attribute
        assert head_polarity(models.heads["metal"]) == polarity
        record = predict_file(source, tmp_path / polarity, models)
        masks[polarity] = np.asarray(Image.open(tmp_path / polarity / record["mask"])) > 0
    assert (masks["display"] & truth).sum() / (masks["display"] | truth).sum() > 0.85
    assert masks["attenuation"][truth].mean() < 0.05 and masks["attenuation"][~truth].mean() > 0.5


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_predictions_map_back_to_the_original_pixel_grid(tmp_path, monkeypatch, photometric):
    """1500 x 2200 -> normalized 698 x 1024 -> letterboxed 87 x 128 at row 20 of a 128 square: the bright
    block's mask and a screw on its centre come back where they are in the DICOM's own pixels."""
    monkeypatch.setenv("DAX_DEID_SECRET", "test-secret-0123456789")
    source = write_dicom(tmp_path / "Doe^Jane MRN-0042.dcm", photometric=photometric)
    out = tmp_path / "out"
    result = predict_file(source, out, stub_models())
    name = sha256_file(source)[:16]
    assert result["name"] == name and result["size"] == [1500, 2200]
    assert sorted(p.name for p in out.iterdir()) == [f"{name}.json", f"{name}.png", f"{name}_mask.png"]

    record = json.loads((out / f"{name}.json").read_text())
    assert [r["label"] for r in record["regions"]] == list(BODY_REGIONS[::-1][:3])
    probabilities = [r["probability"] for r in record["regions"]]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0

    mask = np.asarray(Image.open(out / record["mask"])) > 0
    assert mask.shape == (1500, 2200)
    truth = np.zeros_like(mask)
    truth[300:700, 1300:1900] = True
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.85, iou
    rows, cols = np.nonzero(mask)
    assert abs(rows.mean() - 500) < 10 and abs(cols.mean() - 1600) < 10

    (screw,) = record["screws"]
    px = 2200 / 128                                                 # original pixels per input pixel
    np.testing.assert_allclose(screw["head"], [1600 - 0.05 * 128 * px, 500], atol=0.5 * px)
    np.testing.assert_allclose(screw["tip"], [1600 + 0.05 * 128 * px, 500], atol=0.5 * px)
    assert screw["score"] > 0.99

    written = b"".join(p.read_bytes() for p in out.iterdir())
    assert not any(value.encode() in written for value in PHI + ("Doe", "MRN"))


class InvertedImage(ImageAsFeatures):
    """Another stand-in backbone: its feature map is the inverted image."""

    def forward_intermediates(self, x, indices=None, **_):
        return 1 - x, [1 - x]


def test_each_head_runs_on_its_own_backbone(tmp_path, monkeypatch):
    """Region from one backbone, metal and screws from another: the metal mask is the one its own backbone's
    features give (here the inverted block), and the JSON records which backbone served each task."""
    monkeypatch.setenv("DAX_DEID_SECRET", "test-secret-0123456789")
    models = stub_models()
    models.backbones["other/2"] = Backbone("resnet18", InvertedImage(), 1)
    for task in ("metal", "screws"):
        models.refs[task] = {"head": "stub", "backbone": "other/2"}
    source = write_dicom(tmp_path / "Doe^Jane MRN-0042.dcm")
    result = predict_file(source, tmp_path / "out", models)
    record = json.loads((tmp_path / "out" / f"{result['name']}.json").read_text())
    assert record["models"] == {"region": {"head": "stub", "backbone": "stub/1"},
                                "metal": {"head": "stub", "backbone": "other/2"},
                                "screws": {"head": "stub", "backbone": "other/2"}}
    mask = np.asarray(Image.open(tmp_path / "out" / record["mask"])) > 0
    assert not mask[330:670, 1330:1870].any() and mask[1000:1400, 100:1000].all()   # everything but the block


def test_best_heads_picks_each_task_from_the_architecture_that_scores_best(tmp_path):
    """Registry entries as the heads flow and promotion leave them: per task the @champion head whose backbone
    scored best (its ``dax.eval``), else the head's own test figure; other aliases are not considered."""
    from mlflow.tracking import MlflowClient

    from tasks.release.registry import backbone_model, best_heads, head_aliases, head_model

    evals = {"vit_tiny_patch16": {"region.accuracy": 0.8, "metal.dice": 0.3},
             "resnet18": {"region.accuracy": 0.6, "metal.dice": 0.7}}
    with heads_tracking(tmp_path):          # a store of its own, whatever an earlier test left configured
        client = MlflowClient()
        for arch, scores in evals.items():
            client.create_registered_model(backbone_model(arch))
            client.create_model_version(backbone_model(arch), str(tmp_path), tags={"dax.eval": json.dumps(scores)})
            for task, alias, f1 in (("region", "champion", None), ("metal", "champion", None),
                                    ("screws", "champion" if arch == "resnet18" else "challenger", 0.2)):
                client.create_registered_model(head_model(task, arch))
                tags = {"dax.backbone": f"{backbone_model(arch)}/1", **({"metric.f1": str(f1)} if f1 else {})}
                client.create_model_version(head_model(task, arch), str(tmp_path), tags=tags)
                client.set_registered_model_alias(head_model(task, arch), alias, "1")
        chosen = best_heads(("region", "metal", "screws"), "champion")
        assert best_heads(("region",), "candidate") == {}
        assert head_aliases(("region",)) == ["champion"] and head_aliases(("screws",)) == ["challenger", "champion"]
        with pytest.raises(PredictError, match=r"no registered region head with alias @candidate \(the registered "
                                               r"heads carry @champion: pass --alias champion\)"):
            load_models(alias="candidate", tasks=("region",), home=tmp_path)
    assert {task: c["backbone"] for task, c in chosen.items()} == {
        "region": "dax-backbone-vit_tiny_patch16/1", "metal": "dax-backbone-resnet18/1",
        "screws": "dax-backbone-resnet18/1"}
    assert chosen["metal"]["uri"] == "models:/dax-head-metal-resnet18/1" and chosen["screws"]["score"] == 0.2


def test_a_bad_file_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("DAX_DEID_SECRET", "test-secret-0123456789")
    text = tmp_path / "Doe^Jane notes.dcm"
    text.write_text("not an image")
    with pytest.raises(PredictError, match="not a DICOM file"):
        prepare_dicom(text)
    header_only = write_dicom(tmp_path / "Doe^Jane header.dcm", pixels=False)
    with pytest.raises(PredictError, match="no pixel data") as refused:
        prepare_dicom(header_only)
    assert "\n" not in str(refused.value) and "Doe" not in str(refused.value)
    ct = tmp_path / "Doe^Jane ct.dcm"                      # what ingestion skips, prediction refuses
    shutil.copy(get_testdata_file("CT_small.dcm"), ct)
    with pytest.raises(PredictError, match=r"\(CT Image Storage\) is not a projection X-ray image"):
        prepare_dicom(ct)


def test_predict_refuses_bad_files_and_still_writes_the_good_ones(heads_flow, heads_env, tmp_path):
    """The registered backbone and heads on real radiographs never ingested (pydicom-data's CR chest,
    deid-data's DX cat), next to a text file and a header without pixels, all with PHI in their names."""
    from tasks.synth.montage import real_radiographs

    inputs = tmp_path / "in"
    inputs.mkdir()
    files = [inputs / "Doe^Jane MRN-0042 notes.dcm", inputs / "Doe^Jane MRN-0042 header.dcm",
             inputs / "Doe^Jane MRN-0042 chest.dcm"]
    files[0].write_text("Doe^Jane, MRN-0042: not an image")
    write_dicom(files[1], pixels=False)
    shutil.copy(get_testdata_file("RG1_UNCR.dcm"), files[2])
    cat = [path for title, path in real_radiographs() if "cat" in title]
    if cat:
        files.append(inputs / "Doe^Jane MRN-0042 cat.dcm")
        shutil.copy(cat[0], files[-1])
    out = tmp_path / "out"
    seen = []
    results = predict(files, out, home=heads_env.home, on_result=lambda i, entry: seen.append(i))
    assert seen == list(range(1, len(files) + 1))
    assert [r["status"] for r in results] == ["error", "error"] + ["ok"] * (len(files) - 2)
    assert "not a DICOM file" in results[0]["error"] and "no pixel data" in results[1]["error"]
    for entry in results[:2]:
        assert "\n" not in entry["error"] and "Doe" not in entry["error"] and str(inputs) not in entry["error"]
        assert entry["name"] == sha256_file(files[entry["input"] - 1])[:16]
    names = sorted(p.name for p in out.iterdir())
    assert all(HEX16.match(n) for n in names), names
    assert len(names) == 3 * (len(files) - 2)
    for entry, path in zip(results[2:], files[2:]):
        assert entry["name"] == sha256_file(path)[:16]
        record = json.loads((out / f"{entry['name']}.json").read_text())
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert record["size"] == [ds.Rows, ds.Columns]
        assert len(record["regions"]) == 3 and {r["label"] for r in record["regions"]} <= set(BODY_REGIONS)
        assert [r["probability"] for r in record["regions"]] == sorted((r["probability"] for r in record["regions"]),
                                                                       reverse=True)
        for screw in record["screws"]:
            assert set(screw) == {"head", "tip", "score"} and len(screw["head"]) == 2
        assert np.asarray(Image.open(out / record["mask"])).shape == (ds.Rows, ds.Columns)
        for task in ("region", "metal", "screws"):        # no backbone given: each task's best @candidate head
            assert record["models"][task] == {
                "head": f"dax-head-{task}-vit_tiny_patch16/{heads_flow['registered'][task]['version']}",
                "backbone": f"dax-backbone-vit_tiny_patch16/{heads_env.backbone_version}", "polarity": "attenuation"}
        assert Image.open(out / f"{entry['name']}.png").size[0] > 100
    written = b"".join(p.read_bytes() for p in out.glob("*.json"))
    assert b"Doe" not in written and b"MRN" not in written


# --- no de-identification secret: prediction goes on with a key of its own; ingestion still refuses ---------

def without_a_secret(monkeypatch, tmp_path):
    """No DAX_DEID_SECRET and no Prefect Secret block (the session's Prefect home has none): as after
    `make demo`, whose key was a throw-away one. ``tests/test_ingest.py::test_user_errors_are_one_clear_line``
    keeps ingestion failing in this very situation."""
    monkeypatch.delenv("DAX_DEID_SECRET", raising=False)
    monkeypatch.setattr("tasks.release.predict.load_models", lambda *args, **kwargs: stub_models())
    inputs = tmp_path / "Doe^Jane MRN-0042"
    inputs.mkdir()
    return [write_dicom(inputs / "Doe^Jane MRN-0042 1.dcm"),
            write_dicom(inputs / "Doe^Jane MRN-0042 2.dcm", block=(100, 400, 200, 800))]


def assert_outputs_hold_no_identifier(out, files):
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{sha256_file(f)[:16]}{suffix}" for f in files for suffix in (".json", ".png", "_mask.png"))
    written = b"".join(p.read_bytes() for p in out.iterdir())
    assert not any(value.encode() in written for value in PHI + ("Doe", "MRN", str(files[0].parent)))


def test_predict_without_a_secret_uses_a_key_of_its_own(tmp_path, monkeypatch, caplog):
    from tasks.ingest.deidentify import DeidError, load_key
    from tasks.release.predict import EPHEMERAL_KEY_NOTE, prediction_key

    files = without_a_secret(monkeypatch, tmp_path)
    with pytest.raises(DeidError, match="no de-identification secret"):
        load_key()                          # what ingestion calls: no fallback there
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="dax.predict"):
        results = predict(files, out, home=tmp_path / "home")
    assert [r["status"] for r in results] == ["ok", "ok"]
    assert_outputs_hold_no_identifier(out, files)
    notes = [r.getMessage() for r in caplog.records if r.name == "dax.predict"]
    assert notes == [EPHEMERAL_KEY_NOTE]       # said once, with no value
    first, second = prediction_key(), prediction_key()
    assert first[1] and second[1] and first[0] != second[0]      # random per call: nothing stable to link by

    monkeypatch.setenv("DAX_DEID_SECRET", "test-secret-0123456789")
    assert prediction_key() == (load_key(), False)                # a configured secret is still the one used
    monkeypatch.setenv("DAX_DEID_SECRET", "too-short")
    with pytest.raises(DeidError, match="at least 16 bytes"):     # ...and an unusable one is never replaced
        prediction_key()


def test_dax_predict_without_a_secret(tmp_path, monkeypatch):
    """The CLI as the README runs it after `make demo`: one dim line says so, the files are predicted."""
    from rich.console import Console
    from typer.testing import CliRunner

    from flows.cli import app
    from tasks.release.predict import EPHEMERAL_KEY_NOTE

    files = without_a_secret(monkeypatch, tmp_path)
    monkeypatch.setattr("tasks.release.registry.require_registry", lambda home: None)   # stub models: no store
    out = tmp_path / "predictions"
    monkeypatch.setattr("flows.cli.console", Console(width=60))   # a narrow terminal: still one line per file
    done = CliRunner().invoke(app, ["predict", *map(str, files), "--out", str(out), "--home", str(tmp_path / "home")])
    assert done.exit_code == 0, done.output
    assert done.output.count(EPHEMERAL_KEY_NOTE) == 1 and "error" not in done.output
    assert [line.split(":")[0] for line in done.output.splitlines()[1:]] == ["file 1", "file 2"]
    assert_outputs_hold_no_identifier(out, files)
    assert "Doe" not in done.output and "MRN" not in done.output
