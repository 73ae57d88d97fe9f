"""Plausible surgical instrumentation for a phantom, placed from its anatomical landmarks.

``place_implants(phantom, rng)`` returns a list of `MetalObject`s (possibly empty) built with
metal.py: pedicle / lateral-mass screws with rods on the spine, plates with cortical screws and
intramedullary nails with locking screws on long bones, cannulated screws or a dynamic hip screw
in the femoral neck, K-wires in the hand, wrist, elbow and foot, mini plates on the mandible.
Every screw tip is aimed inside bone (see anatomy.point_in_bone, checked by the tests).
"""
from __future__ import annotations

import numpy as np

from tasks.synth import metal
from tasks.synth.scene import MetalObject, Phantom


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _perp(v, axis) -> np.ndarray:
    """``v`` made perpendicular to ``axis`` (unit)."""
    a = _unit(axis)
    v = np.asarray(v, dtype=np.float64)
    return _unit(v - (v @ a) * a)


def _sc(lm, key) -> float:
    return float(np.asarray(lm[key]).ravel()[0])


def _material(rng) -> str:
    return "titanium" if rng.random() < 0.65 else "steel"


def _levels(lm, prefix, n_all) -> list[str]:
    return [f"{prefix}{i}" for i in range(1, n_all + 1) if f"{prefix}{i}.pedicle_left.entry" in lm]


def _pedicle_construct(lm, levels, rng, dia_range, rod_dia, material, bilateral_p=0.9):
    """Pedicle screws at consecutive ``levels`` (both sides, sometimes one) and a rod per side."""
    objs: list[MetalObject] = []
    sides = ["left", "right"] if rng.random() < bilateral_p else [str(rng.choice(["left", "right"]))]
    for side in sides:
        heads = []
        for lev in levels:
            key = f"{lev}.pedicle_{side}"
            length = _sc(lm, key + ".length")
            length = max(20.0, np.floor((length - rng.uniform(0, 4)) / 2.5) * 2.5)
            ped = _sc(lm, key + ".diameter")
            dia = float(np.clip(round(ped * rng.uniform(0.55, 0.75) * 2) / 2, *dia_range))
            d = lm[key + ".direction"]
            entry = lm[key + ".entry"] + rng.normal(0, 0.5, 3)
            scr = metal.pedicle_screw(entry, d, length, dia, material)
            objs.append(scr)
            heads.append(scr.screw.head)
        if len(heads) >= 2:
            objs.append(metal.rod(heads, rod_dia, material))
    return objs


def _spine(ph: Phantom, rng, prefix, n_all, n_range, dia_range, rod_dia):
    lm = ph.landmarks
    levels = _levels(lm, prefix, n_all)
    n = int(rng.integers(n_range[0], n_range[1] + 1))
    n = min(n, len(levels))
    start = int(rng.integers(0, len(levels) - n + 1))
    return _pedicle_construct(lm, levels[start:start + n], rng, dia_range, rod_dia, _material(rng))


def _lumbar(ph, rng):
    return _spine(ph, rng, "L", 5, (1, 4), (5.0, 7.5), 5.5)


def _thorax(ph, rng):
    lm = ph.landmarks
    levels = [lv for lv in _levels(lm, "T", 12) if int(lv[1:]) >= 3]
    n = int(rng.integers(3, 7))
    start = int(rng.integers(0, len(levels) - n + 1))
    return _pedicle_construct(lm, levels[start:start + n], rng, (4.0, 6.0), 5.5, _material(rng))


