"""Models of diffusers-retina, one file per model; each is a diffusers ``ModelMixin`` + ``ConfigMixin``.

The segmentation ensemble runs on a stock ``diffusers.UNet2DModel`` or on ``MedSegDiffUNet2DModel``;
``PriorFeatureRefinerModel`` is its light denoiser over a prior's features;
``ConditionalUNet2DModel`` paints images from masks; ``PixelMLPEnsemble`` and ``FreqAggHead`` segment from diffusion features. The classes
listed here are found by name when a saved pipeline's shim files are mapped back to the package (see
``pipelines/pipeline_utils.py``).
"""

from .conditional_unet import SPADE, ConditionalUNet2DModel
from .feature_refiner import PriorFeatureRefinerModel, segmenter_feature_channels, segmenter_features
from .freq_agg_head import FreqAggHead, frequency_bands
from .medsegdiff_unet import DynamicConditionalEncoding, FFParser, MedSegDiffUNet2DModel, MedSegDiffUNet2DOutput
from .pixel_mlp_ensemble import FeatureHeadOutput, PixelMLPEnsemble, read_pixels

__all__ = [
    "ConditionalUNet2DModel",
    "DynamicConditionalEncoding",
    "FeatureHeadOutput",
    "FFParser",
    "FreqAggHead",
    "MedSegDiffUNet2DModel",
    "MedSegDiffUNet2DOutput",
    "PixelMLPEnsemble",
    "PriorFeatureRefinerModel",
    "SPADE",
    "frequency_bands",
    "read_pixels",
    "segmenter_feature_channels",
    "segmenter_features",
]
