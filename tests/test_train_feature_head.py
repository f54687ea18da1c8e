"""training/train_feature_head.py on a tiny DDPM and tiny data: both heads train, save and segment."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image
from safetensors import safe_open

from diffusers_retina import DiffusionFeaturePipeline
from diffusers_retina.models import FreqAggHead, PixelMLPEnsemble

from test_training import write_folder_dataset

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training" / "train_feature_head.py"


@pytest.fixture(scope="module")
def ddpm_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(root / "ddpm")
    return root / "ddpm", write_folder_dataset(root / "pairs", num_images=3, size=32)


def run(args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("head, head_cls", [("pixel_mlp", PixelMLPEnsemble), ("freq_agg", FreqAggHead)])
def test_heads_train_save_and_segment(ddpm_and_data, tmp_path, head, head_cls):
    ddpm, data = ddpm_and_data
    out = tmp_path / head
    run(["--ddpm", str(ddpm), "--head", head, "--train_data_dir", str(data), "--num_labelled", "2", "--crop", "16",
         "--crops_per_image", "4", "--blocks", "up.0,up.1", "--timesteps", "5,20", "--policy", "anchor",
         "--max_train_steps", "150", "--ensemble_size", "2", "--embed_dim", "8", "--cache_dir",
         str(tmp_path / "cache"), "--output_dir", str(out)])
    pipe = DiffusionFeaturePipeline.from_pretrained(out)
    assert type(pipe.head) is head_cls and pipe.head.config.blocks == ["up.0", "up.1"]
    info = json.loads((out / "training_info.json").read_text())
    assert info["num_labelled"] == 2 and "--head " + head in info["command"]
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as weights:  # --save_dtype
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.float16}
    card = (out / "README.md").read_text()  # the model card names the head, the labelled images and the policy
    assert f"`{head_cls.__name__}`" in card and "**2 labelled image(s)**" in card and "`case0,case1`" in card
    assert '"anchor"' in card and info["command"] in card
    # mask = bright pixels of a salt-and-pepper image (chance: 0.5): an unseen image is segmented well above chance
    image = Image.open(data / "images" / "case2.png")
    truth = torch.from_numpy(np.asarray(Image.open(data / "masks" / "case2.png")) > 0)
    result = pipe(image, output="segmentation")
    assert result.masks.shape == (1, 32, 32)
    accuracy = (result.masks[0].bool() == truth).float().mean().item()
    assert accuracy > 0.65, accuracy
    assert list((tmp_path / "cache").glob("*.safetensors"))  # features were cached


def test_too_few_labelled_images(ddpm_and_data, tmp_path):
    ddpm, data = ddpm_and_data
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(SCRIPT), "--ddpm", str(ddpm), "--train_data_dir", str(data),
                             "--num_labelled", "9", "--blocks", "up.0", "--timesteps", "5", "--output_dir",
                             str(tmp_path / "o")], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode != 0 and "--num_labelled 9" in result.stderr
