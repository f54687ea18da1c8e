"""Label-free rules for adapting a vessel segmenter to a folder of unlabelled photographs (``diffusers-retina
adapt-train``, ``training/adaptdiff_workflow.py``).

The user has no labels of the target photographs, so every choice is made by a rule that needs none:

* **Scale** (:func:`working_image`): every target photograph is brought to the source's scale with
  ``processing_resolution="auto"`` (its field of view resized to the diameter the source segmenter learnt at), so the
  pseudo-labels, the painted pairs and the fine-tuning all happen where the source segmenter is at home, and the
  adapted segmenter records the same diameter.
* **Pseudo-label transform** (:func:`choose_transform`): of the candidate intensity transforms (``none``, ``invert``,
  ``histmatch``, ``invert+histmatch``; those needing source photographs only when they are given), the one under
  which the source segmenter marks a vessel fraction of the target's field of view closest, in ratio, to the vessel
  fraction of the source's own training masks (:func:`vessel_fraction`). A transform that leaves the segmenter blind
  (almost nothing marked) or fooled (background marked) is far from it either way.
* **Pseudo-label threshold**: one half by default (the Bayes threshold of a calibrated segmenter; the source
  segmenter's ECE stays near 0.02 on the simulated cameras). Two label-free rules that lower it for a segmenter that
  marks too little are here by name: :func:`mean_probability_threshold` (the folder's marked vessel fraction equals
  its mean probability) and :func:`fraction_matching_threshold` (equals the source's training fraction). On
  development photographs the source had not learnt, both raised recall and lowered precision for pseudo-labels no
  better than one half's on average (worse on wide-angle cameras), and the second assumes a vessel fraction that
  changes with the camera's angle.
* **Confident pixels** (:func:`confident_pixels`): the pseudo-label of a pixel is kept for self-training only where
  the source segmenter puts it on the same side of the threshold in every one of :data:`AGREEMENT_VIEWS` (the
  photograph, its two mirror images, and a darker and a brighter copy): stability under changes that must not
  change the answer. Pixels the views disagree on (typically thin vessels and vessel borders) are left out of the
  loss.

:func:`check_target_folder` refuses a target folder that cannot be adapted to (too few photographs, mixed sizes,
files that are not images) before anything is trained, naming the files.

Example:
    >>> import numpy as np
    >>> views = np.array([[[0.9, 0.6, 0.1]], [[0.8, 0.4, 0.2]]])  # 2 views of a 1x3 image
    >>> label, confident = confident_pixels(views)
    >>> label.tolist(), confident.tolist()
    ([[True, False, False]], [[True, False, True]])
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import PIL.Image

import torch

from .data import SUPPORTED_EXTENSIONS, DataError
from .image_processing import RetinaImageProcessor, plan_processing

#: The fewest target photographs an adaptation trains on (fewer: :func:`check_target_folder` refuses the folder).
MIN_TARGET_IMAGES = 4

#: The views whose agreement marks a confident pseudo-label (:func:`augmented_views`).
AGREEMENT_VIEWS = ("photograph", "flip-left-right", "flip-up-down", "darker", "brighter")

#: The pseudo-label threshold stays within these bounds whatever the vessel fractions say.
THRESHOLD_BOUNDS = (0.1, 0.9)

#: Bins of the probability histogram :func:`fraction_matching_threshold` reads.
HISTOGRAM_BINS = 1000

#: Gamma of the darker and brighter views (applied to [0, 1] intensities).
VIEW_GAMMAS = {"darker": 1.25, "brighter": 0.8}


def check_target_folder(folder, patterns: Optional[str] = None, min_images: int = MIN_TARGET_IMAGES
                        ) -> Dict[str, Path]:
    """``{stem: path}`` of the photographs of a target folder, after checking, before any training, that the folder
    can be adapted to. Raises :class:`~diffusers_retina.data.DataError` naming the files when

    * a file of the folder is not an image (an unsupported extension, or a file PIL cannot identify);
    * fewer than ``min_images`` photographs are left (after ``patterns``, comma-separated stem globs);
    * the photographs do not all have one size (one camera, one size: mixed sizes mean mixed cameras or edited
      copies; each size is listed with its files).

    Example:
        >>> check_target_folder("clinic_photographs/")  # doctest: +SKIP
        {'p001': PosixPath('clinic_photographs/p001.jpg'), ...}
    """
    from fnmatch import fnmatch

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"Target folder '{folder}' is not a folder.")
    not_images: List[str] = []
    sizes: Dict[Tuple[int, int], List[str]] = {}
    found: Dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        if patterns is not None and not any(fnmatch(path.stem, p.strip()) for p in patterns.split(",")):
            continue
        if path.suffix.lower() not in SUPPORTED_EXTENSIONS or path.suffix.lower() == ".npy":
            not_images.append(path.name)
            continue
        try:
            with PIL.Image.open(path) as image:
                size = (image.height, image.width)
        except Exception:  # noqa: BLE001 -- any decoding failure means "not an image"
            not_images.append(path.name)
            continue
        sizes.setdefault(size, []).append(path.name)
        found[path.stem] = path
    if not_images:
        raise DataError(f"Target folder '{folder}' holds files that are not images: {', '.join(not_images)}. "
                        "Move them out (or select the photographs with a stem pattern).")
    if len(found) < min_images:
        raise DataError(f"Target folder '{folder}' has {len(found)} photograph(s)"
                        f"{'' if patterns is None else f' matching {patterns!r}'}; adaptation needs at least "
                        f"{min_images} photographs of the target camera or modality.")
    if len(sizes) > 1:
        listing = "; ".join(f"{h}x{w} (HxW): {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                            for (h, w), names in sorted(sizes.items(), key=lambda item: -len(item[1])))
        raise DataError(f"Target folder '{folder}' mixes photograph sizes -- {listing}. Adapt to one camera at a "
                        "time: put each size in its own folder.")
    return found


def vessel_fraction(mask: np.ndarray, fov: Optional[np.ndarray] = None) -> float:
    """The fraction of the field of view ``fov`` (bool ``(H, W)``; all pixels when None) a binary ``mask`` marks.

    Example:
        >>> vessel_fraction(np.array([[1, 0], [0, 0]]), np.array([[True, True], [False, False]]))
        0.5
    """
    mask = np.asarray(mask) > 0
    fov = np.ones(mask.shape, bool) if fov is None else np.asarray(fov, bool)
    return float(mask[fov].mean()) if fov.any() else 0.0


def choose_transform(fractions: Mapping[str, Sequence[float]], source_fraction: float) -> str:
    """The pseudo-label transform whose predicted vessel fractions (``{transform: [fraction per target image]}``)
    lie closest to ``source_fraction``: the smallest mean absolute log ratio (a fraction of 0 counts as 1e-4).
    Ties go to the earlier transform of ``fractions`` (list ``none`` first: the simplest wins a tie).

    Example:
        >>> choose_transform({"none": [0.03, 0.02], "invert": [0.10, 0.12]}, 0.11)
        'invert'
    """
    if not fractions:
        raise ValueError("choose_transform needs at least one candidate transform.")
    if not source_fraction > 0:
        raise ValueError(f"source_fraction must be > 0, got {source_fraction}.")

    def distance(values: Sequence[float]) -> float:
        return float(np.mean([abs(np.log(max(v, 1e-4) / source_fraction)) for v in values]))

    return min(fractions, key=lambda name: distance(fractions[name]))


def probability_histogram(probability: np.ndarray, fov: Optional[np.ndarray] = None) -> np.ndarray:
    """Counts of ``probability`` values inside ``fov`` in :data:`HISTOGRAM_BINS` equal bins of [0, 1] (add them up
    over a folder for :func:`fraction_matching_threshold`)."""
    values = np.asarray(probability, np.float64)
    values = values if fov is None else values[np.asarray(fov, bool)]
    return np.histogram(np.clip(values, 0.0, 1.0), bins=HISTOGRAM_BINS, range=(0.0, 1.0))[0]


def fraction_matching_threshold(histogram: np.ndarray, source_fraction: float,
                                bounds: Tuple[float, float] = THRESHOLD_BOUNDS) -> float:
    """The threshold above which the pooled ``histogram`` (:func:`probability_histogram`) holds ``source_fraction``
    of its pixels, clipped to ``bounds``: the vessel fraction of the pseudo-labels then matches the source's.

    Example:
        >>> histogram = probability_histogram(np.linspace(0, 1, 1001))
        >>> round(fraction_matching_threshold(histogram, 0.25), 3), fraction_matching_threshold(histogram, 0.01)
        (0.751, 0.9)
    """
    histogram = np.asarray(histogram, np.float64)
    if histogram.sum() <= 0:
        raise ValueError("fraction_matching_threshold needs a non-empty histogram.")
    if not 0.0 < source_fraction < 1.0:
        raise ValueError(f"source_fraction must lie in (0, 1), got {source_fraction}.")
    above = histogram[::-1].cumsum()[::-1] / histogram.sum()  # above[k]: fraction at or above bin k's lower edge
    edges = np.linspace(0.0, 1.0, len(histogram) + 1)[:-1]
    index = int(np.argmax(above <= source_fraction)) if (above <= source_fraction).any() else len(histogram) - 1
    return float(np.clip(edges[index], *bounds))


def histogram_mean(histogram: np.ndarray) -> float:
    """The mean probability of a pooled :func:`probability_histogram` (bin centres)."""
    histogram = np.asarray(histogram, np.float64)
    if histogram.sum() <= 0:
        raise ValueError("histogram_mean needs a non-empty histogram.")
    centres = (np.arange(len(histogram)) + 0.5) / len(histogram)
    return float((histogram * centres).sum() / histogram.sum())


def mean_probability_threshold(histogram: np.ndarray, bounds: Tuple[float, float] = THRESHOLD_BOUNDS) -> float:
    """The threshold above which the pooled ``histogram`` (:func:`probability_histogram`) holds as large a fraction
    of its pixels as its mean probability (:func:`histogram_mean`), clipped to ``bounds``: the pseudo-labels then
    hold the vessel fraction the segmenter's own probabilities expect.

    Example:
        >>> histogram = probability_histogram(np.linspace(0, 1, 1001) ** 3)  # one half would mark 21 %
        >>> round(histogram_mean(histogram), 3), round(mean_probability_threshold(histogram), 3)  # this marks 25 %
        (0.25, 0.422)
    """
    return fraction_matching_threshold(histogram, histogram_mean(histogram), bounds)


def augmented_views(image: np.ndarray) -> Iterable[Tuple[str, np.ndarray, Callable[[np.ndarray], np.ndarray]]]:
    """``(name, view, back)`` for each of :data:`AGREEMENT_VIEWS` of ``image`` (``(H, W, C)`` in [0, 1]): ``back``
    maps a probability map of the view back onto the photograph."""
    def same(array: np.ndarray) -> np.ndarray:
        return array

    def flip_lr(array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array[:, ::-1])

    def flip_ud(array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array[::-1])

    yield "photograph", image, same
    yield "flip-left-right", flip_lr(image), flip_lr
    yield "flip-up-down", flip_ud(image), flip_ud
    for name in ("darker", "brighter"):
        yield name, np.clip(image, 0.0, 1.0) ** VIEW_GAMMAS[name], same


def confident_pixels(views: np.ndarray, threshold: float = 0.5) -> Tuple[np.ndarray, np.ndarray]:
    """``(label, confident)`` from probability maps of several views of one photograph (``(V, H, W)``): the label
    is the mean probability above ``threshold``; a pixel is confident where every view puts it on the same side.

    Example:
        >>> label, confident = confident_pixels(np.array([[[0.7, 0.2]], [[0.9, 0.6]]]))
        >>> label.tolist(), confident.tolist()
        ([[True, False]], [[True, False]])
    """
    views = np.asarray(views)
    above = views > threshold
    return views.mean(axis=0) > threshold, above.all(axis=0) | (~above).all(axis=0)


def uncontradicted_pixels(views: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """The pixels of a painted image that count in fine-tuning: all but those where every view of the source's reading
    (``(V, H, W)`` probabilities, as for :func:`confident_pixels`) puts the pixel on the side opposite its exact
    ``mask`` -- a vessel the painting does not show, or a vessel it shows where the mask has none. Pixels the reading
    agrees with, and pixels its views disagree on (faint or thin vessels), count.

    Example:
        >>> views = np.array([[[0.9, 0.1, 0.6]], [[0.8, 0.2, 0.4]]])
        >>> uncontradicted_pixels(views, np.array([[0, 0, 1]])).tolist()
        [[False, True, True]]
    """
    label, confident = confident_pixels(views, threshold)
    return ~(confident & (label != (np.asarray(mask) > 0)))


def view_probabilities(predict: Callable[[np.ndarray], np.ndarray], image: np.ndarray) -> np.ndarray:
    """``(V, H, W)`` probabilities of :data:`AGREEMENT_VIEWS` of ``image`` by ``predict`` (``(H, W, C)`` in [0, 1]
    -> ``(H, W)`` probabilities), each mapped back onto the photograph."""
    return np.stack([back(predict(view)) for _, view, back in augmented_views(image)])


def working_image(image: np.ndarray, training_diameter: Optional[int], processing_resolution="auto"):
    """``(image, plan)``: the target photograph (``(H, W, C)`` in [0, 1]) at the scale the source segmenter works at
    (:func:`~diffusers_retina.image_processing.plan_processing` with ``processing_resolution``), and the plan.

    Example:
        >>> photo = np.zeros((64, 80, 3)); yy, xx = np.mgrid[:64, :80]
        >>> photo[(yy - 32) ** 2 + (xx - 40) ** 2 < 25 ** 2] = 0.6
        >>> working_image(photo, 98)[0].shape
        (128, 160, 3)
    """
    plan = plan_processing(image, processing_resolution, training_diameter)
    if tuple(plan.size) == tuple(image.shape[:2]):
        return image, plan
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    resized = RetinaImageProcessor.resize(tensor, plan.size)[0].permute(1, 2, 0).numpy()
    return np.clip(resized, 0.0, 1.0), plan


def fit_logit_bias(probabilities: Sequence[np.ndarray], fovs: Sequence[Optional[np.ndarray]], target_fraction: float,
                   bounds: Tuple[float, float] = (-8.0, 8.0)) -> float:
    """The logit bias ``b`` under which the mean probability inside the fields of view of a folder's maps equals
    ``target_fraction`` (the source's vessel fraction): a label-free prior-shift correction,
    ``p' = sigmoid(logit(p) + b)`` (:func:`shift_logits`), found by bisection within ``bounds``.

    Example:
        >>> maps = [np.full((4, 4), 0.05)]
        >>> b = fit_logit_bias(maps, [None], 0.1)
        >>> round(float(shift_logits(maps[0], b).mean()), 4)
        0.1
    """
    if not 0.0 < target_fraction < 1.0:
        raise ValueError(f"target_fraction must lie in (0, 1), got {target_fraction}.")
    values = np.concatenate([np.asarray(p, np.float64)[_region(p, f)] for p, f in zip(probabilities, fovs)])
    if values.size == 0:
        raise ValueError("fit_logit_bias needs at least one pixel inside a field of view.")
    logits = logit(values)
    low, high = bounds
    for _ in range(60):
        middle = (low + high) / 2
        if (1.0 / (1.0 + np.exp(-(logits + middle)))).mean() < target_fraction:
            low = middle
        else:
            high = middle
    return float((low + high) / 2)


def shift_logits(probability: np.ndarray, bias: float) -> np.ndarray:
    """``sigmoid(logit(probability) + bias)`` (:func:`fit_logit_bias`), in the input's dtype."""
    shifted = 1.0 / (1.0 + np.exp(-(logit(np.asarray(probability, np.float64)) + bias)))
    return shifted.astype(np.asarray(probability).dtype if np.asarray(probability).dtype.kind == "f" else np.float64)


def logit(values: np.ndarray) -> np.ndarray:
    """``log(p / (1 - p))`` of probabilities, clipped to [1e-6, 1 - 1e-6] first (maps thresholded at 0 or 1 stay
    finite)."""
    clipped = np.clip(values, 1e-6, 1.0 - 1e-6)
    return np.log(clipped) - np.log1p(-clipped)


def fit_temperature(logits: Sequence[np.ndarray], teacher: Sequence[np.ndarray], fovs: Sequence[Optional[np.ndarray]],
                    bounds: Tuple[float, float] = (0.25, 4.0), max_pixels: int = 2_000_000) -> float:
    """The temperature ``T`` of an adapted segmenter's ``logits`` whose probabilities ``sigmoid(logits / T)`` best
    match (binary cross-entropy, inside the fields of view) the source segmenter's probabilities ``teacher`` on the
    same target photographs: the source's confidence level, which self-training on confident pixels alone loses
    (it sharpens the student). Label-free; thresholding at one half is unchanged by any ``T``.
    Golden-section search over ``log T`` within ``bounds``; at most ``max_pixels`` pixels (an even subsample).

    Example:
        >>> teacher = [np.array([0.2, 0.4, 0.6, 0.8])]
        >>> logits = [3 * np.log(teacher[0] / (1 - teacher[0]))]  # three times too sharp
        >>> round(fit_temperature(logits, teacher, [None]), 2)
        3.0
    """
    z = np.concatenate([np.asarray(z, np.float64)[_region(z, f)] for z, f in zip(logits, fovs)])
    q = np.concatenate([np.asarray(p, np.float64)[_region(p, f)] for p, f in zip(teacher, fovs)])
    if z.size == 0 or z.size != q.size:
        raise ValueError("fit_temperature needs logits and teacher maps of the same, non-empty regions.")
    step = max(1, z.size // max_pixels)
    z, q = z[::step], np.clip(q[::step], 0.0, 1.0)

    def loss(log_t: float) -> float:
        scaled = z / np.exp(log_t)
        # BCE with logits: max(x, 0) - x q + log(1 + exp(-|x|))
        return float(np.mean(np.maximum(scaled, 0) - scaled * q + np.log1p(np.exp(-np.abs(scaled)))))

    low, high = np.log(bounds[0]), np.log(bounds[1])
    ratio = (np.sqrt(5.0) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    for _ in range(60):
        if loss(a) < loss(b):
            high, b = b, a
            a = high - ratio * (high - low)
        else:
            low, a = a, b
            b = low + ratio * (high - low)
    return float(np.exp((low + high) / 2))


def fold_temperature(segmenter, temperature: float):
    """Divide a ``UNet2DModel`` segmenter's output layer (``conv_out``: its logits are linear in it) by
    ``temperature``, in place, so that the saved model carries the calibration (:func:`fit_temperature`)."""
    import torch

    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    with torch.no_grad():
        segmenter.conv_out.weight.div_(temperature)
        if segmenter.conv_out.bias is not None:
            segmenter.conv_out.bias.div_(temperature)
    return segmenter


def _region(array, fov) -> np.ndarray:
    return np.ones(np.shape(array), bool) if fov is None else np.asarray(fov, bool)
