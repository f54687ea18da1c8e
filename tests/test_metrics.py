"""Tests for diffusers_retina.metrics on hand-checked cases and against MONAI's reference implementations."""

import math

import numpy as np
import pytest
import torch

from diffusers_retina.metrics import (
    METRIC_NAMES,
    MetricAccumulator,
    auc_pr,
    auc_roc,
    cldice,
    dice,
    expected_calibration_error,
    hd95,
    iou,
    segmentation_metrics,
)


# 4x4 example: |P| = 5, |L| = 4, |P ∩ L| = 3, |P ∪ L| = 6.
PRED_4X4 = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]])
TARGET_4X4 = np.array([[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]])


def test_dice_iou_by_hand():
    assert dice(PRED_4X4, TARGET_4X4) == pytest.approx(2 * 3 / (5 + 4))
    assert iou(PRED_4X4, TARGET_4X4) == pytest.approx(3 / 6)
    # torch input, bool dtype, gives the same.
    assert dice(torch.from_numpy(PRED_4X4).bool(), torch.from_numpy(TARGET_4X4)) == pytest.approx(2 / 3)


def test_dice_iou_empty_cases_and_batches():
    empty = np.zeros((4, 4), dtype=bool)
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
    assert dice(PRED_4X4, empty) == 0.0 and iou(empty, TARGET_4X4) == 0.0
    batch = dice(np.stack([PRED_4X4, PRED_4X4]), np.stack([TARGET_4X4, PRED_4X4]))
    assert isinstance(batch, np.ndarray) and batch.shape == (2,)
    np.testing.assert_allclose(batch, [2 / 3, 1.0])


def test_inputs_are_validated():
    with pytest.raises(ValueError, match="binary"):
        dice(np.full((4, 4), 0.7), TARGET_4X4)
    with pytest.raises(ValueError, match="same shape"):
        dice(PRED_4X4, TARGET_4X4[:3])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        auc_roc(np.full((4, 4), 1.5), TARGET_4X4)


def test_cldice_lines():
    line = np.zeros((12, 24), dtype=bool)
    line[6, 2:18] = True
    assert cldice(line, line) == 1.0
    # Shifted by one row (a 1-pixel vessel beside the true one): no centreline is recovered.
    assert cldice(np.roll(line, 1, axis=0), line) == 0.0
    # Shifted along itself by half its length: Tprec = Tsens = 8/16.
    assert cldice(np.roll(line, 8, axis=1), line) == pytest.approx(0.5)
    # A thick prediction around a thin vessel: Tsens = 1 and the prediction's skeleton runs inside the
    # vessel's neighbourhood, so clDice stays high while Dice punishes the thickness (2·16 / (48 + 16)).
    thick = np.zeros_like(line)
    thick[5:8, 2:18] = True
    assert dice(thick, line) == pytest.approx(0.5)
    assert cldice(thick, line) > 0.85
    empty = np.zeros_like(line)
    assert cldice(empty, empty) == 1.0 and cldice(line, empty) == 0.0


@pytest.mark.parametrize("offset", [1, 3, 5])
def test_hd95_squares_offset(offset):
    square = np.zeros((40, 40), dtype=bool)
    square[10:30, 10:30] = True
    assert hd95(np.roll(square, offset, axis=1), square) == pytest.approx(offset)
    assert hd95(np.roll(square, offset, axis=0), square) == pytest.approx(offset)


def test_hd95_empty_masks():
    square = np.zeros((10, 10), dtype=bool)
    square[2:5, 2:5] = True
    empty = np.zeros_like(square)
    assert hd95(empty, empty) == 0.0
    assert hd95(square, empty) == math.inf and hd95(empty, square) == math.inf


def test_auc_roc_known_cases():
    target = np.array([[0, 0, 1, 1], [0, 1, 0, 1]])
    separating = np.where(target == 1, 0.8, 0.3) + 0.01 * np.arange(8).reshape(2, 4)
    assert auc_roc(separating, target) == 1.0
    assert auc_roc(1.0 - separating, target) == 0.0
    assert auc_roc(np.full(target.shape, 0.4), target) == 0.5
    assert math.isnan(auc_roc(separating, np.zeros_like(target)))


def _random_scores(seed, size=(12, 15), levels=10):
    """Random probabilities with many ties (quantised) and targets correlated with them."""
    rng = np.random.default_rng(seed)
    prob = np.round(rng.random(size) * levels) / levels
    target = rng.random(size) < 0.2 + 0.6 * prob
    return prob, target


