"""Model cards for diffusers-retina checkpoints (huggingface_hub ``ModelCard`` / ``ModelCardData``).

A trained pipeline folder holds two JSON files next to the weights:

* ``training_info.json`` written by the training script (arguments, command, steps, time, parameters);
* ``evaluation.json`` written by the evaluation benchmark (measured test metrics), optional.

``write_segmentation_card(folder)`` renders ``model_cards/segmentation_ensemble.md`` from both, so the card always
reports what was measured, and the same function serves the training script, the benchmark and ``push_to_hub``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .utils.io_utils import command_line, read_json, write_json  # noqa: F401 (re-exported: hub.read_json, ...)

TEMPLATES = Path(__file__).resolve().parents[1] / "model_cards"
TRAINING_INFO = "training_info.json"
EVALUATION = "evaluation.json"

#: Files of a data folder (or of the folder above it) that say where the data comes from and under which licence,
#: read in this order; the first that names a licence wins (``README.md`` is read for its YAML front-matter only, as
#: in a Hugging Face dataset card).
PROVENANCE_FILES = ("PROVENANCE.md", "PROVENANCE.txt", "README.md", "LICENSE.txt", "LICENSE.md", "LICENSE")

#: Licence phrases and the Hub's licence identifiers (https://huggingface.co/docs/hub/repositories-licenses).
_LICENSE_PATTERNS = (
    (r"\bCC[ -]?BY[ -]NC[ -]SA[ -]?(\d\.\d)", "cc-by-nc-sa-{}"),
    (r"\bCC[ -]?BY[ -]NC[ -]ND[ -]?(\d\.\d)", "cc-by-nc-nd-{}"),
    (r"\bCC[ -]?BY[ -]NC[ -]?(\d\.\d)", "cc-by-nc-{}"),
    (r"\bCC[ -]?BY[ -]SA[ -]?(\d\.\d)", "cc-by-sa-{}"),
    (r"\bCC[ -]?BY[ -]ND[ -]?(\d\.\d)", "cc-by-nd-{}"),
    (r"\bCC[ -]?BY[ -]?(\d\.\d)", "cc-by-{}"),
    (r"Creative Commons Attribution[- ]NonCommercial[- ]ShareAlike (\d\.\d)", "cc-by-nc-sa-{}"),
    (r"Creative Commons Attribution[- ]NonCommercial (\d\.\d)", "cc-by-nc-{}"),
    (r"Creative Commons Attribution[- ]ShareAlike (\d\.\d)", "cc-by-sa-{}"),
    (r"Creative Commons Attribution (\d\.\d)", "cc-by-{}"),
    (r"\bCC0\b", "cc0-1.0"),
    (r"\bApache(?: License)?,? (?:Version )?2\.0", "apache-2.0"),
    (r"\bMIT License\b", "mit"),
    (r"\bODbL\b", "odbl"),
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


def _training_info(folder: Path) -> Dict[str, Any]:
    """``training_info.json`` of a trained folder (written by every training script)."""
    info = read_json(folder / TRAINING_INFO)
    if info is None:
        raise FileNotFoundError(f"{folder / TRAINING_INFO} is missing: it is written by the training script.")
    return info


# ------------------------------------------------------------------------------------------------ data provenance


def license_id(text: Optional[str]) -> Optional[str]:
    """The Hub licence identifier a licence phrase names (``"CC BY 4.0"`` -> ``"cc-by-4.0"``), a Hub identifier as
    is (``"cc-by-4.0"``), or None when ``text`` names none.

    Example:
        >>> license_id("Licensed under the Creative Commons Attribution 4.0 International licence (CC BY 4.0)")
        'cc-by-4.0'
    """
    if not text:
        return None
    stripped = text.strip()
    if re.fullmatch(r"[a-z0-9][a-z0-9.\-]*", stripped):  # already an identifier (cc-by-4.0, apache-2.0, other)
        return stripped
    for pattern, template in _LICENSE_PATTERNS:
        match = re.search(pattern, text, flags=re.IGNORECASE)
        if match:
            return template.format(*match.groups())
    return None


def _front_matter(text: str) -> Dict[str, Any]:
    """The YAML front-matter of a markdown file (a Hugging Face dataset card), or ``{}``."""
    match = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, flags=re.DOTALL)
    if not match:
        return {}
    try:
        import yaml

        data = yaml.safe_load(match.group(1))
    except Exception:  # noqa: BLE001 -- a broken front-matter is no provenance
        return {}
    return data if isinstance(data, dict) else {}


def _attribution(text: str) -> Optional[str]:
    """The citation a provenance text asks for: the lines after one that says "cite" (until a blank line or a line
    that is not indented), joined; else None."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if re.search(r"\bcite\b", line, flags=re.IGNORECASE):
            block = []
            for following in lines[index + 1:]:
                if not following.strip() or not following.startswith((" ", "\t")):
                    break
                block.append(following.strip())
            if block:
                return " ".join(block)
    return None


