"""Implant builders: screws, plates, wires, nails and rods as sums of analytic metal primitives.

Conventions
-----------
* Millimetres, patient coordinates (see primitives.py). ``direction`` / ``axis`` arguments are
  any non-zero vectors (normalised here).
* Attenuation: every solid metal primitive carries ``mu = MU[material] - MU['soft']``, i.e. the
  metal *displaces soft tissue*. Metal inside bone is therefore over-attenuating by
  ``MU[bone] - MU['soft']`` (<= 0.04/mm against 0.26/mm for titanium, 0.93/mm for steel), which is
  invisible next to the metal itself.
* Voids inside metal (plate holes, screw / nail cannulations) are primitives of the same
  material with the opposite ``mu``: they cancel the metal exactly and leave the tissue.
  The renderer's metal mask is "net metal line integral > 0", so a ray through a hole is
  not metal.
* Screws expose ``Screw(head=<centre of the head>, tip=<distal end of the shaft>)``.
"""
from __future__ import annotations

import numpy as np

from tasks.synth.primitives import (
    MU,
    Box,
    Cylinder,
    Ellipsoid,
    Primitive,
    rotation_from_axis,
)
from tasks.synth.scene import MetalObject, Screw

_THREAD_RINGS_MAX = 7


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _mu(material: str) -> float:
    if material not in ("titanium", "steel"):
        raise ValueError(f"unknown implant material {material!r}")
    return MU[material] - MU["soft"]


