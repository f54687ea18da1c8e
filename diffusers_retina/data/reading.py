"""Decoding and validating image / mask files into compact numpy arrays.

Every dataset of this package reads through these functions, so all of them share the same checks and the same
error messages (a :class:`DataError` naming the file). Decoded samples are kept as :class:`RawSample` (uint8 images,
uint8 class-index masks) and turned into model tensors with :func:`raw_to_item`, which uses
:func:`diffusers_retina.image_processing.prepare_images` for the image conversion to ``[-1, 1]``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import PIL.Image
import torch

from ..image_processing import ImageTooLargeError, check_pixel_count, prepare_images
from .errors import DataError

PathLike = Union[str, os.PathLike]

#: File extensions (lower case, with the dot) that the folder datasets read.
SUPPORTED_EXTENSIONS: Tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".npy")

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


@dataclass
class RawSample:
    """One decoded, validated sample, kept compact in memory.

    Attributes:
        image: ``(H, W, C)`` array, uint8 (0..255) or float32 in ``[0, 1]``.
        mask: ``(H, W)`` uint8 class indices (``{0, 1}`` for binary masks).
        name: the sample's name (file stem, row index, ...).
        fov: optional ``(H, W)`` bool field-of-view mask.

    Example:
        >>> import numpy as np
        >>> raw = RawSample(np.zeros((4, 5, 3), np.uint8), np.zeros((4, 5), np.uint8), "a")
        >>> raw.size
        (4, 5)
    """

    image: np.ndarray
    mask: np.ndarray
    name: str
    fov: Optional[np.ndarray] = None

    @property
    def size(self) -> Tuple[int, int]:
        """``(height, width)`` of the sample."""
        return int(self.mask.shape[0]), int(self.mask.shape[1])


def _check_pixels(height: int, width: int, role: str, source: str, max_pixels: Optional[int]) -> None:
    """The pixel cap (:func:`diffusers_retina.image_processing.max_pixels`) as a :class:`DataError` naming the file."""
    try:
        check_pixel_count(height, width, f"{role.capitalize()} file '{source}'", max_pixels)
    except ImageTooLargeError as error:
        raise DataError(str(error)) from None


def open_pil(path: PathLike, role: str = "image", max_pixels: Optional[int] = None) -> PIL.Image.Image:
    """Open an image file fully (``verify`` then ``load``) so broken or truncated files fail here, not later.

    The size in the file's header is checked against the pixel cap (``max_pixels``, else the environment variable
    ``DIFFUSERS_RETINA_MAX_PIXELS``, else 64 megapixels) *before* anything is decoded: a small PNG can expand to
    gigabytes.

    Example:
        >>> open_pil("missing.png")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        DataError: Cannot read image file 'missing.png': ...
    """
    try:
        with PIL.Image.open(path) as probe:
            size = probe.size
    except Exception as exc:  # PIL raises OSError, SyntaxError, struct.error, zlib.error, ... for broken files
        raise DataError(f"Cannot read {role} file '{path}': {exc}") from exc
    _check_pixels(size[1], size[0], role, str(path), max_pixels)
    try:
        with PIL.Image.open(path) as probe:
            probe.verify()
        # verify() leaves the file unusable, so it is opened again for decoding
        image = PIL.Image.open(path)
        image.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, struct.error, zlib.error, ... for broken files
        raise DataError(f"Cannot read {role} file '{path}': {exc}") from exc
    return image


def npy_shape(path: PathLike) -> Tuple[int, ...]:
    """The array shape in a ``.npy`` file's header, read without loading the data."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            header = np.lib.format.read_array_header_2_0 if version >= (2, 0) else np.lib.format.read_array_header_1_0
            return tuple(header(handle)[0])
    except Exception as exc:  # OSError, ValueError (not a .npy file)
        raise DataError(f"Cannot read numpy file '{path}': {exc}") from exc


def load_npy(path: PathLike, role: str = "image", max_pixels: Optional[int] = None) -> np.ndarray:
    """Load a ``.npy`` file without pickle; any failure is a :class:`DataError` naming the file. The first two axes
    (``H, W`` of an image or mask) are checked against the pixel cap from the header, before the data is read."""
    shape = npy_shape(path)
    if len(shape) >= 2:
        _check_pixels(shape[0], shape[1], role, str(path), max_pixels)
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:  # ValueError (truncated / pickled), OSError, EOFError
        raise DataError(f"Cannot read numpy file '{path}': {exc}") from exc


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
    _check_pixels(image.height, image.width, "image", source, max_pixels)
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
    _check_pixels(image.height, image.width, "mask", source, max_pixels)
    # "P" masks are read as palette indices, which is how class-index masks are usually stored
    return mask_array_from_numpy(np.array(image), num_classes, source)


