"""Label efficiency and domain shift of diffusion-feature heads on CHASE_DB1 (issue 6).

For every N in ``--num-labelled`` (the first N training images, sorted: Image_01L, Image_01R, ...):

* a head per ``--heads`` x ``--policies`` is trained with ``training/train_feature_head.py`` on the frozen fundus DDPM
  (``--ddpm``), in ``<work>/<head>-<policy>-n<N>`` (a folder that exists is reused, so an interrupted run resumes);
* a **plain supervised U-Net** -- the DDPM's ``UNet2DModel`` architecture, random initialisation, image in and vessel
  logits out, cross-entropy + soft Dice, AdamW 1e-3, random 128 crops with flips -- is trained on the same N images for
  the **same CPU budget**: the wall time of the slowest head at that N (feature extraction included; the DDPM's own
  unlabelled pre-training is not counted for either), or ``--unet-seconds``;
* all are scored on the 8 test images (Image_11L–Image_14R, ``1stHO``; full photographs by default, ``--crop`` for
  central crops) by the package's metrics: Dice, clDice, AUC-ROC (mean ± std over images), inside each photograph's
  field of view (``field_of_view_mask``, computed from the photograph as shown to the model). Every model sees the
  surround filled with the field of view's mean colour and predicts background outside it (the heads through the
  pipeline's ``field_of_view``, the U-Net the same way, in training too), and the heads segment in ``--tile-size``
  windows.

**Domain shift** (models of N = ``--shift-num-labelled``): the same test images after a documented photometric shift
(`photometric_shift`: channel gains R x0.85, G x1.10, B x1.25, gamma 1.5, Gaussian blur sigma 2 px), "noise" vs
"anchor" (and the U-Net for reference). Nothing is retrained.

Test-image features are cached per policy in ``<work>/cache`` (keyed by image, weights, blocks, timesteps, policy and
seed), so every head of a policy reuses them. Writes ``--output`` (JSON) and prints the tables; ``--write-card``
also writes ``evaluation.json`` + the model card into every head folder and into the DDPM folder. On 2 cores, run N=20
and N=1,2,5 as two processes (``--shift-num-labelled 0`` for the second) and join them with ``--merge A.json B.json``.

    python benchmarks/label_efficiency.py --ddpm checkpoints/fundus-ddpm-chase --threads 2
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from diffusers_retina.data import CHASE_DB1_TEST  # noqa: E402
from diffusers_retina.hub import read_json, write_json  # noqa: E402
from diffusers_retina.metrics import MetricAccumulator  # noqa: E402

REPORTED = ("dice", "cldice", "auc_roc")
SHIFT = {"gains": (0.85, 1.10, 1.25), "gamma": 1.5, "blur_sigma": 2.0}


def parse_args(argv=None):
    parser = _common.base_parser(__doc__.split("\n\n")[0], "label_efficiency")
    parser.set_defaults(pipeline=None)
    parser.add_argument("--ddpm", default="checkpoints/fundus-ddpm-chase", help="DDPMPipeline folder (frozen).")
    parser.add_argument("--num-labelled", nargs="+", type=int, default=[1, 2, 5, 20])
    parser.add_argument("--heads", nargs="+", default=["pixel_mlp", "freq_agg"], choices=["pixel_mlp", "freq_agg"])
    parser.add_argument("--policies", nargs="+", default=["noise", "anchor"], choices=["noise", "anchor"])
    parser.add_argument("--blocks", default="up.1,up.2")
    parser.add_argument("--timesteps", default="50,150,250")
    parser.add_argument("--head-steps", type=int, default=1000, help="PixelMLPEnsemble: steps per member.")
    parser.add_argument("--freq-steps", type=int, default=400, help="FreqAggHead: steps (batches of 4 crops).")
    parser.add_argument("--crops-per-image", type=int, default=32)
    parser.add_argument("--max-crops", type=int, default=160,
                        help="Cap on the crops of one head (features are held in memory: 640 crops of 128 px at "
                             "blocks up.1 + up.2 ran out of 24 GB); N images get min(--crops-per-image, this / N).")
    parser.add_argument("--unet-seconds", type=float, default=None,
                        help="Budget of the supervised U-Net (default: the slowest head's time at the same N).")
    parser.add_argument("--crop", type=int, default=0, help="Central test crop (0: full 999x960 photographs).")
    parser.add_argument("--tile-size", type=int, default=256,
                        help="Window of the heads' tiled segmentation (0: whole photographs at once).")
    parser.add_argument("--feature-context", choices=["crop", "image"], default="crop",
                        help="Heads: features of each training crop alone, or of the whole photograph (then segment "
                             "with --tile-size 0).")
    parser.add_argument("--pixels-per-step", type=int, default=64, help="PixelMLPEnsemble: pixels per step.")
    parser.add_argument("--edge-crop-fraction", type=float, default=0.25,
                        help="Heads: fraction of training crops centred on the field-of-view boundary.")
    parser.add_argument("--images", nargs="+", default=list(CHASE_DB1_TEST))
    parser.add_argument("--shift-num-labelled", type=int, default=20, help="N of the domain-shift test (0: none).")
    parser.add_argument("--work", default="runs/label-efficiency", help="Head / U-Net folders and the cache.")
    parser.add_argument("--write-card", action="store_true",
                        help="Write evaluation.json and the model card into every head folder and the DDPM folder.")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="Join complete runs of the same setting made side by side (e.g. one process for N=20, one "
                             "for N=1,2,5) into --output, rows ordered by N; with --write-card, their cards.")
    args = parser.parse_args(argv)
    if args.shift_num_labelled and args.shift_num_labelled not in args.num_labelled:
        parser.error(f"--shift-num-labelled {args.shift_num_labelled} is not one of --num-labelled.")
    return args


def photometric_shift(image: torch.Tensor, gains=SHIFT["gains"], gamma: float = SHIFT["gamma"],
                      blur_sigma: float = SHIFT["blur_sigma"]) -> torch.Tensor:
    """A different camera: per-channel gains (colour balance), a gamma curve and a Gaussian blur (defocus).

    ``image``: ``(3, H, W)`` in [-1, 1]; returns the same range and shape.
    """
    x = (image.float() + 1) / 2
    x = (x * torch.tensor(gains).view(3, 1, 1)).clamp(0, 1) ** gamma
    radius = int(math.ceil(3 * blur_sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-offsets ** 2 / (2 * blur_sigma ** 2))
    kernel = (kernel / kernel.sum()).repeat(3, 1, 1, 1)  # (3, 1, 1, k): depthwise, separable
    x = F.conv2d(F.pad(x[None], (radius, radius, 0, 0), mode="reflect"), kernel, groups=3)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.transpose(-1, -2), groups=3)
    return x[0] * 2 - 1


def load_training_script():
    path = _common.REPO / "training" / "train_feature_head.py"
    spec = importlib.util.spec_from_file_location("train_feature_head", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def data_arguments() -> List[str]:
    root = _common.chase_root_or_exit()
    return ["--train_data_dir", str(root), "--image_dir", "images", "--mask_dir", "1stHO", "--mask_suffix", "_1stHO",
            "--train_stems", "Image_0*,Image_10*"]


def crops_per_image(args, num_labelled: int) -> int:
    return max(1, min(args.crops_per_image, args.max_crops // num_labelled))


def train_head(script, args, folder: Path, head: str, policy: str, num_labelled: int) -> None:
    script.main(["--ddpm", str(_common.resolve_path(args.ddpm)), "--head", head, "--policy", policy,
                 "--blocks", args.blocks, "--timesteps", args.timesteps, "--num_labelled", str(num_labelled),
                 "--crops_per_image", str(crops_per_image(args, num_labelled)),
                 "--max_train_steps", str(args.head_steps if head == "pixel_mlp" else args.freq_steps),
                 "--pixels_per_step", str(args.pixels_per_step), "--edge_crop_fraction", str(args.edge_crop_fraction),
                 "--feature_context", args.feature_context,
                 "--seed", str(args.seed), "--output_dir", str(folder)] + data_arguments()
                + cache_arguments(args))


def cache_arguments(args) -> List[str]:
    """The heads' feature cache: crop features are cached (each N cuts its own crops); whole-photograph features are
    not, so that every head's wall time -- the U-Net's budget -- includes extracting its labelled photographs."""
    return ["--cache_dir", str(Path(args.work) / "cache")] if args.feature_context == "crop" else []


def train_supervised_unet(args, folder: Path, num_labelled: int, seconds: float) -> None:
    """The plain supervised baseline: the DDPM's UNet2DModel architecture from scratch, for ``seconds`` of wall time."""
    from diffusers import UNet2DModel

    from diffusers_retina.data import chase_db1

    config = dict(UNet2DModel.load_config(str(_common.resolve_path(args.ddpm) / "unet")))
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config.update(in_channels=3, out_channels=2, sample_size=128)
    torch.manual_seed(args.seed)
    unet = UNet2DModel(**config)
    from diffusers_retina.data.modality import field_of_view_masks, fill_outside_field_of_view

    train = chase_db1(split="train")
    items = [train[i] for i in range(num_labelled)]  # the same first-N (sorted) images as the heads
    for item in items:  # the surround filled as for the heads (and as the predictor below does)
        item["image"] = fill_outside_field_of_view(item["image"][None], field_of_view_masks(item["image"][None]))[0]
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-4)
    started, steps, crop, batch = time.time(), 0, 128, 4
    unet.train()
    while time.time() - started < seconds:
        images, masks = [], []
        for index in torch.randint(0, len(items), (batch,), generator=generator).tolist():
            item = items[index]
            height, width = item["mask"].shape
            top = int(torch.randint(0, height - crop + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - crop + 1, (1,), generator=generator))
            image = item["image"][:, top: top + crop, left: left + crop]
            mask = item["mask"][top: top + crop, left: left + crop]
            for dim in (-1, -2):
                if bool(torch.rand((), generator=generator) < 0.5):
                    image, mask = image.flip(dim), mask.flip(dim)
            images.append(image)
            masks.append(mask)
        images, masks = torch.stack(images), torch.stack(masks).long()
        logits = unet(images, 0).sample
        vessel = logits.softmax(dim=1)[:, 1]
        dice = 1 - (2 * (vessel * masks).sum() + 1) / (vessel.sum() + masks.sum() + 1)
        loss = F.cross_entropy(logits, masks) + dice
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
    unet.eval().save_pretrained(str(folder))
    write_json(folder / "training_info.json", {"num_labelled": num_labelled, "training_seconds": time.time() - started,
                                                "budget_seconds": seconds, "global_step": steps, "batch_size": batch,
                                                "crop": crop, "learning_rate": 1e-3, "seed": args.seed})