@pytest.mark.parametrize("seed", [0, 1])
def test_auc_roc_equals_pairwise_count_and_monai(seed):
    from monai.metrics import compute_roc_auc

    prob, target = _random_scores(seed)
    positives, negatives = prob[target], prob[~target]
    wins = (positives[:, None] > negatives[None, :]).sum() + 0.5 * (positives[:, None] == negatives[None, :]).sum()
    brute_force = wins / (positives.size * negatives.size)
    assert auc_roc(prob, target) == pytest.approx(brute_force, abs=1e-12)
    reference = compute_roc_auc(torch.from_numpy(prob.ravel()), torch.from_numpy(target.ravel().astype(np.float64)))
    assert auc_roc(prob, target) == pytest.approx(float(reference), abs=1e-12)


def test_average_precision_hand_case_and_monai():
    # Ranked 0.9 (pos), 0.8 (neg), 0.7 (pos), 0.6 (neg): AP = 1/2 · 1 + 1/2 · 2/3.
    assert auc_pr(np.array([[0.9, 0.8, 0.7, 0.6]]), np.array([[1, 0, 1, 0]])) == pytest.approx(5 / 6)
    # A tie between a positive and a negative at the top counts as one threshold: precision 1/2 there.
    assert auc_pr(np.array([[0.9, 0.9, 0.1]]), np.array([[1, 0, 1]])) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    from monai.metrics import compute_average_precision

    prob, target = _random_scores(2)
    reference = compute_average_precision(
        torch.from_numpy(prob.ravel()), torch.from_numpy(target.ravel().astype(np.float64))
    )
    assert auc_pr(prob, target) == pytest.approx(float(reference), abs=1e-12)


def test_expected_calibration_error():
    # Bin [0, 0.5): p = 0.25 with 1 of 4 positive; bin [0.5, 1]: p = 0.75 with 3 of 4 positive -> calibrated.
    prob = np.array([[0.25] * 4 + [0.75] * 4])
    target = np.array([[1, 0, 0, 0, 1, 1, 1, 0]])
    assert expected_calibration_error(prob, target, num_bins=2) == pytest.approx(0.0, abs=1e-7)
    # Hand case: 2 bins, (2/4)·|0.5 - 0.2| + (2/4)·|1.0 - 0.8| = 0.25.
    prob = np.array([[0.2, 0.2, 0.8, 0.8]])
    target = np.array([[0, 1, 1, 1]])
    assert expected_calibration_error(prob, target, num_bins=2) == pytest.approx(0.25, abs=1e-6)
    # With 15 bins, 0.2 and 0.8 still sit in separate bins: same answer.
    assert expected_calibration_error(prob, target) == pytest.approx(0.25, abs=1e-6)
    # Uneven bins weigh by count: (3/4)·|1/3 - 0.1| + (1/4)·|1 - 0.9|.
    prob = np.array([[0.1, 0.1, 0.1, 0.9]])
    target = np.array([[1, 0, 0, 1]])
    assert expected_calibration_error(prob, target, num_bins=2) == pytest.approx(0.75 * (1 / 3 - 0.1) + 0.025)


def test_fov_restricts_every_metric():
    target = np.zeros((16, 16), dtype=bool)
    target[4:12, 6:9] = True
    pred = target.copy()
    pred[0:2, 0:16] = True  # false positives in a band outside the FOV
    prob = np.where(pred, 0.9, 0.05)
    fov = np.ones_like(target)
    fov[0:3] = False
    without = segmentation_metrics(pred, prob, target)
    within = segmentation_metrics(pred, prob, target, fov=fov)
    assert without["dice"] == pytest.approx(2 * 24 / (24 + 56))
    assert without["auc_roc"] < 1.0 and without["hd95"] > 0
    assert within == {
        "dice": 1.0,
        "iou": 1.0,
        "cldice": 1.0,
        "hd95": 0.0,
        "auc_roc": 1.0,
        "auc_pr": 1.0,
        "ece": pytest.approx((24 * 0.1 + 184 * 0.05) / 208, abs=1e-6),  # MONAI bins in float32
    }
    # A FOV that keeps the false positives but cuts the vessel in half: 2·12 / (44 + 12).
    upper_half = np.broadcast_to(np.arange(16)[:, None] < 8, target.shape)
    assert dice(pred, target, fov=upper_half) == pytest.approx(24 / 56)


