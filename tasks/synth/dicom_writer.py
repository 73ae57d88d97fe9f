"""Write a synthetic study to disk the way a hospital export would, and list every PHI value planted.

`write_study` stores each `SeriesPlan` as XA / RF / DX / CR files in the habits of its
`DeviceModel` (transfer syntax, multi-frame, private block, overlays, curves, icon, burned-in text)
under a folder tree named after the patient and the study. Every identifying value it writes,
in the header, in private tags, in overlays, curves, icons, pixels and the path, is returned as a
`PhiRecord`: the answer key a de-identification check compares against.

Output is deterministic: same inputs and the same ``rng`` state give byte-identical files.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import pack_bits
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    JPEGLSNearLossless,
    XRayAngiographicImageStorage,
    XRayRadiofluoroscopicImageStorage,
)

from tasks.synth.devices import (
    BurnedText,
    DeviceModel,
    PrivateTag,
    burn_in,
    encode_pixels,
    text_mask,
    window_for,
)
from tasks.synth.phi import DAX_UID_ROOT, Patient, StudyContext, make_uid
from tasks.synth.scene import Exposure

SOP_CLASSES = {
    "XA": XRayAngiographicImageStorage,
    "RF": XRayRadiofluoroscopicImageStorage,
    "DX": DigitalXRayImageStorageForPresentation,
    "CR": ComputedRadiographyImageStorage,
}
# Body Part Examined (0018,0015) defined terms for each body-region label.
BODY_PARTS = {
    "skull": "SKULL",
    "cervical spine": "CSPINE",
    "thorax": "CHEST",
    "lumbar spine": "LSPINE",
    "pelvis and hip": "PELVIS",
    "femur": "FEMUR",
    "knee": "KNEE",
    "lower leg": "LEG",
    "ankle and foot": "FOOT",
    "shoulder and upper arm": "SHOULDER",
    "elbow-forearm-hand": "HAND",
}
IMPLEMENTATION_CLASS_UID = f"{DAX_UID_ROOT}.1.1"
IMPLEMENTATION_VERSION = "DAX_SYNTH_1"
# Frames per second of multi-frame runs (and of cines/sweeps stored one file per frame).
FRAME_RATES = {"fluoro": 7.5, "cine": 15.0, "sweep": 30.0}
# Reference SOP classes of the (retired) detached management services and MPPS.
_DETACHED_PATIENT = "1.2.840.10008.3.1.2.1.1"
_DETACHED_STUDY = "1.2.840.10008.3.1.2.3.1"
_MPPS = "1.2.840.10008.3.1.2.3.3"
_ICON_MAX = 128


@dataclass
class SeriesPlan:
    """One series to write: its frames, how they were acquired and which device stores them.

    ``transfer_syntax`` forces one of the device's syntaxes; '' lets the device pick one.
    """

    series_number: int
    modality: str               # 'XA' | 'RF' | 'DX' | 'CR'
    kind: str                   # 'radiograph' | 'fluoro' | 'cine' | 'sweep'
    device: DeviceModel
    exposures: list[Exposure]   # one per frame, acquisition order
    poses: list                 # one CArmPose per exposure
    multiframe: bool            # one multi-frame file, or one file per exposure
    region: str                 # body-region label (tasks.label_schema.BODY_REGIONS); never written as such
    laterality: str             # '', 'R', 'L'
    acquired_at: dt.datetime    # series start
    transfer_syntax: str = ""


@dataclass
class FileRecord:
    """What was written to one file, for the label table."""

    path: str                   # POSIX path relative to the output root
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    series_number: int
    instance_number: int
    modality: str
    manufacturer: str
    model: str
    transfer_syntax_uid: str
    photometric: str
    bits_stored: int
    rows: int
    cols: int
    frames: int
    exposure_indices: list[int]  # which exposures of the plan are in this file, in frame order
    pixel_spacing_mm: float      # imager pixel spacing
    burned_in_text: bool         # pixels carry burned-in text
    burned_in_declared: str      # 'YES', 'NO' or '' (absent)
    burned_in_boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # (x0, y0, x1, y1)


@dataclass
class PhiRecord:
    """One planted identifying value and where it is.

    ``location`` is 'header:(gggg,eeee)' (nested: 'header:(0040,0275)[0]>(0008,0050)'),
    'private:(gggg,eeee)' (same nesting), 'overlay:(60xx,3000)', 'curve:(50xx,eeee)',
    'icon:pixels', 'pixels:burned-in' or 'path'.
    """

    path: str
    location: str
    kind: str
    value: str


def _tag_text(tag) -> str:
    tag = Tag(tag)
    return f"({tag.group:04X},{tag.element:04X})"


class _Planter:
    """Sets elements on one dataset level and records each value set as a PhiRecord."""

    def __init__(self, path: str, records: list[PhiRecord], prefix: str = "header:"):
        self.path, self.records, self.prefix = path, records, prefix

    def put(self, ds: Dataset, tag, vr: str, value, kind: str) -> None:
        """Set ``tag`` to ``value`` (a string or a list of strings) and record every value."""
        ds.add_new(tag, vr, value)
        self.note(_tag_text(tag), value, kind)

    def note(self, where: str, value, kind: str) -> None:
        for one in value if isinstance(value, list) else [value]:
            self.records.append(PhiRecord(self.path, f"{self.prefix}{where}", kind, str(one)))

    def item(self, tag, index: int = 0) -> "_Planter":
        """The planter for item ``index`` of sequence ``tag`` at this level."""
        return _Planter(self.path, self.records, f"{self.prefix}{_tag_text(tag)}[{index}]>")

    def private(self) -> "_Planter":
        return _Planter(self.path, self.records, "private:")


def _da(t: dt.date) -> str:
    return f"{t:%Y%m%d}"


def _tm(t: dt.datetime) -> str:
    return f"{t:%H%M%S}.{t.microsecond // 1000:03d}"


def _sequence_item(ds: Dataset, keyword: str) -> Dataset:
    """Set ``keyword`` to a one-item sequence and return the item."""
    item = Dataset()
    setattr(ds, keyword, Sequence([item]))
    return item


def _frame_offsets(plan: SeriesPlan, rng: np.random.Generator) -> list[float]:
    """Seconds after the series start of each exposure."""
    n = len(plan.exposures)
    if plan.kind in FRAME_RATES and (plan.multiframe or plan.kind != "fluoro"):
        return [i / FRAME_RATES[plan.kind] for i in range(n)]
    gaps = rng.uniform(3.0, 60.0, size=n - 1)
    return [0.0] + [float(x) for x in np.cumsum(gaps)]


def _patient_module(p: _Planter, ds: Dataset, patient: Patient, patient_ref_uid: str) -> None:
    """Patient module (C.7.1.1), including the retired Other Patient IDs and its sequence."""
    p.put(ds, "PatientName", "PN", patient.name, "patient_name")
    p.put(ds, "PatientID", "LO", patient.patient_id, "patient_id")
    p.put(ds, "IssuerOfPatientID", "LO", patient.issuer, "issuer")
    p.put(ds, "PatientBirthDate", "DA", _da(patient.birth_date), "birth_date")
    p.put(ds, "PatientSex", "CS", patient.sex, "sex")
    p.put(ds, "OtherPatientIDs", "LO", list(patient.other_ids), "patient_id")
    ds.OtherPatientIDsSequence = Sequence()
    for i, other in enumerate(patient.other_ids):
        item = Dataset()
        ds.OtherPatientIDsSequence.append(item)
        p.item("OtherPatientIDsSequence", i).put(item, "PatientID", "LO", other, "patient_id")
        item.TypeOfPatientID = "TEXT"
    p.put(ds, "PatientAddress", "LO", patient.address, "address")
    p.put(ds, "PatientTelephoneNumbers", "SH", list(patient.phones), "phone")
    if patient.ethnic_group:
        p.put(ds, "EthnicGroup", "SH", patient.ethnic_group, "ethnic_group")
    p.put(ds, "PatientComments", "LT", patient.comments, "free_text")
    ref = _sequence_item(ds, "ReferencedPatientSequence")
    ref.ReferencedSOPClassUID = _DETACHED_PATIENT
    p.item("ReferencedPatientSequence").put(ref, "ReferencedSOPInstanceUID", "UI", patient_ref_uid, "uid")


def _study_modules(p: _Planter, ds: Dataset, patient: Patient, study: StudyContext) -> None:
    """General Study (C.7.2.1) and Patient Study (C.7.2.2) modules with the order's sequences."""
    p.put(ds, "StudyInstanceUID", "UI", study.study_instance_uid, "uid")
    p.put(ds, "StudyDate", "DA", _da(study.study_datetime), "date")
    p.put(ds, "StudyTime", "TM", _tm(study.study_datetime), "time")
    p.put(ds, "ReferringPhysicianName", "PN", study.referring_physician, "physician")
    p.put(ds, "RequestingPhysician", "PN", study.requesting_physician, "physician")
    p.put(ds, "StudyID", "SH", study.study_id, "study_id")
    p.put(ds, "AccessionNumber", "SH", study.accession_number, "accession")
    p.put(ds, "StudyDescription", "LO", study.study_description, "free_text")
    p.put(ds, "RequestedProcedureDescription", "LO", study.requested_procedure_description, "free_text")
    code = _sequence_item(ds, "ProcedureCodeSequence")
    code.CodeValue, code.CodingSchemeDesignator = "XRF-INTRAOP", "99DAXSYN"
    p.item("ProcedureCodeSequence").put(code, "CodeMeaning", "LO", study.procedure_code_meaning, "free_text")
    p.put(ds, "PatientAge", "AS", study.patient_age, "age")
    p.put(ds, "PatientSize", "DS", patient.size_m, "size")
    p.put(ds, "PatientWeight", "DS", patient.weight_kg, "weight")
    request = _sequence_item(ds, "RequestAttributesSequence")
    rp = p.item("RequestAttributesSequence")
    rp.put(request, "RequestedProcedureID", "SH", study.requested_procedure_id, "procedure_id")
    rp.put(request, "ScheduledProcedureStepID", "SH", study.scheduled_step_id, "procedure_id")
    rp.put(request, "AccessionNumber", "SH", study.accession_number, "accession")
    rp.put(request, "StudyInstanceUID", "UI", study.study_instance_uid, "uid")
    rp.put(request, "RequestedProcedureDescription", "LO", study.requested_procedure_description, "free_text")
    rp.put(request, "ScheduledProcedureStepDescription", "LO",
           f"{study.procedure} {patient.display_name}", "free_text")


