"""The accelerate training script on tiny configs: it trains, checkpoints, resumes to the same weights, and saves a
loadable pipeline with a model card. Long training never runs here."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusers_retina import SegmentationEnsemblePipeline
from diffusers_retina.data import default_chase_db1_root

from testing_utils import SEGMENTATION_SCRIPT as SCRIPT
from testing_utils import TINY_SEGMENTATION as TINY
from testing_utils import write_folder_dataset

REPO = Path(__file__).resolve().parents[1]
def run_training(args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory):
    return write_folder_dataset(tmp_path_factory.mktemp("data") / "pairs")


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_resumed_run_matches_uninterrupted_run(folder_dataset, tmp_path):
    # 6 batches per epoch: resuming after step 4 crosses an epoch boundary (accelerate re-seeds its sampler per epoch)
    common = ["--train_data_dir", str(folder_dataset), *TINY, "--max_train_steps", "8", "--checkpointing_steps", "4",
              "--use_ema", "--validation_stems", "case0", "--validation_crop", "32", "--validation_steps", "4"]
    straight = tmp_path / "straight"
    run_training(common + ["--output_dir", str(straight)], REPO)

    # a run that "crashed" after step 4: keep only its first checkpoint, then resume with "latest"
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-4", resumed / "checkpoint-4")
    log = run_training(common + ["--output_dir", str(resumed), "--resume_from_checkpoint", "latest"], REPO)
    assert "Resuming from" in log.stderr + log.stdout

    for name in ("model.safetensors", "unet_ema/diffusion_pytorch_model.safetensors"):
        a, b = load_file(straight / "checkpoint-8" / name), load_file(resumed / "checkpoint-8" / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=f"{name}:{key}")
    # and the run did train: weights moved away from the checkpoint-4 state
    start = load_file(straight / "checkpoint-4" / "model.safetensors")
    end = load_file(straight / "checkpoint-8" / "model.safetensors")
    assert any(not torch.equal(start[k], end[k]) for k in start)


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_checkpoints_total_limit_and_saved_pipeline(folder_dataset, tmp_path):
    out = tmp_path / "run"
    # photographs with a field of view (a disc 30 px across on black): the pipeline records its diameter
    data = tmp_path / "discs"
    shutil.copytree(folder_dataset, data)
    yy, xx = np.mgrid[:40, :40]
    disc = ((yy - 19.5) ** 2 + (xx - 19.5) ** 2 < 15 ** 2)[..., None]
    for path in (data / "images").iterdir():
        pixels = np.asarray(Image.open(path).convert("RGB")).astype(np.float64) * 0.5 + 100
        Image.fromarray((pixels * disc).astype(np.uint8)).save(path)
    run_training(["--train_data_dir", str(data), *TINY, "--max_train_steps", "4", "--checkpointing_steps", "1",
                  "--checkpoints_total_limit", "2", "--save_dtype", "float16", "--field_of_view_degrees", "30",
                  "--output_dir", str(out)], REPO)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]

    # the saved pipeline: remote-code layout, fp16 safetensors, training record and model card
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_segmentation_ensemble", "SegmentationEnsemblePipeline"]
    assert abs(index["field_of_view_diameter"] - 30) <= 1
    assert index["field_of_view_degrees"] == 30  # the angle it was told, for a call's camera_degrees
    assert list((out / "unet").glob("*.bin")) == []
    info = json.loads((out / "training_info.json").read_text())
    assert info["global_step"] == 4 and "train_segmentation_ensemble.py" in info["command"]
    card = (out / "README.md").read_text()
    assert "library_name: diffusers" in card and "--max_train_steps 4" in card
    assert "Not evaluated yet" in card  # no test metrics are claimed before the benchmark runs

    weights = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float16}
    pipe = SegmentationEnsemblePipeline.from_pretrained(out, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(data / "images" / "case0.png")
    result = pipe(image, num_inference_steps=2, ensemble_size=2, generator=torch.Generator().manual_seed(0),
                  output_type="np")
    assert result.masks.shape == (1, 40, 40)


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_multiclass_training(tmp_path):
    data = write_folder_dataset(tmp_path / "three", num_classes=3)
    out = tmp_path / "run"
    run_training(["--train_data_dir", str(data), "--num_classes", "3", *TINY, "--max_train_steps", "2",
                  "--validation_stems", "case1", "--validation_crop", "0", "--validation_steps", "2",
                  "--output_dir", str(out)], REPO)
    pipe = SegmentationEnsemblePipeline.from_pretrained(out, dtype=torch.float32)
    assert pipe.num_classes == 3 and pipe.unet.config.in_channels == 6
    info = json.loads((out / "training_info.json").read_text())
    assert info["validation_dice"] is not None


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
@pytest.mark.skipif(default_chase_db1_root() is None, reason="CHASE_DB1 not found beside the project (../shared/data)")
def test_chase_db1_train_split_command(tmp_path):
    """The documented data flags select the 20 training images and validate on a test image crop."""
    out = tmp_path / "chase"
    log = run_training(["--train_data_dir", str(default_chase_db1_root()), "--mask_dir", "1stHO", "--mask_suffix",
                        "_1stHO", "--train_stems", "Image_0*,Image_10*", "--validation_stems", "Image_11L",
                        "--validation_crop", "64", "--validation_steps", "2", *TINY, "--max_train_steps", "2",
                        "--output_dir", str(out)], REPO)
    assert "Patches per epoch = 80" in log.stderr + log.stdout  # 20 images x 4 patches
    card = (out / "README.md").read_text()
    assert "CC BY 4.0" in card and "Fraz" in card and "license: cc-by-4.0" in card


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_bad_arguments_fail_clearly(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(SCRIPT), "--output_dir", str(tmp_path)], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode != 0 and "--train_data_dir" in result.stderr
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "masks").mkdir()
    result = subprocess.run([sys.executable, str(SCRIPT), "--train_data_dir", str(empty), "--output_dir",
                             str(tmp_path / "o"), *TINY], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0 and "images" in result.stderr


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_supervised_baseline_objective(folder_dataset, tmp_path):
    """--objective supervised: the same loop trains the UNet as a deterministic segmenter (image in, logits out) and
    saves the bare UNet; on the learnable toy data (bright pixels = mask) it segments after a few steps."""
    from diffusers import UNet2DModel

    from diffusers_retina.image_processing import prepare_images
    from diffusers_retina.metrics import dice

    out = tmp_path / "baseline"
    run_training(["--train_data_dir", str(folder_dataset), *TINY, "--objective", "supervised", "--max_train_steps",
                  "30", "--learning_rate", "1e-2", "--lr_warmup_steps", "0", "--validation_stems", "case0",
                  "--validation_crop", "32", "--validation_steps", "30", "--output_dir", str(out)], REPO)
    assert not (out / "model_index.json").exists()  # not a diffusion pipeline
    info = json.loads((out / "training_info.json").read_text())
    assert info["args"]["objective"] == "supervised" and info["global_step"] == 30
    unet = UNet2DModel.from_pretrained(out / "unet")
    assert unet.config.in_channels == 3 and unet.config.out_channels == 1
    image = prepare_images(Image.open(folder_dataset / "images" / "case0.png"), 3)
    mask = torch.from_numpy(np.asarray(Image.open(folder_dataset / "masks" / "case0.png")) > 0)
    with torch.no_grad():
        logits = unet(image[..., :32, :32], 0).sample
    assert dice(logits[0, 0] > 0, mask[:32, :32]) > 0.9
    assert info["validation_dice"] > 0.9

    # the evaluation path of benchmarks/evaluate_segmentation.py --baseline: padded 40x40 image, 16-pixel tiles
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import evaluate_segmentation
    finally:
        sys.path.pop(0)
    baseline = evaluate_segmentation.load_baseline(str(out), torch.device("cpu"))
    probability = evaluate_segmentation.baseline_probability(baseline, image[0], 16, 0.25)
    assert probability.shape == (40, 40) and 0 <= probability.min() and probability.max() <= 1
    assert dice(torch.from_numpy(probability > 0.5), mask) > 0.9
