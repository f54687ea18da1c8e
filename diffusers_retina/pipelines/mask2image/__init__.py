from .pipeline_mask2image import Mask2ImagePipeline, Mask2ImagePipelineOutput

__all__ = ["Mask2ImagePipeline", "Mask2ImagePipelineOutput"]
