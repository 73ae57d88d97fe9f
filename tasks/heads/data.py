"""Labelled evaluation data for the frozen-backbone heads, at one evaluation size ``S``.

Every image goes through ``XrayEvalTransform(size=S)``: the stored image (already resized from the
native detector grid at ingestion) is resized so its long side is ``S``, centred and zero-padded to a
square (the letterbox). Masks and screws follow the same geometry, so a pixel of the input square maps
back to the NATIVE detector grid (the DICOM's Rows x Columns, where the labels live and the metrics
are reported) by one affine map per axis (``Letterbox``):

    input = native * scale + offset,   scale = new_side / native_side,   offset = letterbox padding

(the stored resize and the letterbox resize compose: stored = native * rows / orig_rows, input = stored
* new_h / rows + top; ``rows`` cancels). Coordinates are continuous pixel coordinates with pixel edges
at integers (x = column, y = row), as ``letterbox_geometry`` and the generator's screws use them.

What the image shows is the truth. Two things leave metal in no image a model sees: ingestion blanks burned-in
text, and the models' view reads those boxes as air (``tasks.ingest.normalize.model_view``); and metal in front of
air that still saturates the detector holds the clipped air's value, like the air around it
(``tasks.ingest.normalize.air_clipped``). On the evaluation corpus the boxes hide 2.1 % of the native metal
pixels and 3.1 % of the screws, the clipped air 1.8 % and 6.4 % (more than a tenth of the metal on 63 of 628
images, all RF and XA); docs/experiments.md, sections 33-34. The heads' truth leaves both out (``unseen_pixels``):
the metal masks have no metal there (``shown_mask``) and a screw with its head or tip there is not counted
(``shown_screws``), for training targets, floors and metrics alike. The label file is never changed.

``load_head_dataset`` reads the labels (``tasks.ingest.labels.load_labels``), then the images shard by shard
into preallocated tensors: memory is N x S x S x (2 bytes image + 1 byte mask), known in advance and
refused above ``max_bytes``; nothing else of size N x S x S is ever held.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dax_models.augment import Letterbox, XrayEvalTransform, mask_to_input
from tasks.ingest.labels import load_labels
from tasks.label_schema import BODY_REGIONS
from tasks.pretrain.data import read_samples

__all__ = ["HeadDataError", "HeadDataset", "load_head_dataset", "screw_rows", "shown_mask", "shown_screws",
           "unseen_pixels"]

DEFAULT_MAX_BYTES = 8 << 30


class HeadDataError(ValueError):
    """Labelled images a head cannot be trained and tested on (too few patients for the splits)."""


@dataclass
class HeadDataset:
    """Labelled images at one evaluation size; rows in ``keys`` order.

    - ``images`` (N, 1, S, S) float16 in [0, 1] (``XrayEvalTransform``);
    - ``regions`` (N,) int64 class ids (index into ``BODY_REGIONS``; -1 if unknown);
    - ``masks`` (N, S, S) bool metal masks in the letterbox, as the image shows them (None when not loaded);
    - ``screws``: per image a (K, 4) float64 array [head_x, head_y, tip_x, tip_y] in INPUT pixels
      (visible screws only: both points inside the exposed field and where the image shows them, ``unseen_pixels``);
    - ``native_screws``: the same screws in NATIVE pixels (the metrics' reference: the labels' own coordinates);
    - ``boxes``: per image the ``Letterbox`` (input <-> native);
    - ``mask_pngs``: per image the NATIVE metal mask as the image shows it (``shown_mask``), PNG bytes (the label
      file's own where nothing is unseen; None: no mask), decoded only where metrics are computed at native
      resolution (``native_mask``);
    - ``splits``: 'train' / 'val' / 'test' (by patient, ``tasks.ingest.labels.patient_split``).
    """

    size: int
    keys: list[str]
    images: torch.Tensor
    regions: torch.Tensor
    masks: torch.Tensor | None
    screws: list[np.ndarray]
    native_screws: list[np.ndarray]
    boxes: list[Letterbox]
    splits: np.ndarray
    patient_keys: list[str]
    mask_pngs: list[bytes | None] = field(default_factory=list)
    classes: tuple[str, ...] = field(default=tuple(BODY_REGIONS))

    def __len__(self) -> int:
        return len(self.keys)

    def native_mask(self, i: int) -> np.ndarray:
        """The NATIVE (h, w) bool metal mask of image ``i`` as the image shows it (``shown_mask``; all False when
        it has none)."""
        from tasks.label_schema import png_to_mask
        raw = self.mask_pngs[i] if self.mask_pngs else None
        if not raw:
            return np.zeros((self.boxes[i].native_h, self.boxes[i].native_w), dtype=bool)
        return png_to_mask(raw)

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)

    def check_splits(self, task: str) -> None:
        """``HeadDataError`` unless ``task`` has training and test images (patients split by ``patient_split``)."""
        train, test = len(self.indices("train")), len(self.indices("test"))
        if not train or not test:
            raise HeadDataError(f"the {task} task needs training and test images (got {train} and {test} of "
                                f"{len(set(self.patient_keys))} patients): label more patients")

    @property
    def digest(self) -> str:
        """Identity of the data (keys, size, geometry and the input images themselves, so a change of the view,
        such as its polarity, is never served features of the old one): part of the feature cache's key."""
        h = hashlib.sha256(f"dax-head-data:v2:{self.size}\n".encode())
        for key, box in zip(self.keys, self.boxes):
            h.update(f"{key}:{box.as_row()}\n".encode())
        h.update(self.images.contiguous().numpy().data)      # about 1 s per GB, no copy
        return h.hexdigest()

    def summary(self) -> dict:
        counts = {s: int((self.splits == s).sum()) for s in ("train", "val", "test")}
        return {"images": len(self), "size": self.size, "patients": len(set(self.patient_keys)),
                "screws": int(sum(len(s) for s in self.screws)),
                "with_metal": int(self.masks.flatten(1).any(1).sum()) if self.masks is not None else None,
                **{f"{k}_images": v for k, v in counts.items()}}


def unseen_pixels(view: np.ndarray, params: dict | None, rows: int, cols: int) -> np.ndarray:
    """The (``rows``, ``cols``) NATIVE bool mask of what image ``view`` (the models' view, stored grid) cannot show:
    the boxes cleaned of burned-in text (``blanked_boxes``, rounded outwards) and the air-clipped pixels
    (``air_clipped``, each native pixel taking the stored pixel it falls in)."""
    from tasks.ingest.normalize import air_clipped, blanked_boxes

    unseen = np.zeros((rows, cols), dtype=bool)
    for x0, y0, x1, y1 in blanked_boxes(params, rows, cols):
        unseen[y0:y1, x0:x1] = True
    clipped = air_clipped(view, params)
    if clipped.any():
        unseen |= clipped[np.ix_(np.arange(rows) * view.shape[0] // rows, np.arange(cols) * view.shape[1] // cols)]
    return unseen


def shown_mask(mask: np.ndarray, unseen: np.ndarray) -> np.ndarray:
    """``mask`` without the pixels ``unseen`` (a bool mask of the same grid): a new array when any metal is unseen,
    ``mask`` itself otherwise."""
    if not (mask & unseen).any():
        return mask
    return mask & ~unseen


def shown_screws(screws: np.ndarray, unseen: np.ndarray) -> np.ndarray:
    """(K, 4) [hx, hy, tx, ty] screws without those whose head or tip lies on a pixel ``unseen`` (a bool mask of
    the same grid; continuous coordinates, pixel edges at integers)."""
    if not len(screws) or not unseen.any():
        return screws
    h, w = unseen.shape
    keep = np.ones(len(screws), dtype=bool)
    for px, py in ((screws[:, 0], screws[:, 1]), (screws[:, 2], screws[:, 3])):
        inside = (px >= 0) & (px < w) & (py >= 0) & (py < h)
        rows, cols = np.clip(np.floor(py), 0, h - 1).astype(int), np.clip(np.floor(px), 0, w - 1).astype(int)
        keep &= ~(inside & unseen[rows, cols])
    return screws[keep]


def screw_rows(items) -> np.ndarray:
    """Label screws (dicts) -> (K, 4) [head_x, head_y, tip_x, tip_y] native pixels, visible screws only."""
    rows = [[s["head_x"], s["head_y"], s["tip_x"], s["tip_y"]] for s in (items or []) if s.get("visible", True)]
    return np.asarray(rows, dtype=np.float64).reshape(-1, 4)


def load_head_dataset(home: Path, labels_path: Path, size: int = 224, where: str | None = None,
                      masks: bool = True, max_images: int | None = None,
                      max_bytes: int = DEFAULT_MAX_BYTES) -> HeadDataset:
    """The labelled catalog images at evaluation size ``size`` (see the module docstring).

    ``max_images`` keeps an evenly spread subset (deterministic); ``max_bytes`` bounds the memory of
    the image and mask tensors (a clear error, not an out-of-memory kill).
    """
    from tasks.label_schema import mask_to_png, png_to_mask

    columns = ("region", "metal_mask_png", "screws") if masks else ("region", "screws")
    rows = load_labels(Path(home), Path(labels_path), columns, where).to_pylist()
    if max_images is not None and len(rows) > max_images:
        rows = [rows[i] for i in np.linspace(0, len(rows) - 1, max_images).round().astype(int)]
    n = len(rows)
    need = n * size * size * (2 + (1 if masks else 0))
    if need > max_bytes:
        raise MemoryError(f"{n} images at {size} px need {need / 2**30:.1f} GiB (limit {max_bytes / 2**30:.1f} GiB): "
                          "use a smaller size, max_images or a where filter")
    position = {row["key"]: i for i, row in enumerate(rows)}
    by_shard: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        by_shard[row["shard"]].append(row["key"])

    images = torch.zeros(n, 1, size, size, dtype=torch.float16)
    mask_tensor = torch.zeros(n, size, size, dtype=torch.bool) if masks else None
    seen = np.zeros(n, dtype=bool)
    transform = XrayEvalTransform(size=size)
    boxes: list[Letterbox] = [None] * n  # type: ignore[list-item]  # set from each stored image below
    mask_pngs: list[bytes | None] = [None] * n
    native_screws: list[np.ndarray] = [np.zeros((0, 4))] * n
    for key, pixels, meta in read_samples(Path(home) / "shards", by_shard):
        i = position[key]
        native_h, native_w = rows[i]["orig_rows"], rows[i]["orig_cols"]
        boxes[i] = box = Letterbox.for_stored(native_h, native_w, *pixels.shape, size)
        unseen = unseen_pixels(pixels, meta.get("normalization"), native_h, native_w)
        images[i] = transform(pixels).to(torch.float16)
        native_screws[i] = shown_screws(screw_rows(rows[i].get("screws")), unseen)
        if masks:
            raw = mask_pngs[i] = rows[i].get("metal_mask_png")
            if raw:
                label = png_to_mask(raw)
                shown = shown_mask(label, unseen)
                if shown is not label:
                    mask_pngs[i] = mask_to_png(shown)
                mask_tensor[i] = mask_to_input(shown, box)
        seen[i] = True
    if not seen.all():
        missing = int((~seen).sum())
        raise FileNotFoundError(f"{missing} labelled catalog images were not found in their shards")
    regions = torch.tensor([BODY_REGIONS.index(r["region"]) if r["region"] in BODY_REGIONS else -1 for r in rows],
                           dtype=torch.long)
    screws = [box.screws_to_input(s) for s, box in zip(native_screws, boxes)]
    return HeadDataset(size=size, keys=[r["key"] for r in rows], images=images, regions=regions,
                       masks=mask_tensor, screws=screws, native_screws=native_screws, boxes=boxes,
                       splits=np.asarray([r["split"] for r in rows]),
                       patient_keys=[r["patient_key"] for r in rows],
                       mask_pngs=mask_pngs if masks else [])
