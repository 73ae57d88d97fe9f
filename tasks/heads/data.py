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

What the image shows is the truth: ingestion blanks burned-in text, and the models' view reads those boxes as
air (``tasks.ingest.normalize.model_view``), so metal under a cleaned box is not in any image a model sees (on
the evaluation corpus 3.9 % of the metal pixels, more than a tenth of the metal on 14 % of the images with metal,
all of it on 5 of 628, and 3 % of the screws; docs/experiments.md, section 33). The heads' truth leaves it out:
the metal masks have no metal inside the boxes (``shown_mask``) and a screw with its head or tip inside one is not
counted (``shown_screws``), for training targets, floors and metrics alike. The label file is never changed.

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

__all__ = ["HeadDataset", "load_head_dataset", "screw_rows", "shown_mask", "shown_screws"]

DEFAULT_MAX_BYTES = 8 << 30


@dataclass
class HeadDataset:
    """Labelled images at one evaluation size; rows in ``keys`` order.

    - ``images`` (N, 1, S, S) float16 in [0, 1] (``XrayEvalTransform``);
    - ``regions`` (N,) int64 class ids (index into ``BODY_REGIONS``; -1 if unknown);
    - ``masks`` (N, S, S) bool metal masks in the letterbox, as the image shows them (None when not loaded);
    - ``screws``: per image a (K, 4) float64 array [head_x, head_y, tip_x, tip_y] in INPUT pixels
      (visible screws only: both points inside the exposed field and outside the cleaned boxes);
    - ``native_screws``: the same screws in NATIVE pixels (the metrics' reference: the labels' own coordinates);
    - ``boxes``: per image the ``Letterbox`` (input <-> native);
    - ``mask_pngs``: per image the NATIVE metal mask as the label file's PNG bytes (None: no mask),
      decoded only where metrics are computed at native resolution (``native_mask``);
    - ``splits``: 'train' / 'val' / 'test' (by patient, ``tasks.ingest.labels.patient_split``);
    - ``hidden``: per image the boxes cleaned of burned-in text in NATIVE pixels (``blanked_boxes``), where the
      image shows air: no metal and no screw point of the truth lies there (module docstring).
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
    hidden: list[list[tuple[int, int, int, int]]] = field(default_factory=list)
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
        return shown_mask(png_to_mask(raw), self.hidden[i] if self.hidden else ())

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)

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


def shown_mask(mask: np.ndarray, boxes) -> np.ndarray:
    """``mask`` without the pixels inside ``boxes`` ((x0, y0, x1, y1), ends exclusive, on the mask's grid): a new
    array when there are boxes, ``mask`` itself otherwise."""
    if not len(boxes):
        return mask
    shown = mask.copy()
    for x0, y0, x1, y1 in boxes:
        shown[y0:y1, x0:x1] = False
    return shown


def shown_screws(screws: np.ndarray, boxes) -> np.ndarray:
    """(K, 4) [hx, hy, tx, ty] screws without those whose head or tip lies inside one of ``boxes`` (same grid)."""
    if not len(boxes) or not len(screws):
        return screws
    keep = np.ones(len(screws), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        for px, py in ((screws[:, 0], screws[:, 1]), (screws[:, 2], screws[:, 3])):
            keep &= ~((px >= x0) & (px < x1) & (py >= y0) & (py < y1))
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
    from tasks.ingest.normalize import blanked_boxes
    from tasks.label_schema import png_to_mask

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
    hidden: list[list[tuple[int, int, int, int]]] = [[] for _ in range(n)]
    for key, pixels, meta in read_samples(Path(home) / "shards", by_shard):
        i = position[key]
        boxes[i] = box = Letterbox.for_stored(rows[i]["orig_rows"], rows[i]["orig_cols"], *pixels.shape, size)
        hidden[i] = blanked_boxes(meta.get("normalization"), rows[i]["orig_rows"], rows[i]["orig_cols"])
        images[i] = transform(pixels).to(torch.float16)
        if masks:
            raw = rows[i].get("metal_mask_png")
            if raw:
                mask_tensor[i] = mask_to_input(shown_mask(png_to_mask(raw), hidden[i]), box)
        seen[i] = True
    if not seen.all():
        missing = int((~seen).sum())
        raise FileNotFoundError(f"{missing} labelled catalog images were not found in their shards")
    regions = torch.tensor([BODY_REGIONS.index(r["region"]) if r["region"] in BODY_REGIONS else -1 for r in rows],
                           dtype=torch.long)
    native_screws = [shown_screws(screw_rows(r.get("screws")), hidden[i]) for i, r in enumerate(rows)]
    screws = [box.screws_to_input(s) for s, box in zip(native_screws, boxes)]
    return HeadDataset(size=size, keys=[r["key"] for r in rows], images=images, regions=regions,
                       masks=mask_tensor, screws=screws, native_screws=native_screws, boxes=boxes,
                       splits=np.asarray([r["split"] for r in rows]),
                       patient_keys=[r["patient_key"] for r in rows],
                       mask_pngs=[r.get("metal_mask_png") for r in rows] if masks else [], hidden=hidden)
