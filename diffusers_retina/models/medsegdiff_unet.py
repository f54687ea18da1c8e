"""MedSegDiffUNet2DModel: MedSegDiff's conditioning (Wu et al., MIDL 2023) as a drop-in denoiser for
`SegmentationEnsemblePipeline`.

Two encoders run side by side: the *mask stream* encodes the noisy mask x_t (with the time embedding) and an
image-only *condition encoder* encodes the image. At every encoder scale the mask-stream features first pass through
an **FF-Parser** (a learnable element-wise filter in the 2-D Fourier domain that damps the high-frequency noise the
noisy mask carries), then the two streams are fused by **dynamic conditional encoding**

    A(m_I, m_x) = (LN(m_I) * LN(m_x)) * m_I,     m_x <- m_x + A(m_I, m_x),

so the decoder's skip connections carry image evidence at every resolution; at the bottleneck the condition
encoder's output is added to the mask stream before the mid block and the decoder (built from diffusers' UNet
blocks, like ``UNet2DModel``). An optional 1x1 head on the condition bottleneck predicts the mask from the image alone
(the published code trains it with an auxiliary loss weighted 10x; here it is ``condition_head=True`` plus the
training flag ``--aux_loss_weight``).

Call contract (the same as a Wolleb-style ``UNet2DModel``, so the pipeline needs no special case): ``sample`` is the
noisy mask concatenated with the clean image along channels, mask first, ``in_channels = mask_channels +
image_channels``; the output has ``out_channels`` channels.

Fixed with respect to the published code: the FF-Parser works at any input size and aspect ratio (the filter is
stored on a grid of normalised frequencies and sampled at the input's own frequencies, identity at init); every
layer is created in ``__init__`` (no modules built inside ``forward``); any batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers import ModelMixin  # noqa: F401  (diffusers resolves package components through this attribute)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block, get_up_block
from diffusers.utils import BaseOutput
from torch import nn


@dataclass
class MedSegDiffUNet2DOutput(BaseOutput):
    """Output of [`MedSegDiffUNet2DModel`].

    Args:
        sample: the denoiser's prediction, ``(B, out_channels, H, W)``.
        condition_logits: with ``condition_head=True``, the condition encoder's own mask logits
            ``(B, mask_channels, H, W)`` (binary: one channel; ``K`` classes: ``K``), else ``None``.
    """

    sample: torch.Tensor
    condition_logits: Optional[torch.Tensor] = None


class FFParser(nn.Module):
    """Learnable element-wise filter in the 2-D Fourier domain, for any input size and aspect ratio.

    The complex filter (one per channel) is stored on a ``grid_size = (rows, cols)`` grid that spans the normalised
    frequencies of ``rfft2`` (rows: ``[-1/2, 1/2]`` cycles per pixel, columns: ``[0, 1/2]``) and is sampled bilinearly
    at the frequencies of the actual input, so one set of weights serves 64x64 patches and 999x960 photographs alike.
    Initialised to 1 + 0j: the identity. The transform runs in float32 (no half-precision FFT on CPU, and fp16 FFTs
    overflow easily) and the result is cast back to the input's dtype.
    """

    def __init__(self, channels: int, grid_size: Tuple[int, int] = (16, 9)):
        super().__init__()
        rows, cols = grid_size
        if rows < 2 or cols < 2:
            raise ValueError(f"FF-Parser `grid_size` needs at least 2x2 frequencies, got {grid_size!r}.")
        weight = torch.zeros(channels, 2, rows, cols)
        weight[:, 0] = 1.0  # real part 1, imaginary part 0: identity
        self.weight = nn.Parameter(weight)

    def frequency_filter(self, height: int, width: int) -> torch.Tensor:
        """The complex filter sampled at the ``rfft2`` frequencies of a ``height x width`` input: ``(C, H, W//2+1)``."""
        device = self.weight.device
        rows = torch.fft.fftfreq(height, device=device) * 2.0  # [-1, 1)
        cols = torch.fft.rfftfreq(width, device=device) * 4.0 - 1.0  # [0, 1/2] -> [-1, 1]
        grid_y, grid_x = torch.meshgrid(rows, cols, indexing="ij")
        grid = torch.stack([grid_x, grid_y], dim=-1)[None]  # grid_sample wants (x, y)
        channels = self.weight.shape[0]
        weight = self.weight.float().reshape(1, channels * 2, *self.weight.shape[-2:])
        sampled = F.grid_sample(weight, grid, mode="bilinear", padding_mode="border", align_corners=True)
        sampled = sampled.reshape(channels, 2, height, width // 2 + 1)
        return torch.complex(sampled[:, 0], sampled[:, 1])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        height, width = hidden_states.shape[-2:]
        spectrum = torch.fft.rfft2(hidden_states.float(), norm="ortho")
        spectrum = spectrum * self.frequency_filter(height, width)
        filtered = torch.fft.irfft2(spectrum, s=(height, width), norm="ortho").to(dtype)
        if hidden_states.is_contiguous(memory_format=torch.channels_last) and not hidden_states.is_contiguous():
            # keep the caller's layout: the FFT returns NCHW, and a layout switch before every convolution costs more
            # than channels-last saves (pipelines run channels-last on the CPU)
            filtered = filtered.contiguous(memory_format=torch.channels_last)
        return filtered


class DynamicConditionalEncoding(nn.Module):
    """Fuse condition features ``m_I`` into mask-stream features ``m_x`` at one scale.

    With ``dynamic=True``: ``m_x + (LN(m_I) * LN(m_x)) * m_I`` (MedSegDiff); LN normalises each sample over
    (C, H, W) (``GroupNorm(1, C)``, size-agnostic, with a per-channel affine). With ``dynamic=False`` the ablation's
    plain additive fusion ``m_x + m_I``. The optional FF-Parser filters ``m_x`` first.
    """

    def __init__(self, channels: int, dynamic: bool = True, ff_parser: bool = True,
                 ff_parser_grid: Tuple[int, int] = (16, 9), eps: float = 1e-5):
        super().__init__()
        self.ff_parser = FFParser(channels, ff_parser_grid) if ff_parser else None
        self.dynamic = dynamic
        if dynamic:
            self.norm_condition = nn.GroupNorm(1, channels, eps=eps)
            self.norm_mask = nn.GroupNorm(1, channels, eps=eps)

    def forward(self, mask_features: torch.Tensor, condition_features: torch.Tensor) -> torch.Tensor:
        if self.ff_parser is not None:
            mask_features = self.ff_parser(mask_features)
        if not self.dynamic:
            return mask_features + condition_features
        affinity = self.norm_condition(condition_features) * self.norm_mask(mask_features)
        return mask_features + affinity * condition_features


class MedSegDiffUNet2DModel(ModelMixin, ConfigMixin):
    r"""MedSegDiff denoiser: mask stream + image-only condition encoder fused at every scale, diffusers UNet blocks.

    Args:
        sample_size: nominal training size (informational; any size that is a multiple of
            ``2 ** (len(block_out_channels) - 1)`` works).
        in_channels: ``mask_channels + image_channels`` (the pipeline concatenates noisy mask and image).
        out_channels: ``mask_channels`` (or twice that for a learned variance).
        image_channels: channels of the image at the end of ``sample`` (3 for RGB fundus photographs).
        block_out_channels, layers_per_block, down_block_types, up_block_types, norm_num_groups, norm_eps, act_fn,
        add_attention, attention_head_dim, flip_sin_to_cos, freq_shift: as in ``diffusers.UNet2DModel``; the condition
            encoder uses the same block types and widths as the mask stream (without the time embedding).
        dynamic_encoding: MedSegDiff's fusion ``(LN(m_I) * LN(m_x)) * m_I``; ``False``: plain addition.
        ff_parser: filter the mask-stream features with an FF-Parser before each fusion.
        ff_parser_grid: ``(rows, cols)`` of the stored frequency grid of each FF-Parser.
        condition_head: add a 1x1 head on the condition bottleneck that predicts mask logits from the image alone
            (for the auxiliary loss); returned as ``condition_logits``.

    Example:
        ```py
        >>> import torch
        >>> from diffusers_retina.models import MedSegDiffUNet2DModel
        >>> model = MedSegDiffUNet2DModel(in_channels=4, out_channels=1, block_out_channels=(16, 32, 64))
        >>> noisy_mask, image = torch.randn(2, 1, 48, 80), torch.randn(2, 3, 48, 80)
        >>> model(torch.cat([noisy_mask, image], dim=1), 10).sample.shape
        torch.Size([2, 1, 48, 80])
        ```
    """

    _supports_gradient_checkpointing = False
    _skip_layerwise_casting_patterns = ["norm", "ff_parser"]

    @register_to_config
    def __init__(
        self,
        sample_size: Optional[int] = None,
        in_channels: int = 4,
        out_channels: int = 1,
        image_channels: int = 3,
        block_out_channels: Tuple[int, ...] = (16, 32, 64, 128),
        layers_per_block: int = 1,
        down_block_types: Optional[Tuple[str, ...]] = None,
        up_block_types: Optional[Tuple[str, ...]] = None,
        norm_num_groups: int = 8,
        norm_eps: float = 1e-5,
        act_fn: str = "silu",
        add_attention: bool = True,
        attention_head_dim: Optional[int] = 8,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        dynamic_encoding: bool = True,
        ff_parser: bool = True,
        ff_parser_grid: Tuple[int, int] = (16, 9),
        condition_head: bool = False,
    ):
        super().__init__()
        num_levels = len(block_out_channels)
        down_block_types = tuple(down_block_types or ("DownBlock2D",) * num_levels)
        up_block_types = tuple(up_block_types or ("UpBlock2D",) * num_levels)
        if len(down_block_types) != num_levels or len(up_block_types) != num_levels:
            raise ValueError(
                f"`down_block_types` ({len(down_block_types)}) and `up_block_types` ({len(up_block_types)}) need one "
                f"entry per `block_out_channels` ({num_levels})."
            )
        mask_channels = in_channels - image_channels
        if mask_channels < 1:
            raise ValueError(
                f"`in_channels` ({in_channels}) must exceed `image_channels` ({image_channels}): the input is the noisy "
                "mask concatenated with the image."
            )
        time_embed_dim = block_out_channels[0] * 4
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim)

        self.conv_in = nn.Conv2d(mask_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.condition_conv_in = nn.Conv2d(image_channels, block_out_channels[0], kernel_size=3, padding=1)
        fusion = dict(dynamic=dynamic_encoding, ff_parser=ff_parser, ff_parser_grid=tuple(ff_parser_grid),
                      eps=norm_eps)
        # one fusion after conv_in (full resolution) and one after every down block
        self.fusions = nn.ModuleList([DynamicConditionalEncoding(block_out_channels[0], **fusion)])

        self.down_blocks = nn.ModuleList([])
        self.condition_blocks = nn.ModuleList([])
        output_channel = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            input_channel, output_channel = output_channel, block_out_channels[i]
            common = dict(num_layers=layers_per_block, in_channels=input_channel, out_channels=output_channel,
                          add_downsample=i < num_levels - 1, resnet_eps=norm_eps, resnet_act_fn=act_fn,
                          resnet_groups=norm_num_groups, downsample_padding=1,
                          attention_head_dim=attention_head_dim or output_channel)
            self.down_blocks.append(get_down_block(block_type, temb_channels=time_embed_dim, **common))
            # the condition encoder sees the image only: no time embedding
            self.condition_blocks.append(get_down_block(block_type, temb_channels=None, **common))
            self.fusions.append(DynamicConditionalEncoding(output_channel, **fusion))

        self.mid_block = UNetMidBlock2D(
            in_channels=block_out_channels[-1], temb_channels=time_embed_dim, resnet_eps=norm_eps,
            resnet_act_fn=act_fn, resnet_groups=norm_num_groups, add_attention=add_attention,
            attention_head_dim=attention_head_dim or block_out_channels[-1],
        )
        self.condition_logits_head = (
            nn.Conv2d(block_out_channels[-1], mask_channels, kernel_size=1) if condition_head else None
        )

        self.up_blocks = nn.ModuleList([])
        reversed_channels = list(reversed(block_out_channels))
        output_channel = reversed_channels[0]
        for i, block_type in enumerate(up_block_types):
            prev_output_channel, output_channel = output_channel, reversed_channels[i]
            input_channel = reversed_channels[min(i + 1, num_levels - 1)]
            self.up_blocks.append(get_up_block(
                block_type, num_layers=layers_per_block + 1, in_channels=input_channel, out_channels=output_channel,
                prev_output_channel=prev_output_channel, temb_channels=time_embed_dim,
                add_upsample=i < num_levels - 1, resnet_eps=norm_eps, resnet_act_fn=act_fn,
                resnet_groups=norm_num_groups, attention_head_dim=attention_head_dim or output_channel,
            ))

        self.conv_norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[0], eps=norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, kernel_size=3, padding=1)

    @property
    def mask_channels(self) -> int:
        return self.config.in_channels - self.config.image_channels

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Union[torch.Tensor, float, int],
        return_dict: bool = True,
    ) -> Union[MedSegDiffUNet2DOutput, Tuple]:
        r"""Denoise.

        Args:
            sample: ``(B, mask_channels + image_channels, H, W)``: the noisy mask, then the clean image. ``H`` and
                ``W`` must be multiples of ``2 ** (len(block_out_channels) - 1)``.
            timestep: a number or a tensor of ``B`` (or one) timesteps.
            return_dict: return a [`MedSegDiffUNet2DOutput`] instead of a tuple ``(sample,)`` (or
                ``(sample, condition_logits)`` with ``condition_head=True``).
        """
        factor = 2 ** (len(self.config.block_out_channels) - 1)
        if sample.shape[-2] % factor or sample.shape[-1] % factor:
            raise ValueError(
                f"`sample` of size {tuple(sample.shape[-2:])} is not a multiple of the down-sampling factor {factor}; "
                "pad it (SegmentationEnsemblePipeline does this for you)."
            )
        if sample.shape[1] != self.config.in_channels:
            raise ValueError(
                f"`sample` has {sample.shape[1]} channels; expected {self.config.in_channels} (noisy mask "
                f"{self.mask_channels} + image {self.config.image_channels})."
            )
        noisy_mask, image = sample[:, : self.mask_channels], sample[:, self.mask_channels:]

        # 1. time
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.long, device=sample.device)
        elif timesteps.ndim == 0:
            timesteps = timesteps[None].to(sample.device)
        timesteps = timesteps * torch.ones(sample.shape[0], dtype=timesteps.dtype, device=timesteps.device)
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype=self.dtype))

        # 2. two encoders, fused at every scale; the fused mask features are the decoder's skips
        hidden = self.conv_in(noisy_mask)
        condition = self.condition_conv_in(image)
        hidden = self.fusions[0](hidden, condition)
        skips: Tuple[torch.Tensor, ...] = (hidden,)
        for block, condition_block, fusion in zip(self.down_blocks, self.condition_blocks, self.fusions[1:]):
            hidden, res_samples = block(hidden_states=hidden, temb=emb)
            condition, _ = condition_block(hidden_states=condition, temb=None)
            hidden = fusion(hidden, condition)
            # the block's last residual is its output: hand the decoder the fused version
            skips += res_samples[:-1] + (hidden,)

        # 3. bottleneck: add the condition encoder's output
        hidden = self.mid_block(hidden + condition, emb)

        # 4. decoder
        for block in self.up_blocks:
            res_samples, skips = skips[-len(block.resnets):], skips[: -len(block.resnets)]
            hidden = block(hidden, res_samples, emb)
        hidden = self.conv_out(self.conv_act(self.conv_norm_out(hidden)))

        condition_logits = None
        if self.condition_logits_head is not None:
            condition_logits = F.interpolate(self.condition_logits_head(condition), size=sample.shape[-2:],
                                             mode="bilinear", align_corners=False)
        if not return_dict:
            return (hidden,) if condition_logits is None else (hidden, condition_logits)
        return MedSegDiffUNet2DOutput(sample=hidden, condition_logits=condition_logits)
