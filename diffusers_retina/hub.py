"""Model cards for diffusers-retina checkpoints (huggingface_hub ``ModelCard`` / ``ModelCardData``).

A trained pipeline folder holds two JSON files next to the weights:

* ``training_info.json`` written by the training script (arguments, command, steps, time, parameters);
* ``evaluation.json`` written by the evaluation benchmark (measured test metrics), optional.

``write_segmentation_card(folder)`` renders ``model_cards/segmentation_ensemble.md`` from both, so the card always
reports what was measured, and the same function serves the training script, the benchmark and ``push_to_hub``.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATES = Path(__file__).resolve().parents[1] / "model_cards"
TRAINING_INFO = "training_info.json"
EVALUATION = "evaluation.json"

CHASE_DB1_DESCRIPTION = (
    "[CHASE_DB1](https://researchdata.kingston.ac.uk/96/) (Kingston University London / St George's, University of "
    "London), licensed **CC BY 4.0**: 28 fundus photographs (999x960) of both eyes of 14 children with vessel "
    "masks by two observers. Training used the first 20 images (Image_01L–Image_10R) with the first observer's masks "
    "(`1stHO`); the 8 test images (Image_11L–Image_14R) were not used for training. Cite: Fraz MM, Remagnino P, "
    "Hoppe A, Uyyanonvara B, Rudnicka AR, Owen CG, Barman SA, *An ensemble classification-based approach applied to "
    "retinal blood vessel segmentation*, IEEE Trans. Biomed. Eng. 59(9):2538–2548, 2012."
)

METRIC_LABELS = {
    "dice": "Dice",
    "cldice": "clDice",
    "iou": "IoU",
    "auc_roc": "AUC-ROC",
    "auc_pr": "AUC-PR",
    "ece": "ECE",
    "hd95": "HD95 (px)",
}


def write_json(path: Union[str, os.PathLike], data: Dict[str, Any]) -> None:
    """Write JSON atomically (temporary file, then rename) so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")
    os.replace(tmp, path)


