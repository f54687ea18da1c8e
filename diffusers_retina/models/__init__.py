"""Models of diffusers-retina, one file per model; each is a diffusers ``ModelMixin`` + ``ConfigMixin``.

The segmentation ensemble uses a stock ``diffusers.UNet2DModel``; custom models are added here and found by name when
a saved pipeline's shim files are mapped back to the package (see ``pipelines/loading.py``).
"""

__all__ = []
