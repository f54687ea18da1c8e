"""Tests for diffusers_retina.fusion: mean / majority / STAPLE fusion and uncertainty maps."""

import math

import numpy as np
import pytest
import torch

from diffusers_retina.fusion import fuse_members, staple, uncertainty_maps


def _binary(values):
    """(E, W) list of foreground probabilities -> (1, E, 1, 1, W) tensor."""
    return torch.tensor(values, dtype=torch.float32)[None, :, None, None, :]


# ----------------------------------------------------------------------------------------------- mean, majority


def test_mean_binary_known_answer():
    probs = _binary([[0.9, 0.2, 0.6, 0.4], [0.8, 0.6, 0.1, 0.5], [0.7, 0.7, 0.2, 0.6]])
    mask, fused = fuse_members(probs, method="mean")
    assert mask.shape == (1, 1, 4) and mask.dtype == torch.long
    assert fused.shape == (1, 1, 1, 4)
    torch.testing.assert_close(fused[0, 0, 0], torch.tensor([0.8, 0.5, 0.3, 0.5]))
    # 0.5 is not above the threshold 0.5.
    assert mask[0, 0].tolist() == [1, 0, 0, 0]
    assert fuse_members(probs, method="mean", threshold=0.25)[0][0, 0].tolist() == [1, 1, 1, 1]


def test_majority_binary_known_answer_and_tie_goes_to_background():
    probs = _binary([[0.9, 0.2, 0.6, 0.4], [0.8, 0.6, 0.1, 0.5], [0.7, 0.7, 0.2, 0.6]])
    mask, fused = fuse_members(probs, method="majority")
    torch.testing.assert_close(fused[0, 0, 0], torch.tensor([1.0, 2 / 3, 1 / 3, 1 / 3]))
    assert mask[0, 0].tolist() == [1, 1, 0, 0]
    # Two members, one vote each: a tie is background.
    mask, fused = fuse_members(_binary([[0.9, 0.9], [0.1, 0.8]]), method="majority")
    assert fused[0, 0, 0].tolist() == [0.5, 1.0]
    assert mask[0, 0].tolist() == [0, 1]


def _three_class():
    # (B=1, E=3, C=3, H=1, W=3): per pixel, three members' class probabilities.
    members = [
        [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.3, 0.5]],  # member 0 votes 0, 1, 2
        [[0.5, 0.4, 0.1], [0.3, 0.3, 0.4], [0.1, 0.8, 0.1]],  # member 1 votes 0, 2, 1
        [[0.1, 0.8, 0.1], [0.2, 0.7, 0.1], [0.6, 0.2, 0.2]],  # member 2 votes 1, 1, 0
    ]
    return torch.tensor(members).permute(0, 2, 1)[None, :, :, None, :]


def test_mean_three_class_known_answer():
    mask, fused = fuse_members(_three_class(), method="mean")
    expected = torch.tensor([[13 / 30, 14 / 30, 3 / 30], [0.2, 1.6 / 3, 0.8 / 3], [0.3, 1.3 / 3, 0.8 / 3]]).T
    torch.testing.assert_close(fused[0, :, 0], expected)
    assert mask[0, 0].tolist() == [1, 1, 1]


def test_majority_three_class_known_answer_and_tie_to_lowest_class():
    mask, fused = fuse_members(_three_class(), method="majority")
    # Pixel 0: votes (2, 1, 0); pixel 1: (0, 2, 1); pixel 2: one vote each -> tie -> class 0.
    expected = torch.tensor([[2, 1, 0], [0, 2, 1], [1, 1, 1]], dtype=torch.float32).T / 3
    torch.testing.assert_close(fused[0, :, 0], expected)
    assert mask[0, 0].tolist() == [0, 1, 0]


def test_unknown_method_raises():
    with pytest.raises(ValueError, match=r"method.*'mean', 'majority', 'staple'"):
        fuse_members(_binary([[0.5]]), method="median")


def test_staple_fusion_outputs():
    probs = _binary([[0.9, 0.2, 0.6, 0.4], [0.8, 0.6, 0.1, 0.5], [0.7, 0.7, 0.2, 0.6]])
    mask, fused = fuse_members(probs, method="staple")
    assert mask.shape == (1, 1, 4) and fused.shape == (1, 1, 1, 4)
    decisions = (probs[:, :, 0] > 0.5).long()
    torch.testing.assert_close(fused[:, 0], staple(decisions).posterior[:, 1])
    assert torch.equal(mask, (fused[:, 0] > 0.5).long())
    mask3, fused3 = fuse_members(_three_class(), method="staple")
    assert fused3.shape == (1, 3, 1, 3)
    torch.testing.assert_close(fused3.sum(dim=1), torch.ones(1, 1, 3))
    assert torch.equal(mask3, fused3.argmax(dim=1))


