"""Intervals for vessel measures from the members of a segmentation ensemble: each member measured, the members'
spread as an interval (raw quantiles), and split-conformal factors that calibrate it (``measure_intervals.json``
beside a pipeline); plus the JSON record and one-line format the ``measure`` command writes."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
from huggingface_hub import try_to_load_from_cache

from ..image_processing.field_of_view import field_of_view_mask
from .vessel_measures import (
    CALIBRATION_FILE,
    DEFAULT_CONFIDENCE,
    LOWER_BOUNDS,
    MEASURE_NAMES,
    MeasureError,
    MeasureInterval,
    VesselMeasures,
    vessel_measures,
)



def member_intervals(member_values: Sequence[Mapping[str, float]], confidence: float = DEFAULT_CONFIDENCE,
                     scale: Optional[Mapping[str, float]] = None,
                     centre: Optional[Mapping[str, float]] = None) -> Dict[str, MeasureInterval]:
    """Per measure, the members' ``mean``, ``std`` (ddof 1) and a central ``confidence`` interval.

    Without ``scale`` the interval is the members' own ``(1 - c) / 2`` and ``(1 + c) / 2`` quantiles (linear
    interpolation; with 5 members a 90 % interval is nearly their range). With ``scale`` (a factor per measure, from
    :func:`conformal_scales` on calibration data) it is ``centre ± scale * std``, ``centre`` the members' mean unless
    given (e.g. the fused mask's values), its lower end clipped at the smallest value the measure can take.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"`confidence` must lie in (0, 1), got {confidence!r}.")
    if len(member_values) < 2:
        raise ValueError(f"An interval needs at least two members, got {len(member_values)}.")
    result = {}
    for key in member_values[0]:
        values = np.asarray([float(v[key]) for v in member_values])
        values = values[np.isfinite(values)]
        if len(values) == 0:
            result[key] = MeasureInterval(*(float("nan"),) * 4)
            continue
        mean = float(values.mean())
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        if scale is not None and key in scale:
            middle = mean if centre is None else float(centre[key])
            low, high = max(middle - scale[key] * std, LOWER_BOUNDS.get(key, 0.0)), middle + scale[key] * std
        else:
            low, high = (float(q) for q in np.quantile(values, [(1 - confidence) / 2, (1 + confidence) / 2]))
        result[key] = MeasureInterval(mean=mean, std=std, low=low, high=high)
    return result


def conformal_scales(intervals: Sequence[Mapping[str, MeasureInterval]], references: Sequence[Mapping[str, float]],
                     confidence: float = DEFAULT_CONFIDENCE,
                     centres: Optional[Sequence[Mapping[str, float]]] = None) -> Dict[str, float]:
    """Split-conformal factors: per measure, the ``ceil((n + 1) c) / n`` quantile of ``|reference - centre| / std``
    over ``n`` calibration units (their member intervals, reference values and, if given, centres; default the
    members' mean), so that ``centre ± factor * std`` covers a new unit's reference with probability at least ``c``
    when units are exchangeable. Calibrate on training photographs only, never on the images the intervals are
    judged on."""
    scales = {}
    for key in intervals[0]:
        scores = []
        for index, (interval, reference) in enumerate(zip(intervals, references)):
            spread = max(interval[key].std, 1e-12)
            middle = interval[key].mean if centres is None else centres[index][key]
            if math.isfinite(reference[key]) and math.isfinite(middle):
                scores.append(abs(reference[key] - middle) / spread)
        if not scores:
            continue
        level = min(1.0, math.ceil((len(scores) + 1) * confidence) / len(scores))
        scales[key] = float(np.quantile(scores, level, method="higher"))
    return scales


def measure_with_intervals(
    mask,
    members: Optional[Sequence] = None,
    field_of_view=None,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    calibration: Optional["IntervalCalibration"] = None,
    name: str = "mask",
    **scale: Optional[float],
) -> Tuple[VesselMeasures, Optional[Dict[str, MeasureInterval]]]:
    """The measures of a fused ``mask`` and, from its ensemble ``members`` (binary masks, e.g. the member
    probabilities of ``return_members=True`` thresholded), an interval per measure (:func:`member_intervals`; with a
    ``calibration``, ``centre ± factor * std`` instead of the raw quantiles). ``scale``: one of ``pixel_size_um``,
    ``fov_diameter_um``, ``fov_degrees``. A member with no vessel pixel is left out; with fewer than two measurable
    members the intervals are ``None``.

    Example:
        >>> import numpy as np
        >>> tube = np.zeros((64, 64), bool); tube[29:34, 8:56] = True
        >>> wider = tube.copy(); wider[28] = tube[29]
        >>> fused, intervals = measure_with_intervals(tube, [tube, wider, tube])
        >>> fused["calibre_median"] <= intervals["calibre_median"].high
        True
    """
    fused = vessel_measures(mask, field_of_view, name=name, **scale)
    member_values = []
    for index, member in enumerate([] if members is None else members):
        try:
            member_values.append(vessel_measures(member, field_of_view, name=f"{name} member {index + 1}",
                                                 **scale).values)
        except MeasureError as error:
            if "no vessel" not in str(error):
                raise
    if len(member_values) < 2:
        return fused, None
    if calibration is None:
        return fused, member_intervals(member_values, confidence)
    centre = fused.values if calibration.centre == "fused" else None
    return fused, member_intervals(member_values, confidence, calibration.factors, centre)


# ------------------------------------------------------------------------------------------------ for callers


def photograph_field_of_view(image: np.ndarray) -> Tuple[np.ndarray, str]:
    """A photograph's field of view (``(H, W[, C])`` uint8 or float in [0, 1]) and how it was found: ``"detected"``,
    or the whole image when it has no dark surround."""

    array = np.asarray(image).astype(np.float32) / (255.0 if np.asarray(image).dtype == np.uint8 else 1.0)
    fov = field_of_view_mask(array if array.ndim == 3 else array[..., None])
    if fov.all():
        return fov, "whole image (no field of view detected)"
    return fov, "detected"


@dataclass
class IntervalCalibration:
    """Calibrated intervals saved next to a pipeline (:data:`CALIBRATION_FILE`): ``centre ± factors[measure] * std``
    of the member measures, ``centre`` the members' ``"mean"`` or the ``"fused"`` mask's value; ``label`` says where
    the factors come from."""

    factors: Dict[str, float]
    centre: str
    confidence: float
    label: str


RAW_INTERVAL_LABEL = "raw member quantiles"


def load_interval_calibration(folder, confidence: float = DEFAULT_CONFIDENCE) -> Optional[IntervalCalibration]:
    """The calibration saved in a pipeline ``folder`` if there is one for this ``confidence``, else ``None`` (raw
    member quantiles)."""
    path = Path(folder) / CALIBRATION_FILE
    if not Path(folder).is_dir():  # a Hub repo id: the file from the local cache, if it was downloaded
        cached = try_to_load_from_cache(str(folder), CALIBRATION_FILE)
        path = Path(cached) if isinstance(cached, str) else path
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    if not math.isclose(record.get("confidence", -1.0), confidence):
        return None
    return IntervalCalibration(factors=record["factors"], centre=record.get("centre", "mean"),
                               confidence=record["confidence"],
                               label=f"calibrated (split-conformal, {record.get('calibrated_on', 'training data')})")


def measures_record(fused: VesselMeasures, intervals: Optional[Mapping[str, MeasureInterval]],
                    fov_note: str = "given") -> Dict:
    """A JSON-ready record: the field of view's note, the pixel size and per measure ``value`` and ``unit`` (plus
    ``mean``, ``std``, ``low``, ``high`` with intervals)."""
    record: Dict = {"field_of_view": "; ".join([fov_note] + fused.notes), "pixel_size_um": fused.pixel_size_um,
                    "measures": {}}
    for key in MEASURE_NAMES:
        entry = {"value": fused.values[key], "unit": fused.units[key]}
        if intervals is not None:
            interval = intervals[key]
            entry.update(mean=interval.mean, std=interval.std, low=interval.low, high=interval.high)
        record["measures"][key] = entry
    return record


def format_measure(key: str, entry: Mapping) -> str:
    """One line: ``name value [low, high] unit`` (no interval without members)."""
    unit = "" if entry["unit"] in ("-", "count", "fraction") else f" {entry['unit']}"
    text = f"{key.replace('_', ' ')} {entry['value']:.4g}"
    if entry.get("low") is not None and math.isfinite(entry["low"]):
        text += f" [{entry['low']:.4g}, {entry['high']:.4g}]"
    return text + unit
