"""``diffusers-retina demo``: the reference checkpoint on real fundus photographs, with figures and a picture panel.

It segments

1. ``skimage.data.retina()`` -- a public-domain fundus photograph shipped with scikit-image (1411x1411), resized
   with PIL so its longer side is ``--retina-size`` (default 512) to keep the demo within about two minutes on a
   2-core CPU; and
2. when CHASE_DB1 is present (:func:`diffusers_retina.data.default_chase_db1_root`), its test image ``Image_11L``
   at full resolution, scored against the ``1stHO`` reference (Dice, clDice, AUC-ROC, ECE, and the mean predictive
   entropy on wrongly vs correctly classified pixels).

It prints the figures, writes a PNG panel (one row per image: input | member 1..E | fused mask | uncertainty |
reference | vessel measures with their 90 % intervals over the members) and the figures as JSON next to the panel.
CHASE_DB1: Fraz et al., IEEE TBME 59(9):2538-2548, 2012 (CC BY 4.0).

Example::

    diffusers-retina demo --output demo_panel.png
"""

from __future__ import annotations

import argparse
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch

from ..data import DataError, chase_db1, default_chase_db1_root
from ..image_processing import RetinaImageProcessor
from ..measures import (
    CORE_MEASURES,
    IntervalCalibration,
    MeasureError,
    format_measure,
    RAW_INTERVAL_LABEL,
    load_interval_calibration,
    measure_with_intervals,
    measures_record,
    photograph_field_of_view,
)
from ..metrics import segmentation_metrics
from ..utils.io_utils import json_writer, write_files_atomically

from .common import (
    CLIError,
    add_pipeline_arguments,
    apply_threads,
    check_output_dir,
    check_pipeline_settings,
    load_pipeline,
    pipeline_call_kwargs,
    positive_int,
    resolve_device,
    resolve_steps,
)

#: The CHASE_DB1 test image of the demo and its reference annotation.
CHASE_IMAGE = "Image_11L"
CHASE_REFERENCE = "1stHO"

#: Height of every picture in the panel (pixels); columns are downscaled to it so the PNG stays small.
TILE_HEIGHT = 256
LABEL_HEIGHT = 16
CAPTION_HEIGHT = 16
GAP = 4
BACKGROUND = (255, 255, 255)
#: Above this size the panel PNG is written with a 256-colour palette (see :func:`encode_panel`).
MAX_PANEL_BYTES = 1_500_000
TEXT = (0, 0, 0)


@dataclass
class DemoCase:
    """One image of the demo: its pixels, an optional reference mask, and what the pipeline made of it."""

    name: str
    description: str
    image: np.ndarray  # (H, W, 3) uint8
    reference: Optional[np.ndarray] = None  # (H, W) {0, 1}
    figures: Dict[str, Any] = field(default_factory=dict)
    members: List[np.ndarray] = field(default_factory=list)  # (H, W) float probabilities in [0, 1]
    mask: Optional[np.ndarray] = None  # (H, W) class indices
    entropy: Optional[np.ndarray] = None  # (H, W) nats


# ------------------------------------------------------------------------------------------------ arguments


#: The ``demo`` command's one-line help and its description (``--help``).
HELP = "run the reference checkpoint on skimage.data.retina() and a CHASE_DB1 test image; write a panel"
DESCRIPTION = (
    "Segment skimage.data.retina() (resized so its longer side is --retina-size) and, when "
    f"CHASE_DB1 is present, its test image {CHASE_IMAGE} at full resolution against the {CHASE_REFERENCE} "
    "reference. Prints timings and metrics, writes a PNG panel (input | members | fused mask | entropy | "
    "reference) and the figures as JSON next to it (same name, .json)."
)


