"""Mask2ImagePipeline: vessel mask -> realistic fundus photograph (ReTree), with classifier-free guidance and an
optional unconditional mask model for two-stage mask + image generation.

The image denoiser is a `ConditionalUNet2DModel` (conditioning by concatenation, SPADE or both, and a learned null
condition); the optional ``mask_unet`` is a stock ``UNet2DModel`` trained on vessel masks alone, so ``mask=None``
first samples masks and then paints images for them (ReTree's synthetic image-mask pairs).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers import SchedulerMixin
from diffusers.utils import BaseOutput, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

from ...image_processing import (
    MaskInput,
    RetinaImageProcessor,
    diffusion_to_probabilities,
    mask_to_diffusion,
    pad_to_multiple,
    prepare_masks,
)
from ...models import ConditionalUNet2DModel
from ..checks import check_finite_output, check_guidance_scale, check_num_inference_steps
from ..pipeline_utils import RetinaPipelineMixin
from ..sampling import (
    check_common_inputs,
    per_sample_generators,
    sample_chunks,
    samples_per_call,
    step_accepts_generator,
    tiled_predict,
    window_pixels,
)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from PIL import Image
        >>> from diffusers import DPMSolverMultistepScheduler
        >>> from diffusers_retina import Mask2ImagePipeline

        >>> pipe = Mask2ImagePipeline.from_pretrained("checkpoints/mask2image-chase")
        >>> pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # any diffusers scheduler
        >>> mask = Image.open("vessels.png")  # binary vessel mask (0/255)
        >>> out = pipe(mask, num_inference_steps=25, guidance_scale=1.5, num_images_per_mask=2,
        ...            generator=torch.Generator().manual_seed(0))
        >>> out.images[0].save("synthetic_fundus.png")
        >>> pairs = pipe(num_masks=4, height=128, width=128, generator=torch.Generator().manual_seed(1))  # masks too
        ```
"""


@dataclass
class Mask2ImagePipelineOutput(BaseOutput):
    """Output of [`Mask2ImagePipeline`].

    Args:
        images: synthetic images. ``pil``: list of RGB images; ``np``: ``(N, H, W, C)`` in ``[0, 1]``; ``pt``:
            ``(N, C, H, W)`` in ``[0, 1]``. Ordered mask-major: the ``num_images_per_mask`` images of mask 0 first.
        masks: the mask of each image as class indices (binary: 0/1; soft input masks thresholded at 0.5).
            ``pil``: list of "L" images (binary as 0/255); ``np``/``pt``: ``(N, H, W)``.
    """

    images: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]
    masks: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]


