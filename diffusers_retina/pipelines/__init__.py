from .adaptdiff import AdaptDiffPipeline, AdaptDiffPipelineOutput, AdaptDiffSegmentationOutput
from .diffusion_features import DiffusionFeaturePipeline, DiffusionFeaturePipelineOutput
from .pipeline_utils import RetinaPipelineMixin
from .mask2image import Mask2ImagePipeline, Mask2ImagePipelineOutput
from .segmentation_ensemble import SegmentationEnsemblePipeline, SegmentationEnsemblePipelineOutput

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
]
