"""Argument and output checks shared by the pipelines' ``__call__`` (issue 15): step counts, guidance scales and
non-finite outputs raise errors naming the argument or the component instead of failing deep inside a scheduler or
returning a black image."""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from ..image_processing import processing_diameter
from ..models import PriorFeatureRefinerModel, segmenter_feature_channels


class NonFiniteOutputError(RuntimeError):
    """A pipeline produced NaN or infinite values (damaged weights, or an overflow in half precision)."""


def check_num_inference_steps(value, name: str = "num_inference_steps", allow_none: bool = False) -> None:
    """``value`` must be a positive integer (``bool`` is not one); ``ValueError`` naming ``name`` otherwise."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def check_guidance_scale(value, name: str = "guidance_scale") -> None:
    """A finite real number >= 0; ``ValueError`` naming ``name`` otherwise (NaN/inf would paint black images)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0 (1: no guidance), got {value!r}.")


def check_finite_output(tensor: torch.Tensor, what: str, hint: Optional[str] = None) -> None:
    """Raise :class:`NonFiniteOutputError` when ``tensor`` holds NaN or infinite values."""
    if not torch.isfinite(tensor).all():
        count = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteOutputError(
            f"{what} holds {count} NaN or infinite value(s)"
            f"{': ' + hint if hint else ''}. Check the weights (NaN weights) or run in float32 (half-precision "
            "overflow).")


def check_field_of_view_diameter(value, name: str = "field_of_view_diameter") -> None:
    """``None`` (unknown) or a positive integer number of pixels; ``ValueError`` naming ``name`` otherwise."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 8:
        raise ValueError(f"`{name}` must be None or the training photographs' field-of-view diameter in pixels "
                         f"(an int >= 8), got {value!r}.")


def auto_processing_diameter(config, processing_resolution, camera_degrees: Optional[float]) -> Optional[int]:
    """The field-of-view diameter a segmenting pipeline's ``processing_resolution="auto"`` aims at: its checkpoint's
    ``field_of_view_diameter``, or with ``camera_degrees`` the checkpoint's pixels per degree times that angle
    (:func:`diffusers_retina.image_processing.processing_diameter`). ``camera_degrees`` with another
    ``processing_resolution`` is an error (it would be ignored)."""
    if camera_degrees is not None and processing_resolution != "auto":
        raise ValueError(f"`camera_degrees` ({camera_degrees!r}) sets the scale of processing_resolution='auto'; got "
                         f"processing_resolution={processing_resolution!r}.")
    return processing_diameter(config.get("field_of_view_diameter"), config.get("field_of_view_degrees"),
                               camera_degrees)


def check_feature_refiner(unet: PriorFeatureRefinerModel, prior, anchor: Optional[str]) -> None:
    """A feature-reusing refiner needs the prior it was trained on (its features are its input), residual anchoring,
    and a prior whose last decoder features have the refiner's ``feature_channels``."""
    if prior is None:
        raise ValueError(
            "The unet is a PriorFeatureRefinerModel: it refines the decoder features of a `prior` segmenter and cannot "
            "run without one, but this pipeline has prior=None. Load the pipeline folder with its prior/ component "
            "(or pass prior=UNet2DModel.from_pretrained(...), the segmenter the refiner was trained on).")
    if anchor != "residual":
        raise ValueError(f"A PriorFeatureRefinerModel denoises the residual to its prior: it needs anchor='residual', "
                         f"got {anchor!r}.")
    channels = segmenter_feature_channels(prior)
    if channels != unet.config.feature_channels:
        raise ValueError(
            f"The unet (PriorFeatureRefinerModel) takes feature_channels={unet.config.feature_channels} but the prior "
            f"({type(prior).__name__}) gives {channels} decoder feature channels (the input of its conv_out, "
            "block_out_channels[0]): the refiner was trained on another prior.")
