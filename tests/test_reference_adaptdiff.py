"""Checks on the shipped AdaptDiff reference (CHASE_DB1 adapted to a fluorescein-angiography-like modality): files,
card and record, and -- with CHASE_DB1 present -- that the adapted segmenter reads the target modality the source
segmenter cannot."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from safetensors import safe_open

from diffusers_retina import AdaptDiffPipeline
from diffusers_retina.data import chase_db1, default_chase_db1_root
from diffusers_retina.data.modality import fluorescein_like
from diffusers_retina.metrics import dice

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
ADAPTED = CHECKPOINTS / "adaptdiff-chase-fa"
SOURCE = CHECKPOINTS / "vessel-segmenter-chase"


@pytest.fixture(scope="module")
def pipe():
    pipe = AdaptDiffPipeline.from_pretrained(ADAPTED, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_files_record_and_card():
    weights_files = sorted(ADAPTED.glob("*/diffusion_pytorch_model.safetensors"))
    assert [w.parent.name for w in weights_files] == ["segmenter", "unet"]
    for weights in weights_files:
        assert weights.stat().st_size <= 10 * 1024 * 1024
        with safe_open(weights, "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert not list(ADAPTED.rglob("*.bin")) and not list(ADAPTED.rglob("*.pkl"))
    index = json.loads((ADAPTED / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_adapt_diff", "AdaptDiffPipeline"]
    # fine-tuned in the source's intensity space: it reads angiograms through the stored transform, source-free
    assert index["input_transform"]["transform"] == "invert+histmatch"
    assert np.shape(index["input_transform"]["reference_quantiles"]) == (3, 257)
    info = json.loads((ADAPTED / "training_info.json").read_text())
    assert all(info["steps"][step]["complete"] for step in ("pseudo-labels", "diffusion", "synthesis", "fine-tune"))
    assert info["args"]["target_stems"] == "Image_0*,Image_10*"  # adapted on training images only
    evaluation = json.loads((ADAPTED / "evaluation.json").read_text())
    assert len(evaluation["images"]) == 8 and all(name.startswith(("Image_11", "Image_12", "Image_13", "Image_14"))
                                                  for name in evaluation["images"])
    card = (ADAPTED / "README.md").read_text()
    assert f"value: {round(evaluation['metrics']['dice'], 4)}" in card  # model-index from the full evaluation
    assert "cc-by-4.0" in card and "CHASE_DB1" in card and "AdaptDiff" in card


@pytest.mark.slow  # runs the shipped model
@pytest.mark.skipif(default_chase_db1_root() is None, reason="CHASE_DB1 is not available")
def test_adapted_segmenter_reads_the_target_the_source_cannot(pipe):
    item = chase_db1(split="test", observer="1stHO")[0]
    photo = ((item["image"].permute(1, 2, 0).numpy() + 1) / 2)[256:512, 256:512]
    target = item["mask"].numpy()[256:512, 256:512].astype(bool)
    angiogram = fluorescein_like(photo, seed=0, fov=np.ones(photo.shape[:2], dtype=bool))
    adapted = pipe.segment(angiogram, output_type="np").masks[0] > 0
    source = UNet2DModel.from_pretrained(SOURCE, torch_dtype=torch.float32).eval()
    source_pipe = AdaptDiffPipeline(unet=pipe.unet, scheduler=pipe.scheduler, segmenter=source)
    source_pipe.set_progress_bar_config(disable=True)
    before = source_pipe.segment(angiogram, output_type="np").masks[0] > 0
    assert dice(adapted, target) > dice(before, target) + 0.3
