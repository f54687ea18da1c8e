"""AdaptDiff: the target-modality helpers, AdaptDiffPipeline's contract, and the resumable four-step workflow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from diffusers_retina import AdaptDiffPipeline, Mask2ImagePipeline
from diffusers_retina.data.modality import (
    corrupt_mask,
    field_of_view_mask,
    fluorescein_like,
    invert_intensity,
    match_histograms,
)
from diffusers_retina.pipelines.adaptdiff import pseudo_labels

from testing_utils import (
    KILLING_RUNNER,
    adaptdiff_workflow_args as workflow_args,
    fundus,
    load_script,
    tiny_adaptdiff,
    write_domains,
)

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "training" / "adaptdiff_workflow.py"


# ---------------------------------------------------------------------------------------------- data helpers
def test_field_of_view_is_the_disc():
    image = fundus()
    fov = field_of_view_mask(image)
    assert fov[32, 32] and fov[32, 10] and not fov[0, 0] and not fov[63, 63]
    assert field_of_view_mask(np.full((8, 8, 3), 0.5)).all()  # no dark surround: everything


def test_fluorescein_like_makes_vessels_bright_on_a_dark_background_and_is_seeded():
    image = fundus()
    angiogram = fluorescein_like(image, seed=1)
    assert angiogram.shape == (64, 64, 3) and np.allclose(angiogram[..., 0], angiogram[..., 2])
    vessel, background = angiogram[32, 20:44, 0].mean(), angiogram[24, 20:44, 0].mean()
    assert vessel > background + 0.2  # inverted contrast
    assert angiogram[0, 0].max() == 0  # black surround
    np.testing.assert_array_equal(angiogram, fluorescein_like(image, seed=1))
    assert not np.array_equal(angiogram, fluorescein_like(image, seed=2))  # the noise is seeded
    # 8-bit input reads as [0, 1]
    np.testing.assert_allclose(fluorescein_like((image * 255).round().astype(np.uint8), seed=1), angiogram, atol=0.05)


def test_match_histograms_inside_the_field_of_view():
    rng = np.random.default_rng(0)
    image = rng.uniform(0.0, 0.5, (32, 32, 3)).astype(np.float32)
    reference = rng.uniform(0.5, 1.0, (32, 32, 3)).astype(np.float32)
    fov = np.zeros((32, 32), dtype=bool)
    fov[4:28, 4:28] = True
    matched = match_histograms(image, reference, image_fov=fov)
    assert matched[fov].min() >= 0.49 and abs(np.median(matched[fov]) - np.median(reference)) < 0.02
    np.testing.assert_array_equal(matched[~fov], image[~fov])  # outside the field of view: unchanged
    # monotone: the order of intensities is kept
    order = np.argsort(image[..., 0][fov])
    assert np.all(np.diff(matched[..., 0][fov][order]) >= -1e-6)
    grey = match_histograms(image[..., :1], reference)
    assert grey.shape == (32, 32, 3)


def test_stored_transform_is_the_quantile_mapping_without_the_source_photographs():
    from diffusers_retina.image_processing import (
        apply_source_intensity_transform,
        check_source_intensity_transform,
        source_intensity_transform,
        tensor_to_source_intensities,
    )
    from diffusers_retina.image_processing.intensity import match_quantiles, reference_quantiles, to_source_intensities

    rng = np.random.default_rng(0)
    references = [fundus() * rng.uniform(0.6, 1.0, 3).astype(np.float32) for _ in range(2)]
    fovs = [field_of_view_mask(r) for r in references]
    image = invert_intensity(fundus())[..., 1:2].repeat(3, axis=-1) * 0.7  # angiogram-like: grey, bright vessels
    # match_histograms is the quantile mapping onto the references' pooled quantiles
    np.testing.assert_array_equal(match_histograms(image, references, None, fovs),
                                  match_quantiles(image, reference_quantiles(references, fovs)))
    record = source_intensity_transform("invert+histmatch", references, fovs)
    assert record["transform"] == "invert+histmatch" and np.shape(record["reference_quantiles"]) == (3, 257)
    check_source_intensity_transform(json.loads(json.dumps(record)))  # JSON-able, as the pipeline config keeps it
    fov = field_of_view_mask(image)
    moved = apply_source_intensity_transform(image, record, fov)
    direct = to_source_intensities(image, "invert+histmatch", references, fovs, fov)
    assert moved.shape == direct.shape and np.abs(moved - direct)[fov].mean() < 0.01  # 257 stored levels vs 1025
    assert not np.allclose(moved, image, atol=0.05)
    np.testing.assert_array_equal(apply_source_intensity_transform(image, None), image)
    # the tensor form (the pipelines' NCHW batches in [-1, 1]) is the same transform
    batch = torch.from_numpy(image).permute(2, 0, 1)[None] * 2 - 1
    np.testing.assert_allclose((tensor_to_source_intensities(batch, record)[0].permute(1, 2, 0).numpy() + 1) / 2,
                               apply_source_intensity_transform(image, record), atol=1e-6)
    assert tensor_to_source_intensities(batch, None) is batch
    grey = tensor_to_source_intensities(batch[:, :1], record)  # a one-channel model input stays one channel
    assert grey.shape == (1, 1, 64, 64)
    invert = source_intensity_transform("invert")
    assert invert == {"transform": "invert", "reference_quantiles": None}
    for bad, match in (({"transform": "gamma", "reference_quantiles": None}, "transform"),
                       ({"transform": "histmatch", "reference_quantiles": None}, "reference_quantiles"),
                       ({"transform": "histmatch", "reference_quantiles": [[0.5, 0.2]]}, "reference_quantiles"),
                       ({"transform": "invert", "reference_quantiles": [[0.0, 1.0]]}, "reference_quantiles"),
                       ({"transform": "invert"}, "input_transform"), ("invert", "input_transform")):
        with pytest.raises(ValueError, match=match):
            check_source_intensity_transform(bad)
    with pytest.raises(ValueError, match="references"):
        source_intensity_transform("histmatch")


def test_invert_intensity_keeps_the_surround_black():
    image = fundus()
    inverted = invert_intensity(image)
    fov = field_of_view_mask(image)
    np.testing.assert_allclose(inverted[fov], 1 - image[fov], atol=1e-6)
    assert inverted[~fov].max() == 0


def test_corrupt_mask_exact_structured_and_seeded():
    mask = np.zeros((96, 96), dtype=np.uint8)
    mask[40:46, :] = 1
    mask[:, 20:23] = 1
    fov = np.zeros_like(mask, dtype=bool)
    fov[8:88, 8:88] = True
    total = int(mask.sum())
    noisy = corrupt_mask(mask, fp_rate=0.2, fn_rate=0.4, seed=3, fov=fov)
    removed = int((mask.astype(bool) & ~noisy.astype(bool)).sum())
    added = noisy.astype(bool) & ~mask.astype(bool)
    assert removed == round(0.4 * total) and int(added.sum()) == round(0.2 * total)
    assert not added[~fov].any()  # false positives only inside the field of view
    np.testing.assert_array_equal(noisy, corrupt_mask(mask, fp_rate=0.2, fn_rate=0.4, seed=3, fov=fov))
    assert not np.array_equal(noisy, corrupt_mask(mask, fp_rate=0.2, fn_rate=0.4, seed=4, fov=fov))
    np.testing.assert_array_equal(corrupt_mask(mask), mask)
    for bad in (dict(fp_rate=-0.1), dict(fn_rate=1.5), dict(fp_rate=float("nan"))):
        with pytest.raises(ValueError, match="rate"):
            corrupt_mask(mask, **bad)


def test_pseudo_label_modes():
    probabilities = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.95])
    assert pseudo_labels(probabilities, "threshold").tolist() == [0, 0, 0, 1, 1]
    assert pseudo_labels(probabilities, "threshold", threshold=0.25).tolist() == [0, 1, 1, 1, 1]
    assert torch.equal(pseudo_labels(probabilities, "soft"), probabilities)
    assert pseudo_labels(probabilities, "confident", confidence=0.9).tolist() == [0, 0.5, 0.5, 0.5, 1]
    with pytest.raises(ValueError, match="mode"):
        pseudo_labels(probabilities, "argmax")
    with pytest.raises(ValueError, match="confidence"):
        pseudo_labels(probabilities, "confident", confidence=0.5)


# ---------------------------------------------------------------------------------------------- pipeline
def masks(count: int = 2, size: int = 16) -> np.ndarray:
    out = np.zeros((count, size, size), dtype=np.uint8)
    for index in range(count):
        out[index, 4 + index * 3: 7 + index * 3, :] = 1
    return out


def test_segment_and_pseudo_label_outputs():
    pipe = tiny_adaptdiff()
    images = np.random.default_rng(0).uniform(0, 1, (2, 20, 20, 3)).astype(np.float32)  # not a multiple of 2
    out = pipe.segment(images, output_type="np")
    assert out.masks.shape == (2, 20, 20) and set(np.unique(out.masks)) <= {0.0, 1.0}
    np.testing.assert_array_equal(out.masks, (out.probabilities > 0.5).astype(np.float32))
    confident = pipe.pseudo_label(images, mode="confident", confidence=0.51, output_type="pt").masks
    assert set(torch.unique(confident).tolist()) <= {0.0, 0.5, 1.0}
    pil = pipe.pseudo_label(images, output_type="pil")
    assert isinstance(pil.masks[0], PIL.Image.Image) and pil.masks[0].size == (20, 20)
    masks_tuple, probabilities = pipe.segment(images, output_type="np", return_dict=False)
    np.testing.assert_array_equal(masks_tuple, out.masks)
    # tiled = untiled up to blending at the seams of a fully convolutional net: same shape, close values
    tiled = pipe.segment(images, output_type="np", tile_size=8).probabilities
    assert tiled.shape == probabilities.shape
    with pytest.raises(ValueError, match="output_type"):
        pipe.segment(images, output_type="latent")


def test_painting_is_reproducible_batched_and_follows_the_mask():
    pipe = tiny_adaptdiff()
    batch = masks(2)
    generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
    together = pipe(batch, num_inference_steps=2, generator=generators, output_type="np").images
    alone = pipe(batch[1], num_inference_steps=2, generator=[torch.Generator().manual_seed(2)],
                 output_type="np").images
    assert together.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(together[1], alone[0], atol=1e-5)
    again = pipe(batch, num_inference_steps=2, generator=torch.Generator().manual_seed(7), output_type="np").images
    np.testing.assert_array_equal(again, pipe(batch, num_inference_steps=2, generator=torch.Generator().manual_seed(7),
                                              output_type="np").images)
    # the condition steers the image: other masks, same noise, other images
    other = pipe(1 - batch, num_inference_steps=2, generator=torch.Generator().manual_seed(7), output_type="np").images
    assert np.abs(other - again).max() > 1e-3


def test_reference_images_match_the_histogram_and_latent_skips_it():
    pipe = tiny_adaptdiff()
    reference = np.full((16, 16, 3), 0.9, dtype=np.float32)
    reference[::2] = 0.8
    painted = pipe(masks(1), num_inference_steps=2, reference_images=[reference],
                   generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    plain = pipe(masks(1), num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images[0]
    fov = field_of_view_mask(plain)  # the painted image's own field of view is matched, its dark surround kept
    assert fov.sum() > 100
    assert painted[fov].min() >= 0.79 and painted[fov].max() <= 0.91  # pulled onto the reference's intensities
    np.testing.assert_array_equal(painted[~fov], plain[~fov])
    pil = pipe(masks(1), num_inference_steps=2, reference_images=[reference], output_type="pil",
               generator=torch.Generator().manual_seed(0))
    assert isinstance(pil.images[0], PIL.Image.Image) and isinstance(pil.masks[0], PIL.Image.Image)
    latent = pipe(masks(1), num_inference_steps=2, reference_images=[reference], output_type="latent",
                  generator=torch.Generator().manual_seed(0)).images
    assert latent.shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="reference_images"):
        pipe(masks(1), num_inference_steps=2, reference_images=[])


def test_grey_references_make_grey_paintings_and_colour_ones_keep_colour():
    pipe = tiny_adaptdiff()
    grey = np.tile(np.linspace(0.2, 0.9, 16, dtype=np.float32)[:, None, None], (1, 16, 3))
    colour = grey * np.array([1.0, 0.6, 0.3], dtype=np.float32)

    def paint(reference):
        return pipe(masks(1), num_inference_steps=2, reference_images=[reference],
                    generator=torch.Generator().manual_seed(0), output_type="np").images[0]

    painted = paint(grey)
    np.testing.assert_array_equal(painted[..., 0], painted[..., 1])
    np.testing.assert_array_equal(painted[..., 1], painted[..., 2])
    assert np.abs(paint(colour)[..., 0] - paint(colour)[..., 2]).max() > 0.05


def test_input_transform_moves_what_the_segmenter_reads_and_is_saved(tmp_path):
    from diffusers_retina.image_processing import apply_source_intensity_transform, source_intensity_transform

    pipe = tiny_adaptdiff()
    record = source_intensity_transform("invert+histmatch", [fundus(16) * 0.8])
    moved_pipe = AdaptDiffPipeline(unet=pipe.unet, scheduler=pipe.scheduler, segmenter=pipe.segmenter,
                                   input_transform=record)
    moved_pipe.set_progress_bar_config(disable=True)
    image = invert_intensity(fundus(16)) * 0.6
    read = moved_pipe.segment(image, output_type="np").probabilities
    np.testing.assert_allclose(read, pipe.segment(apply_source_intensity_transform(image, record),
                                                  output_type="np").probabilities, atol=1e-5)
    assert np.abs(read - pipe.segment(image, output_type="np").probabilities).max() > 1e-4
    moved_pipe.save_pretrained(tmp_path / "moved")
    loaded = AdaptDiffPipeline.from_pretrained(tmp_path / "moved")
    assert loaded.config.input_transform == record
    with pytest.raises(ValueError, match="input_transform"):
        AdaptDiffPipeline(unet=pipe.unet, scheduler=pipe.scheduler, segmenter=pipe.segmenter,
                          input_transform={"transform": "flip", "reference_quantiles": None})


def test_callback_sees_the_painting_loop():
    pipe = tiny_adaptdiff()
    seen = []

    def callback(painter, step, timestep, kwargs):
        seen.append((step, painter.num_timesteps, tuple(kwargs["latents"].shape)))
        return {}

    pipe(masks(1), num_inference_steps=3, callback_on_step_end=callback, output_type="np")
    assert [s for s, _, _ in seen] == [0, 1, 2] and seen[0][1] == 3 and pipe.num_timesteps == 3


def test_save_load_round_trip_and_loading_ways(tmp_path):
    pipe = tiny_adaptdiff()
    pipe.save_pretrained(tmp_path / "adapt")
    index = json.loads((tmp_path / "adapt" / "model_index.json").read_text())
    assert index["_class_name"][1] == "AdaptDiffPipeline" and "segmenter" in index
    loaded = AdaptDiffPipeline.from_pretrained(tmp_path / "adapt")
    loaded.set_progress_bar_config(disable=True)
    image = np.random.default_rng(1).uniform(0, 1, (16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded.segment(image, output_type="np").probabilities,
                               pipe.segment(image, output_type="np").probabilities, atol=1e-6)
    args = dict(num_inference_steps=2, output_type="np")
    np.testing.assert_allclose(loaded(masks(1), generator=torch.Generator().manual_seed(3), **args).images,
                               pipe(masks(1), generator=torch.Generator().manual_seed(3), **args).images, atol=1e-6)
    remote = DiffusionPipeline.from_pretrained(str(tmp_path / "adapt"), trust_remote_code=True)
    assert type(remote).__name__ == "AdaptDiffPipeline"
    with pytest.raises(ValueError, match="AdaptDiffPipeline"):
        Mask2ImagePipeline.from_pretrained(tmp_path / "adapt")


# ---------------------------------------------------------------------------------------------- workflow
def _run(args, runner=None, **env):
    command = [sys.executable, str(WORKFLOW), *args] if runner is None else [sys.executable, "-c", runner,
                                                                             str(WORKFLOW), *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **env))


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    return write_domains(tmp_path_factory.mktemp("adaptdiff"))


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_workflow_killed_in_step_2_resumes_there_to_the_same_adapted_weights(domains, tmp_path):
    straight = _run(workflow_args(domains, tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    state = json.loads((tmp_path / "straight" / "workflow.json").read_text())
    assert all(state["steps"][s]["complete"] for s in ("pseudo-labels", "diffusion", "synthesis", "fine-tune"))
    assert sorted(os.listdir(tmp_path / "straight" / "3-synthetic" / "images")) == ["s0-0.png", "s1-0.png", "s2-0.png", "s3-0.png"]

    crashed = tmp_path / "crashed"
    # SIGKILL while step 2 writes its checkpoint-8 (after checkpoint-4 is complete)
    killed = _run(workflow_args(domains, crashed), runner=KILLING_RUNNER, KILL_AT_CHECKPOINT="8")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    state = json.loads((crashed / "workflow.json").read_text())
    assert state["steps"]["pseudo-labels"]["complete"] and "diffusion" not in state["steps"]
    labels_written = os.stat(crashed / "1-pseudo-labels" / "masks" / "t0.png").st_mtime_ns

    resumed = _run(workflow_args(domains, crashed))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "step 1 (pseudo-labels): already complete, skipped" in log
    assert f"Resuming from {crashed / '2-diffusion' / 'checkpoint-4'}" in log
    assert os.stat(crashed / "1-pseudo-labels" / "masks" / "t0.png").st_mtime_ns == labels_written  # not redone
    for name in ("segmenter/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors"):
        a, b = load_file(tmp_path / "straight" / "adapted" / name), load_file(crashed / "adapted" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    # the adapted segmenter moved away from the source one, and the result loads as a pipeline
    source = load_file(domains["segmenter"] / "diffusion_pytorch_model.safetensors")
    adapted = load_file(crashed / "adapted" / "segmenter" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(source[k].float(), adapted[k].float()) for k in source)
    pipe = AdaptDiffPipeline.from_pretrained(crashed / "adapted")
    assert pipe.segment(np.zeros((16, 16, 3), dtype=np.float32), output_type="np").masks.shape == (1, 16, 16)

    before = (crashed / "workflow.json").read_text()
    workflow().main(workflow_args(domains, crashed))  # everything complete: nothing is redone
    assert (crashed / "workflow.json").read_text() == before


def workflow():
    """training/adaptdiff_workflow.py as a module (its argument checks and the labelling step run in-process)."""

    return load_script("adaptdiff_workflow")


def test_workflow_corrupts_pseudo_labels_and_checks_its_arguments(domains, tmp_path, capsys):
    module = workflow()
    module.main(workflow_args(domains, tmp_path / "clean", "--to_step", "1"))
    # threshold 0 labels every pixel a vessel; the noise then removes exactly half of them, in discs
    module.main(workflow_args(domains, tmp_path / "noisy", "--to_step", "1", "--pseudo_label_threshold", "0",
                              "--pseudo_label_fp", "0.5", "--pseudo_label_fn", "0.5"))
    module.main(workflow_args(domains, tmp_path / "inverted", "--to_step", "1", "--pseudo_label_transform",
                              "invert+histmatch"))
    read = lambda run, stem="t0": np.asarray(PIL.Image.open(tmp_path / run / "1-pseudo-labels" / "masks" / f"{stem}.png"))
    clean, noisy = read("clean"), read("noisy")
    assert set(np.unique(clean)) <= {0, 255} and set(np.unique(noisy)) == {0, 255}
    assert int((noisy == 0).sum()) == round(0.5 * noisy.size)
    assert (tmp_path / "inverted" / "1-pseudo-labels" / "images" / "t0.png").is_file()  # the target image, unchanged
    # labels from an earlier run, corrupted: the segmenter is not run again
    module.main(workflow_args(domains, tmp_path / "reused", "--to_step", "1", "--pseudo_labels_from",
                              str(tmp_path / "noisy" / "1-pseudo-labels")))
    np.testing.assert_array_equal(read("reused"), noisy)
    assert not (tmp_path / "clean" / "2-diffusion").exists()  # --to_step 1 stops there
    state = json.loads((tmp_path / "noisy" / "workflow.json").read_text())["steps"]["pseudo-labels"]
    assert state["complete"] and state["images"] == 4

    with pytest.raises(SystemExit, match="needs step 2 \\(diffusion\\)"):
        module.main(workflow_args(domains, tmp_path / "fresh", "--from_step", "3"))
    for bad, message in ((["--diffusion_steps", "0"], "--diffusion_steps"),
                         (["--pseudo_label_fn", "2"], "--pseudo_label_fn"),
                         (["--from_step", "3", "--to_step", "2"], "--from_step"),
                         (["--pseudo_label_transform", "gamma"], "--pseudo_label_transform"),
                         (["--pseudo_labels_from", str(tmp_path)], "--pseudo_labels_from"),
                         (["--paint_crop", "-1"], "--paint_crop"),
                         (["--source_segmenter", str(tmp_path)], "--source_segmenter")):
        with pytest.raises(SystemExit) as error:
            module.parse_args(workflow_args(domains, tmp_path / "bad", *bad))
        assert error.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # nothing written for a refused command
