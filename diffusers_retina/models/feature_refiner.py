"""PriorFeatureRefinerModel: a light denoiser that reuses a deterministic segmenter's decoder features.

The prior-anchored ensemble (``SegmentationEnsemblePipeline`` with a ``prior``) diffuses the residual ``r = y - p``
between the vessel mask and the prior's probability. With a second U-Net as the denoiser, every member and every step
pays for a full network over every pixel. This head instead splits its work in two:

* **once per image** (per tile of the prior's pass): :meth:`PriorFeatureRefinerModel.encode_context` turns the prior's
  last decoder features (the input of its ``conv_out``, read with :func:`segmenter_features`) and the prior's mask
  ``q = 2p - 1`` into ``hidden_channels`` context maps with two 3x3 convolutions (the second dilated);
* **per member and step**: :meth:`~PriorFeatureRefinerModel.forward` adds a 3x3 convolution of the noisy residual to
  the context, modulates it by the timestep (scale and shift, as FiLM) and maps it through two 1x1 layers to the
  residual's ``x0`` estimate.

So a step costs a few operations per pixel on ``hidden_channels`` channels, not a network: with 16 channels about
0.4k multiply-adds per pixel against the reference prior's 60k or so. The output layer starts at zero, so an untrained
head returns the prior unchanged.

Example:
    >>> import torch
    >>> from diffusers import UNet2DModel
    >>> prior = UNet2DModel(sample_size=32, in_channels=3, out_channels=1, block_out_channels=(8, 16),
    ...                     down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
    ...                     norm_num_groups=4, layers_per_block=1)
    >>> head = PriorFeatureRefinerModel(feature_channels=8, hidden_channels=8)
    >>> logits, features = segmenter_features(prior, torch.zeros(1, 3, 32, 32))
    >>> context = head.encode_context(features, 2 * logits.sigmoid() - 1)
    >>> head(torch.randn(5, 1, 32, 32), 999, context.expand(5, -1, -1, -1)).sample.shape
    torch.Size([5, 1, 32, 32])
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

#: Per-step inference runs in bands of rows of about this many hidden activations (8 MiB in float32).
BAND_ELEMENTS = 2 ** 21


def segmenter_features(segmenter, sample: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(logits, features)`` of a deterministic ``UNet2DModel`` segmenter at timestep 0: its output and its last
    decoder features, the input of its ``conv_out`` (``block_out_channels[0]`` channels at full resolution, after the
    final normalisation and activation), read with a forward pre-hook so any saved segmenter works unchanged."""
    captured = {}

    def keep_input(module, inputs):
        captured["features"] = inputs[0]

    module = getattr(segmenter, "module", segmenter)  # a DistributedDataParallel wrapper holds the model as .module
    handle = module.conv_out.register_forward_pre_hook(keep_input)
    try:
        timestep = torch.zeros((), dtype=torch.long, device=sample.device)
        logits = segmenter(sample, timestep, return_dict=False)[0]
    finally:
        handle.remove()
    return logits, captured["features"]


def segmenter_feature_channels(segmenter) -> int:
    """Channels of :func:`segmenter_features`' features for a ``UNet2DModel`` segmenter."""
    return int(segmenter.conv_out.in_channels)


