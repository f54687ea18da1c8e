"""The five steps of ``training/adaptdiff_workflow.py`` (pseudo-labels, diffusion, synthesis, fine-tune, calibrate)
and the file helpers they share. Each step takes the workflow's parsed arguments and its ``work_dir``, writes its
output beside its final place and moves it in when complete, and returns the details the workflow records in
``workflow.json``."""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import PIL.Image
import torch


def _stems(folder: Path, patterns: Optional[str], suffix: str = "") -> Dict[str, Path]:
    """``{stem: path}`` of the image files in ``folder`` whose stem (``suffix`` removed) matches ``patterns``."""
    from fnmatch import fnmatch

    from diffusers_retina.data import SUPPORTED_EXTENSIONS

    found = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in SUPPORTED_EXTENSIONS:
            continue
        stem = path.stem[: -len(suffix)] if suffix and path.stem.endswith(suffix) else path.stem
        if patterns is None or any(fnmatch(stem, p.strip()) for p in patterns.split(",")):
            found[stem] = path
    if not found:
        raise SystemExit(f"No images{'' if patterns is None else f' matching {patterns!r}'} in '{folder}'.")
    return found


def _fresh_folder(path: Path) -> Path:
    """An empty ``<path>.partial`` folder (a leftover of a killed run is removed)."""
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def _move_in(partial: Path, final: Path) -> None:
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)


def _save_png(array: np.ndarray, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    PIL.Image.fromarray(array).save(temporary, format="PNG")
    os.replace(temporary, path)


def _read_unit_image(path: Path) -> np.ndarray:
    from diffusers_retina.data import read_image

    array = read_image(path, 3)
    return array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)


def load_segmenter(path: str):
    from diffusers import UNet2DModel

    return UNet2DModel.from_pretrained(path, use_safetensors=True, torch_dtype=torch.float32).eval()


def probability_map(segmenter, image: np.ndarray, tile_size: int) -> np.ndarray:
    """The segmenter's ``(H, W)`` vessel probabilities of one ``(H, W, C)`` image in [0, 1] (``tile_size`` windows):
    steps 1, 3 and 5 read photographs and paintings with it."""
    from diffusers_retina.image_processing import prepare_images
    from diffusers_retina.pipelines.sampling import segmenter_probabilities

    return segmenter_probabilities(segmenter, prepare_images(image, segmenter.config.in_channels),
                                   tile_size)[0, 0].numpy()


# ---------------------------------------------------------------------------------------------- steps
def source_statistics(args):
    """The source's training field-of-view diameter and vessel fraction: the segmenter's ``training_info.json``,
    else (the fraction) its training masks in ``--source_data_dir``."""
    from diffusers_retina.adaptation import vessel_fraction
    from diffusers_retina.data import read_mask
    from diffusers_retina.hub import recorded_training_args
    from diffusers_retina.image_processing import field_of_view_mask

    recorded = recorded_training_args(args.source_segmenter)
    diameter, fraction = recorded.get("field_of_view_diameter"), recorded.get("training_vessel_fraction")
    if fraction is None and args.source_data_dir is not None:
        images = _stems(Path(args.source_data_dir) / args.source_image_dir, args.source_stems)
        masks = _stems(Path(args.source_data_dir) / args.source_mask_dir, args.source_stems, args.source_mask_suffix)
        fractions = [vessel_fraction(read_mask(masks[stem], 2), field_of_view_mask(_read_unit_image(images[stem])))
                     for stem in sorted(set(images) & set(masks))[:20]]
        fraction = float(np.mean(fractions)) if fractions else None
    return diameter, fraction


def _source_references(args, *transforms: str):
    """``(references, reference_fovs)``: the source photographs the ``*histmatch`` transforms match to (None, None when
    no transform needs them)."""
    from diffusers_retina.data.modality import field_of_view_mask

    if not any("histmatch" in name for name in transforms):
        return None, None
    sources = _stems(Path(args.source_data_dir) / args.source_image_dir, args.source_stems)
    references = [_read_unit_image(p) for p in list(sources.values())[: args.num_source_references]]
    return references, [field_of_view_mask(r) for r in references]


