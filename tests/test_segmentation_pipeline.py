"""Tests of SegmentationEnsemblePipeline: schedulers, batching/generators, inputs, fusion, uncertainty, multi-class,
learned variance, sizes and tiling, validation, output formats, callbacks (DESIGN sections 3-4).

Tiny models only (conftest.py): a (8, 16)-channel UNet or a pixel-wise stand-in, 16x16 images, 1-3 steps.
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from diffusers_retina import SegmentationEnsemblePipeline, SegmentationEnsemblePipelineOutput
from diffusers_retina.fusion import staple

from testing_utils import unit_range
from testing_utils import check_call_example

STEPS = 2


def run(pipe, image, **kwargs):
    """The pipeline on ``image``; tensors here are in the models' [-1, 1] and go in as the [0, 1] the pipeline takes."""
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "pt")
    return pipe(unit_range(image), **kwargs)


def last_step_callback(final_latents):
    """A callback that replaces the latents after the last step by ``final_latents(latents)``."""

    def callback(pipe, step, timestep, callback_kwargs):
        if step == len(pipe.scheduler.timesteps) - 1:
            return {"latents": final_latents(callback_kwargs["latents"])}
        return {}

    return callback


# ------------------------------------------------------------------------------------------------ schedulers

SCHEDULERS = [
    DDPMScheduler,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
    HeunDiscreteScheduler,
]


@pytest.mark.parametrize("scheduler_cls", SCHEDULERS, ids=lambda c: c.__name__)
def test_any_scheduler_shapes_range_and_determinism(pipe, image, gen, scheduler_cls):
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    assert isinstance(pipe.scheduler, scheduler_cls)

    first = run(pipe, image, ensemble_size=3, generator=gen(0), return_members=True)
    again = run(pipe, image, ensemble_size=3, generator=gen(0), return_members=True)
    other = run(pipe, image, ensemble_size=3, generator=gen(1), return_members=True)

    assert first.masks.shape == (1, 16, 16) and first.masks.dtype == torch.long
    assert set(first.masks.unique().tolist()) <= {0, 1}
    assert first.probabilities.shape == (1, 1, 16, 16)
    assert first.members.shape == (1, 3, 1, 16, 16)
    for name in ("variance", "entropy", "mutual_information"):
        assert getattr(first, name).shape == (1, 16, 16)
        assert torch.isfinite(getattr(first, name)).all()
    assert first.probabilities.min() >= 0 and first.probabilities.max() <= 1
    assert first.members.min() >= 0 and first.members.max() <= 1
    # members come from different noise: they are not copies of each other
    assert not torch.allclose(first.members[0, 0], first.members[0, 1])

    torch.testing.assert_close(first.members, again.members, rtol=0, atol=0)
    torch.testing.assert_close(first.masks, again.masks, rtol=0, atol=0)
    assert not torch.allclose(first.members, other.members)


def test_global_rng_without_generator_is_reproducible(pipe, image):
    torch.manual_seed(7)
    first = run(pipe, image, ensemble_size=2)
    torch.manual_seed(7)
    second = run(pipe, image, ensemble_size=2)
    torch.testing.assert_close(first.probabilities, second.probabilities, rtol=0, atol=0)


def test_euler_model_input_is_scaled(pixel_model_cls, make_pipe, image, gen):
    """Euler's latents start at ``init_noise_sigma`` (>> 1); the model must see ``scale_model_input`` of them."""
    model = pixel_model_cls()
    pipe = make_pipe(model, EulerDiscreteScheduler(num_train_timesteps=1000))
    seeds = (3, 4)
    run(pipe, image, ensemble_size=2, generator=gen(*seeds), num_inference_steps=3)

    scheduler = pipe.scheduler
    assert scheduler.init_noise_sigma > 5
    noise = torch.stack([torch.randn((1, 16, 16), generator=gen(s)) for s in seeds])
    sigma = scheduler.sigmas[0]
    expected_mask_input = noise * scheduler.init_noise_sigma / (sigma**2 + 1) ** 0.5
    first_input = model.calls[0]
    assert first_input.shape == (2, 4, 16, 16)
    # channel order: noisy mask first, then the clean image prior
    torch.testing.assert_close(first_input[:, :1], expected_mask_input, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first_input[:, 1:], image.expand(2, -1, -1, -1))
    assert len(model.calls) == 3


