"""ConditionalUNet2DModel: a denoiser of images conditioned on a (vessel / semantic) mask.

ReTree paints a fundus photograph from a vessel mask by concatenating the mask to the noisy image; a fork conditions
the decoder by **SPADE** (normalise without affine, then ``x * (1 + gamma) + beta`` with ``gamma, beta`` computed
from the mask resized to the layer's resolution by a 3x3 conv with 128 channels and ReLU); semantic diffusion (SDM)
adds classifier-free guidance by replacing the mask with a null condition during training. All three are config
fields here, so one model serves Mask2ImagePipeline and, later, AdaptDiff's weakly conditioned semantic diffusion
(SPADE in the decoder with instance norm).

Built on a stock ``diffusers.UNet2DModel`` (its time embedding, down/mid/up blocks): with SPADE, the GroupNorms of the
chosen blocks' resnets are swapped for `SPADE` modules, which read the mask the model hands them for the current
call. Masks are diffusion-space tensors in ``[-1, 1]``: binary masks one channel ``2m - 1``, ``K`` classes ``K``
one-hot channels; soft masks (``2p - 1`` of a probability) are accepted as they are.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers import ModelMixin, UNet2DModel  # noqa: F401  (diffusers resolves package components via ModelMixin)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

CONDITIONING_MODES = ("concat", "spade", "concat+spade")
SPADE_BLOCKS = ("decoder", "all")
SPADE_NORMS = ("group", "instance")


class SPADE(nn.Module):
    """Spatially-adaptive normalisation (Park et al. 2019) in place of a resnet's GroupNorm.

    ``norm(x) * (1 + gamma(m)) + beta(m)``, where ``norm`` has no affine parameters (group or instance norm) and
    ``gamma, beta`` come from the mask ``m`` resized (nearest) to ``x`` through a shared 3x3 conv + ReLU. ``gamma``
    and ``beta`` start at zero, so an untrained SPADE is the plain normalisation.
    """

    def __init__(self, channels: int, mask_channels: int, num_groups: int, eps: float = 1e-5, norm: str = "group",
                 hidden_channels: int = 128):
        super().__init__()
        if norm == "group":
            self.norm = nn.GroupNorm(num_groups, channels, eps=eps, affine=False)
        elif norm == "instance":
            self.norm = nn.InstanceNorm2d(channels, eps=eps, affine=False)
        else:
            raise ValueError(f"SPADE `norm` must be one of {SPADE_NORMS}, got {norm!r}.")
        self.shared = nn.Sequential(nn.Conv2d(mask_channels, hidden_channels, 3, padding=1), nn.ReLU())
        self.gamma = nn.Conv2d(hidden_channels, channels, 3, padding=1)
        self.beta = nn.Conv2d(hidden_channels, channels, 3, padding=1)
        for conv in (self.gamma, self.beta):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.segmap: Optional[torch.Tensor] = None  # set by ConditionalUNet2DModel for the duration of one call

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.segmap is None:
            raise RuntimeError("SPADE needs a mask: call it through ConditionalUNet2DModel.forward.")
        segmap = F.interpolate(self.segmap.to(hidden_states.dtype), size=hidden_states.shape[-2:], mode="nearest")
        features = self.shared(segmap)
        return self.norm(hidden_states) * (1 + self.gamma(features)) + self.beta(features)


class ConditionalUNet2DModel(ModelMixin, ConfigMixin):
    r"""Image denoiser conditioned on a mask by concatenation, SPADE or both, with a learned null condition for
    classifier-free guidance.

    Args:
        sample_size: nominal training size (informational).
        in_channels / out_channels: channels of the (noisy) image and of the prediction (3 for RGB).
        mask_channels: channels of the condition (1 for binary masks, ``K`` for ``K`` classes).
        conditioning: ``"concat"`` (mask concatenated to the input), ``"spade"`` or ``"concat+spade"``.
        spade_blocks: where SPADE replaces the resnets' norms: ``"decoder"`` (mid and up blocks) or ``"all"``.
        spade_norm: ``"group"`` or ``"instance"`` normalisation inside SPADE.
        spade_hidden_channels: channels of SPADE's shared conv (128 in ReTree's SPADE fork).
        block_out_channels, layers_per_block, down_block_types, up_block_types, norm_num_groups, norm_eps, act_fn,
        add_attention, attention_head_dim: passed to the inner ``diffusers.UNet2DModel``.

    Call: ``model(sample, timestep, mask=..., drop_condition=...)``. ``mask=None`` or ``drop_condition[i] = True``
    replaces the mask of (those) samples by the learned null condition (training with condition dropout; the
    unconditional half of classifier-free guidance).

    Example:
        ```py
        >>> import torch
        >>> from diffusers_retina.models import ConditionalUNet2DModel
        >>> model = ConditionalUNet2DModel(conditioning="concat+spade", block_out_channels=(16, 32), norm_num_groups=8)
        >>> noisy, mask = torch.randn(2, 3, 32, 48), torch.rand(2, 1, 32, 48) * 2 - 1
        >>> model(noisy, 10, mask=mask).sample.shape
        torch.Size([2, 3, 32, 48])
        ```
    """

    @register_to_config
    def __init__(
        self,
        sample_size: Optional[int] = None,
        in_channels: int = 3,
        out_channels: int = 3,
        mask_channels: int = 1,
        conditioning: str = "concat",
        spade_blocks: str = "decoder",
        spade_norm: str = "group",
        spade_hidden_channels: int = 128,
        block_out_channels: Tuple[int, ...] = (32, 64, 128, 128),
        layers_per_block: int = 1,
        down_block_types: Optional[Tuple[str, ...]] = None,
        up_block_types: Optional[Tuple[str, ...]] = None,
        norm_num_groups: int = 8,
        norm_eps: float = 1e-5,
        act_fn: str = "silu",
        add_attention: bool = True,
        attention_head_dim: Optional[int] = 8,
    ):
        super().__init__()
        if conditioning not in CONDITIONING_MODES:
            raise ValueError(f"`conditioning` must be one of {CONDITIONING_MODES}, got {conditioning!r}.")
        if spade_blocks not in SPADE_BLOCKS:
            raise ValueError(f"`spade_blocks` must be one of {SPADE_BLOCKS}, got {spade_blocks!r}.")
        if spade_norm not in SPADE_NORMS:
            raise ValueError(f"`spade_norm` must be one of {SPADE_NORMS}, got {spade_norm!r}.")
        if mask_channels < 1:
            raise ValueError(f"`mask_channels` must be at least 1, got {mask_channels}.")
        num_levels = len(block_out_channels)
        self.unet = UNet2DModel(
            sample_size=sample_size,
            in_channels=in_channels + (mask_channels if "concat" in conditioning else 0),
            out_channels=out_channels,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            down_block_types=tuple(down_block_types or ("DownBlock2D",) * num_levels),
            up_block_types=tuple(up_block_types or ("UpBlock2D",) * num_levels),
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            act_fn=act_fn,
            add_attention=add_attention,
            attention_head_dim=attention_head_dim,
        )
        # the null condition of classifier-free guidance: one learned value per mask channel, broadcast over pixels
        self.null_condition = nn.Parameter(torch.zeros(mask_channels))
        if "spade" in conditioning:
            blocks = [self.unet.mid_block, *self.unet.up_blocks]
            if spade_blocks == "all":
                blocks = [*self.unet.down_blocks, *blocks]
            for block in blocks:
                for resnet in block.resnets:
                    for name in ("norm1", "norm2"):
                        group_norm = getattr(resnet, name)
                        spade = SPADE(group_norm.num_channels, mask_channels, group_norm.num_groups, group_norm.eps,
                                      norm=spade_norm, hidden_channels=spade_hidden_channels)
                        setattr(resnet, name, spade)

    @property
    def spade_layers(self):
        """The SPADE modules inside the inner UNet (empty for concat conditioning)."""
        return [module for module in self.unet.modules() if isinstance(module, SPADE)]

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def condition(self, mask: Optional[torch.Tensor], drop_condition: Optional[torch.Tensor], batch: int,
                  size: Tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The mask each sample is conditioned on: the given mask, or the null condition where dropped."""
        null = self.null_condition.to(dtype).view(1, -1, 1, 1).expand(batch, -1, *size)
        if mask is None:
            return null
        channels = self.config.mask_channels
        if mask.ndim != 4 or mask.shape[1] != channels or tuple(mask.shape[-2:]) != tuple(size):
            raise ValueError(
                f"`mask` must be (B, {channels}, {size[0]}, {size[1]}) to condition a sample of that size, got "
                f"{tuple(mask.shape)}."
            )
        if mask.shape[0] not in (1, batch):
            raise ValueError(f"`mask` has a batch of {mask.shape[0]}; expected 1 or {batch}.")
        mask = mask.to(device=device, dtype=dtype).expand(batch, -1, -1, -1)
        if drop_condition is None:
            return mask
        drop = torch.as_tensor(drop_condition, device=device).bool().reshape(-1)
        if drop.numel() not in (1, batch):
            raise ValueError(f"`drop_condition` needs 1 or {batch} entries, got {drop.numel()}.")
        return torch.where(drop.view(-1, 1, 1, 1), null, mask)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Union[torch.Tensor, float, int],
        mask: Optional[torch.Tensor] = None,
        drop_condition: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Union[UNet2DOutput, Tuple]:
        r"""Denoise ``sample`` given ``mask``.

        Args:
            sample: noisy images ``(B, in_channels, H, W)``; ``H, W`` multiples of ``2 ** (levels - 1)``.
            timestep: a number or ``B`` timesteps.
            mask: ``(B or 1, mask_channels, H, W)`` in ``[-1, 1]`` (soft values allowed); ``None``: null condition.
            drop_condition: optional ``(B,)`` booleans; ``True`` uses the null condition for that sample.
            return_dict: return a ``UNet2DOutput`` instead of a tuple.
        """
        batch, size = sample.shape[0], tuple(sample.shape[-2:])
        segmap = self.condition(mask, drop_condition, batch, size, sample.dtype, sample.device)
        model_input = torch.cat([sample, segmap], dim=1) if "concat" in self.config.conditioning else sample
        spade_layers = self.spade_layers
        for spade in spade_layers:
            spade.segmap = segmap
        try:
            output = self.unet(model_input, timestep, return_dict=False)[0]
        finally:
            for spade in spade_layers:
                spade.segmap = None
        if not return_dict:
            return (output,)
        return UNet2DOutput(sample=output)
