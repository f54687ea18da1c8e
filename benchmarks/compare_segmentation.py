"""Put several ``evaluate_segmentation.py`` results side by side (e.g. the plain UNet against MedSegDiff and its
ablations): one row per result, the pipeline's own (first) row of each, as a printed table, a markdown table in JSON
and, with ``--write-into <pipeline folder>``, a ``comparison`` block in that folder's ``evaluation.json`` (rendered
into its model card).

    python benchmarks/compare_segmentation.py \
        "plain UNet2DModel (concat)=benchmarks/results/evaluate_segmentation.json" \
        "MedSegDiff (dynamic encoding + FF-Parser + aux loss)=benchmarks/results/evaluate_medsegdiff.json" \
        --write-into checkpoints/segmentation-medsegdiff-chase

``LABEL=JSON#ROW`` takes the row named ``ROW`` instead of the first, e.g. the same-budget deterministic U-Net:
``"deterministic U-Net=benchmarks/results/evaluate_segmentation.json#deterministic U-Net, same budget (one forward)"``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

METRICS = (("dice", "Dice"), ("cldice", "clDice"), ("auc_roc", "AUC-ROC"), ("ece", "ECE"), ("hd95", "HD95 (px)"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", metavar="LABEL=JSON[#ROW]",
                        help="label and evaluate_segmentation.py JSON (its first row, or the row named after #)")
    parser.add_argument("--timing", default=None, metavar="JSON",
                        help="optional JSON {label: seconds per image} measured separately on an idle machine; "
                        "replaces the evaluation runs' own timings")
    parser.add_argument("--timing-note", default="", help="how --timing was measured (printed under the table)")
    parser.add_argument("--output", default=f"{_common.RESULTS}/compare_segmentation.json")
    parser.add_argument("--write-into", default=None, metavar="FOLDER",
                        help="a pipeline folder whose evaluation.json gets the comparison (and its card regenerated): a "
                             "segmentation pipeline, or a Mask2ImagePipeline (train on synthetic, test on real)")
    parser.add_argument("--heading", default=None,
                        help="heading of the comparison in the card (default: 'Compared with other models ...')")
    return parser.parse_args(argv)


def cell(metrics: Dict[str, float], key: str) -> str:
    value, std = metrics.get(key), metrics.get(f"{key}_std")
    if value is None:
        return "–"
    digits = 1 if key == "hd95" else 3
    return f"{value:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def select_row(data: Dict, row_name: Optional[str], path: str) -> Dict:
    """The pipeline's own (first) row, or the row called ``row_name``."""
    if row_name is None:
        return data["rows"][0]
    names = [row["name"] for row in data["rows"]]
    if row_name not in names:
        sys.exit(f"'{path}' has no row named {row_name!r}; its rows are {names}.")
    return data["rows"][names.index(row_name)]


def comparison_rows(results: List[tuple], timing: Optional[Dict[str, float]]) -> List[Dict]:
    rows = []
    for label, path, row_name in results:
        data = json.loads(Path(path).read_text())
        main_row = select_row(data, row_name, path)
        seconds = (timing or {}).get(label, main_row.get("seconds_per_image"))
        rows.append({"label": label, "source": str(path), "command": data.get("command"),
                     "metrics": main_row["metrics"], "seconds_per_image": seconds,
                     "threads": data.get("machine", {}).get("torch_threads"), "description": data.get("description")})
    return rows


def markdown(rows: List[Dict], timing_note: str) -> str:
    lines = ["| Model | " + " | ".join(label for _, label in METRICS) + " | s / image |",
             "|---|" + "---|" * (len(METRICS) + 1)]
    for row in rows:
        seconds = row["seconds_per_image"]
        lines.append(f"| {row['label']} | " + " | ".join(cell(row["metrics"], key) for key, _ in METRICS)
                     + f" | {'–' if seconds is None else f'{seconds:.1f}'} |")
    if timing_note:
        lines += ["", timing_note]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    results = []
    for item in args.results:
        if "=" not in item:
            sys.exit(f"Expected LABEL=JSON, got {item!r}.")
        label, source = item.split("=", 1)
        path, _, row_name = source.partition("#")
        if not Path(path).is_file():
            sys.exit(f"Result file '{path}' not found (run benchmarks/evaluate_segmentation.py first).")
        results.append((label, path, row_name or None))
    timing = json.loads(Path(args.timing).read_text()) if args.timing else None
    if timing is not None:
        missing = [label for label, _, _ in results if label not in timing]
        if missing:
            sys.exit(f"--timing has no entry for {missing}; its labels are {list(timing)}.")
    rows = comparison_rows(results, timing)
    table = markdown(rows, args.timing_note)
    print(table)
    output = _common.save_json(args.output, {"command": _common.command(), "rows": rows, "markdown": table})
    print(f"\nWrote {output}")
    if args.write_into:
        from diffusers_retina.hub import EVALUATION, write_mask2image_card, write_segmentation_card

        folder = _common.resolve_path(args.write_into)
        if not (folder / EVALUATION).is_file():
            sys.exit(f"--write-into {folder}: no {EVALUATION} there (evaluate the pipeline first).")
        evaluation = json.loads((folder / EVALUATION).read_text())
        evaluation["comparison"] = {"markdown": table, "command": _common.command(), "heading": args.heading}
        _common.save_json(str(folder / EVALUATION), evaluation)
        pipeline_class = json.loads((folder / "model_index.json").read_text()).get("_class_name")  # name or [file, name]
        is_mask2image = "Mask2ImagePipeline" in (pipeline_class if isinstance(pipeline_class, list) else [pipeline_class])
        card = (write_mask2image_card if is_mask2image else write_segmentation_card)(folder)
        print(f"Wrote the comparison into {folder / EVALUATION} and {card}")


if __name__ == "__main__":
    main()
