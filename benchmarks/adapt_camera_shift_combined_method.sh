#!/bin/bash
# usage: benchmarks/adapt_camera_shift_combined_method.sh [SHIFT]: AdaptDiff's painted pairs on a simulated camera
# (default combined): `adapt-train --method combined` on the 8 test photographs as that camera takes them, painting
# the CHASE_DB1 *training* masks (--source_stems) with the narrow painter of the fluorescein-like run, step 1 taken
# from benchmarks/adapt_camera_shift.sh's self-training run (run that first); then both adapted models scored as there.
# THREADS (default 2). Results: benchmarks/results/adapt_camera_shift_half_combined_method_<shift>.json.
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
SHIFT=${1:-combined}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS HF_HUB_OFFLINE=1
out=runs/adapt/half-combined-method/$SHIFT
[ -f runs/adapt/half/$SHIFT/work/workflow.json ] || { echo "run benchmarks/adapt_camera_shift.sh $SHIFT first"; exit 1; }
.venv/bin/diffusers-retina adapt-train runs/targets/$SHIFT/images --output-dir $out --method combined \
  --source-data-dir ../shared/data/chase_db1 --source-mask-dir 1stHO --source-mask-suffix _1stHO --threads "$THREADS" \
  --workflow-args "--source_stems 'Image_0*,Image_10*' --reuse_from runs/adapt/half/$SHIFT/work --diffusion_steps 1200
    --diffusion_block_out_channels 16,32,64,64 --diffusion_args '--spade_hidden_channels 16' --paint_steps 10
    --paint_crop 256 --images_per_mask 3 --checkpointing_steps 100" || exit 1
.venv/bin/python benchmarks/camera_shift.py --threads "$THREADS" --shifts "$SHIFT" --processing-resolutions auto \
  --segmenter "Combined-method U-Net=$out/segmenter" --diffusion "Combined-method feature refiner=$out/anchored@1" \
  --output benchmarks/results/adapt_camera_shift_half_combined_method_$SHIFT.json
