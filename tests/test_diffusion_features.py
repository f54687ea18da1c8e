"""DiffusionFeaturePipeline (hooks, batched timesteps, early exit, input policies, feature cache) and the
PixelMLPEnsemble head (bilinear pixel reads, prediction, save/load). Tiny UNets only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DiffusionPipeline

from diffusers_retina import DiffusionFeaturePipeline
from diffusers_retina.feature_cache import cached_extract
from diffusers_retina.models import FreqAggHead, PixelMLPEnsemble, frequency_bands, read_pixels

from testing_utils import unit_range
from testing_utils import FEATURE_UNET_CONFIGS as CONFIGS
from testing_utils import check_call_example, decisive_head
from testing_utils import feature_images as images
from testing_utils import tiny_diffusion_features as tiny_pipe


# ---------------------------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_hooks_return_the_documented_shapes(config):
    pipe = tiny_pipe(config)
    unet_config = pipe.unet.config
    description = {d["name"]: d for d in pipe.describe()}
    levels = len(unet_config.block_out_channels)
    reversed_channels = list(reversed(unet_config.block_out_channels))
    for i in range(levels):
        assert description[f"down.{i}"]["channels"] == unet_config.block_out_channels[i]
        assert description[f"down.{i}"]["stride"] == 2 ** min(i + 1, levels - 1)
        assert description[f"up.{i}"]["channels"] == reversed_channels[i]
        assert description[f"up.{i}"]["stride"] == 2 ** max(levels - 2 - i, 0)
        for j in range(unet_config.layers_per_block + 1):  # the finer units of up block i
            assert description[f"up.{i}.{j}"]["stride"] == 2 ** (levels - 1 - i)
    assert description["mid"]["stride"] == 2 ** (levels - 1)

    x = images(height=32, width=48)
    features = pipe(unit_range(x), blocks=list(description), timesteps=[3, 40],
                    generator=torch.Generator().manual_seed(0)).features
    for name, info in description.items():
        assert features[name].shape == (2, 2, info["channels"], 32 // info["stride"], 48 // info["stride"]), name
        assert features[name].dtype == torch.float16


def test_unknown_blocks_and_bad_arguments():
    pipe = tiny_pipe()
    with pytest.raises(ValueError, match="Unknown blocks"):
        pipe(unit_range(images()), blocks=["up.7"], timesteps=[10])
    for kwargs, message in ((dict(timesteps=[100]), "outside"), (dict(policy="inversion"), "policy"),
                            (dict(output="logits"), "output"), (dict(output="segmentation"), "needs a head"),
                            (dict(num_noise_draws=0), "num_noise_draws"), (dict(feature_dtype=torch.int8), "dtype")):
        with pytest.raises(ValueError, match=message):
            pipe(unit_range(images()), **{"timesteps": [10], **kwargs})


# ---------------------------------------------------------------------------------------------- one pass


def test_one_batched_pass_equals_per_timestep_passes():
    pipe = tiny_pipe("attention")
    x = images()
    seed = 7
    together = pipe(unit_range(x), blocks=["mid", "up.1"], timesteps=[5, 50, 95], seed=seed,
                    feature_dtype=torch.float32).features
    for k, t in enumerate((5, 50, 95)):
        alone = pipe(unit_range(x), blocks=["mid", "up.1"], timesteps=[t], seed=seed,
                     feature_dtype=torch.float32).features
        for name in ("mid", "up.1"):
            torch.testing.assert_close(together[name][:, k], alone[name][:, 0], rtol=1e-4, atol=1e-5)
    # one UNet call for all timesteps and images
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        pipe(unit_range(x), blocks=["up.1"], timesteps=[5, 50, 95], seed=seed)
    finally:
        hook.remove()
    assert calls == [6]


def test_early_exit_gives_the_same_features_and_skips_the_rest():
    pipe = tiny_pipe("attention")
    x = images()
    ran = []
    hooks = [pipe.unet.conv_out.register_forward_hook(lambda *a: ran.append("conv_out")),
             pipe.unet.up_blocks[2].register_forward_hook(lambda *a: ran.append("up.2"))]
    try:
        early = pipe(unit_range(x), blocks=["up.0"], timesteps=[10], seed=1,
                     feature_dtype=torch.float32).features["up.0"]
        assert ran == []  # the forward stopped after up.0
        full = pipe(unit_range(x), blocks=["up.0", "up.2"], timesteps=[10], seed=1,
                    feature_dtype=torch.float32).features["up.0"]
        assert "up.2" in ran and "conv_out" not in ran
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(early, full)
    # and the same as reading the activation off a normal, complete forward
    store = {}
    handle = pipe.unet.up_blocks[0].register_forward_hook(lambda m, a, o: store.setdefault("up.0", o))
    try:
        noisy = pipe.scheduler.add_noise(x, pipe._noise(x.shape, [torch.Generator().manual_seed(
            pipe._noise_seed(1, x[i], 0, False)) for i in range(2)], False, x.device, x.dtype), torch.tensor([10, 10]))
        pipe.unet(noisy, torch.tensor([10, 10]))
    finally:
        handle.remove()
    torch.testing.assert_close(early[:, 0], store["up.0"], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- policies


def test_anchor_policy_feeds_the_clean_image_and_the_timestep():
    pipe = tiny_pipe()
    x = images()
    inputs = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: inputs.append((args[0].clone(), args[1].clone())))
    try:
        pipe(unit_range(x), blocks=["up.0"], timesteps=[20, 80], policy="anchor")
    finally:
        hook.remove()
    sample, steps = inputs[0]
    torch.testing.assert_close(sample, x.repeat_interleave(2, dim=0))
    assert steps.tolist() == [20, 80, 20, 80]
    a = pipe(unit_range(x), blocks=["up.0"], timesteps=[20], policy="anchor").features["up.0"]
    b = pipe(unit_range(x), blocks=["up.0"], timesteps=[80], policy="anchor").features["up.0"]
    assert not torch.equal(a, b)  # the timestep reaches the features through the embedding


def test_noise_policy_generators_shared_noise_and_averaged_draws():
    pipe = tiny_pipe()
    x = images()
    kwargs = dict(blocks=["up.1"], timesteps=[60], feature_dtype=torch.float32)
    one = pipe(unit_range(x), generator=torch.Generator().manual_seed(0), **kwargs).features["up.1"]
    same = pipe(unit_range(x), generator=torch.Generator().manual_seed(0), **kwargs).features["up.1"]
    other = pipe(unit_range(x), generator=torch.Generator().manual_seed(1), **kwargs).features["up.1"]
    torch.testing.assert_close(one, same)
    assert not torch.allclose(one, other)

    # shared noise: both images see the same noise tensor
    inputs = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()))
    try:
        pipe(unit_range(x), shared_noise=True, generator=torch.Generator().manual_seed(3), **kwargs)
    finally:
        hook.remove()
    alpha = pipe.scheduler.alphas_cumprod[60]
    noise = (inputs[0] - alpha.sqrt() * x) / (1 - alpha).sqrt()
    torch.testing.assert_close(noise[0], noise[1], rtol=1e-4, atol=1e-4)

    # averaged draws equal the mean of the single draws made with the same generators
    generators = [torch.Generator().manual_seed(s) for s in range(4)]  # image-major: (image 0: draws 0, 1), ...
    averaged = pipe(unit_range(x), num_noise_draws=2, generator=generators, **kwargs).features["up.1"]
    draws = [pipe(unit_range(x), generator=[torch.Generator().manual_seed(s) for s in (d, 2 + d)],
                  **kwargs).features["up.1"] for d in range(2)]
    torch.testing.assert_close(averaged, (draws[0] + draws[1]) / 2, rtol=1e-4, atol=1e-5)


def test_ddim_inversion_trajectory():
    pipe = tiny_pipe()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    x = images(count=1)
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[1].tolist()))
    try:
        out = pipe(unit_range(x), blocks=["up.0"], timesteps=[60, 10], policy="ddim_inversion",
                   feature_dtype=torch.float32)
    finally:
        hook.remove()
    # the trajectory climbs: a step from 0 to 10 (at t = 0), features at 10, a step from 10 to 60, features at 60
    assert calls == [[0], [10], [10], [60]]
    assert out.features["up.0"].shape[:2] == (1, 2)
    deterministic = pipe(unit_range(x), blocks=["up.0"], timesteps=[60, 10], policy="ddim_inversion",
                         feature_dtype=torch.float32).features["up.0"]
    torch.testing.assert_close(out.features["up.0"], deterministic)
    # returned in the requested order: index 1 holds t = 10, the same as asking for t = 10 alone
    alone = pipe(unit_range(x), blocks=["up.0"], timesteps=[10], policy="ddim_inversion", feature_dtype=torch.float32)
    torch.testing.assert_close(out.features["up.0"][:, 1], alone.features["up.0"][:, 0])


# ---------------------------------------------------------------------------------------------- cache


def test_cache_hits_only_on_an_identical_key(tmp_path):
    """The training-side cache (``cached_extract`` around ``extract``): one file per image, hits skip the UNet, any
    change of image, weights or settings misses."""
    pipe = tiny_pipe()
    x = images()
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    base = dict(blocks=["up.0"], timesteps=[10, 30], seed=0)

    def extract(pipeline, batch, **settings):
        return cached_extract(pipeline, batch, settings.pop("cache_dir", tmp_path), **{**base, **settings})["up.0"]

    try:
        first = extract(pipe, x)
        assert calls and len(list(tmp_path.glob("*.safetensors"))) == 2  # one file per image
        torch.testing.assert_close(first, pipe.extract(x, **base)["up.0"])  # the same features as without a cache
        calls.clear()
        again = extract(pipe, x)
        assert calls == []  # both images from the cache
        torch.testing.assert_close(first, again)
        # the same image in another batch position: still a hit (the noise follows the image, not its position)
        swapped = extract(pipe, x.flip(0))
        assert calls == []
        torch.testing.assert_close(swapped, first.flip(0))
        for change in (dict(timesteps=[10, 31]), dict(blocks=["up.1"]), dict(seed=1), dict(policy="anchor"),
                       dict(feature_dtype=torch.bfloat16), dict(num_noise_draws=2)):
            calls.clear()
            cached_extract(pipe, x, tmp_path, **{**base, **change})
            assert calls, f"{change} reused a stale cache entry"
        calls.clear()
        changed_image = x.clone()
        changed_image[0, 0, 0, 0] += 0.5
        extract(pipe, changed_image)
        assert calls == [2]  # only the changed image (2 timesteps) went through the UNet
        calls.clear()
        with torch.no_grad():
            pipe.unet.conv_in.bias.add_(0.1)  # weights changed in place
        extract(pipe, x)
        assert calls, "changed weights reused a stale cache entry"
    finally:
        hook.remove()
    assert not list(tmp_path.glob(".*.tmp"))
    # the same weights saved and loaded from two folders (two heads on one DDPM): their features are shared
    shared = tmp_path / "shared"
    for name in ("first", "second"):
        tiny_pipe().save_pretrained(tmp_path / name)
    first_pipe, second_pipe = (DiffusionFeaturePipeline.from_pretrained(tmp_path / name) for name in ("first", "second"))
    assert first_pipe.unet.config._name_or_path != second_pipe.unet.config._name_or_path
    extract(first_pipe, x, cache_dir=shared)
    calls.clear()
    hook = second_pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        extract(second_pipe, x, cache_dir=shared)
    finally:
        hook.remove()
    assert calls == [], "the same weights from another folder missed the cache"
    with pytest.raises(ValueError, match="needs `seed`"):
        cached_extract(pipe, x, tmp_path, blocks=["up.0"], timesteps=[10])


def test_the_pipelines_cache_dir_is_deprecated_but_still_honoured(tmp_path):
    pipe = tiny_pipe()
    x = images()
    with pytest.warns(FutureWarning, match="cached_extract"):
        out = pipe(unit_range(x), blocks=["up.0"], timesteps=[10], seed=0, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    torch.testing.assert_close(out.features["up.0"],
                               pipe(unit_range(x), blocks=["up.0"], timesteps=[10], seed=0).features["up.0"])


# ---------------------------------------------------------------------------------------------- head


def test_bilinear_pixel_read_equals_upsample_then_index():
    features = {"a": torch.randn(2, 3, 4, 5, 7), "b": torch.randn(2, 3, 2, 10, 14).half()}
    size = (20, 28)
    coords = torch.stack([torch.randint(0, 20, (2, 50)), torch.randint(0, 28, (2, 50))], dim=-1)
    coords[:, 0] = torch.tensor([0, 0])
    coords[:, 1] = torch.tensor([19, 27])  # corners: the border behaviour matches too
    read = read_pixels(features, ["a", "b"], coords, size)
    expected = []
    for name in ("a", "b"):
        maps = features[name].reshape(2, -1, *features[name].shape[-2:]).float()
        up = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        expected.append(torch.stack([up[n][:, coords[n, :, 0], coords[n, :, 1]].T for n in range(2)]))
    torch.testing.assert_close(read, torch.cat(expected, dim=-1), rtol=1e-4, atol=1e-4)
    # pixels of arbitrary images (training reads random pixels of random crops): the same vectors
    image_index = torch.tensor([1, 0, 1, 1])
    picked = coords[image_index, torch.tensor([3, 7, 0, 1])]
    mixed = read_pixels(features, ["a", "b"], picked, size, image_index=image_index)
    torch.testing.assert_close(mixed, read[image_index, torch.tensor([3, 7, 0, 1])])


def test_pixel_mlp_ensemble_defaults_prediction_and_save_load(tmp_path):
    head = PixelMLPEnsemble(blocks=["up.0", "up.1"], timesteps=[10, 30], block_channels=[16, 8], ensemble_size=3)
    assert len(head.members) == 3 and head.in_features == (16 + 8) * 2
    weights = torch.cat([m.weight.flatten() for m in head.modules() if isinstance(m, torch.nn.Linear)])
    assert abs(weights.std().item() - 0.02) < 0.005  # N(0, 0.02) init
    pipe = tiny_pipe(head=head)
    x = images(count=1, height=16, width=20)
    out = pipe(unit_range(x), output="segmentation", seed=0)
    assert out.masks.shape == (1, 16, 20) and out.probabilities.shape == (1, 2, 16, 20)
    assert torch.allclose(out.probabilities.sum(1), torch.ones(1, 16, 20), atol=1e-5)
    assert (out.uncertainty >= 0).all()

    folder = tmp_path / "features"
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["head"] == ["pixel_mlp_ensemble", "PixelMLPEnsemble"]
    community = Path(__file__).resolve().parents[1] / "pipelines" / "diffusion_features"
    for loaded in (DiffusionFeaturePipeline.from_pretrained(folder),
                   DiffusionPipeline.from_pretrained(folder, trust_remote_code=True),
                   DiffusionPipeline.from_pretrained(folder, custom_pipeline=str(community), trust_remote_code=True)):
        assert type(loaded).__name__ == "DiffusionFeaturePipeline"
        assert type(loaded.head) is PixelMLPEnsemble and loaded.head.config.blocks == ["up.0", "up.1"]
        again = loaded(unit_range(x), output="segmentation", seed=0)
        torch.testing.assert_close(again.probabilities, out.probabilities, rtol=1e-4, atol=1e-5)


def test_call_docstring_has_a_valid_example():
    check_call_example(DiffusionFeaturePipeline)


def test_frequency_bands_split_and_sum_back():
    maps = torch.randn(2, 3, 20, 28)
    low, high = frequency_bands(maps, cutoff=0.1)
    torch.testing.assert_close(low + high, maps, rtol=1e-5, atol=1e-5)
    constant = torch.ones(1, 1, 16, 16)
    low, high = frequency_bands(constant, cutoff=0.1)
    torch.testing.assert_close(low, constant, rtol=1e-5, atol=1e-5)  # DC is all low band
    checkerboard = (torch.arange(16)[:, None] + torch.arange(16)[None]).remainder(2).float()[None, None] * 2 - 1
    low, high = frequency_bands(checkerboard, cutoff=0.1)
    assert low.abs().max() < 1e-5  # the Nyquist pattern is all high band


def test_freq_agg_head_shapes_gradients_half_precision_and_save_load(tmp_path):
    pipe = tiny_pipe("attention")
    description = {d["name"]: d for d in pipe.describe()}
    blocks = ["mid", "up.1", "up.2"]
    head = FreqAggHead(blocks=blocks, timesteps=[10, 60], policy="anchor",
                       block_channels=[description[b]["channels"] for b in blocks], embed_dim=8)
    x = images(count=2, height=16, width=24)
    features = pipe(unit_range(x), blocks=blocks, timesteps=[10, 60], policy="anchor").features  # float16, native sizes
    logits = head(features, size=(16, 24)).logits
    assert logits.shape == (2, 2, 16, 24) and torch.isfinite(logits).all()
    logits.square().mean().backward()
    for name, parameter in head.named_parameters():
        assert parameter.grad is not None, name
    assert head.band_logits.grad.abs().sum() > 0 and head.gate.weight.grad.abs().sum() > 0
    # the timestep reaches the normalisation: zero-initialised modulation moves once trained
    with torch.no_grad():
        head.time_modulation[-1].bias.normal_()
    assert not torch.allclose(head(features, size=(16, 24)).logits, logits.detach(), atol=1e-4)

    pipe.set_head(head)
    out = pipe(unit_range(x), output="segmentation")  # blocks, timesteps and policy come from the head's config
    assert out.masks.shape == (2, 16, 24) and out.uncertainty.shape == (2, 16, 24)
    folder = tmp_path / "freq"
    pipe.save_pretrained(folder)
    loaded = DiffusionFeaturePipeline.from_pretrained(folder)
    assert type(loaded.head) is FreqAggHead and loaded.head.config.policy == "anchor"
    torch.testing.assert_close(loaded(unit_range(x), output="segmentation").probabilities, out.probabilities)


def test_tiled_segmentation_of_a_large_non_square_image():
    pipe = tiny_pipe()
    head = PixelMLPEnsemble(blocks=["up.0", "up.1"], timesteps=[10], block_channels=[16, 8], ensemble_size=2)
    pipe.set_head(head)
    x = images(count=1, height=40, width=58)
    whole = pipe(unit_range(x), output="segmentation", seed=0)
    tiled = pipe(unit_range(x), output="segmentation", seed=0, tile_size=16, tile_overlap=0.5)
    assert tiled.masks.shape == whole.masks.shape == (1, 40, 58)
    assert torch.allclose(tiled.probabilities.sum(1), torch.ones(1, 40, 58), atol=1e-4)
    assert (tiled.masks == whole.masks).float().mean() > 0.5  # same head, different context per window
    with pytest.raises(ValueError, match="tile_size"):
        pipe(unit_range(x), timesteps=[10], tile_size=16)  # features of a tiled image are not one map
    with pytest.raises(ValueError, match="multiple"):
        pipe(unit_range(x), output="segmentation", tile_size=15)


def test_field_of_view_restricts_the_segmentation_to_the_retina():
    """``field_of_view="auto"`` (the default) finds the aperture of a photograph with a black surround and predicts
    background outside it; a given mask is used as is; ``False`` leaves the head's prediction untouched."""
    pipe = tiny_pipe()
    pipe.set_head(decisive_head())
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(40), indexing="ij")
    disc = (yy - 16) ** 2 + (xx - 20) ** 2 < 13 ** 2
    photo = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(1)) * 0.6 + 0.3
    photo = photo * disc  # a bright disc on black, like a fundus photograph
    plain = pipe(photo, output="segmentation", seed=0, field_of_view=False)
    auto = pipe(photo, output="segmentation", seed=0)
    assert plain.field_of_view is None and auto.field_of_view.shape == (1, 32, 40)
    fov = auto.field_of_view[0]
    assert not fov[0, 0] and fov[16, 20] and (fov & ~disc).sum() == 0 and fov.sum() > 0.6 * disc.sum()  # eroded by the rim
    assert (auto.probabilities[0, 0][~fov] == 1).all() and (auto.masks[0][~fov] == 0).all()
    assert (auto.uncertainty[0][~fov] == 0).all()
    from diffusers_retina.data.modality import fill_outside_field_of_view

    filled = (fill_outside_field_of_view(photo * 2 - 1, fov[None]) + 1) / 2  # what the UNet saw
    exact = dict(output="segmentation", seed=0, feature_dtype=torch.float32)
    inside = pipe(filled, field_of_view=False, **exact).probabilities[0][:, fov]
    # inside: the head's own prediction on the filled photograph
    assert torch.allclose(pipe(photo, **exact).probabilities[0][:, fov], inside, atol=1e-4)
    assert plain.probabilities[0, 0][~fov].min() < 1  # so the restriction above did something
    given = torch.zeros(32, 40, dtype=torch.bool)
    given[:, :20] = True
    half = pipe(photo, output="segmentation", seed=0, field_of_view=given)
    assert torch.equal(half.field_of_view[0], given) and (half.probabilities[0, 0][:, 20:] == 1).all()
    with pytest.raises(ValueError, match="field_of_view"):
        pipe(photo, output="segmentation", field_of_view=given[:10])
    with pytest.raises(ValueError, match="field_of_view"):
        pipe(photo, output="segmentation", field_of_view="yes")
    with pytest.raises(ValueError, match="field_of_view"):
        pipe(photo, output="segmentation", field_of_view=given.float())


