"""ConditionalUNet2DModel (concat / SPADE / concat+SPADE, learned null condition) and Mask2ImagePipeline (CFG, tiles,
two-stage mask + image sampling, loading). Tiny models only: (8, 16) channels, 16x16 images, 2 steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

from diffusers_retina import Mask2ImagePipeline
from diffusers_retina.image_processing import mask_to_diffusion
from diffusers_retina.models import SPADE, ConditionalUNet2DModel

from testing_utils import check_call_example, tiny_conditional, tiny_mask_unet, vessel_masks
from testing_utils import tiny_mask2image as tiny_pipe

REPO = Path(__file__).resolve().parents[1]
MODES = ("concat", "spade", "concat+spade")


def generators(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# ---------------------------------------------------------------------------------------------- the model


@pytest.mark.parametrize("conditioning", MODES)
def test_each_conditioning_mode_trains_a_step_and_uses_the_mask(conditioning):
    model = tiny_conditional(conditioning, perturb=False).train()
    has_spade = "spade" in conditioning
    assert bool(model.spade_layers) == has_spade
    assert model.unet.config.in_channels == (4 if "concat" in conditioning else 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    clean = torch.rand(4, 3, 16, 16) * 2 - 1
    masks = mask_to_diffusion(vessel_masks(4), 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(2):
        noise = torch.randn_like(clean)
        drop = torch.tensor([False, True, False, False])
        loss = torch.nn.functional.mse_loss(model(clean + noise, torch.tensor([10, 20, 30, 40]), mask=masks,
                                                  drop_condition=drop).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    after = model.state_dict()
    assert not torch.equal(before["null_condition"], after["null_condition"])  # the dropped sample trained it
    if has_spade:
        spade_keys = [k for k in after if ".gamma." in k]
        assert spade_keys and all(not torch.equal(before[k], after[k]) for k in spade_keys)

    # the trained model's prediction depends on the mask
    model.eval()
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([50])
    one = model(x, t, mask=mask_to_diffusion(vessel_masks(1, seed=1), 2)).sample
    other = model(x, t, mask=mask_to_diffusion(vessel_masks(1, seed=2), 2)).sample
    assert not torch.allclose(one, other, atol=1e-5)


def test_spade_module_formula_and_identity_at_init():
    spade = SPADE(channels=4, mask_channels=1, num_groups=2, hidden_channels=8)
    x = torch.randn(2, 4, 8, 12)
    spade.segmap = torch.rand(2, 1, 16, 24) * 2 - 1
    normalised = torch.nn.functional.group_norm(x, 2, eps=1e-5)
    torch.testing.assert_close(spade(x), normalised)  # gamma = beta = 0 at init
    with torch.no_grad():
        spade.gamma.bias.fill_(1.0)
        spade.beta.bias.fill_(0.5)
    torch.testing.assert_close(spade(x), normalised * 2 + 0.5)
    instance = SPADE(channels=4, mask_channels=1, num_groups=2, norm="instance", hidden_channels=8)
    instance.segmap = spade.segmap
    torch.testing.assert_close(instance(x), torch.nn.functional.instance_norm(x, eps=1e-5), rtol=1e-4, atol=1e-5)
    spade.segmap = None
    with pytest.raises(RuntimeError, match="needs a mask"):
        spade(x)


def test_spade_blocks_and_norm_options():
    decoder = tiny_conditional("spade", spade_blocks="decoder")
    everywhere = tiny_conditional("spade", spade_blocks="all", spade_norm="instance")
    assert len(everywhere.spade_layers) > len(decoder.spade_layers)
    assert all(not isinstance(r.norm1, SPADE) for b in decoder.unet.down_blocks for r in b.resnets)
    assert all(isinstance(r.norm1, SPADE) for b in everywhere.unet.down_blocks for r in b.resnets)
    assert all(isinstance(s.norm, torch.nn.InstanceNorm2d) for s in everywhere.spade_layers)
    for bad in (dict(conditioning="cross-attention"), dict(spade_blocks="encoder"), dict(spade_norm="batch")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ConditionalUNet2DModel(block_out_channels=(8, 16), norm_num_groups=4, **bad)


def test_null_condition_and_drop_condition_per_sample():
    model = tiny_conditional()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 60])
    masks = mask_to_diffusion(vessel_masks(2), 2)
    conditional = model(x, t, mask=masks).sample
    unconditional = model(x, t, mask=None).sample
    mixed = model(x, t, mask=masks, drop_condition=torch.tensor([True, False])).sample
    torch.testing.assert_close(mixed[0], unconditional[0])
    torch.testing.assert_close(mixed[1], conditional[1])
    assert not torch.allclose(conditional, unconditional, atol=1e-5)
    # the null condition is the learned per-channel value, broadcast
    null = model.condition(None, None, 2, (16, 16), torch.float32, torch.device("cpu"))
    torch.testing.assert_close(null, model.null_condition.view(1, 1, 1, 1).expand(2, 1, 16, 16))


def test_model_rejects_masks_of_the_wrong_shape():
    model = tiny_conditional()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"`mask` must be \(B, 1, 16, 16\)"):
        model(x, 1, mask=torch.zeros(1, 1, 8, 16))
    with pytest.raises(ValueError, match=r"`mask` must be \(B, 1, 16, 16\)"):
        model(x, 1, mask=torch.zeros(1, 3, 16, 16))


def test_soft_and_multi_class_conditions():
    model = tiny_conditional(mask_channels=3)
    indices = torch.randint(0, 3, (2, 16, 16), generator=torch.Generator().manual_seed(0))
    out = model(torch.randn(2, 3, 16, 16), 3, mask=mask_to_diffusion(indices, 3)).sample
    assert out.shape == (2, 3, 16, 16)
    soft = torch.rand(1, 1, 16, 16) * 2 - 1  # probabilities, not a hard mask
    assert torch.isfinite(tiny_conditional()(torch.randn(1, 3, 16, 16), 3, mask=soft).sample).all()


# ---------------------------------------------------------------------------------------------- the pipeline


def manual_sampling(pipe, masks, seeds, steps, guidance_scale):
    """The loop written out with the model's own calls: what the pipeline must equal."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    condition = mask_to_diffusion(masks, 2)
    latents = randn_tensor((len(seeds), 3, 16, 16), generator=generators(*seeds))
    for t in scheduler.timesteps:
        conditional = pipe.unet(latents, t, mask=condition).sample
        if guidance_scale == 1.0:
            prediction = conditional
        else:
            unconditional = pipe.unet(latents, t, mask=None).sample
            prediction = unconditional + guidance_scale * (conditional - unconditional)
        latents = scheduler.step(prediction, t, latents).prev_sample
    return (latents.clamp(-1, 1) + 1) / 2


