"""Evaluate Mask2ImagePipelines on the CHASE_DB1 test masks (Image_11L–Image_14R, `1stHO`): mask faithfulness and
image statistics against the real photographs.

For every pipeline (``--pipelines``, e.g. concat / spade / concat+spade models) and guidance scale
(``--guidance-scales``), each test mask is painted into a synthetic image (same seed for all), and

* **mask faithfulness**: the synthetic image is segmented by ``--segmenter`` (the reference
  SegmentationEnsemblePipeline) and scored (Dice, clDice) against the mask it was painted from. The same segmenter on
  the *real* photograph gives the reference row (what a perfect synthesis could reach with this segmenter);
* **realism statistics** (computable offline; no Inception network is available here, so no FID/KID): the mean
  1-Wasserstein distance between the per-channel intensity histograms of synthetic and real images, and the mean
  absolute difference of their radially averaged log power spectra. As a scale, the same statistics between the real
  test photographs and the real *training* photographs (other eyes, same camera) are reported as a reference row.

Writes ``--output`` (JSON), ``--figure`` (PNG: mask | synthetic | real per row) and, with ``--write-card``, the first
pipeline's ``evaluation.json`` + regenerated model card.

Quick check on 256 crops of two images::

    python benchmarks/evaluate_synthesis.py --pipelines checkpoints/mask2image-chase --crop 256 \
        --images Image_11L Image_12R --output /tmp/synthesis.json
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from diffusers_retina import Mask2ImagePipeline  # noqa: E402
from diffusers_retina.data import CHASE_DB1_TEST, chase_db1  # noqa: E402
from diffusers_retina.metrics import MetricAccumulator  # noqa: E402
from diffusers_retina.synthesis import image_grid  # noqa: E402


def parse_args(argv=None):
    parser = _common.base_parser(__doc__.split("\n\n")[0], "evaluate_synthesis")
    parser.set_defaults(pipeline=None)
    parser.add_argument("--pipelines", nargs="+", required=True, help="Mask2ImagePipeline folders to compare.")
    parser.add_argument("--segmenter", default=_common.DEFAULT_PIPELINE,
                        help="SegmentationEnsemblePipeline that judges mask faithfulness.")
    parser.add_argument("--guidance-scales", nargs="+", type=float, default=[1.0, 1.5, 3.0])
    parser.add_argument("--steps", type=int, default=25, help="Synthesis steps (DDIM, trailing spacing).")
    parser.add_argument("--segmenter-steps", type=int, default=2)
    parser.add_argument("--segmenter-ensemble-size", type=int, default=3)
    parser.add_argument("--crop", type=int, default=256, help="Central crop size (0: full 999x960, tiled).")
    parser.add_argument("--tile-size", type=int, default=None, help="Synthesis tile (default: the model's size).")
    parser.add_argument("--images", nargs="+", default=list(CHASE_DB1_TEST))
    parser.add_argument("--figure", default="docs/mask2image_panel.png", help="PNG panel (empty: none).")
    parser.add_argument("--figure-images", type=int, default=3, help="Rows of the panel.")
    parser.add_argument("--write-card", action="store_true",
                        help="Write <first pipeline>/evaluation.json and regenerate its model card.")
    return parser.parse_args(argv)


def intensity_distance(a: np.ndarray, b: np.ndarray, bins: int = 64) -> float:
    """Mean over channels of the 1-Wasserstein distance between the intensity histograms of two HWC images in
    [0, 1] (the L1 distance between their CDFs times the bin width)."""
    distances = []
    for channel in range(a.shape[-1]):
        ha, _ = np.histogram(a[..., channel], bins=bins, range=(0.0, 1.0))
        hb, _ = np.histogram(b[..., channel], bins=bins, range=(0.0, 1.0))
        cdf_a, cdf_b = np.cumsum(ha) / max(ha.sum(), 1), np.cumsum(hb) / max(hb.sum(), 1)
        distances.append(float(np.abs(cdf_a - cdf_b).sum() / bins))
    return float(np.mean(distances))


def radial_log_spectrum(image: np.ndarray, bins: int = 32) -> np.ndarray:
    """Radially averaged log power spectrum of the grey version of an HWC image in [0, 1]."""
    grey = image.mean(axis=-1)
    grey = grey - grey.mean()
    power = np.abs(np.fft.fftshift(np.fft.fft2(grey))) ** 2
    height, width = grey.shape
    yy, xx = np.indices(grey.shape)
    radius = np.hypot((yy - height / 2) / height, (xx - width / 2) / width)  # cycles per pixel
    edges = np.linspace(0.0, 0.5, bins + 1)
    index = np.clip(np.digitize(radius.ravel(), edges) - 1, 0, bins - 1)
    sums = np.bincount(index, weights=power.ravel(), minlength=bins)
    counts = np.maximum(np.bincount(index, minlength=bins), 1)
    return np.log10(sums / counts + 1e-12)


def spectrum_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(radial_log_spectrum(a) - radial_log_spectrum(b))))


def hwc(tensor: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] or [0, 1] (``unit=True``) to HWC numpy in [0, 1]."""
    return tensor.permute(1, 2, 0).float().cpu().numpy()


