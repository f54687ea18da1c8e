"""PixelMLPEnsemble: ddpm-segmentation's pixel classifier ensemble over diffusion features.

Each member is a small MLP (``F -> 128 -> 32 -> K`` with ReLU and batch norm, weights ~ N(0, 0.02)) that classifies one
pixel from its feature vector: the activations of the chosen UNet blocks at the chosen timesteps, read at that pixel.
The published code builds those vectors by upsampling every map to the full image in float32 (8448 channels x H x W);
here features stay at their native resolution (fp16) and a pixel's vector is read bilinearly at its coordinates
(`read_pixels`), which equals upsample-then-index (tested) without ever holding the full-resolution matrix. Prediction
walks the image in chunks of pixels; the members vote (majority) and their disagreement (mutual information) is the
uncertainty map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers import ModelMixin  # noqa: F401  (diffusers resolves package components via ModelMixin)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils import BaseOutput
from torch import nn


@dataclass
class FeatureHeadOutput(BaseOutput):
    """Output of the feature heads' ``forward``.

    Args:
        logits: class logits -- ``PixelMLPEnsemble``: ``(E, P, K)`` (or ``(P, K)`` of one member); ``FreqAggHead``:
            ``(N, K, H, W)``.
    """

    logits: torch.Tensor


def gather_pixels(maps: torch.Tensor, image_index: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                  size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear read of ``maps (N, C, h, w)`` at full-image pixels ``(image_index, rows, cols)`` (any equal shapes).

    The source position of output pixel ``i`` is ``(i + 0.5) * h / H - 0.5`` clamped to the map (what
    ``F.interpolate(..., mode="bilinear", align_corners=False)`` and ``grid_sample(..., padding_mode="border")`` do),
    so the result equals upsample-then-index; only the four neighbours of each pixel are touched (and converted to
    float32), never the whole map. Returns ``(*rows.shape, C)`` float32.
    """
    height, width = size
    map_h, map_w = maps.shape[-2:]
    y = ((rows.float() + 0.5) * (map_h / height) - 0.5).clamp(0, map_h - 1)
    x = ((cols.float() + 0.5) * (map_w / width) - 0.5).clamp(0, map_w - 1)
    y0, x0 = y.floor().long(), x.floor().long()
    y1, x1 = (y0 + 1).clamp(max=map_h - 1), (x0 + 1).clamp(max=map_w - 1)
    wy, wx = (y - y0)[..., None], (x - x0)[..., None]
    image_index = image_index.to(maps.device)

    def at(yy, xx):  # advanced indices around a slice: the (pixel) dims come first, then channels
        return maps[image_index, :, yy.to(maps.device), xx.to(maps.device)].float()

    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    return top * (1 - wy) + bottom * wy


