"""AdaptDiffPipeline: adapt a vessel segmenter to an unlabelled modality (AdaptDiff, Hu et al., MICCAI SASHIMI 2024).

The method, in three calls of this pipeline (``training/adaptdiff_workflow.py`` runs the whole recipe as one
resumable command):

1. :meth:`AdaptDiffPipeline.pseudo_label` -- the source ``segmenter`` (trained on labelled fundus photographs)
   labels the unlabelled target images. The labels are poor, but good enough as a weak condition.
2. A ``ConditionalUNet2DModel`` (the Mask2Image model; AdaptDiff conditions by SPADE in the decoder) is trained on
   target images given those pseudo-labels. :meth:`AdaptDiffPipeline.__call__` then paints target-style images from
   the *source's real* vessel masks, histogram-matched to target images: synthetic target pairs with exact labels.
3. The segmenter is fine-tuned on the synthetic pairs; :meth:`AdaptDiffPipeline.segment` runs the adapted segmenter
   on target images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers import SchedulerMixin
from diffusers.utils import BaseOutput, replace_example_docstring

from ...data.modality import match_histograms
from ...image_processing import (
    ImageInput,
    MaskInput,
    RetinaImageProcessor,
    check_source_intensity_transform,
    field_of_view_mask,
    prepare_images,
    tensor_to_source_intensities,
)
from ...models import ConditionalUNet2DModel
from ..checks import check_finite_output
from ..pipeline_utils import RetinaPipelineMixin
from ..mask2image import Mask2ImagePipeline
from ..sampling import OUTPUT_TYPES, check_common_inputs, sample_chunks, samples_per_call, segmenter_probabilities, \
    window_pixels

PSEUDO_LABEL_MODES = ("threshold", "soft", "confident")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from PIL import Image
        >>> from diffusers_retina import AdaptDiffPipeline

        >>> pipe = AdaptDiffPipeline.from_pretrained("checkpoints/adaptdiff-chase-fa")
        >>> angiogram = Image.open("angiogram.png")  # an image of the target modality
        >>> out = pipe.segment(angiogram, tile_size=256)  # the adapted segmenter
        >>> out.masks[0].save("vessels.png")
        >>> labels = pipe.pseudo_label(angiogram, mode="confident", tile_size=256).masks  # step 1 of AdaptDiff
        >>> painted = pipe(Image.open("source_vessel_mask.png"), num_inference_steps=25, reference_images=[angiogram],
        ...                generator=torch.Generator().manual_seed(0))  # step 2: target-style image of a real mask
        >>> painted.images[0].save("synthetic_angiogram.png")
        ```
"""


def check_pseudo_label_settings(mode: str, threshold: float, confidence: float) -> None:
    """Raise ``ValueError`` naming the argument for an unknown ``mode`` or a cut outside its range."""
    if mode not in PSEUDO_LABEL_MODES:
        raise ValueError(f"`mode` must be one of {PSEUDO_LABEL_MODES}, got {mode!r}.")
    for name, value, low in (("threshold", threshold, 0.0), ("confidence", confidence, 0.5)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or not (
                low <= value <= 1.0) or (name == "confidence" and value == 0.5):
            raise ValueError(f"`{name}` must be a number in {'[0, 1]' if name == 'threshold' else '(0.5, 1]'}, "
                             f"got {value!r}.")


def pseudo_labels(probabilities: torch.Tensor, mode: str = "threshold", threshold: float = 0.5,
                  confidence: float = 0.8) -> torch.Tensor:
    """Pseudo-labels from vessel probabilities: ``threshold`` -- 0/1 (AdaptDiff's argmax at 0.5); ``soft`` -- the
    probabilities; ``confident`` -- 1 at or above ``confidence``, 0 at or below ``1 - confidence``, 0.5 between (the
    neutral condition of a conditional diffusion model).

    Example:
        >>> pseudo_labels(torch.tensor([0.1, 0.5, 0.95]), "confident").tolist()
        [0.0, 0.5, 1.0]
    """
    check_pseudo_label_settings(mode, threshold, confidence)
    if mode == "threshold":
        return (probabilities > threshold).float()
    if mode == "soft":
        return probabilities.clone()
    labels = torch.full_like(probabilities, 0.5)
    labels[probabilities >= confidence] = 1.0
    labels[probabilities <= 1.0 - confidence] = 0.0
    return labels


@dataclass
class AdaptDiffPipelineOutput(BaseOutput):
    """Output of [`AdaptDiffPipeline.__call__`]: target-style images and the masks they were painted from.

    Args:
        images: ``pil``: list of RGB images; ``np``: ``(N, H, W, C)`` in ``[0, 1]``; ``pt``: ``(N, C, H, W)`` in
            ``[0, 1]``; ``latent``: the denoised ``(N, C, H, W)`` latents in ``[-1, 1]`` (no histogram matching).
        masks: the masks as class indices (``pil``: "L" images 0/255; ``np`` / ``pt``: ``(N, H, W)``).
    """

    images: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]
    masks: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]