# ---------------------------------------------------------------------------------- batching and generators


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DDPMScheduler], ids=lambda c: c.__name__)
def test_batched_ensemble_equals_members_one_by_one(pipe, image, gen, scheduler_cls):
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    seeds = (10, 11, 12)
    batch_sizes = []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: batch_sizes.append(args[0].shape[0]))
    try:
        batched = run(pipe, image, ensemble_size=3, generator=gen(*seeds), return_members=True)
        assert batch_sizes == [3] * STEPS  # members run as one batch
        batch_sizes.clear()
        chunked = run(pipe, image, ensemble_size=3, generator=gen(*seeds), batch_size=1, return_members=True)
        assert batch_sizes == [1] * 3 * STEPS
    finally:
        hook.remove()
    torch.testing.assert_close(batched.members, chunked.members, rtol=0, atol=1e-5)
    torch.testing.assert_close(batched.probabilities, chunked.probabilities, rtol=0, atol=1e-5)

    for member, seed in enumerate(seeds):
        alone = run(pipe, image, ensemble_size=1, generator=[gen(seed)], return_members=True)
        torch.testing.assert_close(alone.members[0, 0], batched.members[0, member], rtol=0, atol=1e-5)
    assert not torch.allclose(batched.members[0, 0], batched.members[0, 1])


def test_auto_batch_size_policy():
    from diffusers_retina.pipelines.sampling import CPU_PIXELS_PER_FORWARD, samples_per_call, window_pixels

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert samples_per_call(None, 5, 256 * 256, cpu) == 5 and samples_per_call(3, 5, 64, cpu) == 3
    assert samples_per_call("auto", 5, 256 * 256, cuda) == 5  # accelerators: all at once
    # CPU: as many as fit the pixel budget, at least one, at most all
    assert samples_per_call("auto", 5, 256 * 256, cpu) == 1
    assert samples_per_call("auto", 5, 128 * 128, cpu) == CPU_PIXELS_PER_FORWARD // (128 * 128)
    assert samples_per_call("auto", 5, 64 * 64, cpu) == 5
    # half-precision pixels take half the bytes: twice as many fit
    assert samples_per_call("auto", 5, 128 * 128, cpu, torch.bfloat16) == 2 * CPU_PIXELS_PER_FORWARD // (128 * 128)
    assert window_pixels(999, 960, 256) == 256 * 256 and window_pixels(120, 960, 256) == 120 * 256
    assert window_pixels(64, 48, None) == 64 * 48


@pytest.mark.parametrize("tile_size", [None, 16])
def test_cpu_denoiser_calls_run_channels_last(tile_size):
    from diffusers_retina.pipelines.sampling import tiled_predict

    layouts = []

    def forward(window):
        layouts.append(window.is_contiguous(memory_format=torch.channels_last))
        return window * 2

    model_input = torch.randn(2, 4, 24, 40)
    out = tiled_predict(forward, model_input, tile_size, 0.25)
    assert layouts and all(layouts)
    torch.testing.assert_close(out, model_input * 2)


def test_auto_batch_size_chunks_members_on_cpu_with_same_output(pipe, image, gen, monkeypatch):
    from diffusers_retina.pipelines import sampling

    reference = run(pipe, image, ensemble_size=3, generator=gen(4), return_members=True)
    height, width = image.shape[-2:]
    monkeypatch.setattr(sampling, "CPU_PIXELS_PER_FORWARD", 2 * height * width)  # room for two members per call
    batch_sizes = []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: batch_sizes.append(args[0].shape[0]))
    try:
        auto = run(pipe, image, ensemble_size=3, generator=gen(4), batch_size="auto", return_members=True)
    finally:
        hook.remove()
    assert batch_sizes == [2] * STEPS + [1] * STEPS
    torch.testing.assert_close(auto.members, reference.members, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "scheduler_cls",
    # DPM-Solver and Euler keep per-run state (model output history, step index): every chunk must start afresh
    [DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler],
    ids=lambda c: c.__name__,
)
def test_single_generator_result_does_not_depend_on_batch_size(pipe, image, gen, scheduler_cls):
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    results = [
        run(pipe, image, ensemble_size=3, generator=gen(5), batch_size=batch_size, return_members=True).members
        for batch_size in (None, 2, 1)
    ]
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(results[0], results[2], rtol=0, atol=1e-5)
    assert not torch.allclose(results[0][0, 0], results[0][0, 2])


