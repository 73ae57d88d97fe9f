"""The synthetic study writer: files read back, pixels survive every transfer syntax, output is
deterministic, and the PHI answer key is complete and truthful."""
from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from pydicom.tag import Tag

from tasks.synth.devices import DEVICE_MODELS, devices_for, encode_pixels, window_for
from tasks.synth.dicom_writer import SOP_CLASSES, SeriesPlan, write_study
from tasks.synth.phi import make_patient, make_study
from tests.exposures import synthetic_exposure

SEED = 20240611
TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
# Attributes that carry identifying information whenever present (besides every PN/DA/DT/TM/UI).
PHI_KEYWORDS = {
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "PatientSize", "PatientWeight", "PatientAddress", "PatientTelephoneNumbers", "OtherPatientIDs",
    "OtherPatientNames", "EthnicGroup", "PatientComments", "InstitutionName", "InstitutionAddress",
    "InstitutionalDepartmentName", "StationName", "DeviceSerialNumber", "DetectorID", "AccessionNumber",
    "StudyID", "RequestedProcedureID", "ScheduledProcedureStepID", "PerformedProcedureStepID",
    "StudyDescription", "SeriesDescription", "RequestedProcedureDescription",
    "ScheduledProcedureStepDescription", "PerformedProcedureStepDescription", "CodeMeaning",
    "ImageComments", "SourceApplicationEntityTitle", "OverlayLabel", "OverlayDescription",
    "CurveLabel", "CurveDescription",
}
NON_PHI_UIDS = {"SOPClassUID", "MediaStorageSOPClassUID", "TransferSyntaxUID", "ReferencedSOPClassUID",
                "ImplementationClassUID"}


def _pose(primary: float) -> SimpleNamespace:
    return SimpleNamespace(isocenter=np.zeros(3), primary_deg=primary, secondary_deg=-3.0,
                           sid_mm=1000.0, sod_mm=650.0, detector_roll_deg=0.0)


def _plans(acquired: dt.datetime) -> list[SeriesPlan]:
    """One series per (device, transfer syntax): every syntax any device exports is exercised."""
    plans = []
    for device in DEVICE_MODELS:
        circular = device.detector.kind == "image_intensifier"
        rows, cols = (64, 64) if circular else (96, 80)
        for syntax in device.transfer_syntaxes:
            modality = device.modalities[len(plans) % len(device.modalities)]
            fluoroscopic = modality in ("XA", "RF")
            kind = ("sweep" if len(plans) % 2 else "cine") if fluoroscopic else "radiograph"
            n = 3 if fluoroscopic else 2
            plans.append(SeriesPlan(
                series_number=len(plans) + 1, modality=modality, kind=kind, device=device,
                exposures=[synthetic_exposure(rows, cols, k, circular, k) for k in range(n)],
                poses=[_pose(10.0 * k) for k in range(n)],
                multiframe=device.multiframe and fluoroscopic, region="lumbar spine",
                laterality="L" if len(plans) % 3 == 0 else "", acquired_at=acquired + dt.timedelta(minutes=len(plans)),
                transfer_syntax=syntax,
            ))
    return plans


def _write(root: Path):
    rng = np.random.default_rng(SEED)
    patient = make_patient(rng)
    study = make_study(patient, rng)
    plans = _plans(study.study_datetime + dt.timedelta(minutes=5))
    files, phi = write_study(root, patient, study, plans, rng)
    return patient, study, plans, files, phi


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    patient, study, plans, files, phi = _write(root)
    datasets = {f.path: pydicom.dcmread(root / f.path) for f in files}
    return SimpleNamespace(root=root, patient=patient, study=study, plans=plans, files=files, phi=phi,
                           datasets=datasets)


def _plan_of(written, record):
    return next(p for p in written.plans if p.series_number == record.series_number)


def _box_mask(shape, boxes):
    mask = np.zeros(shape, bool)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1 + 1, x0:x1 + 1] = True
    return mask


def test_every_syntax_of_every_device_is_written(written):
    wanted = {(d.model, s) for d in DEVICE_MODELS for s in d.transfer_syntaxes}
    assert {(f.model, f.transfer_syntax_uid) for f in written.files} == wanted
    for f in written.files:
        ds = written.datasets[f.path]
        assert ds.file_meta.TransferSyntaxUID == f.transfer_syntax_uid
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == f.sop_instance_uid
        assert ds.SOPClassUID == SOP_CLASSES[f.modality] == f.sop_class_uid
        assert (written.root / f.path).read_bytes()[128:132] == b"DICM"


