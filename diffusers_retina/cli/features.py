"""``diffusers-retina features``: a DiffusionFeaturePipeline over images -- its head's segmentation, or the features.

With a head (``--output segmentation``, the default when the pipeline has one) each INPUT gives
``<stem>_mask.png`` (0/255 for binary masks, class indices otherwise), ``<stem>_probability.png`` (the foreground
probability, or the winning class's for more classes, 0..1 as 0..255) and ``<stem>_uncertainty.png`` (the head's
uncertainty in nats, 0..ln K as 0..255). ``--output features`` writes ``<stem>_features.safetensors`` instead: one
tensor per block, ``(timesteps, channels, h, w)`` at the block's native resolution of the padded image, in
``--feature-dtype``, with the blocks, timesteps, policy, seed and image size in the file's metadata.

Folders run sharded and resumable like ``segment`` (see :mod:`diffusers_retina.sharded_inference`): under
``accelerate launch`` each process takes its share, finished inputs are skipped (``--overwrite`` redoes them),
``--image-batch-size`` images of one size share a pipeline call, and each input appends a row to ``results.jsonl``.
The noise of the ``noise`` policy is seeded from ``--seed`` and the image itself, so an image's outputs do not depend
on the batch or process it runs in.

Examples::

    diffusers-retina features photos/ --output-dir vessels --pipeline checkpoints/feature-head-chase
    diffusers-retina features photos/ --output-dir feats --output features --blocks up.1,up.2 --timesteps 50,150
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

import diffusers_retina

from ..image_processing import numpy_to_pil_maps, numpy_to_pil_masks
from ..pipelines import DiffusionFeaturePipeline
from ..pipelines.diffusion_features import POLICIES
from ..sharded_inference import WorkItem
from ..utils.io_utils import bytes_writer, png_writer, write_files_atomically

from .common import (
    CLIError,
    DTYPES,
    add_device_argument,
    add_folder_run_arguments,
    add_image_input_arguments,
    apply_threads,
    check_output_dir,
    collect_inputs,
    describe_image_row,
    image_group,
    load_pipeline,
    non_negative_int,
    positive_int,
    read_input_image,
    resolve_device,
    run_folder_command,
)
from .processing import add_processing_resolution_argument, check_processing_flags, processing_call_kwargs

#: The embedded feature-head reference checkpoint, trained by ``training/train_feature_head.py``.
DEFAULT_FEATURE_PIPELINE: Path = (Path(diffusers_retina.__file__).resolve().parents[1] / "checkpoints"
                                  / "feature-head-chase")

FEATURE_DTYPES: Dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                                          "float32": torch.float32}


def _names(text: str) -> List[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated block names like up.1,up.2, got {text!r}")
    return names


def _timesteps(text: str) -> List[int]:
    try:
        values = [int(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 50,150,250, got {text!r}") from None
    if any(value < 0 for value in values):
        raise argparse.ArgumentTypeError(f"timesteps are non-negative, got {text!r}")
    return values


#: The ``features`` command's one-line help and its description (``--help``).
HELP = "segment with a DiffusionFeaturePipeline's head, or save its UNet features"
DESCRIPTION = (
    "Put each INPUT image through a DiffusionFeaturePipeline: with --output segmentation (the default "
    "when the pipeline has a head) write <stem>_mask.png, <stem>_probability.png and <stem>_uncertainty.png; "
    "with --output features write <stem>_features.safetensors. Sharded under `accelerate launch`, resumable, "
    "one row per image in results.jsonl."
)


def build_features_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """The ``features`` sub-command's arguments."""
    parser = subparsers.add_parser("features", help=HELP, description=DESCRIPTION)
    add_image_input_arguments(parser, "a saved DiffusionFeaturePipeline (folder or cached Hub repo id); default: "
                              f"the embedded reference {DEFAULT_FEATURE_PIPELINE}")
    parser.add_argument("--output", choices=("segmentation", "features"), default=None,
                        help="what to write (default: segmentation when the pipeline has a head, else features)")
    parser.add_argument("--blocks", type=_names, default=None, metavar="NAMES",
                        help="comma-separated UNet blocks (default: the head's, else the pipeline's default)")
    parser.add_argument("--timesteps", type=_timesteps, default=None, metavar="T1,T2,...",
                        help="timesteps the features are read at (default: the head's, else 50,150,250)")
    parser.add_argument("--policy", choices=POLICIES, default=None,
                        help="how the image enters the UNet (default: the head's, else noise)")
    parser.add_argument("--feature-dtype", choices=sorted(FEATURE_DTYPES), default="float16",
                        help="dtype of the features (default: float16)")
    parser.add_argument("--tile-size", type=non_negative_int, default=0, metavar="PIXELS",
                        help="segmentation: images larger than this are segmented in overlapping windows; 0 = whole "
                        "image (default; heads trained on whole-photograph features, such as the reference head, "
                        "need it)")
    parser.add_argument("--no-field-of-view", dest="field_of_view", action="store_false",
                        help="segmentation: also segment outside each photograph's field of view (default: the "
                        "aperture is found from the dark surround and everything outside it is background)")
    add_processing_resolution_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="seeds the noise of the noise policy (default: 0)")
    add_device_argument(parser)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="weights and activations dtype (default: float32)")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N")
    add_folder_run_arguments(parser, "images")
    parser.set_defaults(handler=run_features)
    return parser


