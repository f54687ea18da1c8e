"""Batched vs one-by-one ensemble: the E members as one batch (``batch_size=E``) vs one at a time (``batch_size=1``).

Both runs use the same seed, so the pipeline gives every member the same generator in both: the member probabilities
must agree (max |difference| ~ 0, up to float rounding of batched kernels). Reports the wall time of each (median of
``--repeats`` after a warm-up, the two runs alternating), the speed-up ratio (goal >= 1.6x on CPU) and the difference.

Example::

    python benchmarks/bench_ensemble_batching.py --pipeline checkpoints/segmentation-ensemble-chase
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

GOAL_RATIO = 1.6
TOLERANCE = 1e-4  # batched and single-sample kernels may round differently; anything larger is a real difference


def parse_args(argv=None):
    parser = _common.base_parser(__doc__.split("\n\n")[0], "bench_ensemble_batching")
    parser.add_argument("--ensemble-size", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--scheduler", default="ddim", choices=sorted(_common.SCHEDULERS))
    parser.add_argument("--image", default="Image_11R", help="CHASE_DB1 test image to crop.")
    parser.add_argument("--crop-size", type=int, default=256, help="Central crop side (0: the whole image).")
    parser.add_argument("--tile-size", type=int, default=0, help="Sliding-window tile (0: none).")
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    _common.chase_root_or_exit()
    device = _common.setup(args)
    pipe = _common.load_pipeline(args.pipeline, device, args.dtype)
    pipe.scheduler = _common.make_scheduler(args.scheduler, pipe.scheduler.config, args.timestep_spacing)
    sample = _common.test_crops([args.image], args.crop_size)[0]
    image = sample["image"]

    def run(batch_size):
        return pipe(image, num_inference_steps=args.steps, ensemble_size=args.ensemble_size,
                    generator=_common.generator(args.seed), batch_size=batch_size, tile_size=args.tile_size or None,
                    output_type="pt", return_members=True)

    modes = {"batched": args.ensemble_size, "one_by_one": 1}
    print(f"{args.image} central {image.shape[-1]}x{image.shape[-2]}, E={args.ensemble_size}, "
          f"{type(pipe.scheduler).__name__} {args.steps} steps, device {device}, {torch.get_num_threads()} threads")
    for batch_size in modes.values():  # warm-up, untimed
        run(batch_size)
    times = {mode: [] for mode in modes}
    outputs = {}
    for repeat in range(args.repeats):  # alternate the two so slow drifts of the machine hit both alike
        for mode, batch_size in modes.items():
            seconds, outputs[mode] = _common.timed(lambda: run(batch_size), device)
            times[mode].append(seconds)
            print(f"  repeat {repeat + 1}/{args.repeats}  {mode:<10}  {seconds:7.2f} s", flush=True)

    median = {mode: statistics.median(values) for mode, values in times.items()}
    ratio = median["one_by_one"] / median["batched"]
    batched, single = outputs["batched"], outputs["one_by_one"]
    member_difference = (batched.members - single.members).abs().max().item()
    fused_difference = (batched.probabilities - single.probabilities).abs().max().item()
    mask_pixels_differing = int((batched.masks != single.masks).sum().item())

    rows = [
        ["batched (batch_size=%d)" % args.ensemble_size, median["batched"], median["batched"] / args.ensemble_size],
        ["one by one (batch_size=1)", median["one_by_one"], median["one_by_one"] / args.ensemble_size],
    ]
    print()
    _common.print_table(["mode", "seconds (median)", "seconds / member"], rows, digits=2)
    print(f"\nspeed-up batched vs one by one: {ratio:.2f}x (goal >= {GOAL_RATIO}x on CPU: "
          f"{'met' if ratio >= GOAL_RATIO else 'NOT met'})")
    verdict = "equal up to float rounding" if member_difference <= TOLERANCE else "DIFFERENT"
    print(f"max |member probability difference| = {member_difference:.3g} -> {verdict} (tolerance {TOLERANCE:g}); "
          f"fused: {fused_difference:.3g}; fused mask pixels differing: {mask_pixels_differing}")

    result = {
        **_common.header(args, device),
        "benchmark": "ensemble batching",
        "image": args.image,
        "crop_size": list(image.shape[-2:]),
        "ensemble_size": args.ensemble_size,
        "inference_steps": args.steps,
        "scheduler": type(pipe.scheduler).__name__,
        "tile_size": args.tile_size or None,
        "repeats": args.repeats,
        "seconds": {mode: {"median": median[mode], "all": times[mode]} for mode in modes},
        "speedup": ratio,
        "goal_speedup": GOAL_RATIO,
        "goal_met": ratio >= GOAL_RATIO,
        "max_abs_member_difference": member_difference,
        "members_equal": member_difference <= TOLERANCE,
        "tolerance": TOLERANCE,
        "max_abs_fused_difference": fused_difference,
        "fused_mask_pixels_differing": mask_pixels_differing,
    }
    print(f"\nWrote {_common.save_json(args.output, result)}")
    return result


if __name__ == "__main__":
    main()
