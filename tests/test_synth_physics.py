"""Physics and geometry checks of the synthetic C-arm generator (geometry, render, metal)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from tasks.synth import metal
from tasks.synth.geometry import CArmPose, jitter_pose, random_pose, sweep_poses
from tasks.synth.primitives import MU, Cylinder, Ellipsoid
from tasks.synth.render import render
from tasks.synth.scene import Detector, Phantom

SOFT = MU["soft"]


def _phantom() -> Phantom:
    """A soft-tissue body with a cortical 'spine' cylinder and a cancellous core."""
    prims = [
        Ellipsoid([0, 0, 0], None, SOFT, "soft", radii=[120, 90, 200]),
        Cylinder([0, 10, 0], None, MU["cortical"] - SOFT, "cortical", radii=(22, 18), half_length=120),
        Cylinder([0, 10, 0], None, MU["cancellous"] - MU["cortical"], "cancellous",
                 radii=(19, 15), half_length=118),
    ]
    return Phantom("lumbar spine", prims, focus=np.zeros(3), field_half_mm=100.0)


def _implants(rng) -> list:
    objs = [metal.pedicle_screw([s * 12, -20, z], [-s * 0.3, 1, 0.05], 40, 6.5)
            for z in (-30, 30) for s in (-1, 1)]
    objs.append(metal.rod([o.screw.head for o in objs[::2]]))
    objs += metal.plate([60, -40, 0], [0, 0, 1], [1, -1, 0], 90, 12, 4, "steel", 6, rng)
    objs += metal.nail([-40, 0, 80], [0.05, 0.05, -1], 150, 10, "titanium", 3, rng)
    objs.append(metal.cannulated_screw([70, 30, -60], [-1, 0, 0.3], 60))
    objs.append(metal.kwire([-60, 50, -80], [1, -0.2, 0.4], 70))
    return objs


def _detector(kind="flat_panel", n=160, pixel=2.0, blur=0.0, scatter=0.0, vignetting=0.0):
    return Detector(kind, n, n, pixel, blur_px=blur, scatter_fraction=scatter, vignetting=vignetting)


POSES = [
    CArmPose((0, 0, 0), 0, 0, 1100, 700),
    CArmPose((5, -3, 10), 35, -15, 1000, 600, 5),
    CArmPose((-8, 4, -12), -90, 8, 1200, 800, -3),
    CArmPose((2, 2, 2), 150, 20, 1050, 550, 90, orbit_axis=(1, 0, 0.2)),
]


@pytest.mark.parametrize("pose", POSES)
def test_isocentre_projects_to_detector_centre(pose):
    det = Detector("flat_panel", 101, 140, 0.5)
    xy = pose.project([pose.isocenter], det)[0]
    np.testing.assert_allclose(xy, [(140 - 1) / 2, (101 - 1) / 2], atol=1e-9)
    centre, u, v = pose.detector_frame(det)
    np.testing.assert_allclose(np.linalg.norm(centre - pose.source()), pose.sid_mm)
    np.testing.assert_allclose([u @ v, u @ pose.central_ray(), v @ pose.central_ray()], 0, atol=1e-12)


@pytest.mark.parametrize("pose", POSES)
def test_magnification_is_sid_over_sod(pose):
    det = _detector(pixel=0.3)
    _, u, v = pose.detector_frame(det)
    iso = np.array(pose.isocenter)
    for axis in (u, v):
        xy = pose.project([iso - 20 * axis, iso + 20 * axis], det)
        dist_mm = np.linalg.norm(xy[1] - xy[0]) * det.pixel_mm
        assert dist_mm == pytest.approx(40 * pose.sid_mm / pose.sod_mm, rel=1e-9)


@pytest.mark.parametrize("pose", POSES)
def test_pixel_directions_hit_their_pixels(pose):
    det = Detector("flat_panel", 50, 70, 1.0)
    rows, cols = np.array([0, 13.5, 49]), np.array([0, 33, 69])
    dirs = pose.pixel_directions(det, rows, cols)
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=-1), 1.0)
    pts = pose.source() + 400.0 * dirs.reshape(-1, 3)
    xy = pose.project(pts, det).reshape(3, 3, 2)
    np.testing.assert_allclose(xy[..., 0], np.broadcast_to(cols, (3, 3)), atol=1e-9)
    np.testing.assert_allclose(xy[..., 1], np.broadcast_to(rows[:, None], (3, 3)), atol=1e-9)


def test_ap_view_orientation():
    """AP: beam posterior -> anterior, head at the image top, patient's right on the image left."""
    pose, det = CArmPose(), _detector()
    np.testing.assert_allclose(pose.central_ray(), [0, 1, 0], atol=1e-12)
    xy = pose.project([[0, 0, 50], [-50, 0, 0]], det)
    centre = (det.cols - 1) / 2
    assert xy[0, 1] < centre and xy[1, 0] < centre
    lao = CArmPose(primary_deg=90)
    np.testing.assert_allclose(lao.central_ray(), [1, 0, 0], atol=1e-12)   # detector on the left


