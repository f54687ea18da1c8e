"""Conversions between user inputs (PIL / numpy / torch) and the tensors the models see.

Contracts (DESIGN.md section 3):

* inputs follow diffusers' image processors: PIL images, uint8 / uint16 / float ``[0, 1]`` numpy arrays and float
  tensors in ``[0, 1]`` (a tensor with negative values is read as ``[-1, 1]`` with a warning, as
  ``VaeImageProcessor`` does); 16-bit and float PIL images (modes ``I;16``, ``I``, ``F``) are read like the data
  loaders read the same files (:func:`.decoding.image_array_from_pil`);
* inside the models images are float tensors ``NCHW`` in ``[-1, 1]``;
* every input image is checked against a pixel cap (:func:`max_pixels`: 64 megapixels unless the argument
  ``max_pixels`` or the environment variable ``DIFFUSERS_RETINA_MAX_PIXELS`` says otherwise) before it is decoded;
* masks are stored as ``{0, 1}`` (binary) or class indices; in diffusion space a binary mask is ``2m - 1`` with one
  channel and ``K`` classes are ``K`` one-hot channels in ``[-1, 1]``.

``diffusers.image_processor.VaeImageProcessor`` was checked: it resizes to a multiple of the VAE factor instead of
padding, and it does not know masks, so the few conversions needed here are written out.
"""

from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .decoding import (
    DataError,
    check_pixel_count,
    image_array_from_pil,
    mask_array_from_numpy,
    mask_array_from_pil,
)

ImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor, Sequence[PIL.Image.Image], Sequence[np.ndarray]]

def _describe_pil(image: PIL.Image.Image, name: str) -> str:
    """``name``, plus the file a lazily opened PIL image comes from (for error messages)."""
    filename = getattr(image, "filename", None)
    return f"`{name}` (file '{filename}')" if filename else f"`{name}`"


def _numpy_to_unit_float(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if array.dtype == bool:
        return array.astype(np.float32)
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"`{name}` contains NaN or infinite values.")
    if array.size and (array.min() < 0.0 or array.max() > 1.0):
        raise ValueError(
            f"`{name}` is a float numpy array with values in [{array.min():.3g}, {array.max():.3g}]; "
            "float arrays must lie in [0, 1] (or pass uint8)."
        )
    return array


def _pil_to_numpy(image: PIL.Image.Image, num_channels: int, name: str = "image",
                  limit: Optional[int] = None) -> np.ndarray:
    """A PIL image as ``(H, W, C)`` float32 in ``[0, 1]``, read exactly as the data loaders read files
    (:func:`.decoding.image_array_from_pil`): 8-bit modes converted to RGB / L, 16-bit (``I;16``)
    scaled by 65535, float (``F``) and 32-bit integer (``I``) images checked for their range instead of being
    clipped to 255 by ``convert("RGB")``. The size is checked against the pixel cap before anything is decoded."""
    check_pixel_count(image.height, image.width, _describe_pil(image, name), limit)
    try:
        array = image_array_from_pil(image, num_channels, name, limit)
    except DataError as error:
        raise ValueError(str(error)) from None
    return _numpy_to_unit_float(array, name)