def build_demo_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """The ``demo`` sub-command's arguments."""
    parser = subparsers.add_parser("demo", help=HELP, description=DESCRIPTION)
    add_pipeline_arguments(parser)
    parser.add_argument("--output", type=Path, default=Path("demo_panel.png"), metavar="PNG",
                        help="where to write the panel; the figures go to the same name with .json "
                        "(default: demo_panel.png)")
    parser.add_argument("--retina-size", type=positive_int, default=512, metavar="PIXELS",
                        help="longer side of skimage.data.retina() after resizing (default: 512)")
    parser.add_argument("--chase-crop", type=positive_int, default=None, metavar="PIXELS",
                        help=f"segment only a centred square of this size of {CHASE_IMAGE} (quick checks and tests; "
                        "the figures are then not those of the full image). Default: full resolution")
    parser.set_defaults(handler=run_demo, fusion="mean", threshold=0.5, tile_overlap=0.25)
    return parser


# ------------------------------------------------------------------------------------------------ inputs


def load_retina(retina_size: int) -> Tuple[np.ndarray, str]:
    """``skimage.data.retina()`` resized with PIL (Lanczos) so its longer side is ``retina_size``."""
    try:
        from skimage import data as skimage_data
    except ImportError as error:
        raise CLIError(
            "The demo needs scikit-image for its fundus photograph: pip install 'diffusers-retina[demo]'"
        ) from error
    original = np.asarray(skimage_data.retina())[..., :3]
    height, width = original.shape[:2]
    scale = retina_size / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = np.asarray(PIL.Image.fromarray(original).resize(size, PIL.Image.Resampling.LANCZOS))
    description = (
        f"skimage.data.retina() (public domain): {width}x{height} resized to {size[0]}x{size[1]} "
        f"(longer side --retina-size {retina_size})"
    )
    return resized, description


