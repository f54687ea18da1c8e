#!/bin/bash
# The AdaptDiff table of docs/results.md (needs runs/chase-fa from training/make_target_modality.py and runs/adaptdiff-upper-bound)
# main table: 8 test targets, full resolution
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=2 DIFFUSERS_RETINA_DATA=../shared/data/chase_db1
nice -n -10 .venv/bin/python benchmarks/evaluate_adaptdiff.py --threads 2 --target_dir runs/chase-fa \
  --output benchmarks/results/evaluate_adaptdiff.json \
  --row "1. Source only (no adaptation)=checkpoints/vessel-segmenter-chase" \
  --row "2. Histogram matching to the source=checkpoints/vessel-segmenter-chase@histmatch" \
  --row "3. Intensity inversion=checkpoints/vessel-segmenter-chase@invert" \
  --row "4. Inversion + histogram matching=checkpoints/vessel-segmenter-chase@invert+histmatch" \
  --row "5. AdaptDiff (adapted segmenter)=checkpoints/adaptdiff-chase-fa" \
  --row "6. Upper bound: fine-tuned on the target's real labels=runs/adaptdiff-upper-bound" \
  --write-card "5. AdaptDiff (adapted segmenter)=checkpoints/adaptdiff-chase-fa" "$@"
