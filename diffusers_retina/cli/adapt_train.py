"""``diffusers-retina adapt-train``: adapt the vessel segmenter to a folder of unlabelled photographs in one command.

TARGET_FOLDER holds photographs from one camera (or of one modality), no labels. The command writes, under
``--output-dir``:

* ``segmenter/``: the adapted deterministic segmenter (a ``UNet2DModel`` folder; it records the source's training
  field-of-view diameter, so ``processing_resolution="auto"`` keeps working);
* ``anchored/``: the prior-anchored ``SegmentationEnsemblePipeline`` (``--anchored-pipeline``) with the adapted
  segmenter as its prior;
* ``adaptdiff/``: with ``--method adaptdiff`` or ``combined``, the ``AdaptDiffPipeline`` (the painter and the adapted
  segmenter);
* ``work/``: the resumable workflow (``workflow.json`` holds each step's wall time; run the same command again to go on
  after an interruption).

Methods: ``self-training`` (default; needs no source data): fine-tune on the target photographs with their confident
pseudo-labels; ``adaptdiff``: paint the target's appearance on the source's real masks and fine-tune on those pairs
(needs ``--source-data-dir``); ``combined``: both sets of pairs. Every choice is made by a label-free rule
(:mod:`diffusers_retina.adaptation`): the working scale (the field of view matched to the source's), the pseudo-label
transform (the source's vessel fraction), the confident pixels (agreement of five views; pseudo-labels at one half,
the threshold that did best on unseen development photographs), and the space fine-tuning happens in (the pairs
moved through that transform; the adapted models store it as ``input_transform`` and read every photograph through
it). The run is
done by ``training/adaptdiff_workflow.py`` of a source checkout (the training scripts are not part of the wheel).

Examples::

    diffusers-retina adapt-train clinic_photographs/ --output-dir adapted
    diffusers-retina segment new_photo.jpg --pipeline adapted/anchored --output-dir vessels
    diffusers-retina adapt-train angiograms/ --output-dir adapted-fa --method combined \\
        --source-data-dir CHASEDB1 --source-mask-dir 1stHO --source-mask-suffix _1stHO
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
from pathlib import Path
from typing import List

import diffusers_retina

from ..adaptation import check_target_folder
from ..data import DataError
from .common import CLIError, apply_threads, check_output_dir, positive_int

#: The repository root of a source checkout (holds ``training/`` and ``checkpoints/``).
REPOSITORY = Path(diffusers_retina.__file__).resolve().parents[1]
DEFAULT_SEGMENTER = REPOSITORY / "checkpoints" / "vessel-segmenter-chase"
DEFAULT_ANCHORED = REPOSITORY / "checkpoints" / "segmentation-anchored-features-chase"
WORKFLOW = REPOSITORY / "training" / "adaptdiff_workflow.py"

HELP = "adapt the vessel segmenter to a folder of unlabelled photographs"
DESCRIPTION = ("Adapt the vessel segmenter (and the anchored pipeline built on it) to TARGET_FOLDER, photographs of "
               "one camera or modality without labels: self-training on confident pseudo-labels, AdaptDiff's painted "
               "pairs, or both. Every setting is chosen by a label-free rule. Resumable: run it again to go on.")


def build_adapt_train_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """The ``adapt-train`` sub-command's arguments."""
    parser = subparsers.add_parser("adapt-train", help=HELP, description=DESCRIPTION)
    parser.add_argument("target", type=Path, metavar="TARGET_FOLDER",
                        help="photographs of the target camera or modality (one size, at least 4; no labels)")
    parser.add_argument("--output-dir", type=Path, required=True,
                        help="where segmenter/, anchored/, adaptdiff/ and work/ are written")
    parser.add_argument("--method", choices=["self-training", "adaptdiff", "combined"], default="self-training",
                        help="self-training (default, minutes on a CPU, no source data), adaptdiff or combined "
                        "(both need --source-data-dir: hours on a CPU)")
    parser.add_argument("--segmenter", type=Path, default=DEFAULT_SEGMENTER,
                        help=f"the source segmenter, a UNet2DModel folder (default: {DEFAULT_SEGMENTER})")
    parser.add_argument("--anchored-pipeline", type=Path, default=DEFAULT_ANCHORED,
                        help=f"the prior-anchored pipeline to adapt (default: {DEFAULT_ANCHORED}); 'none' to skip")
    parser.add_argument("--source-data-dir", type=Path, default=None,
                        help="the labelled source data (images/ and masks/): the masks painted by adaptdiff/combined")
    parser.add_argument("--source-mask-dir", default="masks")
    parser.add_argument("--source-mask-suffix", default="")
    parser.add_argument("--steps", type=positive_int, default=300,
                        help="fine-tuning steps (default: 300, a fixed budget, not tuned per target)")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workflow-args", default="",
                        help="more flags for training/adaptdiff_workflow.py, as one quoted string")
    parser.set_defaults(handler=run_adapt_train)
    return parser


def workflow_argv(args: argparse.Namespace) -> List[str]:
    """The ``training/adaptdiff_workflow.py`` flags of an ``adapt-train`` call."""
    out = args.output_dir
    argv = ["--method", args.method, "--source_segmenter", str(args.segmenter),
            "--target_data_dir", str(args.target), "--target_image_dir", ".", "--work_dir", str(out / "work"),
            "--segmenter_output_dir", str(out / "segmenter"), "--output_dir", str(out / "adaptdiff"),
            "--pseudo_label_transform", "auto", "--finetune_steps", str(args.steps), "--seed", str(args.seed)]
    if str(args.anchored_pipeline).lower() != "none":
        argv += ["--anchored_pipeline", str(args.anchored_pipeline), "--anchored_output_dir", str(out / "anchored")]
    if args.source_data_dir is not None:
        argv += ["--source_data_dir", str(args.source_data_dir), "--source_mask_dir", args.source_mask_dir,
                 "--source_mask_suffix", args.source_mask_suffix]
    return argv + shlex.split(args.workflow_args)


def run_adapt_train(args: argparse.Namespace) -> int:
    """The ``adapt-train`` sub-command: checks the target folder (through the workflow's own checks, before any
    training), then runs or resumes the workflow."""
    if not WORKFLOW.is_file():
        raise CLIError(f"adapt-train runs {WORKFLOW.relative_to(REPOSITORY)} of a source checkout, and this "
                       "installation has none: clone the repository and `pip install -e .` there.")
    if args.method != "self-training" and args.source_data_dir is None:
        raise CLIError(f"--method {args.method} paints the source's vessel masks: give --source-data-dir.")
    try:
        check_target_folder(args.target)
    except DataError as error:
        raise CLIError(str(error)) from None
    check_output_dir(args.output_dir)
    apply_threads(args.threads)
    spec = importlib.util.spec_from_file_location("adaptdiff_workflow", WORKFLOW)
    workflow = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(WORKFLOW.parent))
    spec.loader.exec_module(workflow)
    state = workflow.main(workflow_argv(args))
    for step, record in state["steps"].items():
        seconds = record.get("training_seconds", record.get("seconds"))
        print(f"  {step:<14s} {'skipped' if record.get('skipped') else f'{seconds:.0f} s'}")
    print(f"Adapted segmenter: {args.output_dir / 'segmenter'}")
    if str(args.anchored_pipeline).lower() != "none":
        print(f"Adapted anchored pipeline: {args.output_dir / 'anchored'} "
              f"(diffusers-retina segment IMAGES --pipeline {args.output_dir / 'anchored'})")
    return 0
