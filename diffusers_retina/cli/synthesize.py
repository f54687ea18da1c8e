"""``diffusers-retina synthesize``: paint fundus images from vessel masks with a `Mask2ImagePipeline`.

Input: mask files / folders (binary 0/255 or 0/1 PNGs, or class-index masks), or ``--num-masks N`` to let the
pipeline's mask model sample the masks too. Output: ``<output-dir>/images/<name>.png`` and
``<output-dir>/masks/<name>.png`` (0/255 for binary masks) with matching names -- the folder-pair layout that
``FolderPairDataset`` and ``training/train_segmentation_ensemble.py --train_data_dir`` read directly -- and a
``summary.json``, with one row per mask in ``results.jsonl``. Every pair is written atomically; nothing is written
before all inputs have been read and checked. Folders run sharded under ``accelerate launch`` and resume where a
stopped run left off (``--overwrite`` redoes finished masks; see :mod:`diffusers_retina.sharded_inference`).

Examples::

    diffusers-retina synthesize masks/ --output-dir synthetic --pipeline checkpoints/mask2image-chase --steps 25
    diffusers-retina synthesize --num-masks 20 --height 256 --width 256 --output-dir synthetic_pairs
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

import diffusers_retina

from ..data import DataError, read_mask
from ..pipelines import Mask2ImagePipeline
from ..pipelines.sampling import per_sample_generators
from ..sharded_inference import WorkItem
from ..utils.io_utils import png_writer, write_files_atomically

from .common import (
    CLIError,
    DTYPES,
    SCHEDULERS,
    add_device_argument,
    add_folder_run_arguments,
    apply_threads,
    check_output_dir,
    collect_inputs,
    load_pipeline,
    non_negative_int,
    positive_int,
    resolve_device,
    run_folder_command,
)

#: The embedded mask-to-image reference checkpoint, trained by ``training/train_mask2image.py``.
DEFAULT_SYNTHESIS_PIPELINE: Path = Path(diffusers_retina.__file__).resolve().parents[1] / "checkpoints" / "mask2image-chase"


#: The ``synthesize`` command's one-line help and its description (``--help``).
HELP = "paint fundus images from vessel masks (or sampled masks) with a Mask2ImagePipeline"
DESCRIPTION = (
    "Paint a fundus image for each MASK (or for --num-masks masks sampled by the pipeline's mask "
    "model). Writes images/<name>.png and masks/<name>.png (matching names: a folder-pair dataset) and "
    "summary.json to --output-dir, atomically."
)


def build_synthesize_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    parser = subparsers.add_parser("synthesize", help=HELP, description=DESCRIPTION)
    parser.add_argument("masks", nargs="*", metavar="MASK",
                        help="a mask file, or a folder of masks (binary 0/255 or 0/1, or class indices)")
    parser.add_argument("--output-dir", required=True, type=Path, metavar="DIR",
                        help="folder for images/, masks/ and summary.json (created if missing)")
    parser.add_argument("--pipeline", default=None, metavar="PATH_OR_REPO",
                        help="a saved Mask2ImagePipeline (folder or cached Hub repo id); default: the embedded "
                        f"reference {DEFAULT_SYNTHESIS_PIPELINE}")
    parser.add_argument("--num-masks", type=positive_int, default=None, metavar="N",
                        help="without MASK arguments: sample N masks with the pipeline's mask model")
    parser.add_argument("--height", type=positive_int, default=None, help="size of sampled masks (default: the mask "
                        "model's training size)")
    parser.add_argument("--width", type=positive_int, default=None)
    parser.add_argument("--crop", type=non_negative_int, default=0, metavar="PIXELS",
                        help="paint only the central PIXELS x PIXELS crop of each given mask (the written mask is that "
                        "crop; synthesis time grows with the pixels); 0 = the whole mask (default)")
    parser.add_argument("--images-per-mask", type=positive_int, default=1, metavar="K",
                        help="images painted per mask; names get _1.._K (default: 1)")
    parser.add_argument("--steps", type=positive_int, default=25, metavar="N", help="denoising steps (default: 25)")
    parser.add_argument("--guidance-scale", type=float, default=1.5, metavar="S",
                        help="classifier-free guidance scale; 1 = none (default: 1.5)")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None,
                        help="sampler built from the saved scheduler's config (default: the saved one)")
    parser.add_argument("--tile-size", type=non_negative_int, default=None, metavar="PIXELS",
                        help="paint masks larger than this in overlapping windows (default: the model's training "
                        "size; 0 = whole image at once)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    add_device_argument(parser)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N")
    add_folder_run_arguments(parser, "masks")
    parser.set_defaults(handler=run_synthesize)
    return parser


def _read_mask(path: Path, num_classes: int, crop: int = 0) -> np.ndarray:
    """Decode and check one mask (and cut its central ``crop`` x ``crop`` box); errors are CLIErrors naming it."""
    try:
        mask = read_mask(path, num_classes)
    except DataError as error:
        raise CLIError(str(error)) from error
    if crop:
        height, width = mask.shape[-2:]
        if crop > min(height, width):
            raise CLIError(f"--crop {crop}: the mask '{path}' is only {width}x{height}.")
        top, left = (height - crop) // 2, (width - crop) // 2
        mask = mask[..., top: top + crop, left: left + crop]
    return mask


def _read_masks(files: List[Path], num_classes: int, crop: int = 0) -> Dict[str, np.ndarray]:
    """Decode and check every mask (and cut its central ``crop`` x ``crop`` box) before anything is written."""
    return {path.stem: _read_mask(path, num_classes, crop) for path in files}


def job_generators(seed: int, index: int, count: int, device: torch.device) -> List[torch.Generator]:
    """The ``count`` generators a lone call with ``torch.Generator().manual_seed(seed * 1000003 + index)`` gives job
    ``index`` (one seed per job, so a job's output depends neither on the other masks, nor on the batch or process
    it runs in)."""
    return per_sample_generators(torch.Generator().manual_seed(seed * 1000003 + index), count, device)


def _check_mask_source(args: argparse.Namespace) -> None:
    """Given masks or sampled ones, and the flags that go with each."""
    if bool(args.masks) == (args.num_masks is not None):
        raise CLIError("Give MASK files/folders or --num-masks N (masks sampled by the pipeline), not both or neither.")
    if args.masks and (args.height or args.width):
        raise CLIError("--height/--width size sampled masks; given masks keep their own size.")
    if args.crop and not args.masks:
        raise CLIError("--crop cuts given MASK files; sampled masks take --height/--width.")


def _checked_tile_size(args: argparse.Namespace, pipe: Mask2ImagePipeline, source: str) -> Optional[int]:
    """``--tile-size`` (default: the model's sample size), with the pipeline's own checks of the call's settings
    reported in the flags' names."""
    if args.num_masks is not None and pipe.mask_unet is None:
        raise CLIError(f"--num-masks: the pipeline '{source}' has no mask model; pass MASK files instead.")
    tile_size = args.tile_size
    if tile_size is None:
        sample_size = pipe.unet.config.sample_size
        tile_size = sample_size if isinstance(sample_size, int) else None
    tile_size = tile_size or None
    mask_argument = None if args.num_masks else "masks given"  # check_inputs only asks whether masks are given
    try:
        pipe.check_inputs(mask_argument, args.num_masks or 1, args.height, args.width,
                          args.images_per_mask, args.guidance_scale, None, tile_size, 0.25, "pil", ["latents"])
    except ValueError as error:
        raise CLIError(str(error).replace("`tile_size`", "--tile-size").replace("`guidance_scale`",
                                                                                 "--guidance-scale")) from error
    return tile_size


def run_synthesize(args: argparse.Namespace) -> int:
    """The ``synthesize`` sub-command: checks everything before writing, then paints this process's share of the
    masks still to do, ``--image-batch-size`` masks of one size per pipeline call (see
    :mod:`diffusers_retina.sharded_inference`)."""
    _check_mask_source(args)
    files = collect_inputs(args.masks) if args.masks else []
    check_output_dir(args.output_dir)
    device = resolve_device(args.device)
    apply_threads(args.threads)
    pipe, source = load_pipeline(args.pipeline, device, args.dtype, args.scheduler, pipeline_class=Mask2ImagePipeline,
                                 default=DEFAULT_SYNTHESIS_PIPELINE)
    tile_size = _checked_tile_size(args, pipe, source)

    per_mask = args.images_per_mask
    settings = {"pipeline": source, "steps": args.steps, "guidance_scale": args.guidance_scale,
                "scheduler": type(pipe.scheduler).__name__, "images_per_mask": per_mask,
                "tile_size": tile_size, "crop": args.crop or None, "seed": args.seed,
                "num_masks": args.num_masks, "height": args.height, "width": args.width,
                "image_batch_size": args.image_batch_size, "device": str(device), "dtype": args.dtype,
                "diffusers_retina_version": diffusers_retina.__version__}
    if files:
        items = [WorkItem(name=path.stem, label=str(path), payload=(index, path)) for index, path in enumerate(files)]
    else:
        items = [WorkItem(name=f"synthetic_{i + 1:04d}", label=f"synthetic_{i + 1:04d}", payload=(i, None),
                          group="sampled") for i in range(args.num_masks)]

    def pairs_of(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
        return {"pairs": [pair for row in rows for pair in row.get("pairs", [])]}

    def group_of(item: WorkItem) -> Any:  # every given mask checked before anything is written
        if item.payload[1] is None:
            return None  # sampled masks keep their own group
        mask = _read_mask(item.payload[1], pipe.num_classes, args.crop)
        return mask.shape, mask.dtype.str

    def make_folders() -> None:
        for sub in ("images", "masks"):
            try:
                (args.output_dir / sub).mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise CLIError(f"--output-dir '{args.output_dir}' cannot be created: {error}") from error

    def process(batch: List[WorkItem]) -> List[Dict[str, Any]]:
        indices = [item.payload[0] for item in batch]
        pipe.set_progress_bar_config(desc=batch[0].name if len(batch) == 1 else f"{len(batch)} masks", leave=False)
        if files:
            masks = [_read_mask(item.payload[1], pipe.num_classes, args.crop) for item in batch]
            generators = [g for index in indices for g in job_generators(args.seed, index, per_mask, device)]
            mask_input: Any = masks if len(masks) > 1 else masks[0]
        else:  # sampled masks: every job's mask generator first, then every job's image generators
            split = [job_generators(args.seed, index, 1 + per_mask, device) for index in indices]
            generators = [g[0] for g in split] + [g for job in split for g in job[1:]]
            mask_input = None
        result = pipe(mask_input, num_masks=len(batch), height=args.height, width=args.width,
                      num_images_per_mask=per_mask, num_inference_steps=args.steps,
                      guidance_scale=args.guidance_scale, generator=generators, tile_size=tile_size,
                      output_type="pil")
        rows = []
        for position, item in enumerate(batch):
            outputs, pairs = [], []
            for k in range(per_mask):
                image, mask_image = result.images[position * per_mask + k], result.masks[position * per_mask + k]
                stem = item.name if per_mask == 1 else f"{item.name}_{k + 1}"
                # image and mask are renamed into place together, after both were written
                write_files_atomically(args.output_dir, {f"images/{stem}.png": png_writer(image),
                                                         f"masks/{stem}.png": png_writer(mask_image)})
                outputs += [f"images/{stem}.png", f"masks/{stem}.png"]
                pairs.append({"name": stem, "source_mask": item.label if files else None,
                              "width": image.size[0], "height": image.size[1]})
            rows.append({"outputs": outputs, "pairs": pairs})
        return rows

    run_folder_command(
        args, "synthesize", settings, items, process, group_of=group_of, before_start=make_folders,
        verb="Synthesizing from", rows_key="masks", summary_extra=pairs_of,
        intro=lambda mine, total, skipped: (
            f"Synthesizing {mine * per_mask} image(s) for {mine} of {total} mask(s) ({skipped} already done) with "
            f"{source} ({args.steps} steps, guidance {args.guidance_scale}) on {device} -> {args.output_dir}"),
        done=lambda outcome: (f"Done in {outcome.summary.get('total_seconds', 0.0):.1f} s; pairs in "
                              f"{args.output_dir / 'images'} and {args.output_dir / 'masks'}"))
    return 0
