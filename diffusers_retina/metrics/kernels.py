"""The per-image kernels of the metrics: input checks and conversion, and one function per metric on one 2-D mask
(used by :mod:`.segmentation` and :mod:`.brats`)."""

from __future__ import annotations

import math
import warnings
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]
MetricValue = Union[float, np.ndarray]


# ------------------------------------------------------------------------------------------------ input handling


def _to_numpy(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.numpy()
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(x)
    except Exception as error:  # pragma: no cover - only for exotic inputs
        raise TypeError(f"`{name}` must be a torch tensor or a numpy array, got {type(x).__name__}.") from error


def _as_binary(x: ArrayLike, name: str) -> np.ndarray:
    array = _to_numpy(x, name)
    if array.dtype == bool:
        return array
    if array.size and not np.isin(array, (0, 1)).all():
        raise ValueError(f"`{name}` must be binary (0/1 or bool); threshold probabilities before passing them.")
    return array.astype(bool)


def _as_probability(x: ArrayLike, name: str) -> np.ndarray:
    array = _to_numpy(x, name).astype(np.float64, copy=False)
    if array.size and not (np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0):
        raise ValueError(f"`{name}` must hold probabilities in [0, 1].")
    return array


def _prepare(
    pred: Optional[ArrayLike] = None,
    prob: Optional[ArrayLike] = None,
    target: Optional[ArrayLike] = None,
    fov: Optional[ArrayLike] = None,
) -> List[Optional[np.ndarray]]:
    """Convert and validate inputs; all given arrays must share one shape, (H, W) or (N, H, W)."""
    arrays = [
        None if pred is None else _as_binary(pred, "pred"),
        None if prob is None else _as_probability(prob, "prob"),
        None if target is None else _as_binary(target, "target"),
        None if fov is None else _as_binary(fov, "fov"),
    ]
    names = ("pred", "prob", "target", "fov")
    shapes = {name: a.shape for name, a in zip(names, arrays) if a is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"Inputs must have the same shape, got {shapes}.")
    ndim = next(iter(shapes.values()))
    if len(ndim) not in (2, 3):
        raise ValueError(f"Inputs must be (H, W) or (N, H, W), got shape {ndim}.")
    return arrays


def _per_image(function: Callable[..., float], arrays: Sequence[Optional[np.ndarray]]) -> MetricValue:
    """Apply ``function`` to one (H, W) image, or to each image of an (N, H, W) batch."""
    reference = next(a for a in arrays if a is not None)
    if reference.ndim == 2:
        return float(function(*arrays))
    return np.array(
        [function(*(None if a is None else a[index] for a in arrays)) for index in range(reference.shape[0])],
        dtype=np.float64,
    )


def _restrict(mask: np.ndarray, fov: Optional[np.ndarray]) -> np.ndarray:
    """Pixels outside the FOV are set to background (for metrics that need the image grid)."""
    return mask if fov is None else mask & fov


def _select(values: np.ndarray, fov: Optional[np.ndarray]) -> np.ndarray:
    """Flat array of the pixels inside the FOV (for metrics on pixel sets)."""
    return values.reshape(-1) if fov is None else values[fov]


def _monai_image(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]


# ------------------------------------------------------------------------------------------- per-image kernels


def _dice_2d(pred: np.ndarray, target: np.ndarray, fov: Optional[np.ndarray]) -> float:
    from monai.metrics import compute_dice

    pred, target = _restrict(pred, fov), _restrict(target, fov)
    value = compute_dice(_monai_image(pred), _monai_image(target), include_background=True, ignore_empty=False)
    return float(value.item())


def _iou_2d(pred: np.ndarray, target: np.ndarray, fov: Optional[np.ndarray]) -> float:
    from monai.metrics import compute_iou

    pred, target = _restrict(pred, fov), _restrict(target, fov)
    value = compute_iou(_monai_image(pred), _monai_image(target), include_background=True, ignore_empty=False)
    return float(value.item())


def _cldice_counts(pred: np.ndarray, target: np.ndarray) -> Tuple[int, int, int, int]:
    """``(|S(P) ∩ V_L|, |S(P)|, |S(L) ∩ V_P|, |S(L)|)`` with S the skeleton (scikit-image)."""
    from skimage.morphology import skeletonize

    skeleton_pred = skeletonize(pred) if pred.any() else pred
    skeleton_target = skeletonize(target) if target.any() else target
    return (
        int(np.count_nonzero(skeleton_pred & target)),
        int(np.count_nonzero(skeleton_pred)),
        int(np.count_nonzero(skeleton_target & pred)),
        int(np.count_nonzero(skeleton_target)),
    )


def _cldice_from_counts(pred_in_target: int, pred_skeleton: int, target_in_pred: int, target_skeleton: int) -> float:
    if pred_skeleton == 0 and target_skeleton == 0:
        return 1.0  # both empty: perfect agreement
    if pred_skeleton == 0 or target_skeleton == 0:
        return 0.0  # one empty: no topology recovered
    topology_precision = pred_in_target / pred_skeleton
    topology_sensitivity = target_in_pred / target_skeleton
    if topology_precision + topology_sensitivity == 0:
        return 0.0
    return 2.0 * topology_precision * topology_sensitivity / (topology_precision + topology_sensitivity)


def _cldice_2d(pred: np.ndarray, target: np.ndarray, fov: Optional[np.ndarray]) -> float:
    return _cldice_from_counts(*_cldice_counts(_restrict(pred, fov), _restrict(target, fov)))


def _hd95(pred: np.ndarray, target: np.ndarray, spacing: Optional[Sequence[float]] = None) -> float:
    """HD95 of one 2-D or 3-D pair (MONAI), in pixels or with voxel ``spacing``: 0 when both are empty, inf when one
    is."""
    from monai.metrics import compute_hausdorff_distance

    has_pred, has_target = bool(pred.any()), bool(target.any())
    if not has_pred and not has_target:
        return 0.0
    if has_pred != has_target:
        return math.inf
    with warnings.catch_warnings():
        # MONAI 1.6 warns about its own internal use of a deprecated argument.
        warnings.simplefilter("ignore", FutureWarning)
        # MONAI accepts Python floats only (nibabel's get_zooms() gives numpy float32)
        spacing_list = None if spacing is None else [float(value) for value in spacing]
        value = compute_hausdorff_distance(_monai_image(pred), _monai_image(target), include_background=True,
                                           percentile=95, spacing=spacing_list)
    return float(value.item())


def _hd95_2d(pred: np.ndarray, target: np.ndarray, fov: Optional[np.ndarray]) -> float:
    return _hd95(_restrict(pred, fov), _restrict(target, fov))


def _score_counts(prob: np.ndarray, target: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Positives and negatives per distinct score, in increasing score order (ties share one entry)."""
    _, inverse = np.unique(prob, return_inverse=True)
    inverse = inverse.reshape(-1)
    total = np.bincount(inverse).astype(np.float64)
    positives = np.bincount(inverse, weights=target.reshape(-1).astype(np.float64), minlength=total.size)
    return positives, total - positives


def _auc_roc_from_counts(positives: np.ndarray, negatives: np.ndarray) -> float:
    """Mann-Whitney AUC from per-score counts in increasing score order; tied pairs count one half."""
    num_positive, num_negative = positives.sum(), negatives.sum()
    if num_positive == 0 or num_negative == 0:
        return math.nan
    negatives_below = np.cumsum(negatives) - negatives
    return float(np.sum(positives * (negatives_below + 0.5 * negatives)) / (num_positive * num_negative))


def _auc_pr_from_counts(positives: np.ndarray, negatives: np.ndarray) -> float:
    """Average precision sum_k ΔRecall_k · Precision_k over thresholds at each distinct score (scikit-learn's AP)."""
    num_positive = positives.sum()
    if num_positive == 0:
        return math.nan
    true_positives = np.cumsum(positives[::-1])  # thresholds from the highest score down
    predicted = true_positives + np.cumsum(negatives[::-1])
    precision = np.divide(true_positives, predicted, out=np.zeros_like(true_positives), where=predicted > 0)
    return float(np.sum(positives[::-1] * precision) / num_positive)


def _auc_roc_2d(prob: np.ndarray, target: np.ndarray, fov: Optional[np.ndarray]) -> float:
    return _auc_roc_from_counts(*_score_counts(_select(prob, fov), _select(target, fov)))


def _auc_pr_2d(prob: np.ndarray, target: np.ndarray, fov: Optional[np.ndarray]) -> float:
    return _auc_pr_from_counts(*_score_counts(_select(prob, fov), _select(target, fov)))


def _calibration_bins(prob: np.ndarray, target: np.ndarray, num_bins: int) -> np.ndarray:
    """``(3, num_bins)`` rows: pixel count, sum of probabilities, sum of targets per equal-width bin (MONAI)."""
    from monai.metrics import calibration_binning

    if prob.size == 0:
        return np.zeros((3, num_bins))
    prob_t = torch.from_numpy(np.ascontiguousarray(prob, dtype=np.float32)).reshape(1, 1, -1)
    target_t = torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32)).reshape(1, 1, -1)
    mean_prob, mean_target, counts = (t[0, 0].double().numpy() for t in calibration_binning(prob_t, target_t, num_bins))
    return np.stack([counts, np.nan_to_num(mean_prob) * counts, np.nan_to_num(mean_target) * counts])


def _ece_from_bins(bins: np.ndarray) -> float:
    counts, sum_prob, sum_target = bins
    total = counts.sum()
    if total == 0:
        return math.nan
    # sum_b |B|/N · |mean(target in b) - mean(prob in b)| = sum_b |sum target - sum prob| / N
    return float(np.abs(sum_target - sum_prob).sum() / total)


def _ece_2d(prob: np.ndarray, target: np.ndarray, fov: Optional[np.ndarray], num_bins: int) -> float:
    return _ece_from_bins(_calibration_bins(_select(prob, fov), _select(target, fov), num_bins))