def test_segmentation_metrics_keys_and_deterministic_prediction():
    target = np.zeros((16, 16), dtype=bool)
    target[4:12, 6:9] = True
    scores = segmentation_metrics(torch.from_numpy(target)[None], None, torch.from_numpy(target)[None])
    assert tuple(scores) == METRIC_NAMES
    assert scores["dice"] == 1.0
    assert all(math.isnan(scores[name]) for name in ("auc_roc", "auc_pr", "ece"))


def _random_case(seed, size=24):
    rng = np.random.default_rng(seed)
    target = np.zeros((size, size), dtype=bool)
    target[rng.integers(2, 8) : rng.integers(14, 22), rng.integers(2, 8) : rng.integers(10, 20)] = True
    prob = np.clip(0.55 * target + 0.45 * rng.random((size, size)), 0, 1)
    pred = prob > 0.5
    fov = np.ones_like(target)
    fov[: rng.integers(0, 4)] = False
    return pred, prob, target, fov


def test_accumulator_summary_and_pooled_values():
    accumulator = MetricAccumulator()
    cases = [_random_case(seed) for seed in range(3)]
    for index, (pred, prob, target, fov) in enumerate(cases):
        accumulator.update(pred, prob, target, fov=fov, name=f"case{index}")
    rows = accumulator.per_image()
    assert [row["name"] for row in rows] == ["case0", "case1", "case2"] and len(accumulator) == 3
    summary = accumulator.summary()
    for metric in METRIC_NAMES:
        values = [row[metric] for row in rows]
        assert summary[f"{metric}_mean"] == pytest.approx(np.mean(values))
        assert summary[f"{metric}_std"] == pytest.approx(np.std(values))
    # Pooled overlap: 2 Σ|P ∩ L| / (Σ|P| + Σ|L|) inside each FOV.
    intersection = sum(np.count_nonzero(p & t & f) for p, _, t, f in cases)
    total = sum(np.count_nonzero(p & f) + np.count_nonzero(t & f) for p, _, t, f in cases)
    assert summary["dice_pooled"] == pytest.approx(2 * intersection / total)
    # Pooled ranking and calibration over all pixels inside the FOVs, as one image.
    all_prob = np.concatenate([prob[fov] for _, prob, _, fov in cases])[None]
    all_target = np.concatenate([target[fov] for _, _, target, fov in cases])[None]
    assert summary["ece_pooled"] == pytest.approx(expected_calibration_error(all_prob, all_target), abs=1e-6)
    # The histogram (1000 bins) only merges probabilities closer than 1e-3.
    assert summary["auc_roc_pooled"] == pytest.approx(auc_roc(all_prob, all_target), abs=2e-3)
    assert summary["auc_pr_pooled"] == pytest.approx(auc_pr(all_prob, all_target), abs=2e-3)
    accumulator.reset()
    assert len(accumulator) == 0 and accumulator.summary()["num_images"] == 0


def test_accumulator_reports_empty_prediction():
    target = np.zeros((12, 12), dtype=bool)
    target[3:9, 5:7] = True
    accumulator = MetricAccumulator()
    accumulator.update(target, None, target)
    accumulator.update(np.zeros_like(target), None, target)  # missed vessel
    summary = accumulator.summary()
    assert summary["dice_mean"] == pytest.approx(0.5) and summary["dice_std"] == pytest.approx(0.5)
    assert summary["hd95_mean"] == math.inf
    assert math.isnan(summary["auc_roc_mean"]) and math.isnan(summary["auc_roc_pooled"])


def test_auc_is_fast_on_a_million_pixels():
    # Not a timing assert: O(N^2) or a per-pixel Python loop would not finish this quickly enough to matter;
    # the check is that one million pixels go through and agree with the pooled histogram estimate.
    rng = np.random.default_rng(0)
    prob = rng.random((1000, 1000))
    target = rng.random((1000, 1000)) < prob
    exact = auc_roc(prob, target)
    # For p ~ U(0,1) and y ~ Bernoulli(p) the AUC is 5/6 (up to sampling noise).
    assert exact == pytest.approx(5 / 6, abs=2e-3)
    accumulator = MetricAccumulator()
    accumulator.update(prob > 0.5, prob, target)
    assert accumulator.summary()["auc_roc_pooled"] == pytest.approx(exact, abs=1e-4)
