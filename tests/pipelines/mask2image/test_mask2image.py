"""Mask2ImagePipeline on dummy components: the shared contract (``RetinaPipelineTesterMixin``) for each conditioning
mode, and an integration check of the shipped checkpoint."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler

from diffusers_retina import Mask2ImagePipeline

from testing_utils import REPO, tiny_conditional, vessel_masks

from ..test_pipelines_common import RetinaPipelineTesterMixin


class TestMask2ImagePipeline(RetinaPipelineTesterMixin):
    pipeline_class = Mask2ImagePipeline
    input_name = "mask"
    output_fields = ("images",)
    conditioning = "concat+spade"

    def get_dummy_components(self):
        return {"unet": tiny_conditional(self.conditioning), "scheduler": DDIMScheduler(num_train_timesteps=100)}

    def get_dummy_inputs(self, seed: int = 0):
        return {"mask": vessel_masks(1), "num_inference_steps": 2, "guidance_scale": 1.5,
                "generator": self.generators(seed), "output_type": "pt"}

    def input_formats(self):
        mask = vessel_masks(1)
        pixels = (mask[0].numpy() * 255).astype(np.uint8)
        return {"pt": mask, "np": pixels, "pil": PIL.Image.fromarray(pixels)}


class TestMask2ImageConcat(TestMask2ImagePipeline):
    conditioning = "concat"


class TestMask2ImageSpade(TestMask2ImagePipeline):
    conditioning = "spade"


@pytest.mark.slow
def test_shipped_checkpoint_paints_a_mask():
    pipe = Mask2ImagePipeline.from_pretrained(REPO / "checkpoints" / "mask2image-chase")
    pipe.set_progress_bar_config(disable=True)
    out = pipe(vessel_masks(1, size=(32, 32)), num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="pt")
    assert out.images.shape == (1, 3, 32, 32) and torch.isfinite(out.images).all()
