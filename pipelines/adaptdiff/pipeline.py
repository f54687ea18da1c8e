# Community-pipeline entry point for the Hub: `DiffusionPipeline.from_pretrained(repo, custom_pipeline=<this folder
# or file>, trust_remote_code=True)`. The implementation lives in the `diffusers-retina` package
# (diffusers_retina/pipelines/adaptdiff/pipeline_adaptdiff.py); this file only re-exports it, so there is one copy of
# the code.
try:
    from diffusers_retina.pipelines.adaptdiff import AdaptDiffPipeline  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the user's environment
    raise ImportError("AdaptDiffPipeline needs the diffusers-retina package: `pip install diffusers-retina`") from error
