"""What an anchored ensemble costs against its prior: multiply-adds per pixel and wall time, the feature-reusing refiner
(``PriorFeatureRefinerModel``) beside the residual refiner (a second ``UNet2DModel``).

* **Multiply-adds** (convolutions and linear layers, counted with forward hooks on one untiled pass): the prior's per
  pixel; the feature refiner's context (once per image) and its head (per member and step); the residual refiner's
  U-Net (per member and step). The ratio is ``(prior + context + E x steps x head) / prior``.
* **Wall time** of whole calls at full resolution (999 x 960, one CHASE_DB1 test photograph, or a random image of that
  size without the data), ``--tile-size`` windows as the shipped pipelines run: the prior alone
  (``segmenter_probabilities``) and each pipeline at 1 and 2 steps with E members; median of ``--repeats`` calls,
  interleaved, after a warm-up, all in this one process, so the ratios to the prior compare like with like. Several
  ``--dtype`` values time the same calls in each precision (on a GPU, where bfloat16 pays).

A refiner pipeline is timed with its own weights; without ``--feature-pipeline`` an untrained
``PriorFeatureRefinerModel`` on the prior stands in (the same cost: weights do not change the arithmetic).

    python benchmarks/refiner_cost.py --threads 1 \\
        --feature-pipeline runs/anchored-features --residual-pipeline checkpoints/segmentation-anchored-chase
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Dict, List  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from diffusers_retina import SegmentationEnsemblePipeline  # noqa: E402
from diffusers_retina.models import PriorFeatureRefinerModel, segmenter_features  # noqa: E402
from diffusers_retina.pipelines.sampling import segmenter_probabilities  # noqa: E402


def count_macs(run: Callable[[], object], modules: List[nn.Module], pixels: int) -> float:
    """Multiply-adds per input pixel of the convolutions and linear layers inside ``modules`` during ``run()``."""
    total = [0]

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total[0] += output.numel() * per_output
        elif isinstance(module, nn.Linear):
            total[0] += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for root in modules for m in root.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return total[0] / pixels


def flop_table(prior, feature_head, residual_unet, size=(256, 256)) -> Dict[str, float]:
    """Multiply-adds per pixel of each part, on one untiled ``size`` input."""
    pixels = size[0] * size[1]
    image = torch.zeros(1, prior.config.in_channels, *size)
    macs = {"prior": count_macs(lambda: prior(image, 0), [prior], pixels)}
    with torch.no_grad():
        logits, features = segmenter_features(prior, image)
        prior_masks = 2 * logits.sigmoid() - 1
        context = feature_head.encode_context(features, prior_masks)
    macs["feature_context"] = count_macs(lambda: feature_head.encode_context(features, prior_masks), [feature_head],
                                         pixels)
    macs["feature_head_step"] = count_macs(lambda: feature_head(torch.zeros(1, 1, *size), 999, context),
                                           [feature_head], pixels)
    if residual_unet is not None:
        state = torch.zeros(1, residual_unet.config.in_channels, *size)
        macs["residual_unet_step"] = count_macs(lambda: residual_unet(state, 999), [residual_unet], pixels)
    return macs


def load_image(size) -> torch.Tensor:
    """Image_11L of CHASE_DB1 in [0, 1] (or a random image of its size without the data)."""
    from diffusers_retina.data import chase_db1, default_chase_db1_root

    root = default_chase_db1_root()
    if root is None:
        return torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
    dataset = chase_db1(root, "test")
    return (dataset[dataset.stems.index("Image_11L")]["image"][None] + 1) / 2


def main(argv=None) -> int:
    parser = _common.base_parser(__doc__.split("\n\n")[0], "refiner_cost")
    parser.add_argument("--prior", default="checkpoints/vessel-segmenter-chase")
    parser.add_argument("--feature-pipeline", default=None, help="A saved feature-refiner pipeline (else untrained).")
    parser.add_argument("--residual-pipeline", default="checkpoints/segmentation-anchored-chase")
    parser.add_argument("--ensemble-size", type=int, default=5)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)
    device = _common.setup(args)
    from diffusers import DDIMScheduler, UNet2DModel

    prior = UNet2DModel.from_pretrained(str(_common.resolve_path(args.prior)), dtype=torch.float32).eval()
    if args.feature_pipeline:
        feature = SegmentationEnsemblePipeline.from_pretrained(str(_common.resolve_path(args.feature_pipeline)),
                                                               dtype=torch.float32)
    else:
        head = PriorFeatureRefinerModel(feature_channels=prior.config.block_out_channels[0]).eval()
        feature = SegmentationEnsemblePipeline(
            unet=head, prior=prior, anchor="residual",
            scheduler=DDIMScheduler(prediction_type="sample", timestep_spacing="trailing"))
    residual = None
    if args.residual_pipeline:
        residual = SegmentationEnsemblePipeline.from_pretrained(str(_common.resolve_path(args.residual_pipeline)),
                                                                dtype=torch.float32)
    macs = flop_table(feature.prior, feature.unet, None if residual is None else residual.unet)
    ratios = {}
    for steps in args.steps:
        samples = args.ensemble_size * steps
        ratios[f"feature_{steps}"] = (macs["prior"] + macs["feature_context"]
                                      + samples * macs["feature_head_step"]) / macs["prior"]
        if residual is not None:
            ratios[f"residual_{steps}"] = (macs["prior"] + samples * macs["residual_unet_step"]) / macs["prior"]

    image = load_image((960, 999)).to(device)
    timings: Dict[str, Dict[str, float]] = {}
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        calls: Dict[str, Callable[[], object]] = {}
        prior_run = feature.prior.to(device, dtype)
        calls["prior"] = lambda: segmenter_probabilities(prior_run, (image * 2 - 1).to(dtype), args.tile_size)
        for name, pipe in (("feature", feature), ("residual", residual)):
            if pipe is None:
                continue
            pipe.to(device, dtype)
            pipe.set_progress_bar_config(disable=True)
            for steps in args.steps:
                calls[f"{name}_{steps}"] = (lambda pipe=pipe, steps=steps: pipe(
                    image.to(dtype), num_inference_steps=steps, ensemble_size=args.ensemble_size,
                    tile_size=args.tile_size, generator=_common.generator(args.seed), output_type="pt"))
        with torch.no_grad():
            for call in calls.values():  # warm-up
                call()
            seconds: Dict[str, List[float]] = {name: [] for name in calls}
            for _ in range(args.repeats):
                for name, call in calls.items():
                    elapsed, _ = _common.timed(call, device)
                    seconds[name].append(elapsed)
        medians = {name: statistics.median(values) for name, values in seconds.items()}
        timings[dtype_name] = {name: {"seconds": value, "ratio_to_prior": value / medians["prior"]}
                               for name, value in medians.items()}
        feature.to(device, torch.float32)
        if residual is not None:
            residual.to(device, torch.float32)

    result = {**_common.header(args, device), "image_size": list(image.shape[-2:]),
              "ensemble_size": args.ensemble_size, "tile_size": args.tile_size,
              "macs_per_pixel": macs, "mac_ratio_to_prior": ratios, "timings": timings,
              "feature_pipeline": args.feature_pipeline or "untrained PriorFeatureRefinerModel (hidden 16)"}
    _common.save_json(args.output, result)
    print("multiply-adds per pixel: " + ", ".join(f"{k} {v:,.0f}" for k, v in macs.items()))
    _common.print_table(["E x steps", "MAC ratio to prior"], [[k, v] for k, v in ratios.items()])
    for dtype_name, rows in timings.items():
        print(f"\n{dtype_name}, {tuple(image.shape[-2:])}, tile {args.tile_size}, E = {args.ensemble_size}:")
        _common.print_table(["call", "s", "x prior"], [[k, v["seconds"], v["ratio_to_prior"]] for k, v in rows.items()])
    print(f"-> {args.output}")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
