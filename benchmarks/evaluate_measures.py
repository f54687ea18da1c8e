"""Vessel measures with intervals on the CHASE_DB1 test photographs: which interval method holds, and how close the
measures come to a human's.

Reads the members written by ``measure_predictions.py`` (``--work``) and, per unit (a whole photograph, and each
quadrant of its field of view: 8 + 32 test units), measures the first observer's mask (``1stHO``, the reference), the
second observer's (``2ndHO``), the fused mask of each method (mean probability > 0.5) and each member
(probability > 0.5), with :func:`diffusers_retina.measures.vessel_measures` in pixels.

Interval methods (members -> :func:`member_intervals`, 90 % central):

* ``anchored``: the residual-anchored diffusion ensemble, 5 members (its own samples);
* ``tta``: the U-Net under 8 flips/rotations and 2 rescales, 10 members;
* ``deep``: the prior plus 4 out-of-fold U-Nets, 5 members;
* ``jitter``: the U-Net's probability thresholded at 0.30, 0.35, ..., 0.70 (9 members; fixed, not tuned).

Each method's interval is reported raw (the members' 5 % and 95 % quantiles) and calibrated: ``centre ± s * std``
with a split-conformal factor ``s`` per measure fitted on the 20 *training* photographs (units of the same kind),
each predicted by the out-of-fold U-Net that never saw it (the anchored pipeline with that U-Net as its prior; its
refiner did see them, so its training spread may be tighter than on new photographs). The centre (the members' mean
or the fused mask's value) is, per method, the one whose calibrated intervals are narrower on the training units for
most measures. ``deep`` has no out-of-fold form on training photographs and is reported raw only. Nothing is fitted
or chosen on the test photographs.

Columns per measure and method (over the test units): ``error`` mean |fused - 1stHO|; ``human`` mean
|2ndHO - 1stHO|; ``cover1``/``cover2`` the share of units whose 90 % interval holds the 1stHO / 2ndHO value;
``width`` the mean interval width; ``rho`` Spearman's rank correlation of interval width with the fused error.

    python benchmarks/evaluate_measures.py --splits test shift --processes 2
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, List, Optional, Tuple  # noqa: E402

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from measure_predictions import SPLITS  # noqa: E402

from diffusers_retina.data.modality import field_of_view_mask  # noqa: E402
from diffusers_retina.measures import (  # noqa: E402
    CORE_MEASURES,
    MEASURE_NAMES,
    MeasureError,
    conformal_scales,
    member_intervals,
    vessel_measures,
)

METHODS = ("anchored", "tta", "deep", "jitter")
JITTER_THRESHOLDS = tuple(np.round(np.linspace(0.3, 0.7, 9), 2))
CONFIDENCE = 0.9
UNIT_KINDS = ("quadrant", "whole")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/measures", help="measure_predictions.py output.")
    parser.add_argument("--splits", nargs="+", default=["test", "shift"], choices=["test", "shift"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--output", default="benchmarks/results/evaluate_measures.json")
    parser.add_argument("--collect-only", action="store_true",
                        help="Only measure the member files there are (filling the cache), no table.")
    parser.add_argument("--calibration-output", default=None,
                        help="Also write the anchored method's whole-photograph conformal factors here (e.g. "
                             "checkpoints/segmentation-anchored-chase/measure_intervals.json).")
    return parser.parse_args(argv)


def unit_masks(fov: np.ndarray) -> Dict[str, np.ndarray]:
    """The whole field of view and its four quadrants about the field of view's centre (bounding-box middle)."""
    rows, cols = np.nonzero(fov.any(axis=1))[0], np.nonzero(fov.any(axis=0))[0]
    centre_row, centre_col = (rows[0] + rows[-1] + 1) // 2, (cols[0] + cols[-1] + 1) // 2
    yy, xx = np.mgrid[:fov.shape[0], :fov.shape[1]]
    units = {"whole": fov}
    for index, (top, left) in enumerate([(True, True), (True, False), (False, True), (False, False)], start=1):
        units[f"q{index}"] = fov & ((yy < centre_row) == top) & ((xx < centre_col) == left)
    return units


def safe_measures(mask: np.ndarray, fov: np.ndarray) -> Dict[str, float]:
    try:
        return vessel_measures(mask, fov).values
    except MeasureError:  # no vessel pixel in this unit (a member or a quadrant): no value
        return {name: float("nan") for name in MEASURE_NAMES}


