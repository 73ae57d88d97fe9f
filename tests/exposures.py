"""A stand-in `Exposure` for tests that exercise the DICOM side without rendering a phantom."""
from __future__ import annotations

import numpy as np

from tasks.synth.scene import Exposure


def synthetic_exposure(rows: int, cols: int, seed: int, circular: bool, bone_shift_px: float = 0.0) -> Exposure:
    """Air at 1000 quanta with a smooth vertical 'bone' band (shifted by ``bone_shift_px``) and 10 %
    multiplicative noise; a circular field for image intensifiers."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:rows, :cols]
    field = np.ones((rows, cols), bool)
    if circular:
        field = (yy - rows / 2) ** 2 + (xx - cols / 2) ** 2 < (min(rows, cols) / 2) ** 2
    bone = 2.5 * np.exp(-((xx - cols / 2 - bone_shift_px) ** 2) / (cols / 6) ** 2)
    image = 1000.0 * np.exp(-0.3 - bone) * rng.uniform(0.9, 1.1, (rows, cols))
    return Exposure(image.astype(np.float32), np.zeros((rows, cols), bool), [], field, 1000.0)
