"""Randomized analytic 3D patient phantoms, one builder per body region.

``build_phantom(region, rng)`` returns a `Phantom` made of convex primitives with differential
attenuation (see primitives.py): a soft-tissue envelope (often with a fat layer), air spaces, and
bones with a cortical shell around a cancellous (or marrow) interior. Sizes, proportions and a
small overall pose vary per patient; limbs are built as right limbs and mirrored for the left.

Landmarks (named points, unit directions and scalars, all numpy arrays) tell implants.py where
screws, plates, nails and wires go, e.g. ``L3.pedicle_left.entry`` / ``.direction`` / ``.length``,
``femur.shaft.axis`` / ``.center`` / ``.radius``. Directions are unit vectors; scalars are
1-element arrays.
"""
from __future__ import annotations

import numpy as np

from tasks.label_schema import BODY_REGIONS
from tasks.synth.primitives import (
    MU,
    Box,
    ClippedCylinder,
    ClippedEllipsoid,
    Cylinder,
    Ellipsoid,
    Primitive,
    euler_rotation,
)
from tasks.synth.scene import Phantom

# materials that count as "bone" for point-in-bone checks
BONE_MATERIALS = ("cortical", "cancellous", "marrow", "enamel")
# materials that count as the body envelope
ENVELOPE_NAMES = ("body",)

_MARROW = 0.019  # fatty marrow of a long-bone medullary canal (1/mm)


# ----------------------------------------------------------------------------------------------
# geometry helpers
# ----------------------------------------------------------------------------------------------
def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _frame(zaxis, xhint=(1.0, 0.0, 0.0)) -> np.ndarray:
    """Rotation whose local z is ``zaxis`` and local x is as close as possible to ``xhint``."""
    z = _unit(zaxis)
    x = np.asarray(xhint, dtype=np.float64)
    x = x - (x @ z) * z
    if np.linalg.norm(x) < 1e-6:
        x = np.array([0.0, 1.0, 0.0]) if abs(z[1]) < 0.9 else np.array([1.0, 0.0, 0.0])
        x = x - (x @ z) * z
    x = _unit(x)
    y = np.cross(z, x)
    return np.stack([x, y, z], axis=1)


def point_in_primitive(prim: Primitive, points) -> np.ndarray:
    """Whether each point (..., 3) lies inside the primitive's solid (boundary included)."""
    p = np.asarray(points, dtype=np.float64)
    q = (p - prim.center) @ prim.rotation
    if isinstance(prim, (ClippedEllipsoid, ClippedCylinder)):
        inside = np.ones(q.shape[:-1], dtype=bool)
        for n0, n1, n2, c in prim.planes:
            inside &= q[..., 0] * n0 + q[..., 1] * n1 + q[..., 2] * n2 <= c + 1e-9
        base = Ellipsoid if isinstance(prim, ClippedEllipsoid) else Cylinder
        if base is Ellipsoid:
            return inside & (np.sum((q / prim.radii) ** 2, axis=-1) <= 1.0 + 1e-9)
        a, b = prim.radii
        return inside & ((q[..., 0] / a) ** 2 + (q[..., 1] / b) ** 2 <= 1.0 + 1e-9) & (
            np.abs(q[..., 2]) <= prim.half_length + 1e-9)
    if isinstance(prim, Ellipsoid):
        return np.sum((q / prim.radii) ** 2, axis=-1) <= 1.0 + 1e-9
    if isinstance(prim, Cylinder):
        a, b = prim.radii
        return ((q[..., 0] / a) ** 2 + (q[..., 1] / b) ** 2 <= 1.0 + 1e-9) & (
            np.abs(q[..., 2]) <= prim.half_length + 1e-9)
    if isinstance(prim, Box):
        return np.all(np.abs(q) <= prim.half_extents + 1e-9, axis=-1)
    raise TypeError(f"unknown primitive {type(prim).__name__}")


def point_in_bone(phantom: Phantom, point) -> bool:
    """True when ``point`` lies inside any bone primitive (cortex, cancellous core or canal)."""
    return any(p.material in BONE_MATERIALS and bool(point_in_primitive(p, point))
               for p in phantom.primitives)


def point_in_body(phantom: Phantom, point) -> bool:
    """True when ``point`` lies inside the soft-tissue body envelope."""
    return any(p.name.split(".")[0] in ENVELOPE_NAMES and bool(point_in_primitive(p, point))
               for p in phantom.primitives)


def attenuation_at(phantom: Phantom, point) -> float:
    """Total linear attenuation (1/mm) at a point: the sum of the differential mus there."""
    return float(sum(p.mu for p in phantom.primitives if point_in_primitive(p, point)))


# ----------------------------------------------------------------------------------------------
# the builder: collects primitives and landmarks
# ----------------------------------------------------------------------------------------------
class _B:
    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.prims: list[Primitive] = []
        self.points: dict[str, np.ndarray] = {}
        self.dirs: dict[str, np.ndarray] = {}
        self.scalars: dict[str, np.ndarray] = {}

    # random helpers
    def u(self, a, b):
        return float(self.rng.uniform(a, b))

    def n(self, mean, sd, lo=None, hi=None):
        v = float(self.rng.normal(mean, sd))
        if lo is not None:
            v = max(lo, v)
        if hi is not None:
            v = min(hi, v)
        return v

    # landmarks
    def pt(self, name, p):
        self.points[name] = np.asarray(p, dtype=np.float64).copy()

    def dr(self, name, d):
        self.dirs[name] = _unit(d)

    def sc(self, name, v):
        self.scalars[name] = np.array([float(v)])

    # primitives
    def _make(self, kind, center, rot, dims, mu, material, name, clip=None):
        """``clip``: world half-spaces (point, normal[, inner offset]) keeping n . (x - point) <= 0."""
        if clip and kind in ("e", "c"):
            R = np.eye(3) if rot is None else np.asarray(rot, dtype=np.float64)
            ctr = np.asarray(center, dtype=np.float64)
            planes = []
            for cl in clip:
                nrm = _unit(cl[1])
                planes.append(np.r_[R.T @ nrm, nrm @ (np.asarray(cl[0], dtype=np.float64) - ctr)])
            planes = np.array(planes)
            if kind == "e":
                p = ClippedEllipsoid(center, rot, mu, material, name, radii=np.asarray(dims, dtype=np.float64),
                                     planes=planes)
            else:
                p = ClippedCylinder(center, rot, mu, material, name, radii=(float(dims[0]), float(dims[1])),
                                    half_length=float(dims[2]), planes=planes)
        elif kind == "e":
            p = Ellipsoid(center, rot, mu, material, name, radii=np.asarray(dims, dtype=np.float64))
        elif kind == "c":
            p = Cylinder(center, rot, mu, material, name, radii=(float(dims[0]), float(dims[1])),
                         half_length=float(dims[2]))
        elif kind == "b":
            p = Box(center, rot, mu, material, name, half_extents=np.asarray(dims, dtype=np.float64))
        else:  # pragma: no cover
            raise ValueError(kind)
        self.prims.append(p)
        return p

    def tissue(self, kind, center, rot, dims, name, material="soft", base="air", clip=None):
        return self._make(kind, center, rot, dims, MU[material] - MU[base], material, name, clip)

    def air(self, kind, center, rot, dims, name, base="soft", material="air", mu=None, clip=None):
        m = MU[material] - MU[base] if mu is None else mu
        return self._make(kind, center, rot, dims, m, material, name, clip)

    def solid(self, kind, center, rot, dims, name, mu_abs=None, material="cancellous", base="soft", clip=None):
        """A bone of one uniform attenuation (small bones, ribs, processes)."""
        mu = (MU[material] if mu_abs is None else mu_abs) - MU[base]
        return self._make(kind, center, rot, dims, mu, material, name, clip)

    def bone(self, kind, center, rot, dims, cortex, name, inner="cancellous", base="soft",
             end_cortex=None, clip=None):
        """A cortical shell of thickness ``cortex`` around a cancellous (or marrow) interior.

        Clip planes cut the shell and the core alike (an open face, for pieces of one bone that
        abut), unless the clip entry carries a third value: the cortex thickness on that face."""
        dims = np.asarray(dims, dtype=np.float64)
        self._make(kind, center, rot, dims, MU["cortical"] - MU[base], "cortical", name, clip)
        iclip = None
        if clip:
            iclip = [(np.asarray(cl[0], float) - _unit(cl[1]) * (cl[2] if len(cl) > 2 else 0.0), cl[1])
                     for cl in clip]
        if kind == "c":
            ec = cortex if end_cortex is None else end_cortex
            idims = np.array([dims[0] - cortex, dims[1] - cortex, dims[2] - ec])
        else:
            idims = dims - cortex
        idims = np.maximum(idims, 0.3)
        if inner == "marrow":
            self._make(kind, center, rot, idims, _MARROW - MU["cortical"], "marrow", name + ".canal", iclip)
        else:
            self._make(kind, center, rot, idims, MU[inner] - MU["cortical"], "cancellous", name + ".core", iclip)

    def rod(self, p0, p1, radius, cortex, name, inner="cancellous", xhint=(1, 0, 0), radii=None,
            solid=False, mu_abs=None, end_cortex=None, clip=None):
        """A bone cylinder between two points (shell unless ``solid``)."""
        p0 = np.asarray(p0, dtype=np.float64)
        p1 = np.asarray(p1, dtype=np.float64)
        ax = p1 - p0
        rot = _frame(ax, xhint)
        r = (radius, radius) if radii is None else radii
        dims = (r[0], r[1], np.linalg.norm(ax) / 2)
        if solid:
            return self.solid("c", (p0 + p1) / 2, rot, dims, name, mu_abs=mu_abs,
                              material="cortical" if mu_abs and mu_abs > 0.045 else "cancellous", clip=clip)
        return self.bone("c", (p0 + p1) / 2, rot, dims, cortex, name, inner=inner, end_cortex=end_cortex, clip=clip)

    def chain(self, pts, radii, name, cortex=0.0, solid=False, mu_abs=None, xhints=None, inner="cancellous",
              closed=False):
        """A curved bone as a chain of rods through ``pts``, mitered at the joints: neighbouring
        segments are cut by the plane that bisects their directions, so they abut (no doubled
        density) and the bend shows no gap. ``radii`` is one (a, b) or one per segment, ``name``
        one string or one per segment; ``closed`` joins the last point back to the first (a ring)."""
        pts = [np.asarray(p, dtype=np.float64) for p in pts]
        if closed:
            pts = pts + [pts[0]]
        n = len(pts) - 1
        rr = [radii] * n if np.ndim(radii[0]) == 0 else list(radii)
        names = [name] * n if isinstance(name, str) else list(name)
        tans = [_unit(pts[i + 1] - pts[i]) for i in range(n)]
        for i in range(n):
            clip, p0, p1 = [], pts[i], pts[i + 1]
            ext = max(rr[i]) * 1.2 + 1.0     # overshoot, trimmed by the miter planes
            if i > 0 or closed:
                clip.append((pts[i], -_unit(tans[i - 1] + tans[i])))
                p0 = p0 - tans[i] * ext
            if i < n - 1 or closed:
                clip.append((pts[i + 1], _unit(tans[i] + tans[(i + 1) % n])))
                p1 = p1 + tans[i] * ext
            xh = (1, 0, 0) if xhints is None else xhints[i]
            self.rod(p0, p1, 0, cortex, names[i], inner=inner, xhint=xh, radii=rr[i], solid=solid, mu_abs=mu_abs,
                     clip=clip or None)

    def phantom(self, region, focus, long_axis, field_half, laterality="", mirror=False,
                jitter_deg=4.0, jitter_mm=5.0) -> Phantom:
        """Apply mirroring and a small random overall pose; package the phantom."""
        m = np.diag([-1.0, 1.0, 1.0]) if mirror else np.eye(3)
        rot = euler_rotation(*np.radians(self.rng.normal(0.0, jitter_deg / 2, 3).clip(-jitter_deg, jitter_deg)))
        pivot = m @ np.asarray(focus, dtype=np.float64)
        shift = self.rng.normal(0.0, jitter_mm / 2, 3).clip(-jitter_mm, jitter_mm)

        def tp(p):
            return pivot + rot @ (m @ p - pivot) + shift

        def td(d):
            return _unit(rot @ (m @ d))

        for p in self.prims:
            p.center = tp(p.center)
            p.rotation = rot @ (m @ p.rotation @ m)
            if mirror and isinstance(p, (ClippedEllipsoid, ClippedCylinder)):
                p.planes = p.planes.copy()
                p.planes[:, 0] *= -1.0   # local coordinates are mirrored along local x
        lms: dict[str, np.ndarray] = {}
        for k, v in self.points.items():
            lms[k] = tp(v)
        for k, v in self.dirs.items():
            lms[k] = td(v)
        lms.update({k: v.copy() for k, v in self.scalars.items()})
        return Phantom(region=region, primitives=self.prims, landmarks=lms, focus=tp(np.asarray(focus, float)),
                       long_axis=td(long_axis), field_half_mm=float(field_half), laterality=laterality)


