"""The training data of the accelerate scripts: which images (by stem or patient), the datasets they make, the
augmentation options, and the resumable order of batches (a shuffle that depends only on seed and epoch, per-step
noise generators).

The library takes explicit arguments: the data flags arrive as a :class:`DataArguments` (built from the parsed flags
by :meth:`DataArguments.from_args`), never as an ``argparse.Namespace``.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, List, Optional, Tuple, Type, TypeVar, Union

import numpy as np
import torch

from .adaptation import vessel_fraction
from .data import BratsSliceDataset, DataError, FolderPairDataset, HFSegmentationDataset
from .data.hf import load_hf_dataset, pick_split, select_rows
from .data.reading import open_pil
from .image_processing import field_of_view_diameter, field_of_view_mask

T = TypeVar("T")


@dataclass
class DataArguments:
    """Where the training data is and which of it to use: the fields of ``add_data_arguments``' flags.

    ``train_data_dir`` (an image folder with ``image_dir``/``mask_dir``, or BraTS patient folders with
    ``data_format="brats"``) or ``dataset_name`` (a ``datasets`` dataset) is the source; ``train_stems`` and
    ``validation_stems`` are comma-separated glob patterns of image stems (patient folders for BraTS, rows of
    ``stem_column`` for a dataset).

    Example:
        >>> data = DataArguments(train_data_dir="../shared/data/chase_db1", mask_dir="1stHO", mask_suffix="_1stHO",
        ...                      train_stems="Image_0*,Image_10*")
        >>> train, validation = build_datasets(data)  # doctest: +SKIP
    """

    train_data_dir: Optional[str] = None
    dataset_name: Optional[str] = None
    dataset_config_name: Optional[str] = None
    dataset_split: str = "train"
    validation_split: Optional[str] = None
    stem_column: str = "name"
    image_column: str = "image"
    mask_column: str = "mask"
    data_format: str = "folder"
    modalities: str = "t1,t1ce,t2,flair"
    slice_range: Optional[str] = None
    image_dir: str = "images"
    mask_dir: str = "masks"
    image_suffix: str = ""
    mask_suffix: str = ""
    loss_mask_dir: Optional[str] = None
    num_classes: int = 2
    image_channels: int = 3
    train_stems: Optional[str] = None
    validation_stems: Optional[str] = None

    @classmethod
    def from_args(cls, args: Union[argparse.Namespace, "DataArguments"]) -> "DataArguments":
        """The data fields of parsed flags (:func:`arguments_from`)."""
        return arguments_from(cls, args)


def arguments_from(cls: Type[T], args: Any) -> T:
    """The fields of dataclass ``cls`` read from parsed flags ``args``: a field the flags do not define, or leave None,
    keeps its default; an instance of ``cls`` is returned as it is. The scripts own their parsers; the library takes
    these typed, explicit arguments (:class:`DataArguments`, and ``training_utils``' run, optimisation and patch
    arguments)."""
    if isinstance(args, cls):
        return args
    return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)
                  if getattr(args, field.name, None) is not None})


def select_stems(dataset_root: Union[str, Path], patterns: str, image_dir: str = "images",
                 image_suffix: str = "") -> List[str]:
    """Stems of image files under ``dataset_root/image_dir`` (``image_suffix`` removed) that match any of the
    comma-separated glob ``patterns``; a ``ValueError`` naming the folder when none does."""
    folder = Path(dataset_root) / image_dir
    stems = sorted(p.stem[: len(p.stem) - len(image_suffix)] if image_suffix else p.stem
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


def select_brats_patients(root, patterns: Optional[str]):
    """Patient folder names under ``root`` matching any of the comma-separated glob ``patterns`` (None: all)."""
    folders = sorted(p.name for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))
    if patterns is None:
        return folders
    selected = [name for name in folders if any(fnmatch.fnmatch(name, pat.strip()) for pat in patterns.split(","))]
    if not selected:
        raise ValueError(f"No patient folders in {root} match {patterns!r}.")
    return selected


def build_brats_datasets(data: DataArguments) -> Tuple[BratsSliceDataset, Optional[BratsSliceDataset]]:
    """``--data_format brats``: :class:`~diffusers_retina.data.BratsSliceDataset` of the training patients (and of
    the validation patients when ``--validation_stems`` is given)."""
    if data.train_data_dir is None or not Path(data.train_data_dir).is_dir():
        raise ValueError(f"--data_format brats: --train_data_dir {data.train_data_dir!r} is not a folder.")
    common = dict(modalities=tuple(name.strip() for name in data.modalities.split(",") if name.strip()),
                  slice_range=parse_slice_range(data.slice_range), binary=data.num_classes == 2)
    train_patients = select_brats_patients(data.train_data_dir, data.train_stems)
    validation = None
    if data.validation_stems:
        validation_patients = select_brats_patients(data.train_data_dir, data.validation_stems)
        if not data.train_stems:  # by default the validation patients are held out of training
            train_patients = [name for name in train_patients if name not in set(validation_patients)]
        validation = BratsSliceDataset(data.train_data_dir, patients=validation_patients, **common)
    train = BratsSliceDataset(data.train_data_dir, patients=train_patients, **common)
    return train, validation


def build_hf_datasets(data: DataArguments
                      ) -> Tuple[HFSegmentationDataset, Optional[HFSegmentationDataset]]:
    """``--dataset_name``: the training rows (``--dataset_split``, filtered by ``--train_stems``) and the validation
    rows (``--validation_split`` and/or ``--validation_stems``), matched on ``--stem_column`` without decoding an image.

    The dataset is opened once per process (the main process first, so a download or Arrow preparation happens once:
    :func:`diffusers_retina.data.hf.load_hf_dataset`); images are decoded only when the patch dataset reads them.
    Raises a DataError naming the flag for an unknown split, a missing column or patterns matching nothing.
    """
    dataset = load_hf_dataset(data.dataset_name, data.dataset_config_name)
    split = data.dataset_split or "train"
    stem_column = data.stem_column or "name"
    train_rows = pick_split(dataset, split, "--dataset_split")
    if data.train_stems:
        train_rows = select_rows(train_rows, stem_column, data.train_stems, "--train_stems")
    validation_rows = None
    validation_split = data.validation_split
    if validation_split:
        validation_rows = pick_split(dataset, validation_split, "--validation_split")
    if data.validation_stems:
        validation_rows = select_rows(validation_rows if validation_rows is not None else pick_split(dataset, split),
                                      stem_column, data.validation_stems, "--validation_stems")
    name_column = stem_column if stem_column in train_rows.column_names else None
    common = dict(image_column=data.image_column, mask_column=data.mask_column, num_classes=data.num_classes,
                  image_channels=data.image_channels, name_column=name_column)
    train = HFSegmentationDataset(train_rows, split=split, **common)
    train.source = str(data.dataset_name)
    validation = None
    if validation_rows is not None:
        validation = HFSegmentationDataset(validation_rows, split=validation_split or split, **common)
        validation.source = str(data.dataset_name)
    return train, validation


def build_datasets(data: Union[DataArguments, argparse.Namespace]
                   ) -> Tuple[torch.utils.data.Dataset, Optional[torch.utils.data.Dataset]]:
    """The training dataset and the optional validation dataset of ``data`` (an ``argparse.Namespace`` of the data
    flags is accepted too and read through :meth:`DataArguments.from_args`)."""
    data = DataArguments.from_args(data)
    if data.data_format == "brats":
        return build_brats_datasets(data)
    if data.dataset_name is not None:
        return build_hf_datasets(data)
    common = dict(image_dir=data.image_dir, mask_dir=data.mask_dir, image_suffix=data.image_suffix,
                  mask_suffix=data.mask_suffix, num_classes=data.num_classes, image_channels=data.image_channels,
                  fov_dir=data.loss_mask_dir)  # the dataset's field-of-view masks: where the loss counts
    train_stems = (select_stems(data.train_data_dir, data.train_stems, data.image_dir, data.image_suffix)
                   if data.train_stems else None)
    train = FolderPairDataset(data.train_data_dir, stems=train_stems, **common)
    validation = None
    if data.validation_stems:
        validation = FolderPairDataset(data.train_data_dir,
                                       stems=select_stems(data.train_data_dir, data.validation_stems, data.image_dir,
                                                          data.image_suffix), **common)
    return train, validation


def training_field_of_view_diameter(images: Iterable[np.ndarray], limit: int = 64) -> Optional[int]:
    """The median field-of-view diameter, in pixels, of (the first ``limit`` of) the training photographs ``images``
    (``(H, W, 3)`` arrays as the patch datasets hold them): what ``processing_resolution="auto"`` brings every
    photograph to. ``None`` when no photograph has a field of view (crops inside the retina, or not RGB).

    Example:
        >>> disc = np.zeros((40, 40, 3), np.uint8); yy, xx = np.mgrid[:40, :40]
        >>> disc[(yy - 20) ** 2 + (xx - 20) ** 2 < 15 ** 2] = 150
        >>> training_field_of_view_diameter([disc, disc[:, :30]])
        29
    """
    diameters = []
    for image in itertools.islice(images, limit):
        array = np.asarray(image)
        if array.ndim == 3 and array.shape[-1] == 3:
            diameters.append(field_of_view_diameter(array))
    diameters = [value for value in diameters if value is not None]
    return int(np.median(diameters)) if diameters else None


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


def augmentation_options(train_dataset, photometric: float = 0.0, scale_augmentation: Optional[str] = None,
                         prior_maps: Optional[str] = None) -> dict:
    """The ``RandomPatchDataset`` keywords of the augmentation and prior flags (``--photometric_augmentation``,
    ``--scale_augmentation "low,high"``, ``--prior_maps FOLDER``; absent: none)."""
    options = {}
    if photometric:
        options["photometric"] = photometric
    scale_range = parse_scale_range(scale_augmentation)
    if scale_range is not None:
        options["scale_range"] = scale_range
    if prior_maps:
        options["priors"] = load_prior_maps(train_dataset, prior_maps)
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


def training_vessel_fraction(samples: Iterable[Any], limit: int = 64) -> Optional[float]:
    """The mean fraction of the field of view the training masks mark as vessel (over the first ``limit`` samples,
    objects with ``image`` ``(H, W, 3)`` and binary ``mask`` ``(H, W)`` arrays, as the patch datasets hold them):
    what adaptation's label-free transform rule compares a target's pseudo-labels to
    (:func:`diffusers_retina.adaptation.choose_transform`). ``None`` without RGB photographs.

    Example:
        >>> from types import SimpleNamespace
        >>> disc = np.zeros((40, 40, 3), np.uint8); yy, xx = np.mgrid[:40, :40]
        >>> disc[(yy - 20) ** 2 + (xx - 20) ** 2 < 15 ** 2] = 150
        >>> mask = np.zeros((40, 40), np.uint8); mask[20, 10:30] = 1
        >>> round(training_vessel_fraction([SimpleNamespace(image=disc, mask=mask)]), 3)
        0.038
    """
    fractions = []
    for sample in itertools.islice(samples, limit):
        image, mask = np.asarray(sample.image), np.asarray(sample.mask)
        if image.ndim == 3 and image.shape[-1] == 3:
            fractions.append(vessel_fraction(mask, field_of_view_mask(image)))
    return float(np.mean(fractions)) if fractions else None