def read_json(path: Union[str, os.PathLike]) -> Optional[Dict[str, Any]]:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def command_line(argv: List[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def _format_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "unknown time"
    hours, rest = divmod(int(round(seconds)), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def _evaluation_markdown(evaluation: Optional[Dict[str, Any]]) -> str:
    if not evaluation:
        return "Not evaluated yet: run `python benchmarks/evaluate_segmentation.py --pipeline <this folder>`."
    rows = evaluation["rows"]
    metrics = [m for m in METRIC_LABELS if any(m in row["metrics"] for row in rows)]
    lines = [
        f"{evaluation['description']}",
        "",
        "| Method | " + " | ".join(METRIC_LABELS[m] for m in metrics) + " | s / image |",
        "|---|" + "---|" * (len(metrics) + 1),
    ]
    for row in rows:
        cells = []
        for m in metrics:
            value = row["metrics"].get(m)
            std = row["metrics"].get(m + "_std")
            cells.append("–" if value is None else f"{value:.3f}" + (f" ± {std:.3f}" if std is not None else ""))
        seconds = row.get("seconds_per_image")
        lines.append(f"| {row['name']} | " + " | ".join(cells) + f" | {'–' if seconds is None else f'{seconds:.1f}'} |")
    if evaluation.get("uncertainty"):
        u = evaluation["uncertainty"]
        lines += ["", "Uncertainty (mean over test pixels, fused ensemble): "
                  + ", ".join(f"{k.replace('_', ' ')} = {v:.4f}" for k, v in u.items()) + "."]
    if evaluation.get("notes"):
        lines += ["", evaluation["notes"]]
    lines += ["", "Measured with:", "", "```bash", evaluation["command"], "```"]
    return "\n".join(lines + _comparison_lines(evaluation))


def _comparison_lines(evaluation: Dict[str, Any]) -> List[str]:
    """The ``comparison`` block written by ``benchmarks/compare_segmentation.py --write-into`` (if any)."""
    comparison = evaluation.get("comparison")
    if not comparison:
        return []
    heading = comparison.get("heading") or "Compared with other models (same data, budget, evaluation command and seed)"
    return ["", f"### {heading}", "", comparison["markdown"], "", "```bash", comparison["command"], "```"]


def _model_description(config: Dict[str, Any]) -> str:
    """One sentence on the denoiser, from its saved ``unet/config.json``."""
    if config.get("_class_name") != "MedSegDiffUNet2DModel":
        return ("A DDPM over the vessel mask; the fundus photograph is concatenated to the noisy mask at every step, "
                "so the denoiser is a stock `diffusers.UNet2DModel`")
    fusion = ("dynamic conditional encoding `(LN(m_I) * LN(m_x)) * m_I`" if config.get("dynamic_encoding", True)
              else "plain addition (dynamic conditional encoding switched off)")
    parts = [
        "A DDPM over the vessel mask with MedSegDiff's conditioning (Wu et al., MIDL 2023): an image-only condition "
        f"encoder runs beside the noisy-mask encoder and the two are fused at every encoder scale by {fusion}",
    ]
    if config.get("ff_parser", True):
        parts.append("after an FF-Parser (a learnable filter in the 2-D Fourier domain, identity at initialisation, "
                     "valid at any image size) has filtered the mask features")
    if config.get("condition_head"):
        parts.append("with an auxiliary segmentation head on the condition encoder")
    return ", ".join(parts) + "; denoiser `diffusers_retina.models.MedSegDiffUNet2DModel`, built from diffusers' UNet blocks"


def _training_info(folder: Path) -> Dict[str, Any]:
    """``training_info.json`` of a trained folder (written by every training script)."""
    info = read_json(folder / TRAINING_INFO)
    if info is None:
        raise FileNotFoundError(f"{folder / TRAINING_INFO} is missing: it is written by the training script.")
    return info


def _trained_on_chase(args: Dict[str, Any]) -> bool:
    return "chase" in str(args.get("train_data_dir", "")).lower()


def _card_data(args: Dict[str, Any], repo_id: str, pipeline_tag: str, tags: List[str], **extra: Any) -> ModelCardData:
    """Card metadata every diffusers-retina card shares (licence and dataset follow the training data)."""
    on_chase = _trained_on_chase(args)
    return ModelCardData(
        license="cc-by-4.0" if on_chase else "apache-2.0",
        library_name="diffusers",
        pipeline_tag=pipeline_tag,
        tags=["diffusers-retina", "diffusers", "medical-imaging", "retina", *tags],
        datasets=["CHASE_DB1"] if on_chase else None,
        model_name=repo_id,
        **extra,
    )


def _measured_markdown(evaluation: Optional[Dict[str, Any]]) -> Optional[str]:
    """A benchmark's ``evaluation.json`` markdown with its command and any comparison block (None if not measured)."""
    if not (evaluation and evaluation.get("markdown")):
        return None
    text = evaluation["markdown"] + "\n\nMeasured with:\n\n```bash\n" + evaluation["command"] + "\n```"
    comparison = _comparison_lines(evaluation)
    return text + "\n" + "\n".join(comparison) if comparison else text


def segmentation_model_card(folder: Union[str, os.PathLike], repo_id: Optional[str] = None) -> ModelCard:
    """Build the model card of a trained `SegmentationEnsemblePipeline` folder from its JSON records.

    Example:
        >>> card = segmentation_model_card("checkpoints/segmentation-ensemble-chase")  # doctest: +SKIP
        >>> card.save("checkpoints/segmentation-ensemble-chase/README.md")  # doctest: +SKIP
    """
    folder = Path(folder)
    info = _training_info(folder)
    evaluation = read_json(folder / EVALUATION)
    args = info["args"]
    repo_id = repo_id or args.get("hub_model_id") or f"diffusers-retina/{folder.name}"

    eval_results = _eval_results(evaluation) or []
    if evaluation and not eval_results and evaluation.get("rows"):
        main_row = evaluation["rows"][0]
        for metric, value in main_row["metrics"].items():
            if metric in METRIC_LABELS and value is not None:
                eval_results.append(EvalResult(
                    task_type="image-segmentation", dataset_type="chase_db1", dataset_name="CHASE_DB1",
                    dataset_split="test (Image_11L–Image_14R, 1stHO, full resolution)", metric_type=metric,
                    metric_name=METRIC_LABELS[metric], metric_value=round(float(value), 4),
                ))
    card_data = _card_data(args, repo_id, "image-segmentation",
                           ["vessel-segmentation", "diffusion-segmentation", "uncertainty"],
                           metrics=["dice"], eval_results=eval_results or None)
    validation = info.get("validation_dice")
    unet_config = read_json(folder / "unet" / "config.json") or {}
    index = read_json(folder / "model_index.json") or {}
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATES / "segmentation_ensemble.md"),
        model_name=repo_id,
        repo_id=repo_id,
        model_description=_model_description(unet_config),
        medsegdiff=unet_config.get("_class_name") == "MedSegDiffUNet2DModel",
        inference_steps=index.get("default_denoising_steps") or (evaluation or {}).get(
            "inference_steps", args.get("validation_inference_steps", 2)),
        ensemble_size=(evaluation or {}).get("ensemble_size", 5),
        validation_dice="not run" if validation is None else f"{validation:.3f}",
        anchor=index.get("anchor"),
        anchor_strength=index.get("anchor_strength"),
        prior_command=info.get("prior_command"),
        augmentation=_augmentation_text(args),
        **_common_card_fields(folder, info),
        evaluation=_measured_markdown(evaluation) or _evaluation_markdown(evaluation),
    )


def _common_card_fields(folder: Path, info: Dict[str, Any]) -> Dict[str, Any]:
    """Template fields every training card shares (data, command, schedule, time)."""
    args = info["args"]
    on_chase = _trained_on_chase(args)
    ema = f"EMA (max decay {args['ema_max_decay']})" if args.get("use_ema") else "no EMA"
    return dict(
        num_parameters=f"{info['num_parameters']:,}",
        save_dtype=args.get("save_dtype", "float32"),
        data_description=CHASE_DB1_DESCRIPTION if on_chase else f"`{args.get('train_data_dir') or args.get('dataset_name')}`.",
        seed=args["seed"],
        command=info["command"],
        global_step=info["global_step"],
        batch_size=args["train_batch_size"],
        resolution=args["resolution"],
        learning_rate=args["learning_rate"],
        lr_scheduler=args["lr_scheduler"],
        ema=ema,
        num_train_timesteps=args["num_train_timesteps"],
        beta_schedule=args["beta_schedule"],
        prediction_type=args["prediction_type"],
        training_time=_format_duration(info.get("training_seconds")),
        training_notes=info.get("notes"),
    )


def mask2image_model_card(folder: Union[str, os.PathLike], repo_id: Optional[str] = None) -> ModelCard:
    """Model card of a folder trained by ``training/train_mask2image.py`` (image model or mask model)."""
    folder = Path(folder)
    info = _training_info(folder)
    args = info["args"]
    repo_id = repo_id or args.get("hub_model_id") or f"diffusers-retina/{folder.name}"
    task = args.get("task", "image")
    card_data = _card_data(args, repo_id,
                           "image-to-image" if task == "image" else "unconditional-image-generation",
                           ["image-synthesis", {"mask": "vessel-mask", "fundus": "fundus-ddpm"}.get(task, "mask-to-image")])
    score = info.get("validation_faithfulness_dice")
    evaluation_text = _measured_markdown(read_json(folder / EVALUATION))
    if evaluation_text is None and task == "fundus":
        evaluation_text = ("Not evaluated yet: run `python benchmarks/label_efficiency.py --ddpm <this folder> "
                           "--write-card` (heads on its features against a supervised U-Net).")
    elif evaluation_text is None:
        evaluation_text = "Not evaluated yet: run `python benchmarks/evaluate_synthesis.py --pipelines <this folder> --write-card`."
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATES / "mask2image.md"),
        model_name=repo_id,
        repo_id=repo_id,
        task=task,
        conditioning=args.get("conditioning", "concat"),
        spade_blocks=args.get("spade_blocks", "decoder"),
        spade_norm=args.get("spade_norm", "group"),
        condition_dropout=args.get("condition_dropout"),
        has_mask_model=bool(args.get("mask_pipeline")),
        loss=args.get("loss", "mse").upper(),
        validation_score="not run" if score is None else f"{score:.3f}",
        evaluation=evaluation_text,
        **_common_card_fields(folder, info),
    )


