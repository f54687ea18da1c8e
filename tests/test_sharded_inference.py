"""Sharded, resumable folder inference of ``diffusers-retina segment | synthesize | features``
(:mod:`diffusers_retina.sharded_inference`).

* two CPU processes (``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m diffusers_retina.cli``)
  share a folder: every image is done exactly once, by one of the two ranks, the rank files are merged into one
  ``results.jsonl`` in input order, and the outputs equal those of a one-process run that segments image by image;
* a rerun skips finished inputs, redoes inputs whose outputs are missing, and ``--overwrite`` redoes everything;
  Ctrl-C marks the summary ``interrupted``, rank files of a killed run are merged, other settings are refused;
* ``--image-batch-size`` changes the calls, not the outputs; ``--device`` takes any torch device string, checked.

Tiny random pipelines saved to tmp folders keep each run within seconds.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from safetensors import safe_open

from diffusers_retina import DiffusionFeaturePipeline, Mask2ImagePipeline, SegmentationEnsemblePipeline, cli
from diffusers_retina.cli import segment as cli_segment
from diffusers_retina.models import ConditionalUNet2DModel, PixelMLPEnsemble
from diffusers_retina.sharded_inference import WorkItem, append_row, make_batches, read_rows

REPO = Path(__file__).resolve().parents[1]
MAPS = ("mask", "probability", "entropy", "variance", "mutual_information")
SEGMENT_FAST = ["--ensemble-size", "2", "--steps", "2", "--tile-size", "0", "--device", "cpu"]
SIZES = [(24, 32), (20, 20), (24, 32), (20, 20), (24, 32)]  # two sizes: batches of one size only


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> Dict[str, Path]:
    """Saved tiny segmentation, mask-to-image and feature pipelines."""
    root = tmp_path_factory.mktemp("pipelines")
    torch.manual_seed(0)
    small = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, add_attention=False,
                 down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    SegmentationEnsemblePipeline(unet=UNet2DModel(sample_size=32, in_channels=4, out_channels=1, **small),
                                 scheduler=DDIMScheduler(prediction_type="sample")).save_pretrained(root / "segment")
    unet = ConditionalUNet2DModel(sample_size=16, conditioning="concat+spade", block_out_channels=(8, 16),
                                  norm_num_groups=4, spade_hidden_channels=8, add_attention=False)
    Mask2ImagePipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=100)).save_pretrained(root / "synthesize")
    head = PixelMLPEnsemble(blocks=["up.0", "up.1"], timesteps=[10, 30], block_channels=[16, 8], ensemble_size=2,
                            hidden_channels=(8, 4))
    features = DiffusionFeaturePipeline(unet=UNet2DModel(sample_size=32, in_channels=3, out_channels=3, **small),
                                        scheduler=DDPMScheduler(num_train_timesteps=100), head=head)
    features.save_pretrained(root / "features")
    return {"segment": root / "segment", "synthesize": root / "synthesize", "features": root / "features"}


def write_images(folder: Path, sizes=SIZES) -> List[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (height, width) in enumerate(sizes):
        array = np.random.default_rng(index).integers(0, 256, (height, width, 3), dtype=np.uint8)
        paths.append(folder / f"eye{index}.png")
        PIL.Image.fromarray(array).save(paths[-1])
    return paths


def write_masks(folder: Path, count: int = 3) -> List[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        array = (np.random.default_rng(10 + index).random((16, 24)) > 0.7).astype(np.uint8) * 255
        paths.append(folder / f"vessels{index}.png")
        PIL.Image.fromarray(array).save(paths[-1])
    return paths


def segment(inputs, output_dir: Path, pipeline: Path, *extra: str) -> int:
    return cli.main(["segment", *map(str, inputs), "--output-dir", str(output_dir), "--pipeline", str(pipeline),
                     *SEGMENT_FAST, *extra])


def summary_of(output_dir: Path) -> dict:
    return json.loads((output_dir / "summary.json").read_text())


def rows_of(output_dir: Path) -> List[dict]:
    return read_rows(output_dir / "results.jsonl")


def file_bytes(output_dir: Path, pattern: str = "*.png") -> Dict[str, bytes]:
    return {path.relative_to(output_dir).as_posix(): path.read_bytes() for path in sorted(output_dir.rglob(pattern))}


@pytest.fixture
def count_segment_calls(monkeypatch):
    """Spy on ``cli.segment_images``: the number of images of each pipeline call."""
    calls: List[List[tuple]] = []
    original = cli.segment_images

    def spy(pipe, images, args):
        calls.append([image.shape[:2] for image in images])
        return original(pipe, images, args)

    monkeypatch.setattr(cli_segment, "segment_images", spy)
    return calls


# ------------------------------------------------------------------------------------------------ two processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_cpu_processes(cli_args: List[str]) -> subprocess.CompletedProcess:
    """``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m diffusers_retina.cli <cli_args>``
    (two gloo ranks on the CPU, one thread each), as in tests/test_multiprocess.py."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port()),
               "-m", "diffusers_retina.cli", *cli_args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    return result


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
@pytest.mark.parametrize("command", ["segment", "synthesize", "features"])
def test_two_processes_share_the_folder_each_input_exactly_once(command, pipelines, tmp_path):
    if command == "segment":
        inputs = write_images(tmp_path / "in")
        common = [str(tmp_path / "in"), "--pipeline", str(pipelines["segment"]), *SEGMENT_FAST]
    elif command == "features":
        inputs = write_images(tmp_path / "in")
        common = [str(tmp_path / "in"), "--pipeline", str(pipelines["features"]), "--device", "cpu"]
    else:
        inputs = write_masks(tmp_path / "in", count=5)
        common = [str(tmp_path / "in"), "--pipeline", str(pipelines["synthesize"]), "--steps", "2", "--device", "cpu"]
    names = [path.stem for path in inputs]
    shared = tmp_path / "two"
    log = launch_two_cpu_processes([command, *common, "--output-dir", str(shared), "--image-batch-size", "2"])

    # every input exactly once, the rows merged in input order, the work split between both ranks
    rows = rows_of(shared)
    assert [row["name"] for row in rows] == names
    assert {row["rank"] for row in rows} == {0, 1}
    ranks = [row["rank"] for row in rows]
    assert sorted(ranks) == [0, 0, 0, 1, 1]  # split_between_processes: 3 + 2 of 5
    assert not list(shared.glob("results.rank*.jsonl")) and not list(shared.rglob("*.tmp"))
    output = log.stdout
    for path in inputs:
        assert sum(f"] {path}" in line for line in output.splitlines()) == 1, output
    assert "[rank 0]" in output and "[rank 1]" in output
    summary = summary_of(shared)
    assert summary["status"] == "complete" and summary["num_processes"] == 2
    assert summary["inputs"] == summary["done"] == 5 and summary["skipped"] == 0
    for row in rows:
        assert all((shared / name).is_file() for name in row["outputs"])

    # the same files as one process going image by image
    single = tmp_path / "one"
    assert cli.main([command, *common, "--output-dir", str(single), "--image-batch-size", "1"]) == 0
    assert file_bytes(single) == file_bytes(shared)
    assert len(file_bytes(shared)) == {"segment": 5 * len(MAPS), "synthesize": 10, "features": 15}[command]

    # a rerun under two processes finds everything done
    again = launch_two_cpu_processes([command, *common, "--output-dir", str(shared), "--image-batch-size", "2"])
    assert "(5 already done)" in again.stdout and summary_of(shared)["skipped"] == 5
    assert [row["name"] for row in rows_of(shared)] == names