def test_beer_lambert_on_a_sphere():
    radius, mu, n0 = 60.0, 0.03, 1000.0
    centre = np.array([10.0, -5.0, 8.0])
    phantom = Phantom("skull", [Ellipsoid(centre, None, mu, "soft", radii=[radius] * 3)])
    pose, det = CArmPose((0, 0, 0), 20, 10, 1100, 700), _detector(n=120, pixel=1.5)
    ex = render(phantom, [], pose, det, np.random.default_rng(0), n0, noise=False, anatomy_grid=1)
    # analytic chord: 2 sqrt(R^2 - d^2), d = distance from the sphere centre to each pixel ray
    src = pose.source()
    dirs = pose.pixel_directions(det, np.arange(det.rows), np.arange(det.cols))
    to_c = centre - src
    d2 = to_c @ to_c - (dirs @ to_c) ** 2
    chord = 2 * np.sqrt(np.maximum(radius ** 2 - d2, 0))
    assert (chord > 100).any() and (chord == 0).any()
    np.testing.assert_allclose(ex.image, n0 * np.exp(-mu * chord), rtol=1e-5)
    assert ex.image.dtype == np.float32 and not ex.metal_mask.any()


def test_coarse_anatomy_grid_is_close_to_full_resolution():
    """Upsampling the anatomy integral only softens edges: errors live in ~1 % of pixels."""
    phantom, det = _phantom(), _detector(n=400, pixel=0.75)
    full = render(phantom, [], CArmPose(), det, None, 1000.0, noise=False, anatomy_grid=1).image
    coarse = render(phantom, [], CArmPose(), det, None, 1000.0, noise=False, anatomy_grid=3).image
    rel = np.abs(coarse - full) / full
    assert rel.mean() < 3e-3 and np.percentile(rel, 95) < 5e-3 and np.percentile(rel, 99) < 0.03


@pytest.mark.parametrize("pose", POSES)
def test_visible_screw_points_lie_on_the_metal_mask(pose):
    rng = np.random.default_rng(1)
    implants = _implants(rng)
    det = _detector(n=200, pixel=1.6)
    ex = render(_phantom(), implants, pose, det, rng, 1000.0, noise=False)
    n_screws = sum(m.screw is not None for m in implants)
    assert len(ex.screws) == n_screws
    near = binary_dilation(ex.metal_mask, iterations=1)
    visible = [s for s in ex.screws if s.visible]
    assert len(visible) >= 4
    for s in visible:
        for x, y in (s.head_xy, s.tip_xy):
            assert near[int(round(y)), int(round(x))], (s, pose)


@pytest.mark.parametrize("kind", ["flat_panel", "image_intensifier"])
def test_metal_mask_is_exactly_where_metal_changes_the_image(kind):
    rng = np.random.default_rng(2)
    implants = _implants(rng)
    det = _detector(kind, n=220, pixel=1.4, vignetting=0.2)
    pose = CArmPose((0, 0, 0), 25, 5, 1100, 650)
    with_metal = render(_phantom(), implants, pose, det, rng, 1000.0, noise=False)
    without = render(_phantom(), [], pose, det, rng, 1000.0, noise=False)
    changed = with_metal.image != without.image
    assert changed.sum() > 500
    np.testing.assert_array_equal(with_metal.metal_mask, changed)


