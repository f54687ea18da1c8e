"""Moving a photograph towards the intensities a segmenter learnt from: intensity inversion, histogram matching to
the source photographs, and both; and the JSON-able record of such a transform that a checkpoint keeps
(``input_transform`` of the segmentation and AdaptDiff pipelines), so that an adapted segmenter reads its target
through the same transform it was fine-tuned through, without the source photographs.

Everything here takes ``(H, W)`` or ``(H, W, C)`` arrays (``C`` = 1 or 3): floats in ``[0, 1]`` or 8/16-bit integers;
results are float32 in ``[0, 1]``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np
import torch

from .field_of_view import field_of_view_mask, unit_image


#: Quantile levels of histogram matching to source photographs
MATCHING_QUANTILES = 1025


def reference_quantiles(references, reference_fovs=None, num_quantiles: int = MATCHING_QUANTILES) -> np.ndarray:
    """The pooled intensity quantiles of the source photographs ``references`` (one image or a list), per channel and
    inside each field of view (``reference_fovs``; None: every pixel): a ``(C, num_quantiles)`` float array at evenly
    spaced probabilities from 0 to 1. What :func:`match_histograms` maps onto, and what a checkpoint stores so that
    it can match histograms without the source photographs (:func:`source_intensity_transform`)."""
    references = references if isinstance(references, (list, tuple)) else [references]
    references = [unit_image(r, "reference") for r in references]
    if not references:
        raise ValueError("`references` is empty: give at least one source photograph.")
    if reference_fovs is None:
        reference_fovs = [np.ones(r.shape[:2], dtype=bool) for r in references]
    reference_fovs = reference_fovs if isinstance(reference_fovs, (list, tuple)) else [reference_fovs]
    levels = np.linspace(0.0, 1.0, int(num_quantiles))
    channels = max(r.shape[-1] for r in references)
    table = []
    for channel in range(channels):
        pooled = np.concatenate([r[..., min(channel, r.shape[-1] - 1)][np.asarray(f, dtype=bool)]
                                 for r, f in zip(references, reference_fovs)])
        if pooled.size == 0:
            raise ValueError("The references' fields of view are empty: no pixel to take quantiles of.")
        table.append(np.quantile(pooled, levels))
    return np.stack(table).astype(np.float64)


def match_quantiles(image: np.ndarray, quantiles, image_fov: Optional[np.ndarray] = None) -> np.ndarray:
    """Map every channel of ``image`` onto the intensity distribution given by ``quantiles`` (``(C, Q)``: per channel,
    the values at evenly spaced probabilities from 0 to 1, e.g. :func:`reference_quantiles`), using only the pixels
    inside ``image_fov``; pixels outside it are left unchanged. A grey image matched to colour quantiles gets three
    channels."""
    array = unit_image(image, "image")
    table = np.asarray(quantiles, dtype=np.float64)
    if table.ndim != 2 or table.shape[1] < 2:
        raise ValueError(f"`quantiles` must be a (channels, levels >= 2) table, got shape {table.shape}.")
    image_fov = np.ones(array.shape[:2], dtype=bool) if image_fov is None else np.asarray(image_fov, dtype=bool)
    channels = max(array.shape[-1], table.shape[0])
    array = np.repeat(array, channels, axis=-1) if array.shape[-1] == 1 else array
    levels = np.linspace(0.0, 1.0, table.shape[1])
    out = array.copy()
    for channel in range(channels):
        values = array[..., channel][image_fov]
        if values.size == 0:
            continue
        out[..., channel][image_fov] = np.interp(values, np.quantile(values, levels),
                                                 table[min(channel, table.shape[0] - 1)])
    return np.clip(out, 0.0, 1.0)


def match_histograms(image: np.ndarray, reference: np.ndarray, image_fov: Optional[np.ndarray] = None,
                     reference_fov: Optional[np.ndarray] = None) -> np.ndarray:
    """Map every channel of ``image`` onto the intensity distribution of ``reference`` (quantile mapping), using only
    the pixels inside each field of view (the black surround would otherwise dominate both histograms); pixels
    outside ``image_fov`` are left unchanged. A grey image matched to a colour reference gets three channels.

    AdaptDiff matches its synthetic images to the target this way; "histogram matching of the input to the source"
    is one of the simple adaptation baselines. ``reference`` may be a list of images (their pooled histogram)."""
    return match_quantiles(image, reference_quantiles(reference, reference_fov), image_fov)


def invert_intensity(image: np.ndarray, fov: Optional[np.ndarray] = None) -> np.ndarray:
    """``1 - x`` inside the field of view (computed when not given), black outside: the intensity-inversion baseline
    (an angiogram's bright vessels become dark, as in the green channel of a colour photograph)."""
    array = unit_image(image, "image")
    fov = field_of_view_mask(array) if fov is None else np.asarray(fov, dtype=bool)
    return np.where(fov[..., None], 1.0 - array, 0.0).astype(np.float32)


INTENSITY_TRANSFORMS = ("none", "invert", "histmatch", "invert+histmatch")
#: Quantile levels a stored histogram-matching transform keeps per channel (8-bit photographs have 256 levels)
STORED_QUANTILES = 257


def _check_transform_name(transform, name: str = "transform") -> None:
    if transform not in INTENSITY_TRANSFORMS:
        raise ValueError(f"`{name}` must be one of {INTENSITY_TRANSFORMS}, got {transform!r}.")


def to_source_intensities(image: np.ndarray, transform: str, references: Optional[list] = None,
                          reference_fovs: Optional[list] = None, fov: Optional[np.ndarray] = None) -> np.ndarray:
    """A target image moved towards the source's intensities by a simple transform: ``none``, ``invert``
    (:func:`invert_intensity`), ``histmatch`` (:func:`match_histograms` to the pooled histogram of the source
    photographs ``references``) or ``invert+histmatch`` (both, in that order). The simple baselines of adaptation,
    and a way to get usable pseudo-labels from a source segmenter that cannot read the raw target. Moving many images
    the same way, build the record once (``source_intensity_transform(..., num_quantiles=MATCHING_QUANTILES,
    decimals=None)``: the same mapping) and apply it with :func:`apply_source_intensity_transform`."""
    record = source_intensity_transform(transform, references, reference_fovs, MATCHING_QUANTILES, decimals=None)
    return apply_source_intensity_transform(image, record, fov)


def source_intensity_transform(transform: str, references: Optional[list] = None,
                               reference_fovs: Optional[list] = None, num_quantiles: int = STORED_QUANTILES,
                               decimals: Optional[int] = 6) -> Dict[str, Any]:
    """:func:`to_source_intensities` as a JSON-able record a checkpoint keeps, so that it moves its inputs without
    the source photographs: ``{"transform": NAME, "reference_quantiles": [[...], ...] or None}`` (the references'
    pooled ``num_quantiles`` quantiles per channel, :func:`reference_quantiles`, rounded to ``decimals``; None: as
    computed). Apply it with :func:`apply_source_intensity_transform`; pipelines take it as their
    ``input_transform``.

    Example:
        >>> photo = np.zeros((32, 32, 3)); photo[4:28, 4:28] = (0.8, 0.4, 0.2)
        >>> record = source_intensity_transform("invert+histmatch", [photo])
        >>> record["transform"], np.asarray(record["reference_quantiles"]).shape
        ('invert+histmatch', (3, 257))
    """
    _check_transform_name(transform)
    quantiles = None
    if "histmatch" in transform:
        if not references:
            raise ValueError(f"`transform={transform!r}` needs source `references` to match the histogram to.")
        table = reference_quantiles(list(references), reference_fovs, num_quantiles)
        quantiles = [[float(v) if decimals is None else round(float(v), decimals) for v in row] for row in table]
    return {"transform": transform, "reference_quantiles": quantiles}


def check_source_intensity_transform(record, name: str = "input_transform") -> None:
    """``None`` or a :func:`source_intensity_transform` record; ``ValueError`` naming ``name`` otherwise."""
    if record is None:
        return
    if not isinstance(record, dict) or set(record) != {"transform", "reference_quantiles"}:
        raise ValueError(f"`{name}` must be None or a dict with 'transform' and 'reference_quantiles' (see "
                         f"diffusers_retina.data.modality.source_intensity_transform), got {record!r:.200}.")
    _check_transform_name(record["transform"], f"{name}['transform']")
    quantiles = record["reference_quantiles"]
    if "histmatch" not in record["transform"]:
        if quantiles is not None:
            raise ValueError(f"`{name}`: transform {record['transform']!r} matches no histogram; "
                             "'reference_quantiles' must be None.")
        return
    try:
        table = np.asarray(quantiles, dtype=np.float64)
    except (TypeError, ValueError):
        table = np.zeros((0,))
    if (table.ndim != 2 or table.shape[0] not in (1, 3) or table.shape[1] < 2 or not np.isfinite(table).all()
            or (np.diff(table, axis=1) < 0).any() or table.min() < 0 or table.max() > 1):
        raise ValueError(f"`{name}['reference_quantiles']` must be 1 or 3 rows of at least 2 non-decreasing values "
                         f"in [0, 1], got {np.shape(quantiles) if table.size else quantiles!r:.200}.")


def transform_name(record: Optional[Dict[str, Any]]) -> str:
    """The name of a stored transform record (``"none"`` for None): what the commands' summaries report."""
    return record["transform"] if record else "none"


def apply_source_intensity_transform(image: np.ndarray, record: Optional[Dict[str, Any]],
                                     fov: Optional[np.ndarray] = None) -> np.ndarray:
    """``image`` moved by a stored :func:`source_intensity_transform` record (``None``: unchanged, as float32 in
    [0, 1]); ``fov`` is found when not given."""
    array = unit_image(image, "image")
    if record is None or record["transform"] == "none":
        return array.astype(np.float32)
    fov = field_of_view_mask(array) if fov is None else np.asarray(fov, dtype=bool)
    if "invert" in record["transform"]:
        array = invert_intensity(array, fov)
    if "histmatch" in record["transform"]:
        array = match_quantiles(array, record["reference_quantiles"], fov)
    return array.astype(np.float32)


def tensor_to_source_intensities(images: torch.Tensor, record: Optional[Dict[str, Any]]) -> torch.Tensor:
    """:func:`apply_source_intensity_transform` on an ``NCHW`` batch in ``[-1, 1]`` (the pipelines' images); the
    result keeps the batch's channel count, dtype and device. ``None`` (or ``"none"``) returns ``images``."""
    if record is None or record["transform"] == "none":
        return images
    moved = []
    for image in images:
        array = ((image.detach().float().permute(1, 2, 0).cpu().numpy() + 1.0) / 2.0).clip(0.0, 1.0)
        out = apply_source_intensity_transform(array, record)
        if out.shape[-1] != array.shape[-1]:  # a grey model input matched to colour quantiles: back to grey
            out = out.mean(axis=-1, keepdims=True)
        moved.append(torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1))
    return (torch.stack(moved) * 2.0 - 1.0).to(device=images.device, dtype=images.dtype)
