"""Analytic 3D primitives and exact X-ray path lengths through them.

A phantom is a sum of convex primitives, each with a *differential* linear attenuation
coefficient: a bone inside soft tissue carries ``mu_bone - mu_soft``, a lung ``mu_air - mu_soft``.
The line integral of attenuation along a ray is then exactly ``sum(mu_i * chord_i)``, where
``chord_i`` is the length (mm) of the ray's intersection with primitive ``i``. Nested shapes
(cortical shell around a cancellous core) need no boolean geometry.

Coordinates are patient coordinates in millimetres with the C-arm isocentre at the origin:
x = patient right -> left, y = posterior -> anterior, z = inferior -> superior (feet -> head).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Linear attenuation coefficients (1/mm) at an effective energy of about 60 keV
# (NIST XCOM mass attenuation x density; beam hardening is not modelled).
MU = {
    "air": 0.0,
    "lung": 0.0055,          # inflated lung, ~0.26 g/cm3
    "fat": 0.0185,
    "soft": 0.0205,          # muscle / water-equivalent soft tissue
    "cartilage": 0.0215,
    "cancellous": 0.032,     # trabecular bone with marrow, ~1.18 g/cm3
    "cortical": 0.058,       # cortical bone, ~1.92 g/cm3
    "enamel": 0.085,         # teeth
    "titanium": 0.28,        # Ti-6Al-4V, 4.43 g/cm3
    "steel": 0.95,           # 316L stainless steel, 8.0 g/cm3
}

METALS = ("titanium", "steel")

_EPS = 1e-12


def _rotation(rotation) -> np.ndarray:
    r = np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64)
    if r.shape != (3, 3):
        raise ValueError("rotation must be a 3x3 matrix whose columns are the local axes")
    return r


def rotation_from_axis(axis, roll: float = 0.0) -> np.ndarray:
    """A rotation whose local z axis points along ``axis`` (then rolled by ``roll`` radians)."""
    z = np.asarray(axis, dtype=np.float64)
    z = z / np.linalg.norm(z)
    helper = np.array([1.0, 0.0, 0.0]) if abs(z[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    x = np.cross(helper, z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    if roll:
        c, s = np.cos(roll), np.sin(roll)
        x, y = c * x + s * y, -s * x + c * y
    return np.stack([x, y, z], axis=1)


def euler_rotation(rx: float = 0.0, ry: float = 0.0, rz: float = 0.0) -> np.ndarray:
    """Rotation about x, then y, then z (radians), as a matrix R = Rz @ Ry @ Rx."""
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    r_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    r_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return r_z @ r_y @ r_x


@dataclass
class Primitive:
    """Base class: a convex solid with a (differential) attenuation ``mu`` in 1/mm."""

    center: np.ndarray
    rotation: np.ndarray | None
    mu: float
    material: str = "soft"   # what it is made of ("titanium"/"steel" mark metal for the mask)
    name: str = ""

    def __post_init__(self) -> None:
        self.center = np.asarray(self.center, dtype=np.float64)
        self.rotation = _rotation(self.rotation)

    # local half extents of the bounding box, in the primitive's own axes
    def _local_half_extents(self) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _local_interval(self, s: np.ndarray, d: np.ndarray):  # pragma: no cover - abstract
        """(t0, t1, hit): where each ray enters and leaves the solid, in local coordinates."""
        raise NotImplementedError

    def _local_chord(self, s: np.ndarray, d: np.ndarray) -> np.ndarray:
        t0, t1, hit = self._local_interval(s, d)
        return np.where(hit, np.maximum(t1 - t0, 0.0), 0.0)

    @property
    def is_metal(self) -> bool:
        return self.material in METALS

    def corners(self) -> np.ndarray:
        """The 8 corners (8, 3) of an oriented box that contains the primitive."""
        h = self._local_half_extents()
        signs = np.array([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)], dtype=np.float64)
        return self.center + (signs * h) @ self.rotation.T

    def aabb(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned bounding box (min, max) in patient coordinates."""
        half = np.abs(self.rotation) @ self._local_half_extents()
        return self.center - half, self.center + half

    def chord(self, source: np.ndarray, directions: np.ndarray) -> np.ndarray:
        """Path length (mm) of each ray ``source + t * directions[i]`` inside the solid.

        ``directions`` must be unit vectors, shape (..., 3); the result has shape (...).
        """
        s = (np.asarray(source, dtype=np.float64) - self.center) @ self.rotation
        d = np.asarray(directions) @ self.rotation
        return self._local_chord(s, d)


@dataclass
class Ellipsoid(Primitive):
    radii: np.ndarray = field(default_factory=lambda: np.ones(3))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.radii = np.asarray(self.radii, dtype=np.float64)

    def _local_half_extents(self) -> np.ndarray:
        return self.radii

    def _local_interval(self, s, d):
        s = s / self.radii
        d = d / self.radii
        a = np.maximum(np.einsum("...i,...i->...", d, d), _EPS)
        b = d @ s
        c = s @ s - 1.0
        disc = b * b - a * c
        root = np.sqrt(np.maximum(disc, 0.0))
        # t is in mm because the world directions are unit vectors
        return (-b - root) / a, (-b + root) / a, disc > 0


