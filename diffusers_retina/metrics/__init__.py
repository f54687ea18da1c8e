"""Segmentation metrics: overlap, topology, boundary, ranking and calibration (:mod:`.segmentation`, on per-image
kernels in :mod:`.kernels`), and BraTS region metrics (:mod:`.brats`)."""

from .brats import BRATS_REGIONS, brats_region_masks, brats_region_metrics
from .kernels import ArrayLike, MetricValue
from .segmentation import (
    METRIC_NAMES,
    MetricAccumulator,
    auc_pr,
    auc_roc,
    cldice,
    dice,
    expected_calibration_error,
    hd95,
    iou,
    negative_log_likelihood,
    segmentation_metrics,
)

__all__ = [
    "ArrayLike",
    "BRATS_REGIONS",
    "METRIC_NAMES",
    "MetricAccumulator",
    "MetricValue",
    "auc_pr",
    "auc_roc",
    "brats_region_masks",
    "brats_region_metrics",
    "cldice",
    "dice",
    "expected_calibration_error",
    "hd95",
    "iou",
    "negative_log_likelihood",
    "segmentation_metrics",
]
