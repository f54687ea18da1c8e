# Shim written by diffusers-retina: the code of this component lives in the `diffusers-retina` package.
try:
    from diffusers_retina.models.feature_refiner import PriorFeatureRefinerModel  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the user's environment
    raise ImportError("PriorFeatureRefinerModel needs the diffusers-retina package: `pip install diffusers-retina`") from error
