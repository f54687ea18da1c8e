#!/usr/bin/env python
"""AdaptDiff as one resumable command: adapt a vessel segmenter to an unlabelled target modality.

    python training/adaptdiff_workflow.py \\
        --source_data_dir SOURCE --source_mask_dir masks --source_segmenter checkpoints/vessel-segmenter-chase \\
        --target_data_dir TARGET --work_dir runs/adaptdiff

Four steps over ``--work_dir`` (AdaptDiff, Hu et al., MICCAI SASHIMI 2024, arXiv 2410.04648):

1. ``pseudo-labels``: the source segmenter labels every target image (``AdaptDiffPipeline.pseudo_label``'s
   threshold mode: AdaptDiff's argmax), optionally after a simple intensity transform towards the source
   (``--pseudo_label_transform``: AdaptDiff's labels only need to be weak, but they must not be empty). ``--pseudo_label_fp/--pseudo_label_fn`` corrupt them on purpose (weak-label
   studies, ``corrupt_mask``). Written to ``1-pseudo-labels/{images,masks}``.
2. ``diffusion``: a ``ConditionalUNet2DModel`` learns target images given the pseudo-labels with
   ``training/train_mask2image.py`` (AdaptDiff's recipe by default: SPADE in the decoder with instance norm,
   T=300 linear betas, epsilon prediction, L1 loss). Checkpoints in ``2-diffusion``.
3. ``synthesis``: target-style images painted from the source's *real* masks, histogram-matched to target
   images (``AdaptDiffPipeline.__call__``). Written to ``3-synthetic/{images,masks}``, image by image.
4. ``fine-tune``: the source segmenter fine-tuned on the synthetic pairs with ``training/train_segmentation_ensemble.py
   --objective supervised --init_unet`` (BCE + a soft Dice that carries gradient; fresh random patches, flips and
   photometric changes every epoch). The adapted ``AdaptDiffPipeline`` is saved to ``--output_dir``
   (default ``<work_dir>/adapted``).

Every step writes its output beside its final place and moves it in when complete, then records completion (and its
wall time) in ``<work_dir>/workflow.json``. A killed run restarts in the step it stopped in -- the training steps
from their newest complete checkpoint, the synthesis after its last finished image -- and never redoes a finished
step (``--redo`` to force). ``--from_step/--to_step`` run a part. Runs on CPU, one GPU or many
(``accelerate launch --multi_gpu training/adaptdiff_workflow.py ...``: the training steps use every process, the
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
import PIL.Image
import torch

STEPS = ("pseudo-labels", "diffusion", "synthesis", "fine-tune")
STATE_FILE = "workflow.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="AdaptDiff: adapt a vessel segmenter to an unlabelled modality.")
    source = parser.add_argument_group("source (labelled)")
    source.add_argument("--source_data_dir", type=str, required=True, help="Folder with images/ and masks/.")
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
    parser.add_argument("--work_dir", type=str, required=True)
    parser.add_argument("--output_dir", type=str, default=None, help="The adapted pipeline (default <work_dir>/adapted).")
    parser.add_argument("--from_step", type=int, default=1, choices=range(1, 5))
    parser.add_argument("--to_step", type=int, default=4, choices=range(1, 5))
    parser.add_argument("--redo", action="store_true", help="Redo the selected steps even if they are complete.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tile_size", type=int, default=256, help="Windows of the segmenter and the painter.")
    # step 1
    parser.add_argument("--pseudo_label_transform", type=str, default="none",
                        choices=["none", "invert", "histmatch", "invert+histmatch"],
                        help="Move target images towards the source's intensities before the source segmenter labels "
                             "them (none: AdaptDiff as published; see diffusers_retina.data.modality."
                             "to_source_intensities). Choose it on training data: the labels only need to be weak.")
    parser.add_argument("--num_source_references", type=int, default=4,
                        help="Source photographs whose pooled histogram the *histmatch transforms match to.")
    parser.add_argument("--pseudo_labels_from", type=str, default=None,
                        help="Take step 1's labels from this folder's masks/<stem>.png (an earlier run's "
                             "1-pseudo-labels, or weak labels made elsewhere) instead of running the segmenter; "
                             "--pseudo_label_fp/fn still apply.")
    parser.add_argument("--pseudo_label_threshold", type=float, default=0.5)
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
    parser.add_argument("--finetune_steps", type=int, default=600)
    parser.add_argument("--finetune_resolution", type=int, default=128)
    parser.add_argument("--finetune_batch_size", type=int, default=8)
    parser.add_argument("--finetune_learning_rate", type=float, default=3e-4)
    parser.add_argument("--finetune_photometric", type=float, default=0.5,
                        help="--photometric_augmentation of the fine-tuning patches.")
    parser.add_argument("--finetune_args", type=str, default="",
                        help="More flags for training/train_segmentation_ensemble.py, as one quoted string.")
    parser.add_argument("--checkpointing_steps", type=int, default=100)
    parser.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    args = parser.parse_args(argv)

    if args.from_step > args.to_step:
        parser.error(f"--from_step {args.from_step} comes after --to_step {args.to_step}.")
    for flag in ("source_data_dir", "target_data_dir"):
        if not os.path.isdir(getattr(args, flag)):
            parser.error(f"--{flag} {getattr(args, flag)!r} is not a folder.")
    for sub, flag in ((os.path.join(args.source_data_dir, args.source_mask_dir), "--source_mask_dir"),
                      (os.path.join(args.source_data_dir, args.source_image_dir), "--source_image_dir"),
                      (os.path.join(args.target_data_dir, args.target_image_dir), "--target_image_dir")):
        if not os.path.isdir(sub):
            parser.error(f"{flag}: {sub!r} is not a folder.")
    if not os.path.isfile(os.path.join(args.source_segmenter, "config.json")):
        parser.error(f"--source_segmenter {args.source_segmenter!r} has no config.json (a saved UNet2DModel folder).")
    for flag in ("diffusion_steps", "diffusion_resolution", "diffusion_batch_size", "num_train_timesteps",
                 "paint_steps", "images_per_mask", "finetune_steps", "finetune_resolution", "finetune_batch_size",
                 "checkpointing_steps", "tile_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be a positive integer, got {getattr(args, flag)}.")
    if args.pseudo_labels_from and not os.path.isdir(os.path.join(args.pseudo_labels_from, "masks")):
        parser.error(f"--pseudo_labels_from {args.pseudo_labels_from!r} has no masks/ folder.")
    if args.paint_crop < 0:
        parser.error(f"--paint_crop must be >= 0 (0: whole masks), got {args.paint_crop}.")
    if args.num_reference_images < 0 or args.num_source_references < 1:
        parser.error("--num_reference_images must be >= 0 and --num_source_references >= 1.")
    if args.num_reference_images < 0:
        parser.error("--num_reference_images must be >= 0.")
    for flag in ("pseudo_label_threshold", "pseudo_label_fn"):
        if not 0.0 <= getattr(args, flag) <= 1.0:
            parser.error(f"--{flag} must lie in [0, 1], got {getattr(args, flag)}.")
    if not (args.pseudo_label_fp >= 0.0 and np.isfinite(args.pseudo_label_fp)):
        parser.error(f"--pseudo_label_fp must be a finite number >= 0, got {args.pseudo_label_fp}.")
    for flag in ("diffusion_learning_rate", "finetune_learning_rate", "guidance_scale"):
        if not (np.isfinite(getattr(args, flag)) and getattr(args, flag) >= 0):
            parser.error(f"--{flag} must be a finite number >= 0, got {getattr(args, flag)}.")
    args.output_dir = args.output_dir or os.path.join(args.work_dir, "adapted")
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


def _stems(folder: Path, patterns: Optional[str], suffix: str = "") -> Dict[str, Path]:
    """``{stem: path}`` of the image files in ``folder`` whose stem (``suffix`` removed) matches ``patterns``."""
    from fnmatch import fnmatch

    from diffusers_retina.data import SUPPORTED_EXTENSIONS

    found = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in SUPPORTED_EXTENSIONS:
            continue
        stem = path.stem[: -len(suffix)] if suffix and path.stem.endswith(suffix) else path.stem
        if patterns is None or any(fnmatch(stem, p.strip()) for p in patterns.split(",")):
            found[stem] = path
    if not found:
        raise SystemExit(f"No images{'' if patterns is None else f' matching {patterns!r}'} in '{folder}'.")
    return found


def _fresh_folder(path: Path) -> Path:
    """An empty ``<path>.partial`` folder (a leftover of a killed run is removed)."""
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def _move_in(partial: Path, final: Path) -> None:
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)


def _save_png(array: np.ndarray, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    PIL.Image.fromarray(array).save(temporary, format="PNG")
    os.replace(temporary, path)


def _read_unit_image(path: Path) -> np.ndarray:
    from diffusers_retina.data import read_image

    array = read_image(path, 3)
    return array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)


def load_segmenter(path: str):
    from diffusers import UNet2DModel

    return UNet2DModel.from_pretrained(path, use_safetensors=True, torch_dtype=torch.float32).eval()


# ---------------------------------------------------------------------------------------------- steps
def step_pseudo_labels(args, work_dir: Path) -> Dict:
    """Step 1: pseudo-labels of the target images by the source segmenter (optionally corrupted)."""
    from diffusers_retina.data import read_mask
    from diffusers_retina.data.modality import corrupt_mask, field_of_view_mask, to_source_intensities
    from diffusers_retina.image_processing import prepare_images
    from diffusers_retina.pipelines.adaptdiff import pseudo_labels
    from diffusers_retina.pipelines.sampling import segmenter_probabilities

    final = work_dir / "1-pseudo-labels"
    partial = _fresh_folder(final)
    (partial / "images").mkdir()
    (partial / "masks").mkdir()
    segmenter = load_segmenter(args.source_segmenter)
    references = reference_fovs = None
    if "histmatch" in args.pseudo_label_transform:
        sources = _stems(Path(args.source_data_dir) / args.source_image_dir, args.source_stems)
        references = [_read_unit_image(p) for p in list(sources.values())[: args.num_source_references]]
        reference_fovs = [field_of_view_mask(r) for r in references]
    fractions = {}
    for index, (stem, path) in enumerate(_stems(Path(args.target_data_dir) / args.target_image_dir,
                                                args.target_stems).items()):
        image = _read_unit_image(path)
        if args.pseudo_labels_from:
            given = Path(args.pseudo_labels_from) / "masks" / f"{stem}.png"
            if not given.is_file():
                raise SystemExit(f"--pseudo_labels_from: no label {given} for target image {path}.")
            label = (read_mask(given, 2) > 0).astype(np.uint8)
        else:
            labelled = to_source_intensities(image, args.pseudo_label_transform, references, reference_fovs)
            probabilities = segmenter_probabilities(segmenter, prepare_images(labelled, segmenter.config.in_channels),
                                                    args.tile_size)
            label = pseudo_labels(probabilities[0, 0], "threshold",
                                  args.pseudo_label_threshold).numpy().astype(np.uint8)
        if args.pseudo_label_fp or args.pseudo_label_fn:
            label = corrupt_mask(label, args.pseudo_label_fp, args.pseudo_label_fn, seed=args.seed + index,
                                 fov=field_of_view_mask(image))
        _save_png((image * 255).round().astype(np.uint8), partial / "images" / f"{stem}.png")
        _save_png(label * 255, partial / "masks" / f"{stem}.png")
        fractions[stem] = float(label.mean())
    _move_in(partial, final)
    return {"images": len(fractions), "mean_vessel_fraction": float(np.mean(list(fractions.values())))}


def step_diffusion(args, work_dir: Path) -> Dict:
    """Step 2: the conditional diffusion model of target images given pseudo-labels (train_mask2image.py)."""
    import train_mask2image

    output = work_dir / "2-diffusion"
    flags = [
        "--task", "image", "--train_data_dir", str(work_dir / "1-pseudo-labels"), "--image_dir", "images",
        "--mask_dir", "masks", "--output_dir", str(output), "--resolution", str(args.diffusion_resolution),
        "--conditioning", "spade", "--spade_blocks", "decoder", "--spade_norm", "instance",
        "--loss", "l1", "--prediction_type", args.diffusion_prediction_type,
        "--num_train_timesteps", str(args.num_train_timesteps), "--beta_schedule", "linear",
        "--block_out_channels", args.diffusion_block_out_channels,
        "--train_batch_size", str(args.diffusion_batch_size), "--learning_rate", str(args.diffusion_learning_rate),
        "--max_train_steps", str(args.diffusion_steps), "--checkpointing_steps", str(args.checkpointing_steps),
        "--checkpoints_total_limit", "2", "--validation_steps", str(10 * args.diffusion_steps),
        "--mixed_precision", args.mixed_precision, "--seed", str(args.seed), "--report_to", "none",
        "--save_dtype", "float32", "--resume_from_checkpoint", "latest", *shlex.split(args.diffusion_args),
    ]
    train_mask2image.main(flags)
    return {"command": "python training/train_mask2image.py " + " ".join(shlex.quote(f) for f in flags)}


def step_synthesis(args, work_dir: Path) -> Dict:
    """Step 3: target-style images painted from the source's real masks, histogram-matched to target images."""
    from diffusers import DDIMScheduler

    from diffusers_retina import AdaptDiffPipeline, Mask2ImagePipeline
    from diffusers_retina.data import read_mask

    final = work_dir / "3-synthetic"
    partial = final.with_name(final.name + ".partial")  # kept across a kill: finished images are not painted again
    (partial / "images").mkdir(parents=True, exist_ok=True)
    (partial / "masks").mkdir(parents=True, exist_ok=True)
    painter = Mask2ImagePipeline.from_pretrained(str(work_dir / "2-diffusion"), dtype=torch.float32)
    scheduler = DDIMScheduler.from_config(painter.scheduler.config, timestep_spacing="trailing")
    pipe = AdaptDiffPipeline(unet=painter.unet, scheduler=scheduler, segmenter=load_segmenter(args.source_segmenter))
    pipe.set_progress_bar_config(disable=True)
    targets = list(_stems(work_dir / "1-pseudo-labels" / "images", None).values())
    references = [_read_unit_image(p) for p in targets[: args.num_reference_images]] or None
    masks = _stems(Path(args.source_data_dir) / args.source_mask_dir, args.source_stems, args.source_mask_suffix)
    from tqdm.auto import tqdm

    painted = 0
    for index, (stem, path) in enumerate(tqdm(masks.items(), desc="synthesis")):
        whole = read_mask(path, 2)
        for copy in range(args.images_per_mask):
            name = f"{stem}-{copy}.png"
            if (partial / "images" / name).is_file() and (partial / "masks" / name).is_file():
                continue  # painted before a kill
            seed = args.seed * 100_003 + index * 101 + copy
            mask = whole
            if args.paint_crop and min(whole.shape) > args.paint_crop:
                rng = np.random.default_rng(seed)
                top = int(rng.integers(0, whole.shape[0] - args.paint_crop + 1))
                left = int(rng.integers(0, whole.shape[1] - args.paint_crop + 1))
                mask = whole[top: top + args.paint_crop, left: left + args.paint_crop]
            generator = torch.Generator().manual_seed(seed)
            image = pipe(mask, num_inference_steps=args.paint_steps, guidance_scale=args.guidance_scale,
                         reference_images=references, generator=generator, tile_size=args.tile_size,
                         output_type="np").images[0]
            _save_png(((mask > 0) * 255).astype(np.uint8), partial / "masks" / name)
            _save_png((image * 255).round().astype(np.uint8), partial / "images" / name)  # last: marks it done
            painted += 1
    _move_in(partial, final)
    return {"pairs": len(masks) * args.images_per_mask, "painted_this_run": painted}


