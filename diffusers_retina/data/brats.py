"""BraTS brain-tumour MRI as 2-D axial slices, in the layout used by Wolleb et al. (2022).

nibabel is an optional dependency (``pip install diffusers-retina[nifti]``); it is imported only when a
:class:`BratsSliceDataset` is created.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import DataError
from .reading import RawSample, RawSampleDataset

PathLike = Union[str, os.PathLike]

#: BraTS labels (1 necrotic core, 2 oedema, 4 enhancing tumour; BraTS 2023 writes 3 for 4) -> class indices.
BRATS_LABEL_TO_CLASS: Dict[int, int] = {0: 0, 1: 1, 2: 2, 3: 3, 4: 3}
_NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _import_nibabel() -> Any:
    try:
        import nibabel
    except ImportError as exc:
        raise ImportError(
            "BratsSliceDataset reads NIfTI files with nibabel, which is not installed: "
            "pip install diffusers-retina[nifti]"
        ) from exc
    return nibabel


def _strip_nifti_suffix(name: str) -> Optional[str]:
    for suffix in _NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _find_volume(folder: Path, kind: str) -> Path:
    """``<folder>/<folder>_<kind>.nii.gz`` (or ``.nii``), else the one NIfTI file with ``kind`` as a ``_`` token."""
    for suffix in _NIFTI_SUFFIXES:
        exact = folder / f"{folder.name}_{kind}{suffix}"
        if exact.is_file():
            return exact
    matches = [
        path
        for path in sorted(folder.iterdir())
        if path.is_file() and kind in (_strip_nifti_suffix(path.name) or "").split("_")
    ]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise DataError(f"Missing '{folder / f'{folder.name}_{kind}.nii.gz'}' (no NIfTI file for '{kind}').")
    raise DataError(f"Several NIfTI files for '{kind}' in '{folder}': {[m.name for m in matches]}.")


def _normalise_volume(volume: np.ndarray, source: str) -> np.ndarray:
    """Clip to the volume's 0.5 / 99.5 percentiles and scale to ``[0, 1]`` (``[-1, 1]`` after ``prepare_images``)."""
    if not np.isfinite(volume).all():
        raise DataError(f"Volume '{source}' contains NaN or infinite values.")
    low, high = np.percentile(volume, [0.5, 99.5])
    if high <= low:  # constant volume
        return np.zeros_like(volume, dtype=np.float32)
    return ((np.clip(volume, low, high) - low) / (high - low)).astype(np.float32)


