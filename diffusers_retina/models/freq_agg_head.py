"""FreqAggHead: DiffDGSSv2-style time-and-scale aggregation of diffusion features, in pure PyTorch (no mmcv).

For every (block, timestep) map: a per-block 1x1 projection to ``embed_dim`` channels and a time-conditioned
normalisation (normalise without affine, then scale and shift from the timestep's sinusoidal embedding). The scales
of one timestep are then fused *per frequency band*: every projected map is upsampled to the finest feature
resolution and split by an FFT into a low band (radial frequency below ``cutoff`` cycles per pixel) and the high
rest; each band gets its own learned softmax weights over the scales, so coarse blocks can supply the low frequencies
and fine blocks the edges. A per-pixel gate (softmax over timesteps of a 1x1 conv) mixes the timesteps, and a small
conv classifier predicts the classes, upsampled to the image.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers import ModelMixin  # noqa: F401  (diffusers resolves package components via ModelMixin)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import Timesteps
from torch import nn

from .pixel_mlp_ensemble import FeatureHeadOutput


def frequency_bands(maps: torch.Tensor, cutoff: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split ``(..., H, W)`` maps into the low band (radial frequency < ``cutoff`` cycles/pixel) and the rest.
    Computed in float32 (no half-precision FFT on CPU); ``low + high == maps``."""
    dtype = maps.dtype
    height, width = maps.shape[-2:]
    spectrum = torch.fft.rfft2(maps.float())
    rows = torch.fft.fftfreq(height, device=maps.device)[:, None]
    cols = torch.fft.rfftfreq(width, device=maps.device)[None, :]
    low_pass = (rows.square() + cols.square()).sqrt() < cutoff
    low = torch.fft.irfft2(spectrum * low_pass, s=(height, width))
    return low.to(dtype), (maps.float() - low).to(dtype)


class FreqAggHead(ModelMixin, ConfigMixin):
    r"""Time- and scale-aware aggregation head over `DiffusionFeaturePipeline` features.

    Args:
        blocks, timesteps, policy: the features it reads; kept in the config so a saved pipeline extracts them.
        block_channels: channels of each block (from `DiffusionFeaturePipeline.describe()`, not hard-coded).
        num_classes: ``K``.
        embed_dim: channels after the per-block projection.
        cutoff: radial frequency (cycles per pixel at the finest feature resolution) between the low and high band.

    Example:
        ```py
        >>> import torch
        >>> from diffusers_retina.models import FreqAggHead
        >>> head = FreqAggHead(blocks=["mid", "up.1"], timesteps=[50, 150], block_channels=[64, 32])
        >>> features = {"mid": torch.randn(1, 2, 64, 8, 8), "up.1": torch.randn(1, 2, 32, 32, 32)}
        >>> head(features, size=(64, 64)).logits.shape
        torch.Size([1, 2, 64, 64])
        ```
    """

    @register_to_config
    def __init__(
        self,
        blocks: List[str],
        timesteps: List[int],
        block_channels: List[int],
        policy: str = "anchor",
        num_classes: int = 2,
        embed_dim: int = 32,
        cutoff: float = 0.125,
    ):
        super().__init__()
        if len(blocks) != len(block_channels):
            raise ValueError(f"`block_channels` needs one entry per block: {len(block_channels)} for {len(blocks)}.")
        if not 0.0 < cutoff < 0.5 * 2 ** 0.5:
            raise ValueError(f"`cutoff` is a radial frequency in (0, 0.707) cycles per pixel, got {cutoff}.")
        self.projections = nn.ModuleList([nn.Conv2d(c, embed_dim, kernel_size=1) for c in block_channels])
        self.time_proj = Timesteps(embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_modulation = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.SiLU(),
                                             nn.Linear(embed_dim, 2 * embed_dim))
        nn.init.zeros_(self.time_modulation[-1].weight)
        nn.init.zeros_(self.time_modulation[-1].bias)
        self.norm = nn.GroupNorm(1, embed_dim, affine=False)
        # softmax weights over scales, one set per band (zeros: an even mix to start)
        self.band_logits = nn.Parameter(torch.zeros(2, len(blocks)))
        self.gate = nn.Conv2d(embed_dim, 1, kernel_size=1)
        self.classifier = nn.Sequential(nn.Conv2d(embed_dim, embed_dim, 3, padding=1), nn.ReLU(),
                                        nn.Conv2d(embed_dim, num_classes, 1))

    def _fuse_scales(self, maps: List[torch.Tensor]) -> torch.Tensor:
        """Frequency-aware fusion of the projected maps of one timestep: ``(N, D, h, w)`` at the finest resolution."""
        size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
        upsampled = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                     for m in maps]
        stacked = torch.stack(upsampled)  # (S, N, D, h, w)
        low, high = frequency_bands(stacked, self.config.cutoff)
        weights = self.band_logits.softmax(dim=-1)  # (2, S)
        return (weights[0].view(-1, 1, 1, 1, 1) * low + weights[1].view(-1, 1, 1, 1, 1) * high).sum(dim=0)

    def forward(self, features: Dict[str, torch.Tensor], size: Optional[Tuple[int, int]] = None,
                return_dict: bool = True) -> Union[FeatureHeadOutput, Tuple[torch.Tensor]]:
        """Class logits ``(N, K, H, W)`` from ``{block: (N, T, C, h, w)}`` (``size``: output size, default the finest
        feature map's), as a [`FeatureHeadOutput`] (or ``(logits,)`` with ``return_dict=False``). Works in the head's
        dtype whatever the features' (float16/bfloat16 pipelines)."""
        timesteps = self.config.timesteps
        device = self.band_logits.device
        dtype = self.time_modulation[0].weight.dtype  # the sinusoidal embedding comes out in float32
        embedding = self.time_modulation(self.time_proj(torch.tensor(timesteps, device=device)).to(device, dtype))
        scale, shift = embedding.chunk(2, dim=-1)  # (T, D) each
        per_timestep, gates = [], []
        for k in range(len(timesteps)):
            projected = []
            for name, projection in zip(self.config.blocks, self.projections):
                maps = features[name][:, k].to(device=device, dtype=projection.weight.dtype)
                hidden = self.norm(projection(maps))
                projected.append(hidden * (1 + scale[k].view(1, -1, 1, 1)) + shift[k].view(1, -1, 1, 1))
            fused = self._fuse_scales(projected)
            per_timestep.append(fused)
            gates.append(self.gate(fused))
        weights = torch.cat(gates, dim=1).softmax(dim=1)  # (N, T, h, w): a per-pixel gate over timesteps
        mixed = (torch.stack(per_timestep, dim=1) * weights.unsqueeze(2)).sum(dim=1)
        logits = self.classifier(mixed)
        if size is not None and tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return FeatureHeadOutput(logits=logits) if return_dict else (logits,)

    @torch.no_grad()
    def predict(self, features: Dict[str, torch.Tensor], size: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        """``masks (N, H, W)``, ``probabilities (N, K, H, W)`` and ``uncertainty (N, H, W)`` (predictive entropy)."""
        self.eval()
        probabilities = self(features, size=size, return_dict=False)[0].float().softmax(dim=1)
        entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(dim=1)
        return {"masks": probabilities.argmax(dim=1), "probabilities": probabilities, "uncertainty": entropy}
