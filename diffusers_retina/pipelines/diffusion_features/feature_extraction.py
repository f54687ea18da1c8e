"""Reading multi-scale, multi-timestep features out of a denoising ``UNet2DModel``: the block names and their forward
hooks (with an early exit after the last requested block), the input policies and the batched extraction (the on-disk
cache of training is :func:`diffusers_retina.feature_cache.cached_extract`, a wrapper around :meth:`extract`). :class:`FeatureExtractionMixin` gives a pipeline with a ``unet`` and a ``scheduler``
``block_modules``, ``describe`` and ``extract``; :class:`~.DiffusionFeaturePipeline` segments with a head on top.

Input policies:

* ``"noise"`` -- ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` with ``eps`` from ``generator`` (optionally one noise shared
  by all images, optionally averaged over ``num_noise_draws`` draws);
* ``"anchor"`` -- DiffDGSSv2's anchoring: the clean image, the timestep only through the embedding;
* ``"ddim_inversion"`` -- the deterministic DDIM inversion trajectory from the clean image, with features taken when
  it reaches each requested timestep (sequential by nature).
"""

from __future__ import annotations

import hashlib
import numbers
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from ..sampling import per_sample_generators

POLICIES = ("noise", "anchor", "ddim_inversion")
FEATURE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class _StopForward(Exception):
    """Raised by the hook of the last requested block: nothing after it needs computing."""


def _is_integer(value) -> bool:
    """An integer timestep: a Python / numpy integer or an integer scalar tensor (``bool`` is not one)."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_floating_point() and value.dtype != torch.bool
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _first_tensor(output) -> torch.Tensor:
    """Block outputs come as tensors, tuples (down blocks: ``(hidden, residuals)``) or output dataclasses."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return _first_tensor(output[0])
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"Cannot read a tensor from a block output of type {type(output).__name__}.")


