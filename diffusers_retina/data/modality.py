"""Field of view, a fluorescein-angiography-like target modality, and the simple intensity baselines of domain
adaptation (histogram matching, inversion; defined in :mod:`diffusers_retina.image_processing.intensity`, re-exported
here).

Everything here takes ``(H, W)`` or ``(H, W, C)`` arrays (``C`` = 1 or 3): floats in ``[0, 1]``, or 8/16-bit integers
as :func:`diffusers_retina.data.read_image` returns them; results are float32 in ``[0, 1]``.

Example:
    >>> import numpy as np
    >>> photo = np.zeros((64, 64, 3)); yy, xx = np.mgrid[:64, :64]
    >>> photo[(yy - 32) ** 2 + (xx - 32) ** 2 < 28 ** 2] = (0.8, 0.4, 0.2)
    >>> fov = field_of_view_mask(photo)
    >>> bool(fov[32, 32]), bool(fov[0, 0])
    (True, False)
    >>> fluorescein_like(photo, seed=0).shape
    (64, 64, 3)
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..image_processing.field_of_view import (  # noqa: F401 (re-exported: data.modality.field_of_view_mask, ...)
    field_of_view_diameter,
    field_of_view_mask,
    field_of_view_masks,
    fill_outside_field_of_view,
    unit_image,
)
from ..image_processing.intensity import (  # noqa: F401 (re-exported: data.modality.match_histograms, ...)
    INTENSITY_TRANSFORMS,
    apply_source_intensity_transform,
    check_source_intensity_transform,
    invert_intensity,
    match_histograms,
    match_quantiles,
    reference_quantiles,
    source_intensity_transform,
    to_source_intensities,
)

# The documented fluorescein-angiography-like transform (see `fluorescein_like`)
FA_BACKGROUND = 0.3
FA_GAMMA = 1.3
FA_BACKGROUND_SIGMA = 25.0
FA_BLUR_SIGMA = 1.0
FA_NOISE_SIGMA = 0.02
FA_VIGNETTING = 0.45


def fluorescein_like(image: np.ndarray, seed: int = 0, fov: Optional[np.ndarray] = None) -> np.ndarray:
    """A colour fundus photograph made to look like a fluorescein angiogram: vessels bright on a dark background.

    The documented target modality of the project's AdaptDiff reference (it stands in for real angiograms, whose
    labels are used only to evaluate): the green channel (where vessels contrast most) stretched between its 1st and
    99th percentiles inside the field of view, inverted (vessels become bright), its slow illumination gradient
    removed (Gaussian background, ``FA_BACKGROUND_SIGMA`` px) so that the background lies at ``FA_BACKGROUND`` and the
    brightest vessels (99.5th percentile) at 1, raised to the
    power ``FA_GAMMA`` (dark background, bright vessels), blurred (Gaussian, ``FA_BLUR_SIGMA`` px: the softer angiography optics),
    darkened towards the edge of the field of view (vignetting ``1 - FA_VIGNETTING * r^2``), with Gaussian noise
    (``FA_NOISE_SIGMA``, seeded by ``seed``) and a black surround. Returns an ``(H, W, 3)`` grey image in ``[0, 1]``.
    """
    from scipy import ndimage  # imported here: the pipelines import this module
    array = unit_image(image, "image")
    fov = field_of_view_mask(array) if fov is None else np.asarray(fov, dtype=bool)
    green = array[..., 1] if array.shape[-1] == 3 else array[..., 0]
    inside = green[fov] if fov.any() else green.ravel()
    low, high = np.percentile(inside, [1, 99])
    stretched = np.clip((green - low) / max(high - low, 1e-6), 0, 1)
    inverted = 1.0 - stretched
    # remove the slow illumination gradient (normalised convolution inside the field of view), as angiograms have a
    # fairly even background: the local background goes to FA_BACKGROUND and the brightest vessels to 1
    weights = ndimage.gaussian_filter(fov.astype(np.float32), FA_BACKGROUND_SIGMA)
    local = ndimage.gaussian_filter(np.where(fov, inverted, 0.0), FA_BACKGROUND_SIGMA) / np.maximum(weights, 1e-6)
    detail = inverted - local
    brightest = np.percentile(detail[fov] if fov.any() else detail, 99.5)
    angiogram = FA_BACKGROUND + (1 - FA_BACKGROUND) * detail / max(brightest, 1e-6)
    angiogram = np.clip(angiogram, 0.0, 1.0) ** FA_GAMMA
    angiogram = ndimage.gaussian_filter(angiogram, FA_BLUR_SIGMA)
    rows, cols = np.nonzero(fov) if fov.any() else np.indices(green.shape).reshape(2, -1)
    centre_y, centre_x = rows.mean(), cols.mean()
    radius = max(rows.max() - rows.min(), cols.max() - cols.min(), 1) / 2.0
    yy, xx = np.indices(green.shape)
    r2 = ((yy - centre_y) ** 2 + (xx - centre_x) ** 2) / radius**2
    angiogram = angiogram * np.clip(1.0 - FA_VIGNETTING * r2, 0.0, 1.0)
    angiogram = angiogram + FA_NOISE_SIGMA * np.random.default_rng(seed).standard_normal(green.shape)
    angiogram = np.where(fov, np.clip(angiogram, 0.0, 1.0), 0.0).astype(np.float32)
    return np.repeat(angiogram[..., None], 3, axis=-1)


def _disc_pixels(candidates: np.ndarray, count: int, radius: float, rng: np.random.Generator,
                 centre_pool: np.ndarray) -> np.ndarray:
    """``count`` pixels of ``candidates`` (bool ``(H, W)``) chosen in discs of ``radius`` around random centres drawn
    from ``centre_pool``: structured errors (missing segments, spurious blobs) rather than salt-and-pepper noise."""
    from scipy import ndimage  # imported here: the pipelines import this module
    chosen = np.zeros(candidates.shape, dtype=bool)
    pool = np.flatnonzero(centre_pool)
    if count <= 0 or pool.size == 0:
        return chosen
    per_disc = max(1.0, float(candidates.sum()) / max(pool.size, 1) * np.pi * radius**2)
    while True:
        missing = count - int(chosen.sum())
        if missing <= 0:
            break
        centres = np.zeros(candidates.shape, dtype=bool)
        centres.flat[rng.choice(pool, size=max(1, int(np.ceil(missing / per_disc))), replace=True)] = True
        new = candidates & ~chosen & (ndimage.distance_transform_edt(~centres) <= radius)
        new_pixels = np.flatnonzero(new)
        if new_pixels.size == 0:
            if not (candidates & ~chosen).any():
                break
            continue
        if new_pixels.size > missing:  # trim the last discs to the exact count
            new_pixels = rng.choice(new_pixels, size=missing, replace=False)
        chosen.flat[new_pixels] = True
    return chosen


def corrupt_mask(mask: np.ndarray, fp_rate: float = 0.0, fn_rate: float = 0.0, seed: int = 0, radius: float = 6.0,
                 fov: Optional[np.ndarray] = None) -> np.ndarray:
    """A binary vessel mask with structured label noise, for weak-label studies: ``fn_rate`` of its vessel pixels
    removed in discs of ``radius`` pixels centred on vessels (missed segments), and background pixels equal to
    ``fp_rate`` times the vessel pixel count added in discs centred anywhere inside ``fov`` (spurious blobs and
    thickened vessels). Exact counts; seeded. Returns a ``uint8`` 0/1 array.

    Example:
        >>> mask = np.zeros((64, 64), dtype=np.uint8); mask[30:34, :] = 1
        >>> noisy = corrupt_mask(mask, fp_rate=0.2, fn_rate=0.1, seed=0)
        >>> int((mask & ~noisy.astype(bool)).sum()), int((noisy & ~mask.astype(bool)).sum())
        (26, 51)
    """
    for name, rate in (("fp_rate", fp_rate), ("fn_rate", fn_rate)):
        if not (isinstance(rate, (int, float)) and np.isfinite(rate) and 0.0 <= rate):
            raise ValueError(f"`{name}` must be a finite number >= 0, got {rate!r}.")
    if fn_rate > 1.0:
        raise ValueError(f"`fn_rate` is the fraction of vessel pixels removed, at most 1, got {fn_rate!r}.")
    vessels = np.asarray(mask) > 0
    if vessels.ndim != 2:
        raise ValueError(f"`mask` must be a 2-D binary mask, got shape {vessels.shape}.")
    region = np.ones(vessels.shape, dtype=bool) if fov is None else np.asarray(fov, dtype=bool)
    rng = np.random.default_rng(seed)
    total = int(vessels.sum())
    removed = _disc_pixels(vessels, int(round(fn_rate * total)), radius, rng, vessels)
    added = _disc_pixels(~vessels & region, int(round(fp_rate * total)), radius, rng, region)
    return ((vessels & ~removed) | added).astype(np.uint8)
