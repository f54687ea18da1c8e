"""Out-of-fold priors with features, for training a feature-reusing refiner (``PriorFeatureRefinerModel``).

A refiner must learn from priors that look like test-time priors: a segmenter's predictions on its own training
images are too clean. The residual refiner gets them from out-of-fold probability maps. A refiner that reads the
prior's *features* needs more: features of a model that did not see the image, in the feature space of the shipped
prior (another network's channels mean something else). ``training/make_prior_maps.py --folds K --distill_from PRIOR``
makes them: each fold's segmenter (a *student*) is trained without labels to reproduce the shipped prior's decoder
features and probabilities on the other folds' photographs, so on its held-out fold it gives prior-like features of a
photograph it never saw. :class:`FoldPriors` loads those students and, during training, runs on every augmented patch
the student that did not see its photograph.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .models import segmenter_feature_channels, segmenter_features

SUMMARY_FILE = "summary.json"


def _same_folder(first: Union[str, os.PathLike], second: Union[str, os.PathLike]) -> bool:
    return os.path.realpath(first) == os.path.realpath(second)


class FoldPriors:
    """The out-of-fold students of a ``make_prior_maps.py --folds K --distill_from PRIOR`` folder.

    Args:
        folder: the ``--output_dir`` of ``make_prior_maps.py`` (``summary.json`` and ``fold-<k>/unet``).
        prior: the shipped prior's folder (a ``UNet2DModel``); the students must have been distilled from it. None
            accepts the recorded teacher (:attr:`teacher`), for a caller that checks it otherwise.
        stems: the training stems; each must belong to one fold.

    Raises ``ValueError`` (naming the file or the stems) for a folder that is not of that kind.

    Example (needs a folder made by ``make_prior_maps.py``)::

        priors = FoldPriors("runs/prior-students", "runs/vessel-segmenter-chase/unet", stems)
        prior_masks, features = priors(batch["name"], batch["image"])  # q = 2p - 1 and the decoder features
    """

    def __init__(self, folder: Union[str, os.PathLike], prior: Optional[Union[str, os.PathLike]],
                 stems: Sequence[str]):
        from diffusers import UNet2DModel

        self.folder = Path(folder)
        summary_path = self.folder / SUMMARY_FILE
        try:
            summary = json.loads(summary_path.read_text())
            folds = summary["source"]["folds"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ValueError(f"{summary_path} is missing or does not list folds: --prior_folds takes the output "
                             "folder of training/make_prior_maps.py --folds K --distill_from PRIOR.") from None
        teacher = summary["source"].get("distill_from")
        if teacher is None:
            raise ValueError(f"The fold segmenters of {self.folder} were trained on labels, not distilled from a prior "
                             "(no distill_from in summary.json): their features are not the prior's. Make them with "
                             "make_prior_maps.py --distill_from PRIOR.")
        self.teacher = teacher
        if prior is not None and not _same_folder(teacher, prior):
            raise ValueError(f"The fold segmenters of {self.folder} were distilled from {teacher}, not from the prior "
                             f"{prior}: their features would not match it.")
        self.fold_of: Dict[str, int] = {stem: k for k, fold in enumerate(folds) for stem in fold}
        missing = sorted(set(stems) - set(self.fold_of))
        if missing:
            raise ValueError(f"Training images without an out-of-fold student in {self.folder}: {', '.join(missing)}.")
        self.students: List[UNet2DModel] = []
        for k in range(len(folds)):
            path = self.folder / f"fold-{k}" / "unet"
            if not (path / "config.json").is_file():
                raise ValueError(f"No student segmenter {path} (make_prior_maps.py did not finish fold {k}).")
            student = UNet2DModel.from_pretrained(str(path), dtype=torch.float32).eval().requires_grad_(False)
            self.students.append(student)
        self.feature_channels = segmenter_feature_channels(self.students[0])

    def to(self, device) -> "FoldPriors":
        self.students = [student.to(device) for student in self.students]
        return self

    @torch.no_grad()
    def __call__(self, names: Sequence[str], images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(q, features)`` of a batch: ``q = 2p - 1`` ``(N, 1, H, W)`` and the decoder features ``(N, F, H, W)`` of
        each patch's out-of-fold student (float32)."""
        prior_masks = features = None
        folds = torch.tensor([self.fold_of[name] for name in names])
        for k in folds.unique().tolist():
            rows = (folds == k).nonzero().flatten().to(images.device)
            logits, fold_features = segmenter_features(self.students[k], images[rows].float())
            if prior_masks is None:
                prior_masks = images.new_zeros((images.shape[0], 1) + images.shape[-2:], dtype=torch.float32)
                features = images.new_zeros((images.shape[0], fold_features.shape[1]) + images.shape[-2:],
                                            dtype=torch.float32)
            prior_masks[rows] = 2.0 * logits[:, :1].float().sigmoid() - 1.0
            features[rows] = fold_features.float()
        return prior_masks, features
