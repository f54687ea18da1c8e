"""DiffusionFeaturePipeline: a denoising UNet as a feature extractor (ddpm-segmentation, DiffDGSSv2).

Instead of sampling, the image is put through the UNet at a few timesteps and the activations of chosen blocks are
read with forward hooks: ``down.{i}`` (down block ``i``'s output), ``mid``, ``up.{i}`` (up block ``i``'s output, after its
upsampler) and the finer units inside an up block, ``up.{i}.{j}`` (resnet ``j`` followed by its attention layer when the
block has one) -- the units ddpm-segmentation picks from guided-diffusion's decoder.

What the published code does and this does not: it runs one forward per timestep and upsamples every map to the
full image in float32 (8448 channels per pixel, ~2 GB per 256x256 image). Here all requested timesteps go through
the UNet as one batch, the forward stops right after the last requested block, and features come back at their
native resolution in float16/bfloat16; heads read them where they need them (bilinear reads at pixel coordinates, or
their own upsampling).

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
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.schedulers import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..image_processing import ImageInput, pad_to_multiple, prepare_images
from .checks import check_finite_output
from .loading import RetinaPipelineMixin
from .sampling import per_sample_generators

POLICIES = ("noise", "anchor", "ddim_inversion")
FEATURE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from skimage.data import retina
        >>> from diffusers_retina import DiffusionFeaturePipeline

        >>> pipe = DiffusionFeaturePipeline.from_pretrained("checkpoints/fundus-ddpm-chase")
        >>> print(pipe.describe())  # every hookable block: channels and stride
        >>> out = pipe(retina()[::4, ::4], blocks=["up.1", "up.2"], timesteps=[50, 150, 250], policy="noise",
        ...            generator=torch.Generator().manual_seed(0))
        >>> {name: tuple(f.shape) for name, f in out.features.items()}  # (images, timesteps, C, h, w), float16
        ```
"""


class _StopForward(Exception):
    """Raised by the hook of the last requested block: nothing after it needs computing."""


@dataclass
class DiffusionFeaturePipelineOutput(BaseOutput):
    """Output of [`DiffusionFeaturePipeline`].

    Args:
        features: ``{block: (N, T, C, h, w)}`` at each block's native resolution (``h = H / stride``), in the
            requested dtype; ``T`` follows ``timesteps``. ``None`` when ``output="segmentation"``.
        masks, probabilities, uncertainty: with ``output="segmentation"``, the head's masks ``(N, H, W)``, class
            probabilities ``(N, K, H, W)`` and per-pixel uncertainty ``(N, H, W)``; else ``None``.
        field_of_view: with ``output="segmentation"`` and a field of view in use, the bool ``(N, H, W)`` mask the
            prediction was restricted to (outside it: background with probability 1, uncertainty 0); else ``None``.
    """

    features: Optional[Dict[str, torch.Tensor]] = None
    masks: Optional[torch.Tensor] = None
    probabilities: Optional[torch.Tensor] = None
    uncertainty: Optional[torch.Tensor] = None
    field_of_view: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        # diffusers' BaseOutput unpacks a lone dict in the first field into the output's own keys (``out[0]`` would
        # be one block's tensor and ``out["features"]`` a KeyError): keep every set field under its name instead
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None:
                self[field.name] = value


def _is_integer(value) -> bool:
    """An integer timestep: a Python / numpy integer or an integer scalar tensor (``bool`` is not one)."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_floating_point() and value.dtype != torch.bool
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _public_config(config) -> List[tuple]:
    """A config's entries without the private ones (``_name_or_path`` and the like), sorted: what a cache key hashes."""
    return sorted((key, value) for key, value in config.items() if not key.startswith("_"))


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