# ------------------------------------------------------------------------------------------------ resuming


def test_rerun_skips_finished_images_and_overwrite_redoes_them(pipelines, tmp_path, count_segment_calls):
    write_images(tmp_path / "in", SIZES[:3])
    out = tmp_path / "out"
    assert segment([tmp_path / "in"], out, pipelines["segment"]) == 0
    assert len(count_segment_calls) == 3
    first_rows = {row["name"]: row for row in rows_of(out)}
    first_files = file_bytes(out)

    # a stopped run: one image's outputs missing, the summary still "running"
    (out / "eye1_mask.png").unlink()
    data = summary_of(out)
    data["status"] = "running"
    (out / "summary.json").write_text(json.dumps(data))
    count_segment_calls.clear()
    assert segment([tmp_path / "in"], out, pipelines["segment"]) == 0
    assert count_segment_calls == [[(20, 20)]]  # only eye1 again
    rows = {row["name"]: row for row in rows_of(out)}
    assert list(rows) == ["eye0", "eye1", "eye2"]
    assert rows["eye0"] == first_rows["eye0"] and rows["eye2"] == first_rows["eye2"]  # kept as they were
    assert file_bytes(out) == first_files  # same seed: eye1 came back identical
    summary = summary_of(out)
    assert summary["status"] == "complete" and summary["skipped"] == 2 and summary["done"] == 3
    assert [Path(row["input"]).name for row in summary["images"]] == ["eye0.png", "eye1.png", "eye2.png"]

    # nothing to do, then --overwrite redoes all three
    count_segment_calls.clear()
    assert segment([tmp_path / "in"], out, pipelines["segment"]) == 0
    assert count_segment_calls == []
    assert segment([tmp_path / "in"], out, pipelines["segment"], "--overwrite") == 0
    assert len(count_segment_calls) == 3
    assert summary_of(out)["skipped"] == 0 and len(rows_of(out)) == 3

    # a subset of the inputs: its summary lists those, results.jsonl keeps every row
    assert segment([tmp_path / "in" / "eye2.png"], out, pipelines["segment"]) == 0
    assert [row["name"] for row in summary_of(out)["images"]] == ["eye2"]
    assert [row["name"] for row in rows_of(out)] == ["eye2", "eye0", "eye1"]