# ----------------------------------------------------------------------------------------------
# shared anatomy: vertebrae, long bones
# ----------------------------------------------------------------------------------------------
def _vertebra(b: _B, name, c, tilt, w, d, h, ped_w, ped_h, ped_len, conv_deg, tp_len, sp_len,
              sp_drop_deg=25.0, detail="full", facet_r=(5.0, 5.0), cortex=1.3, cervical=False):
    """One vertebra: body (elliptic cylinder shell), pedicles, lamina, facets, processes.

    ``tilt`` is the sagittal inclination (radians, rotation about x); left = +x.
    """
    R = euler_rotation(tilt, 0.0, 0.0)
    ex, ey, ez = R[:, 0], R[:, 1], R[:, 2]
    c = np.asarray(c, dtype=np.float64)
    b.bone("c", c, R, (w / 2, d / 2, h / 2), cortex, f"{name}.body", end_cortex=1.0)
    b.pt(f"{name}.body.center", c)
    b.sc(f"{name}.body.width", w)
    b.sc(f"{name}.body.depth", d)
    b.sc(f"{name}.body.height", h)
    b.dr(f"{name}.left", ex)
    b.dr(f"{name}.anterior", ey)
    b.dr(f"{name}.up", ez)
    zoff = h * 0.12
    xp = 0.34 * w if not cervical else 0.42 * w
    yw = -d / 2 * np.sqrt(max(0.05, 1 - (xp / (w / 2)) ** 2))
    ends = {}
    for side, sname in ((1, "left"), (-1, "right")):
        a = np.radians(conv_deg)
        dvec = _unit(-side * np.sin(a) * ex + np.cos(a) * ey)   # posterior -> anterior-medial
        wall = c + side * xp * ex + (yw + 1.0) * ey + zoff * ez
        pc = wall - dvec * (ped_len / 2)
        pend = wall - dvec * ped_len                              # posterior end (lamina / facet)
        ends[side] = pend
        rot = _frame(dvec, ex)
        dims = (ped_w / 2, ped_h / 2, ped_len / 2)
        if detail == "full" and not cervical:
            b.bone("c", pc, rot, dims, min(1.8, ped_w / 4), f"{name}.pedicle_{sname}", end_cortex=0.4)
        else:
            b.solid("c", pc, rot, dims, f"{name}.pedicle_{sname}", mu_abs=0.047, material="cortical")
        # screw trajectory: entry a few mm behind the pedicle, tip at ~75 % of body depth
        entry = pend - dvec * (3.0 if not cervical else 1.5)
        t = ((c - entry) @ ey + 0.25 * d) / (dvec @ ey)
        b.pt(f"{name}.pedicle_{sname}.entry", entry)
        b.dr(f"{name}.pedicle_{sname}.direction", dvec)
        b.sc(f"{name}.pedicle_{sname}.length", t)
        b.sc(f"{name}.pedicle_{sname}.diameter", min(ped_w, ped_h))
        if detail == "full":
            # facet column (superior + inferior articular processes) / lateral mass
            fc = pend - 2.0 * dvec + side * 1.0 * ex
            b.solid("e", fc, R, (facet_r[0], facet_r[1], h * (0.62 if cervical else 0.55)),
                    f"{name}.facet_{sname}", mu_abs=0.042)
            if cervical:
                b.pt(f"{name}.lateral_mass_{sname}.center", fc)
                b.sc(f"{name}.lateral_mass_{sname}.radius", facet_r[0])
            if tp_len > 0:
                tdir = _unit(side * ex - 0.25 * ey + (0.0 if not cervical else -0.1) * ez)
                t0 = pend + side * 2.0 * ex
                b.rod(t0, t0 + tdir * tp_len, 0, 0, f"{name}.transverse_{sname}", xhint=ey,
                      radii=(3.5, 4.5) if not cervical else (2.5, 3.0), solid=True, mu_abs=0.040)
    # lamina and spinous process
    lam_c = (ends[1] + ends[-1]) / 2 - 3.0 * ey - 0.1 * h * ez
    half_x = abs((ends[1] - ends[-1]) @ ex) / 2 + 2.0
    if detail == "full":
        b.solid("b", lam_c, R, (half_x, 3.0, h * 0.42), f"{name}.lamina", mu_abs=0.043)
    b.pt(f"{name}.lamina.center", lam_c)
    if sp_len <= 0:
        return
    dn = np.radians(sp_drop_deg)
    sdir = _unit(-np.cos(dn) * ey - np.sin(dn) * ez)
    s0 = lam_c - 1.5 * ey
    b.rod(s0, s0 + sdir * sp_len, 0, 0, f"{name}.spinous", xhint=ex,
          radii=(2.8, h * (0.28 if not cervical else 0.22)), solid=True, mu_abs=0.042)
    b.pt(f"{name}.spinous.tip", s0 + sdir * sp_len)


def _spine_curve(levels, z_top, spacing, y_mid, amp, sign=1.0):
    """Centres and sagittal tilts along a parabolic lordosis (sign=+1) / kyphosis (-1)."""
    n = len(levels)
    zs = z_top - np.cumsum(np.r_[0.0, spacing[:-1]])
    zm = (zs[0] + zs[-1]) / 2
    half = max((zs[0] - zs[-1]) / 2, 1.0)
    ys = y_mid + sign * amp * (1 - ((zs - zm) / half) ** 2)
    dydz = sign * amp * (-2 * (zs - zm) / half ** 2)
    tilts = np.arctan(dydz)  # rotation about x so that local z follows the curve (z up, y forward)
    return [(np.array([0.0, ys[i], zs[i]]), -tilts[i]) for i in range(n)]


def _long_bone(b: _B, name, p_dist, p_prox, r, cortex, xhint=(1, 0, 0), radii=None):
    """A long-bone diaphysis: cortical tube with a marrow canal, plus shaft landmarks."""
    p_dist = np.asarray(p_dist, float)
    p_prox = np.asarray(p_prox, float)
    rr = (r, r) if radii is None else radii
    b.rod(p_dist, p_prox, r, cortex, f"{name}.shaft", inner="marrow", xhint=xhint, radii=rr, end_cortex=0.5)
    ax = _unit(p_prox - p_dist)
    b.dr(f"{name}.shaft.axis", ax)
    b.pt(f"{name}.shaft.center", (p_dist + p_prox) / 2)
    b.pt(f"{name}.shaft.proximal", p_prox)
    b.pt(f"{name}.shaft.distal", p_dist)
    b.sc(f"{name}.shaft.radius", min(rr))
    b.sc(f"{name}.shaft.canal_radius", min(rr) - cortex)
    b.sc(f"{name}.shaft.cortex", cortex)
    b.sc(f"{name}.shaft.length", np.linalg.norm(p_prox - p_dist))


