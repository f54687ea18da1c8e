#!/usr/bin/env python
"""Score vessel segmenters on a target modality: source-only, simple baselines, AdaptDiff-adapted, upper bound.

    python benchmarks/evaluate_adaptdiff.py --target_dir runs/chase-fa \\
        --row "source only=checkpoints/vessel-segmenter-chase" \\
        --row "histogram matching to the source=checkpoints/vessel-segmenter-chase@histmatch" \\
        --row "intensity inversion=checkpoints/vessel-segmenter-chase@invert" \\
        --row "AdaptDiff=checkpoints/adaptdiff-chase-fa"

A row is ``LABEL=PATH[@TRANSFORM]``: ``PATH`` is a saved ``UNet2DModel`` segmenter or an ``AdaptDiffPipeline`` folder
(its ``segmenter``); without ``@TRANSFORM`` the transform the model stores is applied (the pipeline's
``input_transform``, or ``input_transform`` in the segmenter's ``training_info.json``: what the adaptation workflow
fine-tuned through), else none. ``TRANSFORM`` is applied to every target image first: ``none``, ``invert``
(``1 - x`` inside the field of view), ``histmatch`` (each image's histogram matched to the pooled histogram of
``--source_reference_count`` source training photographs, inside the fields of view) or ``invert+histmatch`` (both,
in that order). Metrics (Dice, clDice,
AUC-ROC at threshold 0.5) are computed inside the field of view of each target image
(``diffusers_retina.data.modality.field_of_view_mask``), full resolution, against ``<target_dir>/reference``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

TEST_STEMS = "Image_11*,Image_12*,Image_13*,Image_14*"
TRAIN_STEMS = "Image_0*,Image_10*"


def parse_args(argv=None):
    parser = _common.base_parser(__doc__.splitlines()[1], "evaluate_adaptdiff")
    parser.add_argument("--target_dir", required=True, help="Folder with images/ and reference/ (the target).")
    parser.add_argument("--stems", default=TEST_STEMS, help="Glob patterns of the evaluated target images.")
    parser.add_argument("--source_dir", default=None, help="Source photographs for @histmatch (default CHASE_DB1).")
    parser.add_argument("--source_stems", default=TRAIN_STEMS)
    parser.add_argument("--source_reference_count", type=int, default=4)
    parser.add_argument("--row", action="append", required=True, help="LABEL=PATH[@TRANSFORM]; repeatable.")
    parser.add_argument("--tile_size", type=int, default=256)
    parser.add_argument("--write-card", dest="write_card", action="append", default=[], metavar="LABEL=FOLDER",
                        help="Write this row's metrics and the table into FOLDER/evaluation.json and regenerate its "
                             "model card (only for the full evaluation: all 8 test images).")
    parser.add_argument("--extra", default=None,
                        help="JSON object merged into the output (e.g. the workflow's step times).")
    return parser.parse_args(argv)


def load_segmenter(path: str, device):
    from diffusers import UNet2DModel

    folder = _common.resolve_path(path)
    if (folder / "model_index.json").is_file():  # an AdaptDiffPipeline: its segmenter
        folder = folder / "segmenter"
    elif (folder / "unet" / "config.json").is_file() and not (folder / "config.json").is_file():
        folder = folder / "unet"  # a training output folder of the supervised objective
    return UNet2DModel.from_pretrained(str(folder), use_safetensors=True, torch_dtype=torch.float32).to(device).eval()


def recorded_input_transform(path: str):
    """The ``input_transform`` record a pipeline folder (its config) or a segmenter folder (``training_info.json``)
    keeps; None when it keeps none."""
    from diffusers_retina.hub import TRAINING_INFO, read_json

    folder = _common.resolve_path(path)
    for name in ("model_index.json", TRAINING_INFO):
        if (folder / name).is_file():
            return (read_json(folder / name) or {}).get("input_transform")
    return None


def _unit(path: Path) -> np.ndarray:
    from diffusers_retina.data import read_image

    array = read_image(path, 3)
    return array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)


def _files(folder: Path, patterns: str) -> Dict[str, Path]:
    from fnmatch import fnmatch

    return {p.stem: p for p in sorted(folder.iterdir())
            if p.is_file() and any(fnmatch(p.stem, pattern) for pattern in patterns.split(","))}


def build_rows(args, device) -> List[Tuple[str, Callable[[np.ndarray, np.ndarray], np.ndarray], Dict]]:
    from diffusers_retina.data.modality import INTENSITY_TRANSFORMS, field_of_view_mask
    from diffusers_retina.image_processing import (
        apply_source_intensity_transform,
        prepare_images,
        source_intensity_transform,
    )
    from diffusers_retina.image_processing.intensity import MATCHING_QUANTILES
    from diffusers_retina.pipelines.sampling import segmenter_probabilities

    source_references = source_fovs = None
    rows = []
    for spec in args.row:
        label, _, rest = spec.partition("=")
        path, _, transform = rest.partition("@")
        record = None if transform else recorded_input_transform(path)
        transform = transform or (record["transform"] if record else "none")
        if not label or not path or transform not in INTENSITY_TRANSFORMS:
            sys.exit(f"--row {spec!r}: expected LABEL=PATH[@{'|'.join(INTENSITY_TRANSFORMS)}].")
        if "histmatch" in transform and record is None and source_references is None:
            root = Path(args.source_dir) if args.source_dir else _common.chase_root_or_exit()
            files = list(_files(root / "images", args.source_stems).values())[: args.source_reference_count]
            source_references = [_unit(p) for p in files]
            source_fovs = [field_of_view_mask(r) for r in source_references]
        segmenter = load_segmenter(path, device)
        stored = record is not None  # the model's own transform, else the row's, built once for every image
        record = record or source_intensity_transform(transform, source_references, source_fovs, MATCHING_QUANTILES,
                                                      decimals=None)

        def predict(image, fov, segmenter=segmenter, record=record):
            image = apply_source_intensity_transform(image, record, fov)
            pixels = prepare_images(image, segmenter.config.in_channels, "image").to(device)
            return segmenter_probabilities(segmenter, pixels, args.tile_size)[0, 0].cpu().numpy()

        rows.append((label, predict, {"path": path, "transform": transform + (" (stored)" if stored else "")}))
    return rows


def main(argv=None):
    args = parse_args(argv)
    device = _common.setup(args)
    torch.set_grad_enabled(False)
    from diffusers_retina.data import read_mask
    from diffusers_retina.data.modality import field_of_view_mask
    from diffusers_retina.metrics import MetricAccumulator

    target_dir = _common.resolve_path(args.target_dir)
    images = _files(target_dir / "images", args.stems)
    if not images:
        sys.exit(f"No target images matching {args.stems!r} in {target_dir / 'images'}.")
    references = {p.stem: p for p in (target_dir / "reference").iterdir()}
    rows = build_rows(args, device)
    accumulators = {label: MetricAccumulator() for label, _, _ in rows}
    seconds = {label: [] for label, _, _ in rows}
    for stem, path in images.items():
        image = _unit(path)
        fov = field_of_view_mask(image)
        target = read_mask(references[stem], 2).astype(bool)
        for label, predict, _ in rows:
            start = time.perf_counter()
            probability = predict(image, fov)
            seconds[label].append(time.perf_counter() - start)
            scores = accumulators[label].update(probability > 0.5, probability, target, fov=fov, name=stem)
            print(f"{stem}  {label:<44s} Dice {scores['dice']:.4f}  clDice {scores['cldice']:.4f}  "
                  f"AUC {scores['auc_roc']:.4f}", flush=True)
    table = []
    for label, _, info in rows:
        summary = accumulators[label].summary()
        table.append({"label": label, **info,
                      **{f"{k}_mean": summary[f"{k}_mean"] for k in ("dice", "cldice", "auc_roc")},
                      **{f"{k}_std": summary[f"{k}_std"] for k in ("dice", "cldice", "auc_roc")},
                      "seconds_per_image": float(np.mean(seconds[label])),
                      "per_image_dice": {r["name"]: r["dice"] for r in accumulators[label].per_image()}})
    _common.print_table(["row", "Dice", "clDice", "AUC-ROC", "s/img"],
                        [[r["label"], r["dice_mean"], r["cldice_mean"], r["auc_roc_mean"], r["seconds_per_image"]]
                         for r in table])
    result = {**_common.header(args, device), "target_dir": str(args.target_dir), "images": list(images),
              "metrics_inside": "field of view of each target image (field_of_view_mask)", "rows": table}
    if args.extra:
        import json

        result["extra"] = json.loads(args.extra)
    print(f"wrote {_common.save_json(args.output, result)}")
    for spec in args.write_card:
        write_card(spec, table, result, args)
    return result


def table_markdown(table) -> str:
    lines = ["| Row | Dice | clDice | AUC-ROC | s / image |", "|---|---|---|---|---|"]
    for row in table:
        lines.append(f"| {row['label']} | {row['dice_mean']:.3f} ± {row['dice_std']:.3f} | {row['cldice_mean']:.3f} | "
                     f"{row['auc_roc_mean']:.3f} | {row['seconds_per_image']:.1f} |")
    return "\n".join(lines)


def write_card(spec: str, table, result, args) -> None:
    """``evaluation.json`` (this row's metrics, the whole table, the command) into an AdaptDiff folder, then its card."""
    from diffusers_retina.hub import write_adaptdiff_card, write_json

    label, _, folder = spec.partition("=")
    rows = {row["label"]: row for row in table}
    if label not in rows:
        sys.exit(f"--write-card {spec!r}: no row named {label!r} (rows: {list(rows)}).")
    if args.stems != TEST_STEMS or len(result["images"]) != 8:
        sys.exit("--write-card is for the full evaluation only (the 8 test images, --stems left at its default).")
    row = rows[label]
    markdown = (f"{len(result['images'])} CHASE_DB1 test photographs (Image_11L–Image_14R) in the fluorescein-like "
                "target modality, full resolution, metrics inside each image's field of view, reference `1stHO`; "
                f"this model is the row **{label}**.\n\n" + table_markdown(table))
    write_json(Path(folder) / "evaluation.json", {
        "command": result["command"], "markdown": markdown, "row": label, "images": result["images"],
        "dataset": "CHASE_DB1 (fluorescein-like target)", "reference": "1stHO",
        "split": "test (Image_11L–Image_14R, 1stHO, fluorescein-like, full resolution, inside the field of view)",
        "metrics": {"dice": row["dice_mean"], "cldice": row["cldice_mean"], "auc_roc": row["auc_roc_mean"]},
    })
    print(f"wrote {write_adaptdiff_card(folder)}")


if __name__ == "__main__":
    main()
