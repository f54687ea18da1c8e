"""Photographs re-taken as other fundus cameras would take them: a development benchmark for resolution matching and
adaptation, built from labelled photographs of one camera.

A :class:`CameraShift` changes, in order:

1. **geometry**: a camera with a ``field_of_view_degrees`` field of view whose frame is ``frame_width`` pixels wide (its
   field of view about 95.5 % of that across, as in 565-px, 45-degree photographs). The source photograph's retina
   (``source_degrees`` across, 30 for CHASE_DB1) is resized to the new camera's pixels per degree and put in the
   centre; the ring between it and the new field-of-view edge, retina the source never showed, is filled with the
   source mirrored across its field-of-view edge (vessel-like texture, no reference there: left out of the scores by
   :func:`apply_camera_shift`'s ``valid`` mask). A wider-angle camera thus shows vessels thinner *relative to its field
   of view* than the source, the case that matching field-of-view diameters alone cannot fully undo;
2. **illumination**: vignetting (brightness falling to ``1 - vignetting`` at the field-of-view edge, quadratically)
   and a left-right gradient (``1 +- illumination``);
3. **colour response**: a 3x3 channel mixing matrix, then a gamma curve;
4. **defocus**: a Gaussian blur of ``blur_sigma`` pixels (at the new resolution);
5. **compression**: JPEG at ``jpeg_quality``.

:data:`CAMERA_SHIFTS` names the benchmark's shifts. The reference mask follows the geometry (area-resampled, then
thresholded at one half: what an annotator at that resolution would mark).

Example:
    >>> import numpy as np
    >>> photo = np.zeros((120, 120, 3)); yy, xx = np.mgrid[:120, :120]
    >>> photo[(yy - 60) ** 2 + (xx - 60) ** 2 < 55 ** 2] = (0.7, 0.35, 0.15)
    >>> shifted, mask, valid = apply_camera_shift(photo, np.zeros((120, 120), bool), CAMERA_SHIFTS["45deg-565px"])
    >>> shifted.shape, mask.shape, bool(valid.all())
    ((565, 565, 3), (565, 565), False)
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import PIL.Image
from scipy import ndimage

from ..image_processing import field_of_view_diameter, field_of_view_mask

#: The fraction of a frame's width its circular field of view spans (565-px, 45-degree photographs: about 540 px).
FIELD_OF_VIEW_FILL = 0.955


@dataclass(frozen=True)
class CameraShift:
    """One simulated camera (see the module docstring); every default leaves the photograph unchanged."""

    field_of_view_degrees: Optional[float] = None
    frame_width: Optional[int] = None
    vignetting: float = 0.0
    illumination: float = 0.0
    colour_matrix: Tuple[Tuple[float, float, float], ...] = ((1, 0, 0), (0, 1, 0), (0, 0, 1))
    gamma: float = 1.0
    blur_sigma: float = 0.0
    jpeg_quality: Optional[int] = None


_WARM = ((0.95, 0.10, 0.0), (0.05, 0.80, 0.05), (0.0, 0.10, 0.70))  # redder, flatter green, darker blue
#: The hard camera-shift benchmark: geometry (two wide-angle cameras), illumination, colour, defocus, compression,
#: and all of them together.
CAMERA_SHIFTS: Dict[str, CameraShift] = {
    "45deg-565px": CameraShift(field_of_view_degrees=45, frame_width=565),
    "50deg-768px": CameraShift(field_of_view_degrees=50, frame_width=768),
    "illumination": CameraShift(vignetting=0.45, illumination=0.25),
    "colour": CameraShift(colour_matrix=_WARM, gamma=1.4),
    "defocus": CameraShift(blur_sigma=2.5),
    "jpeg-35": CameraShift(jpeg_quality=35),
    "combined": CameraShift(field_of_view_degrees=45, frame_width=640, vignetting=0.35, illumination=0.15,
                            colour_matrix=_WARM, gamma=1.25, blur_sigma=0.8, jpeg_quality=50),
}


def _geometry(image: np.ndarray, mask: np.ndarray, shift: CameraShift, source_degrees: float
              ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The photograph, mask, valid region and field of view in the new camera's frame."""
    fov = field_of_view_mask(image, erosion=0)
    diameter = field_of_view_diameter(image)
    if diameter is None:
        raise ValueError("A camera shift with a new field of view needs a photograph with a dark surround.")
    rows, cols = np.nonzero(fov)
    centre = np.array([rows.mean(), cols.mean()])
    target_diameter = FIELD_OF_VIEW_FILL * shift.frame_width
    scale = (target_diameter / shift.field_of_view_degrees) / (diameter / source_degrees)
    # 1. the source resized to the new pixels per degree (antialiased), its field of view kept
    height, width = image.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.stack([np.asarray(PIL.Image.fromarray(image[..., c].astype(np.float32)).resize(size, PIL.Image.BICUBIC))
                      for c in range(3)], axis=-1)
    small_mask = np.asarray(PIL.Image.fromarray(mask.astype(np.float32)).resize(size, PIL.Image.BOX)) > 0.5
    # the mirror runs 3 % inside the source's edge: the aperture's dark rim would otherwise show as a ring
    centre_small, radius_small = centre * scale, 0.97 * diameter * scale / 2
    # 2. each frame pixel samples the source at its radius, mirrored across the source's edge in the ring beyond it
    frame = shift.frame_width
    yy, xx = np.mgrid[:frame, :frame].astype(np.float64)
    dy, dx = yy - (frame - 1) / 2, xx - (frame - 1) / 2
    radius = np.hypot(dy, dx)
    source_radius = np.where(radius <= radius_small, radius, np.maximum(2 * radius_small - radius, 0.0))
    ratio = np.divide(source_radius, radius, out=np.ones_like(radius), where=radius > 0)
    coords = [centre_small[0] + dy * ratio, centre_small[1] + dx * ratio]
    new_fov = radius <= target_diameter / 2
    shifted = np.stack([ndimage.map_coordinates(small[..., c], coords, order=1, mode="nearest") for c in range(3)], -1)
    shifted *= new_fov[..., None]
    inside = radius <= radius_small
    new_mask = ndimage.map_coordinates(small_mask.astype(np.float32), coords, order=0, mode="constant") > 0.5
    new_mask &= inside
    valid = inside | ~new_fov  # the source's retina, and the dark surround; not the mirrored ring
    return shifted, new_mask, valid, new_fov