def test_plate_hole_is_not_metal():
    """A ray straight through an empty plate hole crosses no net metal."""
    rng = np.random.default_rng(3)
    objs = metal.plate([0, 0, 0], [0, 0, 1], [0, -1, 0], 80, 14, 5, "steel", 4, rng)
    det = Detector("flat_panel", 300, 300, 0.5, blur_px=0.0, scatter_fraction=0.0)
    pose = CArmPose((0, 0, 0), 0, 0, 1100, 700)   # central ray along +y, through the plate normal
    ex = render(Phantom("femur", []), objs[:1], pose, det, rng, 1000.0, noise=False)
    hole_centres = pose.project([p.center for p in objs[0].primitives if p.name == "hole"], det)
    for x, y in hole_centres:
        assert not ex.metal_mask[int(round(y)), int(round(x))]
        assert ex.image[int(round(y)), int(round(x))] == pytest.approx(1000.0, rel=1e-6)
    assert ex.metal_mask.sum() > 1000


@pytest.mark.parametrize("pose", POSES[:3])
def test_culling_matches_brute_force(pose):
    rng = np.random.default_rng(4)
    implants = _implants(rng)
    det = _detector(n=150, pixel=2.0, blur=0.8, scatter=0.2)
    args = (_phantom(), implants, pose, det, None, 500.0)
    culled = render(*args, noise=False)
    brute = render(*args, noise=False, cull=False)
    np.testing.assert_allclose(culled.image, brute.image, rtol=1e-6)
    np.testing.assert_array_equal(culled.metal_mask, brute.metal_mask)


def test_image_intensifier_field_is_a_dark_circle():
    det = _detector("image_intensifier", n=200, pixel=1.5, blur=0.7, scatter=0.2, vignetting=0.3)
    ex = render(Phantom("knee", []), [], CArmPose(), det, np.random.default_rng(5), 1000.0)
    yy, xx = np.mgrid[:200, :200] - 99.5
    r = np.hypot(xx, yy)
    assert ex.field_mask[r < 95].all() and not ex.field_mask[r > 99].any()
    assert ex.field_mask.sum() == pytest.approx(np.pi * 97 ** 2, rel=0.03)
    assert ex.image[r > 101].max() < 5.0                      # no signal outside the circle
    centre, rim = ex.image[r < 10].mean(), ex.image[(r > 85) & (r < 90)].mean()
    assert centre == pytest.approx(1000 * 1.2, rel=0.03)        # primary + 20 % scatter
    assert rim / centre == pytest.approx(1 - 0.3 * (87.5 / 97) ** 2, abs=0.05)   # vignetting


def test_flat_panel_shutters_collimate_the_field():
    det = _detector(n=100)
    ex = render(Phantom("knee", []), [], CArmPose(), det, None, 800.0, noise=False,
                shutters=(0.1, 0.2, 0.0, 0.3))
    assert ex.field_mask[:70, 10:80].all() and not ex.field_mask[:, :10].any()
    assert not ex.field_mask[70:].any() and not ex.field_mask[:, 80:].any()
    assert (ex.image[~ex.field_mask] == 0).all() and np.allclose(ex.image[ex.field_mask], 800)


def test_render_is_deterministic_for_a_seed():
    implants, det = _implants(np.random.default_rng(6)), _detector(n=128, blur=0.7, scatter=0.25)
    a, b, c = (render(_phantom(), implants, POSES[1], det, np.random.default_rng(seed), 300.0)
               for seed in (7, 7, 8))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.metal_mask, b.metal_mask)
    assert not np.array_equal(a.image, c.image)
    clean1 = render(_phantom(), implants, POSES[1], det, np.random.default_rng(1), 300.0, noise=False)
    clean2 = render(_phantom(), implants, POSES[1], det, np.random.default_rng(2), 300.0, noise=False)
    np.testing.assert_array_equal(clean1.image, clean2.image)


