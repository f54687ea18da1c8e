"""The feature-reusing refiner: ``PriorFeatureRefinerModel`` in ``SegmentationEnsemblePipeline`` (the prior runs once
per image, members and steps run the head only), its saving and loading, its bad inputs, and its training path
(students distilled from the prior, out of fold; ``--refiner features``)."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, UNet2DModel

from diffusers_retina import SegmentationEnsemblePipeline
from diffusers_retina.fold_priors import FoldPriors
from diffusers_retina.models import PriorFeatureRefinerModel, segmenter_features
from diffusers_retina.pipelines.sampling import segmenter_probabilities

from testing_utils import TINY_SEGMENTATION as TINY
from testing_utils import IMAGE_SIZE, seeded, tiny_feature_pipeline, tiny_head, tiny_prior, unit_range
from testing_utils import run_script as run

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "training" / "train_segmentation_ensemble.py"
PRIOR_MAPS = REPO / "training" / "make_prior_maps.py"


def feature_pipeline(scheduler=None, head=None):
    return tiny_feature_pipeline(scheduler or DDIMScheduler(num_train_timesteps=100, prediction_type="sample",
                                                            timestep_spacing="trailing"), head=head)


@pytest.fixture
def image():
    return torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(7)) * 2 - 1


# ------------------------------------------------------------------------------------------------ model


def test_segmenter_features_are_the_input_of_conv_out():
    prior = tiny_prior()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        logits, features = segmenter_features(prior, images)
        torch.testing.assert_close(prior.conv_out(features), logits)
        torch.testing.assert_close(logits, prior(images, 0).sample)
    assert features.shape == (2, 8, 16, 16)
    assert not prior.conv_out._forward_pre_hooks  # the hook is removed again


def test_context_once_equals_the_one_forward_of_training():
    head = tiny_head()
    features, prior_masks = torch.randn(3, 8, 12, 12), torch.rand(3, 1, 12, 12) * 2 - 1
    sample = torch.randn(3, 1, 12, 12)
    with torch.no_grad():
        context = head.encode_context(features, prior_masks)
        via_context = head(sample, torch.tensor([999, 500, 1]), context).sample
        one_forward = head(sample, torch.tensor([999, 500, 1]), features=features, prior_masks=prior_masks).sample
        assert context.shape == (3, head.context_channels, 12, 12)
        torch.testing.assert_close(via_context, one_forward)
        # the timestep matters (FiLM), and a scalar timestep is one per sample
        other_time = head(sample, torch.tensor([1, 1, 1]), context).sample
        assert not torch.allclose(via_context, other_time)
        torch.testing.assert_close(head(sample, 1, context).sample, other_time)


def test_bad_model_arguments_are_named():
    with pytest.raises(ValueError, match="hidden_channels"):
        PriorFeatureRefinerModel(hidden_channels=0)
    with pytest.raises(ValueError, match="time_embedding_dim"):
        PriorFeatureRefinerModel(time_embedding_dim=7)
    head = tiny_head()
    with pytest.raises(ValueError, match="8 feature channels"):
        head.encode_context(torch.zeros(1, 5, 8, 8), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="context"):
        head(torch.zeros(2, 1, 8, 8), 1, torch.zeros(1, 8, 8, 8))


# ------------------------------------------------------------------------------------------------ pipeline


def test_prior_runs_once_per_image_and_steps_run_the_head_only(image):
    pipe = feature_pipeline()
    calls = {"prior": 0, "head": 0, "context": 0}
    pipe.prior.register_forward_hook(lambda *args: calls.__setitem__("prior", calls["prior"] + 1))
    pipe.unet.register_forward_hook(lambda *args: calls.__setitem__("head", calls["head"] + 1))
    encode = pipe.unet.encode_context

    def counted(*args, **kwargs):
        calls["context"] += 1
        return encode(*args, **kwargs)

    pipe.unet.encode_context = counted
    pipe(unit_range(torch.cat([image, image.flip(-1)])), num_inference_steps=3, ensemble_size=4, generator=seeded(0),
         output_type="pt")
    # both images in one prior pass; one head call per step for the 8 samples (one chunk)
    assert calls == {"prior": 1, "head": 3, "context": 1}


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler])
def test_any_scheduler_and_tiles(scheduler_cls):
    pipe = feature_pipeline(scheduler_cls(num_train_timesteps=100, prediction_type="sample"))
    image = torch.rand(1, 3, 40, 36, generator=torch.Generator().manual_seed(0))
    tiled = pipe(image, num_inference_steps=2, ensemble_size=2, generator=seeded(0), output_type="np", tile_size=16)
    assert tiled.masks.shape == (1, 40, 36) and tiled.probabilities.shape == (1, 40, 36, 1)
    assert torch.isfinite(torch.from_numpy(tiled.entropy)).all()


def test_callbacks_see_the_residual_state(image):
    pipe = feature_pipeline()
    seen = []

    def callback(pipeline, step, timestep, kwargs):
        seen.append(kwargs["latents"].shape)
        return {"latents": kwargs["latents"] * 0}  # a zero residual after every step: members are the prior

    out = pipe(unit_range(image), num_inference_steps=2, ensemble_size=2, generator=seeded(0), output_type="pt",
               callback_on_step_end=callback, return_members=True)
    assert seen == [torch.Size([2, 1, IMAGE_SIZE, IMAGE_SIZE])] * 2
    with torch.no_grad():
        prior = segmenter_probabilities(pipe.prior, image)
    torch.testing.assert_close(out.members[0, 1], prior[0], atol=1e-5, rtol=0)


def test_save_load_round_trip_through_all_entry_points(tmp_path, image):
    pipe = feature_pipeline()
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "unet" / "feature_refiner.py").is_file()
    expected = pipe(unit_range(image), num_inference_steps=2, ensemble_size=2, generator=seeded(0), output_type="np")
    for loaded in (SegmentationEnsemblePipeline.from_pretrained(tmp_path),
                   DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)):
        assert type(loaded.unet).__name__ == "PriorFeatureRefinerModel"
        loaded.set_progress_bar_config(disable=True)
        got = loaded(unit_range(image), num_inference_steps=2, ensemble_size=2, generator=seeded(0), output_type="np")
        torch.testing.assert_close(torch.from_numpy(got.probabilities), torch.from_numpy(expected.probabilities))


def test_refiner_without_its_prior_is_a_clear_error(tmp_path):
    feature_pipeline().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="PriorFeatureRefinerModel.*prior=None"):
        SegmentationEnsemblePipeline.from_pretrained(tmp_path, prior=None)
    shutil.rmtree(tmp_path / "prior")
    with pytest.raises(FileNotFoundError, match="`prior`.*no prior/ folder"):
        SegmentationEnsemblePipeline.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="anchor='residual'"):
        SegmentationEnsemblePipeline(unet=tiny_head(), scheduler=DDIMScheduler(), prior=tiny_prior(),
                                     anchor="strength")


def test_feature_channels_must_match_the_prior_at_load_time(tmp_path):
    feature_pipeline().save_pretrained(tmp_path)
    wider = UNet2DModel(sample_size=16, in_channels=3, out_channels=1, block_out_channels=(16, 16), layers_per_block=1,
                        norm_num_groups=4, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    shutil.rmtree(tmp_path / "prior")
    wider.save_pretrained(tmp_path / "prior")
    with pytest.raises(ValueError, match=r"unet \(PriorFeatureRefinerModel\).*feature_channels=8.*prior "
                                         r"\(UNet2DModel\) gives 16"):
        SegmentationEnsemblePipeline.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def students(four_pairs, tmp_path_factory):
    """A tiny prior, then two out-of-fold students distilled from it, through the real scripts."""
    root = tmp_path_factory.mktemp("students")
    run(TRAIN, ["--train_data_dir", str(four_pairs), *TINY, "--objective", "supervised", "--max_train_steps", "2",
                "--output_dir", str(root / "prior")])
    run(PRIOR_MAPS, ["--train_data_dir", str(four_pairs), "--stems", "case*", "--folds", "2", "--distill_from",
                     str(root / "prior" / "unet"), "--output_dir", str(root / "folds"), "--tile_size", "32", "--",
                     *TINY, "--max_train_steps", "2"])
    return root


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_students_are_distilled_out_of_fold(students):
    summary = json.loads((students / "folds" / "summary.json").read_text())
    assert summary["source"]["distill_from"] == str((students / "prior" / "unet").resolve())
    for k, held_out in enumerate(summary["source"]["folds"]):
        record = json.loads((students / "folds" / f"fold-{k}" / "training_info.json").read_text())
        assert not set(record["args"]["train_stems"].split(",")) & set(held_out)
        assert record["args"]["distill_from"] == str(students / "prior" / "unet")
    priors = FoldPriors(students / "folds", students / "prior" / "unet", ["case0", "case1", "case2", "case3"])
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    prior_masks, features = priors(["case0", "case1", "case2", "case3"], images)
    assert prior_masks.shape == (4, 1, 16, 16) and features.shape == (4, 8, 16, 16)
    # each patch gets the student that did not see its photograph
    for row, name in enumerate(["case0", "case1", "case2", "case3"]):
        student = priors.students[priors.fold_of[name]]
        with torch.no_grad():
            logits, expected = segmenter_features(student, images[row:row + 1])
        torch.testing.assert_close(features[row:row + 1], expected)
        torch.testing.assert_close(prior_masks[row:row + 1], 2 * logits.sigmoid() - 1)


def test_distillation_loss_is_zero_for_the_teacher_itself():
    sys.path.insert(0, str(REPO / "training"))
    try:
        from train_segmentation_ensemble import distillation_loss
    finally:
        sys.path.remove(str(REPO / "training"))
    teacher = tiny_prior()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    same = distillation_loss(teacher, teacher, images)
    other = distillation_loss(tiny_prior(seed=5), teacher, images)
    probability = teacher(images, 0).sample.sigmoid()
    entropy = -(probability * probability.log() + (1 - probability) * (1 - probability).log()).mean()
    torch.testing.assert_close(same, entropy)  # BCE to itself = its own entropy; the feature distance is 0
    assert other > same


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_feature_refiner_training_saves_a_pipeline_and_resumes(four_pairs, students, tmp_path):
    common = ["--train_data_dir", str(four_pairs), *TINY, "--max_train_steps", "4", "--checkpointing_steps", "2",
              "--anchor", "residual", "--refiner", "features", "--refiner_channels", "4",
              "--prior_folds", str(students / "folds"), "--prior_segmenter", str(students / "prior" / "unet"),
              "--save_dtype", "float32", "--default_denoising_steps", "1"]
    run(TRAIN, common + ["--output_dir", str(tmp_path / "straight"), "--validation_stems", "case0",
                         "--validation_crop", "32"])
    pipe = SegmentationEnsemblePipeline.from_pretrained(tmp_path / "straight")
    assert isinstance(pipe.unet, PriorFeatureRefinerModel) and pipe.unet.config.hidden_channels == 4
    assert pipe.config.default_denoising_steps == 1
    card = (tmp_path / "straight" / "README.md").read_text()
    assert "feature-reusing refiner" in card and "PriorFeatureRefinerModel" in card and "--distill_from" in card
    assert "[state | image | 2p - 1]" not in card
    result = pipe(torch.full((1, 3, 40, 40), 0.5), ensemble_size=2, generator=seeded(0), output_type="np")
    assert result.masks.shape == (1, 40, 40)
    resumed = tmp_path / "resumed"
    run(TRAIN, common + ["--output_dir", str(resumed), "--max_train_steps", "2"])
    run(TRAIN, common + ["--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    run(TRAIN, common + ["--output_dir", str(tmp_path / "again")])
    a = SegmentationEnsemblePipeline.from_pretrained(tmp_path / "again").unet.state_dict()
    b = SegmentationEnsemblePipeline.from_pretrained(resumed).unet.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_feature_refiner_arguments_are_checked(four_pairs, students, tmp_path):
    base = ["--train_data_dir", str(four_pairs), "--output_dir", str(tmp_path / "x")]
    prior = str(students / "prior" / "unet")
    for extra, needle in [(["--refiner", "features", "--anchor", "residual", "--prior_segmenter", prior],
                           "--prior_folds"),
                          (["--prior_folds", str(students / "folds")], "--refiner features"),
                          (["--distill_from", prior], "--objective supervised"),
                          (["--objective", "supervised", "--distill_from", str(tmp_path)], "config.json")]:
        result = run(TRAIN, base + extra, expect=2)
        assert needle in result.stderr, result.stderr[-500:]
    assert not (tmp_path / "x").exists()
    # students of another prior, or trained on labels, are refused before training
    with pytest.raises(ValueError, match="distilled from"):
        FoldPriors(students / "folds", students / "folds" / "fold-0" / "unet", ["case0"])
    summary = json.loads((students / "folds" / "summary.json").read_text())
    del summary["source"]["distill_from"]
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    (labelled / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match="trained on labels"):
        FoldPriors(labelled, prior, ["case0"])


def test_banded_inference_equals_one_pass(monkeypatch):
    """Without gradients a large image runs in bands of rows (cache-friendly); the result is the one-pass result."""
    import diffusers_retina.models.feature_refiner as module

    head = tiny_head()
    sample, context = torch.randn(3, 1, 37, 23), torch.randn(3, 8, 37, 23)
    with torch.enable_grad():
        whole = head(sample, torch.tensor([5, 50, 90]), context).sample.detach()
    for elements in (1, 3 * 8 * 23 * 4, 3 * 8 * 23 * 36):  # bands of 1, 4 and 36 rows
        monkeypatch.setattr(module, "BAND_ELEMENTS", elements)
        with torch.no_grad():
            banded = head(sample, torch.tensor([5, 50, 90]), context).sample
        torch.testing.assert_close(banded, whole, atol=1e-6, rtol=0)


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_step_count_is_chosen_out_of_fold_on_training_images(four_pairs, students, tmp_path):
    out = tmp_path / "refiner"
    run(TRAIN, ["--train_data_dir", str(four_pairs), *TINY, "--max_train_steps", "2", "--anchor", "residual",
                "--refiner", "features", "--prior_folds", str(students / "folds"),
                "--prior_segmenter", str(students / "prior" / "unet"), "--default_denoising_steps", "4",
                "--output_dir", str(out)])
    run(REPO / "training" / "select_denoising_steps.py",
        ["--pipeline", str(out), "--prior_folds", str(students / "folds"), "--train_data_dir", str(four_pairs),
         "--stems", "case*", "--steps", "1", "2", "--crop", "0", "--tile_size", "32", "--ensemble_size", "2",
         "--apply"])
    record = json.loads((out / "step_selection.json").read_text())
    assert set(record["table"]) == {"student alone", "1 step", "2 steps"}
    assert record["chosen_steps"] in (1, 2)
    nll = {label: row["nll"] for label, row in record["table"].items() if label != "student alone"}
    best = min(nll.values())
    assert nll[f"{record['chosen_steps']} step{'s' if record['chosen_steps'] > 1 else ''}"] <= best * 1.005
    loaded = SegmentationEnsemblePipeline.from_pretrained(out)
    assert loaded.config.default_denoising_steps == record["chosen_steps"]
    dice_by_threshold = {float(t): d for t, d in record["threshold_dice"].items()}
    assert record["chosen_threshold"] in dice_by_threshold
    assert dice_by_threshold[record["chosen_threshold"]] == max(dice_by_threshold.values())
    assert loaded.config.default_threshold == record["chosen_threshold"]