def evaluate(predict: Callable[[torch.Tensor, torch.Tensor], Dict[str, torch.Tensor]], items: Sequence[Dict[str, Any]],
             field_of_view: bool = True) -> Dict[str, Any]:
    """Score ``predict(image, fov) -> {"mask", "probability"}`` on the test items, inside each image's field of
    view (every pixel with ``field_of_view=False``)."""
    from diffusers_retina.data.modality import field_of_view_masks

    accumulator = MetricAccumulator()
    seconds = []
    for item in items:
        fov = (field_of_view_masks(item["image"][None])[0] if field_of_view
               else torch.ones(item["mask"].shape, dtype=torch.bool))
        started = time.perf_counter()
        prediction = predict(item["image"], fov)
        seconds.append(time.perf_counter() - started)
        accumulator.update(prediction["mask"].numpy().astype(bool), prediction["probability"].float().numpy(),
                           item["mask"].numpy().astype(bool), fov=fov.numpy(), name=item["name"])
    summary = accumulator.summary()
    return {"metrics": {m: summary[f"{m}_mean"] for m in REPORTED},
            "std": {m: summary[f"{m}_std"] for m in REPORTED},
            "per_image": accumulator.per_image(), "seconds_per_image": sum(seconds) / len(seconds)}


def head_predictor(pipe, args):
    def predict(image: torch.Tensor, fov: torch.Tensor) -> Dict[str, torch.Tensor]:
        # the test photographs' features are computed afresh for every head (the feature cache is training's: the
        # heads' training crops keep using it through --cache_dir); at the scale the heads learnt (native here)
        out = pipe((image[None] + 1) / 2, output="segmentation", seed=args.seed, processing_resolution="native",
                   tile_size=args.tile_size or None, field_of_view=fov)
        return {"mask": out.masks[0] == 1, "probability": out.probabilities[0, 1]}

    return predict


