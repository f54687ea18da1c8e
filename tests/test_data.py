"""Tests of diffusers_retina.data: folder pairs, CHASE_DB1, Hugging Face datasets, BraTS slices, random patches."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import numpy as np
import PIL.Image
import pytest
import torch
from torch.utils.data import DataLoader

from diffusers_retina.data import (
    BratsSliceDataset,
    DataError,
    FolderPairDataset,
    HFSegmentationDataset,
    RandomPatchDataset,
    chase_db1,
    ddpm_segmentation_folder,
    default_chase_db1_root,
    diffusion_inputs,
    random_flip_rotate,
)

CHASE_ROOT = default_chase_db1_root()
needs_chase = pytest.mark.skipif(
    CHASE_ROOT is None,
    reason="CHASE_DB1 not found (set DIFFUSERS_RETINA_DATA or place it in <repo>/../shared/data/chase_db1)",
)


def _write_png(path: Path, array: np.ndarray, mode: Optional[str] = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = PIL.Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    image.save(path)
    return path


def _rgb(height: int = 6, width: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _binary_mask(height: int = 6, width: int = 5, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((height, width)) > 0.5).astype(np.uint8) * 255


def _pair_folder(root: Path, stems=("a", "b"), height: int = 6, width: int = 5) -> Path:
    for index, stem in enumerate(stems):
        _write_png(root / "images" / f"{stem}.png", _rgb(height, width, index))
        _write_png(root / "masks" / f"{stem}.png", _binary_mask(height, width, index))
    return root


# --------------------------------------------------------------------------------------------- folder pairs


def test_pairs_by_stem_with_suffixes(tmp_path: Path) -> None:
    for index, stem in enumerate(["21", "22", "23"]):
        _write_png(tmp_path / "img" / f"{stem}_training.png", _rgb(seed=index))
        # 1-bit mask for one file, 0/255 grey for the others: both become {0, 1}
        _write_png(tmp_path / "gt" / f"{stem}_manual1.png", _binary_mask(seed=index), mode="1" if index == 0 else None)
    (tmp_path / "img" / "notes.txt").write_text("not an image")
    _write_png(tmp_path / "gt" / "99_other.png", _binary_mask())  # no suffix: ignored

    dataset = FolderPairDataset(tmp_path, "img", "gt", image_suffix="_training", mask_suffix="_manual1")

    assert dataset.stems == ["21", "22", "23"]
    for index, item in enumerate(dataset):
        assert item["name"] == ["21", "22", "23"][index]
        assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 6, 5)
        expected_image = torch.from_numpy(_rgb(seed=index)).permute(2, 0, 1).float() / 127.5 - 1.0
        torch.testing.assert_close(item["image"], expected_image)
        assert item["mask"].dtype == torch.int64
        assert torch.equal(item["mask"], torch.from_numpy(_binary_mask(seed=index) // 255).long())


def test_grey_image_converted_fov_and_stems_subset(tmp_path: Path) -> None:
    _pair_folder(tmp_path, stems=("a", "b", "c"))
    _write_png(tmp_path / "images" / "b.png", _rgb()[:, :, 0])  # grey png, fine for image_channels=3
    for stem in "abc":
        fov = np.zeros((6, 5), np.uint8)
        fov[1:5, 1:4] = 255
        _write_png(tmp_path / "fov" / f"{stem}_mask.png", fov)

    dataset = FolderPairDataset(tmp_path, fov_dir="fov", fov_suffix="_mask", stems=["c", "b"])

    assert [item["name"] for item in dataset] == ["c", "b"]
    item = dataset[1]
    assert item["image"].shape == (3, 6, 5)
    assert torch.equal(item["image"][0], item["image"][2])
    assert item["fov"].dtype == torch.bool and int(item["fov"].sum()) == 12
    with pytest.raises(DataError, match="'zz'"):
        FolderPairDataset(tmp_path, stems=["a", "zz"])


def test_npy_images_and_class_index_masks(tmp_path: Path) -> None:
    # ddpm-segmentation layout: <name>.jpg + <name>.npy class indices in one folder
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (8, 7)).astype(np.int64)
    PIL.Image.fromarray(_rgb(8, 7)).save(tmp_path / "image_0.jpg")
    np.save(tmp_path / "image_0.npy", labels)

    dataset = ddpm_segmentation_folder(tmp_path, num_classes=5)

    assert len(dataset) == 1 and dataset[0]["image"].shape == (3, 8, 7)
    assert torch.equal(dataset[0]["mask"], torch.from_numpy(labels))
    # without restricting extensions, image_0.jpg and image_0.npy both claim the stem "image_0"
    with pytest.raises(DataError, match="image_0.npy"):
        FolderPairDataset(tmp_path, ".", ".", num_classes=5)
    # a float HWC image in [0, 1] stored as .npy
    image = rng.random((8, 7, 3)).astype(np.float32)
    np.save(tmp_path / "float.npy", image)
    np.save(tmp_path / "float_gt.npy", labels)
    npy = FolderPairDataset(tmp_path, ".", ".", mask_suffix="_gt", stems=["float"], num_classes=5)
    torch.testing.assert_close(npy[0]["image"], torch.from_numpy(image).permute(2, 0, 1) * 2 - 1)
    with pytest.raises(DataError, match="image_0.npy"):
        ddpm_segmentation_folder(tmp_path, num_classes=3)[0]  # label 4 is not < 3


def test_cache_keeps_uint8_and_avoids_rereading(tmp_path: Path) -> None:
    _pair_folder(tmp_path)
    dataset = FolderPairDataset(tmp_path).load_all()
    raw = dataset.load_raw(0)
    assert raw.image.dtype == np.uint8 and raw.mask.dtype == np.uint8
    first = dataset[0]
    for path in (tmp_path / "images").iterdir():
        path.unlink()
    assert torch.equal(dataset[0]["image"], first["image"])  # served from memory


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _make_bad(case: str, root: Path) -> str:
    """Build a broken dataset under ``root``; return the file or folder name the error must mention."""
    if case == "image without mask":
        _pair_folder(root)
        _write_png(root / "images" / "lonely.png", _rgb())
        return "lonely.png"
    if case == "truncated png":
        _pair_folder(root, height=64, width=64)
        _write_png(root / "images" / "a.png", _rgb(64, 64))
        _truncate(root / "images" / "a.png")
        return "a.png"
    if case == "truncated mask":
        _pair_folder(root, height=64, width=64)
        _truncate(root / "masks" / "a.png")
        return "a.png"
    if case == "empty folder":
        (root / "images").mkdir()
        _pair_folder(root / "other")
        (root / "masks").mkdir()
        return "images"
    if case == "missing folder":
        _pair_folder(root)
        return "nowhere"
    if case == "4-channel npy":
        _pair_folder(root)
        (root / "images" / "a.png").unlink()
        np.save(root / "images" / "a.npy", np.zeros((6, 5, 4), np.uint8))
        return "a.npy"
    if case == "mask values {0, 3, 7}":
        _pair_folder(root)
        _write_png(root / "masks" / "a.png", np.array([[0, 3, 7, 0, 0]] * 6, np.uint8))
        return "a.png"
    if case == "NaN npy":
        _pair_folder(root)
        (root / "images" / "a.png").unlink()
        image = np.full((6, 5, 3), 0.5, np.float32)
        image[2, 2, 1] = np.nan
        np.save(root / "images" / "a.npy", image)
        return "a.npy"
    if case == "NaN mask npy":
        _pair_folder(root)
        (root / "masks" / "a.png").unlink()
        np.save(root / "masks" / "a.npy", np.array([[0.0, np.nan]] * 6))
        return "a.npy"
    if case == "size mismatch":
        _pair_folder(root)
        _write_png(root / "masks" / "a.png", _binary_mask(7, 5))
        return "a.png"
    if case == "not an image":
        _pair_folder(root)
        (root / "images" / "a.png").write_bytes(b"this is not a png")
        return "a.png"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "image without mask",
        "truncated png",
        "truncated mask",
        "empty folder",
        "missing folder",
        "4-channel npy",
        "mask values {0, 3, 7}",
        "NaN npy",
        "NaN mask npy",
        "size mismatch",
        "not an image",
    ],
)
def test_bad_input_raises_data_error_naming_the_file(case: str, tmp_path: Path) -> None:
    expected_name = _make_bad(case, tmp_path)
    with pytest.raises(DataError) as info:
        image_dir = "nowhere" if case == "missing folder" else "images"
        dataset = FolderPairDataset(tmp_path, image_dir=image_dir)
        for index in range(len(dataset)):
            dataset[index]
    assert expected_name in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    _pair_folder(tmp_path)
    with pytest.raises(DataError, match="num_classes"):
        FolderPairDataset(tmp_path, num_classes=1)
    with pytest.raises(DataError, match="split"):
        chase_db1(tmp_path, split="validation")
    with pytest.raises(DataError, match="observer"):
        chase_db1(tmp_path, observer="3rdHO")


def test_diffusion_inputs_use_mask_to_diffusion(tmp_path: Path) -> None:
    batch = next(iter(DataLoader(FolderPairDataset(_pair_folder(tmp_path)), batch_size=2)))
    images, masks = diffusion_inputs(batch, num_classes=2)
    assert images.shape == (2, 3, 6, 5) and masks.shape == (2, 1, 6, 5)
    assert torch.equal(masks, batch["mask"].unsqueeze(1).float() * 2 - 1)


# --------------------------------------------------------------------------------------------- CHASE_DB1


@needs_chase
def test_chase_db1_split_sizes() -> None:
    train, test = chase_db1(split="train"), chase_db1(split="test")
    assert len(train) == 20 and len(test) == 8 and len(chase_db1(split="all")) == 28
    assert train.stems[0] == "Image_01L" and train.stems[-1] == "Image_10R"
    assert test.stems[0] == "Image_11L" and test.stems[-1] == "Image_14R"
    assert not set(train.stems) & set(test.stems)


@needs_chase
@pytest.mark.parametrize("split, observer", [("train", "1stHO"), ("test", "2ndHO")])
def test_chase_db1_items(split: str, observer: str) -> None:
    item = chase_db1(split=split, observer=observer)[-1]
    assert item["image"].shape == (3, 960, 999) and item["mask"].shape == (960, 999)
    assert -1.0 <= float(item["image"].min()) < float(item["image"].max()) <= 1.0
    assert set(item["mask"].unique().tolist()) == {0, 1}
    assert 0.03 < float(item["mask"].float().mean()) < 0.15


def test_chase_db1_root_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFUSERS_RETINA_DATA", str(tmp_path))
    assert default_chase_db1_root() is None
    with pytest.raises(DataError, match="DIFFUSERS_RETINA_DATA"):
        chase_db1()
    _pair_folder(tmp_path / "chase_db1")
    (tmp_path / "chase_db1" / "1stHO").mkdir()
    assert default_chase_db1_root() == tmp_path / "chase_db1"


# --------------------------------------------------------------------------------------------- random patches


def _vessel_folder(root: Path, count: int = 2, size: int = 40) -> FolderPairDataset:
    """Images whose content equals their mask (white where mask is 1), with sparse foreground."""
    for index in range(count):
        mask = np.zeros((size, size), np.uint8)
        mask[(5 + 7 * index) % size, 3 : size - 3] = 1  # one thin horizontal "vessel"
        mask[size // 5 : size - 2, size - 10 + index] = 1  # a vertical one: the content is not symmetric
        _write_png(root / "masks" / f"v{index}.png", mask * 255)
        _write_png(root / "images" / f"v{index}.png", np.repeat((mask * 255)[:, :, None], 3, axis=2))
    return FolderPairDataset(root)


def test_patch_shapes_and_padding_of_small_images(tmp_path: Path) -> None:
    patches = RandomPatchDataset(_vessel_folder(tmp_path, size=12), patch_size=16, patches_per_image=3)
    assert len(patches) == 6
    item = patches[5]
    assert item["image"].shape == (3, 16, 16) and item["mask"].shape == (16, 16)
    assert item["image"].dtype == torch.float32 and item["mask"].dtype == torch.int64
    assert patches.samples[0].image.dtype == np.uint8  # base images kept once, as uint8


def test_patches_are_deterministic_per_seed_epoch_index(tmp_path: Path) -> None:
    base = _vessel_folder(tmp_path)
    first = RandomPatchDataset(base, patch_size=16, seed=3)
    second = RandomPatchDataset(base, patch_size=16, seed=3)
    for index in (0, 7, 41):
        assert torch.equal(first[index]["image"], second[index]["image"])
        assert torch.equal(first[index]["mask"], second[index]["mask"])
    before = torch.stack([first[i]["image"] for i in range(20)])
    first.set_epoch(1)
    after = torch.stack([first[i]["image"] for i in range(20)])
    assert not torch.equal(before, after)
    other_seed = torch.stack([RandomPatchDataset(base, patch_size=16, seed=4)[i]["image"] for i in range(20)])
    assert not torch.equal(before, other_seed)


def test_foreground_fraction_finds_sparse_foreground(tmp_path: Path) -> None:
    size = 48
    mask = np.zeros((size, size), np.uint8)
    mask[40:42, 3:5] = 255  # 4 foreground pixels in a corner
    _write_png(tmp_path / "masks" / "s.png", mask)
    _write_png(tmp_path / "images" / "s.png", _rgb(size, size))
    base = FolderPairDataset(tmp_path)

    def hit_rate(fraction: float) -> float:
        patches = RandomPatchDataset(base, patch_size=8, patches_per_image=200, foreground_fraction=fraction)
        return sum(bool(patches[i]["mask"].any()) for i in range(len(patches))) / len(patches)

    assert hit_rate(1.0) == 1.0
    assert hit_rate(0.0) < 0.2


def test_augmentation_keeps_image_and_mask_aligned(tmp_path: Path) -> None:
    patches = RandomPatchDataset(_vessel_folder(tmp_path), patch_size=24, patches_per_image=40)
    seen = set()
    for index in range(len(patches)):
        item = patches[index]
        assert torch.equal((item["image"] > 0).long(), item["mask"].expand(3, -1, -1))
        seen.add(tuple(item["mask"].sum(dim=0).tolist()))
    assert len(seen) > 10  # patches really vary


def test_random_flip_rotate_covers_all_eight_symmetries() -> None:
    image = torch.arange(16.0).reshape(1, 4, 4)
    mask = torch.arange(16).reshape(4, 4)
    fov = mask > 7
    results = set()
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        out_image, out_mask, out_fov = random_flip_rotate(image, mask, generator, fov=fov)
        assert torch.equal(out_image[0].long(), out_mask) and torch.equal(out_fov, out_mask > 7)
        results.add(tuple(out_mask.flatten().tolist()))
    assert len(results) == 8
    wide_image, wide_mask = random_flip_rotate(torch.zeros(3, 4, 6), torch.zeros(4, 6), generator)
    assert wide_image.shape == (3, 4, 6) and wide_mask.shape == (4, 6)


def test_dataloader_workers_match_main_process(tmp_path: Path) -> None:
    patches = RandomPatchDataset(_vessel_folder(tmp_path), patch_size=16, patches_per_image=8, seed=11)
    patches.set_epoch(2)

    def collect(num_workers: int) -> torch.Tensor:
        loader = DataLoader(patches, batch_size=4, num_workers=num_workers)
        return torch.cat([batch["image"] for batch in loader])

    assert torch.equal(collect(0), collect(2))


def test_set_epoch_reaches_persistent_workers(tmp_path: Path) -> None:
    patches = RandomPatchDataset(_vessel_folder(tmp_path, count=1), patch_size=16, patches_per_image=4)
    loader = DataLoader(patches, batch_size=4, num_workers=1, persistent_workers=True)
    epochs = []
    for epoch in range(2):
        patches.set_epoch(epoch)
        epochs.append(next(iter(loader))["image"])
    reference = []
    for epoch in range(2):
        patches.set_epoch(epoch)
        reference.append(torch.stack([patches[i]["image"] for i in range(4)]))
    assert torch.equal(epochs[0], reference[0]) and torch.equal(epochs[1], reference[1])
    assert not torch.equal(epochs[0], epochs[1])


# --------------------------------------------------------------------------------------------- Hugging Face datasets


def _hf_table(count: int = 3):
    datasets = pytest.importorskip("datasets")
    images = [PIL.Image.fromarray(_rgb(6, 5, i)) for i in range(count)]
    masks = [PIL.Image.fromarray(_binary_mask(6, 5, i)) for i in range(count)]
    features = datasets.Features({"pixel_values": datasets.Image(), "label": datasets.Image()})
    return datasets.Dataset.from_dict({"pixel_values": images, "label": masks}, features=features)


def test_hf_dataset_wrapper() -> None:
    table = _hf_table()
    dataset = HFSegmentationDataset(table, image_column="pixel_values", mask_column="label")
    assert len(dataset) == 3
    item = dataset[2]
    expected = torch.from_numpy(_rgb(6, 5, 2)).permute(2, 0, 1).float() / 127.5 - 1.0
    torch.testing.assert_close(item["image"], expected)
    assert torch.equal(item["mask"], torch.from_numpy(_binary_mask(6, 5, 2) // 255).long())
    assert item["name"] == "2"
    # a DatasetDict is indexed by split; the wrapper feeds the patch sampler like any dataset
    import datasets

    wrapped = HFSegmentationDataset(datasets.DatasetDict({"test": table}), split="test", image_column="pixel_values",
                                    mask_column="label")
    assert RandomPatchDataset(wrapped, patch_size=4, patches_per_image=2)[5]["image"].shape == (3, 4, 4)


def test_hf_dataset_errors_name_the_column_or_row() -> None:
    table = _hf_table()
    with pytest.raises(DataError, match="'mask'"):
        HFSegmentationDataset(table, image_column="pixel_values")  # mask_column="mask" does not exist
    datasets = pytest.importorskip("datasets")
    bad = datasets.Dataset.from_dict(
        {"image": [_rgb(6, 5).tolist()], "mask": [[[0, 3, 7, 0, 0]] * 6]},
    )
    with pytest.raises(DataError, match=r"\[0\]\['mask'\]"):
        HFSegmentationDataset(bad)[0]


def test_hf_imagefolder_offline(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    for index in range(2):
        _write_png(tmp_path / "train" / f"{index}.png", _rgb(6, 5, index))
        _write_png(tmp_path / "train" / f"{index}_mask.png", _binary_mask(6, 5, index))
    (tmp_path / "train" / "metadata.csv").write_text(
        "file_name,mask_file_name\n0.png,0_mask.png\n1.png,1_mask.png\n"
    )
    try:
        loaded = datasets.load_dataset("imagefolder", data_dir=str(tmp_path), split="train")
    except Exception as exc:  # older `datasets` without *_file_name columns
        pytest.skip(f"imagefolder with a mask column is not supported by this datasets version: {exc}")
    if "mask" not in loaded.column_names:
        pytest.skip("imagefolder did not create a mask column with this datasets version")
    dataset = HFSegmentationDataset(loaded)
    assert torch.equal(dataset[1]["mask"], torch.from_numpy(_binary_mask(6, 5, 1) // 255).long())


# --------------------------------------------------------------------------------------------- BraTS


def _write_brats(root: Path, patients=("BraTS_001", "BraTS_002"), shape=(16, 16, 4)) -> None:
    nibabel = pytest.importorskip("nibabel")
    rng = np.random.default_rng(0)
    for patient in patients:
        folder = root / patient
        folder.mkdir(parents=True)
        for offset, modality in enumerate(("t1", "t1ce", "t2", "flair")):
            volume = (rng.random(shape) * 1000 + offset * 100).astype(np.float32)
            nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), folder / f"{patient}_{modality}.nii.gz")
        seg = np.zeros(shape, np.int16)
        seg[2:6, 2:6, 1] = 1
        seg[8:10, 8:12, 2] = 2
        seg[12:14, 3:5, 2] = 4
        nibabel.save(nibabel.Nifti1Image(seg, np.eye(4)), folder / f"{patient}_seg.nii.gz")


def test_brats_slices(tmp_path: Path) -> None:
    _write_brats(tmp_path)
    dataset = BratsSliceDataset(tmp_path)
    assert len(dataset) == 8
    item = dataset[2]
    assert item["name"] == "BraTS_001_002"
    assert item["image"].shape == (4, 16, 16) and item["mask"].shape == (16, 16)
    assert float(item["image"].min()) >= -1.0 and float(item["image"].max()) <= 1.0
    assert float(item["image"].min()) == -1.0 and float(item["image"].max()) == 1.0  # percentile clipping
    assert set(item["mask"].unique().tolist()) == {0, 1} and int(item["mask"].sum()) == 8 + 4

    classes = BratsSliceDataset(tmp_path, binary=False, slice_range=(1, 3))
    assert len(classes) == 4 and classes.num_classes == 4
    assert classes[1]["name"] == "BraTS_001_002"
    assert set(classes[1]["mask"].unique().tolist()) == {0, 2, 3}  # label 4 -> class 3
    assert set(classes[0]["mask"].unique().tolist()) == {0, 1}


def test_brats_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_brats(tmp_path)
    (tmp_path / "BraTS_002" / "BraTS_002_flair.nii.gz").unlink()
    with pytest.raises(DataError, match="BraTS_002_flair.nii.gz"):
        BratsSliceDataset(tmp_path)
    monkeypatch.setitem(sys.modules, "nibabel", None)  # simulate nibabel not being installed
    with pytest.raises(ImportError, match=r"pip install diffusers-retina\[nifti\]"):
        BratsSliceDataset(tmp_path)