# ----------------------------------------------------------------------------------------------
# regions
# ----------------------------------------------------------------------------------------------
def _skull(b: _B) -> Phantom:
    s = b.n(1.0, 0.05, 0.88, 1.12)
    hw, hd, hh = 72 * s * b.n(1, .03), 92 * s * b.n(1, .03), 80 * s * b.n(1, .03)
    # head and neck soft tissue
    # head above a horizontal cut, neck cylinder below it: abutting pieces that hold the airway
    up = np.array([0.0, 0.0, 1.0])
    hz = hh + 52
    zn = -0.8 * hz
    b.tissue("e", (0, 12, 0), None, (hw + 14, hd + 34, hz), "body.head", clip=[((0, 0, zn), -up)])
    b.tissue("c", (0, -6, (zn - 210) / 2), None, (55 * s, 60 * s, (zn + 210) / 2), "body.neck",
             clip=[((0, 0, zn), up)])
    # calvarium: outer table, diploe, inner table, brain
    cc = np.array([0.0, -8.0, 28.0])
    t = b.u(5.5, 8.0)
    b._make("e", cc, None, (hw, hd, hh), MU["cortical"] - MU["soft"], "cortical", "calvarium.outer")
    b._make("e", cc, None, (hw - 2, hd - 2, hh - 2), MU["cancellous"] - MU["cortical"], "cancellous", "calvarium.diploe")
    b._make("e", cc, None, (hw - t + 1.8, hd - t + 1.8, hh - t + 1.8), MU["cortical"] - MU["cancellous"], "cortical", "calvarium.inner")
    b._make("e", cc, None, (hw - t, hd - t, hh - t), MU["soft"] - MU["cortical"], "soft", "brain")
    # skull base: anterior cranial fossa floor/orbital roofs, sphenoid, petrous ridges, occiput
    b.solid("b", (0, 35 * s, -12), euler_rotation(np.radians(-8), 0, 0), (48 * s, 28 * s, 4), "skull_base.anterior", mu_abs=0.045)
    b.solid("b", (0, 5 * s, -22), None, (20 * s, 15 * s, 12), "skull_base.sphenoid", mu_abs=0.040)
    b.air("e", (0, 8 * s, -24), None, (12 * s, 9 * s, 8), "sinus.sphenoid", base="cancellous")
    for side in (1, -1):
        ang = np.radians(side * 45)
        b.solid("e", (side * 34 * s, -22 * s, -25), euler_rotation(0, 0, ang), (9, 30 * s, 8), "skull_base.petrous",
                mu_abs=0.075, material="cortical")
        b.solid("e", (side * 52 * s, -40 * s, -45), None, (11, 13, 15), "mastoid", mu_abs=0.030)
    b.solid("e", (0, -55 * s, -35), euler_rotation(np.radians(-35), 0, 0), (40 * s, 12, 30 * s), "skull_base.occiput", mu_abs=0.045)
    # face: maxilla/zygoma block with orbits, sinuses and nasal cavity
    fy = 68 * s
    b.solid("e", (0, fy, -40), None, (52 * s, 26 * s, 38 * s), "maxilla", mu_abs=0.036)
    b.air("e", (0, fy + 4 * s, 36), None, (15 * s, 7 * s, 9 * s), "sinus.frontal", mu=-0.0205)
    for side in (1, -1):
        oc = np.array([side * 30 * s, fy + 8 * s, 2.0])
        b.air("e", oc, None, (17.5 * s, 20 * s, 15.5 * s), "orbit", mu=MU["fat"] - MU["soft"] - 0.016,
              material="fat")
        b.air("e", (side * 20 * s, fy, -36), None, (13 * s, 13 * s, 15 * s), "sinus.maxillary", mu=-0.036)
        b.solid("e", (side * 50 * s, fy - 12, -14), euler_rotation(0, 0, side * 0.5), (8, 22 * s, 7), "zygoma", mu_abs=0.048,
                material="cortical")
    b.air("e", (0, fy + 4, -32), None, (6.5 * s, 15 * s, 19 * s), "nasal_cavity", mu=-0.030)
    # mandible: body (two halves), symphysis, rami
    mz = -88 * s
    chin = np.array([0.0, fy + 22 * s, mz])
    for side in (1, -1):
        angle = np.array([side * 48 * s, fy - 52 * s, mz + 8])
        b.rod(angle, chin + np.array([side * 12, -4, 0]), 0, 3.0, "mandible.body", radii=(13, 6), xhint=(0, 0, 1))
        b.pt(f"mandible_{'left' if side > 0 else 'right'}.angle", angle)
        b.pt(f"mandible_{'left' if side > 0 else 'right'}.front", chin + np.array([side * 12, -4, 0]))
        cond = np.array([side * 50 * s, fy - 62 * s, -30.0])
        b.rod(angle + np.array([0, 0, -8]), cond, 0, 2.5, "mandible.ramus", radii=(5, 14), xhint=(1, 0, 0))
    b.bone("e", chin + np.array([0, -7, 3]), None, (14, 8, 13), 3.0, "mandible.symphysis")
    # teeth: upper and lower arches
    for jaw, zt in (("upper", -62 * s), ("lower", -70 * s)):
        for side in (1, -1):
            for k in range(4):
                f = (k + 0.5) / 4
                x = side * (8 + 34 * f) * s
                y = fy + (20 - 40 * f ** 1.6) * s
                b.solid("c", (x, y, zt + (-5 if jaw == "upper" else 5)), None, (3.5 + 1.5 * f, 4 + 1.5 * f, 9),
                        f"tooth.{jaw}", mu_abs=MU["enamel"] * 0.75 + MU["soft"] * 0.25, material="enamel")
    # airway (pharynx) and upper cervical spine
    b.air("c", (0, 5 * s, -115), None, (9, 8, 45), "pharynx")
    for i, lev in enumerate(("C1", "C2", "C3")):
        z = (-62 - 20 * i) * s
        if lev == "C1":
            b.solid("e", (0, 2, z), None, (38 * s, 22 * s, 6), "C1.ring", mu_abs=0.040)
        else:
            _vertebra(b, lev, (0, -12 * s, z - 8), 0.05, 17, 15, 13, 5, 6, 7, 40, 0, 22, 20, detail="simple",
                      cervical=True)
    b.pt("skull.frontal", (0, fy + 24 * s, 30))
    b.pt("skull.vertex", cc + np.array([0, 0, hh]))
    b.pt("face.chin", chin)
    for side, sname in ((1, "left"), (-1, "right")):
        b.pt(f"orbit_{sname}.center", (side * 30 * s, fy + 8 * s, 2.0))
        b.pt(f"zygoma_{sname}.center", (side * 52 * s, fy - 12, -14))
        b.pt(f"mandible_{sname}.body", (side * 30 * s, fy - 14 * s, mz))
    b.dr("face.anterior", (0, 1, 0))
    focus = np.array([0.0, 15.0, -10.0])
    return b.phantom("skull", focus, (0, 0, 1), b.u(95, 115))


def _cervical(b: _B) -> Phantom:
    s = b.n(1.0, 0.05, 0.9, 1.1)
    up = np.array([0.0, 0.0, 1.0])
    b.tissue("c", (0, 2, -10), None, (58 * s, 62 * s, 120), "body.neck", clip=[((0, 0, -95), -up), ((0, 0, 60), up)])
    b.tissue("e", (0, -5, -120), None, (150 * s, 95 * s, 45), "body.shoulders", clip=[((0, 0, -95), up)])
    b.tissue("e", (0, 15, 120), None, (70 * s, 85 * s, 70), "body.head", clip=[((0, 0, 60), -up)])
    spacing = np.array([18.5, 18.0, 18.0, 18.5, 19.0, 19.5, 20.0]) * s
    curve = _spine_curve(range(7), 58 * s, spacing, -8 * s, 6 * s, sign=1.0)
    dims = [(17, 15, 13), (17.5, 15.5, 13.5), (18.5, 16, 13.5), (19.5, 16, 14), (21, 16.5, 14), (23, 17, 15)]
    for i in range(7):
        c, tilt = curve[i]
        lev = f"C{i + 1}"
        if i == 0:
            # atlas: anterior arch, lateral masses, posterior arch
            b.solid("e", c + np.array([0, 12, 0]), None, (8, 5, 6), "C1.anterior_arch", mu_abs=0.045)
            for side in (1, -1):
                b.solid("e", c + np.array([side * 19 * s, 0, 0]), None, (8, 10, 7), "C1.lateral_mass", mu_abs=0.045)
            b.solid("b", c + np.array([0, -24 * s, 2]), None, (14, 3, 4), "C1.posterior_arch", mu_abs=0.045)
            continue
        w, d, h = (np.array(dims[i - 1]) * s * b.n(1, 0.03)).tolist()
        conv = 40 + b.u(-5, 5)
        sp = (22 + 4 * i) * s if i < 6 else 40 * s
        _vertebra(b, lev, c, tilt, w, d, h, 5, 6.5, 7.5, conv, 0, sp, 18, detail="full", facet_r=(8, 8),
                  cervical=True)
        if i == 1:  # dens
            b.rod(c + np.array([0, 0, 4]), c + np.array([0, 0, 22 * s]), 5.0, 1.5, "C2.dens")
    # skull base / occiput and mastoids, mandible at the top
    b.solid("b", (0, -25 * s, 78 * s), euler_rotation(np.radians(-25), 0, 0), (45 * s, 25 * s, 6), "skull_base.occiput",
            mu_abs=0.05, material="cortical")
    for side in (1, -1):
        b.solid("e", (side * 48 * s, -10, 72 * s), None, (11, 13, 15), "mastoid", mu_abs=0.034)
        b.rod((side * 45 * s, -5 * s, 70 * s), (side * 42 * s, 40 * s, 25 * s), 0, 2.5, "mandible.ramus", radii=(5, 12))
        b.rod((side * 42 * s, 40 * s, 25 * s), (side * 10 * s, 78 * s, 20 * s), 0, 3.0, "mandible.body", radii=(13, 6),
              xhint=(0, 0, 1))
    b.bone("e", (0, 80 * s, 20 * s), None, (14, 8, 15), 3.0, "mandible.symphysis")
    b.solid("e", (0, 25 * s, 10 * s), None, (16, 8, 5), "hyoid", mu_abs=0.038)
    # airway: pharynx -> larynx -> trachea (anterior to the vertebral bodies)
    zj = np.array([0.0, 0.0, -8.0])   # pharynx / larynx junction: the two air columns abut
    b.air("c", (0, 22 * s, 20), None, (10, 8, 35), "pharynx", clip=[(zj, -up)])
    b.air("c", (0, 30 * s, -55), euler_rotation(np.radians(-8), 0, 0), (8.5, 7.5, 55), "trachea", clip=[(zj, up)])
    # clavicles at the bottom
    for side in (1, -1):
        b.rod((side * 12, 45, -112), (side * 75 * s, 25, -100), 0, 2.5, "clavicle", radii=(7, 6))
        b.rod((side * 75 * s, 25, -100), (side * 135 * s, -5, -88), 0, 2.5, "clavicle", radii=(7, 6))
    b.pt("neck.center", (0, 0, 0))
    focus = np.array([0.0, 0.0, b.u(-15, 10)])
    return b.phantom("cervical spine", focus, (0, 0, 1), b.u(85, 105))