def measure_file(task: Tuple[str, str, str, str]) -> Tuple[Tuple[str, str, str], Dict]:
    """Measures of every unit of one photograph for one source: ``refs`` (the two observers) or a method."""
    work, source, split, stem = task
    root = _common.chase_root_or_exit()
    image = np.asarray(PIL.Image.open(root / "images" / f"{stem}.jpg").convert("RGB"), dtype=np.float32) / 255.0
    units = unit_masks(field_of_view_mask(image))
    result: Dict[str, Dict] = {}
    if source == "refs":
        for observer in ("1stHO", "2ndHO"):
            mask = np.asarray(PIL.Image.open(root / observer / f"{stem}_{observer}.png")) > 0
            result[observer] = {unit: safe_measures(mask, fov) for unit, fov in units.items()}
        return (source, split, stem), result
    stored = np.load(Path(work) / ("unet" if source == "jitter" else source) / split / f"{stem}.npz")
    fused = stored["fused"].astype(np.float32) / 255.0
    if source == "jitter":
        members = [fused > t for t in JITTER_THRESHOLDS]
    else:
        members = [m.astype(np.float32) / 255.0 > 0.5 for m in stored["members"]]
    result["fused"] = {unit: safe_measures(fused > 0.5, fov) for unit, fov in units.items()}
    result["members"] = {unit: [safe_measures(m, fov) for m in members] for unit, fov in units.items()}
    return (source, split, stem), result


def collect(args, splits: List[str]) -> Dict[Tuple[str, str, str], Dict]:
    """All measures, cached per (source, split, stem) in ``<work>/measures/`` (reruns are cheap)."""
    cache_dir = Path(args.work) / "measures"
    cache_dir.mkdir(parents=True, exist_ok=True)
    tasks, found = [], {}
    for split in splits:
        sources = ["refs"] + [m for m in args.methods if not (split == "train" and m == "deep")]
        for source in sources:
            for stem in SPLITS[split]:
                path = cache_dir / f"{source}_{split}_{stem}.json"
                stored = Path(args.work) / ("unet" if source == "jitter" else source) / split / f"{stem}.npz"
                if path.is_file():
                    found[(source, split, stem)] = json.loads(path.read_text())
                elif source == "refs" or stored.is_file():
                    tasks.append((args.work, source, split, stem))
                else:
                    print(f"missing {stored} (run measure_predictions.py)", flush=True)
    if tasks:
        print(f"measuring {len(tasks)} (source, photograph) pairs with {args.processes} process(es)", flush=True)
        with ProcessPoolExecutor(max_workers=args.processes) as pool:
            for key, value in pool.map(measure_file, tasks):
                found[key] = value
                (cache_dir / f"{key[0]}_{key[1]}_{key[2]}.json").write_text(json.dumps(value))
    return found


def units_of(kind: str) -> List[str]:
    return ["whole"] if kind == "whole" else ["q1", "q2", "q3", "q4"]


