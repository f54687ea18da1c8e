"""Sample statistics of unconditional fundus DDPMs (the feature extractors of DiffusionFeaturePipeline), offline.

For every ``--ddpm`` folder (a ``DDPMPipeline`` trained by ``training/train_mask2image.py --task fundus``),
``--num-samples`` patches are sampled at the DDPM's training size with DDIM (``--steps``, seed ``--seed``) and compared
with as many random patches of the same size cut from the **test** photographs (Image_11L–Image_14R: eyes the DDPM never
saw), inside their field of view:

* **intensity W1**: 1-Wasserstein distance between the pooled per-channel intensity histograms (mean over channels);
* **log-spectrum L1**: mean absolute difference of the mean radially averaged log power spectra;
* **vessel fraction**: the share of pixels that ``--segmenter`` (the shipped supervised vessel U-Net) marks as vessel,
  on the samples and on the real patches -- a DDPM whose samples "show no vessels" scores near 0 here.

The same statistics between random patches of the *training* photographs and the test patches give the reference
row (what a perfect sampler of this camera would score). Writes ``--output`` (JSON) and prints the table.

    python benchmarks/ddpm_sample_statistics.py --ddpm checkpoints/fundus-ddpm-chase runs/fundus-ddpm-long64 \
        --num-samples 64 --threads 2
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from evaluate_synthesis import intensity_distance, radial_log_spectrum  # noqa: E402

from diffusers_retina.data import CHASE_DB1_TEST  # noqa: E402


def parse_args(argv=None):
    parser = _common.base_parser(__doc__.split("\n\n")[0], "ddpm_sample_statistics")
    parser.set_defaults(pipeline=None)
    parser.add_argument("--ddpm", nargs="+", required=True, help="DDPMPipeline folders.")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps per sample.")
    parser.add_argument("--segmenter", default="checkpoints/vessel-segmenter-chase",
                        help="Supervised vessel U-Net (UNet2DModel, 3 -> 1 logits) for the vessel fraction.")
    return parser.parse_args(argv)


def real_patches(split: str, size: int, count: int, seed: int) -> torch.Tensor:
    """``count`` random ``size`` patches (``[-1, 1]``) lying wholly inside the field of view of the split's images."""
    from diffusers_retina.data import chase_db1
    from diffusers_retina.data.modality import field_of_view_masks

    dataset = chase_db1(root=_common.chase_root_or_exit(), split=split)
    items = [dataset[i] for i in range(len(dataset))]
    if split == "test":
        items = [item for item, stem in zip(items, dataset.stems) if stem in CHASE_DB1_TEST]
    fovs = [field_of_view_masks(item["image"][None])[0] for item in items]
    generator = np.random.default_rng(seed)
    patches = []
    while len(patches) < count:
        index = int(generator.integers(len(items)))
        height, width = fovs[index].shape
        top, left = int(generator.integers(height - size + 1)), int(generator.integers(width - size + 1))
        if fovs[index][top: top + size, left: left + size].all():
            patches.append(items[index]["image"][:, top: top + size, left: left + size])
    return torch.stack(patches)


def statistics(samples: torch.Tensor, reference: torch.Tensor, segmenter) -> Dict[str, float]:
    """Pooled intensity W1, mean log-spectrum L1 (against ``reference``) and the segmenter's vessel fraction."""
    unit = lambda batch: ((batch.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()  # noqa: E731
    a, b = unit(samples), unit(reference)
    spectrum = np.abs(np.mean([radial_log_spectrum(x) for x in a], axis=0)
                      - np.mean([radial_log_spectrum(x) for x in b], axis=0))
    with torch.no_grad():
        vessel = torch.sigmoid(segmenter(samples.float(), 0).sample) > 0.5
    return {"intensity_w1": intensity_distance(a.reshape(-1, 1, 3), b.reshape(-1, 1, 3)),
            "log_spectrum_l1": float(spectrum.mean()), "vessel_fraction": float(vessel.float().mean())}


def main(argv=None):
    args = parse_args(argv)
    device = _common.setup(args)
    from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

    from diffusers_retina.hub import read_json

    segmenter = UNet2DModel.from_pretrained(str(_common.resolve_path(args.segmenter))).float().eval()
    rows: List[Dict] = []
    result = {**_common.header(args, device), "rows": rows, "complete": False}
    references: Dict[int, torch.Tensor] = {}
    for folder in args.ddpm:
        path = _common.resolve_path(folder)
        ddpm = DDPMPipeline.from_pretrained(str(path))
        size = int(ddpm.unet.config.sample_size)
        if size not in references:
            references[size] = real_patches("test", size, args.num_samples, args.seed)
            train = real_patches("train", size, args.num_samples, args.seed + 1)
            rows.append({"model": f"real training patches ({size} px)", "training_seconds": None,
                         "global_step": None, "seconds_per_sample": None,
                         **statistics(train, references[size], segmenter)})
            rows.append({"model": f"real test patches ({size} px)", "training_seconds": None, "global_step": None,
                         "seconds_per_sample": None, "vessel_fraction": statistics(
                             references[size], references[size], segmenter)["vessel_fraction"],
                         "intensity_w1": 0.0, "log_spectrum_l1": 0.0})
        scheduler = DDIMScheduler.from_config(ddpm.scheduler.config)
        pipe = DDPMPipeline(unet=ddpm.unet.float().to(device), scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        started = time.perf_counter()
        samples = pipe(batch_size=args.num_samples, num_inference_steps=args.steps, output_type="np",
                       generator=_common.generator(args.seed)).images  # NHWC in [0, 1]
        seconds = (time.perf_counter() - started) / args.num_samples
        samples = torch.from_numpy(samples).permute(0, 3, 1, 2) * 2 - 1
        info = read_json(path / "training_info.json") if (path / "training_info.json").is_file() else {}
        rows.append({"model": str(folder), "training_seconds": info.get("training_seconds"),
                     "global_step": info.get("global_step"), "seconds_per_sample": seconds,
                     **statistics(samples, references[size], segmenter)})
        _common.save_json(args.output, result)
    result["complete"] = True
    path = _common.save_json(args.output, result)
    _common.print_table(["model", "steps", "train s", "intensity W1", "log-spectrum L1", "vessel fraction"],
                        [[r["model"], r["global_step"], r["training_seconds"], r["intensity_w1"],
                          r["log_spectrum_l1"], r["vessel_fraction"]] for r in rows], digits=4)
    print(f"\nWrote {path}")


if __name__ == "__main__":
    main()
