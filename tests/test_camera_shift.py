"""The simulated cameras of the camera-shift benchmark (``diffusers_retina.data.camera_shift``)."""

from __future__ import annotations

import numpy as np
import pytest

from diffusers_retina.data.camera_shift import (
    CAMERA_SHIFTS,
    FIELD_OF_VIEW_FILL,
    CameraShift,
    apply_camera_shift,
)
from diffusers_retina.image_processing import field_of_view_diameter


def photograph(size: int = 200, diameter: int = 180):
    """A disc photograph with one horizontal 'vessel' 6 px wide through its centre, and its mask."""
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (diameter / 2) ** 2
    rng = np.random.default_rng(0)
    image = np.zeros((size, size, 3))
    image[disc] = (0.7, 0.35, 0.15)
    image[disc] *= 0.9 + 0.1 * rng.random((int(disc.sum()), 1))
    vessel = disc & (np.abs(yy - size / 2) < 3)
    image[vessel] *= 0.5
    return image, vessel


def test_the_identity_camera_changes_nothing():
    image, mask = photograph()
    shifted, shifted_mask, valid = apply_camera_shift(image, mask, CameraShift())
    np.testing.assert_allclose(shifted, image, atol=1e-6)
    assert np.array_equal(shifted_mask, mask) and valid.all()


def test_a_wider_camera_shrinks_the_retina_inside_a_new_field_of_view():
    image, mask = photograph()
    shift = CameraShift(field_of_view_degrees=45, frame_width=300)
    shifted, shifted_mask, valid = apply_camera_shift(image, mask, shift, source_degrees=30)
    assert shifted.shape == (300, 300, 3) and shifted_mask.shape == valid.shape == (300, 300)
    assert abs(field_of_view_diameter(shifted) - FIELD_OF_VIEW_FILL * 300) <= 3
    # pixels per degree: 0.955 * 300 / 45 against 180 / 30 -> the vessel narrows by that ratio
    scale = (FIELD_OF_VIEW_FILL * 300 / 45) / (180 / 30)
    width = shifted_mask[:, 150].sum()
    assert abs(width - 6 * scale) <= 1.5, width
    # the mirrored ring has no reference and is left out; the retina in the middle and the surround are scored
    assert not valid[150, 150 + int(0.47 * 180 * scale) + 8] and valid[150, 150] and valid[0, 0]
    assert not shifted_mask[~valid].any()


def test_photometric_changes_and_compression():
    image, mask = photograph()
    for name in ("illumination", "colour", "defocus", "jpeg-35"):
        shifted, shifted_mask, valid = apply_camera_shift(image, mask, CAMERA_SHIFTS[name])
        assert shifted.shape == image.shape and np.array_equal(shifted_mask, mask) and valid.all()
        assert 0 <= shifted.min() and shifted.max() <= 1 and not np.allclose(shifted, image, atol=1e-3), name
    blurred, _, _ = apply_camera_shift(image, mask, CAMERA_SHIFTS["defocus"])
    assert np.abs(np.diff(blurred[..., 1], axis=0)).mean() < np.abs(np.diff(image[..., 1], axis=0)).mean()


def test_bad_inputs():
    image, mask = photograph()
    with pytest.raises(ValueError, match="same size"):
        apply_camera_shift(image, mask[:10], CameraShift())
    with pytest.raises(ValueError, match="dark surround"):
        apply_camera_shift(np.full((50, 50, 3), 0.5), np.zeros((50, 50), bool), CAMERA_SHIFTS["45deg-565px"])
