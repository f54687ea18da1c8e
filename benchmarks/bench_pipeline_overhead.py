"""Pipeline overhead: ``SegmentationEnsemblePipeline.__call__`` vs the bare denoising loop written out by hand.

The bare loop is what the pipeline does without its conveniences: the same UNet and scheduler, the same image tensor
and the same noise (one explicit generator per member, passed to both), ``set_timesteps`` / ``scale_model_input`` /
``unet`` / ``step``, then member probabilities ``(x + 1) / 2``. The pipeline adds input checks, padding, chunking,
fusion and the uncertainty maps. Reports both wall times (median of ``--repeats`` after a warm-up, alternating), the
ratio pipeline / bare (goal <= 1.05x) and checks that the bare loop's member probabilities equal the pipeline's.

Example::

    python benchmarks/bench_pipeline_overhead.py --pipeline checkpoints/segmentation-ensemble-chase
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

import inspect
import statistics
import sys
from pathlib import Path

import torch
from diffusers.utils.torch_utils import randn_tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

GOAL_RATIO = 1.05
TOLERANCE = 1e-5  # float rounding only; the two paths run the same kernels on the same tensors


def parse_args(argv=None):
    parser = _common.base_parser(__doc__.split("\n\n")[0], "bench_pipeline_overhead")
    parser.add_argument("--ensemble-size", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--scheduler", default="ddim", choices=sorted(_common.SCHEDULERS))
    parser.add_argument("--image", default="Image_11R", help="CHASE_DB1 test image to crop.")
    parser.add_argument("--crop-size", type=int, default=256,
                        help="Central crop side; a multiple of the UNet's down-sampling factor keeps padding out.")
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args(argv)


@torch.no_grad()
def bare_loop(unet, scheduler, image, generators, steps):
    """The denoising loop by hand: noisy mask + clean image in, member probabilities ``(E, 1, H, W)`` out."""
    ensemble_size = len(generators)
    prior = image.unsqueeze(0).expand(ensemble_size, -1, -1, -1)
    latents = randn_tensor((ensemble_size, unet.config.out_channels) + tuple(image.shape[-2:]),
                           generator=generators, device=image.device, dtype=image.dtype)
    latents = latents * scheduler.init_noise_sigma
    step_kwargs = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    scheduler.set_timesteps(steps, device=image.device)
    for t in scheduler.timesteps:
        model_input = torch.cat([scheduler.scale_model_input(latents, t), prior], dim=1)
        if model_input.device.type == "cpu":  # the pipeline's kernels: channels-last on the CPU
            model_input = model_input.contiguous(memory_format=torch.channels_last)
        model_output = unet(model_input, t, return_dict=False)[0]
        latents = scheduler.step(model_output, t, latents, return_dict=False, **step_kwargs)[0]
    return (latents.float().clamp(-1.0, 1.0) + 1.0) / 2.0


def main(argv=None):
    args = parse_args(argv)
    _common.chase_root_or_exit()
    device = _common.setup(args)
    pipe = _common.load_pipeline_and_scheduler(args, device)
    bare_scheduler = _common.make_scheduler(args.scheduler, pipe.scheduler.config)  # its own state, same config
    if pipe.unet.config.out_channels != pipe.mask_channels:
        sys.exit("The bare loop is written for fixed-variance models (UNet out_channels == mask channels); this "
                 "checkpoint predicts a learned variance.")
    image = _common.test_crops([args.image], args.crop_size)[0]["image"].to(device=device, dtype=pipe.unet.dtype)
    if image.shape[-1] % pipe.size_multiple or image.shape[-2] % pipe.size_multiple:
        print(f"note: the crop {tuple(image.shape[-2:])} is padded by the pipeline (factor {pipe.size_multiple}); "
              "the bare loop has no padding, so results are compared on the crop only if sizes match.")

    def generators():
        return [torch.Generator(device=device).manual_seed(args.seed + member) for member in range(args.ensemble_size)]

    unit_image = (image.float() + 1) / 2  # the pipeline takes image tensors in [0, 1]; the bare loop [-1, 1]
    runs = {
        "pipeline": lambda: pipe(unit_image, num_inference_steps=args.steps, ensemble_size=args.ensemble_size,
                                 generator=generators(), output_type="pt", return_members=True).members[0],
        "bare_loop": lambda: bare_loop(pipe.unet, bare_scheduler, image, generators(), args.steps),
    }
    print(f"{args.image} central {image.shape[-1]}x{image.shape[-2]}, E={args.ensemble_size}, "
          f"{type(pipe.scheduler).__name__} {args.steps} steps, device {device}, {torch.get_num_threads()} threads")
    for run in runs.values():  # warm-up, untimed
        run()
    times = {name: [] for name in runs}
    outputs = {}
    for repeat in range(args.repeats):  # alternate so slow drifts of the machine hit both alike
        for name, run in runs.items():
            seconds, outputs[name] = _common.timed(run, device)
            times[name].append(seconds)
            print(f"  repeat {repeat + 1}/{args.repeats}  {name:<9}  {seconds:7.3f} s", flush=True)

    median = {name: statistics.median(values) for name, values in times.items()}
    ratio = median["pipeline"] / median["bare_loop"]
    pipeline_members, bare_members = outputs["pipeline"].float().cpu(), outputs["bare_loop"].float().cpu()
    same_shape = pipeline_members.shape == bare_members.shape
    difference = (pipeline_members - bare_members).abs().max().item() if same_shape else float("nan")
    equal = same_shape and difference <= TOLERANCE

    print()
    _common.print_table(["path", "seconds (median)"], [[name, median[name]] for name in runs], digits=3)
    verdict = "met" if ratio <= GOAL_RATIO else "NOT met"
    print(f"\npipeline / bare loop: {ratio:.3f}x (goal <= {GOAL_RATIO}x: {verdict})")
    print(f"max |member probability difference| = {difference:.3g} -> "
          f"{'equal' if equal else 'DIFFERENT'} (tolerance {TOLERANCE:g})")

    result = {
        **_common.header(args, device),
        "benchmark": "pipeline overhead",
        "image": args.image,
        "crop_size": list(image.shape[-2:]),
        "ensemble_size": args.ensemble_size,
        "inference_steps": args.steps,
        "scheduler": type(pipe.scheduler).__name__,
        "repeats": args.repeats,
        "seconds": {name: {"median": median[name], "all": times[name]} for name in runs},
        "ratio": ratio,
        "goal_ratio": GOAL_RATIO,
        "goal_met": ratio <= GOAL_RATIO,
        "max_abs_member_difference": difference,
        "results_equal": equal,
        "tolerance": TOLERANCE,
    }
    print(f"\nWrote {_common.save_json(args.output, result)}")
    return result


if __name__ == "__main__":
    main()