def _two_images():
    rng = np.random.RandomState(0)
    return [rng.randint(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(2)]


def _as_format(arrays, fmt):
    if fmt == "pil":
        return [PIL.Image.fromarray(a) for a in arrays]
    if fmt == "numpy":
        return np.stack(arrays)  # NHWC uint8
    tensor = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255 * 2 - 1  # NCHW in [-1, 1]
    return list(tensor) if fmt == "tensor_list" else tensor  # a list of CHW tensors


@pytest.mark.parametrize("fmt", ["pil", "numpy", "tensor", "tensor_list"])
def test_multi_image_batch_equals_images_alone(pipe, gen, fmt):
    arrays = _two_images()
    seeds = (20, 21, 22, 23)  # image-major: image 0 -> 20, 21; image 1 -> 22, 23
    together = run(pipe, _as_format(arrays, fmt), ensemble_size=2, generator=gen(*seeds), return_members=True)
    assert together.members.shape == (2, 2, 1, 16, 16)
    for index in range(2):
        alone = run(pipe, _as_format(arrays[index:index + 1], fmt), ensemble_size=2,
                    generator=gen(*seeds[2 * index:2 * index + 2]), return_members=True)
        torch.testing.assert_close(together.members[index], alone.members[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(together.probabilities[index], alone.probabilities[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(together.variance[index], alone.variance[0], rtol=0, atol=1e-5)
    # the same pixels in every input format give the same result
    reference = run(pipe, _as_format(arrays, "tensor"), ensemble_size=2, generator=gen(*seeds), return_members=True)
    torch.testing.assert_close(together.members, reference.members, rtol=0, atol=1e-5)


def test_generator_list_of_wrong_length(pipe, gen):
    images = _as_format(_two_images(), "tensor")
    with pytest.raises(ValueError, match="generator"):
        run(pipe, images, ensemble_size=2, generator=gen(1, 2, 3))
    with pytest.raises(ValueError, match="generator"):
        run(pipe, images, ensemble_size=2, generator=gen(1, 2))  # one per member, but not per image


# ---------------------------------------------------------------------------------- fusion and uncertainty

# Final member probabilities forced by a callback, per column band: all foreground / disagreement / all background.
DISAGREEING = (0.9, 0.6, 0.0)


def _forced_members(latents):
    probs = torch.zeros_like(latents)
    probs[..., :6] = 1.0
    for member, p in enumerate(DISAGREEING):
        probs[member, :, :, 6:11] = p
    return probs * 2 - 1


def _bernoulli_entropy(p):
    return -sum(x * math.log(x) for x in (p, 1 - p) if x > 0)


@pytest.mark.parametrize("fusion", ["mean", "majority", "staple"])
def test_fusion_methods_reach_the_output(pipe, image, gen, fusion):
    out = run(pipe, image, ensemble_size=3, fusion=fusion, generator=gen(0), return_members=True,
              callback_on_step_end=last_step_callback(_forced_members))
    members = out.members
    torch.testing.assert_close(members[0, :, 0, :, 7], torch.tensor(DISAGREEING)[:, None].expand(3, 16))
    agree_fg, disagree, agree_bg = (slice(0, 6), slice(6, 11), slice(11, 16))
    assert (out.masks[0, :, agree_fg] == 1).all() and (out.masks[0, :, agree_bg] == 0).all()

    region = out.probabilities[0, 0, :, disagree]
    if fusion == "mean":
        torch.testing.assert_close(region, torch.full_like(region, sum(DISAGREEING) / 3))
        assert (out.masks[0, :, disagree] == 0).all()  # 0.5 is not above the threshold
    elif fusion == "majority":
        torch.testing.assert_close(region, torch.full_like(region, 2 / 3))
        assert (out.masks[0, :, disagree] == 1).all()  # two of three members vote foreground
    else:
        decisions = (members[:, :, 0] > 0.5).long()
        expected = staple(decisions).posterior[:, 1:2]
        torch.testing.assert_close(out.probabilities, expected)
        assert not torch.allclose(region, torch.full_like(region, 2 / 3), atol=1e-3)
        assert not torch.allclose(region, torch.full_like(region, 0.5), atol=1e-3)


@pytest.mark.parametrize("fusion", ["mean", "majority", "staple"])
def test_threshold_reaches_the_fusion(pipe, image, gen, fusion):
    """Members at p = 0.3 everywhere: background at the default threshold 0.5, foreground at 0.25."""
    callback = last_step_callback(lambda latents: torch.full_like(latents, 0.3 * 2 - 1))
    default = run(pipe, image, ensemble_size=2, fusion=fusion, generator=gen(0), callback_on_step_end=callback)
    low = run(pipe, image, ensemble_size=2, fusion=fusion, generator=gen(0), callback_on_step_end=callback,
              threshold=0.25)
    assert torch.all(default.masks == 0)
    assert torch.all(low.masks == 1)


def test_uncertainty_zero_where_members_agree_and_positive_where_they_disagree(pipe, image, gen):
    out = run(pipe, image, ensemble_size=3, generator=gen(0), callback_on_step_end=last_step_callback(_forced_members))
    agree = torch.ones(16, 16, dtype=torch.bool)
    agree[:, 6:11] = False
    for name in ("variance", "entropy", "mutual_information"):
        values = getattr(out, name)[0]
        assert torch.all(values[agree] == 0), name
        assert torch.all(values[~agree] > 0), name
    mean = sum(DISAGREEING) / 3
    expected_variance = sum((p - mean) ** 2 for p in DISAGREEING) / 3
    expected_entropy = _bernoulli_entropy(mean)
    expected_mi = expected_entropy - sum(_bernoulli_entropy(p) for p in DISAGREEING) / 3
    torch.testing.assert_close(out.variance[0, 0, 7].item(), expected_variance, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.entropy[0, 0, 7].item(), expected_entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.mutual_information[0, 0, 7].item(), expected_mi, rtol=1e-5, atol=1e-6)


def test_uncertainty_from_the_model_itself(pixel_model_cls, make_pipe, image, gen):
    """A model predicting a constant clean mask makes every member equal; one echoing its noisy input does not."""
    model = pixel_model_cls()
    scheduler = DDIMScheduler(num_train_timesteps=100, prediction_type="sample")
    pipe = make_pipe(model, scheduler)

    model.fn = lambda sample, t: torch.full_like(sample[:, :1], 0.6)
    constant = run(pipe, image, ensemble_size=3, generator=gen(0), return_members=True)
    torch.testing.assert_close(constant.members, torch.full_like(constant.members, 0.8))
    assert torch.all(constant.variance == 0) and torch.all(constant.mutual_information == 0)
    torch.testing.assert_close(constant.entropy, torch.full_like(constant.entropy, _bernoulli_entropy(0.8)))

    model.fn = lambda sample, t: sample[:, :1].clamp(-1, 1)
    noisy = run(pipe, image, ensemble_size=3, generator=gen(0), return_members=True)
    assert (noisy.variance > 0).float().mean() > 0.9
    assert (noisy.mutual_information > 0).float().mean() > 0.9


# ---------------------------------------------------------------------------------- multi-class, learned variance


def test_multi_class_masks_and_probabilities(make_unet, make_pipe, image, gen):
    pipe = make_pipe(make_unet(image_channels=3, mask_channels=3))
    assert pipe.num_classes == 3 and pipe.image_channels == 3
    out = run(pipe, image, ensemble_size=2, generator=gen(0), return_members=True)
    assert out.masks.shape == (1, 16, 16) and out.masks.dtype == torch.long
    assert set(out.masks.unique().tolist()) <= {0, 1, 2}
    assert out.probabilities.shape == (1, 3, 16, 16)
    torch.testing.assert_close(out.probabilities.sum(dim=1), torch.ones(1, 16, 16))
    torch.testing.assert_close(out.members.sum(dim=2), torch.ones(1, 2, 16, 16))
    torch.testing.assert_close(out.masks, out.probabilities.argmax(dim=1))

    # forced one-hot members: class = column % 3 for both members; each fusion returns those class indices
    classes = torch.arange(16).remainder(3).expand(16, 16)

    def one_hot(latents):
        return torch.nn.functional.one_hot(classes, 3).permute(2, 0, 1).float().expand_as(latents) * 2 - 1

    for fusion in ("mean", "majority", "staple"):
        forced = run(pipe, image, ensemble_size=2, fusion=fusion, generator=gen(0),
                     callback_on_step_end=last_step_callback(one_hot))
        assert torch.equal(forced.masks[0], classes), fusion
    pil = run(pipe, image, ensemble_size=2, generator=gen(0), output_type="pil",
              callback_on_step_end=last_step_callback(one_hot))
    np.testing.assert_array_equal(np.asarray(pil.masks[0]), classes.numpy())  # class indices kept as values


LEARNED_VARIANCE_SCHEDULERS = [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler]


@pytest.mark.parametrize("mask_channels", [1, 3])
@pytest.mark.parametrize("scheduler_cls", LEARNED_VARIANCE_SCHEDULERS, ids=lambda c: c.__name__)
def test_learned_variance_model(make_unet, make_pipe, image, gen, mask_channels, scheduler_cls, monkeypatch):
    unet = make_unet(image_channels=3, mask_channels=mask_channels, out_channels=2 * mask_channels)
    pipe = make_pipe(unet, DDPMScheduler(num_train_timesteps=100, variance_type="learned_range"))
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    assert pipe.mask_channels == mask_channels and pipe.image_channels == 3

    seen_channels = []
    original_step = pipe.scheduler.step

    def recording_step(model_output, *args, **kwargs):
        seen_channels.append(model_output.shape[1])
        return original_step(model_output, *args, **kwargs)

    monkeypatch.setattr(pipe.scheduler, "step", recording_step)
    out = run(pipe, image, ensemble_size=2, generator=gen(0), return_members=True)
    channels = 1 if mask_channels == 1 else mask_channels
    assert out.probabilities.shape == (1, channels, 16, 16)
    assert out.members.shape == (1, 2, channels, 16, 16)
    assert set(out.masks.unique().tolist()) <= set(range(max(2, mask_channels)))
    # DDPM uses the learned variance (it splits the output itself); every other scheduler gets the mean only
    expected = 2 * mask_channels if scheduler_cls is DDPMScheduler else mask_channels
    assert seen_channels and set(seen_channels) == {expected}


# ---------------------------------------------------------------------------------- sizes and tiling


def test_odd_size_comes_back_at_input_size(pipe, gen):
    array = np.random.RandomState(1).randint(0, 256, (37, 45, 3), dtype=np.uint8)
    out = run(pipe, array, ensemble_size=2, generator=gen(0), output_type="np", return_members=True)
    assert out.masks.shape == (1, 37, 45)
    assert out.probabilities.shape == (1, 37, 45, 1)
    assert out.members.shape == (1, 2, 37, 45, 1)
    for name in ("variance", "entropy", "mutual_information"):
        assert getattr(out, name).shape == (1, 37, 45)
    pil = run(pipe, PIL.Image.fromarray(array), ensemble_size=2, generator=gen(0), output_type="pil")
    assert pil.masks[0].size == (45, 37) and pil.entropy[0].size == (45, 37)
    np.testing.assert_array_equal(np.asarray(pil.masks[0]), out.masks[0].astype(np.uint8) * 255)


def test_tiled_equals_untiled_for_a_pixelwise_model(pixel_model_cls, make_pipe, gen):
    torch.manual_seed(0)
    model = pixel_model_cls()
    pipe = make_pipe(model)
    image = torch.rand(1, 3, 37, 45, generator=gen(9)) * 2 - 1
    whole = run(pipe, image, ensemble_size=2, generator=gen(1, 2), return_members=True)
    assert {tuple(c.shape[-2:]) for c in model.calls} == {(38, 46)}  # padded to the factor 2 ...
    padded_prior = model.calls[0][0, 1:]
    torch.testing.assert_close(padded_prior[:, :37, :45], image[0])
    torch.testing.assert_close(padded_prior[:, 37, :45], image[0, :, 35])  # ... by reflection, bottom
    torch.testing.assert_close(padded_prior[:, :37, 45], image[0, :, :, 43])  # and right
    model.calls.clear()
    tiled = run(pipe, image, ensemble_size=2, generator=gen(1, 2), return_members=True, tile_size=16,
                tile_overlap=0.25)
    window_shapes = {tuple(c.shape[-2:]) for c in model.calls}
    assert window_shapes == {(16, 16)}
    assert len(model.calls) > 4 * STEPS  # several windows per denoising step
    assert tiled.masks.shape == (1, 37, 45)
    torch.testing.assert_close(tiled.members, whole.members, rtol=0, atol=1e-5)
    torch.testing.assert_close(tiled.probabilities, whole.probabilities, rtol=0, atol=1e-5)


def test_tiled_unet_runs_at_any_size(pipe, gen):
    array = np.random.RandomState(2).randint(0, 256, (37, 45, 3), dtype=np.uint8)
    shapes = []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: shapes.append(tuple(args[0].shape[-2:])))
    try:
        out = run(pipe, array, ensemble_size=2, generator=gen(0), tile_size=16, num_inference_steps=1)
    finally:
        hook.remove()
    assert set(shapes) == {(16, 16)}
    assert out.masks.shape == (1, 37, 45)
    assert out.probabilities.min() >= 0 and out.probabilities.max() <= 1


@pytest.mark.parametrize("tile_size", [15, 1, 0, -4])
def test_invalid_tile_size(pipe, image, tile_size):
    with pytest.raises(ValueError, match="tile_size"):
        run(pipe, image, tile_size=tile_size)


# ---------------------------------------------------------------------------------- input validation

BAD_IMAGES = {
    "channels": torch.zeros(1, 1, 16, 16),
    "channels_numpy": np.zeros((16, 16, 4), dtype=np.uint8),
    "nan": torch.full((1, 3, 16, 16), float("nan")),
    "nan_numpy": np.full((16, 16, 3), np.nan, dtype=np.float32),
    "tensor_range": torch.full((1, 3, 16, 16), 2.0),
    "float_numpy_range": np.full((16, 16, 3), 1.5, dtype=np.float32),
    "float_numpy_negative": np.full((16, 16, 3), -0.5, dtype=np.float32),
    "sizes_differ": [np.zeros((16, 16, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)],
    "tensor_sizes_differ": [torch.zeros(3, 16, 16), torch.zeros(3, 8, 8)],
    "tensor_list_range": [torch.zeros(3, 16, 16), torch.full((3, 16, 16), 3.0)],
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_images_raise_value_error_naming_image(pipe, case):
    with pytest.raises(ValueError, match="`image`"):
        run(pipe, BAD_IMAGES[case])


BAD_ARGUMENTS = [
    ("fusion", "vote"),
    ("output_type", "latent"),
    ("ensemble_size", 0),
    ("ensemble_size", 2.0),
    ("threshold", 1.5),
    ("batch_size", 0),
    ("batch_size", "fast"),
    ("batch_size", True),
    ("tile_overlap", 1.0),
    ("callback_on_step_end_tensor_inputs", ["prior"]),
]


@pytest.mark.parametrize("name, value", BAD_ARGUMENTS)
def test_bad_arguments_raise_value_error_naming_them(pipe, image, name, value):
    with pytest.raises(ValueError, match=f"`{name}`"):
        run(pipe, image, **{name: value})


# ---------------------------------------------------------------------------------- outputs


def test_output_types_agree(pipe, image, gen):
    kwargs = dict(ensemble_size=2, return_members=True)
    pt = run(pipe, image, generator=gen(0), output_type="pt", **kwargs)
    np_out = run(pipe, image, generator=gen(0), output_type="np", **kwargs)
    pil = run(pipe, image, generator=gen(0), output_type="pil", **kwargs)
    for out in (pt, np_out, pil):
        assert isinstance(out, SegmentationEnsemblePipelineOutput)

    assert isinstance(pt.masks, torch.Tensor) and isinstance(np_out.masks, np.ndarray)
    np.testing.assert_array_equal(np_out.masks, pt.masks.numpy())
    assert np_out.probabilities.shape == (1, 16, 16, 1)
    np.testing.assert_allclose(np_out.probabilities, pt.probabilities.permute(0, 2, 3, 1).numpy())
    assert np_out.members.shape == (1, 2, 16, 16, 1)
    np.testing.assert_allclose(np_out.members, pt.members.permute(0, 1, 3, 4, 2).numpy())
    np.testing.assert_allclose(np_out.entropy, pt.entropy.numpy())

    for name in ("masks", "probabilities", "variance", "entropy", "mutual_information"):
        images = getattr(pil, name)
        assert isinstance(images, list) and len(images) == 1
        assert isinstance(images[0], PIL.Image.Image) and images[0].mode == "L" and images[0].size == (16, 16)
    np.testing.assert_array_equal(np.asarray(pil.masks[0]), np_out.masks[0].astype(np.uint8) * 255)
    np.testing.assert_array_equal(
        np.asarray(pil.probabilities[0]), (np_out.probabilities[0, ..., 0] * 255).round().astype(np.uint8)
    )
    assert len(pil.members) == 1 and len(pil.members[0]) == 2
    np.testing.assert_array_equal(
        np.asarray(pil.members[0][1]), (np_out.members[0, 1, ..., 0] * 255).round().astype(np.uint8)
    )


def test_return_members_off_and_return_dict_false(pipe, image, gen):
    out = run(pipe, image, ensemble_size=2, generator=gen(0))
    assert out.members is None
    as_tuple = run(pipe, image, ensemble_size=2, generator=gen(0), return_dict=False, return_members=True)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 7
    masks, probabilities, variance, entropy, mutual_information, members, processing = as_tuple
    assert processing == out.processing and processing[0].basis == "native"
    assert torch.equal(masks, out.masks)
    torch.testing.assert_close(probabilities, out.probabilities)
    torch.testing.assert_close(entropy, out.entropy)
    torch.testing.assert_close(mutual_information, out.mutual_information)
    torch.testing.assert_close(variance, out.variance)
    assert members.shape == (1, 2, 1, 16, 16)


# ---------------------------------------------------------------------------------- callbacks, progress bar, docs


def test_callback_gets_latents_every_step_and_can_replace_them(pipe, image, gen):
    calls = []

    def record(pipe_, step, timestep, callback_kwargs):
        calls.append((step, int(timestep), callback_kwargs["latents"].clone()))
        return {}

    out = run(pipe, image, ensemble_size=3, batch_size=2, num_inference_steps=3, generator=gen(0),
              return_members=True, callback_on_step_end=record)
    pipe.scheduler.set_timesteps(3)
    timesteps = [int(t) for t in pipe.scheduler.timesteps]
    # two chunks (2 + 1 samples), three steps each
    assert [(step, t) for step, t, _ in calls] == list(enumerate(timesteps)) * 2
    assert [latents.shape for _, _, latents in calls] == [(2, 1, 16, 16)] * 3 + [(1, 1, 16, 16)] * 3
    # the latents after the last step are what the members are made of
    final = torch.cat([calls[2][2], calls[5][2]])
    torch.testing.assert_close(out.members[0], ((final.clamp(-1, 1) + 1) / 2))

    plain = run(pipe, image, ensemble_size=3, generator=gen(0))
    assert not torch.all(plain.masks == 1)
    forced = run(pipe, image, ensemble_size=3, generator=gen(0),
                 callback_on_step_end=last_step_callback(lambda latents: torch.ones_like(latents)))
    assert torch.all(forced.masks == 1) and torch.all(forced.probabilities == 1)
    assert torch.all(forced.variance == 0)


def test_progress_bar_can_be_disabled(make_pipe, image, gen, capsys):
    pipe = make_pipe()
    pipe.set_progress_bar_config(disable=False)
    run(pipe, image, ensemble_size=1, generator=gen(0))
    shown = capsys.readouterr().err
    assert f"{STEPS}/{STEPS}" in shown

    pipe.set_progress_bar_config(disable=True)
    run(pipe, image, ensemble_size=1, generator=gen(0))
    assert capsys.readouterr().err == ""


def test_call_docstring_has_a_valid_example():
    check_call_example(SegmentationEnsemblePipeline)
