"""Vessel measures from a binary vessel mask, and intervals for them from ensemble members.

Retinal studies relate the vasculature's geometry to disease: density, calibre, tortuosity, fractal dimension and
branching, each computed from a photograph's vessel mask (the field's tools: PVBM, VascX, AutoMorph). This module
computes them from a mask and its field of view, in pixels or, with a physical scale, in micrometres, and turns the
members of a segmentation ensemble (``return_members=True``) into an interval per measure: measure each member, and
the members' spread is the segmentation's uncertainty about the measure.

Libraries used, and what is written here and why:

* skeleton graph: **skan** (``Skeleton``, ``summarize``: branches between junctions and ends, their path length,
  chord and pixel paths); skeletonisation, distance transform and labelling: scikit-image and SciPy.
* PVBM (MIT, ``pip install pvbm``) was checked and is not used at run time: its geometric measures need the optic
  disc's centre and radius (found by an ONNX model it downloads), its tortuosity is the pixel-path arc over chord
  (which reads a straight line at 22.5 degrees as 8 % tortuous), and it pulls torchvision, onnxruntime and OpenCV.
  ``benchmarks/pvbm_agreement.py`` compares the measures both compute on the CHASE_DB1 reference masks.
* written here: box counting over box sizes tied to the field of view (so the dimension does not change with the
  photograph's resolution), arc length and curvature on smoothed skeleton paths (the pixel staircase removed), spur
  pruning relative to the local calibre, and the member intervals.

Definitions (``D`` = the field of view's diameter in pixels, the larger side of its bounding box):

* ``vessel_density``: vessel pixels in the field of view / field-of-view pixels.
* ``length_density``: skeleton length / field-of-view area (1/px; mm/mm² with a scale); each segment's length is
  measured on its smoothed path (below), not its pixel staircase.
* ``fractal_dimension``: box-counting dimension of the vessel mask in the field of view: the slope of
  ``log N(s)`` against ``log(1/s)`` over box sides ``s = D/256, D/128, ..., D/8`` (at least 2 px), boxes aligned to
  the field of view's top-left corner. Not PVBM's ``D0`` (20 box sizes from 5 px to 0.6 of the image, best of 25
  rotations): it reads about 0.12 lower and ranks eyes differently (``benchmarks/pvbm_agreement.py``); pass
  ``box_sizes`` to count at other sizes.
* ``tortuosity``: arc / chord of each skeleton segment (between junctions and ends) whose chord is at least ``D/100``,
  averaged with the arc lengths as weights; arcs are measured on the path smoothed with a Gaussian of ``D/150`` px
  (at least 3 px) and resampled every ``D/115`` px (at least 4 px), which removes the pixel staircase (a straight
  line at 22.5 degrees reads 1.000, where the pixel path reads 1.08). 1 for straight vessels.
* ``curvature``: the total absolute turning angle of those smoothed segments over their length (rad/px; rad/mm with
  a scale): a curvature-based tortuosity index. Its floor on a straight line is 0.0005 rad/px at ``D = 920`` (0.004
  below ``D = 450``, where the smoothing stops shrinking), and it reads a bend of radius ``D/15`` about 6 % flat.
* ``calibre_median``, ``calibre_q1``, ``calibre_q3``: vessel width along the skeleton: each vessel pixel goes to its
  nearest skeleton pixel (distance transform), each segment's width is the area it owns over its length, and the
  median and quartiles are taken over the skeleton's length (px; µm with a scale). See :func:`segment_calibres`.
* ``branch_points``, ``end_points``: junctions (clusters of skeleton pixels with three or more neighbours, merged when
  a segment shorter than 1.5 vessel widths joins them) and ends of the skeleton, after removing spurs: end branches
  shorter than 1.5 times the vessel's width where they join. Every piece of the mask counts, so a fragmented
  segmentation has many ends (both ends of each small piece) and ends where the field of view cuts a vessel count too.

Physical scale: ``pixel_size_um``, or the field of view's diameter in micrometres (``fov_diameter_um``) or in degrees
(``fov_degrees``, at 288 µm per degree of visual angle on the retina, the usual emmetropic-eye conversion). Without
one, measures stay in pixels and say so (``units``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage


# skan (and numba, which it compiles with) and skimage.morphology are imported where a mask is measured, so that the
# command line, which imports this module for every sub-command, does not pay for them.

UM_PER_DEGREE = 288.0
DEFAULT_CONFIDENCE = 0.9
#: Calibrated interval factors saved next to a pipeline (``benchmarks/evaluate_measures.py --calibration-output``).
CALIBRATION_FILE = "measure_intervals.json"

# name -> (unit without a scale, unit with a scale, power of the pixel size that converts: value * (um/px)^power,
# then the factor to the scaled unit)
_UNITS: Dict[str, Tuple[str, str, int, float]] = {
    "vessel_density": ("fraction", "fraction", 0, 1.0),
    "length_density": ("1/px", "mm/mm^2", -1, 1e3),
    "fractal_dimension": ("-", "-", 0, 1.0),
    "tortuosity": ("arc/chord", "arc/chord", 0, 1.0),
    "curvature": ("rad/px", "rad/mm", -1, 1e3),
    "calibre_median": ("px", "um", 1, 1.0),
    "calibre_q1": ("px", "um", 1, 1.0),
    "calibre_q3": ("px", "um", 1, 1.0),
    "branch_points": ("count", "count", 0, 1.0),
    "end_points": ("count", "count", 0, 1.0),
}
MEASURE_NAMES: Tuple[str, ...] = tuple(_UNITS)
#: The smallest value each measure can take: calibrated intervals are clipped there (every other measure: 0).
LOWER_BOUNDS: Dict[str, float] = {"tortuosity": 1.0}
# the six measures a study reports first (one per property)
CORE_MEASURES: Tuple[str, ...] = ("vessel_density", "length_density", "fractal_dimension", "tortuosity",
                                  "calibre_median", "branch_points")


class MeasureError(ValueError):
    """A mask or field of view that cannot be measured (the message names the input)."""


@dataclass
class VesselMeasures:
    """The measures of one mask: ``values`` keyed by :data:`MEASURE_NAMES`, their ``units``, the pixel size used
    (``None``: values in pixels) and the field of view's diameter in pixels."""

    values: Dict[str, float]
    units: Dict[str, str]
    pixel_size_um: Optional[float]
    fov_diameter_px: int
    notes: List[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> float:
        return self.values[name]


@dataclass
class MeasureInterval:
    """A measure over ensemble members: ``mean``, ``std`` and a central interval ``(low, high)``."""

    mean: float
    std: float
    low: float
    high: float

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high

    @property
    def width(self) -> float:
        return self.high - self.low


def measure_units(scaled: bool) -> Dict[str, str]:
    """Each measure's unit, in pixels or (``scaled``) with a physical scale."""
    return {key: units[1] if scaled else units[0] for key, units in _UNITS.items()}


# ------------------------------------------------------------------------------------------------ inputs


def as_binary_mask(mask, name: str = "mask") -> np.ndarray:
    """A bool ``(H, W)`` array from a binary mask (bool, {0, 1} or {0, 255}; an ``L``/``1`` PIL image or an
    ``(H, W, 1)`` array). Anything else raises :class:`MeasureError` naming ``name``."""
    array = np.asarray(mask)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise MeasureError(f"{name}: a vessel mask must be one 2-D channel, got shape {array.shape}.")
    if array.dtype == bool:
        return array
    values = np.unique(array)
    if not (set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}):
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise MeasureError(f"{name}: the mask is not binary (values {shown}); threshold it first (0/1 or 0/255).")
    return array > 0


