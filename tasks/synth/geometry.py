"""C-arm projection geometry: where the source and the detector are, and where points land.

Conventions
-----------
* Patient coordinates in mm, isocentre of the *phantom* at the origin (see primitives.py):
  x = patient right -> left, y = posterior -> anterior, z = feet -> head.
* The C-arm orbits around an ``orbit_axis`` (a unit vector, normally ``Phantom.long_axis``;
  default +z). From it the pose builds an orthonormal frame: ``w`` = orbit axis,
  ``e_ant`` = anterior (+y) made perpendicular to ``w``, ``e_side = e_ant x w`` (= +x, patient
  left, when ``w`` = +z).
* ``primary_deg`` (orbital / LAO-RAO angle) rotates the central ray about ``w``:
  0 = AP (source posterior, detector anterior), +90 = detector on ``e_side`` (left lateral,
  LAO 90), -90 = detector on the right, 180 = PA (source anterior).
  ``secondary_deg`` (cranial/caudal) tilts the detector towards ``+w`` (cranial) when positive.
  The central ray (source -> detector) is
  ``d = cos(sec) * (cos(pri) e_ant + sin(pri) e_side) + sin(sec) w``.
* Image axes: columns (image x, ``u``) and rows (image y, downwards, ``v``). ``v`` is ``-w``
  projected onto the detector plane, so the head / proximal end (+w) is at the top of the
  image; ``u = v x d``, which puts the patient's right on the image left in an AP view (the
  usual radiological display). ``detector_roll_deg`` then rotates (u, v) about ``d``.
* Pixel centres sit at integer (column, row) coordinates; the detector centre, where the
  central ray through the isocentre lands, is at ((cols - 1) / 2, (rows - 1) / 2).
* Magnification at the isocentre is ``sid_mm / sod_mm``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from tasks.synth.scene import Detector, Phantom

VIEWS = ("ap", "lateral", "oblique")

_MIN_SOD_MM = 350.0     # the source never comes closer than this to the isocentre
_MAG_RANGE = (1.15, 2.0)


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


@dataclass(frozen=True)
class CArmPose:
    """One C-arm position. Hashable: vectors are stored as tuples of floats."""

    isocenter: tuple[float, float, float] = (0.0, 0.0, 0.0)
    primary_deg: float = 0.0
    secondary_deg: float = 0.0
    sid_mm: float = 1100.0
    sod_mm: float = 700.0
    detector_roll_deg: float = 0.0
    orbit_axis: tuple[float, float, float] = (0.0, 0.0, 1.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "isocenter", tuple(float(c) for c in self.isocenter))
        object.__setattr__(self, "orbit_axis", tuple(float(c) for c in _unit(self.orbit_axis)))
        if not 0.0 < self.sod_mm < self.sid_mm:
            raise ValueError("need 0 < sod_mm < sid_mm")

    @property
    def magnification(self) -> float:
        return self.sid_mm / self.sod_mm

    @cached_property
    def _frame(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(source, d, u, v): source position and the unit central ray / column / row axes."""
        w = np.array(self.orbit_axis)
        ant = np.array([0.0, 1.0, 0.0]) - w[1] * w
        if np.linalg.norm(ant) < 1e-6:          # orbit axis along y: fall back to +z as "anterior"
            ant = np.array([0.0, 0.0, 1.0]) - w[2] * w
        ant = _unit(ant)
        side = np.cross(ant, w)
        a, b = np.radians(self.primary_deg), np.radians(self.secondary_deg)
        d = np.cos(b) * (np.cos(a) * ant + np.sin(a) * side) + np.sin(b) * w
        v = _unit(-w + np.dot(w, d) * d)
        u = np.cross(v, d)
        r = np.radians(self.detector_roll_deg)
        u, v = np.cos(r) * u + np.sin(r) * v, -np.sin(r) * u + np.cos(r) * v
        source = np.array(self.isocenter) - self.sod_mm * d
        return source, d, u, v

    def source(self) -> np.ndarray:
        """Focal spot position (3,) in mm."""
        return self._frame[0].copy()

    def central_ray(self) -> np.ndarray:
        """Unit vector (3,) from the source through the isocentre towards the detector."""
        return self._frame[1].copy()

    def detector_frame(self, detector: Detector) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(centre, u, v): detector centre (3,) in mm, unit column axis u, unit row axis v."""
        source, d, u, v = self._frame
        return source + self.sid_mm * d, u.copy(), v.copy()

    def pixel_directions(self, detector: Detector, rows_idx, cols_idx) -> np.ndarray:
        """Unit ray directions (R, C, 3) from the source to the pixel centres of a grid.

        ``rows_idx`` (R,) and ``cols_idx`` (C,) are pixel coordinates (integers for pixel
        centres, fractions allowed). Returns float64.
        """
        _, d, u, v = self._frame
        cy, cx = (detector.rows - 1) / 2.0, (detector.cols - 1) / 2.0
        a = (np.asarray(cols_idx, dtype=np.float64) - cx) * detector.pixel_mm   # (C,)
        b = (np.asarray(rows_idx, dtype=np.float64) - cy) * detector.pixel_mm   # (R,)
        rays = self.sid_mm * d + a[None, :, None] * u + b[:, None, None] * v
        norm = np.sqrt(self.sid_mm ** 2 + a[None, :] ** 2 + b[:, None] ** 2)
        return rays / norm[..., None]

    def project(self, points, detector: Detector) -> np.ndarray:
        """Pixel coordinates (N, 2) = (column, row) of 3D points (N, 3) in mm.

        Points at or behind the source plane get NaN.
        """
        source, d, u, v = self._frame
        q = np.atleast_2d(np.asarray(points, dtype=np.float64)) - source
        depth = q @ d
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(depth > 1e-9, self.sid_mm / depth, np.nan) / detector.pixel_mm
        x = (q @ u) * scale + (detector.cols - 1) / 2.0
        y = (q @ v) * scale + (detector.rows - 1) / 2.0
        return np.stack([x, y], axis=1)


def _field_half_detector_mm(detector: Detector) -> float:
    """Half-width (mm) of the usable field at the detector plane."""
    return 0.5 * min(detector.rows, detector.cols) * detector.pixel_mm


def _magnification_for(phantom: Phantom, detector: Detector, tightness: float) -> float:
    """Magnification that shows ``phantom.field_half_mm * tightness`` across the detector half-field."""
    mag = _field_half_detector_mm(detector) / max(phantom.field_half_mm * tightness, 1.0)
    return float(np.clip(mag, *_MAG_RANGE))


def _sid_sod(rng: np.random.Generator, mag: float) -> tuple[float, float]:
    sid = float(rng.uniform(1000.0, 1200.0))
    sod = max(sid / mag, _MIN_SOD_MM)
    return sid, sod


def random_pose(phantom: Phantom, detector: Detector, rng: np.random.Generator,
                view: str | None = None) -> CArmPose:
    """A plausible clinical view of ``phantom``.

    view: 'ap' (AP, occasionally PA, sometimes with a 15-35 deg cranial/caudal tilt such as
    pelvic inlet/outlet views), 'lateral' (+-90 deg), 'oblique' (20-60 deg either side, some
    angulation), or None (random, AP 45 %, lateral 30 %, oblique 25 %).
    The isocentre is ``phantom.focus`` plus a jitter of ~8 % of the field half-size (at most
    25 mm per axis); the magnification makes 0.7-1.15 x ``phantom.field_half_mm`` fill the
    detector half-field (smaller factor = tighter collimation / zoomed view).
    """
    if view is None:
        view = str(rng.choice(VIEWS, p=[0.45, 0.30, 0.25]))
    if view == "ap":
        primary = 180.0 if rng.random() < 0.1 else 0.0
        primary += rng.normal(0.0, 4.0)
        tilt = rng.uniform(15.0, 35.0) * rng.choice([-1.0, 1.0]) if rng.random() < 0.15 else 0.0
        secondary = tilt + rng.normal(0.0, 4.0)
    elif view == "lateral":
        primary = rng.choice([-90.0, 90.0]) + rng.normal(0.0, 4.0)
        secondary = rng.normal(0.0, 3.0)
    elif view == "oblique":
        primary = rng.choice([-1.0, 1.0]) * rng.uniform(20.0, 60.0)
        secondary = rng.normal(0.0, 8.0)
    else:
        raise ValueError(f"unknown view {view!r}; expected one of {VIEWS} or None")
    jitter = np.clip(rng.normal(0.0, 0.08 * phantom.field_half_mm, 3), -25.0, 25.0)
    sid, sod = _sid_sod(rng, _magnification_for(phantom, detector, rng.uniform(0.7, 1.15)))
    return CArmPose(
        isocenter=tuple(np.asarray(phantom.focus, dtype=np.float64) + jitter),
        primary_deg=float(primary),
        secondary_deg=float(np.clip(secondary, -45.0, 45.0)),
        sid_mm=sid,
        sod_mm=sod,
        detector_roll_deg=float(rng.normal(0.0, 2.0)),
        orbit_axis=tuple(phantom.long_axis),
    )


def sweep_poses(phantom: Phantom, detector: Detector, rng: np.random.Generator,
                n_views: int, arc_deg: float = 200.0) -> list[CArmPose]:
    """Poses of an orbital 3D-scan sweep: ``n_views`` equal primary-angle steps over ``arc_deg``
    centred on AP, one fixed isocentre (focus + small jitter), SID, SOD and no angulation."""
    jitter = np.clip(rng.normal(0.0, 5.0, 3), -15.0, 15.0)
    iso = tuple(np.asarray(phantom.focus, dtype=np.float64) + jitter)
    sid, sod = _sid_sod(rng, _magnification_for(phantom, detector, 1.0))
    angles = np.linspace(-arc_deg / 2.0, arc_deg / 2.0, n_views) if n_views > 1 else np.zeros(1)
    return [CArmPose(iso, float(a), 0.0, sid, sod, 0.0, tuple(phantom.long_axis)) for a in angles]


def jitter_pose(pose: CArmPose, rng: np.random.Generator, translate_mm: float = 2.0,
                rotate_deg: float = 1.0) -> CArmPose:
    """A slightly moved pose (patient / C-arm motion between fluoroscopy cine frames)."""
    return replace(
        pose,
        isocenter=tuple(np.array(pose.isocenter) + rng.normal(0.0, translate_mm, 3)),
        primary_deg=pose.primary_deg + float(rng.normal(0.0, rotate_deg)),
        secondary_deg=pose.secondary_deg + float(rng.normal(0.0, rotate_deg)),
        detector_roll_deg=pose.detector_roll_deg + float(rng.normal(0.0, rotate_deg / 2.0)),
    )