def read_provenance_file(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """What a provenance or licence file says: ``name`` (its first heading's first word, or a ``Dataset:`` line),
    ``license`` (Hub identifier), ``license_text`` (the phrase as written), ``attribution`` (the citation asked for),
    ``homepage`` (the first URL); keys it does not give are left out. A ``README.md`` counts only through its YAML
    front-matter (``license``, ``pretty_name``, ``citation``/``attribution``, ``homepage``)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    record: Dict[str, Any] = {}
    if path.name.lower() == "readme.md":
        meta = _front_matter(text)
        for key, target in (("pretty_name", "name"), ("license", "license_text"), ("citation", "attribution"),
                            ("attribution", "attribution"), ("homepage", "homepage")):
            value = meta.get(key)
            if isinstance(value, list):
                value = value[0] if value else None
            if value and target not in record:
                record[target] = str(value).strip()
        if "license_text" in record:
            record["license"] = license_id(record["license_text"])
        return {key: value for key, value in record.items() if value}
    heading = re.search(r"^#\s*([\w.\-]+)", text, flags=re.MULTILINE)
    dataset_line = re.search(r"^Dataset:\s*([\w.\-]+)", text, flags=re.MULTILINE)
    if heading or dataset_line:
        record["name"] = (heading or dataset_line).group(1)
    licence_line = re.search(r"^Licen[cs]e[d]?:?\s*(.+)$", text, flags=re.MULTILINE | re.IGNORECASE)
    identifier = license_id(licence_line.group(1) if licence_line else None) or license_id(text)
    if identifier:
        record["license"] = identifier
        phrase = re.search(r"\bCC[ -]?BY[\w .\-]*?\d\.\d|\bCC0\b|Apache[\w ,]*2\.0|\bMIT\b", text)
        record["license_text"] = phrase.group(0).strip() if phrase else identifier
    attribution = _attribution(text)
    if attribution:
        record["attribution"] = attribution
    url = re.search(r"https?://[^\s)>\]]+", text)
    if url:
        record["homepage"] = url.group(0).rstrip(".,;")
    return record


def _data_root(args: Dict[str, Any]) -> Optional[Path]:
    folder = args.get("train_data_dir")
    return Path(folder).expanduser() if folder else None


def _provenance_from_folder(root: Path) -> Dict[str, Any]:
    """Merge the provenance files of ``root`` and of the folder above it (a prepared copy inside the dataset folder):
    the first file that gives a key wins; ``source`` lists the files read."""
    record: Dict[str, Any] = {}
    sources: List[str] = []
    for folder in (root, root.parent):
        for name in PROVENANCE_FILES:
            path = folder / name
            if not path.is_file():
                continue
            found = read_provenance_file(path)
            if not found:
                continue
            sources.append(str(path.resolve()))
            for key, value in found.items():
                record.setdefault(key, value)
        if record.get("license"):
            break
    if sources:
        record["source"] = sources
    return record


def _provenance_from_datasets(name: str, config: Optional[str] = None) -> Dict[str, Any]:
    """Licence, citation and homepage of a ``datasets`` dataset from its metadata only (no image is decoded): a folder
    written by ``save_to_disk`` (its ``dataset_info.json``/``state``) or a Hub dataset's builder info."""
    record: Dict[str, Any] = {"name": name}
    info: Any = None
    try:
        if Path(name).expanduser().is_dir():
            import datasets

            loaded = datasets.load_from_disk(str(Path(name).expanduser()))
            first = next(iter(loaded.values())) if isinstance(loaded, datasets.DatasetDict) else loaded
            info = first.info
            record["name"] = info.dataset_name or Path(name).name
        else:
            from datasets import load_dataset_builder

            info = load_dataset_builder(name, config).info
    except Exception:  # noqa: BLE001 -- no metadata: the record says so
        info = None
    if info is not None:
        if info.license:
            record["license_text"] = info.license
            record["license"] = license_id(info.license)
        if info.citation:
            record["attribution"] = info.citation.strip()
        if info.homepage:
            record["homepage"] = info.homepage
    record["source"] = [f"datasets:{name}"]
    return {key: value for key, value in record.items() if value}


def dataset_provenance(args: Dict[str, Any]) -> Dict[str, Any]:
    """The training data's provenance, as ``training_info.json`` records it under ``"dataset"``.

    From the data source, never from its path's name: ``--dataset_license`` / ``--dataset_attribution`` /
    ``--dataset_id`` when given (they win), then the provenance or licence files of ``--train_data_dir`` (or of the
    folder above it; :data:`PROVENANCE_FILES`), or the metadata of the ``--dataset_name`` dataset. Also what was used:
    ``train_stems`` (the image stems selected by ``--train_stems``, or all), ``validation_stems`` and the mask folder.

    Returns:
        ``{"name", "license", "license_text", "attribution", "homepage", "source", "train_images", ...}`` with the keys
        that are known; ``license`` is None when no source names one.

    Example:
        >>> dataset_provenance({"train_data_dir": "../shared/data/chase_db1", "mask_dir": "1stHO"})["license"]  # doctest: +SKIP
        'cc-by-4.0'
    """
    record: Dict[str, Any] = {}
    if args.get("dataset_name"):
        record = _provenance_from_datasets(str(args["dataset_name"]), args.get("dataset_config_name"))
    else:
        root = _data_root(args)
        if root is not None and root.is_dir():
            record = _provenance_from_folder(root)
            record.setdefault("name", root.resolve().name)
            stems = _selected_stems(root, args)
            if stems is not None:
                record["train_images"] = stems
            if args.get("mask_dir"):
                record["mask_dir"] = args["mask_dir"]
            if args.get("validation_stems"):
                record["validation_stems"] = args["validation_stems"]
    if args.get("dataset_id"):
        record["name"] = args["dataset_id"]
    if args.get("dataset_license"):
        record["license_text"] = args["dataset_license"]
        record["license"] = license_id(args["dataset_license"]) or "other"
        record["source"] = ["--dataset_license"] + list(record.get("source", []))
    if args.get("dataset_attribution"):
        record["attribution"] = args["dataset_attribution"]
    record.setdefault("license", None)
    return record


def _selected_stems(root: Path, args: Dict[str, Any]) -> Optional[List[str]]:
    """The image stems ``--train_stems`` selects under ``root/--image_dir`` (all when not given); None if unknown.
    The feature head's ``train_stems`` is a plain list of stems and is returned as given."""
    import fnmatch

    folder = root / (args.get("image_dir") or "images")
    if not folder.is_dir():
        return None
    suffix = args.get("image_suffix") or ""
    stems = sorted(p.stem[: len(p.stem) - len(suffix)] if suffix else p.stem
                   for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    patterns = args.get("train_stems")
    if not patterns:
        return stems
    return [s for s in stems if any(fnmatch.fnmatch(s, pat.strip()) for pat in str(patterns).split(","))]


def dataset_record(info: Dict[str, Any]) -> Dict[str, Any]:
    """The ``"dataset"`` record of a ``training_info.json``; for records written before it existed, read from the
    data source now (:func:`dataset_provenance`)."""
    recorded = info.get("dataset")
    if isinstance(recorded, dict):
        return recorded
    return dataset_provenance(info.get("args", {}))


def _stem_range(stems: Sequence[str]) -> str:
    return stems[0] if len(stems) == 1 else f"{stems[0]}–{stems[-1]}"


def data_description(record: Dict[str, Any], args: Dict[str, Any]) -> str:
    """The card's training-data paragraph, from the dataset record: name and link, licence as written, what was used
    (image count and range, mask folder, validation images) and the attribution the data asks for."""
    name = record.get("name") or args.get("train_data_dir") or args.get("dataset_name") or "the training data"
    text = f"[{name}]({record['homepage']})" if record.get("homepage") else f"`{name}`"
    if record.get("license"):
        text += f", licensed **{record.get('license_text') or record['license']}**."
    else:
        text += (": its licence was not recorded (no provenance or licence file beside the data, no "
                 "`--dataset_license`); check it before reusing these weights.")
    stems = record.get("train_images")
    if stems:
        text += f" Training used {len(stems)} image(s) ({_stem_range(stems)})"
        text += f" with the masks in `{record['mask_dir']}`." if record.get("mask_dir") else "."
    if record.get("validation_stems"):
        text += f" Validation (monitoring only): `{record['validation_stems']}`."
    if record.get("attribution"):
        text += f" Cite: {record['attribution']}"
    return text


def data_scope(record: Dict[str, Any]) -> str:
    """``"20 images of one dataset (CHASE_DB1)"``, for the cards' limitations."""
    stems = record.get("train_images")
    count = f"{len(stems)} images" if stems else "the images"
    return f"{count} of one dataset ({record.get('name') or 'see Training data'})"


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
    repo_id = default_repo_id(folder, args, repo_id)
    record = dataset_record(info)

    eval_results = _eval_results(evaluation) or []
    if evaluation and not eval_results and evaluation.get("rows") and evaluation["rows"][0].get("metrics"):
        # evaluate_segmentation.py: the first row is this pipeline, measured on the evaluation's named images
        main_row = evaluation["rows"][0]
        split = evaluation.get("split") or _evaluation_split(evaluation)
        for metric, value in main_row["metrics"].items():
            if metric in METRIC_LABELS and value is not None:
                eval_results.append(EvalResult(
                    task_type="image-segmentation", dataset_type=_dataset_type(evaluation),
                    dataset_name=_evaluation_dataset(evaluation), dataset_split=split, metric_type=metric,
                    metric_name=METRIC_LABELS[metric], metric_value=round(float(value), 4),
                ))
    card_data = _card_data(args, repo_id, "image-segmentation",
                           ["vessel-segmentation", "diffusion-segmentation", "uncertainty"], record=record,
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
        evaluation=_measured_markdown(evaluation) or _evaluation_markdown(evaluation),
        measure_intervals=_measure_intervals_markdown(folder),
    )


def _measure_intervals_markdown(folder: Path) -> Optional[str]:
    """The card's paragraph on the calibrated vessel-measure intervals saved in ``folder``, if any."""
    record = read_json(folder / "measure_intervals.json")
    if not record:
        return None
    factors = ", ".join(f"{name} {value:.2f}" for name, value in record["factors"].items())
    return (f"`diffusers-retina measure` gives each vessel measure a {record['confidence']:.0%} interval from the "
            f"ensemble members: {record['centre']} ± factor × the members' standard deviation, the factors fitted "
            f"by split-conformal calibration on {record['calibrated_on']} ({record['unit']} units). Factors: "
            f"{factors}. How often these intervals cover a human's measure on the test photographs is in "
            "`docs/results.md` of the diffusers-retina repository.")


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
        training_time=_format_duration(info.get("training_seconds")),
        training_notes=info.get("notes"),
    )


def mask2image_model_card(folder: Union[str, os.PathLike], repo_id: Optional[str] = None) -> ModelCard:
    """Model card of a folder trained by ``training/train_mask2image.py`` (image model or mask model)."""
    folder = Path(folder)
    info = _training_info(folder)
    args = info["args"]
    repo_id = default_repo_id(folder, args, repo_id)
    record = dataset_record(info)
    task = args.get("task", "image")
    evaluation = read_json(folder / EVALUATION)
    eval_results = _eval_results(evaluation, "image-to-image" if task == "image" else "unconditional-image-generation")
    if eval_results is None and task == "image":
        eval_results = _synthesis_eval_results(evaluation, folder)
    card_data = _card_data(args, repo_id,
                           "image-to-image" if task == "image" else "unconditional-image-generation",
                           ["image-synthesis", {"mask": "vessel-mask", "fundus": "fundus-ddpm"}.get(task, "mask-to-image")],
                           record=record, eval_results=eval_results)
    score = info.get("validation_faithfulness_dice")
    evaluation_text = _measured_markdown(evaluation)
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
        **_common_card_fields(folder, info, record),
    )


