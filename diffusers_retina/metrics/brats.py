"""BraTS region metrics: Dice and HD95 (in mm, with the volume's spacing) of the whole tumour, the tumour core and the
enhancing tumour, from label maps."""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .kernels import ArrayLike, _dice_2d, _hd95, _to_numpy


#: BraTS evaluation regions and the labels in each. 4 is the enhancing tumour of BraTS <= 2021; BraTS 2023 and this
#: project's class indices (``BRATS_LABEL_TO_CLASS``: 0, 1, 2, 4 -> 0, 1, 2, 3) write it as 3, so both count.
BRATS_REGIONS: Dict[str, Tuple[int, ...]] = {
    "whole_tumour": (1, 2, 3, 4),
    "tumour_core": (1, 3, 4),
    "enhancing_tumour": (3, 4),
}


def _brats_labels(x: ArrayLike, name: str) -> np.ndarray:
    array = _to_numpy(x, name)
    if array.ndim not in (2, 3):
        raise ValueError(f"`{name}` must be one (H, W) slice or one (X, Y, Z) volume of labels, "
                         f"got shape {array.shape}.")
    if array.size and not np.isin(array, (0, 1, 2, 3, 4)).all():
        values = sorted(set(np.unique(array).tolist()) - {0, 1, 2, 3, 4})[:10]
        raise ValueError(f"`{name}` has values {values} outside the BraTS labels {{0, 1, 2, 4}} / "
                         "classes {0, 1, 2, 3}.")
    return array


def brats_region_masks(labels: ArrayLike) -> Dict[str, np.ndarray]:
    """The binary masks of the BraTS regions (:data:`BRATS_REGIONS`) in a label map.

    Example:
        >>> masks = brats_region_masks(np.array([[0, 1, 2, 4]]))
        >>> {name: mask.astype(int).tolist() for name, mask in masks.items()}
        {'whole_tumour': [[0, 1, 1, 1]], 'tumour_core': [[0, 1, 0, 1]], 'enhancing_tumour': [[0, 0, 0, 1]]}
    """
    array = _brats_labels(labels, "labels")
    return {region: np.isin(array, values) for region, values in BRATS_REGIONS.items()}


def brats_region_metrics(
    pred: ArrayLike, target: ArrayLike, spacing: Optional[Sequence[float]] = None
) -> Dict[str, Dict[str, float]]:
    """BraTS' Dice and HD95 of the whole tumour, tumour core and enhancing tumour from two label maps.

    ``pred`` and ``target`` are one case each, of the same shape: a 2-D slice ``(H, W)`` or a 3-D volume
    ``(X, Y, Z)`` (unlike the other metrics here, a 3-D input is one volume, not a batch of images, so Dice counts
    voxels over the whole volume and HD95 measures 3-D surface distances). Labels are BraTS' {0, 1, 2, 4} or the
    4-class output of the pipeline {0, 1, 2, 3} (3 = enhancing tumour; see :data:`BRATS_REGIONS`).

    Dice follows :func:`dice` (MONAI; both regions empty gives 1.0). HD95 follows :func:`hd95` (MONAI; both empty
    gives 0.0, exactly one empty ``inf``; the BraTS challenge reports 373.13 mm there instead) and is in units of
    ``spacing`` (voxel sizes, e.g. ``nibabel_image.header.get_zooms()[:3]``; default 1 = voxels).

    Returns:
        ``{region: {"dice": float, "hd95": float}}`` for the regions of :data:`BRATS_REGIONS`, in that order.

    Example:
        >>> target = np.zeros((20, 20), int); target[5:15, 5:15] = 2; target[8:12, 8:12] = 4
        >>> pred = target.copy(); pred[8:12, 8:12] = 1  # enhancing tumour predicted as necrosis
        >>> scores = brats_region_metrics(pred, target)
        >>> scores["whole_tumour"]["dice"], scores["tumour_core"]["dice"], scores["enhancing_tumour"]["dice"]
        (1.0, 1.0, 0.0)
    """
    pred_array, target_array = _brats_labels(pred, "pred"), _brats_labels(target, "target")
    if pred_array.shape != target_array.shape:
        raise ValueError(f"`pred` and `target` must have the same shape, got {pred_array.shape} and "
                         f"{target_array.shape}.")
    if spacing is not None and len(tuple(spacing)) != pred_array.ndim:
        raise ValueError(f"`spacing` needs one value per axis ({pred_array.ndim}), got {tuple(spacing)}.")
    pred_masks, target_masks = brats_region_masks(pred_array), brats_region_masks(target_array)
    return {
        region: {
            "dice": _dice_2d(pred_masks[region], target_masks[region], None),
            "hd95": _hd95(pred_masks[region], target_masks[region], spacing),
        }
        for region in BRATS_REGIONS
    }