def test_interrupted_run_says_so_and_the_rerun_continues(pipelines, tmp_path, monkeypatch):
    write_images(tmp_path / "in", SIZES[:3])
    out = tmp_path / "out"
    original = cli.segment_images
    calls = []

    def interrupted(pipe, images, args):
        calls.append(len(images))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(pipe, images, args)

    monkeypatch.setattr(cli_segment, "segment_images", interrupted)
    with pytest.raises(KeyboardInterrupt):
        segment([tmp_path / "in"], out, pipelines["segment"])
    summary = summary_of(out)
    assert summary["status"] == "interrupted" and [row["name"] for row in summary["images"]] == ["eye0"]
    assert [row["name"] for row in rows_of(out)] == ["eye0"] and not list(out.glob("results.rank*.jsonl"))

    monkeypatch.setattr(cli_segment, "segment_images", original)
    assert segment([tmp_path / "in"], out, pipelines["segment"]) == 0
    summary = summary_of(out)
    assert summary["status"] == "complete" and summary["skipped"] == 1 and summary["done"] == 3


def test_rank_files_of_a_killed_run_are_merged(pipelines, tmp_path, count_segment_calls):
    write_images(tmp_path / "in", SIZES[:2])
    out = tmp_path / "out"
    assert segment([tmp_path / "in"], out, pipelines["segment"]) == 0
    rows = rows_of(out)
    # as a killed 2-process run leaves them: rows in rank files (one with a torn last line), no merged file
    (out / "results.jsonl").unlink()
    append_row(out / "results.rank0.jsonl", rows[0])
    append_row(out / "results.rank1.jsonl", rows[1])
    with open(out / "results.rank1.jsonl", "a") as file:
        file.write('{"name": "eye9", "outp')
    count_segment_calls.clear()
    assert segment([tmp_path / "in"], out, pipelines["segment"]) == 0
    assert count_segment_calls == []
    assert rows_of(out) == rows and not list(out.glob("results.rank*.jsonl"))
    assert summary_of(out)["status"] == "complete"


def test_other_settings_are_refused_unless_overwrite(pipelines, tmp_path, capsys):
    write_images(tmp_path / "in", SIZES[:1])
    out = tmp_path / "out"
    assert segment([tmp_path / "in"], out, pipelines["segment"]) == 0
    before = file_bytes(out)
    with pytest.raises(SystemExit) as raised:
        segment([tmp_path / "in"], out, pipelines["segment"], "--seed", "1")
    assert raised.value.code == 1
    error = capsys.readouterr().err
    assert "seed: 0 -> 1" in error and "--overwrite" in error and str(out) in error
    assert file_bytes(out) == before
    # settings that do not change the outputs may differ
    assert segment([tmp_path / "in"], out, pipelines["segment"], "--image-batch-size", "4", "--threads", "1") == 0
    assert segment([tmp_path / "in"], out, pipelines["segment"], "--seed", "1", "--overwrite") == 0
    assert file_bytes(out)["eye0_probability.png"] != before["eye0_probability.png"]