def _tensor_to_model_range(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """A float image tensor in ``[0, 1]`` (diffusers' convention) to the models' ``[-1, 1]``.

    As diffusers' ``VaeImageProcessor`` does, a tensor with negative values is taken to be in ``[-1, 1]`` already
    (with a ``FutureWarning``); values outside ``[-1, 1]``, or above 1, are an error naming ``name``.
    """
    if not torch.isfinite(tensor).all():
        raise ValueError(f"`{name}` contains NaN or infinite values.")
    if not tensor.numel():
        return tensor * 2.0 - 1.0
    low, high = float(tensor.min()), float(tensor.max())
    if low < -1.0 - 1e-4 or high > 1.0 + 1e-4:
        raise ValueError(
            f"`{name}` tensor has values in [{low:.3g}, {high:.3g}]; image tensors must lie in [0, 1] (diffusers' "
            "convention; [-1, 1] is still accepted)."
        )
    if low < 0.0:
        warnings.warn(
            f"`{name}` is a tensor with values in [{low:.3g}, {high:.3g}]: read as [-1, 1]. Image tensors are "
            "expected in [0, 1], as diffusers' image processors take them; pass `(x + 1) / 2`.",
            FutureWarning, stacklevel=5,  # the user's pipeline call (through prepare_images, __call__, no_grad)
        )
        return tensor
    return tensor * 2.0 - 1.0


def prepare_images(image: ImageInput, num_channels: int, name: str = "image",
                   max_pixels: Optional[int] = None) -> torch.Tensor:
    """Turn PIL images, numpy arrays or tensors (single or batched) into a float ``NCHW`` tensor in ``[-1, 1]`` (the
    models' range). Inputs follow diffusers' image processors:

    * PIL images are converted to RGB (3 channels) or L (1 channel) as the model needs; 16-bit (``I;16``), float
      (``F``) and 32-bit integer (``I``) images are read like the data loaders read the same files (scaled by 65535,
      float in ``[0, 1]``, integers in ``0..255``) instead of being clipped to 255.
    * numpy arrays are ``HWC`` / ``NHWC`` (or ``HW`` for one channel), uint8, uint16 or float in ``[0, 1]``.
    * tensors (or a list of them) are ``CHW`` / ``NCHW`` floats in ``[0, 1]``, as diffusers' ``VaeImageProcessor``
      takes them. A tensor with negative values is read as ``[-1, 1]`` with a ``FutureWarning`` (as diffusers does);
      a ``[-1, 1]`` tensor without negative values would be misread, so convert with ``(x + 1) / 2``.

    Every image is checked against the pixel cap (``max_pixels``, else the environment variable
    ``DIFFUSERS_RETINA_MAX_PIXELS``, else :data:`DEFAULT_MAX_PIXELS`) before it is decoded.

    Raises ``ValueError`` naming ``name`` for a wrong channel count, NaN, values out of range, a batch whose images
    differ in size, or (:class:`ImageTooLargeError`) an image over the pixel cap.

    Example:
        >>> prepare_images(torch.ones(3, 4, 4), 3).max().item()  # 1 in [0, 1] is 1 in [-1, 1]
        1.0
        >>> prepare_images(torch.zeros(3, 4, 4), 3).min().item()  # 0 is black: -1
        -1.0
    """
    if isinstance(image, (list, tuple)) and image and all(isinstance(item, torch.Tensor) for item in image):
        # a list of CHW / NCHW tensors, as diffusers' VaeImageProcessor accepts
        items = [item.unsqueeze(0) if item.ndim == 3 else item for item in image]
        if any(item.ndim != 4 for item in items) or len({tuple(item.shape[1:]) for item in items}) > 1:
            shapes = [tuple(item.shape) for item in image]
            raise ValueError(f"`{name}` tensors in a list must all be CHW or NCHW of one size, got {shapes}.")
        image = torch.cat(items)
    if isinstance(image, torch.Tensor):
        tensor = image.detach()
        if tensor.ndim == 3:
            tensor = tensor.unsqueeze(0)
        if tensor.ndim != 4:
            raise ValueError(f"`{name}` tensor must be CHW or NCHW, got shape {tuple(image.shape)}.")
        check_pixel_count(tensor.shape[-2], tensor.shape[-1], f"`{name}`", max_pixels)
        if not tensor.is_floating_point():
            raise ValueError(f"`{name}` is a {tensor.dtype} tensor; image tensors are floats in [0, 1] (pass integer "
                             "images as numpy arrays).")
        tensor = _tensor_to_model_range(tensor.float(), name)
    else:
        items: List = list(image) if isinstance(image, (list, tuple)) else [image]
        if isinstance(image, np.ndarray) and image.ndim == 4:
            items = list(image)
        if not items:
            raise ValueError(f"`{name}` is an empty list.")
        arrays = []
        for item in items:
            if isinstance(item, PIL.Image.Image):
                arrays.append(_pil_to_numpy(item, num_channels, name, max_pixels))
            elif isinstance(item, np.ndarray):
                array = item if item.ndim == 3 else item[:, :, None] if item.ndim == 2 else None
                if array is None:
                    raise ValueError(f"`{name}` numpy arrays must be HW, HWC or NHWC, got shape {item.shape}.")
                check_pixel_count(array.shape[0], array.shape[1], f"`{name}`", max_pixels)
                arrays.append(_numpy_to_unit_float(array, name))
            else:
                raise TypeError(f"`{name}` must be PIL images, numpy arrays or a torch tensor, got {type(item)}.")
        sizes = {a.shape[:2] for a in arrays}
        if len(sizes) > 1:
            raise ValueError(f"All images in `{name}` must have the same size to run as one batch, got {sorted(sizes)}.")
        tensor = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous() * 2.0 - 1.0
    if tensor.shape[1] != num_channels:
        raise ValueError(f"`{name}` has {tensor.shape[1]} channels but the model expects {num_channels}.")
    return tensor


def mask_to_diffusion(mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class-index masks ``(N, H, W)`` (long) to diffusion space ``(N, C, H, W)`` in ``[-1, 1]``.

    Binary (``num_classes == 2``): one channel ``2m - 1``. ``K > 2`` classes: ``K`` one-hot channels scaled to ``[-1, 1]``.
    """
    if mask.ndim != 3:
        raise ValueError(f"`mask` must be (N, H, W) class indices, got shape {tuple(mask.shape)}.")
    mask = mask.long()
    if num_classes == 2:
        return mask.unsqueeze(1).float() * 2.0 - 1.0
    one_hot = F.one_hot(mask, num_classes).permute(0, 3, 1, 2).float()
    return one_hot * 2.0 - 1.0


def diffusion_to_probabilities(sample: torch.Tensor) -> torch.Tensor:
    """Diffusion-space masks ``(N, C, H, W)`` to probabilities.

    One channel: foreground probability ``(x + 1) / 2`` clipped to ``[0, 1]``. ``K`` channels: the clipped channel
    values normalised to sum to one over the classes (uniform where all channels are at ``-1``).
    """
    probabilities = ((sample.float().clamp(-1.0, 1.0) + 1.0) / 2.0)
    if probabilities.shape[1] == 1:
        return probabilities
    total = probabilities.sum(dim=1, keepdim=True)
    uniform = torch.full_like(probabilities, 1.0 / probabilities.shape[1])
    return torch.where(total > 1e-6, probabilities / total.clamp_min(1e-6), uniform)


def pad_to_multiple(tensor: torch.Tensor, multiple: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Reflect-pad the bottom/right of ``NCHW`` so H and W are multiples of ``multiple``; returns the original size."""
    height, width = tensor.shape[-2:]
    pad_h = (-height) % multiple
    pad_w = (-width) % multiple
    if pad_h or pad_w:
        # reflect padding needs pad < size; fall back to replicate for tiny inputs
        mode = "reflect" if pad_h < height and pad_w < width else "replicate"
        tensor = F.pad(tensor, (0, pad_w, 0, pad_h), mode=mode)
    return tensor, (height, width)


def numpy_to_pil_masks(masks: np.ndarray, num_classes: int) -> List[PIL.Image.Image]:
    """``(N, H, W)`` class indices to PIL "L" images (binary masks as 0/255, class indices kept as values)."""
    scale = 255 if num_classes == 2 else 1
    return [PIL.Image.fromarray((mask * scale).astype(np.uint8), mode="L") for mask in masks]


def numpy_to_pil_maps(maps: np.ndarray, max_value: float = 1.0) -> List[PIL.Image.Image]:
    """``(N, H, W)`` float maps in ``[0, max_value]`` to 8-bit PIL "L" images."""
    scaled = np.clip(maps / max(max_value, 1e-12), 0.0, 1.0)
    return [PIL.Image.fromarray((m * 255).round().astype(np.uint8), mode="L") for m in scaled]


MaskInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor, Sequence[PIL.Image.Image], Sequence[np.ndarray]]


# A numpy mask (H, W, C) with one of these channel counts is one mask stored as an image (grey, RGB or RGBA with
# equal colour channels), not C-pixel-wide masks; NHW batches of masks 1, 3 or 4 pixels wide would be read as HWC,
# so a 3-D array is an image only when its first axis is longer than 4.
_MASK_IMAGE_CHANNELS = (1, 3, 4)


def _single_channel_mask(array: np.ndarray, name: str) -> np.ndarray:
    """``(H, W, C)`` mask stored as an image -> ``(H, W)``: the grey channel; RGB(A) only when the colour channels agree
    (alpha is ignored)."""
    if array.shape[-1] == 1:
        return array[..., 0]
    colour = array[..., :3]
    if not (np.array_equal(colour[..., 0], colour[..., 1]) and np.array_equal(colour[..., 0], colour[..., 2])):
        raise ValueError(f"`{name}` is an (H, W, {array.shape[-1]}) array whose colour channels differ; give a "
                         "grey mask (H, W) or class indices, not a colour image.")
    return colour[..., 0]


def _soft_masks(probabilities: torch.Tensor, name: str) -> torch.Tensor:
    """Probabilities in [0, 1] to diffusion space, refusing NaN and values outside."""
    if not torch.isfinite(probabilities).all():
        raise ValueError(f"`{name}` contains NaN or infinite values.")
    if probabilities.numel() and (probabilities.min() < 0.0 or probabilities.max() > 1.0):
        raise ValueError(
            f"`{name}` holds probabilities in [{float(probabilities.min()):.3g}, {float(probabilities.max()):.3g}]; "
            "soft masks must lie in [0, 1]."
        )
    return probabilities.float() * 2.0 - 1.0


def _hard_masks(arrays: Sequence[np.ndarray], num_classes: int, name: str) -> torch.Tensor:
    """Masks of class indices (checked like the data loaders do), all of one size, to diffusion space."""
    try:
        indices = [mask_array_from_numpy(a, num_classes, f"{name}[{i}]") for i, a in enumerate(arrays)]
    except DataError as error:
        raise ValueError(str(error)) from None
    if len({a.shape for a in indices}) > 1:
        raise ValueError(f"All masks in `{name}` must have the same size, got {sorted({a.shape for a in indices})}.")
    return mask_to_diffusion(torch.from_numpy(np.stack(indices)).long(), num_classes)


def _tensor_masks(tensor: torch.Tensor, num_classes: int, name: str, max_pixels: Optional[int]) -> torch.Tensor:
    """A mask tensor: float probabilities (``HW``/``NHW`` binary, ``NCHW`` K classes) or integer class indices."""
    channels = 1 if num_classes == 2 else num_classes
    if tensor.ndim >= 2:
        check_pixel_count(tensor.shape[-2], tensor.shape[-1], f"`{name}`", max_pixels)
    if tensor.is_floating_point():
        if tensor.ndim == 4:
            if tensor.shape[1] != channels:
                raise ValueError(f"`{name}` has {tensor.shape[1]} channels; this model takes {channels} "
                                 f"({num_classes} classes).")
            return _soft_masks(tensor, name)
        if num_classes != 2:
            raise ValueError(f"`{name}`: soft masks of {num_classes} classes must be (N, {channels}, H, W) "
                             "probabilities; pass class indices as an integer tensor.")
        if tensor.ndim not in (2, 3):
            raise ValueError(f"`{name}` must be HW, NHW or NCHW, got shape {tuple(tensor.shape)}.")
        return _soft_masks(tensor.reshape(-1, 1, *tensor.shape[-2:]), name)
    if tensor.ndim not in (2, 3):
        raise ValueError(f"`{name}` integer tensors hold class indices and must be HW or NHW, got "
                         f"shape {tuple(tensor.shape)}.")
    return _hard_masks(list(tensor.reshape(-1, *tensor.shape[-2:]).numpy()), num_classes, name)


def prepare_masks(mask: MaskInput, num_classes: int, name: str = "mask",
                  max_pixels: Optional[int] = None) -> torch.Tensor:
    """Turn masks (single or batched) into diffusion space: a float ``(N, C, H, W)`` tensor in ``[-1, 1]``.

    * Hard masks -- PIL images, integer / bool numpy arrays (``HW``, ``NHW``, or ``HWC`` / ``NHWC`` with C = 1, 3 or 4
      equal grey channels, as image readers return them), integer tensors (``HW`` / ``NHW``) or a list of tensors:
      binary masks as 0/1 or 0/255, ``K`` classes as class indices ``< K`` (checked like the data loaders do).
    * Soft masks -- float numpy arrays or tensors with probabilities in ``[0, 1]``: ``HW`` / ``NHW`` for binary masks,
      or ``NCHW`` tensors with ``C`` class probabilities (``K`` classes).

    ``C`` is 1 for binary masks (``2m - 1``) and ``K`` one-hot channels otherwise. Raises ``ValueError`` naming
    ``name`` for values outside the allowed range, NaN, a wrong number of classes, masks of different sizes or
    (:class:`ImageTooLargeError`) a mask over the pixel cap (``max_pixels``, see :func:`prepare_images`), checked
    before a PIL mask is decoded.
    """
    if isinstance(mask, (list, tuple)) and mask and all(isinstance(item, torch.Tensor) for item in mask):
        # a list of tensors (diffusers' processors accept lists): each as a tensor input, then one batch
        parts = [prepare_masks(item, num_classes, f"{name}[{index}]", max_pixels) for index, item in enumerate(mask)]
        if len({tuple(part.shape[1:]) for part in parts}) > 1:
            raise ValueError(f"All masks in `{name}` must have the same size, got "
                             f"{[tuple(part.shape[-2:]) for part in parts]}.")
        return torch.cat(parts)
    if isinstance(mask, torch.Tensor):
        return _tensor_masks(mask.detach().cpu(), num_classes, name, max_pixels)

    items = list(mask) if isinstance(mask, (list, tuple)) else [mask]
    if not items:
        raise ValueError(f"`{name}` is an empty list.")
    arrays = []
    for item in items:
        if isinstance(item, PIL.Image.Image):
            check_pixel_count(item.height, item.width, _describe_pil(item, name), max_pixels)
            try:
                arrays.append(mask_array_from_pil(item, num_classes, name, max_pixels))
            except DataError as error:
                raise ValueError(str(error)) from None
        elif isinstance(item, np.ndarray):
            if item.ndim in (2, 3, 4):
                is_image = item.ndim == 3 and item.shape[-1] in _MASK_IMAGE_CHANNELS and item.shape[0] > 4
                height, width = item.shape[:2] if item.ndim == 2 or is_image else item.shape[1:3]  # HW(C) / NHW(C)
                check_pixel_count(height, width, f"`{name}`", max_pixels)
            if item.ndim == 4 and item.shape[-1] in _MASK_IMAGE_CHANNELS:
                arrays.extend(_single_channel_mask(m, name) for m in item)  # NHWC, as an image loader gives them
            elif item.ndim == 3 and item.shape[-1] in _MASK_IMAGE_CHANNELS and item.shape[0] > 4:
                arrays.append(_single_channel_mask(item, name))  # HWC: one mask stored as an image
            elif item.ndim == 3:
                arrays.extend(list(item))  # NHW
            elif item.ndim == 2:
                arrays.append(item)
            else:
                raise ValueError(f"`{name}` numpy arrays must be HW, HWC (C = 1, 3 or 4), NHW or NHWC, got shape "
                                 f"{item.shape}.")
        else:
            raise TypeError(f"`{name}` must be PIL images, numpy arrays or a torch tensor, got {type(item)}.")
    is_soft = [np.issubdtype(a.dtype, np.floating) and not np.array_equal(a, np.round(a)) for a in arrays]
    if any(is_soft):
        if num_classes != 2:
            raise ValueError(f"`{name}`: soft numpy masks are binary only; pass {num_classes}-class masks as class "
                             "indices or as an (N, K, H, W) tensor of probabilities.")
        if len({a.shape for a in arrays}) > 1:
            raise ValueError(f"All masks in `{name}` must have the same size, got {sorted({a.shape for a in arrays})}.")
        return _soft_masks(torch.from_numpy(np.stack(arrays).astype(np.float32))[:, None], name)
    return _hard_masks(arrays, num_classes, name)
