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
from diffusers_retina.training_data import training_field_of_view_diameter

from testing_utils import run_script, write_folder_dataset
from testing_utils import load_script

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
    return run_script(SCRIPT, args)


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
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
    # the training scale processing_resolution="auto" brings photographs to: the labelled images' field of view
    labelled = [np.asarray(Image.open(data / "images" / f"case{i}.png").convert("RGB")) for i in (0, 1)]
    assert pipe.config.field_of_view_diameter == training_field_of_view_diameter(labelled) is not None
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


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_too_few_labelled_images(ddpm_and_data, tmp_path):
    ddpm, data = ddpm_and_data
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(SCRIPT), "--ddpm", str(ddpm), "--train_data_dir", str(data),
                             "--num_labelled", "9", "--blocks", "up.0", "--timesteps", "5", "--output_dir",
                             str(tmp_path / "o")], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode != 0 and "--num_labelled 9" in result.stderr


def aperture_item(height, width, radius):
    """A labelled photograph-like item: a random disc of retina on black ([-1, 1]) and a sparse mask inside it."""
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    disc = (yy - height // 2) ** 2 + (xx - width // 2) ** 2 < radius ** 2
    image = torch.where(disc, torch.rand(3, height, width, generator=torch.Generator().manual_seed(0)) * 0.8, -1.0)
    mask = (torch.rand(height, width, generator=torch.Generator().manual_seed(1)) > 0.85).long() * disc
    return image, {"image": image, "mask": mask}


def test_crops_learn_inside_the_field_of_view_and_cover_its_edge(ddpm_and_data):
    """Edge crops straddle the aperture of a photograph with a black surround, and the pixels the heads learn from
    are the field-of-view pixels of each crop (all of them with ``--field_of_view 0``)."""
    script = load_script("train_feature_head")
    image, item = aperture_item(96, 96, 40)

    def crops(**overrides):
        args = script.parse_args(["--ddpm", str(ddpm_and_data[0]), "--train_data_dir", str(ddpm_and_data[1]),
                                  "--output_dir", "unused",
                                  "--crop", "32", "--crops_per_image", "8", "--seed", "3"] +
                                 [f"--{k}={v}" for k, v in overrides.items()])
        return script.random_crops([item], script.prepare_photographs([item], args), args, multiple=4)[:3]

    images, masks, fovs = crops(edge_crop_fraction=1.0)
    assert images.shape == (8, 3, 32, 32) and masks.shape == fovs.shape == (8, 32, 32)
    assert all(0 < fov.float().mean() < 1 for fov in fovs)  # every crop holds both sides of the aperture
    assert not (fovs & (images[:, 0] == -1)).any()  # the black surround is never a pixel to learn from
    _, _, uniform = crops(edge_crop_fraction=0.0)
    assert uniform.float().mean() > fovs.float().mean()  # uniform crops lie mostly inside the disc
    _, _, everything = crops(edge_crop_fraction=1.0, field_of_view=0)
    assert everything.all()


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_whole_photograph_context_cuts_crops_from_the_photograph_maps(ddpm_and_data, tmp_path):
    """``--feature_context image``: crop boxes on the feature grid, crop features equal to the whole (filled)
    photograph's maps at those boxes, and a head trained that way saves and segments."""
    from diffusers_retina.data.modality import field_of_view_masks, fill_outside_field_of_view

    ddpm, data = ddpm_and_data
    script = load_script("train_feature_head")
    image, item = aperture_item(40, 48, 18)
    items = [item]
    args = script.parse_args(["--ddpm", str(ddpm), "--train_data_dir", str(data), "--output_dir", "unused",
                              "--crop", "16", "--crops_per_image", "5", "--feature_context", "image",
                              "--policy", "anchor"])
    pipe = DiffusionFeaturePipeline.from_pretrained(ddpm)
    photographs = script.prepare_photographs(items, args)
    _, _, _, boxes = script.random_crops(items, photographs, args, multiple=pipe.size_multiple)
    assert all(top % pipe.size_multiple == 0 and left % pipe.size_multiple == 0 for _, top, left, _ in boxes)
    features = script.whole_image_features(pipe, photographs, boxes, ["up.0", "up.1"], [5, 20], args)
    filled = fill_outside_field_of_view(image[None], field_of_view_masks(image[None]))
    whole = pipe.extract(filled, ["up.0", "up.1"], [5, 20], "anchor")
    strides = {d["name"]: d["stride"] for d in pipe.describe()}
    for position, (_, top, left, crop) in enumerate(boxes):
        for name in ("up.0", "up.1"):
            s = strides[name]
            assert features[name].shape[-1] == crop // s
            assert torch.equal(features[name][position], whole[name][0, :, :, top // s: (top + crop) // s,
                                                                     left // s: (left + crop) // s])
    # --cache_dir keeps the whole maps: one file per photograph, read back without running the UNet
    args.cache_dir = str(tmp_path / "cache")
    cached = script.whole_image_features(pipe, photographs, boxes, ["up.0", "up.1"], [5, 20], args)
    assert len(list(Path(args.cache_dir).glob("*.safetensors"))) == len(photographs)

    sizes, forward = [], pipe.unet.forward

    def spy(sample, *rest, **kwargs):
        sizes.append(tuple(sample.shape[-2:]))
        return forward(sample, *rest, **kwargs)

    pipe.unet.forward = spy
    again = script.whole_image_features(pipe, photographs, boxes, ["up.0", "up.1"], [5, 20], args)
    dry_run = (pipe.size_multiple * 4,) * 2  # describe()'s zero image, for the strides
    assert sizes and set(sizes) == {dry_run}, f"the UNet ran on {sizes} although the features were cached"
    for name in ("up.0", "up.1"):
        assert torch.equal(cached[name], features[name].to(cached[name].dtype))
        assert torch.equal(again[name], cached[name])
    out = tmp_path / "head"
    run(["--ddpm", str(ddpm), "--head", "pixel_mlp", "--train_data_dir", str(data), "--num_labelled", "2",
         "--crop", "16", "--crops_per_image", "4", "--blocks", "up.0,up.1", "--timesteps", "5,20", "--policy",
         "anchor", "--max_train_steps", "20", "--ensemble_size", "2", "--feature_context", "image",
         "--output_dir", str(out)])
    result = DiffusionFeaturePipeline.from_pretrained(out)(torch.rand(1, 3, 32, 32), output="segmentation")
    assert result.masks.shape == (1, 32, 32)
