#!/bin/bash
# usage: benchmarks/adapt_camera_shift.sh [SHIFT ...]: `diffusers-retina adapt-train` (self-training, every setting by
# its label-free rules, the default 300 steps) on each simulated camera of the hard camera-shift benchmark, then the
# adapted segmenter and the adapted anchored pipeline scored on the same photographs (processing_resolution="auto").
# The target folder is the 8 CHASE_DB1 test photographs as that camera takes them, unlabelled (transductive: the
# user's case of adapting to a folder and segmenting it; the references are read only by the scoring).
# RULE is the pseudo-label threshold (--pseudo_label_threshold: 0.5, the default, named "half" in the file names; or
# a rule: mean-probability, source-fraction). THREADS (default 2) threads per process.
# Results: benchmarks/results/adapt_camera_shift_<rule>_<shift>.json.
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
RULE=${RULE:-0.5}
NAME=$([ "$RULE" = 0.5 ] && echo half || echo "$RULE")
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS HF_HUB_OFFLINE=1
SHIFTS=${*:-combined 45deg-565px defocus jpeg-35 50deg-768px colour illumination}
for shift in $SHIFTS; do
  out=runs/adapt/$NAME/$shift
  [ -d runs/targets/$shift/images ] || .venv/bin/python benchmarks/make_camera_shift_folder.py --shift "$shift" \
    --output runs/targets/$shift
  .venv/bin/diffusers-retina adapt-train runs/targets/$shift/images --output-dir $out --threads "$THREADS" \
    --workflow-args "--pseudo_label_threshold $RULE" || exit 1
  .venv/bin/python benchmarks/camera_shift.py --threads "$THREADS" --shifts "$shift" --processing-resolutions auto \
    --segmenter "Self-trained U-Net=$out/segmenter" --diffusion "Self-trained feature refiner=$out/anchored@1" \
    --output benchmarks/results/adapt_camera_shift_${NAME}_$shift.json || exit 1
done