def _rod(a, b, radius: float, material: str, name: str, mu: float | None = None) -> Cylinder:
    """A cylinder of ``radius`` from point a to point b."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    axis = b - a
    return Cylinder((a + b) / 2.0, rotation_from_axis(axis), _mu(material) if mu is None else mu,
                    material, name, radii=(radius, radius), half_length=np.linalg.norm(axis) / 2.0)


def _threaded_shaft(start, d, length: float, diameter: float, material: str,
                    pitch: float, tip_fraction: float = 0.12) -> list[Primitive]:
    """Core cylinder (70 % of the thread diameter), thread crests as short full-diameter rings
    (at ``pitch``, spread out when the shaft is long so that at most _THREAD_RINGS_MAX are
    used), and a conical tip made of two tapering cylinders."""
    r_out, r_core = diameter / 2.0, 0.35 * diameter   # rings overlap the core: denser crests
    tip_len = max(tip_fraction * length, 1.0)
    body_end = start + d * (length - tip_len)
    prims: list[Primitive] = [_rod(start, body_end, r_core, material, "core")]
    threaded = length - tip_len
    n_rings = int(min(_THREAD_RINGS_MAX, max(1, threaded // pitch)))
    spacing = threaded / n_rings
    width = min(0.4 * pitch, 0.5 * spacing)
    for k in range(n_rings):
        c = start + d * (spacing * (k + 0.5))
        prims.append(_rod(c - d * width / 2, c + d * width / 2, r_out, material, "thread"))
    mid_tip = body_end + d * tip_len / 2
    prims.append(_rod(body_end, mid_tip, 0.75 * r_core, material, "tip"))
    prims.append(_rod(mid_tip, start + d * length, 0.4 * r_core, material, "tip"))
    return prims


def pedicle_screw(entry, direction, length_mm: float, diameter_mm: float,
                  material: str = "titanium") -> MetalObject:
    """Polyaxial pedicle screw entering the bone at ``entry`` along ``direction``.

    Tulip head (cylinder ~11 mm wide, 11 mm tall) sitting just outside the entry point on the
    screw axis, a ball joint between it and the shaft, and a threaded shaft of ``length_mm`` from ``entry``
    into the bone (pitch 2.75 mm). 12 primitives. head = tulip centre, tip = distal end.
    """
    entry = np.asarray(entry, dtype=np.float64)
    d = _unit(direction)
    tulip_r, tulip_h = max(5.5, 0.85 * diameter_mm), 11.0
    ball_r = max(3.5, 0.6 * diameter_mm)
    ball = entry - d * ball_r            # touches the shaft start and the tulip base, no overlap
    head = ball - d * (ball_r + 0.5 * tulip_h)
    prims: list[Primitive] = [
        _rod(head - d * tulip_h / 2, head + d * tulip_h / 2, tulip_r, material, "tulip"),
        Ellipsoid(ball, None, _mu(material), material, "ball", radii=np.full(3, ball_r)),
    ]
    prims += _threaded_shaft(entry, d, length_mm, diameter_mm, material, pitch=2.75)
    return MetalObject("pedicle_screw", material, prims, Screw(head=head, tip=entry + d * length_mm))


def cortical_screw(head_point, direction, length_mm: float, diameter_mm: float = 3.5,
                   material: str = "titanium", head_diameter_mm: float | None = None,
                   head_height_mm: float | None = None) -> MetalObject:
    """Bone screw with a low, flat head centred at ``head_point`` (default 2 x diameter wide,
    0.6 x diameter tall) and a threaded shaft along ``direction`` (pitch ~0.35 x diameter,
    >= 1.25 mm); ``length_mm`` is measured from the head centre. <= 10 primitives.
    head = ``head_point``, tip = head_point + length * direction."""
    head_point = np.asarray(head_point, dtype=np.float64)
    d = _unit(direction)
    head_h = head_height_mm or max(2.0, 0.6 * diameter_mm)
    head_r = (head_diameter_mm or 2.0 * diameter_mm) / 2.0
    prims: list[Primitive] = [
        _rod(head_point - d * head_h / 2, head_point + d * head_h / 2, head_r, material, "head")
    ]
    prims += _threaded_shaft(head_point + d * head_h / 2, d, length_mm - head_h / 2, diameter_mm,
                             material, pitch=max(1.25, 0.35 * diameter_mm))
    return MetalObject("cortical_screw", material, prims,
                       Screw(head=head_point, tip=head_point + d * length_mm))


def cannulated_screw(head_point, direction, length_mm: float, diameter_mm: float = 7.0,
                     material: str = "titanium", thread_mm: float = 16.0) -> MetalObject:
    """Large cannulated screw (femoral neck, scaphoid...): flat head, smooth shank, a short
    distal thread of ``thread_mm``, and a central cannulation (a cancelling void) of 40 % of
    the core diameter. head = ``head_point``, tip = distal end."""
    head_point = np.asarray(head_point, dtype=np.float64)
    d = _unit(direction)
    thread_mm = min(thread_mm, 0.6 * length_mm)
    head_h = max(2.5, 0.4 * diameter_mm)
    tip = head_point + d * length_mm
    thread_start = tip - d * thread_mm
    r_core = 0.35 * diameter_mm
    prims: list[Primitive] = [
        _rod(head_point - d * head_h / 2, head_point + d * head_h / 2, 0.75 * diameter_mm,
             material, "head"),
        _rod(head_point + d * head_h / 2, thread_start, r_core * 1.1, material, "shank"),
    ]
    prims += _threaded_shaft(thread_start, d, thread_mm, diameter_mm, material, pitch=2.5)
    prims.append(_rod(head_point - d * head_h / 2, tip - d * 0.1 * thread_mm, 0.4 * r_core,
                      material, "cannulation", mu=-_mu(material)))
    return MetalObject("cannulated_screw", material, prims, Screw(head=head_point, tip=tip))


def plate(center, axis, normal, length_mm: float, width_mm: float, thickness_mm: float,
          material: str, n_holes: int, rng: np.random.Generator,
          screw_length_mm: float = 30.0, screw_diameter_mm: float = 3.5) -> list[MetalObject]:
    """A fracture plate lying on the bone surface plus cortical screws through some holes.

    ``center`` is a point on the bone surface, ``normal`` the outward surface normal,
    ``axis`` the plate's long direction (made perpendicular to the normal). The plate is a
    thin box from the surface outwards with ``n_holes`` screw holes (cancelling voids) evenly
    spaced along its axis; 50-100 % of the holes (at least 2) get a cortical screw going along
    ``-normal`` into the bone, its head filling the hole (so no metal is counted twice).
    ``screw_length_mm`` is measured from the bone surface. Returns [plate, screw, screw, ...].
    """
    n = _unit(normal)
    a = _unit(np.asarray(axis, dtype=np.float64) - np.dot(axis, n) * n)
    center = np.asarray(center, dtype=np.float64)
    mid = center + n * thickness_mm / 2
    rot = np.stack([a, np.cross(n, a), n], axis=1)
    prims: list[Primitive] = [Box(mid, rot, _mu(material), material, "plate",
                                  half_extents=[length_mm / 2, width_mm / 2, thickness_mm / 2])]
    hole_r = min(0.6 * screw_diameter_mm, 0.35 * width_mm)
    offsets = (np.arange(n_holes) - (n_holes - 1) / 2) * (length_mm / max(n_holes, 1))
    holes = [mid + a * o for o in offsets]
    prims += [_rod(h - n * thickness_mm / 2, h + n * thickness_mm / 2, hole_r, material, "hole",
                   mu=-_mu(material)) for h in holes]
    n_screws = int(rng.integers(min(n_holes, max(2, (n_holes + 1) // 2)), n_holes + 1))
    chosen = np.sort(rng.choice(n_holes, size=n_screws, replace=False))
    screws = [cortical_screw(holes[i], -n, screw_length_mm + thickness_mm / 2, screw_diameter_mm,
                             material, head_diameter_mm=2 * hole_r, head_height_mm=thickness_mm)
              for i in chosen]
    return [MetalObject("plate", material, prims)] + screws


def kwire(start, direction, length_mm: float, diameter_mm: float = 1.8,
          material: str = "steel") -> MetalObject:
    """Kirschner wire from ``start`` along ``direction`` with a short trocar tip. No screw points."""
    start = np.asarray(start, dtype=np.float64)
    d = _unit(direction)
    r = diameter_mm / 2
    tip_len = min(2.0 * diameter_mm, 0.2 * length_mm)
    body_end = start + d * (length_mm - tip_len)
    prims = [_rod(start, body_end, r, material, "wire"),
             _rod(body_end, start + d * length_mm, 0.5 * r, material, "trocar")]
    return MetalObject("kwire", material, prims)


def nail(entry, axis, length_mm: float, diameter_mm: float, material: str, n_locking: int,
         rng: np.random.Generator, locking_length_mm: float | None = None) -> list[MetalObject]:
    """Intramedullary nail from ``entry`` along ``axis`` plus ``n_locking`` locking screws.

    The nail has a wider proximal segment (1.3 x diameter over the first 18 %), a tapered tip
    and a central cannulation. Up to 6 locking screws cross the nail perpendicularly,
    alternating between the proximal and distal ends, in one random plane through the axis
    (+-10 deg per screw); each spans ``locking_length_mm`` (default 4 x diameter) centred on
    the nail axis. Returns [nail, screw, ...]."""
    entry = np.asarray(entry, dtype=np.float64)
    a = _unit(axis)
    r = diameter_mm / 2
    prox_end = entry + a * 0.18 * length_mm
    end = entry + a * (length_mm - r)
    prims: list[Primitive] = [
        _rod(entry, prox_end, 1.3 * r, material, "nail_proximal"),
        _rod(prox_end, end, r, material, "nail"),
        _rod(end, end + a * 0.6 * r, 0.8 * r, material, "nail_tip"),
        _rod(end + a * 0.6 * r, end + a * r, 0.45 * r, material, "nail_tip"),
        _rod(entry, end, 0.35 * r, material, "cannulation", mu=-_mu(material)),
    ]
    objects = [MetalObject("nail", material, prims)]
    span = locking_length_mm or 4.0 * diameter_mm
    base_roll = rng.uniform(0, 2 * np.pi)
    for frac in (0.06, 0.93, 0.12, 0.86, 0.79, 0.18)[:n_locking]:
        roll = base_roll + np.radians(rng.normal(0, 10))
        perp = rotation_from_axis(a, roll)[:, 0]
        centre = entry + a * frac * length_mm
        objects.append(cortical_screw(centre - perp * span / 2, perp, span, 5.0 if r > 4 else 4.0,
                                      material))
    return objects


def rod(points, diameter_mm: float = 5.5, material: str = "titanium") -> MetalObject:
    """Spinal rod through ``points`` (e.g. pedicle screw heads): one cylinder per segment,
    overshooting each end by 5 mm. No screw points."""
    pts = np.asarray(points, dtype=np.float64)
    if len(pts) < 2:
        raise ValueError("a rod needs at least two points")
    pts = pts.copy()
    pts[0] -= 5.0 * _unit(pts[1] - pts[0])
    pts[-1] += 5.0 * _unit(pts[-1] - pts[-2])
    prims = [_rod(p, q, diameter_mm / 2, material, "rod") for p, q in zip(pts[:-1], pts[1:])]
    return MetalObject("rod", material, prims)