def unet_predictor(unet):
    from diffusers_retina.image_processing import pad_to_multiple

    multiple = 2 ** (len(unet.config.block_out_channels) - 1)

    from diffusers_retina.data.modality import fill_outside_field_of_view

    @torch.no_grad()
    def predict(image: torch.Tensor, fov: torch.Tensor) -> Dict[str, torch.Tensor]:
        image = fill_outside_field_of_view(image[None], fov[None])[0]
        padded, (height, width) = pad_to_multiple(image[None], multiple)
        probability = unet(padded, 0).sample.softmax(dim=1)[0, 1, :height, :width] * fov
        return {"mask": probability > 0.5, "probability": probability}

    return predict


def markdown_table(rows: List[Dict[str, Any]], condition: str) -> str:
    lines = ["| N labelled | Model | Dice | clDice | AUC-ROC |", "|---|---|---|---|---|"]
    for row in rows:
        if row["condition"] == condition:
            m = row["metrics"]
            lines.append(f"| {row['num_labelled']} | {row['method']} | {m['dice']:.3f} | {m['cldice']:.3f} | "
                         f"{m['auc_roc']:.3f} |")
    return "\n".join(lines)


def method_name(head: str, policy: str) -> str:
    return {"pixel_mlp": "PixelMLPEnsemble", "freq_agg": "FreqAggHead"}[head] + f" ({policy})"


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    device = _common.setup(args)
    if device.type != "cpu":
        print("Note: heads and the U-Net run on the CPU here (the budget comparison is a CPU one).")
    from diffusers import UNet2DModel

    from diffusers_retina import DiffusionFeaturePipeline

    if not (_common.resolve_path(args.ddpm) / "model_index.json").is_file():
        sys.exit(f"--ddpm {args.ddpm}: no saved DDPMPipeline there (train one: train_mask2image.py --task fundus).")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    test = _common.test_crops(args.images, args.crop)
    shifted = [dict(item, image=photometric_shift(item["image"])) for item in test]
    script = load_training_script()
    rows: List[Dict[str, Any]] = []
    region = (f"central {args.crop}x{args.crop} crops" if args.crop else "full photographs") + \
        ", metrics inside the field of view"
    setting = (f"{len(test)} CHASE_DB1 test images ({region}, `1stHO`); features: blocks {args.blocks}, timesteps "
               f"{args.timesteps}, seed {args.seed}; heads trained on 128 crops of the labelled images "
               f"(min({args.crops_per_image}, {args.max_crops} / N) per image, {args.edge_crop_fraction:.0%} of them "
               f"on the field-of-view boundary; PixelMLPEnsemble {args.head_steps} steps of {args.pixels_per_step} "
               f"field-of-view pixels per member, FreqAggHead {args.freq_steps} steps; features of the "
               f"{'crops' if args.feature_context == 'crop' else 'whole photographs'}), segmenting "
               f"{f'in {args.tile_size} windows' if args.tile_size else 'whole photographs'}; U-Net: same wall time "
               "as the slowest head at that N.")
    result = {**_common.header(args, device), "ddpm": str(args.ddpm), "setting": setting, "region": region,
              "shift": SHIFT, "rows": rows, "complete": False}
    for num_labelled in args.num_labelled:
        conditions = [("clean", test)] + ([("shifted", shifted)] if num_labelled == args.shift_num_labelled else [])
        head_seconds = []
        for head in args.heads:
            for policy in args.policies:
                folder = work / f"{head}-{policy}-n{num_labelled}"
                if not (folder / "model_index.json").is_file():
                    print(f"training {folder.name} ...", flush=True)
                    train_head(script, args, folder, head, policy, num_labelled)
                info = read_json(folder / "training_info.json")
                head_seconds.append(info["training_seconds"])
                pipe = DiffusionFeaturePipeline.from_pretrained(str(folder), dtype=torch.float32)
                pipe.set_progress_bar_config(disable=True)
                for condition, items in conditions:
                    scores = evaluate(head_predictor(pipe, args), items)
                    rows.append({"num_labelled": num_labelled, "method": method_name(head, policy), "head": head,
                                 "policy": policy, "condition": condition, "folder": str(folder),
                                 "crops_per_image": info["args"]["crops_per_image"],
                                 "training_seconds": info["training_seconds"], **scores})
                    _common.save_json(args.output, result)  # after every row: a crash keeps what was measured
                    print(f"N={num_labelled} {rows[-1]['method']} [{condition}]: "
                          + ", ".join(f"{m} {rows[-1]['metrics'][m]:.3f}" for m in REPORTED), flush=True)
        folder = work / f"unet-n{num_labelled}"
        if not (folder / "config.json").is_file():
            budget = args.unet_seconds or max(head_seconds)
            print(f"training the supervised U-Net on N={num_labelled} for {budget:.0f} s ...", flush=True)
            train_supervised_unet(args, folder, num_labelled, budget)
        info = read_json(folder / "training_info.json")
        unet = UNet2DModel.from_pretrained(str(folder)).float().eval()
        for condition, items in conditions:
            scores = evaluate(unet_predictor(unet), items)
            rows.append({"num_labelled": num_labelled, "method": "supervised U-Net (same budget)", "head": None,
                         "policy": None, "condition": condition, "folder": str(folder),
                         "training_seconds": info["training_seconds"], "unet_steps": info["global_step"], **scores})
            _common.save_json(args.output, result)
            print(f"N={num_labelled} U-Net ({info['global_step']} steps) [{condition}]: "
                  + ", ".join(f"{m} {rows[-1]['metrics'][m]:.3f}" for m in REPORTED), flush=True)

    result["complete"] = True
    path = _common.save_json(args.output, result)
    report(args, result, path)


