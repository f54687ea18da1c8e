"""Checks on the shipped fundus DDPM and diffusion-feature head (issue 6 reference checkpoints)."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, UNet2DModel
from safetensors import safe_open

from diffusers_retina import DiffusionFeaturePipeline
from diffusers_retina.data import chase_db1, default_chase_db1_root
from diffusers_retina.metrics import dice

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
DDPM = CHECKPOINTS / "fundus-ddpm-chase"
HEAD = CHECKPOINTS / "feature-head-chase"
DICE_FLOOR = 0.45  # measured 0.516 on the whole of Image_12L inside its field of view (label_efficiency_whole.json)
needs_chase = pytest.mark.skipif(default_chase_db1_root() is None,
                                 reason="CHASE_DB1 not found beside the project (../shared/data)")


@pytest.mark.parametrize("folder, components", [(DDPM, ["unet"]), (HEAD, ["unet", "head"])])
def test_files_are_small_fp16_with_a_card(folder, components):
    total = 0
    for component in components:
        weights = folder / component / "diffusion_pytorch_model.safetensors"
        total += weights.stat().st_size
        with safe_open(weights, "pt") as f:
            dtypes = {f.get_tensor(k).dtype for k in f.keys()}
            assert {d for d in dtypes if d.is_floating_point} == {torch.float16}  # (BatchNorm counters are int64)
    assert total <= 8 * 1024 * 1024
    card = (folder / "README.md").read_text()
    info = json.loads((folder / "training_info.json").read_text())
    assert "CC BY 4.0" in card and "license: cc-by-4.0" in card and info["command"] in card
    assert "| N labelled | Model | Dice |" in card  # the measured label-efficiency table


@pytest.mark.slow  # runs the shipped model
def test_head_reads_the_shipped_ddpm():
    ddpm = DDPMPipeline.from_pretrained(DDPM)
    head_unet = UNet2DModel.from_pretrained(HEAD / "unet")
    assert all(torch.equal(a, b) for a, b in zip(ddpm.unet.state_dict().values(), head_unet.state_dict().values()))


@pytest.mark.slow  # runs the shipped model
@needs_chase
def test_ddpm_denoises_real_fundus_patches():
    """The DDPM learned fundus photographs: at t = 150 its clean-image estimate of a noised test crop beats the
    trivial estimate x_t / sqrt(alpha_bar) by a wide margin."""
    ddpm = DDPMPipeline.from_pretrained(DDPM).to(dtype=torch.float32)
    image = chase_db1(split="test")[0]["image"][None, :, 400:528, 400:528]
    t = torch.tensor([150])
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(0))
    noisy = ddpm.scheduler.add_noise(image, noise, t)
    alpha_bar = ddpm.scheduler.alphas_cumprod[150]
    with torch.no_grad():
        output = ddpm.unet(noisy, t).sample
    assert ddpm.scheduler.config.prediction_type == "sample"
    model_error = (output - image).square().mean()
    trivial_error = (noisy / alpha_bar.sqrt() - image).square().mean()
    assert model_error < 0.25 * trivial_error, (model_error, trivial_error)


@pytest.mark.slow  # runs the shipped model
@needs_chase
def test_head_segments_a_whole_test_photograph():
    """The head learned from whole-photograph features: it segments a whole test photograph (the default call, no
    tiles, the field of view found from the photograph) well above chance inside the field of view."""
    pipe = DiffusionFeaturePipeline.from_pretrained(HEAD, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    item = chase_db1(split="test")[2]  # Image_12L
    out = pipe((item["image"][None] + 1) / 2, output="segmentation", seed=0)
    assert out.masks.shape == out.uncertainty.shape == (1, *item["mask"].shape)
    fov = out.field_of_view[0]
    assert 0.6 < fov.float().mean() < 0.9 and (out.masks[0][~fov] == 0).all()
    score = dice(out.masks[0], item["mask"], fov=fov)
    assert score > DICE_FLOOR, f"Dice {score:.3f}"