def test_the_surround_is_filled_before_the_unet_sees_it():
    """With a field of view, the UNet sees the photograph with its surround filled by the field of view's mean colour,
    so what lies outside (black, or anything else) cannot change the features inside through group normalisation."""
    pipe = tiny_pipe()
    pipe.set_head(decisive_head())
    fov = torch.zeros(24, 32, dtype=torch.bool)
    fov[4:20, 6:26] = True
    photo = torch.rand(1, 3, 24, 32, generator=torch.Generator().manual_seed(2)) * 0.5 + 0.4
    other = photo.clone()
    other[:, :, ~fov] = torch.rand(3, int((~fov).sum()), generator=torch.Generator().manual_seed(3))
    first = pipe(photo, output="segmentation", seed=0, field_of_view=fov)
    second = pipe(other, output="segmentation", seed=0, field_of_view=fov)
    assert torch.allclose(first.probabilities, second.probabilities, atol=1e-5)
    unfilled = [pipe(x, output="segmentation", seed=0, field_of_view=False).probabilities[0][:, fov] for x in
                (photo, other)]
    assert not torch.allclose(*unfilled, atol=1e-3)  # without the fill, the outside changes the inside


def test_fill_outside_field_of_view():
    from diffusers_retina.data.modality import fill_outside_field_of_view

    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    fov = torch.zeros(2, 4, 4, dtype=torch.bool)
    fov[0, 1:3, 1:3] = True  # the second image has no field of view: unchanged
    filled = fill_outside_field_of_view(images, fov)
    assert torch.equal(filled[0][:, fov[0]], images[0][:, fov[0]]) and torch.equal(filled[1], images[1])
    expected = images[0][:, fov[0]].mean(dim=1)
    assert torch.allclose(filled[0, :, 0, 0], expected)
    with pytest.raises(ValueError, match="fov"):
        fill_outside_field_of_view(images, fov[0])