def merge(args) -> Dict[str, Any]:
    """``--merge``: complete runs of one setting (same DDPM, heads, images, crops and head budget) as one result."""
    parts = [read_json(_common.resolve_path(path)) for path in args.merge]
    for path, part in zip(args.merge, parts):
        if not part or not part.get("complete"):
            sys.exit(f"--merge: {path} is missing or not a complete run.")
    settings = {(part["ddpm"], part["setting"]) for part in parts}
    if len(settings) != 1:
        sys.exit(f"--merge: the runs differ in their DDPM or setting: {sorted(settings)}")
    rows = sorted((row for part in parts for row in part["rows"]), key=lambda row: row["num_labelled"])
    seen = [(row["num_labelled"], row["method"], row["condition"]) for row in rows]
    if len(seen) != len(set(seen)):
        sys.exit("--merge: a row (N, model, condition) appears in more than one run.")
    merged_from = [part["command"] for part in parts]
    result = {**parts[0], "rows": rows, "merged_from": merged_from, "command": _common.merged_command(merged_from)}
    path = _common.save_json(args.output, result)
    report(args, result, path)
    return result


def report(args, result: Dict[str, Any], path: Path) -> None:
    """The tables on stdout and, with ``--write-card``, ``evaluation.json`` + the cards of the heads and the DDPM."""
    rows, setting, region = result["rows"], result["setting"], result.get("region", "test images")
    for condition in ("clean", "shifted"):
        selected = [r for r in rows if r["condition"] == condition]
        if not selected:
            continue
        print(f"\n{'Test images' if condition == 'clean' else 'Photometrically shifted test images'} ({region})")
        _common.print_table(["N", "model", "Dice", "clDice", "AUC-ROC", "train s", "s/image"],
                            [[r["num_labelled"], r["method"], *(r["metrics"][m] for m in REPORTED),
                              r["training_seconds"], r["seconds_per_image"]] for r in selected])
    print(f"\nWrote {path}")

    if args.write_card:
        from diffusers_retina.hub import write_feature_head_card, write_mask2image_card

        tables = (f"Label efficiency on the {setting}\n\n" + markdown_table(rows, "clean"))
        if any(r["condition"] == "shifted" for r in rows):
            tables += ("\n\nDomain shift (the same test images after gains R/G/B "
                       f"{'/'.join(map(str, SHIFT['gains']))}, gamma {SHIFT['gamma']}, Gaussian blur sigma "
                       f"{SHIFT['blur_sigma']} px; nothing retrained):\n\n" + markdown_table(rows, "shifted"))
        evaluation = {"markdown": tables, "command": result["command"], "rows": rows}
        for folder in sorted({Path(r["folder"]) for r in rows if r["head"]}):
            write_json(folder / "evaluation.json", evaluation)
            write_feature_head_card(folder)
        ddpm = _common.resolve_path(result["ddpm"])
        write_json(ddpm / "evaluation.json", evaluation)
        write_mask2image_card(ddpm)
        print("Wrote evaluation.json and the model cards of the heads and the DDPM")


if __name__ == "__main__":
    main()
