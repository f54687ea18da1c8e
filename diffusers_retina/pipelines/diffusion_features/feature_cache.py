"""The on-disk feature cache of :class:`DiffusionFeaturePipeline`: one safetensors file per image, named by a hash of
everything its features depend on (the image, the UNet's weights and config, the blocks, timesteps, policy, seed,
dtype, noise settings and the scheduler), written atomically. A change of any of them misses."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict, List, Optional, Union

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
