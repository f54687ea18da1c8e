"""Decoding PIL images and numpy arrays into validated image and mask arrays, and the pixel cap.

The one place where pixels enter the package: the pipelines (through :mod:`.conversion`) and the data loaders (through
:mod:`diffusers_retina.data.reading`) decode images and masks with these functions, so that a file and the same
picture passed in memory are read alike. :class:`DataError` is defined here, in this leaf module, so that both raise
the same class (:mod:`diffusers_retina.data` re-exports it).
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import PIL.Image

#: Pixel cap (height x width of one image) when neither the ``max_pixels`` argument nor the environment variable
#: :data:`MAX_PIXELS_ENV` sets one: 64 megapixels, about 8000 x 8000, far above fundus photographs (CHASE_DB1:
#: 999 x 960) and far below what a small, valid PNG can expand to (a 78 KB file of 9000 x 9000 pixels takes 5 GB in
#: the pipelines). Assign another value to change the default of the whole process.
DEFAULT_MAX_PIXELS: int = 64_000_000
#: Environment variable that overrides :data:`DEFAULT_MAX_PIXELS` (a positive integer).
MAX_PIXELS_ENV = "DIFFUSERS_RETINA_MAX_PIXELS"


class DataError(ValueError):
    """Bad input data: an unreadable, mismatched or empty file or folder, or a bad argument.

    The message always names the offending file, folder, column or argument, so a user can find it.

    Example:
        >>> from diffusers_retina.data import DataError
        >>> issubclass(DataError, ValueError)
        True
    """


class ImageTooLargeError(ValueError):
    """An input image has more pixels than the cap (:func:`max_pixels`); raised before it is decoded."""


def max_pixels(value: Optional[int] = None) -> int:
    """The pixel cap in force: ``value`` when given, else the environment variable ``DIFFUSERS_RETINA_MAX_PIXELS``,
    else :data:`DEFAULT_MAX_PIXELS`. Raises ``ValueError`` naming the argument or the variable when it is not a
    positive integer.

    Example:
        >>> max_pixels(1000)
        1000
    """
    source = "`max_pixels`"
    if value is None:
        raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
        if not raw:
            value, source = DEFAULT_MAX_PIXELS, "`diffusers_retina.image_processing.decoding.DEFAULT_MAX_PIXELS`"
        else:
            source = f"the environment variable {MAX_PIXELS_ENV}"
            try:
                value = int(raw.replace("_", ""))
            except ValueError:
                raise ValueError(f"{source} must be a positive integer (pixels), got {raw!r}.") from None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{source} must be a positive integer (pixels), got {value!r}.")
    return int(value)


def check_pixel_count(height: int, width: int, what: str, limit: Optional[int] = None) -> None:
    """Raise :class:`ImageTooLargeError` naming ``what`` when ``height x width`` exceeds the cap (:func:`max_pixels`
    of ``limit``). Call it before decoding: PIL reads the size from the header.

    Example:
        >>> check_pixel_count(960, 999, "`image`")  # a CHASE_DB1 photograph
        >>> check_pixel_count(9000, 9000, "`image`", limit=10**6)  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ImageTooLargeError: `image` is 9000x9000 pixels (81.0 megapixels), over the cap of 1.0 megapixels ...
    """
    cap = max_pixels(limit)
    if int(height) * int(width) > cap:
        raise ImageTooLargeError(
            f"{what} is {width}x{height} pixels ({int(height) * int(width) / 1e6:.1f} megapixels), over the cap of "
            f"{cap / 1e6:.1f} megapixels. Crop or downscale it, or raise the cap with the `max_pixels` argument or "
            f"the environment variable {MAX_PIXELS_ENV} (pixels)."
        )

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def check_source_pixels(height: int, width: int, role: str, source: str, max_pixels: Optional[int]) -> None:
    """The pixel cap (:func:`max_pixels`) as a :class:`DataError` naming the file."""
    try:
        check_pixel_count(height, width, f"{role.capitalize()} file '{source}'", max_pixels)
    except ImageTooLargeError as error:
        raise DataError(str(error)) from None


def image_array_from_numpy(array: np.ndarray, image_channels: int, source: str) -> np.ndarray:
    """Validate an ``HW`` / ``HWC`` image array; return ``(H, W, C)`` uint8 or float32 in ``[0, 1]``.

    uint8 is kept as is, uint16 is scaled to ``[0, 1]``, other integers must lie in ``0..255``, floats must be finite
    and in ``[0, 1]``. A single channel is repeated when ``image_channels == 3`` (like PIL's L -> RGB); any other
    channel mismatch is an error.

    Example:
        >>> image_array_from_numpy(np.zeros((2, 3), np.uint8), 3, "x.npy").shape
        (2, 3, 3)
    """
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise DataError(f"Image '{source}' must be an HW or HWC array, got shape {array.shape}.")
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.uint16:
        array = array.astype(np.float32) / 65535.0
    elif np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise DataError(
                f"Image '{source}' has integer values in [{array.min()}, {array.max()}]; expected 0..255."
            )
        array = array.astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise DataError(f"Image '{source}' contains NaN or infinite values.")
        if array.size and (array.min() < 0.0 or array.max() > 1.0):
            raise DataError(
                f"Image '{source}' has float values in [{array.min():.3g}, {array.max():.3g}]; "
                "float images must lie in [0, 1] (or be stored as uint8)."
            )
    else:
        raise DataError(f"Image '{source}' has unsupported dtype {array.dtype}.")
    channels = array.shape[2]
    if channels != image_channels:
        if channels == 1 and image_channels == 3:
            array = np.repeat(array, 3, axis=2)
        else:
            raise DataError(
                f"Image '{source}' has {channels} channels (read as HWC, shape {array.shape}) "
                f"but image_channels={image_channels}."
            )
    return array


def image_array_from_pil(image: PIL.Image.Image, image_channels: int, source: str,
                         max_pixels: Optional[int] = None) -> np.ndarray:
    """PIL image to ``(H, W, C)`` uint8 (or float32 for 16-bit / float images), converting RGB <-> L as needed.

    16-bit (``I;16``) images are scaled by 65535, float (``F``) images must lie in ``[0, 1]`` and 32-bit integer
    (``I``) images in ``0..255`` (their bit depth is ambiguous otherwise): PIL's ``convert("RGB")`` would clip them all
    to 255. The Python API reads PIL inputs through this function too
    (:func:`diffusers_retina.image_processing.prepare_images`). An image over the pixel cap (``max_pixels``, see
    :func:`open_pil`) is refused before it is decoded.

    Example:
        >>> image_array_from_pil(PIL.Image.new("L", (5, 4)), 3, "gray.png").shape
        (4, 5, 3)
    """
    check_source_pixels(image.height, image.width, "image", source, max_pixels)
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        # PIL's convert("RGB") clips 16-bit data to 255, so these go through the numpy path
        array = np.array(image)
        if image.mode == "I" and array.size and (array.min() < 0 or array.max() > 255):
            raise DataError(
                f"Image '{source}' is a 32-bit integer (PIL mode I) image with values in [{array.min()}, "
                f"{array.max()}]; its bit depth is ambiguous. Give 16-bit data as mode I;16 or a uint16 array "
                "(scaled by 65535), other data as floats in [0, 1] (mode F)."
            )
        return image_array_from_numpy(array, image_channels, source)
    target_mode = {1: "L", 3: "RGB"}.get(image_channels)
    if target_mode is not None and image.mode != target_mode:
        image = image.convert(target_mode)
    return image_array_from_numpy(np.asarray(image), image_channels, source)


def mask_array_from_numpy(array: np.ndarray, num_classes: int, source: str) -> np.ndarray:
    """Validate a mask array; return ``(H, W)`` uint8 class indices.

    Binary (``num_classes == 2``): values must be a subset of ``{0, 1}`` or ``{0, 255}`` and become ``{0, 1}``.
    ``num_classes > 2``: values must be integer class indices ``< num_classes``. Multi-channel masks are accepted
    only when all colour channels are equal (a grey mask saved as RGB); an alpha channel is ignored.

    Example:
        >>> mask_array_from_numpy(np.array([[0, 255]], np.uint8), 2, "m.png").tolist()
        [[0, 1]]
    """
    array = np.asarray(array)
    if array.ndim == 3:
        colour_channels = {2: 1, 4: 3}.get(array.shape[2], array.shape[2])  # LA / RGBA: drop the alpha channel
        colour = array[:, :, :colour_channels]
        if not (colour == colour[:, :, :1]).all():
            raise DataError(
                f"Mask '{source}' has {array.shape[2]} channels with different values; expected a single-channel "
                "class-index mask."
            )
        array = colour[:, :, 0]
    if array.ndim != 2:
        raise DataError(f"Mask '{source}' must be an HW array, got shape {array.shape}.")
    if array.dtype == bool:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise DataError(f"Mask '{source}' contains NaN or infinite values.")
        if not (array == np.round(array)).all():
            raise DataError(f"Mask '{source}' has non-integer values; masks hold class indices.")
    elif not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"Mask '{source}' has unsupported dtype {array.dtype}.")
    if array.dtype == np.uint8:
        present = np.flatnonzero(np.bincount(array.ravel(), minlength=256))  # much faster than np.unique
    else:
        present = np.unique(array)
    values = set(present.astype(np.int64).tolist())
    if num_classes == 2:
        if values <= {0, 1}:
            return array.astype(np.uint8)
        if values <= {0, 255}:
            return (array == 255).astype(np.uint8)
    elif values and min(values) >= 0 and max(values) < num_classes:
        return array.astype(np.uint8)
    shown = sorted(values)[:10]
    more = " ..." if len(values) > 10 else ""
    raise DataError(
        f"Mask '{source}' has values {shown}{more}, which are neither binary (0/1 or 0/255) nor class indices "
        f"< num_classes={num_classes}."
    )


def mask_array_from_pil(image: PIL.Image.Image, num_classes: int, source: str,
                        max_pixels: Optional[int] = None) -> np.ndarray:
    """PIL mask (1-bit, L, P, 16-bit, grey RGB) to ``(H, W)`` uint8 class indices (see :func:`mask_array_from_numpy`).

    A mask over the pixel cap (``max_pixels``, see :func:`open_pil`) is refused before it is decoded.

    Example:
        >>> mask_array_from_pil(PIL.Image.new("1", (3, 2), 1), 2, "m.png").tolist()
        [[1, 1, 1], [1, 1, 1]]
    """
    check_source_pixels(image.height, image.width, "mask", source, max_pixels)
    # "P" masks are read as palette indices, which is how class-index masks are usually stored
    return mask_array_from_numpy(np.array(image), num_classes, source)

