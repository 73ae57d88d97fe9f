"""Pixel decoding and intensity/size normalization of X-ray DICOM (XA, RF, DX, CR) for pretraining.

Pure functions, no I/O and no mutation of the dataset:

- ``decode_frames(ds)`` turns the Pixel Data of a dataset into stored values, shape (frames, rows,
  cols), or raises ``PixelDataError`` saying why it cannot (the message names attributes, sizes and
  transfer syntaxes only, never a value that could identify a patient).
- ``normalize(ds, frames, config)`` maps stored values to 16-bit display values and resizes them.
- ``attenuation_bright(params)`` / ``model_view(pixels, params)``: the one polarity the models read, with
  the boxes cleaned of burned-in text at 0.

Convention (one for every device): the output is uint16 in *MONOCHROME2 display polarity* (high =
bright on screen). Stored values go through the Modality LUT (Rescale Slope/Intercept, or a Modality
LUT Sequence), then the *theoretical* output range of that LUT - computed from Bits Stored, Pixel
Representation and the LUT, not from the image content - is mapped linearly onto 0..65535, inverted
for MONOCHROME1. A negative rescale slope is part of the Modality LUT, so it flips the mapping from
stored values as the standard's display pipeline would. No VOI LUT / window is applied: the data keeps
its full dynamic range (DAX's own preprocessing does the I0 / -log / min-max step later). The image is
then reduced so its long side is at most ``max_size`` by area averaging in float32 (Pillow mode 'F',
BOX filter), never upscaled, and rounded once at the end. Every parameter is returned in
``NormalizedFrame.params`` as JSON-able values.

The models' view: attenuation bright. Display polarity follows each modality family's habit: radiography
(CR, DX) shows bone and metal bright, fluoroscopy (XA, RF) shows them dark on bright air. A model fed
both learns "metal" twice, and a metal head trained mostly on fluoroscopy marks dark blobs on radiographs
(docs/experiments.md, section 16). So the shards keep the display polarity (what the device showed), and
everything that feeds a model (pretraining crops, the kNN monitor, the heads, ``dax predict``) reads
``model_view(pixels, params)``: the image inverted where its display shows attenuation dark. Whether it
does is decided per image by its modality's display habit (``attenuation_bright``: XA and RF dark,
everything else bright) and recorded as the ``attenuation_bright`` parameter; samples normalized before
it carry their modality, so they get the same answer. Pixel Intensity Relationship Sign (0028,1041)
would be the physics, but it is not trusted: deid-data's DX cat thorax says LIN, +1 (stored values grow
with the beam intensity, so air would show white) while its pixels show air black and bone white, as a
processed "for presentation" radiograph does; it is kept in the params for audits.

Cleaned burned-in text reads as air in the models' view on every modality: ingestion blanks each text box
with the display's black, which the models' view of fluoroscopy would turn white, the tone of dense metal
(the metal head marked it). ``normalize(..., blanked=boxes)`` records the boxes (``verdict.boxes``) in output
pixels as the ``blanked`` parameter, rounded outwards so that the pixels the area averaging mixed with the fill
are inside, and ``model_view`` sets them to 0 (no attenuation) after the polarity step. Samples normalized
before carry no boxes: read as before. ``blanked_boxes(params, rows, cols)`` gives the same boxes on any grid of
the same image (the stored pixels, the native detector grid where the labels live), rounded outwards.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.uid import UID, AllTransferSyntaxes, PrivateTransferSyntaxes

__all__ = [
    "AIR_CLIP_SHARE", "MAX_FRAMES", "MAX_SIDE", "MIN_SIDE", "NORMALIZE_VERSION", "OUTPUT_MAX",
    "NormalizeConfig", "NormalizedFrame", "PixelDataError", "air_clipped", "attenuation_bright", "blanked_boxes",
    "decode_frames", "model_view", "normalize",
]

MIN_SIDE = 8            # rows or columns below this: not an image we can learn from (icons, junk)
MAX_SIDE = 16384        # rows or columns above this: corrupt header or not an X-ray frame
MAX_FRAMES = 5000       # longer "cines" are corrupt headers or not worth decoding whole
OUTPUT_MAX = 65535
NORMALIZE_VERSION = 1
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
ATTENUATION_DARK_MODALITIES = ("XA", "RF")   # fluoroscopy's display habit: bone and metal dark on bright air
SUPPORTED_BITS_ALLOCATED = (8, 16, 32)


class PixelDataError(ValueError):
    """The pixel data cannot be turned into a monochrome image; the message says why (no PHI)."""


@dataclass(frozen=True)
class NormalizeConfig:
    max_size: int = 1024            # long side of the output, pixels (never upscaled)
    frame_step: int = 1             # keep every k-th frame of a multi-frame file
    max_frames: int | None = None   # keep at most this many frames (after the step)

    def __post_init__(self) -> None:
        if self.max_size < 1:
            raise ValueError("max_size must be >= 1")
        if self.frame_step < 1:
            raise ValueError("frame_step must be >= 1")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError("max_frames must be >= 1 or None")


@dataclass(frozen=True)
class NormalizedFrame:
    frame: int                # index of the frame in the source file
    pixels: np.ndarray        # uint16 (H, W), MONOCHROME2 display polarity, 0..65535
    params: dict[str, Any]    # every parameter used, JSON-able, PHI-free


# ----------------------------------------------------------------------------------------- decoding

def _int_attr(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        if default is None:
            raise PixelDataError(f"missing {keyword}")
        value = default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise PixelDataError(f"invalid {keyword}") from None


def _header(ds: Dataset) -> dict[str, Any]:
    """The Image Pixel attributes decoding depends on, validated before touching the pixel data."""
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise PixelDataError("float pixel data is not supported (no integer Pixel Data element)")
        raise PixelDataError("no pixel data (Pixel Data element absent)")
    if ds.PixelData is None or len(ds.PixelData) == 0:
        raise PixelDataError("no pixel data (Pixel Data element empty)")

    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    samples = _int_attr(ds, "SamplesPerPixel", 1)
    if photometric not in MONOCHROME or samples != 1:
        shown = photometric or "absent"
        raise PixelDataError(f"non-monochrome photometric interpretation {shown!r} "
                             f"with {samples} sample(s) per pixel; only MONOCHROME1/2 are supported")

    rows, cols = _int_attr(ds, "Rows"), _int_attr(ds, "Columns")
    frames = _int_attr(ds, "NumberOfFrames", 1) or 1   # 0 is written by some devices for "single frame"
    if not (MIN_SIDE <= rows <= MAX_SIDE and MIN_SIDE <= cols <= MAX_SIDE):
        raise PixelDataError(f"absurd dimensions: {rows} rows x {cols} columns "
                             f"(allowed {MIN_SIDE}..{MAX_SIDE} per side)")
    if not 1 <= frames <= MAX_FRAMES:
        raise PixelDataError(f"absurd number of frames: {frames} (allowed 1..{MAX_FRAMES})")

    bits_allocated = _int_attr(ds, "BitsAllocated")
    bits_stored = _int_attr(ds, "BitsStored", bits_allocated)
    pixel_representation = _int_attr(ds, "PixelRepresentation", 0)
    if bits_allocated not in SUPPORTED_BITS_ALLOCATED:
        raise PixelDataError(f"unsupported Bits Allocated {bits_allocated} (supported: 8, 16, 32)")
    if not 1 <= bits_stored <= bits_allocated:
        raise PixelDataError(f"invalid Bits Stored {bits_stored} for Bits Allocated {bits_allocated}")
    if pixel_representation not in (0, 1):
        raise PixelDataError(f"invalid Pixel Representation {pixel_representation}")

    meta = getattr(ds, "file_meta", None)
    tsuid = meta.get("TransferSyntaxUID") if meta is not None else None
    if not tsuid:
        raise PixelDataError("unsupported transfer syntax: none declared in the file meta information")
    tsuid = UID(str(tsuid))
    if tsuid not in AllTransferSyntaxes and tsuid not in PrivateTransferSyntaxes:
        raise PixelDataError(f"unsupported transfer syntax: unknown UID {tsuid}")
    return dict(photometric=photometric, rows=rows, cols=cols, frames=frames, bits_allocated=bits_allocated,
                bits_stored=bits_stored, pixel_representation=pixel_representation, tsuid=tsuid)


def decode_frames(ds: Dataset) -> np.ndarray:
    """Stored pixel values of every frame, shape (frames, rows, cols); raises ``PixelDataError``.

    Unsigned data is masked to Bits Stored (overlay planes can hide in the unused high bits);
    signed data (Pixel Representation 1) is masked and sign-extended from Bits Stored.
    The dataset is not modified (no cached ``pixel_array`` left behind).
    """
    h = _header(ds)
    tsuid: UID = h["tsuid"]
    rows, cols, frames = h["rows"], h["cols"], h["frames"]

    try:
        decoder = get_decoder(tsuid)
    except NotImplementedError:
        raise PixelDataError(f"unsupported transfer syntax: no decoder implemented for "
                             f"{tsuid.name} ({tsuid})") from None
    if not decoder.is_available:
        raise PixelDataError(f"unsupported transfer syntax: no decoder plugin installed for "
                             f"{tsuid.name} ({tsuid})")

    if not tsuid.is_encapsulated:
        expected = (rows * cols * frames * h["bits_allocated"] + 7) // 8
        present = len(ds.PixelData)
        if present < expected:
            raise PixelDataError(
                f"declared size larger than the data present: {rows} x {cols} x {frames} frame(s) x "
                f"{h['bits_allocated']} bits = {expected} bytes, Pixel Data holds {present} bytes")

    try:
        arr, props = decoder.as_array(ds)
    except BaseException as exc:  # the decoders raise many types; the reason is what matters
        # Rust decoders (pylibjpeg-rle) report some corrupt streams by a pyo3 PanicException, which
        # derives from BaseException; anything else that is not an Exception (Ctrl-C, exit) goes on up
        if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
            raise
        raise PixelDataError(f"corrupt or undecodable pixel data for {tsuid.name} ({tsuid}): "
                             f"decoder raised {type(exc).__name__}") from exc

    if arr.size != rows * cols * frames:
        raise PixelDataError(f"decoded {arr.size} values, header declares {rows} x {cols} x {frames} "
                             f"({tsuid.name})")
    arr = arr.reshape(frames, rows, cols)
    bits_stored = max(h["bits_stored"], int(props.get("bits_stored", 0) or 0))
    return _mask_high_bits(arr, bits_stored, h["pixel_representation"])


def _mask_high_bits(arr: np.ndarray, bits_stored: int, pixel_representation: int) -> np.ndarray:
    """Keep the low ``bits_stored`` bits; sign-extend them for signed data."""
    width = arr.dtype.itemsize * 8
    if bits_stored >= width:
        return arr
    unsigned = arr.view(np.dtype(f"u{arr.dtype.itemsize}"))
    mask = (1 << bits_stored) - 1
    low = unsigned & np.array(mask, unsigned.dtype)
    if pixel_representation == 0:
        return low if arr.dtype.kind == "u" else low.astype(arr.dtype)
    sign = 1 << (bits_stored - 1)
    signed = low.view(np.dtype(f"i{arr.dtype.itemsize}"))
    return np.where(low & np.array(sign, unsigned.dtype), signed - (1 << bits_stored), signed).astype(
        np.dtype(f"i{arr.dtype.itemsize}"))


# ------------------------------------------------------------------------------------ normalization

def _float(value: Any, default: float) -> float:
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _pixel_spacing(ds: Dataset) -> tuple[list[float] | None, str | None]:
    """(row, column) spacing in mm from Imager Pixel Spacing, else Pixel Spacing; zeros mean absent."""
    for keyword in ("ImagerPixelSpacing", "PixelSpacing"):
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        try:
            items = [value] if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") else list(value)
            pair = [float(v) for v in items]
        except (TypeError, ValueError):
            continue
        if len(pair) == 1:
            pair = pair * 2
        if len(pair) == 2 and all(np.isfinite(pair)) and min(pair) > 0:
            return pair, keyword
    return None, None


def _modality_lut(ds: Dataset, bits_stored: int, signed: bool) -> dict[str, Any]:
    """How stored values become Modality LUT output, and the theoretical output range."""
    stored_min = -(1 << (bits_stored - 1)) if signed else 0
    stored_max = (1 << (bits_stored - 1)) - 1 if signed else (1 << bits_stored) - 1
    info: dict[str, Any] = dict(stored_min=stored_min, stored_max=stored_max)
    if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence):
        if bits_stored <= 16:
            grid = np.arange(stored_min, stored_max + 1, dtype=np.int32 if signed else np.uint32)
            out = np.asarray(apply_modality_lut(grid, ds), dtype=np.float64)
            lo, hi = float(out.min()), float(out.max())
        else:
            data = np.asarray(ds.ModalityLUTSequence[0].LUTData, dtype=np.float64)
            lo, hi = float(data.min()), float(data.max())
        info.update(kind="sequence", slope=None, intercept=None, lut_min=lo, lut_max=hi)
        return info
    has_rescale = "RescaleSlope" in ds or "RescaleIntercept" in ds
    slope = _float(ds.get("RescaleSlope"), 1.0)
    intercept = _float(ds.get("RescaleIntercept"), 0.0)
    if slope == 0 or not np.isfinite(slope) or not np.isfinite(intercept):
        raise PixelDataError("invalid Rescale Slope/Intercept (zero or not finite)")
    a, b = slope * stored_min + intercept, slope * stored_max + intercept
    info.update(kind="rescale" if has_rescale else "none", slope=slope, intercept=intercept,
                lut_min=min(a, b), lut_max=max(a, b))
    return info


def _resize(img: np.ndarray, out_rows: int, out_cols: int) -> np.ndarray:
    """``img`` as float32, area-averaged down to (out_rows, out_cols) (Pillow BOX filter in mode 'F')."""
    rows, cols = img.shape
    if (out_rows, out_cols) == (rows, cols):
        return img.astype(np.float32, copy=False)
    img = np.ascontiguousarray(img)
    if img.dtype == np.uint16:    # straight from the buffer: ~3x faster than astype + fromarray
        image = Image.frombuffer("I;16", (cols, rows), img, "raw", "I;16", 0, 1).convert("F")
    elif img.dtype == np.uint8:
        image = Image.frombuffer("L", (cols, rows), img, "raw", "L", 0, 1).convert("F")
    else:
        image = Image.fromarray(img.astype(np.float32, copy=False))  # float32 2-D -> mode "F"
    return np.asarray(image.resize((out_cols, out_rows), Image.Resampling.BOX), dtype=np.float32)


def _output_size(rows: int, cols: int, max_size: int) -> tuple[int, int, float]:
    long_side = max(rows, cols)
    if long_side <= max_size:
        return rows, cols, 1.0
    scale = max_size / long_side
    return max(1, round(rows * scale)), max(1, round(cols * scale)), scale


def normalize(ds: Dataset, frames: np.ndarray, config: NormalizeConfig = NormalizeConfig(),
              blanked: Sequence[Sequence[int]] = ()) -> list[NormalizedFrame]:
    """Map ``frames`` (from ``decode_frames(ds)``) to 16-bit MONOCHROME2-polarity images; see module doc.

    ``blanked``: the (x0, y0, x1, y1) boxes of ``frames`` cleaned of burned-in text (deid's convention, end
    exclusive), recorded in output pixels for ``model_view``.
    """
    if frames.ndim == 2:
        frames = frames[None]
    if frames.ndim != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must be (frames, rows, cols), got shape {frames.shape}")
    n_frames, rows, cols = frames.shape
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if photometric not in MONOCHROME:
        raise PixelDataError(f"non-monochrome photometric interpretation {photometric or 'absent'!r}")
    bits_allocated = int(ds.get("BitsAllocated", frames.dtype.itemsize * 8) or frames.dtype.itemsize * 8)
    bits_stored = int(ds.get("BitsStored", bits_allocated) or bits_allocated)
    pixel_representation = int(ds.get("PixelRepresentation", 0) or 0)
    lut = _modality_lut(ds, bits_stored, pixel_representation == 1)
    inverted = photometric == "MONOCHROME1"

    out_rows, out_cols, scale = _output_size(rows, cols, config.max_size)
    spacing_in, spacing_source = _pixel_spacing(ds)
    spacing_out = None
    if spacing_in is not None:
        spacing_out = [spacing_in[0] * rows / out_rows, spacing_in[1] * cols / out_cols]

    base_params: dict[str, Any] = {
        "normalize_version": NORMALIZE_VERSION,
        "modality": str(ds.get("Modality", "") or "") or None,
        "frames_in": int(n_frames),
        "original_rows": int(rows), "original_cols": int(cols),
        "rows": int(out_rows), "cols": int(out_cols), "scale": float(scale),
        "resample": "area" if scale < 1 else "none",
        "photometric_in": photometric, "inverted": inverted,
        "modality_lut": lut["kind"], "slope": lut["slope"], "intercept": lut["intercept"],
        "lut_min": lut["lut_min"], "lut_max": lut["lut_max"],
        "output_min": 0, "output_max": OUTPUT_MAX,
        "bits_allocated": bits_allocated, "bits_stored": bits_stored,
        "pixel_representation": pixel_representation,
        "pixel_intensity_relationship": (str(ds.get("PixelIntensityRelationship", "") or "").strip() or None),
        "pixel_intensity_relationship_sign": (int(ds.PixelIntensityRelationshipSign)
                                              if ds.get("PixelIntensityRelationshipSign") not in (None, "")
                                              else None),
        "pixel_spacing_source": spacing_source,
        "pixel_spacing_in": spacing_in, "pixel_spacing_out": spacing_out,
    }
    base_params["attenuation_bright"] = attenuation_bright(base_params)
    base_params["blanked"] = [_box_out(box, rows, cols, out_rows, out_cols) for box in blanked]

    indices = list(range(0, n_frames, config.frame_step))
    if config.max_frames is not None:
        indices = indices[: config.max_frames]

    results = []
    for index in indices:
        pixels = _normalize_frame(frames[index], lut, ds, inverted, out_rows, out_cols)
        results.append(NormalizedFrame(frame=index, pixels=pixels, params={**base_params, "frame": index}))
    return results


def _box_out(box: Sequence[int], rows: int, cols: int, out_rows: int, out_cols: int) -> list[int]:
    """A (x0, y0, x1, y1) box of the input in output pixels, rounded outwards and clipped to the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    sx, sy = out_cols / cols, out_rows / rows
    return [max(0, math.floor(x0 * sx)), max(0, math.floor(y0 * sy)),
            min(out_cols, math.ceil(x1 * sx)), min(out_rows, math.ceil(y1 * sy))]


