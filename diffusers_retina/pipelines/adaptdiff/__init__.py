from .pipeline_adaptdiff import (
    PSEUDO_LABEL_MODES,
    AdaptDiffPipeline,
    AdaptDiffPipelineOutput,
    AdaptDiffSegmentationOutput,
    check_pseudo_label_settings,
    pseudo_labels,
)

__all__ = ["PSEUDO_LABEL_MODES", "AdaptDiffPipeline", "AdaptDiffPipelineOutput", "AdaptDiffSegmentationOutput",
           "check_pseudo_label_settings", "pseudo_labels"]
