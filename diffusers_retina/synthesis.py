"""Helpers for judging mask-to-image synthesis: picture grids and mask faithfulness (segment the synthetic image with
a segmentation pipeline and score it against the mask it was painted from)."""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import PIL.Image
import torch

from .metrics import dice


def to_uint8_rgb(array: np.ndarray) -> np.ndarray:
    """``HW`` / ``HWC`` arrays (bool, class indices, floats in [0, 1] or uint8) to ``HWx3`` uint8 for a picture."""
    array = np.asarray(array)
    if array.dtype == bool or (np.issubdtype(array.dtype, np.integer) and array.max(initial=0) <= 1):
        array = array.astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    array = array.astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return array


def image_grid(rows: Sequence[Sequence[np.ndarray]], gap: int = 4) -> PIL.Image.Image:
    """A white-separated grid; every cell is converted with `to_uint8_rgb` and all cells share one size."""
    cells = [[to_uint8_rgb(cell) for cell in row] for row in rows]
    height, width = cells[0][0].shape[:2]
    columns = max(len(row) for row in cells)
    canvas = np.full((len(cells) * (height + gap) - gap, columns * (width + gap) - gap, 3), 255, np.uint8)
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            canvas[r * (height + gap): r * (height + gap) + height, c * (width + gap): c * (width + gap) + width] = cell
    return PIL.Image.fromarray(canvas)


@torch.no_grad()
def mask_faithfulness(segmenter, images: torch.Tensor, masks: torch.Tensor, num_inference_steps: int = 2,
                      ensemble_size: int = 3, tile_size: Optional[int] = 256, seed: int = 0) -> List[float]:
    """Dice between each synthetic image's segmentation (by ``segmenter``, a SegmentationEnsemblePipeline) and the
    binary mask it was painted from.

    Args:
        images: ``(N, 3, H, W)`` in ``[0, 1]`` (the synthesis pipeline's ``output_type="pt"``).
        masks: ``(N, H, W)`` class indices (binary).
    """
    scores = []
    for image, mask in zip(images, masks):
        result = segmenter(image[None], num_inference_steps=num_inference_steps, ensemble_size=ensemble_size,
                           generator=torch.Generator().manual_seed(seed), tile_size=tile_size, output_type="pt")
        scores.append(float(dice(result.masks[0].cpu().numpy() > 0, mask.cpu().numpy() > 0)))
    return scores
