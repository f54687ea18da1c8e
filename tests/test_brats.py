"""BraTS end to end on tiny synthetic NIfTI volumes (no BraTS data ships with the project): the training script's
``--data_format brats``, ``diffusers-retina segment`` on NIfTI inputs (outputs keep the input's affine and header),
and the BraTS region metrics against hand-computed values.

Volumes are 4 modalities x 32 x 32 x 4 slices with a BraTS-like tumour (oedema shell, enhancing ring, necrotic core)
whose classes differ in intensity in some modality; the UNet is (8, 16) channels, so everything runs in seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from diffusers_retina import SegmentationEnsemblePipeline, cli
from diffusers_retina.metrics import brats_region_masks, brats_region_metrics
from diffusers_retina.training_utils import add_data_arguments, build_datasets, resolve_data_format

nibabel = pytest.importorskip("nibabel")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training" / "train_segmentation_ensemble.py"
MODALITIES = ("t1", "t1ce", "t2", "flair")
#: mean intensity of (brain, necrotic core 1, oedema 2, enhancing 4) per modality
CONTRAST = {"t1": (300, 150, 250, 200), "t1ce": (300, 200, 320, 700), "t2": (400, 900, 800, 600),
            "flair": (350, 500, 900, 600)}
#: a non-trivial grid (anisotropic voxels, an offset, a flip), so "the affine is kept" is a real check
AFFINE = np.array([[-1.2, 0.0, 0.0, 90.0], [0.0, 1.2, 0.0, -120.0], [0.0, 0.0, 2.5, -60.0], [0.0, 0.0, 0.0, 1.0]])
FAST = ["--ensemble-size", "2", "--steps", "2", "--tile-size", "32"]


# ------------------------------------------------------------------------------------------------ synthetic data


def tumour_labels(size: int = 32, depth: int = 4, centre=(16, 16), radius: float = 9.0) -> np.ndarray:
    """BraTS labels on an ``(size, size, depth)`` grid: oedema (2) around an enhancing ring (4) around necrosis (1)."""
    x, y = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    labels = np.zeros((size, size, depth), np.uint8)
    for z in range(depth):
        r = radius * (1 - abs(z - (depth - 1) / 2) / depth)
        distance = np.hypot(x - centre[0], y - centre[1])
        labels[..., z][distance < r] = 2
        labels[..., z][distance < 0.7 * r] = 4
        labels[..., z][distance < 0.4 * r] = 1
    return labels


def write_case(root: Path, name: str, seed: int) -> Path:
    """``root/name/name_<modality>.nii.gz`` and ``name_seg.nii.gz``, the BraTS layout."""
    rng = np.random.default_rng(seed)
    folder = root / name
    folder.mkdir(parents=True)
    labels = tumour_labels(centre=tuple(int(c) for c in rng.integers(12, 20, size=2)), radius=float(rng.uniform(7, 10)))
    for modality in MODALITIES:
        mean = np.choose(np.searchsorted([0, 1, 2, 4], labels), CONTRAST[modality]).astype(np.float32)
        volume = mean + rng.normal(0, 30, labels.shape).astype(np.float32)
        image = nibabel.Nifti1Image(volume, AFFINE)
        image.header.set_xyzt_units("mm")
        nibabel.save(image, folder / f"{name}_{modality}.nii.gz")
    nibabel.save(nibabel.Nifti1Image(labels, AFFINE), folder / f"{name}_seg.nii.gz")
    return folder


@pytest.fixture(scope="module")
def brats_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("brats") / "training"
    for index in range(3):
        write_case(root, f"BraTS_{index:03d}", seed=index)
    return root


def load_training_script():
    spec = importlib.util.spec_from_file_location("train_segmentation_ensemble", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained_pipeline(brats_root, tmp_path_factory) -> Path:
    """A 4-class pipeline trained 6 steps on two synthetic patients (the third one validates), in-process."""
    output_dir = tmp_path_factory.mktemp("run") / "brats-4class"
    torch.set_num_threads(1)
    load_training_script().main([
        "--data_format", "brats", "--train_data_dir", str(brats_root), "--modalities", ",".join(MODALITIES),
        "--num_classes", "4", "--slice_range", "0,4", "--validation_stems", "BraTS_002", "--validation_crop", "0",
        "--validation_steps", "100", "--resolution", "32", "--block_out_channels", "8,16", "--norm_num_groups", "4",
        "--train_batch_size", "2", "--patches_per_image", "2", "--max_train_steps", "6", "--checkpointing_steps", "3",
        "--report_to", "none", "--seed", "0", "--save_dtype", "float32", "--output_dir", str(output_dir),
    ])
    return output_dir


def run_cli(argv):
    return cli.main([str(a) for a in argv])


def expect_cli_error(argv, capsys, *fragments: str) -> str:
    with pytest.raises(SystemExit) as raised:
        cli.main([str(a) for a in argv])
    assert raised.value.code != 0
    message = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in message, message
    return message


# ------------------------------------------------------------------------------------------------ training


def test_training_on_brats_folder(trained_pipeline, brats_root):
    pipe = SegmentationEnsemblePipeline.from_pretrained(trained_pipeline)
    assert (pipe.image_channels, pipe.num_classes) == (4, 4)  # 4 modalities in, 4 one-hot mask channels
    assert (trained_pipeline / "checkpoint-3").is_dir() and (trained_pipeline / "checkpoint-6").is_dir()
    info = json.loads((trained_pipeline / "training_info.json").read_text())
    assert info["global_step"] == 6
    assert info["args"]["data_format"] == "brats" and info["args"]["image_channels"] == 4
    assert 0.0 <= info["validation_dice"] <= 1.0  # the final validation pass ran on the held-out patient


def brats_args(root, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    args = parser.parse_args(["--data_format", "brats", "--train_data_dir", str(root), *extra])
    resolve_data_format(parser, args)
    return args


def test_brats_datasets_split_patients_and_follow_flags(brats_root):
    train, validation = build_datasets(brats_args(brats_root, "--num_classes", "4", "--slice_range", "1,3",
                                                  "--validation_stems", "BraTS_002", "--modalities", "flair,t1ce"))
    assert [name for name, _, _ in train.patients] == ["BraTS_000", "BraTS_001"]  # validation held out
    assert [name for name, _, _ in validation.patients] == ["BraTS_002"]
    assert len(train) == 4 and len(validation) == 2  # slices 1 and 2 of each patient
    item = train[0]
    assert item["image"].shape == (2, 32, 32) and item["name"] == "BraTS_000_001"
    assert set(np.unique(item["mask"].numpy())) == {0, 1, 2, 3}  # labels {0, 1, 2, 4} -> classes 0..3
    # flair is channel 0: the oedema (class 2) is brightest there
    flair = item["image"][0].numpy()
    mask = item["mask"].numpy()
    assert flair[mask == 2].mean() > flair[mask == 0].mean()
    binary, _ = build_datasets(brats_args(brats_root))
    assert binary.num_classes == 2 and set(np.unique(binary[1]["mask"].numpy())) == {0, 1}


def test_brats_training_flag_errors(brats_root, capsys):
    script = load_training_script()
    base = ["--data_format", "brats", "--train_data_dir", str(brats_root), "--output_dir", "unused"]
    for extra, fragment in ((["--num_classes", "3"], "--num_classes 2 (whole tumour) or 4"),
                            (["--slice_range", "a,b"], "--slice_range"),
                            (["--modalities", ","], "--modalities")):
        with pytest.raises(SystemExit):
            script.parse_args(base + extra)
        assert fragment in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ CLI


def test_segment_volume_keeps_affine_and_header(trained_pipeline, brats_root, tmp_path, capsys):
    output_dir = tmp_path / "out"
    case = brats_root / "BraTS_002"
    assert run_cli(["segment", case, "--modalities", ",".join(MODALITIES), "--label-values", "0,1,2,4",
                    "--pipeline", trained_pipeline, "--output-dir", output_dir, *FAST]) == 0
    maps = ("mask", "probability", "entropy", "variance", "mutual_information")
    assert {p.name for p in output_dir.iterdir()} == {f"BraTS_002_{m}.nii.gz" for m in maps} | {"summary.json", "results.jsonl"}

    source = nibabel.load(case / "BraTS_002_flair.nii.gz")
    mask = nibabel.load(output_dir / "BraTS_002_mask.nii.gz")
    np.testing.assert_array_equal(mask.affine, source.affine)
    assert mask.header.get_zooms() == source.header.get_zooms()
    assert mask.header.get_xyzt_units() == ("mm", "unknown")
    assert mask.shape == (32, 32, 4) and mask.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2, 4}  # --label-values: BraTS labels, not 0..3
    probability = nibabel.load(output_dir / "BraTS_002_probability.nii.gz")
    assert probability.shape == (32, 32, 4, 4) and probability.get_data_dtype() == np.float32
    np.testing.assert_allclose(probability.get_fdata().sum(axis=-1), 1.0, atol=1e-4)
    entropy = nibabel.load(output_dir / "BraTS_002_entropy.nii.gz").get_fdata()
    assert entropy.shape == (32, 32, 4) and 0.0 <= entropy.min() and entropy.max() <= np.log(4) + 1e-4
    np.testing.assert_array_equal(nibabel.load(output_dir / "BraTS_002_variance.nii.gz").affine, source.affine)

    row = json.loads((output_dir / "summary.json").read_text())["images"][0]
    assert (row["width"], row["height"], row["slices"], row["channels"]) == (32, 32, 4, 4)
    assert row["input"].endswith("BraTS_002_flair.nii.gz") and row["outputs"][0] == "BraTS_002_mask.nii.gz"
    assert {"seconds", "mean_entropy", "foreground_fraction"} <= set(row)

    # the same case as one 4-D file (modalities last) and as comma-joined files gives the same masks (same seed)
    four_d = tmp_path / "case4d.nii.gz"
    stacked = np.stack([nibabel.load(case / f"BraTS_002_{m}.nii.gz").get_fdata() for m in MODALITIES], axis=-1)
    nibabel.save(nibabel.Nifti1Image(stacked.astype(np.float32), AFFINE), four_d)
    joined = ",".join(str(case / f"BraTS_002_{m}.nii.gz") for m in MODALITIES)
    again = tmp_path / "again"
    assert run_cli(["segment", four_d, joined, "--pipeline", trained_pipeline, "--output-dir", again, *FAST]) == 0
    from_4d = np.asarray(nibabel.load(again / "case4d_mask.nii.gz").dataobj)
    from_files = np.asarray(nibabel.load(again / "BraTS_002_mask.nii.gz").dataobj)
    np.testing.assert_array_equal(from_4d, from_files)
    np.testing.assert_array_equal(np.array([0, 1, 2, 4])[from_files], np.asarray(mask.dataobj))
    np.testing.assert_array_equal(nibabel.load(again / "case4d_mask.nii.gz").affine, nibabel.load(four_d).affine)


@pytest.fixture(scope="module")
def one_channel_pipeline(tmp_path_factory) -> Path:
    """An untrained binary pipeline on one modality (the CLI's file handling does not need a trained model)."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=2, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    path = tmp_path_factory.mktemp("pipeline") / "flair-binary"
    SegmentationEnsemblePipeline(unet=unet, scheduler=DDIMScheduler(prediction_type="sample")).save_pretrained(path)
    return path


def test_segment_2d_slice_gives_2d_outputs(one_channel_pipeline, brats_root, tmp_path):
    volume = nibabel.load(brats_root / "BraTS_000" / "BraTS_000_flair.nii.gz")
    slice_file = tmp_path / "flair_slice.nii"  # uncompressed .nii is read too
    nibabel.save(nibabel.Nifti1Image(volume.get_fdata()[:, :, 2].astype(np.float32), AFFINE), slice_file)
    output_dir = tmp_path / "out"
    assert run_cli(["segment", slice_file, "--pipeline", one_channel_pipeline, "--output-dir", output_dir,
                    "--save-members", *FAST]) == 0
    mask = nibabel.load(output_dir / "flair_slice_mask.nii.gz")
    assert mask.shape == (32, 32) and set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    np.testing.assert_array_equal(mask.affine, nibabel.load(slice_file).affine)
    assert nibabel.load(output_dir / "flair_slice_probability.nii.gz").shape == (32, 32)  # binary: foreground
    assert nibabel.load(output_dir / "flair_slice_member2.nii.gz").shape == (32, 32)
    row = json.loads((output_dir / "summary.json").read_text())["images"][0]
    assert (row["slices"], row["channels"]) == (1, 1)


def test_segment_nifti_errors(one_channel_pipeline, trained_pipeline, brats_root, tmp_path, capsys, monkeypatch):
    case = brats_root / "BraTS_001"
    out = tmp_path / "out"
    # a single-modality file for a 4-modality pipeline: name the file and say how to give the modalities
    expect_cli_error(["segment", case / "BraTS_001_t1.nii.gz", "--pipeline", trained_pipeline, "--output-dir", out],
                     capsys, "BraTS_001_t1.nii.gz", "1 channel(s)", "--modalities")
    # a missing modality in a case folder
    expect_cli_error(["segment", case, "--modalities", "t1,dwi", "--pipeline", trained_pipeline, "--output-dir", out],
                     capsys, "dwi", str(case))
    # modality files of different shapes
    small = tmp_path / "small_t2.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.zeros((16, 16, 4), np.float32), AFFINE), small)
    expect_cli_error(["segment", f"{case / 'BraTS_001_t1.nii.gz'},{small}", "--pipeline", trained_pipeline,
                      "--output-dir", out], capsys, "small_t2.nii.gz", "shape")
    # --label-values must give one value per class
    expect_cli_error(["segment", case, "--modalities", ",".join(MODALITIES), "--label-values", "0,1",
                      "--pipeline", trained_pipeline, "--output-dir", out], capsys, "--label-values", "4 classes")
    assert not out.exists()  # nothing was written for any of these
    # nibabel missing: a clear message naming the extra
    monkeypatch.setitem(sys.modules, "nibabel", None)
    expect_cli_error(["segment", case / "BraTS_001_t1.nii.gz", "--pipeline", one_channel_pipeline,
                      "--output-dir", out], capsys, "pip install diffusers-retina[nifti]")


# ------------------------------------------------------------------------------------------------ metrics


def test_brats_region_metrics_hand_computed():
    target = np.zeros((12, 12), np.uint8)
    target[2:8, 2:8] = 2  # whole tumour: 36 pixels
    target[3:7, 3:7] = 4  # tumour core: 16 pixels
    target[4:6, 4:6] = 1  # enhancing tumour: the 16 - 4 = 12 pixel ring
    pred = target.copy()
    pred[8, 2:8] = 2  # whole tumour one row too far: 42 pixels, all 36 of the target inside
    pred[3, 3:7] = 1  # 4 enhancing pixels called necrosis: core unchanged, enhancing 8 of the 12
    masks = brats_region_masks(target)
    assert [int(m.sum()) for m in masks.values()] == [36, 16, 12]

    scores = brats_region_metrics(pred, target)
    assert list(scores) == ["whole_tumour", "tumour_core", "enhancing_tumour"]
    assert scores["whole_tumour"]["dice"] == pytest.approx(2 * 36 / (42 + 36))
    assert scores["tumour_core"]["dice"] == pytest.approx(1.0)
    assert scores["enhancing_tumour"]["dice"] == pytest.approx(2 * 8 / (8 + 12))
    # the extra row lies 1 pixel from the target's border, and the target's last row 1 pixel from the prediction's
    assert scores["whole_tumour"]["hd95"] == pytest.approx(1.0)
    assert scores["tumour_core"]["hd95"] == 0.0

    # the pipeline's class indices (3 = enhancing) score exactly like BraTS labels (4 = enhancing)
    as_classes = np.where(pred == 4, 3, pred)
    assert brats_region_metrics(as_classes, target) == scores

    # a 3-D volume with anisotropic voxels: a 4x4x2 enhancing block shifted by one slice of 2.5 mm
    target_3d = np.zeros((8, 8, 5), np.uint8)
    target_3d[2:6, 2:6, 1:3] = 4
    pred_3d = np.roll(target_3d, 1, axis=2)
    spacing = tuple(np.array([1.0, 1.0, 2.5], np.float32))  # as nibabel's header.get_zooms() gives it
    scores_3d = brats_region_metrics(pred_3d, target_3d, spacing=spacing)
    for region in scores_3d.values():  # 16 of 32 voxels overlap; the other half lies one slice (2.5 mm) away
        assert region["dice"] == pytest.approx(0.5)
        assert region["hd95"] == pytest.approx(2.5)

    # empty regions: both empty -> Dice 1, HD95 0; a missed enhancing tumour -> Dice 0, HD95 inf
    no_enhancing = np.where(target == 4, 1, target)
    missed = brats_region_metrics(no_enhancing, target)["enhancing_tumour"]
    assert missed["dice"] == 0.0 and missed["hd95"] == float("inf")
    assert brats_region_metrics(no_enhancing, no_enhancing)["enhancing_tumour"] == {"dice": 1.0, "hd95": 0.0}

    with pytest.raises(ValueError, match="outside the BraTS labels"):
        brats_region_metrics(np.full((4, 4), 5), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="same shape"):
        brats_region_metrics(np.zeros((4, 4)), np.zeros((4, 5)))