def check_feature_settings(pipe: DiffusionFeaturePipeline, args: argparse.Namespace) -> Dict[str, Any]:
    """Resolve ``--output/--blocks/--timesteps/--policy`` against the pipeline (its head's choices first) and check
    them before anything is written. Returns the resolved settings; errors are CLIErrors naming the flag."""
    head_config = pipe.head.config if pipe.head is not None else {}
    output = args.output or ("segmentation" if pipe.head is not None else "features")
    if output == "segmentation" and pipe.head is None:
        raise CLIError(f"--output segmentation: the pipeline '{args.pipeline}' has no head (train one with "
                       "training/train_feature_head.py), so only --output features is possible.")
    blocks = list(args.blocks or head_config.get("blocks") or pipe.default_blocks())
    known = list(pipe.block_modules())
    unknown = [name for name in blocks if name not in known]
    if unknown:
        raise CLIError(f"--blocks: {unknown} are not blocks of this UNet; it has {', '.join(known)}.")
    timesteps = list(args.timesteps or head_config.get("timesteps") or [50, 150, 250])
    num_train = pipe.scheduler.config.num_train_timesteps
    outside = [t for t in timesteps if not 0 <= t < num_train]
    if outside:
        raise CLIError(f"--timesteps {outside} lie outside [0, {num_train}) of the pipeline's scheduler.")
    policy = args.policy or head_config.get("policy") or "noise"
    if output == "segmentation" and pipe.head is not None:
        changed = [flag for flag, value, trained in (("--blocks", blocks, head_config.get("blocks")),
                                                     ("--timesteps", timesteps, head_config.get("timesteps")),
                                                     ("--policy", policy, head_config.get("policy")))
                   if trained is not None and value != (list(trained) if isinstance(trained, (list, tuple))
                                                         else trained)]
        if changed:
            raise CLIError(f"{', '.join(changed)}: the head was trained on blocks {head_config.get('blocks')}, "
                           f"timesteps {head_config.get('timesteps')}, policy {head_config.get('policy')!r}; "
                           "segmentation uses those (leave the flags out, or use --output features).")
    tile_size = args.tile_size or None
    if tile_size is not None:
        if output != "segmentation":
            raise CLIError("--tile-size applies to --output segmentation (features of a tiled image would not form one "
                           "map).")
        if tile_size % pipe.size_multiple:
            raise CLIError(f"--tile-size {tile_size} must be a multiple of {pipe.size_multiple} (the UNet's "
                           "down-sampling factor).")
    if output == "segmentation":
        try:
            check_processing_flags(pipe, args)
        except ValueError as error:
            raise CLIError(str(error)) from error
    return {"output": output, "blocks": blocks, "timesteps": timesteps, "policy": policy, "tile_size": tile_size}


