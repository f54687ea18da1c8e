"""Prior-anchored diffusion segmentation: the pipeline's prior path (residual and strength formulations), its loading
entry points and schedulers, and the training path (prior maps, anchored objectives, the cascade, resume)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, UNet2DModel
from PIL import Image

from diffusers_retina import SegmentationEnsemblePipeline
from diffusers_retina.data import RandomPatchDataset
from diffusers_retina.pipelines.sampling import segmenter_probabilities

from testing_utils import TINY_SEGMENTATION as TINY
from testing_utils import IMAGE_SIZE, seeded, tiny_feature_pipeline, tiny_head, tiny_unet, unit_range
from testing_utils import run_script as run

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "training" / "train_segmentation_ensemble.py"
PRIOR_MAPS = REPO / "training" / "make_prior_maps.py"


def tiny_segmenter(seed=1):
    return tiny_unet(image_channels=3, mask_channels=0, out_channels=1, seed=seed)


def anchored_pipeline(anchor, scheduler=None, strength=0.5):
    """``anchor``: "residual" or "strength" with a UNet denoiser, or "features" (residual, feature-reusing refiner)."""
    if anchor == "features":
        return tiny_feature_pipeline(scheduler or DDIMScheduler(num_train_timesteps=100))
    # denoiser input: state (1) + image (3) + prior (1)
    pipe = SegmentationEnsemblePipeline(
        unet=tiny_unet(image_channels=4, mask_channels=1), scheduler=scheduler or DDIMScheduler(num_train_timesteps=100),
        prior=tiny_segmenter(), anchor=anchor, anchor_strength=strength)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def image():
    return torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(7)) * 2 - 1


# ------------------------------------------------------------------------------------------------ pipeline


@pytest.mark.parametrize("anchor", ["residual", "strength", "features"])
def test_batched_ensemble_equals_members_one_by_one(anchor, image):
    pipe = anchored_pipeline(anchor)
    batched = pipe(unit_range(image), num_inference_steps=3, ensemble_size=3, generator=seeded(1, 2, 3),
                   output_type="pt", return_members=True)
    singles = [pipe(unit_range(image), num_inference_steps=3, ensemble_size=1, generator=[seeded(s)], output_type="pt",
                    return_members=True).members[0, 0] for s in (1, 2, 3)]
    torch.testing.assert_close(batched.members[0], torch.stack(singles), atol=1e-5, rtol=0)
    chunked = pipe(unit_range(image), num_inference_steps=3, ensemble_size=3, generator=seeded(1, 2, 3),
                   output_type="pt", return_members=True, batch_size=1)
    torch.testing.assert_close(batched.members, chunked.members, atol=1e-5, rtol=0)


@pytest.mark.parametrize("denoiser", ["unet", "features"])
def test_residual_member_is_prior_plus_residual(denoiser, image):
    """With a denoiser that always predicts a zero residual (x0-prediction), every member equals the prior. A fresh
    feature-reusing refiner is one: its output layer starts at zero."""
    scheduler = DDIMScheduler(num_train_timesteps=100, prediction_type="sample")
    if denoiser == "features":
        pipe = tiny_feature_pipeline(scheduler, head=tiny_head(trained=False))
    else:
        pipe = anchored_pipeline("residual", scheduler)
        original = pipe.unet.forward

        def zero_residual(sample, timestep, return_dict=True):
            output = original(sample, timestep, return_dict=False)[0] * 0
            return (output,)

        pipe.unet.forward = zero_residual
    out = pipe(unit_range(image), num_inference_steps=2, ensemble_size=2, generator=seeded(0), output_type="pt",
               return_members=True)
    with torch.no_grad():
        prior = segmenter_probabilities(pipe.prior, image)
    torch.testing.assert_close(out.members[0, 0], prior[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.members[0, 1], prior[0], atol=1e-5, rtol=0)


def test_strength_starts_from_noised_prior_and_runs_the_last_steps(image):
    pipe = anchored_pipeline("strength", DDIMScheduler(num_train_timesteps=100, timestep_spacing="trailing"),
                          strength=0.4)
    seen = []
    pipe(unit_range(image), num_inference_steps=2, ensemble_size=1, generator=seeded(0), output_type="pt",
         callback_on_step_end=lambda p, i, t, kw: seen.append(int(t)) or {})
    # a 5-step trailing schedule over 100 steps is 99, 79, 59, 39, 19: strength 0.4 keeps the last two
    assert seen == [39, 19]
    assert pipe.num_timesteps == 2


def test_without_prior_the_pipeline_is_unchanged(image):
    unet = tiny_unet()
    plain = SegmentationEnsemblePipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=100))
    plain.set_progress_bar_config(disable=True)
    assert plain.prior is None and plain.image_channels == 3
    out = plain(unit_range(image), num_inference_steps=2, ensemble_size=2, generator=seeded(4), output_type="pt")
    again = plain(unit_range(image), num_inference_steps=2, ensemble_size=2, generator=seeded(4), output_type="pt")
    torch.testing.assert_close(out.probabilities, again.probabilities)


@pytest.mark.parametrize("scheduler_cls", [DDPMScheduler, DPMSolverMultistepScheduler])
@pytest.mark.parametrize("anchor", ["residual", "strength"])
def test_any_scheduler(anchor, scheduler_cls, image):
    pipe = anchored_pipeline(anchor)
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    out = pipe(unit_range(image), num_inference_steps=2, ensemble_size=2, generator=seeded(0), output_type="np")
    assert out.masks.shape == (1, IMAGE_SIZE, IMAGE_SIZE)
    assert np.isfinite(out.probabilities).all() and 0 <= out.probabilities.min() <= out.probabilities.max() <= 1


def test_defaults_travel_with_the_checkpoint(tmp_path, image):
    pipe = SegmentationEnsemblePipeline(
        unet=tiny_unet(image_channels=4), scheduler=DDIMScheduler(num_train_timesteps=100), prior=tiny_segmenter(),
        anchor="residual", default_denoising_steps=3, default_threshold=0.4)
    pipe.save_pretrained(tmp_path / "anchored")
    index = json.loads((tmp_path / "anchored" / "model_index.json").read_text())
    assert index["anchor"] == "residual" and index["default_denoising_steps"] == 3
    assert index["prior"] == ["diffusers", "UNet2DModel"]
    loaded = SegmentationEnsemblePipeline.from_pretrained(tmp_path / "anchored")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.default_threshold == 0.4 and loaded.prior is not None
    seen = []
    loaded(unit_range(image), ensemble_size=1, generator=seeded(0),
           callback_on_step_end=lambda p, i, t, kw: seen.append(i) or {})
    assert len(seen) == 3  # default_denoising_steps
    for key in pipe.prior.state_dict():
        torch.testing.assert_close(loaded.prior.state_dict()[key], pipe.prior.state_dict()[key])
    # plain diffusers with remote code, and the community-pipeline file
    remote = DiffusionPipeline.from_pretrained(str(tmp_path / "anchored"), trust_remote_code=True)
    assert type(remote).__name__ == "SegmentationEnsemblePipeline" and remote.config.anchor == "residual"
    community = DiffusionPipeline.from_pretrained(
        str(tmp_path / "anchored"), custom_pipeline=str(REPO / "pipelines" / "segmentation_ensemble"),
        trust_remote_code=True)
    a = loaded(unit_range(image), ensemble_size=2, generator=seeded(1), output_type="pt").probabilities
    b = community(unit_range(image), ensemble_size=2, generator=seeded(1), output_type="pt").probabilities
    torch.testing.assert_close(a, b)


def test_input_transform_moves_every_input_first_and_travels_with_the_checkpoint(tmp_path):
    from diffusers_retina.image_processing import apply_source_intensity_transform, source_intensity_transform

    from testing_utils import fundus

    record = source_intensity_transform("invert+histmatch", [fundus(IMAGE_SIZE)])
    pipe = anchored_pipeline("features")
    moved_pipe = SegmentationEnsemblePipeline.from_pretrained(_saved(pipe, tmp_path / "plain"),
                                                              input_transform=record)
    moved_pipe.set_progress_bar_config(disable=True)
    photo = np.where(fundus(IMAGE_SIZE) > 0, 1 - fundus(IMAGE_SIZE), 0).astype(np.float32)  # read inverted
    run = dict(num_inference_steps=2, ensemble_size=2, output_type="np", processing_resolution=None)
    through = moved_pipe(photo, generator=seeded(3), **run).probabilities
    by_hand = pipe(apply_source_intensity_transform(photo, record), generator=seeded(3), **run).probabilities
    np.testing.assert_allclose(through, by_hand, atol=1e-5)
    assert np.abs(through - pipe(photo, generator=seeded(3), **run).probabilities).max() > 1e-4
    moved_pipe.save_pretrained(tmp_path / "moved")
    assert json.loads((tmp_path / "moved" / "model_index.json").read_text())["input_transform"] == record
    assert SegmentationEnsemblePipeline.from_pretrained(tmp_path / "moved").config.input_transform == record
    with pytest.raises(ValueError, match="input_transform"):
        SegmentationEnsemblePipeline(unet=pipe.unet, scheduler=pipe.scheduler, prior=pipe.prior, anchor="residual",
                                     input_transform={"transform": "histmatch", "reference_quantiles": None})


def _saved(pipe, folder):
    pipe.save_pretrained(folder)
    return folder


def test_bad_anchoring_arguments_are_named():
    with pytest.raises(ValueError, match="anchor"):
        SegmentationEnsemblePipeline(unet=tiny_unet(image_channels=4), scheduler=DDIMScheduler(),
                                     prior=tiny_segmenter(), anchor="bernoulli")
    with pytest.raises(ValueError, match="give both or neither"):
        SegmentationEnsemblePipeline(unet=tiny_unet(image_channels=4), scheduler=DDIMScheduler(),
                                     prior=tiny_segmenter())
    with pytest.raises(ValueError, match="anchor_strength"):
        SegmentationEnsemblePipeline(unet=tiny_unet(image_channels=4), scheduler=DDIMScheduler(),
                                     prior=tiny_segmenter(), anchor="strength", anchor_strength=0)
    with pytest.raises(ValueError, match="image channels"):  # denoiser without the prior channel
        SegmentationEnsemblePipeline(unet=tiny_unet(image_channels=3), scheduler=DDIMScheduler(),
                                     prior=tiny_segmenter(), anchor="residual")
    pipe = anchored_pipeline("residual")
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(torch.zeros(1, 3, 16, 16), num_inference_steps=0)


# ------------------------------------------------------------------------------------------------ data


def test_patches_carry_the_prior_through_scale_and_flips():
    """The prior map is cut, resized and flipped with the image: a prior equal to the image's first channel stays
    equal to it (up to uint8 rounding) in every patch."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 40, 3)).astype(np.uint8)

    class One(torch.utils.data.Dataset):
        num_classes = 2

        def __len__(self):
            return 1

        def __getitem__(self, index):
            return {"image": torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1,
                    "mask": torch.from_numpy((image[..., 0] > 128).astype(np.int64)), "name": "one"}

    patches = RandomPatchDataset(One(), 16, patches_per_image=12, scale_range=(0.7, 1.4), priors=[image[..., 0]])
    for index in range(len(patches)):
        item = patches[index]
        first = (item["image"][0] + 1) / 2
        assert item["prior"].shape == (1, 16, 16)
        assert (item["prior"][0] - first).abs().max() < 2 / 255
    photometric = RandomPatchDataset(One(), 16, patches_per_image=4, photometric=1.0, priors=[image[..., 0]])
    changed = photometric[0]
    plain = RandomPatchDataset(One(), 16, patches_per_image=4, priors=[image[..., 0]])[0]
    torch.testing.assert_close(changed["prior"], plain["prior"])  # the prior is not recoloured
    assert not torch.equal(changed["image"], plain["image"])
    torch.testing.assert_close(changed["mask"], plain["mask"])