@dataclass
class Cylinder(Primitive):
    """A capped cylinder along its local z axis, elliptic cross-section ``radii = (a, b)``."""

    radii: tuple[float, float] = (1.0, 1.0)
    half_length: float = 1.0

    def _local_half_extents(self) -> np.ndarray:
        return np.array([self.radii[0], self.radii[1], self.half_length], dtype=np.float64)

    def _local_interval(self, s, d):
        ra, rb = self.radii
        sx, sy, sz = s[0] / ra, s[1] / rb, s[2]
        dx, dy, dz = d[..., 0] / ra, d[..., 1] / rb, d[..., 2]
        a = dx * dx + dy * dy
        b = dx * sx + dy * sy
        c = sx * sx + sy * sy - 1.0
        disc = b * b - a * c
        root = np.sqrt(np.maximum(disc, 0.0))
        a_safe = np.maximum(a, _EPS)
        t0 = np.where(a > _EPS, (-b - root) / a_safe, -np.inf)
        t1 = np.where(a > _EPS, (-b + root) / a_safe, np.inf)
        inside_radial = (a > _EPS) & (disc > 0) | ((a <= _EPS) & (c <= 0))
        return _slab(t0, t1, inside_radial, sz, dz, self.half_length)


@dataclass
class Box(Primitive):
    half_extents: np.ndarray = field(default_factory=lambda: np.ones(3))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.half_extents = np.asarray(self.half_extents, dtype=np.float64)

    def _local_half_extents(self) -> np.ndarray:
        return self.half_extents

    def _local_interval(self, s, d):
        shape = d.shape[:-1]
        t0 = np.full(shape, -np.inf)
        t1 = np.full(shape, np.inf)
        hit = np.ones(shape, dtype=bool)
        for axis in range(3):
            t0, t1, hit = _slab(t0, t1, hit, s[axis], d[..., axis], self.half_extents[axis])
        return t0, t1, hit


def _slab(t0, t1, hit, s_axis, d_axis, half):
    """Intersect the running interval [t0, t1] with the slab |s + t d| <= half along one axis."""
    parallel = np.abs(d_axis) < _EPS
    d_safe = np.where(parallel, 1.0, d_axis)
    ta = (-half - s_axis) / d_safe
    tb = (half - s_axis) / d_safe
    lo = np.where(parallel, -np.inf, np.minimum(ta, tb))
    hi = np.where(parallel, np.inf, np.maximum(ta, tb))
    hit = hit & ~(parallel & (abs(s_axis) > half))
    return np.maximum(t0, lo), np.minimum(t1, hi), hit


def clip_interval(t0, t1, hit, planes, s, d):
    """Intersect ray intervals [t0, t1] with the local half-spaces ``n . q <= c`` (rows of ``planes``)."""
    for n0, n1, n2, c in planes:
        nd = d[..., 0] * n0 + d[..., 1] * n1 + d[..., 2] * n2
        ns = s[0] * n0 + s[1] * n1 + s[2] * n2
        parallel = np.abs(nd) < _EPS
        t = (c - ns) / np.where(parallel, 1.0, nd)
        t1 = np.where(~parallel & (nd > 0), np.minimum(t1, t), t1)
        t0 = np.where(~parallel & (nd < 0), np.maximum(t0, t), t0)
        if ns > c:
            hit = hit & ~parallel
    return t0, t1, hit


# Clipped solids: a convex primitive intersected with half-spaces. Pieces of one bone (or of one
# soft-tissue envelope) cut along shared planes abut instead of overlapping: overlapping shapes
# would add their attenuation and show unrealistic dense lenses.

@dataclass
class ClippedEllipsoid(Ellipsoid):
    """An ellipsoid cut by half-spaces ``planes`` (k, 4): local ``n . q <= c``."""

    planes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))

    def _local_interval(self, s, d):
        return clip_interval(*super()._local_interval(s, d), self.planes, s, d)


@dataclass
class ClippedCylinder(Cylinder):
    """A capped elliptic cylinder cut by half-spaces ``planes`` (k, 4): local ``n . q <= c``."""

    planes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))

    def _local_interval(self, s, d):
        return clip_interval(*super()._local_interval(s, d), self.planes, s, d)


def line_integral(primitives, source, directions) -> np.ndarray:
    """Sum of ``mu * chord`` over ``primitives`` for every ray: the exponent of Beer-Lambert."""
    total = np.zeros(np.asarray(directions).shape[:-1], dtype=np.float64)
    for p in primitives:
        total += p.mu * p.chord(source, directions)
    return total
