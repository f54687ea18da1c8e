#!/usr/bin/env bash
# Train on synthetic, test on real (issue 5): does Mask2Image synthesis help a segmenter?
#   (a) the 20 real CHASE_DB1 training pairs  -> checkpoints/segmentation-ensemble-chase (already trained, same budget)
#   (b) synthetic pairs only: one image painted from each of the 20 training masks
#   (c) real + synthetic (40 pairs)
# Same segmentation model, budget, seed and evaluation command for all three; results in benchmarks/results/.
# Hours on the 2-core CPU: synthesis of 20 full-resolution images, two 1500-step trainings, three evaluations.
#   PIPELINE=checkpoints/mask2image-chase PYTHON=.venv/bin/python bash benchmarks/train_on_synthetic.sh
# CROP=N paints only the central NxN crop of each training mask (synthesis time grows with the pixels: a 384 crop is
# ~6x cheaper than 999x960); the real pairs stay whole. THREADS=N caps torch threads (run beside another job).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
PYTHON="${PYTHON:-python}"
PIPELINE="${PIPELINE:-checkpoints/mask2image-chase}"
CHASE="${DIFFUSERS_RETINA_DATA:-../shared/data/chase_db1}"
CROP="${CROP:-0}"
THREADS="${THREADS:-}"
WORK="${WORK:-runs/tstr}"
[ -z "$THREADS" ] || export OMP_NUM_THREADS="$THREADS"
RESULTS=benchmarks/results
mkdir -p "$WORK" "$RESULTS"

# 1. synthetic pairs from the training masks (resumable: masks already painted are skipped)
mkdir -p "$WORK/train_masks"
todo=()
for mask in "$CHASE"/1stHO/Image_0*_1stHO.png "$CHASE"/1stHO/Image_10*_1stHO.png; do
    stem=$(basename "$mask" _1stHO.png)
    ln -sf "$(realpath "$mask")" "$WORK/train_masks/$stem.png"
    [ -f "$WORK/synthetic/images/$stem.png" ] || todo+=("$WORK/train_masks/$stem.png")
done
if [ "${#todo[@]}" -gt 0 ]; then
    "$PYTHON" -m diffusers_retina.cli synthesize "${todo[@]}" --output-dir "$WORK/synthetic" --pipeline "$PIPELINE" \
        --crop "$CROP" --steps 25 --guidance-scale 1.5 --seed 0
fi

# 2. real + synthetic in one folder-pair dataset (links; real stems keep their names, synthetic ones get _syn)
mkdir -p "$WORK/mixed/images" "$WORK/mixed/masks"
for mask in "$WORK"/train_masks/*.png; do
    stem=$(basename "$mask" .png)
    ln -sf "$(realpath "$CHASE/images/$stem.jpg")" "$WORK/mixed/images/$stem.jpg"
    ln -sf "$(realpath "$CHASE/1stHO/${stem}_1stHO.png")" "$WORK/mixed/masks/$stem.png"
    ln -sf "$(realpath "$WORK/synthetic/images/$stem.png")" "$WORK/mixed/images/${stem}_syn.png"
    ln -sf "$(realpath "$WORK/synthetic/masks/$stem.png")" "$WORK/mixed/masks/${stem}_syn.png"
done

# 3. the reference segmentation command (same budget and seed), on synthetic and on mixed data
SEG="--resolution 128 --block_out_channels 16,32,64,128 --layers_per_block 1 --norm_num_groups 8 --prediction_type sample
     --train_batch_size 8 --learning_rate 1e-3 --lr_scheduler cosine --lr_warmup_steps 100 --max_train_steps 1500
     --use_ema --checkpointing_steps 100 --checkpoints_total_limit 2 --seed 0 --report_to none
     --resume_from_checkpoint latest"
for name in synthetic mixed; do
    [ -f "$WORK/seg-$name/model_index.json" ] || "$PYTHON" training/train_segmentation_ensemble.py \
        --train_data_dir "$WORK/$name" $SEG --output_dir "$WORK/seg-$name"
done

# 4. the same evaluation for all three (full resolution, 8 test images)
EVAL="--ensemble-size 5 --steps 2 --scheduler ddim --fusion mean --tile-size 256 --tile-overlap 0.25 --crop 0 --no-write-card"
for name in synthetic mixed; do
    "$PYTHON" benchmarks/evaluate_segmentation.py --pipeline "$WORK/seg-$name" $EVAL \
        --output "$RESULTS/evaluate_tstr_$name.json"
done
if [ "$CROP" -gt 0 ]; then painted="central ${CROP}x${CROP} crops"; else painted="full photographs"; fi
"$PYTHON" benchmarks/compare_segmentation.py \
    "(a) 20 real pairs=$RESULTS/evaluate_segmentation.json" \
    "(b) 20 synthetic pairs ($painted)=$RESULTS/evaluate_tstr_synthetic.json" \
    "(c) 20 real + 20 synthetic pairs=$RESULTS/evaluate_tstr_mixed.json" \
    --output "$RESULTS/compare_tstr.json" --write-into "$PIPELINE" \
    --heading "Train on synthetic, test on real (the reference segmentation command and budget; 8 real test images, full resolution)"