def _series_module(p: _Planter, ds: Dataset, plan: SeriesPlan, study: StudyContext, patient: Patient,
                   series_uid: str, frame_of_reference: str, description: str) -> None:
    """General Series (C.7.3.1), Frame of Reference (C.7.4.1) and performed procedure step attributes."""
    ds.Modality = plan.modality
    p.put(ds, "SeriesInstanceUID", "UI", series_uid, "uid")
    ds.SeriesNumber = plan.series_number
    p.put(ds, "SeriesDate", "DA", _da(plan.acquired_at), "date")
    p.put(ds, "SeriesTime", "TM", _tm(plan.acquired_at), "time")
    p.put(ds, "SeriesDescription", "LO", description, "free_text")
    p.put(ds, "PerformingPhysicianName", "PN", study.performing_physician, "physician")
    p.put(ds, "OperatorsName", "PN", study.operator, "operator")
    ds.BodyPartExamined = BODY_PARTS[plan.region]
    if plan.laterality and plan.modality != "DX":
        ds.Laterality = plan.laterality
    p.put(ds, "PerformedProcedureStepID", "SH", study.performed_step_id, "procedure_id")
    p.put(ds, "PerformedProcedureStepStartDate", "DA", _da(study.study_datetime), "date")
    p.put(ds, "PerformedProcedureStepStartTime", "TM", _tm(study.study_datetime), "time")
    p.put(ds, "PerformedProcedureStepDescription", "LO",
          f"{study.procedure} - {patient.display_name}", "free_text")
    p.put(ds, "FrameOfReferenceUID", "UI", frame_of_reference, "uid")
    ds.PositionReferenceIndicator = ""