def source_transforms(args, *transforms: str) -> Dict[str, Dict]:
    """Each transform as a record with the source photographs' quantiles as :func:`to_source_intensities` computes
    them (``MATCHING_QUANTILES``, unrounded: the same mapping), built once for all the images a step moves and applied
    with ``apply_source_intensity_transform``."""
    from diffusers_retina.image_processing import source_intensity_transform
    from diffusers_retina.image_processing.intensity import MATCHING_QUANTILES

    references, reference_fovs = _source_references(args, *transforms)
    return {name: source_intensity_transform(name, references, reference_fovs, MATCHING_QUANTILES, decimals=None)
            for name in transforms}


def _candidate_transforms(args) -> List[str]:
    if args.pseudo_label_transform != "auto":
        return [args.pseudo_label_transform]
    return ["none", "invert"] + (["histmatch", "invert+histmatch"] if args.source_data_dir is not None else [])


def step_pseudo_labels(args, work_dir: Path) -> Dict:
    """Step 1: the target photographs at the source's scale, their pseudo-labels by the source segmenter (the mean of
    the agreement views) and the confident pixels (every view agrees), optionally corrupted."""
    from diffusers_retina.adaptation import (check_target_folder, choose_transform, confident_pixels,
                                             fraction_matching_threshold, histogram_mean, mean_probability_threshold,
                                             probability_histogram, view_probabilities, vessel_fraction,
                                             working_image)
    from diffusers_retina.data import read_mask
    from diffusers_retina.data.modality import corrupt_mask, field_of_view_mask
    from diffusers_retina.image_processing import apply_source_intensity_transform

    final = work_dir / "1-pseudo-labels"
    partial = _fresh_folder(final)
    for folder in ("images", "masks", "confident"):
        (partial / folder).mkdir()
    segmenter = load_segmenter(args.source_segmenter)
    diameter, source_fraction = source_statistics(args)
    candidates = _candidate_transforms(args)
    records = source_transforms(args, *candidates)
    targets = check_target_folder(Path(args.target_data_dir) / args.target_image_dir, args.target_stems)

    def predict(image: np.ndarray) -> np.ndarray:
        return probability_map(segmenter, image, args.tile_size)

    kept: Dict[Path, tuple] = {}  # the photographs the transform rule looked at, for pass 1

    def working(path: Path, keep: bool = False):
        """``(image at the working scale, plan, field of view)``, read and resized once per photograph."""
        if path in kept:
            return kept.pop(path)
        image, plan = working_image(_read_unit_image(path), diameter, args.processing_resolution)
        result = (image, plan, field_of_view_mask(image))
        if keep:
            kept[path] = result
        return result

    choice = {"candidates": candidates, "source_vessel_fraction": source_fraction}
    transform = candidates[0]
    if len(candidates) > 1 and not args.pseudo_labels_from:
        if source_fraction is None:
            raise SystemExit(f"--pseudo_label_transform auto compares with the source's vessel fraction: "
                             f"{args.source_segmenter} records none (training_info.json 'training_vessel_fraction'); "
                             "give --source_data_dir or name a transform.")
        fractions = {name: [] for name in candidates}
        for path in list(targets.values())[: args.transform_sample]:
            image, _, fov = working(path, keep=True)
            for name in candidates:
                moved = apply_source_intensity_transform(image, records[name], fov)
                fractions[name].append(vessel_fraction(predict(moved) > 0.5, fov))
        transform = choose_transform(fractions, source_fraction)
        choice["fractions"] = {name: float(np.mean(values)) for name, values in fractions.items()}
    choice["chosen"] = transform
    print(f"pseudo-label transform: {transform} ({choice})")
    # pass 1: the agreement views of every photograph (kept as 8-bit maps) and the pooled histogram of their mean
    (partial / "views").mkdir()
    histogram, scales = 0, {}
    for stem, path in targets.items():
        image, plan, fov = working(path)
        scales[stem] = round(plan.scale, 4)
        _save_png((image * 255).round().astype(np.uint8), partial / "images" / f"{stem}.png")
        _save_png(fov.astype(np.uint8) * 255, partial / "views" / f"{stem}-fov.png")
        if not args.pseudo_labels_from:
            moved = apply_source_intensity_transform(image, records[transform], fov)
            views = view_probabilities(predict, moved)
            np.save(partial / "views" / f"{stem}.npy", (views * 255).round().astype(np.uint8))
            histogram = histogram + probability_histogram(views.mean(axis=0), fov)
    threshold = args.pseudo_label_threshold  # a number, or a label-free rule (adaptdiff_workflow.THRESHOLD_RULES)
    if args.pseudo_labels_from and isinstance(threshold, str):
        threshold = 0.5  # given labels: no probabilities to read
    elif threshold == "mean-probability":
        threshold = mean_probability_threshold(histogram)
    elif threshold == "source-fraction":
        threshold = 0.5 if source_fraction is None else fraction_matching_threshold(histogram, source_fraction)
    print(f"pseudo-label threshold: {threshold:.3f}")
    # pass 2: labels and confident pixels
    fractions, confident_fractions = {}, {}
    for index, (stem, path) in enumerate(targets.items()):
        fov = read_mask(partial / "views" / f"{stem}-fov.png", 2) > 0
        if args.pseudo_labels_from:
            given = Path(args.pseudo_labels_from) / "masks" / f"{stem}.png"
            if not given.is_file():
                raise SystemExit(f"--pseudo_labels_from: no label {given} for target image {path}.")
            label = read_mask(given, 2) > 0
            if label.shape != fov.shape:
                raise SystemExit(f"--pseudo_labels_from: {given} is {label.shape} but target image {path} is worked "
                                 f"on at {fov.shape} (--processing_resolution native keeps its size).")
            confident = np.ones(label.shape, bool)
        else:
            views = np.load(partial / "views" / f"{stem}.npy").astype(np.float32) / 255.0
            label, confident = confident_pixels(views, threshold)
        label = label.astype(np.uint8)
        if args.pseudo_label_fp or args.pseudo_label_fn:
            label = corrupt_mask(label, args.pseudo_label_fp, args.pseudo_label_fn, seed=args.seed + index, fov=fov)
        _save_png(label * 255, partial / "masks" / f"{stem}.png")
        _save_png(confident.astype(np.uint8) * 255, partial / "confident" / f"{stem}.png")
        fractions[stem] = vessel_fraction(label, fov)
        confident_fractions[stem] = float(confident.mean())
    shutil.rmtree(partial / "views")
    _move_in(partial, final)
    return {"images": len(fractions), "transform": choice, "threshold": threshold, "scales": scales,
            "mean_probability": None if args.pseudo_labels_from else histogram_mean(histogram),
            "mean_vessel_fraction": float(np.mean(list(fractions.values()))),
            "mean_confident_fraction": float(np.mean(list(confident_fractions.values())))}