def resolve_pixel_size(fov_diameter_px: int, pixel_size_um: Optional[float] = None,
                       fov_diameter_um: Optional[float] = None, fov_degrees: Optional[float] = None
                       ) -> Optional[float]:
    """Micrometres per pixel from at most one of the three ways to give a scale (``None``: no scale)."""
    given = [v is not None for v in (pixel_size_um, fov_diameter_um, fov_degrees)]
    if sum(given) > 1:
        raise ValueError("Give at most one of `pixel_size_um`, `fov_diameter_um` and `fov_degrees`.")
    for label, value in (("pixel_size_um", pixel_size_um), ("fov_diameter_um", fov_diameter_um),
                         ("fov_degrees", fov_degrees)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"`{label}` must be a positive number, got {value!r}.")
    if pixel_size_um is not None:
        return float(pixel_size_um)
    if fov_diameter_um is not None:
        return float(fov_diameter_um) / fov_diameter_px
    if fov_degrees is not None:
        return float(fov_degrees) * UM_PER_DEGREE / fov_diameter_px
    return None


def fov_diameter(field_of_view: np.ndarray) -> int:
    """The larger side of the field of view's bounding box, in pixels."""
    rows, cols = np.nonzero(field_of_view.any(axis=1))[0], np.nonzero(field_of_view.any(axis=0))[0]
    return int(max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1)


