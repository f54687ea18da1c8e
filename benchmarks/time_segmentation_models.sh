#!/usr/bin/env bash
# Sampling time per full-resolution image on an otherwise idle machine: the plain UNet and the MedSegDiff variants
# (the ablation folders runs/medsegdiff-* come from the training commands in the MedSegDiff card), same settings as
# the evaluation (E=5, DDIM 2, 256 tiles), 2 threads, Image_11L and Image_12R, one model after the other.
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
E="--threads 2 --ensemble-size 5 --steps 2 --scheduler ddim --fusion mean --tile-size 256 --tile-overlap 0.25 --crop 0 --images Image_11L Image_12R --no-write-card --no-compare-fusions --no-single-member"
# the same-budget deterministic U-Net (train_segmentation_ensemble.py --objective supervised) is timed beside the plain
# model when its run folder exists
BASELINE="${BASELINE:-runs/segmentation-supervised-chase}"
for p in checkpoints/segmentation-ensemble-chase checkpoints/segmentation-medsegdiff-chase runs/medsegdiff-noaux runs/medsegdiff-noff-noaux; do
  n=$(basename $p)
  extra=""
  [[ $n == segmentation-ensemble-chase && -d $BASELINE/unet ]] && extra="--baseline $BASELINE"
  "${PYTHON:-python}" benchmarks/evaluate_segmentation.py --pipeline $p $E $extra --output benchmarks/results/timing_$n.json | grep -E "s  dice|WARNING"
done
"${PYTHON:-python}" - <<'PY'
import json
labels = {
    "segmentation-ensemble-chase": "plain UNet2DModel (image concatenated)",
    "medsegdiff-noff-noaux": "MedSegDiff: + dynamic conditional encoding",
    "medsegdiff-noaux": "MedSegDiff: + dynamic encoding + FF-Parser",
    "segmentation-medsegdiff-chase": "MedSegDiff: + dynamic encoding + FF-Parser + auxiliary loss (reference)",
}
timing = {label: json.load(open(f"benchmarks/results/timing_{name}.json"))["rows"][0]["seconds_per_image"] for name, label in labels.items()}
for row in json.load(open("benchmarks/results/timing_segmentation-ensemble-chase.json"))["rows"]:
    if row["name"].startswith("deterministic U-Net"):  # its evaluate_segmentation.py row name is the label
        timing[row["name"]] = row["seconds_per_image"]
json.dump(timing, open("benchmarks/results/timing_medsegdiff.json", "w"), indent=2)
print(timing)
PY