class BratsSliceDataset(RawSampleDataset):
    """2-D axial slices of BraTS MRI volumes with their tumour masks.

    Layout (Wolleb et al.): one folder per patient holding ``<patient>_<modality>.nii.gz`` for each modality and
    ``<patient>_seg.nii.gz``. Files named otherwise are found when exactly one NIfTI file in the folder has the
    modality as a ``_``-separated token (so per-slice files like ``brats_train_001_t1_123_w.nii.gz`` work too;
    2-D files count as one slice).

    Each volume is clipped to its own 0.5 / 99.5 percentiles and scaled to ``[-1, 1]``; the modalities are stacked
    as channels. Items are slices along the last axis: ``{"image": float (M, H, W), "mask": long (H, W),
    "name": "<patient>_<slice:03d>"}``. ``binary=True``: mask = seg > 0 (``num_classes == 2``); ``binary=False``:
    BraTS labels {0, 1, 2, 4} map to classes {0, 1, 2, 3} (``num_classes == 4``).

    Volumes are read lazily; the last ``cache_volumes`` patients are kept in memory (float32), so iterate in order
    (``shuffle=False``) or wrap in :class:`~diffusers_retina.data.RandomPatchDataset` for random access.

    Args:
        root: folder of patient folders.
        modalities: modality names, in channel order.
        slice_range: optional ``(start, stop)`` of slice indices to keep in every volume (Python slice semantics).
        binary: whole-tumour binary masks, or the 4 BraTS classes.
        cache_volumes: number of patients kept decoded in memory.

    Example:
        >>> slices = BratsSliceDataset("brats/training", slice_range=(40, 120))  # doctest: +SKIP
        >>> item = slices[0]  # doctest: +SKIP
        >>> item["image"].shape, item["mask"].shape  # doctest: +SKIP
        (torch.Size([4, 240, 240]), torch.Size([240, 240]))
    """

    def __init__(
        self,
        root: PathLike,
        modalities: Sequence[str] = ("t1", "t1ce", "t2", "flair"),
        slice_range: Optional[Tuple[int, int]] = None,
        binary: bool = True,
        cache_volumes: int = 2,
    ) -> None:
        self._nibabel = _import_nibabel()
        self.root = Path(root)
        if isinstance(modalities, str) or not modalities:
            raise DataError(f"`modalities` must be a non-empty sequence of names, got {modalities!r}.")
        if slice_range is not None and (
            len(tuple(slice_range)) != 2 or not all(isinstance(v, int) for v in slice_range)
        ):
            raise DataError(f"`slice_range` must be (start, stop) integers, got {slice_range!r}.")
        if not self.root.is_dir():
            raise DataError(f"The BraTS folder '{self.root}' does not exist.")
        self.modalities = tuple(modalities)
        self.binary = binary
        self.num_classes = 2 if binary else 4
        self.image_channels = len(self.modalities)
        self.cache_volumes = max(1, int(cache_volumes))
        self._volumes: "OrderedDict[int, Tuple[np.ndarray, np.ndarray]]" = OrderedDict()

        patients = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not patients:
            raise DataError(f"The BraTS folder '{self.root}' contains no patient folders.")
        self.patients: List[Tuple[str, List[Path], Path]] = []
        self.slices: List[Tuple[int, int]] = []
        for folder in patients:
            volumes = [_find_volume(folder, modality) for modality in self.modalities]
            segmentation = _find_volume(folder, "seg")
            shapes = {path: self._shape(path) for path in volumes + [segmentation]}
            reference = volumes[0]
            for path, shape in shapes.items():
                if shape != shapes[reference]:
                    raise DataError(f"Volume '{path}' has shape {shape} but '{reference}' has {shapes[reference]}.")
            depth = shapes[reference][2]
            start, stop, _ = slice(*(slice_range or (None, None))).indices(depth)
            patient_index = len(self.patients)
            self.patients.append((folder.name, volumes, segmentation))
            self.slices.extend((patient_index, z) for z in range(start, stop))
        if not self.slices:
            raise DataError(f"`slice_range` {slice_range!r} selects no slice of the volumes in '{self.root}'.")

    def _shape(self, path: Path) -> Tuple[int, int, int]:
        try:
            shape = tuple(self._nibabel.load(str(path)).shape)  # reads the header only
        except Exception as exc:
            raise DataError(f"Cannot read NIfTI file '{path}': {exc}") from exc
        if len(shape) == 2:
            shape = shape + (1,)
        if len(shape) != 3:
            raise DataError(f"Volume '{path}' must be 2-D or 3-D, got shape {shape}.")
        return shape  # type: ignore[return-value]

    def _read(self, path: Path) -> np.ndarray:
        try:
            data = np.asarray(self._nibabel.load(str(path)).get_fdata(dtype=np.float32))
        except Exception as exc:
            raise DataError(f"Cannot read NIfTI file '{path}': {exc}") from exc
        return data.reshape(data.shape[:2] + (-1,))

    def _labels(self, segmentation: np.ndarray, source: str) -> np.ndarray:
        if not np.isfinite(segmentation).all() or not (segmentation == np.round(segmentation)).all():
            raise DataError(f"Segmentation '{source}' has non-integer values.")
        values = set(np.unique(segmentation).astype(np.int64).tolist())
        unknown = sorted(values - set(BRATS_LABEL_TO_CLASS))
        if unknown:
            raise DataError(f"Segmentation '{source}' has labels {unknown} outside the BraTS labels {{0, 1, 2, 4}}.")
        if self.binary:
            return (segmentation > 0).astype(np.uint8)
        lookup = np.zeros(max(BRATS_LABEL_TO_CLASS) + 1, dtype=np.uint8)
        for label, index in BRATS_LABEL_TO_CLASS.items():
            lookup[label] = index
        return lookup[segmentation.astype(np.int64)]

    def _patient(self, patient_index: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(image (X, Y, Z, M) float32 in [0, 1], mask (X, Y, Z) uint8)`` of one patient, via a small LRU cache."""
        if patient_index in self._volumes:
            self._volumes.move_to_end(patient_index)
            return self._volumes[patient_index]
        _, volumes, segmentation = self.patients[patient_index]
        image = np.stack([_normalise_volume(self._read(path), str(path)) for path in volumes], axis=-1)
        mask = self._labels(self._read(segmentation), str(segmentation))
        self._volumes[patient_index] = (image, mask)
        while len(self._volumes) > self.cache_volumes:
            self._volumes.popitem(last=False)
        return image, mask

    def __len__(self) -> int:
        return len(self.slices)

    def decode(self, index: int) -> RawSample:
        """Slice ``index`` as a :class:`RawSample` (image ``(H, W, M)`` float32 in ``[0, 1]``, mask uint8)."""
        patient_index, z = self.slices[index]
        image, mask = self._patient(patient_index)
        name = f"{self.patients[patient_index][0]}_{z:03d}"
        return RawSample(image=image[:, :, z].copy(), mask=mask[:, :, z].copy(), name=name)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root='{self.root}', patients={len(self.patients)}, slices={len(self)}, "
            f"modalities={self.modalities}, binary={self.binary})"
        )
