"""De-identification (tasks/deidentify.py + deployments/deid/dax-basic-profile.recipe).

Synthetic datasets carry planted PHI in every place a C-arm file can hide it; real radiographs of
pydicom-data and deid-data check that real files come out clean, readable and with the same pixels.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.datadict import keyword_dict
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, XRayAngiographicImageStorage

from tasks.ingest.deidentify import (
    ACTION_KINDS,
    DEFAULT_RECIPE,
    SECRET_ENV_VAR,
    DeidError,
    DeidKey,
    deidentify,
    load_key,
    shift_date,
)

SECRET = b"unit-test-secret-0123456789abcdef"
KEY = DeidKey(SECRET)
SERIES_UID = "1.2.826.0.1.3680043.10.511.3.7011"
STUDY_UID = "1.2.826.0.1.3680043.10.511.2.7011"
PATIENT_ID = "PHI-MRN-883311"


def _item(**attributes) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def planted_dataset(sop_uid: str = "1.2.826.0.1.3680043.10.511.4.1", study_uid: str = STUDY_UID,
                    study_date: str = "20210603", series_uid: str = SERIES_UID) -> tuple[Dataset, dict]:
    """An XA image with PHI in every place listed in the brief. Returns the dataset and the planted
    values that must not survive (text and original UIDs)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = XRayAngiographicImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.SourceApplicationEntityTitle = "PHI-AET-OR3"
    ds.file_meta.ImplementationVersionName = "PHIIMPLV1"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = XRayAngiographicImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", "SINGLE PLANE"]
    ds.Modality = "XA"
    # patient module
    ds.PatientName = "PHI-NAME^ZEBEDIAH"
    ds.PatientID = PATIENT_ID
    ds.IssuerOfPatientID = "PHI-ISSUER-HOSP"
    ds.OtherPatientIDs = "PHI-OTHERID-1"
    ds.OtherPatientIDsSequence = Sequence([
        _item(PatientID="PHI-OTHERID-7", IssuerOfPatientID="PHI-OTHERISS")])
    ds.PatientBirthDate = "19520314"
    ds.PatientBirthName = "PHI-BIRTHNAME^Q"
    ds.PatientMotherBirthName = "PHI-MOTHER^R"
    ds.PatientAddress = "PHI 12 ELM STREET SPRINGFIELD"
    ds.PatientTelephoneNumbers = "PHI-555-0199"
    ds.PatientComments = "PHI-PATIENT-COMMENT diabetic"
    ds.AdditionalPatientHistory = "PHI-HISTORY fall from ladder"
    ds.MedicalAlerts = "PHI-ALERT latex"
    ds.EthnicGroup = "PHIETHNIC"
    ds.Occupation = "PHI-OCCUPATION"
    ds.PatientSex = "F"
    ds.PatientAge = "063Y"
    ds.PatientSize = "1.68"
    ds.PatientWeight = "71.5"
    ds.ReferencedPatientSequence = Sequence([_item(
        ReferencedSOPClassUID="1.2.840.10008.3.1.2.1.1",
        ReferencedSOPInstanceUID="1.2.826.0.1.3680043.10.511.9.1")])
    # study, request and procedure
    ds.StudyInstanceUID = study_uid
    ds.StudyDate, ds.StudyTime = study_date, "101500"
    ds.AccessionNumber = "PHI-ACC-55521"
    ds.StudyID = "PHI-SID-12"
    ds.ReferringPhysicianName = "PHI-REFDOC^ALBERT"
    ds.StudyDescription = "PHI-STUDY-DESC knee Smith"
    ds.PhysiciansOfRecord = "PHI-RECORDDOC^C"
    ds.NameOfPhysiciansReadingStudy = "PHI-READER^D"
    ds.RequestingPhysician = "PHI-REQDOC^E"
    ds.ProcedureCodeSequence = Sequence([_item(
        CodeValue="PHIPROC1", CodingSchemeDesignator="99PHI", CodeMeaning="PHI-PROC-MEANING")])
    ds.RequestAttributesSequence = Sequence([_item(
        RequestedProcedureID="PHI-RPID-1", ScheduledProcedureStepID="PHI-SPSID",
        RequestedProcedureDescription="PHI-REQ-DESC",
        ScheduledProcedureStepDescription="PHI-SPS-DESC")])
    ds.ReferencedStudySequence = Sequence([_item(
        ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1",
        ReferencedSOPInstanceUID="1.2.826.0.1.3680043.10.511.9.2")])
    # series and performed procedure step
    ds.SeriesInstanceUID = series_uid
    ds.SeriesDate, ds.SeriesTime = study_date, "101600"
    ds.SeriesNumber = 1
    ds.SeriesDescription = "PHI-SERIES-DESC"
    ds.ProtocolName = "PHI-PROTOCOL-KNEE"
    ds.OperatorsName = "PHI-OPERATOR^JANE"
    ds.PerformingPhysicianName = "PHI-SURGEON^BOB"
    ds.PerformedProcedureStepID = "PHI-PPSID"
    ds.PerformedProcedureStepDescription = "PHI-PPS-DESC"
    ds.PerformedProcedureStepStartDate = "20210602"
    ds.PerformedProcedureStepStartTime = "093000"
    ds.PerformedStationName = "PHI-PSTATION"
    ds.PerformedLocation = "PHI-OR-SEVEN"
    ds.ReferencedPerformedProcedureStepSequence = Sequence([_item(
        ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.3",
        ReferencedSOPInstanceUID="1.2.826.0.1.3680043.10.511.9.3")])
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.10.511.5.1"
    ds.PositionReferenceIndicator = "PHI-POSREF"
    # equipment
    ds.Manufacturer = "ACME"
    ds.ManufacturerModelName = "CARM 9000"
    ds.InstitutionName = "PHI-ST-ELSEWHERE HOSPITAL"
    ds.InstitutionAddress = "PHI-1 HOSPITAL ROAD"
    ds.InstitutionalDepartmentName = "PHI-ORTHO-DEPT"
    ds.StationName = "PHI-CARM-OR3"
    ds.DeviceSerialNumber = "PHI-SN-0042"
    ds.DetectorID = "PHI-DET-99"
    # image, descriptions and nested references
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = study_date, "101733"
    ds.AcquisitionDateTime = study_date + "101733.123456"
    ds.ImageComments = "PHI-IMG-COMMENT screw left"
    ds.AcquisitionComments = "PHI-ACQ-COMMENT"
    ds.DerivationDescription = "PHI-DERIV-DESC"
    ds.WindowCenterWidthExplanation = "PHI-WINDOW-EXPL"
    ds.IrradiationEventUID = "1.2.826.0.1.3680043.10.511.6.1"
    ds.ReferencedImageSequence = Sequence([_item(
        ReferencedSOPClassUID=XRayAngiographicImageStorage,
        ReferencedSOPInstanceUID="1.2.826.0.1.3680043.10.511.4.900")])
    ds.AnatomicRegionSequence = Sequence([_item(
        CodeValue="T-15750", CodingSchemeDesignator="SRT", CodeMeaning="Knee joint")])
    ds.ContrastBolusAgentSequence = Sequence([_item(
        CodeValue="PHICB1", CodingSchemeDesignator="99PHI", CodeMeaning="PHI-CONTRAST-CODE")])
    ds.KVP = "70.0"
    ds.DistanceSourceToDetector = "1000.0"
    ds.PositionerPrimaryAngle = "12.50"
    ds.ImagerPixelSpacing = ["0.1500", "0.1500"]
    # private block, private sequence, and a private element nested in a public sequence
    block = ds.private_block(0x0029, "PHI VENDOR CREATOR", create=True)
    block.add_new(0x01, "LO", "PHI-PRIVATE-TEXT")
    block.add_new(0x02, "SQ", Sequence([_item(PatientName="PHI-PRIVSEQ^NAME")]))
    ds.ReferencedImageSequence[0].private_block(0x0031, "PHI NESTED", create=True).add_new(
        0x01, "LO", "PHI-NESTED-PRIVATE")
    # overlay plane, curve and icon
    ds.add_new(0x60000010, "US", 4)
    ds.add_new(0x60000011, "US", 8)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60000022, "LO", "PHI-OVERLAY-DESC")
    ds.add_new(0x60001500, "LO", "PHI-OVERLAY-LABEL")
    ds.add_new(0x60003000, "OW", b"PHI-OVERLAY-BYTES")
    ds.add_new(0x50002500, "LO", "PHI-CURVE-LABEL")
    ds.add_new(0x50003000, "OW", b"PHI-CURVE-BYTES!")
    ds.IconImageSequence = Sequence([_item(
        Rows=2, Columns=8, SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2",
        BitsAllocated=8, BitsStored=8, HighBit=7, PixelRepresentation=0, PixelData=b"PHI-ICON-PIXELS!")])
    # pixel module
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = 8, 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.arange(64, dtype="<u2").tobytes()

    phi = {value for value in _strings(ds) if value.startswith("PHI")}
    phi |= {"ZEBEDIAH", "19520314", "ELSEWHERE", "Smith", "diabetic", "ladder"}
    uids = {e.value for e in ds.iterall() if e.VR == "UI" and not str(e.value).startswith("1.2.840.10008")}
    return ds, {"text": phi, "uids": uids | {sop_uid}}


