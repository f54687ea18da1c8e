"""What the pipelines' Python API takes (issue 15), in the spirit of diffusers' ``PipelineTesterMixin``: the pixel cap
checked before decoding, 16-bit and float PIL images read like the loaders read files, image tensors in ``[0, 1]``
(diffusers' convention, ``[-1, 1]`` with a warning), ``generator=g`` equal to ``generator=[g]`` for one sample while a
single generator for several samples stays batch-size independent, the segmentation pipeline's step and NaN checks,
``safe_serialization=False`` refused, and model CPU offloading (hooks on CPU; the accelerator run where there is one).
Tiny random models only."""

from __future__ import annotations

import math
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from diffusers_retina import SegmentationEnsemblePipeline
from diffusers_retina.data import DataError, read_image, read_mask
from diffusers_retina.data.reading import image_array_from_pil
from diffusers_retina.image_processing import (
    DEFAULT_MAX_PIXELS,
    MAX_PIXELS_ENV,
    ImageTooLargeError,
    max_pixels,
    prepare_images,
    prepare_masks,
)
from diffusers_retina.pipelines.checks import NonFiniteOutputError

from testing_utils import tiny_diffusion_features, tiny_mask2image, tiny_pipeline, tiny_unet, vessel_masks


def seeded(*seeds):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def segment(pipe, image, **kwargs):
    options = dict(num_inference_steps=2, ensemble_size=2, generator=seeded(0, 1), output_type="pt")
    options.update(kwargs)
    return pipe(image, **options)


def uint8_images(count=2, size=16, seed=0):
    rng = np.random.RandomState(seed)
    return rng.randint(0, 256, (count, size, size, 3)).astype(np.uint8)


@pytest.fixture
def seg():
    return tiny_pipeline()


@pytest.fixture
def no_decoding(monkeypatch):
    """Make any pixel decoding (PIL ``load``, ``np.load``) fail: the cap must refuse the file before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("pixels were decoded before the pixel cap was checked")

    monkeypatch.setattr(PIL.Image.Image, "load", refuse)
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(np, "load", refuse)


# ---------------------------------------------------------------------------------------------- 1. the pixel cap


@pytest.fixture(scope="module")
def bomb_png(tmp_path_factory):
    """A valid PNG of 9000 x 9000 pixels (81 megapixels, over the 64-megapixel default) that is small on disk."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    PIL.Image.new("1", (9000, 9000)).save(path)  # 1 bit per pixel while writing, a few KB on disk
    return path


def test_default_cap_and_its_settings(monkeypatch):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    assert max_pixels() == DEFAULT_MAX_PIXELS == 64_000_000
    monkeypatch.setenv(MAX_PIXELS_ENV, "1000")
    assert max_pixels() == 1000 and max_pixels(5000) == 5000  # the argument wins over the environment
    for bad in ("lots", "0", "-5"):
        monkeypatch.setenv(MAX_PIXELS_ENV, bad)
        with pytest.raises(ValueError, match=MAX_PIXELS_ENV):
            max_pixels()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_pixels"):
            max_pixels(bad)


def test_a_small_png_of_81_megapixels_is_refused_before_decoding(bomb_png, monkeypatch, no_decoding):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    assert bomb_png.stat().st_size < 200_000
    with pytest.raises(DataError, match=r"bomb\.png.*9000x9000.*cap of 64\.0 megapixels.*DIFFUSERS_RETINA_MAX_PIXELS"):
        read_image(bomb_png, 3)
    with pytest.raises(DataError, match=r"Mask file .*bomb\.png"):
        read_mask(bomb_png, 2)
    lazy = PIL.Image.open(bomb_png)  # the Python API: a lazily opened PIL image is refused before its pixels load
    with pytest.raises(ImageTooLargeError, match=r"`image` \(file '.*bomb\.png'\)"):
        prepare_images(lazy, 3)
    with pytest.raises(ImageTooLargeError, match=r"`mask` \(file '.*bomb\.png'\)"):
        prepare_masks(lazy, 2)


def test_cap_from_the_environment_and_the_argument(tmp_path, monkeypatch):
    path = tmp_path / "image.png"
    PIL.Image.fromarray(uint8_images(1, 40)[0]).save(path)  # 1600 pixels
    monkeypatch.setenv(MAX_PIXELS_ENV, "1000")
    with pytest.raises(DataError, match="image.png.*40x40"):
        read_image(path, 3)
    assert read_image(path, 3, max_pixels=1600).shape == (40, 40, 3)  # the argument raises the cap
    with pytest.raises(DataError, match="image.png"):
        read_image(path, 3, max_pixels=1599)
    npy = tmp_path / "mask.npy"
    np.save(npy, np.zeros((40, 40), np.uint8))
    with pytest.raises(DataError, match="mask.npy.*40x40"):
        read_mask(npy, 2)
    assert read_mask(npy, 2, max_pixels=1600).shape == (40, 40)


