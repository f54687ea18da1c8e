"""Datasets, patch sampling and augmentation for segmentation diffusion models.

Every dataset yields ``{"image": float (C, H, W) in [-1, 1], "mask": long (H, W), "name": str}`` (plus
``"fov": bool (H, W)`` when a field of view is known) and raises :class:`DataError` naming the file for bad input.

Example:
    >>> from diffusers_retina.data import RandomPatchDataset, chase_db1, default_chase_db1_root
    >>> if default_chase_db1_root() is not None:
    ...     patches = RandomPatchDataset(chase_db1(split="train"), patch_size=64)
"""

from .brats import (
    BRATS_LABEL_TO_CLASS,
    BratsSliceDataset,
    NiftiCase,
    find_modality_file,
    is_nifti_file,
    nifti_bytes_like,
    nifti_case,
    nifti_stem,
    read_nifti_case,
)
from .errors import DataError
from .folder import (
    CHASE_DB1_TEST,
    CHASE_DB1_TRAIN,
    FolderPairDataset,
    chase_db1,
    ddpm_segmentation_folder,
    default_chase_db1_root,
)
from .hf import HFSegmentationDataset
from .patches import RandomPatchDataset, patch_seed
from .reading import SUPPORTED_EXTENSIONS, RawSample, RawSampleDataset, raw_to_item, read_image, read_mask
from .transforms import diffusion_inputs, random_flip_rotate

__all__ = [
    "BRATS_LABEL_TO_CLASS",
    "BratsSliceDataset",
    "NiftiCase",
    "CHASE_DB1_TEST",
    "CHASE_DB1_TRAIN",
    "DataError",
    "FolderPairDataset",
    "HFSegmentationDataset",
    "RandomPatchDataset",
    "RawSample",
    "RawSampleDataset",
    "SUPPORTED_EXTENSIONS",
    "chase_db1",
    "ddpm_segmentation_folder",
    "default_chase_db1_root",
    "diffusion_inputs",
    "find_modality_file",
    "is_nifti_file",
    "nifti_bytes_like",
    "nifti_case",
    "nifti_stem",
    "patch_seed",
    "random_flip_rotate",
    "raw_to_item",
    "read_image",
    "read_mask",
    "read_nifti_case",
]
