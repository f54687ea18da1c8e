"""SegmentationEnsemblePipeline: diffusion segmentation with implicit ensembles (Wolleb et al. 2022).

A DDPM over the *mask*: at every denoising step the noisy mask is concatenated with the clean image, so the
denoiser is a plain ``UNet2DModel`` with ``in_channels = image_channels + mask_channels``. Sampling several
members from different noise gives an ensemble whose spread is an uncertainty map.

With a ``prior`` (a deterministic segmenter) the sampling is *anchored* on its prediction ``p`` (``q = 2p - 1`` in
diffusion space), and the denoiser sees ``[state | image | q]``:

* ``anchor="residual"``: the diffusion runs over the residual ``r = y - p`` (mask minus prior probability), from pure
  noise with the scheduler's full schedule, so every diffusers scheduler works unchanged; a member's mask is
  ``q + 2r``. Its forward process moves the mask's mean from ``y`` to ``p`` (the Gaussian counterpart of HiDiff's
  Bernoulli process).
* ``anchor="strength"``: diffusers' img2img convention: the prior ``q`` is noised to the timestep that
  ``anchor_strength`` picks and only the last ``num_inference_steps`` of a ``ceil(steps / strength)``-step schedule
  are run (SDEdit-style).

With a ``PriorFeatureRefinerModel`` as the ``unet`` (the *feature-reusing refiner*), the prior's pass also returns its
last decoder features; the refiner turns them and ``q`` into context maps once per image, and every member and step
runs only its light per-pixel head on ``[state | context]`` (residual anchoring only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Union

import math

import numpy as np
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers import DDPMParallelScheduler, DDPMScheduler, SchedulerMixin, UnCLIPScheduler
from diffusers.utils import BaseOutput, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

from ...fusion import fuse_members, uncertainty_maps
from ...models import (
    MedSegDiffUNet2DModel,
    PriorFeatureRefinerModel,
    segmenter_features,
)
from ...image_processing import (
    ImageInput,
    ProcessingPlan,
    RetinaImageProcessor,
    diffusion_to_probabilities,
    check_field_of_view_degrees,
    check_processing_resolution,
    check_source_intensity_transform,
    pad_to_multiple,
    prepare_images,
    tensor_to_source_intensities,
)
from ..checks import (
    auto_processing_diameter,
    check_feature_refiner,
    check_field_of_view_diameter,
    check_finite_output,
    check_num_inference_steps,
)
from ..pipeline_utils import RetinaPipelineMixin
from ..sampling import (
    check_common_inputs,
    per_sample_generators,
    processing_groups,
    rows_of,
    sample_chunks,
    samples_per_call,
    segmenter_probabilities,
    step_accepts_generator,
    tiled_predict,
    window_pixels,
)

FUSION_METHODS = ("mean", "majority", "staple")
ANCHORS = ("residual", "strength")
# schedulers whose `step` takes ``2 * C`` output channels and uses the learned variance
VARIANCE_SCHEDULERS = (DDPMScheduler, DDPMParallelScheduler, UnCLIPScheduler)


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from skimage.data import retina
        >>> from diffusers import DDIMScheduler
        >>> from diffusers_retina import SegmentationEnsemblePipeline

        >>> pipe = SegmentationEnsemblePipeline.from_pretrained("checkpoints/segmentation-ensemble-chase")
        >>> pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # any diffusers scheduler
        >>> result = pipe(retina()[::2, ::2], num_inference_steps=2, ensemble_size=5, fusion="staple",
        ...               generator=torch.Generator().manual_seed(0), tile_size=256)
        >>> result.masks[0].save("vessels.png")
        >>> result.entropy[0].save("uncertainty.png")
        ```
"""


