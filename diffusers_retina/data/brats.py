"""BraTS brain-tumour MRI as 2-D axial slices, in the layout used by Wolleb et al. (2022).

Also the NIfTI input / output helpers of ``diffusers-retina segment`` (:func:`nifti_case`, :func:`read_nifti_case`,
:func:`nifti_bytes_like`), which read volumes exactly as the dataset does.

nibabel is an optional dependency (``pip install diffusers-retina[nifti]``); it is imported only when a
:class:`BratsSliceDataset` is created or a NIfTI file is read or written.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
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
            "Reading and writing NIfTI files (BraTS volumes) needs nibabel, which is not installed: "
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
        patients: optional names of the patient folders to use (default: all), e.g. a train / validation split.

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
        patients: Optional[Sequence[str]] = None,
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

        folders = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise DataError(f"The BraTS folder '{self.root}' contains no patient folders.")
        if patients is not None:
            if isinstance(patients, str):
                raise DataError(f"`patients` must be a sequence of folder names, got {patients!r}.")
            missing = sorted(set(patients) - {folder.name for folder in folders})
            if missing:
                raise DataError(f"Patient folders {missing} are not in the BraTS folder '{self.root}'.")
            folders = [folder for folder in folders if folder.name in set(patients)]
            if not folders:
                raise DataError(f"`patients` selects no patient folder of '{self.root}'.")
        self.patients: List[Tuple[str, List[Path], Path]] = []
        self.slices: List[Tuple[int, int]] = []
        for folder in folders:
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


# ------------------------------------------------------------------------------------------------ NIfTI cases
# What ``diffusers-retina segment`` needs to read MRI inputs the way BratsSliceDataset reads training volumes
# (same slicing along the last spatial axis, same per-volume normalisation) and to write outputs on the input's grid.


def is_nifti_file(path: PathLike) -> bool:
    """Whether ``path`` is named like a NIfTI file (``.nii`` or ``.nii.gz``, any case).

    Example:
        >>> is_nifti_file("BraTS_001_flair.nii.gz"), is_nifti_file("eye.png")
        (True, False)
    """
    return _strip_nifti_suffix(Path(path).name.lower()) is not None


def nifti_stem(path: PathLike) -> str:
    """The file name without ``.nii`` / ``.nii.gz`` (``Path.stem`` would keep ``.nii``).

    Example:
        >>> nifti_stem("data/BraTS_001_flair.nii.gz")
        'BraTS_001_flair'
    """
    name = Path(path).name
    stripped = _strip_nifti_suffix(name.lower())
    return name if stripped is None else name[: len(stripped)]


def find_modality_file(folder: PathLike, modality: str) -> Path:
    """The NIfTI file of ``modality`` in a BraTS case folder (the rule :class:`BratsSliceDataset` uses):
    ``<folder>/<folder>_<modality>.nii.gz`` (or ``.nii``), else the one NIfTI file with ``modality`` as a ``_`` token.

    Example:
        >>> find_modality_file("BraTS20_Training_001", "flair")  # doctest: +SKIP
        PosixPath('BraTS20_Training_001/BraTS20_Training_001_flair.nii.gz')
    """
    return _find_volume(Path(folder), modality)


@dataclass
class NiftiCase:
    """One NIfTI input of ``diffusers-retina segment``: one file (2-D slice, 3-D volume or 4-D with the modalities
    last) or several co-registered 2-D / 3-D files, one per modality, stacked as channels in the order given.

    Attributes:
        name: output file prefix (``<name>_mask.nii.gz``, ...).
        sources: the files, in channel order.
        spatial_shape: shape of the outputs: ``(X, Y)`` for a 2-D input, else ``(X, Y, Z)``.
        channels: image channels (modalities).
    """

    name: str
    sources: Tuple[Path, ...]
    spatial_shape: Tuple[int, ...]
    channels: int

    @property
    def label(self) -> str:
        """The input as the user named it (files joined by commas)."""
        return ",".join(str(source) for source in self.sources)


def _common_name(paths: Sequence[Path]) -> str:
    """The shared prefix of the files' stems without trailing separators (``a_t1``, ``a_t2`` -> ``a``)."""
    stems = [nifti_stem(path) for path in paths]
    prefix = os.path.commonprefix(stems).rstrip("_-. ")
    return prefix or stems[0]


