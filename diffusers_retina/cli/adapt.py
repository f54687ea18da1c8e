"""``diffusers-retina adapt``: segment images of an adapted modality with an AdaptDiffPipeline's segmenter.

Each INPUT (an image of the target modality, e.g. a fluorescein angiogram) gives ``<stem>_mask.png`` (0/255; with
``--labels soft`` 8-bit probabilities, with ``--labels confident`` 0/128/255 where 128 means "not sure") and
``<stem>_probability.png`` (the vessel probability, 0..1 as 0..255). The adaptation itself is trained by
``diffusers-retina adapt-train`` (``training/adaptdiff_workflow.py``).

Folders run sharded and resumable like ``segment`` (see :mod:`diffusers_retina.sharded_inference`): under
``accelerate launch`` each process takes its share, finished inputs are skipped (``--overwrite`` redoes them),
``--image-batch-size`` images of one size share a call, and each input appends a row to ``results.jsonl``.

Examples::

    diffusers-retina adapt angiograms/ --output-dir vessels --tile-size 256
    diffusers-retina adapt angiograms/ --output-dir labels --labels confident --confidence 0.9
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

import diffusers_retina

from ..image_processing import numpy_to_pil_maps, transform_name
from ..pipelines import AdaptDiffPipeline
from ..pipelines.adaptdiff import PSEUDO_LABEL_MODES
from ..sharded_inference import WorkItem
from ..utils.io_utils import png_writer, write_files_atomically

from .common import (
    CLIError,
    DTYPES,
    add_device_argument,
    add_folder_run_arguments,
    add_image_input_arguments,
    apply_threads,
    bounded,
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

#: The embedded AdaptDiff reference: CHASE_DB1 photographs adapted to a fluorescein-angiography-like modality.
DEFAULT_ADAPTDIFF_PIPELINE: Path = (Path(diffusers_retina.__file__).resolve().parents[1] / "checkpoints"
                                    / "adaptdiff-chase-fa")


#: The ``adapt`` command's one-line help and its description (``--help``).
HELP = "segment target-modality images with an AdaptDiff-adapted segmenter"
DESCRIPTION = (
    "Segment each INPUT image of the adapted (target) modality with an AdaptDiffPipeline's segmenter: "
    "write <stem>_mask.png and <stem>_probability.png. Sharded under `accelerate launch`, resumable, one row per "
    "image in results.jsonl. Train an adaptation with `diffusers-retina adapt-train`."
)


def build_adapt_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """The ``adapt`` sub-command's arguments."""
    parser = subparsers.add_parser("adapt", help=HELP, description=DESCRIPTION)
    add_image_input_arguments(parser, "a saved AdaptDiffPipeline (folder or cached Hub repo id); default: the "
                              f"embedded reference {DEFAULT_ADAPTDIFF_PIPELINE}")
    parser.add_argument("--labels", choices=PSEUDO_LABEL_MODES, default="threshold",
                        help="threshold: 0/255 masks (default); soft: probabilities; confident: 0/128/255 with 128 "
                        "where the probability lies between 1 - confidence and confidence")
    parser.add_argument("--threshold", type=bounded(float, 0.0, 1.0, high_inclusive=True), default=0.5,
                        help="probability above which a pixel is a vessel (default: 0.5)")
    parser.add_argument("--confidence", type=bounded(float, 0.5, 1.0, high_inclusive=True), default=0.8,
                        help="--labels confident: the cut (default: 0.8)")
    parser.add_argument("--tile-size", type=non_negative_int, default=256, metavar="PIXELS",
                        help="images larger than this are segmented in overlapping windows; 0 = whole image "
                        "(default: 256)")
    add_device_argument(parser)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="weights and activations dtype (default: float32)")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N")
    add_folder_run_arguments(parser, "images")
    parser.set_defaults(handler=run_adapt)
    return parser


def run_adapt(args: argparse.Namespace) -> int:
    """The ``adapt`` sub-command: checks everything before writing, then segments this process's share."""
    files = collect_inputs(args.inputs)
    check_output_dir(args.output_dir)
    if args.labels == "confident" and args.confidence == 0.5:
        raise CLIError("--confidence must lie in (0.5, 1] for --labels confident.")
    device = resolve_device(args.device)
    apply_threads(args.threads)
    pipe, source = load_pipeline(args.pipeline, device, args.dtype, None, pipeline_class=AdaptDiffPipeline,
                                 default=DEFAULT_ADAPTDIFF_PIPELINE)
    tile_size = args.tile_size or None
    if tile_size is not None and tile_size % pipe.segmenter_multiple:
        raise CLIError(f"--tile-size {tile_size} must be a multiple of {pipe.segmenter_multiple} (the segmenter's "
                       "down-sampling factor).")
    settings = {"pipeline": source, "labels": args.labels, "threshold": args.threshold,
                "confidence": args.confidence, "tile_size": tile_size, "dtype": args.dtype,
                "input_transform": transform_name(pipe.config.get("input_transform")),
                "image_batch_size": args.image_batch_size, "device": str(device),
                "diffusers_retina_version": diffusers_retina.__version__}
    items = [WorkItem(name=path.stem, label=str(path), payload=path) for path in files]
    channels = pipe.segmenter.config.in_channels

    def process(batch: List[WorkItem]) -> List[Dict[str, Any]]:
        images = [read_input_image(item.payload, channels) for item in batch]
        pipe.set_progress_bar_config(disable=True)
        result = pipe.pseudo_label(np.stack(images), mode=args.labels, threshold=args.threshold,
                                   confidence=args.confidence, tile_size=tile_size, output_type="np")
        rows = []
        for index, (item, image) in enumerate(zip(batch, images)):
            labels, probability = result.masks[index], result.probabilities[index]
            writers = {f"{item.name}_mask.png": png_writer(numpy_to_pil_maps(labels[None])[0]),
                       f"{item.name}_probability.png": png_writer(numpy_to_pil_maps(probability[None])[0])}
            written = write_files_atomically(args.output_dir, writers)
            rows.append({"outputs": [path.name for path in written], "width": int(image.shape[1]),
                         "height": int(image.shape[0]), "vessel_fraction": float((labels >= 0.5).mean())})
        return rows

    run_folder_command(
        args, "adapt", settings, items, process, group_of=image_group(channels),
        describe=describe_image_row(args.output_dir), verb="Segmenting",
        intro=lambda mine, total, skipped: (f"Segmenting {mine} of {total} image(s) ({skipped} already done) with the "
                                            f"segmenter of {source} on {device} -> {args.output_dir}"))
    return 0