def main(argv=None):
    args = parse_args(argv)
    root = _common.chase_root_or_exit()
    device = _common.setup(args)
    segmenter = _common.load_pipeline(args.segmenter, device, args.dtype)
    test = chase_db1(root=root, split="test")
    train = chase_db1(root=root, split="train")
    unknown = [n for n in args.images if n not in test.stems]
    if unknown:
        sys.exit(f"Unknown test images {unknown}; choose from {test.stems}.")

    def central(item):
        box = _common.central_box(*item["mask"].shape, args.crop) if args.crop else (0, 0, *item["mask"].shape)
        return _common.crop(item["image"], box), _common.crop(item["mask"], box)

    cases = [dict(zip(("image", "mask"), central(test[test.stems.index(name)])), name=name) for name in args.images]
    # a reference scale for the statistics: real test photographs against real training photographs
    references = [central(train[i])[0] for i in range(len(cases))]

    def segment(image01: torch.Tensor):
        return segmenter(image01[None], num_inference_steps=args.segmenter_steps,  # [0, 1], as the pipelines take
                         ensemble_size=args.segmenter_ensemble_size, generator=_common.generator(args.seed),
                         tile_size=256, output_type="pt")

    rows: List[Dict] = []
    real_faithfulness = MetricAccumulator()
    for case in cases:
        out = segment((case["image"] + 1) / 2)
        real_faithfulness.update(out.masks[0].numpy().astype(bool), out.probabilities[0, 0].numpy(),
                                 case["mask"].numpy().astype(bool), name=case["name"])
    summary = real_faithfulness.summary()
    rows.append({"name": "real photographs (segmenter reference)", "pipeline": None, "guidance_scale": None,
                 "dice": summary["dice_mean"], "dice_std": summary["dice_std"], "cldice": summary["cldice_mean"],
                 "intensity_w1": float(np.mean([intensity_distance(hwc((r + 1) / 2), hwc((c["image"] + 1) / 2))
                                                for r, c in zip(references, cases)])),
                 "log_spectrum_l1": float(np.mean([spectrum_distance(hwc((r + 1) / 2), hwc((c["image"] + 1) / 2))
                                                   for r, c in zip(references, cases)])),
                 "seconds_per_image": None, "note": "statistics: real training vs real test photographs"})
    panel_rows = []
    for pipeline_path in args.pipelines:
        folder = _common.resolve_path(pipeline_path)
        pipe = Mask2ImagePipeline.from_pretrained(str(folder), dtype=getattr(torch, args.dtype)).to(device)
        pipe.scheduler = _common.make_scheduler("ddim", pipe.scheduler.config, "trailing")
        pipe.set_progress_bar_config(disable=True)
        conditioning = pipe.unet.config.conditioning
        sample_size = pipe.unet.config.sample_size
        tile_size = args.tile_size or (sample_size if isinstance(sample_size, int) else None)
        for scale in args.guidance_scales:
            accumulator, w1, spectrum, seconds = MetricAccumulator(), [], [], []
            for index, case in enumerate(cases):
                started = time.perf_counter()
                synthetic = pipe(case["mask"][None], num_inference_steps=args.steps, guidance_scale=scale,
                                 generator=_common.generator(args.seed), tile_size=tile_size, output_type="pt").images[0]
                seconds.append(time.perf_counter() - started)
                out = segment(synthetic)
                accumulator.update(out.masks[0].numpy().astype(bool), out.probabilities[0, 0].numpy(),
                                   case["mask"].numpy().astype(bool), name=case["name"])
                real = hwc((case["image"] + 1) / 2)
                w1.append(intensity_distance(hwc(synthetic), real))
                spectrum.append(spectrum_distance(hwc(synthetic), real))
                if pipeline_path == args.pipelines[0] and scale == args.guidance_scales[0] \
                        and index < args.figure_images:
                    panel_rows.append([case["mask"].numpy() > 0, hwc(synthetic), real])
            summary = accumulator.summary()
            rows.append({"name": f"{conditioning} ({Path(pipeline_path).name}), guidance {scale:g}",
                         "pipeline": str(pipeline_path), "conditioning": conditioning, "guidance_scale": scale,
                         "dice": summary["dice_mean"], "dice_std": summary["dice_std"],
                         "cldice": summary["cldice_mean"], "intensity_w1": float(np.mean(w1)),
                         "log_spectrum_l1": float(np.mean(spectrum)),
                         "seconds_per_image": statistics.median(seconds)})
            print(f"  {rows[-1]['name']}: faithfulness Dice {rows[-1]['dice']:.3f}, intensity W1 "
                  f"{rows[-1]['intensity_w1']:.4f}, log-spectrum L1 {rows[-1]['log_spectrum_l1']:.3f}, "
                  f"{rows[-1]['seconds_per_image']:.1f} s/image", flush=True)

    size = f"central {args.crop}x{args.crop} crops" if args.crop else "full resolution 999x960"
    description = (f"CHASE_DB1 test masks ({len(cases)}: {', '.join(args.images)}, `1stHO`, {size}); synthesis DDIM "
                   f"{args.steps} steps (trailing), seed {args.seed}; faithfulness = Dice of the segmenter "
                   f"`{args.segmenter}` (E={args.segmenter_ensemble_size}, {args.segmenter_steps} steps) on the "
                   "synthetic image against the input mask; intensity W1 and log-spectrum L1 against the real "
                   "photograph of the same eye (lower is closer).")
    header = ["method", "faithfulness Dice", "clDice", "intensity W1", "log-spectrum L1", "s/image"]
    table = [[r["name"], f"{r['dice']:.3f} ± {r['dice_std']:.3f}", r["cldice"], r["intensity_w1"],
              r["log_spectrum_l1"], r["seconds_per_image"]] for r in rows]
    print()
    print(description)
    _common.print_table(header, table, digits=4)
    def seconds_cell(value):
        return "–" if value is None else f"{value:.1f}"

    markdown = "\n".join([description, "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"] + [
        f"| {r['name']} | {r['dice']:.3f} ± {r['dice_std']:.3f} | {r['cldice']:.3f} | {r['intensity_w1']:.4f} | "
        f"{r['log_spectrum_l1']:.3f} | {seconds_cell(r['seconds_per_image'])} |"
        for r in rows])
    result = {**_common.header(args, device), "description": description, "rows": rows, "markdown": markdown,
              "segmenter": args.segmenter, "steps": args.steps, "crop": args.crop, "images": args.images}
    output = _common.save_json(args.output, result)
    print(f"\nWrote {output}")
    if args.figure and panel_rows:
        figure = _common.resolve_path(args.figure)
        figure.parent.mkdir(parents=True, exist_ok=True)
        image_grid(panel_rows).save(figure)
        print(f"Wrote {figure} (mask | synthetic | real)")
    if args.write_card:
        from diffusers_retina.hub import EVALUATION, write_mask2image_card

        folder = _common.resolve_path(args.pipelines[0])
        _common.save_json(str(folder / EVALUATION), result)
        print(f"Wrote {folder / EVALUATION} and {write_mask2image_card(folder)}")
    return result


if __name__ == "__main__":
    main()
