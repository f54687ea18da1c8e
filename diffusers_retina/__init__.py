"""diffusers-retina: diffusion models for retinal image analysis as Hugging Face diffusers pipelines."""

__version__ = "0.1.0"

from .pipelines import (  # noqa: E402
    AdaptDiffPipeline,
    AdaptDiffPipelineOutput,
    AdaptDiffSegmentationOutput,
    DiffusionFeaturePipeline,
    DiffusionFeaturePipelineOutput,
    Mask2ImagePipeline,
    Mask2ImagePipelineOutput,
    RetinaPipelineMixin,
    SegmentationEnsemblePipeline,
    SegmentationEnsemblePipelineOutput,
)

__all__ = [
    "AdaptDiffPipeline",
    "AdaptDiffPipelineOutput",
    "AdaptDiffSegmentationOutput",
    "DiffusionFeaturePipeline",
    "DiffusionFeaturePipelineOutput",
    "Mask2ImagePipeline",
    "Mask2ImagePipelineOutput",
    "RetinaPipelineMixin",
    "SegmentationEnsemblePipeline",
    "SegmentationEnsemblePipelineOutput",
    "__version__",
]