def _thorax(b: _B) -> Phantom:
    s = b.n(1.0, 0.05, 0.88, 1.12)
    W, D = b.n(150, 10, 125, 175) * s, b.n(105, 8, 90, 125) * s
    b.tissue("c", (0, 0, 0), None, (W, D, 230), "body.chest")
    dome = b.u(-115, -85)
    for side, name in ((-1, "right"), (1, "left")):
        # each lung stays inside the chest wall (a ~12 mm margin for ribs and intercostal muscle)
        ztop, zbot = 150.0, dome + (0 if side < 0 else -15)
        b.air("e", (side * 0.47 * W, 2, (ztop + zbot) / 2), None, (0.38 * W, 0.74 * D, (ztop - zbot) / 2),
              f"lung_{name}", material="lung")
    # heart and great vessels
    b.air("e", (22 * s, 25, -55), euler_rotation(0, np.radians(-20), np.radians(-25)), (62 * s, 50 * s, 55 * s), "heart",
          mu=0.95 * (MU["soft"] - MU["lung"]), material="soft")
    b.air("c", (10, -15, 40), None, (22, 30, 80), "mediastinum", mu=0.7 * (MU["soft"] - MU["lung"]), material="soft")
    b.air("c", (0, -0.2 * D, 150), euler_rotation(np.radians(5), 0, 0), (8, 7, 70), "trachea", base="soft")
    # liver under the right dome: soft, nothing to add; stomach bubble under the left dome
    b.air("e", (70 * s, 20, dome - 35), None, (35, 25, 18), "stomach_gas")
    # thoracic spine T1..T12
    n = 12
    hts = np.linspace(15, 24, n) * s
    spacing = hts + np.linspace(4, 6, n)
    yv = -0.45 * D
    curve = _spine_curve(range(n), 200, spacing, yv, 10 * s, sign=-1.0)
    zlev = []
    for i in range(n):
        c, tilt = curve[i]
        f = i / (n - 1)
        w, d, h = (26 + 14 * f) * s, (18 + 12 * f) * s, hts[i]
        _vertebra(b, f"T{i + 1}", c, tilt, w, d, h, 6.5 + 2 * f, 11 + 4 * f, 12, 8 + b.u(-2, 2), 0, 0, 45,
                  detail="simple", cortex=1.2)
        zlev.append(c)
    # ribs 1..10: three chords of an ellipse around the chest, descending anteriorly
    mu_rib = 0.046
    for k in range(10):
        c = zlev[k]
        sc = 0.55 + 0.45 * min(1.0, (k + 1) / 5)
        rx, ry = (W - 14) * sc, (D - 12) * (0.75 + 0.25 * sc)
        yc = c[1] + ry - 12
        nseg = 3 if k < 2 else 4
        us = np.linspace(0.0, 1.0, nseg + 1)
        phis = np.radians(-80 + 115 * us)
        drop = (35 + 6 * k) * s
        for side in (1, -1):
            pts = []
            for u, ph in zip(us, phis):
                z = c[2] + 4 - drop * 0.74 * u ** 1.6
                p = np.array([side * rx * np.cos(ph), yc + ry * np.sin(ph), z])
                # keep the rib inside the chest wall (the body's elliptic cross-section, 11 mm in)
                q = np.hypot(p[0] / (W - 11), p[1] / (D - 11))
                if q > 1.0:
                    p[:2] /= q
                pts.append(p)
            pts[0][0] = side * (14 + 0.2 * k) * s
            xh = [(pts[j] + pts[j + 1]) / 2 - np.array([0, yc, (pts[j][2] + pts[j + 1][2]) / 2])
                  for j in range(nseg)]
            b.chain(pts, (3.5, 6.0), f"rib{k + 1}", solid=True, mu_abs=mu_rib, xhints=xh)
            lat_pt = side * rx * np.cos(np.radians(-28))
            j = int(np.argmin([abs(p[0] - lat_pt) for p in pts]))
            b.pt(f"rib{k + 1}_{'left' if side > 0 else 'right'}.lateral", pts[j])
    # clavicles, scapulae, sternum
    zc = zlev[0][2] + 5
    for side in (1, -1):
        b.rod((side * 15, D - 20, zc - 10), (side * (W - 20), -10, zc + 12), 0, 0, "clavicle", radii=(8, 7),
              solid=True, mu_abs=0.048)
        # scapula flat on the posterior chest wall, tangent to it
        ct = 0.62
        sc_c = np.array([side * ct * W, -(D * np.sqrt(1 - ct ** 2) - 17), zc - 70])
        tang = np.arctan2(ct * D, np.sqrt(1 - ct ** 2) * W)
        b.solid("e", sc_c, euler_rotation(0, 0, side * tang), (45 * s, 5, 70 * s), "scapula", mu_abs=0.040)
    b.solid("b", (0, D - 22, zc - 75), euler_rotation(np.radians(10), 0, 0), (14, 5, 75), "sternum", mu_abs=0.036)
    mid = curve[6][0]
    focus = np.array([0.0, mid[1] + b.u(0, 40), mid[2] + b.u(-40, 40)])
    return b.phantom("thorax", focus, (0, 0, 1), b.u(110, 140))


def _lumbar(b: _B) -> Phantom:
    s = b.n(1.0, 0.05, 0.88, 1.12)
    W, D = b.n(150, 12, 120, 185) * s, b.n(110, 10, 90, 135) * s
    fat = b.u(8, 30)
    b.tissue("c", (0, 0, 0), None, (W, D, 200), "body.abdomen", material="fat")
    b.tissue("c", (0, 0, 0), None, (W - fat, D - fat, 200), "body.muscle", material="soft", base="fat")
    spacing = np.array([38, 39, 40, 40, 39]) * s * b.n(1, 0.03)
    curve = _spine_curve(range(5), 80 * s, spacing, -0.35 * D, 9 * s, sign=1.0)
    for i in range(5):
        c, tilt = curve[i]
        f = i / 4
        w = (42 + 8 * f) * s * b.n(1, 0.03)
        d = (31 + 3 * f) * s
        h = (26 + 2 * f) * s
        _vertebra(b, f"L{i + 1}", c, tilt + (np.radians(8) if i == 4 else 0), w, d, h, (8 + 7 * f) * s, 14 * s,
                  (16 + 2 * f) * s, 10 + 15 * f + b.u(-2, 2), (22, 26, 30, 26, 18)[i] * s, 28 * s, 20,
                  detail="full", facet_r=(6, 6))
    # last ribs (T12 level) and sacrum top, iliac crests
    zt = curve[0][0][2] + 38
    for side in (1, -1):
        p0 = np.array([side * 20, curve[0][0][1] - 15, zt])
        p1 = np.array([side * 70 * s, curve[0][0][1] - 30, zt - 25])
        p2 = np.array([side * 105 * s, curve[0][0][1] - 10, zt - 70])
        b.rod(p0, p1, 0, 0, "rib12", radii=(3.5, 5.5), solid=True, mu_abs=0.045)
        b.rod(p1, p2, 0, 0, "rib12", radii=(3.5, 5.0), solid=True, mu_abs=0.045)
    zs = curve[4][0][2] - 45 * s
    b.bone("b", (0, curve[4][0][1] - 12, zs), euler_rotation(np.radians(35), 0, 0), (26 * s, 18 * s, 22 * s), 2.0,
           "sacrum")
    for side in (1, -1):
        ic = np.array([side * 85 * s, curve[4][0][1] + 10, zs + 10])
        b.bone("e", ic, euler_rotation(0, 0, side * np.radians(35)), (55 * s, 9, 40 * s), 2.0, "ilium")
    # psoas shadows are soft-on-soft; bowel gas anteriorly
    _bowel_gas(b, W, D, fat, int(b.rng.integers(3, 9)), -120, 100)
    mid = curve[2][0]
    focus = np.array([0.0, mid[1] + b.u(-5, 15), mid[2] + b.u(-35, 35)])
    return b.phantom("lumbar spine", focus, (0, 0, 1), b.u(90, 115))


def _bowel_gas(b: _B, W, D, fat, n, z0, z1):
    """Gas bubbles in the anterior abdomen, kept inside the muscle envelope and apart from each
    other (overlapping bubbles would subtract the soft tissue twice)."""
    placed: list[tuple[np.ndarray, float]] = []
    for _ in range(n):
        for _try in range(12):
            r = b.u(8, 20)
            rx = r * b.u(1, 1.6)
            rz = r * b.u(0.6, 1.2)
            R = max(rx, r)
            x = b.u(-1, 1) * 0.75 * (W - fat - R - 8)
            y = b.u(0.05 * D, max(0.06 * D, D - fat - R - 8))
            yl = (D - fat - 8) * np.sqrt(max(0.0, 1 - (abs(x) / (W - fat)) ** 2)) - R
            y = min(y, max(0.0, yl))
            c = np.array([x, y, b.u(z0, z1)])
            rot = euler_rotation(0, 0, b.u(0, 3))
            Rb = max(rx, r, rz)   # bounding sphere
            if all(np.linalg.norm(c - c2) > Rb + r2 + 1.0 for c2, r2 in placed):
                placed.append((c, Rb))
                b.air("e", c, rot, (rx, r, rz), "bowel_gas")
                break


def _proximal_femur(b: _B, side, head_c, s, name="femur", shaft_len=200.0, neck_shaft_deg=130.0,
                    antev_deg=12.0):
    """A proximal femur whose head centre is ``head_c``; side=+1 left (+x), -1 right.

    Head, neck, trochanteric block and shaft are cut along shared planes so that they abut:
    one continuous bone with a cortex only on its outer surface (no doubled overlaps)."""
    hr = b.n(23.5, 1.5, 20, 27) * s
    lat = np.array([side * 1.0, 0, 0])  # lateral is away from the midline
    nsa = np.radians(neck_shaft_deg)
    av = np.radians(antev_deg)
    # neck direction from head to the base (lateral, down, slightly posterior)
    neck_dir = _unit(np.array([side * np.cos(np.pi / 2 - (nsa - np.pi / 2)), -np.sin(av), -np.sin(nsa - np.pi / 2)]))
    neck_len = 48 * s
    base = head_c + neck_dir * neck_len
    hj = head_c + neck_dir * hr * 0.62                       # head-neck junction plane
    b.bone("e", head_c, None, (hr, hr, hr), 1.6, f"{name}.head", clip=[(hj, neck_dir)])
    b.rod(hj, base, 0, 2.0, f"{name}.neck", radii=(15 * s, 17 * s), xhint=(0, 1, 0), end_cortex=0.0)
    top = base + np.array([side * 8, -4, -6]) * s
    shaft_top = top + np.array([0, 0, -34 * s])
    shaft_dir = _unit(np.array([-side * 0.12, 0.03, -1.0]))
    # trochanteric block: greater trochanter on top, lateral to the neck base, down to the shaft
    blk = top + np.array([side * 2, 0, 4]) * s
    b.bone("e", blk, euler_rotation(0, side * np.radians(-8), 0), (25 * s, 21 * s, 46 * s), 2.0,
           f"{name}.intertrochanteric", clip=[(base, -neck_dir), (shaft_top, shaft_dir)])
    gt = blk + np.array([side * 8, -4, 30]) * s
    b.solid("e", top + np.array([-side * 19, -12, -26]) * s, None, (7, 7, 10), f"{name}.lesser_trochanter",
            mu_abs=0.044)
    shaft_bot = shaft_top + shaft_dir * shaft_len
    r = b.n(13.5, 1.0, 11.5, 15.5) * s
    _long_bone(b, name, shaft_bot, shaft_top, r, b.n(5.5, 0.5, 4.5, 6.5) * s)
    b.pt(f"{name}.head.center", head_c)
    b.sc(f"{name}.head.radius", hr)
    b.dr(f"{name}.neck.axis", -neck_dir)          # from the lateral cortex towards the head
    b.pt(f"{name}.neck.base", base)
    b.pt(f"{name}.neck.center", head_c + neck_dir * neck_len * 0.55)
    b.sc(f"{name}.neck.radius", 15 * s)
    # lateral cortex point on the neck axis (entry of hip screws)
    entry = head_c + neck_dir * (neck_len + 36 * s)
    b.pt(f"{name}.neck.entry", entry)
    b.sc(f"{name}.neck.length", np.linalg.norm(head_c - entry) + hr * 0.55)
    b.pt(f"{name}.greater_trochanter.tip", gt + np.array([0, 0, 14 * s]))
    b.pt(f"{name}.nail_entry", gt + np.array([-side * 8, 0, 12 * s]))
    b.dr(f"{name}.lateral", lat)
    b.dr(f"{name}.anterior", (0, 1, 0))
    return shaft_bot, shaft_top, r


def _acetabulum(b: _B, side, hc, hr, s, name):
    """Acetabular roof (sourcil) and medial wall (teardrop) cut off by planes 3 mm outside the
    femoral head, so the joint space shows and the head's density is never doubled."""
    up = np.array([0.0, 0.0, 1.0])
    med = np.array([-side * 1.0, 0.0, 0.0])
    b.bone("e", hc + np.array([-side * 6, -4, hr * 0.55]), euler_rotation(0, side * 0.3, 0), (30 * s, 27 * s, 24 * s),
           2.0, f"{name}", clip=[(hc + up * (hr + 3.0), -up, 2.0)])
    b.bone("e", hc + med * (hr + 9), None, (9 * s, 22 * s, 26 * s), 1.8, f"{name}.medial_wall",
           clip=[(hc + med * (hr + 3.0), -med, 1.8), (hc + up * (hr + 3.0), up)])


