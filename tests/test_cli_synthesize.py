"""``diffusers-retina synthesize``: masks (or a count) in, a folder-pair dataset (images/ + masks/) out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from diffusers_retina import Mask2ImagePipeline, cli
from diffusers_retina.data import FolderPairDataset
from diffusers_retina.models import ConditionalUNet2DModel

FAST = ["--steps", "2", "--guidance-scale", "1.5"]


@pytest.fixture(scope="module")
def synthesis_pipelines(tmp_path_factory):
    """Saved tiny Mask2ImagePipelines: with and without a mask model."""
    torch.manual_seed(0)
    unet = ConditionalUNet2DModel(sample_size=16, conditioning="concat+spade", block_out_channels=(8, 16),
                                  norm_num_groups=4, spade_hidden_channels=8, add_attention=False)
    mask_unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                            norm_num_groups=4, add_attention=False, down_block_types=("DownBlock2D",) * 2,
                            up_block_types=("UpBlock2D",) * 2)
    root = tmp_path_factory.mktemp("synthesis")
    Mask2ImagePipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=100), mask_unet=mask_unet,
                       mask_scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(root / "pairs")
    Mask2ImagePipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=100)).save_pretrained(root / "image")
    return root / "pairs", root / "image"


def write_masks(folder: Path, count=2, size=(20, 28)):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for index in range(count):
        array = (rng.random(size) > 0.7).astype(np.uint8) * 255
        PIL.Image.fromarray(array).save(folder / f"vessels{index}.png")
        arrays[f"vessels{index}"] = array
    return arrays


def test_masks_in_folder_pair_dataset_out(synthesis_pipelines, tmp_path, capsys):
    masks = write_masks(tmp_path / "in")
    out = tmp_path / "out"
    assert cli.main(["synthesize", str(tmp_path / "in"), "--output-dir", str(out), "--pipeline",
                     str(synthesis_pipelines[1]), "--images-per-mask", "2", *FAST]) == 0
    names = sorted(p.stem for p in (out / "images").glob("*.png"))
    assert names == ["vessels0_1", "vessels0_2", "vessels1_1", "vessels1_2"]
    assert names == sorted(p.stem for p in (out / "masks").glob("*.png"))
    for name in names:
        assert np.array_equal(np.asarray(PIL.Image.open(out / "masks" / f"{name}.png")), masks[name[:-2]])
        assert PIL.Image.open(out / "images" / f"{name}.png").size == (28, 20)
    dataset = FolderPairDataset(out)  # the training scripts read the output directly
    assert len(dataset) == 4 and dataset[0]["image"].shape == (3, 20, 28)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and len(summary["pairs"]) == 4
    assert not list(out.rglob("*.tmp"))

    again = tmp_path / "again"
    cli.main(["synthesize", str(tmp_path / "in"), "--output-dir", str(again), "--pipeline", str(synthesis_pipelines[1]),
              "--images-per-mask", "2", *FAST])
    for name in names:  # same seed, same images
        assert np.array_equal(np.asarray(PIL.Image.open(out / "images" / f"{name}.png")),
                              np.asarray(PIL.Image.open(again / "images" / f"{name}.png")))
    assert not np.array_equal(np.asarray(PIL.Image.open(out / "images" / "vessels0_1.png")),
                              np.asarray(PIL.Image.open(out / "images" / "vessels0_2.png")))


def test_crop_paints_the_central_box_of_each_mask(synthesis_pipelines, tmp_path):
    masks = write_masks(tmp_path / "in", count=1, size=(20, 28))
    out = tmp_path / "out"
    assert cli.main(["synthesize", str(tmp_path / "in"), "--crop", "16", "--output-dir", str(out), "--pipeline",
                     str(synthesis_pipelines[1]), *FAST]) == 0
    assert PIL.Image.open(out / "images" / "vessels0.png").size == (16, 16)
    written = np.asarray(PIL.Image.open(out / "masks" / "vessels0.png"))
    assert np.array_equal(written, masks["vessels0"][2:18, 6:22])  # (20 - 16) // 2 rows, (28 - 16) // 2 columns
    assert json.loads((out / "summary.json").read_text())["settings"]["crop"] == 16


def test_count_mode_samples_masks(synthesis_pipelines, tmp_path):
    out = tmp_path / "sampled"
    cli.main(["synthesize", "--num-masks", "2", "--height", "16", "--width", "24", "--output-dir", str(out),
              "--pipeline", str(synthesis_pipelines[0]), *FAST])
    assert sorted(p.name for p in (out / "images").iterdir()) == ["synthetic_0001.png", "synthetic_0002.png"]
    mask = np.asarray(PIL.Image.open(out / "masks" / "synthetic_0001.png"))
    assert mask.shape == (16, 24) and set(np.unique(mask)) <= {0, 255}


@pytest.mark.parametrize(
    "case, message",
    [
        ("both", "not both or neither"),
        ("neither", "not both or neither"),
        ("no_mask_model", "has no mask model"),
        ("bad_mask", "neither binary"),
        ("size_with_masks", "--height/--width"),
        ("bad_tile", "--tile-size"),
        ("crop_too_large", "--crop 32"),
        ("crop_without_masks", "--crop cuts given MASK files"),
    ],
)
def test_errors_name_the_problem_and_write_nothing(synthesis_pipelines, tmp_path, capsys, case, message):
    write_masks(tmp_path / "in")
    out = tmp_path / "out"
    args = ["synthesize", "--output-dir", str(out), "--pipeline", str(synthesis_pipelines[1]), *FAST]
    if case == "both":
        args += [str(tmp_path / "in"), "--num-masks", "2"]
    elif case == "no_mask_model":
        args += ["--num-masks", "2"]
    elif case == "bad_mask":
        PIL.Image.fromarray(np.full((8, 8), 7, np.uint8)).save(tmp_path / "in" / "broken.png")
        args += [str(tmp_path / "in")]
    elif case == "size_with_masks":
        args += [str(tmp_path / "in"), "--height", "32"]
    elif case == "bad_tile":
        args += [str(tmp_path / "in"), "--tile-size", "7"]
    elif case == "crop_too_large":
        args += [str(tmp_path / "in"), "--crop", "32"]
    elif case == "crop_without_masks":
        args = ["synthesize", "--output-dir", str(out), "--pipeline", str(synthesis_pipelines[0]), "--num-masks", "1",
                "--crop", "8", *FAST]
    with pytest.raises(SystemExit) as raised:
        cli.main(args)
    assert raised.value.code == 1
    error = capsys.readouterr().err
    assert message in error
    if case == "bad_mask":
        assert "broken.png" in error
    if case == "crop_too_large":
        assert "vessels0.png" in error and "28x20" in error
    assert not out.exists()
