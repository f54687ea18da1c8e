"""The remote-code layout of saved pipelines, in one leaf module: the names and the shim files.

Every saved pipeline records its classes as remote code (``pipeline_<name>.py`` and ``<component>/<module>.py``), each a
one-line shim that imports the class from this package; :mod:`diffusers_retina.pipelines.pipeline_utils` writes and reads
that layout, and :mod:`diffusers_retina.bundle` rewrites the pipeline shim of pushed repos. This module imports
nothing from the package, so both can import it.

Example:
    >>> print(shim_source("diffusers_retina.models.conditional_unet", "ConditionalUNet2DModel").splitlines()[2])
        from diffusers_retina.models.conditional_unet import ConditionalUNet2DModel  # noqa: F401
"""

from __future__ import annotations

import re

#: The import name of the package the shims import.
PACKAGE = "diffusers_retina"
#: How a user gets the package; named in every error a shim raises.
INSTALL_HINT = "pip install diffusers-retina"
#: The first words of every shim file this package writes (how a shim is told from user code).
SHIM_HEADER = "# Shim written by diffusers-retina"


def snake_case(name: str) -> str:
    """``SegmentationEnsemblePipeline`` -> ``segmentation_ensemble`` (the pipeline file's name)."""
    name = re.sub(r"Pipeline$", "", name)
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def shim_source(module: str, class_name: str) -> str:
    """Source of a shim file that re-exports ``class_name`` from ``module`` of this package."""
    return (
        f"{SHIM_HEADER}: the code of this component lives in the `diffusers-retina` package.\n"
        f"try:\n"
        f"    from {module} import {class_name}  # noqa: F401\n"
        f"except ImportError as error:  # pragma: no cover - depends on the user's environment\n"
        f"    raise ImportError(\"{class_name} needs the diffusers-retina package: `{INSTALL_HINT}`\") from error\n"
    )


__all__ = ["INSTALL_HINT", "PACKAGE", "SHIM_HEADER", "shim_source", "snake_case"]