def _cervical(ph, rng):
    lm = ph.landmarks
    mat = _material(rng)
    levels = [f"C{i}" for i in range(3, 8) if f"C{i}.lateral_mass_left.center" in lm]
    n = int(rng.integers(2, 5))
    start = int(rng.integers(0, len(levels) - n + 1))
    chosen = levels[start:start + n]
    objs: list[MetalObject] = []
    if rng.random() < 0.45:
        # anterior cervical plate on the vertebral bodies (ACDF), two screws per level
        chosen = chosen[:3] if len(chosen) > 3 else chosen
        if len(chosen) < 2:
            chosen = levels[:2]
        cs = [lm[f"{lv}.body.center"] for lv in chosen]
        ant = _unit(sum(lm[f"{lv}.anterior"] for lv in chosen))
        up = _unit(cs[0] - cs[-1])
        depth = np.mean([_sc(lm, f"{lv}.body.depth") for lv in chosen])
        span = np.linalg.norm(cs[0] - cs[-1])
        spacing = span / (len(chosen) - 1)
        center = np.mean(cs, axis=0) + ant * (depth / 2 + 0.3)
        objs += metal.plate(center, up, ant, spacing * len(chosen), 16.0, 2.0, mat, len(chosen), rng,
                            screw_length_mm=min(14.0, depth - 3.0), screw_diameter_mm=4.0)
        return objs
    for side in ("left", "right"):
        heads = []
        for lv in chosen:
            c = lm[f"{lv}.lateral_mass_{side}.center"]
            r = _sc(lm, f"{lv}.lateral_mass_{side}.radius")
            ex, ey, ez = lm[f"{lv}.left"], lm[f"{lv}.anterior"], lm[f"{lv}.up"]
            sgn = 1.0 if side == "left" else -1.0
            # Magerl: start 1 mm medial to the lateral-mass centre, aim 25 deg lateral, 30 deg cranial
            entry = c - ey * (r - 1.5) - sgn * ex * 1.0 - ez * 2.0
            d = _unit(ey + np.tan(np.radians(rng.uniform(20, 30))) * sgn * ex
                      + np.tan(np.radians(rng.uniform(20, 35))) * ez)
            length = float(rng.choice([10.0, 12.0, 14.0])) * r / 8.0
            scr = metal.pedicle_screw(entry, d, length, 3.5, mat)
            objs.append(scr)
            heads.append(scr.screw.head)
        objs.append(metal.rod(heads, 3.5, mat))
    return objs


def _skull(ph, rng):
    lm = ph.landmarks
    if rng.random() < 0.35:
        return []
    objs: list[MetalObject] = []
    sides = ["left", "right"] if rng.random() < 0.3 else [str(rng.choice(["left", "right"]))]
    for side in sides:
        a, f = lm[f"mandible_{side}.angle"], lm[f"mandible_{side}.front"]
        axis = _unit(f - a)
        mid = (lm["mandible_left.angle"] + lm["mandible_right.angle"]) / 2
        frac = rng.uniform(0.35, 0.65)
        on_axis = a + (f - a) * frac
        out = _perp(on_axis - mid, axis)
        center = on_axis + out * 5.6
        objs += metal.plate(center, axis, out, rng.uniform(22, 34), 5.0, 1.2, "titanium", int(rng.integers(4, 7)),
                            rng, screw_length_mm=float(rng.choice([5.0, 6.0, 7.0])), screw_diameter_mm=2.0)
    return objs


def _hip_screws(lm, rng, name, mat):
    """Three cannulated screws (inverted triangle) or a dynamic hip screw with a side plate."""
    entry = lm[f"{name}.neck.entry"]
    ax = lm[f"{name}.neck.axis"]
    head = lm[f"{name}.head.center"]
    hr = _sc(lm, f"{name}.head.radius")
    to_head = float((head - entry) @ ax)
    objs: list[MetalObject] = []
    if rng.random() < 0.5:
        up = _perp((0, 0, 1), ax)
        ant = _unit(np.cross(ax, up))
        for off in (up * 6.5 - ant * 0.0, -up * 5.0 + ant * 6.0, -up * 5.0 - ant * 6.0):
            p = entry + off
            length = np.floor((to_head + 0.45 * hr) / 5) * 5
            objs.append(metal.cannulated_screw(p, ax, length, 7.0, mat, thread_mm=16.0))
        return objs
    # dynamic hip screw: lag screw along the neck + side plate on the lateral shaft
    length = np.floor((to_head + 0.5 * hr) / 5) * 5
    objs.append(metal.cannulated_screw(entry - ax * 6, ax, length + 6, 12.0, mat, thread_mm=22.0))
    objs += _shaft_plate(lm, rng, name, mat, lateral_key=f"{name}.lateral", start_frac=0.0,
                         length=rng.uniform(80, 130), n_holes=int(rng.integers(3, 6)))
    return objs


def _shaft_plate(lm, rng, name, mat, lateral_key, start_frac=None, length=None, n_holes=None, width=None,
                 normal=None, screw_dia=None):
    """A plate on the shaft surface (normal = lateral/medial/anterior) with bicortical screws."""
    ax = lm[f"{name}.shaft.axis"]
    prox, dist = lm[f"{name}.shaft.proximal"], lm[f"{name}.shaft.distal"]
    r = _sc(lm, f"{name}.shaft.radius")
    L = float(np.linalg.norm(prox - dist))
    length = min(length or rng.uniform(0.3, 0.6) * L, 0.9 * L)
    n_holes = n_holes or max(3, int(length / 16))
    frac = rng.uniform(0.05, 0.95 - length / L) if start_frac is None else start_frac
    frac = float(np.clip(frac, 0.02, max(0.02, 0.98 - length / L)))
    center_axis = prox - ax * (frac * L + length / 2)
    n = _perp(lm[lateral_key] if normal is None else normal, ax)
    width = width or max(8.0, min(16.0, 0.7 * 2 * r))
    screw_len = 2 * r - 1.0 - 0.3
    return metal.plate(center_axis + n * r, ax, n, length, width, 4.0 if r > 9 else 2.5, mat, n_holes, rng,
                       screw_length_mm=screw_len, screw_diameter_mm=screw_dia or (4.5 if r > 11 else 3.5))