def _pelvis(b: _B) -> Phantom:
    s = b.n(1.0, 0.05, 0.9, 1.1)
    W, D = b.n(180, 12, 160, 210) * s, b.n(115, 10, 95, 140) * s
    fat = b.u(8, 30)
    W = max(W, (95 if True else 90) * s + 85 + fat)
    b.tissue("c", (0, 0, -30), None, (W, D, 230), "body.pelvis", material="fat")
    b.tissue("c", (0, 0, -30), None, (W - fat, D - fat, 230), "body.muscle", material="soft", base="fat")
    female = b.rng.random() < 0.5
    hx = (95 if female else 90) * s
    for side in (1, -1):
        sn = "left" if side > 0 else "right"
        hc = np.array([side * hx, 10 * s, -15 * s])
        # iliac wing: a thin fan-shaped plate (an ellipsoid cut by two borders converging on the
        # acetabulum) whose upper edge is the thick, curved iliac crest (a mitered rod chain)
        Rw = euler_rotation(np.radians(8), -side * 0.25, side * np.radians(40))
        cw = np.array([side * 78, -25, 70]) * s
        ax_, az_ = 64 * s, 54 * s                       # in-plane half sizes (local x, local z)
        apex = np.array([0.0, 0.0, -80 * s])            # fan apex (local), near the acetabulum
        fan = np.radians(40)
        lw = lambda q: cw + Rw @ np.asarray(q, float)   # local -> world
        clip = []
        for sx in (1, -1):
            nl = np.array([sx * np.cos(fan), 0.0, -np.sin(fan)])
            clip.append((lw(apex), Rw @ nl))
        ths = np.radians(np.linspace(8, 172, 6))
        rim = [np.array([ax_ * 0.95 * np.cos(th), 0.0, az_ * 0.95 * np.sin(th) - 4 * s]) for th in ths]
        rc_ = 5.0 * s
        for k in range(len(rim) - 1):
            e = _unit(rim[k + 1] - rim[k])
            nrm = np.array([e[2], 0.0, -e[0]])           # in-plane, pointing out of the fan
            nrm = nrm if nrm @ (rim[k] - apex) > 0 else -nrm
            clip.append((lw(rim[k] - nrm * 0.6 * rc_), Rw @ nrm))
        b.bone("e", cw, Rw, (ax_, 6.0, az_), 1.6, f"ilium_{sn}", clip=clip)
        crest = [lw(p) for p in rim]
        b.chain(crest, (rc_, rc_ * 1.3), "ilium.crest", solid=True, mu_abs=0.050,
                xhints=[Rw[:, 1]] * (len(crest) - 1))
        # obturator foramen: an oval gap ringed by the ischium (posterior) and the superior and
        # inferior pubic rami (anterior), one closed mitered chain of rods
        isch_top = hc + np.array([-side * 26, -16, -22]) * s
        isch_bot = np.array([side * 58, -12, -72]) * s
        sym = np.array([side * 8, 62 * (1.05 if female else 1.0), -48]) * s
        sup = hc + np.array([-side * 28, 18, -8]) * s
        oc = (isch_top + isch_bot + sym + sup) / 4
        e1 = _unit(sym - isch_top)
        nrm = _unit(np.cross(e1, isch_bot - isch_top))
        e2 = _unit(np.cross(nrm, e1))
        e2 = e2 if e2[2] > 0 else -e2
        ru, rv = 0.36 * np.linalg.norm(sym - isch_top), 26 * s
        phs = np.radians(np.arange(10) * 36.0 + 18.0)
        ring = [oc + e1 * ru * np.cos(ph) + e2 * rv * np.sin(ph) for ph in phs]
        names, radii = [], []
        for k in range(10):
            m = (ring[k] + ring[(k + 1) % 10]) / 2 - oc
            if m @ e1 < -0.25 * ru:
                names.append(f"ischium_{sn}")
                radii.append((9 * s, 10 * s) if m @ e2 < 0 else (7.5 * s, 8.5 * s))
            elif m @ e2 > 0:
                names.append(f"pubis_superior_{sn}")
                radii.append((6.5 * s, 7.5 * s))
            else:
                names.append(f"pubis_inferior_{sn}")
                radii.append((5.5 * s, 6.5 * s))
        b.chain(ring, radii, names, cortex=1.8, closed=True, xhints=[nrm] * 10)
        b.pt(f"obturator_{sn}.center", oc)
        _proximal_femur(b, side, hc, s, name=f"femur_{sn}", shaft_len=150 * s)
        _acetabulum(b, side, hc, float(b.scalars[f"femur_{sn}.head.radius"][0]), s, f"acetabulum_{sn}")
        b.pt(f"acetabulum_{sn}.center", hc)
        b.pt(f"iliac_crest_{sn}", np.array([side * 95, -20, 115]) * s)
    # sacrum (tilted wedge), sacral alae, coccyx, L5
    b.bone("e", np.array([0, -55, 38]) * s, euler_rotation(np.radians(35), 0, 0), (52 * s, 17 * s, 58 * s), 2.0, "sacrum",
           clip=[(np.array([sd * 50, -55, 93]) * s, (sd * 0.945, 0, -0.327), 2.0) for sd in (1, -1)])
    for k in range(3):
        for side in (1, -1):
            b.air("e", np.array([side * 16, -52 + 8 * k, 62 - 20 * k]) * s, None, (5, 8, 5), "sacrum.foramen",
                  mu=-0.011)
    for side in (1, -1):
        # iliac crest rim and the arcuate line (pelvic brim) as dense cortical lines
        b.rod(np.array([side * 42, -45, 62]) * s, np.array([side * 72, 22, 8]) * s, 0, 0, "ilium.arcuate_line",
              radii=(3.5, 3.5), solid=True, mu_abs=0.055)
        b.pt(f"sacrum.S1_{'left' if side > 0 else 'right'}.entry", np.array([side * 75, -55, 40]) * s)
    b.dr("sacrum.S1.direction_left", (-1, 0.1, 0.05))
    b.solid("e", np.array([0, -82, -28]) * s, euler_rotation(np.radians(55), 0, 0), (8, 5, 18), "coccyx", mu_abs=0.038)
    b.bone("c", np.array([0, -25, 100]) * s, euler_rotation(np.radians(-15), 0, 0), (25 * s, 17 * s, 13 * s), 1.3, "L5.body")
    _bowel_gas(b, W, D, fat, int(b.rng.integers(2, 7)), 0, 130)
    side = 1 if b.rng.random() < 0.5 else -1
    b.sc("hip.side", side)
    if b.rng.random() < 0.5:
        focus, fh = np.array([0.0, 0.0, 15.0]), b.u(120, 150)
    else:
        focus, fh = np.array([side * hx * 0.9, 0.0, -30.0]), b.u(85, 105)
    return b.phantom("pelvis and hip", focus, (0, 0, 1), fh)


def _distal_femur(b: _B, s, shaft_bot, r, name="femur", lat=-1.0):
    """Distal femur: a flared metaphysis (shaft radius at the top) cut flat above two condyles that
    are separated by the intercondylar notch; the pieces abut, they do not overlap. Right: lateral=-x."""
    sb = np.asarray(shaft_bot, float)
    up = np.array([0.0, 0.0, 1.0])
    X, Y = 38 * s, 26 * s
    Z = 43 * s
    hz = Z * np.sqrt(max(0.05, 1 - (r / X) ** 2))
    zc_cut = sb[2] - hz
    mc = np.array([sb[0], sb[1] - 2, zc_cut])
    b.bone("e", mc, None, (X, Y, Z), 1.8, f"{name}.metaphysis", clip=[(sb, up), (mc, -up)])
    jz = zc_cut - 26 * s
    for cs, sn in ((-lat, "medial"), (lat, "lateral")):
        cc = np.array([mc[0] + cs * 19.5 * s, mc[1] - 5 * s, zc_cut])
        b.bone("e", cc, None, (16.5 * s, 30 * s, 26 * s), 1.6, f"{name}.condyle_{sn}", clip=[(mc, up)])
        b.pt(f"{name}.condyle_{sn}.center", cc)
    b.pt(f"{name}.distal.center", mc + np.array([0, 0, 8 * s]))
    b.pt(f"{name}.joint", np.array([mc[0], mc[1] - 4, jz]))
    return jz


def _canal_blend(b: _B, name, p, inward, rc):
    """Cancellous bone fading into the marrow canal from the flared end at ``p``: two nested
    half-ellipsoids in the canal (flat on the junction plane, domed towards the shaft) so the
    projected density falls off smoothly instead of stepping from cancellous to marrow."""
    inward = _unit(inward)
    rot = _frame(inward)
    d_mu = (MU["cancellous"] - _MARROW) / 2
    for k, ln in enumerate((46.0, 22.0)):
        rr = rc * (0.92 - 0.12 * k)
        b._make("e", p, rot, (rr, rr, ln), d_mu, "cancellous", f"{name}.metaphysis_blend",
                clip=[(p, -inward)])


def _proximal_tibia(b: _B, s, top, name="tibia", lat=-1.0, shaft_len=300.0):
    """Tibial plateau at z=top[2]: one flared shape cut flat at the plateau that narrows to the
    shaft; tibial spines on top, tuberosity in front, fibular head posterolaterally."""
    top = np.asarray(top, float)
    up = np.array([0.0, 0.0, 1.0])
    pc = top + np.array([0, 0, -12 * s])
    X, Y, Z = 38 * s, 27 * s, 60 * s
    r = b.n(12.5, 0.8, 10.5, 14.5) * s
    ec = top - np.array([0, 0, 6 * s])
    hz = Z * np.sqrt(max(0.05, 1 - (r / X) ** 2))
    s_top = ec - np.array([0, 0, hz])
    b.bone("e", ec, None, (X, Y, Z), 1.4, f"{name}.plateau", clip=[(top, up, 1.4), (s_top, -up)])
    b.solid("e", top + np.array([0, -2, 0]), None, (6, 6, 6), f"{name}.spines", mu_abs=0.040, clip=[(top, -up)])
    tz = -30 * s
    ty = Y * np.sqrt(max(0.0, 1 - ((tz + 6 * s) / Z) ** 2))
    b.solid("e", top + np.array([0, ty + 3, tz]), None, (9, 5, 14), f"{name}.tuberosity", mu_abs=0.040)
    s_bot = s_top + np.array([0, 0, -shaft_len])
    cortex = b.n(5, 0.5, 4, 6) * s
    _long_bone(b, name, s_bot, s_top, r, cortex, radii=(r, r * 1.08))
    _canal_blend(b, name, s_top, -up, r - cortex)
    b.pt(f"{name}.plateau.center", pc)
    b.sc(f"{name}.plateau.radius", 38 * s)
    b.pt(f"{name}.nail_entry", top + np.array([0, 14 * s, -4]))
    # fibula head, posterolateral, below the lateral plateau
    fh = pc + np.array([lat * 36 * s, -14 * s, -28 * s])
    b.bone("e", fh, None, (10 * s, 10 * s, 13 * s), 1.2, "fibula.head", clip=[(fh - up * 8, -up)])
    return s_top, s_bot, fh, r


