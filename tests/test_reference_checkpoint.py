"""Checks on the shipped segmentation reference checkpoints: the plain UNet2DModel (the embedded default of the demo
and the CLI) and the MedSegDiffUNet2DModel trained with the same data, budget and seed."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from diffusers import UNet2DModel

from diffusers_retina import SegmentationEnsemblePipeline
from diffusers_retina.models import MedSegDiffUNet2DModel
from diffusers_retina.data import chase_db1, default_chase_db1_root
from diffusers_retina.metrics import dice

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
MODELS = {"segmentation-ensemble-chase": UNet2DModel, "segmentation-medsegdiff-chase": MedSegDiffUNet2DModel}


@pytest.fixture(scope="module", params=sorted(MODELS))
def checkpoint(request):
    return CHECKPOINTS / request.param


@pytest.fixture(scope="module")
def pipe(checkpoint):
    pipe = SegmentationEnsemblePipeline.from_pretrained(checkpoint, dtype=torch.float32)
    assert type(pipe.unet) is MODELS[checkpoint.name]
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_checkpoint_files(checkpoint):
    weights = checkpoint / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= 8 * 1024 * 1024
    with safe_open(weights, "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    index = json.loads((checkpoint / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_segmentation_ensemble", "SegmentationEnsemblePipeline"]
    assert not list(checkpoint.rglob("*.bin")) and not list(checkpoint.rglob("*.pkl"))


def test_model_card_reports_the_measured_evaluation(checkpoint):
    card = (checkpoint / "README.md").read_text()
    evaluation = json.loads((checkpoint / "evaluation.json").read_text())
    info = json.loads((checkpoint / "training_info.json").read_text())
    main_row = evaluation["rows"][0]
    assert f"{main_row['metrics']['dice']:.3f}" in card
    assert "CC BY 4.0" in card and "license: cc-by-4.0" in card and "Fraz" in card
    assert info["command"] in card
    assert any("2ndHO" in row["name"] for row in evaluation["rows"])
    if MODELS[checkpoint.name] is MedSegDiffUNet2DModel:
        assert "dynamic conditional encoding" in card and "wu2023medsegdiff" in card


@pytest.mark.slow  # runs the shipped model
@pytest.mark.skipif(default_chase_db1_root() is None, reason="CHASE_DB1 not found beside the project (../shared/data)")
def test_segments_a_chase_db1_test_crop(pipe):
    item = chase_db1(split="test")[2]  # Image_12L: not the image monitored during training
    image, mask = item["image"][:, 352:608, 372:628], item["mask"][352:608, 372:628]
    out = pipe((image + 1) / 2, num_inference_steps=2, ensemble_size=3, generator=torch.Generator().manual_seed(0),
               output_type="pt")
    score = dice(out.masks[0], mask)
    assert score > 0.65, f"Dice {score:.3f} on a 256 crop of {item['name']}"
    # uncertainty concentrates where the fused mask is wrong
    errors = out.masks[0] != mask
    assert out.entropy[0][errors].mean() > 2 * out.entropy[0][~errors].mean()


@pytest.mark.slow  # runs the shipped model
def test_segments_the_scikit_image_fundus(pipe):
    retina = pytest.importorskip("skimage.data").retina()
    crop = np.ascontiguousarray(retina[500:756, 500:756, :3])
    out = pipe(crop, num_inference_steps=2, ensemble_size=2, generator=torch.Generator().manual_seed(0),
               output_type="np")
    vessel_fraction = out.masks[0].mean()
    assert 0.02 < vessel_fraction < 0.35, vessel_fraction