# ------------------------------------------------------------------------------------------------ pieces


def box_counting_dimension(mask: np.ndarray, box_sizes: Sequence[int], origin: Tuple[int, int] = (0, 0)) -> float:
    """Box-counting dimension: the least-squares slope of ``log N(s)`` on ``log(1/s)``, ``N(s)`` the boxes of side
    ``s`` (grid anchored at ``origin``) holding any foreground pixel."""
    sizes = sorted({int(s) for s in box_sizes})
    if len(sizes) < 2:
        raise ValueError(f"Box counting needs at least two distinct box sizes, got {list(box_sizes)}.")
    region = mask[origin[0]:, origin[1]:]
    counts = []
    for size in sizes:
        height = -(-region.shape[0] // size) * size
        width = -(-region.shape[1] // size) * size
        padded = np.zeros((height, width), dtype=bool)
        padded[:region.shape[0], :region.shape[1]] = region
        boxes = padded.reshape(height // size, size, width // size, size).any(axis=(1, 3))
        counts.append(max(int(boxes.sum()), 1))
    slope = np.polyfit(np.log(1.0 / np.asarray(sizes, float)), np.log(np.asarray(counts, float)), 1)[0]
    return float(slope)


def default_box_sizes(diameter: int) -> List[int]:
    """``D/256, D/128, ..., D/8`` rounded, at least 2 px, duplicates dropped."""
    return sorted({max(2, int(round(diameter / 2 ** k))) for k in range(8, 2, -1)})


def _neighbour_counts(skeleton: np.ndarray) -> np.ndarray:
    kernel = np.ones((3, 3), dtype=np.int32)
    kernel[1, 1] = 0
    return ndimage.convolve(skeleton.astype(np.int32), kernel, mode="constant") * skeleton


def _smoothed(path: np.ndarray, sigma: float) -> np.ndarray:
    """A pixel path smoothed along its length with a Gaussian, float ``(n, 2)``. The path is extended past each end
    by point reflection (``2 p_0 - p_k``), so its ends stay where they are and a straight path stays straight."""
    path = path.astype(np.float64)
    if len(path) < 3:
        return path
    pad = min(len(path) - 1, int(math.ceil(3 * sigma)))
    head = 2 * path[0] - path[pad:0:-1]
    tail = 2 * path[-1] - path[-2:-pad - 2:-1]
    extended = np.concatenate([head, path, tail])
    return ndimage.gaussian_filter1d(extended, sigma=sigma, axis=0, mode="nearest")[pad:pad + len(path)]


def _resampled(path: np.ndarray, spacing: float) -> np.ndarray:
    """A polyline resampled at equal arc-length ``spacing`` (its two ends kept)."""
    cumulative = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(path, axis=0).T))])
    count = max(2, int(cumulative[-1] // spacing) + 1)
    positions = np.linspace(0.0, cumulative[-1], count)
    return np.stack([np.interp(positions, cumulative, path[:, 0]), np.interp(positions, cumulative, path[:, 1])], 1)


def _arc_and_curvature(path: np.ndarray) -> Tuple[float, float]:
    """Arc length of a polyline and the integral of its absolute turning angle (total curvature, rad)."""
    steps = np.diff(path, axis=0)
    lengths = np.hypot(steps[:, 0], steps[:, 1])
    keep = lengths > 1e-9
    steps, lengths = steps[keep], lengths[keep]
    arc = float(lengths.sum())
    if len(steps) < 2:
        return arc, 0.0
    angles = np.arctan2(steps[:, 0], steps[:, 1])
    turning = np.angle(np.exp(1j * np.diff(angles)))
    return arc, float(np.abs(turning).sum())


def prune_spurs(skeleton: np.ndarray, distance: np.ndarray, factor: float = 1.5) -> np.ndarray:
    """Remove end branches shorter than ``factor`` times the vessel width (``2 * EDT``) where they join a junction:
    the thinning's artefacts at a vessel's side, not branches. One pass (skan's graph)."""
    from skan import Skeleton, summarize

    if skeleton.sum() < 3:
        return skeleton
    graph = Skeleton(skeleton)
    table = summarize(graph, separator="_")
    pruned = skeleton.copy()
    counts = _neighbour_counts(skeleton)
    for index in np.nonzero(table["branch_type"].to_numpy() == 1)[0]:
        path = graph.path_coordinates(int(index)).astype(int)
        ends = [tuple(path[0]), tuple(path[-1])]
        junction = ends[0] if counts[ends[0]] >= 3 else ends[1]
        width = 2.0 * distance[junction]
        if table["branch_distance"].iloc[index] < factor * width:
            for point in map(tuple, path):
                if point != junction:
                    pruned[point] = False
    return pruned


def weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The ``q`` quantile of ``values`` with ``weights`` (the smallest value whose cumulative weight reaches ``q``)."""
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, q * cumulative[-1])])


def segment_calibres(vessels: np.ndarray, skeleton: np.ndarray, graph, table, arcs: np.ndarray,
                     distance: np.ndarray, ends: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Each skeleton segment's mean width and its length (the weight): every vessel pixel is given to its nearest
    skeleton pixel (the distance transform of the skeleton's complement, with indices), and a segment's width is
    the area it owns over its (smoothed) length ``arcs``; a free end adds the distance transform there (the thinning
    retracts a vessel's end by about half its width). Unlike ``2 * EDT`` at the centre line, which reads a 9 px
    vessel at 10 degrees as 7.9 px, this holds for every orientation. A single skeleton pixel is its own width."""
    if graph is None:
        return np.array([2.0 * distance[skeleton].max() - 1.0]), np.ones(1)
    labels = graph.path_label_image()
    nearest = ndimage.distance_transform_edt(~skeleton, return_indices=True)[1]
    owner = labels[nearest[0][vessels], nearest[1][vessels]]
    area = np.bincount(owner, minlength=len(table) + 1)[1:len(table) + 1].astype(np.float64)
    lengths = arcs.copy()
    for column in ("src", "dst"):
        rows = table[f"image_coord_{column}_0"].to_numpy(dtype=int)
        cols = table[f"image_coord_{column}_1"].to_numpy(dtype=int)
        lengths += np.where(ends[rows, cols], distance[rows, cols], 0.0)
    lengths = np.maximum(lengths, 1.0)
    return area / lengths, lengths


def count_branch_points(junctions: np.ndarray, table, distance: np.ndarray, factor: float = 1.5) -> int:
    """Branch points: clusters of junction pixels (8-connected), merged when a segment shorter than ``factor`` times
    the vessel's width (``2 * EDT``) joins them (thinning splits a wide fork into two junctions a width apart)."""
    labels, count = ndimage.label(junctions, structure=np.ones((3, 3)))
    if table is None or count < 2:
        return int(count)
    parent = list(range(count + 1))

    def root(label: int) -> int:
        while parent[label] != label:
            parent[label] = parent[parent[label]]
            label = parent[label]
        return label

    short = table[table["branch_type"] == 2]
    for row in short.itertuples(index=False):
        src = (int(row.image_coord_src_0), int(row.image_coord_src_1))
        dst = (int(row.image_coord_dst_0), int(row.image_coord_dst_1))
        a, b = labels[src], labels[dst]
        width = 2.0 * max(distance[src], distance[dst])
        if a and b and row.branch_distance < factor * width:
            parent[root(a)] = root(b)
    return len({root(label) for label in range(1, count + 1)})


# ------------------------------------------------------------------------------------------------ measures


def vessel_measures(
    mask,
    field_of_view=None,
    *,
    pixel_size_um: Optional[float] = None,
    fov_diameter_um: Optional[float] = None,
    fov_degrees: Optional[float] = None,
    box_sizes: Optional[Sequence[int]] = None,
    name: str = "mask",
) -> VesselMeasures:
    """The vessel measures of one binary ``mask`` inside its ``field_of_view`` (see the module docstring).

    Args:
        mask: binary vessel mask, ``(H, W)`` bool / {0, 1} / {0, 255} (array or PIL image).
        field_of_view: binary ``(H, W)`` mask of the field of view; ``None``: the whole image (and ``notes`` says so).
        pixel_size_um, fov_diameter_um, fov_degrees: at most one physical scale; none: values in pixels.
        box_sizes: box sides in pixels for the fractal dimension (default: ``D/256 ... D/8``).
        name: the input's name in error messages (a file name).

    Returns:
        A :class:`VesselMeasures`.

    Raises:
        MeasureError: a non-binary or empty mask, or a field of view of another size or empty.

    Example:
        >>> import numpy as np
        >>> tube = np.zeros((64, 64), bool); tube[29:34, 8:56] = True   # 5 px wide, 48 px long
        >>> m = vessel_measures(tube, pixel_size_um=10.0)
        >>> round(m["calibre_median"], -1), m.units["calibre_median"], m["branch_points"], m["end_points"]
        (50.0, 'um', 0.0, 2.0)
    """
    from skan import Skeleton, summarize
    from skimage.morphology import skeletonize

    vessels = as_binary_mask(mask, name)
    notes: List[str] = []
    if field_of_view is None:
        fov = np.ones_like(vessels)
        notes.append("no field of view: the whole image")
    else:
        fov = as_binary_mask(field_of_view, f"{name} (field of view)")
        if fov.shape != vessels.shape:
            raise MeasureError(f"{name}: the mask is {vessels.shape[1]}x{vessels.shape[0]} but its field of view is "
                               f"{fov.shape[1]}x{fov.shape[0]}.")
        if not fov.any():
            raise MeasureError(f"{name}: the field of view is empty.")
    vessels = vessels & fov
    if not vessels.any():
        raise MeasureError(f"{name}: the mask holds no vessel pixel inside the field of view.")
    diameter = fov_diameter(fov)
    pixel_size = resolve_pixel_size(diameter, pixel_size_um, fov_diameter_um, fov_degrees)
    fov_area = float(fov.sum())

    distance = ndimage.distance_transform_edt(vessels)
    skeleton = prune_spurs(skeletonize(vessels), distance)
    counts = _neighbour_counts(skeleton)
    junctions = counts >= 3
    ends = counts == 1

    graph = Skeleton(skeleton) if skeleton.sum() >= 2 else None
    table = summarize(graph, separator="_") if graph is not None else None
    arcs = np.zeros(0)
    weighted_tortuosity, tortuosity_weight = 0.0, 0.0
    total_turning, curvature_length = 0.0, 0.0
    if graph is not None:
        sigma, spacing, min_chord = max(3.0, diameter / 150.0), max(4.0, diameter / 115.0), diameter / 100.0
        arcs = table["branch_distance"].to_numpy(dtype=np.float64).copy()
        for index in range(len(table)):
            pixels = graph.path_coordinates(index)
            if len(pixels) < 3:
                continue  # a one- or two-pixel segment: its pixel length is its length
            path = _resampled(_smoothed(pixels, sigma), spacing)
            arc, turning = _arc_and_curvature(path)
            arcs[index] = arc
            chord = float(np.hypot(*(path[-1] - path[0])))
            if chord < min_chord or table["branch_type"].iloc[index] == 3:
                continue
            arc = max(arc, chord)
            weighted_tortuosity += arc * (arc / chord)
            tortuosity_weight += arc
            total_turning += turning
            curvature_length += arc
    branch_points = count_branch_points(junctions, table, distance)
    widths, weights = segment_calibres(vessels, skeleton, graph, table, arcs, distance, ends)

    values = {
        "vessel_density": float(vessels.sum()) / fov_area,
        "length_density": float(arcs.sum()) / fov_area,
        "fractal_dimension": box_counting_dimension(
            vessels, box_sizes or default_box_sizes(diameter),
            origin=(int(np.argmax(fov.any(axis=1))), int(np.argmax(fov.any(axis=0))))),
        "tortuosity": weighted_tortuosity / tortuosity_weight if tortuosity_weight else float("nan"),
        "curvature": total_turning / curvature_length if curvature_length else float("nan"),
        "calibre_median": weighted_quantile(widths, weights, 0.5),
        "calibre_q1": weighted_quantile(widths, weights, 0.25),
        "calibre_q3": weighted_quantile(widths, weights, 0.75),
        "branch_points": float(branch_points),
        "end_points": float(ends.sum()),
    }
    if pixel_size is not None:
        for key, (_, _, power, factor) in _UNITS.items():
            values[key] = values[key] * pixel_size ** power * (factor if power else 1.0)
    units = measure_units(scaled=pixel_size is not None)
    return VesselMeasures(values=values, units=units, pixel_size_um=pixel_size, fov_diameter_px=diameter,
                          notes=notes)
