"""Checks on the shipped feature-reusing refiner (``checkpoints/segmentation-anchored-features-chase``): a
``PriorFeatureRefinerModel`` over the shipped prior's decoder features, in a residual-anchored
``SegmentationEnsemblePipeline``."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler, UNet2DModel
from safetensors import safe_open

from diffusers_retina import SegmentationEnsemblePipeline
from diffusers_retina.data import chase_db1, default_chase_db1_root
from diffusers_retina.metrics import dice
from diffusers_retina.models import PriorFeatureRefinerModel
from diffusers_retina.pipelines.sampling import segmenter_probabilities

pytestmark = pytest.mark.slow
CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
SEGMENTER = CHECKPOINTS / "vessel-segmenter-chase"
FEATURES = CHECKPOINTS / "segmentation-anchored-features-chase"
HAS_CHASE = default_chase_db1_root() is not None


@pytest.fixture(scope="module")
def pipe():
    pipe = SegmentationEnsemblePipeline.from_pretrained(FEATURES, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_files_defaults_and_the_shipped_prior(pipe):
    total = sum(p.stat().st_size for p in FEATURES.rglob("*.safetensors"))
    assert total <= 8 * 1024 * 1024
    for weights in FEATURES.rglob("*.safetensors"):
        with safe_open(weights, "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    index = json.loads((FEATURES / "model_index.json").read_text())
    assert index["unet"][1] == "PriorFeatureRefinerModel" and index["anchor"] == "residual"
    selection = json.loads((FEATURES / "step_selection.json").read_text())  # chosen on training photographs
    assert index["default_denoising_steps"] == selection["chosen_steps"]
    assert index["default_threshold"] == selection["chosen_threshold"]
    assert isinstance(pipe.unet, PriorFeatureRefinerModel)
    segmenter = UNet2DModel.from_pretrained(SEGMENTER)
    for key, value in segmenter.state_dict().items():
        torch.testing.assert_close(pipe.prior.state_dict()[key].float(), value.float())
    assert not list(FEATURES.rglob("*.bin")) and not list(FEATURES.rglob("*.pkl"))


def test_card_reports_the_measured_table():
    card = (FEATURES / "README.md").read_text()
    evaluation = json.loads((FEATURES / "evaluation.json").read_text())
    assert f"{evaluation['metrics']['dice']:.3f}" in card
    assert "feature-reusing refiner" in card and "--distill_from" in card
    assert "CC BY 4.0" in card and "license: cc-by-4.0" in card and "Fraz" in card


def test_plain_diffusers_loading_and_a_swapped_scheduler(pipe):
    remote = DiffusionPipeline.from_pretrained(str(FEATURES), trust_remote_code=True)
    assert type(remote.unet).__name__ == "PriorFeatureRefinerModel" and remote.prior is not None
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    out = pipe(image, ensemble_size=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert np.isfinite(out.probabilities).all()


@pytest.mark.skipif(not HAS_CHASE, reason="CHASE_DB1 not found beside the project (../shared/data)")
def test_feature_refiner_on_a_chase_db1_test_crop(pipe):
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    item = chase_db1(split="test")[2]
    image, mask = item["image"][:, 352:608, 372:628], item["mask"][352:608, 372:628]
    out = pipe((image + 1) / 2, ensemble_size=5, generator=torch.Generator().manual_seed(0), output_type="pt")
    score = dice(out.masks[0], mask)
    prior = segmenter_probabilities(pipe.prior, image[None])[0, 0] > 0.5
    assert score > 0.7, f"Dice {score:.3f}"
    assert score > dice(prior, mask) - 0.03  # the refiner does not throw the prior's accuracy away
    errors = out.masks[0] != mask
    assert out.entropy[0][errors].mean() > 2 * out.entropy[0][~errors].mean()