def read_image(path: PathLike, image_channels: int, max_pixels: Optional[int] = None) -> np.ndarray:
    """Read an image file (PIL formats or ``.npy``) into ``(H, W, C)`` uint8 / float32 ``[0, 1]``.

    Files over the pixel cap (``max_pixels``, see :func:`open_pil`) are refused before they are decoded.

    Example:
        >>> read_image("images/Image_01L.jpg", 3).shape  # doctest: +SKIP
        (960, 999, 3)
    """
    path = Path(path)
    if path.suffix.lower() == ".npy":
        return image_array_from_numpy(load_npy(path, "image", max_pixels), image_channels, str(path))
    with open_pil(path, "image", max_pixels) as image:
        return image_array_from_pil(image, image_channels, str(path), max_pixels)


def read_mask(path: PathLike, num_classes: int, max_pixels: Optional[int] = None) -> np.ndarray:
    """Read a mask file (PIL formats or ``.npy``) into ``(H, W)`` uint8 class indices.

    Files over the pixel cap (``max_pixels``, see :func:`open_pil`) are refused before they are decoded.

    Example:
        >>> read_mask("1stHO/Image_01L_1stHO.png", 2).max()  # doctest: +SKIP
        1
    """
    path = Path(path)
    if path.suffix.lower() == ".npy":
        return mask_array_from_numpy(load_npy(path, "mask", max_pixels), num_classes, str(path))
    with open_pil(path, "mask", max_pixels) as image:
        return mask_array_from_pil(image, num_classes, str(path), max_pixels)


def check_same_size(reference: np.ndarray, reference_source: str, other: np.ndarray, other_source: str) -> None:
    """Raise a :class:`DataError` naming both sources when two arrays differ in ``(H, W)``."""
    if reference.shape[:2] != other.shape[:2]:
        raise DataError(
            f"Size mismatch: '{other_source}' is {other.shape[0]}x{other.shape[1]} (HxW) but "
            f"'{reference_source}' is {reference.shape[0]}x{reference.shape[1]}."
        )


def raw_to_item(raw: RawSample, image_channels: int) -> Dict[str, Union[torch.Tensor, str]]:
    """Turn a :class:`RawSample` into the item format of every dataset in this package.

    Returns ``{"image": float (C, H, W) in [-1, 1], "mask": long (H, W), "name": str}`` plus ``"fov": bool (H, W)``
    when the sample has one.

    Example:
        >>> raw = RawSample(np.full((2, 2, 3), 255, np.uint8), np.eye(2, dtype=np.uint8), "a")
        >>> item = raw_to_item(raw, 3)
        >>> item["image"].shape, float(item["image"].max()), item["mask"].dtype
        (torch.Size([3, 2, 2]), 1.0, torch.int64)
    """
    try:
        image = prepare_images(raw.image, image_channels, name=raw.name)[0]
    except ValueError as exc:
        raise DataError(f"Sample '{raw.name}': {exc}") from exc
    item: Dict[str, Union[torch.Tensor, str]] = {
        "image": image,
        "mask": torch.from_numpy(np.ascontiguousarray(raw.mask)).long(),
        "name": raw.name,
    }
    if raw.fov is not None:
        item["fov"] = torch.from_numpy(np.ascontiguousarray(raw.fov)).bool()
    return item


class RawSampleDataset(torch.utils.data.Dataset):
    """Base of the datasets in this package: a subclass decodes sample ``index`` into a compact :class:`RawSample`
    in ``decode`` and sets ``image_channels``; ``load_raw`` adds the in-memory cache (when ``self.cache`` is on) and
    items are made from it by :func:`raw_to_item`, the one conversion all datasets share."""

    image_channels: int
    cache: bool = False

    def decode(self, index: int) -> RawSample:
        raise NotImplementedError

    def load_raw(self, index: int) -> RawSample:
        """Decode and validate sample ``index`` into a compact :class:`RawSample` (uint8), using the cache if on.

        Example:
            >>> raw = dataset.load_raw(0)  # doctest: +SKIP
            >>> raw.image.dtype, raw.mask.dtype  # doctest: +SKIP
            (dtype('uint8'), dtype('uint8'))
        """
        index = range(len(self))[index]  # normalises negative indices, raises IndexError when out of range
        cache = self.__dict__.setdefault("_raw_cache", {})
        raw = cache.get(index)
        if raw is None:
            raw = self.decode(index)
            if self.cache:
                cache[index] = raw
        return raw

    def load_all(self):
        """Decode and validate every sample now and keep them in memory (uint8); returns ``self``.

        Use it when a training loop revisits the same few images many times.

        Example:
            >>> train = chase_db1(split="train").load_all()  # doctest: +SKIP
        """
        self.cache = True
        for index in range(len(self)):
            self.load_raw(index)
        return self

    def __getitem__(self, index: int) -> Dict[str, Union[torch.Tensor, str]]:
        return raw_to_item(self.load_raw(index), self.image_channels)