def test_npy_files_are_checked_from_their_header(tmp_path, monkeypatch, no_decoding):
    monkeypatch.setenv(MAX_PIXELS_ENV, "100")
    path = tmp_path / "image.npy"
    with open(path, "wb") as handle:  # written without np.save's load path; only the header is read
        np.lib.format.write_array(handle, np.zeros((20, 20, 3), np.uint8))
    with pytest.raises(DataError, match="image.npy.*20x20"):
        read_image(path, 3)


@pytest.mark.parametrize("form", ["numpy", "tensor", "tensor_list", "pil"])
def test_the_pipelines_refuse_images_over_the_cap_naming_the_argument(seg, monkeypatch, form):
    monkeypatch.setenv(MAX_PIXELS_ENV, str(16 * 16 - 1))
    array = uint8_images(1)[0]
    image = {"numpy": array, "pil": PIL.Image.fromarray(array),
             "tensor": torch.from_numpy(array).permute(2, 0, 1) / 255.0,
             "tensor_list": [torch.from_numpy(array).permute(2, 0, 1) / 255.0]}[form]
    with pytest.raises(ImageTooLargeError, match="`image` .*16x16"):
        segment(seg, image)
    with pytest.raises(ImageTooLargeError, match="`image` .*16x16"):
        tiny_diffusion_features("plain")(image, timesteps=[10], generator=seeded(0))
    monkeypatch.setenv(MAX_PIXELS_ENV, str(16 * 16))
    assert segment(seg, image).masks.shape == (1, 16, 16)  # at the cap is fine


@pytest.mark.parametrize("form", ["numpy", "numpy_hwc", "tensor", "tensor_list", "pil"])
def test_mask2image_refuses_masks_over_the_cap(monkeypatch, form):
    monkeypatch.setenv(MAX_PIXELS_ENV, str(16 * 16 - 1))
    mask = vessel_masks(1)[0]
    array = mask.numpy().astype(np.uint8) * 255
    given = {"numpy": array, "numpy_hwc": np.stack([array] * 3, -1), "tensor": mask, "tensor_list": [mask],
             "pil": PIL.Image.fromarray(array)}[form]
    with pytest.raises(ImageTooLargeError, match="`mask.*16x16"):
        tiny_mask2image()(given, num_inference_steps=1, output_type="pt")


# ---------------------------------------------------------------------------------------------- 2. 16-bit / float PIL