def _femur(b: _B) -> Phantom:
    s = b.n(1.0, 0.05, 0.9, 1.1)
    # right femur, head medial (+x), built with the knee at z ~ -230
    hc = np.array([45.0 * s, 0.0, 240.0 * s])
    shaft_len = b.n(300, 15, 260, 340) * s
    sb, st, r = _proximal_femur(b, -1, hc, s, name="femur", shaft_len=shaft_len, neck_shaft_deg=b.u(125, 138))
    jz = _distal_femur(b, s, sb, r, name="femur", lat=-1.0)
    _proximal_tibia(b, s, np.array([sb[0], sb[1] - 4, jz - 6]), lat=-1.0, shaft_len=60)
    b.bone("e", np.array([sb[0], sb[1] + 38 * s, jz + 40 * s]), None, (21 * s, 10 * s, 24 * s), 2.0, "patella")
    _acetabulum(b, -1, hc, float(b.scalars["femur.head.radius"][0]), s, "acetabulum")
    # thigh envelope: tapered (ellipsoid) with a fat layer
    fat = b.u(6, 25)
    rt = b.n(80, 8, 62, 105) * s
    rt = max(rt, 85 * s)
    zt, zb = hc[2] + 70, jz - 160
    cx = (hc[0] + sb[0]) / 2 - 5
    b.tissue("c", (cx, 0, (zt + zb) / 2), None, (rt, rt * 0.95, (zt - zb) / 2), "body.thigh", material="fat")
    b.tissue("c", (cx, 0, (zt + zb) / 2), None, (rt - fat, rt * 0.95 - fat, (zt - zb) / 2), "body.muscle", base="fat")
    view = b.rng.choice(3)
    fz = [st[2] + 10, (st[2] + sb[2]) / 2, sb[2] - 20][view]
    focus = np.array([sb[0] * 0.5 + st[0] * 0.5, 0.0, fz])
    lat = "right" if b.rng.random() < 0.5 else "left"
    return b.phantom("femur", focus, (0, 0, 1), b.u(90, 110), laterality=lat, mirror=lat == "left")


def _knee(b: _B) -> Phantom:
    s = b.n(1.0, 0.05, 0.9, 1.1)
    r = b.n(14, 1, 12, 16) * s
    sb = np.array([0.0, 0.0, 55 * s])
    b.rod(sb, sb + np.array([6, 0, 130]), r, 5.0, "femur.shaft", inner="marrow", end_cortex=0.5)
    b.pt("femur.shaft.distal", sb)
    b.dr("femur.shaft.axis", (8, 0, 180))
    b.sc("femur.shaft.radius", r)
    jz = _distal_femur(b, s, sb, r, name="femur", lat=-1.0)
    gap = b.u(4, 7)
    s_top, s_bot, fh, rt = _proximal_tibia(b, s, np.array([0.0, -3.0, jz - gap]), lat=-1.0, shaft_len=120 * s)
    b.rod(fh + np.array([0, 0, -8]), fh + np.array([-2, 0, -160 * s]), 0, 2.0, "fibula.shaft", radii=(6.5, 6.5),
          inner="marrow")
    flex = b.u(0, 1)
    pz = jz + (38 - 8 * flex) * s
    pc = np.array([0.0, 40 * s + 6 * flex, pz])
    b.bone("e", pc, euler_rotation(np.radians(-10 - 20 * flex), 0, 0), (22 * s, 10 * s, 24 * s), 2.0, "patella")
    b.pt("patella.center", pc)
    if b.rng.random() < 0.25:
        b.solid("e", (-18 * s, -40 * s, jz + 10), None, (4, 3, 5), "fabella", mu_abs=0.045)
    fat = b.u(5, 20)
    R = b.n(58, 5, 48, 72) * s
    b.tissue("c", (0, 4, jz - 20), None, (R, R * 1.05, 260), "body.knee", material="fat")
    b.tissue("c", (0, 4, jz - 20), None, (R - fat, R * 1.05 - fat, 260), "body.muscle", base="fat")
    b.air("e", (0, 30 * s, jz - 5), None, (18, 12, 15), "infrapatellar_fat", material="fat")
    b.dr("knee.lateral", (-1, 0, 0))
    lat = "right" if b.rng.random() < 0.5 else "left"
    focus = np.array([0.0, 0.0, jz + b.u(-10, 10)])
    return b.phantom("knee", focus, (0, 0, 1), b.u(75, 95), laterality=lat, mirror=lat == "left")


def _distal_tibia_fibula(b: _B, s, tib_bot, fib_bot, lat=-1.0, canal_r=None):
    """Distal tibia (a flared metaphysis cut flat at the plafond) with the medial malleolus below
    it, distal fibula ending in the lateral malleolus. The pieces abut along planes (no overlap)."""
    tb = np.asarray(tib_bot, float)
    X, Z, r = 24 * s, 40 * s, 13 * s
    hz = Z * np.sqrt(1 - (r / X) ** 2)          # height where the flare has the shaft's radius
    mc = tb - np.array([0, 0, hz])
    plafond = mc[2] - 12 * s
    up = np.array([0.0, 0.0, 1.0])
    b.bone("e", mc, None, (X, 21 * s, Z), 1.5, "tibia.distal",
           clip=[(tb, up), ((0, 0, plafond), -up, 1.6)])
    if canal_r is not None:
        _canal_blend(b, "tibia", tb, up, canal_r)
    mm = np.array([mc[0] - lat * 19 * s, mc[1] + 2, plafond - 4 * s])
    b.bone("e", mm, None, (7 * s, 11 * s, 14 * s), 1.5, "tibia.medial_malleolus",
           clip=[((0, 0, plafond), up)])
    fb = np.asarray(fib_bot, float)
    lmc = np.array([fb[0], fb[1], plafond - 12 * s])
    rz = max(22 * s, fb[2] - lmc[2] + 2.0)
    b.bone("e", lmc, None, (8 * s, 11 * s, rz), 1.5, "fibula.lateral_malleolus", clip=[(fb, up)])
    b.pt("tibia.plafond", np.array([mc[0], mc[1], plafond]))
    b.pt("tibia.medial_malleolus.tip", mm + np.array([0, 0, -12 * s]))
    b.pt("fibula.lateral_malleolus.tip", lmc + np.array([0, 0, -20 * s]))
    b.pt("tibia.medial_malleolus.center", mm)
    b.pt("fibula.lateral_malleolus.center", lmc)
    return plafond


def _lower_leg(b: _B) -> Phantom:
    s = b.n(1.0, 0.05, 0.9, 1.1)
    L = b.n(330, 18, 290, 370) * s
    top = np.array([0.0, 0.0, L / 2 + 20])
    s_top, s_bot, fh, r = _proximal_tibia(b, s, top, lat=-1.0, shaft_len=L - 70 * s)
    fib_top = fh + np.array([0, 0, -8])
    fib_bot = np.array([-(26 + 2) * s, -12 * s, s_bot[2] - 32 * s])
    b.rod(fib_bot, fib_top, 0, 2.0, "fibula.shaft", radii=(7 * s, 7 * s), inner="marrow")
    fax = _unit(fib_top - fib_bot)
    b.dr("fibula.shaft.axis", fax)
    b.pt("fibula.shaft.center", (fib_top + fib_bot) / 2)
    b.pt("fibula.shaft.distal", fib_bot)
    b.sc("fibula.shaft.radius", 7 * s)
    plafond = _distal_tibia_fibula(b, s, s_bot, fib_bot, lat=-1.0,
                                   canal_r=float(b.scalars["tibia.shaft.canal_radius"][0]))
    b.bone("e", np.array([0, 2, plafond - 22 * s]), None, (20 * s, 27 * s, 17 * s), 1.3, "talus")
    jz = top[2] + 6
    for cs in (1, -1):
        b.bone("e", np.array([cs * 20 * s, -7, jz + 22 * s]), None, (17 * s, 29 * s, 23 * s), 1.6, "femur.condyle")
    b.dr("tibia.medial", (1, 0, 0))
    b.dr("tibia.anterior", (0, 1, 0))
    b.dr("fibula.lateral", (-1, 0, 0))
    fat = b.u(5, 18)
    R = b.n(52, 5, 42, 66) * s
    zc = (top[2] + plafond) / 2
    # calf (fat layer around muscle) above a horizontal cut, the ankle below it: they abut
    zcut = plafond + 45 * s
    up = np.array([0.0, 0.0, 1.0])
    ec = np.array([-5, -8, zc + 40])
    b.tissue("e", ec, None, (R, R * 1.05, L / 2 + 120), "body.calf", material="fat", clip=[((0, 0, zcut), -up)])
    b.tissue("e", ec, None, (R - fat, R * 1.05 - fat, L / 2 + 120 - fat), "body.muscle", base="fat",
             clip=[((0, 0, zcut), -up)])
    k = np.sqrt(max(0.05, 1 - ((zcut - ec[2]) / (L / 2 + 120)) ** 2))
    b.tissue("c", (ec[0], ec[1], zcut - 40), None, (R * k, R * 1.05 * k, 40), "body.ankle")
    view = b.rng.choice(3)
    fz = [s_top[2] - 30, (s_top[2] + s_bot[2]) / 2, s_bot[2] + 20][view]
    lat = "right" if b.rng.random() < 0.5 else "left"
    return b.phantom("lower leg", np.array([-8.0, 0.0, fz]), (0, 0, 1), b.u(95, 115), laterality=lat,
                     mirror=lat == "left")