@dataclass
class SegmentationEnsemblePipelineOutput(BaseOutput):
    """Output of [`SegmentationEnsemblePipeline`].

    Args:
        masks: fused masks, class indices (binary: 0/1). ``pt``/``np``: ``(B, H, W)``; ``pil``: list of "L" images
            (binary masks as 0/255).
        probabilities: fused probabilities. ``pt``: ``(B, C, H, W)``; ``np``: ``(B, H, W, C)``; ``pil``: list of
            "L" images of the foreground probability (binary) or of the winning class' probability (multi-class).
            ``C`` is 1 for binary masks (foreground probability) and ``K`` for ``K`` classes.
        variance: per-pixel variance of the member probabilities, ``(B, H, W)`` (``pil``: scaled so 0.25 is white).
        entropy: predictive entropy of the mean probability in nats, ``(B, H, W)`` (``pil``: ``ln K`` is white).
        mutual_information: entropy of the mean minus the mean member entropy (epistemic part), ``(B, H, W)``.
        members: with ``return_members=True``, member probabilities ``(B, E, C, H, W)`` (``np``: channels last;
            ``pil``: one list of "L" foreground-probability images per input image); otherwise ``None``.
        processing: one :class:`~diffusers_retina.image_processing.ProcessingPlan` per image: the size it was
            segmented at and why (``processing_resolution``); every map above is at the input's size.
    """

    masks: Union[List, np.ndarray, torch.Tensor]
    probabilities: Union[List, np.ndarray, torch.Tensor]
    variance: Union[List, np.ndarray, torch.Tensor]
    entropy: Union[List, np.ndarray, torch.Tensor]
    mutual_information: Union[List, np.ndarray, torch.Tensor]
    members: Optional[Union[List, np.ndarray, torch.Tensor]] = None
    processing: Optional[List[ProcessingPlan]] = None