@dataclass
class AdaptDiffSegmentationOutput(BaseOutput):
    """Output of [`AdaptDiffPipeline.segment`] and [`AdaptDiffPipeline.pseudo_label`].

    Args:
        masks: ``pil``: "L" images (binary 0/255; soft labels as 8-bit probabilities, "confident" labels 0/128/255);
            ``np`` / ``pt``: ``(N, H, W)`` -- 0/1 for ``threshold``, probabilities for ``soft``, and 0, 0.5
            (unknown) or 1 for ``confident``.
        probabilities: the segmenter's vessel probabilities, ``(N, H, W)`` (``pil``: 8-bit "L" images).
    """

    masks: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]
    probabilities: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]


def is_grey(image: np.ndarray, tolerance: float = 1.0 / 255) -> bool:
    """Whether an ``(H, W, C)`` image in [0, 1] has equal channels (within one 8-bit level)."""
    return image.shape[-1] == 1 or float(np.abs(image - image.mean(axis=-1, keepdims=True)).max()) <= tolerance


class AdaptDiffPipeline(RetinaPipelineMixin, DiffusionPipeline):
    r"""Cross-modality adaptation of a vessel segmenter with weakly conditioned semantic diffusion (AdaptDiff).

    Args:
        unet: a `ConditionalUNet2DModel` trained on target-modality images given pseudo-labels (AdaptDiff: SPADE in
            the decoder, instance norm, L1 loss on epsilon, 300 timesteps).
        scheduler: any diffusers scheduler for ``unet``.
        segmenter: a deterministic vessel segmenter (``UNet2DModel``: image in ``[-1, 1]`` at timestep 0, one logit
            channel out): the source segmenter before adaptation, the adapted one after.
        input_transform: the intensity transform target images go through before ``segmenter`` reads them
            (:func:`diffusers_retina.image_processing.source_intensity_transform`, e.g. inversion and histogram
            matching to the source photographs' stored quantiles): written by the adaptation workflow when the
            segmenter was fine-tuned in the source's intensity space; None: images as given. Painting is unaffected.
    """

    model_cpu_offload_seq = "segmenter->unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet: ConditionalUNet2DModel, scheduler: SchedulerMixin, segmenter: UNet2DModel,
                 input_transform: Optional[Dict[str, Any]] = None):
        super().__init__()
        if segmenter.config.out_channels < 1:
            raise ValueError("`segmenter` must return at least one logit channel.")
        check_source_intensity_transform(input_transform)
        self.register_modules(unet=unet, scheduler=scheduler, segmenter=segmenter)
        self.register_to_config(input_transform=input_transform)
        self.image_processor = RetinaImageProcessor(size_multiple=self.segmenter_multiple)

    @property
    def segmenter_multiple(self) -> int:
        return 2 ** (len(self.segmenter.config.block_out_channels) - 1)

    def _painter(self) -> Mask2ImagePipeline:
        """The Mask2Image pipeline over the same ``unet`` and ``scheduler``: one painting loop for both pipelines."""
        painter = Mask2ImagePipeline(unet=self.unet, scheduler=self.scheduler)
        painter.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return painter

    # ------------------------------------------------------------------ segmentation
    @torch.no_grad()
    def segment(
        self,
        images: ImageInput,
        threshold: float = 0.5,
        tile_size: Optional[int] = None,
        tile_overlap: float = 0.25,
        batch_size: Union[int, str, None] = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> Union[AdaptDiffSegmentationOutput, tuple]:
        r"""Segment vessels with ``segmenter`` (after adaptation: the adapted segmenter).

        Args:
            images: target-modality images (PIL, numpy ``HWC``/``NHWC`` uint8 or ``[0, 1]`` floats, or a tensor); the
                pipeline's ``input_transform``, if any, is applied first.
            threshold: probability above which a pixel is a vessel.
            tile_size: run the segmenter on overlapping windows of this size (Gaussian-blended; for full
                photographs on small memory). A multiple of the segmenter's down-sampling factor.
            tile_overlap: overlap of neighbouring windows as a fraction of the tile.
            batch_size: images per segmenter call (default all; ``"auto"``: sized for the CPU caches).
            output_type: ``"pil"``, ``"np"`` or ``"pt"``.
            return_dict: return an [`AdaptDiffSegmentationOutput`] instead of ``(masks, probabilities)``.
        """
        return self.pseudo_label(images, mode="threshold", threshold=threshold, tile_size=tile_size,
                                 tile_overlap=tile_overlap, batch_size=batch_size, output_type=output_type,
                                 return_dict=return_dict)

    @torch.no_grad()
    def pseudo_label(
        self,
        images: ImageInput,
        mode: str = "threshold",
        threshold: float = 0.5,
        confidence: float = 0.8,
        tile_size: Optional[int] = None,
        tile_overlap: float = 0.25,
        batch_size: Union[int, str, None] = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> Union[AdaptDiffSegmentationOutput, tuple]:
        r"""Pseudo-labels of target images from ``segmenter`` (AdaptDiff's step 1).

        Args:
            images: target-modality images (see :meth:`segment`).
            mode: ``"threshold"`` -- 0/1 at ``threshold`` (AdaptDiff's argmax); ``"soft"`` -- the probabilities
                themselves; ``"confident"`` -- 1 where the probability is at least ``confidence``, 0 where it is at
                most ``1 - confidence``, 0.5 (no information: the neutral condition) in between.
            threshold: the ``threshold`` mode's cut.
            confidence: the ``confident`` mode's cut, in (0.5, 1].
            tile_size, tile_overlap, batch_size, output_type, return_dict: as in :meth:`segment`.
        """
        check_pseudo_label_settings(mode, threshold, confidence)
        check_common_inputs(self.segmenter_multiple, batch_size, tile_size, tile_overlap, output_type, [], [])
        pixels = tensor_to_source_intensities(prepare_images(images, self.segmenter.config.in_channels, "images"),
                                              self.config.get("input_transform"))
        device = self._execution_device
        chunk = samples_per_call(batch_size, len(pixels), window_pixels(*pixels.shape[-2:], tile_size), device,
                                 self.segmenter.dtype)
        probabilities = torch.cat([
            segmenter_probabilities(self.segmenter, pixels[list(index)].to(device), tile_size, tile_overlap)
            for index in self.progress_bar(sample_chunks(len(pixels), chunk))
        ])[:, 0].cpu()
        self.maybe_free_model_hooks()
        check_finite_output(probabilities, "The segmenter's probabilities",
                            hint=f"segmenter dtype {self.segmenter.dtype}")
        labels = pseudo_labels(probabilities, mode, threshold, confidence)
        labels = self.image_processor.postprocess_maps(labels, output_type=output_type)
        probabilities = self.image_processor.postprocess_maps(probabilities, output_type=output_type)
        if not return_dict:
            return labels, probabilities
        return AdaptDiffSegmentationOutput(masks=labels, probabilities=probabilities)

    # ------------------------------------------------------------------ synthesis
    def check_inputs(self, output_type: str, reference_images) -> None:
        """The arguments :meth:`__call__` adds to those of the Mask2Image painting (which checks its own)."""
        if output_type not in OUTPUT_TYPES + ("latent",):
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES + ('latent',)}, got {output_type!r}.")
        if isinstance(reference_images, (list, tuple)) and not reference_images:
            raise ValueError("`reference_images` is an empty list; pass target images or None.")

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        masks: MaskInput,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        num_images_per_mask: int = 1,
        reference_images: Optional[Sequence[ImageInput]] = None,
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
    ) -> Union[AdaptDiffPipelineOutput, tuple]:
        r"""Paint target-modality images from vessel masks (AdaptDiff's step 3: from the source's real masks).

        Args:
            masks: binary vessel masks (PIL, numpy ``HW``/``NHW`` 0/1 or 0/255, float probabilities, or a tensor);
                any size (padded and cropped back).
            num_inference_steps: denoising steps of ``scheduler`` (any diffusers scheduler).
            guidance_scale: classifier-free guidance scale (1: the conditional model alone).
            num_images_per_mask: images painted per mask.
            reference_images: target-modality images; when given, every painted image is histogram-matched to their
                pooled intensity distribution inside the field of view (AdaptDiff matches its synthetic images to the
                target this way), and made grey first when every reference is grey (an angiogram's three channels
                are equal; a painter's need not be). Ignored for ``output_type="latent"``.
            generator: a ``torch.Generator`` or one per image (masks x ``num_images_per_mask``, mask-major).
            batch_size, tile_size, tile_overlap: as in [`Mask2ImagePipeline`].
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict: return an [`AdaptDiffPipelineOutput`] instead of ``(images, masks)``.
            callback_on_step_end: called after every denoising step as ``callback(pipe, step, timestep,
                callback_kwargs)``, where ``pipe`` is the Mask2Image pipeline that runs the loop over this pipeline's
                ``unet`` and ``scheduler`` (it has ``guidance_scale``, ``num_timesteps``, ``_interrupt``).
            callback_on_step_end_tensor_inputs: tensors passed in ``callback_kwargs`` (``["latents"]``).

        Examples:
        """
        self.check_inputs(output_type, reference_images)  # the painting's own arguments: Mask2ImagePipeline's
        references = None
        if reference_images is not None and output_type != "latent":
            items = list(reference_images) if isinstance(reference_images, (list, tuple)) else [reference_images]
            references = [((prepare_images(item, self.unet.config.in_channels, "reference_images")[0] + 1) / 2)
                          .permute(1, 2, 0).numpy() for item in items]
        painter = self._painter()
        images, mask_indices = painter(
            masks, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            num_images_per_mask=num_images_per_mask, generator=generator, batch_size=batch_size, tile_size=tile_size,
            tile_overlap=tile_overlap, output_type="np" if references is not None else output_type,
            return_dict=False, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        self._num_timesteps = painter.num_timesteps
        if references is not None:
            reference_fovs = [field_of_view_mask(reference) for reference in references]
            if images.shape[-1] == 3 and all(is_grey(reference) for reference in references):
                images = np.repeat(images.mean(axis=-1, keepdims=True), 3, axis=-1)  # a grey target: grey paintings
            images = np.stack([match_histograms(image, references, field_of_view_mask(image), reference_fovs)
                               for image in images]).astype(np.float32)
            if output_type != "np":
                images = self.image_processor.postprocess(torch.from_numpy(images).permute(0, 3, 1, 2), output_type)
                mask_indices = self.image_processor.postprocess_masks(mask_indices, 2, output_type)
        if not return_dict:
            return images, mask_indices
        return AdaptDiffPipelineOutput(images=images, masks=mask_indices)