def read_pixels(features: Dict[str, torch.Tensor], blocks: Sequence[str], coords: torch.Tensor,
                size: Tuple[int, int], image_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Feature vectors at pixel coordinates, read bilinearly from native-resolution maps.

    Args:
        features: ``{block: (N, T, C, h, w)}`` (any float dtype).
        blocks: the blocks to read, in order (their channels are concatenated, timestep-major within a block).
        coords: ``(N, P, 2)`` pixel coordinates ``(row, column)`` in the full image of ``size``, P per image; or, with
            ``image_index``, ``(P, 2)`` coordinates of pixels of any images.
        size: ``(H, W)`` of the full image.
        image_index: ``(P,)`` which image each coordinate belongs to (e.g. random pixels of random training crops).

    Returns:
        ``(N, P, sum_b T * C_b)`` (or ``(P, sum_b T * C_b)`` with ``image_index``) float32, equal to
        ``F.interpolate(maps, size, mode="bilinear")`` indexed at ``coords``.
    """
    if image_index is None:
        image_index = torch.arange(coords.shape[0]).view(-1, 1).expand(coords.shape[:2])
    vectors = []
    for name in blocks:
        maps = features[name]
        maps = maps.reshape(maps.shape[0], -1, *maps.shape[-2:])
        vectors.append(gather_pixels(maps, image_index, coords[..., 0], coords[..., 1], size))
    return torch.cat(vectors, dim=-1)


class PixelMLPEnsemble(ModelMixin, ConfigMixin):
    r"""An ensemble of pixel MLPs over diffusion features (ddpm-segmentation).

    Args:
        blocks, timesteps, policy: the features it reads (block names of `DiffusionFeaturePipeline`, timesteps,
            input policy); kept in the config so a saved pipeline extracts the right features.
        block_channels: channels of each block (from `DiffusionFeaturePipeline.describe()`).
        num_classes: ``K`` (2 for vessel / background).
        hidden_channels: widths of the two hidden layers (128, 32 in ddpm-segmentation).
        ensemble_size: members (10 in ddpm-segmentation).

    Example:
        ```py
        >>> import torch
        >>> from diffusers_retina.models import PixelMLPEnsemble
        >>> head = PixelMLPEnsemble(blocks=["up.1"], timesteps=[50, 150], block_channels=[32], ensemble_size=3)
        >>> features = {"up.1": torch.randn(1, 2, 32, 16, 16, dtype=torch.float16)}
        >>> head.predict(features, size=(64, 64))["masks"].shape
        torch.Size([1, 64, 64])
        ```
    """

    @register_to_config
    def __init__(
        self,
        blocks: List[str],
        timesteps: List[int],
        block_channels: List[int],
        policy: str = "noise",
        num_classes: int = 2,
        hidden_channels: Tuple[int, int] = (128, 32),
        ensemble_size: int = 10,
    ):
        super().__init__()
        if len(blocks) != len(block_channels):
            raise ValueError(f"`block_channels` needs one entry per block: {len(block_channels)} for {len(blocks)}.")
        if num_classes < 2 or ensemble_size < 1:
            raise ValueError(f"Need num_classes >= 2 and ensemble_size >= 1, got {num_classes}, {ensemble_size}.")
        in_features = sum(block_channels) * len(timesteps)
        first, second = hidden_channels
        self.members = nn.ModuleList([
            nn.Sequential(
                nn.Linear(in_features, first), nn.ReLU(), nn.BatchNorm1d(first),
                nn.Linear(first, second), nn.ReLU(), nn.BatchNorm1d(second),
                nn.Linear(second, num_classes),
            )
            for _ in range(ensemble_size)
        ])
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.02)
                nn.init.zeros_(module.bias)

    @property
    def in_features(self) -> int:
        return sum(self.config.block_channels) * len(self.config.timesteps)

    def forward(self, pixel_features: torch.Tensor, member: Optional[int] = None, return_dict: bool = True
                ) -> Union[FeatureHeadOutput, Tuple[torch.Tensor]]:
        """Logits ``(E, P, K)`` of every member for pixel vectors ``(P, F)`` (or ``(P, K)`` of one ``member``), as a
        [`FeatureHeadOutput`] (or a tuple ``(logits,)`` with ``return_dict=False``). Vectors of any float dtype are
        cast to the head's (a float16/bfloat16 pipeline reads float32 vectors from its feature maps)."""
        pixel_features = pixel_features.to(self.members[0][0].weight.dtype)
        if member is not None:
            logits = self.members[member](pixel_features)
        else:
            logits = torch.stack([mlp(pixel_features) for mlp in self.members])
        return FeatureHeadOutput(logits=logits) if return_dict else (logits,)

    @torch.no_grad()
    def predict(self, features: Dict[str, torch.Tensor], size: Tuple[int, int], chunk: int = 65536
                ) -> Dict[str, torch.Tensor]:
        """Segment whole images: ``masks (N, H, W)`` (members' majority vote), ``probabilities (N, K, H, W)`` (mean
        softmax) and ``uncertainty (N, H, W)`` (mutual information of the members, nats)."""
        self.eval()
        height, width = size
        num_images = next(iter(features.values())).shape[0]
        device = next(self.parameters()).device
        rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        coords = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1)
        masks, probabilities, uncertainty = [], [], []
        for image in range(num_images):
            single = {name: maps[image: image + 1] for name, maps in features.items()}
            votes, mean_probs, info = [], [], []
            for start in range(0, coords.shape[0], chunk):
                vectors = read_pixels(single, self.config.blocks, coords[None, start: start + chunk],
                                      size)[0].to(device)
                member_probs = self(vectors, return_dict=False)[0].float().softmax(dim=-1)  # (E, P, K)
                mean = member_probs.mean(dim=0)
                counts = F.one_hot(member_probs.argmax(dim=-1), self.config.num_classes).sum(dim=0)  # (P, K)
                entropy_of_mean = -(mean * mean.clamp_min(1e-12).log()).sum(-1)
                mean_entropy = -(member_probs * member_probs.clamp_min(1e-12).log()).sum(-1).mean(0)
                votes.append(counts.argmax(dim=-1))
                mean_probs.append(mean)
                info.append((entropy_of_mean - mean_entropy).clamp_min(0))
            masks.append(torch.cat(votes).reshape(height, width))
            probabilities.append(torch.cat(mean_probs).T.reshape(-1, height, width))
            uncertainty.append(torch.cat(info).reshape(height, width))
        return {"masks": torch.stack(masks), "probabilities": torch.stack(probabilities),
                "uncertainty": torch.stack(uncertainty)}
