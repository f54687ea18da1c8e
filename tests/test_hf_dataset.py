"""``training/make_hf_dataset.py`` (a CHASE_DB1-style folder -> a ``datasets`` DatasetDict on disk) and
``--dataset_name`` in the training scripts: the split and validation flags are honoured (or refused naming the flag),
rows are selected from the name column without decoding an image, the data's licence reaches training_info.json."""

from __future__ import annotations

import json
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusers_retina.data import DataError
from diffusers_retina.hub import dataset_provenance
from diffusers_retina.training_utils import build_datasets

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training"))
import make_hf_dataset  # noqa: E402

STEMS = ["Image_01L", "Image_01R", "Image_02L", "Image_11L", "Image_11R"]
PROVENANCE = "# TinyChase\n\nLicence: CC BY 4.0\nAttribution required - cite:\n  Doe J. Tiny, 2026.\n"


def write_chase_like(root: Path, size: int = 40) -> Path:
    """images/<stem>.jpg, 1stHO/<stem>_1stHO.png, 2ndHO/<stem>_2ndHO.png (the observers differ) and a PROVENANCE."""
    for folder in ("images", "1stHO", "2ndHO"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for stem in STEMS:
        mask = rng.integers(0, 2, (size, size)).astype(np.uint8)
        Image.fromarray(np.stack([mask * 200] * 3, axis=-1)).save(root / "images" / f"{stem}.jpg")
        Image.fromarray(mask * 255).save(root / "1stHO" / f"{stem}_1stHO.png")
        Image.fromarray((1 - mask) * 255).save(root / "2ndHO" / f"{stem}_2ndHO.png")
    (root / "PROVENANCE.md").write_text(PROVENANCE)
    return root


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    data = write_chase_like(root / "chase_like")
    assert make_hf_dataset.main(["--data_dir", str(data), "--output_dir", str(root / "saved"),
                                 "--split", "train=Image_0*", "--split", "test=Image_1[1-4]*"]) == 0
    return root / "saved"


def data_args(saved: Path, **changes) -> Namespace:
    args = dict(data_format="folder", train_data_dir=None, dataset_name=str(saved), dataset_config_name=None,
                dataset_split="train", validation_split=None, stem_column="name", image_column="image",
                mask_column="mask_1stHO", train_stems=None, validation_stems=None, num_classes=2, image_channels=3)
    args.update(changes)
    return Namespace(**args)


def test_folder_becomes_a_dataset_dict_with_both_observers_and_splits(saved):
    import datasets

    dataset = datasets.load_from_disk(str(saved))
    assert sorted(dataset) == ["test", "train"]
    assert dataset["train"]["name"] == ["Image_01L", "Image_01R", "Image_02L"]
    assert dataset["test"]["name"] == ["Image_11L", "Image_11R"]
    assert dataset["train"].column_names == ["name", "image", "mask_1stHO", "mask_2ndHO"]
    data = saved.parent / "chase_like"
    row = dataset["test"].with_format("arrow")[0:1]  # the stored bytes: the files themselves, not re-encoded
    assert row.column("image")[0]["bytes"].as_py() == (data / "images" / "Image_11L.jpg").read_bytes()
    first = dataset["test"][0]
    one = np.asarray(first["mask_1stHO"]) > 0
    assert np.array_equal(np.asarray(first["mask_2ndHO"]) > 0, ~one)
    assert dataset["train"].info.license == "CC BY 4.0" and "Doe J" in dataset["train"].info.citation
    # the training record reads the licence from the dataset's metadata
    record = dataset_provenance({"dataset_name": str(saved)})
    assert record["license"] == "cc-by-4.0" and record["attribution"] == "Doe J. Tiny, 2026."


@pytest.mark.parametrize("argv, message", [
    (["--split", "train=Image_*", "--split", "test=Image_1*"], "matches the splits"),
    (["--split", "train=Nothing*"], "matches no image stem"),
    (["--split", "train"], "expected NAME=PATTERNS"),
    (["--masks", "1stHO:_wrong"], "has no mask for image 'Image_01L'"),
])
def test_script_errors_name_the_problem(tmp_path, capsys, argv, message):
    data = write_chase_like(tmp_path / "data")
    with pytest.raises(SystemExit) if "NAME=PATTERNS" in message else _returns(2):
        make_hf_dataset.main(["--data_dir", str(data), "--output_dir", str(tmp_path / "out"), *argv])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


class _returns:
    """Context manager standing in for pytest.raises when main() returns an exit code instead of raising."""

    def __init__(self, code):
        self.code = code

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_existing_output_needs_overwrite(saved, capsys):
    with pytest.raises(SystemExit):
        make_hf_dataset.main(["--data_dir", str(saved.parent / "chase_like"), "--output_dir", str(saved)])
    assert "--overwrite" in capsys.readouterr().err


def test_dataset_name_honours_split_and_stem_flags_without_decoding(saved, monkeypatch):
    import datasets

    decoded = []
    original = datasets.features.Image.decode_example
    monkeypatch.setattr(datasets.features.Image, "decode_example",
                        lambda self, value, token_per_repo_id=None: decoded.append(1) or original(self, value))
    train, validation = build_datasets(data_args(saved))
    assert len(train) == 3 and validation is None
    train, validation = build_datasets(data_args(saved, train_stems="Image_01*", validation_split="test",
                                                 validation_stems="Image_11L"))
    assert list(train.dataset["name"]) == ["Image_01L", "Image_01R"]  # one column read, no image decoded
    assert len(validation) == 1
    _, validation = build_datasets(data_args(saved, validation_stems="Image_02L"))  # rows of --dataset_split
    assert len(validation) == 1
    assert decoded == []  # splits, stems and names came from the name column alone
    item = validation[0]
    assert item["name"] == "Image_02L" and item["mask"].shape == (40, 40) and len(decoded) == 2
    train, _ = build_datasets(data_args(saved, dataset_split="test", mask_column="mask_2ndHO"))
    assert len(train) == 2


@pytest.mark.parametrize("changes, message", [
    (dict(dataset_split="validation"), "--dataset_split 'validation' is not a split of the dataset"),
    (dict(validation_split="dev"), "--validation_split 'dev'"),
    (dict(train_stems="Nope*"), "--train_stems 'Nope*' matches no row"),
    (dict(validation_stems="Image_01L", stem_column="stem"), "--validation_stems selects rows by the 'stem' column"),
    (dict(mask_column="mask"), "Column 'mask' (`mask_column`)"),
])
def test_dataset_name_refuses_what_it_cannot_honour(saved, changes, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        build_datasets(data_args(saved, **changes))


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_training_script_reads_the_saved_dataset(saved, tmp_path):
    import os
    import subprocess

    from testing_utils import SEGMENTATION_SCRIPT as SCRIPT
    from testing_utils import TINY_SEGMENTATION as TINY

    out = tmp_path / "run"
    command = [sys.executable, str(SCRIPT), "--dataset_name", str(saved), "--mask_column", "mask_1stHO",
               "--validation_split", "test", "--validation_stems", "Image_11L", "--validation_crop", "32",
               "--validation_steps", "1", *TINY, "--max_train_steps", "1", "--output_dir", str(out)]
    result = subprocess.run(command, cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=1200)  # one step; the time is start-up
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((out / "training_info.json").read_text())
    assert info["dataset"]["license"] == "cc-by-4.0" and info["validation_dice"] is not None
    card = (out / "README.md").read_text()
    assert "license: cc-by-4.0" in card and "Doe J" in card
