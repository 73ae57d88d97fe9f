"""Pixel decoding, normalization and WebDataset shards (tasks.ingest.normalize, tasks.ingest.shards)."""
from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import tarfile
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import MPEG2MPML, ExplicitVRLittleEndian, RLELossless

from tasks.ingest.burned_in import black_level
from tasks.ingest.normalize import (
    MAX_SIDE,
    OUTPUT_MAX,
    NormalizeConfig,
    PixelDataError,
    attenuation_bright,
    decode_frames,
    model_view,
    normalize,
)
from tasks.ingest.shards import (
    TAR_MTIME,
    ShardSink,
    decode_image,
    encode_image,
    iter_shard,
    remove_stale_temporaries,
)
from tasks.synth.devices import DEVICE_MODELS
from tasks.synth.study import PRESETS, generate_study

# webdataset 1.0.2 leaves the shard's file object for the garbage collector (upstream issues #311, #383)
pytestmark = pytest.mark.filterwarnings("ignore:unclosed file:ResourceWarning")

SEED, MAX_STUDIES = 0, 40
FAMILIES = {"implicit", "explicit", "jpeg2000", "jpegls", "rle"}   # transfer syntaxes wanted in the corpus


def _families(uids: set[str]) -> set[str]:
    names = {"1.2.840.10008.1.2": "implicit", "1.2.840.10008.1.2.1": "explicit", "1.2.840.10008.1.2.5": "rle",
             "1.2.840.10008.1.2.4.80": "jpegls", "1.2.840.10008.1.2.4.81": "jpegls",
             "1.2.840.10008.1.2.4.90": "jpeg2000", "1.2.840.10008.1.2.4.91": "jpeg2000"}
    return {names.get(u, u) for u in uids}
UID_LIKE = re.compile(r"\d+(\.\d+){3,}")


# ----------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    labels, phi = [], []
    models = {d.model for d in DEVICE_MODELS}
    for index in range(MAX_STUDIES):   # until every device model and transfer syntax has shown up
        rows, planted = generate_study(root, SEED, index, PRESETS["test"])
        labels += rows
        phi += planted
        if {r["model"] for r in labels} == models and _families({r["transfer_syntax_uid"] for r in labels}) == FAMILIES:
            break
    files = {}
    for row in labels:
        files.setdefault(row["path"], row)
    return root, files, phi


@pytest.fixture(scope="module")
def decoded(corpus):
    root, files, _ = corpus
    out = {}
    for path, row in files.items():
        ds = pydicom.dcmread(root / path)
        out[path] = (row, ds, decode_frames(ds))
    return out


def real(name: str) -> Dataset:
    return pydicom.dcmread(get_testdata_file(name))


def cat() -> Dataset:
    import deid_data
    return pydicom.dcmread(Path(deid_data.__file__).parent / "data" / "animals" / "cat.dcm")


def small_dataset(values: np.ndarray, bits_stored: int = 12, signed: bool = False,
                  photometric: str = "MONOCHROME2") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = values.astype("<u2" if not signed else "<i2").tobytes()
    return ds


def flipped_to_m2(ds: Dataset, frames: np.ndarray) -> tuple[Dataset, np.ndarray]:
    """The same picture stored the other way round: value -> max - value, MONOCHROME1 <-> 2."""
    other = copy.deepcopy(ds)
    top = (1 << int(ds.BitsStored)) - 1
    other.PhotometricInterpretation = "MONOCHROME2" if ds.PhotometricInterpretation == "MONOCHROME1" else "MONOCHROME1"
    return other, (top - frames.astype(np.int32)).astype(frames.dtype)


# ------------------------------------------------------------------------------------- normalization

def test_corpus_covers_every_device_model(decoded):
    models = {row["model"] for row, _, _ in decoded.values()}
    assert models == {d.model for d in DEVICE_MODELS}
    assert _families({row["transfer_syntax_uid"] for row, _, _ in decoded.values()}) == FAMILIES
    assert {row["photometric"] for row, _, _ in decoded.values()} == {"MONOCHROME1", "MONOCHROME2"}


def test_decode_matches_labels(decoded):
    for row, ds, frames in decoded.values():
        assert frames.shape == (row["frames"], row["rows"], row["cols"])
        assert frames.max() <= (1 << row["bits_stored"]) - 1


