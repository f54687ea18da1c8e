"""Field of view, a fluorescein-angiography-like target modality, and the simple intensity baselines of domain
adaptation (histogram matching, inversion).

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

# The documented fluorescein-angiography-like transform (see `fluorescein_like`)
FA_BACKGROUND = 0.3
FA_GAMMA = 1.3
FA_BACKGROUND_SIGMA = 25.0
FA_BLUR_SIGMA = 1.0
FA_NOISE_SIGMA = 0.02
FA_VIGNETTING = 0.45


def _check_image(image: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype == np.uint8:  # 8-bit files as read_image returns them
        array = array / 255.0
    elif array.dtype == np.uint16:
        array = array / 65535.0
    array = array.astype(np.float32)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3):
        raise ValueError(f"`{name}` must be an (H, W), (H, W, 1) or (H, W, 3) array, got shape {array.shape}.")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise ValueError(f"`{name}` must hold finite values in [0, 1].")
    return array


def field_of_view_mask(image: np.ndarray, threshold: float = 0.1, erosion: int = 2) -> np.ndarray:
    """The circular field of view of a fundus photograph or angiogram, as retinal tools find it: the brightest
    channel above ``threshold`` times its 99th percentile (the surround is near black), dark specks smaller than 1 %
    of the image side (at least 3 px) ignored, its largest connected component with the holes filled, eroded by
    ``erosion`` pixels (the bright rim of the aperture). Returns a bool ``(H, W)`` array; an image with no dark
    surround (a crop inside the retina, or any image whose dark pixels are only scattered specks) gives all ``True``."""
    from scipy import ndimage  # imported here: the pipelines import this module
    array = _check_image(image, "image")
    brightest = array.max(axis=-1)
    level = threshold * max(float(np.percentile(brightest, 99)), 1e-6)
    speck = max(3, int(round(0.01 * min(brightest.shape))) | 1)
    inside = ~ndimage.binary_opening(brightest <= level, structure=np.ones((speck, speck), dtype=bool))
    labels, count = ndimage.label(inside)
    if count == 0 or inside.all():
        return np.ones(brightest.shape, dtype=bool)
    sizes = ndimage.sum(inside, labels, index=np.arange(1, count + 1))
    fov = ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))
    if erosion > 0:
        fov = ndimage.binary_erosion(fov, iterations=erosion, border_value=1)  # the image edge is no rim
    return fov


def field_of_view_diameter(image: np.ndarray, threshold: float = 0.1) -> Optional[int]:
    """The diameter in pixels of a photograph's field of view (the larger side of its bounding box, before the rim
    erosion), or ``None`` when the image has no dark surround (a crop inside the retina): the scale a model learnt
    at. CHASE_DB1's photographs (999 x 960) have a field of view about 920 px across.

    Example:
        >>> import numpy as np
        >>> photo = np.zeros((64, 80, 3)); yy, xx = np.mgrid[:64, :80]
        >>> photo[(yy - 32) ** 2 + (xx - 40) ** 2 < 25 ** 2] = 0.6
        >>> field_of_view_diameter(photo), field_of_view_diameter(np.full((8, 8), 0.5))
        (49, None)
    """
    fov = field_of_view_mask(image, threshold=threshold, erosion=0)
    if fov.all():
        return None
    rows, cols = np.nonzero(fov.any(axis=1))[0], np.nonzero(fov.any(axis=0))[0]  # never empty: see the mask
    return int(max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1)


def field_of_view_masks(images: "torch.Tensor", threshold: float = 0.1, erosion: int = 2) -> "torch.Tensor":
    """:func:`field_of_view_mask` of every image of a batch as the pipelines hold it (``(N, C, H, W)`` float in
    ``[-1, 1]``); returns a bool ``(N, H, W)`` tensor on the images' device.

    Example:
        >>> import torch
        >>> batch = -torch.ones(2, 3, 32, 32); batch[:, :, 4:28, 4:28] = 0.5
        >>> fov = field_of_view_masks(batch)
        >>> fov.shape, bool(fov[0, 16, 16]), bool(fov[1, 0, 0])
        (torch.Size([2, 32, 32]), True, False)
    """
    import torch

    if images.ndim != 4:
        raise ValueError(f"`images` must be an (N, C, H, W) batch in [-1, 1], got shape {tuple(images.shape)}.")
    arrays = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    masks = [field_of_view_mask(array, threshold=threshold, erosion=erosion) for array in arrays]
    return torch.from_numpy(np.stack(masks)).to(images.device)


def fill_outside_field_of_view(images: "torch.Tensor", fov: "torch.Tensor") -> "torch.Tensor":
    """``images`` (``(N, C, H, W)``) with every pixel outside ``fov`` (bool ``(N, H, W)``) set to the mean colour of
    that image's field of view. Networks with group normalisation compute their statistics over the whole input, so
    a window that holds part of the black surround shifts the features of the retina beside it; filled, the surround
    looks like average retina. Images with an empty field of view are returned unchanged.

    Example:
        >>> import torch
        >>> batch = -torch.ones(1, 3, 8, 8); batch[:, :, 2:6, 2:6] = 0.5
        >>> filled = fill_outside_field_of_view(batch, batch[:, 0] > 0)
        >>> filled[0, :, 0, 0].tolist()
        [0.5, 0.5, 0.5]
    """
    import torch

    if images.ndim != 4 or fov.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"`fov` must be (N, H, W) = {(images.shape[0], *images.shape[-2:])} for images of shape "
                         f"{tuple(images.shape)}, got {tuple(fov.shape)}.")
    inside = fov.to(images.device)[:, None].to(images.dtype)
    count = inside.sum(dim=(-2, -1), keepdim=True)
    mean = (images * inside).sum(dim=(-2, -1), keepdim=True) / count.clamp_min(1)
    keep = fov.to(images.device)[:, None] | (count == 0)
    return torch.where(keep, images, mean.expand_as(images))


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
    array = _check_image(image, "image")
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


def match_histograms(image: np.ndarray, reference: np.ndarray, image_fov: Optional[np.ndarray] = None,
                     reference_fov: Optional[np.ndarray] = None) -> np.ndarray:
    """Map every channel of ``image`` onto the intensity distribution of ``reference`` (quantile mapping), using only
    the pixels inside each field of view (the black surround would otherwise dominate both histograms); pixels
    outside ``image_fov`` are left unchanged. A grey image matched to a colour reference gets three channels.

    AdaptDiff matches its synthetic images to the target this way; "histogram matching of the input to the source"
    is one of the simple adaptation baselines. ``reference`` may be a list of images (their pooled histogram)."""
    array = _check_image(image, "image")
    references = reference if isinstance(reference, (list, tuple)) else [reference]
    references = [_check_image(r, "reference") for r in references]
    if reference_fov is None:
        reference_fovs = [np.ones(r.shape[:2], dtype=bool) for r in references]
    else:
        reference_fovs = reference_fov if isinstance(reference_fov, (list, tuple)) else [reference_fov]
    image_fov = np.ones(array.shape[:2], dtype=bool) if image_fov is None else np.asarray(image_fov, dtype=bool)
    channels = max(array.shape[-1], references[0].shape[-1])
    array = np.repeat(array, channels, axis=-1) if array.shape[-1] == 1 else array
    quantiles = np.linspace(0.0, 1.0, 1025)
    out = array.copy()
    for channel in range(channels):
        pooled = np.concatenate([r[..., min(channel, r.shape[-1] - 1)][f] for r, f in zip(references, reference_fovs)])
        values = array[..., channel][image_fov]
        if values.size == 0 or pooled.size == 0:
            continue
        source_q = np.quantile(values, quantiles)
        target_q = np.quantile(pooled, quantiles)
        out[..., channel][image_fov] = np.interp(values, source_q, target_q)
    return np.clip(out, 0.0, 1.0)


def invert_intensity(image: np.ndarray, fov: Optional[np.ndarray] = None) -> np.ndarray:
    """``1 - x`` inside the field of view (computed when not given), black outside: the intensity-inversion baseline
    (an angiogram's bright vessels become dark, as in the green channel of a colour photograph)."""
    array = _check_image(image, "image")
    fov = field_of_view_mask(array) if fov is None else np.asarray(fov, dtype=bool)
    return np.where(fov[..., None], 1.0 - array, 0.0).astype(np.float32)


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


INTENSITY_TRANSFORMS = ("none", "invert", "histmatch", "invert+histmatch")


def to_source_intensities(image: np.ndarray, transform: str, references: Optional[list] = None,
                          reference_fovs: Optional[list] = None, fov: Optional[np.ndarray] = None) -> np.ndarray:
    """A target image moved towards the source's intensities by a simple transform: ``none``, ``invert``
    (:func:`invert_intensity`), ``histmatch`` (:func:`match_histograms` to the pooled histogram of the source
    photographs ``references``) or ``invert+histmatch`` (both, in that order). The simple baselines of adaptation,
    and a way to get usable pseudo-labels from a source segmenter that cannot read the raw target."""
    if transform not in INTENSITY_TRANSFORMS:
        raise ValueError(f"`transform` must be one of {INTENSITY_TRANSFORMS}, got {transform!r}.")
    array = _check_image(image, "image")
    fov = field_of_view_mask(array) if fov is None else np.asarray(fov, dtype=bool)
    if "invert" in transform:
        array = invert_intensity(array, fov)
    if "histmatch" in transform:
        if not references:
            raise ValueError(f"`transform={transform!r}` needs source `references` to match the histogram to.")
        array = match_histograms(array, list(references), fov, reference_fovs)
    return array