def apply_camera_shift(image: np.ndarray, mask: np.ndarray, shift: CameraShift, source_degrees: float = 30.0,
                       ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``image`` (``(H, W, 3)`` float in [0, 1]) and its reference ``mask`` (bool ``(H, W)``) as ``shift``'s camera
    would have taken them. Returns the photograph (float32 in [0, 1]), the reference mask and the ``valid`` bool
    region where that reference is known (everything but the mirrored ring of a wider field of view); scores are
    computed there."""
    image = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)
    mask = np.asarray(mask, dtype=bool)
    if image.ndim != 3 or image.shape[-1] != 3 or mask.shape != image.shape[:2]:
        raise ValueError(f"`image` must be (H, W, 3) and `mask` (H, W) of the same size, got {image.shape} and "
                         f"{mask.shape}.")
    valid = np.ones(mask.shape, dtype=bool)
    if shift.field_of_view_degrees is not None:
        image, mask, valid, fov = _geometry(image, mask, shift, source_degrees)
    else:
        fov = field_of_view_mask(image, erosion=0)
    if shift.vignetting or shift.illumination:
        rows, cols = np.nonzero(fov)
        cy, cx = rows.mean(), cols.mean()
        radius = max(np.ptp(rows), np.ptp(cols)) / 2 + 1
        yy, xx = np.mgrid[:image.shape[0], :image.shape[1]]
        r2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / radius ** 2
        gain = (1 - shift.vignetting * np.clip(r2, 0, 1)) * (1 + shift.illumination * np.clip((xx - cx) / radius, -1, 1))
        image = image * gain[..., None]
    image = np.clip(image @ np.asarray(shift.colour_matrix, dtype=np.float64).T, 0.0, 1.0) ** shift.gamma
    if shift.blur_sigma:
        image = ndimage.gaussian_filter(image, sigma=(shift.blur_sigma, shift.blur_sigma, 0))
    if shift.jpeg_quality is not None:
        buffer = io.BytesIO()
        PIL.Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(
            buffer, format="JPEG", quality=int(shift.jpeg_quality))
        image = np.asarray(PIL.Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")) / 255.0
    return np.clip(image, 0.0, 1.0).astype(np.float32), mask, valid


__all__ = ["CAMERA_SHIFTS", "FIELD_OF_VIEW_FILL", "CameraShift", "apply_camera_shift"]
