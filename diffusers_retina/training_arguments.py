"""The command-line flags the accelerate training scripts in ``training/`` share (data, optimisation, checkpoints,
logging and the Hub, in the names of diffusers' ``train_unconditional.py``), and their checks.

Each script builds its own parser and adds these groups to it; every check runs right after ``parse_args``, before
anything is built, and fails through ``parser.error`` naming the flag.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Optional

from .checkpointing import check_resumable
from .training_data import DataArguments, build_datasets, parse_slice_range


def add_data_arguments(parser: argparse.ArgumentParser, default_resolution: int = 64) -> None:
    parser.add_argument("--data_format", type=str, default="folder", choices=["folder", "brats"],
                        help="folder: --train_data_dir holds images/ + masks/; brats: --train_data_dir holds one folder "
                             "per patient with <patient>_<modality>.nii.gz and <patient>_seg.nii.gz (Wolleb et al.'s "
                             "BraTS layout; needs nibabel). With brats, --image_channels is the number of --modalities, "
                             "--num_classes 2 trains the whole tumour, 4 the BraTS labels {0,1,2,4} as classes 0..3, and "
                             "--train_stems / --validation_stems select patient folders.")
    parser.add_argument("--modalities", type=str, default="t1,t1ce,t2,flair",
                        help="brats: comma-separated modality names, in channel order.")
    parser.add_argument("--slice_range", type=str, default=None,
                        help="brats: START,STOP axial slice indices kept in every volume (Python slice; default all).")
    parser.add_argument("--train_data_dir", type=str, default=None, help="Folder with images/ and masks/ sub-folders.")
    parser.add_argument("--dataset_name", type=str, default=None, help="A `datasets` dataset with image/mask columns.")
    parser.add_argument("--dataset_config_name", type=str, default=None)
    parser.add_argument("--dataset_split", type=str, default="train",
                        help="--dataset_name: the split trained on (default: train); --train_stems filters its rows.")
    parser.add_argument("--validation_split", type=str, default=None,
                        help="--dataset_name: a split used for the validation pass (e.g. test); --validation_stems "
                             "filters its rows. Without it, --validation_stems picks rows of --dataset_split.")
    parser.add_argument("--stem_column", type=str, default="name",
                        help="--dataset_name: the column --train_stems / --validation_stems match (default: name, as "
                             "written by training/make_hf_dataset.py).")
    parser.add_argument("--dataset_license", type=str, default=None,
                        help="The training data's licence for training_info.json and the model card (a Hub licence id "
                             "such as cc-by-4.0, or the phrase, e.g. 'CC BY 4.0'). Default: read from the data's "
                             "PROVENANCE.md / LICENSE file or README.md front-matter, or the dataset's metadata.")
    parser.add_argument("--dataset_attribution", type=str, default=None,
                        help="The citation or credit the training data asks for (default: read beside the data).")
    parser.add_argument("--dataset_id", type=str, default=None,
                        help="The dataset's name for the card's `datasets:` metadata (default: from the provenance file, "
                             "the --dataset_name, or the data folder's name).")
    parser.add_argument("--field_of_view_degrees", type=float, default=None,
                        help="The training photographs' field-of-view angle in degrees (CHASE_DB1: 30), recorded with "
                             "the checkpoint: a pipeline call's camera_degrees then matches pixels per degree. Default: "
                             "not recorded.")
    parser.add_argument("--image_column", type=str, default="image")
    parser.add_argument("--mask_column", type=str, default="mask")
    parser.add_argument("--image_dir", type=str, default="images")
    parser.add_argument("--mask_dir", type=str, default="masks")
    parser.add_argument("--image_suffix", type=str, default="")
    parser.add_argument("--mask_suffix", type=str, default="")
    parser.add_argument("--loss_mask_dir", type=str, default=None,
                        help="Sub-folder of masks (same stems as the images) of the pixels the supervised loss counts; "
                             "the rest is left out (e.g. where pseudo-labels are not confident). Default: every pixel.")
    parser.add_argument("--train_stems", type=str, default=None,
                        help="Comma-separated glob patterns of file stems used for training (default: all).")
    parser.add_argument("--validation_stems", type=str, default=None,
                        help="Comma-separated glob patterns of stems used for the validation pass (monitoring only).")
    parser.add_argument("--validation_crop", type=int, default=256,
                        help="Validate on the central crop of this size (0: whole image).")
    parser.add_argument("--num_classes", type=int, default=2, help="2: binary (one mask channel); K: K one-hot channels.")
    parser.add_argument("--image_channels", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=default_resolution, help="Side of the random training patches.")
    parser.add_argument("--patches_per_image", type=int, default=50)
    parser.add_argument("--foreground_fraction", type=float, default=0.5)
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument("--photometric_augmentation", type=float, default=0.0,
                        help="Strength of the random camera-like colour, brightness, contrast, gamma, blur and noise "
                             "changes of every patch (0: none, 1: the documented ranges; see "
                             "diffusers_retina.data.transforms.random_photometric).")
    parser.add_argument("--scale_augmentation", type=str, default=None,
                        help="'low,high': cut patches low..high times the patch size (log-uniform) and resize them, "
                             "so vessels appear at other calibres, as with other cameras and fields of view.")


def add_optimization_arguments(parser: argparse.ArgumentParser, default_learning_rate: float = 1e-3) -> None:
    parser.add_argument("--train_batch_size", type=int, default=8)
    parser.add_argument("--num_epochs", type=int, default=100)
    parser.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_epochs.")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=default_learning_rate)
    parser.add_argument("--lr_scheduler", type=str, default="cosine")
    parser.add_argument("--lr_warmup_steps", type=int, default=100)
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-4)
    parser.add_argument("--adam_epsilon", type=float, default=1e-08)
    parser.add_argument("--use_ema", action="store_true")
    parser.add_argument("--ema_max_decay", type=float, default=0.999)
    parser.add_argument("--ema_inv_gamma", type=float, default=1.0)
    parser.add_argument("--ema_power", type=float, default=3 / 4)
    parser.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--seed", type=int, default=0)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--checkpointing_steps", type=int, default=500)
    parser.add_argument("--checkpoints_total_limit", type=int, default=None)
    parser.add_argument("--resume_from_checkpoint", type=str, default=None,
                        help='A checkpoint folder, or "latest" to continue from the newest one in --output_dir.')
    parser.add_argument("--validation_steps", type=int, default=500)
    parser.add_argument("--save_dtype", type=str, default="float16", choices=["float32", "float16", "bfloat16"],
                        help="dtype of the saved pipeline weights.")
    parser.add_argument("--report_to", type=str, default="tensorboard")
    parser.add_argument("--logging_dir", type=str, default="logs")
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--hub_model_id", type=str, default=None)
    parser.add_argument("--hub_token", type=str, default=None)
    parser.add_argument("--hub_private_repo", action="store_true")


def check_data_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.train_data_dir is None and args.dataset_name is None:
        parser.error("Give --train_data_dir (images/ + masks/ folders) or --dataset_name.")


def check_positive_integers(parser: argparse.ArgumentParser, args: argparse.Namespace, *flags: str,
                            minimum: int = 1) -> None:
    """``parser.error`` naming the first of ``flags`` (``"--name"``) whose value is set and below ``minimum``."""
    for flag in flags:
        value = getattr(args, flag.lstrip("-"), None)
        if value is not None and value < minimum:
            parser.error(f"{flag} must be {'a positive integer' if minimum == 1 else f'>= {minimum}'}, got {value}.")


def check_finite_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *flags: str) -> None:
    """``parser.error`` naming the first of ``flags`` whose value is NaN, infinite or not above zero."""
    for flag in flags:
        value = getattr(args, flag.lstrip("-"), None)
        if value is not None and not (math.isfinite(value) and value > 0):
            parser.error(f"{flag} must be a finite number > 0, got {value}.")


def check_fraction(parser: argparse.ArgumentParser, args: argparse.Namespace, flag: str, upper_open: bool = False
                   ) -> None:
    """``parser.error`` unless the value of ``flag`` lies in [0, 1] ([0, 1) with ``upper_open``)."""
    value = getattr(args, flag.lstrip("-"), None)
    if value is not None and not (0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0):
        parser.error(f"{flag} must lie in [0, 1{')' if upper_open else ']'}, got {value}.")


def check_pipeline_folder(parser: argparse.ArgumentParser, flag: str, folder: Optional[str],
                          component: str = "unet", out_channels: Optional[int] = None) -> None:
    """Up-front check of a saved pipeline that a later step loads (e.g. ``--mask_pipeline``, read only when the
    trained model is saved): a folder with ``model_index.json`` naming ``component``, whose ``config.json`` exists (and
    makes ``out_channels``) and whose weights are safetensors. ``parser.error`` naming ``flag`` otherwise."""
    if folder is None:
        return
    root = Path(folder)
    if not root.is_dir():
        parser.error(f"{flag} {folder}: no such folder (give a folder written by save_pretrained).")
    try:
        index = json.loads((root / "model_index.json").read_text())
    except (OSError, ValueError) as error:
        parser.error(f"{flag} {folder}: cannot read its model_index.json ({error}); give a folder written by "
                     "save_pretrained.")
    if not isinstance(index, dict) or not isinstance(index.get(component), list):
        parser.error(f"{flag} {folder}: its model_index.json has no '{component}' component.")
    try:
        config = json.loads((root / component / "config.json").read_text())
    except (OSError, ValueError) as error:
        parser.error(f"{flag} {folder}: cannot read {component}/config.json ({error}).")
    if not any((root / component).glob("*.safetensors")) and not any((root / component).glob("*.safetensors.*")):
        parser.error(f"{flag} {folder}: {component}/ holds no .safetensors weights.")
    if out_channels is not None and config.get("out_channels") != out_channels:
        parser.error(f"{flag} {folder}: its {component} makes {config.get('out_channels')} channel(s), but this run "
                     f"needs {out_channels} (--num_classes).")


def check_resume_argument(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A named ``--resume_from_checkpoint`` folder must be a complete checkpoint (checked before training starts)."""
    value = getattr(args, "resume_from_checkpoint", None)
    if value and value != "latest":
        try:
            check_resumable(Path(value))
        except ValueError as error:
            parser.error(str(error))


