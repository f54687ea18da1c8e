"""The field of view of fundus photographs: find it, measure it, fill what lies outside it.

The circular aperture of a fundus camera leaves a black surround. Resolution matching across cameras and the
feature pipeline's window filling both start from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

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


def _circle_diameter(fov: np.ndarray) -> Optional[float]:
    """The diameter of the circle fitted (least squares, Kasa) to the edge of ``fov`` away from the image border, or
    ``None`` when too little of the edge is inside the frame (under a tenth of the fitted circumference) or the fit is
    no circle of this image (over four times its longer side: a straight dark band, say)."""
    edge = fov & ~ndimage.binary_erosion(fov, border_value=1)
    edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = False  # where the frame cuts the circle
    rows, cols = np.nonzero(edge)
    if rows.size < 16:
        return None
    x, y = cols.astype(np.float64), rows.astype(np.float64)
    design = np.stack([x, y, np.ones_like(x)], axis=1)
    (d, e, f), *_ = np.linalg.lstsq(design, -(x ** 2 + y ** 2), rcond=None)
    radius_squared = (d ** 2 + e ** 2) / 4 - f
    if radius_squared <= 0:
        return None
    diameter = 2 * float(np.sqrt(radius_squared))
    if rows.size < 0.1 * np.pi * diameter or diameter > 4 * max(fov.shape):
        return None
    return diameter


def field_of_view_diameter(image: np.ndarray, threshold: float = 0.1) -> Optional[int]:
    """The diameter in pixels of a photograph's field of view, or ``None`` when the image has no dark surround (a crop
    inside the retina): the scale a model learnt at. It is the larger side of the field of view's bounding box
    (before the rim erosion), or, when the frame cuts the circle (many cameras crop its top and bottom; a crop of a
    photograph), the diameter of the circle fitted to the edge inside the frame, whichever is larger. CHASE_DB1's
    photographs (999 x 960) have a field of view about 920 px across.

    Example:
        >>> import numpy as np
        >>> photo = np.zeros((64, 80, 3)); yy, xx = np.mgrid[:64, :80]
        >>> photo[(yy - 32) ** 2 + (xx - 40) ** 2 < 25 ** 2] = 0.6
        >>> field_of_view_diameter(photo), field_of_view_diameter(photo[12:52]), field_of_view_diameter(np.full((8, 8), 0.5))
        (49, 49, None)
    """
    fov = field_of_view_mask(image, threshold=threshold, erosion=0)
    if fov.all():
        return None
    rows, cols = np.nonzero(fov.any(axis=1))[0], np.nonzero(fov.any(axis=0))[0]  # never empty: see the mask
    box = int(max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1)
    touches_frame = fov[0].any() or fov[-1].any() or fov[:, 0].any() or fov[:, -1].any()
    fitted = _circle_diameter(fov) if touches_frame else None
    return box if fitted is None else max(box, int(round(fitted)))


def _unit_arrays(images: torch.Tensor) -> np.ndarray:
    """A batch as the pipelines hold it (``(N, C, H, W)`` float in ``[-1, 1]``) as ``(N, H, W, C)`` float32 arrays in
    ``[0, 1]``, the form the field-of-view functions read."""
    if images.ndim != 4:
        raise ValueError(f"`images` must be an (N, C, H, W) batch in [-1, 1], got shape {tuple(images.shape)}.")
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()


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
    masks = [field_of_view_mask(array, threshold=threshold, erosion=erosion) for array in _unit_arrays(images)]
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


#: ``processing_resolution`` values besides a positive int (the longer side, Marigold's convention).
PROCESSING_MODES = ("native", "auto")
#: Under ``"auto"``, a photograph whose scale is within this fraction of the training scale is processed as it is: the
#: reference models learnt with 0.75-1.33x scale augmentation, and resampling would only blur (CHASE_DB1's own
#: photographs span 893-923 px against the median 920).
SCALE_TOLERANCE = 0.05


@dataclass(frozen=True)
class ProcessingPlan:
    """How one image is processed: at ``size`` (height, width), ``scale`` times its own size, as ``basis`` decided:

    * ``"native"``: as it is (``processing_resolution=None`` or ``"native"``; ``"auto"`` within
      :data:`SCALE_TOLERANCE` of the training scale, or with a model that records no training scale);
    * ``"fixed"``: an int ``processing_resolution`` is the longer side;
    * ``"field_of_view"``: its field of view (``field_of_view_diameter`` px) resized to the training diameter;
    * ``"longer_side"``: no field of view found (a crop inside the retina): the longer side stands for the diameter,
      and the image is only ever made smaller.
    """

    scale: float
    size: Tuple[int, int]
    basis: str
    field_of_view_diameter: Optional[int] = None

    def as_record(self) -> dict:
        """The plan as the CLI's result rows report it."""
        return {"processing_scale": round(self.scale, 4), "processing_height": self.size[0],
                "processing_width": self.size[1], "processing_basis": self.basis,
                "field_of_view_diameter": self.field_of_view_diameter}


def check_processing_resolution(processing_resolution: Union[int, str, None]) -> None:
    """``None``, ``"native"``, ``"auto"`` or a positive int (at least 8 px); a ``ValueError`` naming the argument
    otherwise."""
    if processing_resolution is None or processing_resolution in PROCESSING_MODES:
        return
    if isinstance(processing_resolution, bool) or not isinstance(processing_resolution, int) or \
            processing_resolution < 8:
        raise ValueError("`processing_resolution` must be 'auto', 'native', None or an int >= 8 (the longer side in "
                         f"pixels), got {processing_resolution!r}.")