def step_diffusion(args, work_dir: Path) -> Dict:
    """Step 2: the conditional diffusion model of target images given pseudo-labels (train_mask2image.py)."""
    import train_mask2image

    output = work_dir / "2-diffusion"
    flags = [
        "--task", "image", "--train_data_dir", str(work_dir / "1-pseudo-labels"), "--image_dir", "images",
        "--mask_dir", "masks", "--output_dir", str(output), "--resolution", str(args.diffusion_resolution),
        "--conditioning", "spade", "--spade_blocks", "decoder", "--spade_norm", "instance",
        "--loss", "l1", "--prediction_type", args.diffusion_prediction_type,
        "--num_train_timesteps", str(args.num_train_timesteps), "--beta_schedule", "linear",
        "--block_out_channels", args.diffusion_block_out_channels,
        "--train_batch_size", str(args.diffusion_batch_size), "--learning_rate", str(args.diffusion_learning_rate),
        "--max_train_steps", str(args.diffusion_steps), "--checkpointing_steps", str(args.checkpointing_steps),
        "--checkpoints_total_limit", "2", "--validation_steps", str(10 * args.diffusion_steps),
        "--mixed_precision", args.mixed_precision, "--seed", str(args.seed), "--report_to", "none",
        "--save_dtype", "float32", "--resume_from_checkpoint", "latest", *shlex.split(args.diffusion_args),
    ]
    train_mask2image.main(flags)
    return {"command": "python training/train_mask2image.py " + " ".join(shlex.quote(f) for f in flags)}