def _equipment_module(p: _Planter, ds: Dataset, device: DeviceModel, study: StudyContext) -> None:
    """General Equipment module (C.7.5.1)."""
    ds.Manufacturer = device.manufacturer
    p.put(ds, "InstitutionName", "LO", study.institution_name, "institution")
    p.put(ds, "InstitutionAddress", "ST", study.institution_address, "address")
    p.put(ds, "InstitutionalDepartmentName", "LO", study.department, "institution")
    p.put(ds, "StationName", "SH", study.station_name, "station")
    ds.ManufacturerModelName = device.model
    p.put(ds, "DeviceSerialNumber", "LO", study.device_serial, "serial")
    ds.SoftwareVersions = device.software_version


def _acquisition(ds: Dataset, plan: SeriesPlan, indices: list[int], rows: int, cols: int,
                 spacing: float, rng: np.random.Generator) -> None:
    """X-Ray Acquisition / XA Positioner (C.8.7, C.8.7.5) or DX Positioning (C.8.11.5) attributes."""
    device, pose = plan.device, plan.poses[indices[0]]
    fluoroscopic = plan.modality in ("XA", "RF")
    ds.KVP = f"{rng.uniform(55, 80 if fluoroscopic else 95):.1f}"
    ds.XRayTubeCurrent = int(rng.integers(2, 12) if fluoroscopic else rng.integers(100, 400))
    ds.ExposureTime = int(rng.integers(5, 20) if fluoroscopic else rng.integers(10, 120))
    ds.ImagerPixelSpacing = [f"{spacing:.4f}", f"{spacing:.4f}"]
    ds.DistanceSourceToDetector = f"{float(pose.sid_mm):.1f}"
    ds.DistanceSourceToPatient = f"{float(pose.sod_mm):.1f}"
    ds.PositionerPrimaryAngle = f"{float(pose.primary_deg):.2f}"
    ds.PositionerSecondaryAngle = f"{float(pose.secondary_deg):.2f}"
    if not fluoroscopic:
        ds.EstimatedRadiographicMagnificationFactor = f"{float(pose.sid_mm) / float(pose.sod_mm):.4f}"
        ds.ViewPosition = "AP"
        return
    ds.RadiationSetting = "GR" if plan.kind in ("cine", "sweep") else "SC"
    ds.PositionerMotion = "DYNAMIC" if plan.kind == "sweep" else "STATIC"
    if device.detector.kind == "image_intensifier":
        ds.IntensifierSize = f"{device.detector.cols * device.detector.pixel_mm:.1f}"
        ds.FieldOfViewShape = "ROUND"
        ds.FieldOfViewDimensions = [round(cols * spacing)]
    else:
        ds.FieldOfViewShape = "RECTANGLE"
        ds.FieldOfViewDimensions = [round(rows * spacing), round(cols * spacing)]


