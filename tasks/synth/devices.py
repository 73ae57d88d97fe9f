"""Fictional X-ray device models and how each one turns an `Exposure` into stored pixel values.

A `DeviceModel` is the part of a real vendor's behaviour that matters downstream: its detector,
the modalities it produces, how stored values encode the signal (Image Pixel and Modality LUT
modules), the transfer syntaxes it exports, whether it writes cines as multi-frame, its private
data block, and its annotation habits (text burned into pixels at fixed model-specific positions,
overlay planes, curves, icon thumbnails, and what it declares in Burned In Annotation).

Manufacturer and model names are invented; none is a real vendor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.datadict import add_private_dict_entries
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from tasks.synth.scene import Detector, Exposure

# Stored image content is kept inside [_FLOOR, _CEILING] x max value, so burned-in text
# (exactly 0 or exactly the maximum) is the only thing that saturates.
_FLOOR, _CEILING = 0.02, 0.95
# Attenuation (-ln of the transmitted fraction) mapped to the full range by 'log' devices.
_LOG_RANGE = 7.0
# The smallest font that still renders legible glyphs in downscaled test images.
_MIN_FONT_PX = 6


@dataclass(frozen=True)
class PrivateTag:
    """One element of a private block.

    Text VRs hold a PHI value named by ``source`` (patient_name, patient_id, birth_date, accession,
    operator, physician, institution, station, serial, study_date, study_time, study_uid,
    exam_note); binary VRs hold a device measurement (dose, dap, pulse_rate, frame_count, filter).
    An 'SQ' tag holds one item made of ``items``.
    """

    element: int                    # element offset inside the block, 0x00-0xFF
    vr: str
    source: str
    name: str
    items: tuple["PrivateTag", ...] = ()


@dataclass(frozen=True)
class PrivateBlock:
    """A private creator (gggg,0010) and the elements it reserves at (gggg,10xx)."""

    group: int
    creator: str
    tags: tuple[PrivateTag, ...]


@dataclass(frozen=True)
class BurnLine:
    """One line of text a device burns into every image, top-left corner at (x, y).

    Coordinates are pixels of the full-size detector; smaller images scale them proportionally.
    ``field`` is patient_name, patient_id, birth_date, datetime or institution.
    """

    field: str
    x: int
    y: int


@dataclass(frozen=True)
class BurnedText:
    """Text actually burned into an image: what it says and its tight box (x0, y0, x1, y1), inclusive."""

    field: str
    text: str
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class DeviceModel:
    """The habits of one (fictional) device model."""

    manufacturer: str
    model: str
    role: str                       # mobile image-intensifier C-arm, mobile flat-panel C-arm, ...
    detector: Detector
    modalities: tuple[str, ...]
    bits_stored: int
    signal: Literal["linear", "log"]  # linear: value ∝ quanta; log: value ∝ ±log(quanta)
    photometric: Literal["MONOCHROME1", "MONOCHROME2"]
    rescale: tuple[float, float] | None  # (slope, intercept) of the Modality LUT, None: not written
    transfer_syntaxes: tuple[str, ...]
    multiframe: bool                # stores cines/sweeps as one multi-frame file
    private: PrivateBlock
    software_version: str
    burn_in: tuple[BurnLine, ...] = ()
    burn_font_px: int = 0           # font height at full detector size
    date_format: str = "%d.%m.%Y"   # how burned-in dates are printed
    declares_burned_in: Literal["YES", "NO", ""] = ""  # '' = Burned In Annotation omitted
    overlay: bool = False           # writes a 60xx overlay plane with the patient's name
    curve: bool = False             # writes a (retired) 50xx curve with a PHI label
    icon: bool = False              # writes an Icon Image Sequence thumbnail
    file_naming: Literal["index", "uid"] = "index"  # IM_0001.dcm or <SOP Instance UID>.dcm
    near_lossless_error: int = 0    # NEAR parameter when exporting JPEG-LS near-lossless

    @property
    def max_value(self) -> int:
        return (1 << self.bits_stored) - 1

    @property
    def text_value(self) -> int:
        """The stored value that displays as white: maximum, or 0 on inverted (MONOCHROME1) displays."""
        return 0 if self.photometric == "MONOCHROME1" else self.max_value

    def max_error(self, transfer_syntax: str) -> int:
        """Largest absolute difference between encoded and decoded stored values for a syntax."""
        return self.near_lossless_error if transfer_syntax == JPEGLSNearLossless else 0


def encode_pixels(device: DeviceModel, exposure: Exposure) -> np.ndarray:
    """Stored values (uint16, within bits stored) the device writes for ``exposure``, before burn-in.

    'linear' devices (fluoroscopy) store values ∝ detected quanta with automatic gain (the anatomy
    at the field centre mid-range, air clipped white): bone dark, the area outside the field black. 'log' MONOCHROME2 devices (radiography) store attenuation
    -log(quanta / unattenuated): bone bright, unexposed area white. 'log' MONOCHROME1 devices store
    log(quanta) and let the display invert it: the same picture on screen.
    """
    transmitted = np.clip(exposure.image / exposure.photons_per_px, 1e-4, None)
    transmitted = np.where(exposure.field_mask, transmitted, 1e-4)
    if device.signal == "linear":
        # automatic gain: the anatomy at the field centre sits at ~40 % of the range, air saturates
        rows, cols = transmitted.shape
        centre = transmitted[rows // 4: 3 * rows // 4, cols // 4: 3 * cols // 4]
        level = 0.4 * transmitted / max(float(np.median(centre)), 1e-4)
    else:
        attenuation = np.clip(-np.log(transmitted) / _LOG_RANGE, 0.0, 1.0)
        level = attenuation if device.photometric == "MONOCHROME2" else 1.0 - attenuation
    level = np.clip(level, 0.0, 1.0)
    stored = device.max_value * (_FLOOR + (_CEILING - _FLOOR) * level)
    return np.rint(stored).astype(np.uint16)


def window_for(device: DeviceModel, stored: np.ndarray) -> tuple[float, float]:
    """VOI LUT window (centre, width) in Modality LUT output units, from the 1-99 % range of ``stored``."""
    lo, hi = np.percentile(stored, [1.0, 99.0])
    slope, intercept = device.rescale or (1.0, 0.0)
    lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
    width = max(hi - lo, 1.0)
    return round(float(lo + width / 2), 1), round(float(width), 1)


def text_mask(shape: tuple[int, int], xy: tuple[int, int], text: str, font_px: int) -> np.ndarray:
    """Boolean (rows, cols) mask of ``text`` drawn with Pillow's scalable default font, top-left at ``xy``."""
    rows, cols = shape
    canvas = Image.new("1", (cols, rows), 0)
    font = ImageFont.load_default(size=max(_MIN_FONT_PX, font_px))
    ImageDraw.Draw(canvas).text(xy, text, fill=1, font=font)
    return np.asarray(canvas, dtype=bool)


