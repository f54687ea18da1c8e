"""Segmentation data from the Hugging Face Hub or any ``datasets.Dataset`` with image and mask columns.

:func:`load_hf_dataset` opens a dataset by Hub id, local loading script/folder or a ``save_to_disk`` folder (as
written by ``training/make_hf_dataset.py``); under ``accelerate launch`` the main process loads first (download and
Arrow preparation happen once), the others then read the prepared cache. :func:`select_rows` keeps the rows whose
name matches glob patterns by reading the name column only (no image is decoded).
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch

from .errors import DataError
from .reading import (
    RawSample,
    RawSampleDataset,
    check_same_size,
    image_array_from_numpy,
    image_array_from_pil,
    mask_array_from_numpy,
    mask_array_from_pil,
)


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


class HFSegmentationDataset(RawSampleDataset):
    """A ``datasets`` dataset (loaded by name / path, or already loaded) with an image and a mask column.

    Same item format and checks as :class:`~diffusers_retina.data.FolderPairDataset`:
    ``{"image": float (C, H, W) in [-1, 1], "mask": long (H, W), "name": str}`` (+ ``"fov"`` with ``fov_column``).
    Cells may be PIL images (the ``datasets.Image()`` feature), numpy arrays, tensors or nested lists (``HW``/``HWC``).
    A missing column raises :class:`DataError` naming it; a bad cell raises one naming its row and column.

    Args:
        dataset_or_name: a ``datasets.Dataset`` / ``DatasetDict``, or a name or path for ``datasets.load_dataset``.
        split: the split to load or to pick from a ``DatasetDict`` (ignored for a ``Dataset``).
        image_column, mask_column: column names.
        num_classes: 2 for binary masks (0/1 or 0/255), else the number of classes.
        image_channels: 3 (RGB) or 1 (grey).
        fov_column: optional column with a field-of-view mask.
        name_column: optional column giving each sample's name (default: the row index).
        cache: keep decoded rows in memory (uint8).
        **load_dataset_kwargs: passed to ``datasets.load_dataset`` (e.g. ``data_dir``, ``revision``).

    Example:
        >>> dataset = HFSegmentationDataset("org/retina-vessels", split="train")  # doctest: +SKIP
        >>> from datasets import Dataset, Features, Image
        >>> import PIL.Image
        >>> table = Dataset.from_dict(
        ...     {"image": [PIL.Image.new("RGB", (8, 8))], "mask": [PIL.Image.new("L", (8, 8), 255)]},
        ...     features=Features({"image": Image(), "mask": Image()}),
        ... )
        >>> HFSegmentationDataset(table)[0]["mask"].sum().item()
        64
    """

    def __init__(
        self,
        dataset_or_name: Union[str, os.PathLike, Any],
        split: str = "train",
        image_column: str = "image",
        mask_column: str = "mask",
        num_classes: int = 2,
        image_channels: int = 3,
        fov_column: Optional[str] = None,
        name_column: Optional[str] = None,
        cache: bool = False,
        **load_dataset_kwargs: Any,
    ) -> None:
        if not isinstance(num_classes, int) or not 2 <= num_classes <= 256:
            raise DataError(f"`num_classes` must be an integer in [2, 256], got {num_classes!r}.")
        if not isinstance(image_channels, int) or image_channels < 1:
            raise DataError(f"`image_channels` must be a positive integer, got {image_channels!r}.")
        if isinstance(dataset_or_name, (str, os.PathLike)):
            import datasets  # imported lazily: it is slow to import and only needed here

            self.source = str(dataset_or_name)
            dataset = datasets.load_dataset(self.source, split=split, **load_dataset_kwargs)
        else:
            self.source = type(dataset_or_name).__name__
            dataset = dataset_or_name
        column_names = getattr(dataset, "column_names", None)
        if isinstance(column_names, dict):  # a DatasetDict: pick the split
            if split not in column_names:
                raise DataError(f"`split` {split!r} is not in the dataset; available splits: {list(column_names)}.")
            dataset = dataset[split]
            column_names = dataset.column_names
        if column_names is None or not hasattr(dataset, "__len__"):
            raise DataError(
                f"`dataset_or_name` must be a datasets.Dataset (map-style, with columns), got {type(dataset).__name__}."
            )
        columns = {"image_column": image_column, "mask_column": mask_column}
        if fov_column is not None:
            columns["fov_column"] = fov_column
        if name_column is not None:
            columns["name_column"] = name_column
        for argument, column in columns.items():
            if column not in column_names:
                raise DataError(
                    f"Column '{column}' (`{argument}`) is not in dataset '{self.source}'; columns: {list(column_names)}."
                )
        if len(dataset) == 0:
            raise DataError(f"Dataset '{self.source}' (split {split!r}) is empty.")
        if hasattr(dataset, "select_columns"):  # decode only the columns used
            dataset = dataset.select_columns(list(dict.fromkeys(columns.values())))
        if hasattr(dataset, "with_format"):  # python format: PIL images and lists, whatever was set before
            dataset = dataset.with_format(None)
        self.dataset = dataset
        self.split = split
        self.image_column, self.mask_column = image_column, mask_column
        self.fov_column, self.name_column = fov_column, name_column
        self.num_classes = num_classes
        self.image_channels = image_channels
        self.cache = cache

    def __len__(self) -> int:
        return len(self.dataset)

    def _cell_source(self, index: int, column: str) -> str:
        return f"{self.source}[{index}]['{column}']"

    def _image(self, value: Any, source: str) -> np.ndarray:
        if isinstance(value, PIL.Image.Image):
            return image_array_from_pil(value, self.image_channels, source)
        if value is None:
            raise DataError(f"Image '{source}' is missing (None).")
        return image_array_from_numpy(_as_numpy(value), self.image_channels, source)

    def _mask(self, value: Any, num_classes: int, source: str) -> np.ndarray:
        if isinstance(value, PIL.Image.Image):
            return mask_array_from_pil(value, num_classes, source)
        if value is None:
            raise DataError(f"Mask '{source}' is missing (None).")
        return mask_array_from_numpy(_as_numpy(value), num_classes, source)

    def decode(self, index: int) -> RawSample:
        """Decode and validate row ``index``."""
        row = self.dataset[index]
        image_source = self._cell_source(index, self.image_column)
        mask_source = self._cell_source(index, self.mask_column)
        image = self._image(row[self.image_column], image_source)
        mask = self._mask(row[self.mask_column], self.num_classes, mask_source)
        check_same_size(image, image_source, mask, mask_source)
        fov = None
        if self.fov_column is not None:
            fov_source = self._cell_source(index, self.fov_column)
            fov = self._mask(row[self.fov_column], 2, fov_source).astype(bool)
            check_same_size(image, image_source, fov, fov_source)
        name = str(row[self.name_column]) if self.name_column is not None else str(index)
        return RawSample(image=image, mask=mask, name=name, fov=fov)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(source='{self.source}', split={self.split!r}, rows={len(self)}, "
            f"num_classes={self.num_classes}, image_channels={self.image_channels})"
        )


def is_saved_dataset(path: Union[str, os.PathLike]) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    folder = Path(path).expanduser()
    return folder.is_dir() and ((folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file())


def load_hf_dataset(name_or_path: Union[str, os.PathLike], config_name: Optional[str] = None) -> Any:
    """A ``datasets`` ``Dataset``/``DatasetDict``: a ``save_to_disk`` folder through ``load_from_disk`` (memory-mapped
    Arrow, nothing decoded), anything else through ``load_dataset(name, config_name)``.

    Under ``accelerate launch`` the main process loads first (``PartialState().main_process_first()``), so a Hub
    dataset is downloaded and prepared once and the other processes open the prepared cache.

    Raises:
        DataError: naming ``--dataset_name`` when the dataset cannot be opened.
    """
    import datasets
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    name = str(name_or_path)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    with state.main_process_first():
        try:
            if is_saved_dataset(name):
                return datasets.load_from_disk(str(Path(name).expanduser()))
            return datasets.load_dataset(name, config_name)
        except Exception as error:  # missing dataset, no network, bad config: say which
            raise DataError(f"--dataset_name {name!r} cannot be opened: {type(error).__name__}: {error}") from error


def dataset_splits(dataset: Any) -> List[str]:
    """The split names of a ``DatasetDict`` (``[]`` for a single ``Dataset``)."""
    import datasets

    return list(dataset.keys()) if isinstance(dataset, (datasets.DatasetDict, dict)) else []


def pick_split(dataset: Any, split: str, flag: str = "--dataset_split") -> Any:
    """Split ``split`` of a ``DatasetDict`` (a single ``Dataset`` is its own ``train`` split); an unknown split is a
    DataError naming ``flag`` and the available splits."""
    splits = dataset_splits(dataset)
    if not splits:
        if split != "train":
            raise DataError(f"{flag} {split!r}: the dataset has no splits (it is one table, used as 'train').")
        return dataset
    if split not in splits:
        raise DataError(f"{flag} {split!r} is not a split of the dataset; its splits: {splits}.")
    return dataset[split]


def select_rows(dataset: Any, column: str, patterns: str, flag: str) -> Any:
    """The rows of ``dataset`` whose ``column`` matches any comma-separated glob of ``patterns`` (the folder datasets'
    ``--train_stems`` / ``--validation_stems`` rule), read from that column alone: no image is decoded.

    Raises:
        DataError: naming ``flag`` when the column is missing or no row matches.
    """
    if column not in dataset.column_names:
        raise DataError(f"{flag} selects rows by the '{column}' column (--stem_column), which the dataset does not "
                        f"have; its columns: {list(dataset.column_names)}.")
    globs = [pattern.strip() for pattern in patterns.split(",") if pattern.strip()]
    names = list(dataset[column])  # one Arrow column read; the image columns are not touched
    keep = [index for index, value in enumerate(names) if any(fnmatch.fnmatch(str(value), g) for g in globs)]
    if not keep:
        raise DataError(f"{flag} {patterns!r} matches no row of the '{column}' column (e.g. {names[:3]}).")
    return dataset.select(keep)