def write_mask2image_card(folder: Union[str, os.PathLike], repo_id: Optional[str] = None) -> Path:
    """Render and save ``README.md`` of a mask-to-image (or mask model) folder; returns its path."""
    path = Path(folder) / "README.md"
    mask2image_model_card(folder, repo_id=repo_id).save(str(path))
    return path


def feature_head_model_card(folder: Union[str, os.PathLike], repo_id: Optional[str] = None,
                            base_model: Optional[str] = None) -> ModelCard:
    """Model card of a `DiffusionFeaturePipeline` folder trained by ``training/train_feature_head.py``."""
    folder = Path(folder)
    info = _training_info(folder)
    args = info["args"]
    repo_id = default_repo_id(folder, args, repo_id)
    record = dataset_record(info)
    head_config = read_json(folder / "head" / "config.json") or {}
    evaluation = read_json(folder / EVALUATION)
    base = args.get("ddpm") or info.get("ddpm")
    card_data = _card_data(args, repo_id, "image-segmentation",
                           ["vessel-segmentation", "diffusion-features", "label-efficient"], record=record,
                           base_model=base_model or resolve_base_model(base),
                           eval_results=_eval_results(evaluation) or _feature_head_eval_results(evaluation, args,
                                                                                               head_config))
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
    evaluation_text = _measured_markdown(evaluation) or (
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
        training_time=_format_duration(info.get("training_seconds")),
        evaluation=evaluation_text,
    )


