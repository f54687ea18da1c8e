"""Image / mask pairs stored as files in folders, and the CHASE_DB1 retinal vessel dataset.

CHASE_DB1 (Fraz et al., IEEE TBME 59(9):2538-2548, 2012; https://researchdata.kingston.ac.uk/96/) is licensed
CC BY 4.0. It is never copied into this repository: :func:`chase_db1` reads it from ``../shared/data/chase_db1``
next to the repository, or from the folder named by the ``DIFFUSERS_RETINA_DATA`` environment variable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union


from .errors import DataError
from .reading import SUPPORTED_EXTENSIONS, RawSample, RawSampleDataset, check_same_size, read_image, read_mask

PathLike = Union[str, os.PathLike]

#: CHASE_DB1 split used in the literature: the first 20 images train, the last 8 test.
CHASE_DB1_TRAIN: Tuple[str, ...] = tuple(f"Image_{i:02d}{eye}" for i in range(1, 11) for eye in "LR")
CHASE_DB1_TEST: Tuple[str, ...] = tuple(f"Image_{i:02d}{eye}" for i in range(11, 15) for eye in "LR")
CHASE_DB1_OBSERVERS: Tuple[str, ...] = ("1stHO", "2ndHO")


def _normalise_extensions(extensions: Optional[Sequence[str]], argument: str) -> Tuple[str, ...]:
    if extensions is None:
        return SUPPORTED_EXTENSIONS
    if isinstance(extensions, str):
        extensions = (extensions,)
    normalised = tuple("." + ext.lower().lstrip(".") for ext in extensions)
    unknown = [ext for ext in normalised if ext not in SUPPORTED_EXTENSIONS]
    if unknown or not normalised:
        raise DataError(f"`{argument}` has unsupported extensions {unknown}; supported: {list(SUPPORTED_EXTENSIONS)}.")
    return normalised


def _index_folder(
    folder: Path, suffix: str, extensions: Tuple[str, ...], role: str
) -> Tuple[Dict[str, Path], Dict[str, List[Path]]]:
    """Map ``stem minus suffix`` to the file for every supported file of ``folder`` whose stem ends with ``suffix``.

    Also returns the stems shared by several files (e.g. ``a.png`` and ``a.npy``): an error only if such a stem is used.
    """
    if not folder.is_dir():
        raise DataError(f"The {role} folder '{folder}' does not exist.")
    files = sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in extensions
    )
    if not files:
        raise DataError(f"The {role} folder '{folder}' is empty (no {'/'.join(e[1:] for e in extensions)} files).")
    table: Dict[str, Path] = {}
    duplicates: Dict[str, List[Path]] = {}
    for path in files:
        stem = path.stem
        if suffix:
            if not stem.endswith(suffix) or stem == suffix:
                continue
            stem = stem[: -len(suffix)]
        if stem in table:
            duplicates.setdefault(stem, [table[stem]]).append(path)
        table[stem] = path
    if not table:
        raise DataError(f"No {role} file in '{folder}' has a name ending with the suffix '{suffix}'.")
    return table, duplicates


def _check_unique(stem: str, duplicates: Dict[str, List[Path]], role: str) -> None:
    if stem in duplicates:
        names = ", ".join(f"'{path}'" for path in duplicates[stem])
        raise DataError(f"Several {role} files have the stem '{stem}': {names}; restrict the extensions read.")


class FolderPairDataset(RawSampleDataset):
    """Images and masks in two folders, paired by file stem.

    An image ``<image_dir>/<stem><image_suffix>.<ext>`` pairs with the mask ``<mask_dir>/<stem><mask_suffix>.<ext>``
    (and the field of view ``<fov_dir>/<stem><fov_suffix>.<ext>``); extensions: png, jpg, jpeg, tif, tiff, bmp, gif
    and npy (``HW``/``HWC`` arrays). Files whose stem does not end with the suffix are ignored.

    Items are ``{"image": float (C, H, W) in [-1, 1], "mask": long (H, W), "name": stem}`` plus
    ``"fov": bool (H, W)`` when ``fov_dir`` is given. Binary masks stored as 0/255 or 0/1 become ``{0, 1}``; with
    ``num_classes > 2`` mask values must be class indices. Pairing problems (missing folder, empty folder, image
    without mask, unknown ``stems``) raise :class:`DataError` at construction; decoding problems (unreadable or
    truncated file, wrong channel count, bad mask values, NaN, size mismatch) raise it when the file is loaded.

    Args:
        root: dataset folder; ``image_dir``, ``mask_dir`` and ``fov_dir`` are relative to it (``"."`` for root).
        image_dir, mask_dir, fov_dir: sub-folders of images, masks and (optional) field-of-view masks.
        image_suffix, mask_suffix, fov_suffix: stem endings removed before pairing (e.g. ``"_1stHO"``).
        stems: optional subset (and order) of stems to use; unknown stems are an error.
        num_classes: 2 for binary masks, else the number of classes (at most 256).
        image_channels: 3 (RGB; grey images are converted) or 1 (grey; RGB images are converted).
        image_extensions, mask_extensions: restrict the extensions read, e.g. when images and masks share a folder.
        cache: keep decoded samples in memory (uint8) after their first load; see also :meth:`load_all`.

    Example:
        >>> dataset = FolderPairDataset("DRIVE/training", mask_dir="1st_manual", image_suffix="_training",
        ...                             mask_suffix="_manual1")  # doctest: +SKIP
        >>> item = dataset[0]  # doctest: +SKIP
        >>> item["image"].shape, item["mask"].unique()  # doctest: +SKIP
        (torch.Size([3, 584, 565]), tensor([0, 1]))
    """

    def __init__(
        self,
        root: PathLike,
        image_dir: str = "images",
        mask_dir: str = "masks",
        image_suffix: str = "",
        mask_suffix: str = "",
        fov_dir: Optional[str] = None,
        fov_suffix: str = "",
        stems: Optional[Sequence[str]] = None,
        num_classes: int = 2,
        image_channels: int = 3,
        image_extensions: Optional[Sequence[str]] = None,
        mask_extensions: Optional[Sequence[str]] = None,
        cache: bool = False,
    ) -> None:
        if not isinstance(num_classes, int) or not 2 <= num_classes <= 256:
            raise DataError(f"`num_classes` must be an integer in [2, 256], got {num_classes!r}.")
        if not isinstance(image_channels, int) or image_channels < 1:
            raise DataError(f"`image_channels` must be a positive integer, got {image_channels!r}.")
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"The dataset folder '{self.root}' does not exist.")
        self.num_classes = num_classes
        self.image_channels = image_channels
        self.cache = cache

        image_ext = _normalise_extensions(image_extensions, "image_extensions")
        mask_ext = _normalise_extensions(mask_extensions, "mask_extensions")
        images, image_duplicates = _index_folder(self.root / image_dir, image_suffix, image_ext, "image")
        masks, mask_duplicates = _index_folder(self.root / mask_dir, mask_suffix, mask_ext, "mask")
        fovs, fov_duplicates = (
            _index_folder(self.root / fov_dir, fov_suffix, SUPPORTED_EXTENSIONS, "fov") if fov_dir else (None, {})
        )

        if stems is None:
            selected = sorted(images)
        else:
            if isinstance(stems, str):
                raise DataError(f"`stems` must be a sequence of stems, got the string {stems!r}.")
            selected = list(stems)
            unknown = [stem for stem in selected if stem not in images]
            if unknown:
                raise DataError(
                    f"Unknown `stems` {unknown[:5]}{' ...' if len(unknown) > 5 else ''}: no such image in "
                    f"'{self.root / image_dir}' (with image_suffix '{image_suffix}')."
                )
            if not selected:
                raise DataError("`stems` is empty.")

        self.samples: List[Tuple[str, Path, Path, Optional[Path]]] = []
        for stem in selected:
            _check_unique(stem, image_duplicates, "image")
            _check_unique(stem, mask_duplicates, "mask")
            _check_unique(stem, fov_duplicates, "fov")
            if stem not in masks:
                raise DataError(
                    f"No mask for image file '{images[stem]}': expected '{self.root / mask_dir}/{stem}{mask_suffix}"
                    f".<{'|'.join(e[1:] for e in mask_ext)}>'."
                )
            fov_path = None
            if fovs is not None:
                if stem not in fovs:
                    raise DataError(
                        f"No field-of-view mask for image file '{images[stem]}' in '{self.root / fov_dir}'."
                    )
                fov_path = fovs[stem]
            self.samples.append((stem, images[stem], masks[stem], fov_path))

    @property
    def stems(self) -> List[str]:
        """Names of the samples, in dataset order."""
        return [sample[0] for sample in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def decode(self, index: int) -> RawSample:
        """Read and validate the image, mask (and FOV) files of sample ``index``."""
        name, image_path, mask_path, fov_path = self.samples[index]
        image = read_image(image_path, self.image_channels)
        mask = read_mask(mask_path, self.num_classes)
        check_same_size(image, str(image_path), mask, str(mask_path))
        fov = None
        if fov_path is not None:
            fov = read_mask(fov_path, 2).astype(bool)
            check_same_size(image, str(image_path), fov, str(fov_path))
        return RawSample(image=image, mask=mask, name=name, fov=fov)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root='{self.root}', samples={len(self)}, num_classes={self.num_classes}, "
            f"image_channels={self.image_channels}, cache={self.cache})"
        )


def ddpm_segmentation_folder(
    root: PathLike, num_classes: int, image_channels: int = 3, cache: bool = False
) -> FolderPairDataset:
    """The ddpm-segmentation layout: ``<name>.jpg`` (or png) images and ``<name>.npy`` class-index masks in one folder.

    Example:
        >>> dataset = ddpm_segmentation_folder("datasets/ffhq_34/real/train", num_classes=34)  # doctest: +SKIP
    """
    return FolderPairDataset(
        root,
        image_dir=".",
        mask_dir=".",
        num_classes=num_classes,
        image_channels=image_channels,
        image_extensions=("jpg", "jpeg", "png"),
        mask_extensions=("npy",),
        cache=cache,
    )


def _is_chase_db1_folder(folder: Path) -> bool:
    return (folder / "images").is_dir() and (folder / "1stHO").is_dir()


def default_chase_db1_root() -> Optional[Path]:
    """Where CHASE_DB1 lives on this machine, or ``None`` when it is absent.

    ``$DIFFUSERS_RETINA_DATA`` (either the ``chase_db1`` folder itself or a folder containing ``chase_db1/``)
    overrides the default ``<repository>/../shared/data/chase_db1``.

    Example:
        >>> root = default_chase_db1_root()
        >>> root is None or (root / "images").is_dir()
        True
    """
    override = os.environ.get("DIFFUSERS_RETINA_DATA")
    if override:
        candidates = [Path(override) / "chase_db1", Path(override)]
    else:
        repository = Path(__file__).resolve().parents[2]
        candidates = [repository.parent / "shared" / "data" / "chase_db1"]
    for candidate in candidates:
        if _is_chase_db1_folder(candidate):
            return candidate
    return None


def chase_db1(
    root: Optional[PathLike] = None, split: str = "train", observer: str = "1stHO", cache: bool = False
) -> FolderPairDataset:
    """The CHASE_DB1 retinal vessel dataset (28 RGB fundus photographs, 999x960, binary vessel masks).

    Split: ``"train"`` = Image_01L..Image_10R (20), ``"test"`` = Image_11L..Image_14R (8), ``"all"`` = 28.
    ``observer="1stHO"`` is the reference annotation, ``"2ndHO"`` a second human observer.
    CC BY 4.0 -- cite Fraz et al., IEEE TBME 59(9):2538-2548, 2012.

    Example:
        >>> train = chase_db1(split="train")  # doctest: +SKIP
        >>> len(train), train[0]["image"].shape  # doctest: +SKIP
        (20, torch.Size([3, 960, 999]))
    """
    splits = {"train": CHASE_DB1_TRAIN, "test": CHASE_DB1_TEST, "all": CHASE_DB1_TRAIN + CHASE_DB1_TEST}
    if split not in splits:
        raise DataError(f"`split` must be one of {list(splits)}, got {split!r}.")
    if observer not in CHASE_DB1_OBSERVERS:
        raise DataError(f"`observer` must be one of {list(CHASE_DB1_OBSERVERS)}, got {observer!r}.")
    if root is None:
        root = default_chase_db1_root()
        if root is None:
            raise DataError(
                "CHASE_DB1 was not found: pass `root`, or set DIFFUSERS_RETINA_DATA, or place it in "
                "<repository>/../shared/data/chase_db1."
            )
    return FolderPairDataset(
        root,
        image_dir="images",
        mask_dir=observer,
        mask_suffix=f"_{observer}",
        stems=splits[split],
        num_classes=2,
        image_channels=3,
        cache=cache,
    )