def test_normalize_every_device(decoded, corpus):
    _, _, phi = corpus
    phi_values = {str(p["value"]) for p in phi if len(str(p["value"])) >= 5}
    config = NormalizeConfig(max_size=96)
    for row, ds, frames in decoded.values():
        out = normalize(ds, frames, config)
        assert [f.frame for f in out] == list(range(row["frames"]))
        for item in out:
            px = item.pixels
            assert px.dtype == np.uint16 and px.ndim == 2
            r, c = row["rows"], row["cols"]
            assert max(px.shape) == min(96, max(r, c))
            assert abs(px.shape[0] / px.shape[1] - r / c) <= 1.0 / min(px.shape) + 1e-9  # aspect kept
            assert int(px.max()) > 30000 and len(np.unique(px)) > 256, row["model"]  # 16-bit range used
            text = json.dumps(item.params, allow_nan=False)
            assert json.loads(text) == item.params
            assert item.params["frame"] == item.frame
            assert item.params["original_rows"] == r and item.params["rows"] == px.shape[0]
            assert item.params["inverted"] == (row["photometric"] == "MONOCHROME1")
            assert not UID_LIKE.search(text)
            assert not any(v in text for v in phi_values), row["model"]
            spacing = item.params["pixel_spacing_in"]
            assert spacing is not None and spacing[0] == pytest.approx(row["pixel_spacing_mm"], rel=1e-3)
            assert item.params["pixel_spacing_out"][0] == pytest.approx(spacing[0] * r / px.shape[0])


def test_never_upscaled_and_frame_selection(decoded):
    multi = [(row, ds, fr) for row, ds, fr in decoded.values() if row["frames"] >= 3]
    assert multi
    row, ds, frames = multi[0]
    out = normalize(ds, frames, NormalizeConfig(max_size=4096))
    assert all(f.pixels.shape == frames.shape[1:] and f.params["scale"] == 1.0 for f in out)
    out = normalize(ds, frames, NormalizeConfig(max_size=4096, frame_step=2, max_frames=1))
    assert [f.frame for f in out] == [0]
    out = normalize(ds, frames, NormalizeConfig(max_size=4096, frame_step=2))
    assert [f.frame for f in out] == list(range(0, row["frames"], 2))
    np.testing.assert_array_equal(out[-1].pixels, normalize(ds, frames[out[-1].frame:out[-1].frame + 1])[0].pixels)


def test_monochrome1_is_inverted_real_chest():
    ds = real("RG1_UNCR.dcm")              # CR chest PA, MONOCHROME1, 15 bits stored
    frames = decode_frames(ds)
    config = NormalizeConfig(max_size=256)
    m1 = normalize(ds, frames, config)[0]
    m2_ds, m2_frames = flipped_to_m2(ds, frames)
    m2 = normalize(m2_ds, m2_frames, config)[0]
    # same picture on screen, same output (to float rounding: the flip is applied after the resize)
    assert np.abs(m1.pixels.astype(int) - m2.pixels.astype(int)).max() <= 1
    assert m1.params["inverted"] and not m2.params["inverted"]
    h, w = m1.pixels.shape
    for px in (m1.pixels, m2.pixels):
        mediastinum = px[int(0.55 * h):int(0.70 * h), int(0.45 * w):int(0.55 * w)].mean()
        lung = px[int(0.30 * h):int(0.45 * h), int(0.20 * w):int(0.30 * w)].mean()
        assert mediastinum > lung + 5000     # bone/soft tissue bright, aerated lung dark
    # and the stored ordering really is the other way round in the MONOCHROME1 file
    assert frames[0, 1100:1350, 850:1000].mean() < frames[0, 600:850, 380:560].mean()


def test_the_models_view_is_attenuation_bright_on_every_device(decoded):
    """Fluoroscopy displays attenuation dark, radiography bright: normalize records which, per image, and
    model_view inverts the former, exactly on the output range; the decision survives the shard's JSON."""
    seen = set()
    for row, ds, frames in decoded.values():
        item = normalize(ds, frames[:1], NormalizeConfig(max_size=64))[0]
        fluoroscopy = row["modality"] in ("XA", "RF")
        seen.add(fluoroscopy)
        assert item.params["attenuation_bright"] is (not fluoroscopy), row["model"]
        view = model_view(item.pixels, json.loads(json.dumps(item.params)))
        expected = OUTPUT_MAX - item.pixels if fluoroscopy else item.pixels
        assert view.dtype == np.uint16 and np.array_equal(view, expected), row["model"]
        legacy = {k: v for k, v in item.params.items() if k != "attenuation_bright"}   # ingested before
        assert np.array_equal(model_view(item.pixels, legacy), expected)
    assert seen == {True, False}
    assert np.array_equal(model_view(np.arange(4, dtype=np.uint16), None), np.arange(4))   # nothing recorded