def nifti_case(paths: Sequence[PathLike], name: Optional[str] = None) -> NiftiCase:
    """Check one NIfTI input from the file headers alone (nothing is decoded) and describe it.

    Args:
        paths: one file (2-D, 3-D or 4-D ``(X, Y, Z, M)``) or several 2-D / 3-D files of the same shape and affine.
        name: output prefix; default: the file's stem, or the common prefix of several files' stems.

    Raises:
        DataError: naming the file when it is missing, unreadable, of an unsupported rank, or when several files
            differ in shape or affine.

    Example:
        >>> files = ["p/p_t1.nii.gz", "p/p_t1ce.nii.gz", "p/p_t2.nii.gz", "p/p_flair.nii.gz"]
        >>> case = nifti_case(files)  # doctest: +SKIP
        >>> case.name, case.channels  # doctest: +SKIP
        ('p', 4)
    """
    nibabel = _import_nibabel()
    sources = tuple(Path(path) for path in paths)
    if not sources:
        raise DataError("A NIfTI input needs at least one file.")
    headers = []
    for source in sources:
        if not source.is_file():
            raise DataError(f"NIfTI file '{source}' does not exist.")
        try:
            loaded = nibabel.load(str(source))  # reads the header only
        except Exception as exc:
            raise DataError(f"Cannot read NIfTI file '{source}': {exc}") from exc
        headers.append((tuple(int(n) for n in loaded.shape), np.asarray(loaded.affine)))
    shape, affine = headers[0]
    if len(sources) == 1:
        if len(shape) not in (2, 3, 4):
            raise DataError(f"NIfTI file '{sources[0]}' must be 2-D, 3-D or 4-D (modalities last), got shape {shape}.")
        spatial, channels = (shape[:3], shape[3]) if len(shape) == 4 else (shape, 1)
    else:
        for source, (other_shape, other_affine) in zip(sources, headers):
            if len(other_shape) not in (2, 3):
                raise DataError(
                    f"NIfTI file '{source}' has shape {other_shape}; with one file per modality each must be 2-D or "
                    "3-D (give a 4-D file alone to read its modalities from the last axis)."
                )
            if other_shape != shape:
                raise DataError(f"NIfTI file '{source}' has shape {other_shape} but '{sources[0]}' has {shape}.")
            if not np.allclose(other_affine, affine, atol=1e-3):
                raise DataError(f"NIfTI file '{source}' has another affine than '{sources[0]}' (not co-registered).")
        spatial, channels = shape, len(sources)
    return NiftiCase(name=name or _common_name(sources), sources=sources, spatial_shape=spatial, channels=channels)


def read_nifti_case(case: NiftiCase) -> Tuple[np.ndarray, Any]:
    """Decode a :class:`NiftiCase` the way :class:`BratsSliceDataset` reads training volumes.

    Returns ``(volume, reference)``: ``volume`` is ``(X, Y, Z, M)`` float32 in ``[0, 1]`` (each modality clipped to
    its own 0.5 / 99.5 percentiles; a 2-D input has ``Z == 1``), slices are ``volume[:, :, z]``; ``reference`` is the
    first file's nibabel image, whose affine and header the outputs keep.

    Example:
        >>> volume, reference = read_nifti_case(nifti_case(["case.nii.gz"]))  # doctest: +SKIP
        >>> volume.shape  # doctest: +SKIP
        (240, 240, 155, 4)
    """
    nibabel = _import_nibabel()
    channels: List[np.ndarray] = []
    reference = None
    for source in case.sources:
        try:
            loaded = nibabel.load(str(source))
            data = np.asarray(loaded.get_fdata(dtype=np.float32))
        except Exception as exc:
            raise DataError(f"Cannot read NIfTI file '{source}': {exc}") from exc
        reference = reference if reference is not None else loaded
        if data.ndim == 4:  # (X, Y, Z, M): modalities last
            channels.extend(_normalise_volume(data[..., m], f"{source} (modality {m})") for m in range(data.shape[3]))
        else:
            channels.append(_normalise_volume(data.reshape(data.shape[:2] + (-1,)), str(source)))
    return np.stack(channels, axis=-1), reference


def nifti_bytes_like(array: np.ndarray, reference: Any, dtype: Union[str, np.dtype]) -> bytes:
    """A gzipped NIfTI file (``.nii.gz`` content) of ``array`` with ``reference``'s affine and header.

    ``array`` has the reference's spatial shape, optionally with a trailing axis (per-class probabilities); the
    header's dimensions and data type follow ``array`` and ``dtype``, everything else (affine, qform / sform codes,
    voxel sizes, units, description) is the reference's.

    Example:
        >>> data = nifti_bytes_like(np.zeros((240, 240, 155), np.uint8), reference, np.uint8)  # doctest: +SKIP
    """
    import gzip

    nibabel = _import_nibabel()
    header = reference.header.copy()
    image_class = type(reference) if isinstance(reference, nibabel.Nifti1Image) else nibabel.Nifti1Image
    image = image_class(np.asarray(array).astype(dtype), reference.affine, header)
    image.set_data_dtype(dtype)
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)
