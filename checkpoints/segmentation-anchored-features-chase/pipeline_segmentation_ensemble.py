# Shim written by diffusers-retina: the code of this component lives in the `diffusers-retina` package.
try:
    from diffusers_retina.pipelines.segmentation_ensemble import SegmentationEnsemblePipeline  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the user's environment
    raise ImportError("SegmentationEnsemblePipeline needs the diffusers-retina package: `pip install diffusers-retina`") from error