def _normalize_frame(stored: np.ndarray, lut: dict, ds: Dataset, inverted: bool,
                     out_rows: int, out_cols: int) -> np.ndarray:
    if lut["kind"] == "sequence":
        # non-linear LUT: apply it at full resolution, then resize the modality values
        values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
        lo, hi = lut["lut_min"], lut["lut_max"]
        flip = inverted
        values = _resize(values, out_rows, out_cols)
    else:
        # affine LUT: normalize in the stored domain, so slope/intercept only decide the direction
        # (exactly the same output for any two rescales that display the same)
        lo, hi = float(lut["stored_min"]), float(lut["stored_max"])
        flip = inverted != (lut["slope"] < 0)
        values = _resize(stored, out_rows, out_cols)
    span = hi - lo
    if span <= 0:
        return np.zeros((out_rows, out_cols), np.uint16)
    gain = np.float32(OUTPUT_MAX / span)
    if flip:
        out = (np.float32(hi) - values) * gain
    else:
        out = (values - np.float32(lo)) * gain
    np.clip(out, 0, OUTPUT_MAX, out=out)
    np.rint(out, out=out)
    return out.astype(np.uint16)


# ------------------------------------------------------------------------------- the models' view

def attenuation_bright(params: dict[str, Any]) -> bool:
    """Whether an image normalized with ``params`` shows attenuation (bone, metal) bright: its modality's
    display habit, XA and RF dark, everything else bright (see the module doc for why not the header's sign)."""
    return str(params.get("modality") or "").upper() not in ATTENUATION_DARK_MODALITIES


