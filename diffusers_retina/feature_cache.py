"""The on-disk feature cache of feature-head training (``training/train_feature_head.py`` and the label-efficiency
benchmark): one safetensors file per image, named by a hash of everything its features depend on (the image, the UNet's
weights and config, the blocks, timesteps, policy, seed, dtype, noise settings and the scheduler), written atomically. A
change of any of them misses. The pipeline itself extracts without a cache (``DiffusionFeaturePipeline.extract``);
:func:`cached_extract` wraps it.

Example:
    >>> from diffusers_retina.feature_cache import cached_extract  # doctest: +SKIP
    >>> features = cached_extract(pipe, images, "runs/cache", blocks=["up.1"], timesteps=[50], seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from safetensors.torch import load_file, save


def public_config(config) -> List[tuple]:
    """A config's entries without the private ones (``_name_or_path`` and the like), sorted: what a cache key hashes."""
    return sorted((key, value) for key, value in config.items() if not key.startswith("_"))


def weights_digest(unet: torch.nn.Module) -> str:
    """SHA-256 of a UNet's config and weights. Computed afresh for every cached extraction (a few ms per MB of
    weights), so weights changed in place can never reuse features of the old ones. Private config entries
    (``_name_or_path``, ``_diffusers_version``, ...) are left out: the same weights loaded from another folder (e.g.
    each head trained on one DDPM) share their features."""
    digest = hashlib.sha256(repr(public_config(unet.config)).encode())
    for name, tensor in sorted(unet.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(image: torch.Tensor, blocks, timesteps, policy, seed, dtype, num_noise_draws, shared_noise,
              scheduler, unet_digest: str) -> str:
    """The cache file name of one image's features: a hash of everything they depend on."""
    digest = hashlib.sha256()
    digest.update(image.detach().cpu().float().contiguous().numpy().tobytes())
    digest.update(str(tuple(image.shape)).encode())
    digest.update(unet_digest.encode())
    digest.update(repr((list(blocks), [int(t) for t in timesteps], policy, seed, str(dtype), num_noise_draws,
                        shared_noise, type(scheduler).__name__, public_config(scheduler.config))).encode())
    return digest.hexdigest()


class FeatureCache:
    """A folder of cached features, ``<folder>/<key>.safetensors``."""

    def __init__(self, folder: Union[str, os.PathLike]):
        self.folder = Path(folder)

    def read(self, key: str) -> Optional[Dict[str, torch.Tensor]]:
        path = self.folder / f"{key}.safetensors"
        return load_file(str(path)) if path.is_file() else None

    def write(self, key: str, features: Dict[str, torch.Tensor]) -> None:
        """Atomic: a temporary file in the same folder, then ``os.replace``."""
        path = self.folder / f"{key}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            temporary.write_bytes(save({k: v.contiguous() for k, v in features.items()}))
            os.replace(temporary, path)
        finally:
            if temporary.exists():
                temporary.unlink()


@torch.no_grad()
def cached_extract(pipe, images: torch.Tensor, cache_dir: Union[str, os.PathLike], blocks: Sequence[str],
                   timesteps: Sequence[int], policy: str = "noise", seed: Optional[int] = None,
                   feature_dtype: torch.dtype = torch.float16, num_noise_draws: int = 1, shared_noise: bool = False,
                   batch_size: Optional[int] = None, generator=None) -> Dict[str, torch.Tensor]:
    """``pipe.extract(images, ...)`` (a ``DiffusionFeaturePipeline`` or any ``FeatureExtractionMixin``) with each
    image's features kept in ``cache_dir``: hits are read, only the misses go through the UNet (as one batch) and are
    written. The same image gets the same features wherever it sits in a batch: with ``seed`` its noise is drawn from
    (seed, image content, draw). A cache with ``policy="noise"`` therefore needs ``seed`` (a generator's state cannot be
    keyed); the deterministic policies need none. Returns what ``extract`` returns."""
    pipe.check_extract_inputs(blocks, timesteps, policy, num_noise_draws, feature_dtype, batch_size, seed)
    if policy == "noise" and seed is None:
        raise ValueError("A feature cache with policy='noise' needs `seed` (the noise must be part of the key).")
    names = list(dict.fromkeys(blocks))
    draws = num_noise_draws if policy == "noise" else 1
    cache, digest = FeatureCache(cache_dir), weights_digest(pipe.unet)
    keys = [cache_key(image, names, timesteps, policy, seed, feature_dtype, draws, shared_noise, pipe.scheduler, digest)
            for image in images]
    per_image: List[Optional[Dict[str, torch.Tensor]]] = [cache.read(key) for key in keys]
    todo = [index for index, hit in enumerate(per_image) if hit is None]
    if todo:
        computed = pipe.extract(images[todo], blocks, timesteps, policy, generator=generator,
                                num_noise_draws=num_noise_draws, shared_noise=shared_noise,
                                feature_dtype=feature_dtype, batch_size=batch_size, seed=seed)
        for position, index in enumerate(todo):
            per_image[index] = {name: computed[name][position] for name in names}
            cache.write(keys[index], per_image[index])
    return {name: torch.stack([features[name] for features in per_image]) for name in names}
