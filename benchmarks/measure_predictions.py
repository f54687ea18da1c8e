"""Member predictions for the measurement-interval study (``evaluate_measures.py`` reads them).

For each CHASE_DB1 photograph of a split and each interval method, the members' vessel probabilities are stored as
``<work>/<method>/<split>/<stem>.npz`` (``members``: uint8 ``(E, H, W)``, 255 = probability 1; ``fused``: the mean,
uint8). Resumable: a finished file is kept. Methods:

* ``anchored``: the residual-anchored diffusion ensemble (``checkpoints/segmentation-anchored-chase``), E = 5, its
  default steps (2), DDIM; members are the pipeline's ``return_members``.
* ``tta``: test-time augmentation of the deterministic U-Net (the prior): the 8 flips/rotations by 90 degrees and
  rescales by 0.9 and 1.1, each mapped back (10 members).
* ``unet``: the U-Net's probability map alone (one member; the threshold-jitter baseline is made from it when
  measuring).
* ``deep``: a deep ensemble of U-Nets: the prior plus the 4 out-of-fold segmenters of
  ``training/make_prior_maps.py`` (5 members).

Splits: ``test`` (the 8 test photographs), ``shift`` (test photographs 11L-12R under the camera-like change of
``label_efficiency.photometric_shift``) and ``train`` (the 20 training photographs, for calibration only: each
predicted with the out-of-fold segmenter that never saw it, as the U-Net / the anchored pipeline's prior; ``deep``
has no out-of-fold form and is not run there).

    python benchmarks/measure_predictions.py --methods anchored tta unet --splits test shift --threads 1
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Dict, List  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from label_efficiency import photometric_shift  # noqa: E402

from diffusers_retina.data import CHASE_DB1_TEST, CHASE_DB1_TRAIN, chase_db1  # noqa: E402
from diffusers_retina.pipelines.sampling import segmenter_probabilities  # noqa: E402

METHODS = ("anchored", "tta", "unet", "deep")
SPLITS = {"test": CHASE_DB1_TEST, "shift": CHASE_DB1_TEST[:4], "train": CHASE_DB1_TRAIN}
TTA_SCALES = (0.9, 1.1)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--splits", nargs="+", choices=sorted(SPLITS), default=["test", "shift"])
    parser.add_argument("--work", default="runs/measures", help="Folder for the member files.")
    parser.add_argument("--anchored", default="checkpoints/segmentation-anchored-chase")
    parser.add_argument("--prior", default="checkpoints/vessel-segmenter-chase")
    parser.add_argument("--folds", default="runs/prior-maps-oof",
                        help="make_prior_maps.py --folds 4 output (fold-<k>/unet).")
    parser.add_argument("--ensemble-size", type=int, default=5)
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--tile-overlap", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def load_unet(path) -> torch.nn.Module:
    from diffusers import UNet2DModel

    folder = _common.resolve_path(str(path))
    folder = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    return UNet2DModel.from_pretrained(str(folder), dtype=torch.float32).eval()


def fold_segmenters(folds_dir: Path) -> Dict[str, torch.nn.Module]:
    """``stem -> the out-of-fold segmenter that never saw it`` for every fold of a ``make_prior_maps.py --folds 4``
    run whose segmenter is saved (the split is the script's own, so a run still training its last folds can be used
    for the folds it has finished)."""
    sys.path.insert(0, str(_common.REPO / "training"))
    from make_prior_maps import paired_folds

    by_stem = {}
    for k, held_out in enumerate(paired_folds(list(CHASE_DB1_TRAIN), 4)):
        if (folds_dir / f"fold-{k}" / "unet" / "config.json").is_file():
            model = load_unet(folds_dir / f"fold-{k}")
            for stem in held_out:
                by_stem[stem] = model
    return by_stem


def dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    x = torch.flip(x, dims=(-1,)) if flip else x
    return torch.rot90(x, k, dims=(-2, -1))


def undo_dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    x = torch.rot90(x, -k, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if flip else x


def tta_members(unet, image: torch.Tensor, tiles: Dict) -> torch.Tensor:
    """``(E, H, W)`` probabilities: the 8 dihedral transforms, then rescales of the untransformed photograph."""
    members = []
    for flip in (False, True):
        for k in range(4):
            p = segmenter_probabilities(unet, dihedral(image[None], k, flip), **tiles)
            members.append(undo_dihedral(p, k, flip)[0, 0])
    height, width = image.shape[-2:]
    for scale in TTA_SCALES:
        size = (int(round(height * scale)), int(round(width * scale)))
        scaled = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)
        p = segmenter_probabilities(unet, scaled, **tiles)
        members.append(F.interpolate(p, size=(height, width), mode="bilinear", align_corners=False)[0, 0])
    return torch.stack(members)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    root = _common.chase_root_or_exit()
    data = chase_db1(root=root, split="all")
    tiles = dict(tile_size=args.tile_size, tile_overlap=args.tile_overlap)
    work = Path(args.work)
    prior = load_unet(args.prior)
    folds = fold_segmenters(Path(args.folds)) if ("train" in args.splits or "deep" in args.methods) else {}
    pipe = None
    if "anchored" in args.methods:
        pipe = _common.load_pipeline(args.anchored, torch.device("cpu"))

    def segmenter_for(split: str, stem: str):
        return folds[stem] if split == "train" else prior

    predictors: Dict[str, Callable[[str, str, torch.Tensor], torch.Tensor]] = {}

    def anchored(split, stem, image):
        pipe.prior = segmenter_for(split, stem)
        out = pipe((image + 1) / 2, ensemble_size=args.ensemble_size, generator=_common.generator(args.seed),
                   batch_size="auto", output_type="pt", return_members=True, **tiles)
        return out.members[0, :, 0]

    predictors["anchored"] = anchored
    predictors["tta"] = lambda split, stem, image: tta_members(segmenter_for(split, stem), image, tiles)
    predictors["unet"] = lambda split, stem, image: segmenter_probabilities(
        segmenter_for(split, stem), image[None], **tiles)[0]
    predictors["deep"] = lambda split, stem, image: torch.cat(
        [segmenter_probabilities(model, image[None], **tiles)[0]
         for model in [prior] + list(dict.fromkeys(folds.values()))])

    for split in args.splits:
        for method in args.methods:
            if method == "deep" and split == "train":
                continue
            folder = work / method / split
            folder.mkdir(parents=True, exist_ok=True)
            for stem in SPLITS[split]:
                path = folder / f"{stem}.npz"
                if path.is_file():
                    continue
                if (split == "train" and stem not in folds) or (method == "deep" and len(set(folds.values())) < 4):
                    print(f"{method} {split} {stem}: its out-of-fold segmenter(s) are not trained yet", flush=True)
                    continue
                image = data[data.stems.index(stem)]["image"]
                if split == "shift":
                    image = photometric_shift(image)
                start = time.perf_counter()
                members = predictors[method](split, stem, image).float().clamp(0, 1).cpu().numpy()
                seconds = time.perf_counter() - start
                quantised = np.round(members * 255).astype(np.uint8)
                fused = np.round(members.mean(axis=0) * 255).astype(np.uint8)
                partial = path.with_name(path.stem + ".partial.npz")
                np.savez_compressed(partial, members=quantised, fused=fused, seconds=seconds)
                os.replace(partial, path)
                print(f"{method} {split} {stem}: {members.shape[0]} members, {seconds:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