def test_pixels_round_trip(written):
    """Decoded pixels equal the device encoding, except burned-in text (within lossy tolerance)."""
    for f in written.files:
        plan = _plan_of(written, f)
        device = plan.device
        tolerance = device.max_error(f.transfer_syntax_uid)
        decoded = written.datasets[f.path].pixel_array.reshape(f.frames, f.rows, f.cols).astype(int)
        in_text = _box_mask((f.rows, f.cols), f.burned_in_boxes)
        for frame, index in zip(decoded, f.exposure_indices):
            expected = encode_pixels(device, plan.exposures[index]).astype(int)
            assert frame.max() <= device.max_value
            close = np.abs(frame - expected) <= tolerance
            is_text = np.abs(frame - device.text_value) <= tolerance
            assert close[~in_text].all(), f.path
            assert (close | is_text)[in_text].all(), f.path
            for x0, y0, x1, y1 in f.burned_in_boxes:
                assert (frame[y0:y1 + 1, x0:x1 + 1] == device.text_value).any() or tolerance


def test_lossy_syntax_declared(written):
    lossy = [f for f in written.files if _plan_of(written, f).device.max_error(f.transfer_syntax_uid)]
    assert lossy, "one device exports a lossy syntax"
    for f in lossy:
        ds = written.datasets[f.path]
        assert ds.LossyImageCompression == "01" and ds.LossyImageCompressionMethod == "ISO_14495_1"


def test_frames_and_multiframe_attributes(written):
    for f in written.files:
        plan = _plan_of(written, f)
        ds = written.datasets[f.path]
        assert f.frames == len(f.exposure_indices) == int(ds.get("NumberOfFrames", 1))
        if plan.multiframe:
            assert f.frames == len(plan.exposures) and f.exposure_indices == list(range(f.frames))
            pointers = ds.FrameIncrementPointer
            pointers = list(pointers) if isinstance(pointers, pydicom.multival.MultiValue) else [pointers]
            assert Tag("FrameTime") in pointers
            if plan.kind == "sweep":
                assert len(ds.PositionerPrimaryAngleIncrement) == f.frames
        else:
            assert f.frames == 1
        if f.modality in ("XA", "RF"):
            assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert ds.BitsStored == f.bits_stored and ds.HighBit == f.bits_stored - 1
    assert any(f.frames > 1 for f in written.files)


def test_window_and_modality_lut_consistent(written):
    for f in written.files:
        device = _plan_of(written, f).device
        ds = written.datasets[f.path]
        assert ("RescaleSlope" in ds) == (device.rescale is not None)
        slope, intercept = device.rescale or (1.0, 0.0)
        lo, hi = intercept, device.max_value * slope + intercept
        assert min(lo, hi) <= float(ds.WindowCenter) <= max(lo, hi)
    device = devices_for("CR")[0]
    assert window_for(device, np.array([100, 200], np.uint16))[0] < 0   # CR rescale shifts output values


def test_deterministic(written, tmp_path):
    _, _, _, files, phi = _write(tmp_path)
    assert [f.path for f in files] == [f.path for f in written.files]
    for f in files:
        assert (tmp_path / f.path).read_bytes() == (written.root / f.path).read_bytes(), f.path
    assert phi == written.phi


def _walk(ds, prefix="", private=False):
    """(location, element) for every non-sequence element, recursing into sequences."""
    for elem in ds:
        where = f"{prefix}({elem.tag.group:04X},{elem.tag.element:04X})"
        inside_private = private or elem.tag.is_private
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value):
                yield from _walk(item, f"{where}[{i}]>", inside_private)
        else:
            yield where, elem, inside_private


def _must_be_listed(elem, private: bool) -> bool:
    if elem.VR not in TEXT_VRS or elem.value in (None, "") or elem.tag.is_private_creator:
        return False
    if private or elem.keyword in PHI_KEYWORDS or elem.VR in ("PN", "DA", "DT", "TM", "AE"):
        return True
    return elem.VR == "UI" and elem.keyword not in NON_PHI_UIDS


def _values(elem) -> list[str]:
    value = elem.value
    return [str(v) for v in value] if isinstance(value, pydicom.multival.MultiValue) else [str(value)]


def test_phi_list_is_complete(written):
    listed = {(r.path, r.location, r.value) for r in written.phi}
    checked = 0
    for path, ds in written.datasets.items():
        elements = list(_walk(ds.file_meta)) + list(_walk(ds))
        for where, elem, private in elements:
            if not _must_be_listed(elem, private):
                continue
            scheme = "private" if private else "curve" if 0x5000 <= elem.tag.group <= 0x50FF else "header"
            for value in _values(elem):
                checked += 1
                assert (path, f"{scheme}:{where}", value) in listed, (path, where, elem.keyword, value)
    assert checked > 60 * len(written.files)