class SegmentationEnsemblePipeline(RetinaPipelineMixin, DiffusionPipeline):
    r"""Diffusion segmentation with implicit ensembles and uncertainty maps (Wolleb et al. 2022).

    Args:
        unet: denoiser of the mask. Input: the (scaled) noisy mask concatenated with the clean image along channels,
            so ``in_channels = image_channels + mask_channels``; output: ``mask_channels`` (or twice that for a
            learned variance). A stock ``UNet2DModel`` works, so does ``MedSegDiffUNet2DModel`` (MedSegDiff's
            condition encoder, dynamic conditional encoding and FF-Parser), and any model with the same call contract.
            With a prior, a ``PriorFeatureRefinerModel`` (the feature-reusing refiner) instead reads the prior's last
            decoder features, computed once per image, so members and steps cost only its light head.
        scheduler: any diffusers scheduler (DDPM, DDIM, DPM-Solver, Euler, ...).
        prior: optional deterministic segmenter (a ``UNet2DModel`` taking the image at timestep 0 and returning one
            logit channel, e.g. ``train_segmentation_ensemble.py --objective supervised``). With a prior, the
            ``unet`` also takes the prior as one more input channel and sampling is anchored on it (``anchor``).
        anchor: ``"residual"`` or ``"strength"`` (see the module docstring); required with a prior, else None.
        anchor_strength: for ``anchor="strength"``: the fraction of the noise schedule sampling starts from.
        default_denoising_steps: ``num_inference_steps`` when the call does not give it (Marigold's convention:
            the checkpoint knows the step count it was evaluated with); None: 50.
        default_threshold: ``threshold`` when the call does not give it (chosen on training data); None: 0.5.
        field_of_view_diameter: the field-of-view diameter, in pixels, of the photographs the models learnt from
            (``processing_resolution="auto"`` brings every photograph to it); None: unknown.
        field_of_view_degrees: their field-of-view angle (30 for CHASE_DB1; for a call's ``camera_degrees``).
        input_transform: an intensity transform every input goes through first (``image_processing.
            source_intensity_transform``: inversion and/or histogram matching to stored source quantiles), written by
            the adaptation workflow when it fine-tuned in the source's intensity space; None: inputs as given.

    Masks have one channel (binary, ``2m - 1``) or ``K`` one-hot channels in ``[-1, 1]`` (``K`` classes).
    """

    model_cpu_offload_seq = "prior->unet"
    _optional_components = ["prior"]
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet: Union[UNet2DModel, MedSegDiffUNet2DModel, PriorFeatureRefinerModel],
                 scheduler: SchedulerMixin, prior: Optional[UNet2DModel] = None, anchor: Optional[str] = None,
                 anchor_strength: float = 1.0,
                 default_denoising_steps: Optional[int] = None, default_threshold: Optional[float] = None,
                 field_of_view_diameter: Optional[int] = None, field_of_view_degrees: Optional[float] = None,
                 input_transform: Optional[Dict[str, Any]] = None):
        super().__init__()
        if isinstance(unet, PriorFeatureRefinerModel):
            check_feature_refiner(unet, prior, anchor)
        if anchor is not None and anchor not in ANCHORS:
            raise ValueError(f"`anchor` must be one of {ANCHORS} or None, got {anchor!r}.")
        if (prior is None) != (anchor is None):
            raise ValueError("A `prior` segmenter and an `anchor` formulation go together: give both or neither "
                             f"(got prior={type(prior).__name__ if prior is not None else None}, anchor={anchor!r}).")
        if not (isinstance(anchor_strength, (int, float)) and 0.0 < anchor_strength <= 1.0):
            raise ValueError(f"`anchor_strength` must lie in (0, 1], got {anchor_strength!r}.")
        if default_denoising_steps is not None and (
                not isinstance(default_denoising_steps, int) or default_denoising_steps < 1):
            raise ValueError(f"`default_denoising_steps` must be a positive integer, got {default_denoising_steps!r}.")
        if default_threshold is not None and not 0.0 < default_threshold < 1.0:
            raise ValueError(f"`default_threshold` must lie in (0, 1), got {default_threshold!r}.")
        check_field_of_view_diameter(field_of_view_diameter)
        check_field_of_view_degrees(field_of_view_degrees)
        check_source_intensity_transform(input_transform)
        self.register_modules(unet=unet, scheduler=scheduler, prior=prior)
        self.register_to_config(anchor=anchor, anchor_strength=float(anchor_strength),
                                default_denoising_steps=default_denoising_steps, default_threshold=default_threshold,
                                field_of_view_diameter=field_of_view_diameter,
                                field_of_view_degrees=field_of_view_degrees, input_transform=input_transform)
        self.image_processor = RetinaImageProcessor(size_multiple=self.size_multiple)
        if prior is not None:
            if prior.config.out_channels != 1 or self.mask_channels != 1:
                raise ValueError("Prior anchoring is implemented for binary masks: the prior must return one logit "
                                 f"channel (has {prior.config.out_channels}) and the unet one mask channel.")
            if not self.uses_prior_features and prior.config.in_channels != self.image_channels:
                raise ValueError(f"The prior takes {prior.config.in_channels} image channels but the unet's inputs "
                                 f"leave {self.image_channels} for the image (in_channels "
                                 f"{self.unet.config.in_channels} = mask + image + prior).")

    # ------------------------------------------------------------------ model facts
    @property
    def uses_prior_features(self) -> bool:
        """Whether the denoiser is a feature-reusing refiner (it reads the prior's decoder features)."""
        return isinstance(self.unet, PriorFeatureRefinerModel)

    @property
    def mask_channels(self) -> int:
        if self.uses_prior_features:
            return self.unet.config.mask_channels
        out_channels = self.unet.config.out_channels
        if self.scheduler.config.get("variance_type") in ("learned", "learned_range"):
            return out_channels // 2
        return out_channels

    @property
    def num_classes(self) -> int:
        """2 for binary masks (one channel), ``K`` for ``K`` one-hot channels."""
        return 2 if self.mask_channels == 1 else self.mask_channels

    @property
    def prior_channels(self) -> int:
        """Channels of the prior the denoiser takes (one per mask channel when anchored, else 0)."""
        return self.mask_channels if getattr(self, "prior", None) is not None else 0

    @property
    def image_channels(self) -> int:
        if self.uses_prior_features:
            return self.prior.config.in_channels
        return self.unet.config.in_channels - self.mask_channels - self.prior_channels

    @property
    def size_multiple(self) -> int:
        """Inputs are padded to a multiple of the UNet's total down-sampling factor (the prior's, for a
        feature-reusing refiner: the head itself works at any size)."""
        network = self.prior if self.uses_prior_features else self.unet
        return 2 ** (len(network.config.block_out_channels) - 1)

    # ------------------------------------------------------------------ helpers
    def check_inputs(self, ensemble_size, fusion, threshold, batch_size, tile_size, tile_overlap, output_type,
                     callback_on_step_end_tensor_inputs, processing_resolution=None):
        if isinstance(ensemble_size, bool) or not isinstance(ensemble_size, int) or ensemble_size < 1:
            raise ValueError(f"`ensemble_size` must be a positive integer, got {ensemble_size!r}.")
        if fusion not in FUSION_METHODS:
            raise ValueError(f"`fusion` must be one of {FUSION_METHODS}, got {fusion!r}.")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
            raise ValueError(f"`threshold` must lie in (0, 1), got {threshold!r}.")
        check_common_inputs(self.size_multiple, batch_size, tile_size, tile_overlap, output_type,
                            callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)
        check_processing_resolution(processing_resolution)

    def anchored_timesteps(self, num_inference_steps: int, device) -> torch.Tensor:
        """The timesteps a call runs: the full schedule, or (``anchor="strength"``) the last ``num_inference_steps``
        of a ``ceil(steps / strength)``-step schedule, as diffusers' img2img pipelines do."""
        if self.config.anchor != "strength":
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            return self.scheduler.timesteps
        total = max(num_inference_steps, math.ceil(num_inference_steps / self.config.anchor_strength - 1e-9))
        self.scheduler.set_timesteps(total, device=device)
        start = (total - num_inference_steps) * self.scheduler.order
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start)
        return self.scheduler.timesteps[start:]

    def prior_condition(self, images: torch.Tensor, tile_size: Optional[int], tile_overlap: float) -> torch.Tensor:
        """The prior's pass, once per image: ``q = 2p - 1`` (one channel) or, for a feature-reusing refiner,
        ``[context | q]`` (its context maps from the prior's decoder features, then ``q``), on the same Gaussian-blended
        windows as every other call (logits and context are blended, then ``p = sigmoid(logit)``)."""
        if not self.uses_prior_features:
            return 2.0 * segmenter_probabilities(self.prior, images, tile_size, tile_overlap) - 1.0
        prior = self.prior
        model_input = images.to(prior.device, prior.dtype)
        outputs = tiled_predict(self._prior_context, model_input, tile_size, tile_overlap).float()
        prior_masks = 2.0 * outputs[:, :1].sigmoid() - 1.0
        return torch.cat([outputs[:, 1:], prior_masks], dim=1)

    def _prior_context(self, window: torch.Tensor) -> torch.Tensor:
        """``[prior logit | refiner context]`` of one batch of windows (the feature-reusing refiner's prior pass)."""
        logits, features = segmenter_features(self.prior, window)
        prior_masks = 2.0 * logits[:, :1].float().sigmoid() - 1.0
        context = self.unet.encode_context(features.to(self.unet.dtype), prior_masks.to(self.unet.dtype))
        return torch.cat([logits[:, :1].to(context.dtype), context], dim=1)

    def predict(self, state: torch.Tensor, condition: torch.Tensor, timestep: torch.Tensor, tile_size: Optional[int],
                tile_overlap: float) -> torch.Tensor:
        """One denoiser evaluation of the (scaled) noisy ``state`` with its ``condition`` rows; with ``tile_size``,
        overlapping windows of ``[state | condition]`` blended with a Gaussian (MONAI). A feature-reusing refiner's
        head runs on the whole image: its receptive field over the state is 3 pixels and its context is already
        computed, so tiles would only add the blending (and the concatenation a copy of the context)."""
        if self.uses_prior_features:
            return self.unet(state, timestep, condition[:, :-self.mask_channels], return_dict=False)[0]
        model_input = torch.cat([state, condition], dim=1)

        def forward(window: torch.Tensor) -> torch.Tensor:
            return self.unet(window, timestep, return_dict=False)[0]

        return tiled_predict(forward, model_input, tile_size, tile_overlap)

    # ------------------------------------------------------------------ call
    def _padded(self, size) -> tuple:
        """``(height, width)`` padded up to the UNet's down-sampling multiple."""
        return tuple(-(-side // self.size_multiple) * self.size_multiple for side in size)

    def _sample_members(self, images: torch.Tensor, generators: List[torch.Generator], ensemble_size: int,
                        chunks: List[range], num_inference_steps: int, anchor: Optional[str],
                        tile_size: Optional[int], tile_overlap: float, progress_bar, callback_on_step_end,
                        callback_on_step_end_tensor_inputs: List[str]) -> torch.Tensor:
        """``ensemble_size`` members of each of ``images`` (one size; one generator per sample, image-major), the
        prior's pass once per image: the masks in diffusion space, ``(N * E, C, H, W)``, float32."""
        dtype = images.dtype
        images, (height, width) = pad_to_multiple(images, self.size_multiple)
        condition = images
        if anchor is not None:
            # the prior's prediction, once per image, in diffusion space: the anchor and one more denoiser input (a
            # feature-reusing refiner takes its context maps from the same pass instead of the image)
            prior_condition = self.prior_condition(images, tile_size, tile_overlap).to(dtype)
            condition = prior_condition if self.uses_prior_features else torch.cat([images, prior_condition], dim=1)
        sample_shape = (self.mask_channels,) + tuple(images.shape[-2:])
        samples = []
        for chunk in chunks:
            latents = self._denoise_chunk(
                rows_of(condition, [i // ensemble_size for i in chunk]), [generators[i] for i in chunk],
                (len(chunk),) + sample_shape, num_inference_steps, anchor, tile_size, tile_overlap, progress_bar,
                callback_on_step_end, callback_on_step_end_tensor_inputs,
            )
            samples.append(latents[..., :height, :width].float())
        return torch.cat(samples)

    def _denoise_chunk(self, chunk_condition: torch.Tensor, chunk_generators: List[torch.Generator], shape: tuple,
                       num_inference_steps: int, anchor: Optional[str], tile_size: Optional[int], tile_overlap: float,
                       progress_bar, callback_on_step_end, callback_on_step_end_tensor_inputs: List[str]
                       ) -> torch.Tensor:
        """One chunk of samples (rows of ``chunk_condition``, one generator each) through the whole schedule; the
        mask in diffusion space (the prior added back with ``anchor="residual"``)."""
        device, dtype = chunk_condition.device, chunk_condition.dtype
        # multistep schedulers keep per-run state: start each chunk afresh
        timesteps = self.anchored_timesteps(num_inference_steps, device)
        # only DDPM-style schedulers split a learned variance off the model output themselves; DDIM/DPM-Solver/...
        # built with `from_config` keep `variance_type` in their config but need the mean channels only.
        uses_variance = isinstance(self.scheduler, VARIANCE_SCHEDULERS) and self.scheduler.config.get(
            "variance_type"
        ) in ("learned", "learned_range")
        # Not every scheduler's `step` takes a generator (e.g. UniPC).
        step_kwargs: Dict[str, Any] = {"generator": chunk_generators} if step_accepts_generator(self.scheduler) else {}
        latents = randn_tensor(shape, generator=chunk_generators, device=device, dtype=dtype)
        if anchor == "strength":  # img2img: start from the prior, noised to the first timestep
            anchor_masks = chunk_condition[:, -self.mask_channels:]
            latents = self.scheduler.add_noise(anchor_masks, latents, timesteps[:1].repeat(shape[0]))
        else:
            latents = latents * self.scheduler.init_noise_sigma
        for step_index, t in enumerate(timesteps):
            if self.interrupt:
                progress_bar.update()
                continue
            model_output = self.predict(self.scheduler.scale_model_input(latents, t), chunk_condition, t, tile_size,
                                        tile_overlap)
            if model_output.shape[1] != self.mask_channels and not uses_variance:
                # a learned-variance model used with a scheduler that does not take the variance
                model_output = model_output[:, : self.mask_channels]
            latents = self.scheduler.step(model_output, t, latents, return_dict=False, **step_kwargs)[0]
            if callback_on_step_end is not None:
                callback_kwargs = {}
                for name in callback_on_step_end_tensor_inputs:
                    callback_kwargs[name] = locals()[name]
                callback_outputs = callback_on_step_end(self, step_index, t, callback_kwargs)
                latents = callback_outputs.pop("latents", latents)
            progress_bar.update()
        if anchor == "residual":  # mask = prior + residual (both in diffusion space: q + 2r)
            latents = (chunk_condition[:, -self.mask_channels:] + 2.0 * latents).clamp(-1.0, 1.0)
        return latents

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image: ImageInput,
        num_inference_steps: Optional[int] = None,
        ensemble_size: int = 5,
        fusion: str = "mean",
        threshold: Optional[float] = None,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        batch_size: Union[int, str, None] = None,
        tile_size: Optional[int] = None,
        tile_overlap: float = 0.25,
        processing_resolution: Union[int, str, None] = "auto",
        camera_degrees: Optional[float] = None,
        output_type: str = "pil",
        return_members: bool = False,
        return_dict: bool = True,
        callback_on_step_end: Optional[
            Union[Callable[[Any, int, int, Dict], Dict], PipelineCallback, MultiPipelineCallbacks]
        ] = None,
        callback_on_step_end_tensor_inputs: Optional[List[str]] = None,
    ) -> Union[SegmentationEnsemblePipelineOutput, tuple]:
        r"""Segment ``image`` with an ensemble of ``ensemble_size`` diffusion samples.

        Args:
            image: PIL image(s) (8-bit, and 16-bit / float modes ``I;16`` / ``F`` read like the data loaders read
                files), numpy array(s) (``HWC``/``NHWC``, uint8, uint16 or float in [0, 1]) or a float tensor / list
                of tensors (``CHW``/``NCHW`` in [0, 1], diffusers' convention; a tensor with negative values is
                read as [-1, 1] with a warning, so convert [-1, 1] tensors with ``(x + 1) / 2``). Any size up to the
                pixel cap (64 megapixels; ``DIFFUSERS_RETINA_MAX_PIXELS``): padded (reflect) to the UNet's factor
                and cropped back.
            num_inference_steps: denoising steps of the scheduler; default the checkpoint's
                ``default_denoising_steps`` (else 50).
            ensemble_size: members sampled per image.
            fusion: ``"mean"`` (average probabilities), ``"majority"`` (vote of hard member masks) or ``"staple"``
                (STAPLE, Warfield et al. 2004, on the hard member masks).
            threshold: foreground threshold for binary masks (members and fused probabilities); default the
                checkpoint's ``default_threshold`` (else 0.5).
            generator: a ``torch.Generator`` or a list with one per sample (images x members, image-major). Same
                generators, same output, whatever ``batch_size``: a single generator for several samples is split
                into one seeded generator per sample; for one sample (one image, ``ensemble_size=1``) it is used as
                given, so ``g`` and ``[g]`` give the same result, as in diffusers.
            batch_size: samples (images x members) denoised together; default all at once. Lower it to save memory.
                ``"auto"``: all at once on an accelerator; on a CPU as many as keep one denoiser call within 48k
                float32 pixels, 96k in half precision (a batch of 5 x 256^2 runs slower there than 5 single passes).
                Same output either way.
            tile_size: if set and the image is larger, each denoiser call runs on overlapping ``tile_size`` windows
                blended with a Gaussian (MONAI ``sliding_window_inference``); the noisy mask stays one image, so any
                scheduler works unchanged. Must be a multiple of the UNet's down-sampling factor.
            tile_overlap: overlap of neighbouring windows as a fraction of ``tile_size``.
            processing_resolution: the size each image is segmented at (Marigold's name); every output comes back
                at the input's size (member probabilities resized bilinearly, then fused). ``"auto"`` (default): the
                photograph's field of view is found and resized to span the checkpoint's ``field_of_view_diameter``
                (the scale its models learnt vessels at, 920 px for the CHASE_DB1 references); within 5 % of it the
                image is kept as it is; a photograph without a dark surround (a crop inside the retina) is only
                shrunk, to a longer side of at most that diameter; a checkpoint that records no diameter segments
                natively. ``None`` or ``"native"``: as given. An int: the longer side in pixels.
                ``output.processing`` says what each image got.
            camera_degrees: the camera's field-of-view angle (e.g. 45), when known: ``"auto"`` then matches the
                checkpoint's pixels per degree (``field_of_view_diameter / field_of_view_degrees``), not its diameter,
                so a wider camera's vessels get the width the models learnt.
            output_type: ``"pil"``, ``"np"`` or ``"pt"``.
            return_members: also return each member's probabilities.
            return_dict: return a [`SegmentationEnsemblePipelineOutput`] instead of a tuple.
            callback_on_step_end: called after every step as ``callback(pipe, step, timestep, callback_kwargs)``;
                may return ``{"latents": ...}`` to replace the noisy masks of the current batch.
            callback_on_step_end_tensor_inputs: tensors passed in ``callback_kwargs`` (``["latents"]``).

        Examples:
        """
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 1. Check inputs (defaults stored with the checkpoint first)
        if num_inference_steps is None:
            num_inference_steps = self.config.get("default_denoising_steps") or 50
        if threshold is None:
            threshold = self.config.get("default_threshold") or 0.5
        check_num_inference_steps(num_inference_steps)
        self.check_inputs(ensemble_size, fusion, threshold, batch_size, tile_size, tile_overlap, output_type,
                          callback_on_step_end_tensor_inputs, processing_resolution)
        device = self._execution_device
        dtype = self.unet.dtype

        # 2. Prepare the images, one generator per sample, and the size each image is segmented at
        images = tensor_to_source_intensities(prepare_images(image, self.image_channels),
                                              self.config.get("input_transform")).to(device=device, dtype=dtype)
        num_images, size = images.shape[0], tuple(images.shape[-2:])
        generators = per_sample_generators(generator, num_images * ensemble_size, device,
                                           "member and image (images x ensemble_size)")
        plans = self.image_processor.plan_processing(images, processing_resolution, auto_processing_diameter(
            self.config, processing_resolution, camera_degrees))
        groups = processing_groups(plans)
        anchor = self.config.get("anchor") if self.prior is not None else None

        # 3. Denoise the samples (image-major order) of each group of images, chunk by chunk, at the group's size;
        # member probabilities come back at the input's size
        self._num_timesteps = len(self.anchored_timesteps(num_inference_steps, device))
        self._interrupt = False
        chunks = {group_size: sample_chunks(len(indices) * ensemble_size, samples_per_call(
            batch_size, len(indices) * ensemble_size, window_pixels(*self._padded(group_size), tile_size), device,
            dtype)) for group_size, indices in groups}
        member_probs = torch.empty(num_images, ensemble_size, self.mask_channels, *size, device=device)
        with self.progress_bar(total=sum(map(len, chunks.values())) * self._num_timesteps) as progress_bar:
            for group_size, indices in groups:
                group_generators = [generators[i * ensemble_size + k] for i in indices for k in range(ensemble_size)]
                samples = self._sample_members(
                    self.image_processor.resize(images[indices], group_size), group_generators, ensemble_size,
                    chunks[group_size], num_inference_steps, anchor, tile_size, tile_overlap, progress_bar,
                    callback_on_step_end, callback_on_step_end_tensor_inputs)
                # NaN from damaged weights or a half-precision overflow is an error, not an empty mask
                check_finite_output(samples, "The masks sampled by SegmentationEnsemblePipeline", hint=f"unet "
                                    f"dtype {dtype}" + (f", prior dtype {self.prior.dtype}" if anchor else ""))
                probs = self.image_processor.resize(diffusion_to_probabilities(samples), size, mode="bilinear")
                member_probs[indices] = probs.reshape(len(indices), ensemble_size, *probs.shape[1:])

        # 4. Post-process: fusion -> uncertainty
        masks, probabilities = fuse_members(member_probs, method=fusion, threshold=threshold)
        uncertainty = uncertainty_maps(member_probs)
        self.maybe_free_model_hooks()

        output = self.image_processor.postprocess_segmentation(
            masks, probabilities, uncertainty, member_probs if return_members else None, self.num_classes, output_type)
        output["processing"] = plans
        if not return_dict:
            return tuple(output.values())
        return SegmentationEnsemblePipelineOutput(**output)
