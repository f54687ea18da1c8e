#!/bin/bash
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=2 DIFFUSERS_RETINA_DATA=../shared/data/chase_db1
nice -n -10 .venv/bin/python benchmarks/evaluate_adaptdiff.py --threads 2 --target_dir runs/chase-fa \
  --output benchmarks/results/adaptdiff_robustness.json \
  --row "clean pseudo-labels=runs/adaptdiff-robust-clean/adapted" \
  --row "10 % FP + 10 % FN=runs/adaptdiff-robust-r10/adapted" \
  --row "20 % FP + 20 % FN=runs/adaptdiff-robust-r20/adapted" \
  --row "40 % FP + 40 % FN=runs/adaptdiff-robust-r40/adapted"
