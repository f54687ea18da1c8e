from .pipeline_segmentation_ensemble import (
    ANCHORS,
    FUSION_METHODS,
    SegmentationEnsemblePipeline,
    SegmentationEnsemblePipelineOutput,
    check_feature_refiner,
)

__all__ = ["ANCHORS", "FUSION_METHODS", "SegmentationEnsemblePipeline", "SegmentationEnsemblePipelineOutput",
           "check_feature_refiner"]
