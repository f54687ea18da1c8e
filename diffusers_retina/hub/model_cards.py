"""Model cards for diffusers-retina checkpoints (huggingface_hub ``ModelCard`` / ``ModelCardData``).

A trained folder holds two JSON records next to its weights: ``training_info.json``, written by the training script
(arguments, command, steps, time, parameters, the data's provenance), and ``evaluation.json``, written by a benchmark
(the measured test metrics; optional). One builder, :func:`model_card`, renders a folder's card from them, in the
manner of diffusers' ``populate_model_card``: each kind of checkpoint contributes its card metadata and template
fields (``CARD_KINDS``), and the template in ``model_cards/<kind>.md`` lays them out, so a card always reports what
was measured. The training scripts, the benchmarks and ``diffusers-retina push`` all write cards through
:func:`write_model_card`.

Example:
    >>> from diffusers_retina.hub import write_model_card
    >>> write_model_card("checkpoints/vessel-segmenter-chase")  # doctest: +SKIP
    PosixPath('checkpoints/vessel-segmenter-chase/README.md')
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from huggingface_hub import ModelCard, ModelCardData

from ..utils.io_utils import read_json
from .evaluation_records import (
    EVALUATION,
    TRAINING_INFO,
    eval_results,
    evaluation_markdown,
    feature_head_eval_results,
    format_duration,
    measure_intervals_markdown,
    measured_markdown,
    segmentation_eval_results,
    synthesis_eval_results,
    training_info,
)
from .provenance import data_description, data_scope, dataset_provenance, dataset_record

TEMPLATES = Path(__file__).resolve().parents[2] / "model_cards"

#: What a kind of checkpoint's card builder returns: the card metadata and the template's fields.
CardParts = Tuple[ModelCardData, Dict[str, Any]]


def _model_description(config: Dict[str, Any]) -> str:
    """One sentence on the denoiser, from its saved ``unet/config.json``."""
    if config.get("_class_name") == "PriorFeatureRefinerModel":
        return ("A DDPM over the residual between the vessel mask and a deterministic prior's probability, denoised by "
                f"a light head (`diffusers_retina.models.PriorFeatureRefinerModel`, {config.get('hidden_channels')} "
                "channels) that reads the prior's own decoder features")
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


def resolve_base_model(location: Optional[str]) -> Optional[str]:
    """The Hub id of the model a checkpoint is built on (``base_model`` in the card): ``location`` itself when it is a
    Hub id (``org/name``, not a local folder), else the ``hub_model_id`` recorded in that folder's
    ``training_info.json``; None when neither is known."""
    if not location:
        return None
    path = Path(location).expanduser()
    if not path.exists():
        return location if re.fullmatch(r"[\w.\-]+/[\w.\-]+", location) else None
    info = read_json(path / TRAINING_INFO) or {}
    hub_id = (info.get("args") or {}).get("hub_model_id")
    return hub_id if hub_id and "/" in hub_id else None


def _card_data(args: Dict[str, Any], repo_id: str, pipeline_tag: str, tags: List[str],
               record: Optional[Dict[str, Any]] = None, base_model: Optional[str] = None,
               **extra: Any) -> ModelCardData:
    """Card metadata every diffusers-retina card shares: licence and dataset from the dataset record
    (:func:`dataset_record`), ``base_model`` when the checkpoint is built on another model."""
    record = record if record is not None else dataset_provenance(args)
    return ModelCardData(
        license=record.get("license") or "unknown",
        library_name="diffusers",
        pipeline_tag=pipeline_tag,
        tags=["diffusers-retina", "diffusers", "medical-imaging", "retina", *tags],
        datasets=[record["name"]] if record.get("name") else None,
        base_model=base_model,
        model_name=repo_id,
        **extra,
    )


def default_repo_id(folder: Path, args: Dict[str, Any], repo_id: Optional[str] = None) -> str:
    """The repo id a card names: the one given (``push --repo-id``), else the ``--hub_model_id`` the training run
    pushed to, else the folder's name (``diffusers-retina push`` rewrites it to the repo it uploads to)."""
    return repo_id or args.get("hub_model_id") or folder.name


