"""The measured part of a model card: ``evaluation.json`` (written by the benchmarks) as a markdown table and as
``model-index`` entries (huggingface_hub ``EvalResult``), and the training record ``training_info.json``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from huggingface_hub import EvalResult

from ..utils.io_utils import read_json
from .provenance import stem_range

TRAINING_INFO = "training_info.json"
EVALUATION = "evaluation.json"

METRIC_LABELS = {
    "dice": "Dice",
    "cldice": "clDice",
    "iou": "IoU",
    "auc_roc": "AUC-ROC",
    "auc_pr": "AUC-PR",
    "ece": "ECE",
    "hd95": "HD95 (px)",
}


def training_info(folder: Path) -> Dict[str, Any]:
    """``training_info.json`` of a trained folder (written by every training script)."""
    info = read_json(folder / TRAINING_INFO)
    if info is None:
        raise FileNotFoundError(f"{folder / TRAINING_INFO} is missing: it is written by the training script.")
    return info


def recorded_training_args(folder: Union[str, Path]) -> Dict[str, Any]:
    """The training arguments ``training_info.json`` of ``folder`` records (an empty dict when it records none): the
    values a trained folder carries for later steps, such as ``field_of_view_diameter`` and
    ``training_vessel_fraction``."""
    return (read_json(Path(folder) / TRAINING_INFO) or {}).get("args", {})


def format_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "unknown time"
    hours, rest = divmod(int(round(seconds)), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def evaluation_markdown(evaluation: Optional[Dict[str, Any]]) -> str:
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


def measured_markdown(evaluation: Optional[Dict[str, Any]]) -> Optional[str]:
    """A benchmark's ``evaluation.json`` markdown with its command and any comparison block (None if not measured)."""
    if not (evaluation and evaluation.get("markdown")):
        return None
    text = evaluation["markdown"] + "\n\nMeasured with:\n\n```bash\n" + evaluation["command"] + "\n```"
    comparison = _comparison_lines(evaluation)
    return text + "\n" + "\n".join(comparison) if comparison else text


def measure_intervals_markdown(folder: Path) -> Optional[str]:
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


def evaluation_dataset(evaluation: Dict[str, Any]) -> str:
    """The dataset an ``evaluation.json`` measured on: its ``dataset`` entry (CHASE_DB1 for the benchmarks of this
    repository, which all read the CHASE_DB1 test images)."""
    return str(evaluation.get("dataset") or "CHASE_DB1")


def dataset_type(evaluation: Dict[str, Any]) -> str:
    return re.sub(r"[^a-z0-9]+", "_", evaluation_dataset(evaluation).lower()).strip("_")


def evaluation_split(evaluation: Dict[str, Any]) -> str:
    """The evaluated images as the evaluation names them (its ``images``, reference annotation and crop)."""
    images = evaluation.get("images") or []
    named = f"test ({stem_range(images)}" if images else "test (Image_11L–Image_14R"
    named += f", {evaluation.get('reference', '1stHO')}"
    crop = evaluation.get("crop")
    named += f", central {crop}x{crop} crops)" if crop else ", full resolution)"
    return named


def eval_results(evaluation: Optional[Dict[str, Any]],
                  task_type: str = "image-segmentation") -> Optional[List[EvalResult]]:
    """``model-index`` entries from an ``evaluation.json`` that names its ``metrics`` (a full test-set evaluation)."""
    if not evaluation or not evaluation.get("metrics"):
        return None
    return [EvalResult(task_type=task_type, dataset_type=dataset_type(evaluation),
                       dataset_name=evaluation_dataset(evaluation),
                       dataset_split=evaluation.get("split", "test (Image_11L–Image_14R, 1stHO, full resolution)"),
                       metric_type=metric, metric_name=METRIC_LABELS.get(metric, metric),
                       metric_value=round(float(value), 4))
            for metric, value in evaluation["metrics"].items() if value is not None]


def synthesis_eval_results(evaluation: Optional[Dict[str, Any]], folder: Path) -> Optional[List[EvalResult]]:
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
    split = evaluation_split(evaluation).replace("test (", "test masks (")
    results = []
    for metric, label in (("dice", "Faithfulness Dice"), ("cldice", "Faithfulness clDice")):
        if rows[0].get(metric) is not None:
            results.append(EvalResult(task_type="image-to-image", dataset_type=dataset_type(evaluation),
                                      dataset_name=evaluation_dataset(evaluation), dataset_split=split,
                                      metric_type=f"faithfulness_{metric}", metric_name=label,
                                      metric_value=round(float(rows[0][metric]), 4)))
    return results or None


def feature_head_eval_results(evaluation: Optional[Dict[str, Any]], args: Dict[str, Any],
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
    return [EvalResult(task_type="image-segmentation", dataset_type=dataset_type(evaluation),
                       dataset_name=evaluation_dataset(evaluation), dataset_split=split, metric_type=metric,
                       metric_name=METRIC_LABELS.get(metric, metric), metric_value=round(float(value), 4))
            for metric, value in rows[0]["metrics"].items() if metric in METRIC_LABELS and value is not None] or None


def segmentation_eval_results(evaluation: Optional[Dict[str, Any]]) -> Optional[List[EvalResult]]:
    """``model-index`` of a segmentation pipeline: the evaluation's own ``metrics`` when it names them, else the first
    row of ``benchmarks/evaluate_segmentation.py`` (this pipeline), measured on the evaluation's named images."""
    results = eval_results(evaluation)
    if results or not (evaluation and evaluation.get("rows") and evaluation["rows"][0].get("metrics")):
        return results
    split = evaluation.get("split") or evaluation_split(evaluation)
    return [EvalResult(task_type="image-segmentation", dataset_type=dataset_type(evaluation),
                       dataset_name=evaluation_dataset(evaluation), dataset_split=split, metric_type=metric,
                       metric_name=METRIC_LABELS[metric], metric_value=round(float(value), 4))
            for metric, value in evaluation["rows"][0]["metrics"].items()
            if metric in METRIC_LABELS and value is not None] or None
