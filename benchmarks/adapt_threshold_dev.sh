#!/bin/bash
# usage: benchmarks/adapt_threshold_dev.sh [SHIFT]: choose adapt-train's pseudo-label threshold rule on the TRAINING
# photographs (a development set; the test photographs are not touched): the 20 CHASE_DB1 training photographs as
# SHIFT's camera takes them (default combined) adapted to with self-training under (a) the vessel-fraction rule and
# (b) a fixed threshold of one half, each scored on the same photographs against their references. Caveat: the source
# segmenter learnt from these photographs' references, so its pseudo-labels are better here than on new photographs
# (which is why the threshold was then chosen with benchmarks/threshold_rules_dev.py, on photographs it had not learnt).
# Results: benchmarks/results/adapt_threshold_dev_<shift>.json. THREADS (default 2).
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
SHIFT=${1:-combined}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS HF_HUB_OFFLINE=1
target=runs/targets-train/$SHIFT
[ -d $target/images ] || .venv/bin/python benchmarks/make_camera_shift_folder.py --split train --shift "$SHIFT" \
  --output $target
.venv/bin/diffusers-retina adapt-train $target/images --output-dir runs/adapt-dev/$SHIFT/fraction --threads "$THREADS" \
  --anchored-pipeline none --workflow-args "--pseudo_label_threshold source-fraction" || exit 1
.venv/bin/diffusers-retina adapt-train $target/images --output-dir runs/adapt-dev/$SHIFT/half --threads "$THREADS" \
  --anchored-pipeline none --workflow-args "--pseudo_label_threshold 0.5" || exit 1
.venv/bin/python benchmarks/camera_shift.py --threads "$THREADS" --split train --shifts "$SHIFT" \
  --processing-resolutions auto --segmenter "Source (no adaptation)=checkpoints/vessel-segmenter-chase" \
  --segmenter "Self-trained, vessel-fraction threshold=runs/adapt-dev/$SHIFT/fraction/segmenter" \
  --segmenter "Self-trained, threshold one half=runs/adapt-dev/$SHIFT/half/segmenter" \
  --output benchmarks/results/adapt_threshold_dev_$SHIFT.json