def _foot(b: _B) -> Phantom:
    s = b.n(1.0, 0.05, 0.9, 1.1)
    # right foot: medial = +x, toes towards +y
    foot_view = b.rng.random() >= 0.6   # else an ankle view; a dorsoplantar view is collimated to the foot
    leg = 80.0 if foot_view else 140.0
    tib_bot = np.array([0.0, 0.0, 45 * s])
    r = 13 * s
    b.rod(tib_bot, tib_bot + np.array([0, 0, leg]), r, 4.5, "tibia.shaft", inner="marrow", end_cortex=0.5)
    fib_bot = np.array([-27 * s, -10 * s, 12 * s])
    b.rod(fib_bot, fib_bot + np.array([-1, 0, leg + 10]), 6.5 * s, 2.0, "fibula.shaft", inner="marrow", end_cortex=0.5)
    b.dr("fibula.shaft.axis", (0, 0, 1))
    b.pt("fibula.shaft.distal", fib_bot)
    b.sc("fibula.shaft.radius", 6.5 * s)
    b.dr("tibia.shaft.axis", (0, 0, 1))
    b.pt("tibia.shaft.distal", tib_bot)
    b.sc("tibia.shaft.radius", r)
    plafond = _distal_tibia_fibula(b, s, tib_bot, fib_bot, lat=-1.0, canal_r=r - 4.5)
    pf = b.u(-0.15, 0.25)   # plantar flexion of the foot (radians)
    Rf = euler_rotation(pf, 0, 0)
    ank = np.array([0.0, 0.0, plafond - 3])

    def P(p):  # foot point relative to the ankle, rotated with the plantar flexion
        return ank + Rf @ (np.asarray(p, float) * s)

    def D(v):
        return Rf @ np.asarray(v, float)

    # hindfoot: talus (dome under the plafond, neck and head forwards), calcaneus below it
    talus = P((2, 10, -19))
    b.bone("e", talus, Rf @ euler_rotation(np.radians(12), 0, 0.25), (17 * s, 31 * s, 15 * s), 1.3, "talus")
    calc = P((-6, -22, -52))
    b.bone("e", calc, Rf @ euler_rotation(np.radians(15), 0, 0.08), (17 * s, 44 * s, 17 * s), 1.5, "calcaneus",
           clip=[(P((0, 0, -37)), D((0, 0.25, 1)), 1.5)])
    b.solid("e", P((-5, -58, -62)), Rf, (13 * s, 10 * s, 16 * s), "calcaneus.tuberosity", mu_abs=0.036,
            clip=[(P((0, -50, 0)), D((0, 1, 0)))])
    b.bone("e", P((9, 53, -33)), Rf @ euler_rotation(0, 0, 0.2), (15 * s, 7 * s, 13 * s), 1.2, "navicular")
    b.bone("e", P((-19, 45, -50)), Rf, (12 * s, 13 * s, 11 * s), 1.2, "cuboid")
    cun = [((18, 71, -40), (8, 10, 13)), ((6, 70, -34), (6, 9, 11)), ((-5, 69, -38), (6, 9, 11))]
    for k, (c, rr) in enumerate(cun):
        b.solid("e", P(c), Rf, np.array(rr) * s, f"cuneiform{k + 1}", mu_abs=0.036)
    # metatarsals 1..5 (1 = medial / big toe): shaft + head abutting on a plane, then phalanges
    mts = [((19, 86, -46), (25, 145, -64), 8.5), ((6, 83, -40), (6, 153, -60), 6.0), ((-5, 83, -42), (-9, 148, -62), 5.5),
           ((-15, 66, -46), (-23, 139, -64), 5.5), ((-26, 62, -52), (-37, 127, -66), 6.0)]
    for k, (p0, p1, rr) in enumerate(mts):
        a, bb = P(p0), P(p1)
        ax = _unit(bb - a)
        rh = rr * s
        neck = bb - ax * rh * 0.55
        b.rod(a, neck, 0, 1.6, f"metatarsal{k + 1}", radii=(rh * 0.62, rh * 0.55), end_cortex=1.0)
        b.bone("e", bb, _frame(ax), (rh * 0.85, rh * 0.8, rh), 1.0, f"metatarsal{k + 1}.head",
               clip=[(neck, -ax)])
        b.bone("e", a + ax * 6 * s, _frame(ax), (rh * 0.9, rh * 0.85, 7 * s), 1.0, f"metatarsal{k + 1}.base",
               clip=[(a, -ax), (a + ax * 6 * s, ax)])
        b.pt(f"metatarsal{k + 1}.base", a)
        b.pt(f"metatarsal{k + 1}.head", bb)
        b.dr(f"metatarsal{k + 1}.axis", ax)
        b.sc(f"metatarsal{k + 1}.radius", rh * 0.55)
        pl = (30 if k == 0 else 24 - 2 * k) * s
        d1 = _unit(ax * np.array([1, 1, 0.15]) + np.array([0, 0, 0.04]))
        q = bb + d1 * (rh + 2.2)
        segs = [pl, 0.7 * pl] if k == 0 else [pl, 0.45 * pl, 0.4 * pl]
        for j, ln in enumerate(segs):
            f = 1.0 - 0.18 * j
            b.rod(q, q + d1 * ln, 0, 1.0, f"phalanx{k + 1}.{j}", radii=(rh * 0.55 * f, rh * 0.48 * f), end_cortex=1.0)
            if j == 0 and k == 0:
                b.pt("hallux.proximal.base", q)
                b.dr("hallux.axis", d1)
            q = q + d1 * (ln + 2.2)
    b.pt("calcaneus.center", calc)
    b.pt("talus.center", talus)
    b.dr("foot.axis", Rf @ np.array([0, 1, 0]))
    b.dr("foot.medial", (1, 0, 0))
    b.dr("fibula.lateral", (-1, 0, 0))
    # soft tissue: ONE envelope made of abutting pieces (leg cylinder above a horizontal cut,
    # hindfoot and forefoot half-ellipsoids sharing their cross-section at the split plane)
    zcut = ank[2] - 12 * s
    up = np.array([0.0, 0.0, 1.0])
    hl = (tib_bot[2] + leg + 25 - zcut) / 2
    b.tissue("c", (-4, -3, zcut + hl), None, (42 * s, 40 * s, hl), "body.leg")
    sole = P((0, 0, -86))
    dorsum = [P((0, 30, -12)), P((0, 200, -66))]
    dn = D(np.cross(np.array([1.0, 0, 0]), (dorsum[1] - dorsum[0]) @ Rf / s))  # outward normal of the dorsum
    dn = dn if dn[2] > 0 else -dn
    cut = [((0, 0, zcut), up), (sole, -D((0, 0, 1))), (dorsum[0], dn)]
    split = D((0, 1, 0))
    c1, c2 = P((-6, 20, -50)), P((-6, 95, -50))
    b.tissue("e", c1, Rf, (41 * s, 100 * s, 80 * s), "body.hindfoot", clip=cut + [(c1, split)])
    b.tissue("e", c2, Rf, (56 * s, 110 * s, 80 * s), "body.forefoot", clip=cut + [(c1, -split)])
    lat = "right" if b.rng.random() < 0.5 else "left"
    if not foot_view:
        focus, axis, fh = np.array([0.0, 5.0, plafond - 20]), np.array([0.0, 0.0, 1.0]), b.u(75, 95)
    else:
        focus, axis, fh = P((0, 60, -40)), Rf @ np.array([0.0, 1.0, 0.0]), b.u(90, 110)
    return b.phantom("ankle and foot", focus, axis, fh, laterality=lat, mirror=lat == "left")


def _shoulder(b: _B) -> Phantom:
    s = b.n(1.0, 0.05, 0.9, 1.1)
    # right shoulder: lateral = -x; humeral head centre at x ~ -165
    X = -165 * s
    hc = np.array([X, 0.0, 0.0])
    hr = b.n(23, 1.5, 19, 26) * s
    abd = b.u(0, 0.35)  # arm abduction (radians)
    b.bone("e", hc, None, (hr, hr, hr), 1.5, "humerus.head")
    gt = hc + np.array([-16, 8, 8]) * s
    b.bone("e", gt, None, (10 * s, 13 * s, 15 * s), 1.2, "humerus.greater_tuberosity")
    sdir = _unit(np.array([np.sin(abd) * -1 * 0.9, 0.0, -1.0]))
    neck = hc + np.array([-8 * s, 0, -22 * s])
    b.bone("e", neck, None, (17 * s, 17 * s, 22 * s), 1.8, "humerus.neck")
    st = neck + sdir * 15 * s
    sb = st + sdir * 230 * s
    r = b.n(11, 0.8, 9.5, 12.5) * s
    _long_bone(b, "humerus", sb, st, r, b.n(4.0, 0.4, 3.2, 5) * s)
    b.pt("humerus.head.center", hc)
    b.sc("humerus.head.radius", hr)
    b.pt("humerus.nail_entry", hc + np.array([-6, 0, hr - 1]))
    b.dr("humerus.lateral", (-1, 0, 0))
    b.pt("humerus.proximal_plate.center", gt + np.array([-8, 0, -30]) * s)
    # scapula: glenoid, body, spine, acromion, coracoid
    gl = hc + np.array([hr + 6, -4, 0])
    b.bone("e", gl, euler_rotation(0, 0, -0.3), (6 * s, 14 * s, 19 * s), 1.5, "scapula.glenoid")
    b.solid("e", gl + np.array([22, -20, -20]) * s, euler_rotation(0.2, 0, -0.65), (12 * s, 10, 20 * s), "scapula.neck",
            mu_abs=0.040)
    body_c = gl + np.array([60, -40, -70]) * s
    b.solid("e", body_c, euler_rotation(0, np.radians(-15), -0.6), (55 * s, 4.5, 80 * s), "scapula.body", mu_abs=0.040)
    b.rod(gl + np.array([10, -18, -25]) * s, body_c + np.array([-10, -15, -80]) * s, 5.5 * s, 0, "scapula.lateral_border",
          solid=True, mu_abs=0.046)
    acr = hc + np.array([2, -10, hr + 14]) * s
    b.solid("e", acr, euler_rotation(0, 0, 0.5), (20 * s, 13 * s, 5 * s), "scapula.acromion", mu_abs=0.050,
            material="cortical")
    b.rod(acr + np.array([12, -14, 0]) * s, body_c + np.array([40, -10, 30]) * s, 0, 0, "scapula.spine",
          radii=(6, 9), solid=True, mu_abs=0.048)
    b.rod(gl + np.array([5, 15, 14]) * s, gl + np.array([-8, 40, 12]) * s, 0, 0, "scapula.coracoid", radii=(6, 7),
          solid=True, mu_abs=0.045)
    # clavicle from the acromion towards the sternum
    ac = acr + np.array([18, 8, 3]) * s
    mid = np.array([X + 90 * s, 30 * s, 18 * s])
    b.rod(ac, mid, 0, 2.5, "clavicle", radii=(8, 6))
    b.rod(mid, np.array([X + 155 * s, 45 * s, 0]), 0, 2.5, "clavicle", radii=(8, 7))
    b.pt("clavicle.center", mid)
    b.dr("clavicle.axis", ac - mid)
    # chest wall: lung apex, a few ribs
    # chest wall medial to a sagittal cut, shoulder cap (deltoid) and arm lateral to it; the cap
    # sits above a horizontal cut, the arm below it: abutting pieces, no overlapping lenses
    xcut = X + 36 * s
    ex_ = np.array([1.0, 0.0, 0.0])
    b.tissue("e", (X + 160 * s, 0, -110), None, (160 * s, 105 * s, 265), "body.chest", clip=[((xcut, 0, 0), -ex_)])
    b.air("e", (X + 95 * s, 5, -100), None, (55 * s, 72 * s, 95), "lung", material="lung")
    for k in range(4):
        zr = (10 - 38 * k) * s
        rx, ry = (70 + 14 * k) * s, 85 * s
        cx = X + 165 * s
        pts = [np.array([cx - rx * np.cos(ph), ry * np.sin(ph) - 5, zr - 30 * j * s]) for j, ph in
               enumerate(np.radians([-70, -15, 40]))]
        for j in range(2):
            b.rod(pts[j], pts[j + 1], 0, 0, f"rib{k + 2}", radii=(3.5, 6), solid=True, mu_abs=0.046,
                  xhint=(1, 0, 0))
    # arm and shoulder soft tissue: the deltoid cap and the arm are two ellipsoids on one axis
    # (along the humerus), cut by one plane across that axis; both narrow downwards and their
    # cross-sections there are the same ellipse, so the limb outline runs on without a step
    ra, rb = 45 * s, 48 * s
    dc = hc + np.array([-5.0, 0.0, 0.0]) + sdir * 4 * s
    Ra = _frame(sdir)
    cz_d, tc = 72 * s, 34 * s                       # deltoid half-length, cut below its centre
    kd = np.sqrt(1 - (tc / cz_d) ** 2)
    pcut = dc + sdir * tc
    b.tissue("e", dc, Ra, (ra / kd, rb / kd, cz_d), "body.deltoid", clip=[((xcut, 0, 0), ex_), (pcut, sdir)])
    cz_a, ta = 460 * s, 40 * s                      # a long arm ellipsoid, its centre above the cut
    ka = np.sqrt(1 - (ta / cz_a) ** 2)
    b.tissue("e", pcut - sdir * ta, Ra, (ra / ka, rb / ka, cz_a), "body.arm",
             clip=[(pcut, -sdir), ((xcut, 0, 0), ex_), (sb + sdir * 40 * s, sdir)])
    lat = "right" if b.rng.random() < 0.5 else "left"
    if b.rng.random() < 0.6:
        focus = hc + np.array([25, 0, -15])
    else:
        focus = (st + sb) / 2 * 0.6 + hc * 0.4
    return b.phantom("shoulder and upper arm", focus, (0, 0, 1), b.u(85, 105), laterality=lat, mirror=lat == "left")


