"""Adaptation to a folder of unlabelled photographs: the label-free rules (diffusers_retina.adaptation), the
target-folder checks, the masked fine-tuning loss, the workflow's self-training and combined methods, and
``adapt-train``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from diffusers_retina.adaptation import (
    MIN_TARGET_IMAGES,
    check_target_folder,
    choose_transform,
    confident_pixels,
    fit_logit_bias,
    fit_temperature,
    fold_temperature,
    fraction_matching_threshold,
    histogram_mean,
    mean_probability_threshold,
    probability_histogram,
    shift_logits,
    view_probabilities,
    working_image,
)
from diffusers_retina.cli.main import main as cli_main
from diffusers_retina.data import DataError

from testing_utils import adaptdiff_workflow_args as workflow_args, fundus, load_script, write_domains


def _photos(folder: Path, count: int, size=(32, 32), suffix=".png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image = (fundus(max(size), seed=index)[: size[0], : size[1]] * 255).astype(np.uint8)
        PIL.Image.fromarray(image).save(folder / f"p{index}{suffix}")
    return folder


# ---------------------------------------------------------------------------------------------- target folder checks
def test_target_folder_check_accepts_one_camera_and_names_the_files_it_refuses(tmp_path):
    good = _photos(tmp_path / "good", MIN_TARGET_IMAGES)
    assert sorted(check_target_folder(good)) == [f"p{i}" for i in range(MIN_TARGET_IMAGES)]
    with pytest.raises(DataError, match="has 2 photograph"):
        check_target_folder(_photos(tmp_path / "few", 2))
    mixed = _photos(tmp_path / "mixed", MIN_TARGET_IMAGES)
    _photos(tmp_path / "other", 1, size=(24, 30))
    (tmp_path / "other" / "p0.png").rename(mixed / "wide.png")
    with pytest.raises(DataError, match=r"mixes photograph sizes.*32x32 \(HxW\): p0.png.*24x30 \(HxW\): wide.png"):
        check_target_folder(mixed)
    junk = _photos(tmp_path / "junk", MIN_TARGET_IMAGES)
    (junk / "notes.txt").write_text("not a photograph")
    (junk / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="not images: broken.png, notes.txt"):
        check_target_folder(junk)
    assert sorted(check_target_folder(junk, patterns="p*")) == [f"p{i}" for i in range(MIN_TARGET_IMAGES)]
    with pytest.raises(DataError, match="is not a folder"):
        check_target_folder(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------- label-free rules
def test_fraction_matching_threshold_marks_the_source_fraction_within_bounds():
    rng = np.random.default_rng(0)
    probabilities = rng.beta(0.5, 3.0, size=(2, 64, 64))  # an under-confident target: few pixels above 0.5
    histogram = sum(probability_histogram(p) for p in probabilities)
    threshold = fraction_matching_threshold(histogram, 0.12)
    assert 0.1 <= threshold < 0.5
    assert abs(float((probabilities > threshold).mean()) - 0.12) < 0.01
    # fields of view: pixels outside do not count
    fov = np.zeros((64, 64), bool)
    fov[:, :32] = True
    assert probability_histogram(probabilities[0], fov).sum() == 64 * 32
    # bounds: a fraction that would need a threshold below 0.1 (or above 0.9) stops there
    assert fraction_matching_threshold(histogram, 0.9) == 0.1
    assert fraction_matching_threshold(probability_histogram(np.ones((4, 4))), 0.5) == 0.9
    with pytest.raises(ValueError, match="source_fraction"):
        fraction_matching_threshold(histogram, 0.0)


def test_mean_probability_threshold_marks_the_fraction_the_probabilities_expect():
    rng = np.random.default_rng(0)
    probabilities = rng.beta(0.5, 3.0, size=(2, 64, 64))  # an under-confident target: few pixels above 0.5
    histogram = sum(probability_histogram(p) for p in probabilities)
    assert abs(histogram_mean(histogram) - probabilities.mean()) < 1e-3
    threshold = mean_probability_threshold(histogram)
    assert 0.1 <= threshold < 0.5  # lower than one half: the faint pixels are marked too
    assert abs(float((probabilities > threshold).mean()) - probabilities.mean()) < 0.01
    sure = np.r_[np.full(90, 0.01), np.full(10, 0.99)]  # a sure segmenter marks its 10 % whatever the rule
    assert (sure > mean_probability_threshold(probability_histogram(sure))).mean() == 0.1
    with pytest.raises(ValueError, match="non-empty"):
        mean_probability_threshold(np.zeros(10))


def test_threshold_option_takes_a_number_or_a_rule():
    workflow = load_script("adaptdiff_workflow")
    assert workflow.threshold_rule("0.4") == 0.4 and workflow.threshold_rule("source-fraction") == "source-fraction"
    for bad in ("1.5", "median"):
        with pytest.raises(Exception, match="mean-probability"):
            workflow.threshold_rule(bad)


def test_painted_pixels_count_unless_every_view_contradicts_the_mask():
    from diffusers_retina.adaptation import uncontradicted_pixels

    mask = np.array([[1, 1, 1, 0, 0, 0]])
    views = np.array([[[0.9, 0.05, 0.3, 0.1, 0.95, 0.7]],
                      [[0.8, 0.20, 0.7, 0.2, 0.90, 0.3]]])
    # shown vessel, unshown vessel (dropped), faint vessel, background, painted extra vessel (dropped), unsure
    assert uncontradicted_pixels(views, mask).tolist() == [[True, False, True, True, False, True]]
    assert uncontradicted_pixels(views, mask, threshold=0.04).tolist()[0][1]  # above a low threshold it is shown


def test_combined_data_weighs_painted_pairs_and_target_photographs_equally(tmp_path):
    from types import SimpleNamespace

    steps = load_script("adaptdiff_steps")
    for folder, stems in (("3-synthetic", [f"s{i}-{k}" for i in range(2) for k in range(4)]),
                          ("1-pseudo-labels", ["t0", "t1", "t2"])):
        for sub in ("images", "masks", "confident"):
            (tmp_path / folder / sub).mkdir(parents=True)
            for stem in stems:
                PIL.Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / folder / sub / f"{stem}.png")
    data = steps.finetune_data(SimpleNamespace(method="combined"), tmp_path)
    names = sorted(p.name for p in (data / "masks").iterdir())
    targets = [n for n in names if n.startswith("target-")]
    assert len(names) - len(targets) == 8  # 8 painted pairs, 3 photographs listed round(8 / 3) = 3 times
    assert targets == sorted(f"target-{c}-t{i}.png" for c in range(3) for i in range(3))
    assert steps.finetune_data(SimpleNamespace(method="self-training"), tmp_path) == tmp_path / "1-pseudo-labels"


def test_confident_pixels_need_every_view_on_one_side_and_views_map_back():
    views = np.array([[[0.9, 0.35, 0.05]], [[0.7, 0.2, 0.1]], [[0.8, 0.45, 0.3]]])
    label, confident = confident_pixels(views, threshold=0.3)
    assert label.tolist() == [[True, True, False]] and confident.tolist() == [[True, False, True]]
    # a predictor that marks the left column: every view (mirrored ones too) agrees after mapping back
    image = np.zeros((6, 6, 3))
    image[:, 0] = 1.0

    def predict(view):
        return view[..., 0]

    probabilities = view_probabilities(predict, image)
    assert probabilities.shape == (5, 6, 6)
    assert (probabilities[:, :, 0] == 1).all() and (probabilities[:, :, 1:] == 0).all()


def test_choose_transform_prefers_the_source_fraction_and_the_first_on_ties():
    assert choose_transform({"none": [0.02, 0.03], "invert": [0.09, 0.12]}, 0.1) == "invert"
    assert choose_transform({"none": [0.05], "invert": [0.2]}, 0.1) == "none"  # equal log ratios: the first
    assert choose_transform({"none": [0.0], "invert": [0.5]}, 0.1) == "invert"  # nothing marked counts as 1e-4
    with pytest.raises(ValueError, match="source_fraction"):
        choose_transform({"none": [0.1]}, 0.0)


def test_working_image_matches_the_training_field_of_view():
    photo = np.zeros((64, 80, 3))
    yy, xx = np.mgrid[:64, :80]
    photo[(yy - 32) ** 2 + (xx - 40) ** 2 < 25 ** 2] = 0.6
    image, plan = working_image(photo, 98)
    assert image.shape == (128, 160, 3) and plan.basis == "field_of_view" and 0 <= image.min() <= image.max() <= 1
    same, plan = working_image(photo, None)  # no recorded diameter: as it is
    assert same is photo and plan.basis == "native"


def test_temperature_fitted_to_a_teacher_and_folded_into_the_output_layer():
    from testing_utils import tiny_prior

    rng = np.random.default_rng(0)
    teacher_logits = rng.normal(-2.0, 2.0, size=(2, 32, 32))
    teacher = 1 / (1 + np.exp(-teacher_logits))
    student = 2.5 * teacher_logits  # the same ranking, 2.5 times too sharp
    fov = np.zeros((32, 32), bool)
    fov[4:28, 4:28] = True
    assert abs(fit_temperature(list(student), list(teacher), [fov, fov]) - 2.5) < 0.01
    # outside the fields of view nothing counts
    wild = student.copy()
    wild[:, ~fov] = 40.0
    assert abs(fit_temperature(list(wild), list(teacher), [fov, fov]) - 2.5) < 0.01
    segmenter = tiny_prior().eval()
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        before = segmenter(image, 0).sample
        after = fold_temperature(segmenter, 2.0)(image, 0).sample
    torch.testing.assert_close(after, before / 2.0, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        fold_temperature(segmenter, 0.0)


def test_logit_bias_matches_the_target_fraction_inside_the_fields_of_view():
    rng = np.random.default_rng(1)
    maps = [rng.beta(0.5, 6.0, size=(16, 16)) for _ in range(3)]
    fovs = [np.ones((16, 16), bool)] * 3
    bias = fit_logit_bias(maps, fovs, 0.2)
    assert bias > 0 and abs(np.mean([shift_logits(m, bias).mean() for m in maps]) - 0.2) < 1e-3
    assert fit_logit_bias(maps, fovs, float(np.mean(maps))) == pytest.approx(0.0, abs=1e-3)  # already there


# ---------------------------------------------------------------------------------------------- masked loss
def test_supervised_loss_ignores_pixels_outside_the_loss_mask():
    supervised_loss = load_script("train_segmentation_ensemble").supervised_loss
    logits = torch.randn(2, 1, 8, 8, requires_grad=True)
    masks = (torch.rand(2, 8, 8) > 0.7).long()
    keep = torch.zeros(2, 8, 8, dtype=torch.bool)
    keep[:, :4] = True
    supervised_loss(logits, masks, 2, keep).backward()
    assert logits.grad[:, :, 4:].abs().max() == 0 and logits.grad[:, :, :4].abs().max() > 0
    # changing what is outside changes nothing; all-true equals no mask
    other = logits.detach().clone()
    other[:, :, 4:] = 50.0
    assert torch.allclose(supervised_loss(logits.detach(), masks, 2, keep), supervised_loss(other, masks, 2, keep))
    assert torch.allclose(supervised_loss(logits.detach(), masks, 2, torch.ones_like(keep)),
                          supervised_loss(logits.detach(), masks, 2))


# ---------------------------------------------------------------------------------------------- workflow and CLI
@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    return write_domains(tmp_path_factory.mktemp("adaptation"))


def test_self_training_writes_confident_labels_and_an_adapted_segmenter_and_anchored_pipeline(domains, tmp_path):
    from diffusers_retina import SegmentationEnsemblePipeline

    from diffusers import DDIMScheduler

    from testing_utils import tiny_feature_pipeline

    anchored = tiny_feature_pipeline(DDIMScheduler(num_train_timesteps=100))
    anchored.save_pretrained(tmp_path / "anchored-source")
    workflow = load_script("adaptdiff_workflow")
    segmenter = tmp_path / "prior"
    anchored.prior.save_pretrained(segmenter)
    args = [a if a != str(domains["segmenter"]) else str(segmenter)
            for a in workflow_args(domains, tmp_path / "work", "--method", "self-training",
                                   "--anchored_pipeline", str(tmp_path / "anchored-source"))]
    state = workflow.main(args)
    steps = state["steps"]
    assert state["method"] == "self-training"
    assert steps["diffusion"]["skipped"] and steps["synthesis"]["skipped"]  # nothing painted
    assert not (tmp_path / "work" / "2-diffusion").exists()
    labels = tmp_path / "work" / "1-pseudo-labels"
    confident = np.asarray(PIL.Image.open(labels / "confident" / "t0.png"))
    assert set(np.unique(confident)) <= {0, 255}
    assert steps["pseudo-labels"]["threshold"] == 0.5  # the default
    assert "--loss_mask_dir confident" in steps["fine-tune"]["command"]
    adapted = tmp_path / "work" / "adapted-segmenter"
    weights = load_file(adapted / "diffusion_pytorch_model.safetensors")
    source = load_file(segmenter / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(weights[k].float(), source[k].float()) for k in source)
    # step 5: the fitted temperature is folded into the output layer, nothing else changes
    temperature = steps["calibrate"]["temperature"]
    assert 0.25 <= temperature <= 4.0 and abs(temperature - 1.0) > 1e-3
    tuned = load_file(tmp_path / "work" / "4-fine-tune" / "unet" / "diffusion_pytorch_model.safetensors")
    for key in tuned:
        expected = tuned[key] / temperature if key.startswith("conv_out.") else tuned[key]
        torch.testing.assert_close(weights[key], expected, rtol=1e-4, atol=1e-6)
    assert json.loads((adapted / "adaptation.json").read_text())["method"] == "self-training"
    pipe = SegmentationEnsemblePipeline.from_pretrained(tmp_path / "work" / "adapted-anchored")
    prior = {k: v for k, v in pipe.prior.state_dict().items()}
    assert all(torch.equal(prior[k].float(), weights[k].float()) for k in weights)  # the adapted prior
    assert not (tmp_path / "work" / "adapted").exists()  # no painter, no AdaptDiffPipeline
    # a work folder keeps its method
    with pytest.raises(SystemExit, match="holds a --method self-training run"):
        workflow.main([*args, "--method", "combined"])
    # the rules by name: the labels mark as much vessel as the source's mean probability expects, or as its training
    # masks hold (the tiny segmenter records no fraction: its source masks')
    for rule, expected in (("mean-probability", "mean_probability"), ("source-fraction", "source_vessel_fraction")):
        other = workflow.main([a if a != str(tmp_path / "work") else str(tmp_path / rule) for a in args]
                              + ["--to_step", "1", "--pseudo_label_threshold", rule])
        labelling = other["steps"]["pseudo-labels"]
        target = labelling[expected] if expected in labelling else labelling["transform"][expected]
        assert 0.1 < labelling["threshold"] < 0.9 and labelling["threshold"] != 0.5
        assert abs(labelling["mean_vessel_fraction"] - target) < 0.02


def test_fine_tuning_in_the_source_space_stores_the_transform_with_every_adapted_model(domains, tmp_path):
    from types import SimpleNamespace

    from diffusers import DDIMScheduler

    from diffusers_retina import SegmentationEnsemblePipeline
    from diffusers_retina.image_processing import apply_source_intensity_transform

    from testing_utils import tiny_feature_pipeline

    anchored = tiny_feature_pipeline(DDIMScheduler(num_train_timesteps=100))
    anchored.save_pretrained(tmp_path / "anchored-source")
    segmenter = tmp_path / "prior"
    anchored.prior.save_pretrained(segmenter)
    workflow, steps = load_script("adaptdiff_workflow"), load_script("adaptdiff_steps")
    work = tmp_path / "work"
    args = [a if a != str(domains["segmenter"]) else str(segmenter)
            for a in workflow_args(domains, work, "--method", "self-training", "--pseudo_label_transform",
                                   "invert+histmatch", "--anchored_pipeline", str(tmp_path / "anchored-source"))]
    state = workflow.main(args)
    finetune = state["steps"]["fine-tune"]
    assert finetune["input_transform"] == "invert+histmatch"
    moved = work / steps.SOURCE_SPACE_DATA
    assert f"--train_data_dir {moved} " in finetune["command"]  # trained on the moved pairs
    record = json.loads((moved / steps.INPUT_TRANSFORM_FILE).read_text())
    assert record["transform"] == "invert+histmatch" and len(record["reference_quantiles"]) == 3
    for name in ("t0.png", "t3.png"):
        photo = steps._read_unit_image(work / "1-pseudo-labels" / "images" / name)
        np.testing.assert_allclose(steps._read_unit_image(moved / "images" / name),
                                   apply_source_intensity_transform(photo, record), atol=0.5 / 255 + 1e-6)
        for folder in ("masks", "confident"):  # the labels are the pseudo-labels', unmoved
            np.testing.assert_array_equal(np.asarray(PIL.Image.open(moved / folder / name)),
                                          np.asarray(PIL.Image.open(work / "1-pseudo-labels" / folder / name)))
    # every adapted model reads the target through the transform it was fine-tuned through
    assert SegmentationEnsemblePipeline.from_pretrained(work / "adapted-anchored").config.input_transform == record
    info = json.loads((work / "adapted-segmenter" / "training_info.json").read_text())
    assert info["input_transform"] == record and "args" in info  # the fine-tune's record kept beside it
    # --finetune_space target (or the transform none): the pairs as they are, nothing stored
    for space, transform in (("target", "invert+histmatch"), ("source", "none")):
        namespace = SimpleNamespace(finetune_space=space, pseudo_label_transform=transform, source_data_dir=None)
        if transform == "none":
            other = tmp_path / "none"
            other.mkdir()
            (other / "workflow.json").write_text(json.dumps({"steps": {"pseudo-labels": {}}}))
            assert steps.finetune_input_transform(namespace, other) is None
        else:
            assert steps.finetune_input_transform(namespace, work) is None


def test_workflow_refuses_bad_target_folders_before_training(domains, tmp_path, capsys):
    workflow = load_script("adaptdiff_workflow")
    few = _photos(tmp_path / "few" / "images", 2)
    args = workflow_args({**domains, "target": few.parent}, tmp_path / "work", "--method", "self-training")
    with pytest.raises(SystemExit) as error:
        workflow.parse_args(args)
    assert error.value.code == 2 and "has 2 photograph" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        workflow.parse_args([a for a in workflow_args(domains, tmp_path / "work") if a != str(domains["source"])
                             and a != "--source_data_dir"])  # adaptdiff without source data
    assert "paints the source's masks" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_adapt_train_command_checks_the_folder_before_anything(tmp_path, capsys):
    junk = _photos(tmp_path / "junk", MIN_TARGET_IMAGES, suffix=".jpg")
    (junk / "readme.md").write_text("notes")
    with pytest.raises(SystemExit) as error:
        cli_main(["adapt-train", str(junk), "--output-dir", str(tmp_path / "out")])
    assert error.value.code == 1 and "readme.md" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["adapt-train", str(_photos(tmp_path / "ok", MIN_TARGET_IMAGES)), "--output-dir",
                  str(tmp_path / "out"), "--method", "combined"])
    assert "--source-data-dir" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_combined_reuses_painted_pairs_and_adds_confident_target_photographs(domains, tmp_path):
    from diffusers_retina import AdaptDiffPipeline

    workflow = load_script("adaptdiff_workflow")
    reading = workflow.main(workflow_args(domains, tmp_path / "adaptdiff"))["steps"]["synthesis"]["mask_faithfulness"]
    assert 0.0 <= reading["dice"] <= 1.0 and reading["mask_fraction"] > 0  # the paintings read against their masks
    painted = tmp_path / "adaptdiff" / "3-synthetic" / "masks"
    masks = [np.asarray(PIL.Image.open(p)) > 0 for p in sorted(painted.iterdir())]
    assert reading["mask_fraction"] == pytest.approx(np.mean([m.mean() for m in masks]))
    counted = tmp_path / "adaptdiff" / "3-synthetic" / "confident"
    assert reading["counted_fraction"] == pytest.approx(
        np.mean([(np.asarray(PIL.Image.open(p)) > 0).mean() for p in sorted(counted.iterdir())]))
    state = workflow.main(workflow_args(domains, tmp_path / "combined", "--method", "combined",
                                        "--reuse_from", str(tmp_path / "adaptdiff")))
    for step in ("pseudo-labels", "diffusion", "synthesis"):  # steps 1-3 do not depend on the method: linked
        assert state["steps"][step]["reused_from"] == str(tmp_path / "adaptdiff")
    data = tmp_path / "combined" / "4-data"
    names = sorted(p.name for p in (data / "images").iterdir())
    assert names == sorted([f"s{i}-0.png" for i in range(4)] + [f"target-0-t{i}.png" for i in range(4)])
    np.testing.assert_array_equal(  # painted pairs count where the source's reading does not contradict the mask
        np.asarray(PIL.Image.open(data / "confident" / "s0-0.png")),
        np.asarray(PIL.Image.open(tmp_path / "adaptdiff" / "3-synthetic" / "confident" / "s0-0.png")))
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(data / "confident" / "target-0-t0.png")),
                                  np.asarray(PIL.Image.open(tmp_path / "adaptdiff" / "1-pseudo-labels" / "confident"
                                                            / "t0.png")))
    assert AdaptDiffPipeline.from_pretrained(tmp_path / "combined" / "adapted").segmenter is not None
    a = load_file(tmp_path / "adaptdiff" / "adapted-segmenter" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "combined" / "adapted-segmenter" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # different pairs, different fine-tune
    # self-training takes only the labels
    state = workflow.main(workflow_args(domains, tmp_path / "self", "--method", "self-training",
                                        "--reuse_from", str(tmp_path / "adaptdiff")))
    assert state["steps"]["pseudo-labels"]["reused_from"] and state["steps"]["diffusion"]["skipped"]


def test_adapt_train_command_adapts_and_resumes(domains, tmp_path, capsys):
    import shutil

    target = domains["target"] / "images"
    segmenter = tmp_path / "segmenter"
    shutil.copytree(domains["segmenter"], segmenter)
    argv = ["adapt-train", str(target), "--output-dir", str(tmp_path / "out"), "--segmenter", str(segmenter),
            "--anchored-pipeline", "none", "--steps", "2", "--threads", "1",
            "--workflow-args", "--finetune_resolution 16 --finetune_batch_size 2 --tile_size 16 "
                               "--checkpointing_steps 2 --finetune_args '--patches_per_image 2'"]
    with pytest.raises(SystemExit):  # no source data, and the segmenter records no vessel fraction: refused at once
        cli_main(argv)
    assert "records none" in capsys.readouterr().err and not (tmp_path / "out" / "work" / "1-pseudo-labels").exists()
    (segmenter / "training_info.json").write_text(json.dumps({"args": {"training_vessel_fraction": 0.1}}))
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "Adapted segmenter: " in printed and "diffusion      skipped" in printed
    state = json.loads((tmp_path / "out" / "work" / "workflow.json").read_text())
    assert state["method"] == "self-training" and state["steps"]["fine-tune"]["complete"]
    assert (tmp_path / "out" / "segmenter" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (tmp_path / "out" / "anchored").exists()
    record = json.loads((tmp_path / "out" / "segmenter" / "adaptation.json").read_text())
    assert record["args"]["target_data_dir"] == str(target)
    assert cli_main(argv) == 0  # a second run finds every step complete
    again = capsys.readouterr().out
    assert again.count("already complete, skipped") == 5 and "step 4 (fine-tune) ..." not in again