@pytest.mark.parametrize("quanta", [3.0, 40.0, 1000.0])
def test_poisson_noise_variance_equals_mean_in_air(quanta):
    det = _detector(n=256)
    ex = render(Phantom("knee", []), [], CArmPose(), det, np.random.default_rng(9), quanta)
    assert ex.image.mean() == pytest.approx(quanta, rel=0.01)
    assert ex.image.var() == pytest.approx(quanta, rel=0.03)
    if quanta < 5:                                   # exact Poisson: integer counts
        np.testing.assert_array_equal(ex.image, np.round(ex.image))


def test_random_pose_is_plausible():
    phantom, det = _phantom(), Detector("flat_panel", 976, 976, 0.3)
    rng = np.random.default_rng(10)
    for view in ("ap", "lateral", "oblique", None):
        for _ in range(20):
            pose = random_pose(phantom, det, rng, view)
            assert np.linalg.norm(np.array(pose.isocenter) - phantom.focus) < 50
            assert 1000 <= pose.sid_mm <= 1200 and 1.0 < pose.magnification <= 2.0
            a = (pose.primary_deg + 180) % 360 - 180
            if view == "lateral":
                assert 75 < abs(a) < 105
            elif view == "oblique":
                assert 15 < abs(a) < 65
    hash(pose)


def test_sweep_and_jitter_poses():
    phantom, det = _phantom(), _detector()
    rng = np.random.default_rng(11)
    sweep = sweep_poses(phantom, det, rng, 9, arc_deg=200.0)
    angles = np.array([p.primary_deg for p in sweep])
    np.testing.assert_allclose(np.diff(angles), 25.0)
    assert angles[0] == pytest.approx(-100.0)
    assert len({(p.isocenter, p.sid_mm, p.sod_mm) for p in sweep}) == 1
    moved = jitter_pose(sweep[0], rng, translate_mm=2.0, rotate_deg=1.0)
    assert 0 < np.linalg.norm(np.subtract(moved.isocenter, sweep[0].isocenter)) < 15
    assert abs(moved.primary_deg - sweep[0].primary_deg) < 6
    assert moved.sid_mm == sweep[0].sid_mm


def test_orbit_around_a_limb_axis():
    """With orbit_axis = limb axis, every primary angle keeps the central ray perpendicular
    to the limb, and the limb's +axis end is at the top of the image."""
    axis = np.array([1.0, 0.0, 0.0])
    det = _detector()
    for primary in (0, 45, 90, 180):
        pose = CArmPose(primary_deg=primary, orbit_axis=tuple(axis))
        assert abs(pose.central_ray() @ axis) < 1e-12
        xy = pose.project([[50, 0, 0], [-50, 0, 0]], det)
        assert xy[0, 1] < xy[1, 1]


def test_metal_builders_are_modest_and_screws_have_axes():
    rng = np.random.default_rng(12)
    ped = metal.pedicle_screw([0, 0, 0], [0, 1, 0], 45, 6.5)
    assert len(ped.primitives) <= 12 and ped.kind == "pedicle_screw"
    np.testing.assert_allclose(ped.screw.tip, [0, 45, 0])
    assert ped.screw.head[1] < -5                   # the tulip sits outside the entry point
    assert all(p.is_metal and p.mu > 0 for p in ped.primitives)
    plate_objs = metal.plate([0, 0, 0], [0, 0, 1], [1, 0, 0], 100, 12, 4, "steel", 8, rng)
    assert plate_objs[0].kind == "plate" and plate_objs[0].screw is None
    assert 4 <= len(plate_objs) - 1 <= 8
    for s in plate_objs[1:]:
        assert s.screw.tip[0] < s.screw.head[0]      # screws go into the bone (-normal)
    nail_objs = metal.nail([0, 0, 0], [0, 0, -1], 300, 10, "titanium", 4, rng)
    assert len(nail_objs) == 5 and all(o.screw is not None for o in nail_objs[1:])
    assert metal.kwire([0, 0, 0], [1, 0, 0], 50).screw is None
    assert len(metal.rod([[0, 0, 0], [0, 0, 40], [0, 5, 80]]).primitives) == 2
    with pytest.raises(ValueError):
        metal.kwire([0, 0, 0], [1, 0, 0], 50, material="gold")
