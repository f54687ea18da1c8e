from .loading import RetinaPipelineMixin
from .segmentation_ensemble import SegmentationEnsemblePipeline, SegmentationEnsemblePipelineOutput

__all__ = ["RetinaPipelineMixin", "SegmentationEnsemblePipeline", "SegmentationEnsemblePipelineOutput"]
