"""Fusion of ensemble members into one segmentation, and per-pixel uncertainty maps.

Conventions (DESIGN §3/§4):

* ``member_probs`` is a float tensor ``(B, E, C, H, W)``: ``B`` images, ``E`` ensemble members.
  ``C == 1`` is binary (the channel is the foreground probability); ``C == K >= 2`` holds K-class
  probabilities that sum to one over ``C``.
* Masks are class indices ``(B, H, W)`` of dtype ``torch.long`` (binary: 0/1).

Three fusion rules are offered by :func:`fuse_members`: the mean of the members' probabilities,
a per-pixel majority vote, and STAPLE (:func:`staple`), the EM estimate of the true segmentation
and of each member's performance of Warfield, Zou & Wells, IEEE TMI 23(7), 2004.
:func:`uncertainty_maps` gives the member variance, the predictive entropy and the mutual information
(the epistemic part of the entropy) per pixel.

Libraries checked: SimpleITK/ITK has STAPLE (binary and multi-label) but works on one image at a time,
on CPU, and is only a test dependency here; MONAI has no STAPLE. So STAPLE is written here in batched
torch and tested against SimpleITK.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F


__all__ = ["FUSION_METHODS", "StapleResult", "fuse_members", "staple", "uncertainty_maps"]

FUSION_METHODS: Tuple[str, ...] = ("mean", "majority", "staple")

# Rater confusion entries are clamped into [eps, 1 - eps] only where their logarithm is taken, so that a
# rater that looks perfect on the current estimate cannot veto a class with log(0) = -inf. ITK uses the
# unclamped values; this clamp is the one source of differences from SimpleITK beyond the stopping rule
# (about 5e-5 in the posterior when a rater's sensitivity is within 1e-6 of one).
_THETA_EPS = 1e-6


def _check_member_probs(member_probs: torch.Tensor) -> None:
    if not isinstance(member_probs, torch.Tensor):
        raise TypeError(f"`member_probs` must be a torch.Tensor, got {type(member_probs).__name__}.")
    if member_probs.ndim != 5:
        raise ValueError(
            "`member_probs` must have shape (B, E, C, H, W) (batch, ensemble members, channels, height, width), "
            f"got shape {tuple(member_probs.shape)}."
        )
    if not member_probs.is_floating_point():
        raise TypeError(f"`member_probs` must be a floating point tensor, got dtype {member_probs.dtype}.")
    if member_probs.shape[1] < 1:
        raise ValueError("`member_probs` needs at least one ensemble member (E >= 1).")


def _hard_decisions(member_probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Each member's label map ``(B, E, H, W)``: ``p > threshold`` for binary input, argmax over C otherwise."""
    if member_probs.shape[2] == 1:
        return (member_probs[:, :, 0] > threshold).long()
    return member_probs.argmax(dim=2)