def sixteen_bit():
    return (np.arange(256, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0 .. 65535, all levels


def test_sixteen_bit_and_float_pil_images_are_read_like_files(tmp_path):
    values = sixteen_bit()
    path = tmp_path / "grey16.png"
    PIL.Image.fromarray(values).save(path)
    pil = PIL.Image.open(path)
    assert pil.mode == "I;16"
    expected = torch.from_numpy(values.astype(np.float32) / 65535.0).expand(1, 3, 16, 16) * 2 - 1
    from_pil = prepare_images(pil, 3)
    torch.testing.assert_close(from_pil, expected, rtol=0, atol=0)
    assert len(torch.unique(from_pil)) == 256  # not saturated: convert("RGB") would clip all but 1 level to white
    # the loaders read the same file to the same values, and the Python API uses their conversion
    file_array = read_image(path, 3)
    torch.testing.assert_close(prepare_images(file_array, 3), from_pil, rtol=0, atol=0)
    torch.testing.assert_close(prepare_images(image_array_from_pil(pil, 3, "x"), 3), from_pil, rtol=0, atol=0)
    # float ("F") images in [0, 1]
    unit = values.astype(np.float32) / 65535.0
    torch.testing.assert_close(prepare_images(PIL.Image.fromarray(unit, mode="F"), 3), expected, rtol=0, atol=0)
    # one channel
    torch.testing.assert_close(prepare_images(pil, 1), expected[:, :1], rtol=0, atol=0)


def test_ambiguous_pil_images_are_errors_naming_the_argument():
    with pytest.raises(ValueError, match="`image`|'image'"):
        prepare_images(PIL.Image.fromarray(np.full((16, 16), 2.0, np.float32), mode="F"), 3)  # float above 1
    with pytest.raises(ValueError, match="mode I"):
        prepare_images(PIL.Image.fromarray(sixteen_bit().astype(np.int32)), 3)  # 32-bit integers above 255
    eight_bit = np.arange(256, dtype=np.int32).reshape(16, 16)
    torch.testing.assert_close(prepare_images(PIL.Image.fromarray(eight_bit), 3),
                               prepare_images(PIL.Image.fromarray(eight_bit.astype(np.uint8)), 3), rtol=0, atol=0)


def test_a_sixteen_bit_pil_image_segments_like_its_file(seg, tmp_path):
    path = tmp_path / "grey16.png"
    PIL.Image.fromarray(sixteen_bit()).save(path)
    from_pil = segment(seg, PIL.Image.open(path))
    from_file = segment(seg, read_image(path, 3))  # what the CLI and the data loaders give the pipeline
    saturated = segment(seg, PIL.Image.open(path).convert("RGB"))
    torch.testing.assert_close(from_pil.probabilities, from_file.probabilities, rtol=0, atol=0)
    assert not torch.allclose(from_pil.probabilities, saturated.probabilities)


# ---------------------------------------------------------------------------------------------- 3. tensors in [0, 1]


def test_prepare_images_reads_tensors_in_zero_one():
    unit = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a [0, 1] tensor is the convention: no warning
        torch.testing.assert_close(prepare_images(unit, 3), unit * 2 - 1, rtol=0, atol=0)
        torch.testing.assert_close(prepare_images(list(unit), 3), unit * 2 - 1, rtol=0, atol=0)
        assert prepare_images(torch.zeros(1, 3, 4, 4), 3).eq(-1).all()  # 0 is black
    with pytest.warns(FutureWarning, match=r"`image` is a tensor with values in \[-0\.9.*read as \[-1, 1\]"):
        torch.testing.assert_close(prepare_images(unit * 2 - 1, 3), unit * 2 - 1, rtol=0, atol=0)
    for bad in (unit + 0.5, unit * 2 - 1.5):
        with pytest.raises(ValueError, match=r"`image` tensor has values .*\[0, 1\]"):
            prepare_images(bad, 3)
    with pytest.raises(ValueError, match="`image` is a torch.uint8 tensor"):
        prepare_images((unit * 255).to(torch.uint8), 3)


def test_segmentation_takes_tensors_like_diffusers(seg):
    arrays = uint8_images()
    tensor = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255.0  # [0, 1]
    reference = segment(seg, arrays, generator=seeded(0, 1, 2, 3))
    for given in (tensor, list(tensor), [PIL.Image.fromarray(a) for a in arrays]):
        out = segment(seg, given, generator=seeded(0, 1, 2, 3))
        torch.testing.assert_close(out.probabilities, reference.probabilities, rtol=0, atol=0)
    with pytest.warns(FutureWarning, match="read as \\[-1, 1\\]"):
        legacy = segment(seg, tensor * 2 - 1, generator=seeded(0, 1, 2, 3))
    torch.testing.assert_close(legacy.probabilities, reference.probabilities, rtol=0, atol=1e-6)


def test_features_pipeline_takes_tensors_like_diffusers():
    pipe = tiny_diffusion_features("plain")
    arrays = uint8_images(1)
    tensor = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255.0
    kwargs = dict(blocks=["up.1"], timesteps=[10], seed=0, feature_dtype=torch.float32)
    reference = pipe(arrays, **kwargs).features["up.1"]
    torch.testing.assert_close(pipe(tensor, **kwargs).features["up.1"], reference, rtol=0, atol=0)
    prepared = tensor * 2 - 1  # extract() takes the prepared [-1, 1] batch
    torch.testing.assert_close(pipe.extract(prepared, **kwargs)["up.1"], reference, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- 4. generators


def test_segmentation_one_sample_generator_equals_a_list_of_it(seg, image):
    unit = (image + 1) / 2
    plain = segment(seg, unit, ensemble_size=1, generator=torch.Generator().manual_seed(5))
    listed = segment(seg, unit, ensemble_size=1, generator=[torch.Generator().manual_seed(5)])
    torch.testing.assert_close(plain.probabilities, listed.probabilities, rtol=0, atol=0)
    other = segment(seg, unit, ensemble_size=1, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(plain.probabilities, other.probabilities)


def test_one_image_of_a_batch_is_reproduced_the_diffusers_way(seg):
    arrays = uint8_images()
    batch = segment(seg, arrays, ensemble_size=1, generator=seeded(7, 8))
    for index, seed in enumerate((7, 8)):
        alone = segment(seg, arrays[index], ensemble_size=1, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(alone.probabilities[0], batch.probabilities[index], rtol=0, atol=1e-6)


def test_a_single_generator_for_several_samples_is_batch_size_independent(seg, image):
    unit = (image + 1) / 2
    together = segment(seg, unit, ensemble_size=3, generator=torch.Generator().manual_seed(3), return_members=True)
    chunked = segment(seg, unit, ensemble_size=3, generator=torch.Generator().manual_seed(3), return_members=True,
                      batch_size=1)
    torch.testing.assert_close(together.members, chunked.members, rtol=0, atol=1e-6)
    assert not torch.allclose(together.members[0, 0], together.members[0, 1])  # one generator per member


def test_mask2image_one_sample_generator_equals_a_list_of_it():
    pipe = tiny_mask2image()
    mask = vessel_masks(1)
    kwargs = dict(num_inference_steps=2, output_type="pt")
    plain = pipe(mask, generator=torch.Generator().manual_seed(1), **kwargs).images
    listed = pipe(mask, generator=[torch.Generator().manual_seed(1)], **kwargs).images
    torch.testing.assert_close(plain, listed, rtol=0, atol=0)
    # two images of one mask from one generator: split per sample, whatever the batch size
    two = pipe(mask, num_images_per_mask=2, generator=torch.Generator().manual_seed(1), **kwargs).images
    chunked = pipe(mask, num_images_per_mask=2, generator=torch.Generator().manual_seed(1), batch_size=1,
                   **kwargs).images
    torch.testing.assert_close(two, chunked, rtol=0, atol=1e-6)
    assert not torch.allclose(two[0], two[1])


def test_features_one_sample_generator_equals_a_list_of_it():
    pipe = tiny_diffusion_features("plain")
    image = uint8_images(1)
    kwargs = dict(blocks=["up.1"], timesteps=[40], feature_dtype=torch.float32)
    plain = pipe(image, generator=torch.Generator().manual_seed(2), **kwargs).features["up.1"]
    listed = pipe(image, generator=[torch.Generator().manual_seed(2)], **kwargs).features["up.1"]
    torch.testing.assert_close(plain, listed, rtol=0, atol=0)


@pytest.mark.parametrize("generator", [0, "seed", [torch.Generator(), 3]], ids=["int", "str", "mixed_list"])
def test_a_generator_that_is_not_one_is_a_type_error(seg, image, generator):
    with pytest.raises(TypeError, match="`generator`"):
        segment(seg, (image + 1) / 2, ensemble_size=2, generator=generator)


# ---------------------------------------------------------------------------------------------- 5. checks


@pytest.mark.parametrize("steps", [0, -1, 2.5, True, "2", math.nan])
def test_segmentation_num_inference_steps_must_be_a_positive_integer(seg, image, steps):
    with pytest.raises(ValueError, match="`num_inference_steps`"):
        segment(seg, (image + 1) / 2, num_inference_steps=steps)


@pytest.mark.parametrize("name, value", [("ensemble_size", True), ("threshold", math.nan), ("threshold", "0.5"),
                                         ("tile_overlap", math.nan)])
def test_segmentation_arguments_that_only_look_valid(seg, image, name, value):
    with pytest.raises(ValueError, match=f"`{name}`"):
        segment(seg, (image + 1) / 2, **{name: value})


def test_segmentation_nan_weights_raise_instead_of_an_empty_mask(seg, image):
    with torch.no_grad():
        seg.unet.conv_in.weight.fill_(math.nan)
    with pytest.raises(NonFiniteOutputError, match="SegmentationEnsemblePipeline.*NaN"):
        segment(seg, (image + 1) / 2, output_type="pil")


def tiny_prior(seed: int = 1) -> UNet2DModel:
    """A deterministic segmenter (image -> one logit channel) for prior-anchored pipelines."""
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=16, in_channels=3, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2).eval()


def anchored_pipe(scheduler=None) -> SegmentationEnsemblePipeline:
    pipe = SegmentationEnsemblePipeline(unet=tiny_unet(image_channels=4), prior=tiny_prior(), anchor="residual",
                                        scheduler=scheduler or DDIMScheduler(num_train_timesteps=100))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_segmentation_nan_prior_raises(image):
    pipe = anchored_pipe()
    with torch.no_grad():
        pipe.prior.conv_out.bias.fill_(math.nan)
    with pytest.raises(NonFiniteOutputError, match="prior dtype"):
        segment(pipe, (image + 1) / 2)


def all_pipelines():
    seg = tiny_pipeline()
    m2i = tiny_mask2image(with_mask_model=True)
    features = tiny_diffusion_features("plain")
    channels = {d["name"]: d["channels"] for d in features.describe()}
    from diffusers_retina.models import PixelMLPEnsemble

    features.set_head(PixelMLPEnsemble(blocks=["up.1"], timesteps=[10], block_channels=[channels["up.1"]],
                                       ensemble_size=2).eval())
    anchored = anchored_pipe(DDPMScheduler(num_train_timesteps=100))
    return {"segmentation": seg, "anchored": anchored, "mask2image": m2i, "features": features}


@pytest.mark.parametrize("unsafe", [False, "False", 0])
def test_save_pretrained_refuses_pickle(tmp_path, unsafe):
    for name, pipe in all_pipelines().items():
        with pytest.raises(ValueError, match="safe_serialization"):
            pipe.save_pretrained(tmp_path / name, safe_serialization=unsafe)
        assert not (tmp_path / name).exists()


# ---------------------------------------------------------------------------------------------- 6. offloading


def test_offload_sequences_name_every_model_component():
    for name, pipe in all_pipelines().items():
        sequence = pipe.model_cpu_offload_seq.split("->")
        modules = {key for key, value in pipe.components.items() if isinstance(value, torch.nn.Module)}
        assert set(sequence) <= set(pipe.components), (name, sequence)  # only registered components
        assert modules <= set(sequence), (name, modules - set(sequence))  # none left to the slow sequential fallback


def _run(name, pipe):
    if name in ("segmentation", "anchored"):
        return segment(pipe, uint8_images(1)[0]).probabilities
    if name == "mask2image":
        return pipe(num_masks=1, num_inference_steps=2, mask_num_inference_steps=2, guidance_scale=1.5,
                    generator=seeded(0, 1), output_type="pt").images
    return pipe(uint8_images(1)[0], output="segmentation", seed=0).probabilities


@pytest.mark.parametrize("name", ["segmentation", "anchored", "mask2image", "features"])
def test_model_cpu_offload_hooks_give_the_same_output(name):
    """diffusers' hooks on the CPU itself (``device="cpu"``): every component in the sequence gets its hook, the
    pipeline runs through them and gives what it gives without them, and the hooks offload at the end."""
    pipe = all_pipelines()[name]
    pipe.set_progress_bar_config(disable=True)
    reference = _run(name, pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    hooked = [key for key, value in pipe.components.items()
              if isinstance(value, torch.nn.Module) and hasattr(value, "_hf_hook")]
    assert sorted(hooked) == sorted(k for k in pipe.model_cpu_offload_seq.split("->") if pipe.components.get(k)
                                    is not None)
    torch.testing.assert_close(_run(name, pipe), reference, rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="enable_model_cpu_offload moves models to an accelerator; "
                    "this machine has none (the CPU hooks are tested above)")
@pytest.mark.parametrize("name", ["segmentation", "anchored", "mask2image", "features"])
def test_model_cpu_offload_on_the_accelerator(name):
    pipe = all_pipelines()[name]
    pipe.set_progress_bar_config(disable=True)
    reference = _run(name, pipe)
    pipe.enable_model_cpu_offload()
    assert pipe._execution_device.type == "cuda"
    out = _run(name, pipe)
    torch.testing.assert_close(out.cpu(), reference.cpu(), rtol=0, atol=5e-3)
    for component in pipe.components.values():  # offloaded again after the call
        if isinstance(component, torch.nn.Module):
            assert next(component.parameters()).device.type == "cpu"


@pytest.mark.parametrize("kwargs, name", [
    (dict(timesteps=[2.5]), "timesteps"), (dict(timesteps=[math.nan]), "timesteps"),
    (dict(timesteps=[True]), "timesteps"),
    (dict(num_noise_draws=True), "num_noise_draws"), (dict(batch_size=0), "batch_size"),
    (dict(batch_size=-1), "batch_size"), (dict(seed=1.5), "seed"),
], ids=["float_step", "nan_step", "bool_step", "bool_draws", "zero_batch", "negative_batch", "float_seed"])
def test_features_arguments_are_checked(kwargs, name):
    pipe = tiny_diffusion_features("plain")
    with pytest.raises(ValueError, match=f"`{name}`"):
        pipe(uint8_images(1)[0], **{"timesteps": [10], **kwargs})
