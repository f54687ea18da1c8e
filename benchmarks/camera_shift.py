"""The hard camera-shift benchmark: CHASE_DB1's 8 test photographs re-taken as other cameras would take them
(``diffusers_retina.data.camera_shift.CAMERA_SHIFTS``: two wide-angle cameras at 565 and 768 px, vignetting and uneven
illumination, another colour response, defocus, JPEG at quality 35, and all together), each model segmenting at
``--processing-resolution native`` and ``auto`` (its field of view resized to the training diameter) and, with
``--processing-resolutions auto-degrees``, ``auto`` given the camera's angle (``camera_degrees``: the shift's
field-of-view angle, 30 for the shifts that keep CHASE_DB1's camera), which matches the training pixels per degree.

Rows (repeatable, ``LABEL=...``): ``--segmenter LABEL=DIR`` (a deterministic ``UNet2DModel``; its training diameter from
its ``training_info.json``) and ``--diffusion LABEL=DIR@STEPS`` (a ``SegmentationEnsemblePipeline``, ``--ensemble-size``
members). Columns per (row, resolution, shift): Dice, clDice, ECE, NLL (inside the region where the reference is
known: the source retina and the dark surround, not the mirrored ring of a wider field of view), the predicted and the
reference vessel fraction of that region, and s / image. A development benchmark: nothing is tuned on it, and the
settings it compares were fixed on the training photographs.

    python benchmarks/camera_shift.py --threads 1 \\
        --segmenter "U-Net (prior)=checkpoints/vessel-segmenter-chase" \\
        --diffusion "Residual-anchored=checkpoints/segmentation-anchored-chase@1"
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dataclasses import asdict  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Dict, List, Optional, Tuple  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from evaluate_anchored import load_unet  # noqa: E402

from diffusers_retina.adaptation import fit_logit_bias, shift_logits  # noqa: E402
from diffusers_retina.data import chase_db1  # noqa: E402
from diffusers_retina.hub import recorded_training_args  # noqa: E402
from diffusers_retina.data.camera_shift import CAMERA_SHIFTS, apply_camera_shift  # noqa: E402
from diffusers_retina.image_processing import (  # noqa: E402
    RetinaImageProcessor,
    field_of_view_mask,
    processing_diameter,
)
from diffusers_retina.metrics import MetricAccumulator, negative_log_likelihood  # noqa: E402
from diffusers_retina.pipelines.sampling import segmenter_probabilities  # noqa: E402

NONE = "none"
AUTO_DEGREES = "auto-degrees"  # "auto" given the camera's field-of-view angle
SOURCE_DEGREES = 30.0  # CHASE_DB1's camera
SHIPPED_SEGMENTER = Path(__file__).resolve().parents[1] / "checkpoints" / "vessel-segmenter-chase"


def parse_args(argv=None):
    parser = _common.base_parser(__doc__.split("\n\n")[0], "camera_shift")
    parser.set_defaults(pipeline=None)
    parser.add_argument("--segmenter", action="append", default=[], metavar="LABEL=DIR")
    parser.add_argument("--diffusion", dest="pipelines", action="append", default=[], metavar="LABEL=DIR@STEPS")
    parser.add_argument("--ensemble-size", type=int, default=5)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--shifts", nargs="+", default=[NONE, *CAMERA_SHIFTS], choices=[NONE, *CAMERA_SHIFTS])
    parser.add_argument("--processing-resolutions", nargs="+", default=["native", "auto"],
                        choices=["native", "auto", AUTO_DEGREES])
    parser.add_argument("--split", default="test", choices=["train", "test"],
                        help="CHASE_DB1 split the photographs come from (train: a development set for choosing "
                             "settings without touching the test photographs).")
    parser.add_argument("--images", nargs="+", default=None, help="Photographs of the split (default: all).")
    parser.add_argument("--label-free-bias", action="store_true",
                        help="Add a '+ label-free bias' row per row: its maps of each shift shifted by the logit bias "
                             "under which their mean probability inside the photographs' fields of view equals "
                             "--label-free-bias-fraction (diffusers_retina.adaptation.fit_logit_bias; no labels).")
    parser.add_argument("--label-free-bias-fraction", type=float, default=None,
                        help="The vessel fraction --label-free-bias matches (default: the one the shipped segmenter "
                             "records, its CHASE_DB1 training masks').")
    args = parser.parse_args(argv)
    if args.label_free_bias and args.label_free_bias_fraction is None:
        args.label_free_bias_fraction = recorded_training_value(str(SHIPPED_SEGMENTER), "training_vessel_fraction")
    if not (args.segmenter or args.pipelines):
        parser.error("Give at least one --segmenter or --diffusion row.")
    return args


def recorded_training_value(path: str, name: str):
    """A value a segmenter (or pipeline) folder's ``training_info.json`` records in its arguments (its prior's for an
    anchored pipeline), e.g. the training field-of-view diameter; None when none is recorded."""
    folder = _common.resolve_path(path)
    for candidate in (folder, folder / "unet", folder / "prior"):
        value = recorded_training_args(candidate).get(name)
        if value is not None:
            return value
    return None


def segmenter_diameter(path: str) -> Optional[int]:
    """The training field-of-view diameter a bare segmenter folder records (``training_info.json``)."""
    return recorded_training_value(path, "field_of_view_diameter")


def camera_degrees_of(shift: str) -> float:
    """The field-of-view angle of the camera a shift simulates (CHASE_DB1's own 30° for the photometric shifts)."""
    degrees = CAMERA_SHIFTS[shift].field_of_view_degrees if shift != NONE else None
    return float(degrees) if degrees is not None else SOURCE_DEGREES


def build_rows(args, device) -> List[Tuple[str, Callable]]:
    """``(label, predict(image (3, H, W) in [-1, 1], mode) -> (probability (H, W), threshold))`` per row."""
    rows = []
    tiles = dict(tile_size=args.tile_size or None, tile_overlap=0.25)
    for spec in args.segmenter:
        label, path = spec.split("=", 1)
        unet, diameter = load_unet(path, device), segmenter_diameter(path)
        degrees = recorded_training_value(path, "field_of_view_degrees")

        def predict(image, mode, camera_degrees=None, unet=unet, diameter=diameter, degrees=degrees):
            # the pipelines' rule, applied around a bare U-Net
            images = image[None].to(device)
            target = processing_diameter(diameter, degrees, camera_degrees)
            plan = RetinaImageProcessor.plan_processing(images, mode, target)[0]
            resized = RetinaImageProcessor.resize(images, plan.size)
            probability = segmenter_probabilities(unet, resized, **tiles)
            return RetinaImageProcessor.resize(probability, tuple(image.shape[-2:]), mode="bilinear")[0, 0], \
                args.threshold

        rows.append((label, predict))
    for label, _, pipe, threshold, step_count in _common.pipeline_rows(args.pipelines, device, args.threshold):
        def predict(image, mode, camera_degrees=None, pipe=pipe, step_count=step_count, threshold=threshold):
            out = pipe((image + 1) / 2, num_inference_steps=step_count, ensemble_size=args.ensemble_size,
                       threshold=threshold, generator=_common.generator(args.seed), batch_size="auto",
                       output_type="pt", processing_resolution=mode, camera_degrees=camera_degrees, **tiles)
            return out.probabilities[0, 0], threshold

        rows.append((label, predict))
    return rows


def main(argv=None):
    args = parse_args(argv)
    root = _common.chase_root_or_exit()
    device = _common.setup(args)
    torch.set_grad_enabled(False)
    reference = chase_db1(root=root, split=args.split, observer="1stHO")
    args.images = args.images or list(reference.stems)
    rows = build_rows(args, device)
    for _, predict in rows:  # one untimed warm-up call per row
        predict(reference[0]["image"][:, :64, :64], "native")

    labels = [label for label, _ in rows]
    bias_of = {label: f"{label} + label-free bias" for label in labels} if args.label_free_bias else {}
    keys = [(label, mode, shift) for label in labels + list(bias_of.values()) for mode in args.processing_resolutions
            for shift in args.shifts]
    accumulators = {key: MetricAccumulator() for key in keys}
    extra: Dict[tuple, Dict[str, list]] = {key: {"nll": [], "fraction": [], "reference_fraction": [], "seconds": []}
                                           for key in keys}
    kept: Dict[tuple, list] = {key: [] for key in keys}  # --label-free-bias: the maps, scored again at the end

    def score(key, name, probability, threshold, target, valid, seconds):
        scores = accumulators[key].update(probability > threshold, probability, target, fov=valid, name=name)
        extra[key]["nll"].append(negative_log_likelihood(probability[valid], target[valid]))
        extra[key]["fraction"].append(float((probability[valid] > threshold).mean()))
        extra[key]["reference_fraction"].append(float(target[valid].mean()))
        extra[key]["seconds"].append(seconds)
        return scores

    for name in args.images:
        item = reference[reference.stems.index(name)]
        photo = ((item["image"].float() + 1) / 2).permute(1, 2, 0).numpy()
        mask = item["mask"].numpy().astype(bool)
        for shift in args.shifts:
            if shift == NONE:
                image, target, valid = photo, mask, np.ones(mask.shape, bool)
            else:
                image, target, valid = apply_camera_shift(photo, mask, CAMERA_SHIFTS[shift])
            tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() * 2 - 1
            fov = field_of_view_mask(image) if bias_of else None
            for label, predict in rows:
                for mode in args.processing_resolutions:
                    start = time.perf_counter()
                    if mode == AUTO_DEGREES:
                        probability, threshold = predict(tensor, "auto", camera_degrees_of(shift))
                    else:
                        probability, threshold = predict(tensor, mode)
                    seconds = time.perf_counter() - start
                    probability = probability.float().cpu().numpy().astype(np.float64)
                    scores = score((label, mode, shift), name, probability, threshold, target, valid, seconds)
                    if bias_of:
                        kept[(label, mode, shift)].append((name, probability.astype(np.float32), threshold, target,
                                                           valid, fov, seconds))
                    print(f"{name} {shift:<13s} {mode:<6s} {label:<40s} Dice {scores['dice']:.4f} ECE "
                          f"{scores['ece']:.4f} {seconds:6.1f} s", flush=True)
    biases = {}
    for (label, mode, shift), maps in kept.items():
        if not maps:
            continue
        bias = fit_logit_bias([m[1] for m in maps], [m[5] for m in maps], args.label_free_bias_fraction)
        biases[f"{label} | {mode} | {shift}"] = bias
        for name, probability, threshold, target, valid, _, seconds in maps:
            score((bias_of[label], mode, shift), name, shift_logits(probability.astype(np.float64), bias), threshold,
                  target, valid, seconds)

    table = []
    for key in keys:
        summary = accumulators[key].summary()
        table.append({"label": key[0], "processing_resolution": key[1], "shift": key[2],
                      **{f"{k}_mean": summary[f"{k}_mean"] for k in ("dice", "cldice", "ece")},
                      "dice_std": summary["dice_std"],
                      **{f"{k}_mean": float(np.mean(v)) for k, v in extra[key].items()}})
    _common.print_table(["row", "resolution", "shift", "Dice", "clDice", "ECE", "NLL", "fraction", "ref. fraction",
                         "s/img"],
                        [[r["label"], r["processing_resolution"], r["shift"], r["dice_mean"], r["cldice_mean"],
                          r["ece_mean"], r["nll_mean"], r["fraction_mean"], r["reference_fraction_mean"],
                          r["seconds_mean"]] for r in table])
    result = {**_common.header(args, device), "images": args.images, "shifts": args.shifts,
              "shift_settings": {name: asdict(CAMERA_SHIFTS[name]) for name in args.shifts if name != NONE},
              "rows": table, **({"label_free_biases": biases,
                                 "label_free_bias_fraction": args.label_free_bias_fraction} if biases else {})}
    print(f"wrote {_common.save_json(args.output, result)}")
    return result


if __name__ == "__main__":
    main()