@pytest.mark.parametrize("guidance_scale", [1.0, 0.0, 2.5])
def test_pipeline_equals_the_written_out_guided_loop(guidance_scale):
    pipe = tiny_pipe()
    masks = vessel_masks(2)
    calls = []
    hook = pipe.unet.register_forward_hook(lambda module, args, kwargs_output: calls.append(args[0].shape[0]))
    try:
        out = pipe(masks, num_inference_steps=2, guidance_scale=guidance_scale, generator=generators(1, 2),
                   output_type="pt")
    finally:
        hook.remove()
    # guidance 1 (and 0) costs one pass of the batch per step; other scales run conditional + null together
    assert calls == [2 if guidance_scale in (0.0, 1.0) else 4] * 2
    expected = manual_sampling(pipe, masks, (1, 2), 2, guidance_scale)
    torch.testing.assert_close(out.images, expected, rtol=0, atol=1e-5)
    assert torch.equal(out.masks, masks)


def test_guidance_changes_the_images():
    pipe = tiny_pipe()
    masks = vessel_masks(1)
    plain = pipe(masks, num_inference_steps=2, generator=generators(3), output_type="pt").images
    guided = pipe(masks, num_inference_steps=2, guidance_scale=3.0, generator=generators(3), output_type="pt").images
    assert not torch.allclose(plain, guided, atol=1e-4)


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler],
                         ids=lambda c: c.__name__)
