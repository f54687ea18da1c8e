"""Evaluate a SegmentationEnsemblePipeline on the 8 CHASE_DB1 test images (Image_11L–Image_14R), reference `1stHO`.

Rows of the table (all from one sampling pass per image):

* the pipeline's fused prediction (``--fusion``);
* the other fusion rules applied to the SAME members (``return_members=True`` + ``fuse_members``; no extra sampling);
* the first member alone (what a single diffusion sample gives);
* with ``--baseline DIR``: the same-budget deterministic U-Net (``train_segmentation_ensemble.py --objective
  supervised``: same architecture, patches, steps and schedule), one forward per tile with the same tiles and
  threshold -- the baseline to report next to every diffusion result;
* the second human observer (``2ndHO`` against ``1stHO``), scored by the same metrics code.

Metrics per row: Dice, clDice, IoU, AUC-ROC, AUC-PR, ECE, HD95 (mean ± std over images, ``MetricAccumulator``) and
seconds per image. The uncertainty block compares the ensemble's predictive entropy, variance and mutual information
on error pixels (fused mask != reference) with correct pixels, and gives the AUROC of entropy as an error detector.

Writes ``--output`` (JSON in the format ``diffusers_retina.hub`` renders into the model card), a per-image CSV next to
it, and with ``--write-card`` (default when ``--crop 0``) ``<pipeline>/evaluation.json`` + the regenerated README.md.

Example (full evaluation, ~8 x 60 s on a 2-core CPU with the reference checkpoint)::

    python benchmarks/evaluate_segmentation.py --pipeline checkpoints/segmentation-ensemble-chase

Quick check on central 128 crops of two images (no card written)::

    python benchmarks/evaluate_segmentation.py --crop 128 --images Image_11L Image_12R --output /tmp/eval.json
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

import argparse
import csv
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from diffusers_retina.cli.common import batch_size_argument  # noqa: E402
from diffusers_retina.data import CHASE_DB1_TEST, chase_db1  # noqa: E402
from diffusers_retina.fusion import FUSION_METHODS, fuse_members  # noqa: E402
from diffusers_retina.metrics import METRIC_NAMES, MetricAccumulator, auc_roc  # noqa: E402

CARD_METRICS = ("dice", "cldice", "iou", "auc_roc", "auc_pr", "ece", "hd95")
UNCERTAINTY_MAPS = ("entropy", "variance", "mutual_information")
ENTROPY_BINS = 2000  # histogram bins of entropy / ln 2 for the pooled AUROC over all test pixels


def parse_args(argv=None):
    parser = _common.base_parser(__doc__.split("\n\n")[0], "evaluate_segmentation")
    parser.add_argument("--ensemble-size", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="Inference steps of the scheduler.")
    parser.add_argument("--scheduler", default="ddim", choices=sorted(_common.SCHEDULERS))
    parser.add_argument("--fusion", default="mean", choices=FUSION_METHODS, help="Fusion of the pipeline row.")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--tile-size", type=int, default=256, help="Sliding-window tile (0: whole image at once).")
    parser.add_argument("--tile-overlap", type=float, default=0.25)
    parser.add_argument("--batch-size", type=batch_size_argument, default="auto",
                        help="Members denoised together: N or auto (default; on CPU at most 48k float32 pixels per UNet call).")
    parser.add_argument("--crop", type=int, default=0, help="Central crop size for quick checks (0: full 999x960).")
    parser.add_argument("--images", nargs="+", default=list(CHASE_DB1_TEST), help="Test images to evaluate.")
    parser.add_argument("--repeats", type=int, default=1,
                        help="Timed pipeline runs per image (same seed, same result); the time is their median. "
                             "Each image is one timing already, so 1 keeps a full evaluation at ~8 runs.")
    parser.add_argument("--compare-fusions", action=argparse.BooleanOptionalAction, default=True,
                        help="Add rows for the other fusion rules, computed from the same members.")
    parser.add_argument("--single-member", action=argparse.BooleanOptionalAction, default=True,
                        help="Add a row for the first ensemble member alone.")
    parser.add_argument("--write-card", action=argparse.BooleanOptionalAction, default=None,
                        help="Write <pipeline>/evaluation.json and regenerate its card (default: on with --crop 0).")
    parser.add_argument("--baseline", default=None,
                        help="Output folder of `train_segmentation_ensemble.py --objective supervised` (a bare UNet "
                             "in unet/): adds its row, same tiles and threshold.")
    parser.add_argument("--per-image", default=None, help="Per-image CSV (default: next to --output, *_per_image.csv).")
    args = parser.parse_args(argv)
    if args.write_card is None:
        args.write_card = args.crop == 0
    return args


# ------------------------------------------------------------------------------------------------ uncertainty


class UncertaintyVersusErrors:
    """Sums of each uncertainty map over error and correct pixels, and an entropy histogram for the pooled AUROC."""

    def __init__(self):
        self.sums = {name: np.zeros(2) for name in UNCERTAINTY_MAPS}  # [correct, error]
        self.counts = np.zeros(2)
        self.histogram = np.zeros((2, ENTROPY_BINS))  # [correct, error] pixels per entropy bin
        self.per_image = []

    def update(self, name, maps, error):
        error = error.reshape(-1)
        self.counts += [np.count_nonzero(~error), np.count_nonzero(error)]
        for key in UNCERTAINTY_MAPS:
            values = maps[key].reshape(-1).astype(np.float64)
            self.sums[key] += [values[~error].sum(), values[error].sum()]
        score = np.clip(maps["entropy"].reshape(-1) / math.log(2.0), 0.0, 1.0)  # binary entropy / ln 2 in [0, 1]
        bins = np.minimum((score * ENTROPY_BINS).astype(np.int64), ENTROPY_BINS - 1)
        self.histogram += [np.bincount(bins[~error], minlength=ENTROPY_BINS),
                           np.bincount(bins[error], minlength=ENTROPY_BINS)]
        self.per_image.append({"image": name, "error_fraction": float(error.mean()),
                               "entropy_auroc_for_errors": float(auc_roc(score[None], error[None]))})

    def summary(self):
        correct, errors = self.counts
        result = {"error_fraction": errors / max(correct + errors, 1)}
        for key in UNCERTAINTY_MAPS:
            result[f"{key}_on_errors"] = self.sums[key][1] / errors if errors else math.nan
            result[f"{key}_on_correct"] = self.sums[key][0] / correct if correct else math.nan
        result["entropy_auroc_for_errors"] = histogram_auroc(self.histogram[1], self.histogram[0])
        return {k: float(v) for k, v in result.items()}


def histogram_auroc(positives, negatives):
    """AUROC from per-bin counts in increasing score order; pixels in one bin count as ties (one half)."""
    num_positive, num_negative = positives.sum(), negatives.sum()
    if num_positive == 0 or num_negative == 0:
        return math.nan
    negatives_below = np.cumsum(negatives) - negatives
    return float(np.sum(positives * (negatives_below + 0.5 * negatives)) / (num_positive * num_negative))


# ------------------------------------------------------------------------------------------------ baseline


def load_baseline(path: str, device: torch.device):
    """The deterministic U-Net saved by ``--objective supervised`` (``<path>/unet``), in float32 on ``device``."""
    from diffusers import UNet2DModel

    folder = _common.resolve_path(path)
    if not (folder / "unet" / "config.json").is_file():
        sys.exit(f"--baseline {path}: no unet/config.json there (train one with "
                 "`training/train_segmentation_ensemble.py --objective supervised`).")
    return UNet2DModel.from_pretrained(str(folder / "unet"), torch_dtype=torch.float32).to(device).eval()


def baseline_command(path: str) -> str:
    """The training command recorded beside the baseline (``training_info.json``), for the notes."""
    from diffusers_retina.hub import TRAINING_INFO

    info = _common.resolve_path(path) / TRAINING_INFO
    if not info.is_file():
        return f"`{path}`"
    record = json.loads(info.read_text())
    return f"`{record['command']}`, {record['training_seconds'] / 60:.0f} min"


@torch.no_grad()
def baseline_probability(unet, image: torch.Tensor, tile_size, tile_overlap: float) -> np.ndarray:
    """Vessel probability of the deterministic baseline: reflect-padded like the pipeline, the same Gaussian-blended
    tiles, sigmoid of the logits."""
    from diffusers_retina.image_processing import pad_to_multiple
    from diffusers_retina.pipelines.sampling import tiled_predict

    multiple = 2 ** (len(unet.config.block_out_channels) - 1)
    padded, (height, width) = pad_to_multiple(image[None].to(unet.device, torch.float32), multiple)
    logits = tiled_predict(lambda window: unet(window, 0).sample, padded, tile_size, tile_overlap)
    return logits[0, 0, :height, :width].sigmoid().cpu().numpy()


# ------------------------------------------------------------------------------------------------ main


def main(argv=None):
    args = parse_args(argv)
    root = _common.chase_root_or_exit()
    device = _common.setup(args)
    pipe = _common.load_pipeline_and_scheduler(args, device)
    tile_size = args.tile_size or None

    reference = chase_db1(root=root, split="test", observer="1stHO")
    second = chase_db1(root=root, split="test", observer="2ndHO")
    unknown = [name for name in args.images if name not in reference.stems]
    if unknown:
        sys.exit(f"Unknown test images {unknown}; choose from {reference.stems}.")

    def segment(image, steps=args.steps):
        return pipe((image + 1) / 2, num_inference_steps=steps, ensemble_size=args.ensemble_size, fusion=args.fusion,
                    threshold=args.threshold, generator=_common.generator(args.seed), batch_size=args.batch_size,
                    tile_size=tile_size, tile_overlap=args.tile_overlap, output_type="pt", return_members=True)

    # Row names, in card order (the pipeline's own row first: the card's eval_results come from rows[0]).
    scheduler_name = type(pipe.scheduler).__name__.replace("Scheduler", "")
    main_row = f"Diffusion ensemble (E={args.ensemble_size}, {scheduler_name} {args.steps} steps, {args.fusion})"
    other_fusions = [m for m in FUSION_METHODS if m != args.fusion] if args.compare_fusions else []
    fusion_rows = {m: f"same members, {m} fusion" for m in other_fusions}
    member_row = "single member (first of the ensemble)"
    baseline_row = "deterministic U-Net, same budget (one forward)"
    observer_row = "second human observer (2ndHO)"
    baseline = load_baseline(args.baseline, device) if args.baseline else None
    row_names = ([main_row, *fusion_rows.values()] + ([member_row] if args.single_member else [])
                 + ([baseline_row] if baseline is not None else []) + [observer_row])
    accumulators = {name: MetricAccumulator() for name in row_names}
    seconds = {name: [] for name in row_names if name != observer_row}
    uncertainty = UncertaintyVersusErrors()

    print(f"Evaluating {args.pipeline} on {len(args.images)} CHASE_DB1 test image(s)"
          f"{'' if not args.crop else f' (central {args.crop} crops)'}: E={args.ensemble_size}, "
          f"{scheduler_name} {args.steps} steps, tiles {tile_size} (overlap {args.tile_overlap}), device {device}")
    # Warm-up (untimed): one step on a crop of the first image big enough to go through the sliding window
    # (first-call costs: imports, allocator, kernels), with the same ensemble and tiling settings.
    first = reference[reference.stems.index(args.images[0])]["image"]
    warm_size = min(args.crop or max(first.shape[-2:]), 2 * tile_size if tile_size else 128)
    segment(_common.crop(first, _common.central_box(*first.shape[-2:], warm_size)), steps=1)

    for name in args.images:
        index = reference.stems.index(name)
        item, item2 = reference[index], second[index]
        box = _common.central_box(*item["mask"].shape, args.crop) if args.crop else (0, 0, *item["mask"].shape)
        image = _common.crop(item["image"], box)
        target = _common.crop(item["mask"], box).numpy().astype(bool)
        observer = _common.crop(item2["mask"], box).numpy().astype(bool)

        pipeline_seconds, _, out = _common.benchmark(lambda: segment(image), device, args.repeats, warmup=False)
        members = out.members.float().cpu()  # (1, E, 1, H, W)
        fused_mask = out.masks[0].cpu().numpy().astype(bool)
        fused_prob = out.probabilities[0, 0].float().cpu().numpy()
        accumulators[main_row].update(fused_mask, fused_prob, target, name=name)
        seconds[main_row].append(pipeline_seconds)

        for method, row in fusion_rows.items():
            fusion_seconds, (mask, prob) = _common.timed(
                lambda: fuse_members(members, method=method, threshold=args.threshold), torch.device("cpu"))
            accumulators[row].update(mask[0].numpy().astype(bool), prob[0, 0].numpy(), target, name=name)
            seconds[row].append(pipeline_seconds + fusion_seconds)
        if args.single_member:
            member_prob = members[0, 0, 0].numpy()
            accumulators[member_row].update(member_prob > args.threshold, member_prob, target, name=name)
            seconds[member_row].append(math.nan)  # a lone member's cost is not measured here
        if baseline is not None:
            baseline_seconds, _, prob = _common.benchmark(
                lambda: baseline_probability(baseline, image, tile_size, args.tile_overlap), device, args.repeats,
                warmup=name == args.images[0])
            accumulators[baseline_row].update(prob > args.threshold, prob, target, name=name)
            seconds[baseline_row].append(baseline_seconds)
        # A human observer gives a hard mask: its "probability" is the mask itself (AUC/ECE of a hard mask).
        accumulators[observer_row].update(observer, observer.astype(np.float64), target, name=name)

        maps = {key: getattr(out, key)[0].float().cpu().numpy() for key in UNCERTAINTY_MAPS}
        uncertainty.update(name, maps, fused_mask != target)
        scores = accumulators[main_row].per_image()[-1]
        print(f"  {name}  {image.shape[-1]}x{image.shape[-2]}  {pipeline_seconds:6.1f} s  "
              f"dice {scores['dice']:.3f}  (2ndHO {accumulators[observer_row].per_image()[-1]['dice']:.3f})",
              flush=True)

    # ---------------------------------------------------------------- rows, uncertainty, notes
    rows = []
    for name in row_names:
        summary = accumulators[name].summary()
        metrics = {}
        for metric in CARD_METRICS:
            metrics[metric] = summary[f"{metric}_mean"]
            metrics[f"{metric}_std"] = summary[f"{metric}_std"]
        times = [t for t in seconds.get(name, []) if not math.isnan(t)]
        rows.append({
            "name": name,
            "metrics": metrics,
            "pooled": {k: v for k, v in summary.items() if k.endswith("_pooled")},
            "seconds_per_image": statistics.median(times) if times else None,
        })

    size = f"central {args.crop}x{args.crop} crops" if args.crop else "full resolution 999x960"
    which = "Image_11L–Image_14R" if args.images == list(CHASE_DB1_TEST) else ", ".join(args.images)
    tiling = f"tiles of {tile_size} (overlap {args.tile_overlap})" if tile_size else "no tiling"
    description = (
        f"CHASE_DB1 test set ({len(args.images)} image(s): {which}, {size}), reference annotation `1stHO`. "
        f"{args.ensemble_size} members, {scheduler_name} {args.steps} steps, {tiling}, seed {args.seed}; "
        "mean ± std (population) over images."
    )
    notes = (
        "All pixels count (CHASE_DB1 ships no field-of-view masks). The fusion rows reuse the members sampled for the "
        "first row (no extra sampling); their time is the sampling time plus that fusion's own time. "
        "Seconds per image: median over images of the pipeline call "
        f"({_common.machine_info(device)['cpu'] if device.type == 'cpu' else device}, "
        f"{torch.get_num_threads()} threads), metrics excluded. The second observer's 'probability' is its binary "
        "mask, so its AUC-ROC / AUC-PR / ECE are those of a hard mask (not comparable with soft predictions). "
        "Uncertainty: error = fused mask differs from 1stHO; entropy in nats; AUROC of entropy as a detector of "
        "error pixels pooled over all test pixels."
    )
    if baseline is not None:
        notes += (" The deterministic U-Net row: the same architecture trained by `train_segmentation_ensemble.py "
                  "--objective supervised` with the same patches, steps, schedule, EMA and seed as the diffusion model "
                  f"({baseline_command(args.baseline)}), one forward per tile with the same tiles, sigmoid, same "
                  "threshold.")
    infinite = sorted({record["name"] for name in row_names for record in accumulators[name].per_image()
                       if math.isinf(record["hd95"])})
    if infinite:
        notes += (f" HD95 is infinite for {', '.join(infinite)} in some row (one of the masks is empty), so that "
                  "row's mean HD95 is infinite and shown as –.")
    per_image = []
    for name in row_names:
        for record in accumulators[name].per_image():
            index = args.images.index(record["name"])
            times = seconds.get(name)
            per_image.append({"row": name, "image": record["name"],
                              **{m: record[m] for m in METRIC_NAMES},
                              "seconds": None if times is None or math.isnan(times[index]) else times[index]})

    result = {
        **_common.header(args, device),
        "description": description,
        "rows": rows,
        "uncertainty": uncertainty.summary(),
        "notes": notes,
        "ensemble_size": args.ensemble_size,
        "inference_steps": args.steps,
        "scheduler": type(pipe.scheduler).__name__,
        "timesteps": [int(t) for t in pipe.scheduler.timesteps],
        "fusion": args.fusion,
        "threshold": args.threshold,
        "tile_size": tile_size,
        "tile_overlap": args.tile_overlap,
        "crop": args.crop,
        "images": args.images,
        "reference": "1stHO",
        "baseline": args.baseline,
        "per_image": per_image,
        "uncertainty_per_image": uncertainty.per_image,
    }

    # ---------------------------------------------------------------- print
    print()
    print(description)
    _common.print_table(
        ["method"] + [m for m in CARD_METRICS] + ["s/image"],
        [[row["name"]] + [f"{_common.fmt(row['metrics'][m])} ± {_common.fmt(row['metrics'][m + '_std'])}"
                          for m in CARD_METRICS] + [row["seconds_per_image"]] for row in rows],
    )
    print("\nUncertainty of the fused ensemble (error = fused mask != 1stHO):")
    u = result["uncertainty"]
    _common.print_table(
        ["map", "on errors", "on correct"],
        [[key, u[f"{key}_on_errors"], u[f"{key}_on_correct"]] for key in UNCERTAINTY_MAPS], digits=4)
    per_image_auroc = [r["entropy_auroc_for_errors"] for r in uncertainty.per_image]
    print(f"error fraction {u['error_fraction']:.4f}; AUROC of entropy as an error detector: "
          f"{u['entropy_auroc_for_errors']:.3f} pooled over all pixels, "
          f"{np.nanmean(per_image_auroc):.3f} mean per image")

    # ---------------------------------------------------------------- write
    output = _common.save_json(args.output, result)
    per_image_path = Path(args.per_image) if args.per_image else output.with_name(output.stem + "_per_image.csv")
    per_image_path.parent.mkdir(parents=True, exist_ok=True)
    with open(per_image_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["row", "image", *METRIC_NAMES, "seconds"])
        writer.writeheader()
        writer.writerows(per_image)
    print(f"\nWrote {output} and {per_image_path}")

    if args.write_card:
        folder = _common.resolve_path(args.pipeline)
        if not folder.is_dir():
            print(f"Not writing a card: '{args.pipeline}' is not a local folder.")
            return result
        from diffusers_retina.hub import EVALUATION, TRAINING_INFO, write_segmentation_card

        _common.save_json(str(folder / EVALUATION), result)
        if (folder / TRAINING_INFO).is_file():
            print(f"Wrote {folder / EVALUATION} and {write_segmentation_card(folder)}")
        else:
            print(f"Wrote {folder / EVALUATION}; no {TRAINING_INFO} there, so the model card was not regenerated.")
    return result


if __name__ == "__main__":
    main()
