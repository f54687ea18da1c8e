"""``diffusers-retina measure``: vessel measures of each photograph, with an interval from the ensemble's members.

Each INPUT photograph is segmented by a ``SegmentationEnsemblePipeline`` (default: the embedded residual-anchored
reference), its fused mask and each member's mask are measured (:mod:`diffusers_retina.measures`: vessel density,
length density, fractal dimension, tortuosity, curvature, calibre, branch and end points) inside the photograph's
field of view, and ``measures.csv`` gets one row per photograph: each measure's value (fused mask), the members'
mean and standard deviation, the ``--confidence`` interval and the unit. ``<stem>_mask.png`` holds the fused mask.

The interval is the members' central quantile interval, or, when the pipeline folder holds ``measure_intervals.json``
(split-conformal factors fitted on training photographs by ``benchmarks/evaluate_measures.py``), ``mean ± factor *
std``; the row says which. ``--masks FOLDER`` measures masks made by any tool instead (no segmentation, no
interval); their field of view is found in the INPUT photograph of the same stem when one is given, else the whole
image is used and the row says so.

Without a physical scale (``--pixel-size-um``, ``--fov-diameter-um`` or ``--fov-degrees``) values are in pixels and
the CSV's first line says so. Runs are sharded and resumable like ``segment``: rows are appended to ``results.jsonl``
as photographs finish, and ``measures.csv`` is rewritten (atomically, without duplicates) from them at the end of
every run, so a killed run leaves no half-written row and its rerun completes the table.

Examples::

    diffusers-retina measure photos/ --output-dir study --fov-degrees 30
    diffusers-retina measure --masks vessel_masks/ photos/ --output-dir study --pixel-size-um 9.4
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import PIL.Image

from ..measures import (
    DEFAULT_CONFIDENCE,
    MEASURE_NAMES,
    MeasureError,
    as_binary_mask,
    fov_diameter,
    RAW_INTERVAL_LABEL,
    load_interval_calibration,
    measure_with_intervals,
    measure_units,
    measures_record,
    photograph_field_of_view,
    resolve_pixel_size,
    vessel_measures,
)
from ..sharded_inference import RESULTS_FILE, WorkItem, process_state, read_rows
from ..utils.io_utils import bytes_writer, png_writer, write_files_atomically

from .common import (
    CLIError,
    add_folder_run_arguments,
    add_pipeline_arguments,
    apply_threads,
    bounded,
    check_output_dir,
    check_pipeline_settings,
    collect_inputs,
    load_pipeline,
    open_unit_float,
    overlap_fraction,
    read_input_image,
    resolve_device,
    resolve_steps,
    run_folder_command,
)
from .segment import (
    segment_images,
)

MEASURES_FILE = "measures.csv"
positive_float = bounded(float, 0.0, low_inclusive=False)
PIXEL_NOTE = ("# values in pixels: no physical scale was given (--pixel-size-um, --fov-diameter-um or "
              "--fov-degrees)")


#: The ``measure`` command's one-line help and its description (``--help``).
HELP = "vessel measures (density, calibre, tortuosity, fractal dimension, branching) with intervals"
DESCRIPTION = (
    __doc__.split("\n\n")[1]
)


def build_measure_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    parser = subparsers.add_parser("measure", help=HELP, description=DESCRIPTION)
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="photographs (files or folders) to segment and measure; with --masks, the photographs "
                        "whose field of view the masks of the same stem use (optional)")
    parser.add_argument("--output-dir", required=True, type=Path, metavar="DIR",
                        help="folder for measures.csv, the masks and results.jsonl (created if missing)")
    parser.add_argument("--masks", type=Path, default=None, metavar="FOLDER",
                        help="measure the binary masks in FOLDER (0/1 or 0/255 images) instead of segmenting")
    parser.add_argument("--mask-suffix", default="", metavar="SUFFIX",
                        help="with --masks: only masks named <stem>SUFFIX.<ext> (e.g. _mask for the masks `segment` "
                        "writes); the photograph of <stem> gives the field of view (default: every image in FOLDER)")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--pixel-size-um", type=positive_float, default=None, metavar="UM",
                       help="micrometres per pixel on the retina")
    scale.add_argument("--fov-diameter-um", type=positive_float, default=None, metavar="UM",
                       help="the field of view's diameter on the retina in micrometres")
    scale.add_argument("--fov-degrees", type=positive_float, default=None, metavar="DEG",
                       help="the camera's field-of-view angle (e.g. 30, 45, 50), at 288 um per degree (units "
                       "only; --camera-degrees also sets the scale photographs are segmented at)")
    parser.add_argument("--confidence", type=open_unit_float, default=DEFAULT_CONFIDENCE, metavar="C",
                        help="central interval of the member measures (default: 0.9)")
    parser.add_argument("--threshold", type=open_unit_float, default=0.5, metavar="P",
                        help="foreground threshold of the fused probability and of each member (default: 0.5)")
    parser.add_argument("--tile-overlap", type=overlap_fraction, default=0.25, metavar="FRACTION",
                        help="overlap of neighbouring windows as a fraction of --tile-size (default: 0.25)")
    add_pipeline_arguments(parser)
    add_folder_run_arguments(parser, "photographs")
    parser.set_defaults(handler=run_measure)
    return parser


# ------------------------------------------------------------------------------------------------ inputs


def mask_items(args: argparse.Namespace) -> List[WorkItem]:
    """``--masks``: one item per mask file (payload ``(mask path, photograph path or None)``)."""
    folder: Path = args.masks
    if not folder.is_dir():
        raise CLIError(f"--masks '{folder}' is not a folder.")
    masks = [path for path in collect_inputs([str(folder)]) if path.stem.endswith(args.mask_suffix)]
    if not masks:
        raise CLIError(f"--masks '{folder}' holds no image named *{args.mask_suffix}.<png|jpg|tif|...>.")
    photographs = {path.stem: path for path in collect_inputs(args.inputs)} if args.inputs else {}
    items = []
    for mask in masks:
        stem = mask.stem[:len(mask.stem) - len(args.mask_suffix)] if args.mask_suffix else mask.stem
        items.append(WorkItem(name=stem, label=str(mask), payload=(mask, photographs.get(stem))))
    return items


def read_mask(path: Path) -> np.ndarray:
    """A binary mask file as bool ``(H, W)``; CLIError naming the file if it is unreadable, not binary or empty."""
    try:
        with PIL.Image.open(path) as image:
            array = np.asarray(image.convert("L") if image.mode not in ("1", "L", "I", "I;16") else image)
        mask = as_binary_mask(array, name=str(path))
    except MeasureError as error:
        raise CLIError(str(error)) from error
    except (OSError, ValueError) as error:
        raise CLIError(f"Mask file '{path}' cannot be read as an image: {error}") from error
    if not mask.any():
        raise CLIError(f"Mask file '{path}' is empty (no vessel pixel).")
    return mask


# ------------------------------------------------------------------------------------------------ rows and CSV


def csv_text(rows: Sequence[Dict[str, Any]], confidence: float) -> str:
    """``measures.csv``: one row per photograph (first line a note when the values are in pixels)."""
    buffer = io.StringIO()
    if any(row.get("pixel_size_um") is None for row in rows):
        buffer.write(PIXEL_NOTE + "\n")
    percent = f"{confidence:.0%}".replace("%", "pct")
    header = ["image", "input", "field_of_view", "pixel_size_um", "members", "interval"]
    for name in MEASURE_NAMES:
        header += [name, f"{name}_mean", f"{name}_std", f"{name}_low_{percent}", f"{name}_high_{percent}",
                   f"{name}_unit"]
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        line = [row["name"], row["input"], row["field_of_view"],
                "" if row["pixel_size_um"] is None else f"{row['pixel_size_um']:.6g}", row["members"],
                row["interval"]]
        for name in MEASURE_NAMES:
            entry = row["measures"][name]
            line += [_number(entry.get(key)) for key in ("value", "mean", "std", "low", "high")] + [entry["unit"]]
        writer.writerow(line)
    return buffer.getvalue()


def _number(value: Optional[float]) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.6g}"


# ------------------------------------------------------------------------------------------------ command


def run_measure(args: argparse.Namespace) -> int:
    output_dir: Path = args.output_dir
    check_output_dir(output_dir)
    if None not in (args.fov_degrees, args.camera_degrees) and args.fov_degrees != args.camera_degrees:
        raise CLIError(f"--fov-degrees {args.fov_degrees:g} and --camera-degrees {args.camera_degrees:g} name two "
                       "angles for one camera: give the same angle (or only one of them).")
    scale = dict(pixel_size_um=args.pixel_size_um, fov_diameter_um=args.fov_diameter_um,
                 fov_degrees=args.fov_degrees)
    settings: Dict[str, Any] = {"command": "measure", **scale, "confidence": args.confidence,
                                "threshold": args.threshold, "mask_suffix": args.mask_suffix}
    if args.masks is not None:
        items = mask_items(args)
        process, intro = _mask_process(args, scale), "Measuring {mine} of {total} mask(s) ({skipped} already done)"
        settings["masks"] = str(args.masks)
    else:
        if not args.inputs:
            raise CLIError("Give photographs to segment and measure (INPUT), or --masks FOLDER.")
        items = [WorkItem(name=path.stem, label=str(path), payload=path) for path in collect_inputs(args.inputs)]
        process, source = _segment_process(args, scale)
        intro = "Measuring {mine} of {total} photograph(s) ({skipped} already done) with " + source
        settings.update(pipeline=source, ensemble_size=args.ensemble_size, steps=args.steps, seed=args.seed,
                        tile_size=args.tile_size or None, tile_overlap=args.tile_overlap)
    group_of = _mask_group if args.masks is not None else _photograph_group

    run_folder_command(
        args, "measure", settings, items, process, group_of=group_of, verb="Measuring",
        intro=lambda mine, total, skipped: intro.format(mine=mine, total=total, skipped=skipped),
        describe=lambda row: (f"{row['seconds']:.1f} s, vessel density "
                              f"{row['measures']['vessel_density']['value']:.4f} -> {output_dir / MEASURES_FILE}"),
        done=lambda outcome: f"Done in {outcome.summary.get('total_seconds', 0.0):.1f} s; {output_dir / MEASURES_FILE}",
    )
    rows = read_rows(output_dir / RESULTS_FILE)
    if rows and process_state().is_main_process:
        text = csv_text(rows, args.confidence)
        write_files_atomically(output_dir, {MEASURES_FILE: bytes_writer(text.encode("utf-8"))})
    return 0


def _photograph_group(item: WorkItem):
    image = read_input_image(item.payload, 3)
    return image.shape, image.dtype.str


def _mask_group(item: WorkItem):
    mask_path, photograph = item.payload
    mask = read_mask(mask_path)
    if photograph is not None:
        image = read_input_image(photograph, 3)
        if image.shape[:2] != mask.shape:
            raise CLIError(f"Mask '{mask_path}' is {mask.shape[1]}x{mask.shape[0]} but its photograph '{photograph}' "
                           f"is {image.shape[1]}x{image.shape[0]}.")
    return None


def _mask_process(args: argparse.Namespace, scale: Dict[str, Optional[float]]):
    def process(batch: List[WorkItem]) -> List[Dict[str, Any]]:
        rows = []
        for item in batch:
            mask_path, photograph = item.payload
            start = time.perf_counter()
            mask = read_mask(mask_path)
            if photograph is None:
                fov, note = np.ones_like(mask), "whole image (no photograph given)"
            else:
                fov, note = photograph_field_of_view(read_input_image(photograph, 3))
            try:
                measured = vessel_measures(mask, fov, name=str(mask_path), **scale)
            except MeasureError as error:
                raise CLIError(str(error)) from error
            rows.append({"outputs": [], "input": str(mask_path), "members": 0, "interval": "none (a given mask)",
                         "measure_seconds": time.perf_counter() - start, **measures_record(measured, None, note)})
        return rows

    return process


def _segment_process(args: argparse.Namespace, scale: Dict[str, Optional[float]]):
    device = resolve_device(args.device)
    apply_threads(args.threads)
    pipe, source = load_pipeline(args.pipeline, device, args.dtype, args.scheduler)
    args.steps = resolve_steps(args.steps, pipe)
    args.fusion, args.save_members = "mean", True
    check_pipeline_settings(pipe, args, args.fusion, args.threshold, args.tile_overlap)
    if pipe.num_classes != 2:
        raise CLIError(f"--pipeline '{source}' segments {pipe.num_classes} classes; vessel measures need a binary "
                       "vessel segmentation.")
    calibration = load_interval_calibration(source, args.confidence)
    interval_label = calibration.label if calibration else RAW_INTERVAL_LABEL
    output_dir: Path = args.output_dir

    def process(batch: List[WorkItem]) -> List[Dict[str, Any]]:
        images = [read_input_image(item.payload, pipe.image_channels) for item in batch]
        pipe.set_progress_bar_config(desc=batch[0].name, leave=False)
        start = time.perf_counter()
        segmented = segment_images(pipe, images, args)
        segment_seconds = (time.perf_counter() - start) / len(batch)
        rows = []
        for item, image, (outputs, _) in zip(batch, images, segmented):
            start = time.perf_counter()
            fov, note = photograph_field_of_view(image)
            mask = np.asarray(outputs["mask"]) > 0
            threshold = round(args.threshold * 255)
            members = [np.asarray(outputs[key]) > threshold for key in outputs if key.startswith("member")]
            if (mask & fov).any():
                fused, intervals = measure_with_intervals(mask, members, fov, confidence=args.confidence,
                                                          calibration=calibration, name=str(item.payload), **scale)
                record = measures_record(fused, intervals, note)
            else:  # nothing segmented: a row that says so (a study's other photographs go on)
                intervals = None
                record = empty_record(note + "; no vessel segmented", fov, scale)
            written = write_files_atomically(output_dir, {f"{item.name}_mask.png": png_writer(outputs["mask"])})
            rows.append({"outputs": [path.name for path in written], "input": str(item.payload),
                         "members": len(members), "interval": interval_label if intervals else "none (too few "
                         "members with vessels)", "segment_seconds": segment_seconds,
                         "measure_seconds": time.perf_counter() - start, **record})
        return rows

    return process, source


def empty_record(note: str, fov: np.ndarray, scale: Dict[str, Optional[float]]) -> Dict[str, Any]:
    """The record of a photograph in which nothing was segmented: no values, in the units its scale gives."""
    pixel_size = resolve_pixel_size(fov_diameter(fov), **scale)
    units = measure_units(scaled=pixel_size is not None)
    return {"field_of_view": note, "pixel_size_um": pixel_size,
            "measures": {name: {"value": float("nan"), "unit": units[name]} for name in MEASURE_NAMES}}
