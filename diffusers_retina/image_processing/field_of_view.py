"""The field of view of fundus photographs: find it, measure it, fill what lies outside it.

The circular aperture of a fundus camera leaves a black surround. Resolution matching across cameras and the
feature pipeline's window filling both start from it.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import PIL.Image
import torch
from scipy import ndimage


def unit_image(image: np.ndarray, name: str) -> np.ndarray:
    """``image`` (HW / HWC with 1 or 3 channels; uint8, uint16 or float in [0, 1]) as float32 ``(H, W, C)`` in [0, 1];
    a ``ValueError`` naming ``name`` otherwise."""
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
    array = unit_image(image, "image")
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


def field_of_view_masks(images: torch.Tensor, threshold: float = 0.1, erosion: int = 2) -> torch.Tensor:
    """:func:`field_of_view_mask` of every image of a batch as the pipelines hold it (``(N, C, H, W)`` float in
    ``[-1, 1]``); returns a bool ``(N, H, W)`` tensor on the images' device.

    Example:
        >>> import torch
        >>> batch = -torch.ones(2, 3, 32, 32); batch[:, :, 4:28, 4:28] = 0.5
        >>> fov = field_of_view_masks(batch)
        >>> fov.shape, bool(fov[0, 16, 16]), bool(fov[1, 0, 0])
        (torch.Size([2, 32, 32]), True, False)
    """
    if images.ndim != 4:
        raise ValueError(f"`images` must be an (N, C, H, W) batch in [-1, 1], got shape {tuple(images.shape)}.")
    arrays = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    masks = [field_of_view_mask(array, threshold=threshold, erosion=erosion) for array in arrays]
    return torch.from_numpy(np.stack(masks)).to(images.device)


def fill_outside_field_of_view(images: torch.Tensor, fov: torch.Tensor) -> torch.Tensor:
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
    if images.ndim != 4 or fov.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"`fov` must be (N, H, W) = {(images.shape[0], *images.shape[-2:])} for images of shape "
                         f"{tuple(images.shape)}, got {tuple(fov.shape)}.")
    inside = fov.to(images.device)[:, None].to(images.dtype)
    count = inside.sum(dim=(-2, -1), keepdim=True)
    mean = (images * inside).sum(dim=(-2, -1), keepdim=True) / count.clamp_min(1)
    keep = fov.to(images.device)[:, None] | (count == 0)
    return torch.where(keep, images, mean.expand_as(images))


def downscale(image: PIL.Image.Image, max_side: int, resample: int = PIL.Image.BICUBIC) -> PIL.Image.Image:
    """``image`` resized so its longer side is at most ``max_side`` (smaller images are kept as they are)."""
    scale = max_side / max(image.size)
    if scale >= 1:
        return image
    return image.resize((round(image.width * scale), round(image.height * scale)), resample)


def rescale_to_field_of_view(image: PIL.Image.Image, diameter: int) -> Tuple[PIL.Image.Image, float]:
    """``image`` resized (bicubic) so that its field of view spans ``diameter`` pixels, and the scale applied: a model
    sees vessels at the width it learnt them. An image without a dark surround (a crop inside the retina) has no field
    of view to measure: it is only downscaled, to a longer side of at most ``diameter``. The result's longer side is
    capped at twice ``diameter``.

    Example:
        >>> from skimage.data import retina  # doctest: +SKIP
        >>> photo, scale = rescale_to_field_of_view(PIL.Image.fromarray(retina()), 920)  # doctest: +SKIP
    """
    found = field_of_view_diameter(np.asarray(image.convert("RGB")))
    if found is None:
        resized = downscale(image, diameter)
        return resized, resized.width / image.width
    scale = min(diameter / found, 2 * diameter / max(image.size))
    if abs(scale - 1) < 1e-3:
        return image, 1.0
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, PIL.Image.BICUBIC), scale
