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

The pipeline does two things, each in its own method: ``extract_features`` (``output="features"``) returns the maps,
``segment`` (``output="segmentation"``) runs a trained head on them over the photograph (or over blended windows),
restricted to its field of view. The extraction itself (blocks, hooks, input policies, cache) is
:mod:`.feature_extraction`.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.schedulers import SchedulerMixin
from diffusers.utils import BaseOutput, replace_example_docstring

from ...image_processing import (
    ImageInput,
    ProcessingPlan,
    RetinaImageProcessor,
    check_field_of_view_degrees,
    check_processing_resolution,
    field_of_view_masks,
    fill_outside_field_of_view,
    pad_to_multiple,
    prepare_images,
)
from ..checks import auto_processing_diameter, check_field_of_view_diameter, check_finite_output
from ..pipeline_utils import RetinaPipelineMixin
from ..sampling import blend_windows, per_sample_generators, processing_groups
from ...feature_cache import cached_extract
from .feature_extraction import FeatureExtractionMixin

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
        processing: with ``output="segmentation"``, one :class:`~diffusers_retina.image_processing.ProcessingPlan`
            per image (the size it was segmented at, ``processing_resolution``); else ``None``.
    """

    features: Optional[Dict[str, torch.Tensor]] = None
    masks: Optional[torch.Tensor] = None
    probabilities: Optional[torch.Tensor] = None
    uncertainty: Optional[torch.Tensor] = None
    field_of_view: Optional[torch.Tensor] = None
    processing: Optional[List[ProcessingPlan]] = None

    def __post_init__(self) -> None:
        # diffusers' BaseOutput unpacks a lone dict in the first field into the output's own keys (``out[0]`` would
        # be one block's tensor and ``out["features"]`` a KeyError): keep every set field under its name instead
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None:
                self[field.name] = value


class DiffusionFeaturePipeline(FeatureExtractionMixin, RetinaPipelineMixin, DiffusionPipeline):
    r"""Read multi-scale, multi-timestep features out of a denoising ``UNet2DModel`` and (optionally) segment with a
    head trained on them.

    Args:
        unet: any ``UNet2DModel`` (e.g. an unconditional fundus DDPM, or a Hub DDPM).
        scheduler: the noise schedule used to noise (``"noise"``) or invert (``"ddim_inversion"``) the image.
        head: optional segmentation head (``PixelMLPEnsemble`` or ``FreqAggHead``) trained on this pipeline's
            features; its config names the blocks, timesteps and policy it was trained with.
        field_of_view_diameter: the field-of-view diameter, in pixels, of the photographs the head learnt from
            (``processing_resolution="auto"`` brings every photograph to it); None: unknown.
        field_of_view_degrees: the field-of-view angle of those photographs (30 for CHASE_DB1; a call's
            ``camera_degrees`` then matches pixels per degree); None: unknown.
    """

    model_cpu_offload_seq = "unet->head"
    _optional_components = ["head"]

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin, head: Optional[torch.nn.Module] = None,
                 field_of_view_diameter: Optional[int] = None, field_of_view_degrees: Optional[float] = None):
        super().__init__()
        check_field_of_view_diameter(field_of_view_diameter)
        check_field_of_view_degrees(field_of_view_degrees)
        self.register_modules(unet=unet, scheduler=scheduler, head=head)
        self.register_to_config(field_of_view_diameter=field_of_view_diameter,
                                field_of_view_degrees=field_of_view_degrees)
        self.image_processor = RetinaImageProcessor(size_multiple=self.size_multiple)

    def set_head(self, head: Optional[torch.nn.Module]) -> None:
        """Attach (or remove) a trained head so that ``save_pretrained`` stores it. (Plain attribute assignment of a
        component that was ``None`` is not recorded in ``model_index.json`` by diffusers.)"""
        self.register_modules(head=head)

    # ------------------------------------------------------------------ call
    @staticmethod
    def _field_of_view(field_of_view, images: torch.Tensor) -> Optional[torch.Tensor]:
        """The ``field_of_view`` argument as a bool ``(N, H, W)`` tensor (or ``None``), checked against ``images``."""
        if field_of_view is None or field_of_view is False:
            return None
        if isinstance(field_of_view, str):
            if field_of_view != "auto":
                raise ValueError(f"`field_of_view` must be 'auto', a bool mask or False, got {field_of_view!r}.")
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

    def check_inputs(self, output: str, tile_size: Optional[int], tile_overlap: float,
                     processing_resolution: Union[int, str, None] = None) -> None:
        """The task, tiling and resolution arguments of :meth:`__call__` (the extraction's are checked by
        ``extract``)."""
        if output not in ("features", "segmentation"):
            raise ValueError(f"`output` must be 'features' or 'segmentation', got {output!r}.")
        check_processing_resolution(processing_resolution)
        if output == "features" and processing_resolution not in (None, "native", "auto"):
            raise ValueError("A `processing_resolution` size applies to output='segmentation' (features come at the "
                             "image's own size); resize the image before extracting features instead.")
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

    def _extract(self, images: torch.Tensor, cache_dir: Optional[Union[str, os.PathLike]] = None,
                 **extract_kwargs: Any) -> Dict[str, torch.Tensor]:
        """:meth:`extract`, or (the deprecated ``cache_dir`` of :meth:`__call__`) the training-side cache around it."""
        if cache_dir is None:
            return self.extract(images, **extract_kwargs)
        return cached_extract(self, images, cache_dir, **extract_kwargs)

    def extract_features(self, images: torch.Tensor, **extract_kwargs: Any) -> DiffusionFeaturePipelineOutput:
        """``output="features"``: the maps of prepared ``images`` (checked finite), as the pipeline's output."""
        features = self._extract(images, **extract_kwargs)
        for name, maps in features.items():
            check_finite_output(maps, f"The features of block {name!r}", hint=f"unet dtype {self.unet.dtype}, "
                                f"feature_dtype {extract_kwargs.get('feature_dtype')} (float16 overflows above 65504)")
        return DiffusionFeaturePipelineOutput(features=features)

    def _head_maps(self, windows: torch.Tensor, extract_kwargs: Dict[str, Any]) -> torch.Tensor:
        """Probabilities and uncertainty of image windows, as channels (so that windows can be blended)."""
        features = self._extract(windows, **extract_kwargs)
        head_device = next(self.head.parameters()).device
        prediction = self.head.predict({k: v.to(head_device) for k, v in features.items()},
                                       size=tuple(windows.shape[-2:]))
        return torch.cat([prediction["probabilities"], prediction["uncertainty"][:, None]], dim=1).cpu()

    def segment(self, images: torch.Tensor, size, fov: Optional[torch.Tensor], tile_size: Optional[int] = None,
                tile_overlap: float = 0.25, **extract_kwargs: Any) -> DiffusionFeaturePipelineOutput:
        """``output="segmentation"``: the head on prepared (padded) ``images``, whole or in blended ``tile_size``
        windows, cropped to ``size = (height, width)`` and set to background outside ``fov``."""
        height, width = size
        predict = functools.partial(self._head_maps, extract_kwargs=extract_kwargs)
        if tile_size is None or max(images.shape[-2:]) <= tile_size:
            maps = predict(images)
        else:
            maps = blend_windows(predict, images, tile_size, tile_overlap)
        check_finite_output(maps, "The head's probabilities and uncertainty",
                            hint=f"unet dtype {self.unet.dtype}, head dtype {self.head.dtype}")
        probabilities, uncertainty = maps[:, :-1, :height, :width], maps[:, -1, :height, :width]
        if fov is not None:
            outside = ~fov.to(probabilities.device)[:, None]
            background = torch.zeros_like(probabilities)
            background[:, 0] = 1
            probabilities = torch.where(outside, background, probabilities)
            uncertainty = uncertainty.masked_fill(outside[:, 0], 0)
        return DiffusionFeaturePipelineOutput(masks=probabilities.argmax(dim=1), probabilities=probabilities,
                                              uncertainty=uncertainty, field_of_view=fov)

    def segment_photographs(self, images: torch.Tensor, field_of_view, processing_resolution: Union[int, str, None],
                            tile_size: Optional[int] = None, tile_overlap: float = 0.25,
                            camera_degrees: Optional[float] = None, **extract_kwargs: Any
                            ) -> DiffusionFeaturePipelineOutput:
        """``output="segmentation"`` on prepared (unpadded) ``images``: each group of images that share a processing
        size (``processing_resolution``) is resized there, filled outside its field of view, padded and segmented
        (:meth:`segment`); probabilities and uncertainty come back at the input's size (bilinear) and are restricted
        to the field of view found at that size."""
        size = tuple(images.shape[-2:])
        fov = self._field_of_view(field_of_view, images)
        plans = self.image_processor.plan_processing(images, processing_resolution, auto_processing_diameter(
            self.config, processing_resolution, camera_degrees))
        groups = processing_groups(plans)
        generator = extract_kwargs.get("generator")
        draws = extract_kwargs.get("num_noise_draws", 1) if extract_kwargs.get("policy") == "noise" else 1
        if len(groups) > 1 and generator is not None:  # each image keeps the generators a single call gives it
            generator = per_sample_generators(generator, images.shape[0] * draws, self._execution_device,
                                              "image x noise draw")
        parts: Dict[int, torch.Tensor] = {}
        for group_size, indices in groups:
            group = self.image_processor.resize(images[indices], group_size)
            group_fov = None
            if fov is not None:
                group_fov = fov[indices] if group_size == size else self.image_processor.resize(
                    fov[indices, None].float(), group_size, mode="bilinear")[:, 0] > 0.5
                # the black surround would shift the group-norm statistics of every window holding it
                group = fill_outside_field_of_view(group, group_fov)
            padded, group_hw = pad_to_multiple(group, self.size_multiple)
            if len(groups) > 1 and isinstance(generator, list):
                extract_kwargs["generator"] = [generator[i * draws + d] for i in indices for d in range(draws)]
            out = self.segment(padded, group_hw, group_fov, tile_size, tile_overlap, **extract_kwargs)
            group_maps = torch.cat([out.probabilities, out.uncertainty[:, None]], dim=1)
            group_maps = self.image_processor.resize(group_maps, size, mode="bilinear")
            for row, index in enumerate(indices):
                parts[index] = group_maps[row]
        maps = torch.stack([parts[index] for index in range(images.shape[0])])
        probabilities, uncertainty = maps[:, :-1], maps[:, -1]
        if fov is not None and any(plan.size != size for plan in plans):  # the outside, exactly, at the input's size
            outside = ~fov[:, None]
            background = torch.zeros_like(probabilities)
            background[:, 0] = 1
            probabilities = torch.where(outside, background, probabilities)
            uncertainty = uncertainty.masked_fill(outside[:, 0], 0)
        return DiffusionFeaturePipelineOutput(masks=probabilities.argmax(dim=1), probabilities=probabilities,
                                              uncertainty=uncertainty, field_of_view=fov, processing=plans)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
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
        processing_resolution: Union[int, str, None] = "auto",
        camera_degrees: Optional[float] = None,
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
            cache_dir: deprecated (the feature cache belongs to training): features on disk keyed by image, weights
                and settings, through ``diffusers_retina.feature_cache.cached_extract``, which training and benchmarks
                call directly on ``extract``. Still honoured, with a ``FutureWarning``.
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
            processing_resolution: with ``output="segmentation"``, the size each image is segmented at; the outputs
                come back at the input's size. ``"auto"`` (default): the field of view resized to span the
                checkpoint's ``field_of_view_diameter`` (the scale the head learnt at; within 5 % the image is kept;
                without a dark surround the image is only shrunk), the rule of ``SegmentationEnsemblePipeline``;
                ``None`` / ``"native"``: as given; an int: the longer side in pixels. Features (``output="features"``)
                are always read at the image's own size.
            camera_degrees: with ``"auto"``, the field-of-view angle of the camera that took the photographs (e.g.
                45): the checkpoint's pixels per degree are matched instead of its diameter (as in
                ``SegmentationEnsemblePipeline``); needs a checkpoint that records ``field_of_view_degrees``.
            return_dict: return a [`DiffusionFeaturePipelineOutput`] instead of a tuple.

        Examples:
        """
        head_config = self.head.config if self.head is not None else {}
        blocks = list(blocks or head_config.get("blocks") or self.default_blocks())
        timesteps = list(timesteps or head_config.get("timesteps") or [50, 150, 250])
        policy = policy or head_config.get("policy") or "noise"
        self.check_inputs(output, tile_size, tile_overlap, processing_resolution)  # extraction: check_extract_inputs
        if cache_dir is not None:
            warnings.warn("`cache_dir` of DiffusionFeaturePipeline.__call__ is deprecated: the feature cache belongs to "
                          "training; call diffusers_retina.feature_cache.cached_extract(pipe, images, cache_dir, ...) "
                          "instead.", FutureWarning, stacklevel=2)
        images = prepare_images(image, self.unet.config.in_channels)
        extract_kwargs = dict(blocks=blocks, timesteps=timesteps, policy=policy, generator=generator,
                              num_noise_draws=num_noise_draws, shared_noise=shared_noise, feature_dtype=feature_dtype,
                              batch_size=batch_size, cache_dir=cache_dir, seed=seed)
        if output == "features":
            images, _ = pad_to_multiple(images, self.size_multiple)
            result = self.extract_features(images, **extract_kwargs)
        else:
            result = self.segment_photographs(images, field_of_view, processing_resolution, tile_size, tile_overlap,
                                              camera_degrees, **extract_kwargs)
        self.maybe_free_model_hooks()
        if not return_dict:
            return result.to_tuple()  # the fields that are set, in order
        return result