def _nail(lm, rng, name, mat, n_lock=None):
    ax = lm[f"{name}.shaft.axis"]
    prox, dist = lm[f"{name}.shaft.proximal"], lm[f"{name}.shaft.distal"]
    r, rc = _sc(lm, f"{name}.shaft.radius"), _sc(lm, f"{name}.shaft.canal_radius")
    L = float(np.linalg.norm(prox - dist))
    dia = float(np.clip(np.floor(2 * rc - 2.0), 7.0, 12.0))
    entry = prox + ax * 8.0
    length = 0.9 * (L + 8.0)
    n_lock = int(rng.integers(2, 5)) if n_lock is None else n_lock
    return metal.nail(entry, -ax, length, dia, mat, n_lock, rng, locking_length_mm=2 * r - 2.0)


def _pelvis(ph, rng):
    lm = ph.landmarks
    side = "left" if _sc(lm, "hip.side") > 0 else "right"
    return _hip_screws(lm, rng, f"femur_{side}", _material(rng))


def _femur(ph, rng):
    lm = ph.landmarks
    mat = _material(rng)
    u = rng.random()
    if u < 0.45:
        return _nail(lm, rng, "femur", mat)
    if u < 0.8:
        return _shaft_plate(lm, rng, "femur", mat, "femur.lateral", width=16.0, screw_dia=4.5)
    return _hip_screws(lm, rng, "femur", mat)


def _knee(ph, rng):
    lm = ph.landmarks
    if rng.random() < 0.4:
        return []
    mat = _material(rng)
    pc = lm["tibia.plateau.center"]
    lat = lm["knee.lateral"]
    up = lm["femur.shaft.axis"]
    ant = _unit(np.cross(up, lat)) * (1 if lat[0] < 0 else -1)
    objs = []
    R = _sc(lm, "tibia.plateau.radius")
    for k, dz in enumerate((-1.0, -6.0)):
        for dy in ((-6.0, 6.0) if k == 0 else (0.0,)):
            start = pc + lat * 0.88 * R + up * dz + ant * dy
            length = np.floor(R * rng.uniform(1.2, 1.45) / 5) * 5
            objs.append(metal.cannulated_screw(start, -lat, float(length), 6.5, mat))
    return objs


def _lower_leg(ph, rng):
    lm = ph.landmarks
    mat = _material(rng)
    objs: list[MetalObject] = []
    if rng.random() < 0.6:
        objs += _nail(lm, rng, "tibia", mat)
    else:
        objs += _shaft_plate(lm, rng, "tibia", mat, "tibia.medial", width=12.0)
    if rng.random() < 0.35:
        objs += _fibula_plate(lm, rng, mat)
    return objs


def _fibula_plate(lm, rng, mat):
    ax = lm["fibula.shaft.axis"]
    r = _sc(lm, "fibula.shaft.radius")
    n = _perp(lm["fibula.lateral"], ax)
    length = rng.uniform(55, 85)
    c = lm["fibula.shaft.distal"] + ax * (length / 2 + 3.0) + n * r
    return metal.plate(c, ax, n, length, 9.0, 2.0, mat, int(rng.integers(5, 8)), rng,
                       screw_length_mm=2 * r - 1.3, screw_diameter_mm=3.5)


def _medial_malleolus(lm, rng, mat):
    tip = lm["tibia.medial_malleolus.tip"]
    target = lm["tibia.plafond"] + _unit(lm["tibia.shaft.axis"]) * 22.0
    objs = []
    for off in (-5.0, 5.0):
        shift = _perp(np.cross(lm["tibia.shaft.axis"], lm["foot.medial"]), target - tip) * off
        start = tip + shift + _unit(target - tip) * 2.0
        d = _unit(target + shift - start)
        L = float(np.floor(np.linalg.norm(target + shift - start) / 2) * 2)
        objs.append(metal.cannulated_screw(start, d, L, 4.0, mat, thread_mm=12.0))
    return objs


def _foot(ph, rng):
    lm = ph.landmarks
    mat = _material(rng)
    objs: list[MetalObject] = []
    u = rng.random()
    if u < 0.55:
        objs += _fibula_plate(lm, rng, mat)
        if rng.random() < 0.6:
            objs += _medial_malleolus(lm, rng, mat)
    elif u < 0.85:
        for k in rng.choice([2, 3, 4, 5], size=int(rng.integers(1, 3)), replace=False):
            head, base = lm[f"metatarsal{k}.head"], lm[f"metatarsal{k}.base"]
            d = _unit(base - head)
            start = head - d * 45.0
            objs.append(metal.kwire(start, d, 45.0 + np.linalg.norm(base - head) * 0.9, 1.6, "steel"))
    else:
        objs += _medial_malleolus(lm, rng, mat)
    return objs