def burn_in(device: DeviceModel, stored: np.ndarray, values: dict[str, str]) -> list[BurnedText]:
    """Burn the device's text lines into ``stored`` (rows, cols) in place; returns what was burned.

    ``values`` maps each burn-in field to the text to print. The masked pixels are set to
    ``device.text_value``; lines that fall outside a (downscaled) image are skipped.
    """
    scale = stored.shape[1] / device.detector.cols
    burned = []
    for line in device.burn_in:
        text = values[line.field]
        mask = text_mask(stored.shape, (round(line.x * scale), round(line.y * scale)), text,
                         round(device.burn_font_px * scale))
        if not mask.any():
            continue
        stored[mask] = device.text_value
        ys, xs = np.nonzero(mask)
        burned.append(BurnedText(line.field, text, (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))))
    return burned


def devices_for(modality: str) -> list[DeviceModel]:
    """The device models that produce ``modality`` ('XA', 'RF', 'DX' or 'CR')."""
    return [d for d in DEVICE_MODELS if modality in d.modalities]


def _block(group: int, creator: str, *tags: PrivateTag) -> PrivateBlock:
    return PrivateBlock(group, creator, tags)


_T = PrivateTag

DEVICE_MODELS: tuple[DeviceModel, ...] = (
    DeviceModel(
        manufacturer="Halvorsen Medical", model="OrbiScope 9", role="mobile image-intensifier C-arm",
        detector=Detector("image_intensifier", 512, 512, 0.45, blur_px=1.2, scatter_fraction=0.35, vignetting=0.25),
        modalities=("XA", "RF"), bits_stored=12, signal="linear", photometric="MONOCHROME2", rescale=None,
        transfer_syntaxes=(ImplicitVRLittleEndian, ExplicitVRLittleEndian), multiframe=False,
        private=_block(0x0019, "HALVORSEN OSC 1.0",
                       _T(0x10, "LO", "patient_name", "Exam Patient Name"),
                       _T(0x11, "LO", "operator", "Operator Login"),
                       _T(0x12, "FL", "dose", "Cumulative Dose (mGy)"),
                       _T(0x13, "US", "filter", "Image Filter Mode"),
                       _T(0x20, "SQ", "", "Exam Record Sequence", items=(
                           _T(0x01, "LO", "patient_id", "Record Patient ID"),
                           _T(0x02, "DA", "study_date", "Record Date"),
                           _T(0x03, "LT", "exam_note", "Record Note")))),
        software_version="OSC 4.2.1",
        burn_in=(BurnLine("patient_name", 6, 6), BurnLine("patient_id", 6, 24), BurnLine("birth_date", 6, 42),
                 BurnLine("datetime", 6, 470), BurnLine("institution", 6, 488)),
        burn_font_px=14, date_format="%d.%m.%Y", declares_burned_in="",
        overlay=True, curve=True,
    ),
    DeviceModel(
        manufacturer="Kestrel Imaging Systems", model="Arcus 12i", role="mobile image-intensifier C-arm",
        detector=Detector("image_intensifier", 1024, 1024, 0.29, blur_px=1.0, scatter_fraction=0.3, vignetting=0.2),
        modalities=("XA", "RF"), bits_stored=12, signal="linear", photometric="MONOCHROME2", rescale=None,
        transfer_syntaxes=(ExplicitVRLittleEndian, JPEGLSNearLossless), multiframe=True,
        private=_block(0x0029, "KESTREL ARCUS 2",
                       _T(0x01, "SH", "station", "Cart Name"),
                       _T(0x02, "LO", "accession", "Order Number"),
                       _T(0x03, "FL", "dap", "Dose Area Product (Gy cm2)"),
                       _T(0x04, "FL", "pulse_rate", "Pulse Rate (1/s)"),
                       _T(0x10, "SQ", "", "Patient Cache Sequence", items=(
                           _T(0x01, "PN", "patient_name", "Cached Patient Name"),
                           _T(0x02, "DA", "birth_date", "Cached Birth Date"),
                           _T(0x03, "LO", "institution", "Cached Site")))),
        software_version="ARCUS 7.0.3",
        burn_in=(BurnLine("patient_name", 10, 10), BurnLine("birth_date", 10, 36),
                 BurnLine("institution", 560, 10), BurnLine("datetime", 560, 36)),
        burn_font_px=22, date_format="%Y-%m-%d", declares_burned_in="NO",
        icon=True, file_naming="uid", near_lossless_error=2,
    ),
    DeviceModel(
        manufacturer="Vantor Surgical", model="FD-30 Mobile", role="mobile flat-panel C-arm",
        detector=Detector("flat_panel", 976, 976, 0.304, blur_px=0.6, scatter_fraction=0.25),
        modalities=("XA", "RF"), bits_stored=16, signal="linear", photometric="MONOCHROME2", rescale=None,
        transfer_syntaxes=(ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless), multiframe=True,
        private=_block(0x0011, "VANTOR_FD 01",
                       _T(0x01, "LO", "physician", "Surgeon"),
                       _T(0x02, "UI", "study_uid", "Worklist Study UID"),
                       _T(0x03, "US", "frame_count", "Frames In Run"),
                       _T(0x04, "FL", "dose", "Run Dose (mGy)"),
                       _T(0x05, "SQ", "", "Run Info Sequence", items=(
                           _T(0x01, "TM", "study_time", "Run Start"),
                           _T(0x02, "LO", "serial", "Panel Serial")))),
        software_version="VFD 2.11",
        overlay=True, icon=True,
    ),
    DeviceModel(
        manufacturer="Nordhaven Medtech", model="Ostra 2100 FPD", role="mobile flat-panel C-arm",
        detector=Detector("flat_panel", 1024, 1024, 0.2, blur_px=0.6, scatter_fraction=0.25),
        modalities=("XA", "RF"), bits_stored=16, signal="linear", photometric="MONOCHROME2", rescale=None,
        transfer_syntaxes=(JPEGLSLossless, ExplicitVRLittleEndian), multiframe=True,
        private=_block(0x0021, "NORDHAVEN OSTRA",
                       _T(0x10, "LO", "exam_note", "Procedure Note"),
                       _T(0x11, "PN", "operator", "Technologist"),
                       _T(0x12, "FL", "dap", "Run DAP (Gy cm2)"),
                       _T(0x20, "SQ", "", "Patient Sequence", items=(
                           _T(0x01, "LO", "patient_id", "Patient ID"),
                           _T(0x02, "PN", "patient_name", "Patient Name")))),
        software_version="OSTRA 3.4",
        burn_in=(BurnLine("patient_name", 700, 940), BurnLine("patient_id", 700, 964),
                 BurnLine("datetime", 700, 988)),
        burn_font_px=20, date_format="%d-%b-%Y", declares_burned_in="YES",
    ),
    DeviceModel(
        manufacturer="Calderon Radiology Systems", model="FluoroDome R7", role="fixed fluoroscopy room",
        detector=Detector("flat_panel", 1024, 1024, 0.4, blur_px=0.7, scatter_fraction=0.3),
        modalities=("RF",), bits_stored=12, signal="linear", photometric="MONOCHROME2", rescale=None,
        transfer_syntaxes=(RLELossless, ImplicitVRLittleEndian), multiframe=True,
        private=_block(0x0009, "CALDERON FD R7",
                       _T(0x01, "LO", "institution", "Room Site"),
                       _T(0x02, "SH", "station", "Room ID"),
                       _T(0x03, "FL", "dose", "Entrance Dose (mGy)"),
                       _T(0x04, "US", "filter", "Spectral Filter")),
        software_version="FDR 9.1",
        burn_in=(BurnLine("institution", 12, 12), BurnLine("patient_name", 12, 40),
                 BurnLine("patient_id", 12, 68), BurnLine("datetime", 12, 980)),
        burn_font_px=22, date_format="%m/%d/%Y", declares_burned_in="YES",
        overlay=True,
    ),
    DeviceModel(
        manufacturer="Meridia Health Devices", model="Lumen DR 43", role="flat-panel radiography room",
        detector=Detector("flat_panel", 1800, 1500, 0.24, blur_px=0.6, scatter_fraction=0.15),
        modalities=("DX",), bits_stored=14, signal="log", photometric="MONOCHROME2", rescale=(1.0, 0.0),
        transfer_syntaxes=(JPEG2000Lossless, ExplicitVRLittleEndian), multiframe=False,
        private=_block(0x0029, "MERIDIA DR 1.0",
                       _T(0x10, "LO", "operator", "Radiographer"),
                       _T(0x11, "FL", "dap", "DAP (Gy cm2)"),
                       _T(0x20, "SQ", "", "Acquisition Context Sequence", items=(
                           _T(0x01, "LO", "accession", "Order Accession"),
                           _T(0x02, "DA", "study_date", "Order Date"),
                           _T(0x03, "LO", "serial", "Detector Serial")))),
        software_version="LUMEN 5.0.2", file_naming="uid",
    ),
    DeviceModel(
        manufacturer="Tessaly Imaging", model="CRX Reader 350", role="computed radiography reader",
        detector=Detector("flat_panel", 2140, 1760, 0.2, blur_px=1.1, scatter_fraction=0.2),
        modalities=("CR",), bits_stored=12, signal="log", photometric="MONOCHROME1", rescale=(0.5, -1024.0),
        transfer_syntaxes=(ExplicitVRLittleEndian, ImplicitVRLittleEndian), multiframe=False,
        private=_block(0x0019, "TESSALY CR 3",
                       _T(0x10, "LO", "patient_name", "Plate Patient"),
                       _T(0x11, "LO", "birth_date", "Plate Birth Date"),
                       _T(0x12, "US", "frame_count", "Plate Reads"),
                       _T(0x13, "FL", "dose", "Exposure Index"),
                       _T(0x30, "SQ", "", "Plate History Sequence", items=(
                           _T(0x01, "LO", "station", "Reader Station"),
                           _T(0x02, "LT", "exam_note", "Plate Note")))),
        software_version="CRX 2.8",
        burn_in=(BurnLine("institution", 40, 30), BurnLine("patient_name", 40, 80),
                 BurnLine("datetime", 40, 130)),
        burn_font_px=40, date_format="%d/%m/%Y", declares_burned_in="",
        curve=True, icon=True,
    ),
)


def _register_private_dictionaries() -> None:
    """Teach pydicom the VRs of every private tag, so Implicit VR files read back typed."""
    def entries(group: int, tags: tuple[PrivateTag, ...]) -> dict[int, tuple[str, str, str, str]]:
        found = {}
        for tag in tags:
            found[(group << 16) | 0x1000 | tag.element] = (tag.vr, "1", tag.name, "")
            found.update(entries(group, tag.items))
        return found

    for device in DEVICE_MODELS:
        add_private_dict_entries(device.private.creator, entries(device.private.group, device.private.tags))


_register_private_dictionaries()
