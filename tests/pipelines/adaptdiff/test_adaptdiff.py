"""AdaptDiffPipeline on dummy components: the shared contract (``RetinaPipelineTesterMixin``) for its painting call,
and an integration check of the shipped checkpoint."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_retina import AdaptDiffPipeline, Mask2ImagePipeline

from testing_utils import REPO, fundus, tiny_adaptdiff, vessel_masks

from ..test_pipelines_common import RetinaPipelineTesterMixin


class TestAdaptDiffPipeline(RetinaPipelineTesterMixin):
    pipeline_class = AdaptDiffPipeline
    input_name = "masks"
    output_fields = ("images",)
    callback_pipeline_class = Mask2ImagePipeline  # the painting loop runs in a Mask2ImagePipeline (documented)

    def get_dummy_components(self):
        pipe = tiny_adaptdiff()
        return {"unet": pipe.unet, "scheduler": pipe.scheduler, "segmenter": pipe.segmenter}

    def get_dummy_inputs(self, seed: int = 0):
        return {"masks": vessel_masks(1), "num_inference_steps": 2, "generator": self.generators(seed),
                "output_type": "pt"}

    def input_formats(self):
        mask = vessel_masks(1)
        pixels = (mask[0].numpy() * 255).astype(np.uint8)
        return {"pt": mask, "np": pixels, "pil": PIL.Image.fromarray(pixels)}


@pytest.mark.slow
def test_shipped_checkpoint_segments_and_paints():
    pipe = AdaptDiffPipeline.from_pretrained(REPO / "checkpoints" / "adaptdiff-chase-fa")
    pipe.set_progress_bar_config(disable=True)
    photo = fundus(64)
    assert pipe.segment(photo, output_type="pt").masks.shape == (1, 64, 64)
    painted = pipe(vessel_masks(1, size=(32, 32)), num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                   output_type="pt")
    assert painted.images.shape == (1, 3, 32, 32) and torch.isfinite(painted.images).all()
