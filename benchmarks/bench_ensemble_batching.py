"""Batched vs one-by-one ensemble: the E members as one batch (``batch_size=E``) vs one at a time (``batch_size=1``),
and the pipeline's ``batch_size="auto"`` (on a CPU: as many members per call as fit 48k float32 pixels), over crop sizes.

All runs use the same seed, so the pipeline gives every member the same generator in each: the member probabilities
must agree (max |difference| ~ 0, up to float rounding of batched kernels). Reports, per crop size, the wall time of
each mode (median of ``--repeats`` after a warm-up, the modes alternating), the speed-up of batched and of auto over
one by one (goal >= 1.6x on CPU for batched) and the difference.

Example::

    python benchmarks/bench_ensemble_batching.py --pipeline checkpoints/segmentation-ensemble-chase --crop-sizes 64 128 256
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from diffusers_retina.pipelines.sampling import (  # noqa: E402
    AUTO_BATCH,
    CPU_PIXELS_PER_FORWARD,
    samples_per_call,
    window_pixels,
)

GOAL_RATIO = 1.6
# Batched and single-sample kernels round differently and 10 steps compound it (measured up to 1.4e-4 at 256^2 with
# channels-last, no mask pixel changed); a member given the wrong generator differs by order 1.
TOLERANCE = 1e-3


def parse_args(argv=None):
    parser = _common.base_parser(__doc__.split("\n\n")[0], "bench_ensemble_batching")
    parser.add_argument("--ensemble-size", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--scheduler", default="ddim", choices=sorted(_common.SCHEDULERS))
    parser.add_argument("--image", default="Image_11R", help="CHASE_DB1 test image to crop.")
    parser.add_argument("--crop-sizes", type=int, nargs="+", default=[64, 128, 256],
                        help="Central crop sides to measure (0: the whole image).")
    parser.add_argument("--tile-size", type=int, default=0, help="Sliding-window tile (0: none).")
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args(argv)


def measure(pipe, args, image, device):
    """Time the modes on one crop; returns the row of the JSON."""

    def run(batch_size):
        return pipe((image + 1) / 2, num_inference_steps=args.steps, ensemble_size=args.ensemble_size,
                    generator=_common.generator(args.seed), batch_size=batch_size, tile_size=args.tile_size or None,
                    output_type="pt", return_members=True)

    modes = {"batched": args.ensemble_size, "one_by_one": 1, "auto": AUTO_BATCH}
    for batch_size in modes.values():  # warm-up, untimed
        run(batch_size)
    times = {mode: [] for mode in modes}
    outputs = {}
    for repeat in range(args.repeats):  # alternate the modes so slow drifts of the machine hit all alike
        for mode, batch_size in modes.items():
            seconds, outputs[mode] = _common.timed(lambda: run(batch_size), device)
            times[mode].append(seconds)
    median = {mode: statistics.median(values) for mode, values in times.items()}
    single = outputs["one_by_one"]
    member_difference = max((outputs[m].members - single.members).abs().max().item() for m in ("batched", "auto"))
    fused_difference = max((outputs[m].probabilities - single.probabilities).abs().max().item()
                           for m in ("batched", "auto"))
    mask_pixels_differing = max(int((outputs[m].masks != single.masks).sum().item()) for m in ("batched", "auto"))
    height, width = image.shape[-2:]
    pixels = window_pixels(height + (-height) % pipe.size_multiple, width + (-width) % pipe.size_multiple,
                           args.tile_size or None)
    return {
        "crop_size": [height, width],
        "auto_members_per_call": samples_per_call(AUTO_BATCH, args.ensemble_size, pixels, device, pipe.unet.dtype),
        "seconds": {mode: {"median": median[mode], "all": times[mode]} for mode in modes},
        "speedup": median["one_by_one"] / median["batched"],
        "speedup_auto": median["one_by_one"] / median["auto"],
        "goal_met": median["one_by_one"] / median["batched"] >= GOAL_RATIO,
        "max_abs_member_difference": member_difference,
        "members_equal": member_difference <= TOLERANCE,
        "max_abs_fused_difference": fused_difference,
        "fused_mask_pixels_differing": mask_pixels_differing,
    }


def main(argv=None):
    args = parse_args(argv)
    _common.chase_root_or_exit()
    device = _common.setup(args)
    pipe = _common.load_pipeline_and_scheduler(args, device)
    print(f"{args.image}, E={args.ensemble_size}, {type(pipe.scheduler).__name__} {args.steps} steps, device {device}, "
          f"{torch.get_num_threads()} threads")
    results = []
    for crop_size in args.crop_sizes:
        image = _common.test_crops([args.image], crop_size)[0]["image"]
        row = measure(pipe, args, image, device)
        results.append(row)
        s = row["seconds"]
        print(f"  {row['crop_size'][1]}x{row['crop_size'][0]}: batched {s['batched']['median']:.2f} s, one by one "
              f"{s['one_by_one']['median']:.2f} s, auto ({row['auto_members_per_call']} per call) "
              f"{s['auto']['median']:.2f} s -> batched {row['speedup']:.2f}x, auto {row['speedup_auto']:.2f}x; "
              f"max |member difference| {row['max_abs_member_difference']:.2g}", flush=True)

    print()
    _common.print_table(
        ["crop", "batched s", "one by one s", "auto s", "members/call (auto)", "batched x", "auto x", "equal"],
        [[f"{r['crop_size'][1]}x{r['crop_size'][0]}", r["seconds"]["batched"]["median"],
          r["seconds"]["one_by_one"]["median"], r["seconds"]["auto"]["median"], r["auto_members_per_call"],
          r["speedup"], r["speedup_auto"], r["members_equal"]] for r in results], digits=2)
    print(f"goal: batched >= {GOAL_RATIO}x one by one on CPU; met at "
          f"{[r['crop_size'][0] for r in results if r['goal_met']] or 'no size'}")

    result = {
        **_common.header(args, device),
        "benchmark": "ensemble batching",
        "image": args.image,
        "ensemble_size": args.ensemble_size,
        "inference_steps": args.steps,
        "scheduler": type(pipe.scheduler).__name__,
        "tile_size": args.tile_size or None,
        "repeats": args.repeats,
        "goal_speedup": GOAL_RATIO,
        "tolerance": TOLERANCE,
        "cpu_pixels_per_forward": CPU_PIXELS_PER_FORWARD,
        "crops": results,
    }
    print(f"\nWrote {_common.save_json(args.output, result)}")
    return result


if __name__ == "__main__":
    main()
