#!/usr/bin/env python
"""Prior maps for training a prior-anchored refiner: a deterministic segmenter's vessel probabilities on the training
images, written as ``<output_dir>/maps/<stem>.png`` (uint8, 255 = probability 1) for
``train_segmentation_ensemble.py --prior_maps``.

Why out of fold: a segmenter's predictions on its own training images are cleaner than its predictions on new
images, so a refiner trained on them learns to correct too little. ``--folds K`` splits the training stems into K
folds, trains one segmenter per fold on the other K-1 folds (``train_segmentation_ensemble.py --objective
supervised`` with the flags after ``--``) and predicts the held-out fold, so every training image gets a prior from
a model that never saw it -- as the test images will. With ``--distill_from PRIOR`` the fold segmenters are
*students* of a trained prior (no labels: they learn its decoder features and probabilities on the other folds), so
the folder also serves ``train_segmentation_ensemble.py --refiner features --prior_folds`` (features in the prior's
own feature space, out of fold). ``--segmenter DIR`` instead predicts with one given segmenter
(for the in-sample comparison). ``summary.json`` records the split and each map's Dice against its reference.

Resumable: a fold whose segmenter is saved is not trained again (its ``--resume_from_checkpoint latest`` picks up an
interrupted one), and existing maps are kept unless ``--overwrite``.

    python training/make_prior_maps.py --train_data_dir ../shared/data/chase_db1 --mask_dir 1stHO \\
        --mask_suffix _1stHO --stems 'Image_0*,Image_10*' --folds 4 --output_dir runs/prior-maps-oof -- \\
        --resolution 128 --block_out_channels 16,32,64,128 --max_train_steps 500 --use_ema ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List

import numpy as np
import PIL.Image
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def add_folder_arguments(parser: argparse.ArgumentParser) -> None:
    """The training photographs: a folder dataset and the glob patterns of its training stems."""
    parser.add_argument("--train_data_dir", required=True)
    parser.add_argument("--image_dir", default="images")
    parser.add_argument("--mask_dir", default="masks")
    parser.add_argument("--image_suffix", default="")
    parser.add_argument("--mask_suffix", default="")
    parser.add_argument("--stems", required=True, help="Comma-separated glob patterns of the training stems.")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Out-of-fold (or given-segmenter) prior maps for training images.")
    add_folder_arguments(parser)
    parser.add_argument("--output_dir", required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--folds", type=int, help="K: train K segmenters, each predicts the fold it did not see.")
    source.add_argument("--segmenter", help="Predict every stem with this saved segmenter (a UNet2DModel folder).")
    parser.add_argument("--distill_from", default=None,
                        help="With --folds: train each fold's segmenter as a student of this saved prior (a "
                             "UNet2DModel folder) instead of on the labels.")
    parser.add_argument("--tile_size", type=int, default=256)
    parser.add_argument("--tile_overlap", type=float, default=0.25)
    parser.add_argument("--overwrite", action="store_true")
    if argv is None:
        argv = sys.argv[1:]
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.training_args = argv[split + 1:]
    if args.folds is not None and args.folds < 2:
        parser.error(f"--folds must be at least 2, got {args.folds}.")
    if args.distill_from is not None:
        if args.folds is None:
            parser.error("--distill_from trains the fold segmenters: it needs --folds.")
        if not os.path.isfile(os.path.join(args.distill_from, "config.json")):
            parser.error(f"--distill_from {args.distill_from!r} has no config.json (a saved UNet2DModel folder).")
    if args.segmenter is not None and args.training_args:
        parser.error("Training flags after `--` are only used with --folds.")
    if not 0 <= args.tile_overlap < 1 or args.tile_size < 1:
        parser.error("--tile_size must be positive and --tile_overlap in [0, 1).")
    return args


def paired_folds(stems: List[str], folds: int) -> List[List[str]]:
    """Folds that keep images of one subject together (CHASE_DB1 names them ``Image_NNL`` / ``Image_NNR``: the two
    eyes of one child look alike, so a fold that held one eye out but trained on the other would leak)."""
    subjects = sorted({stem.rstrip("LR") for stem in stems})
    groups = [subjects[k::folds] for k in range(folds)]
    return [[s for s in stems if s.rstrip("LR") in group] for group in groups]


def predict_maps(segmenter, dataset, output_folder: Path, tile_size: int, tile_overlap: float, overwrite: bool):
    """Write ``<stem>.png`` prior maps of every sample of ``dataset``; return ``{stem: Dice vs reference}``."""
    from diffusers_retina.metrics import dice
    from diffusers_retina.pipelines.sampling import segmenter_probabilities

    output_folder.mkdir(parents=True, exist_ok=True)
    scores = {}
    for index in range(len(dataset)):
        item = dataset[index]
        path = output_folder / f"{item['name']}.png"
        if path.is_file() and not overwrite:
            probability = np.asarray(PIL.Image.open(path), dtype=np.float32) / 255.0
        else:
            with torch.no_grad():
                probability = segmenter_probabilities(segmenter, item["image"][None], tile_size,
                                                      tile_overlap)[0, 0].cpu().numpy()
            temporary = path.with_suffix(".png.tmp")
            PIL.Image.fromarray(np.round(probability * 255).astype(np.uint8)).save(temporary, format="PNG")
            os.replace(temporary, path)  # never a half-written map
        scores[item["name"]] = float(dice(torch.from_numpy(probability > 0.5), item["mask"]))
    return scores


def main(argv=None):
    args = parse_args(argv)
    from diffusers import UNet2DModel

    from diffusers_retina.data import FolderPairDataset
    from diffusers_retina.training_utils import select_stems

    torch.set_grad_enabled(False)
    stems = select_stems(args.train_data_dir, args.stems, args.image_dir, args.image_suffix)
    common = dict(image_dir=args.image_dir, mask_dir=args.mask_dir, image_suffix=args.image_suffix,
                  mask_suffix=args.mask_suffix)
    output_dir = Path(args.output_dir)
    maps = output_dir / "maps"
    summary = {"stems": stems, "source": None, "dice": {}}
    if args.segmenter is not None:
        segmenter = UNet2DModel.from_pretrained(args.segmenter).float().eval()
        dataset = FolderPairDataset(args.train_data_dir, stems=stems, **common)
        summary["source"] = {"segmenter": args.segmenter}
        summary["dice"] = predict_maps(segmenter, dataset, maps, args.tile_size, args.tile_overlap, args.overwrite)
    else:
        import train_segmentation_ensemble

        folds = paired_folds(stems, args.folds)
        summary["source"] = {"folds": folds, "training_args": args.training_args}
        distill = []
        if args.distill_from is not None:
            summary["source"]["distill_from"] = os.path.abspath(args.distill_from)
            distill = ["--distill_from", args.distill_from]
        for k, held_out in enumerate(folds):
            fold_dir = output_dir / f"fold-{k}"
            if not (fold_dir / "unet" / "config.json").is_file():
                train_stems = ",".join(s for s in stems if s not in held_out)
                torch.set_grad_enabled(True)
                train_segmentation_ensemble.main([
                    "--objective", "supervised", "--train_data_dir", args.train_data_dir,
                    "--image_dir", args.image_dir, "--mask_dir", args.mask_dir, "--image_suffix", args.image_suffix,
                    "--mask_suffix", args.mask_suffix, "--train_stems", train_stems, "--output_dir", str(fold_dir),
                    "--resume_from_checkpoint", "latest", *distill, *args.training_args,
                ])
                torch.set_grad_enabled(False)
            segmenter = UNet2DModel.from_pretrained(str(fold_dir / "unet")).float().eval()
            dataset = FolderPairDataset(args.train_data_dir, stems=held_out, **common)
            summary["dice"].update(predict_maps(segmenter, dataset, maps, args.tile_size, args.tile_overlap,
                                                args.overwrite))
            print(f"fold {k}: held out {held_out}, Dice " + ", ".join(f"{summary['dice'][s]:.3f}" for s in held_out))
    summary["mean_dice"] = float(np.mean(list(summary["dice"].values())))
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{len(summary['dice'])} prior maps in {maps}; mean Dice {summary['mean_dice']:.4f}")
    return summary


if __name__ == "__main__":
    main()
