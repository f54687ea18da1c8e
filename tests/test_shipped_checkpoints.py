"""Every shipped checkpoint still loads after the package's modules moved, through all three entry points: its own
class, ``DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`` (the shims in the folder) and
``custom_pipeline=`` with the community file in ``pipelines/``; the three give the same class and the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DiffusionPipeline, UNet2DModel

import diffusers_retina

from testing_utils import REPO

CHECKPOINTS = REPO / "checkpoints"
#: The community-pipeline folder of each pipeline class.
COMMUNITY = {"SegmentationEnsemblePipeline": "segmentation_ensemble", "Mask2ImagePipeline": "mask2image",
             "AdaptDiffPipeline": "adaptdiff", "DiffusionFeaturePipeline": "diffusion_features"}


def _class_name(folder: Path):
    index = folder / "model_index.json"
    if not index.is_file():
        return None
    name = json.loads(index.read_text())["_class_name"]
    return name[-1] if isinstance(name, list) else name


SHIPPED = sorted(p for p in CHECKPOINTS.iterdir() if p.is_dir())
PIPELINES = [p for p in SHIPPED if _class_name(p) in COMMUNITY]


def _weights(pipe):
    return {f"{name}.{key}": value.float() for name, component in pipe.components.items()
            if isinstance(component, torch.nn.Module) for key, value in component.state_dict().items()}


def test_every_shipped_folder_is_a_known_checkpoint():
    kinds = {p.name: _class_name(p) or "UNet2DModel" for p in SHIPPED}
    assert set(kinds.values()) <= set(COMMUNITY) | {"DDPMPipeline", "UNet2DModel"}, kinds
    assert len(PIPELINES) >= 4


@pytest.mark.parametrize("folder", PIPELINES, ids=[p.name for p in PIPELINES])
def test_pipeline_checkpoint_loads_through_all_three_entry_points(folder):
    pipeline_class = getattr(diffusers_retina, _class_name(folder))
    own = pipeline_class.from_pretrained(folder)
    remote = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    community_file = REPO / "pipelines" / COMMUNITY[_class_name(folder)]
    community = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, custom_pipeline=str(community_file))
    reference = _weights(own)
    assert reference
    for loaded in (remote, community):
        assert type(loaded) is pipeline_class
        weights = _weights(loaded)
        assert weights.keys() == reference.keys()
        for key, value in reference.items():
            assert torch.equal(weights[key], value), key


@pytest.mark.parametrize("folder", [p for p in SHIPPED if p not in PIPELINES], ids=lambda p: p.name)
def test_diffusers_checkpoints_load_with_diffusers_classes(folder):
    if _class_name(folder) == "DDPMPipeline":
        pipe = DDPMPipeline.from_pretrained(folder)
        assert isinstance(pipe.unet, UNet2DModel)
    else:
        model = UNet2DModel.from_pretrained(folder)
        assert model.config.out_channels == 1


def test_every_segmenting_checkpoint_records_its_training_scale():
    """The CHASE_DB1 segmenters record the field of view of their training photographs, diameter and angle (30
    degrees, CHASE_DB1's camera), so that processing_resolution="auto" and camera_degrees work with them."""
    segmenting = [p for p in PIPELINES if _class_name(p) in ("SegmentationEnsemblePipeline", "DiffusionFeaturePipeline")]
    assert len(segmenting) >= 5
    for folder in segmenting:
        index = json.loads((folder / "model_index.json").read_text())
        assert 800 <= index["field_of_view_diameter"] <= 1000 and index["field_of_view_degrees"] == 30, folder.name
    info = json.loads((CHECKPOINTS / "vessel-segmenter-chase" / "training_info.json").read_text())
    assert info["args"]["field_of_view_degrees"] == 30