def run_features(args: argparse.Namespace) -> int:
    """The ``features`` sub-command: checks everything before writing, then processes this process's share of the
    images still to do, ``--image-batch-size`` images of one size per pipeline call."""
    files = collect_inputs(args.inputs)
    check_output_dir(args.output_dir)
    device = resolve_device(args.device)
    apply_threads(args.threads)
    pipe, source = load_pipeline(args.pipeline, device, args.dtype, None, pipeline_class=DiffusionFeaturePipeline,
                                 default=DEFAULT_FEATURE_PIPELINE)
    resolved = check_feature_settings(pipe, args)
    output = resolved["output"]
    settings = {"pipeline": source, **resolved, "field_of_view": args.field_of_view if output == "segmentation"
                else None, "processing_resolution": args.processing_resolution if output == "segmentation" else None,
                "camera_degrees": args.camera_degrees if output == "segmentation" else None,
                "seed": args.seed, "feature_dtype": args.feature_dtype,
                "dtype": args.dtype, "image_batch_size": args.image_batch_size, "device": str(device),
                "diffusers_retina_version": diffusers_retina.__version__}
    items = [WorkItem(name=path.stem, label=str(path), payload=path) for path in files]
    channels = pipe.unet.config.in_channels
    num_classes = int(pipe.head.config.get("num_classes", 2)) if pipe.head is not None else 2

    def process(batch: List[WorkItem]) -> List[Dict[str, Any]]:
        images = [read_input_image(item.payload, channels) for item in batch]
        pipe.set_progress_bar_config(desc=batch[0].name if len(batch) == 1 else f"{len(batch)} images", leave=False)
        result = pipe(images if len(images) > 1 else images[0], blocks=resolved["blocks"],
                      timesteps=resolved["timesteps"], policy=resolved["policy"], output=output, seed=args.seed,
                      feature_dtype=FEATURE_DTYPES[args.feature_dtype], tile_size=resolved["tile_size"],
                      field_of_view="auto" if args.field_of_view else False,
                      **(processing_call_kwargs(args) if output == "segmentation" else {}))
        rows = []
        for index, (item, image) in enumerate(zip(batch, images)):
            height, width = image.shape[:2]
            if output == "segmentation":
                mask = result.masks[index].cpu().numpy()
                probabilities = result.probabilities[index].float().cpu().numpy()
                shown = probabilities[1] if num_classes == 2 else probabilities.max(axis=0)
                uncertainty = result.uncertainty[index].float().cpu().numpy()
                writers = {
                    f"{item.name}_mask.png": png_writer(numpy_to_pil_masks(mask[None], num_classes)[0]),
                    f"{item.name}_probability.png": png_writer(numpy_to_pil_maps(shown[None])[0]),
                    f"{item.name}_uncertainty.png": png_writer(
                        numpy_to_pil_maps(uncertainty[None], math.log(num_classes))[0]),
                }
                figures = {"foreground_fraction": float((mask > 0).mean()),
                           "mean_uncertainty": float(uncertainty.mean(dtype=np.float64)),
                           **result.processing[index].as_record()}
            else:
                from safetensors.torch import save

                tensors = {name: maps[index].contiguous().cpu() for name, maps in result.features.items()}
                metadata = {"blocks": json.dumps(resolved["blocks"]), "timesteps": json.dumps(resolved["timesteps"]),
                            "policy": resolved["policy"], "seed": str(args.seed), "height": str(height),
                            "width": str(width), "pipeline": source}
                writers = {f"{item.name}_features.safetensors": bytes_writer(save(tensors, metadata=metadata))}
                figures = {"blocks": {name: list(tensor.shape) for name, tensor in tensors.items()}}
            written = write_files_atomically(args.output_dir, writers)
            rows.append({"outputs": [path.name for path in written], "width": int(width), "height": int(height),
                         **figures})
        return rows

    run_folder_command(
        args, "features", settings, items, process, group_of=image_group(channels),
        describe=describe_image_row(args.output_dir), verb="Processing",
        intro=lambda mine, total, skipped: (
            f"{'Segmenting' if output == 'segmentation' else 'Extracting features of'} {mine} of {total} image(s) "
            f"({skipped} already done) with {source} (blocks {resolved['blocks']}, timesteps {resolved['timesteps']}, "
            f"policy {resolved['policy']}) on {device} -> {args.output_dir}"))
    return 0
