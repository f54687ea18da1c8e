"""Tests of the ``diffusers-retina`` command line (``segment`` and ``demo``).

A tiny saved pipeline (a (8, 16)-channel UNet without attention, x0-prediction DDIM) and small images keep every run
well under a second; the CHASE_DB1 row of the demo uses ``--chase-crop`` for the same reason.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from diffusers_retina import SegmentationEnsemblePipeline, cli
from diffusers_retina.cli import common as cli_common, segment as cli_segment
from diffusers_retina.cli.main import _apply_offline_mode
from diffusers_retina.data import default_chase_db1_root

MAPS = ("mask", "probability", "entropy", "variance", "mutual_information")
FAST = ["--ensemble-size", "3", "--steps", "2", "--tile-size", "32"]


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A saved SegmentationEnsemblePipeline small enough for full-size CLI runs on a busy CPU."""
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=32,
        in_channels=4,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        add_attention=False,  # attention at full resolution would dominate the run time
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    path = tmp_path_factory.mktemp("pipeline") / "tiny"
    SegmentationEnsemblePipeline(unet=unet, scheduler=DDIMScheduler(prediction_type="sample")).save_pretrained(path)
    return path


def write_image(path: Path, height: int, width: int, mode: str = "RGB", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    PIL.Image.fromarray(array if channels == 3 else array[..., 0], mode=mode).save(path)
    return path


def write_truncated_png(path: Path) -> Path:
    write_image(path, 24, 24, seed=7)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def image_folder(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    write_image(folder / "b_eye.jpg", 32, 40, seed=1)
    write_image(folder / "a_eye.png", 37, 45, seed=2)  # odd size: padded and cropped back
    write_image(folder / "c_eye.bmp", 20, 16, mode="L", seed=3)  # grey: converted to RGB
    (folder / "notes.txt").write_text("not an image")
    return folder


def segment(inputs: List[Path], output_dir: Path, pipeline: Path, *extra: str) -> int:
    argv = ["segment", *map(str, inputs), "--output-dir", str(output_dir), "--pipeline", str(pipeline), *FAST]
    return cli.main([*argv, *extra])


def leftovers(folder: Path) -> List[str]:
    """Temporary (hidden) files left behind in an output folder."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp")


# ------------------------------------------------------------------------------------------------ segment


def test_segment_single_file(tiny_pipeline_dir, tmp_path, capsys):
    image = write_image(tmp_path / "fundus.png", 37, 45)
    output_dir = tmp_path / "out"
    assert segment([image], output_dir, tiny_pipeline_dir, "--save-members") == 0

    expected = {f"fundus_{name}.png" for name in MAPS} | {f"fundus_member{k}.png" for k in (1, 2, 3)}
    assert {p.name for p in output_dir.iterdir()} == expected | {"summary.json", "results.jsonl"}
    mask = np.asarray(PIL.Image.open(output_dir / "fundus_mask.png"))
    assert mask.shape == (37, 45) and mask.dtype == np.uint8
    assert set(np.unique(mask).tolist()) <= {0, 255}
    for name in MAPS[1:]:
        with PIL.Image.open(output_dir / f"fundus_{name}.png") as picture:
            assert picture.mode == "L" and picture.size == (45, 37)

    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["status"] == "complete"
    settings = summary["settings"]
    assert settings["ensemble_size"] == 3 and settings["steps"] == 2 and settings["seed"] == 0
    assert settings["scheduler"] == "DDIMScheduler" and settings["pipeline"] == str(tiny_pipeline_dir)
    (record,) = summary["images"]
    assert record["input"] == str(image) and (record["width"], record["height"]) == (45, 37)
    assert record["seconds"] > 0 and 0.0 <= record["mean_entropy"] <= np.log(2) + 1e-6
    assert record["foreground_fraction"] == pytest.approx((mask == 255).mean())
    assert sorted(record["outputs"]) == sorted(expected)
    assert "[1/1]" in capsys.readouterr().out


def test_segment_processing_resolution(tiny_pipeline_dir, tmp_path, capsys):
    """--processing-resolution reaches the pipeline: a fixed longer side is recorded in the row and the outputs keep
    the input's size; the default (auto) keeps a pipeline without a training diameter at the input's size."""
    image = write_image(tmp_path / "fundus.png", 30, 40)
    assert segment([image], tmp_path / "fixed", tiny_pipeline_dir, "--processing-resolution", "64") == 0
    (record,) = json.loads((tmp_path / "fixed" / "summary.json").read_text())["images"]
    assert record["processing_basis"] == "fixed" and (record["processing_height"], record["processing_width"]) == (
        48, 64)
    assert np.asarray(PIL.Image.open(tmp_path / "fixed" / "fundus_mask.png")).shape == (30, 40)
    assert "segmented at 48x64, x1.60 by fixed" in capsys.readouterr().out
    assert segment([image], tmp_path / "auto", tiny_pipeline_dir) == 0
    summary = json.loads((tmp_path / "auto" / "summary.json").read_text())
    assert summary["settings"]["processing_resolution"] == "auto"
    assert summary["images"][0]["processing_basis"] == "native"
    expect_error(["segment", str(image), "--output-dir", str(tmp_path / "bad"), "--pipeline", str(tiny_pipeline_dir),
                  "--processing-resolution", "big"], capsys, "--processing-resolution", code=2)
    # --camera-degrees needs a checkpoint that knows its training angle: refused before anything is written
    expect_error(["segment", str(image), "--output-dir", str(tmp_path / "angle"), "--pipeline",
                  str(tiny_pipeline_dir), "--camera-degrees", "45"], capsys, "--camera-degrees",
                 "field_of_view_degrees")
    assert not (tmp_path / "angle").exists()


def test_segment_folder_and_scheduler(tiny_pipeline_dir, image_folder, tmp_path):
    output_dir = tmp_path / "nested" / "out"
    assert segment([image_folder], output_dir, tiny_pipeline_dir, "--scheduler", "dpm", "--fusion", "majority") == 0
    stems = ("a_eye", "b_eye", "c_eye")
    assert {p.name for p in output_dir.iterdir()} == ({f"{s}_{m}.png" for s in stems for m in MAPS}
                                                     | {"summary.json", "results.jsonl"})
    summary = json.loads((output_dir / "summary.json").read_text())
    assert [Path(r["input"]).stem for r in summary["images"]] == list(stems)  # sorted, notes.txt skipped
    assert summary["settings"]["scheduler"] == "DPMSolverMultistepScheduler"
    for record in summary["images"]:
        with PIL.Image.open(Path(record["input"])) as source, PIL.Image.open(
            output_dir / f"{Path(record['input']).stem}_mask.png"
        ) as mask:
            assert mask.size == source.size
            assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}
    assert leftovers(output_dir) == []


@pytest.mark.parametrize("scheduler", sorted(cli.SCHEDULERS))
def test_every_scheduler_flag(scheduler, tiny_pipeline_dir, tmp_path):
    image = write_image(tmp_path / "eye.png", 16, 16)
    assert segment([image], tmp_path / "out", tiny_pipeline_dir, "--scheduler", scheduler) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["settings"]["scheduler"] == cli.SCHEDULERS[scheduler]
    assert (tmp_path / "out" / "eye_mask.png").is_file()


def test_same_seed_same_files(tiny_pipeline_dir, tmp_path):
    image = write_image(tmp_path / "eye.png", 40, 40)
    runs = {}
    for name, seed in (("first", 0), ("second", 0), ("other", 1)):
        segment([image], tmp_path / name, tiny_pipeline_dir, "--seed", str(seed))
        runs[name] = {m: (tmp_path / name / f"eye_{m}.png").read_bytes() for m in MAPS}
    assert runs["first"] == runs["second"]
    assert runs["first"]["probability"] != runs["other"]["probability"]


# ------------------------------------------------------------------------------------------------ errors


def expect_error(argv: List[str], capsys, *needles: str, code: int = 1) -> str:
    with pytest.raises(SystemExit) as raised:
        cli.main(argv)
    assert raised.value.code == code
    error = capsys.readouterr().err
    for needle in needles:
        assert needle in error, error
    return error


@pytest.mark.parametrize(
    "case", ["missing", "empty_folder", "unreadable", "truncated", "output_is_file", "duplicate_stem"]
)
def test_bad_inputs_name_the_file(case, tiny_pipeline_dir, tmp_path, capsys):
    output_dir = tmp_path / "out"
    good = write_image(tmp_path / "good.png", 16, 16)
    if case == "missing":
        inputs, needle = [good, tmp_path / "nope.png"], "nope.png"
    elif case == "empty_folder":
        folder = tmp_path / "empty"
        folder.mkdir()
        (folder / "readme.txt").write_text("no images here")
        inputs, needle = [folder], str(folder)
    elif case == "unreadable":
        bad = tmp_path / "fake.png"
        bad.write_text("this is not a PNG")
        inputs, needle = [good, bad], str(bad)
    elif case == "truncated":
        inputs, needle = [good, write_truncated_png(tmp_path / "cut.png")], "cut.png"
    elif case == "output_is_file":
        output_dir.write_text("a file where the folder should be")
        inputs, needle = [good], str(output_dir)
    else:
        other = tmp_path / "other"
        other.mkdir()
        inputs, needle = [good, write_image(other / "good.jpg", 16, 16)], "good.jpg"
    argv = ["segment", *map(str, inputs), "--output-dir", str(output_dir), "--pipeline", str(tiny_pipeline_dir)]
    expect_error(argv, capsys, needle)
    # validation happens before anything is written
    assert output_dir.is_file() if case == "output_is_file" else not output_dir.exists()


def test_truncated_image_in_folder_leaves_no_partial_files(tiny_pipeline_dir, image_folder, tmp_path, capsys):
    write_truncated_png(image_folder / "d_broken.png")
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "keep.txt").write_text("existing content is left alone")
    expect_error(["segment", str(image_folder), "--output-dir", str(output_dir), "--pipeline",
                  str(tiny_pipeline_dir)], capsys, "d_broken.png")
    assert sorted(p.name for p in output_dir.iterdir()) == ["keep.txt"]


def test_failure_mid_way_keeps_finished_images(tiny_pipeline_dir, image_folder, tmp_path, capsys, monkeypatch):
    calls = []
    original = cli.segment_images

    def flaky(pipe, images, args):
        calls.append([image.shape for image in images])
        if len(calls) == 2:
            raise RuntimeError("simulated out-of-memory")
        return original(pipe, images, args)

    monkeypatch.setattr(cli_segment, "segment_images", flaky)
    output_dir = tmp_path / "out"
    expect_error(["segment", str(image_folder), "--output-dir", str(output_dir), "--pipeline",
                  str(tiny_pipeline_dir), *FAST], capsys, "b_eye.jpg", "simulated out-of-memory")
    assert {p.name for p in output_dir.iterdir()} == {f"a_eye_{m}.png" for m in MAPS} | {"summary.json", "results.jsonl"}
    for name in MAPS:  # the finished image is complete and readable
        with PIL.Image.open(output_dir / f"a_eye_{name}.png") as picture:
            picture.load()
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"]["input"].endswith("b_eye.jpg")
    assert [Path(r["input"]).name for r in summary["images"]] == ["a_eye.png"]


def test_bad_pipeline_and_settings(tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    image = str(write_image(tmp_path / "eye.png", 16, 16))
    base = ["segment", image, "--output-dir", str(tmp_path / "out")]
    # the embedded default is absent: tell the user to pass --pipeline
    monkeypatch.setattr(cli_common, "DEFAULT_PIPELINE", tmp_path / "no-checkpoint")
    expect_error(base, capsys, "--pipeline", "no-checkpoint")
    # a folder that is not a saved pipeline, and a Hub id that is not in the (offline) cache
    expect_error([*base, "--pipeline", str(tmp_path)], capsys, str(tmp_path), "model_index.json")
    expect_error([*base, "--pipeline", "nobody/not-a-cached-repo"], capsys, "nobody/not-a-cached-repo",
                 "HF_HUB_OFFLINE")
    # a tile size the UNet cannot take names the flag; argparse rejects out-of-range values with code 2
    expect_error([*base, "--pipeline", str(tiny_pipeline_dir), "--tile-size", "31"], capsys, "--tile-size")
    expect_error([*base, "--threshold", "1.5"], capsys, "--threshold", code=2)
    expect_error([*base, "--batch-size", "0"], capsys, "--batch-size", "auto", code=2)
    expect_error([*base, "--batch-size", "fast"], capsys, "--batch-size", code=2)
    assert not (tmp_path / "out").exists()


def test_batch_size_flag_reaches_the_pipeline(tiny_pipeline_dir, tmp_path, monkeypatch):
    image = write_image(tmp_path / "eye.png", 40, 40)
    seen = []
    original = SegmentationEnsemblePipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append(kwargs["batch_size"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SegmentationEnsemblePipeline, "__call__", spy)
    segment([image], tmp_path / "auto", tiny_pipeline_dir)
    segment([image], tmp_path / "two", tiny_pipeline_dir, "--batch-size", "2")
    assert seen == ["auto", 2]
    for name in MAPS:  # same seed: the output does not depend on the batch size
        assert (tmp_path / "auto" / f"eye_{name}.png").read_bytes() == (tmp_path / "two" / f"eye_{name}.png").read_bytes()


def test_offline_mode_reaches_huggingface_hub(monkeypatch):
    """huggingface_hub is imported (by the package) before the CLI runs, so it updates its constant too."""
    import huggingface_hub.constants

    assert os.environ.get("HF_HUB_OFFLINE") and huggingface_hub.constants.HF_HUB_OFFLINE is True
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _apply_offline_mode()
    assert huggingface_hub.constants.is_offline_mode()


@pytest.mark.filterwarnings("ignore:'diffusers_retina.cli' found in sys.modules:RuntimeWarning")
def test_module_entry_point_in_process(tiny_pipeline_dir, tmp_path, monkeypatch):
    """``python -m diffusers_retina.cli`` (the ``__main__`` block), run in this process to keep it fast."""
    image = write_image(tmp_path / "eye.png", 16, 16)
    argv = ["diffusers-retina", "segment", str(image), "--output-dir", str(tmp_path / "out"), "--pipeline",
            str(tiny_pipeline_dir), *FAST]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as raised:
        runpy.run_module("diffusers_retina.cli", run_name="__main__", alter_sys=False)
    assert raised.value.code == 0
    assert (tmp_path / "out" / "eye_mask.png").is_file()


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_console_script(tiny_pipeline_dir, tmp_path):
    """The installed ``diffusers-retina`` entry point (or ``python -m`` without it) in a fresh process."""
    image = write_image(tmp_path / "eye.png", 16, 16)
    script = Path(sys.executable).with_name("diffusers-retina")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "diffusers_retina.cli"]
    if not script.is_file() and shutil.which("diffusers-retina"):
        command = [shutil.which("diffusers-retina")]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    ok = subprocess.run([*command, "segment", str(image), "--output-dir", str(tmp_path / "out"), "--pipeline",
                         str(tiny_pipeline_dir), *FAST, "--threads", "1"],
                        capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "eye.png" in ok.stdout and (tmp_path / "out" / "summary.json").is_file()


# ------------------------------------------------------------------------------------------------ demo


def run_demo(pipeline: Path, output: Path, *extra: str) -> dict:
    assert cli.main(["demo", "--pipeline", str(pipeline), "--output", str(output), "--retina-size", "64",
                     "--ensemble-size", "2", "--chase-crop", "64", *extra]) == 0
    return json.loads(output.with_suffix(".json").read_text())


def test_demo_writes_panel_and_figures(tiny_pipeline_dir, tmp_path, capsys):
    output = tmp_path / "panel" / "demo_panel.png"
    report = run_demo(tiny_pipeline_dir, output)
    stdout = capsys.readouterr().out
    assert "resized to 64x64" in stdout

    retina = report["images"][0]
    assert (retina["width"], retina["height"]) == (64, 64) and "skimage.data.retina()" in retina["description"]
    assert retina["seconds"] > 0 and 0.0 <= retina["mean_entropy"] <= np.log(2) + 1e-6
    with PIL.Image.open(output) as panel:
        assert panel.format == "PNG" and panel.height >= len(report["images"]) * 256
        # input | 2 members | fused mask | entropy | reference
        assert panel.width >= 6 * 64
    assert output.stat().st_size < 2_000_000
    assert leftovers(output.parent) == []

    if default_chase_db1_root() is None:
        assert report["chase_db1"] == "absent" and len(report["images"]) == 1
        pytest.skip("CHASE_DB1 not found: only the skimage row was checked")
    chase = report["images"][1]
    assert report["chase_db1"] == "present" and "Image_11L" in chase["description"]
    assert (chase["width"], chase["height"]) == (64, 64)
    for metric in ("dice", "cldice", "auc_roc", "ece"):
        assert 0.0 <= chase["metrics"][metric] <= 1.0
    assert chase["mean_entropy_error_pixels"] >= 0 and chase["mean_entropy_correct_pixels"] >= 0
    assert "Dice" in stdout and "AUC-ROC" in stdout


def test_demo_without_chase_and_without_skimage(tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFUSERS_RETINA_DATA", str(tmp_path / "no-data"))
    report = run_demo(tiny_pipeline_dir, tmp_path / "panel.png", "--seed", "3")
    assert report["chase_db1"] == "absent" and len(report["images"]) == 1
    assert report["settings"]["seed"] == 3
    assert "CHASE_DB1 not found" in capsys.readouterr().out

    monkeypatch.setitem(sys.modules, "skimage", None)  # import skimage now raises ImportError
    expect_error(["demo", "--pipeline", str(tiny_pipeline_dir), "--output", str(tmp_path / "x.png")], capsys,
                 "diffusers-retina[demo]")
    assert not (tmp_path / "x.png").exists()
