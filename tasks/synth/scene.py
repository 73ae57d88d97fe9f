"""What the generator's stages hand each other: a phantom, its implants, a detector, an exposure.

anatomy.py builds a `Phantom` for a body region; implants.py places `MetalObject`s in it (built
by metal.py); geometry.py poses the C-arm; render.py turns (phantom, implants, pose, detector)
into an `Exposure`; dicom_writer.py stores exposures the way a device model would.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from tasks.synth.primitives import Primitive


@dataclass
class Phantom:
    """A randomized 3D patient phantom of one body region (mm, patient coordinates, see primitives)."""

    region: str
    primitives: list[Primitive]
    # Named 3D points and unit directions that implants.py uses to place metal plausibly,
    # e.g. "L3.pedicle_left.entry", "femur.shaft.axis", "femur.shaft.radius"
    landmarks: dict[str, np.ndarray] = field(default_factory=dict)
    # A point the C-arm isocentre should be near for a typical view of this region
    focus: np.ndarray = field(default_factory=lambda: np.zeros(3))
    # Body axis of the imaged part (unit vector); the C-arm orbits around it
    long_axis: np.ndarray = field(default_factory=lambda: np.array([0.0, 0.0, 1.0]))
    # Half-size (mm) of the field the anatomy fills, used to choose magnification / field of view
    field_half_mm: float = 150.0
    # 'right' / 'left' / '' for limbs: part of the label table
    laterality: str = ""


@dataclass
class Screw:
    """A screw's axis: the 3D centre of its head and its tip (mm)."""

    head: np.ndarray
    tip: np.ndarray


@dataclass
class MetalObject:
    """One implant made of metal primitives; screws expose their head and tip for the labels."""

    kind: Literal["pedicle_screw", "cortical_screw", "cannulated_screw", "plate", "kwire", "nail", "rod"]
    material: Literal["titanium", "steel"]
    primitives: list[Primitive]
    screw: Screw | None = None


@dataclass(frozen=True)
class Detector:
    """The imaging chain of one device model."""

    kind: Literal["flat_panel", "image_intensifier"]
    rows: int
    cols: int
    pixel_mm: float            # pitch at the detector plane (mm)
    blur_px: float = 0.7       # detector point-spread sigma (pixels)
    scatter_fraction: float = 0.25  # scatter-to-primary ratio at the field centre
    vignetting: float = 0.0    # image intensifier: relative brightness loss at the rim (0..1)

    def scaled(self, factor: float) -> "Detector":
        """The same physical field with ``factor`` times the pixels per side (for quick corpora)."""
        if factor == 1.0:
            return self
        rows = max(32, int(round(self.rows * factor)))
        cols = max(32, int(round(self.cols * factor)))
        return Detector(self.kind, rows, cols, self.pixel_mm * self.rows / rows,
                        self.blur_px, self.scatter_fraction, self.vignetting)


@dataclass
class ScrewPoints:
    """A screw's head and tip projected onto the detector, pixel coordinates (x = column, y = row)."""

    head_xy: tuple[float, float]
    tip_xy: tuple[float, float]
    visible: bool              # both points inside the exposed field (and the screw not fully hidden)
    material: str


@dataclass
class Exposure:
    """One projection as the detector saw it, before any device-specific encoding."""

    image: np.ndarray          # float32 (rows, cols): detected quanta per pixel (noise, scatter, blur)
    metal_mask: np.ndarray     # bool (rows, cols): pixels whose ray crosses metal
    screws: list[ScrewPoints]
    field_mask: np.ndarray     # bool (rows, cols): the exposed field (circle for an image intensifier)
    photons_per_px: float      # unattenuated quanta per pixel used for this exposure
