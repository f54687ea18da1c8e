"""Random, foreground-aware patch sampling for training on a few large images."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .errors import DataError
from .reading import RawSample, mask_array_from_numpy, raw_to_item
from .transforms import random_flip_rotate, random_photometric


def _raw_from_dataset(dataset: Dataset, index: int, num_classes: int) -> RawSample:
    """Compact sample ``index`` of any dataset: ``load_raw`` when it has one (uint8), else converted from the item."""
    if hasattr(dataset, "load_raw"):
        return dataset.load_raw(index)
    item = dataset[index]
    image = torch.as_tensor(item["image"]).float()
    if image.ndim != 3:
        raise DataError(f"Item {index} of the dataset: `image` must be (C, H, W), got {tuple(image.shape)}.")
    # float32 in [0, 1] keeps the exact values; datasets of this package provide uint8 through `load_raw`
    image_hwc = ((image.clamp(-1.0, 1.0) + 1.0) / 2.0).permute(1, 2, 0).numpy()
    mask = mask_array_from_numpy(torch.as_tensor(item["mask"]).numpy(), num_classes, f"item {index} mask")
    fov = item.get("fov")
    fov_array = None if fov is None else torch.as_tensor(fov).bool().numpy()
    return RawSample(image=image_hwc, mask=mask, name=str(item.get("name", index)), fov=fov_array)


def _centred_pads(size: Tuple[int, int], height: int, width: int):
    pad_h, pad_w = max(0, height - size[0]), max(0, width - size[1])
    return ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2))


def _pad_to_at_least(raw: RawSample, height: int, width: int) -> RawSample:
    """Reflect-pad (centred) a sample smaller than ``height x width``; larger samples are returned unchanged."""
    pads = _centred_pads(raw.size, height, width)
    if not any(pads[0] + pads[1]):
        return raw
    # numpy's reflect cannot mirror a single row / column; symmetric repeats it instead
    mode = "reflect" if min(raw.size) > 1 else "symmetric"
    return RawSample(
        image=np.pad(raw.image, pads + ((0, 0),), mode=mode),
        mask=np.pad(raw.mask, pads, mode=mode),
        name=raw.name,
        fov=None if raw.fov is None else np.pad(raw.fov, pads, mode=mode),
    )


def patch_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed derived from ``(seed, epoch, index)`` only (no global state), well mixed by ``SeedSequence``.

    Example:
        >>> patch_seed(0, 0, 1) == patch_seed(0, 0, 1) != patch_seed(0, 1, 1)
        True
    """
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class RandomPatchDataset(Dataset):
    """Random square patches of a segmentation dataset, foreground-aware, with flips and 90-degree rotations.

    One epoch is ``len(dataset) * patches_per_image`` patches; patch ``index`` comes from base image
    ``index % len(dataset)``. With probability ``foreground_fraction`` a patch is centred, with a jitter of up to
    ``patch_size // 4`` pixels, on a random foreground pixel (``mask > 0``), so the patch always contains it;
    otherwise its position is uniform. Images smaller than the patch are reflect-padded.

    Every patch is a pure function of ``(seed, epoch, index)``: the random generator is built from them, never from
    global state, so DataLoader workers (any ``num_workers``) produce the same patches as the main process, and
    :meth:`set_epoch` changes them. The epoch lives in shared memory, so ``set_epoch`` also reaches persistent workers.

    The base images are decoded once at construction and kept in memory as uint8 (for datasets that offer
    ``load_raw``, like every dataset of this package; others are kept as float32).

    Items: ``{"image": float (C, p, p) in [-1, 1], "mask": long (p, p), "name": str}`` (+ ``"fov": bool (p, p)``).

    Example:
        >>> patches = RandomPatchDataset(chase_db1(split="train"), patch_size=64, patches_per_image=50)  # doctest: +SKIP
        >>> loader = torch.utils.data.DataLoader(patches, batch_size=8, shuffle=True, num_workers=2)  # doctest: +SKIP
        >>> for epoch in range(3):  # doctest: +SKIP
        ...     patches.set_epoch(epoch)
        ...     for batch in loader:
        ...         images, masks = batch["image"], batch["mask"]  # (8, 3, 64, 64), (8, 64, 64)
    """

    def __init__(
        self,
        dataset: Dataset,
        patch_size: Union[int, Tuple[int, int]],
        patches_per_image: int = 50,
        foreground_fraction: float = 0.5,
        augment: bool = True,
        seed: int = 0,
        photometric: float = 0.0,
        scale_range: Optional[Tuple[float, float]] = None,
        priors: Optional[Sequence[np.ndarray]] = None,
    ) -> None:
        if isinstance(patch_size, int):
            patch_size = (patch_size, patch_size)
        if len(tuple(patch_size)) != 2 or any(not isinstance(p, int) or p < 1 for p in patch_size):
            raise DataError(f"`patch_size` must be a positive int or (height, width), got {patch_size!r}.")
        if not isinstance(patches_per_image, int) or patches_per_image < 1:
            raise DataError(f"`patches_per_image` must be a positive integer, got {patches_per_image!r}.")
        if not 0.0 <= float(foreground_fraction) <= 1.0:
            raise DataError(f"`foreground_fraction` must lie in [0, 1], got {foreground_fraction!r}.")
        if not isinstance(seed, int) or seed < 0:
            raise DataError(f"`seed` must be a non-negative integer, got {seed!r}.")
        if len(dataset) == 0:
            raise DataError("`dataset` is empty.")
        if not 0.0 <= float(photometric) <= 2.0:
            raise DataError(f"`photometric` (augmentation strength) must lie in [0, 2], got {photometric!r}.")
        if scale_range is not None:
            scale_range = tuple(float(v) for v in scale_range)
            if len(scale_range) != 2 or not 0.0 < scale_range[0] <= scale_range[1] or not all(
                    math.isfinite(v) for v in scale_range):
                raise DataError(f"`scale_range` must be (low, high) with 0 < low <= high, got {scale_range!r}.")
        if priors is not None and len(priors) != len(dataset):
            raise DataError(f"`priors` has {len(priors)} maps for {len(dataset)} images.")
        self.patch_size: Tuple[int, int] = tuple(patch_size)
        self.patches_per_image = patches_per_image
        self.foreground_fraction = float(foreground_fraction)
        self.augment = augment
        self.seed = seed
        self.photometric = float(photometric)
        self.scale_range = scale_range
        self.num_classes: int = getattr(dataset, "num_classes", 256)

        raw_samples = [_raw_from_dataset(dataset, i, self.num_classes) for i in range(len(dataset))]
        # prior maps (a deterministic segmenter's probabilities, uint8 0..255) are cut, scaled and flipped with the image
        self.priors: Optional[List[np.ndarray]] = None
        if priors is not None:
            self.priors = []
            for raw, prior in zip(raw_samples, priors):
                prior = np.asarray(prior)
                if prior.shape != raw.size:
                    raise DataError(f"Prior map of '{raw.name}' has shape {prior.shape}, its image {raw.size}.")
                if prior.dtype != np.uint8:
                    prior = np.round(np.clip(prior.astype(np.float32), 0.0, 1.0) * 255).astype(np.uint8)
                mode = "reflect" if min(raw.size) > 1 else "symmetric"
                self.priors.append(np.pad(prior, _centred_pads(raw.size, *self.patch_size), mode=mode))
        self.samples: List[RawSample] = [_pad_to_at_least(raw, *self.patch_size) for raw in raw_samples]
        self.image_channels = int(self.samples[0].image.shape[2])
        # flat indices of the foreground pixels, computed once (int32 keeps them small)
        self.foreground: List[np.ndarray] = [
            np.flatnonzero(sample.mask.ravel() > 0).astype(np.int64 if sample.mask.size >= 2**31 else np.int32)
            for sample in self.samples
        ]
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        """The current epoch (set with :meth:`set_epoch`)."""
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; patches differ between epochs and are reproducible within one.

        Example:
            >>> patches.set_epoch(3)  # doctest: +SKIP
        """
        if not isinstance(epoch, int) or epoch < 0:
            raise DataError(f"`epoch` must be a non-negative integer, got {epoch!r}.")
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.samples) * self.patches_per_image

    def _patch_origin(self, sample_index: int, generator: torch.Generator,
                      patch_size: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
        height, width = self.samples[sample_index].size
        patch_h, patch_w = patch_size or self.patch_size
        foreground = self.foreground[sample_index]
        use_foreground = foreground.size > 0 and float(torch.rand((), generator=generator)) < self.foreground_fraction
        if use_foreground:
            pixel = int(foreground[int(torch.randint(0, foreground.size, (1,), generator=generator))])
            centre_y, centre_x = divmod(pixel, width)
            jitter_h, jitter_w = patch_h // 4, patch_w // 4
            top = centre_y - patch_h // 2 + int(torch.randint(-jitter_h, jitter_h + 1, (1,), generator=generator))
            left = centre_x - patch_w // 2 + int(torch.randint(-jitter_w, jitter_w + 1, (1,), generator=generator))
            # clamping keeps the chosen pixel inside the patch
            return min(max(top, 0), height - patch_h), min(max(left, 0), width - patch_w)
        top = int(torch.randint(0, height - patch_h + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - patch_w + 1, (1,), generator=generator))
        return top, left

    def __getitem__(self, index: int) -> Dict[str, Union[torch.Tensor, str]]:
        index = range(len(self))[index]  # normalises negative indices, raises IndexError when out of range
        generator = torch.Generator().manual_seed(patch_seed(self.seed, self.epoch, index))
        sample_index = index % len(self.samples)
        sample = self.samples[sample_index]
        crop = self.patch_size
        if self.scale_range is not None:
            # vessel-scale augmentation: cut a patch `scale` times the size and resize it to the patch size
            low, high = math.log(self.scale_range[0]), math.log(self.scale_range[1])
            scale = math.exp(low + (high - low) * float(torch.rand((), generator=generator)))
            crop = tuple(min(max(1, int(round(p * scale))), s) for p, s in zip(self.patch_size, sample.size))
        top, left = self._patch_origin(sample_index, generator, crop)
        rows, cols = slice(top, top + crop[0]), slice(left, left + crop[1])
        patch = RawSample(
            image=sample.image[rows, cols],
            mask=sample.mask[rows, cols],
            name=sample.name,
            fov=None if sample.fov is None else sample.fov[rows, cols],
        )
        item = raw_to_item(patch, self.image_channels)
        if self.priors is not None:
            item["prior"] = torch.from_numpy(np.ascontiguousarray(self.priors[sample_index][rows, cols])).float()[None]
            item["prior"] = item["prior"] / 255.0
        if crop != self.patch_size:
            item = _resize_item(item, self.patch_size)
        if self.augment and "prior" in item:  # flip / rotate the prior with the image
            channels = item["image"].shape[0]
            stacked = torch.cat([item["image"], item["prior"]])
            if "fov" in item:
                stacked, item["mask"], item["fov"] = random_flip_rotate(stacked, item["mask"], generator,
                                                                        fov=item["fov"])
            else:
                stacked, item["mask"] = random_flip_rotate(stacked, item["mask"], generator)
            item["image"], item["prior"] = stacked[:channels].contiguous(), stacked[channels:].contiguous()
        elif self.augment:
            if "fov" in item:
                item["image"], item["mask"], item["fov"] = random_flip_rotate(
                    item["image"], item["mask"], generator, fov=item["fov"]
                )
            else:
                item["image"], item["mask"] = random_flip_rotate(item["image"], item["mask"], generator)
        if self.photometric:
            item["image"] = random_photometric(item["image"], generator, self.photometric)
        return item

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(images={len(self.samples)}, patch_size={self.patch_size}, "
            f"patches_per_image={self.patches_per_image}, foreground_fraction={self.foreground_fraction}, "
            f"augment={self.augment}, seed={self.seed}, epoch={self.epoch}, photometric={self.photometric}, "
            f"scale_range={self.scale_range}, priors={self.priors is not None})"
        )


def _resize_item(item: Dict[str, Union[torch.Tensor, str]], size: Tuple[int, int]
                 ) -> Dict[str, Union[torch.Tensor, str]]:
    """Resize a patch item to ``size``: image and prior bilinear (antialiased when shrinking), mask and field of view
    nearest-neighbour (they stay labels)."""
    out = dict(item)
    for key in ("image", "prior"):
        if key in item:
            out[key] = F.interpolate(item[key][None].float(), size=size, mode="bilinear", align_corners=False,
                                     antialias=True)[0].to(item[key].dtype)
    for key in ("mask", "fov"):
        if key in item:
            resized = F.interpolate(item[key][None, None].float(), size=size, mode="nearest")[0, 0]
            out[key] = resized.to(item[key].dtype)
    return out