def model_view(pixels: np.ndarray, params: dict[str, Any] | None) -> np.ndarray:
    """``pixels`` (uint16, as normalized with ``params``) in the models' polarity: attenuation bright, and the
    boxes cleaned of burned-in text (``params["blanked"]``) at 0, no attenuation.

    Inverted on the output range (``OUTPUT_MAX - pixels``) where the display shows attenuation dark;
    returned as is otherwise (also without params: nothing says it should change). A new array whenever
    anything changes; ``pixels`` is never written.
    """
    if not params:
        return pixels
    bright = params.get("attenuation_bright")
    if bright is None:                                  # normalized before the decision was recorded
        bright = attenuation_bright(params)
    boxes = params.get("blanked") or ()
    if bright and not boxes:
        return pixels
    if pixels.dtype != np.uint16:
        raise ValueError(f"expected normalized uint16 pixels, got {pixels.dtype}")
    view = pixels.copy() if bright else OUTPUT_MAX - pixels
    for x0, y0, x1, y1 in blanked_boxes(params, *pixels.shape):
        view[y0:y1, x0:x1] = 0
    return view


def blanked_boxes(params: dict[str, Any] | None, rows: int, cols: int) -> list[tuple[int, int, int, int]]:
    """The boxes cleaned of burned-in text (``params["blanked"]``, recorded in the normalized size's pixels) on a
    ``rows`` x ``cols`` grid of the same image: (x0, y0, x1, y1), ends exclusive, rounded outwards. Empty
    without params or boxes."""
    if not params or not params.get("blanked"):
        return []
    sy = rows / int(params.get("rows") or rows)
    sx = cols / int(params.get("cols") or cols)
    return [(max(0, math.floor(x0 * sx)), max(0, math.floor(y0 * sy)), min(cols, math.ceil(x1 * sx)),
             min(rows, math.ceil(y1 * sy))) for x0, y0, x1, y1 in params["blanked"]]