def test_batched_equals_one_by_one_and_single_generator_is_split(scheduler_cls):
    pipe = tiny_pipe(scheduler_cls=scheduler_cls)
    masks = vessel_masks(2)
    kwargs = dict(num_inference_steps=2, num_images_per_mask=2, guidance_scale=1.5, output_type="pt")
    together = pipe(masks, generator=torch.Generator().manual_seed(0), **kwargs).images
    alone = pipe(masks, generator=torch.Generator().manual_seed(0), batch_size=1, **kwargs).images
    assert together.shape == (4, 3, 16, 16)
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    assert not torch.allclose(together[0], together[1], atol=1e-4)  # two images of one mask differ


def test_auto_batch_size_counts_guidance_twice(monkeypatch):
    from diffusers_retina.pipelines import sampling

    pipe = tiny_pipe()
    masks = vessel_masks(3)
    kwargs = dict(num_inference_steps=2, guidance_scale=1.5, output_type="pt")
    together = pipe(masks, generator=torch.Generator().manual_seed(0), **kwargs).images
    monkeypatch.setattr(sampling, "CPU_PIXELS_PER_FORWARD", 4 * 16 * 16)  # two guided images (x2 each) per call
    batch_sizes = []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: batch_sizes.append(args[0].shape[0]))
    try:
        auto = pipe(masks, generator=torch.Generator().manual_seed(0), batch_size="auto", **kwargs).images
    finally:
        hook.remove()
    assert batch_sizes == [4] * 2 + [2] * 2  # (cond + uncond) x 2 images, then x 1 image; 2 steps each
    torch.testing.assert_close(together, auto, rtol=0, atol=1e-5)


def test_any_size_and_tiles():
    pipe = tiny_pipe()
    masks = vessel_masks(1, size=(21, 37))
    out = pipe(masks, num_inference_steps=2, generator=generators(0), output_type="np")
    assert out.images.shape == (1, 21, 37, 3) and out.masks.shape == (1, 21, 37)
    tiled = pipe(masks, num_inference_steps=2, guidance_scale=2.0, generator=generators(0), tile_size=16,
                 output_type="np")
    assert tiled.images.shape == (1, 21, 37, 3) and np.isfinite(tiled.images).all()
    assert 0 <= tiled.images.min() and tiled.images.max() <= 1


def test_mask_inputs_pil_numpy_soft_and_output_types():
    pipe = tiny_pipe()
    masks = vessel_masks(1)
    pil = PIL.Image.fromarray((masks[0].numpy() * 255).astype(np.uint8))
    reference = pipe(masks, num_inference_steps=2, generator=generators(4), output_type="pt")
    from_pil = pipe(pil, num_inference_steps=2, generator=generators(4), output_type="np")
    torch.testing.assert_close(torch.from_numpy(from_pil.images).permute(0, 3, 1, 2), reference.images)
    as_pil = pipe(masks[0].numpy().astype(bool), num_inference_steps=2, generator=generators(4), output_type="pil")
    assert as_pil.images[0].mode == "RGB" and as_pil.images[0].size == (16, 16)
    assert np.array_equal(np.asarray(as_pil.masks[0]) > 0, masks[0].numpy() > 0)
    soft = pipe(np.full((16, 16), 0.3, np.float32), num_inference_steps=2, generator=generators(4), output_type="pt")
    assert soft.images.shape == (1, 3, 16, 16) and soft.masks.sum() == 0  # 0.3 < 0.5: background


