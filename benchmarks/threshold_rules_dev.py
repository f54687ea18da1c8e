"""Choose the pseudo-label threshold of ``adapt-train`` on development photographs no source model has learnt:
each out-of-fold student of the shipped segmenter (``training/make_prior_maps.py --folds 4 --distill_from``, trained
on the other folds' training photographs only) labels its held-out CHASE_DB1 *training* photographs as each simulated
camera takes them (``processing_resolution="auto"``, one view). Per fold and camera the threshold is one half or one
of the label-free rules of :mod:`diffusers_retina.adaptation` on the fold's pooled histogram; the pseudo-labels are
scored against the references (Dice, precision, recall inside the field of view). The test photographs are not read.

    python benchmarks/threshold_rules_dev.py --threads 1 --students runs/prior-v2-students
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, List  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from evaluate_anchored import load_unet  # noqa: E402

from diffusers_retina.adaptation import (  # noqa: E402
    fraction_matching_threshold,
    mean_probability_threshold,
    probability_histogram,
)
from diffusers_retina.data import chase_db1  # noqa: E402
from diffusers_retina.data.camera_shift import CAMERA_SHIFTS, apply_camera_shift  # noqa: E402
from diffusers_retina.hub import recorded_training_args  # noqa: E402
from diffusers_retina.image_processing import RetinaImageProcessor, field_of_view_mask  # noqa: E402
from diffusers_retina.pipelines.sampling import segmenter_probabilities  # noqa: E402

NONE = "none"
RULES = ("half", "source-fraction", "mean-probability")


def parse_args(argv=None):
    parser = _common.base_parser(__doc__.split("\n\n")[0], "threshold_rules_dev")
    parser.add_argument("--students", default="runs/prior-v2-students",
                        help="A make_prior_maps.py --folds output folder (summary.json and fold-<k>/unet).")
    parser.add_argument("--source", default="checkpoints/vessel-segmenter-chase",
                        help="The segmenter the students learnt from: its training diameter and vessel fraction.")
    parser.add_argument("--shifts", nargs="+", default=[NONE, *CAMERA_SHIFTS], choices=[NONE, *CAMERA_SHIFTS])
    parser.add_argument("--tile-size", type=int, default=256)
    return parser.parse_args(argv)


def fold_maps(unet, stems: List[str], reference, shift: str, diameter: int, tile_size: int):
    """``(pooled histogram, [(probability, reference, region)])`` of a student on its held-out photographs."""
    histogram, maps = 0, []
    for name in stems:
        item = reference[reference.stems.index(name)]
        photo = ((item["image"].float() + 1) / 2).permute(1, 2, 0).numpy()
        mask = item["mask"].numpy().astype(bool)
        if shift == NONE:
            image, target, valid = photo, mask, np.ones(mask.shape, bool)
        else:
            image, target, valid = apply_camera_shift(photo, mask, CAMERA_SHIFTS[shift])
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None] * 2 - 1
        plan = RetinaImageProcessor.plan_processing(tensor, "auto", diameter)[0]
        probability = segmenter_probabilities(unet, RetinaImageProcessor.resize(tensor, plan.size),
                                              tile_size=tile_size, tile_overlap=0.25)
        probability = RetinaImageProcessor.resize(probability, tuple(tensor.shape[-2:]), mode="bilinear")[0, 0]
        probability = probability.numpy().astype(np.float64)
        fov = field_of_view_mask(image)
        histogram = histogram + probability_histogram(probability, fov)
        maps.append((probability, target, valid & fov))
    return histogram, maps


def main(argv=None):
    args = parse_args(argv)
    root = _common.chase_root_or_exit()
    device = _common.setup(args)
    torch.set_grad_enabled(False)
    students = _common.resolve_path(args.students)
    folds = json.loads((students / "summary.json").read_text())["source"]["folds"]
    recorded = recorded_training_args(_common.resolve_path(args.source))
    diameter, source_fraction = recorded["field_of_view_diameter"], recorded["training_vessel_fraction"]
    reference = chase_db1(root=root, split="train", observer="1stHO")
    unets = [load_unet(str(students / f"fold-{k}" / "unet"), device) for k in range(len(folds))]
    table: List[Dict] = []
    for shift in args.shifts:
        scores = {rule: {"threshold": [], "dice": [], "precision": [], "recall": []} for rule in RULES}
        for unet, stems in zip(unets, folds):
            histogram, maps = fold_maps(unet, stems, reference, shift, diameter, args.tile_size)
            thresholds = {"half": 0.5, "source-fraction": fraction_matching_threshold(histogram, source_fraction),
                          "mean-probability": mean_probability_threshold(histogram)}
            for rule, threshold in thresholds.items():
                scores[rule]["threshold"].append(threshold)
                for probability, target, region in maps:
                    marked, truth = probability[region] > threshold, target[region]
                    hits = float((marked & truth).sum())
                    scores[rule]["dice"].append(2 * hits / max(marked.sum() + truth.sum(), 1))
                    scores[rule]["precision"].append(hits / max(marked.sum(), 1))
                    scores[rule]["recall"].append(hits / max(truth.sum(), 1))
        for rule in RULES:
            table.append({"shift": shift, "rule": rule, "thresholds": [round(t, 3) for t in scores[rule]["threshold"]],
                          **{f"{k}_mean": float(np.mean(v)) for k, v in scores[rule].items()}})
            row = table[-1]
            print(f"{shift:<13s} {rule:<17s} threshold {row['threshold_mean']:.3f} Dice {row['dice_mean']:.4f} "
                  f"precision {row['precision_mean']:.3f} recall {row['recall_mean']:.3f}", flush=True)
    _common.print_table(["shift", "rule", "threshold", "Dice", "precision", "recall"],
                        [[r["shift"], r["rule"], r["threshold_mean"], r["dice_mean"], r["precision_mean"],
                          r["recall_mean"]] for r in table], digits=4)
    result = {**_common.header(args, device), "students": str(args.students), "folds": folds,
              "source_training_vessel_fraction": source_fraction, "field_of_view_diameter": diameter, "rows": table}
    print(f"wrote {_common.save_json(args.output, result)}")


if __name__ == "__main__":
    main()