# An image's lowest view value counts as the detector's clipped air only where it is a plateau: at least this share
# of the pixels outside the cleaned boxes hold exactly that value (unclipped air is noisy: its minimum is a few
# pixels). On the evaluation corpus the fluoroscopy images' plateaus are a median 28-34 % of the image.
AIR_CLIP_SHARE = 0.005


def air_clipped(view: np.ndarray, params: dict[str, Any] | None) -> np.ndarray:
    """Where the image shows the detector's clipped air: a bool mask of ``view`` (an image in the models' view,
    ``model_view``), True at the pixels outside the cleaned boxes that hold the image's lowest value when those
    are at least ``AIR_CLIP_SHARE`` of them. Nothing there differs from air, so nothing there can be seen: metal
    in front of air that still saturates the detector (a thin wire beside the body under automatic gain) is
    invisible in the pixels. All False when there is no such plateau."""
    outside = np.ones(view.shape, dtype=bool)
    for x0, y0, x1, y1 in blanked_boxes(params, *view.shape):
        outside[y0:y1, x0:x1] = False
    if not outside.any():
        return np.zeros(view.shape, dtype=bool)
    plateau = (view == view[outside].min()) & outside
    if plateau.sum() < AIR_CLIP_SHARE * outside.sum():
        plateau[:] = False
    return plateau