def _multiframe(ds: Dataset, plan: SeriesPlan, indices: list[int]) -> None:
    """Multi-frame (C.7.6.6) and Cine (C.7.6.5) modules; sweeps also step the positioner angles."""
    rate = FRAME_RATES.get(plan.kind, FRAME_RATES["fluoro"])
    ds.NumberOfFrames = len(indices)
    ds.FrameTime = f"{1000.0 / rate:.2f}"
    ds.CineRate = round(rate)
    ds.RecommendedDisplayFrameRate = round(rate)
    pointers = [Tag("FrameTime")]
    if plan.kind == "sweep":
        poses = [plan.poses[i] for i in indices]
        primary = [float(q.primary_deg) for q in poses]
        secondary = [float(q.secondary_deg) for q in poses]
        ds.PositionerPrimaryAngleIncrement = [0.0] + [b - a for a, b in zip(primary, primary[1:])]
        ds.PositionerSecondaryAngleIncrement = [0.0] + [b - a for a, b in zip(secondary, secondary[1:])]
        pointers += [Tag("PositionerPrimaryAngleIncrement"), Tag("PositionerSecondaryAngleIncrement")]
    ds.FrameIncrementPointer = pointers if len(pointers) > 1 else pointers[0]


def _image_pixel(ds: Dataset, device: DeviceModel, plan: SeriesPlan, rows: int, cols: int,
                 window: tuple[float, float]) -> None:
    """Image Pixel (C.7.6.3), Modality LUT (C.11.1) and VOI LUT (C.11.2) attributes."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = device.photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, device.bits_stored, device.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LIN" if device.signal == "linear" else "LOG"
    ds.PixelIntensityRelationshipSign = -1 if (device.signal, device.photometric) == ("log", "MONOCHROME2") else 1
    if device.rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = f"{device.rescale[0]:g}", f"{device.rescale[1]:g}"
        ds.RescaleType = "US"
    ds.WindowCenter, ds.WindowWidth = f"{window[0]:g}", f"{window[1]:g}"
    ds.VOILUTFunction = "LINEAR"
    if plan.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PresentationLUTShape = "IDENTITY" if device.photometric == "MONOCHROME2" else "INVERSE"
        ds.DetectorType = "SCINTILLATOR"
        ds.ImageLaterality = plan.laterality or "U"


def _private_values(patient: Patient, study: StudyContext,
                    frames: int, rng: np.random.Generator) -> dict[str, tuple[object, str]]:
    """What each private-tag ``source`` holds: (value, PHI kind); measurements have kind ''."""
    return {
        "patient_name": (patient.name, "patient_name"),
        "patient_id": (patient.patient_id, "patient_id"),
        "birth_date": (_da(patient.birth_date), "birth_date"),
        "accession": (study.accession_number, "accession"),
        "operator": (study.operator, "operator"),
        "physician": (study.performing_physician, "physician"),
        "institution": (study.institution_name, "institution"),
        "station": (study.station_name, "station"),
        "serial": (study.device_serial, "serial"),
        "study_date": (_da(study.study_datetime), "date"),
        "study_time": (_tm(study.study_datetime), "time"),
        "study_uid": (study.study_instance_uid, "uid"),
        "exam_note": (f"{study.procedure} on {patient.display_name}, {study.study_datetime:%d.%m.%Y}", "free_text"),
        "dose": (float(np.round(rng.uniform(0.5, 40.0), 3)), ""),
        "dap": (float(np.round(rng.uniform(0.05, 8.0), 3)), ""),
        "pulse_rate": (float(FRAME_RATES["fluoro"]), ""),
        "frame_count": (frames, ""),
        "filter": (int(rng.integers(0, 4)), ""),
    }


def _private_block(p: _Planter, ds: Dataset, device: DeviceModel, values: dict[str, tuple[object, str]]) -> None:
    """The device's private creator block, its PHI-carrying elements and its private sequence."""
    def fill(planter: _Planter, target: Dataset, tags: tuple[PrivateTag, ...]) -> None:
        block = target.private_block(device.private.group, device.private.creator, create=True)
        for tag in tags:
            full = block.get_tag(tag.element)
            if tag.vr == "SQ":
                item = Dataset()
                block.add_new(tag.element, "SQ", Sequence([item]))
                fill(planter.item(full), item, tag.items)
                continue
            value, kind = values[tag.source]
            block.add_new(tag.element, tag.vr, value)
            if kind:
                planter.note(_tag_text(full), value, kind)

    fill(p.private(), ds, device.private.tags)


