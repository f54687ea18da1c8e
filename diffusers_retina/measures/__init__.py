"""Vessel measures from a binary vessel mask (:mod:`.vessel_measures`: density, length, fractal dimension,
tortuosity, curvature, calibre, branch and end points) and intervals for them from ensemble members
(:mod:`.intervals`)."""

from .intervals import (
    RAW_INTERVAL_LABEL,
    IntervalCalibration,
    conformal_scales,
    format_measure,
    load_interval_calibration,
    measure_with_intervals,
    measures_record,
    member_intervals,
    photograph_field_of_view,
)
from .vessel_measures import (
    CALIBRATION_FILE,
    CORE_MEASURES,
    DEFAULT_CONFIDENCE,
    LOWER_BOUNDS,
    MEASURE_NAMES,
    UM_PER_DEGREE,
    MeasureError,
    MeasureInterval,
    VesselMeasures,
    as_binary_mask,
    box_counting_dimension,
    count_branch_points,
    default_box_sizes,
    fov_diameter,
    measure_units,
    prune_spurs,
    resolve_pixel_size,
    segment_calibres,
    vessel_measures,
    weighted_quantile,
)

__all__ = [
    "CALIBRATION_FILE", "CORE_MEASURES", "DEFAULT_CONFIDENCE", "LOWER_BOUNDS", "MEASURE_NAMES", "RAW_INTERVAL_LABEL",
    "UM_PER_DEGREE", "IntervalCalibration", "MeasureError", "MeasureInterval", "VesselMeasures", "as_binary_mask",
    "box_counting_dimension", "conformal_scales", "count_branch_points", "default_box_sizes", "format_measure",
    "fov_diameter", "load_interval_calibration", "measure_units", "measure_with_intervals", "measures_record",
    "member_intervals", "photograph_field_of_view", "prune_spurs", "resolve_pixel_size", "segment_calibres",
    "vessel_measures", "weighted_quantile",
]