def check_optimization_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every flag of ``add_data_arguments``, ``add_optimization_arguments`` and ``add_output_arguments`` that would
    otherwise fail late (ZeroDivisionError, an untrained model saved, a crash after training) is checked here, before
    anything is built: ``parser.error`` naming the flag. With ``--train_data_dir`` the training images are counted, so a
    batch larger than an epoch is refused too."""
    check_positive_integers(parser, args, "--max_train_steps", "--num_epochs", "--train_batch_size",
                            "--gradient_accumulation_steps", "--checkpointing_steps", "--validation_steps",
                            "--checkpoints_total_limit", "--resolution", "--patches_per_image", "--image_channels")
    check_positive_integers(parser, args, "--num_classes", minimum=2)
    check_positive_integers(parser, args, "--lr_warmup_steps", "--dataloader_num_workers", "--validation_crop",
                            minimum=0)
    check_finite_positive(parser, args, "--learning_rate", "--adam_epsilon")
    for flag in ("--adam_beta1", "--adam_beta2"):
        check_fraction(parser, args, flag, upper_open=True)
    for flag in ("--foreground_fraction", "--ema_max_decay"):
        check_fraction(parser, args, flag)
    weight_decay = getattr(args, "adam_weight_decay", None)
    if weight_decay is not None and not (math.isfinite(weight_decay) and weight_decay >= 0):
        parser.error(f"--adam_weight_decay must be a finite number >= 0, got {weight_decay}.")
    check_resume_argument(parser, args)
    if getattr(args, "train_data_dir", None) is not None and getattr(args, "dataset_name", None) is None:
        train_data_dir = Path(args.train_data_dir)
        if not train_data_dir.is_dir():
            parser.error(f"--train_data_dir {args.train_data_dir}: no such folder.")
        try:
            images = len(build_datasets(DataArguments.from_args(args))[0])
        except Exception as error:  # a pairing problem: the data loaders' message names the file or folder
            parser.error(f"--train_data_dir {args.train_data_dir}: {error}")
        patches = images * args.patches_per_image
        if args.train_batch_size > patches:
            parser.error(f"--train_batch_size {args.train_batch_size} is larger than an epoch: {images} training "
                         f"image(s) x --patches_per_image {args.patches_per_image} = {patches} patches, so no full "
                         "batch could be drawn. Lower --train_batch_size or raise --patches_per_image.")


def check_feature_head_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The flags of ``training/train_feature_head.py``: positive counts, a finite learning rate, integer timesteps,
    block names, and the ``--ddpm`` and ``--train_data_dir`` folders (read before any feature is extracted)."""
    check_positive_integers(parser, args, "--max_train_steps", "--num_labelled", "--crop", "--crops_per_image",
                            "--ensemble_size", "--embed_dim", "--pixels_per_step")
    check_finite_positive(parser, args, "--learning_rate")
    try:
        timesteps = [int(t) for t in args.timesteps.split(",")]
    except ValueError:
        parser.error(f"--timesteps must be comma-separated integers, got {args.timesteps!r}.")
    if not timesteps or any(t < 0 for t in timesteps):
        parser.error(f"--timesteps must be non-negative integers, got {args.timesteps!r}.")
    if not [b for b in args.blocks.split(",") if b.strip()]:
        parser.error(f"--blocks must name at least one block, got {args.blocks!r}.")
    check_pipeline_folder(parser, "--ddpm", args.ddpm)
    if not Path(args.train_data_dir).is_dir():
        parser.error(f"--train_data_dir {args.train_data_dir}: no such folder.")