def step_synthesis(args, work_dir: Path) -> Dict:
    """Step 3: target-style images painted from the source's real masks, histogram-matched to target images."""
    from diffusers import DDIMScheduler

    from diffusers_retina import AdaptDiffPipeline, Mask2ImagePipeline
    from diffusers_retina.data import read_mask

    final = work_dir / "3-synthetic"
    partial = final.with_name(final.name + ".partial")  # kept across a kill: finished images are not painted again
    (partial / "images").mkdir(parents=True, exist_ok=True)
    (partial / "masks").mkdir(parents=True, exist_ok=True)
    painter = Mask2ImagePipeline.from_pretrained(str(work_dir / "2-diffusion"), dtype=torch.float32)
    scheduler = DDIMScheduler.from_config(painter.scheduler.config, timestep_spacing="trailing")
    pipe = AdaptDiffPipeline(unet=painter.unet, scheduler=scheduler, segmenter=load_segmenter(args.source_segmenter))
    pipe.set_progress_bar_config(disable=True)
    targets = list(_stems(work_dir / "1-pseudo-labels" / "images", None).values())
    references = [_read_unit_image(p) for p in targets[: args.num_reference_images]] or None
    masks = _stems(Path(args.source_data_dir) / args.source_mask_dir, args.source_stems, args.source_mask_suffix)
    from tqdm.auto import tqdm

    painted = 0
    for index, (stem, path) in enumerate(tqdm(masks.items(), desc="synthesis")):
        whole = read_mask(path, 2)
        for copy in range(args.images_per_mask):
            name = f"{stem}-{copy}.png"
            if (partial / "images" / name).is_file() and (partial / "masks" / name).is_file():
                continue  # painted before a kill
            seed = args.seed * 100_003 + index * 101 + copy
            mask = whole
            if args.paint_crop and min(whole.shape) > args.paint_crop:
                rng = np.random.default_rng(seed)
                top = int(rng.integers(0, whole.shape[0] - args.paint_crop + 1))
                left = int(rng.integers(0, whole.shape[1] - args.paint_crop + 1))
                mask = whole[top: top + args.paint_crop, left: left + args.paint_crop]
            generator = torch.Generator().manual_seed(seed)
            image = pipe(mask, num_inference_steps=args.paint_steps, guidance_scale=args.guidance_scale,
                         reference_images=references, generator=generator, tile_size=args.tile_size,
                         output_type="np").images[0]
            _save_png(((mask > 0) * 255).astype(np.uint8), partial / "masks" / name)
            _save_png((image * 255).round().astype(np.uint8), partial / "images" / name)  # last: marks it done
            painted += 1
    faithfulness = read_paintings(args, work_dir, pipe.segmenter, partial)
    _move_in(partial, final)
    return {"pairs": len(masks) * args.images_per_mask, "painted_this_run": painted, "mask_faithfulness": faithfulness}


def step_record(work_dir: Path, step: str) -> Dict:
    """What ``step`` recorded in the workflow's ``workflow.json`` (empty before it ran)."""
    import json

    return json.loads((work_dir / "workflow.json").read_text())["steps"].get(step, {})


def labelling_record(work_dir: Path) -> Dict:
    """What step 1 recorded in ``workflow.json`` (its transform choice, threshold, ...)."""
    return step_record(work_dir, "pseudo-labels")


def chosen_transform(args, work_dir: Path) -> str:
    """The intensity transform step 1 chose."""
    return labelling_record(work_dir).get("transform", {}).get("chosen", args.pseudo_label_transform)