# ------------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def prior_maps(four_pairs, tmp_path_factory):
    """Out-of-fold prior maps from two tiny folds (2 steps each), through the real script."""
    out = tmp_path_factory.mktemp("priors")
    run(PRIOR_MAPS, ["--train_data_dir", str(four_pairs), "--stems", "case*", "--folds", "2",
                     "--output_dir", str(out), "--tile_size", "32", "--", *TINY, "--max_train_steps", "2"])
    return out


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_out_of_fold_maps_never_come_from_a_model_that_saw_the_image(prior_maps):
    summary = json.loads((prior_maps / "summary.json").read_text())
    folds = summary["source"]["folds"]
    assert sorted(s for fold in folds for s in fold) == ["case0", "case1", "case2", "case3"]
    for k, held_out in enumerate(folds):
        record = json.loads((prior_maps / f"fold-{k}" / "training_info.json").read_text())
        trained_on = record["args"]["train_stems"].split(",")
        assert not set(trained_on) & set(held_out)
    for stem in summary["dice"]:
        prior = np.asarray(Image.open(prior_maps / "maps" / f"{stem}.png"))
        assert prior.shape == (40, 40) and prior.dtype == np.uint8


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
@pytest.mark.parametrize("anchor", ["residual", "strength"])
def test_anchored_training_saves_a_pipeline_with_its_prior(anchor, four_pairs, prior_maps, tmp_path):
    out = tmp_path / anchor
    run(TRAIN, ["--train_data_dir", str(four_pairs), *TINY, "--max_train_steps", "3",
                "--prior_maps", str(prior_maps / "maps"), "--anchor", anchor, "--anchor_strength", "0.5",
                "--prior_segmenter", str(prior_maps / "fold-0" / "unet"), "--default_denoising_steps", "2",
                "--validation_stems", "case0", "--validation_crop", "32", "--output_dir", str(out)])
    pipe = SegmentationEnsemblePipeline.from_pretrained(out)
    assert pipe.config.anchor == anchor and pipe.unet.config.in_channels == 5
    prior = UNet2DModel.from_pretrained(prior_maps / "fold-0" / "unet")
    for key, value in prior.state_dict().items():
        torch.testing.assert_close(pipe.prior.state_dict()[key].float(), value.float())
    result = pipe(torch.full((1, 3, 40, 40), 0.5), ensemble_size=2, generator=seeded(0), output_type="np")
    assert result.masks.shape == (1, 40, 40)


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_cascade_and_anchored_resume(four_pairs, prior_maps, tmp_path):
    cascade = tmp_path / "cascade"
    run(TRAIN, ["--train_data_dir", str(four_pairs), *TINY, "--max_train_steps", "2", "--objective",
                "supervised", "--prior_maps", str(prior_maps / "maps"), "--output_dir", str(cascade)])
    assert UNet2DModel.from_pretrained(cascade / "unet").config.in_channels == 4  # image + prior

    common = ["--train_data_dir", str(four_pairs), *TINY, "--max_train_steps", "6", "--checkpointing_steps", "3",
              "--prior_maps", str(prior_maps / "maps"), "--anchor", "residual",
              "--prior_segmenter", str(prior_maps / "fold-0" / "unet"), "--save_dtype", "float32"]
    run(TRAIN, common + ["--output_dir", str(tmp_path / "straight")])
    resumed = tmp_path / "resumed"
    run(TRAIN, common + ["--output_dir", str(resumed)])
    # a crash after step 3: drop everything but the first checkpoint and resume
    for path in resumed.iterdir():
        if path.name != "checkpoint-3":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    run(TRAIN, common + ["--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    a = SegmentationEnsemblePipeline.from_pretrained(tmp_path / "straight").unet.state_dict()
    b = SegmentationEnsemblePipeline.from_pretrained(resumed).unet.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_anchored_arguments_are_checked(four_pairs, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    base = [sys.executable, str(TRAIN), "--train_data_dir", str(four_pairs), "--output_dir", str(tmp_path / "x")]
    for extra, needle in [(["--anchor", "residual"], "--prior_maps"),
                          (["--prior_maps", str(tmp_path)], "--anchor"),
                          (["--prior_maps", str(tmp_path / "missing"), "--objective", "supervised"], "not a folder")]:
        result = subprocess.run(base + extra, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and needle in result.stderr, result.stderr[-500:]
    assert not (tmp_path / "x").exists()


def test_segmenter_probabilities_tiles_like_one_pass():
    segmenter = tiny_segmenter()
    images = torch.rand(2, 3, 40, 36, generator=torch.Generator().manual_seed(0)) * 2 - 1
    whole = segmenter_probabilities(segmenter, images)
    assert whole.shape == (2, 1, 40, 36) and 0 <= float(whole.min()) <= float(whole.max()) <= 1
    with torch.no_grad():
        from diffusers_retina.image_processing import pad_to_multiple

        padded, _ = pad_to_multiple(images, 2)
        expected = segmenter(padded, 0).sample[:, :, :40, :36].sigmoid()
    torch.testing.assert_close(whole, expected, atol=1e-5, rtol=0)