def test_failure_on_one_image_records_failed_and_keeps_the_rest(pipelines, tmp_path, monkeypatch, capsys):
    write_images(tmp_path / "in", SIZES[:3])
    out = tmp_path / "out"
    original = cli.segment_images

    def flaky(pipe, images, args):
        if images[0].shape[:2] == (20, 20):
            raise RuntimeError("simulated out-of-memory")
        return original(pipe, images, args)

    monkeypatch.setattr(cli_segment, "segment_images", flaky)
    with pytest.raises(SystemExit):
        segment([tmp_path / "in"], out, pipelines["segment"])
    assert "eye1.png" in capsys.readouterr().err
    summary = summary_of(out)
    assert summary["status"] == "failed" and summary["error"]["input"].endswith("eye1.png")
    assert [row["name"] for row in rows_of(out)] == ["eye0"]
    monkeypatch.setattr(cli_segment, "segment_images", original)
    assert segment([tmp_path / "in"], out, pipelines["segment"]) == 0
    assert summary_of(out)["status"] == "complete" and summary_of(out)["skipped"] == 1


# ------------------------------------------------------------------------------------------------ batches


def test_image_batches_group_sizes_and_change_nothing(pipelines, tmp_path, count_segment_calls):
    write_images(tmp_path / "in")
    assert segment([tmp_path / "in"], tmp_path / "one", pipelines["segment"]) == 0
    count_segment_calls.clear()
    assert segment([tmp_path / "in"], tmp_path / "batched", pipelines["segment"], "--image-batch-size", "2") == 0
    assert count_segment_calls == [[(24, 32)] * 2, [(20, 20)] * 2, [(24, 32)]]
    assert file_bytes(tmp_path / "one") == file_bytes(tmp_path / "batched")
    assert [row["name"] for row in rows_of(tmp_path / "batched")] == [f"eye{i}" for i in range(5)]


def test_make_batches_keeps_groups_apart():
    items = [WorkItem(f"x{i}", f"x{i}", group=group) for i, group in enumerate("aabab")] + [WorkItem("n", "n")]
    assert [[item.name for item in batch] for batch in make_batches(items, 2)] == [["x0", "x1"], ["x2", "x4"], ["x3"],
                                                                                  ["n"]]
    assert [len(batch) for batch in make_batches(items, 1)] == [1] * 6


def test_synthesize_resumes_and_batches(pipelines, tmp_path):
    write_masks(tmp_path / "in")
    common = ["synthesize", str(tmp_path / "in"), "--pipeline", str(pipelines["synthesize"]), "--steps", "2",
              "--images-per-mask", "2"]
    assert cli.main([*common, "--output-dir", str(tmp_path / "one")]) == 0
    assert cli.main([*common, "--output-dir", str(tmp_path / "batched"), "--image-batch-size", "3"]) == 0
    assert file_bytes(tmp_path / "one") == file_bytes(tmp_path / "batched")
    out = tmp_path / "batched"
    assert len(summary_of(out)["pairs"]) == 6 and len(rows_of(out)) == 3
    (out / "images" / "vessels1_2.png").unlink()
    assert cli.main([*common, "--output-dir", str(out)]) == 0
    summary = summary_of(out)
    assert summary["skipped"] == 2 and summary["status"] == "complete" and len(summary["pairs"]) == 6
    assert file_bytes(tmp_path / "one") == file_bytes(out)


def test_features_segmentation_and_feature_files(pipelines, tmp_path):
    write_images(tmp_path / "in", SIZES[:3])
    common = ["features", str(tmp_path / "in"), "--pipeline", str(pipelines["features"]), "--device", "cpu"]
    assert cli.main([*common, "--output-dir", str(tmp_path / "seg")]) == 0
    seg = tmp_path / "seg"
    assert {p.name for p in seg.glob("*.png")} == {f"eye{i}_{m}.png" for i in range(3)
                                                   for m in ("mask", "probability", "uncertainty")}
    mask = np.asarray(PIL.Image.open(seg / "eye1_mask.png"))
    assert mask.shape == (20, 20) and set(np.unique(mask)) <= {0, 255}
    assert summary_of(seg)["settings"]["output"] == "segmentation" and summary_of(seg)["status"] == "complete"
    assert cli.main([*common, "--output-dir", str(tmp_path / "seg2"), "--image-batch-size", "2"]) == 0
    assert file_bytes(seg) == file_bytes(tmp_path / "seg2")

    feats = tmp_path / "feats"
    assert cli.main([*common, "--output-dir", str(feats), "--output", "features", "--blocks", "up.1",
                     "--timesteps", "10,20,30", "--image-batch-size", "2"]) == 0
    with safe_open(str(feats / "eye0_features.safetensors"), framework="pt") as file:
        assert list(file.keys()) == ["up.1"]
        assert tuple(file.get_tensor("up.1").shape) == (3, 8, 24, 32) and file.get_tensor("up.1").dtype == torch.float16
        assert json.loads(file.metadata()["timesteps"]) == [10, 20, 30]
    (feats / "eye2_features.safetensors").unlink()
    assert cli.main([*common, "--output-dir", str(feats), "--output", "features", "--blocks", "up.1",
                     "--timesteps", "10,20,30"]) == 0
    assert summary_of(feats)["skipped"] == 2 and (feats / "eye2_features.safetensors").is_file()


