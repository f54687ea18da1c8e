# Shim written by diffusers-retina: the code of this component lives in the `diffusers-retina` package.
try:
    from diffusers_retina.models.conditional_unet import ConditionalUNet2DModel  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the user's environment
    raise ImportError("ConditionalUNet2DModel needs the diffusers-retina package: `pip install diffusers-retina`") from error
