"""The diffusers pipeline contract for Mask2ImagePipeline, DiffusionFeaturePipeline and the feature heads (issue 15),
in the spirit of diffusers' ``PipelineTesterMixin``: input formats, argument checks naming the argument, NaN outputs
as errors, ``guidance_scale`` / ``num_timesteps`` / ``interrupt`` for step callbacks, ``output_type="latent"``,
dict vs tuple outputs, batch vs single with generators, save/load round trip, reduced precision, and checkpoints of
one pipeline refused by another. Tiny random models only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from diffusers_retina import DiffusionFeaturePipeline, Mask2ImagePipeline, SegmentationEnsemblePipeline
from diffusers_retina.image_processing import prepare_masks
from diffusers_retina.models import FeatureHeadOutput, FreqAggHead, PixelMLPEnsemble
from diffusers_retina.pipelines.checks import NonFiniteOutputError

from testing_utils import feature_images, tiny_diffusion_features, tiny_mask2image, tiny_unet, unit_range, vessel_masks


def seeded(*seeds):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


@pytest.fixture
def mask2image():
    return tiny_mask2image("concat+spade")


def paint(pipe, mask, **kwargs):
    options = dict(num_inference_steps=2, generator=seeded(0), output_type="pt")
    options.update(kwargs)
    return pipe(mask, **options)


# ---------------------------------------------------------------------------------------------- Mask2Image: inputs


def test_numpy_masks_stored_as_images_are_one_mask(mask2image):
    mask = vessel_masks(1)[0].numpy().astype(np.uint8)  # (16, 16) in {0, 1}
    reference = paint(mask2image, mask * 255)
    for stored in (np.stack([mask * 255] * 3, axis=-1), (mask * 255)[..., None],
                   np.concatenate([np.stack([mask * 255] * 3, axis=-1), np.full((16, 16, 1), 255, np.uint8)], -1)):
        out = paint(mask2image, stored)
        assert out.images.shape == (1, 3, 16, 16), stored.shape
        torch.testing.assert_close(out.images, reference.images, rtol=0, atol=0)
        assert torch.equal(out.masks, reference.masks)
    batch = paint(mask2image, np.stack([np.stack([mask * 255] * 3, axis=-1)] * 2), generator=seeded(0, 1))
    assert batch.images.shape == (2, 3, 16, 16)
    colour = np.stack([mask * 255, mask * 0, mask * 255], axis=-1)
    with pytest.raises(ValueError, match="colour channels differ"):
        paint(mask2image, colour)


def test_prepare_masks_accepts_a_list_of_tensors():
    masks = vessel_masks(2)
    batched = prepare_masks(masks, 2)
    torch.testing.assert_close(prepare_masks([masks[0], masks[1]], 2), batched)
    torch.testing.assert_close(prepare_masks([masks[0].float(), masks[1].float()], 2), batched)
    with pytest.raises(ValueError, match="same size"):
        prepare_masks([masks[0], masks[1][:8]], 2)


@pytest.mark.parametrize("steps", [0, -1, 2.5, True, "2"])
def test_num_inference_steps_must_be_a_positive_integer(mask2image, steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        paint(mask2image, vessel_masks(1), num_inference_steps=steps)


def test_mask_num_inference_steps_is_checked():
    pipe = tiny_mask2image(with_mask_model=True)
    with pytest.raises(ValueError, match="mask_num_inference_steps"):
        pipe(num_masks=1, num_inference_steps=2, mask_num_inference_steps=0, generator=seeded(0, 1), output_type="pt")


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, -1.0, "2"])
def test_guidance_scale_must_be_finite_and_non_negative(mask2image, scale):
    with pytest.raises(ValueError, match="guidance_scale"):
        paint(mask2image, vessel_masks(1), guidance_scale=scale)


def test_nan_weights_raise_instead_of_a_black_image(mask2image):
    with torch.no_grad():
        for parameter in mask2image.unet.parameters():
            parameter.fill_(math.nan)
    with pytest.raises(NonFiniteOutputError, match="NaN"):
        paint(mask2image, vessel_masks(1), output_type="pil")


# ---------------------------------------------------------------------------------------------- Mask2Image: contract


def test_callbacks_read_and_change_guidance_scale_and_num_timesteps(mask2image):
    batch_sizes = []
    handle = mask2image.unet.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    seen = []

    def stop_guiding(pipe, step, timestep, callback_kwargs):
        seen.append((step, pipe.guidance_scale, pipe.num_timesteps))
        pipe._guidance_scale = 1.0  # diffusers' CFG cut-off callbacks do this
        return callback_kwargs

    try:
        paint(mask2image, vessel_masks(1), num_inference_steps=3, guidance_scale=2.0,
              callback_on_step_end=stop_guiding)
    finally:
        handle.remove()
    assert seen == [(0, 2.0, 3), (1, 1.0, 3), (2, 1.0, 3)]
    assert batch_sizes == [2, 1, 1]  # conditional + null condition at the first step only


def test_interrupt_skips_the_remaining_steps(mask2image):
    calls = []
    handle = mask2image.unet.register_forward_pre_hook(lambda module, args: calls.append(1))

    def interrupt(pipe, step, timestep, callback_kwargs):
        pipe._interrupt = True
        return callback_kwargs

    try:
        out = paint(mask2image, vessel_masks(1), num_inference_steps=4, callback_on_step_end=interrupt)
    finally:
        handle.remove()
    assert len(calls) == 1 and mask2image.interrupt and mask2image.num_timesteps == 4
    assert out.images.shape == (1, 3, 16, 16)
    paint(mask2image, vessel_masks(1))
    assert not mask2image.interrupt  # reset by the next call


def test_output_type_latent(mask2image):
    masks = vessel_masks(2, size=(16, 12))
    latent = paint(mask2image, masks, output_type="latent", generator=seeded(0, 1))
    pt = paint(mask2image, masks, output_type="pt", generator=seeded(0, 1))
    assert latent.images.shape == (2, 3, 16, 12) and latent.images.dtype == torch.float32
    torch.testing.assert_close((latent.images.clamp(-1, 1) + 1) / 2, pt.images)
    assert torch.equal(latent.masks, pt.masks)
    with pytest.raises(ValueError, match="latent"):
        tiny_mask2image(with_mask_model=True)(num_masks=1, output_type="latent")


def test_dict_and_tuple_outputs_and_batch_equals_single(mask2image):
    masks = vessel_masks(2)
    out = paint(mask2image, masks, generator=seeded(3, 4))
    images, mask_indices = paint(mask2image, masks, generator=seeded(3, 4), return_dict=False)
    assert torch.equal(out.images, images) and torch.equal(out["images"], out[0])
    for index, seed in enumerate((3, 4)):  # one generator per sample: a batched image equals its single run
        single = paint(mask2image, masks[index: index + 1], generator=seeded(seed))
        torch.testing.assert_close(single.images[0], out.images[index], rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_and_reduced_precision(mask2image, tmp_path):
    masks = vessel_masks(1)
    reference = paint(mask2image, masks, guidance_scale=1.5).images
    mask2image.save_pretrained(tmp_path / "m2i")
    loaded = Mask2ImagePipeline.from_pretrained(tmp_path / "m2i")
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(paint(loaded, masks, guidance_scale=1.5).images, reference, rtol=0, atol=1e-6)
    half = Mask2ImagePipeline.from_pretrained(tmp_path / "m2i", dtype=torch.bfloat16)
    half.set_progress_bar_config(disable=True)
    images = paint(half, masks, guidance_scale=1.5).images
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    torch.testing.assert_close(images, reference, rtol=0, atol=0.1)


def test_a_checkpoint_of_another_pipeline_is_refused(mask2image, tmp_path):
    mask2image.save_pretrained(tmp_path / "m2i")
    SegmentationEnsemblePipeline(unet=tiny_unet(), scheduler=DDIMScheduler(num_train_timesteps=100)).save_pretrained(
        tmp_path / "seg")
    with pytest.raises(ValueError, match="holds a Mask2ImagePipeline.*not a SegmentationEnsemblePipeline"):
        SegmentationEnsemblePipeline.from_pretrained(tmp_path / "m2i")
    with pytest.raises(ValueError, match="holds a SegmentationEnsemblePipeline.*not a Mask2ImagePipeline"):
        Mask2ImagePipeline.from_pretrained(tmp_path / "seg")
    with pytest.raises(ValueError, match="holds a Mask2ImagePipeline"):
        DiffusionFeaturePipeline.from_pretrained(tmp_path / "m2i")


# ---------------------------------------------------------------------------------------------- features and heads


def test_features_output_keeps_its_fields():
    pipe = tiny_diffusion_features("attention")
    out = pipe(unit_range(feature_images(1)), blocks=["up.1"], timesteps=[10], generator=seeded(0))
    assert set(out.keys()) == {"features"}
    assert out["features"] is out.features and out[0] is out.features and out.to_tuple() == (out.features,)
    as_tuple = pipe(unit_range(feature_images(1)), blocks=["up.1"], timesteps=[10], generator=seeded(0),
                    return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(as_tuple[0], dict)
    torch.testing.assert_close(as_tuple[0]["up.1"], out.features["up.1"])


def test_default_blocks_on_a_two_level_unet():
    pipe = tiny_diffusion_features("plain")  # block_out_channels (8, 16): up.0 and up.1 only
    assert pipe.default_blocks() == ["up.0", "up.1"]
    out = pipe(unit_range(feature_images(1)), timesteps=[10], generator=seeded(0))
    assert list(out.features) == ["up.0", "up.1"]
    assert tiny_diffusion_features("attention").default_blocks() == ["up.1", "up.2"]


def test_nan_features_raise():
    pipe = tiny_diffusion_features("plain")
    with torch.no_grad():
        pipe.unet.conv_in.weight.fill_(math.nan)
    with pytest.raises(NonFiniteOutputError, match="features"):
        pipe(unit_range(feature_images(1)), timesteps=[10], generator=seeded(0))


def head_pair(blocks, channels):
    torch.manual_seed(0)
    return (PixelMLPEnsemble(blocks=blocks, timesteps=[10, 20], block_channels=channels, ensemble_size=2).eval(),
            FreqAggHead(blocks=blocks, timesteps=[10, 20], block_channels=channels, embed_dim=8).eval())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_heads_in_half_precision_with_half_precision_features(dtype):
    pixel_head, freq_head = head_pair(["up.0", "up.1"], [16, 8])
    features = {"up.0": torch.randn(1, 2, 16, 8, 8), "up.1": torch.randn(1, 2, 8, 16, 16)}
    for head in (pixel_head, freq_head):
        reference = head.predict(features, size=(16, 16))
        half = head.to(dtype).predict({k: v.to(dtype) for k, v in features.items()}, size=(16, 16))
        assert torch.isfinite(half["probabilities"]).all()
        torch.testing.assert_close(half["probabilities"], reference["probabilities"], rtol=0, atol=0.05)


def test_heads_forward_has_return_dict():
    pixel_head, freq_head = head_pair(["up.0"], [16])
    vectors = torch.randn(5, 32)
    out = pixel_head(vectors)
    assert isinstance(out, FeatureHeadOutput) and out.logits.shape == (2, 5, 2)
    torch.testing.assert_close(pixel_head(vectors, return_dict=False)[0], out.logits)
    features = {"up.0": torch.randn(1, 2, 16, 8, 8)}
    out = freq_head(features, size=(16, 16))
    assert isinstance(out, FeatureHeadOutput) and out.logits.shape == (1, 2, 16, 16)
    torch.testing.assert_close(freq_head(features, size=(16, 16), return_dict=False)[0], out.logits)


@pytest.mark.parametrize("head_kind", ["pixel_mlp", "freq_agg"])
def test_segmentation_with_a_head_in_a_bfloat16_pipeline(tmp_path, head_kind):
    pipe = tiny_diffusion_features("plain")
    channels = {d["name"]: d["channels"] for d in pipe.describe()}
    pixel_head, freq_head = head_pair(["up.0", "up.1"], [channels["up.0"], channels["up.1"]])
    pipe.set_head(pixel_head if head_kind == "pixel_mlp" else freq_head)
    reference = pipe(unit_range(feature_images(1)), output="segmentation", generator=seeded(0))
    pipe.save_pretrained(tmp_path / "features")
    half = DiffusionFeaturePipeline.from_pretrained(tmp_path / "features", dtype=torch.bfloat16)
    assert half.head.dtype == torch.bfloat16
    out = half(unit_range(feature_images(1)), output="segmentation", generator=seeded(0))
    assert torch.isfinite(out.probabilities).all()
    torch.testing.assert_close(out.probabilities, reference.probabilities, rtol=0, atol=0.1)