class PriorFeatureRefinerModel(ModelMixin, ConfigMixin):
    r"""Denoiser of a prior's residual that reads the prior's own decoder features (see the module docstring).

    Args:
        feature_channels: channels of the prior's last decoder features (a ``UNet2DModel``'s
            ``block_out_channels[0]``); checked against the prior when a pipeline is built.
        hidden_channels: width of the context maps and of the per-step layers.
        mask_channels: channels of the residual (1: binary masks).
        time_embedding_dim: width of the sinusoidal timestep embedding.
        context_dilation: dilation of the second context convolution (its receptive field: ``3 + 2 * dilation`` px).
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, feature_channels: int = 16, hidden_channels: int = 16, mask_channels: int = 1,
                 time_embedding_dim: int = 32, context_dilation: int = 2):
        super().__init__()
        for name, value in (("feature_channels", feature_channels), ("hidden_channels", hidden_channels),
                            ("mask_channels", mask_channels), ("time_embedding_dim", time_embedding_dim),
                            ("context_dilation", context_dilation)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if time_embedding_dim % 2:
            raise ValueError(f"`time_embedding_dim` must be even, got {time_embedding_dim}.")
        self.context_in = nn.Conv2d(feature_channels + mask_channels, hidden_channels, 3, padding=1)
        self.context_mid = nn.Conv2d(hidden_channels, hidden_channels, 3, padding=context_dilation,
                                     dilation=context_dilation)
        self.state_in = nn.Conv2d(mask_channels, hidden_channels, 3, padding=1, bias=False)
        self.time_proj = Timesteps(time_embedding_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(time_embedding_dim, time_embedding_dim,
                                                out_dim=2 * hidden_channels)
        self.mix = nn.Conv2d(hidden_channels, hidden_channels, 1)
        self.conv_out = nn.Conv2d(hidden_channels, mask_channels, 1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def context_channels(self) -> int:
        """Channels of :meth:`encode_context`'s output (what the pipeline carries per image)."""
        return self.config.hidden_channels

    def encode_context(self, features: torch.Tensor, prior_masks: torch.Tensor) -> torch.Tensor:
        """The per-image part: ``(N, hidden_channels, H, W)`` from the prior's ``features (N, F, H, W)`` and its mask
        ``prior_masks = 2p - 1 (N, mask_channels, H, W)``. Computed once and shared by every member and step."""
        expected = self.config.feature_channels
        if features.shape[1] != expected:
            raise ValueError(f"PriorFeatureRefinerModel takes {expected} feature channels, got {features.shape[1]}.")
        dtype = self.context_in.weight.dtype
        hidden = F.silu(self.context_in(torch.cat([features, prior_masks], dim=1).to(dtype)))
        return hidden + self.context_mid(hidden)

    def forward(self, sample: torch.Tensor, timestep: Union[torch.Tensor, float, int],
                context: Optional[torch.Tensor] = None, features: Optional[torch.Tensor] = None,
                prior_masks: Optional[torch.Tensor] = None,
                return_dict: bool = True) -> Union[UNet2DOutput, Tuple[torch.Tensor]]:
        """The per-step part: the ``x0`` estimate of the residual from the noisy residual ``sample (N, mask_channels,
        H, W)`` at ``timestep`` (a number or one per sample) and the ``context`` of :meth:`encode_context` (one row
        per sample). Training passes ``features`` and ``prior_masks`` instead, so that the whole model runs in one
        ``forward`` (as distributed data parallel needs)."""
        if context is None:
            if features is None or prior_masks is None:
                raise ValueError("Give `context` (from encode_context) or both `features` and `prior_masks`.")
            context = self.encode_context(features, prior_masks)
        if context.shape[0] != sample.shape[0] or context.shape[-2:] != sample.shape[-2:]:
            raise ValueError(f"`context` {tuple(context.shape)} must match `sample` {tuple(sample.shape)} in batch "
                             "size and spatial size.")
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.dim() == 0:
            timesteps = timesteps[None]
        timesteps = timesteps.expand(sample.shape[0])
        embedding = self.time_embedding(self.time_proj(timesteps).to(self.mix.weight.dtype))
        scale, shift = embedding[:, :, None, None].chunk(2, dim=1)
        sample = sample.to(context.dtype)
        height = sample.shape[-2]
        band = max(1, BAND_ELEMENTS // max(1, sample.shape[0] * self.config.hidden_channels * sample.shape[-1]))
        if torch.is_grad_enabled() or band >= height:
            output = self._head(self.state_in(sample), context, scale, shift)
        else:
            # inference on a large image: bands of rows, so that the per-pixel layers work in cache (3x faster on a
            # CPU at 999 x 960); exact, the state convolution gets its one-row halo
            bands = []
            for top in range(0, height, band):
                bottom = min(height, top + band)
                rows = sample[:, :, max(0, top - 1): bottom + 1]
                rows = F.pad(rows, (0, 0, int(top == 0), int(bottom == height)))
                state = F.conv2d(rows, self.state_in.weight, padding=(0, 1))
                bands.append(self._head(state, context[:, :, top:bottom], scale, shift))
            output = torch.cat(bands, dim=2)
        if not return_dict:
            return (output,)
        return UNet2DOutput(sample=output)

    def _head(self, state: torch.Tensor, context: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor):
        hidden = F.silu(torch.addcmul(shift, context + state, 1.0 + scale))
        return self.conv_out(F.silu(self.mix(hidden)))