def _strings(ds: Dataset) -> list[str]:
    out = []
    for elem in ds.iterall():
        if elem.VR in ("LO", "SH", "PN", "LT", "ST", "UT", "AE", "CS"):
            multiple = isinstance(elem.value, (list, pydicom.multival.MultiValue))
            values = elem.value if multiple else [elem.value]
            out += [str(v) for v in values if v]
    return out


def written(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def assert_absent(data: bytes, values) -> None:
    lowered = data.lower()
    for value in values:
        needle = value.encode("latin-1")
        assert needle not in data, f"{value!r} survived"
        assert needle.lower() not in lowered, f"{value!r} survived (case-insensitive)"


def real_file(package: str, relative: str) -> Path:
    return Path(importlib.util.find_spec(package).origin).parent / relative


# --- planted PHI ---------------------------------------------------------------------------------------

def test_planted_phi_is_absent_from_the_written_file():
    ds, planted = planted_dataset()
    result = deidentify(ds, KEY)
    data = written(result.dataset)
    assert_absent(data, planted["text"] | planted["uids"] | {"20210603", "20210602", "PHI"})
    out = pydicom.dcmread(io.BytesIO(data))
    for keyword in ("OtherPatientIDsSequence", "ReferencedPatientSequence", "ProcedureCodeSequence",
                    "RequestAttributesSequence", "ReferencedStudySequence", "IconImageSequence",
                    "ReferencedPerformedProcedureStepSequence", "DeviceSerialNumber", "StationName",
                    "InstitutionName", "OperatorsName", "PerformedProcedureStepID", "StudyDescription"):
        assert keyword not in out, keyword
    assert not any(elem.tag.is_private for elem in out.iterall())
    assert not any((elem.tag.group & 0xFF00) in (0x5000, 0x6000) for elem in out.iterall())
    assert "SourceApplicationEntityTitle" not in out.file_meta
    # type 2 attributes stay present, empty (Z)
    for keyword in ("AccessionNumber", "StudyID", "ReferringPhysicianName", "PatientBirthDate"):
        assert keyword in out and out[keyword].value in ("", None), keyword
    assert result.actions["removed"] > 40 and result.actions["uids_replaced"] >= 7
    assert result.actions["private_removed"] == result.actions["graphics_removed"] == 0  # recipe did it
    assert set(result.actions) == set(ACTION_KINDS)


def test_safety_net_cleans_what_a_weak_recipe_misses(tmp_path):
    weak = tmp_path / "weak.recipe"
    weak.write_text("FORMAT dicom\n\n%header\n\nADD PatientIdentityRemoved YES\n")
    ds, planted = planted_dataset()
    result = deidentify(ds, KEY, recipe=weak)
    assert_absent(written(result.dataset), planted["text"] | planted["uids"])
    assert result.actions["graphics_removed"] >= 3  # the recipe had no rule for overlays, curves, icons
    assert result.actions["safety_net_blanked"] > 20
    assert result.dataset.Manufacturer == "ACME"


def test_a_missing_recipe_is_an_error_not_a_silent_no_op(tmp_path):
    ds, _ = planted_dataset()
    with pytest.raises(DeidError):
        deidentify(ds, KEY, recipe=tmp_path / "absent.recipe")


# --- UIDs ----------------------------------------------------------------------------------------------

def test_uids_are_keyed_consistent_and_class_uids_kept():
    first, _ = planted_dataset(sop_uid="1.2.826.0.1.3680043.10.511.4.900")
    second, _ = planted_dataset()  # references the first image in ReferencedImageSequence
    a, b = deidentify(first, KEY).dataset, deidentify(second, KEY).dataset
    assert a.StudyInstanceUID == b.StudyInstanceUID != STUDY_UID
    assert b.ReferencedImageSequence[0].ReferencedSOPInstanceUID == a.SOPInstanceUID
    assert a.SOPInstanceUID == KEY.uid("1.2.826.0.1.3680043.10.511.4.900")
    assert re.fullmatch(r"2\.25\.\d{1,39}", a.SOPInstanceUID) and len(a.SOPInstanceUID) <= 64
    assert a.file_meta.MediaStorageSOPInstanceUID == a.SOPInstanceUID
    assert a.SOPClassUID == a.file_meta.MediaStorageSOPClassUID == XRayAngiographicImageStorage
    assert a.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert b.ReferencedImageSequence[0].ReferencedSOPClassUID == XRayAngiographicImageStorage
    vendor_class = "1.3.12.2.1107.5.9.1"  # a private SOP class, outside the registry, nested
    first.SourceImageSequence = Sequence([_item(ReferencedSOPClassUID=vendor_class,
                                                ReferencedSOPInstanceUID=STUDY_UID + ".77")])
    source_ref = deidentify(first, KEY).dataset.SourceImageSequence[0]
    assert source_ref.ReferencedSOPClassUID == vendor_class
    assert source_ref.ReferencedSOPInstanceUID == KEY.uid(STUDY_UID + ".77")
    other = deidentify(first, DeidKey(b"another-secret-0123456789abcdef!")).dataset
    assert other.SOPInstanceUID != a.SOPInstanceUID and other.StudyInstanceUID != a.StudyInstanceUID


def test_series_grouping_survives():
    one, _ = planted_dataset(sop_uid="1.2.826.0.1.3680043.10.511.4.11")
    two, _ = planted_dataset(sop_uid="1.2.826.0.1.3680043.10.511.4.12")
    r1, r2 = deidentify(one, KEY), deidentify(two, KEY)
    assert r1.dataset.SeriesInstanceUID == r2.dataset.SeriesInstanceUID != SERIES_UID
    assert r1.dataset.SOPInstanceUID != r2.dataset.SOPInstanceUID
    assert (r1.patient_key, r1.study_key, r1.series_key) == (r2.patient_key, r2.study_key, r2.series_key)
    pseudonym = KEY.pseudonym("patient", PATIENT_ID)
    assert r1.patient_key == r1.dataset.PatientID == str(r1.dataset.PatientName) == pseudonym
    assert PATIENT_ID not in r1.patient_key + r1.study_key + r1.series_key


# --- dates ---------------------------------------------------------------------------------------------

def _date(value: str) -> dt.date:
    return dt.datetime.strptime(value[:8], "%Y%m%d").date()


def test_dates_shift_per_patient_and_keep_intervals():
    first, _ = planted_dataset(study_uid="1.2.826.0.1.3680043.10.511.2.1", study_date="20210603")
    later, _ = planted_dataset(study_uid="1.2.826.0.1.3680043.10.511.2.2", study_date="20210620")
    r1, r2 = deidentify(first, KEY), deidentify(later, KEY)
    a, b = r1.dataset, r2.dataset
    assert (_date(b.StudyDate) - _date(a.StudyDate)).days == 17
    assert r1.date_shift_days == r2.date_shift_days == KEY.date_shift_days(PATIENT_ID)
    assert -3650 <= r1.date_shift_days <= -365
    assert a.StudyDate != "20210603"
    assert (_date(a.StudyDate) - _date("20210603")).days == r1.date_shift_days
    for keyword in ("SeriesDate", "ContentDate"):
        assert a[keyword].value == a.StudyDate
    assert a.AcquisitionDateTime == a.StudyDate + "101733.123456"  # time of day kept
    assert (a.StudyTime, a.ContentTime) == ("101500", "101733")
    assert "PerformedProcedureStepStartDate" not in a
    assert a.LongitudinalTemporalInformationModified == "MODIFIED"


def test_shift_date_formats():
    assert shift_date("20240301", "DA", -1) == "20240229"
    assert shift_date("20240301120000.5+0100", "DT", -366) == "20230301120000.5+0100"
    for bad in ("2024", "2024.03.01", "20240231", "yesterday", ""):
        assert shift_date(bad, "DA", -400) == ""


# --- retained and recorded attributes ------------------------------------------------------------------

def test_patient_characteristics_and_geometry_are_retained():
    out = deidentify(planted_dataset()[0], KEY).dataset
    characteristics = (out.PatientSex, out.PatientAge, float(out.PatientSize), float(out.PatientWeight))
    assert characteristics == ("F", "063Y", 1.68, 71.5)
    assert (out.Manufacturer, out.ManufacturerModelName, out.Modality) == ("ACME", "CARM 9000", "XA")
    assert float(out.KVP) == 70.0 and float(out.PositionerPrimaryAngle) == 12.5
    assert [float(v) for v in out.ImagerPixelSpacing] == [0.15, 0.15]
    region = out.AnatomicRegionSequence[0]
    assert (region.CodeValue, region.CodeMeaning) == ("T-15750", "Knee joint")
    assert out.ContrastBolusAgentSequence[0].CodeMeaning == ""  # free code outside the coded allow-list


def test_deidentification_is_recorded():
    out = pydicom.dcmread(io.BytesIO(written(deidentify(planted_dataset()[0], KEY).dataset)))
    assert out.PatientIdentityRemoved == "YES"
    assert "2024b" in out.DeidentificationMethod
    codes = [(i.CodeValue, i.CodingSchemeDesignator) for i in out.DeidentificationMethodCodeSequence]
    assert codes == [("113100", "DCM"), ("113106", "DCM"), ("113108", "DCM")]
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"


# --- the secret ----------------------------------------------------------------------------------------

def test_the_secret_is_never_shown():
    text = SECRET.decode()
    assert text not in repr(KEY) and text not in str(KEY) and text not in f"{KEY}"
    assert KEY.fingerprint in repr(KEY) and re.fullmatch(r"[0-9a-f]{16}", KEY.fingerprint)
    assert KEY.fingerprint not in SECRET.hex()
    result = deidentify(planted_dataset()[0], KEY)
    data = written(result.dataset)
    assert SECRET not in data and SECRET.hex().encode() not in data
    assert text not in repr(result) and text not in str(result.dataset)


def test_load_key_sources(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv(SECRET_ENV_VAR, raising=False)
    assert load_key("argument-secret-0123456789") == DeidKey(b"argument-secret-0123456789")
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # no API reachable
        with pytest.raises(DeidError, match=SECRET_ENV_VAR):
            load_key()
        monkeypatch.setenv(SECRET_ENV_VAR, "environment-secret-0123456789")
        assert load_key() == DeidKey(b"environment-secret-0123456789")
    with pytest.raises(DeidError):
        DeidKey(b"short")


def test_the_environment_wins_and_the_prefect_secret_block_serves_without_it(monkeypatch):
    from prefect.blocks.system import Secret

    class Stored:
        @staticmethod
        def get():
            return "block-secret-0123456789abcdef"

    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setattr(Secret, "load", classmethod(lambda cls, name: Stored if name == "dax-deid-secret" else 0))
    monkeypatch.setenv(SECRET_ENV_VAR, "environment-secret-0123456789")
    assert load_key() == DeidKey(b"environment-secret-0123456789")
    monkeypatch.delenv(SECRET_ENV_VAR)
    # an API URL, so the lookup is not skipped for want of a local database (the stand-in answers, not the API)
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert load_key() == DeidKey(b"block-secret-0123456789abcdef")


# --- the recipe ----------------------------------------------------------------------------------------

def test_recipe_names_real_attributes_and_has_no_inline_comments():
    text = DEFAULT_RECIPE.read_text()
    assert "PS3.15 2024b" in text and "Table E.1-1" in text
    action = re.compile(r"(KEEP|REMOVE|REPLACE|ADD|BLANK|JITTER) ")
    actions = [line for line in text.splitlines() if action.match(line)]
    assert len(actions) > 150
    for line in actions:
        assert "#" not in line, f"deid reads an inline comment as part of the value: {line}"
        field = line.split()[1]
        assert ":" in field or field in keyword_dict, f"unknown keyword: {line}"


# --- real radiographs ----------------------------------------------------------------------------------

REAL_FILES = [
    ("data_store", "data/RG1_UNCR.dcm"),
    ("data_store", "data/RG3_J2KR.dcm"),
    ("data_store", "data/MR-SIEMENS-DICOM-WithOverlays.dcm"),
    ("deid_data", "data/animals/cat.dcm"),
]
IDENTIFYING = ("PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "InstitutionName",
               "InstitutionAddress", "StationName", "DeviceSerialNumber", "AccessionNumber",
               "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "StudyID",
               "StudyDescription", "SeriesDescription", "InstitutionalDepartmentName", "StudyDate",
               "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")


@pytest.mark.parametrize("package, relative", REAL_FILES)
def test_real_files_come_out_clean_and_readable(package, relative):
    source = pydicom.dcmread(real_file(package, relative))
    identifying = {str(source[k].value) for k in IDENTIFYING if k in source}
    identifying = {value for value in identifying if len(value) >= 4}
    result = deidentify(source, KEY)
    data = written(result.dataset)
    assert_absent(data, identifying)
    out = pydicom.dcmread(io.BytesIO(data))
    assert not any(elem.tag.is_private or (elem.tag.group & 0xFF00) == 0x6000 for elem in out.iterall())
    assert out.SOPClassUID == source.SOPClassUID
    assert out.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
    assert out.PatientIdentityRemoved == "YES"


@pytest.mark.parametrize("relative", ["data/RG1_UNCR.dcm", "data/RG1_J2KR.dcm"])
def test_pixels_are_unchanged_and_the_source_file_is_untouched(tmp_path, relative):
    path = tmp_path / Path(relative).name
    shutil.copy(real_file("data_store", relative), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    source = pydicom.dcmread(path)
    before = source.pixel_array.copy()
    result = deidentify(source, KEY)
    out = pydicom.dcmread(io.BytesIO(written(result.dataset)))
    np.testing.assert_array_equal(out.pixel_array, before)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert source.PatientName == pydicom.dcmread(path).PatientName  # the input dataset is not modified


def test_deids_pydicom_deprecation_notice_is_dropped_and_no_other_pydicom_warning(caplog):
    """deid imports a pydicom module deprecated for v4, and pydicom logs a WARNING about it at every start of
    `dax`; tasks.ingest drops that message (nothing a user can act on) and lets pydicom's others through."""
    import logging

    pydicom_logger = logging.getLogger("pydicom")
    with caplog.at_level(logging.WARNING, logger="pydicom"):
        pydicom_logger.warning("The 'pydicom.pixel_data_handlers' module will be removed in v4.0, please use "
                               "'from pydicom.pixels.utils import get_expected_length' instead")
        pydicom_logger.warning("Invalid value for VR UI: '1.2.3.abc'")
    assert [record.getMessage() for record in caplog.records] == ["Invalid value for VR UI: '1.2.3.abc'"]
