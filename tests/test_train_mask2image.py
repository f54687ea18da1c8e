"""training/train_mask2image.py on tiny configs: the image model (each conditioning mode, condition dropout, resume to
the same weights, validation grid, mask faithfulness) and the mask model, saved as loadable pipelines with cards."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline
from PIL import Image
from safetensors.torch import load_file

from diffusers_retina import Mask2ImagePipeline
from diffusers_retina.models import ConditionalUNet2DModel

from testing_utils import run_script, write_folder_dataset

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training" / "train_mask2image.py"
TINY = ["--resolution", "16", "--block_out_channels", "8,16", "--norm_num_groups", "4", "--train_batch_size", "2",
        "--patches_per_image", "2", "--spade_hidden_channels", "8", "--report_to", "none", "--seed", "5",
        "--validation_inference_steps", "2", "--validation_crop", "16"]


def run(args):
    return run_script(SCRIPT, args)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_folder_dataset(tmp_path_factory.mktemp("m2i") / "pairs", size=24)


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
@pytest.mark.parametrize("conditioning", ["concat", "spade", "concat+spade"])
def test_image_model_trains_and_saves_a_pipeline(pairs, tmp_path, conditioning):
    out = tmp_path / conditioning
    run(["--train_data_dir", str(pairs), *TINY, "--conditioning", conditioning, "--max_train_steps", "2",
         "--validation_stems", "case0", "--validation_steps", "2", "--condition_dropout", "0.5",
         "--output_dir", str(out)])
    pipe = Mask2ImagePipeline.from_pretrained(out, dtype=torch.float32)
    assert isinstance(pipe.unet, ConditionalUNet2DModel) and pipe.unet.config.conditioning == conditioning
    assert pipe.mask_unet is None
    assert (out / "validation" / "step-000002.png").is_file()
    grid = Image.open(out / "validation" / "step-000002.png")
    assert grid.size == (3 * 16 + 2 * 4, 16)  # mask | synthetic | real
    card = (out / "README.md").read_text()
    assert f'conditioning="{conditioning}"' in card and "--max_train_steps 2" in card
    result = pipe(torch.ones(1, 24, 24, dtype=torch.long), num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0))
    assert result.images.shape == (1, 24, 24, 3)


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_image_model_resumes_to_the_same_weights(pairs, tmp_path):
    # 3 batches per epoch: the resumed run crosses an epoch boundary (accelerate re-seeds its sampler per epoch)
    common = ["--train_data_dir", str(pairs), *TINY, "--conditioning", "concat+spade", "--max_train_steps", "4",
              "--checkpointing_steps", "2", "--use_ema", "--validation_steps", "100", "--condition_dropout", "0.5"]
    straight = tmp_path / "straight"
    run(common + ["--output_dir", str(straight)])
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    log = run(common + ["--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    assert "Resuming from" in log.stderr + log.stdout
    for name in ("model.safetensors", "unet_ema/diffusion_pytorch_model.safetensors"):
        a, b = load_file(straight / "checkpoint-4" / name), load_file(resumed / "checkpoint-4" / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=f"{name}:{key}")
    end = load_file(straight / "checkpoint-4" / "model.safetensors")
    assert end["null_condition"].abs().sum() > 0  # condition dropout trained the null condition (zero at init)


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_mask_model_then_two_stage_pipeline_with_faithfulness(pairs, tmp_path, make_pipe):
    masks_out = tmp_path / "masks"
    run(["--task", "mask", "--train_data_dir", str(pairs), *TINY, "--max_train_steps", "2", "--validation_steps", "2",
         "--validation_num_masks", "2", "--output_dir", str(masks_out)])
    mask_pipe = DDPMPipeline.from_pretrained(masks_out)
    assert mask_pipe.unet.config.in_channels == 1 and (masks_out / "validation" / "step-000002.png").is_file()
    assert "unconditional vessel-mask DDPM" in (masks_out / "README.md").read_text()

    segmenter = tmp_path / "segmenter"
    make_pipe().save_pretrained(segmenter)
    out = tmp_path / "pairs_model"
    run(["--train_data_dir", str(pairs), *TINY, "--max_train_steps", "2", "--validation_stems", "case0,case1",
         "--validation_steps", "2", "--mask_pipeline", str(masks_out), "--faithfulness_pipeline", str(segmenter),
         "--output_dir", str(out)])
    info = json.loads((out / "training_info.json").read_text())
    assert 0.0 <= info["validation_faithfulness_dice"] <= 1.0
    pipe = Mask2ImagePipeline.from_pretrained(out)
    assert pipe.mask_unet is not None
    result = pipe(num_masks=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert result.images.shape == (2, 3, 16, 16) and set(result.masks.unique().tolist()) <= {0, 1}
    assert "samples masks first" in (out / "README.md").read_text()


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_bad_arguments(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for extra, message in ((["--task", "mask", "--mask_pipeline", "x"], "--mask_pipeline"),
                           (["--condition_dropout", "1.5"], "--condition_dropout")):
        result = subprocess.run([sys.executable, str(SCRIPT), "--train_data_dir", str(tmp_path), "--output_dir",
                                 str(tmp_path / "o"), *extra], capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode != 0 and message in result.stderr


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_fundus_task_trains_a_ddpm_the_feature_pipeline_reads(pairs, tmp_path):
    from diffusers_retina import DiffusionFeaturePipeline

    out = tmp_path / "fundus"
    run(["--task", "fundus", "--train_data_dir", str(pairs), *TINY, "--max_train_steps", "2", "--validation_steps",
         "2", "--validation_num_masks", "2", "--output_dir", str(out)])
    ddpm = DDPMPipeline.from_pretrained(out)
    assert ddpm.unet.config.in_channels == 3 and ddpm.unet.config.out_channels == 3
    assert Image.open(out / "validation" / "step-000002.png").size == (2 * 16 + 4, 16)
    assert "unconditional fundus DDPM" in (out / "README.md").read_text()
    features = DiffusionFeaturePipeline(unet=ddpm.unet.float(), scheduler=ddpm.scheduler)
    image = torch.rand(1, 3, 16, 16)  # [0, 1], as pipelines take image tensors
    out_features = features(image, blocks=["up.0"], timesteps=[10, 50], seed=0).features["up.0"]
    assert out_features.shape[:2] == (1, 2)