def write_mask2image_card(folder: Union[str, os.PathLike], repo_id: Optional[str] = None) -> Path:
    """Render and save ``README.md`` of a mask-to-image (or mask model) folder; returns its path."""
    path = Path(folder) / "README.md"
    mask2image_model_card(folder, repo_id=repo_id).save(str(path))
    return path


def feature_head_model_card(folder: Union[str, os.PathLike], repo_id: Optional[str] = None) -> ModelCard:
    """Model card of a `DiffusionFeaturePipeline` folder trained by ``training/train_feature_head.py``."""
    folder = Path(folder)
    info = _training_info(folder)
    args = info["args"]
    repo_id = repo_id or f"diffusers-retina/{folder.name}"
    head_config = read_json(folder / "head" / "config.json") or {}
    card_data = _card_data(args, repo_id, "image-segmentation",
                           ["vessel-segmentation", "diffusion-features", "label-efficient"])
    if args["head"] == "pixel_mlp":
        head_description = (f"`PixelMLPEnsemble`: {head_config.get('ensemble_size', args['ensemble_size'])} pixel MLPs "
                            "voting, mutual information as uncertainty")
        details = (f"{args['max_train_steps']} Adam steps (lr {args['learning_rate']}) per member, "
                   f"{args['pixels_per_step']} random pixels per step read bilinearly from the native-resolution maps")
    else:
        head_description = ("`FreqAggHead`: per-scale projections, time-conditioned normalisation, frequency-aware "
                            "fusion of scales and a per-pixel gate over timesteps")
        details = f"{args['max_train_steps']} AdamW steps (lr {args['learning_rate']}) on batches of 4 crops"
    weighting = args.get("class_weights", "none")
    details += ("; cross-entropy weighted by 1/sqrt(class frequency)" if weighting == "inverse_sqrt"
                else "; unweighted cross-entropy")
    evaluation_text = _measured_markdown(read_json(folder / EVALUATION)) or (
        "Not evaluated yet: run `python benchmarks/label_efficiency.py` (see benchmarks/README.md).")
    unet_config = read_json(folder / "unet" / "config.json") or {}
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATES / "diffusion_features.md"),
        model_name=repo_id,
        repo_id=repo_id,
        blocks=", ".join(args["blocks"].split(",")),
        timesteps=args["timesteps"],
        policy=args["policy"],
        head_description=head_description,
        head_parameters=f"{info['num_parameters']:,}",
        unet_parameters=f"{info['unet_parameters']:,}" if info.get("unet_parameters") else "a few million",
        num_labelled=args["num_labelled"],
        labelled_stems=args["train_stems"],
        crop=args["crop"],
        crops_per_image=args["crops_per_image"],
        save_dtype=args.get("save_dtype", unet_config.get("torch_dtype", "float32")),
        data_description=CHASE_DB1_DESCRIPTION if _trained_on_chase(args) else f"`{args.get('train_data_dir')}`.",
        seed=args["seed"],
        command=info["command"],
        training_details=details,
        training_time=_format_duration(info.get("training_seconds")),
        evaluation=evaluation_text,
    )