class FeatureExtractionMixin:
    """Feature extraction for a pipeline with a ``unet`` (``UNet2DModel``) and a ``scheduler``."""

    # ------------------------------------------------------------------ blocks
    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    def default_blocks(self) -> List[str]:
        """``["up.1", "up.2"]`` (ddpm-segmentation's choice) when the UNet has them, else its two finest up blocks
        (a two-level UNet has ``up.0`` and ``up.1`` only)."""
        levels = len(self.unet.up_blocks)
        if levels >= 3:
            return ["up.1", "up.2"]
        return [f"up.{i}" for i in range(max(levels - 2, 0), levels)]

    def block_modules(self) -> Dict[str, torch.nn.Module]:
        """Every hookable block by name, in forward order: ``down.{i}``, ``mid``, ``up.{i}.{j}``, ``up.{i}``."""
        blocks: Dict[str, torch.nn.Module] = {}
        for i, block in enumerate(self.unet.down_blocks):
            blocks[f"down.{i}"] = block
        if self.unet.mid_block is not None:
            blocks["mid"] = self.unet.mid_block
        for i, block in enumerate(self.unet.up_blocks):
            attentions = getattr(block, "attentions", None)
            for j, resnet in enumerate(block.resnets):
                has_attention = attentions is not None and j < len(attentions) and attentions[j] is not None
                blocks[f"up.{i}.{j}"] = attentions[j] if has_attention else resnet
            blocks[f"up.{i}"] = block
        return blocks

    def describe(self, height: Optional[int] = None, width: Optional[int] = None) -> List[Dict[str, int]]:
        """Channels and stride of every block, from a dry run on a zero image (``[{"name", "channels", "stride"}]``)."""
        size = self.size_multiple * 4
        height, width = height or size, width or size
        image = torch.zeros(1, self.unet.config.in_channels, height, width, device=self._execution_device,
                            dtype=self.unet.dtype)
        shapes = {}
        names = list(self.block_modules())
        with torch.no_grad():
            self._run_hooked(image, torch.zeros(1, dtype=torch.long, device=image.device), names, shapes,
                             record_shape=True)
        return [{"name": name, "channels": shapes[name][0], "stride": height // shapes[name][1]} for name in names]

    def _run_hooked(self, sample: torch.Tensor, timesteps: torch.Tensor, names: Sequence[str],
                    store: Dict[str, torch.Tensor], record_shape: bool = False) -> None:
        """One UNet forward with hooks on ``names``; stops after the last of them has fired."""
        modules = self.block_modules()
        unknown = [name for name in names if name not in modules]
        if unknown:
            raise ValueError(f"Unknown blocks {unknown}; this UNet has {list(modules)} (see `describe()`).")
        remaining = set(names)
        handles = []

        def make_hook(name):
            def hook(module, args, output):
                tensor = _first_tensor(output)
                store[name] = tuple(tensor.shape[1:]) if record_shape else tensor
                remaining.discard(name)
                if not remaining:
                    raise _StopForward

            return hook

        try:
            for name in names:
                handles.append(modules[name].register_forward_hook(make_hook(name)))
            self.unet(sample, timesteps, return_dict=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()

    # ------------------------------------------------------------------ inputs per policy
    def _noise(self, shape, generators, shared: bool, device, dtype) -> torch.Tensor:
        if shared:
            return randn_tensor(shape[1:], generator=generators[0], device=device, dtype=dtype).expand(shape)
        return randn_tensor(shape, generator=generators, device=device, dtype=dtype)

    def _inputs(self, images: torch.Tensor, timesteps: torch.Tensor, policy: str, noise: Optional[torch.Tensor]):
        """The UNet inputs of every (image, timestep) pair, image-major: ``(N * T, C, H, W)``."""
        num_images, num_steps = images.shape[0], timesteps.shape[0]
        clean = images.repeat_interleave(num_steps, dim=0)
        steps = timesteps.repeat(num_images)
        if policy == "anchor":
            return clean, steps
        noisy = self.scheduler.add_noise(clean, noise.repeat_interleave(num_steps, dim=0), steps)
        return noisy, steps

    def _ddim_inversion(self, images: torch.Tensor, timesteps: List[int], names: Sequence[str]):
        """Invert along DDIM from the clean image; collect the blocks when the trajectory reaches each timestep."""
        alphas = self.scheduler.alphas_cumprod.to(images.device)
        prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        features: Dict[str, List[torch.Tensor]] = {name: [] for name in names}
        latents, previous = images, None
        for t in sorted(timesteps):
            if previous is not None or t > 0:
                # one deterministic DDIM step from `previous` (or the clean image, t = 0) up to t
                t_from = previous if previous is not None else 0
                step = torch.full((latents.shape[0],), t_from, device=latents.device, dtype=torch.long)
                output = self.unet(latents, step, return_dict=False)[0][:, : latents.shape[1]]
                a_from = alphas[t_from]
                if prediction_type == "epsilon":
                    eps = output
                    x0 = (latents - (1 - a_from).sqrt() * eps) / a_from.sqrt()
                elif prediction_type == "sample":
                    x0 = output
                    eps = (latents - a_from.sqrt() * x0) / (1 - a_from).sqrt().clamp_min(1e-8)
                else:  # v_prediction
                    x0 = a_from.sqrt() * latents - (1 - a_from).sqrt() * output
                    eps = a_from.sqrt() * output + (1 - a_from).sqrt() * latents
                latents = alphas[t].sqrt() * x0 + (1 - alphas[t]).sqrt() * eps
            store: Dict[str, torch.Tensor] = {}
            self._run_hooked(latents, torch.full((latents.shape[0],), t, device=latents.device, dtype=torch.long),
                             names, store)
            for name in names:
                features[name].append(store[name])
            previous = t
        order = np.argsort(np.argsort(timesteps))  # back to the requested order
        return {name: torch.stack([maps[k] for k in order], dim=1) for name, maps in features.items()}

    @staticmethod
    def _noise_seed(seed: int, image: torch.Tensor, draw: int, shared: bool) -> int:
        digest = hashlib.sha256(repr((seed, draw)).encode())
        if not shared:
            digest.update(image.detach().cpu().float().contiguous().numpy().tobytes())
        return int(digest.hexdigest()[:15], 16)

    # ------------------------------------------------------------------ extraction
    def check_extract_inputs(self, blocks, timesteps, policy, num_noise_draws, feature_dtype, batch_size,
                             seed) -> None:
        """The arguments of :meth:`extract`, each error naming its argument."""
        if policy not in POLICIES:
            raise ValueError(f"`policy` must be one of {POLICIES}, got {policy!r}.")
        if not blocks:
            raise ValueError("`blocks` is empty: name at least one block (see `describe()`).")
        if not timesteps:
            raise ValueError("`timesteps` is empty.")
        num_train = self.scheduler.config.num_train_timesteps
        not_integers = [t for t in timesteps if not _is_integer(t)]
        if not_integers:
            raise ValueError(f"`timesteps` must be integers, got {not_integers}.")
        bad = [t for t in timesteps if not 0 <= int(t) < num_train]
        if bad:
            raise ValueError(f"`timesteps` {bad} are outside [0, {num_train}).")
        if feature_dtype not in FEATURE_DTYPES:
            raise ValueError(f"`feature_dtype` must be one of {FEATURE_DTYPES}, got {feature_dtype!r}.")
        if isinstance(num_noise_draws, bool) or not isinstance(num_noise_draws, int) or num_noise_draws < 1:
            raise ValueError(f"`num_noise_draws` must be a positive integer, got {num_noise_draws!r}.")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"`batch_size` must be a positive integer or None, got {batch_size!r}.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise ValueError(f"`seed` must be an integer or None, got {seed!r}.")

    @torch.no_grad()
    def extract(
        self,
        images: torch.Tensor,
        blocks: Sequence[str],
        timesteps: Sequence[int],
        policy: str = "noise",
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        num_noise_draws: int = 1,
        shared_noise: bool = False,
        feature_dtype: torch.dtype = torch.float16,
        batch_size: Optional[int] = None,
        seed: Optional[int] = None,
    ) -> Dict[str, torch.Tensor]:
        """Features of prepared images ``(N, C, H, W)`` in ``[-1, 1]`` (sizes multiples of the UNet's factor).

        Returns ``{block: (N, T, C_block, H / stride, W / stride)}`` in ``feature_dtype``, on the CPU. With ``seed``
        the noise of each image is drawn from (seed, image content, draw), so an image gets the same features wherever
        it sits in a batch (what :func:`diffusers_retina.feature_cache.cached_extract` relies on).
        """
        self.check_extract_inputs(blocks, timesteps, policy, num_noise_draws, feature_dtype, batch_size, seed)
        if seed is not None and generator is None:
            generator = torch.Generator().manual_seed(seed)
        self.block_modules()  # fail early on a UNet without the usual block lists
        device, dtype = self._execution_device, self.unet.dtype
        names = list(dict.fromkeys(blocks))
        steps = torch.tensor([int(t) for t in timesteps], device=device, dtype=torch.long)
        num_images = images.shape[0]
        draws = num_noise_draws if policy == "noise" else 1
        if seed is not None:
            generators = [torch.Generator(device=device).manual_seed(self._noise_seed(seed, images[i], draw,
                                                                                      shared_noise))
                          for i in range(num_images) for draw in range(draws)]
        else:
            generators = per_sample_generators(generator, num_images * draws, device, "image x noise draw")

        batch = images.to(device=device, dtype=dtype)
        if policy == "ddim_inversion":
            result = self._ddim_inversion(batch, [int(t) for t in timesteps], names)
        else:
            sums: Dict[str, torch.Tensor] = {}
            for draw in range(draws):
                noise = None
                if policy == "noise":
                    draw_generators = [generators[i * draws + draw] for i in range(num_images)]
                    noise = self._noise(batch.shape, draw_generators, shared_noise, device, dtype)
                inputs, input_steps = self._inputs(batch, steps, policy, noise)
                chunk = batch_size or inputs.shape[0]
                outputs: Dict[str, List[torch.Tensor]] = {name: [] for name in names}
                for start in range(0, inputs.shape[0], chunk):
                    store: Dict[str, torch.Tensor] = {}
                    self._run_hooked(inputs[start:start + chunk], input_steps[start:start + chunk], names, store)
                    for name in names:
                        outputs[name].append(store[name].float())
                for name in names:
                    stacked = torch.cat(outputs[name])
                    sums[name] = stacked if name not in sums else sums[name] + stacked
            result = {name: (total / draws).reshape(num_images, len(steps), *total.shape[1:])
                      for name, total in sums.items()}
        return {name: result[name].to(feature_dtype).cpu() for name in names}