# -------------------------------------------------------------------------------------------------- uncertainty


def test_uncertainty_members_agree_is_zero():
    maps = uncertainty_maps(_binary([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0]]))
    for name in ("variance", "entropy", "mutual_information"):
        assert maps[name].shape == (1, 1, 3)
        assert torch.all(maps[name] == 0), name


def test_uncertainty_disagreeing_members():
    maps = uncertainty_maps(_binary([[0.0], [1.0]]))
    assert maps["variance"].item() == pytest.approx(0.25)
    assert maps["entropy"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert maps["mutual_information"].item() == pytest.approx(math.log(2), abs=1e-6)


def test_uncertainty_members_all_unsure():
    maps = uncertainty_maps(_binary([[0.5], [0.5], [0.5]]))
    assert maps["variance"].item() == 0
    assert maps["entropy"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert maps["mutual_information"].item() == pytest.approx(0.0, abs=1e-7)


def test_uncertainty_three_class():
    # Two one-hot members on different classes: per-class variances 0.25 + 0.25 + 0.
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])[None, :, :, None, None]
    maps = uncertainty_maps(probs)
    assert maps["variance"].item() == pytest.approx(0.5)
    assert maps["entropy"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert maps["mutual_information"].item() == pytest.approx(math.log(2), abs=1e-6)
    uniform = torch.full((1, 4, 3, 1, 1), 1 / 3)
    assert uncertainty_maps(uniform)["entropy"].item() == pytest.approx(math.log(3), abs=1e-6)
    assert uncertainty_maps(uniform)["mutual_information"].item() == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------------------------- STAPLE

MISS_RATES = (0.01, 0.08, 0.16, 0.25, 0.35)
FALSE_ALARM_RATES = (0.01, 0.03, 0.06, 0.1, 0.15)


def _blob_raters(seed, size=32, miss_rates=MISS_RATES, false_alarm_rates=FALSE_ALARM_RATES):
    """A random blob mask and noisy copies with per-rater miss / false-alarm rates -> (truth, (E, H, W) uint8)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    truth = np.zeros((size, size), dtype=bool)
    for _ in range(4):
        cy, cx = rng.integers(4, size - 4, 2)
        radius = rng.integers(3, 8)
        truth |= (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    raters = []
    for miss, false_alarm in zip(miss_rates, false_alarm_rates):
        rater = truth.copy()
        rater[truth & (rng.random(truth.shape) < miss)] = False
        rater[~truth & (rng.random(truth.shape) < false_alarm)] = True
        raters.append(rater.astype(np.uint8))
    return truth, np.stack(raters)


def _sitk_staple(raters):
    sitk = pytest.importorskip("SimpleITK")
    stapler = sitk.STAPLEImageFilter()
    stapler.SetForegroundValue(1.0)
    # Defaults: prior = mean of the decisions, ConfidenceWeight 1, no iteration cap, stops at |Δp|,|Δq| <= 1e-7.
    output = stapler.Execute([sitk.GetImageFromArray(rater) for rater in raters])
    return sitk.GetArrayFromImage(output), np.array(stapler.GetSensitivity()), np.array(stapler.GetSpecificity())


@pytest.mark.parametrize("seed", [0, 1])
def test_staple_matches_simpleitk(seed):
    _, raters = _blob_raters(seed)
    reference, sensitivity, specificity = _sitk_staple(raters)
    decisions = torch.from_numpy(raters).long()[None]
    # Same stopping rule as ITK. What is left is our clamp of theta into [1e-6, 1 - 1e-6] inside the logs
    # (seed 1 has a rater with sensitivity 1 - 2e-7): measured 2e-8 (seed 0) and 5e-5 (seed 1).
    result = staple(decisions, tolerance=1e-7, max_iterations=1000)
    assert np.abs(result.posterior[0, 1].numpy() - reference).max() < 1e-4
    np.testing.assert_allclose(result.sensitivity[0].numpy(), sensitivity, atol=1e-6)
    np.testing.assert_allclose(result.specificity[0].numpy(), specificity, atol=1e-6)
    # Library defaults (tolerance 1e-6) stay well within 1e-3.
    default = staple(decisions)
    assert np.abs(default.posterior[0, 1].numpy() - reference).max() < 1e-3
    # The posterior is not just the vote: STAPLE weights raters by their performance.
    assert np.abs(reference - raters.mean(axis=0)).max() > 0.1
    # The paper's initialisation (p = q = 0.99) reaches the same fixed point.
    diagonal = staple(decisions, init="diagonal", tolerance=1e-7, max_iterations=1000)
    assert np.abs(diagonal.posterior[0, 1].numpy() - reference).max() < 1e-4


def test_staple_ranks_raters():
    _, raters = _blob_raters(seed=3, size=64)
    result = staple(torch.from_numpy(raters).long()[None])
    # Raters were made with increasing miss and false-alarm rates.
    assert result.sensitivity[0].argsort(descending=True).tolist() == [0, 1, 2, 3, 4]
    assert result.specificity[0].argsort(descending=True).tolist() == [0, 1, 2, 3, 4]
    expected_sensitivity = 1 - torch.tensor(MISS_RATES, dtype=torch.float64)
    torch.testing.assert_close(result.sensitivity[0], expected_sensitivity, atol=0.06, rtol=0)
    # The confusion columns are distributions over the observed label.
    torch.testing.assert_close(result.confusion.sum(dim=2), torch.ones(1, 5, 2, dtype=torch.float64))


def test_staple_batched_equals_single():
    decisions = torch.stack([torch.from_numpy(_blob_raters(seed)[1]).long() for seed in (4, 5, 6)])
    batched = staple(decisions)
    for index in range(3):
        single = staple(decisions[index : index + 1])
        torch.testing.assert_close(batched.posterior[index], single.posterior[0], atol=1e-7, rtol=0)
        torch.testing.assert_close(batched.confusion[index], single.confusion[0], atol=1e-10, rtol=0)
        torch.testing.assert_close(batched.sensitivity[index], single.sensitivity[0])


def test_staple_unanimous_raters_and_user_prior():
    truth = torch.zeros(1, 1, 6, 6, dtype=torch.long)
    truth[..., 1:4, 2:5] = 1
    result = staple(truth.repeat(1, 4, 1, 1))
    torch.testing.assert_close(result.posterior[:, 1], truth[:, 0].float(), atol=1e-4, rtol=0)
    assert result.prior[0, 1].item() == pytest.approx(9 / 36)
    # A user prior is used as given (a scalar is the foreground prior).
    decisions = torch.tensor([[1, 1, 0], [1, 0, 0]]).view(1, 2, 1, 3)
    fixed = staple(decisions, prior=0.3, max_iterations=0)
    torch.testing.assert_close(fixed.prior, torch.tensor([[0.7, 0.3]], dtype=torch.float64))
    low, high = staple(decisions, prior=0.05), staple(decisions, prior=0.95)
    assert (low.posterior[:, 1] <= high.posterior[:, 1] + 1e-6).all()
    with pytest.raises(ValueError, match="prior"):
        staple(decisions, prior=[0.2, 0.3, 0.5])


def test_staple_rejects_bad_decisions():
    with pytest.raises(ValueError, match="num_classes"):
        staple(torch.full((1, 2, 3, 3), 2), num_classes=2)
    with pytest.raises(TypeError):
        staple(torch.rand(1, 2, 3, 3))


def test_staple_three_class_matches_simpleitk():
    sitk = pytest.importorskip("SimpleITK")
    rng = np.random.default_rng(7)
    num_classes = 3
    yy, xx = np.mgrid[:48, :48]
    truth = np.zeros((48, 48), dtype=np.int64)
    truth[(yy - 20) ** 2 + (xx - 18) ** 2 < 100] = 1
    truth[yy + xx > 70] = 2
    raters = []
    for flip_rate in (0.05, 0.1, 0.2, 0.3, 0.4):
        rater = truth.copy()
        flip = rng.random(truth.shape) < flip_rate
        rater[flip] = rng.integers(0, num_classes, flip.sum())
        raters.append(rater.astype(np.uint8))
    stapler = sitk.MultiLabelSTAPLEImageFilter()
    stapler.SetTerminationUpdateThreshold(1e-7)
    labels = sitk.GetArrayFromImage(stapler.Execute([sitk.GetImageFromArray(rater) for rater in raters]))
    result = staple(torch.from_numpy(np.stack(raters)).long()[None], num_classes=num_classes, tolerance=1e-8)
    ours = result.posterior[0].argmax(dim=0).numpy()
    decided = labels != num_classes  # SimpleITK marks ties with label K
    assert decided.mean() > 0.99
    assert np.array_equal(ours[decided], labels[decided])
    for rater in range(len(raters)):
        # SimpleITK's matrix has an extra "reject" row (observed label K) that stays empty here.
        reference = np.array(stapler.GetConfusionMatrix(rater)).reshape(num_classes + 1, num_classes)
        np.testing.assert_allclose(result.confusion[0, rater].numpy(), reference[:num_classes], atol=1e-5)
    assert result.sensitivity is None and result.specificity is None
    torch.testing.assert_close(result.posterior.sum(dim=1), torch.ones(1, 48, 48))
    # The posterior beats the noisiest rater by far.
    assert (ours == truth).mean() > (raters[-1] == truth).mean() + 0.1
