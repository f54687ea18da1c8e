#!/usr/bin/env python
"""Choose a feature-reusing refiner's default step count on the training photographs, out of fold.

The refiner of a prior-anchored ``SegmentationEnsemblePipeline`` (``--refiner features``) is worth its cost for its
calibration, so its default ``num_inference_steps`` is chosen by the out-of-fold negative log-likelihood (NLL) of the
fused probability on the *training* photographs, never on test images: every training photograph is segmented by the
trained refiner on top of the student of its fold (``make_prior_maps.py --distill_from``: a model of the prior that
never saw the photograph), at each candidate step count, on its central ``--crop``. The rule: the fewest steps whose
NLL is within ``--tolerance`` (relative) of the lowest. Then, at that step count, the foreground threshold with the
highest mean out-of-fold Dice among ``--thresholds`` (``default_threshold``). The students alone (one forward, no
refiner) are scored beside them, so the table also says what the refiner buys out of fold.

    python training/select_denoising_steps.py --pipeline runs/anchored-features --prior_folds runs/students-v1 \\
        --train_data_dir ../shared/data/chase_db1 --mask_dir 1stHO --mask_suffix _1stHO --stems 'Image_0*,Image_10*' \\
        --steps 1 2 4 --apply

``--apply`` writes the chosen count and threshold into the pipeline's ``model_index.json``
(``default_denoising_steps``, ``default_threshold``); the figures go to ``<pipeline>/step_selection.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_prior_maps import add_folder_arguments  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", required=True, help="A saved feature-refiner SegmentationEnsemblePipeline.")
    parser.add_argument("--prior_folds", required=True, help="The make_prior_maps.py --distill_from output folder.")
    add_folder_arguments(parser)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--ensemble_size", type=int, default=5)
    parser.add_argument("--crop", type=int, default=512, help="Central crop side (0: whole photographs).")
    parser.add_argument("--tile_size", type=int, default=256)
    parser.add_argument("--tolerance", type=float, default=0.005)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--apply", action="store_true")
    args = parser.parse_args(argv)
    if any(not 0 < t < 1 for t in args.thresholds):
        parser.error("--thresholds must lie in (0, 1).")
    if any(s < 1 for s in args.steps) or args.ensemble_size < 1 or args.crop < 0 or not 0 <= args.tolerance < 1:
        parser.error("--steps and --ensemble_size must be positive, --crop >= 0 and --tolerance in [0, 1).")
    if not (Path(args.pipeline) / "model_index.json").is_file():
        parser.error(f"--pipeline {args.pipeline!r} has no model_index.json (a saved pipeline folder).")
    return args


def main(argv=None) -> Dict:
    args = parse_args(argv)
    from diffusers_retina import SegmentationEnsemblePipeline
    from diffusers_retina.data import FolderPairDataset
    from diffusers_retina.fold_priors import FoldPriors
    from diffusers_retina.metrics import MetricAccumulator, dice, negative_log_likelihood
    from diffusers_retina.pipelines.sampling import segmenter_probabilities
    from diffusers_retina.training_utils import central_crop, select_stems

    torch.set_grad_enabled(False)
    pipe = SegmentationEnsemblePipeline.from_pretrained(args.pipeline, dtype=torch.float32)
    if not pipe.uses_prior_features:
        sys.exit(f"{args.pipeline}: not a feature-refiner pipeline (its unet is a {type(pipe.unet).__name__}).")
    pipe.set_progress_bar_config(disable=True)
    stems = select_stems(args.train_data_dir, args.stems, args.image_dir, args.image_suffix)
    # the students must be of the prior this pipeline carries (a copy: the same weights as the distillation teacher)
    folds = FoldPriors(args.prior_folds, None, stems)
    from diffusers import UNet2DModel

    shipped = pipe.prior.state_dict()
    distilled = UNet2DModel.from_pretrained(folds.teacher, dtype=torch.float32).state_dict()
    if any(not torch.allclose(shipped[k], distilled[k]) for k in shipped):
        sys.exit(f"The students of {args.prior_folds} were distilled from {folds.teacher}, not from this pipeline's "
                 "prior.")
    dataset = FolderPairDataset(args.train_data_dir, stems=stems, image_dir=args.image_dir, mask_dir=args.mask_dir,
                                image_suffix=args.image_suffix, mask_suffix=args.mask_suffix)
    labels = ["student alone"] + [f"{s} step{'s' if s > 1 else ''}" for s in args.steps]
    accumulators = {label: MetricAccumulator() for label in labels}
    nll: Dict[str, List[float]] = {label: [] for label in labels}
    threshold = pipe.config.get("default_threshold") or 0.5
    kept: Dict[str, List] = {label: [] for label in labels}  # (probability, target) per image, for the threshold
    for index in range(len(dataset)):
        item = dataset[index]
        image, target = central_crop(item["image"], args.crop), central_crop(item["mask"], args.crop).numpy() > 0
        student = folds.students[folds.fold_of[item["name"]]]
        fold_pipe = SegmentationEnsemblePipeline(unet=pipe.unet, scheduler=pipe.scheduler, prior=student,
                                                 anchor="residual")
        fold_pipe.set_progress_bar_config(disable=True)
        results = {"student alone": segmenter_probabilities(student, image[None], args.tile_size)[0, 0].numpy()}
        for steps, label in zip(args.steps, labels[1:]):
            out = fold_pipe((image + 1) / 2, num_inference_steps=steps, ensemble_size=args.ensemble_size,
                            generator=torch.Generator().manual_seed(args.seed), tile_size=args.tile_size,
                            output_type="pt")
            results[label] = out.probabilities[0, 0].numpy()
        for label, probability in results.items():
            kept[label].append((probability, target))
            accumulators[label].update(probability > threshold, probability.astype(np.float64), target,
                                       name=item["name"])
            nll[label].append(negative_log_likelihood(probability, target))
        print(f"{item['name']}: " + ", ".join(f"{label} NLL {nll[label][-1]:.4f}" for label in labels), flush=True)
    table = {}
    for label in labels:
        summary_row = accumulators[label].summary()
        table[label] = {"dice": summary_row["dice_mean"], "ece": summary_row["ece_mean"],
                        "nll": float(np.mean(nll[label]))}
    best = min(table[label]["nll"] for label in labels[1:])
    chosen = next(s for s, label in zip(args.steps, labels[1:])
                  if table[label]["nll"] <= best * (1 + args.tolerance))
    print("\n| Out of fold (training photographs) | Dice | ECE | NLL |\n|---|---|---|---|")
    for label, row in table.items():
        print(f"| {label} | {row['dice']:.4f} | {row['ece']:.4f} | {row['nll']:.4f} |")
    chosen_label = labels[1:][args.steps.index(chosen)]
    threshold_dice = {t: float(np.mean([dice(p > t, y) for p, y in kept[chosen_label]]))
                      for t in args.thresholds}
    chosen_threshold = max(threshold_dice, key=lambda t: (threshold_dice[t], -abs(t - 0.5)))
    print(f"chosen: {chosen} step(s) (fewest within {args.tolerance:.1%} of the lowest NLL), threshold "
          f"{chosen_threshold} (mean Dice {threshold_dice[chosen_threshold]:.4f}; 0.5: "
          f"{float(np.mean([dice(p > 0.5, y) for p, y in kept[chosen_label]])):.4f})")
    result = {"command": "python training/select_denoising_steps.py " + " ".join(sys.argv[1:] if argv is None
                                                                                  else argv),
              "stems": stems, "crop": args.crop, "ensemble_size": args.ensemble_size, "table": table,
              "rule": f"fewest steps within {args.tolerance} (relative) of the lowest out-of-fold NLL",
              "chosen_steps": chosen, "threshold_dice": {str(t): d for t, d in threshold_dice.items()},
              "chosen_threshold": chosen_threshold}
    (Path(args.pipeline) / "step_selection.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.apply:
        index_path = Path(args.pipeline) / "model_index.json"
        model_index = json.loads(index_path.read_text())
        model_index["default_denoising_steps"] = chosen
        model_index["default_threshold"] = chosen_threshold
        temporary = index_path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(model_index, indent=2, sort_keys=True) + "\n")
        os.replace(temporary, index_path)
    return result


if __name__ == "__main__":
    main()
