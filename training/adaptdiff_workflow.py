#!/usr/bin/env python
"""Adapt a vessel segmenter to unlabelled target photographs (another camera, or another modality) in one resumable
command: AdaptDiff, self-training on confident pseudo-labels, or both (``diffusers-retina adapt-train`` runs it).

    python training/adaptdiff_workflow.py --method self-training \\
        --source_segmenter checkpoints/vessel-segmenter-chase --target_data_dir TARGET --target_image_dir . \\
        --work_dir runs/adapt --anchored_pipeline checkpoints/segmentation-anchored-features-chase

    python training/adaptdiff_workflow.py --method adaptdiff \\
        --source_data_dir SOURCE --source_mask_dir masks --source_segmenter checkpoints/vessel-segmenter-chase \\
        --target_data_dir TARGET --work_dir runs/adaptdiff

Five steps over ``--work_dir`` (AdaptDiff, Hu et al., MICCAI SASHIMI 2024, arXiv 2410.04648, plus self-training and a
label-free calibration; the steps are in ``adaptdiff_steps.py``). Every choice is made by a label-free rule of
:mod:`diffusers_retina.adaptation`:

1. ``pseudo-labels``: each target photograph at the source's scale (``--processing_resolution auto``: its field of
   view resized to the source segmenter's training diameter); the intensity transform towards the source
   (``--pseudo_label_transform auto``: the one whose marked vessel fraction is closest to the source's); the
   pseudo-label, the mean of five views (the photograph, two mirror images, a darker and a brighter copy) above one
   half (``--pseudo_label_threshold``: another number, or a rule by name); and the confident pixels, where all five
   views agree. ``--pseudo_label_fp/--pseudo_label_fn`` corrupt the labels on purpose (weak-label studies). Written
   to ``1-pseudo-labels/{images,masks,confident}``.
2. ``diffusion`` (not for ``self-training``): a ``ConditionalUNet2DModel`` learns target images given the pseudo-labels
   with ``training/train_mask2image.py`` (AdaptDiff's recipe by default: SPADE in the decoder with instance norm,
   T=300 linear betas, epsilon prediction, L1 loss). Checkpoints in ``2-diffusion``.
3. ``synthesis`` (not for ``self-training``): target-style images painted from the source's *real* masks,
   histogram-matched to target images. Written to ``3-synthetic/{images,masks}``, image by image; then the source reads
   each painting (step 1's transform and views): the pixels where every view contradicts the mask are left out
   (``3-synthetic/confident``) and the paintings' mask faithfulness is recorded.
4. ``fine-tune``: the source segmenter fine-tuned with ``training/train_segmentation_ensemble.py --objective supervised
   --init_unet --loss_mask_dir`` (BCE + soft Dice over the pixels that count) on ``--method``'s pairs: the painted
   pairs (``adaptdiff``), the target photographs with their confident pseudo-labels (``self-training``), or both
   (``combined``), into ``4-fine-tune``.
5. ``calibrate``: the fine-tuned segmenter's temperature fitted to the source segmenter's probabilities on the target
   photographs (``--calibration teacher``; thresholds at one half are unchanged) and folded into its output layer;
   then the adapted segmenter (``--segmenter_output_dir``), the anchored pipeline with it as its prior
   (``--anchored_pipeline``) and, with a painter, the adapted ``AdaptDiffPipeline`` (``--output_dir``) are written.

Before anything is trained the target folder is checked (at least 4 photographs, one size, nothing that is not an
image: an error names the files). Every step writes its output beside its final place and moves it in when complete,
then records completion (and its wall time) in ``<work_dir>/workflow.json``. A killed run restarts in the step it
stopped in -- the training steps from their newest complete checkpoint, the synthesis after its last finished image --
and never redoes a finished step (``--redo`` to force). ``--from_step/--to_step`` run a part. Runs on CPU, one GPU or
many (``accelerate launch --multi_gpu training/adaptdiff_workflow.py ...``: the training steps use every process, the
labelling and painting steps the main one).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the steps and the training scripts of steps 2 and 4
from adaptdiff_steps import (  # noqa: E402
    step_calibrate,
    step_diffusion,
    step_finetune,
    step_pseudo_labels,
    step_synthesis,
)

STEPS = ("pseudo-labels", "diffusion", "synthesis", "fine-tune", "calibrate")
METHODS = ("adaptdiff", "self-training", "combined")
PAINTING_STEPS = ("diffusion", "synthesis")  # skipped by --method self-training
ADAPTATION_RECORD = "adaptation.json"  # the workflow's record in the adapted segmenter's folder
STATE_FILE = "workflow.json"
STEP_FOLDERS = {"pseudo-labels": "1-pseudo-labels", "diffusion": "2-diffusion", "synthesis": "3-synthetic"}


THRESHOLD_RULES = ("mean-probability", "source-fraction")


def threshold_rule(value: str):
    """``--pseudo_label_threshold``: one of :data:`THRESHOLD_RULES`, or a number in [0, 1]."""
    if value in THRESHOLD_RULES:
        return value
    try:
        number = float(value)
    except ValueError:
        number = None
    if number is None or not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or one of {', '.join(THRESHOLD_RULES)}, "
                                         f"got {value!r}")
    return number


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="AdaptDiff: adapt a vessel segmenter to an unlabelled modality.")
    source = parser.add_argument_group("source (labelled)")
    source.add_argument("--source_data_dir", type=str, default=None,
                        help="Folder with images/ and masks/: the masks steps 2-3 paint (needed by --method adaptdiff "
                             "and combined) and the photographs the *histmatch transforms match to.")
    source.add_argument("--source_image_dir", type=str, default="images")
    source.add_argument("--source_mask_dir", type=str, default="masks")
    source.add_argument("--source_mask_suffix", type=str, default="")
    source.add_argument("--source_stems", type=str, default=None,
                        help="Comma-separated glob patterns of the source masks painted in step 3 (default: all).")
    source.add_argument("--source_segmenter", type=str, required=True,
                        help="The source segmenter: a saved UNet2DModel folder (image in, one logit channel out).")
    target = parser.add_argument_group("target (unlabelled)")
    target.add_argument("--target_data_dir", type=str, required=True, help="Folder of target-modality images.")
    target.add_argument("--target_image_dir", type=str, default="images",
                        help="Sub-folder of --target_data_dir holding the images ('.' for the folder itself).")
    target.add_argument("--target_stems", type=str, default=None,
                        help="Comma-separated glob patterns of the target images used (default: all).")
    parser.add_argument("--method", type=str, default="adaptdiff", choices=METHODS,
                        help="adaptdiff: fine-tune on painted pairs (source masks, target appearance); self-training: "
                             "fine-tune on the target photographs with their confident pseudo-labels (steps 2-3 are "
                             "skipped); combined: both sets of pairs together.")
    parser.add_argument("--processing_resolution", type=str, default="auto", choices=["auto", "native"],
                        help="auto: bring every target photograph's field of view to the diameter the source segmenter "
                             "learnt at before labelling, painting and fine-tuning (native: as they are).")
    parser.add_argument("--segmenter_output_dir", type=str, default=None,
                        help="The adapted segmenter, a UNet2DModel folder (default <work_dir>/adapted-segmenter).")
    parser.add_argument("--anchored_pipeline", type=str, default=None,
                        help="A prior-anchored SegmentationEnsemblePipeline folder whose prior is the source "
                             "segmenter: saved again with the adapted segmenter as its prior (--anchored_output_dir).")
    parser.add_argument("--anchored_output_dir", type=str, default=None,
                        help="The adapted anchored pipeline (default <work_dir>/adapted-anchored).")
    parser.add_argument("--work_dir", type=str, required=True)
    parser.add_argument("--output_dir", type=str, default=None, help="The adapted pipeline (default <work_dir>/adapted).")
    parser.add_argument("--from_step", type=int, default=1, choices=range(1, 6))
    parser.add_argument("--to_step", type=int, default=5, choices=range(1, 6))
    parser.add_argument("--redo", action="store_true", help="Redo the selected steps even if they are complete.")
    parser.add_argument("--reuse_from", type=str, default=None,
                        help="Another work folder run with the same flags: its completed steps 1-3 (which do not "
                             "depend on --method) are hard-linked here instead of being run again, to compare methods.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tile_size", type=int, default=256, help="Windows of the segmenter and the painter.")
    # step 1
    parser.add_argument("--pseudo_label_transform", type=str, default="none",
                        choices=["auto", "none", "invert", "histmatch", "invert+histmatch"],
                        help="Move target images towards the source's intensities before the source segmenter labels "
                             "them (none: AdaptDiff as published; see diffusers_retina.data.modality."
                             "to_source_intensities). auto: the label-free rule of diffusers_retina.adaptation."
                             "choose_transform (the vessel fraction closest to the source's).")
    parser.add_argument("--num_source_references", type=int, default=4,
                        help="Source photographs whose pooled histogram the *histmatch transforms match to.")
    parser.add_argument("--pseudo_labels_from", type=str, default=None,
                        help="Take step 1's labels from this folder's masks/<stem>.png (an earlier run's "
                             "1-pseudo-labels, or weak labels made elsewhere) instead of running the segmenter; "
                             "--pseudo_label_fp/fn still apply.")
    parser.add_argument("--pseudo_label_threshold", type=threshold_rule, default=0.5,
                        help="Threshold of the pseudo-labels: a number in [0, 1] (default 0.5, the Bayes threshold "
                             "of a calibrated segmenter), or a label-free rule of diffusers_retina.adaptation: "
                             "mean-probability (the folder's marked vessel fraction equals its mean probability) or "
                             "source-fraction (equals the source's training fraction; 0.5 when the source records "
                             "none).")
    parser.add_argument("--transform_sample", type=int, default=8,
                        help="--pseudo_label_transform auto: the target photographs the rule looks at.")
    parser.add_argument("--pseudo_label_fp", type=float, default=0.0,
                        help="Corrupt the pseudo-labels: add this fraction of their vessel pixels as false positives.")
    parser.add_argument("--pseudo_label_fn", type=float, default=0.0,
                        help="Corrupt the pseudo-labels: remove this fraction of their vessel pixels.")
    # step 2
    parser.add_argument("--diffusion_steps", type=int, default=2000, help="Training steps of the diffusion model.")
    parser.add_argument("--diffusion_resolution", type=int, default=128)
    parser.add_argument("--diffusion_batch_size", type=int, default=4)
    parser.add_argument("--diffusion_learning_rate", type=float, default=1e-3)
    parser.add_argument("--diffusion_block_out_channels", type=str, default="32,64,128,128")
    parser.add_argument("--diffusion_prediction_type", type=str, default="epsilon",
                        choices=["epsilon", "sample", "v_prediction"])
    parser.add_argument("--num_train_timesteps", type=int, default=300)
    parser.add_argument("--diffusion_args", type=str, default="",
                        help="More flags for training/train_mask2image.py, as one quoted string.")
    # step 3
    parser.add_argument("--paint_steps", type=int, default=10, help="DDIM steps per painted image.")
    parser.add_argument("--images_per_mask", type=int, default=1)
    parser.add_argument("--paint_crop", type=int, default=0,
                        help="Paint a random crop of this size of each source mask instead of the whole mask (a new "
                             "crop per image; 0: whole masks). Cheaper synthetic pairs for quick studies.")
    parser.add_argument("--guidance_scale", type=float, default=1.0)
    parser.add_argument("--num_reference_images", type=int, default=4,
                        help="Target images whose pooled histogram the painted images are matched to (0: none).")
    # step 4
    parser.add_argument("--finetune_steps", type=int, default=300,
                        help="Fine-tuning steps: a fixed budget, not tuned per target (the label-free rule for it).")
    parser.add_argument("--finetune_resolution", type=int, default=128)
    parser.add_argument("--finetune_batch_size", type=int, default=8)
    parser.add_argument("--finetune_learning_rate", type=float, default=3e-4)
    parser.add_argument("--finetune_space", type=str, default="source", choices=["source", "target"],
                        help="source (default): the fine-tuning pairs move through step 1's intensity transform, the "
                             "space where the source segmenter already reads the target, and the adapted models store "
                             "it (input_transform) and read every target photograph through it; target: fine-tune on "
                             "the pairs as they are. The same when step 1 chose the transform none.")
    parser.add_argument("--finetune_photometric", type=float, default=0.5,
                        help="--photometric_augmentation of the fine-tuning patches.")
    parser.add_argument("--finetune_args", type=str, default="",
                        help="More flags for training/train_segmentation_ensemble.py, as one quoted string.")
    parser.add_argument("--checkpointing_steps", type=int, default=100)
    # step 5
    parser.add_argument("--calibration", type=str, default="teacher", choices=["teacher", "none"],
                        help="teacher: fold into the adapted segmenter the temperature under which its probabilities "
                             "on the target photographs best match the source segmenter's (label-free; thresholds at "
                             "one half are unchanged); none: leave it as fine-tuned.")
    parser.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    args = parser.parse_args(argv)

    if args.from_step > args.to_step:
        parser.error(f"--from_step {args.from_step} comes after --to_step {args.to_step}.")
    if args.source_data_dir is None and args.method != "self-training":
        parser.error(f"--method {args.method} paints the source's masks: give --source_data_dir.")
    if args.source_data_dir is None and "histmatch" in args.pseudo_label_transform:
        parser.error(f"--pseudo_label_transform {args.pseudo_label_transform} matches to source photographs: give "
                     "--source_data_dir.")
    for flag in ("source_data_dir", "target_data_dir"):
        if getattr(args, flag) is not None and not os.path.isdir(getattr(args, flag)):
            parser.error(f"--{flag} {getattr(args, flag)!r} is not a folder.")
    folders = [(os.path.join(args.target_data_dir, args.target_image_dir), "--target_image_dir")]
    if args.source_data_dir is not None:
        folders += [(os.path.join(args.source_data_dir, args.source_mask_dir), "--source_mask_dir"),
                    (os.path.join(args.source_data_dir, args.source_image_dir), "--source_image_dir")]
    for sub, flag in folders:
        if not os.path.isdir(sub):
            parser.error(f"{flag}: {sub!r} is not a folder.")
    from diffusers_retina.adaptation import check_target_folder
    from diffusers_retina.data import DataError

    try:  # before anything is trained: enough photographs, one size, nothing that is not an image
        check_target_folder(os.path.join(args.target_data_dir, args.target_image_dir), args.target_stems)
    except DataError as error:
        parser.error(str(error))
    if args.anchored_pipeline is not None and not os.path.isfile(
            os.path.join(args.anchored_pipeline, "prior", "config.json")):
        parser.error(f"--anchored_pipeline {args.anchored_pipeline!r} has no prior/ component (a prior-anchored "
                     "SegmentationEnsemblePipeline folder).")
    if not os.path.isfile(os.path.join(args.source_segmenter, "config.json")):
        parser.error(f"--source_segmenter {args.source_segmenter!r} has no config.json (a saved UNet2DModel folder).")
    for flag in ("diffusion_steps", "diffusion_resolution", "diffusion_batch_size", "num_train_timesteps",
                 "paint_steps", "images_per_mask", "finetune_steps", "finetune_resolution", "finetune_batch_size",
                 "checkpointing_steps", "tile_size", "transform_sample"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be a positive integer, got {getattr(args, flag)}.")
    from diffusers_retina.hub import recorded_training_args

    if args.pseudo_label_transform == "auto" and args.source_data_dir is None and not args.pseudo_labels_from and \
            recorded_training_args(args.source_segmenter).get("training_vessel_fraction") is None:
        parser.error(f"--pseudo_label_transform auto compares with the source's vessel fraction: --source_segmenter "
                     f"{args.source_segmenter} records none (training_info.json 'training_vessel_fraction'); give "
                     "--source_data_dir or name a transform.")
    if args.reuse_from and not os.path.isfile(os.path.join(args.reuse_from, STATE_FILE)):
        parser.error(f"--reuse_from {args.reuse_from!r} has no {STATE_FILE} (a workflow's --work_dir).")
    if args.pseudo_labels_from and not os.path.isdir(os.path.join(args.pseudo_labels_from, "masks")):
        parser.error(f"--pseudo_labels_from {args.pseudo_labels_from!r} has no masks/ folder.")
    if args.paint_crop < 0:
        parser.error(f"--paint_crop must be >= 0 (0: whole masks), got {args.paint_crop}.")
    if args.num_reference_images < 0 or args.num_source_references < 1:
        parser.error("--num_reference_images must be >= 0 and --num_source_references >= 1.")
    if not 0.0 <= args.pseudo_label_fn <= 1.0:
        parser.error(f"--pseudo_label_fn must lie in [0, 1], got {args.pseudo_label_fn}.")
    if not (args.pseudo_label_fp >= 0.0 and np.isfinite(args.pseudo_label_fp)):
        parser.error(f"--pseudo_label_fp must be a finite number >= 0, got {args.pseudo_label_fp}.")
    for flag in ("diffusion_learning_rate", "finetune_learning_rate", "guidance_scale"):
        if not (np.isfinite(getattr(args, flag)) and getattr(args, flag) >= 0):
            parser.error(f"--{flag} must be a finite number >= 0, got {getattr(args, flag)}.")
    args.output_dir = args.output_dir or os.path.join(args.work_dir, "adapted")
    args.segmenter_output_dir = args.segmenter_output_dir or os.path.join(args.work_dir, "adapted-segmenter")
    args.anchored_output_dir = args.anchored_output_dir or os.path.join(args.work_dir, "adapted-anchored")
    return args


# ---------------------------------------------------------------------------------------------- state
class WorkflowState:
    """``<work_dir>/workflow.json``: which steps are complete, when, and how long they took (written atomically)."""

    def __init__(self, work_dir: Path):
        self.path = work_dir / STATE_FILE
        self.data: Dict = json.loads(self.path.read_text()) if self.path.is_file() else {"steps": {}}

    def complete(self, step: str) -> bool:
        return bool(self.data["steps"].get(step, {}).get("complete"))

    def record(self, step: str, **values) -> None:
        self.data["steps"].setdefault(step, {}).update(values)
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(temporary, self.path)


STEP_FUNCTIONS = {"pseudo-labels": step_pseudo_labels, "diffusion": step_diffusion, "synthesis": step_synthesis,
                  "calibrate": step_calibrate,
                  "fine-tune": step_finetune}
MAIN_PROCESS_ONLY = ("pseudo-labels", "synthesis", "calibrate")


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    from accelerate import PartialState

    state_of_run = PartialState()
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    state = WorkflowState(work_dir)
    recorded = state.data.get("method", "adaptdiff" if state.data["steps"] else None)
    if recorded is not None and recorded != args.method:
        raise SystemExit(f"{work_dir} holds a --method {recorded} run; give another --work_dir for --method "
                         f"{args.method}.")
    if state_of_run.is_main_process and recorded is None:
        state.data["method"] = args.method
    for number, step in enumerate(STEPS, start=1):
        if not args.from_step <= number <= args.to_step:
            continue
        if state.complete(step) and not args.redo:
            print(f"step {number} ({step}): already complete, skipped")
            continue
        if args.method == "self-training" and step in PAINTING_STEPS:
            if state_of_run.is_main_process:
                state.record(step, complete=True, skipped="--method self-training paints nothing", seconds=0.0)
            print(f"step {number} ({step}): skipped (--method self-training)")
            continue
        if number > 1 and not state.complete(STEPS[number - 2]):
            raise SystemExit(f"step {number} ({step}) needs step {number - 1} ({STEPS[number - 2]}) to be complete "
                             f"in {work_dir}: run it first (--from_step {number - 1}).")
        if args.reuse_from and step in STEP_FOLDERS and reuse_step(args, work_dir, state, step):
            print(f"step {number} ({step}): taken from {args.reuse_from}")
            state = WorkflowState(work_dir)
            continue
        if args.redo and step in ("diffusion", "fine-tune"):
            shutil.rmtree(work_dir / ("2-diffusion" if step == "diffusion" else "4-fine-tune"), ignore_errors=True)
        print(f"step {number} ({step}) ...")
        started = time.time()
        details = {}
        if step not in MAIN_PROCESS_ONLY or state_of_run.is_main_process:
            with torch.no_grad() if step in MAIN_PROCESS_ONLY else torch.enable_grad():
                details = STEP_FUNCTIONS[step](args, work_dir)
        state_of_run.wait_for_everyone()
        if state_of_run.is_main_process:
            seconds = time.time() - started  # the run that completed it (training steps log their own clocks)
            state.record(step, complete=True, seconds=round(seconds, 1), finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
                         **details)
            print(f"step {number} ({step}): complete in {seconds:.0f} s")
        state_of_run.wait_for_everyone()
        state = WorkflowState(work_dir)
    if state.complete("calibrate") and state_of_run.is_main_process:
        write_workflow_record(args, state, argv)
    return state.data


def reuse_step(args, work_dir: Path, state: WorkflowState, step: str) -> bool:
    """``--reuse_from``: hard-link a step that another work folder completed (steps 1-3 do not depend on ``--method``)
    into this one and copy its record; False when the other folder has not completed it."""
    from accelerate import PartialState

    other = WorkflowState(Path(args.reuse_from))
    if not other.complete(step) or other.data["steps"][step].get("skipped"):
        return False
    if PartialState().is_main_process:
        target = work_dir / STEP_FOLDERS[step]
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(Path(args.reuse_from) / STEP_FOLDERS[step], target, copy_function=os.link)
        state.record(step, **other.data["steps"][step], reused_from=str(args.reuse_from))
    PartialState().wait_for_everyone()
    return True


def write_workflow_record(args, state: WorkflowState, argv: Optional[List[str]] = None) -> None:
    """The workflow's command and arguments and every step's record (commands of the training steps, wall times):
    ``adaptation.json`` in the adapted segmenter's (and anchored pipeline's) folder and, when a painter was trained,
    ``<output_dir>/training_info.json`` (read by the model card, ``diffusers_retina.hub.write_adaptdiff_card``)."""
    from diffusers_retina.hub import TRAINING_INFO, read_json, write_json

    argv = sys.argv[1:] if argv is None else argv
    steps = json.loads(json.dumps(state.data["steps"]))
    # the training steps' own clocks (summed over resumed runs): the workflow's "seconds" only counts the run that
    # completed a step
    for step, folder in (("diffusion", "2-diffusion"), ("fine-tune", "4-fine-tune")):
        info = read_json(Path(args.work_dir) / folder / TRAINING_INFO) or {}
        if info.get("training_seconds") is not None:
            steps[step]["training_seconds"] = round(float(info["training_seconds"]), 1)
    record = {"command": "python training/adaptdiff_workflow.py " + " ".join(shlex.quote(a) for a in argv),
              "script": "training/adaptdiff_workflow.py", "method": args.method, "args": vars(args), "steps": steps}
    write_json(Path(args.segmenter_output_dir) / ADAPTATION_RECORD, record)
    if args.anchored_pipeline:
        write_json(Path(args.anchored_output_dir) / ADAPTATION_RECORD, record)
    if args.method != "self-training":
        write_json(Path(args.output_dir) / TRAINING_INFO, record)


if __name__ == "__main__":
    main()
