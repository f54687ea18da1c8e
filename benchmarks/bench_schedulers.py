"""Fast samplers vs the 1000-step DDPM: wall time and Dice on CHASE_DB1 test crops.

DDIM and DPMSolverMultistep at 10 / 25 / 50 steps (and DDIM at 2 steps, the demo setting) against DDPM at 1000
steps, all from the same checkpoint, ensemble and seed. For every sampler: time per crop (median of ``--repeats``
after one shared warm-up; the 1000-step reference is timed ``--reference-repeats`` times, once by default), Dice of
the fused mask against ``1stHO`` (mean over crops), the speed-up vs DDPM-1000 and the Dice difference (goal: >= 40x
faster with Dice within 0.02), and the Dice agreement of its mask with the DDPM-1000 mask.

DDPM-1000 is slow on a CPU (about 5 min per 128x128 crop at E=5 with the reference model): progress is printed every
100 steps, and the JSON is rewritten after every sampler so an interrupted run keeps what it measured.

Example::

    python benchmarks/bench_schedulers.py --pipeline checkpoints/segmentation-ensemble-chase --crops 2 --crop-size 128
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from diffusers_retina.data import CHASE_DB1_TEST  # noqa: E402
from diffusers_retina.metrics import dice  # noqa: E402

GOAL_SPEEDUP = 40.0
GOAL_DICE = 0.02


def parse_args(argv=None):
    parser = _common.base_parser(__doc__.split("\n\n")[0], "bench_schedulers")
    parser.add_argument("--crops", type=int, default=2, help="Number of crops, from different test images.")
    parser.add_argument("--crop-size", type=int, default=128, help="Side of the central crops.")
    parser.add_argument("--images", nargs="+", default=None,
                        help="Test images to crop (default: --crops images spread over Image_11L–Image_14R).")
    parser.add_argument("--ensemble-size", type=int, default=5)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50], help="Steps of DDIM and DPM-Solver.")
    parser.add_argument("--demo-steps", type=int, default=2, help="Extra DDIM row at this many steps (0: none).")
    parser.add_argument("--reference-steps", type=int, default=1000, help="Steps of the DDPM reference.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs per crop of the fast samplers.")
    parser.add_argument("--reference-repeats", type=int, default=1, help="Timed runs per crop of the DDPM reference.")
    parser.add_argument("--fusion", default="mean", choices=["mean", "majority", "staple"])
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    _common.chase_root_or_exit()
    device = _common.setup(args)
    pipe = _common.load_pipeline(args.pipeline, device, args.dtype)
    base_config = dict(pipe.scheduler.config)
    names = args.images or [CHASE_DB1_TEST[i * len(CHASE_DB1_TEST) // args.crops] for i in range(args.crops)]
    crops = _common.test_crops(names, args.crop_size)

    reference = ("DDPM", "ddpm", args.reference_steps)
    samplers = [(label, key, steps) for label, key in (("DDIM", "ddim"), ("DPMSolverMultistep", "dpm"))
                for steps in args.steps]
    if args.demo_steps:
        samplers.append(("DDIM", "ddim", args.demo_steps))
    samplers.append(reference)  # last: the slow one, so the fast rows are saved first

    def run(key, steps, image, progress=None):
        pipe.scheduler = _common.make_scheduler(key, base_config, args.timestep_spacing)
        return pipe((image + 1) / 2, num_inference_steps=steps, ensemble_size=args.ensemble_size, fusion=args.fusion,
                    generator=_common.generator(args.seed), output_type="pt", callback_on_step_end=progress)

    def progress_printer(label, total):
        start = time.perf_counter()

        def callback(pipeline, step_index, timestep, callback_kwargs):
            if (step_index + 1) % 100 == 0 or step_index + 1 == total:
                elapsed = time.perf_counter() - start
                print(f"      {label}: step {step_index + 1}/{total}, {elapsed:.0f} s "
                      f"(~{elapsed / (step_index + 1) * (total - step_index - 1):.0f} s left)", flush=True)
            return {}
        return callback

    print(f"{len(crops)} central {args.crop_size}x{args.crop_size} crops ({', '.join(names)}), E={args.ensemble_size}, "
          f"{args.fusion} fusion, device {device}, {torch.get_num_threads()} threads")
    run("ddim", 2, crops[0]["image"])  # one shared warm-up (untimed)

    results = {}
    masks = {}

    def rows_and_summary():
        ref = results.get(f"{reference[0]}-{reference[2]}")
        rows = []
        for name, entry in results.items():
            row = dict(entry)
            if ref is not None:
                row["speedup_vs_reference"] = ref["seconds_per_crop"] / entry["seconds_per_crop"]
                row["dice_difference_vs_reference"] = entry["dice"] - ref["dice"]
                row["dice_agreement_with_reference"] = statistics.fmean(
                    dice(mask, masks[f"{reference[0]}-{reference[2]}"][i]) for i, mask in enumerate(masks[name]))
                row["meets_goal"] = (name != f"{reference[0]}-{reference[2]}"
                                     and row["speedup_vs_reference"] >= GOAL_SPEEDUP
                                     and abs(row["dice_difference_vs_reference"]) <= GOAL_DICE)
            rows.append(row)
        return rows

    def save(complete):
        result = {
            **_common.header(args, device),
            "benchmark": "schedulers",
            "complete": complete,
            "crops": [{"image": c["name"], "box_top_left_height_width": list(c["box"])} for c in crops],
            "ensemble_size": args.ensemble_size,
            "fusion": args.fusion,
            "reference": f"{reference[0]}-{reference[2]}",
            "timestep_spacing": args.timestep_spacing or base_config.get("timestep_spacing"),
            "goal": f">= {GOAL_SPEEDUP:g}x faster than the reference with |Dice difference| <= {GOAL_DICE}",
            "rows": rows_and_summary(),
        }
        return _common.save_json(args.output, result), result

    for label, key, steps in samplers:
        name = f"{label}-{steps}"
        repeats = args.reference_repeats if (label, key, steps) == reference else args.repeats
        print(f"  {name} ({repeats} timed run(s) per crop)", flush=True)
        per_crop_seconds, per_crop_dice, masks[name] = [], [], []
        for crop in crops:
            progress = progress_printer(f"{name} {crop['name']}", steps) if steps >= 100 else None
            seconds, times, out = _common.benchmark(lambda: run(key, steps, crop["image"], progress), device,
                                                    repeats, warmup=False)
            mask = out.masks[0].cpu().numpy().astype(bool)
            masks[name].append(mask)
            per_crop_seconds.append(seconds)
            per_crop_dice.append(dice(mask, crop["mask"].numpy().astype(bool)))
            print(f"    {crop['name']}: {seconds:8.2f} s  dice {per_crop_dice[-1]:.3f}", flush=True)
        results[name] = {
            "sampler": name, "scheduler": _common.SCHEDULERS[key], "steps": steps,
            "first_timesteps": [int(t) for t in pipe.scheduler.timesteps[:3]],
            "seconds_per_crop": statistics.fmean(per_crop_seconds),
            "seconds_per_crop_each": per_crop_seconds,
            "dice": statistics.fmean(per_crop_dice), "dice_each": per_crop_dice,
        }
        save(complete=False)

    path, result = save(complete=True)
    print()
    _common.print_table(
        ["sampler", "s / crop", "dice", "speed-up vs DDPM", "dice diff", "dice vs DDPM mask", "goal"],
        [[r["sampler"], r["seconds_per_crop"], r["dice"], r.get("speedup_vs_reference"),
          r.get("dice_difference_vs_reference"), r.get("dice_agreement_with_reference"),
          "" if r["sampler"] == result["reference"] else ("met" if r.get("meets_goal") else "not met")]
         for r in result["rows"]])
    print(f"\ngoal: {result['goal']}")
    print(f"Wrote {path}")
    return result


if __name__ == "__main__":
    main()