def _overlay(p: _Planter, ds: Dataset, patient: Patient, study: StudyContext, rows: int, cols: int) -> None:
    """Overlay Plane module (C.9.2): a graphics plane with the patient's name and the date, top right."""
    text = f"{patient.display_name}  {study.study_datetime:%d.%m.%Y}"
    mask = text_mask((rows, cols), (int(cols * 0.6), rows // 40), text, max(8, rows // 40))
    ds.add_new(0x60000010, "US", rows)
    ds.add_new(0x60000011, "US", cols)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    p.put(ds, 0x60000022, "LO", f"Annotation by {study.operator}", "free_text")
    p.put(ds, 0x60001500, "LO", patient.display_name, "patient_name")
    ds.add_new(0x60003000, "OW", pack_bits(mask.ravel()))
    _Planter(p.path, p.records, "overlay:").note("(6000,3000)", text, "free_text")


def _curve(p: _Planter, ds: Dataset, patient: Patient, study: StudyContext, rows: int, cols: int) -> None:
    """Curve module (retired, C.10.2): a measured distance labelled with the patient's name."""
    points = np.array([cols // 4, rows // 2, 3 * cols // 4, rows // 2], dtype="<u2")
    ds.add_new(0x50000005, "US", 2)
    ds.add_new(0x50000010, "US", 2)
    ds.add_new(0x50000020, "CS", "POLY")
    ds.add_new(0x50000030, "SH", ["PIXEL", "PIXEL"])
    ds.add_new(0x50000103, "US", 0)
    curve = _Planter(p.path, p.records, "curve:")
    curve.put(ds, 0x50000022, "LO", f"Distance measured by {study.operator}", "free_text")
    curve.put(ds, 0x50002500, "LO", patient.display_name, "patient_name")
    ds.add_new(0x50003000, "OW", points.tobytes())


def _icon(p: _Planter, ds: Dataset, device: DeviceModel, frame: np.ndarray, window: tuple[float, float],
          burned: list[BurnedText]) -> None:
    """Icon Image Sequence (0088,0200): an 8-bit MONOCHROME2 thumbnail as displayed, text included.

    Downscaling takes the brightest displayed pixel of each block so burned-in text stays visible.
    """
    slope, intercept = device.rescale or (1.0, 0.0)
    centre, width = window
    shown = np.clip((frame * slope + intercept - (centre - width / 2)) / width, 0.0, 1.0)
    if device.photometric == "MONOCHROME1":
        shown = 1.0 - shown
    k = -(-max(frame.shape) // _ICON_MAX)
    rows, cols = -(-frame.shape[0] // k), -(-frame.shape[1] // k)
    padded = np.pad(shown, ((0, rows * k - frame.shape[0]), (0, cols * k - frame.shape[1])), mode="edge")
    thumb = padded.reshape(rows, k, cols, k).max(axis=(1, 3))
    icon = _sequence_item(ds, "IconImageSequence")
    icon.SamplesPerPixel, icon.PhotometricInterpretation = 1, "MONOCHROME2"
    icon.Rows, icon.Columns = rows, cols
    icon.BitsAllocated, icon.BitsStored, icon.HighBit, icon.PixelRepresentation = 8, 8, 7, 0
    icon.add_new(0x7FE00010, "OB", np.rint(thumb * 255).astype(np.uint8).tobytes())
    for text in burned:
        p.records.append(PhiRecord(p.path, "icon:pixels", text.field, text.text))


def _store(ds: Dataset, frames: np.ndarray, syntax: UID, device: DeviceModel, path: Path) -> None:
    """Set Pixel Data in ``syntax`` (compressing with pydicom's encoders) and write the file."""
    ds.file_meta.TransferSyntaxUID = syntax
    pixels = frames if len(frames) > 1 else frames[0]
    if syntax.is_compressed:
        options = {"jls_error": device.near_lossless_error} if syntax == JPEGLSNearLossless else {}
        ds.compress(syntax, pixels, generate_instance_uid=False, **options)
        if device.max_error(syntax):
            ds.LossyImageCompression = "01"
            ds.LossyImageCompressionRatio = f"{pixels.nbytes / len(ds.PixelData):.2f}"
            ds.LossyImageCompressionMethod = "ISO_14495_1"
    else:
        ds.add_new(0x7FE00010, "OW", np.ascontiguousarray(pixels, dtype="<u2").tobytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@dataclass
class _StudyRefs:
    """Study-wide values every file of the study shares."""

    patient_dir: str
    study_dir: str
    patient_ref_uid: str        # Referenced Patient Sequence
    study_ref_uid: str          # Referenced Study Sequence
    pps_uid: str                # Referenced Performed Procedure Step Sequence


def write_study(root: Path, patient: Patient, study: StudyContext, series: list[SeriesPlan],
                rng: np.random.Generator) -> tuple[list[FileRecord], list[PhiRecord]]:
    """Write every series of one study under ``root``; returns the files and every planted PHI value.

    Layout: root/FAMILY_GIVEN_MRN/YYYYMMDD_ACCESSION/NNNN_MODALITY_DESCRIPTION/IM_0001.dcm (or
    <SOP Instance UID>.dcm, per device). Names in the path are PHI too and are listed as 'path'.
    """
    refs = _StudyRefs(
        patient_dir=f"{patient.family}_{patient.given}_{patient.patient_id}",
        study_dir=f"{_da(study.study_datetime)}_{study.accession_number}",
        patient_ref_uid=make_uid(study.uid_root, rng),
        study_ref_uid=make_uid(study.uid_root, rng),
        pps_uid=make_uid(study.uid_root, rng),
    )
    files: list[FileRecord] = []
    records: list[PhiRecord] = []
    for plan in series:
        files += _write_series(Path(root), patient, study, plan, refs, records, rng)
    return files, records


def _check(plan: SeriesPlan) -> None:
    device = plan.device
    if plan.modality not in device.modalities:
        raise ValueError(f"{device.model} does not produce {plan.modality}")
    if plan.multiframe and plan.modality in ("DX", "CR"):
        raise ValueError(f"{plan.modality} images are single-frame")
    if len(plan.poses) != len(plan.exposures) or not plan.exposures:
        raise ValueError("a series needs one pose per exposure and at least one exposure")
    if plan.transfer_syntax and plan.transfer_syntax not in device.transfer_syntaxes:
        raise ValueError(f"{device.model} does not export {plan.transfer_syntax}")
    if len({e.image.shape for e in plan.exposures}) != 1:
        raise ValueError("all exposures of a series must have the same size")


def _write_series(root: Path, patient: Patient, study: StudyContext, plan: SeriesPlan, refs: _StudyRefs,
                  records: list[PhiRecord], rng: np.random.Generator) -> list[FileRecord]:
    """Write one series, one multi-frame file or one file per exposure."""
    _check(plan)
    device = plan.device
    syntax = UID(plan.transfer_syntax or device.transfer_syntaxes[int(rng.integers(len(device.transfer_syntaxes)))])
    description = f"{plan.kind.upper()} {BODY_PARTS[plan.region]}" + (f" {plan.laterality}" if plan.laterality else "")
    series_dir = f"{plan.series_number:04d}_{plan.modality}_{description.replace(' ', '_')}"
    series_uid, frame_of_reference = make_uid(study.uid_root, rng), make_uid(study.uid_root, rng)
    sop_class = SOP_CLASSES[plan.modality]
    rows, cols = plan.exposures[0].image.shape
    spacing = device.detector.pixel_mm * device.detector.cols / cols
    offsets = _frame_offsets(plan, rng)
    groups = [list(range(len(plan.exposures)))] if plan.multiframe else [[i] for i in range(len(plan.exposures))]
    written, first_sop = [], ""
    for number, indices in enumerate(groups, 1):
        sop_uid = make_uid(study.uid_root, rng)
        name = f"IM_{number:04d}.dcm" if device.file_naming == "index" else f"{sop_uid}.dcm"
        rel = f"{refs.patient_dir}/{refs.study_dir}/{series_dir}/{name}"
        p = _Planter(rel, records)
        path_phi = _Planter(rel, records, "")
        path_phi.note("path", f"{patient.family}_{patient.given}", "patient_name")
        path_phi.note("path", patient.patient_id, "patient_id")
        path_phi.note("path", _da(study.study_datetime), "date")
        path_phi.note("path", study.accession_number, "accession")
        path_phi.note("path", description.replace(" ", "_"), "free_text")
        if device.file_naming == "uid":
            path_phi.note("path", sop_uid, "uid")

        acquired = plan.acquired_at + dt.timedelta(seconds=offsets[indices[0]])
        created = acquired + dt.timedelta(seconds=float(rng.uniform(1.0, 20.0)))
        frames = np.stack([encode_pixels(device, plan.exposures[i]) for i in indices])
        window = window_for(device, frames)
        shown_at = f"{acquired:{device.date_format}} {acquired:%H:%M:%S}"
        texts = {"patient_name": patient.display_name, "patient_id": patient.patient_id,
                 "birth_date": f"{patient.birth_date:{device.date_format}}", "datetime": shown_at,
                 "institution": study.institution_name}
        burned = [burn_in(device, frame, texts) for frame in frames][0]
        for text in burned:
            records.append(PhiRecord(rel, "pixels:burned-in", text.field, text.text))

        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        p.put(ds.file_meta, "MediaStorageSOPInstanceUID", "UI", sop_uid, "uid")
        ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION
        p.put(ds.file_meta, "SourceApplicationEntityTitle", "AE", study.station_ae_title, "station")

        # SOP Common (C.12.1) and General Image (C.7.6.1)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = sop_class
        p.put(ds, "SOPInstanceUID", "UI", sop_uid, "uid")
        p.put(ds, "InstanceCreationDate", "DA", _da(created), "date")
        p.put(ds, "InstanceCreationTime", "TM", _tm(created), "time")
        ds.InstanceNumber = number
        ds.ImageType = ["ORIGINAL", "PRIMARY", "SINGLE PLANE"] if plan.modality in ("XA", "RF") \
            else ["ORIGINAL", "PRIMARY"]
        p.put(ds, "AcquisitionDate", "DA", _da(acquired), "date")
        p.put(ds, "AcquisitionTime", "TM", _tm(acquired), "time")
        p.put(ds, "AcquisitionDateTime", "DT", f"{acquired:%Y%m%d}{_tm(acquired)}", "datetime")
        p.put(ds, "ContentDate", "DA", _da(created), "date")
        p.put(ds, "ContentTime", "TM", _tm(created), "time")
        p.put(ds, "ImageComments", "LT", f"Acquired by {study.operator} for {patient.display_name}", "free_text")
        p.put(ds, "IrradiationEventUID", "UI", make_uid(study.uid_root, rng), "uid")
        if device.declares_burned_in:
            ds.BurnedInAnnotation = device.declares_burned_in
        if first_sop:
            ref = _sequence_item(ds, "ReferencedImageSequence")
            ref.ReferencedSOPClassUID = sop_class
            p.item("ReferencedImageSequence").put(ref, "ReferencedSOPInstanceUID", "UI", first_sop, "uid")
        first_sop = first_sop or sop_uid
        for keyword, class_uid, uid in (("ReferencedStudySequence", _DETACHED_STUDY, refs.study_ref_uid),
                                        ("ReferencedPerformedProcedureStepSequence", _MPPS, refs.pps_uid)):
            ref = _sequence_item(ds, keyword)
            ref.ReferencedSOPClassUID = class_uid
            p.item(keyword).put(ref, "ReferencedSOPInstanceUID", "UI", uid, "uid")

        _patient_module(p, ds, patient, refs.patient_ref_uid)
        _study_modules(p, ds, patient, study)
        _series_module(p, ds, plan, study, patient, series_uid, frame_of_reference, description)
        _equipment_module(p, ds, device, study)
        _acquisition(ds, plan, indices, rows, cols, spacing, rng)
        if plan.multiframe:
            _multiframe(ds, plan, indices)
        _image_pixel(ds, device, plan, rows, cols, window)
        _private_block(p, ds, device, _private_values(patient, study, len(indices), rng))
        if device.overlay:
            _overlay(p, ds, patient, study, rows, cols)
        if device.curve:
            _curve(p, ds, patient, study, rows, cols)
        if device.icon:
            _icon(p, ds, device, frames[0], window, burned)
        _store(ds, frames, syntax, device, root / rel)

        written.append(FileRecord(
            path=rel, sop_class_uid=str(sop_class), sop_instance_uid=sop_uid,
            study_instance_uid=study.study_instance_uid, series_instance_uid=series_uid,
            series_number=plan.series_number, instance_number=number, modality=plan.modality,
            manufacturer=device.manufacturer, model=device.model, transfer_syntax_uid=str(syntax),
            photometric=device.photometric, bits_stored=device.bits_stored, rows=rows, cols=cols,
            frames=len(indices), exposure_indices=list(indices), pixel_spacing_mm=spacing,
            burned_in_text=bool(burned), burned_in_declared=device.declares_burned_in,
            burned_in_boxes=[text.box for text in burned],
        ))
    return written