def write_feature_head_card(folder: Union[str, os.PathLike], repo_id: Optional[str] = None) -> Path:
    """Render and save ``README.md`` of a `DiffusionFeaturePipeline` folder; returns its path."""
    path = Path(folder) / "README.md"
    feature_head_model_card(folder, repo_id=repo_id).save(str(path))
    return path


def _augmentation_text(args: Dict[str, Any]) -> str:
    parts = []
    if args.get("photometric_augmentation"):
        parts.append(f"camera-like colour, brightness, contrast, gamma, blur and noise changes (strength "
                     f"{args['photometric_augmentation']:g})")
    if args.get("scale_augmentation"):
        parts.append(f"rescaling by {args['scale_augmentation'].replace(',', '–')}x")
    return "; " + ", ".join(parts) if parts else ""


def segmenter_model_card(folder: Union[str, os.PathLike], repo_id: Optional[str] = None) -> ModelCard:
    """The model card of a deterministic segmenter folder (``config.json`` + weights + ``training_info.json``, and
    ``evaluation.json`` with a measured ``markdown`` table when one was written).

    Example:
        >>> card = segmenter_model_card("checkpoints/vessel-segmenter-chase")  # doctest: +SKIP
    """
    folder = Path(folder)
    info = _training_info(folder)
    args = info["args"]
    repo_id = repo_id or args.get("hub_model_id") or f"diffusers-retina/{folder.name}"
    evaluation = read_json(folder / EVALUATION)
    card_data = _card_data(args, repo_id, "image-segmentation", ["vessel-segmentation", "unet"],
                           metrics=["dice"], eval_results=_eval_results(evaluation))
    return ModelCard.from_template(
        card_data, template_path=str(TEMPLATES / "vessel_segmenter.md"), model_name=repo_id, repo_id=repo_id,
        augmentation=_augmentation_text(args), **_common_card_fields(folder, info),
        evaluation=_measured_markdown(evaluation) or "Not evaluated yet: run `benchmarks/evaluate_anchored.py`.",
    )


def _eval_results(evaluation: Optional[Dict[str, Any]]) -> Optional[List[EvalResult]]:
    """``model-index`` entries from an ``evaluation.json`` that names its ``metrics`` (a full test-set evaluation)."""
    if not evaluation or not evaluation.get("metrics"):
        return None
    return [EvalResult(task_type="image-segmentation", dataset_type="chase_db1", dataset_name="CHASE_DB1",
                       dataset_split=evaluation.get("split", "test (Image_11L–Image_14R, 1stHO, full resolution)"),
                       metric_type=metric, metric_name=METRIC_LABELS.get(metric, metric),
                       metric_value=round(float(value), 4))
            for metric, value in evaluation["metrics"].items() if value is not None]


def write_segmenter_card(folder: Union[str, os.PathLike], repo_id: Optional[str] = None) -> Path:
    """Render and save ``README.md`` of a deterministic segmenter folder; returns its path."""
    path = Path(folder) / "README.md"
    segmenter_model_card(folder, repo_id=repo_id).save(str(path))
    return path


def write_segmentation_card(folder: Union[str, os.PathLike], repo_id: Optional[str] = None) -> Path:
    """Render and save ``README.md`` in ``folder``; returns its path."""
    path = Path(folder) / "README.md"
    segmentation_model_card(folder, repo_id=repo_id).save(str(path))
    return path