def write_feature_head_card(folder: Union[str, os.PathLike], repo_id: Optional[str] = None,
                            base_model: Optional[str] = None) -> Path:
    """Render and save ``README.md`` of a `DiffusionFeaturePipeline` folder; returns its path."""
    path = Path(folder) / "README.md"
    feature_head_model_card(folder, repo_id=repo_id, base_model=base_model).save(str(path))
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
    repo_id = default_repo_id(folder, args, repo_id)
    record = dataset_record(info)
    evaluation = read_json(folder / EVALUATION)
    card_data = _card_data(args, repo_id, "image-segmentation", ["vessel-segmentation", "unet"], record=record,
                           metrics=["dice"], eval_results=_eval_results(evaluation))
    return ModelCard.from_template(
        card_data, template_path=str(TEMPLATES / "vessel_segmenter.md"), model_name=repo_id, repo_id=repo_id,
        augmentation=_augmentation_text(args), **_common_card_fields(folder, info, record),
        evaluation=_measured_markdown(evaluation) or "Not evaluated yet: run `benchmarks/evaluate_anchored.py`.",
    )


def _evaluation_dataset(evaluation: Dict[str, Any]) -> str:
    """The dataset an ``evaluation.json`` measured on: its ``dataset`` entry (CHASE_DB1 for the benchmarks of this
    repository, which all read the CHASE_DB1 test images)."""
    return str(evaluation.get("dataset") or "CHASE_DB1")