def _arm(b: _B) -> Phantom:
    s = b.n(1.0, 0.05, 0.9, 1.1)
    # right arm hanging along z, supinated: palm anterior (+y), thumb/radius lateral (-x)
    ez = 130.0 * s                      # elbow joint level
    # distal humerus
    hs = np.array([0.0, -4.0, ez + 45 * s])
    r = 11 * s
    up_ = np.array([0.0, 0.0, 1.0])
    b.rod(hs, hs + np.array([3, 0, 160]), r, 4.0, "humerus.shaft", inner="marrow", end_cortex=0.5)
    b.pt("humerus.shaft.distal", hs)
    b.dr("humerus.shaft.axis", (3, 0, 160))
    b.sc("humerus.shaft.radius", r)
    cut = np.array([0, 0, ez + 6 * s])
    b.bone("e", np.array([0, -6, ez + 6 * s]), None, (30 * s, 13 * s, 42 * s), 1.5, "humerus.supracondylar",
           clip=[(hs, up_), (cut, -up_)])
    b.bone("e", np.array([-14 * s, 4, ez + 6 * s]), None, (12 * s, 11 * s, 11 * s), 1.3, "humerus.capitellum",
           clip=[(cut, up_)])
    b.bone("e", np.array([9 * s, 0, ez + 6 * s]), None, (13 * s, 12 * s, 12 * s), 1.3, "humerus.trochlea",
           clip=[(cut, up_)])
    b.solid("e", np.array([30 * s, -6, ez + 14 * s]), None, (7, 7, 9), "humerus.medial_epicondyle", mu_abs=0.040)
    b.solid("e", np.array([-30 * s, -6, ez + 14 * s]), None, (5, 6, 8), "humerus.lateral_epicondyle", mu_abs=0.040)
    b.pt("humerus.lateral_condyle", np.array([-30 * s, -4, ez + 12 * s]))
    b.pt("humerus.medial_condyle", np.array([28 * s, -6, ez + 12 * s]))
    b.air("e", np.array([0, -14, ez + 30 * s]), None, (12, 5, 12), "olecranon_fossa", mu=-0.02)
    # ulna: olecranon posterior, coronoid, shaft medial, styloid at the wrist
    wz = -120.0 * s                     # wrist (radiocarpal) level
    b.bone("e", np.array([8 * s, -18 * s, ez + 2 * s]), None, (11 * s, 11 * s, 17 * s), 1.5, "ulna.olecranon",
           clip=[((0, -13 * s, 0), (0, 1, 0))])
    b.pt("ulna.olecranon.tip", np.array([8 * s, -24 * s, ez + 14 * s]))
    u_top = np.array([9 * s, -6 * s, ez - 12 * s])
    u_bot = np.array([18 * s, -2 * s, wz + 12 * s])
    ru = 7.5 * s
    _long_bone(b, "ulna", u_bot, u_top, ru, 2.8 * s)
    b.bone("e", u_bot + np.array([0, 0, -4]), None, (8 * s, 8 * s, 9 * s), 1.2, "ulna.head")
    # radius: head lateral at the elbow, crossing to the thumb side, broad distal end
    r_head = np.array([-14 * s, 4, ez - 12 * s])
    b.bone("c", r_head, None, (11 * s, 11 * s, 5 * s), 1.2, "radius.head")
    r_top = r_head + np.array([2, 0, -12 * s])
    r_bot = np.array([-16 * s, 2 * s, wz + 28 * s])
    rr = 7.0 * s
    _long_bone(b, "radius", r_bot, r_top, rr, 2.6 * s)
    rd = np.array([-12 * s, 2 * s, wz + 12 * s])
    b.bone("e", rd, euler_rotation(0, 0.15, 0), (19 * s, 11 * s, 16 * s), 1.3, "radius.distal")
    b.pt("radius.distal.center", rd)
    b.pt("radius.styloid", np.array([-30 * s, 2 * s, wz + 2 * s]))
    b.dr("radius.lateral", (-1, 0, 0))
    b.dr("forearm.anterior", (0, 1, 0))
    # carpals (8 small bones, two rows), metacarpals, phalanges; fingers point down (-z)
    carp = [(-16, 2, -10, 8), (-3, 0, -8, 7), (9, -1, -8, 6), (16, 4, -10, 5),   # scaphoid lunate triquetrum pisiform
            (-19, 4, -26, 7), (-8, 3, -27, 6), (3, 1, -27, 8), (14, 1, -25, 7)]  # trapezium trapezoid capitate hamate
    names = ["scaphoid", "lunate", "triquetrum", "pisiform", "trapezium", "trapezoid", "capitate", "hamate"]
    for (x, y, z, rad), nm in zip(carp, names):
        b.solid("e", np.array([x * s, y, wz + z * s]), None, (rad * s, rad * s * 0.8, rad * s * 1.1), f"carpal.{nm}",
                mu_abs=0.038)
    b.pt("scaphoid.center", np.array([-16 * s, 2, wz - 10 * s]))
    spread = b.u(0.0, 0.08)
    mcp = [(-20, -36, -28, -75, 6.0), (-9, -36, -11, -100, 5.0), (2, -36, 2, -102, 5.0), (12, -35, 14, -96, 4.5),
           (21, -33, 26, -88, 4.5)]
    for k, (x0, z0, x1, z1, rad) in enumerate(mcp):
        a = np.array([x0 * s, 2, wz + z0 * s])
        e = np.array([x1 * s, 4, wz + z1 * s])
        if k == 0:
            e = e + np.array([-8 * s, 8, 0])
        b.rod(a, e, 0, 1.5, f"metacarpal{k + 1}", radii=(rad * s * 0.75, rad * s * 0.7))
        ax = _unit(e - a)
        b.pt(f"metacarpal{k + 1}.base", a)
        b.pt(f"metacarpal{k + 1}.head", e)
        b.dr(f"metacarpal{k + 1}.axis", ax)
        b.sc(f"metacarpal{k + 1}.radius", rad * s * 0.7)
        fd = _unit(ax + np.array([(k - 2) * spread, 0.0, 0.0]))
        q = e + fd * (rad * s * 0.8 + 2)
        lens = [(32, 0, 24) if k == 0 else (44 - 2 * abs(k - 2.5) * 2, 26, 19)][0]
        for j, ln in enumerate(lens):
            if ln == 0:
                continue
            q1 = q + fd * ln * s
            b.rod(q, q1, 0, 0, f"phalanx{k + 1}.{j}", radii=(rad * s * (0.62 - 0.08 * j), rad * s * (0.55 - 0.08 * j)),
                  solid=True, mu_abs=0.042)
            if j == 0:
                b.pt(f"phalanx{k + 1}.proximal.base", q)
                b.dr(f"phalanx{k + 1}.axis", fd)
            q = q1 + fd * 2.5
    # soft tissue: arm, elbow, forearm (tapered), hand
    up = np.array([0.0, 0.0, 1.0])
    zf = wz - 95 * s                     # metacarpophalangeal level: hand / fingers cut
    b.tissue("c", (0, -2, ez + 130), None, (42 * s, 40 * s, 130), "body.arm")
    fz, fr = ez - 40 * s, ez - wz + 30 * s
    kk = np.sqrt(1 - (40 * s / fr) ** 2)
    b.tissue("e", (0, -2, fz), None, (42 * s / kk, 40 * s / kk, fr), "body.forearm",
             clip=[((0, 0, ez), up), ((0, 0, wz - 8 * s), -up)])
    b.tissue("e", (-2, 3, wz - 45 * s), None, (46 * s, 16 * s, 75 * s), "body.hand",
             clip=[((0, 0, wz - 8 * s), up), ((0, 0, zf), -up)])
    b.tissue("e", (0, 3, zf), None, (42 * s, 12 * s, 95 * s), "body.fingers", clip=[((0, 0, zf), up)])
    b.tissue("c", (-28 * s, 10, wz - 70 * s), _frame((-0.4, 0.3, -1)), (12 * s, 11 * s, 40 * s), "body.thumb")
    view = int(b.rng.choice(3))
    b.sc("view.code", view)  # 0 elbow, 1 forearm, 2 hand/wrist
    focus = [np.array([0, 0, ez]), np.array([0, 0, (ez + wz) / 2]), np.array([0, 0, wz - 45 * s])][view]
    lat = "right" if b.rng.random() < 0.5 else "left"
    return b.phantom("elbow-forearm-hand", focus, (0, 0, 1), [75, 105, 85][view] * b.u(0.9, 1.1), laterality=lat,
                     mirror=lat == "left")


_BUILDERS = {
    "skull": _skull,
    "cervical spine": _cervical,
    "thorax": _thorax,
    "lumbar spine": _lumbar,
    "pelvis and hip": _pelvis,
    "femur": _femur,
    "knee": _knee,
    "lower leg": _lower_leg,
    "ankle and foot": _foot,
    "shoulder and upper arm": _shoulder,
    "elbow-forearm-hand": _arm,
}
assert set(_BUILDERS) == set(BODY_REGIONS)


def build_phantom(region: str, rng: np.random.Generator) -> Phantom:
    """A randomized phantom of ``region`` (one of ``tasks.label_schema.BODY_REGIONS``)."""
    try:
        builder = _BUILDERS[region]
    except KeyError:
        raise ValueError(f"unknown body region {region!r}; expected one of {BODY_REGIONS}") from None
    return builder(_B(rng))
