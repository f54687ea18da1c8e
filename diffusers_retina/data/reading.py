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

from ..image_processing import prepare_images
from ..image_processing.decoding import (  # noqa: F401 (re-exported: data.reading.image_array_from_pil, ...)
    DataError,
    check_source_pixels,
    image_array_from_numpy,
    image_array_from_pil,
    mask_array_from_numpy,
    mask_array_from_pil,
)

PathLike = Union[str, os.PathLike]

#: File extensions (lower case, with the dot) that the folder datasets read.
SUPPORTED_EXTENSIONS: Tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".npy")


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
    check_source_pixels(size[1], size[0], role, str(path), max_pixels)
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
        check_source_pixels(shape[0], shape[1], role, str(path), max_pixels)
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:  # ValueError (truncated / pickled), OSError, EOFError
        raise DataError(f"Cannot read numpy file '{path}': {exc}") from exc


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