def _dataset_type(evaluation: Dict[str, Any]) -> str:
    return re.sub(r"[^a-z0-9]+", "_", _evaluation_dataset(evaluation).lower()).strip("_")


def _evaluation_split(evaluation: Dict[str, Any]) -> str:
    """The evaluated images as the evaluation names them (its ``images``, reference annotation and crop)."""
    images = evaluation.get("images") or []
    named = f"test ({_stem_range(images)}" if images else "test (Image_11L–Image_14R"
    named += f", {evaluation.get('reference', '1stHO')}"
    crop = evaluation.get("crop")
    named += f", central {crop}x{crop} crops)" if crop else ", full resolution)"
    return named


def _eval_results(evaluation: Optional[Dict[str, Any]],
                  task_type: str = "image-segmentation") -> Optional[List[EvalResult]]:
    """``model-index`` entries from an ``evaluation.json`` that names its ``metrics`` (a full test-set evaluation)."""
    if not evaluation or not evaluation.get("metrics"):
        return None
    return [EvalResult(task_type=task_type, dataset_type=_dataset_type(evaluation),
                       dataset_name=_evaluation_dataset(evaluation),
                       dataset_split=evaluation.get("split", "test (Image_11L–Image_14R, 1stHO, full resolution)"),
                       metric_type=metric, metric_name=METRIC_LABELS.get(metric, metric),
                       metric_value=round(float(value), 4))
            for metric, value in evaluation["metrics"].items() if value is not None]