def _element_at(ds, location: str):
    """Follow 'scheme:(gggg,eeee)[i]>(gggg,eeee)' from ``ds`` (or its file meta)."""
    steps = location.split(":", 1)[1].split(">")
    node = ds.file_meta if steps[0].startswith("(0002,") else ds
    for step in steps:
        group, element, index = re.fullmatch(r"\((\w{4}),(\w{4})\)(?:\[(\d+)\])?", step).groups()
        elem = node[Tag(int(group, 16), int(element, 16))]
        if index is None:
            return elem
        node = elem.value[int(index)]
    raise AssertionError(location)


def test_phi_records_are_true(written):
    files = {f.path: f for f in written.files}
    kinds = set()
    for r in written.phi:
        ds, f = written.datasets[r.path], files[r.path]
        device = _plan_of(written, f).device
        scheme = r.location.split(":")[0]
        kinds.add(scheme)
        if scheme in ("header", "private", "curve"):
            assert r.value in _values(_element_at(ds, r.location)), r
        elif scheme == "path":
            assert r.value in r.path
        elif scheme == "overlay":
            assert device.overlay and ds.overlay_array(0x6000).any()
        elif scheme == "icon":
            icon = np.frombuffer(ds.IconImageSequence[0].PixelData, np.uint8).reshape(
                ds.IconImageSequence[0].Rows, ds.IconImageSequence[0].Columns)
            assert (icon[_box_mask(icon.shape, f.burned_in_boxes)] == 255).any()
        elif scheme == "pixels":
            first = ds.pixel_array.reshape(f.frames, f.rows, f.cols)[0].astype(int)
            tolerance = device.max_error(f.transfer_syntax_uid)
            text = np.abs(first - device.text_value) <= tolerance
            assert f.burned_in_text and text[_box_mask(first.shape, f.burned_in_boxes)].any()
        else:
            raise AssertionError(r)
    assert kinds == {"header", "private", "curve", "overlay", "icon", "pixels", "path"}


def test_identity_values_planted(written):
    """The core identifiers are listed in every file; the patient's name hides in many places."""
    patient, study = written.patient, written.study
    for path in written.datasets:
        values = {(r.kind, r.value) for r in written.phi if r.path == path}
        assert ("patient_name", patient.name) in values
        assert ("patient_id", patient.patient_id) in values
        assert ("accession", study.accession_number) in values
        assert ("uid", study.study_instance_uid) in values
        names = [r for r in written.phi if r.path == path and r.kind == "patient_name"]
        assert len({r.location for r in names}) >= 2


def test_burned_in_habits(written):
    for f in written.files:
        device = _plan_of(written, f).device
        ds = written.datasets[f.path]
        assert f.burned_in_text == bool(device.burn_in)
        assert ds.get("BurnedInAnnotation", "") == device.declares_burned_in == f.burned_in_declared
        for x0, y0, x1, y1 in f.burned_in_boxes:
            assert 0 <= x0 <= x1 < f.cols and 0 <= y0 <= y1 < f.rows
    habits = {d.declares_burned_in for d in DEVICE_MODELS if d.burn_in}
    assert habits == {"YES", "NO", ""}


def test_device_table_covers_the_field():
    syntaxes = {s for d in DEVICE_MODELS for s in d.transfer_syntaxes}
    assert {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80",
            "1.2.840.10008.1.2.4.90"} <= syntaxes
    assert {d.photometric for d in DEVICE_MODELS} == {"MONOCHROME1", "MONOCHROME2"}
    assert {d.detector.kind for d in devices_for("XA")} == {"image_intensifier", "flat_panel"}
    for modality in ("XA", "RF", "DX", "CR"):
        assert devices_for(modality)
    assert all(12 <= d.bits_stored <= 16 for d in DEVICE_MODELS)
    assert len({d.private.creator for d in DEVICE_MODELS}) == len(DEVICE_MODELS)


def test_identities_varied_and_deterministic():
    a = [make_patient(np.random.default_rng(s)) for s in range(400)]
    b = [make_patient(np.random.default_rng(s)) for s in range(400)]
    assert a == b
    assert len({p.name for p in a}) > 350
    study = make_study(a[0], np.random.default_rng(1))
    assert study.study_instance_uid.startswith(study.uid_root + ".") and len(study.study_instance_uid) <= 64
    assert 2015 <= study.study_datetime.year <= 2025
    assert a[0].family.title() in study.requested_procedure_description
