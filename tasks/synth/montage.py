"""A montage of a corpus: one image per body region with its ground truth, beside real radiographs.

Each tile is shown as a viewer would show it (modality LUT, the file's window or a percentile window,
MONOCHROME1 inverted), with the metal mask outlined and every screw's head (o) and tip (x) marked.
The real radiographs that `pydicom-data` (CR chest, CR tibia) and `deid-data` (DX cat thorax) ship
are drawn in the last row for comparing contrast, noise and dynamic range.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pydicom  # noqa: E402
from pydicom.pixels import apply_modality_lut, apply_voi_lut  # noqa: E402

from tasks.label_schema import (
    BODY_REGIONS,  # noqa: E402
    png_to_mask,  # noqa: E402
)
from tasks.synth.corpus import DICOM_DIR  # noqa: E402


def display_frame(ds: pydicom.Dataset, frame: int = 0) -> np.ndarray:
    """The frame as a viewer shows it, scaled to [0, 1] with white = bright on screen."""
    pixels = ds.pixel_array
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[frame]
    values = apply_modality_lut(pixels, ds).astype(np.float64)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        values = apply_voi_lut(values, ds).astype(np.float64)
    lo, hi = np.percentile(values, [0.5, 99.5])
    shown = np.clip((values - lo) / max(hi - lo, 1e-9), 0.0, 1.0)
    return 1.0 - shown if ds.PhotometricInterpretation == "MONOCHROME1" else shown


def image_statistics(ds: pydicom.Dataset, frame: int = 0) -> dict:
    """Dynamic range used (fraction of the stored bit range) and a relative noise estimate."""
    pixels = ds.pixel_array
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[frame]
    pixels = pixels.astype(np.float64)
    p1, p99 = np.percentile(pixels, [1, 99])
    # noise: robust spread of horizontal neighbour differences in the central quarter of the image
    # (away from collimation, saturated air and text), relative to the used range
    rows, cols = pixels.shape
    diff = np.diff(pixels[rows // 4: 3 * rows // 4, cols // 4: 3 * cols // 4], axis=1)
    noise = 1.4826 * np.median(np.abs(diff - np.median(diff))) / np.sqrt(2)
    return {"bits": int(ds.BitsStored), "range": (p99 - p1) / 2 ** int(ds.BitsStored),
            "noise": noise / max(p99 - p1, 1e-9)}


def real_radiographs() -> list[tuple[str, Path]]:
    """The real radiographs shipped by pydicom-data and deid-data, where those are installed."""
    found = []
    for package, relative, title in (
        ("data_store", "data/RG1_UNCR.dcm", "real CR chest (pydicom-data)"),
        ("data_store", "data/RG3_UNCR.dcm", "real CR tibia (pydicom-data)"),
        ("deid_data", "data/animals/cat.dcm", "real DX cat thorax (deid-data)"),
    ):
        spec = importlib.util.find_spec(package)
        if spec and spec.submodule_search_locations:
            path = Path(list(spec.submodule_search_locations)[0]) / relative
            if path.exists():
                found.append((title, path))
    return found


def pick_examples(labels_path: Path) -> list[dict]:
    """One image per body region: an AP view, the widest, preferring one that shows some metal
    without being covered by it."""
    table = pq.read_table(labels_path, columns=["path", "frame", "region", "modality", "manufacturer", "model",
                                                "series_kind", "metal_mask_png", "screws", "metal_pixels",
                                                "rows", "cols", "sid_mm", "sod_mm", "primary_deg", "secondary_deg"])
    picks = []
    for region in BODY_REGIONS:
        rows = table.filter(pc.equal(table["region"], region)).to_pylist()
        if not rows:
            continue

        def preference(row):
            metal = row["metal_pixels"] / (row["rows"] * row["cols"])
            off_ap = min(abs(row["primary_deg"]) % 180, 180 - abs(row["primary_deg"]) % 180) + abs(row["secondary_deg"])
            return (off_ap > 10, not 0.0 < metal < 0.04, row["sid_mm"] / row["sod_mm"], row["path"], row["frame"])

        picks.append(min(rows, key=preference))
    return picks


def make_montage(corpus: Path, out_png: Path, include_real: bool = True) -> Path:
    corpus = Path(corpus)
    picks = pick_examples(corpus / "labels.parquet")
    real = real_radiographs() if include_real else []
    columns = 4
    n_rows = -(-len(picks) // columns) + (1 if real else 0)
    fig, axes = plt.subplots(n_rows, columns, figsize=(4 * columns, 4.3 * n_rows), facecolor="black")
    axes = np.atleast_2d(axes)
    for ax in axes.flat:
        ax.axis("off")

    for ax, row in zip(axes.flat, picks):
        ds = pydicom.dcmread(corpus / DICOM_DIR / row["path"])
        ax.imshow(display_frame(ds, row["frame"]), cmap="gray", vmin=0, vmax=1)
        mask = png_to_mask(row["metal_mask_png"])
        if mask.any():
            ax.contour(mask, levels=[0.5], colors="#ff4040", linewidths=0.6)
        for screw in row["screws"]:
            if screw["visible"]:
                ax.plot([screw["head_x"], screw["tip_x"]], [screw["head_y"], screw["tip_y"]], color="#40ff40", lw=0.6)
                ax.plot(screw["head_x"], screw["head_y"], "o", mfc="none", mec="#40ff40", ms=5)
                ax.plot(screw["tip_x"], screw["tip_y"], "x", color="#ffd040", ms=5)
        stats = image_statistics(ds, row["frame"])
        ax.set_title(f"{row['region']}\n{row['modality']} {row['series_kind']} · {row['manufacturer']} {row['model']}\n"
                     f"{stats['bits']}-bit, range {stats['range']:.0%}, noise {stats['noise']:.1%}",
                     color="white", fontsize=8)

    for ax, (title, path) in zip(axes[-1] if real else [], real):
        ds = pydicom.dcmread(path)
        ax.imshow(display_frame(ds), cmap="gray", vmin=0, vmax=1)
        stats = image_statistics(ds)
        ax.set_title(f"{title}\n{ds.Modality} · {ds.PhotometricInterpretation}\n"
                     f"{stats['bits']}-bit, range {stats['range']:.0%}, noise {stats['noise']:.1%}",
                     color="#a0c0ff", fontsize=8)

    fig.suptitle("DAX synthetic C-arm corpus: one image per body region (metal outlined red, screw head o / tip x); "
                 "last row: real radiographs", color="white", fontsize=10, y=0.995)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110, facecolor="black")
    plt.close(fig)
    return out_png