def fuse_members(
    member_probs: torch.Tensor, method: str = "mean", threshold: float = 0.5
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fuse ensemble members into one mask and one probability map per image.

    Args:
        member_probs: ``(B, E, C, H, W)`` member probabilities; ``C == 1`` is binary (foreground probability),
            ``C >= 2`` are class probabilities.
        method: ``"mean"`` (average the probabilities), ``"majority"`` (vote of the members' hard decisions;
            probabilities are vote fractions; binary ties go to background, multi-class ties to the lowest class
            index) or ``"staple"`` (STAPLE on the members' hard decisions; probabilities are the STAPLE
            posterior, see :func:`staple`).
        threshold: binary decision threshold, a pixel is foreground when ``p > threshold``. Used for the members'
            hard decisions (``"majority"``, ``"staple"``) and for the fused mask (``"mean"``, ``"staple"``).
            Ignored for ``C >= 2`` (argmax).

    Returns:
        ``(mask, probabilities)``: ``mask`` is ``(B, H, W)`` long, ``probabilities`` is ``(B, C, H, W)`` with the
        dtype of ``member_probs``.

    Example:
        >>> probs = torch.tensor([0.9, 0.6, 0.2]).view(1, 3, 1, 1, 1)  # one pixel, three members
        >>> mask, fused = fuse_members(probs, method="mean")
        >>> mask.tolist(), round(fused.item(), 4)
        ([[[1]]], 0.5667)
        >>> round(fuse_members(probs, method="majority")[1].item(), 4)  # two of three members vote foreground
        0.6667
    """
    _check_member_probs(member_probs)
    if method not in FUSION_METHODS:
        choices = ", ".join(map(repr, FUSION_METHODS))
        raise ValueError(f"Unknown fusion `method`={method!r}; valid choices are {choices}.")
    num_channels = member_probs.shape[2]
    binary = num_channels == 1

    if method == "mean":
        probabilities = member_probs.mean(dim=1)
        mask = (probabilities[:, 0] > threshold).long() if binary else probabilities.argmax(dim=1)
        return mask, probabilities

    decisions = _hard_decisions(member_probs, threshold)  # (B, E, H, W)
    if method == "majority":
        if binary:
            fraction = decisions.to(member_probs.dtype).mean(dim=1)  # (B, H, W)
            # Strictly more than half: an even split is background.
            return (fraction > 0.5).long(), fraction.unsqueeze(1)
        votes = F.one_hot(decisions, num_channels).sum(dim=1).permute(0, 3, 1, 2)  # (B, C, H, W) counts
        # torch.argmax returns the first maximum, so ties go to the lowest class index.
        mask = votes.argmax(dim=1)
        return mask, votes.to(member_probs.dtype) / member_probs.shape[1]

    # method == "staple"
    result = staple(decisions, num_classes=2 if binary else num_channels)
    posterior = result.posterior.to(member_probs.dtype)
    if binary:
        foreground = posterior[:, 1:2]
        return (foreground[:, 0] > threshold).long(), foreground
    return posterior.argmax(dim=1), posterior


@dataclass
class StapleResult:
    """Output of :func:`staple`.

    Attributes:
        posterior: ``(B, K, H, W)`` posterior probability of each true class per pixel.
        confusion: ``(B, E, K, K)`` estimated rater confusion matrices ``theta[b, j, observed, true]``;
            every column sums to one.
        sensitivity: ``(B, E)`` true-positive fraction ``theta[..., 1, 1]`` of each rater (binary only, else None).
        specificity: ``(B, E)`` true-negative fraction ``theta[..., 0, 0]`` of each rater (binary only, else None).
        prior: ``(B, K)`` class prior used (fixed during EM).
        iterations: EM iterations run (the largest over the batch; converged images stop updating).
    """

    posterior: torch.Tensor
    confusion: torch.Tensor
    sensitivity: Optional[torch.Tensor]
    specificity: Optional[torch.Tensor]
    prior: torch.Tensor
    iterations: int


def _staple_prior(
    prior: Union[None, float, Sequence[float], torch.Tensor],
    default: torch.Tensor,
    num_classes: int,
) -> torch.Tensor:
    """Class prior ``(B, K)`` in float64: ``default`` (the mean of the decisions) unless the user gives one."""
    batch_size = default.shape[0]
    if prior is None:
        return default
    if isinstance(prior, (int, float)) and not isinstance(prior, bool):
        if num_classes != 2:
            raise ValueError("A scalar `prior` (foreground probability) is only valid for num_classes=2.")
        prior_tensor = torch.tensor([1.0 - float(prior), float(prior)], dtype=torch.float64)
    else:
        prior_tensor = torch.as_tensor(prior, dtype=torch.float64)
    prior_tensor = prior_tensor.to(default.device)
    if prior_tensor.ndim == 1:
        prior_tensor = prior_tensor.unsqueeze(0).expand(batch_size, -1)
    if prior_tensor.shape != (batch_size, num_classes):
        raise ValueError(
            f"`prior` must be a float (binary), or have shape ({num_classes},) or ({batch_size}, {num_classes}); "
            f"got shape {tuple(prior_tensor.shape)}."
        )
    if (prior_tensor < 0).any() or not (prior_tensor.sum(dim=1) > 0).all():
        raise ValueError("`prior` must be non-negative with a positive sum per image.")
    return prior_tensor / prior_tensor.sum(dim=1, keepdim=True)


def _diagonal_confusion(batch_size: int, num_raters: int, num_classes: int, value: float, device) -> torch.Tensor:
    """Confusion matrices with ``value`` on the diagonal and the rest spread evenly over the other classes."""
    off_diagonal = (1.0 - value) / (num_classes - 1)
    theta = torch.full((num_classes, num_classes), off_diagonal, dtype=torch.float64, device=device)
    theta.fill_diagonal_(value)
    return theta.expand(batch_size, num_raters, num_classes, num_classes).clone()


def _staple_e_step(one_hot: torch.Tensor, theta: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """W[b, s, u] ∝ prior[s] · prod_j theta_j[D_uj, s] for every unit u (pixel or decision pattern), in log space."""
    log_theta = theta.clamp(_THETA_EPS, 1.0 - _THETA_EPS).log()
    # sum_j log theta_j[D_uj, s]: the one-hot decisions pick the row of the observed label.
    log_likelihood = torch.einsum("bjku,bjks->bsu", one_hot, log_theta)
    return torch.softmax(log_likelihood + log_prior.unsqueeze(-1), dim=1)


def _staple_m_step(
    one_hot: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor, fallback: torch.Tensor
) -> torch.Tensor:
    """theta_j[s', s] = sum_i W[i, s] [D_ij = s'] / sum_i W[i, s] (units weighted by how many pixels they stand for).

    A true class without posterior mass keeps its ``fallback`` column.
    """
    mass = weights * counts.unsqueeze(1)  # (B, K, U)
    numerator = torch.einsum("bjku,bsu->bjks", one_hot, mass)
    denominator = mass.sum(dim=-1)[:, None, None, :]  # (B, 1, 1, K)
    has_mass = denominator > 0
    theta = numerator / torch.where(has_mass, denominator, torch.ones_like(denominator))
    return torch.where(has_mass, theta, fallback)


def _decision_units(
    flat: torch.Tensor, num_classes: int
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The units EM runs over: ``(one_hot (B, E, K, U), counts (B, U), codes (B, N) or None)``.

    STAPLE's posterior at a pixel depends only on the pattern of decisions there, so when there are no more
    possible patterns (K^E) than pixels, EM runs over the patterns weighted by their pixel counts (exactly the
    same sums, far less work); ``codes`` maps each pixel back to its pattern. Otherwise the units are the pixels.
    """
    batch_size, num_raters, num_pixels = flat.shape
    num_patterns = num_classes**num_raters
    if num_patterns > max(num_pixels, 1):
        one_hot = F.one_hot(flat, num_classes).permute(0, 1, 3, 2).to(torch.float64)
        counts = torch.ones(batch_size, num_pixels, dtype=torch.float64, device=flat.device)
        return one_hot, counts, None
    place_values = num_classes ** torch.arange(num_raters, device=flat.device)
    codes = (flat * place_values[None, :, None]).sum(dim=1)  # (B, N) pattern index per pixel
    offsets = torch.arange(batch_size, device=flat.device)[:, None] * num_patterns
    counts = torch.bincount((codes + offsets).reshape(-1), minlength=batch_size * num_patterns)
    counts = counts.reshape(batch_size, num_patterns).to(torch.float64)
    patterns = torch.arange(num_patterns, device=flat.device)[None, :] // place_values[:, None] % num_classes
    one_hot = F.one_hot(patterns, num_classes).permute(0, 2, 1).to(torch.float64)  # (E, K, P)
    return one_hot.unsqueeze(0).expand(batch_size, -1, -1, -1), counts, codes


def staple(
    decisions: torch.Tensor,
    num_classes: int = 2,
    max_iterations: int = 100,
    tolerance: float = 1e-6,
    prior: Union[None, float, Sequence[float], torch.Tensor] = None,
    init: str = "votes",
    init_value: float = 0.99,
) -> StapleResult:
    """STAPLE (Warfield, Zou & Wells, IEEE TMI 23(7) 2004), batched over images, for binary and multi-class labels.

    Each rater ``j`` has a confusion matrix ``theta_j[observed, true]``. EM alternates

    * E-step: ``W[i, s] ∝ prior[s] · prod_j theta_j[D_ij, s]`` (in log space),
    * M-step: ``theta_j[s', s] = sum_i W[i, s]·[D_ij = s'] / sum_i W[i, s]``,

    with the class prior fixed, until the largest change of any ``theta`` entry is below ``tolerance``
    (each image stops on its own, so a batch gives the same result as its images run one by one).
    For binary labels the sensitivity is ``p_j = theta_j[1, 1]`` and the specificity ``q_j = theta_j[0, 0]``.

    Defaults follow SimpleITK's ``STAPLEImageFilter`` (ITK), so that binary results match it:
    the prior is the mean of all rater decisions per image, and EM starts (``init="votes"``) from the soft
    vote ``W = mean_j [D_ij = s]`` with an M-step, instead of the paper's start at ``p = q = 0.99``.
    ``init="diagonal"`` starts from confusion matrices with ``init_value`` on the diagonal (the paper's
    ``p = q = init_value`` for binary labels). ITK stops when every ``|Δp|, |Δq| <= 1e-7``; pass
    ``tolerance=1e-7`` (and a large ``max_iterations``; ITK has no cap) for the same stopping rule.
    Unlike ITK, ``theta`` is clamped into ``[1e-6, 1 - 1e-6]`` inside the logarithms, so a seemingly
    perfect rater cannot veto a class outright. (SimpleITK's
    ``MultiLabelSTAPLE`` instead starts from majority-vote confusion matrices; on well-posed inputs both reach
    the same fixed point.)

    Args:
        decisions: ``(B, E, H, W)`` integer labels in ``[0, num_classes)`` from ``E`` raters.
        num_classes: number of classes ``K`` (2 for binary foreground/background).
        max_iterations: upper bound on EM iterations.
        tolerance: stop when ``max |theta_new - theta_old| < tolerance``.
        prior: class prior; ``None`` (mean of the decisions per image), a float (binary foreground prior),
            or a ``(K,)`` / ``(B, K)`` tensor or sequence.
        init: ``"votes"`` (default, as ITK) or ``"diagonal"`` (as the paper).
        init_value: diagonal of the initial confusion matrices for ``init="diagonal"``.

    Returns:
        A :class:`StapleResult` (posterior ``(B, K, H, W)`` float32, confusion ``(B, E, K, K)`` float64, ...).

    Example:
        >>> truth = torch.zeros(1, 8, 8, dtype=torch.long); truth[:, 2:6, 2:6] = 1
        >>> raters = truth.unsqueeze(1).repeat(1, 3, 1, 1)  # (1, 3, 8, 8)
        >>> raters[0, 2, 0, 0] = 1  # the third rater adds one false positive
        >>> result = staple(raters)
        >>> result.posterior.shape, bool(result.posterior[0, 1, 0, 0] < 0.5)
        (torch.Size([1, 2, 8, 8]), True)
        >>> result.specificity[0].argmin().item()  # the least specific rater is found
        2
    """
    if not isinstance(decisions, torch.Tensor):
        raise TypeError(f"`decisions` must be a torch.Tensor, got {type(decisions).__name__}.")
    if decisions.ndim != 4:
        raise ValueError(f"`decisions` must have shape (B, E, H, W), got shape {tuple(decisions.shape)}.")
    if decisions.is_floating_point() or decisions.is_complex():
        raise TypeError(f"`decisions` must hold integer labels, got dtype {decisions.dtype}.")
    if num_classes < 2:
        raise ValueError(f"`num_classes` must be >= 2, got {num_classes}.")
    if init not in ("votes", "diagonal"):
        raise ValueError(f"Unknown `init`={init!r}; valid choices are 'votes', 'diagonal'.")
    if not 0.0 < init_value < 1.0:
        raise ValueError(f"`init_value` must lie in (0, 1), got {init_value}.")
    decisions = decisions.long()
    if decisions.numel() and (decisions.min() < 0 or decisions.max() >= num_classes):
        raise ValueError(
            f"`decisions` must lie in [0, num_classes={num_classes}), found [{decisions.min()}, {decisions.max()}]."
        )

    batch_size, num_raters, height, width = decisions.shape
    device = decisions.device
    flat = decisions.reshape(batch_size, num_raters, height * width)
    one_hot, counts, codes = _decision_units(flat, num_classes)
    votes = one_hot.mean(dim=1)  # (B, K, U) soft vote of the raters
    # Default prior, as in the paper and in ITK/SimpleITK: the fraction of all decisions that chose each class.
    decision_fractions = (votes * counts.unsqueeze(1)).sum(dim=-1) / counts.sum(dim=-1, keepdim=True).clamp_min(1)
    prior_probs = _staple_prior(prior, decision_fractions, num_classes)
    log_prior = prior_probs.log()  # a class with zero prior gets posterior 0 (log 0 = -inf is fine in softmax)

    theta = _diagonal_confusion(batch_size, num_raters, num_classes, init_value, device)
    if init == "votes":
        weights = votes  # theta above only serves as fallback for classes without posterior mass
        previous_valid = False
    else:
        weights = _staple_e_step(one_hot, theta, log_prior)
        previous_valid = True

    active = torch.ones(batch_size, dtype=torch.bool, device=device)
    iterations = 0
    for _ in range(max_iterations):
        new_theta = _staple_m_step(one_hot, weights, counts, theta)
        new_weights = _staple_e_step(one_hot, new_theta, log_prior)
        if previous_valid:
            change = (new_theta - theta).abs().amax(dim=(1, 2, 3))
        else:
            change = torch.full((batch_size,), math.inf, dtype=torch.float64, device=device)
        # Images that converged earlier keep their parameters, so batching does not change any result.
        theta = torch.where(active[:, None, None, None], new_theta, theta)
        weights = torch.where(active[:, None, None], new_weights, weights)
        previous_valid = True
        iterations += 1
        active = active & ~(change < tolerance)
        if not bool(active.any()):
            break

    if codes is not None:  # back from decision patterns to pixels
        weights = weights.gather(2, codes.unsqueeze(1).expand(-1, num_classes, -1))
    posterior = weights.reshape(batch_size, num_classes, height, width).to(torch.float32)
    binary = num_classes == 2
    return StapleResult(
        posterior=posterior,
        confusion=theta,
        sensitivity=theta[:, :, 1, 1].clone() if binary else None,
        specificity=theta[:, :, 0, 0].clone() if binary else None,
        prior=prior_probs,
        iterations=iterations,
    )


def _binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """Bernoulli entropy in nats; ``xlogy`` makes ``0 · log 0 = 0``."""
    return -(torch.xlogy(p, p) + torch.xlogy(1.0 - p, 1.0 - p))


def _categorical_entropy(p: torch.Tensor, dim: int) -> torch.Tensor:
    return -torch.xlogy(p, p).sum(dim=dim)


def uncertainty_maps(member_probs: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-pixel uncertainty of an ensemble: variance, predictive entropy and mutual information.

    * ``"variance"``: variance across members (population variance, ``1/E``) of the foreground probability
      (``C == 1``), or summed over classes (``C >= 2``).
    * ``"entropy"``: predictive entropy ``H(mean_e p_e)`` in nats (Bernoulli over ``{p, 1 - p}`` for ``C == 1``).
    * ``"mutual_information"``: ``H(mean_e p_e) - mean_e H(p_e)``, clamped at 0 (disagreement between members).

    Args:
        member_probs: ``(B, E, C, H, W)`` member probabilities.

    Returns:
        Dict with the three maps, each ``(B, H, W)`` with the dtype of ``member_probs``.

    Example:
        >>> probs = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1, 1)  # two members disagree completely
        >>> maps = uncertainty_maps(probs)
        >>> maps["variance"].item(), round(maps["entropy"].item(), 4), round(maps["mutual_information"].item(), 4)
        (0.25, 0.6931, 0.6931)
    """
    _check_member_probs(member_probs)
    probs = member_probs.clamp(0.0, 1.0)
    mean_probs = probs.mean(dim=1)  # (B, C, H, W)
    if probs.shape[2] == 1:
        foreground = probs[:, :, 0]  # (B, E, H, W)
        variance = foreground.var(dim=1, unbiased=False)
        entropy = _binary_entropy(mean_probs[:, 0])
        expected_entropy = _binary_entropy(foreground).mean(dim=1)
    else:
        variance = probs.var(dim=1, unbiased=False).sum(dim=1)
        entropy = _categorical_entropy(mean_probs, dim=1)
        expected_entropy = _categorical_entropy(probs, dim=2).mean(dim=1)
    mutual_information = (entropy - expected_entropy).clamp_min(0.0)
    return {"variance": variance, "entropy": entropy, "mutual_information": mutual_information}
