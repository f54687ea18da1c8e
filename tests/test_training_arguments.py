"""Argument checks of the three training scripts (issue 15): values that used to end in a ZeroDivisionError, an
untrained model saved with exit code 0, or a crash after training (``--mask_pipeline``) are refused up front by
``parser.error`` naming the flag. ``parse_args`` runs in-process: nothing is trained here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testing_utils import load_script, write_folder_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scripts():
    return {name: load_script(name) for name in ("train_segmentation_ensemble", "train_mask2image",
                                                 "train_feature_head")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_folder_dataset(tmp_path_factory.mktemp("arguments") / "pairs", num_images=3)


def parse_error(parse_args, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2  # argparse's usage error, not a traceback
    return capsys.readouterr().err


BAD_OPTIMIZATION_FLAGS = [
    (["--max_train_steps", "0"], "--max_train_steps"),
    (["--num_epochs", "0"], "--num_epochs"),
    (["--checkpointing_steps", "0"], "--checkpointing_steps"),
    (["--validation_steps", "0"], "--validation_steps"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps"),
    (["--train_batch_size", "0"], "--train_batch_size"),
    (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit"),
    (["--learning_rate", "nan"], "--learning_rate"),
    (["--learning_rate", "-1"], "--learning_rate"),
    (["--lr_warmup_steps", "-1"], "--lr_warmup_steps"),
    (["--patches_per_image", "0"], "--patches_per_image"),
    (["--foreground_fraction", "1.5"], "--foreground_fraction"),
    (["--train_batch_size", "13", "--patches_per_image", "4"], "--train_batch_size 13 is larger than an epoch"),
]


@pytest.mark.parametrize("script", ["train_segmentation_ensemble", "train_mask2image"])
@pytest.mark.parametrize("extra, message", BAD_OPTIMIZATION_FLAGS, ids=[m for _, m in BAD_OPTIMIZATION_FLAGS])
def test_bad_optimization_flags_are_refused_up_front(scripts, data, tmp_path, capsys, script, extra, message):
    argv = ["--train_data_dir", str(data), "--output_dir", str(tmp_path / "out"), *extra]
    assert message in parse_error(scripts[script].parse_args, argv, capsys)
    assert not (tmp_path / "out").exists()


def test_a_batch_that_fits_an_epoch_passes(scripts, data, tmp_path):
    # 3 images x 4 patches = 12 patches: a batch of 12 is one full batch
    args = scripts["train_segmentation_ensemble"].parse_args(
        ["--train_data_dir", str(data), "--output_dir", str(tmp_path), "--train_batch_size", "12",
         "--patches_per_image", "4", "--max_train_steps", "1", "--checkpointing_steps", "1"])
    assert args.train_batch_size == 12 and args.max_train_steps == 1


def test_a_missing_data_folder_and_an_incomplete_resume_checkpoint(scripts, data, tmp_path, capsys):
    parse_args = scripts["train_segmentation_ensemble"].parse_args
    error = parse_error(parse_args, ["--train_data_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path)],
                        capsys)
    assert "--train_data_dir" in error and "nowhere" in error
    (tmp_path / "checkpoint-3").mkdir()  # interrupted: no completion marker
    error = parse_error(parse_args, ["--train_data_dir", str(data), "--output_dir", str(tmp_path),
                                     "--resume_from_checkpoint", str(tmp_path / "checkpoint-3")], capsys)
    assert "--resume_from_checkpoint" in error and "not a complete checkpoint" in error


def write_mask_pipeline(folder: Path, out_channels: int = 1, weights: bool = True) -> Path:
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline",
                                                         "unet": ["diffusers", "UNet2DModel"]}))
    (folder / "unet" / "config.json").write_text(json.dumps({"out_channels": out_channels}))
    if weights:
        (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    return folder


def test_mask_pipeline_is_checked_before_training(scripts, data, tmp_path, capsys):
    parse_args = scripts["train_mask2image"].parse_args
    common = ["--train_data_dir", str(data), "--output_dir", str(tmp_path / "out")]
    for folder, message in [
        (tmp_path / "missing", "no such folder"),
        (tmp_path / "empty", "model_index.json"),
        (write_mask_pipeline(tmp_path / "three_classes", out_channels=3), "needs 1"),
        (write_mask_pipeline(tmp_path / "pickled", weights=False), "no .safetensors"),
    ]:
        folder.mkdir(exist_ok=True) if folder.name == "empty" else None
        error = parse_error(parse_args, common + ["--mask_pipeline", str(folder)], capsys)
        assert "--mask_pipeline" in error and message in error, error
    good = write_mask_pipeline(tmp_path / "good")
    assert parse_args(common + ["--mask_pipeline", str(good)]).mask_pipeline == str(good)


@pytest.mark.parametrize("extra, message", [
    (["--max_train_steps", "0"], "--max_train_steps"),
    (["--pixels_per_step", "0"], "--pixels_per_step"),
    (["--crops_per_image", "0"], "--crops_per_image"),
    (["--ensemble_size", "0"], "--ensemble_size"),
    (["--learning_rate", "inf"], "--learning_rate"),
    (["--timesteps", "50,abc"], "--timesteps"),
    (["--blocks", ","], "--blocks"),
])
def test_feature_head_flags(scripts, data, tmp_path, capsys, extra, message):
    ddpm = write_mask_pipeline(tmp_path / "ddpm", out_channels=3)
    argv = ["--ddpm", str(ddpm), "--train_data_dir", str(data), "--output_dir", str(tmp_path / "out"), *extra]
    assert message in parse_error(scripts["train_feature_head"].parse_args, argv, capsys)


def test_feature_head_ddpm_folder_is_checked(scripts, data, tmp_path, capsys):
    argv = ["--ddpm", str(tmp_path / "none"), "--train_data_dir", str(data), "--output_dir", str(tmp_path / "o")]
    error = parse_error(scripts["train_feature_head"].parse_args, argv, capsys)
    assert "--ddpm" in error and "no such folder" in error
