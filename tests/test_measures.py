"""Vessel measures against known answers on synthetic shapes, their invariance to resolution, and the intervals."""

import functools
import math

import numpy as np
import pytest
from scipy import ndimage
from skimage.draw import line

from diffusers_retina.measures import (
    CORE_MEASURES,
    MEASURE_NAMES,
    MeasureError,
    box_counting_dimension,
    conformal_scales,
    member_intervals,
    vessel_measures,
)


def band(size, width, angle_degrees, half_length):
    """A straight vessel of ``width`` px through the image centre at ``angle_degrees``."""
    yy, xx = np.mgrid[:size, :size] - size // 2
    angle = math.radians(angle_degrees)
    across = np.abs(yy * math.cos(angle) - xx * math.sin(angle))
    along = np.abs(yy * math.sin(angle) + xx * math.cos(angle))
    return (across < width / 2) & (along < half_length)


def half_ring(radius, width):
    size = 2 * radius + 80
    yy, xx = np.mgrid[:size, :size] - size // 2
    return (np.abs(np.hypot(yy, xx) - radius) < width / 2) & (yy <= 0)


def carpet(levels):
    block = np.ones((1, 1), bool)
    for _ in range(levels):
        hole = np.zeros_like(block)
        block = np.block([[block, block, block], [block, hole, block], [block, block, block]])
    return block