def _synthesis_eval_results(evaluation: Optional[Dict[str, Any]], folder: Path) -> Optional[List[EvalResult]]:
    """``model-index`` of a mask-to-image pipeline from ``benchmarks/evaluate_synthesis.py``: the faithfulness of its
    images (Dice of the reference segmenter's masks of them against the masks they were painted from) at the
    pipeline's default guidance scale, when that row was measured for this pipeline on the named test masks."""
    if not evaluation or not evaluation.get("rows") or not evaluation.get("images"):
        return None
    default_scale = (read_json(folder / "model_index.json") or {}).get("default_guidance_scale", 1.5)
    rows = [row for row in evaluation["rows"] if row.get("guidance_scale") == default_scale and "dice" in row
            and row.get("pipeline") and Path(str(row["pipeline"])).name == folder.name]
    if len(rows) != 1:
        return None
    split = _evaluation_split(evaluation).replace("test (", "test masks (")
    results = []
    for metric, label in (("dice", "Faithfulness Dice"), ("cldice", "Faithfulness clDice")):
        if rows[0].get(metric) is not None:
            results.append(EvalResult(task_type="image-to-image", dataset_type=_dataset_type(evaluation),
                                      dataset_name=_evaluation_dataset(evaluation), dataset_split=split,
                                      metric_type=f"faithfulness_{metric}", metric_name=label,
                                      metric_value=round(float(rows[0][metric]), 4)))
    return results or None


def _feature_head_eval_results(evaluation: Optional[Dict[str, Any]], args: Dict[str, Any],
                               head_config: Dict[str, Any]) -> Optional[List[EvalResult]]:
    """``model-index`` of a feature head from ``benchmarks/label_efficiency.py``: the row measured for the run that
    trained these weights (its ``folder`` is the head's ``--output_dir``; clean test images), when there is one."""
    if not evaluation or not evaluation.get("rows"):
        return None
    trained = Path(str(args.get("output_dir", ""))).name
    rows = [row for row in evaluation["rows"]  # the row of the run that trained these weights, on clean images
            if row.get("folder") and Path(row["folder"]).name == trained and row.get("condition", "clean") == "clean"
            and row.get("metrics")]
    if len(rows) != 1:
        return None
    crop = re.search(r"central (\d+)x\1 crops", evaluation.get("markdown", ""))
    split = "test (Image_11L–Image_14R, 1stHO" + (f", central {crop.group(1)}x{crop.group(1)} crops)" if crop
                                                   else ", full resolution)")
    return [EvalResult(task_type="image-segmentation", dataset_type=_dataset_type(evaluation),
                       dataset_name=_evaluation_dataset(evaluation), dataset_split=split, metric_type=metric,
                       metric_name=METRIC_LABELS.get(metric, metric), metric_value=round(float(value), 4))
            for metric, value in rows[0]["metrics"].items() if metric in METRIC_LABELS and value is not None] or None


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


# ------------------------------------------------------------------------------------------------ AdaptDiff