def _common_card_fields(folder: Path, info: Dict[str, Any], record: Optional[Dict[str, Any]] = None
                        ) -> Dict[str, Any]:
    """Template fields every training card shares (data, command, schedule, time)."""
    args = info["args"]
    record = record if record is not None else dataset_record(info)
    ema = f"EMA (max decay {args['ema_max_decay']})" if args.get("use_ema") else "no EMA"
    return dict(
        num_parameters=f"{info['num_parameters']:,}",
        save_dtype=args.get("save_dtype", "float32"),
        data_description=data_description(record, args),
        data_scope=data_scope(record),
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
        training_time=format_duration(info.get("training_seconds")),
        training_notes=info.get("notes"),
    )


def _augmentation_text(args: Dict[str, Any]) -> str:
    parts = []
    if args.get("photometric_augmentation"):
        parts.append(f"camera-like colour, brightness, contrast, gamma, blur and noise changes (strength "
                     f"{args['photometric_augmentation']:g})")
    if args.get("scale_augmentation"):
        parts.append(f"rescaling by {args['scale_augmentation'].replace(',', '–')}x")
    return "; " + ", ".join(parts) if parts else ""


def _base_images_text(base: Optional[str]) -> str:
    """How many photographs the base DDPM was trained on, from its own record ("the training photographs" if
    unknown)."""
    if not base or not Path(base).is_dir():
        return "the training photographs"
    info = read_json(Path(base) / TRAINING_INFO)
    if not info:
        return "the training photographs"
    stems = dataset_record(info).get("train_images")
    return f"{len(stems)} training photographs" if stems else "the training photographs"