def test_cleaned_text_reads_as_air_in_the_models_view(decoded):
    """Ingestion blanks burned-in text with the display's black, which the models' view of fluoroscopy would
    turn white, the tone of metal: normalize records the boxes (in output pixels, rounded outwards over the
    pixels the resize mixed with the fill) and model_view puts them at 0 on every device."""
    seen = set()
    for row, ds, frames in decoded.values():
        frames = frames[:1].copy()
        rows, cols = frames.shape[1:]
        box = (cols // 10 + 1, rows // 10 + 3, cols // 3 + 2, rows // 4 + 1)     # x0, y0, x1, y1; end exclusive
        frames[:, box[1]:box[3], box[0]:box[2]] = black_level(ds)               # as ingestion cleans
        item = normalize(ds, frames, NormalizeConfig(max_size=64), blanked=[box])[0]
        params = json.loads(json.dumps(item.params))                             # as the shard's JSON holds it
        x0, y0, x1, y1 = params["blanked"][0]
        h, w = item.pixels.shape
        sx, sy = w / cols, h / rows
        outwards = [math.floor(box[0] * sx), math.floor(box[1] * sy), math.ceil(box[2] * sx), math.ceil(box[3] * sy)]
        assert [x0, y0, x1, y1] == outwards, row["model"]                       # every pixel the fill reached
        before = item.pixels.copy()
        view = model_view(item.pixels, params)
        assert np.array_equal(item.pixels, before)                               # never written
        assert (view[y0:y1, x0:x1] == 0).all(), row["model"]
        outside = np.ones_like(view, dtype=bool)
        outside[y0:y1, x0:x1] = False
        fluoroscopy = not params["attenuation_bright"]
        seen.add(fluoroscopy)
        expected = OUTPUT_MAX - item.pixels if fluoroscopy else item.pixels
        assert np.array_equal(view[outside], expected[outside]), row["model"]
        unrecorded = model_view(item.pixels, {k: v for k, v in params.items() if k != "blanked"})
        inner = unrecorded[y0 + 1:y1 - 1, x0 + 1:x1 - 1]
        assert (inner.min() > 60000) if fluoroscopy else (inner.max() < 5000), row["model"]   # white as metal
    assert seen == {True, False}


def test_real_radiographs_are_attenuation_bright_whatever_their_header_sign():
    """The real radiographs show bone bright as displayed and need no inversion; deid-data's DX cat thorax
    declares Pixel Intensity Relationship LIN, sign +1 (stored values grow with the beam: air would show
    white), yet its pixels show air black and bone white. The header's sign is not what decides."""
    for ds in (real("RG1_UNCR.dcm"), real("RG3_UNCR.dcm"), cat()):
        item = normalize(ds, decode_frames(ds), NormalizeConfig(max_size=256))[0]
        assert item.params["attenuation_bright"] and model_view(item.pixels, item.params) is item.pixels
    cat_ds = cat()
    item = normalize(cat_ds, decode_frames(cat_ds), NormalizeConfig(max_size=256))[0]
    assert (item.params["pixel_intensity_relationship"], item.params["pixel_intensity_relationship_sign"]) == ("LIN", 1)
    h, w = item.pixels.shape
    air = item.pixels[int(0.84 * h):int(0.90 * h), int(0.60 * w):int(0.90 * w)].mean()   # below the belly
    spine = item.pixels[int(0.30 * h):int(0.36 * h), int(0.40 * w):int(0.50 * w)].mean()
    assert spine > air + 20000
    assert attenuation_bright({"modality": "RF"}) is False and attenuation_bright({}) is True


def test_monochrome1_vs_2_synthetic(decoded):
    for row, ds, frames in decoded.values():
        other_ds, other = flipped_to_m2(ds, frames)
        a = normalize(ds, frames[:1], NormalizeConfig(max_size=64))[0].pixels
        b = normalize(other_ds, other[:1], NormalizeConfig(max_size=64))[0].pixels
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1, row["model"]


def test_rescale_that_displays_the_same_gives_the_same_output(decoded):
    cr = [(row, ds, fr) for row, ds, fr in decoded.values() if row["modality"] == "CR"]
    assert cr
    row, ds, frames = cr[0]
    assert float(ds.RescaleSlope) == 0.5 and float(ds.RescaleIntercept) == -1024
    base = normalize(ds, frames)[0]
    other = copy.deepcopy(ds)
    other.RescaleSlope, other.RescaleIntercept = "3", "250"
    np.testing.assert_array_equal(base.pixels, normalize(other, frames)[0].pixels)
    assert base.params["lut_min"] == -1024 and base.params["lut_max"] == 0.5 * 4095 - 1024
    # negative slope on flipped stored values: the same modality values, so the same image
    top = (1 << int(ds.BitsStored)) - 1
    neg = copy.deepcopy(ds)
    neg.RescaleSlope, neg.RescaleIntercept = "-0.5", str(-1024 + 0.5 * top)
    flipped = (top - frames.astype(np.int32)).astype(np.uint16)
    np.testing.assert_array_equal(base.pixels, normalize(neg, flipped)[0].pixels)
    # a Modality LUT Sequence equal to the rescale gives the same picture (to rounding)
    lut = copy.deepcopy(ds)
    del lut.RescaleSlope, lut.RescaleIntercept
    item = Dataset()
    item.LUTDescriptor = [top + 1, 0, 16]
    item.ModalityLUTType = "US"
    item.LUTData = [int(v) for v in np.arange(top + 1) * 2 + 100]
    lut.ModalityLUTSequence = [item]
    via_lut = normalize(lut, frames)[0]
    assert via_lut.params["modality_lut"] == "sequence"
    assert np.abs(via_lut.pixels.astype(int) - base.pixels.astype(int)).max() <= 1


def test_real_radiographs_all_syntaxes():
    for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG3_UNCR.dcm", "RG3_J2KR.dcm"):
        ds = real(name)
        frames = decode_frames(ds)
        out = normalize(ds, frames)[0]
        assert max(out.pixels.shape) == 1024
        assert out.params["original_rows"] == ds.Rows and out.params["bits_stored"] == ds.BitsStored
        assert out.params["pixel_spacing_in"] is None    # RG1 declares Pixel Spacing 0.000: not a spacing
        json.dumps(out.params, allow_nan=False)
    lossless = decode_frames(real("RG1_J2KR.dcm"))
    np.testing.assert_array_equal(lossless, decode_frames(real("RG1_UNCR.dcm")))
    ds = cat()                                             # DX 2614 x 3072, 12 bits, MONOCHROME2
    out = normalize(ds, decode_frames(ds), NormalizeConfig(max_size=512))[0]
    assert out.pixels.shape == (round(2614 * 512 / 3072), 512)
    assert out.params["pixel_spacing_in"] == [0.14, 0.14] and out.params["pixel_intensity_relationship"] == "LIN"
    assert out.params["pixel_spacing_out"][1] == pytest.approx(0.14 * 3072 / 512)


# ---------------------------------------------------------------------------------------- bad data

def expect_error(ds: Dataset, *fragments: str) -> str:
    with pytest.raises(PixelDataError) as info:
        decode_frames(ds)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_pixel_data_errors(decoded):
    native = next(ds for row, ds, _ in decoded.values()
                  if row["transfer_syntax_uid"] == ExplicitVRLittleEndian)

    truncated = copy.deepcopy(native)
    truncated.PixelData = truncated.PixelData[: len(truncated.PixelData) // 2]
    expect_error(truncated, "declared size larger than the data present")

    missing = copy.deepcopy(native)
    del missing.PixelData
    message = expect_error(missing, "no pixel data")
    assert str(native.PatientName) not in message

    j2k = real("RG3_J2KR.dcm")
    frame = next(generate_frames(j2k.PixelData, number_of_frames=1))
    for bad in (frame[:300], frame[:2] + bytes(range(256)) * 8):
        corrupt = copy.deepcopy(j2k)
        corrupt.PixelData = encapsulate([bad])
        expect_error(corrupt, "corrupt or undecodable", "JPEG 2000", "1.2.840.10008.1.2.4.90")

    # RLE through pylibjpeg-rle, whose Rust decoder panics on some corrupt streams (a pyo3 PanicException,
    # a BaseException, not an Exception): truncated segments, garbage after the header, all 0xFF
    values = np.arange(256, dtype=np.uint16).reshape(16, 16) * 16
    rle = small_dataset(values, bits_stored=16)
    rle.compress(RLELossless, values)
    frame = next(generate_frames(rle.PixelData, number_of_frames=1))
    for bad in (frame[:40], frame[:64] + bytes(range(256)), b"\xff" * 64):
        corrupt = copy.deepcopy(rle)
        corrupt.PixelData = encapsulate([bad])
        expect_error(corrupt, "corrupt or undecodable", "RLE Lossless", "1.2.840.10008.1.2.5")

    unknown = copy.deepcopy(native)
    unknown.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7.8"
    expect_error(unknown, "unsupported transfer syntax", "unknown UID")
    no_decoder = copy.deepcopy(j2k)
    no_decoder.file_meta.TransferSyntaxUID = MPEG2MPML
    expect_error(no_decoder, "unsupported transfer syntax", "MPEG2")

    for rows in (4, MAX_SIDE + 1):
        absurd = copy.deepcopy(native)
        absurd.Rows = rows
        expect_error(absurd, "absurd dimensions")
    frames = copy.deepcopy(native)
    frames.NumberOfFrames = 100000
    expect_error(frames, "absurd number of frames")

    color = copy.deepcopy(native)
    color.PhotometricInterpretation = "RGB"
    expect_error(color, "non-monochrome")


def test_high_bit_overlays_masked():
    values = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 16)          # 0..4080, 12 bits
    dirty = values.copy()
    dirty[:4] |= 0xF000                                                      # an overlay in bits 12-15
    np.testing.assert_array_equal(decode_frames(small_dataset(dirty))[0], values)
    # also through a compressed stream whose decoder returns all 16 bits
    ds = small_dataset(dirty, bits_stored=16)
    ds.compress(RLELossless, dirty)
    ds.BitsStored, ds.HighBit = 12, 11
    np.testing.assert_array_equal(decode_frames(ds)[0], values)
    out = normalize(ds, decode_frames(ds), NormalizeConfig(max_size=16))[0].pixels
    assert out.max() == round(4080 * OUTPUT_MAX / 4095)
    # signed: 12-bit two's complement with junk above bit 11
    signed = np.arange(-128, 128, dtype=np.int16).reshape(16, 16) * 16          # -2048..2032
    junk = (signed.view(np.uint16) & 0x0FFF) | 0xA000
    got = decode_frames(small_dataset(junk, signed=True))[0]
    np.testing.assert_array_equal(got, signed)
    out = normalize(small_dataset(junk, signed=True), got[None], NormalizeConfig(max_size=16))[0]
    assert out.params["lut_min"] == -2048 and out.pixels[0, 0] == 0


# ------------------------------------------------------------------------------------------- shards

def sample_images(n: int = 5, seed: int = 0) -> list[tuple[str, np.ndarray, dict]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        shape = (int(rng.integers(20, 70)), int(rng.integers(20, 70)))
        px = rng.integers(0, 65536, size=shape, dtype=np.uint16)
        px[0, 0], px[-1, -1] = 0, 65535
        out.append((f"study_{i:03d}-f{i}", px, {"frame": i, "params": {"scale": 0.5, "rows": shape[0]},
                                                "note": "välue ünicode", "spacing": [0.1, 0.2]}))
    return out


@pytest.mark.parametrize("image_format", ["png", "npy"])
def test_shard_round_trip(tmp_path, image_format):
    samples = sample_images()
    with ShardSink(tmp_path, "train", image_format=image_format) as sink:
        for key, px, meta in samples:
            sink.write(key, px, meta)
    infos = sink.close()
    assert [i.name for i in infos] == ["train-0000.tar"] and infos[0].samples == 5
    path = tmp_path / infos[0].name
    data = path.read_bytes()
    assert infos[0].sha256 == hashlib.sha256(data).hexdigest() and infos[0].bytes == len(data)
    with tarfile.open(path) as tar:
        names = tar.getnames()
        members = tar.getmembers()
    assert names[:2] == [f"{samples[0][0]}.json", f"{samples[0][0]}.{image_format}"]
    assert all(m.mtime == TAR_MTIME and m.uid == 0 and m.uname == "dax" for m in members)
    read = list(iter_shard(path))
    assert [k for k, _, _ in read] == [k for k, _, _ in samples]
    for (_, px, meta), (_, got, got_meta) in zip(samples, read):
        assert got.dtype == np.uint16
        np.testing.assert_array_equal(got, px)
        assert got_meta == meta
    assert not list(tmp_path.glob(".*.tmp"))


def test_png_is_16_bit_and_exact():
    px = np.array([[0, 1, 255, 256], [4095, 32768, 65534, 65535]] * 4, dtype=np.uint16)
    blob = encode_image(px, "png")
    assert blob[24] == 16 and blob[25] == 0            # IHDR: bit depth 16, colour type grayscale
    np.testing.assert_array_equal(decode_image("x.png", blob), px)
    np.testing.assert_array_equal(decode_image(".npy", encode_image(px, "npy")), px)
    with pytest.raises(ValueError):
        encode_image(px.astype(np.int32), "png")


def test_shards_are_byte_identical(tmp_path):
    for fmt in ("png", "npy"):
        digests = []
        for run in ("a", "b"):
            with ShardSink(tmp_path / f"{fmt}{run}", "s", target_bytes=30_000, image_format=fmt) as sink:
                for key, px, meta in sample_images(6):
                    sink.write(key, px, meta)
            infos = sink.close()
            digests.append([(i.name, i.sha256) for i in infos])
            if run == "a":
                time.sleep(1.1)   # a later second would show in an unpinned mtime
        assert digests[0] == digests[1]
        for name, _ in digests[0]:
            assert (tmp_path / f"{fmt}a" / name).read_bytes() == (tmp_path / f"{fmt}b" / name).read_bytes()


def test_rollover(tmp_path):
    samples = sample_images(7, seed=3)
    target = 12_000
    with ShardSink(tmp_path, "roll", target_bytes=target, image_format="npy") as sink:
        for key, px, meta in samples:
            sink.write(key, px, meta)
    infos = sink.close()
    assert len(infos) >= 2
    assert [i.name for i in infos] == [f"roll-{n:04d}.tar" for n in range(len(infos))]
    assert sum(i.samples for i in infos) == 7
    keys = []
    for info in infos:
        shard = list(iter_shard(tmp_path / info.name))
        assert len(shard) == info.samples
        keys += [k for k, _, _ in shard]
        with tarfile.open(tmp_path / info.name) as tar:
            payload = sum(m.size for m in tar.getmembers())
        if info is not infos[-1]:
            assert payload >= target
    assert keys == [k for k, _, _ in samples]
    with ShardSink(tmp_path / "count", "c", image_format="npy", max_samples=3) as sink:
        for key, px, meta in samples:
            sink.write(key, px, meta)
    assert [i.samples for i in sink.close()] == [3, 3, 1]
    assert sorted(p.name for p in (tmp_path / "count").iterdir()) == ["c-0000.tar", "c-0001.tar", "c-0002.tar"]


def test_no_temporaries_and_failure_cleanup(tmp_path):
    with ShardSink(tmp_path / "empty", "e") as sink:
        pass
    assert sink.close() == [] and list((tmp_path / "empty").iterdir()) == []

    samples = sample_images(5)
    with pytest.raises(RuntimeError):
        with ShardSink(tmp_path / "crash", "c", image_format="npy", max_samples=2) as sink:
            for key, px, meta in samples:
                sink.write(key, px, meta)
            raise RuntimeError("boom")
    left = sorted(p.name for p in (tmp_path / "crash").iterdir())
    assert left == ["c-0000.tar", "c-0001.tar"]          # finished shards kept, the partial one gone
    assert [i.samples for i in sink.finished] == [2, 2]
    assert len(list(iter_shard(tmp_path / "crash" / "c-0001.tar"))) == 2

    (tmp_path / "crash" / ".c-0002.tar.tmp").write_bytes(b"partial")
    (tmp_path / "crash" / ".other.tar.tmp").write_bytes(b"partial")
    (tmp_path / "crash" / "keep.tmp").write_bytes(b"not ours")
    assert remove_stale_temporaries(tmp_path / "crash") == 2
    assert sorted(p.name for p in (tmp_path / "crash").iterdir()) == ["c-0000.tar", "c-0001.tar", "keep.tmp"]


def test_invalid_keys_rejected(tmp_path):
    px = np.zeros((8, 8), np.uint16)
    with ShardSink(tmp_path, "k") as sink:
        for key in ("1.2.840.10008.5.1", "a.b", "", "a/b", "a b", "sch\u00e4del", "x.png"):
            with pytest.raises(ValueError):
                sink.write(key, px, {})
        sink.write("ok_key-1", px, {})
        with pytest.raises(ValueError):
            sink.write("ok_key-1", px, {})               # duplicate
        with pytest.raises(ValueError):
            sink.write("float", px.astype(np.float32), {})
    assert [i.samples for i in sink.close()] == [1]
    with pytest.raises(ValueError):
        ShardSink(tmp_path, "bad.prefix")
