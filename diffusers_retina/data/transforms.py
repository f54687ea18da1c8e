"""Joint image / mask augmentation and the conversion of a batch to diffusion inputs."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ..image_processing import mask_to_diffusion


def random_flip_rotate(
    image: torch.Tensor,
    mask: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    fov: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, ...]:
    """Apply one random flip / 90-degree rotation to an image and its mask (and field of view) alike.

    The transform is drawn from the 8 symmetries of the square: a random horizontal flip, a random vertical flip and a
    rotation by ``k * 90`` degrees (``k`` in 0..3; only 0 or 180 degrees when the last two dims are not square). It
    acts on the last two dims, so ``(C, H, W)`` images with ``(H, W)`` masks and batched tensors all work.

    Returns ``(image, mask)``, or ``(image, mask, fov)`` when ``fov`` is given.

    Example:
        >>> image, mask = torch.rand(3, 8, 8) * 2 - 1, torch.randint(0, 2, (8, 8))
        >>> out_image, out_mask = random_flip_rotate(image, mask, torch.Generator().manual_seed(0))
        >>> out_image.shape, out_mask.shape
        (torch.Size([3, 8, 8]), torch.Size([8, 8]))
    """
    flips = torch.randint(0, 2, (2,), generator=generator).tolist()
    if image.shape[-1] == image.shape[-2]:
        quarter_turns = int(torch.randint(0, 4, (1,), generator=generator))
    else:  # a 90-degree turn would swap height and width
        quarter_turns = 2 * int(torch.randint(0, 2, (1,), generator=generator))

    def transform(tensor: torch.Tensor) -> torch.Tensor:
        if flips[0]:
            tensor = tensor.flip(-1)
        if flips[1]:
            tensor = tensor.flip(-2)
        if quarter_turns:
            tensor = torch.rot90(tensor, quarter_turns, dims=(-2, -1))
        return tensor.contiguous()

    if fov is None:
        return transform(image), transform(mask)
    return transform(image), transform(mask), transform(fov)


def diffusion_inputs(batch: Dict[str, torch.Tensor], num_classes: int = 2) -> Tuple[torch.Tensor, torch.Tensor]:
    """Collated dataset batch -> ``(images (N, C, H, W) in [-1, 1], masks in diffusion space (N, K, H, W))``.

    Uses :func:`diffusers_retina.image_processing.mask_to_diffusion`: a binary mask becomes one channel ``2m - 1``,
    ``K > 2`` classes become ``K`` one-hot channels in ``[-1, 1]``.

    Example:
        >>> batch = {"image": torch.zeros(2, 3, 4, 4), "mask": torch.ones(2, 4, 4, dtype=torch.long)}
        >>> images, masks = diffusion_inputs(batch)
        >>> masks.shape, float(masks.min())
        (torch.Size([2, 1, 4, 4]), 1.0)
    """
    return batch["image"].float(), mask_to_diffusion(batch["mask"], num_classes)


def _uniform(generator: Optional[torch.Generator], low: float, high: float, size: int = 1) -> torch.Tensor:
    return low + (high - low) * torch.rand(size, generator=generator)


def random_photometric(
    image: torch.Tensor, generator: Optional[torch.Generator] = None, strength: float = 1.0
) -> torch.Tensor:
    """Random camera-like photometric change of one ``(C, H, W)`` image in ``[-1, 1]`` (the mask is unchanged).

    What differs between fundus cameras and sessions, each drawn independently: a per-channel gain (white balance,
    ``exp(±0.25)``), a global brightness gain (``exp(±0.4)``), a contrast change about the image mean
    (``exp(±0.4)``), a gamma change (``exp(±0.4)``), and, each with probability 0.3, a Gaussian blur (sigma 0.3-1.2
    px: sharpness, compression) and additive noise (sigma up to 0.03). Multiplicative changes keep the black
    surround of the field of view black. ``strength`` scales every range (0: identity).

    Example:
        >>> image = torch.rand(3, 16, 16) * 2 - 1
        >>> out = random_photometric(image, torch.Generator().manual_seed(0))
        >>> out.shape == image.shape and float(out.min()) >= -1 and float(out.max()) <= 1
        True
    """
    if strength <= 0:
        return image
    channels = image.shape[0]
    x = (image.float() + 1.0) / 2.0
    x = x * torch.exp(_uniform(generator, -0.25, 0.25, channels) * strength).view(channels, 1, 1)
    x = x * float(torch.exp(_uniform(generator, -0.4, 0.4) * strength))
    mean = x.mean()
    x = (x - mean) * float(torch.exp(_uniform(generator, -0.4, 0.4) * strength)) + mean
    x = x.clamp(0.0, 1.0) ** float(torch.exp(_uniform(generator, -0.4, 0.4) * strength))
    blur, noise = (torch.rand(2, generator=generator) < 0.3).tolist()
    sigma = float(_uniform(generator, 0.3, 1.2)) * strength
    noise_sigma = float(_uniform(generator, 0.0, 0.03)) * strength
    if blur and sigma > 0.05:
        radius = max(1, int(round(2.5 * sigma)))
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
        kernel = kernel / kernel.sum()
        padded = torch.nn.functional.pad(x[None], (radius, radius, radius, radius), mode="replicate")
        x = torch.nn.functional.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
        x = torch.nn.functional.conv2d(x, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)[0]
    if noise and noise_sigma > 0:
        x = x + noise_sigma * torch.randn(x.shape, generator=generator)
    return (x.clamp(0.0, 1.0) * 2.0 - 1.0).to(image.dtype)