def tree(scale=1):
    """A trunk that forks twice, with curved branches of widths 9, 7 and 5 px (at ``scale`` 1)."""
    mask = np.zeros((400, 400), bool)
    for (r0, c0, r1, c1), width in [((380, 200, 220, 200), 9), ((220, 200, 90, 90), 7), ((220, 200, 60, 300), 7),
                                    ((140, 250, 70, 380), 5)]:
        rr, cc = line(r0, c0, r1, c1)
        segment = np.zeros_like(mask)
        segment[rr, cc] = True
        mask |= ndimage.binary_dilation(segment, iterations=width // 2)
    yy, xx = np.mgrid[:400, :400]
    mask |= (np.abs(np.hypot(yy - 330, xx - 60) - 50) < 2.5) & (xx > 60)
    return np.kron(mask, np.ones((scale, scale), bool)) if scale > 1 else mask


@pytest.mark.parametrize("width", [3, 5, 7, 9])
@pytest.mark.parametrize("angle", [0, 10, 22.5, 30])
def test_straight_tube(width, angle):
    """Width within 0.25 px at any orientation; straight (tortuosity 1 within 0.01); two ends, no junction; its
    length lies between the tube's length minus its width (a medial axis stops half a width before each square end)
    and the tube's length (thinning may run on into the corners), 1 px of slack either way."""
    mask = band(300, width, angle, 100)
    measures = vessel_measures(mask)
    assert abs(measures["calibre_median"] - width) <= 0.25
    assert abs(measures["tortuosity"] - 1.0) <= 0.01
    assert measures["branch_points"] == 0 and measures["end_points"] == 2
    length = measures["length_density"] * mask.size
    assert 200 - width - 1 <= length <= 200 + 1
    assert measures.units["calibre_median"] == "px" and measures.pixel_size_um is None


@pytest.mark.parametrize("radius", [60, 120])
def test_arc_of_known_arc_over_chord(radius):
    """A half circle: arc / chord = pi / 2 within 3 % (the skeleton stops short of the ends), curvature 1 / R
    within 10 %, calibre 5 px."""
    measures = vessel_measures(half_ring(radius, 5))
    assert measures["tortuosity"] == pytest.approx(math.pi / 2, rel=0.03)
    assert measures["curvature"] == pytest.approx(1.0 / radius, rel=0.10)
    assert measures["calibre_median"] == pytest.approx(5.0, abs=0.25)
    assert measures["branch_points"] == 0 and measures["end_points"] == 2


def test_straight_line_at_22_5_degrees_is_not_tortuous():
    """The pixel path of a 22.5-degree line is 8 % longer than its chord; the smoothed path is not."""
    assert vessel_measures(band(300, 3, 22.5, 120))["tortuosity"] < 1.005


def test_y_junction():
    mask = np.zeros((200, 200), bool)
    for r1, c1 in [(180, 100), (30, 40), (30, 160)]:
        rr, cc = line(100, 100, r1, c1)
        mask[rr, cc] = True
    measures = vessel_measures(ndimage.binary_dilation(mask, iterations=2))
    assert measures["branch_points"] == 1
    assert measures["end_points"] == 3


def test_spurs_are_pruned_but_short_branches_kept():
    """A 2 px bump on a 9 px vessel is no branch; a side branch 4 widths long is one."""
    mask = band(300, 9, 0, 120)
    bump = mask.copy()
    bump[143:146, 150:153] = True  # one-sided bulge of the wall
    assert vessel_measures(bump)["branch_points"] == 0
    side = mask.copy()
    side[110:150, 150:153] = True
    measures = vessel_measures(side)
    assert measures["branch_points"] == 1 and measures["end_points"] == 3


def test_fractal_dimension_known_answers():
    """Sierpinski carpet: log 8 / log 3 exactly with box sides 3^k; a filled square 2 and a line 1 (default boxes)."""
    assert box_counting_dimension(carpet(5), [3, 9, 27, 81]) == pytest.approx(math.log(8) / math.log(3), abs=1e-9)
    assert vessel_measures(np.ones((256, 256), bool))["fractal_dimension"] == pytest.approx(2.0, abs=0.01)
    assert vessel_measures(band(512, 1, 0, 250))["fractal_dimension"] == pytest.approx(1.0, abs=0.03)
    # default boxes (D/256 .. D/8, not powers of 3) on the carpet: within 0.1
    assert vessel_measures(carpet(5))["fractal_dimension"] == pytest.approx(math.log(8) / math.log(3), abs=0.1)


def test_disc_area_density_in_field_of_view():
    yy, xx = np.mgrid[:400, :400]
    fov = np.hypot(yy - 200, xx - 200) < 180
    disc = np.hypot(yy - 200, xx - 230) < 50
    measures = vessel_measures(disc, fov)
    assert measures["vessel_density"] == pytest.approx(50 ** 2 / 180 ** 2, rel=0.01)
    assert measures.fov_diameter_px == 359 and measures.notes == []


def test_outside_field_of_view_is_ignored():
    yy, xx = np.mgrid[:300, :300]
    fov = np.hypot(yy - 150, xx - 150) < 100
    mask = band(300, 5, 0, 140)
    inside = vessel_measures(mask & fov, fov)
    whole = vessel_measures(mask, fov)
    assert whole.values == inside.values


@functools.lru_cache(maxsize=1)
def tree_measures():
    return vessel_measures(tree(3), pixel_size_um=10.0 / 3), vessel_measures(tree(6), pixel_size_um=10.0 / 6)


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
@pytest.mark.parametrize("name,tolerance", [("vessel_density", 0.02), ("length_density", 0.03),
                                            ("calibre_median", 0.05), ("calibre_q1", 0.08), ("calibre_q3", 0.08),
                                            ("tortuosity", 0.01), ("curvature", 0.10),
                                            ("fractal_dimension", 0.02)])
def test_micrometre_values_do_not_depend_on_resolution(name, tolerance):
    """The same tree at 1200 and 2400 px (field-of-view scale of real photographs), with pixel sizes to match: the
    same micrometre values within the stated relative tolerance, and the same counts."""
    low, high = tree_measures()
    assert high[name] == pytest.approx(low[name], rel=tolerance)
    assert (high["branch_points"], high["end_points"]) == (low["branch_points"], low["end_points"])
    assert high.units[name] == low.units[name]


def test_physical_scale_options_agree_and_units():
    mask = tree()
    by_pixel = vessel_measures(mask, pixel_size_um=9.0)
    by_diameter = vessel_measures(mask, fov_diameter_um=9.0 * 400)
    by_degrees = vessel_measures(mask, fov_degrees=9.0 * 400 / 288.0)
    for other in (by_diameter, by_degrees):
        for name in MEASURE_NAMES:
            assert other[name] == pytest.approx(by_pixel[name], rel=1e-9)
    pixels = vessel_measures(mask)
    assert by_pixel["calibre_median"] == pytest.approx(9.0 * pixels["calibre_median"])
    assert by_pixel["length_density"] == pytest.approx(pixels["length_density"] / 9.0 * 1e3)
    assert by_pixel.units["length_density"] == "mm/mm^2" and pixels.units["length_density"] == "1/px"
    with pytest.raises(ValueError, match="at most one"):
        vessel_measures(mask, pixel_size_um=9.0, fov_degrees=30.0)
    with pytest.raises(ValueError, match="pixel_size_um"):
        vessel_measures(mask, pixel_size_um=-1.0)


def test_bad_masks_name_the_input():
    with pytest.raises(MeasureError, match="scan_07.png.*not binary"):
        vessel_measures(np.linspace(0, 1, 100).reshape(10, 10), name="scan_07.png")
    with pytest.raises(MeasureError, match="scan_07.png.*no vessel"):
        vessel_measures(np.zeros((10, 10), bool), name="scan_07.png")
    with pytest.raises(MeasureError, match="scan_07.png.*field of view is 12x10"):
        vessel_measures(np.ones((10, 10), bool), np.ones((10, 12), bool), name="scan_07.png")
    mask = (tree() * 255).astype(np.uint8)  # 0/255 is binary
    measures = vessel_measures(mask)
    assert measures.notes == ["no field of view: the whole image"]


def test_member_intervals_quantiles_and_conformal_scale():
    members = [{"a": float(v)} for v in (1.0, 2.0, 3.0, 4.0, 5.0)]
    interval = member_intervals(members, confidence=0.5)["a"]
    assert (interval.mean, interval.low, interval.high) == (3.0, 2.0, 4.0)
    assert interval.std == pytest.approx(np.std([1, 2, 3, 4, 5], ddof=1))
    scaled = member_intervals(members, scale={"a": 1.5})["a"]
    assert (scaled.low, scaled.high) == pytest.approx((3.0 - 1.5 * interval.std, 3.0 + 1.5 * interval.std))
    clipped = member_intervals(members, scale={"a": 2.0, "tortuosity": 5.0},
                               centre=None)["a"]  # 3 - 2 * 1.58 < 0: no measure is negative
    assert clipped.low == 0.0 and clipped.high == pytest.approx(3.0 + 2 * interval.std)
    tortuous = member_intervals([{"tortuosity": v} for v in (1.0, 1.1, 1.2)], scale={"tortuosity": 5.0})
    assert tortuous["tortuosity"].low == 1.0
    with pytest.raises(ValueError, match="two members"):
        member_intervals(members[:1])

    # conformal: members whose spread is 1/3 of the true error spread under-cover; the scale restores coverage
    rng = np.random.default_rng(0)

    def units(count):
        out = []
        for _ in range(count):
            truth = rng.normal()
            centre = truth + rng.normal()
            out.append((member_intervals([{"a": centre + rng.normal() / 3} for _ in range(8)]), {"a": truth}))
        return out

    calibration, test = units(400), units(400)
    scales = conformal_scales([i for i, _ in calibration], [r for _, r in calibration], confidence=0.9)
    raw = np.mean([i["a"].covers(r["a"]) for i, r in test])
    calibrated = np.mean([abs(r["a"] - i["a"].mean) <= scales["a"] * i["a"].std for i, r in test])
    assert raw < 0.6
    assert 0.85 <= calibrated <= 0.95


def test_core_measures_are_measures():
    assert set(CORE_MEASURES) <= set(MEASURE_NAMES) and len(CORE_MEASURES) == 6


def test_module_examples_run():
    import doctest

    import diffusers_retina.measures

    assert doctest.testmod(diffusers_retina.measures).failed == 0
