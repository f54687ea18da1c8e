"""What the accelerate training scripts in ``training/`` share: common argparse flags (data, optimisation,
checkpoints/logging/Hub, in the names of diffusers' ``train_unconditional.py``), dataset selection, a resumable shuffle,
the wall-time clock saved in checkpoints, checkpoint rotation and resumption, and per-step noise generators.

Each script stays one readable file with its own ``main()`` loop (diffusers' example style); only the plumbing that
must behave identically everywhere -- above all the resume-equals-uninterrupted guarantee -- lives here.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from .data import FolderPairDataset, HFSegmentationDataset
from .pipelines.loading import _fsync_directory  # one fsync helper for checkpoints and pipeline saves


# ------------------------------------------------------------------------------------------------ arguments


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
    parser.add_argument("--image_column", type=str, default="image")
    parser.add_argument("--mask_column", type=str, default="mask")
    parser.add_argument("--image_dir", type=str, default="images")
    parser.add_argument("--mask_dir", type=str, default="masks")
    parser.add_argument("--image_suffix", type=str, default="")
    parser.add_argument("--mask_suffix", type=str, default="")
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
            _check_resumable(Path(value))
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
            images = len(build_datasets(args)[0])
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


# ------------------------------------------------------------------------------------------------ data


def select_stems(dataset_root, args, patterns: str):
    """Stems of image files under ``image_dir`` that match any of the comma-separated glob ``patterns``."""
    folder = Path(dataset_root) / args.image_dir
    stems = sorted(p.stem[: len(p.stem) - len(args.image_suffix)] if args.image_suffix else p.stem
                   for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    selected = [s for s in stems if any(fnmatch.fnmatch(s, pat.strip()) for pat in patterns.split(","))]
    if not selected:
        raise ValueError(f"No image stems in {folder} match {patterns!r}.")
    return selected


def parse_slice_range(text: Optional[str]) -> Optional[Tuple[int, int]]:
    """``--slice_range "START,STOP"`` to ``(start, stop)`` (``None`` stays ``None``).

    Example:
        >>> parse_slice_range("40,120")
        (40, 120)
    """
    if text is None or text == "":
        return None
    parts = [part.strip() for part in str(text).split(",")]
    try:
        start, stop = (int(part) for part in parts)
    except ValueError:
        raise ValueError(f"--slice_range must be START,STOP integers, got {text!r}.") from None
    return start, stop


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


def select_brats_patients(root, patterns: Optional[str]):
    """Patient folder names under ``root`` matching any of the comma-separated glob ``patterns`` (None: all)."""
    folders = sorted(p.name for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))
    if patterns is None:
        return folders
    selected = [name for name in folders if any(fnmatch.fnmatch(name, pat.strip()) for pat in patterns.split(","))]
    if not selected:
        raise ValueError(f"No patient folders in {root} match {patterns!r}.")
    return selected


def build_brats_datasets(args):
    """``--data_format brats``: :class:`~diffusers_retina.data.BratsSliceDataset` of the training patients (and of
    the validation patients when ``--validation_stems`` is given)."""
    from .data import BratsSliceDataset

    if args.train_data_dir is None or not Path(args.train_data_dir).is_dir():
        raise ValueError(f"--data_format brats: --train_data_dir {args.train_data_dir!r} is not a folder.")
    common = dict(modalities=tuple(name.strip() for name in args.modalities.split(",") if name.strip()),
                  slice_range=parse_slice_range(args.slice_range), binary=args.num_classes == 2)
    train_patients = select_brats_patients(args.train_data_dir, args.train_stems)
    validation = None
    if args.validation_stems:
        validation_patients = select_brats_patients(args.train_data_dir, args.validation_stems)
        if not args.train_stems:  # by default the validation patients are held out of training
            train_patients = [name for name in train_patients if name not in set(validation_patients)]
        validation = BratsSliceDataset(args.train_data_dir, patients=validation_patients, **common)
    train = BratsSliceDataset(args.train_data_dir, patients=train_patients, **common)
    return train, validation


def build_hf_datasets(args):
    """``--dataset_name``: the training rows (``--dataset_split``, filtered by ``--train_stems``) and the validation
    rows (``--validation_split`` and/or ``--validation_stems``), matched on ``--stem_column`` without decoding an image.

    The dataset is opened once per process (the main process first, so a download or Arrow preparation happens once:
    :func:`diffusers_retina.data.hf.load_hf_dataset`); images are decoded only when the patch dataset reads them.
    Raises a DataError naming the flag for an unknown split, a missing column or patterns matching nothing.
    """
    from .data.hf import load_hf_dataset, pick_split, select_rows

    dataset = load_hf_dataset(args.dataset_name, getattr(args, "dataset_config_name", None))
    split = getattr(args, "dataset_split", "train") or "train"
    stem_column = getattr(args, "stem_column", "name") or "name"
    train_rows = pick_split(dataset, split, "--dataset_split")
    if args.train_stems:
        train_rows = select_rows(train_rows, stem_column, args.train_stems, "--train_stems")
    validation_rows = None
    validation_split = getattr(args, "validation_split", None)
    if validation_split:
        validation_rows = pick_split(dataset, validation_split, "--validation_split")
    if args.validation_stems:
        validation_rows = select_rows(validation_rows if validation_rows is not None else pick_split(dataset, split),
                                      stem_column, args.validation_stems, "--validation_stems")
    name_column = stem_column if stem_column in train_rows.column_names else None
    common = dict(image_column=args.image_column, mask_column=args.mask_column, num_classes=args.num_classes,
                  image_channels=args.image_channels, name_column=name_column)
    train = HFSegmentationDataset(train_rows, split=split, **common)
    train.source = str(args.dataset_name)
    validation = None
    if validation_rows is not None:
        validation = HFSegmentationDataset(validation_rows, split=validation_split or split, **common)
        validation.source = str(args.dataset_name)
    return train, validation


def build_datasets(args):
    """The training dataset and the optional validation dataset of the data flags (``add_data_arguments``)."""
    if getattr(args, "data_format", "folder") == "brats":
        return build_brats_datasets(args)
    if args.dataset_name is not None:
        return build_hf_datasets(args)
    common = dict(image_dir=args.image_dir, mask_dir=args.mask_dir, image_suffix=args.image_suffix,
                  mask_suffix=args.mask_suffix, num_classes=args.num_classes, image_channels=args.image_channels)
    train_stems = select_stems(args.train_data_dir, args, args.train_stems) if args.train_stems else None
    train = FolderPairDataset(args.train_data_dir, stems=train_stems, **common)
    validation = None
    if args.validation_stems:
        validation = FolderPairDataset(args.train_data_dir,
                                       stems=select_stems(args.train_data_dir, args, args.validation_stems), **common)
    return train, validation


def parse_scale_range(value: Optional[str]) -> Optional[Tuple[float, float]]:
    """``"0.75,1.33"`` -> ``(0.75, 1.33)``; None stays None."""
    if not value:
        return None
    try:
        low, high = (float(v) for v in value.split(","))
    except ValueError:
        raise ValueError(f"--scale_augmentation must be 'low,high' (e.g. 0.75,1.33), got {value!r}.") from None
    if not 0 < low <= high:
        raise ValueError(f"--scale_augmentation must satisfy 0 < low <= high, got {value!r}.")
    return low, high


def load_prior_maps(dataset, folder) -> list:
    """The prior probability maps of ``dataset``'s samples: ``<folder>/<name>.png`` (uint8, 255 = probability 1),
    as written by ``training/make_prior_maps.py``. A missing or mis-sized map is an error naming the file."""
    from .data import DataError
    from .data.reading import open_pil

    maps = []
    for index in range(len(dataset)):
        raw = dataset.load_raw(index)
        path = Path(folder) / f"{raw.name}.png"
        if not path.is_file():
            raise DataError(f"No prior map '{path}' for training image '{raw.name}' (see training/make_prior_maps.py).")
        prior = np.asarray(open_pil(path, "prior map").convert("L"))
        if prior.shape != raw.size:
            raise DataError(f"Prior map '{path}' is {prior.shape[1]}x{prior.shape[0]}, its image "
                            f"{raw.size[1]}x{raw.size[0]}.")
        maps.append(prior)
    return maps


def augmentation_options(args, train_dataset) -> dict:
    """The ``RandomPatchDataset`` keywords of the augmentation and prior flags (absent flags: none)."""
    options = {}
    if getattr(args, "photometric_augmentation", 0.0):
        options["photometric"] = args.photometric_augmentation
    scale_range = parse_scale_range(getattr(args, "scale_augmentation", None))
    if scale_range is not None:
        options["scale_range"] = scale_range
    if getattr(args, "prior_maps", None):
        options["priors"] = load_prior_maps(train_dataset, args.prior_maps)
    return options


def central_crop(tensor: torch.Tensor, size: int) -> torch.Tensor:
    if not size:
        return tensor
    height, width = tensor.shape[-2:]
    top, left = max((height - size) // 2, 0), max((width - size) // 2, 0)
    return tensor[..., top: top + size, left: left + size]


class EpochSampler(torch.utils.data.Sampler):
    """A shuffle that depends only on (seed, epoch), so a resumed run sees the same batches as an uninterrupted one."""

    def __init__(self, length: int, seed: int):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


def sharded_length(num_batches: int, num_processes: int, drop_last: bool = True) -> int:
    """Batches per process once accelerate shards a loader of ``num_batches`` batches over ``num_processes``
    (``BatchSamplerShard``: whole rounds only with ``drop_last``, else one padded round more)."""
    return num_batches // num_processes if drop_last else math.ceil(num_batches / num_processes)


def epoch_dataloader(accelerator, train_dataloader, epoch: int, first_epoch: int, resume_step: int):
    """The loader to iterate in ``epoch``, with the epoch set on every rank's sampler and dataset.

    accelerate's prepared loader re-seeds its sampler from its own iteration counter at every ``__iter__``, and a
    resumed run's counter starts at 0, so the epoch is set on the loader itself. accelerate forwards ``set_epoch`` to
    the dataset only when it finds no sampler with one; once sharded over several processes
    (``BatchSamplerShard``) it finds ours and stops, so the dataset (``RandomPatchDataset``: patches are a function
    of the epoch) is set here, on each rank. In the epoch a run resumes in, the batches already trained are skipped
    (the skipping loader inherits the counter and the same dataset)."""
    train_dataloader.set_epoch(epoch)
    dataset = train_dataloader.dataset
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    if epoch == first_epoch and resume_step:
        return accelerator.skip_first_batches(train_dataloader, resume_step)
    return train_dataloader


def step_generator(seed: int, global_step: int, process_index: int = 0) -> torch.Generator:
    """Noise and timesteps from a generator tied to the step, so a resumed run draws the same ones."""
    return torch.Generator().manual_seed(seed * 1000003 + global_step * 131 + process_index)


# ------------------------------------------------------------------------------------------------ checkpoints


class TrainingClock:
    """Wall time spent training, saved as JSON (``training_clock.json``) inside each checkpoint so resumed runs report
    the total. Never pickled: accelerate's ``register_for_checkpointing`` would store it with ``torch.save`` and read it
    back with ``weights_only=False``, so a tampered checkpoint could run code."""

    FILE_NAME = "training_clock.json"

    def __init__(self):
        self.seconds, self._since = 0.0, time.time()

    def elapsed(self) -> float:
        return self.seconds + time.time() - self._since

    def state_dict(self):
        return {"seconds": self.elapsed()}

    def load_state_dict(self, state):
        seconds = state.get("seconds") if isinstance(state, dict) else None
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
                or seconds < 0:
            raise ValueError(f"The training clock state must hold a finite, non-negative 'seconds', got {state!r}.")
        self.seconds, self._since = float(seconds), time.time()

    def save(self, folder) -> None:
        """Write ``training_clock.json`` into ``folder`` (a checkpoint being written)."""
        (Path(folder) / self.FILE_NAME).write_text(json.dumps(self.state_dict()) + "\n")

    def load(self, folder) -> bool:
        """Read ``training_clock.json`` from ``folder``; False (clock unchanged) when the checkpoint has none."""
        path = Path(folder) / self.FILE_NAME
        if not path.is_file():
            return False
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"Cannot read the training clock {path}: {error}") from None
        try:
            self.load_state_dict(state)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        return True


def register_clock_checkpointing(accelerator, clock: TrainingClock) -> None:
    """Save ``clock`` as JSON in every ``accelerator.save_state`` folder and restore it in ``load_state`` (through
    accelerate's state pre-hooks, instead of ``register_for_checkpointing``, which pickles)."""

    def save_clock(models, weights, output_dir):
        if accelerator.is_main_process:
            clock.save(output_dir)

    def load_clock(models, input_dir):
        clock.load(input_dir)

    accelerator.register_save_state_pre_hook(save_clock)
    accelerator.register_load_state_pre_hook(load_clock)


CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_COMPLETE = "checkpoint_complete.json"  # written last: a folder without it is not a checkpoint to resume
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
_PICKLED_CUSTOM_STATE = re.compile(r"^custom_checkpoint_\d+\.pkl$")


def checkpoint_step(path) -> int:
    """The step of a checkpoint folder named ``checkpoint-<step>``; ``ValueError`` naming the folder otherwise."""
    match = _CHECKPOINT_NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint folder: its name must be 'checkpoint-<step>'.")
    return int(match.group(1))


def is_complete_checkpoint(path) -> bool:
    """A folder named ``checkpoint-<step>`` whose completion marker was written (after ``save_state`` returned)."""
    path = Path(path)
    return _CHECKPOINT_NAME.match(path.name) is not None and path.is_dir() and (path / CHECKPOINT_COMPLETE).is_file()


def complete_checkpoints(output_dir) -> List[Path]:
    """The complete checkpoints in ``output_dir``, oldest first. Folders still being written (``checkpoint-<N>.tmp``),
    interrupted ones (no marker) and other names (``checkpoint-foo``) are not checkpoints."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if is_complete_checkpoint(p)), key=checkpoint_step)


def _check_resumable(path: Path) -> None:
    """Refuse a checkpoint that is incomplete or holds pickled custom objects (``custom_checkpoint_<i>.pkl``, which
    accelerate loads with ``weights_only=False``)."""
    if not path.is_dir():
        raise ValueError(f"--resume_from_checkpoint {path}: no such checkpoint folder.")
    checkpoint_step(path)
    if not (path / CHECKPOINT_COMPLETE).is_file():
        raise ValueError(
            f"--resume_from_checkpoint {path} is not a complete checkpoint (no {CHECKPOINT_COMPLETE}): it was "
            "interrupted while being written, or written before checkpoints were crash-safe. Resume from an older "
            "complete one, or --resume_from_checkpoint latest.")
    pickled = sorted(p.name for p in path.iterdir() if _PICKLED_CUSTOM_STATE.match(p.name))
    if pickled:
        raise ValueError(
            f"--resume_from_checkpoint {path} holds pickled custom state {pickled}: accelerate would load it with "
            "weights_only=False, which can execute arbitrary code. diffusers-retina never writes these files (the "
            "training clock is training_clock.json); delete them if you trust this checkpoint.")


def find_resume_checkpoint(args) -> Optional[str]:
    """The checkpoint ``--resume_from_checkpoint`` names (``latest``: the newest *complete* one in ``--output_dir``),
    or None. Raises ``ValueError`` for a named checkpoint that is missing, incomplete or holds pickled state."""
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint != "latest":
        path = Path(args.resume_from_checkpoint)
        _check_resumable(path)
        return str(path)
    found = complete_checkpoints(args.output_dir)
    if not found:
        return None
    _check_resumable(found[-1])
    return str(found[-1])


def resume_position(path: str, num_update_steps_per_epoch: int, gradient_accumulation_steps: int
                    ) -> Tuple[int, int, int]:
    """``(global_step, first_epoch, batches to skip in that epoch)`` after loading checkpoint ``path``."""
    global_step = checkpoint_step(path)
    first_epoch = global_step // num_update_steps_per_epoch
    resume_step = (global_step % num_update_steps_per_epoch) * gradient_accumulation_steps
    return global_step, first_epoch, resume_step


def _remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder, its completion marker first, so a kill halfway never leaves a "complete" remnant."""
    marker = path / CHECKPOINT_COMPLETE
    if marker.exists():
        marker.unlink()
    shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(accelerator, args, global_step: int) -> str:
    """Crash-safe ``accelerator.save_state``: write ``checkpoint-<step>.tmp``, add the completion marker, rename it to
    ``checkpoint-<step>``, and only then delete the oldest complete checkpoints beyond ``--checkpoints_total_limit``
    (and leftovers of interrupted writes). A kill at any point leaves the previous complete checkpoint resumable.
    Returns the checkpoint folder."""
    output_dir = Path(args.output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{global_step}"
    temporary = output_dir / f"{final.name}.tmp"
    if temporary.exists():  # a leftover of an interrupted write of the same step
        shutil.rmtree(temporary)
    accelerator.save_state(str(temporary))
    files = sorted(p.relative_to(temporary).as_posix() for p in temporary.rglob("*") if p.is_file())
    with open(temporary / CHECKPOINT_COMPLETE, "w") as handle:
        json.dump({"step": global_step, "files": files}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_directory(temporary)
    if final.exists():  # e.g. a run resumed from an earlier step writes this step again
        stale = output_dir / f"{final.name}.old"
        if stale.exists():
            shutil.rmtree(stale)
        os.replace(final, stale)
        os.replace(temporary, final)
        _remove_checkpoint(stale)
    else:
        os.replace(temporary, final)
    _fsync_directory(output_dir)

    if args.checkpoints_total_limit is not None:
        complete = complete_checkpoints(output_dir)
        for old in complete[: max(len(complete) - args.checkpoints_total_limit, 0)]:
            if old != final:
                _remove_checkpoint(old)
    for leftover in output_dir.glob(f"{CHECKPOINT_PREFIX}*.tmp"):  # interrupted writes of other steps
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
    return str(final)


def push_folder(args, folder: str) -> None:
    """Upload a saved pipeline folder with ``--push_to_hub``: the allow-list of ``diffusers-retina push``
    (:func:`diffusers_retina.push.files_to_push`: weights, configs, shims with the self-contained code bundle, card,
    records, small PNGs; never the ``checkpoint-*`` training states, optimizer states, pickles or logs) to
    ``--hub_model_id`` (as resolved by
    :func:`create_hub_repo` at the start of training)."""
    from .push import push_checkpoint

    push_checkpoint(folder, args.hub_model_id or Path(folder).name, token=args.hub_token,
                    private=args.hub_private_repo)


def create_hub_repo(args) -> Optional[str]:
    """With ``--push_to_hub``, create (or reuse) the Hub repo before training, so a missing login, a network failure
    or a name clash fails in the first seconds rather than after hours; ``args.hub_model_id`` becomes the full repo id
    (``user/name``), which the model card and the final upload then use. Main process only; None without
    ``--push_to_hub``."""
    if not getattr(args, "push_to_hub", False):
        return None
    from .push import create_repo

    repo_id = args.hub_model_id or Path(args.output_dir).name
    try:
        args.hub_model_id = create_repo(repo_id, token=args.hub_token, private=args.hub_private_repo)
    except Exception as error:
        raise RuntimeError(f"--push_to_hub: could not create the Hub repo {repo_id!r} (log in with "
                           f"`huggingface-cli login` or pass --hub_token; HF_HUB_OFFLINE must be unset): "
                           f"{type(error).__name__}: {error}") from error
    return args.hub_model_id


# ------------------------------------------------------------------------------------------------ set-up


def make_accelerator(args):
    """The ``Accelerator`` of the flags, logging, the seed (set before the model is built, so its initial weights
    depend only on ``--seed``), the output folder and, with ``--push_to_hub``, the Hub repo (:func:`create_hub_repo`)."""
    import logging

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to in ("none", "") else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        create_hub_repo(args)  # --push_to_hub: fail now, not after training
    return accelerator


@dataclass
class TrainingState:
    """Everything ``prepare_training`` sets up; the scripts' loops read it."""

    model: torch.nn.Module
    ema_model: Optional[object]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    train_dataloader: torch.utils.data.DataLoader
    validation_dataset: Optional[torch.utils.data.Dataset]
    clock: TrainingClock
    num_epochs: int
    global_step: int = 0
    first_epoch: int = 0
    resume_step: int = 0


def prepare_training(accelerator, args, model, logger, project_name: str) -> TrainingState:
    """EMA (saved inside accelerate's checkpoints), the training clock, random patches of the training data in a
    resumable order, AdamW with the learning-rate schedule, ``accelerator.prepare``, trackers, and resumption from
    ``--resume_from_checkpoint``."""
    import math

    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from .data import RandomPatchDataset

    model_cls = type(model)
    ema_model = None
    if args.use_ema:
        ema_model = EMAModel(model.parameters(), decay=args.ema_max_decay, use_ema_warmup=True,
                             inv_gamma=args.ema_inv_gamma, power=args.ema_power, model_cls=model_cls,
                             model_config=model.config)

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process and ema_model is not None:
            ema_model.save_pretrained(os.path.join(output_dir, "unet_ema"))

    def load_model_hook(models, input_dir):
        if ema_model is not None:
            loaded = EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), model_cls)
            ema_model.load_state_dict(loaded.state_dict())
            del loaded

    clock = TrainingClock()
    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
    register_clock_checkpointing(accelerator, clock)  # JSON in the checkpoint, never pickled

    train_dataset, validation_dataset = build_datasets(args)
    patches = RandomPatchDataset(train_dataset, patch_size=args.resolution, patches_per_image=args.patches_per_image,
                                 foreground_fraction=args.foreground_fraction, augment=True, seed=args.seed,
                                 **augmentation_options(args, train_dataset))
    train_dataloader = torch.utils.data.DataLoader(patches, batch_size=args.train_batch_size,
                                                   sampler=EpochSampler(len(patches), args.seed),
                                                   num_workers=args.dataloader_num_workers, drop_last=True)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    # The schedule is built before `prepare` (as in diffusers' examples) from the per-process loader length that
    # sharding will give; the prepared scheduler steps once per process, hence the factor num_processes.
    max_train_steps_given = args.max_train_steps is not None
    if not max_train_steps_given:
        sharded_batches = sharded_length(len(train_dataloader), accelerator.num_processes, drop_last=True)
        args.max_train_steps = args.num_epochs * math.ceil(sharded_batches / args.gradient_accumulation_steps)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)

    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(model, optimizer, train_dataloader,
                                                                           lr_scheduler)
    # Step and epoch accounting from the prepared (per-process) loader: with N processes an epoch is N times shorter.
    if len(train_dataloader) == 0:
        raise ValueError(f"{len(patches)} patches per epoch make no full batch of --train_batch_size "
                         f"{args.train_batch_size} on each of {accelerator.num_processes} processes: raise "
                         "--patches_per_image or lower --train_batch_size.")
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if not max_train_steps_given and args.max_train_steps != args.num_epochs * num_update_steps_per_epoch:
        logger.warning(f"The prepared loader has {len(train_dataloader)} batches per process, not the expected "
                       f"{sharded_batches}: --max_train_steps follows the prepared loader.")
        args.max_train_steps = args.num_epochs * num_update_steps_per_epoch
    num_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)
    if ema_model is not None:
        ema_model.to(accelerator.device)
    if accelerator.is_main_process and accelerator.log_with:
        accelerator.init_trackers(project_name, config={
            k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"***** Running training ({project_name}) *****")
    logger.info(f"  Patches per epoch = {len(patches)}  |  Epochs = {num_epochs}  |  Total batch = {total_batch_size}")
    logger.info(f"  Processes = {accelerator.num_processes} ({accelerator.distributed_type.value})  |  "
                f"Batches per process per epoch = {len(train_dataloader)}")
    logger.info(f"  Optimisation steps = {args.max_train_steps}  |  "
                f"Parameters = {sum(p.numel() for p in model.parameters()):,}")

    state = TrainingState(model=model, ema_model=ema_model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                          train_dataloader=train_dataloader, validation_dataset=validation_dataset, clock=clock,
                          num_epochs=num_epochs)
    path = find_resume_checkpoint(args)
    if args.resume_from_checkpoint and path is None:
        logger.info("No checkpoint found in --output_dir: starting a new run.")
    elif path is not None:
        logger.info(f"Resuming from {path}")
        accelerator.load_state(path)
        state.global_step, state.first_epoch, state.resume_step = resume_position(
            path, num_update_steps_per_epoch, args.gradient_accumulation_steps)
    return state


@contextmanager
def ema_weights(accelerator, model, ema_model):
    """The unwrapped model in eval mode with the EMA weights (if any), restored to the training weights after."""
    unwrapped = accelerator.unwrap_model(model)
    if ema_model is not None:
        ema_model.store(unwrapped.parameters())
        ema_model.copy_to(unwrapped.parameters())
    unwrapped.eval()
    try:
        yield unwrapped
    finally:
        if ema_model is not None:
            ema_model.restore(unwrapped.parameters())
        unwrapped.train()


def final_weights(accelerator, model, ema_model, save_dtype: str):
    """The unwrapped model with its EMA weights (if any), cast to ``--save_dtype``, for saving."""
    unwrapped = accelerator.unwrap_model(model)
    if ema_model is not None:
        ema_model.copy_to(unwrapped.parameters())
    return unwrapped.to(getattr(torch, save_dtype))


def launch_record(args) -> dict:
    """How this run was launched, read from the environment the launcher set and from accelerate's ``PartialState``:
    ``launcher`` ("python", "accelerate launch" or "torchrun"), ``distributed_type``, ``num_processes`` (world size),
    ``num_machines``, the per-process batch, gradient accumulation and the global batch of one optimisation step."""
    from accelerate import PartialState

    state = PartialState()
    if "ACCELERATE_DYNAMO_BACKEND" in os.environ:  # set by every `accelerate launch` launcher, by nothing else
        launcher = "accelerate launch"
    elif "TORCHELASTIC_RUN_ID" in os.environ:
        launcher = "torchrun"
    else:
        launcher = "python"
    world_size = state.num_processes
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    # scripts without batches of patches (train_feature_head.py) record no batch figures
    batch = getattr(args, "train_batch_size", None)
    accumulation = getattr(args, "gradient_accumulation_steps", 1)
    return {
        "launcher": launcher,
        "distributed_type": str(state.distributed_type.value),
        "num_processes": world_size,
        "num_machines": max(world_size // max(local_world_size, 1), 1),
        "train_batch_size_per_process": batch,
        "gradient_accumulation_steps": accumulation,
        "total_batch_size": None if batch is None else batch * world_size * accumulation,
    }


def launch_command(launch: dict, script: str) -> list:
    """The command line before the script's own arguments that reproduces ``launch`` (``launch_record``); on several
    machines the per-machine flags are left as ``<placeholders>``."""
    if launch["launcher"] == "python":
        return ["python", script]
    num_processes, num_machines = launch["num_processes"], launch["num_machines"]
    if launch["launcher"] == "torchrun":
        nodes = ["--nnodes", str(num_machines), "--node_rank", "<rank>", "--master_addr", "<ip>"] if num_machines > 1 \
            else []
        return ["torchrun", *nodes, "--nproc_per_node", str(num_processes // num_machines), script]
    if num_processes == 1:
        return ["accelerate", "launch", script]
    prefix = ["ACCELERATE_USE_CPU=1"] if launch["distributed_type"] == "MULTI_CPU" else []
    nodes = ["--num_machines", str(num_machines), "--machine_rank", "<rank>", "--main_process_ip", "<ip>"] \
        if num_machines > 1 else []
    return [*prefix, "accelerate", "launch", "--multi_gpu", *nodes, "--num_processes", str(num_processes), script]


def write_training_record(args, script: str, global_step: int, seconds: float, model, argv=None, **extra) -> None:
    """``training_info.json`` beside the saved pipeline: arguments, the data's provenance (``"dataset"``: name,
    licence, attribution and the images used, see :func:`diffusers_retina.hub.dataset_provenance`), the exact command
    (``argv``: the arguments given to ``main``, default the process's), steps, time, size, extras."""
    import sys

    from .hub import TRAINING_INFO, command_line, dataset_provenance, write_json

    launch = launch_record(args)
    arguments = {k: v for k, v in vars(args).items() if k != "hub_token"}
    write_json(os.path.join(args.output_dir, TRAINING_INFO), {
        "args": arguments,
        # the data's name, licence and attribution from its provenance files or metadata (the cards are built on it)
        "dataset": dataset_provenance(arguments),
        "command": command_line(launch_command(launch, script) + list(sys.argv[1:] if argv is None else argv)),
        "launch": launch,
        "global_step": global_step,
        "training_seconds": seconds,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        **extra,
    })