def _adaptdiff_records(args: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Dataset records (:func:`dataset_provenance`) of an AdaptDiff workflow's labelled source and unlabelled target."""
    source = dataset_provenance({"train_data_dir": args["source_data_dir"], "image_dir": args.get("source_image_dir"),
                                 "mask_dir": args.get("source_mask_dir"), "train_stems": args.get("source_stems")})
    target = dataset_provenance({"train_data_dir": args["target_data_dir"], "image_dir": args.get("target_image_dir"),
                                 "train_stems": args.get("target_stems")})
    return source, target


def adaptdiff_model_card(folder: Union[str, os.PathLike], repo_id: Optional[str] = None) -> ModelCard:
    """The model card of an adapted ``AdaptDiffPipeline`` folder written by ``training/adaptdiff_workflow.py`` (its
    ``training_info.json`` holds the workflow's arguments and every step's record; ``evaluation.json`` the measured
    table when ``benchmarks/evaluate_adaptdiff.py --write-card`` wrote one).

    Example:
        >>> card = adaptdiff_model_card("checkpoints/adaptdiff-chase-fa")  # doctest: +SKIP
    """
    folder = Path(folder)
    info = _training_info(folder)
    args = info["args"]
    repo_id = default_repo_id(folder, args, repo_id)
    source, target = _adaptdiff_records(args)
    evaluation = read_json(folder / EVALUATION)
    base_model = resolve_base_model(args.get("source_segmenter"))
    card_data = _card_data(args, repo_id, "image-segmentation",
                           ["vessel-segmentation", "domain-adaptation", "adaptdiff", "fluorescein-angiography"],
                           record=source, base_model=base_model, metrics=["dice"],
                           eval_results=_eval_results(evaluation))
    unet_config = read_json(folder / "unet" / "config.json") or {}
    scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json") or {}
    steps = info.get("steps", {})
    what = {
        "pseudo-labels": "the source segmenter labels the target images"
                         + (f" after `{args['pseudo_label_transform']}`" if args.get("pseudo_label_transform",
                                                                               "none") != "none" else "")
                         + (f", corrupted at {args['pseudo_label_fp']:.0%} FP / {args['pseudo_label_fn']:.0%} FN"
                            if args.get("pseudo_label_fp") or args.get("pseudo_label_fn") else ""),
        "diffusion": f"{args['diffusion_steps']} steps of the conditional diffusion model on "
                     f"{args['diffusion_resolution']}² crops of the target images given their pseudo-labels",
        "synthesis": f"{args['images_per_mask']} synthetic image(s) per real source mask, {args['paint_steps']} DDIM "
                     "steps, histogram-matched to target images",
        "fine-tune": f"{args['finetune_steps']} steps of fine-tuning on the synthetic pairs (BCE + soft Dice, fresh "
                     "patches, flips and photometric changes each epoch)",
    }
    def wall_time(step: Dict[str, Any]) -> str:
        if step.get("training_seconds") is not None:  # the training script's clock, over resumed runs
            return _format_duration(step["training_seconds"]) + " (training clock)"
        return _format_duration(step.get("seconds"))

    rows = "\n".join(f"| {number}. {name} | {what[name]} | {wall_time(steps.get(name, {}))} |"
                     for number, name in enumerate(what, start=1))
    transform = args.get("pseudo_label_transform", "none")
    note = ("Pseudo-labels: AdaptDiff labels the raw target images with the source segmenter. "
            + (f"Here the target images were first moved towards the source's intensities (`{transform}`, "
               "`diffusers_retina.data.modality.to_source_intensities`), chosen on the training images: the labels "
               "only need to be weak, but on the raw target the source segmenter marks almost nothing."
               if transform != "none" else "Here the raw target images were labelled, as published."))
    measured = _measured_markdown(evaluation)
    return ModelCard.from_template(
        card_data, template_path=str(TEMPLATES / "adaptdiff.md"), model_name=repo_id, repo_id=repo_id,
        base_model=base_model or args.get("source_segmenter"),
        conditioning=f"{unet_config.get('conditioning', 'spade')} conditioning "
                     f"({unet_config.get('spade_blocks', 'decoder')} blocks, {unet_config.get('spade_norm', 'instance')} norm)",
        num_train_timesteps=scheduler_config.get("num_train_timesteps", args.get("num_train_timesteps")),
        prediction_type=scheduler_config.get("prediction_type", args.get("diffusion_prediction_type")),
        source_description=data_description(source, {"train_data_dir": args["source_data_dir"]}),
        target_description=data_description({**target, "mask_dir": None}, {"train_data_dir": args["target_data_dir"]}),
        command=info["command"], step_rows=rows, pseudo_label_note=note,
        evaluation=measured or "Not evaluated yet: run `benchmarks/evaluate_adaptdiff.py --write-card ...`.",
    )


def write_adaptdiff_card(folder: Union[str, os.PathLike], repo_id: Optional[str] = None) -> Path:
    """Write ``README.md`` (the model card) into an adapted ``AdaptDiffPipeline`` folder; returns its path."""
    path = Path(folder) / "README.md"
    adaptdiff_model_card(folder, repo_id).save(str(path))
    return path
