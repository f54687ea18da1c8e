from ...feature_cache import FeatureCache  # the training-side cache, kept importable from here
from .feature_extraction import FEATURE_DTYPES, POLICIES, FeatureExtractionMixin
from .pipeline_diffusion_features import DiffusionFeaturePipeline, DiffusionFeaturePipelineOutput

__all__ = ["FEATURE_DTYPES", "POLICIES", "DiffusionFeaturePipeline", "DiffusionFeaturePipelineOutput", "FeatureCache",
           "FeatureExtractionMixin"]