def _shoulder(ph, rng):
    lm = ph.landmarks
    mat = _material(rng)
    u = rng.random()
    if u < 0.2:
        return []
    if u < 0.55:
        return _nail(lm, rng, "humerus", mat, n_lock=int(rng.integers(2, 4)))
    objs = _shaft_plate(lm, rng, "humerus", mat, "humerus.lateral", start_frac=0.0, length=rng.uniform(70, 100),
                        n_holes=int(rng.integers(3, 5)), width=12.0, screw_dia=3.5)
    hc, hr = lm["humerus.head.center"], _sc(lm, "humerus.head.radius")
    lat = lm["humerus.lateral"]
    ax = lm["humerus.shaft.axis"]
    for k in range(int(rng.integers(2, 4))):
        start = hc + lat * (hr + 2.0) - ax * (6.0 + 5.0 * k) + np.cross(ax, lat) * rng.uniform(-5, 5)
        tgt = hc + ax * rng.uniform(-6, 8) - lat * 0.35 * hr
        d = _unit(tgt - start)
        objs.append(metal.cortical_screw(start, d, float(np.linalg.norm(tgt - start)), 3.5, mat))
    return objs


def _arm(ph, rng):
    lm = ph.landmarks
    view = int(round(_sc(lm, "view.code")))
    mat = _material(rng)
    objs: list[MetalObject] = []
    if view == 0:  # elbow
        if rng.random() < 0.5:
            # olecranon tension band: two parallel K-wires down the ulna
            tip = lm["ulna.olecranon.tip"]
            d = -lm["ulna.shaft.axis"]
            for off in (-3.5, 3.5):
                p = tip + _perp(lm["radius.lateral"], d) * off
                objs.append(metal.kwire(p - d * 8, d, 70.0, 1.8, "steel"))
        else:
            # crossed K-wires for a supracondylar fracture
            lc, mc = lm["humerus.lateral_condyle"], lm["humerus.medial_condyle"]
            up = lm["humerus.shaft.axis"]
            for a, b in ((lc, mc), (mc, lc)):
                tgt = b + up * 45.0
                d = _unit(tgt - a)
                objs.append(metal.kwire(a - d * 15, d, 15 + np.linalg.norm(tgt - a) * 1.05, 1.8, "steel"))
        return objs
    if view == 1:  # forearm
        which = rng.random()
        if which < 0.75:
            objs += _shaft_plate(lm, rng, "radius", mat, "forearm.anterior", width=10.0, screw_dia=3.5)
        if which > 0.35:
            objs += _shaft_plate(lm, rng, "ulna", mat, "radius.lateral", normal=-lm["radius.lateral"], width=10.0,
                                 screw_dia=3.5)
        return objs
    # hand / wrist
    u = rng.random()
    if u < 0.4:
        sty = lm["radius.styloid"]
        tgt = lm["radius.shaft.distal"] + lm["radius.shaft.axis"] * 10.0
        d = _unit(tgt - sty)
        for off in (0.0, 6.0):
            p = sty + lm["forearm.anterior"] * (off - 3.0)
            objs.append(metal.kwire(p - d * 20, d, 20 + np.linalg.norm(tgt - sty) + 10.0, 1.6, "steel"))
    elif u < 0.75:
        for k in rng.choice([2, 3, 4, 5], size=int(rng.integers(1, 3)), replace=False):
            head, base = lm[f"metacarpal{k}.head"], lm[f"metacarpal{k}.base"]
            d = _unit(base - head)
            objs.append(metal.kwire(head - d * 30, d, 30 + np.linalg.norm(base - head) * 0.9, 1.4, "steel"))
    else:
        c = lm["scaphoid.center"]
        d = _unit(lm["radius.shaft.axis"] * 1.0 + lm["radius.lateral"] * 0.35)
        objs.append(metal.cannulated_screw(c - d * 7.0, d, 14.0, 3.0, "titanium", thread_mm=6.0))
    return objs


_PLACERS = {
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


def place_implants(phantom: Phantom, rng: np.random.Generator) -> list[MetalObject]:
    """Randomized, plausible instrumentation for ``phantom`` (empty list when none)."""
    placer = _PLACERS.get(phantom.region)
    if placer is None:
        raise ValueError(f"unknown body region {phantom.region!r}")
    return placer(phantom, rng)
