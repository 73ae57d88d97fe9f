"""What DAX labels: the product's label set and how a label file stores masks.

The 11 body-region classes are the product's, not the generator's: real C-arm images are classified
into these same names, class index ``i`` is ``BODY_REGIONS[i]`` in every model, and the synthetic
generator (``tasks.synth``) imports them from here. A label file (``labels.parquet``: one row per
image, joined to the catalog by source ``sha256`` and ``frame``) holds the metal mask as a 1-bit PNG
(``mask_to_png`` / ``png_to_mask``).
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

__all__ = ["BODY_REGIONS", "LABEL_COLUMNS", "mask_to_png", "png_to_mask"]

# The 11 body-region class labels, exactly as every stage spells them (DAX, MICCAI 2025).
BODY_REGIONS: tuple[str, ...] = (
    "skull",
    "cervical spine",
    "thorax",
    "lumbar spine",
    "pelvis and hip",
    "femur",
    "knee",
    "lower leg",
    "ankle and foot",
    "shoulder and upper arm",
    "elbow-forearm-hand",
)

# The label columns the evaluation stages may read (never ``path``: folder names carry planted PHI).
LABEL_COLUMNS = ("region", "laterality", "has_metal", "metal_pixels", "metal_mask_png", "screws", "burned_in_text")


def mask_to_png(mask: np.ndarray) -> bytes:
    """A boolean mask as a 1-bit PNG (a few kB at 1k x 1k)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=bool)).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def png_to_mask(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data))).astype(bool)