@pytest.mark.parametrize(
    "mask, message",
    [
        (np.array([[0, 7], [255, 0]], np.uint8), "neither binary"),  # values outside a binary mask
        (np.full((16, 16), 1.5, np.float32), "must lie in"),  # probabilities outside [0, 1]
        (torch.full((1, 16, 16), float("nan")), "NaN"),
        (torch.zeros(1, 2, 16, 16), "2 channels"),  # a 2-class probability map for a binary model
        ([np.zeros((16, 16), np.uint8), np.zeros((8, 8), np.uint8)], "same size"),
    ],
)
def test_bad_masks_get_clear_errors(mask, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipe()(mask, num_inference_steps=1)


def test_wrong_number_of_classes_and_bad_arguments():
    three_class = tiny_pipe(mask_channels=3)
    with pytest.raises(ValueError, match="class indices < num_classes=3"):
        three_class(np.full((16, 16), 5, np.uint8), num_inference_steps=1)
    out = three_class(np.random.RandomState(0).randint(0, 3, (16, 16)).astype(np.uint8), num_inference_steps=1,
                      output_type="pt")
    assert set(out.masks.unique().tolist()) <= {0, 1, 2}
    pipe = tiny_pipe()
    with pytest.raises(ValueError, match="no `mask_unet`"):
        pipe(None)
    for name, value in (("guidance_scale", -1.0), ("num_images_per_mask", 0), ("output_type", "latents"),
                        ("tile_size", 7), ("batch_size", 0)):
        with pytest.raises(ValueError, match=name):
            pipe(vessel_masks(1), num_inference_steps=1, **{name: value})
    with pytest.raises(ValueError, match="together"):
        Mask2ImagePipeline(unet=tiny_conditional(), scheduler=DDIMScheduler(), mask_unet=tiny_mask_unet())


def test_two_stage_generation_samples_masks_then_images():
    pipe = tiny_pipe(with_mask_model=True)
    first = pipe(num_masks=2, num_images_per_mask=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="pt")
    again = pipe(num_masks=2, num_images_per_mask=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="pt")
    assert first.images.shape == (4, 3, 16, 16) and first.masks.shape == (4, 16, 16)
    assert set(first.masks.unique().tolist()) <= {0, 1}
    torch.testing.assert_close(first.images, again.images)
    assert torch.equal(first.masks[0], first.masks[1])  # two images per sampled mask
    # the images were painted from those masks: same as passing the masks in with the image generators
    seeds = [torch.Generator().manual_seed(s) for s in range(6)]
    listed = pipe(num_masks=2, num_images_per_mask=2, num_inference_steps=2, generator=seeds, output_type="pt")
    painted = pipe(listed.masks[::2], num_images_per_mask=2, num_inference_steps=2,
                   generator=[torch.Generator().manual_seed(s) for s in range(2, 6)], output_type="pt")
    torch.testing.assert_close(listed.images, painted.images, rtol=0, atol=1e-5)
    sized = pipe(num_masks=1, height=24, width=40, num_inference_steps=1, generator=torch.Generator().manual_seed(0),
                 output_type="np")
    assert sized.images.shape == (1, 24, 40, 3)


def test_callback_can_replace_latents():
    pipe = tiny_pipe()

    def callback(p, step, t, kwargs):
        return {"latents": torch.full_like(kwargs["latents"], 0.25)} if step == 1 else {}

    out = pipe(vessel_masks(1), num_inference_steps=2, generator=generators(0), callback_on_step_end=callback,
               output_type="pt")
    torch.testing.assert_close(out.images, torch.full_like(out.images, 0.625))


# ---------------------------------------------------------------------------------------------- loading


def test_save_and_load_through_every_entry_point(tmp_path):
    pipe = tiny_pipe(with_mask_model=True)

    def images(p):
        p.set_progress_bar_config(disable=True)
        return p(num_masks=1, num_inference_steps=2, guidance_scale=1.5, generator=torch.Generator().manual_seed(0),
                 output_type="pt").images

    reference = images(pipe)
    folder = tmp_path / "m2i"
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["conditional_unet", "ConditionalUNet2DModel"]
    assert index["mask_unet"] == ["diffusers", "UNet2DModel"]
    assert (folder / "unet" / "conditional_unet.py").is_file()
    assert not list(folder.rglob("*.bin"))

    loaded = [Mask2ImagePipeline.from_pretrained(folder),
              DiffusionPipeline.from_pretrained(folder, trust_remote_code=True),
              DiffusionPipeline.from_pretrained(folder, custom_pipeline=str(REPO / "pipelines" / "mask2image"),
                                                trust_remote_code=True)]
    for other in loaded:
        assert type(other).__name__ == "Mask2ImagePipeline" and type(other.unet) is ConditionalUNet2DModel
        torch.testing.assert_close(images(other), reference, rtol=0, atol=1e-6)

    # without the optional mask model
    image_only = tiny_pipe()
    image_only.save_pretrained(tmp_path / "image_only")
    again = Mask2ImagePipeline.from_pretrained(tmp_path / "image_only", dtype=torch.float16)
    assert again.mask_unet is None and again.unet.dtype == torch.float16
    out = again(vessel_masks(1), num_inference_steps=1, generator=generators(0), output_type="pt")
    assert torch.isfinite(out.images).all()


def test_call_docstring_has_a_valid_example():
    check_call_example(Mask2ImagePipeline)