def _adaptdiff_records(args: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Dataset records (:func:`dataset_provenance`) of an AdaptDiff workflow's labelled source and unlabelled target."""
    source = dataset_provenance({"train_data_dir": args["source_data_dir"], "image_dir": args.get("source_image_dir"),
                                 "mask_dir": args.get("source_mask_dir"), "train_stems": args.get("source_stems")})
    target = dataset_provenance({"train_data_dir": args["target_data_dir"], "image_dir": args.get("target_image_dir"),
                                 "train_stems": args.get("target_stems")})
    return source, target



# ------------------------------------------------------------------------------------------------ one builder per kind


def _segmentation_card(folder: Path, info: Dict[str, Any], repo_id: str) -> CardParts:
    """A trained ``SegmentationEnsemblePipeline`` folder (plain, MedSegDiff, anchored or feature-reusing refiner)."""
    evaluation = read_json(folder / EVALUATION)
    args = info["args"]
    record = dataset_record(info)
    card_data = _card_data(args, repo_id, "image-segmentation",
                           ["vessel-segmentation", "diffusion-segmentation", "uncertainty"], record=record,
                           metrics=["dice"], eval_results=segmentation_eval_results(evaluation))
    validation = info.get("validation_dice")
    unet_config = read_json(folder / "unet" / "config.json") or {}
    index = read_json(folder / "model_index.json") or {}
    return card_data, dict(
        model_description=_model_description(unet_config),
        medsegdiff=unet_config.get("_class_name") == "MedSegDiffUNet2DModel",
        feature_refiner=unet_config.get("_class_name") == "PriorFeatureRefinerModel",
        inference_steps=index.get("default_denoising_steps") or (evaluation or {}).get(
            "inference_steps", args.get("validation_inference_steps", 2)),
        ensemble_size=(evaluation or {}).get("ensemble_size", 5),
        validation_dice="not run" if validation is None else f"{validation:.3f}",
        anchor=index.get("anchor"),
        anchor_strength=index.get("anchor_strength"),
        prior_command=info.get("prior_command"),
        augmentation=_augmentation_text(args),
        **_common_card_fields(folder, info, record),
        evaluation=measured_markdown(evaluation) or evaluation_markdown(evaluation),
        measure_intervals=measure_intervals_markdown(folder),
    )


def _mask2image_card(folder: Path, info: Dict[str, Any], repo_id: str) -> CardParts:
    """A folder trained by ``training/train_mask2image.py`` (image model, mask model or fundus DDPM)."""
    args = info["args"]
    record = dataset_record(info)
    task = args.get("task", "image")
    evaluation = read_json(folder / EVALUATION)
    pipeline_tag = "image-to-image" if task == "image" else "unconditional-image-generation"
    results = eval_results(evaluation, pipeline_tag)
    if results is None and task == "image":
        results = synthesis_eval_results(evaluation, folder)
    card_data = _card_data(args, repo_id, pipeline_tag,
                           ["image-synthesis", {"mask": "vessel-mask", "fundus": "fundus-ddpm"}.get(task, "mask-to-image")],
                           record=record, eval_results=results)
    score = info.get("validation_faithfulness_dice")
    evaluation_text = measured_markdown(evaluation)
    if evaluation_text is None and task == "fundus":
        evaluation_text = ("Not evaluated yet: run `python benchmarks/label_efficiency.py --ddpm <this folder> "
                           "--write-card` (heads on its features against a supervised U-Net).")
    elif evaluation_text is None:
        evaluation_text = "Not evaluated yet: run `python benchmarks/evaluate_synthesis.py --pipelines <this folder> --write-card`."
    return card_data, dict(
        task=task,
        conditioning=args.get("conditioning", "concat"),
        spade_blocks=args.get("spade_blocks", "decoder"),
        spade_norm=args.get("spade_norm", "group"),
        condition_dropout=args.get("condition_dropout"),
        has_mask_model=bool(args.get("mask_pipeline")),
        loss=args.get("loss", "mse").upper(),
        validation_score="not run" if score is None else f"{score:.3f}",
        evaluation=evaluation_text,
        **_common_card_fields(folder, info, record),
    )


def _feature_head_details(args: Dict[str, Any], head_config: Dict[str, Any]) -> Tuple[str, str]:
    """The feature head's one-line description and its training details."""
    if args["head"] == "pixel_mlp":
        description = (f"`PixelMLPEnsemble`: {head_config.get('ensemble_size', args['ensemble_size'])} pixel MLPs "
                       "voting, mutual information as uncertainty")
        details = (f"{args['max_train_steps']} Adam steps (lr {args['learning_rate']}) per member, "
                   f"{args['pixels_per_step']} random pixels per step read bilinearly from the native-resolution maps")
    else:
        description = ("`FreqAggHead`: per-scale projections, time-conditioned normalisation, frequency-aware "
                       "fusion of scales and a per-pixel gate over timesteps")
        details = f"{args['max_train_steps']} AdamW steps (lr {args['learning_rate']}) on batches of 4 crops"
    details += ("; cross-entropy weighted by 1/sqrt(class frequency)" if args.get("class_weights") == "inverse_sqrt"
                else "; unweighted cross-entropy")
    return description, details


def _feature_head_card(folder: Path, info: Dict[str, Any], repo_id: str,
                       base_model: Optional[str] = None) -> CardParts:
    """A ``DiffusionFeaturePipeline`` folder trained by ``training/train_feature_head.py``; ``base_model`` (a Hub id)
    names the DDPM it reads features from, else it is resolved from the recorded ``--ddpm``."""
    args = info["args"]
    record = dataset_record(info)
    head_config = read_json(folder / "head" / "config.json") or {}
    evaluation = read_json(folder / EVALUATION)
    base = args.get("ddpm") or info.get("ddpm")
    card_data = _card_data(args, repo_id, "image-segmentation",
                           ["vessel-segmentation", "diffusion-features", "label-efficient"], record=record,
                           base_model=base_model or resolve_base_model(base),
                           eval_results=eval_results(evaluation) or feature_head_eval_results(evaluation, args,
                                                                                             head_config))
    head_description, details = _feature_head_details(args, head_config)
    evaluation_text = measured_markdown(evaluation) or (
        "Not evaluated yet: run `python benchmarks/label_efficiency.py` (see benchmarks/README.md).")
    unet_config = read_json(folder / "unet" / "config.json") or {}
    return card_data, dict(
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
        feature_context=args.get("feature_context", "crop"),
        field_of_view=bool(args.get("field_of_view", 0)),
        save_dtype=args.get("save_dtype", unet_config.get("torch_dtype", "float32")),
        data_description=data_description(record, args),
        data_scope=data_scope(record),
        mask_dir=record.get("mask_dir") or args.get("mask_dir") or "masks",
        base_model=card_data.base_model,
        base_location=base,
        base_images=_base_images_text(base),
        seed=args["seed"],
        command=info["command"],
        training_details=details,
        training_time=format_duration(info.get("training_seconds")),
        evaluation=evaluation_text,
    )


def _segmenter_card(folder: Path, info: Dict[str, Any], repo_id: str) -> CardParts:
    """A deterministic segmenter folder (``config.json`` + weights + ``training_info.json``, and ``evaluation.json``
    with a measured ``markdown`` table when one was written)."""
    args = info["args"]
    record = dataset_record(info)
    evaluation = read_json(folder / EVALUATION)
    card_data = _card_data(args, repo_id, "image-segmentation", ["vessel-segmentation", "unet"], record=record,
                           metrics=["dice"], eval_results=eval_results(evaluation))
    return card_data, dict(
        augmentation=_augmentation_text(args), **_common_card_fields(folder, info, record),
        evaluation=measured_markdown(evaluation) or "Not evaluated yet: run `benchmarks/evaluate_anchored.py`.",
    )


#: What each AdaptDiff workflow step does, from the workflow's arguments (the card's step table).
_ADAPTDIFF_STEPS: Dict[str, Callable[[Dict[str, Any], Dict[str, Any]], str]] = {
    "pseudo-labels": lambda args, record: (
        "the source segmenter labels the target images"
        + (f" after `{_chosen_transform(args, record)}`" if _chosen_transform(args, record) != "none" else "")
        + (f" (five agreeing views; threshold {record['threshold']:.3f})" if record.get("threshold") is not None
           else "")
        + (f", corrupted at {args['pseudo_label_fp']:.0%} FP / {args['pseudo_label_fn']:.0%} FN"
           if args.get("pseudo_label_fp") or args.get("pseudo_label_fn") else "")),
    "diffusion": lambda args, record: (f"{args['diffusion_steps']} steps of the conditional diffusion model on "
                                       f"{args['diffusion_resolution']}² crops of the target images given their "
                                       "pseudo-labels"),
    "synthesis": lambda args, record: (f"{args['images_per_mask']} synthetic image(s) per real source mask"
                                       + (f" ({args['paint_crop']}² crops)" if args.get("paint_crop") else "") + ", "
                                       f"{args['paint_steps']} DDIM steps, histogram-matched to target images"),
    "fine-tune": lambda args, record: (
        f"{args['finetune_steps']} steps of fine-tuning on "
        + {"combined": "the synthetic pairs and, as often, the target images with their confident pseudo-labels",
           "self-training": "the target images with their confident pseudo-labels"}.get(
            args.get("method", "adaptdiff"), "the synthetic pairs")
        + (f", moved into the source's intensity space (`{record['input_transform']}`; the pipeline stores the "
           "transform as its `input_transform` and reads every target image through it)"
           if record.get("input_transform") else "")
        + " (BCE + soft Dice, fresh patches, flips and photometric changes each epoch)"),
    "calibrate": lambda args, record: (
        f"temperature {record['temperature']:.2f} fitted to the source segmenter's probabilities on the target, "
        "folded into the output layer" if record.get("temperature") else "no calibration"),
}


def _chosen_transform(args: Dict[str, Any], record: Dict[str, Any]) -> str:
    """The pseudo-label transform a run used (``auto`` resolves to the one its label-free rule chose)."""
    return (record.get("transform") or {}).get("chosen") or args.get("pseudo_label_transform", "none")


def _step_wall_time(step: Dict[str, Any]) -> str:
    """An AdaptDiff step's time: the training script's clock (over resumed runs) when recorded, else the wall time."""
    if step.get("training_seconds") is not None:
        return format_duration(step["training_seconds"]) + " (training clock)"
    return format_duration(step.get("seconds"))


def _adaptdiff_card(folder: Path, info: Dict[str, Any], repo_id: str) -> CardParts:
    """An adapted ``AdaptDiffPipeline`` folder written by ``training/adaptdiff_workflow.py`` (its
    ``training_info.json`` holds the workflow's arguments and every step's record)."""
    args = info["args"]
    source, target = _adaptdiff_records(args)
    evaluation = read_json(folder / EVALUATION)
    base_model = resolve_base_model(args.get("source_segmenter"))
    card_data = _card_data(args, repo_id, "image-segmentation",
                           ["vessel-segmentation", "domain-adaptation", "adaptdiff", "fluorescein-angiography"],
                           record=source, base_model=base_model, metrics=["dice"],
                           eval_results=eval_results(evaluation))
    unet_config = read_json(folder / "unet" / "config.json") or {}
    scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json") or {}
    input_transform = (read_json(folder / "model_index.json") or {}).get("input_transform")
    steps = info.get("steps", {})
    rows = "\n".join(f"| {number}. {name} | {describe(args, steps.get(name, {}))} | "
                     f"{_step_wall_time(steps.get(name, {}))} |"
                     for number, (name, describe) in enumerate(_ADAPTDIFF_STEPS.items(), start=1) if name in steps)
    transform = _chosen_transform(args, steps.get("pseudo-labels", {}))
    note = ("Pseudo-labels: AdaptDiff labels the raw target images with the source segmenter. "
            + (f"Here the target images were first moved towards the source's intensities (`{transform}`, "
               "`diffusers_retina.data.modality.to_source_intensities`), chosen "
               + ("by the workflow's label-free rule (the vessel fraction closest to the source's)"
                  if args.get("pseudo_label_transform") == "auto" else "on the training images")
               + ": the labels only need to be weak, but on the raw target the source segmenter marks almost nothing."
               if transform != "none" else "Here the raw target images were labelled, as published."))
    return card_data, dict(
        base_model=base_model or args.get("source_segmenter"),
        conditioning=f"{unet_config.get('conditioning', 'spade')} conditioning "
                     f"({unet_config.get('spade_blocks', 'decoder')} blocks, {unet_config.get('spade_norm', 'instance')} norm)",
        num_train_timesteps=scheduler_config.get("num_train_timesteps", args.get("num_train_timesteps")),
        prediction_type=scheduler_config.get("prediction_type", args.get("diffusion_prediction_type")),
        source_description=data_description(source, {"train_data_dir": args["source_data_dir"]}),
        target_description=data_description({**target, "mask_dir": None}, {"train_data_dir": args["target_data_dir"]}),
        command=info["command"], step_rows=rows, pseudo_label_note=note, method=args.get("method", "adaptdiff"),
        input_transform_note=(
            f"`input_transform` (in `model_index.json`): `{input_transform['transform']}`, the transform the segmenter "
            "was fine-tuned through (for histogram matching, the source photographs' intensity quantiles are stored); "
            "`segment` and `pseudo_label` move every image through it first, so pass target images as they are"
            if input_transform else "`input_transform`: none (`segment` reads target images as they are)"),
        evaluation=(measured_markdown(evaluation)
                    or "Not evaluated yet: run `benchmarks/evaluate_adaptdiff.py --write-card ...`."),
    )


#: The kinds of checkpoint with a card: each kind's template (in ``model_cards/``) and its builder of the card metadata
#: and the template's fields.
CARD_KINDS: Dict[str, Tuple[str, Callable[..., CardParts]]] = {
    "segmentation": ("segmentation_ensemble.md", _segmentation_card),
    "segmenter": ("vessel_segmenter.md", _segmenter_card),
    "mask2image": ("mask2image.md", _mask2image_card),
    "feature_head": ("diffusion_features.md", _feature_head_card),
    "adaptdiff": ("adaptdiff.md", _adaptdiff_card),
}


def card_kind(folder: Union[str, os.PathLike]) -> str:
    """The kind of checkpoint ``folder`` holds (a key of :data:`CARD_KINDS`), from its ``model_index.json`` (the
    pipeline class) or, for a single model, its ``config.json``."""
    folder = Path(folder)
    index = read_json(folder / "model_index.json")
    if index:
        kinds = {"SegmentationEnsemblePipeline": "segmentation", "Mask2ImagePipeline": "mask2image",
                 "DDPMPipeline": "mask2image", "DiffusionFeaturePipeline": "feature_head",
                 "AdaptDiffPipeline": "adaptdiff"}
        class_name = index.get("_class_name")  # custom pipelines save [module, class]
        kind = kinds.get(class_name[-1] if isinstance(class_name, list) else str(class_name))
        if kind:
            return kind
    elif read_json(folder / "config.json") is not None:
        return "segmenter"
    raise ValueError(f"{folder} is not a checkpoint with a model card (no known model_index.json or config.json).")


def model_card(folder: Union[str, os.PathLike], kind: Optional[str] = None, repo_id: Optional[str] = None,
               **kwargs: Any) -> ModelCard:
    """Build the model card of a trained checkpoint folder from its ``training_info.json`` and ``evaluation.json``.

    Args:
        folder: The checkpoint folder (a saved pipeline, or a single model's folder for ``kind="segmenter"``).
        kind: A key of :data:`CARD_KINDS`; found from the folder's configs when not given (:func:`card_kind`).
        repo_id: The repo the card names (default: the run's ``--hub_model_id``, else the folder's name).
        kwargs: Passed to the kind's builder (``base_model=`` for ``"feature_head"``).

    Example:
        >>> card = model_card("checkpoints/segmentation-ensemble-chase")  # doctest: +SKIP
        >>> card.data.license  # doctest: +SKIP
        'cc-by-4.0'
    """
    folder = Path(folder)
    kind = kind or card_kind(folder)
    if kind not in CARD_KINDS:
        raise ValueError(f"kind={kind!r} is not one of {sorted(CARD_KINDS)}.")
    template, build = CARD_KINDS[kind]
    info = training_info(folder)
    repo_id = default_repo_id(folder, info["args"], repo_id)
    card_data, fields = build(folder, info, repo_id, **kwargs)
    return ModelCard.from_template(card_data, template_path=str(TEMPLATES / template), model_name=repo_id,
                                   repo_id=repo_id, **fields)


def write_model_card(folder: Union[str, os.PathLike], kind: Optional[str] = None, repo_id: Optional[str] = None,
                     **kwargs: Any) -> Path:
    """Render :func:`model_card` and save it as ``folder/README.md``; returns its path."""
    path = Path(folder) / "README.md"
    model_card(folder, kind, repo_id, **kwargs).save(str(path))
    return path


def _named_for(kind: str) -> Tuple[Callable[..., ModelCard], Callable[..., Path]]:
    """``<kind>_model_card`` and ``write_<kind>_card``: :func:`model_card` and :func:`write_model_card` for one kind
    (the names the training scripts and benchmarks have always used)."""
    def card(folder: Union[str, os.PathLike], repo_id: Optional[str] = None, **kwargs: Any) -> ModelCard:
        return model_card(folder, kind, repo_id, **kwargs)

    def write(folder: Union[str, os.PathLike], repo_id: Optional[str] = None, **kwargs: Any) -> Path:
        return write_model_card(folder, kind, repo_id, **kwargs)

    card.__name__, write.__name__ = f"{kind}_model_card", f"write_{kind}_card"
    card.__doc__ = f"The model card of a {kind!r} checkpoint folder (:func:`model_card` with ``kind={kind!r}``)."
    write.__doc__ = f"Write ``README.md`` of a {kind!r} checkpoint folder (:func:`write_model_card`); returns its path."
    return card, write


segmentation_model_card, write_segmentation_card = _named_for("segmentation")
segmenter_model_card, write_segmenter_card = _named_for("segmenter")
mask2image_model_card, write_mask2image_card = _named_for("mask2image")
feature_head_model_card, write_feature_head_card = _named_for("feature_head")
adaptdiff_model_card, write_adaptdiff_card = _named_for("adaptdiff")