def spearman(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 3 or np.ptp(a[keep]) == 0 or np.ptp(b[keep]) == 0:
        return None
    ranks = [np.argsort(np.argsort(x[keep])).astype(float) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def method_units(found, method: str, split: str, kind: str):
    """Per unit: (intervals, fused values, 1stHO values, 2ndHO values)."""
    out = []
    for stem in SPLITS[split]:
        refs, measured = found[("refs", split, stem)], found[(method, split, stem)]
        for unit in units_of(kind):
            members = [m for m in measured["members"][unit] if np.isfinite(m["vessel_density"])]
            if len(members) < 2:
                continue
            out.append((member_intervals(members, CONFIDENCE), measured["fused"][unit], refs["1stHO"][unit],
                        refs["2ndHO"][unit]))
    return out


def calibrate(train) -> Dict:
    """Conformal factors on the training units for both centres (the members' mean, the fused mask's value), and
    the centre whose calibrated intervals are narrower there for most measures (chosen on training units only)."""
    scales = {"mean": conformal_scales([u[0] for u in train], [u[2] for u in train], CONFIDENCE),
              "fused": conformal_scales([u[0] for u in train], [u[2] for u in train], CONFIDENCE,
                                        centres=[u[1] for u in train])}
    narrower = sum(scales["fused"][name] < scales["mean"][name] for name in MEASURE_NAMES
                   if name in scales["fused"] and name in scales["mean"])
    centre = "fused" if narrower > len(MEASURE_NAMES) / 2 else "mean"
    return {"centre": centre, "factors": scales[centre], "factors_by_centre": scales,
            "fused_narrower_for": narrower, "units": len(train)}


def summarise(units, calibration: Optional[Dict]) -> Dict[str, Dict]:
    scales = None if calibration is None else calibration["factors"]
    table = {}
    for name in MEASURE_NAMES:
        fused = np.array([u[1][name] for u in units])
        first = np.array([u[2][name] for u in units])
        second = np.array([u[3][name] for u in units])
        error = np.abs(fused - first)
        entry = {"error": float(np.nanmean(error)), "human": float(np.nanmean(np.abs(second - first))),
                 "units": len(units)}
        for label, factor in (("raw", None), ("calibrated", None if scales is None else scales.get(name))):
            if label == "calibrated" and factor is None:
                continue
            intervals = []
            for u in units:
                i = u[0][name]
                middle = u[1][name] if calibration and calibration["centre"] == "fused" else i.mean
                low, high = (i.low, i.high) if factor is None else (middle - factor * i.std, middle + factor * i.std)
                intervals.append((low, high))
            lows, highs = np.array(intervals).T
            entry[label] = {
                "cover1": float(np.nanmean((lows <= first) & (first <= highs))),
                "cover2": float(np.nanmean((lows <= second) & (second <= highs))),
                "width": float(np.nanmean(highs - lows)),
                "rho": spearman(highs - lows, error),
            }
            if factor is not None:
                entry[label]["factor"] = factor
        table[name] = entry
    return table


def best_methods(results: Dict, split: str, kind: str) -> Dict[str, Optional[str]]:
    """Per measure: the narrowest interval (method, raw/calibrated) whose 1stHO coverage lies in [0.8, 1]."""
    best = {}
    for name in MEASURE_NAMES:
        candidates = []
        for method, tables in results[split][kind].items():
            for label in ("raw", "calibrated"):
                entry = tables[name].get(label)
                if entry and 0.8 <= entry["cover1"] <= 1.0:
                    candidates.append((entry["width"], f"{method} ({label})"))
        best[name] = min(candidates)[1] if candidates else None
    return best


def _f(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def table_markdown(results: Dict, split: str, kind: str, names=CORE_MEASURES + ("curvature", "end_points")) -> str:
    """One markdown table: per measure and method, the fused error against the observers' difference, and the raw
    and calibrated intervals' 1stHO coverage, width and width-error rank correlation."""
    lines = ["| Measure | Method | Error | Observers | Cover 1stHO (raw / cal.) | Cover 2ndHO (raw / cal.) | "
             "Width (raw / cal.) | ρ(width, error) (raw / cal.) |", "|---|---|---|---|---|---|---|---|"]
    for name in names:
        for method, tables in results[split][kind].items():
            e = tables[name]
            raw, cal = e["raw"], e.get("calibrated") or {}
            lines.append(f"| {name} | {method} | {_f(e['error'])} | {_f(e['human'])} | "
                         f"{raw['cover1']:.2f} / {_f(cal.get('cover1'), 2)} | "
                         f"{raw['cover2']:.2f} / {_f(cal.get('cover2'), 2)} | "
                         f"{_f(raw['width'])} / {_f(cal.get('width'))} | {_f(raw['rho'], 2)} / {_f(cal.get('rho'), 2)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    _common.chase_root_or_exit()
    found = collect(args, list(args.splits) + ["train"])
    if args.collect_only:
        return 0
    results: Dict = {split: {} for split in args.splits}
    calibration: Dict = {}
    for kind in UNIT_KINDS:
        calibration[kind] = {}
        for method in args.methods:
            if method == "deep":
                continue
            calibration[kind][method] = calibrate(method_units(found, method, "train", kind))
        for split in args.splits:
            results[split][kind] = {method: summarise(method_units(found, method, split, kind),
                                                      calibration[kind].get(method))
                                    for method in args.methods}
    for split in args.splits:
        for kind in UNIT_KINDS:
            print(f"\n{split}, {kind} units (1stHO reference; 90 % intervals: raw | calibrated on training "
                  "photographs)")
            rows = []
            for name in CORE_MEASURES + ("curvature", "end_points"):
                for method in args.methods:
                    e = results[split][kind][method][name]
                    raw, cal = e["raw"], e.get("calibrated") or {}
                    rows.append([name, method, e["error"], e["human"], raw["cover1"], raw["width"], raw["rho"],
                                 cal.get("cover1"), cal.get("width"), cal.get("rho")])
            _common.print_table(["measure", "method", "error", "human", "cover", "width", "rho", "cover (cal)",
                                 "width (cal)", "rho (cal)"], rows)
            results[split].setdefault("best", {})[kind] = best_methods(results, split, kind)
    output = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": _common.command(),
        "machine": _common.machine_info(torch.device("cpu")),
        "confidence": CONFIDENCE,
        "jitter_thresholds": list(JITTER_THRESHOLDS),
        "calibration": calibration,
        "results": results,
        "seconds": {method: {split: [float(np.load(Path(args.work) / ("unet" if method == "jitter" else method) /
                                                   split / f"{stem}.npz")["seconds"]) for stem in SPLITS[split]]
                             for split in args.splits} for method in args.methods},
    }
    output["markdown"] = {f"{split}/{kind}": table_markdown(results, split, kind)
                          for split in args.splits for kind in UNIT_KINDS}
    _common.save_json(args.output, _common.finite_or_none(output))
    print(f"\nwrote {args.output}")
    if args.calibration_output:
        record = {"confidence": CONFIDENCE, "unit": "whole photograph",
                  "method": "split-conformal: centre ± factor * std of the member measures",
                  "calibrated_on": "20 CHASE_DB1 training photographs, out-of-fold priors, "
                                   "benchmarks/evaluate_measures.py",
                  "centre": calibration["whole"]["anchored"]["centre"],
                  "factors": calibration["whole"]["anchored"]["factors"]}
        Path(args.calibration_output).write_text(json.dumps(_common.finite_or_none(record), indent=2) + "\n")
        print(f"wrote {args.calibration_output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