def test_features_segment_inside_the_field_of_view_unless_told_not_to(pipelines, tmp_path):
    yy, xx = np.mgrid[:40, :48]
    photo = np.random.default_rng(5).integers(80, 256, (40, 48, 3), dtype=np.uint8)
    photo[(yy - 20) ** 2 + (xx - 24) ** 2 >= 17 ** 2] = 0  # a fundus-like aperture on black
    (tmp_path / "in").mkdir()
    PIL.Image.fromarray(photo).save(tmp_path / "in" / "eye.png")
    common = ["features", str(tmp_path / "in"), "--pipeline", str(pipelines["features"]), "--device", "cpu"]
    assert cli.main([*common, "--output-dir", str(tmp_path / "fov")]) == 0
    assert cli.main([*common, "--output-dir", str(tmp_path / "all"), "--no-field-of-view"]) == 0
    inside = np.asarray(PIL.Image.open(tmp_path / "fov" / "eye_probability.png"))
    everywhere = np.asarray(PIL.Image.open(tmp_path / "all" / "eye_probability.png"))
    surround = photo.max(axis=-1) == 0
    assert (inside[surround] == 0).all() and everywhere[surround].max() > 0
    assert summary_of(tmp_path / "fov")["settings"]["field_of_view"] is True
    assert summary_of(tmp_path / "all")["settings"]["field_of_view"] is False


@pytest.mark.parametrize("flags, needle", [
    (["--blocks", "up.7"], "--blocks"),
    (["--timesteps", "500"], "--timesteps [500]"),
    (["--output", "segmentation", "--timesteps", "10,20"], "the head was trained"),
    (["--output", "features", "--tile-size", "16"], "--tile-size applies"),
])
def test_features_settings_are_checked_before_writing(pipelines, tmp_path, capsys, flags, needle):
    write_images(tmp_path / "in", SIZES[:1])
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as raised:
        cli.main(["features", str(tmp_path / "in"), "--pipeline", str(pipelines["features"]), "--output-dir", str(out),
                  *flags])
    assert raised.value.code == 1 and needle in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ devices


def test_device_strings():
    assert cli.resolve_device("cpu") == torch.device("cpu")
    assert cli.resolve_device("cpu:0") == torch.device("cpu:0")
    with pytest.raises(cli.CLIError, match="'banana' is not a torch device string"):
        cli.resolve_device("banana")
    if not torch.cuda.is_available():
        with pytest.raises(cli.CLIError, match="--device cuda:1: CUDA is not available"):
            cli.resolve_device("cuda:1")
    else:
        count = torch.cuda.device_count()
        with pytest.raises(cli.CLIError, match=f"has {count} cuda device"):
            cli.resolve_device(f"cuda:{count}")
    if not torch.backends.mps.is_available():
        with pytest.raises(cli.CLIError, match="--device mps: the 'mps' backend is not available"):
            cli.resolve_device("mps")


@pytest.mark.parametrize("command", ["segment", "synthesize", "features", "demo"])
def test_bad_device_is_refused_before_anything_is_written(command, pipelines, tmp_path, capsys):
    write_images(tmp_path / "in", SIZES[:1])
    out = tmp_path / "out"
    if command == "demo":
        argv = ["demo", "--output", str(out / "panel.png"), "--pipeline", str(pipelines["segment"])]
    else:
        argv = [command, str(tmp_path / "in"), "--output-dir", str(out), "--pipeline", str(pipelines["segment"])]
    with pytest.raises(SystemExit) as raised:
        cli.main([*argv, "--device", "gpu:one"])
    assert raised.value.code == 1 and "--device 'gpu:one'" in capsys.readouterr().err
    assert not out.exists()
