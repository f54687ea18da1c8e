"""Checks on the shipped Mask2Image reference pipeline (image model + vessel-mask model)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from diffusers_retina import Mask2ImagePipeline, SegmentationEnsemblePipeline
from diffusers_retina.data import chase_db1, default_chase_db1_root
from diffusers_retina.metrics import dice
from diffusers_retina.models import ConditionalUNet2DModel

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
CHECKPOINT = CHECKPOINTS / "mask2image-chase"


@pytest.fixture(scope="module")
def pipe():
    pipe = Mask2ImagePipeline.from_pretrained(CHECKPOINT, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_files_card_and_components(pipe):
    for component in ("unet", "mask_unet"):
        weights = CHECKPOINT / component / "diffusion_pytorch_model.safetensors"
        assert weights.stat().st_size <= 8 * 1024 * 1024
        with safe_open(weights, "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert type(pipe.unet) is ConditionalUNet2DModel and pipe.unet.config.conditioning == "concat+spade"
    assert pipe.mask_unet is not None
    card = (CHECKPOINT / "README.md").read_text()
    info = json.loads((CHECKPOINT / "training_info.json").read_text())
    assert "CC BY 4.0" in card and "license: cc-by-4.0" in card and info["command"] in card


@pytest.mark.slow  # runs the shipped model
def test_two_stage_sampling_gives_vessel_masks_and_images(pipe):
    out = pipe(num_masks=1, height=64, width=64, num_inference_steps=10, mask_num_inference_steps=10,
               generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.images.shape == (1, 3, 64, 64) and out.masks.shape == (1, 64, 64)
    assert 0.02 < out.masks.float().mean() < 0.7  # some vessel, not all


@pytest.mark.slow  # runs the shipped model
@pytest.mark.skipif(default_chase_db1_root() is None, reason="CHASE_DB1 not found beside the project (../shared/data)")
def test_synthetic_image_follows_its_mask(pipe):
    """Paint a test mask crop (not the crop monitored in training) and segment the painting with the reference
    segmenter: the vessels must be where the mask says."""
    mask = chase_db1(split="test")[2]["mask"][400:528, 400:528]  # Image_12L
    image = pipe(mask[None], num_inference_steps=25, guidance_scale=1.5, tile_size=64,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images
    segmenter = SegmentationEnsemblePipeline.from_pretrained(CHECKPOINTS / "segmentation-ensemble-chase",
                                                             dtype=torch.float32)
    segmenter.set_progress_bar_config(disable=True)
    segmented = segmenter(image, num_inference_steps=2, ensemble_size=3,
                          generator=torch.Generator().manual_seed(0), output_type="pt").masks[0]
    score = dice(segmented, mask)
    assert score > 0.6, f"mask faithfulness Dice {score:.3f}"
