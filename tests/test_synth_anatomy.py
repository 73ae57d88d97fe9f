"""Synthetic phantoms (anatomy.py) and their implants (implants.py): structure, determinism, placement."""
import numpy as np
import pytest

from tasks.label_schema import BODY_REGIONS
from tasks.synth.anatomy import (
    BONE_MATERIALS,
    attenuation_at,
    build_phantom,
    point_in_body,
    point_in_bone,
    point_in_primitive,
)
from tasks.synth.implants import place_implants
from tasks.synth.primitives import Box, Cylinder, Ellipsoid, line_integral

TRUNK = {"skull", "cervical spine", "thorax", "lumbar spine", "pelvis and hip"}
LIMB_REGIONS = {"femur", "knee", "lower leg", "ankle and foot", "shoulder and upper arm", "elbow-forearm-hand"}


def _signature(ph):
    return np.concatenate([np.r_[p.center, p.rotation.ravel(), p.mu] for p in ph.primitives])


@pytest.mark.parametrize("region", BODY_REGIONS)
def test_region_builds_and_is_deterministic(region):
    a = build_phantom(region, np.random.default_rng(7))
    b = build_phantom(region, np.random.default_rng(7))
    c = build_phantom(region, np.random.default_rng(8))
    assert a.region == region
    assert 15 <= len(a.primitives) <= 140
    assert any(p.material in BONE_MATERIALS for p in a.primitives)
    assert any(p.name.startswith("body") for p in a.primitives)
    np.testing.assert_array_equal(_signature(a), _signature(b))
    assert len(a.primitives) != len(c.primitives) or not np.allclose(_signature(a), _signature(c))
    assert a.landmarks and all(isinstance(v, np.ndarray) for v in a.landmarks.values())
    assert np.isclose(np.linalg.norm(a.long_axis), 1.0)
    assert 50.0 <= a.field_half_mm <= 200.0
    assert point_in_body(a, a.focus)
    if region in LIMB_REGIONS:
        assert a.laterality in ("right", "left")
    else:
        assert a.laterality == ""


def test_unknown_region_raises():
    with pytest.raises(ValueError):
        build_phantom("abdomen", np.random.default_rng(0))


def test_laterality_mirrors_the_limb():
    sides = {}
    for seed in range(12):
        ph = build_phantom("knee", np.random.default_rng(seed))
        # the fibular head is lateral: patient's right is -x, left is +x
        fib = next(p for p in ph.primitives if p.name == "fibula.head")
        sides.setdefault(ph.laterality, []).append(np.sign(fib.center[0] - ph.focus[0]))
    assert set(sides) == {"right", "left"}
    assert all(s < 0 for s in sides["right"]) and all(s > 0 for s in sides["left"])


def test_point_in_primitive_shapes():
    e = Ellipsoid((0, 0, 0), None, 1.0, radii=(10, 5, 2))
    c = Cylinder((0, 0, 0), None, 1.0, radii=(3, 3), half_length=10)
    bx = Box((0, 0, 0), None, 1.0, half_extents=(1, 2, 3))
    assert point_in_primitive(e, (9.9, 0, 0)) and not point_in_primitive(e, (0, 5.1, 0))
    assert point_in_primitive(c, (0, 2.9, 9.9)) and not point_in_primitive(c, (0, 0, 10.1))
    assert point_in_primitive(bx, (0.9, -1.9, 2.9)) and not point_in_primitive(bx, (1.1, 0, 0))


def _bbox(ph):
    lo = np.min([p.aabb()[0] for p in ph.primitives], axis=0)
    hi = np.max([p.aabb()[1] for p in ph.primitives], axis=0)
    return lo, hi


@pytest.mark.parametrize("region", BODY_REGIONS)
def test_attenuation_never_negative(region):
    # total attenuation (the sum of the differential mus) must be >= 0 everywhere: air spaces
    # inside the body, never poking out of it nor overlapping each other
    for seed in range(8):
        ph = build_phantom(region, np.random.default_rng(seed))
        lo, hi = _bbox(ph)
        pts = np.random.default_rng(1000 + seed).uniform(lo, hi, (20000, 3))
        total = sum(p.mu * point_in_primitive(p, pts) for p in ph.primitives)
        i = int(np.argmin(total))
        names = [p.name for p in ph.primitives if point_in_primitive(p, pts[i])]
        assert total[i] >= -1e-9, (seed, total[i], names)
    # the scalar helper agrees with the vectorised sum
    assert np.isclose(attenuation_at(ph, pts[i]), total[i])


# regions whose bones all lie inside the soft-tissue envelope; the others still have small
# known protrusions (toes, fingers, clavicles / mandible of the neck, malleoli) left to fix
_BONE_INSIDE = {"skull", "thorax", "pelvis and hip", "femur", "knee", "shoulder and upper arm", "lumbar spine"}


@pytest.mark.parametrize("region", BODY_REGIONS)
def test_bone_inside_body(region):
    if region not in _BONE_INSIDE:
        pytest.xfail("known: some bone ends poke out of the soft-tissue envelope")
    worst = 0.0
    for seed in range(8):
        ph = build_phantom(region, np.random.default_rng(seed))
        rng = np.random.default_rng(2000 + seed)
        env = [p for p in ph.primitives if p.name.split(".")[0] == "body"]
        pts = []
        for p in ph.primitives:
            if p.material in BONE_MATERIALS:
                lo, hi = p.aabb()
                q = rng.uniform(lo, hi, (200, 3))
                pts.append(q[point_in_primitive(p, q)])
        pts = np.concatenate(pts)
        inside = np.any([point_in_primitive(p, pts) for p in env], axis=0)
        worst = max(worst, 1.0 - inside.mean())
    # a few sample points grazing the skin are tolerated, not a bone sticking out
    assert worst <= 2e-3, worst


@pytest.mark.parametrize("region", BODY_REGIONS)
def test_central_ray_transmission(region):
    ph = build_phantom(region, np.random.default_rng(11))
    trans = []
    for d in ((0.0, 1.0, 0.0), (1.0, 0.0, 0.0)):
        d = np.asarray(d)
        L = line_integral(ph.primitives, ph.focus - 1500.0 * d, d[None, :])[0]
        trans.append(np.exp(-L))
    ap = trans[0]
    if region in ("skull", "cervical spine", "thorax", "lumbar spine", "pelvis and hip"):
        assert 1e-4 <= ap <= 0.5, ap
    else:
        assert 1e-3 <= ap <= 0.8, ap


@pytest.mark.parametrize("region", BODY_REGIONS)
def test_implant_screws_end_in_bone(region):
    n_screws = 0
    for seed in range(6):
        ph = build_phantom(region, np.random.default_rng(seed))
        implants = place_implants(ph, np.random.default_rng(100 + seed))
        again = place_implants(build_phantom(region, np.random.default_rng(seed)), np.random.default_rng(100 + seed))
        assert [m.kind for m in implants] == [m.kind for m in again]
        for m in implants:
            assert m.material in ("titanium", "steel")
            assert all(p.is_metal for p in m.primitives)
            if m.screw is None:
                continue
            n_screws += 1
            assert point_in_body(ph, m.screw.head), (m.kind, m.screw.head)
            assert point_in_body(ph, m.screw.tip), (m.kind, m.screw.tip)
            assert point_in_bone(ph, m.screw.tip), (m.kind, m.screw.tip)
    if region in ("lumbar spine", "thorax", "cervical spine", "pelvis and hip", "femur", "lower leg"):
        assert n_screws > 0
