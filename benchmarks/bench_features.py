"""Memory and speed of DiffusionFeaturePipeline against the published ddpm-segmentation recipe.

* **Bytes stored per image**: our features (native resolution, float16) against the published storage (every map
  upsampled to the full image in float32: ``sum(C) * T * H * W * 4`` bytes). Goal: at least 20x smaller.
* **Peak memory** of one extraction, each variant in a fresh subprocess (resident-set growth sampled while it runs),
  ours against
  "one forward per timestep + full-resolution float32 upsampling" (the published way).
* **Wall time**: all timesteps in one batched pass with the forward stopped after the last requested block, against
  one complete forward per timestep; the features are checked to be equal.

Without ``--ddpm`` a randomly initialised ``UNet2DModel`` of ``--block-out-channels`` is used: weights do not change
memory or speed.

    python benchmarks/bench_features.py --crop-size 256 --timesteps 50 150 250
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def parse_args(argv=None):
    parser = _common.base_parser(__doc__.split("\n\n")[0], "bench_features")
    parser.set_defaults(pipeline=None)
    parser.add_argument("--ddpm", default=None, help="DDPMPipeline folder (default: a random UNet2DModel).")
    parser.add_argument("--block-out-channels", nargs="+", type=int, default=[32, 64, 128, 128])
    # ddpm-segmentation reads units in the middle of the decoder (its blocks 5-8 and 12 of 18 sit at 1/8 and 1/4 of a
    # 256 image); these are the corresponding units of a 4-level UNet2DModel (strides 8, 4, 2)
    parser.add_argument("--blocks", nargs="+", default=["up.0.1", "up.1.1", "up.2.1"])
    parser.add_argument("--timesteps", nargs="+", type=int, default=[50, 150, 250])
    parser.add_argument("--crop-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one memory measurement
    return parser.parse_args(argv)


def build(args, device):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from diffusers_retina import DiffusionFeaturePipeline

    if args.ddpm:
        ddpm = DDPMPipeline.from_pretrained(args.ddpm)
        unet, scheduler = ddpm.unet.float(), ddpm.scheduler
    else:
        torch.manual_seed(0)
        levels = len(args.block_out_channels)
        unet = UNet2DModel(sample_size=args.crop_size, in_channels=3, out_channels=3,
                           block_out_channels=tuple(args.block_out_channels), layers_per_block=1, norm_num_groups=8,
                           down_block_types=("DownBlock2D",) * levels, up_block_types=("UpBlock2D",) * levels)
        scheduler = DDPMScheduler(num_train_timesteps=1000)
    pipe = DiffusionFeaturePipeline(unet=unet.eval(), scheduler=scheduler).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_image(size):
    crops = _common.test_crops(["Image_11L"], size) if _common_has_data() else None
    if crops:
        return crops[0]["image"][None]
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _common_has_data():
    from diffusers_retina.data import default_chase_db1_root

    return default_chase_db1_root() is not None


def per_timestep_full(pipe, image, blocks, timesteps, seed, upsample):
    """The published way: one complete forward per timestep; optionally every map upsampled to the image in fp32."""
    modules = pipe.block_modules()
    outputs = {name: [] for name in blocks}
    for t in timesteps:
        store = {}
        handles = [modules[name].register_forward_hook(
            lambda m, a, o, name=name: store.__setitem__(name, o[0] if isinstance(o, tuple) else o)) for name in blocks]
        try:
            generator = torch.Generator().manual_seed(pipe._noise_seed(seed, image[0], 0, False))
            noise = pipe._noise(image.shape, [generator], False, image.device, image.dtype)
            steps = torch.full((1,), t, dtype=torch.long)
            pipe.unet(pipe.scheduler.add_noise(image, noise, steps), steps)
        finally:
            for handle in handles:
                handle.remove()
        for name in blocks:
            outputs[name].append(store[name])
    if upsample:
        return torch.cat([F.interpolate(torch.cat(outputs[name], dim=1).float(), size=image.shape[-2:],
                                        mode="bilinear", align_corners=False) for name in blocks], dim=1)
    return {name: torch.stack(maps, dim=1) for name, maps in outputs.items()}


def child(args):
    """One extraction in this (fresh) process; prints the peak resident memory in MB."""
    device = torch.device("cpu")
    pipe = build(args, device)
    image = test_image(args.crop_size)
    import threading

    import psutil

    process = psutil.Process()
    before = process.memory_info().rss
    peak, done = [before], threading.Event()

    def sample():  # the resident set, every 2 ms, while the extraction runs (ru_maxrss peaks at import time)
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            done.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with torch.no_grad():
        if args.child == "ours":
            features = pipe.extract(image, args.blocks, args.timesteps, "noise", seed=args.seed)
        else:
            features = per_timestep_full(pipe, image, args.blocks, args.timesteps, args.seed, upsample=True)
    done.set()
    sampler.join()
    peak[0] = max(peak[0], process.memory_info().rss)
    del features
    print(json.dumps({"increase_mb": (peak[0] - before) / 2**20,
                      "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child(args)
    device = _common.setup(args)
    pipe = build(args, device)
    image = test_image(args.crop_size).to(device)
    description = {d["name"]: d for d in pipe.describe()}
    channels = sum(description[name]["channels"] for name in args.blocks)
    height, width = image.shape[-2:]

    with torch.no_grad():
        ours_seconds, _, ours = _common.benchmark(
            lambda: pipe.extract(image, args.blocks, args.timesteps, "noise", seed=args.seed,
                                 feature_dtype=torch.float32), device, args.repeats)
        full_seconds, _, full = _common.benchmark(
            lambda: per_timestep_full(pipe, image, args.blocks, args.timesteps, args.seed, upsample=False),
            device, args.repeats)
    max_difference = max(float((ours[name][0] - full[name][0]).abs().max()) for name in args.blocks)
    stored_ours = sum(ours[name].to(torch.float16).numel() * 2 for name in args.blocks)
    stored_published = channels * len(args.timesteps) * height * width * 4

    memory = {}
    for variant in ("ours", "published"):
        command = [sys.executable, __file__, "--child", variant, "--crop-size", str(args.crop_size), "--seed",
                   str(args.seed), "--blocks", *args.blocks, "--timesteps", *map(str, args.timesteps),
                   "--block-out-channels", *map(str, args.block_out_channels)] + (["--ddpm", args.ddpm] if args.ddpm
                                                                                  else [])
        completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if completed.returncode != 0:
            sys.exit(completed.stderr[-2000:])
        memory[variant] = json.loads(completed.stdout.strip().splitlines()[-1])

    result = {
        **_common.header(args, device),
        "unet": args.ddpm or f"random UNet2DModel {args.block_out_channels}",
        "blocks": args.blocks, "timesteps": args.timesteps, "image_size": [height, width],
        "feature_channels_per_timestep": channels,
        "bytes_per_image_ours_fp16_native": stored_ours,
        "bytes_per_image_published_fp32_full_resolution": stored_published,
        "storage_ratio": stored_published / stored_ours,
        "peak_memory_mb": memory,
        "seconds_batched_early_exit": ours_seconds,
        "seconds_one_forward_per_timestep": full_seconds,
        "speed_ratio": full_seconds / ours_seconds,
        "max_feature_difference": max_difference,
    }
    _common.print_table(["measure", "ours", "published recipe", "ratio"], [
        ["bytes stored per image", stored_ours, stored_published, stored_published / stored_ours],
        ["peak RSS increase (MB)", memory["ours"]["increase_mb"], memory["published"]["increase_mb"],
         memory["published"]["increase_mb"] / max(memory["ours"]["increase_mb"], 1e-9)],
        ["seconds per image", ours_seconds, full_seconds, full_seconds / ours_seconds],
    ])
    print(f"max |feature difference| batched+early-exit vs per-timestep: {max_difference:.2e}")
    print(f"Wrote {_common.save_json(args.output, result)}")
    return result


if __name__ == "__main__":
    main()
