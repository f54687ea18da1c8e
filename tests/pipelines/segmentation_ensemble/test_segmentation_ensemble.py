"""SegmentationEnsemblePipeline on dummy components: the shared contract (``RetinaPipelineTesterMixin``) for the plain
ensemble and for the feature-reusing refiner over a prior, and an integration check of the shipped checkpoint."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from diffusers_retina import SegmentationEnsemblePipeline

from testing_utils import REPO, tiny_head, tiny_prior, tiny_unet

from ..test_pipelines_common import RetinaPipelineTesterMixin


class TestSegmentationEnsemblePipeline(RetinaPipelineTesterMixin):
    pipeline_class = SegmentationEnsemblePipeline
    input_name = "image"
    output_fields = ("masks", "probabilities", "entropy")
    samples_per_input = 2  # ensemble members

    def get_dummy_components(self):
        return {"unet": tiny_unet(), "scheduler": DDIMScheduler(num_train_timesteps=100)}

    def get_dummy_inputs(self, seed: int = 0):
        image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(123))
        return {"image": image, "num_inference_steps": 2, "ensemble_size": 2, "generator": self.generators(seed),
                "output_type": "pt"}


class TestFeatureRefinerPipeline(TestSegmentationEnsemblePipeline):
    """The same contract with a ``PriorFeatureRefinerModel`` denoiser over a deterministic prior."""

    def get_dummy_components(self):
        return {"unet": tiny_head(), "prior": tiny_prior(), "anchor": "residual",
                "scheduler": DDIMScheduler(num_train_timesteps=100)}


@pytest.mark.slow
def test_shipped_anchored_checkpoint_segments_a_photograph():
    """Integration: the embedded reference loads through the class and gives a mask with vessels in it."""
    from skimage.data import retina

    pipe = SegmentationEnsemblePipeline.from_pretrained(REPO / "checkpoints" / "segmentation-anchored-chase")
    pipe.set_progress_bar_config(disable=True)
    photo = retina()[400:656, 400:656, :3]
    out = pipe(photo, ensemble_size=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    fraction = float(out.masks.float().mean())
    assert out.masks.shape == (1, 256, 256) and 0.01 < fraction < 0.4, fraction
