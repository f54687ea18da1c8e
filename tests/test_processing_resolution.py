"""``processing_resolution``: photographs segmented at the scale the models learnt (their field of view matched to the
training diameter), with every output back at the input's size; one mechanism for both segmentation pipelines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from diffusers_retina import DiffusionFeaturePipeline, SegmentationEnsemblePipeline
from diffusers_retina.image_processing import (
    SCALE_TOLERANCE,
    RetinaImageProcessor,
    field_of_view_diameter,
    plan_processing,
)

from testing_utils import decisive_head, disc_photograph, seeded, tiny_diffusion_features, tiny_unet


def photo(width: int, height: int, diameter: int, seed: int = 0) -> np.ndarray:
    return np.array(disc_photograph(width, height, diameter, seed=seed))


# ---------------------------------------------------------------------------------------------- the plan


def test_auto_matches_the_field_of_view_to_the_training_diameter():
    image = photo(100, 80, 60)
    found = field_of_view_diameter(image)
    plan = plan_processing(image, "auto", 120)
    assert plan.basis == "field_of_view" and plan.field_of_view_diameter == found
    assert plan.scale == pytest.approx(120 / found) and plan.size == (round(80 * plan.scale), round(100 * plan.scale))
    # shrinking works the same way
    assert plan_processing(image, "auto", 30).size == (round(80 * 30 / found), round(100 * 30 / found))


def test_auto_keeps_photographs_already_at_the_training_scale():
    image = photo(100, 80, 60)
    found = field_of_view_diameter(image)
    within = int(found * (1 + SCALE_TOLERANCE * 0.8))
    beyond = int(found * (1 + SCALE_TOLERANCE * 2))
    assert plan_processing(image, "auto", within).basis == "native"
    assert plan_processing(image, "auto", within).size == (80, 100)
    assert plan_processing(image, "auto", beyond).basis == "field_of_view"


def test_without_a_field_of_view_the_longer_side_stands_for_it_and_is_only_shrunk():
    crop = np.full((60, 90, 3), 0.5)
    big = plan_processing(crop, "auto", 45)
    assert big.basis == "longer_side" and big.size == (30, 45) and big.field_of_view_diameter is None
    small = plan_processing(crop, "auto", 400)
    assert small.basis == "native" and small.size == (60, 90)


def test_auto_caps_the_result_and_needs_a_known_training_scale():
    tiny_disc = photo(200, 200, 12)
    assert max(plan_processing(tiny_disc, "auto", 100).size) == 200  # not 200 * 100 / 12
    unknown = plan_processing(photo(100, 80, 60), "auto", None)
    assert unknown.basis == "native" and unknown.size == (80, 100)


def test_fixed_and_native_resolutions():
    image = photo(100, 80, 60)
    fixed = plan_processing(image, 50, 920)
    assert fixed.basis == "fixed" and fixed.size == (40, 50) and fixed.scale == 0.5
    for value in (None, "native"):
        assert plan_processing(image, value, 920).size == (80, 100)


@pytest.mark.parametrize("value", ["Auto", 0, 4, 12.5, True, "512"])
def test_bad_processing_resolution_names_the_argument(value):
    with pytest.raises(ValueError, match="processing_resolution"):
        plan_processing(photo(40, 40, 30), value, 920)


def test_resize_round_trip_keeps_range_and_size():
    maps = torch.rand(2, 1, 20, 30)
    up = RetinaImageProcessor.resize(maps, (40, 60), mode="bilinear")
    assert up.shape == (2, 1, 40, 60) and up.min() >= maps.min() and up.max() <= maps.max()
    assert RetinaImageProcessor.resize(maps, (20, 30)) is maps


# ---------------------------------------------------------------------------------------------- the pipelines


def segmentation_pipeline(diameter=None) -> SegmentationEnsemblePipeline:
    pipe = SegmentationEnsemblePipeline(unet=tiny_unet(), scheduler=DDIMScheduler(num_train_timesteps=100),
                                        field_of_view_diameter=diameter)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe, image, seeds, **kwargs):
    return pipe(image, num_inference_steps=2, ensemble_size=2, generator=seeded(*seeds), output_type="pt",
                **kwargs)


def test_segmentation_at_a_fixed_resolution_is_the_resized_call_mapped_back():
    """processing_resolution=32 on a 48x40 photograph == segmenting the photograph resized to 32x27 and resizing the
    member probabilities back before fusing."""
    pipe = segmentation_pipeline()
    image = torch.from_numpy(photo(48, 40, 36)).permute(2, 0, 1).float() / 255
    out = call(pipe, image, (0, 1), processing_resolution=32, return_members=True)
    assert out.masks.shape == (1, 40, 48) and out.members.shape == (1, 2, 1, 40, 48)
    assert out.processing[0].basis == "fixed" and out.processing[0].size == (27, 32)
    small = RetinaImageProcessor.resize(image[None] * 2 - 1, (27, 32))
    direct = call(pipe, (small + 1) / 2, (0, 1), return_members=True)
    members = RetinaImageProcessor.resize(direct.members[0], (40, 48), mode="bilinear")
    torch.testing.assert_close(out.members[0], members)
    torch.testing.assert_close(out.probabilities[0], members.mean(0))


def test_auto_segments_each_photograph_at_its_own_scale_and_a_batch_equals_single_calls():
    pipe = segmentation_pipeline(diameter=32)
    first = torch.from_numpy(photo(40, 40, 24, seed=1)).permute(2, 0, 1).float() / 255  # about x1.33
    second = torch.from_numpy(photo(40, 40, 33, seed=2)).permute(2, 0, 1).float() / 255  # native (within 5 %)
    batch = call(pipe, torch.stack([first, second]), (0, 1, 2, 3), processing_resolution="auto")
    assert [plan.basis for plan in batch.processing] == ["field_of_view", "native"]
    scale = 32 / field_of_view_diameter(photo(40, 40, 24, seed=1))
    assert batch.processing[0].size == (round(40 * scale),) * 2 and batch.masks.shape == (2, 40, 40)
    for index, (image, seeds) in enumerate(((first, (0, 1)), (second, (2, 3)))):
        single = call(pipe, image, seeds, processing_resolution="auto")
        torch.testing.assert_close(batch.probabilities[index], single.probabilities[0])
        torch.testing.assert_close(batch.entropy[index], single.entropy[0])
    native = call(pipe, first, (0, 1), processing_resolution="native")
    assert native.processing[0].basis == "native"
    assert call(pipe, first, (0, 1)).processing == batch.processing[:1]  # "auto" is the default
    assert not torch.allclose(native.probabilities, batch.probabilities[:1])


def test_the_training_diameter_is_saved_with_the_pipeline(tmp_path):
    segmentation_pipeline(diameter=920).save_pretrained(tmp_path / "seg")
    assert json.loads((tmp_path / "seg" / "model_index.json").read_text())["field_of_view_diameter"] == 920
    assert SegmentationEnsemblePipeline.from_pretrained(tmp_path / "seg").config.field_of_view_diameter == 920
    with pytest.raises(ValueError, match="field_of_view_diameter"):
        segmentation_pipeline(diameter=2.5)


def test_the_feature_pipeline_uses_the_same_rule(tmp_path):
    base = tiny_diffusion_features()
    pipe = DiffusionFeaturePipeline(unet=base.unet, scheduler=base.scheduler, head=decisive_head(),
                                    field_of_view_diameter=48)
    pipe.set_progress_bar_config(disable=True)
    image = photo(40, 32, 24, seed=3)
    out = pipe(image, output="segmentation", processing_resolution="auto", generator=seeded(0))
    scale = 48 / field_of_view_diameter(image)
    assert out.processing[0].basis == "field_of_view" and out.processing[0].scale == pytest.approx(scale)
    assert out.processing[0].size == (round(32 * scale), round(40 * scale))
    assert out.probabilities.shape[-2:] == (32, 40) and out.masks.shape == (1, 32, 40)
    outside = ~out.field_of_view[0]
    assert bool((out.probabilities[0, 0][outside] == 1).all()) and bool((out.uncertainty[0][outside] == 0).all())
    with pytest.raises(ValueError, match="processing_resolution"):
        pipe(image, output="features", processing_resolution=64)
    pipe.save_pretrained(tmp_path / "features")
    assert DiffusionFeaturePipeline.from_pretrained(tmp_path / "features").config.field_of_view_diameter == 48


def test_camera_degrees_match_pixels_per_degree_instead_of_diameters(tmp_path):
    """A model trained at 32 px over 30 degrees, a photograph from a 45-degree camera: "auto" alone brings its circle
    to 32 px; with camera_degrees=45 to 48 px, the training pixels per degree."""
    pipe = SegmentationEnsemblePipeline(unet=tiny_unet(), scheduler=DDIMScheduler(num_train_timesteps=100),
                                        field_of_view_diameter=32, field_of_view_degrees=30)
    pipe.set_progress_bar_config(disable=True)
    image = torch.from_numpy(photo(40, 40, 24, seed=1)).permute(2, 0, 1).float() / 255
    found = field_of_view_diameter(photo(40, 40, 24, seed=1))
    plain = call(pipe, image, (0, 1)).processing[0]
    wide = call(pipe, image, (0, 1), camera_degrees=45).processing[0]
    assert plain.scale == pytest.approx(32 / found) and wide.scale == pytest.approx(48 / found)
    assert wide.size == (round(40 * 48 / found),) * 2
    pipe.save_pretrained(tmp_path / "seg")
    assert SegmentationEnsemblePipeline.from_pretrained(tmp_path / "seg").config.field_of_view_degrees == 30
    with pytest.raises(ValueError, match="camera_degrees"):
        call(pipe, image, (0, 1), camera_degrees=45, processing_resolution="native")
    with pytest.raises(ValueError, match="camera_degrees"):
        call(pipe, image, (0, 1), camera_degrees=500)
    with pytest.raises(ValueError, match="field_of_view_degrees"):  # the checkpoint does not know its angle
        call(segmentation_pipeline(diameter=32), image, (0, 1), camera_degrees=45)
    with pytest.raises(ValueError, match="field_of_view_degrees"):
        SegmentationEnsemblePipeline(unet=tiny_unet(), scheduler=DDIMScheduler(num_train_timesteps=100),
                                     field_of_view_degrees=-3)
    # the feature pipeline, the same rule
    base = tiny_diffusion_features()
    features = DiffusionFeaturePipeline(unet=base.unet, scheduler=base.scheduler, head=decisive_head(),
                                        field_of_view_diameter=32, field_of_view_degrees=30)
    features.set_progress_bar_config(disable=True)
    out = features(photo(40, 40, 24, seed=1), output="segmentation", camera_degrees=45, generator=seeded(0))
    assert out.processing[0].scale == pytest.approx(48 / found) and out.masks.shape == (1, 40, 40)


def test_the_diameter_of_a_field_of_view_cut_by_the_frame_comes_from_a_circle_fit():
    """Many cameras crop the top and bottom of the circle, and crops cut it on every side: the bounding box then
    under-states the diameter, the fitted circle does not."""
    full = photo(240, 240, 200)
    assert abs(field_of_view_diameter(full) - 200) <= 2
    assert abs(field_of_view_diameter(full[40:200]) - 200) <= 3  # top and bottom cut
    assert abs(field_of_view_diameter(full[30:210, 30:210]) - 200) <= 3  # four corners left
    assert field_of_view_diameter(full[80:160, 80:160]) is None  # inside the retina


def test_docstring_examples_run():
    import doctest

    import diffusers_retina.data.camera_shift
    import diffusers_retina.image_processing.field_of_view
    import diffusers_retina.pipelines.sampling
    import diffusers_retina.training_data

    for module in (diffusers_retina.image_processing.field_of_view, diffusers_retina.training_data,
                   diffusers_retina.pipelines.sampling, diffusers_retina.data.camera_shift):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__