def read_paintings(args, work_dir: Path, segmenter, folder: Path) -> Dict:
    """The source segmenter reads each painting in ``folder`` through step 1's transform and agreement views (no
    target label needed) and writes ``folder/confident/<name>.png``, the pixels that count in fine-tuning: all but
    those where every view contradicts the exact mask (:func:`diffusers_retina.adaptation.uncontradicted_pixels`: a
    vessel the painting does not show, or one it shows where the mask has none). Returns the paintings' mask
    faithfulness (:func:`diffusers_retina.synthesis.mask_faithfulness` is the same measure for images a segmentation
    pipeline reads as they are): the mean Dice of the reading against the exact masks, the vessel fraction it marks
    against the masks', and the fraction of pixels that count. A painter that has not learnt the target's vessels
    leaves many unreadable: a low Dice, a marked fraction well under the masks'."""
    from diffusers_retina.adaptation import uncontradicted_pixels, view_probabilities, vessel_fraction
    from diffusers_retina.data import read_mask
    from diffusers_retina.data.modality import field_of_view_mask
    from diffusers_retina.image_processing import apply_source_intensity_transform
    from diffusers_retina.metrics import dice

    def predict(image: np.ndarray) -> np.ndarray:
        return probability_map(segmenter, image, args.tile_size)

    transform = chosen_transform(args, work_dir)
    threshold = labelling_record(work_dir).get("threshold", 0.5)
    record = source_transforms(args, transform)[transform]
    (folder / "confident").mkdir(exist_ok=True)
    scores, marked, masked, counted = [], [], [], []
    for path in sorted((folder / "images").glob("*.png")):
        image, mask = _read_unit_image(path), read_mask(folder / "masks" / path.name, 2) > 0
        moved = apply_source_intensity_transform(image, record, field_of_view_mask(image))
        views = view_probabilities(predict, moved)
        reading = views.mean(axis=0) > threshold
        counts = uncontradicted_pixels(views, mask, threshold)
        _save_png(counts.astype(np.uint8) * 255, folder / "confident" / path.name)
        scores.append(float(dice(reading, mask)))
        marked.append(vessel_fraction(reading))
        masked.append(vessel_fraction(mask))
        counted.append(float(counts.mean()))
    if not scores:
        return {}
    reading = {"dice": float(np.mean(scores)), "marked_fraction": float(np.mean(marked)),
               "mask_fraction": float(np.mean(masked)), "counted_fraction": float(np.mean(counted))}
    print(f"mask faithfulness of the paintings: Dice {reading['dice']:.3f}, marked fraction "
          f"{reading['marked_fraction']:.3f} (masks {reading['mask_fraction']:.3f}); pixels that count "
          f"{reading['counted_fraction']:.3f}")
    return reading


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def finetune_data(args, work_dir: Path) -> Path:
    """The fine-tuning pairs of ``--method``: ``images/``, ``masks/`` and ``confident/`` (the pixels the loss counts).
    adaptdiff: the painted pairs (the pixels step 3 found uncontradicted); self-training: the target photographs with
    their confident pseudo-labels; combined: both, in one folder (``4-data``; target files prefixed
    ``target-<copy>-``), the two kinds counting equally: each target photograph is listed as many times as there are
    painted pairs per target photograph (rounded, at least once), so neither kind outnumbers the other in the sampled
    batches."""
    synthetic, labelled = work_dir / "3-synthetic", work_dir / "1-pseudo-labels"
    if args.method == "self-training":
        return labelled
    final = work_dir / "4-data"
    partial = _fresh_folder(final)
    for folder in ("images", "masks", "confident"):
        (partial / folder).mkdir()
    painted = sorted((synthetic / "masks").glob("*.png"))
    for path in painted:
        _link_or_copy(synthetic / "images" / path.name, partial / "images" / path.name)
        _link_or_copy(path, partial / "masks" / path.name)
        if (synthetic / "confident" / path.name).is_file():  # step 3's pixels that count
            _link_or_copy(synthetic / "confident" / path.name, partial / "confident" / path.name)
        else:  # a run painted before step 3 read its paintings: every pixel counts
            _save_png(np.full(PIL.Image.open(path).size[::-1], 255, np.uint8), partial / "confident" / path.name)
    if args.method == "combined":
        targets = sorted((labelled / "masks").glob("*.png"))
        for copy in range(max(1, round(len(painted) / max(1, len(targets))))):
            for path in targets:
                for folder in ("images", "masks", "confident"):
                    _link_or_copy(labelled / folder / path.name, partial / folder / f"target-{copy}-{path.name}")
    _move_in(partial, final)
    return final