def step_finetune(args, work_dir: Path) -> Dict:
    """Step 4: fine-tune the source segmenter on the synthetic pairs; save the adapted AdaptDiffPipeline."""
    import train_segmentation_ensemble
    from diffusers import DDIMScheduler

    from diffusers_retina import AdaptDiffPipeline, Mask2ImagePipeline

    output = work_dir / "4-fine-tune"
    flags = [
        "--objective", "supervised", "--init_unet", args.source_segmenter,
        "--train_data_dir", str(work_dir / "3-synthetic"), "--image_dir", "images", "--mask_dir", "masks",
        "--output_dir", str(output), "--resolution", str(args.finetune_resolution),
        "--photometric_augmentation", str(args.finetune_photometric),
        "--train_batch_size", str(args.finetune_batch_size), "--learning_rate", str(args.finetune_learning_rate),
        "--lr_warmup_steps", str(min(50, args.finetune_steps // 10)), "--max_train_steps", str(args.finetune_steps),
        "--checkpointing_steps", str(args.checkpointing_steps), "--checkpoints_total_limit", "2",
        "--mixed_precision", args.mixed_precision, "--seed", str(args.seed), "--report_to", "none",
        "--save_dtype", "float32", "--resume_from_checkpoint", "latest", *shlex.split(args.finetune_args),
    ]
    torch.set_grad_enabled(True)
    train_segmentation_ensemble.main(flags)
    from accelerate import PartialState

    if PartialState().is_main_process:
        painter = Mask2ImagePipeline.from_pretrained(str(work_dir / "2-diffusion"), dtype=torch.float32)
        scheduler = DDIMScheduler.from_config(painter.scheduler.config, timestep_spacing="trailing")
        adapted = AdaptDiffPipeline(unet=painter.unet, scheduler=scheduler, segmenter=load_segmenter(str(output / "unet")))
        adapted.save_pretrained(args.output_dir)  # crash-safe: written beside, swapped in
    return {"command": "python training/train_segmentation_ensemble.py " + " ".join(shlex.quote(f) for f in flags),
            "output_dir": args.output_dir}


STEP_FUNCTIONS = {"pseudo-labels": step_pseudo_labels, "diffusion": step_diffusion, "synthesis": step_synthesis,
                  "fine-tune": step_finetune}
MAIN_PROCESS_ONLY = ("pseudo-labels", "synthesis")


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    from accelerate import PartialState

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the training scripts of steps 2 and 4
    state_of_run = PartialState()
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    state = WorkflowState(work_dir)
    for number, step in enumerate(STEPS, start=1):
        if not args.from_step <= number <= args.to_step:
            continue
        if state.complete(step) and not args.redo:
            print(f"step {number} ({step}): already complete, skipped")
            continue
        if number > 1 and not state.complete(STEPS[number - 2]):
            raise SystemExit(f"step {number} ({step}) needs step {number - 1} ({STEPS[number - 2]}) to be complete "
                             f"in {work_dir}: run it first (--from_step {number - 1}).")
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
    if state.complete("fine-tune") and state_of_run.is_main_process:
        write_workflow_record(args, state, argv)
    return state.data


def write_workflow_record(args, state: WorkflowState, argv: Optional[List[str]] = None) -> None:
    """``<output_dir>/training_info.json``: the workflow's command and arguments and every step's record (commands
    of the training steps, wall times), read by the model card (``diffusers_retina.hub.write_adaptdiff_card``)."""
    from diffusers_retina.hub import TRAINING_INFO, read_json, write_json

    argv = sys.argv[1:] if argv is None else argv
    steps = json.loads(json.dumps(state.data["steps"]))
    # the training steps' own clocks (summed over resumed runs): the workflow's "seconds" only counts the run that
    # completed a step
    for step, folder in (("diffusion", "2-diffusion"), ("fine-tune", "4-fine-tune")):
        info = read_json(Path(args.work_dir) / folder / TRAINING_INFO) or {}
        if info.get("training_seconds") is not None:
            steps[step]["training_seconds"] = round(float(info["training_seconds"]), 1)
    write_json(Path(args.output_dir) / TRAINING_INFO, {
        "command": "python training/adaptdiff_workflow.py " + " ".join(shlex.quote(a) for a in argv),
        "script": "training/adaptdiff_workflow.py", "args": vars(args), "steps": steps,
    })


if __name__ == "__main__":
    main()
