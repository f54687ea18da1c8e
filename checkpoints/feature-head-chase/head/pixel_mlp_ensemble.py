# Shim written by diffusers-retina: the code of this component lives in the `diffusers-retina` package.
try:
    from diffusers_retina.models.pixel_mlp_ensemble import PixelMLPEnsemble  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the user's environment
    raise ImportError("PixelMLPEnsemble needs the diffusers-retina package: `pip install diffusers-retina`") from error