def check_field_of_view_degrees(value, name: str = "field_of_view_degrees") -> None:
    """``None`` or a field-of-view angle in degrees (a number in [10, 200]: fundus cameras span 20-60°, wide-field
    ones up to 200°); ``ValueError`` naming ``name`` otherwise."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 10 <= value <= 200:
        raise ValueError(f"`{name}` must be None or a field-of-view angle in degrees (a number in [10, 200], e.g. 45 "
                         f"for most non-mydriatic cameras), got {value!r}.")


def processing_diameter(training_diameter: Optional[int], training_degrees: Optional[float] = None,
                        camera_degrees: Optional[float] = None) -> Optional[int]:
    """The field-of-view diameter ``processing_resolution="auto"`` brings a photograph to: the training photographs'
    ``training_diameter``; or, when the photograph's camera angle ``camera_degrees`` is known, the training
    photographs' pixels per degree times that angle (``training_diameter * camera_degrees / training_degrees``), so
    that a wider camera's vessels get the width in pixels the model learnt, not just its circle the training size.

    Example:
        >>> processing_diameter(920, 30, 45)  # a 45-degree photograph of a model trained at 920 px over 30 degrees
        1380
        >>> processing_diameter(920)
        920
    """
    if camera_degrees is None:
        return training_diameter
    check_field_of_view_degrees(camera_degrees, "camera_degrees")
    if training_diameter is None or training_degrees is None:
        raise ValueError("`camera_degrees` needs a checkpoint that records the field-of-view diameter and angle of its "
                         "training photographs (`field_of_view_diameter`, `field_of_view_degrees` in its config); "
                         f"this one records {training_diameter!r} px and {training_degrees!r} degrees.")
    return int(round(training_diameter * camera_degrees / training_degrees))


def plan_processing(image: np.ndarray, processing_resolution: Union[int, str, None],
                    training_diameter: Optional[int], tolerance: float = SCALE_TOLERANCE) -> ProcessingPlan:
    """The :class:`ProcessingPlan` of one image (``(H, W[, C])``, as :func:`field_of_view_mask` takes it) under
    ``processing_resolution``; ``training_diameter`` is the field-of-view diameter, in pixels, of the photographs the
    model learnt from (``None``: unknown, so ``"auto"`` processes natively). Under ``"auto"`` the result's longer
    side is capped at twice ``training_diameter``.

    Example:
        >>> import numpy as np
        >>> photo = np.zeros((64, 80, 3)); yy, xx = np.mgrid[:64, :80]
        >>> photo[(yy - 32) ** 2 + (xx - 40) ** 2 < 25 ** 2] = 0.6
        >>> plan_processing(photo, "auto", 98)
        ProcessingPlan(scale=2.0, size=(128, 160), basis='field_of_view', field_of_view_diameter=49)
        >>> plan_processing(np.full((300, 200), 0.5), "auto", 98).size  # no field of view: only made smaller
        (98, 65)
    """
    check_processing_resolution(processing_resolution)
    height, width = np.shape(image)[:2]
    native = ProcessingPlan(1.0, (height, width), "native")
    if processing_resolution in (None, "native"):
        return native
    if processing_resolution != "auto":
        scale = processing_resolution / max(height, width)
        return ProcessingPlan(scale, (max(1, round(height * scale)), max(1, round(width * scale))), "fixed")
    if training_diameter is None:
        return native
    # found on a subsampled copy (at most ~640 px: a tenth of the time, +-1 px per step of precision, far inside the
    # 5 % tolerance), in the image's own pixels
    step = max(1, math.ceil(max(height, width) / 640))
    found = field_of_view_diameter(np.asarray(image)[::step, ::step])
    found = None if found is None else found * step
    if found is None:
        scale, basis = min(1.0, training_diameter / max(height, width)), "longer_side"
    else:
        scale, basis = min(training_diameter / found, 2 * training_diameter / max(height, width)), "field_of_view"
    if abs(scale - 1.0) <= tolerance:
        return ProcessingPlan(1.0, (height, width), "native", found)
    return ProcessingPlan(scale, (max(1, round(height * scale)), max(1, round(width * scale))), basis, found)


def plan_processing_batch(images: torch.Tensor, processing_resolution: Union[int, str, None],
                          training_diameter: Optional[int]) -> List[ProcessingPlan]:
    """The :class:`ProcessingPlan` of every image of a batch as the pipelines hold it (``(N, C, H, W)`` float in
    ``[-1, 1]``; :func:`plan_processing`). The pixels are only read when ``"auto"`` looks for the field of view."""
    check_processing_resolution(processing_resolution)
    if processing_resolution == "auto" and training_diameter is not None:
        arrays = _unit_arrays(images)
    else:  # only the size matters
        arrays = [np.broadcast_to(np.float32(0), tuple(images.shape[-2:]))] * images.shape[0]
    return [plan_processing(array, processing_resolution, training_diameter) for array in arrays]


def rescale_to_field_of_view(image: PIL.Image.Image, diameter: int) -> Tuple[PIL.Image.Image, float]:
    """``image`` resized (bicubic) by :func:`plan_processing` ``("auto")`` so that its field of view spans
    ``diameter`` pixels, and the scale applied: a model sees vessels at the width it learnt them. An image without a
    dark surround (a crop inside the retina) is only downscaled, to a longer side of at most ``diameter``; the
    result's longer side is capped at twice ``diameter``; within :data:`SCALE_TOLERANCE` the image is kept.

    Example:
        >>> from skimage.data import retina  # doctest: +SKIP
        >>> photo, scale = rescale_to_field_of_view(PIL.Image.fromarray(retina()), 920)  # doctest: +SKIP
    """
    plan = plan_processing(np.asarray(image.convert("RGB")), "auto", diameter)
    if plan.basis == "native":
        return image, 1.0
    return image.resize((plan.size[1], plan.size[0]), PIL.Image.BICUBIC), plan.scale