def step_finetune(args, work_dir: Path) -> Dict:
    """Step 4: fine-tune the source segmenter on ``--method``'s pairs; save the adapted segmenter, the adapted anchored
    pipeline (``--anchored_pipeline``) and, when a painter was trained, the adapted ``AdaptDiffPipeline``."""
    import train_segmentation_ensemble
    from accelerate import PartialState

    from diffusers_retina.hub import recorded_training_args

    output = work_dir / "4-fine-tune"
    data = work_dir / ("1-pseudo-labels" if args.method == "self-training" else "4-data")
    record = finetune_input_transform(args, work_dir)
    if PartialState().is_main_process:
        finetune_data(args, work_dir)
        if record is not None:
            move_to_source_space(data, work_dir / SOURCE_SPACE_DATA, record)
    PartialState().wait_for_everyone()
    if record is not None:
        data = work_dir / SOURCE_SPACE_DATA
    flags = [
        "--objective", "supervised", "--init_unet", args.source_segmenter,
        "--train_data_dir", str(data), "--image_dir", "images", "--mask_dir", "masks", "--loss_mask_dir", "confident",
        "--output_dir", str(output), "--resolution", str(args.finetune_resolution),
        "--photometric_augmentation", str(args.finetune_photometric),
        "--train_batch_size", str(args.finetune_batch_size), "--learning_rate", str(args.finetune_learning_rate),
        "--lr_warmup_steps", str(min(50, args.finetune_steps // 10)), "--max_train_steps", str(args.finetune_steps),
        "--checkpointing_steps", str(args.checkpointing_steps), "--checkpoints_total_limit", "2",
        "--mixed_precision", args.mixed_precision, "--seed", str(args.seed), "--report_to", "none",
        "--save_dtype", "float32", "--resume_from_checkpoint", "latest", *shlex.split(args.finetune_args),
    ]
    degrees = recorded_training_args(args.source_segmenter).get("field_of_view_degrees")
    if degrees is not None:  # the adapted segmenter learns at the source's scale: it keeps the source's angle
        flags += ["--field_of_view_degrees", str(degrees)]
    torch.set_grad_enabled(True)
    train_segmentation_ensemble.main(flags)
    return {"command": "python training/train_segmentation_ensemble.py " + " ".join(shlex.quote(f) for f in flags),
            "input_transform": None if record is None else record["transform"]}


#: ``--finetune_space source``: the fine-tuning pairs moved through step 1's transform, and the stored transform
SOURCE_SPACE_DATA = "4-data-source"
INPUT_TRANSFORM_FILE = "input_transform.json"


def finetune_input_transform(args, work_dir: Path) -> Optional[Dict]:
    """The input transform the adapted models read the target through: step 1's transform as a stored record
    (:func:`diffusers_retina.image_processing.source_intensity_transform`: the source photographs' quantiles, so
    the adapted pipelines need no source photograph), or None with ``--finetune_space target`` or when step 1 chose
    ``none``."""
    from diffusers_retina.image_processing import source_intensity_transform

    transform = chosen_transform(args, work_dir)
    if args.finetune_space == "target" or transform == "none":
        return None
    references, reference_fovs = _source_references(args, transform)
    return source_intensity_transform(transform, references, reference_fovs)


def move_to_source_space(data: Path, final: Path, record: Dict) -> Path:
    """``data``'s ``images/`` moved through the stored transform ``record`` (its ``masks/`` and ``confident/``
    linked) into ``final``, with ``record`` as ``input_transform.json``. A photograph listed several times (hard
    links) is moved once."""
    import json

    from diffusers_retina.image_processing import apply_source_intensity_transform

    partial = _fresh_folder(final)
    for folder in ("images", "masks", "confident"):
        (partial / folder).mkdir()
    moved: Dict = {}
    for path in sorted((data / "images").glob("*.png")):
        status = os.stat(path)
        key = (status.st_dev, status.st_ino)
        if key not in moved:
            moved[key] = apply_source_intensity_transform(_read_unit_image(path), record)
        _save_png((np.clip(moved[key], 0, 1) * 255).round().astype(np.uint8), partial / "images" / path.name)
        for folder in ("masks", "confident"):
            _link_or_copy(data / folder / path.name, partial / folder / path.name)
    (partial / INPUT_TRANSFORM_FILE).write_text(json.dumps(record) + "\n")
    _move_in(partial, final)
    print(f"fine-tuning in the source's intensity space: {len(moved)} images moved through {record['transform']}")
    return final


def stored_input_transform(work_dir: Path) -> Optional[Dict]:
    """The record step 4 fine-tuned through (None: it fine-tuned on the pairs as they are)."""
    import json

    if not step_record(work_dir, "fine-tune").get("input_transform"):
        return None
    return json.loads((work_dir / SOURCE_SPACE_DATA / INPUT_TRANSFORM_FILE).read_text())


def step_calibrate(args, work_dir: Path) -> Dict:
    """Step 5: the fine-tuned segmenter's temperature fitted to the source segmenter's probabilities on the target
    photographs (``--calibration teacher``; :func:`diffusers_retina.adaptation.fit_temperature`; each model reads them
    through its own transform: the source through step 1's, the student through the one it was fine-tuned through)
    and folded into its output layer; then the adapted segmenter, anchored pipeline and AdaptDiffPipeline are
    saved."""
    from diffusers_retina.adaptation import fit_temperature, fold_temperature, logit
    from diffusers_retina.data.modality import field_of_view_mask
    from diffusers_retina.image_processing import apply_source_intensity_transform

    adapted = load_segmenter(str(work_dir / "4-fine-tune" / "unet"))
    record = stored_input_transform(work_dir)
    details: Dict = {"calibration": args.calibration}
    if args.calibration == "teacher":
        source = load_segmenter(args.source_segmenter)
        transform = chosen_transform(args, work_dir)
        teacher_transform = source_transforms(args, transform)[transform]
        logits, teacher, fovs = [], [], []
        for path in list(_stems(work_dir / "1-pseudo-labels" / "images", None).values())[: args.transform_sample]:
            image = _read_unit_image(path)  # already at the working scale
            fov = field_of_view_mask(image)
            moved = apply_source_intensity_transform(image, teacher_transform, fov)
            student = probability_map(adapted, apply_source_intensity_transform(image, record, fov), args.tile_size)
            teacher.append(probability_map(source, moved, args.tile_size))
            logits.append(logit(student))
            fovs.append(fov)
        temperature = fit_temperature(logits, teacher, fovs)
        fold_temperature(adapted, temperature)
        details["temperature"] = round(temperature, 4)
        print(f"calibration: temperature {temperature:.3f} (fitted to the source segmenter's probabilities)")
    save_adapted(args, work_dir, adapted, record)
    details["segmenter_output_dir"] = args.segmenter_output_dir
    if args.anchored_pipeline:
        details["anchored_output_dir"] = args.anchored_output_dir
    if args.method != "self-training":
        details["output_dir"] = args.output_dir
    return details


def save_adapted(args, work_dir: Path, adapted, record: Optional[Dict] = None) -> None:
    """The adapted segmenter (with the fine-tune's ``training_info.json``: its training diameter and, when it was
    fine-tuned in the source's intensity space, the ``input_transform`` record), the anchored pipeline with it as its
    prior, and the AdaptDiffPipeline (painter + adapted segmenter), both with ``input_transform=record``; each written
    beside its place and swapped in."""
    from diffusers import DDIMScheduler

    from diffusers_retina import AdaptDiffPipeline, Mask2ImagePipeline, SegmentationEnsemblePipeline
    from diffusers_retina.hub import TRAINING_INFO, read_json, write_json

    output = work_dir / "4-fine-tune"
    partial = _fresh_folder(Path(args.segmenter_output_dir))
    adapted.save_pretrained(partial)
    info = read_json(output / TRAINING_INFO) or {}
    if info or record is not None:
        write_json(partial / TRAINING_INFO, {**info, "input_transform": record})
    _move_in(partial, Path(args.segmenter_output_dir))
    if args.anchored_pipeline:
        anchored = SegmentationEnsemblePipeline.from_pretrained(args.anchored_pipeline, dtype=torch.float32,
                                                                input_transform=record)
        anchored.register_modules(prior=adapted)
        anchored.save_pretrained(args.anchored_output_dir)
    if args.method != "self-training":
        painter = Mask2ImagePipeline.from_pretrained(str(work_dir / "2-diffusion"), dtype=torch.float32)
        scheduler = DDIMScheduler.from_config(painter.scheduler.config, timestep_spacing="trailing")
        AdaptDiffPipeline(unet=painter.unet, scheduler=scheduler, segmenter=adapted,
                          input_transform=record).save_pretrained(args.output_dir)
