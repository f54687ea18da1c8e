"""Conversions between user inputs (PIL / numpy / torch) and the tensors the models see.

Contracts (DESIGN.md section 3):

* images are float tensors ``NCHW`` in ``[-1, 1]``;
* masks are stored as ``{0, 1}`` (binary) or class indices; in diffusion space a binary mask is ``2m - 1`` with one
  channel and ``K`` classes are ``K`` one-hot channels in ``[-1, 1]``.

``diffusers.image_processor.VaeImageProcessor`` was checked: it resizes to a multiple of the VAE factor instead of
padding, and it does not know masks, so the few conversions needed here are written out.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

ImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor, Sequence[PIL.Image.Image], Sequence[np.ndarray]]


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


def _pil_to_numpy(image: PIL.Image.Image, num_channels: int) -> np.ndarray:
    mode = {1: "L", 3: "RGB"}.get(num_channels)
    if mode is not None and image.mode != mode:
        image = image.convert(mode)
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    return _numpy_to_unit_float(array, "image")


def prepare_images(image: ImageInput, num_channels: int, name: str = "image") -> torch.Tensor:
    """Turn PIL images, numpy arrays or tensors (single or batched) into a float ``NCHW`` tensor in ``[-1, 1]``.

    * PIL images are converted to RGB (3 channels) or L (1 channel) as the model needs.
    * numpy arrays are ``HWC`` / ``NHWC`` (or ``HW`` for one channel), uint8 or float in ``[0, 1]``.
    * tensors (or a list of them) are ``CHW`` / ``NCHW`` already in ``[-1, 1]`` (the contract of every model here).

    Raises ``ValueError`` naming ``name`` for a wrong channel count, NaN, values out of range or a batch whose
    images differ in size.
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
        tensor = tensor.float()
        if not torch.isfinite(tensor).all():
            raise ValueError(f"`{name}` contains NaN or infinite values.")
        if tensor.numel() and (tensor.min() < -1.0 - 1e-4 or tensor.max() > 1.0 + 1e-4):
            raise ValueError(
                f"`{name}` tensor has values in [{tensor.min():.3g}, {tensor.max():.3g}]; tensors must lie in [-1, 1]."
            )
    else:
        items: List = list(image) if isinstance(image, (list, tuple)) else [image]
        if isinstance(image, np.ndarray) and image.ndim == 4:
            items = list(image)
        if not items:
            raise ValueError(f"`{name}` is an empty list.")
        arrays = []
        for item in items:
            if isinstance(item, PIL.Image.Image):
                arrays.append(_pil_to_numpy(item, num_channels))
            elif isinstance(item, np.ndarray):
                array = item if item.ndim == 3 else item[:, :, None] if item.ndim == 2 else None
                if array is None:
                    raise ValueError(f"`{name}` numpy arrays must be HW, HWC or NHWC, got shape {item.shape}.")
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


def prepare_masks(mask: MaskInput, num_classes: int, name: str = "mask") -> torch.Tensor:
    """Turn masks (single or batched) into diffusion space: a float ``(N, C, H, W)`` tensor in ``[-1, 1]``.

    * Hard masks -- PIL images, integer / bool numpy arrays (``HW``, ``NHW``, or ``HWC`` / ``NHWC`` with C = 1, 3 or 4
      equal grey channels, as image readers return them), integer tensors (``HW`` / ``NHW``) or a list of tensors:
      binary masks as 0/1 or 0/255, ``K`` classes as class indices ``< K`` (checked like the data loaders do).
    * Soft masks -- float numpy arrays or tensors with probabilities in ``[0, 1]``: ``HW`` / ``NHW`` for binary masks,
      or ``NCHW`` tensors with ``C`` class probabilities (``K`` classes).

    ``C`` is 1 for binary masks (``2m - 1``) and ``K`` one-hot channels otherwise. Raises ``ValueError`` naming
    ``name`` for values outside the allowed range, NaN, a wrong number of classes or masks of different sizes.
    """
    from .data.errors import DataError
    from .data.reading import mask_array_from_numpy, mask_array_from_pil

    channels = 1 if num_classes == 2 else num_classes

    def soft(probabilities: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(probabilities).all():
            raise ValueError(f"`{name}` contains NaN or infinite values.")
        if probabilities.numel() and (probabilities.min() < 0.0 or probabilities.max() > 1.0):
            raise ValueError(
                f"`{name}` holds probabilities in [{float(probabilities.min()):.3g}, {float(probabilities.max()):.3g}]; "
                "soft masks must lie in [0, 1]."
            )
        return probabilities.float() * 2.0 - 1.0

    def hard(arrays: Sequence[np.ndarray]) -> torch.Tensor:
        try:
            indices = [mask_array_from_numpy(a, num_classes, f"{name}[{i}]") for i, a in enumerate(arrays)]
        except DataError as error:
            raise ValueError(str(error)) from None
        if len({a.shape for a in indices}) > 1:
            raise ValueError(f"All masks in `{name}` must have the same size, got {sorted({a.shape for a in indices})}.")
        return mask_to_diffusion(torch.from_numpy(np.stack(indices)).long(), num_classes)

    if isinstance(mask, (list, tuple)) and mask and all(isinstance(item, torch.Tensor) for item in mask):
        # a list of tensors (diffusers' processors accept lists): each as a tensor input, then one batch
        parts = [prepare_masks(item, num_classes, f"{name}[{index}]") for index, item in enumerate(mask)]
        if len({tuple(part.shape[1:]) for part in parts}) > 1:
            raise ValueError(f"All masks in `{name}` must have the same size, got "
                             f"{[tuple(part.shape[-2:]) for part in parts]}.")
        return torch.cat(parts)
    if isinstance(mask, torch.Tensor):
        tensor = mask.detach().cpu()
        if tensor.is_floating_point():
            if tensor.ndim == 4:
                if tensor.shape[1] != channels:
                    raise ValueError(f"`{name}` has {tensor.shape[1]} channels; this model takes {channels} "
                                     f"({num_classes} classes).")
                return soft(tensor)
            if num_classes != 2:
                raise ValueError(f"`{name}`: soft masks of {num_classes} classes must be (N, {channels}, H, W) "
                                 "probabilities; pass class indices as an integer tensor.")
            if tensor.ndim not in (2, 3):
                raise ValueError(f"`{name}` must be HW, NHW or NCHW, got shape {tuple(tensor.shape)}.")
            return soft(tensor.reshape(-1, 1, *tensor.shape[-2:]))
        if tensor.ndim not in (2, 3):
            raise ValueError(f"`{name}` integer tensors hold class indices and must be HW or NHW, got "
                             f"shape {tuple(tensor.shape)}.")
        return hard(list(tensor.reshape(-1, *tensor.shape[-2:]).numpy()))

    items = list(mask) if isinstance(mask, (list, tuple)) else [mask]
    if not items:
        raise ValueError(f"`{name}` is an empty list.")
    arrays = []
    for item in items:
        if isinstance(item, PIL.Image.Image):
            try:
                arrays.append(mask_array_from_pil(item, num_classes, name))
            except DataError as error:
                raise ValueError(str(error)) from None
        elif isinstance(item, np.ndarray):
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
        return soft(torch.from_numpy(np.stack(arrays).astype(np.float32))[:, None])
    return hard(arrays)