def centre_crop(array: np.ndarray, size: int) -> np.ndarray:
    """The centred ``size`` x ``size`` window of an ``(H, W, ...)`` array (smaller sides are kept whole)."""
    height, width = array.shape[:2]
    top, left = max(0, (height - size) // 2), max(0, (width - size) // 2)
    return array[top : top + size, left : left + size]


def load_chase(crop: Optional[int]) -> Optional[Tuple[np.ndarray, np.ndarray, str]]:
    """CHASE_DB1 test image ``Image_11L`` and its ``1stHO`` mask, or ``None`` when the data set is absent."""
    root = default_chase_db1_root()
    if root is None:
        return None
    try:
        dataset = chase_db1(root, split="test", observer=CHASE_REFERENCE)
        raw = dataset.load_raw(dataset.stems.index(CHASE_IMAGE))
    except (DataError, ValueError) as error:
        raise CLIError(f"CHASE_DB1 at '{root}' cannot be read: {error}") from error
    image, reference = raw.image, raw.mask
    height, width = image.shape[:2]
    description = f"CHASE_DB1 {CHASE_IMAGE} ({width}x{height}, full resolution) vs {CHASE_REFERENCE}"
    if crop is not None:
        image, reference = centre_crop(image, crop), centre_crop(reference, crop)
        description = (
            f"CHASE_DB1 {CHASE_IMAGE}: centred {image.shape[1]}x{image.shape[0]} crop of {width}x{height} "
            f"(--chase-crop) vs {CHASE_REFERENCE}"
        )
    return image, reference, description


# ------------------------------------------------------------------------------------------------ segmentation


def segment_case(case: DemoCase, pipe, args: argparse.Namespace,
                 calibration: Optional[IntervalCalibration] = None) -> None:
    """Run the pipeline on ``case.image``; fill the case's maps and figures (metrics when it has a reference, and
    the vessel measures of the fused mask with their 90 % intervals from the members)."""
    started = time.perf_counter()
    result = pipe(
        case.image,
        generator=torch.Generator().manual_seed(args.seed),
        **pipeline_call_kwargs(args),
        output_type="np",
        return_members=True,
    )
    seconds = time.perf_counter() - started
    members = result.members[0]  # (E, H, W, C)
    binary = pipe.num_classes == 2
    member_maps = members[..., 0] if binary else members.max(axis=-1)
    case.members = [np.asarray(member, dtype=np.float32) for member in member_maps]
    case.mask = np.asarray(result.masks[0])
    case.entropy = np.asarray(result.entropy[0], dtype=np.float64)
    probability = np.asarray(result.probabilities[0][..., 0] if binary else result.probabilities[0].max(axis=-1))
    height, width = case.image.shape[:2]
    figures: Dict[str, Any] = {
        "name": case.name,
        "description": case.description,
        "width": int(width),
        "height": int(height),
        "seconds": round(seconds, 3),
        "mean_entropy": float(case.entropy.mean()),
        "foreground_fraction": float((case.mask > 0).mean()),
        **result.processing[0].as_record(),
    }
    if case.reference is not None and binary:
        reference = case.reference.astype(bool)
        prediction = case.mask.astype(bool)
        figures["reference"] = CHASE_REFERENCE
        figures["metrics"] = segmentation_metrics(prediction, probability, reference)
        errors = prediction != reference
        figures["error_fraction"] = float(errors.mean())
        figures["mean_entropy_error_pixels"] = float(case.entropy[errors].mean()) if errors.any() else math.nan
        figures["mean_entropy_correct_pixels"] = float(case.entropy[~errors].mean()) if (~errors).any() else math.nan
        figures["metrics_note"] = "computed over the whole image (CHASE_DB1 ships no field-of-view masks)"
    if binary:
        fov, note = photograph_field_of_view(case.image)
        try:
            fused, intervals = measure_with_intervals(case.mask > 0, [m > args.threshold for m in case.members], fov,
                                                      calibration=calibration, name=case.name)
            figures.update(measures_record(fused, intervals, note))
        except MeasureError as error:  # e.g. nothing segmented: the demo still shows its pictures
            figures["measures_error"] = str(error)
    case.figures = figures


def describe(case: DemoCase) -> str:
    """One printable paragraph with a case's figures."""
    figures = case.figures
    lines = [
        f"{case.description}",
        f"  {figures['seconds']:.1f} s; mean entropy {figures['mean_entropy']:.4f} nats; "
        f"foreground {figures['foreground_fraction']:.2%}",
    ]
    if "metrics" in figures:
        metrics = figures["metrics"]
        lines.append(
            f"  Dice {metrics['dice']:.4f}  clDice {metrics['cldice']:.4f}  AUC-ROC {metrics['auc_roc']:.4f}  "
            f"ECE {metrics['ece']:.4f}"
        )
        lines.append(
            f"  mean entropy on error pixels {figures['mean_entropy_error_pixels']:.4f} nats vs on correct pixels "
            f"{figures['mean_entropy_correct_pixels']:.4f} nats ({figures['error_fraction']:.2%} of pixels wrong)"
        )
    if "measures" in figures:
        lines.append("  measures (90 % interval over members): " + "; ".join(
            format_measure(key, figures["measures"][key]) for key in CORE_MEASURES))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ panel


def _grey(values: np.ndarray) -> PIL.Image.Image:
    """Probability-like map in ``[0, 1]`` to an RGB image (black 0, white 1)."""
    grey = (np.clip(values, 0.0, 1.0) * 255).round().astype(np.uint8)
    return PIL.Image.fromarray(grey, mode="L").convert("RGB")


def _fit_height(image: PIL.Image.Image) -> PIL.Image.Image:
    width = max(1, round(image.width * TILE_HEIGHT / image.height))
    return image.resize((width, TILE_HEIGHT), PIL.Image.Resampling.BOX if image.height > TILE_HEIGHT
                        else PIL.Image.Resampling.NEAREST)


def _placeholder(text: str, width: int) -> PIL.Image.Image:
    tile = PIL.Image.new("RGB", (width, TILE_HEIGHT), (225, 225, 225))
    draw = PIL.ImageDraw.Draw(tile)
    font = PIL.ImageFont.load_default()
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(((width - (right - left)) // 2, (TILE_HEIGHT - (bottom - top)) // 2), text, fill=(90, 90, 90), font=font)
    return tile


def case_tiles(case: DemoCase, max_entropy: float, fusion: str) -> List[Tuple[str, Optional[PIL.Image.Image]]]:
    """The labelled pictures of one panel row (``None`` = an "n/a" tile)."""
    tiles: List[Tuple[str, Optional[PIL.Image.Image]]] = [(case.name, PIL.Image.fromarray(case.image[..., :3]))]
    for index, member in enumerate(case.members, start=1):
        tiles.append((f"member {index}", _grey(member)))
    mask = case.mask.astype(np.float64) / max(1, int(case.mask.max()) if case.mask.size else 1)
    tiles.append((f"fused mask ({fusion})", _grey(mask)))
    tiles.append((f"entropy (0..{max_entropy:.2f} nats)", RetinaImageProcessor.visualize_uncertainty(case.entropy, max_entropy)[0]))
    reference = None if case.reference is None else _grey(case.reference.astype(np.float64))
    tiles.append((f"reference {CHASE_REFERENCE}" if reference is not None else "reference", reference))
    if "measures" in case.figures:
        lines = [format_measure(key, case.figures["measures"][key]) for key in CORE_MEASURES + ("end_points",)]
        tiles.append(("measures [90 % interval]", _text_tile(lines)))
    return tiles


def _text_tile(lines: List[str], width: int = 300) -> PIL.Image.Image:
    """Lines of text on a white TILE_HEIGHT tile."""
    tile = PIL.Image.new("RGB", (width, TILE_HEIGHT), BACKGROUND)
    draw = PIL.ImageDraw.Draw(tile)
    font = PIL.ImageFont.load_default()
    for index, line in enumerate(lines):
        draw.text((4, 6 + index * 16), line, fill=TEXT, font=font)
    return tile


def _caption(case: DemoCase) -> str:
    figures = case.figures
    text = f"{case.description} | {figures['seconds']:.1f} s | mean entropy {figures['mean_entropy']:.3f} nats"
    if "metrics" in figures:
        metrics = figures["metrics"]
        text += (
            f" | Dice {metrics['dice']:.3f} clDice {metrics['cldice']:.3f} AUC-ROC {metrics['auc_roc']:.3f} "
            f"ECE {metrics['ece']:.3f} | entropy error/correct {figures['mean_entropy_error_pixels']:.3f}/"
            f"{figures['mean_entropy_correct_pixels']:.3f}"
        )
    return text


def build_panel(cases: List[DemoCase], max_entropy: float, fusion: str) -> PIL.Image.Image:
    """One row per case: input | member 1..E | fused mask | entropy | reference, each scaled to TILE_HEIGHT."""
    rows = [[(label, None if image is None else _fit_height(image)) for label, image in case_tiles(case, max_entropy,
                                                                                                    fusion)]
            for case in cases]
    columns = max(len(row) for row in rows)
    widths = [
        max((image.width for row in rows if column < len(row) for _, image in [row[column]] if image is not None),
            default=TILE_HEIGHT)
        for column in range(columns)
    ]
    row_height = LABEL_HEIGHT + TILE_HEIGHT + CAPTION_HEIGHT + GAP
    panel = PIL.Image.new("RGB", (sum(widths) + GAP * (columns + 1), row_height * len(rows) + GAP), BACKGROUND)
    draw = PIL.ImageDraw.Draw(panel)
    font = PIL.ImageFont.load_default()
    for row_index, (case, row) in enumerate(zip(cases, rows)):
        top = GAP + row_index * row_height
        left = GAP
        for column, (label, image) in enumerate(row):
            tile = image if image is not None else _placeholder("n/a", widths[column])
            draw.text((left, top + 2), label, fill=TEXT, font=font)
            panel.paste(tile, (left + (widths[column] - tile.width) // 2, top + LABEL_HEIGHT))
            left += widths[column] + GAP
        draw.text((GAP, top + LABEL_HEIGHT + TILE_HEIGHT + 2), _caption(case), fill=TEXT, font=font)
    return panel


def encode_panel(panel: PIL.Image.Image, max_bytes: int = MAX_PANEL_BYTES) -> bytes:
    """The panel as PNG bytes; above ``max_bytes`` (noisy member maps compress badly) it is stored with an adaptive
    256-colour palette instead, which keeps it readable at about a third of the size."""
    buffer = io.BytesIO()
    panel.save(buffer, format="PNG", optimize=True)
    if buffer.tell() > max_bytes:
        buffer = io.BytesIO()
        panel.quantize(colors=256).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ command


def run_demo(args: argparse.Namespace) -> int:
    """The ``demo`` sub-command: segment the demo images, print the figures, write the panel and the JSON."""
    started = time.perf_counter()
    output: Path = args.output
    if output.is_dir():
        raise CLIError(f"--output '{output}' is a folder; pass a PNG file name.")
    check_output_dir(output.parent)
    figures_path = output.with_suffix(".json")

    retina, retina_description = load_retina(args.retina_size)
    cases = [DemoCase("skimage retina()", retina_description, retina)]
    chase = load_chase(args.chase_crop)
    if chase is not None:
        image, reference, description = chase
        cases.append(DemoCase(f"CHASE {CHASE_IMAGE}", description, image, reference))

    device = resolve_device(args.device)
    apply_threads(args.threads)
    pipe, source = load_pipeline(args.pipeline, device, args.dtype, args.scheduler)
    args.steps = resolve_steps(args.steps, pipe)
    check_pipeline_settings(pipe, args, args.fusion, args.threshold, args.tile_overlap)
    if pipe.image_channels != 3:
        raise CLIError(f"--pipeline '{source}' expects {pipe.image_channels}-channel images; the demo needs RGB.")
    print(f"Demo with {source} ({type(pipe.scheduler).__name__}, {args.steps} steps, {args.ensemble_size} members, "
          f"tile {args.tile_size or 'off'}) on {device}", flush=True)
    if chase is None:
        print("CHASE_DB1 not found (set DIFFUSERS_RETINA_DATA or place it in <repository>/../shared/data/chase_db1): "
              "only skimage.data.retina() is segmented.", flush=True)

    calibration = load_interval_calibration(source)
    for case in cases:
        pipe.set_progress_bar_config(desc=case.name, leave=False)
        segment_case(case, pipe, args, calibration)
        print(describe(case), flush=True)

    max_entropy = math.log(pipe.num_classes)
    panel = build_panel(cases, max_entropy, args.fusion)
    report = {
        "settings": {
            "pipeline": source,
            "scheduler": type(pipe.scheduler).__name__,
            "ensemble_size": args.ensemble_size,
            "steps": args.steps,
            "fusion": args.fusion,
            "threshold": args.threshold,
            "tile_size": args.tile_size or None,
            "tile_overlap": args.tile_overlap,
            "seed": args.seed,
            "retina_size": args.retina_size,
            "chase_crop": args.chase_crop,
            "device": str(device),
            "dtype": args.dtype,
            "threads": torch.get_num_threads(),
            "measure_intervals": calibration.label if calibration else RAW_INTERVAL_LABEL,
        },
        "images": [case.figures for case in cases],
        "chase_db1": "present" if chase is not None else "absent",
        "panel": str(output),
        "total_seconds": round(time.perf_counter() - started, 3),
    }
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CLIError(f"--output '{output}': cannot create its folder: {error}") from error
    panel_png = encode_panel(panel)
    write_files_atomically(output.parent, {
        output.name: lambda file: file.write(panel_png),
        figures_path.name: json_writer(report),
    })
    print(f"Panel: {output} ({panel.width}x{panel.height}); figures: {figures_path}; "
          f"total {report['total_seconds']:.1f} s", flush=True)
    return 0