def resolve_data_format(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check the ``--data_format`` flags and derive what follows from them (call after ``parse_args``, before the
    model is built): with ``brats``, ``args.image_channels`` becomes the number of ``--modalities`` and
    ``--num_classes`` must be 2 (whole tumour) or 4 (BraTS classes). Errors name the flag (``parser.error``).

    Example:
        >>> parser = argparse.ArgumentParser(); add_data_arguments(parser)
        >>> args = parser.parse_args(["--data_format", "brats", "--modalities", "t1ce,flair"])
        >>> resolve_data_format(parser, args); args.image_channels
        2
    """
    if args.data_format != "brats":
        return
    if args.dataset_name is not None:
        parser.error("--data_format brats reads --train_data_dir (patient folders), not --dataset_name.")
    modalities = [name.strip() for name in args.modalities.split(",") if name.strip()]
    if not modalities:
        parser.error(f"--modalities must name at least one modality, got {args.modalities!r}.")
    if args.num_classes not in (2, 4):
        parser.error(f"--data_format brats trains --num_classes 2 (whole tumour) or 4 (BraTS classes), "
                     f"got {args.num_classes}.")
    try:
        parse_slice_range(args.slice_range)
    except ValueError as error:
        parser.error(str(error))
    args.image_channels = len(modalities)