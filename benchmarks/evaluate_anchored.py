"""Prior-anchored diffusion against its controls on the 8 CHASE_DB1 test images (reference ``1stHO``), one table.

Rows (each repeatable, ``LABEL=...``):

* ``--segmenter LABEL=DIR``: a deterministic U-Net (a ``UNet2DModel`` folder: image in, one logit out at timestep 0),
  e.g. the prior alone, or a U-Net trained for the prior's plus the refiner's budget;
* ``--cascade LABEL=PRIOR_DIR,REFINER_DIR``: the prior, then a refiner trained without noise on ``[image | prior]``
  (one forward each);
* ``--diffusion LABEL=DIR@STEPS[,STEPS...]``: a ``SegmentationEnsemblePipeline`` (anchored or plain), one row per step
  count, ``--ensemble-size`` members, DDIM (the checkpoint's scheduler config);
* the second human observer (``2ndHO``), scored by the same code.

Every row uses the same reflect padding, ``--tile-size`` windows with Gaussian blending, threshold (the checkpoint's
``default_threshold`` for pipelines that store one, else ``--threshold``), metrics and machine; s / image is the wall
time of one full call per image (prior included), single run, after one untimed warm-up call on a small crop.

Columns: Dice, clDice, AUC-ROC, ECE, NLL, Brier, HD95, s / image; uncertainty: AUROC of the predictive entropy (of the
fused probability) as a detector of error pixels (fused mask != 1stHO) and of the pixels where the two observers
disagree (1stHO != 2ndHO). ``--shift`` scores the same rows on photographs with a fixed camera-like change (channel
gains R 0.85 / G 1.10 / B 1.25, gamma 1.5, blur sigma 2 px: the change ``label_efficiency.py`` uses), a robustness
check; nothing is tuned on the test images.

    python benchmarks/evaluate_anchored.py --threads 2 \\
        --segmenter "U-Net (prior) alone=checkpoints/vessel-segmenter-chase" \\
        --diffusion "Residual anchored=checkpoints/segmentation-anchored-chase@1,2,4"
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Dict, List, Tuple  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from evaluate_segmentation import ENTROPY_BINS, histogram_auroc  # noqa: E402
from label_efficiency import photometric_shift  # noqa: E402

from diffusers_retina.data import CHASE_DB1_TEST, chase_db1  # noqa: E402
from diffusers_retina.metrics import MetricAccumulator, negative_log_likelihood  # noqa: E402
from diffusers_retina.pipelines.sampling import segmenter_probabilities  # noqa: E402

COLUMNS = ("dice", "cldice", "auc_roc", "ece", "nll", "brier", "hd95")


def parse_args(argv=None):
    parser = _common.base_parser(__doc__.split("\n\n")[0], "evaluate_anchored")
    parser.set_defaults(pipeline=None)
    parser.add_argument("--segmenter", action="append", default=[], metavar="LABEL=DIR")
    parser.add_argument("--cascade", action="append", default=[], metavar="LABEL=PRIOR_DIR,REFINER_DIR")
    parser.add_argument("--diffusion", dest="pipelines", action="append", default=[],
                        metavar="LABEL=DIR@STEPS")
    parser.add_argument("--ensemble-size", type=int, default=5)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--tile-overlap", type=float, default=0.25)
    parser.add_argument("--crop", type=int, default=0, help="Central crop for quick checks (0: full 999x960).")
    parser.add_argument("--images", nargs="+", default=list(CHASE_DB1_TEST))
    parser.add_argument("--shift", action="store_true", help="Score on camera-shifted photographs instead.")
    parser.add_argument("--write-card", action="append", default=[], metavar="LABEL=FOLDER",
                        help="Write this row's metrics and the whole table into FOLDER/evaluation.json and regenerate "
                             "its model card (only for the full evaluation: all 8 test images, no crop, no shift).")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="Instead of evaluating: join the rows of earlier runs of this script (same images, crop, "
                             "shift and machine; e.g. rows split over two processes, one thread each) into --output, "
                             "and write cards from the joined table.")
    args = parser.parse_args(argv)
    if args.merge:
        return args
    if args.write_card and (args.crop or args.shift or sorted(args.images) != sorted(CHASE_DB1_TEST)):
        parser.error("--write-card is only for the full evaluation (all 8 test images, --crop 0, no --shift).")
    if not (args.segmenter or args.cascade or args.pipelines):
        parser.error("Give at least one --segmenter, --cascade or --diffusion row.")
    for spec in args.segmenter + args.cascade + args.pipelines:
        if "=" not in spec:
            parser.error(f"Row {spec!r} must be LABEL=...")
    return args


def load_unet(path: str, device):
    from diffusers import UNet2DModel

    folder = _common.resolve_path(path)
    if (folder / "unet" / "config.json").is_file():  # a training output folder
        folder = folder / "unet"
    if not (folder / "config.json").is_file():
        sys.exit(f"{path}: no config.json (a saved UNet2DModel folder or a training output with unet/).")
    return UNet2DModel.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()


def build_rows(args, device) -> List[Tuple[str, Callable, Dict]]:
    """``(label, predict(image) -> (probability (H, W), entropy (H, W) | None, threshold), info)`` per row."""
    rows = []
    tiles = dict(tile_size=args.tile_size or None, tile_overlap=args.tile_overlap)

    for spec in args.segmenter:
        label, path = spec.split("=", 1)
        unet = load_unet(path, device)

        def predict(image, unet=unet):
            return segmenter_probabilities(unet, image[None].to(device), **tiles)[0, 0], None, args.threshold

        rows.append((label, predict, {"kind": "segmenter", "path": path}))

    for spec in args.cascade:
        label, paths = spec.split("=", 1)
        prior_path, refiner_path = paths.split(",")
        prior, refiner = load_unet(prior_path, device), load_unet(refiner_path, device)

        def predict(image, prior=prior, refiner=refiner):
            image = image[None].to(device)
            p = segmenter_probabilities(prior, image, **tiles)
            return segmenter_probabilities(refiner, image, extra=2 * p - 1, **tiles)[0, 0], None, args.threshold

        rows.append((label, predict, {"kind": "cascade", "prior": prior_path, "refiner": refiner_path}))

    for label, path, pipe, threshold, step_count in _common.pipeline_rows(args.pipelines, device, args.threshold):
        def predict(image, pipe=pipe, step_count=step_count, threshold=threshold):
            out = pipe((image + 1) / 2, num_inference_steps=step_count, ensemble_size=args.ensemble_size,
                       threshold=threshold, generator=_common.generator(args.seed), batch_size="auto",
                       output_type="pt", **tiles)
            return out.probabilities[0, 0], out.entropy[0], threshold

        rows.append((label, predict, {"kind": "pipeline", "path": path, "steps": step_count,
                                      "anchor": pipe.config.get("anchor"), "ensemble_size": args.ensemble_size}))
    return rows


def binary_entropy(probability: np.ndarray) -> np.ndarray:
    p = np.clip(probability, 1e-7, 1 - 1e-7)
    return -(p * np.log(p) + (1 - p) * np.log(1 - p))


class EntropyDetector:
    """Pooled AUROC of an entropy map as a detector of a pixel set (histogram of entropy / ln 2)."""

    def __init__(self):
        self.histogram = np.zeros((2, ENTROPY_BINS))

    def update(self, entropy: np.ndarray, positive: np.ndarray):
        score = np.clip(entropy.reshape(-1) / math.log(2.0), 0.0, 1.0)
        bins = np.minimum((score * ENTROPY_BINS).astype(np.int64), ENTROPY_BINS - 1)
        positive = positive.reshape(-1)
        self.histogram += [np.bincount(bins[~positive], minlength=ENTROPY_BINS),
                           np.bincount(bins[positive], minlength=ENTROPY_BINS)]

    def auroc(self) -> float:
        return histogram_auroc(self.histogram[1], self.histogram[0])


def merge(args):
    """Join the tables of several runs (``--merge``): rows in the order given, one observer row."""
    import json

    parts = [json.loads(_common.resolve_path(path).read_text()) for path in args.merge]
    keys = {(tuple(p["images"]), p["crop"], p["shift"]) for p in parts}
    if len(keys) != 1:
        sys.exit(f"--merge: the runs differ in images, crop or shift: {sorted(keys)}")
    images, crop, shift = keys.pop()
    if args.write_card and (crop or shift or sorted(images) != sorted(CHASE_DB1_TEST)):
        sys.exit("--write-card is only for the full evaluation (all 8 test images, --crop 0, no --shift).")
    # a label measured by several parts (e.g. row 1 re-timed beside a later row) keeps its first part's figures
    rows, seen = [], set()
    for r in (r for p in parts for r in p["rows"] if r.get("kind") != "observer"):
        if r["label"] not in seen:
            seen.add(r["label"])
            rows.append(r)
    rows.append(next(r for r in parts[0]["rows"] if r.get("kind") == "observer"))
    per_image = [{} for _ in images]
    for part in parts:
        for record, merged in zip(part["per_image"], per_image):
            for key, value in record.items():
                merged.setdefault(key, value)
    result = {**parts[0], "rows": rows, "merged_from": [p["command"] for p in parts], "per_image": per_image}
    # the parts ran side by side (one thread each), then this merge
    result["command"] = _common.merged_command(result["merged_from"])
    path = _common.save_json(args.output, result)
    print(table_markdown(rows))
    print(f"wrote {path}")
    for spec in args.write_card:
        write_card(spec, rows, result)
    return result


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    root = _common.chase_root_or_exit()
    device = _common.setup(args)
    torch.set_grad_enabled(False)
    reference = chase_db1(root=root, split="test", observer="1stHO")
    second = chase_db1(root=root, split="test", observer="2ndHO")
    rows = build_rows(args, device)

    # one untimed warm-up call per row (allocator, first-call costs), on a small crop
    warm = reference[0]["image"][:, :64, :64]
    for _, predict, _ in rows:
        predict(warm)

    labels = [label for label, _, _ in rows]
    accumulators = {label: MetricAccumulator() for label in labels + ["Second observer (2ndHO)"]}
    extra = {label: {"nll": [], "brier": [], "seconds": []} for label in labels}
    error_detectors = {label: EntropyDetector() for label in labels}
    disagreement_detectors = {label: EntropyDetector() for label in labels}
    per_image = []
    for name in args.images:
        index = reference.stems.index(name)
        item, observer = reference[index], second[index]["mask"].numpy().astype(bool)
        box = _common.central_box(*item["mask"].shape, args.crop) if args.crop else (0, 0, *item["mask"].shape)
        image = _common.crop(item["image"], box)
        if args.shift:
            image = photometric_shift(image)
        target = _common.crop(item["mask"], box).numpy().astype(bool)
        observer = _common.crop(observer, box)
        disagreement = target != observer
        record = {"image": name}
        for label, predict, _ in rows:
            start = time.perf_counter()
            probability, entropy, threshold = predict(image)
            seconds = time.perf_counter() - start
            probability = probability.float().cpu().numpy().astype(np.float64)
            entropy = binary_entropy(probability) if entropy is None else entropy.float().cpu().numpy()
            mask = probability > threshold
            scores = accumulators[label].update(mask, probability, target, name=name)
            extra[label]["nll"].append(negative_log_likelihood(probability, target))
            extra[label]["brier"].append(float(np.mean((probability - target) ** 2)))
            extra[label]["seconds"].append(seconds)
            error_detectors[label].update(entropy, mask != target)
            disagreement_detectors[label].update(entropy, disagreement)
            record[label] = {"dice": scores["dice"], "seconds": seconds}
            print(f"{name}  {label:<48s} Dice {scores['dice']:.4f}  {seconds:6.1f} s", flush=True)
        accumulators["Second observer (2ndHO)"].update(observer, observer.astype(np.float64), target, name=name)
        per_image.append(record)

    table = []
    for label, _, info in rows:
        summary = accumulators[label].summary()
        row = {"label": label, **info,
               **{f"{k}_mean": summary[f"{k}_mean"] for k in ("dice", "cldice", "auc_roc", "ece", "hd95")},
               **{f"{k}_std": summary[f"{k}_std"] for k in ("dice", "cldice", "auc_roc", "ece", "hd95")},
               "nll_mean": float(np.mean(extra[label]["nll"])), "brier_mean": float(np.mean(extra[label]["brier"])),
               "seconds_per_image": float(np.mean(extra[label]["seconds"])),
               "entropy_auroc_errors": error_detectors[label].auroc(),
               "entropy_auroc_observer_disagreement": disagreement_detectors[label].auroc()}
        table.append(row)
    # times as ratios to the first deterministic row (the prior), measured in this same run
    base = next((r for r in table if r["kind"] == "segmenter"), None)
    for r in table:
        r["time_ratio"] = r["seconds_per_image"] / base["seconds_per_image"] if base else None
    observer_summary = accumulators["Second observer (2ndHO)"].summary()
    table.append({"label": "Second observer (2ndHO)", "kind": "observer",
                  **{f"{k}_mean": observer_summary[f"{k}_mean"] for k in ("dice", "cldice", "hd95")}})

    headers = ["row", "Dice", "clDice", "AUC-ROC", "ECE", "NLL", "Brier", "HD95", "s/img", "x row 1", "H→err",
               "H→obs"]
    _common.print_table(headers, [[r["label"], r.get("dice_mean"), r.get("cldice_mean"), r.get("auc_roc_mean"),
                                   r.get("ece_mean"), r.get("nll_mean"), r.get("brier_mean"), r.get("hd95_mean"),
                                   r.get("seconds_per_image"), r.get("time_ratio"), r.get("entropy_auroc_errors"),
                                   r.get("entropy_auroc_observer_disagreement")] for r in table])
    result = {**_common.header(args, device), "images": args.images, "crop": args.crop, "shift": args.shift,
              "rows": table, "per_image": per_image}
    path = _common.save_json(args.output, result)
    print(f"wrote {path}")
    for spec in args.write_card:
        write_card(spec, table, result)
    return result


def table_markdown(table) -> str:
    """The table as markdown (what the README and the cards show)."""
    with_ratio = any(r.get("time_ratio") is not None for r in table)
    lines = ["| Row | Dice | clDice | AUC-ROC | ECE | NLL | Brier | HD95 (px) | s / image | "
             + ("x row 1 (time) | " if with_ratio else "")
             + "entropy AUROC: errors | entropy AUROC: observers disagree |", "|---|" + "---|" * (11 if with_ratio else 10)]
    for r in table:
        cells = [_common.fmt(r.get(k)) for k in ("dice_mean", "cldice_mean", "auc_roc_mean", "ece_mean", "nll_mean",
                                                 "brier_mean", "hd95_mean")]
        cells.append(_common.fmt(r.get("seconds_per_image"), 1))
        if with_ratio:
            cells.append(_common.fmt(r.get("time_ratio"), 2))
        cells += [_common.fmt(r.get(k)) for k in ("entropy_auroc_errors", "entropy_auroc_observer_disagreement")]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_card(spec: str, table, result) -> None:
    """``LABEL=FOLDER``: the row's metrics + the whole table into ``FOLDER/evaluation.json``, then the card."""
    from diffusers_retina.hub import EVALUATION, write_json, write_segmentation_card, write_segmenter_card

    label, folder = spec.split("=", 1)
    rows = [r for r in table if r["label"] == label]
    if not rows:
        sys.exit(f"--write-card: no row labelled {label!r}; rows: {[r['label'] for r in table]}")
    row = rows[0]
    folder = _common.resolve_path(folder)
    write_json(folder / EVALUATION, {
        "row": label, "split": "test (Image_11L–Image_14R, 1stHO, full resolution)",
        "metrics": {k: row.get(f"{k}_mean") for k in ("dice", "cldice", "auc_roc", "ece", "hd95")},
        "markdown": ("8 CHASE_DB1 test images at full resolution, reference `1stHO`, mean over images; this model is "
                     f"the row **{label}**.\n\n" + table_markdown(table)),
        "command": result["command"],
    })
    card = write_segmentation_card(folder) if (folder / "model_index.json").is_file() else write_segmenter_card(folder)
    print(f"wrote {folder / EVALUATION} and {card}")


if __name__ == "__main__":
    main()