class DiffusionFeaturePipeline(RetinaPipelineMixin, DiffusionPipeline):
    r"""Read multi-scale, multi-timestep features out of a denoising ``UNet2DModel`` and (optionally) segment with a
    head trained on them.

    Args:
        unet: any ``UNet2DModel`` (e.g. an unconditional fundus DDPM, or a Hub DDPM).
        scheduler: the noise schedule used to noise (``"noise"``) or invert (``"ddim_inversion"``) the image.
        head: optional segmentation head (``PixelMLPEnsemble`` or ``FreqAggHead``) trained on this pipeline's
            features; its config names the blocks, timesteps and policy it was trained with.
    """

    model_cpu_offload_seq = "unet->head"
    _optional_components = ["head"]

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin, head: Optional[torch.nn.Module] = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, head=head)

    def set_head(self, head: Optional[torch.nn.Module]) -> None:
        """Attach (or remove) a trained head so that ``save_pretrained`` stores it. (Plain attribute assignment of a
        component that was ``None`` is not recorded in ``model_index.json`` by diffusers.)"""
        self.register_modules(head=head)

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

    # ------------------------------------------------------------------ cache
    def weights_digest(self) -> str:
        """SHA-256 of the UNet's config and weights. Computed afresh for every cached extraction (a few ms per MB of
        weights), so weights changed in place can never reuse features of the old ones. Private config entries
        (``_name_or_path``, ``_diffusers_version``, ...) are left out: the same weights loaded from another folder
        (e.g. each head trained on one DDPM) share their features."""
        digest = hashlib.sha256(repr(_public_config(self.unet.config)).encode())
        for name, tensor in sorted(self.unet.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def cache_key(self, image: torch.Tensor, blocks, timesteps, policy, seed, dtype, num_noise_draws,
                  shared_noise, weights_digest: Optional[str] = None) -> str:
        """The cache file name of one image's features: a hash of everything they depend on."""
        digest = hashlib.sha256()
        digest.update(image.detach().cpu().float().contiguous().numpy().tobytes())
        digest.update(str(tuple(image.shape)).encode())
        digest.update((weights_digest or self.weights_digest()).encode())
        digest.update(repr((list(blocks), [int(t) for t in timesteps], policy, seed, str(dtype), num_noise_draws,
                            shared_noise, type(self.scheduler).__name__,
                            _public_config(self.scheduler.config))).encode())
        return digest.hexdigest()

    @staticmethod
    def _read_cache(path: Path) -> Optional[Dict[str, torch.Tensor]]:
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        return load_file(str(path))

    @staticmethod
    def _write_cache(path: Path, features: Dict[str, torch.Tensor]) -> None:
        """Atomic: a temporary file in the same folder, then ``os.replace``."""
        from safetensors.torch import save

        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            temporary.write_bytes(save({k: v.contiguous() for k, v in features.items()}))
            os.replace(temporary, path)
        finally:
            if temporary.exists():
                temporary.unlink()

    @staticmethod
    def _noise_seed(seed: int, image: torch.Tensor, draw: int, shared: bool) -> int:
        digest = hashlib.sha256(repr((seed, draw)).encode())
        if not shared:
            digest.update(image.detach().cpu().float().contiguous().numpy().tobytes())
        return int(digest.hexdigest()[:15], 16)

    # ------------------------------------------------------------------ extraction
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
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        seed: Optional[int] = None,
    ) -> Dict[str, torch.Tensor]:
        """Features of prepared images ``(N, C, H, W)`` in ``[-1, 1]`` (sizes multiples of the UNet's factor).

        Returns ``{block: (N, T, C_block, H / stride, W / stride)}`` in ``feature_dtype``. With ``cache_dir``, each
        image's features are stored under a key of (image, weights, blocks, timesteps, policy, ``seed``, dtype, noise
        settings); a cache needs ``seed`` (a generator's state cannot be keyed) unless the policy is deterministic.
        """
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
        if cache_dir is not None and policy == "noise" and seed is None:
            raise ValueError("A feature cache with policy='noise' needs `seed` (the noise must be part of the key).")
        if seed is not None and generator is None:
            generator = torch.Generator().manual_seed(seed)
        self.block_modules()  # fail early on a UNet without the usual block lists
        device, dtype = self._execution_device, self.unet.dtype
        names = list(dict.fromkeys(blocks))
        steps = torch.tensor([int(t) for t in timesteps], device=device, dtype=torch.long)
        num_images = images.shape[0]
        draws = num_noise_draws if policy == "noise" else 1
        if seed is not None:
            # noise from (seed, image content, draw): the same image gets the same noise wherever it sits in a batch,
            # which is what makes cached features reusable
            generators = [torch.Generator(device=device).manual_seed(self._noise_seed(seed, images[i], draw,
                                                                                      shared_noise))
                          for i in range(num_images) for draw in range(draws)]
        else:
            generators = per_sample_generators(generator, num_images * draws, device, "image x noise draw")

        cached: Dict[int, Dict[str, torch.Tensor]] = {}
        keys: Dict[int, str] = {}
        if cache_dir is not None:
            weights = self.weights_digest()
            for index in range(num_images):
                keys[index] = self.cache_key(images[index], names, timesteps, policy, seed, feature_dtype, draws,
                                             shared_noise, weights)
                hit = self._read_cache(Path(cache_dir) / f"{keys[index]}.safetensors")
                if hit is not None:
                    cached[index] = hit

        todo = [i for i in range(num_images) if i not in cached]
        computed: Dict[int, Dict[str, torch.Tensor]] = {}
        if todo:
            batch = images[todo].to(device=device, dtype=dtype)
            if policy == "ddim_inversion":
                result = self._ddim_inversion(batch, [int(t) for t in timesteps], names)
            else:
                sums: Dict[str, torch.Tensor] = {}
                for draw in range(draws):
                    noise = None
                    if policy == "noise":
                        draw_generators = [generators[i * draws + draw] for i in todo]
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
                result = {name: (total / draws).reshape(len(todo), len(steps), *total.shape[1:])
                          for name, total in sums.items()}
            for position, index in enumerate(todo):
                computed[index] = {name: result[name][position].to(feature_dtype).cpu() for name in names}
                if cache_dir is not None:
                    self._write_cache(Path(cache_dir) / f"{keys[index]}.safetensors", computed[index])
        per_image = [cached.get(i) or computed[i] for i in range(num_images)]
        return {name: torch.stack([features[name] for features in per_image]) for name in names}

    # ------------------------------------------------------------------ call
    @staticmethod
    def _field_of_view(field_of_view, images: torch.Tensor) -> Optional[torch.Tensor]:
        """The ``field_of_view`` argument as a bool ``(N, H, W)`` tensor (or ``None``), checked against ``images``."""
        if field_of_view is None or field_of_view is False:
            return None
        if isinstance(field_of_view, str):
            if field_of_view != "auto":
                raise ValueError(f"`field_of_view` must be 'auto', a bool mask or False, got {field_of_view!r}.")
            from ..data.modality import field_of_view_masks

            return field_of_view_masks(images).cpu()
        if field_of_view is True:
            raise ValueError("`field_of_view=True` is ambiguous: pass 'auto' to compute it, or a bool mask.")
        mask = torch.as_tensor(np.asarray(field_of_view) if not isinstance(field_of_view, torch.Tensor)
                               else field_of_view).cpu()
        if mask.dtype != torch.bool:
            raise ValueError(f"`field_of_view` must be a bool mask, got dtype {mask.dtype}.")
        if mask.ndim == 2:
            mask = mask[None].expand(images.shape[0], -1, -1)
        expected = (images.shape[0], *images.shape[-2:])
        if tuple(mask.shape) != expected:
            raise ValueError(f"`field_of_view` must have shape (H, W) or (N, H, W) = {expected}, got "
                             f"{tuple(field_of_view.shape)}.")
        return mask

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput,
        blocks: Optional[Sequence[str]] = None,
        timesteps: Optional[Sequence[int]] = None,
        policy: Optional[str] = None,
        output: str = "features",
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        num_noise_draws: int = 1,
        shared_noise: bool = False,
        feature_dtype: torch.dtype = torch.float16,
        batch_size: Optional[int] = None,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        seed: Optional[int] = None,
        tile_size: Optional[int] = None,
        tile_overlap: float = 0.25,
        field_of_view: Union[str, bool, np.ndarray, torch.Tensor, None] = "auto",
        return_dict: bool = True,
    ) -> Union[DiffusionFeaturePipelineOutput, tuple]:
        r"""Extract features, or segment with the head.

        Args:
            image: PIL image(s) (8-bit, and 16-bit / float modes ``I;16`` / ``F`` read like the data loaders read
                files), numpy array(s) (``HWC``, uint8, uint16 or float in [0, 1]) or a float tensor (``CHW``/``NCHW``
                in [0, 1], diffusers' convention; a tensor with negative values is read as [-1, 1] with a warning);
                any size up to the pixel cap (64 megapixels; ``DIFFUSERS_RETINA_MAX_PIXELS``), reflect-padded to the
                UNet's factor (features cover the padded image). ``extract`` takes prepared ``[-1, 1]`` tensors.
            blocks: block names (``describe()`` lists them); default: the head's, else ``default_blocks()``
                (``["up.1", "up.2"]``, or the two finest up blocks of a UNet with fewer levels).
            timesteps: timesteps in ``[0, num_train_timesteps)``; default: the head's, else ``[50, 150, 250]``.
            policy: ``"noise"``, ``"anchor"`` or ``"ddim_inversion"``; default: the head's, else ``"noise"``.
            output: ``"features"`` or ``"segmentation"`` (needs a head).
            generator: noise for ``"noise"`` (a generator, or one per image x noise draw; a single generator for one
                image and one draw is used as given, so ``g`` and ``[g]`` agree, as in diffusers).
            num_noise_draws: average the features over this many noise draws (``"noise"``).
            shared_noise: one noise for all images (ddpm-segmentation's fixed noise).
            feature_dtype: ``torch.float16`` (default), ``torch.bfloat16`` or ``torch.float32``.
            batch_size: (image, timestep) pairs per UNet pass; default all at once.
            cache_dir: keep features on disk keyed by image, weights and settings; a hit skips the UNet.
            seed: seeds the noise when no generator is given; part of the cache key.
            tile_size: with ``output="segmentation"``, segment images larger than this in overlapping windows (features
                and head per window, probabilities and uncertainty blended with a Gaussian; MONAI
                ``sliding_window_inference``) -- e.g. a 999x960 photograph with a UNet trained on small patches.
            tile_overlap: overlap of neighbouring windows as a fraction of ``tile_size``.
            field_of_view: with ``output="segmentation"``, where the retina is: ``"auto"`` (default) finds the
                circular field of view of each photograph the way retinal tools do (the dark surround thresholded,
                ``diffusers_retina.data.modality.field_of_view_mask``; an image without a dark surround, such as a
                crop inside the retina, is all field of view), a bool mask ``(H, W)`` or ``(N, H, W)`` gives it, and
                ``False``/``None`` uses none. Outside it the prediction is background (probability 1, uncertainty
                0), and before the UNet sees the image the outside is filled with the mean colour of the field of
                view: the UNet's group normalisation pools over each window, and a window holding part of the black
                surround shifted the features of the whole window (whole tiles of false vessels around the retina).
            return_dict: return a [`DiffusionFeaturePipelineOutput`] instead of a tuple.

        Examples:
        """
        head_config = self.head.config if self.head is not None else {}
        blocks = list(blocks or head_config.get("blocks") or self.default_blocks())
        timesteps = list(timesteps or head_config.get("timesteps") or [50, 150, 250])
        policy = policy or head_config.get("policy") or "noise"
        if output not in ("features", "segmentation"):
            raise ValueError(f"`output` must be 'features' or 'segmentation', got {output!r}.")
        if output == "segmentation" and self.head is None:
            raise ValueError("`output='segmentation'` needs a head: train one with training/train_feature_head.py.")
        if tile_size is not None:
            if output != "segmentation":
                raise ValueError("`tile_size` applies to output='segmentation' (features of a tiled image would not "
                                 "form one map); extract features of crops instead.")
            if tile_size < self.size_multiple or tile_size % self.size_multiple:
                raise ValueError(f"`tile_size` must be a positive multiple of {self.size_multiple}, got {tile_size!r}.")
            if not 0.0 <= tile_overlap < 1.0:
                raise ValueError(f"`tile_overlap` is a fraction of the tile in [0, 1), got {tile_overlap!r}.")
        images = prepare_images(image, self.unet.config.in_channels)
        fov = self._field_of_view(field_of_view, images) if output == "segmentation" else None
        if fov is not None:  # the black surround would shift the group-norm statistics of every window holding it
            from ..data.modality import fill_outside_field_of_view

            images = fill_outside_field_of_view(images, fov)
        images, (height, width) = pad_to_multiple(images, self.size_multiple)
        extract_kwargs = dict(blocks=blocks, timesteps=timesteps, policy=policy, generator=generator,
                              num_noise_draws=num_noise_draws, shared_noise=shared_noise, feature_dtype=feature_dtype,
                              batch_size=batch_size, cache_dir=cache_dir, seed=seed)
        if output == "features":
            features = self.extract(images, **extract_kwargs)
            for name, maps in features.items():
                check_finite_output(maps, f"The features of block {name!r}", hint=f"unet dtype {self.unet.dtype}, "
                                    f"feature_dtype {feature_dtype} (float16 overflows above 65504)")
            result = DiffusionFeaturePipelineOutput(features=features)
        else:
            head_device = next(self.head.parameters()).device

            def segment(windows: torch.Tensor) -> torch.Tensor:
                """Probabilities and uncertainty of image windows, as channels (so windows can be blended)."""
                features = self.extract(windows, **extract_kwargs)
                prediction = self.head.predict({k: v.to(head_device) for k, v in features.items()},
                                               size=tuple(windows.shape[-2:]))
                return torch.cat([prediction["probabilities"], prediction["uncertainty"][:, None]], dim=1).cpu()

            if tile_size is None or max(images.shape[-2:]) <= tile_size:
                maps = segment(images)
            else:
                from monai.inferers import sliding_window_inference

                roi = (min(tile_size, images.shape[-2]), min(tile_size, images.shape[-1]))
                maps = sliding_window_inference(images, roi_size=roi, sw_batch_size=1, predictor=segment,
                                                overlap=tile_overlap, mode="gaussian", progress=False)
            check_finite_output(maps, "The head's probabilities and uncertainty",
                                hint=f"unet dtype {self.unet.dtype}, head dtype {self.head.dtype}")
            probabilities, uncertainty = maps[:, :-1, :height, :width], maps[:, -1, :height, :width]
            if fov is not None:
                outside = ~fov.to(probabilities.device)[:, None]
                background = torch.zeros_like(probabilities)
                background[:, 0] = 1
                probabilities = torch.where(outside, background, probabilities)
                uncertainty = uncertainty.masked_fill(outside[:, 0], 0)
            result = DiffusionFeaturePipelineOutput(masks=probabilities.argmax(dim=1), probabilities=probabilities,
                                                    uncertainty=uncertainty, field_of_view=fov)
        self.maybe_free_model_hooks()
        if not return_dict:
            return tuple(v for v in (result.features, result.masks, result.probabilities, result.uncertainty)
                         if v is not None)
        return result


DiffusionFeaturePipeline.__call__.__doc__ = DiffusionFeaturePipeline.__call__.__doc__.replace(
    "        Examples:\n", "        Examples:\n" + EXAMPLE_DOC_STRING, 1
)