class Mask2ImagePipeline(RetinaPipelineMixin, DiffusionPipeline):
    r"""Mask-conditioned image synthesis (ReTree) with classifier-free guidance, optionally two-stage.

    Args:
        unet: a `ConditionalUNet2DModel` (``conditioning`` = concat / spade / concat+spade).
        scheduler: any diffusers scheduler for the image.
        mask_unet: optional unconditional ``UNet2DModel`` over masks (1 channel binary, ``K`` one-hot channels),
            used when ``mask=None``.
        mask_scheduler: the scheduler of ``mask_unet``.
    """

    model_cpu_offload_seq = "mask_unet->unet"
    _optional_components = ["mask_unet", "mask_scheduler"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        unet: ConditionalUNet2DModel,
        scheduler: SchedulerMixin,
        mask_unet: Optional[UNet2DModel] = None,
        mask_scheduler: Optional[SchedulerMixin] = None,
    ):
        super().__init__()
        if (mask_unet is None) != (mask_scheduler is None):
            raise ValueError("Give `mask_unet` and `mask_scheduler` together (or neither).")
        self.register_modules(unet=unet, scheduler=scheduler, mask_unet=mask_unet, mask_scheduler=mask_scheduler)
        self.image_processor = RetinaImageProcessor(size_multiple=self.size_multiple)

    # ------------------------------------------------------------------ model facts
    @property
    def mask_channels(self) -> int:
        return self.unet.config.mask_channels

    @property
    def num_classes(self) -> int:
        return 2 if self.mask_channels == 1 else self.mask_channels

    @property
    def size_multiple(self) -> int:
        return self.unet.size_multiple

    @property
    def guidance_scale(self) -> float:
        """The classifier-free guidance scale of the running call; a step callback may change
        ``pipe._guidance_scale`` (e.g. to 1.0 to stop guiding), read at every denoiser call."""
        return getattr(self, "_guidance_scale", 1.0)

    # ------------------------------------------------------------------ helpers
    def check_inputs(self, mask, num_masks, height, width, num_images_per_mask, guidance_scale, batch_size, tile_size,
                     tile_overlap, output_type, callback_on_step_end_tensor_inputs, num_inference_steps=1,
                     mask_num_inference_steps=None):
        if isinstance(num_images_per_mask, bool) or not isinstance(num_images_per_mask, int) or num_images_per_mask < 1:
            raise ValueError(f"`num_images_per_mask` must be a positive integer, got {num_images_per_mask!r}.")
        check_num_inference_steps(num_inference_steps)
        check_num_inference_steps(mask_num_inference_steps, "mask_num_inference_steps", allow_none=True)
        check_guidance_scale(guidance_scale)
        if mask is None:
            if self.mask_unet is None:
                raise ValueError("`mask` is None and this pipeline has no `mask_unet` to sample masks: pass masks, or "
                                 "load a pipeline with a mask model.")
            if self.mask_unet.config.out_channels != self.mask_channels:
                raise ValueError(f"`mask_unet` makes {self.mask_unet.config.out_channels} channels but `unet` is "
                                 f"conditioned on {self.mask_channels}.")
            if not isinstance(num_masks, int) or num_masks < 1:
                raise ValueError(f"`num_masks` must be a positive integer, got {num_masks!r}.")
            for name, value in (("height", height), ("width", width)):
                if value is not None and (not isinstance(value, int) or value < 1):
                    raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if output_type == "latent" and mask is None:
            raise ValueError("`output_type='latent'` returns the image latents of given masks; with `mask=None` use "
                             "'pt' (the sampled masks are part of the output).")
        check_common_inputs(self.size_multiple, batch_size, tile_size, tile_overlap,
                            "pt" if output_type == "latent" else output_type,
                            callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)

    def _denoise(self, unet_forward, scheduler, shape, generators, num_inference_steps, device, dtype, progress_bar,
                 callback=None, callback_tensor_inputs=()):
        """The sampling loop shared by masks and images: ``unet_forward(latent_model_input, t) -> model output``."""
        scheduler.set_timesteps(num_inference_steps, device=device)
        latents = randn_tensor(shape, generator=generators, device=device, dtype=dtype) * scheduler.init_noise_sigma
        step_kwargs = {"generator": generators} if step_accepts_generator(scheduler) else {}
        for step_index, t in enumerate(scheduler.timesteps):
            if callback is not None and self.interrupt:  # set by a step callback: skip the remaining image steps
                progress_bar.update()
                continue
            model_output = unet_forward(scheduler.scale_model_input(latents, t), t)
            latents = scheduler.step(model_output, t, latents, return_dict=False, **step_kwargs)[0]
            if callback is not None:
                callback_kwargs = {}
                for name in callback_tensor_inputs:
                    callback_kwargs[name] = locals()[name]
                callback_outputs = callback(self, step_index, t, callback_kwargs)
                latents = callback_outputs.pop("latents", latents)
            progress_bar.update()
        return latents

    def sample_masks(self, num_masks: int, height: int, width: int, num_inference_steps: int,
                     generators: List[torch.Generator], batch_size: Union[int, str, None] = None) -> torch.Tensor:
        """Sample ``num_masks`` hard masks with ``mask_unet``; returns diffusion space ``(N, C, height, width)``."""
        device, dtype = self._execution_device, self.mask_unet.dtype
        multiple = 2 ** (len(self.mask_unet.config.block_out_channels) - 1)
        padded = (height + (-height) % multiple, width + (-width) % multiple)
        channels = self.mask_unet.config.out_channels
        chunks = sample_chunks(num_masks, samples_per_call(batch_size, num_masks, padded[0] * padded[1], device, dtype))
        samples = []
        self.mask_scheduler.set_timesteps(num_inference_steps, device=device)  # Heun & co. take more than one per step
        with self.progress_bar(total=len(chunks) * len(self.mask_scheduler.timesteps)) as progress_bar:
            for chunk in chunks:
                samples.append(self._denoise(
                    lambda x, t: self.mask_unet(x, t, return_dict=False)[0][:, :channels], self.mask_scheduler,
                    (len(chunk), channels, *padded), [generators[i] for i in chunk], num_inference_steps, device,
                    dtype, progress_bar,
                )[..., :height, :width].float())
        samples = torch.cat(samples)
        check_finite_output(samples, "The masks sampled by `mask_unet`")
        probabilities = diffusion_to_probabilities(samples)
        indices = (probabilities[:, 0] > 0.5).long() if channels == 1 else probabilities.argmax(dim=1)
        return mask_to_diffusion(indices, self.num_classes)

    # ------------------------------------------------------------------ call
    def _guided_prediction(self, window: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The denoiser on ``[latents | condition]`` channels (so tiles carry their own condition), with
        classifier-free guidance at ``self.guidance_scale`` (read per call: step callbacks may change it)."""
        image_channels = self.unet.config.in_channels
        latents_in, segmap = window[:, :image_channels], window[:, image_channels:]
        guidance_scale = self.guidance_scale
        if guidance_scale == 1.0:
            return self.unet(latents_in, t, mask=segmap, return_dict=False)[0]
        if guidance_scale == 0.0:
            return self.unet(latents_in, t, mask=None, return_dict=False)[0]
        null = self.unet.condition(None, None, len(segmap), tuple(segmap.shape[-2:]), window.dtype, window.device)
        both = self.unet(torch.cat([latents_in, latents_in]), t, mask=torch.cat([segmap, null]), return_dict=False)[0]
        conditional, unconditional = both.chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    def _conditioned_prediction(self, latents_in: torch.Tensor, t: torch.Tensor, condition: torch.Tensor,
                                tile_size: Optional[int], tile_overlap: float) -> torch.Tensor:
        """One denoiser step over the whole image, tiled by ``tile_size``, each tile with its piece of ``condition``."""
        model_input = torch.cat([latents_in, condition], dim=1)
        return tiled_predict(functools.partial(self._guided_prediction, t=t), model_input, tile_size, tile_overlap)

    def _prepare_masks(self, mask: Optional[MaskInput], num_masks: int, num_images_per_mask: int,
                       height: Optional[int], width: Optional[int], generator, mask_num_inference_steps: int,
                       batch_size, device, dtype) -> Tuple[torch.Tensor, List[torch.Generator]]:
        """The masks to paint, repeated ``num_images_per_mask`` times (given, or sampled by the mask model with their
        own generators first), and one generator per image."""
        if mask is not None:
            masks = prepare_masks(mask, self.num_classes)
            num_given = masks.shape[0]
        else:
            num_given = num_masks
        num_images = num_given * num_images_per_mask
        # one generator per sampled mask (mask=None), then one per image; a single generator is split into all
        num_sampled = 0 if mask is not None else num_masks
        all_generators = per_sample_generators(
            generator, num_sampled + num_images, device,
            "image (masks x num_images_per_mask)" if mask is not None else
            "sampled mask and image (num_masks + num_masks x num_images_per_mask, masks first)",
        )
        mask_generators, generators = all_generators[:num_sampled], all_generators[num_sampled:]
        if mask is None:
            sample_size = self.mask_unet.config.sample_size
            sample_size = sample_size if isinstance(sample_size, (list, tuple)) else (sample_size, sample_size)
            masks = self.sample_masks(num_masks, height or sample_size[0], width or sample_size[1],
                                      mask_num_inference_steps, mask_generators, batch_size)
        masks = masks.repeat_interleave(num_images_per_mask, dim=0).to(device=device, dtype=dtype)
        return masks, generators

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        mask: Optional[MaskInput] = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        num_images_per_mask: int = 1,
        num_masks: int = 1,
        height: Optional[int] = None,
        width: Optional[int] = None,
        mask_num_inference_steps: Optional[int] = None,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        batch_size: Union[int, str, None] = None,
        tile_size: Optional[int] = None,
        tile_overlap: float = 0.25,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[
            Union[Callable[[Any, int, int, Dict], Dict], PipelineCallback, MultiPipelineCallbacks]
        ] = None,
        callback_on_step_end_tensor_inputs: Optional[List[str]] = None,
    ) -> Union[Mask2ImagePipelineOutput, tuple]:
        r"""Paint images from masks (or from masks sampled by ``mask_unet`` when ``mask`` is None).

        Args:
            mask: PIL image(s), numpy array(s) (``HW``/``NHW``) or a tensor: binary masks (0/1, 0/255, or float
                probabilities in [0, 1] for soft masks) or ``K``-class index masks (``NCHW`` float tensors of class
                probabilities for soft ``K``-class masks). Any size up to the pixel cap (64 megapixels;
                ``DIFFUSERS_RETINA_MAX_PIXELS``): padded (reflect) and cropped back.
            num_inference_steps: denoising steps of the image scheduler.
            guidance_scale: classifier-free guidance ``uncond + s * (cond - uncond)`` with the learned null condition;
                1 runs the conditional model only (no extra cost), 0 the unconditional one.
            num_images_per_mask: images painted per mask (different noise).
            num_masks: with ``mask=None``, how many masks ``mask_unet`` samples.
            height, width: with ``mask=None``, the size of the sampled masks (default: ``mask_unet``'s sample size).
            mask_num_inference_steps: steps of the mask scheduler (default ``num_inference_steps``).
            generator: a ``torch.Generator`` or a list with one per image (masks x ``num_images_per_mask``,
                mask-major); with ``mask=None``, one per sampled mask first, then one per image. A single generator
                for several samples is split into one per sample, so results do not depend on ``batch_size``; for
                one sample (one mask, one image) it is used as given, so ``g`` and ``[g]`` agree, as in diffusers.
            batch_size: images denoised together (default all; ``"auto"``: all on an accelerator, on a CPU as many
                as keep one denoiser call within 48k float32 pixels, 96k in half precision, with guidance each counting
                twice). Same output either way.
            tile_size: run the denoiser on overlapping ``tile_size`` windows blended with a Gaussian (for images larger
                than the training size, e.g. 999x960 CHASE_DB1 masks). A multiple of the UNet's factor.
            tile_overlap: overlap of neighbouring windows as a fraction of the tile.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (the denoised ``(N, C, H, W)`` latents in the
                model's [-1, 1] space, unclamped; masks as a ``pt`` tensor).
            return_dict: return a [`Mask2ImagePipelineOutput`] instead of a tuple ``(images, masks)``.
            callback_on_step_end: called after every image denoising step as ``callback(pipe, step, timestep,
                callback_kwargs)``; may return ``{"latents": ...}`` to replace the current batch's latents, read
                ``pipe.guidance_scale`` / ``pipe.num_timesteps``, change ``pipe._guidance_scale`` or set
                ``pipe._interrupt = True`` to skip the remaining steps.
            callback_on_step_end_tensor_inputs: tensors passed in ``callback_kwargs`` (``["latents"]``).

        Examples:
        """
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 1. Check inputs
        self.check_inputs(mask, num_masks, height, width, num_images_per_mask, guidance_scale, batch_size, tile_size,
                          tile_overlap, output_type, callback_on_step_end_tensor_inputs, num_inference_steps,
                          mask_num_inference_steps)
        device, dtype = self._execution_device, self.unet.dtype
        self._guidance_scale = float(guidance_scale)
        self._interrupt = False

        # 2. Masks: given (validated, to diffusion space) or sampled by the mask model; one generator per image
        masks, generators = self._prepare_masks(mask, num_masks, num_images_per_mask, height, width, generator,
                                                mask_num_inference_steps or num_inference_steps, batch_size, device,
                                                dtype)
        num_images = masks.shape[0]
        masks, (out_height, out_width) = pad_to_multiple(masks, self.size_multiple)
        image_channels = self.unet.config.in_channels
        do_guidance = guidance_scale != 1.0  # sizes the batches; a callback may still change the scale per step

        # 3. Denoise the images chunk by chunk
        pixels = window_pixels(*masks.shape[-2:], tile_size) * (2 if do_guidance else 1)
        chunks = sample_chunks(num_images, samples_per_call(batch_size, num_images, pixels, device, dtype))
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self._num_timesteps = len(self.scheduler.timesteps)
        images = []
        with self.progress_bar(total=len(chunks) * self._num_timesteps) as progress_bar:
            for chunk in chunks:
                index = list(chunk)
                unet_forward = functools.partial(self._conditioned_prediction, condition=masks[index],
                                                 tile_size=tile_size, tile_overlap=tile_overlap)
                latents = self._denoise(
                    unet_forward, self.scheduler, (len(index), image_channels, *masks.shape[-2:]),
                    [generators[i] for i in index], num_inference_steps, device, dtype, progress_bar,
                    callback_on_step_end, callback_on_step_end_tensor_inputs,
                )
                images.append(latents[..., :out_height, :out_width].float())
        self.maybe_free_model_hooks()

        # 4. Post-process (NaN from damaged weights or a half-precision overflow is an error, not a black image)
        latents = torch.cat(images)
        check_finite_output(latents, "The images of Mask2ImagePipeline", hint=f"unet dtype {dtype}")
        probabilities = diffusion_to_probabilities(masks[..., :out_height, :out_width].float())
        mask_indices = (probabilities[:, 0] > 0.5).long() if self.mask_channels == 1 else probabilities.argmax(dim=1)
        if output_type == "latent":  # the denoised latents (image space in [-1, 1], unclamped), like diffusers
            images, mask_indices = latents.cpu(), mask_indices.cpu()
        else:
            images = self.image_processor.postprocess((latents.clamp(-1, 1) + 1) / 2, output_type)
            mask_indices = self.image_processor.postprocess_masks(mask_indices, self.num_classes, output_type)
        if not return_dict:
            return images, mask_indices
        return Mask2ImagePipelineOutput(images=images, masks=mask_indices)
