"""Checks on the shipped prior-anchored references: the deterministic segmenter (a model of its own, with a card), the
residual-anchored SegmentationEnsemblePipeline that carries it as its prior, and the feature-reusing refiner
(``PriorFeatureRefinerModel``) over the same prior."""

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

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
SEGMENTER = CHECKPOINTS / "vessel-segmenter-chase"
ANCHORED = CHECKPOINTS / "segmentation-anchored-chase"
FEATURES = CHECKPOINTS / "segmentation-anchored-features-chase"
HAS_CHASE = default_chase_db1_root() is not None


@pytest.fixture(scope="module", params=[ANCHORED, FEATURES], ids=["residual", "features"])
def pipe(request):
    pipe = SegmentationEnsemblePipeline.from_pretrained(request.param, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_files_and_stored_defaults():
    for folder in (ANCHORED, FEATURES):
        assert sum(p.stat().st_size for p in folder.rglob("*.safetensors")) <= 8 * 1024 * 1024
    for weights in [SEGMENTER / "diffusion_pytorch_model.safetensors", *ANCHORED.rglob("*.safetensors"),
                    *FEATURES.rglob("*.safetensors")]:
        with safe_open(weights, "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    for folder in (ANCHORED, FEATURES):
        index = json.loads((folder / "model_index.json").read_text())
        assert index["anchor"] == "residual" and index["default_denoising_steps"] >= 1
        assert index["prior"] == ["diffusers", "UNet2DModel"]
    for folder in (SEGMENTER, ANCHORED, FEATURES):
        assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pkl"))


def test_feature_refiner_defaults_were_chosen_on_training_photographs():
    index = json.loads((FEATURES / "model_index.json").read_text())
    selection = json.loads((FEATURES / "step_selection.json").read_text())
    assert index["unet"][1] == "PriorFeatureRefinerModel"
    assert index["default_denoising_steps"] == selection["chosen_steps"]
    assert index["default_threshold"] == selection["chosen_threshold"]
    assert not any(stem.startswith(("Image_11", "Image_12", "Image_13", "Image_14")) for stem in selection["stems"])


def test_both_anchored_pipelines_ship_the_segmenter_as_their_prior():
    """The residual pipeline and the feature-reusing refiner both carry the shipped segmenter (the refiner's head was
    trained in its feature space, through students distilled from it), and record its training scale."""
    segmenter = UNet2DModel.from_pretrained(SEGMENTER)
    for folder in (ANCHORED, FEATURES):
        shipped = UNet2DModel.from_pretrained(folder, subfolder="prior").state_dict()
        for key, value in segmenter.state_dict().items():
            torch.testing.assert_close(shipped[key].float(), value.float())
        assert json.loads((folder / "model_index.json").read_text())["field_of_view_diameter"] == 920
    assert json.loads((SEGMENTER / "training_info.json").read_text())["args"]["field_of_view_diameter"] == 920


def test_cards_report_the_measured_table():
    for folder in (SEGMENTER, ANCHORED, FEATURES):
        card = (folder / "README.md").read_text()
        evaluation = json.loads((folder / "evaluation.json").read_text())
        info = json.loads((folder / "training_info.json").read_text())
        assert f"{evaluation['metrics']['dice']:.3f}" in card
        assert info["command"] in card
        assert "CC BY 4.0" in card and "license: cc-by-4.0" in card and "Fraz" in card
        assert "model-index" in card and "Second observer" in card
    assert "out-of-fold" in (ANCHORED / "README.md").read_text()
    features_card = (FEATURES / "README.md").read_text()
    assert "feature-reusing refiner" in features_card and "--distill_from" in features_card


@pytest.mark.slow  # runs the shipped model
def test_plain_diffusers_loading_and_a_swapped_scheduler(pipe):
    folder = FEATURES if isinstance(pipe.unet, PriorFeatureRefinerModel) else ANCHORED
    remote = DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True)
    assert type(remote).__name__ == "SegmentationEnsemblePipeline" and remote.prior is not None
    assert type(remote.unet).__name__ == type(pipe.unet).__name__
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # [0, 1], as pipelines take
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    out = pipe(image, ensemble_size=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert np.isfinite(out.probabilities).all()


@pytest.mark.slow  # runs the shipped model
@pytest.mark.skipif(not HAS_CHASE, reason="CHASE_DB1 not found beside the project (../shared/data)")
def test_anchored_ensemble_on_a_chase_db1_test_crop(pipe):
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    item = chase_db1(split="test")[2]
    image, mask = item["image"][:, 352:608, 372:628], item["mask"][352:608, 372:628]
    out = pipe((image + 1) / 2, ensemble_size=3, generator=torch.Generator().manual_seed(0), output_type="pt")
    score = dice(out.masks[0], mask)
    prior = segmenter_probabilities(pipe.prior, image[None])[0, 0] > 0.5
    assert score > 0.7, f"Dice {score:.3f}"
    assert score > dice(prior, mask) - 0.03  # anchoring does not throw the prior's accuracy away
    errors = out.masks[0] != mask
    assert out.entropy[0][errors].mean() > 2 * out.entropy[0][~errors].mean()
