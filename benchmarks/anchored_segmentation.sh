#!/usr/bin/env bash
# Prior-anchored diffusion segmentation and its controls, from scratch, then the one evaluation table
# (benchmarks/results/evaluate_anchored.json and, with the camera shift, evaluate_anchored_shift.json).
#
#   PYTHON=.venv/bin/python bash benchmarks/anchored_segmentation.sh            # everything, in order
#   PYTHON=.venv/bin/python STAGES="prior oof" bash benchmarks/anchored_segmentation.sh
#
# Stages (each resumable: training resumes from its last checkpoint, finished outputs are kept):
#   prior     the deterministic segmenter (the prior; row 1), 1500 steps, camera-like + scale augmentation
#             (the stronger prior in training: PRIOR_DIR=runs/prior-v2 PRIOR_STEPS=6000 STAGES=prior)
#   oof       out-of-fold prior maps of the 20 training images (4 subject-grouped folds, 500 steps each)
#   residual  the residual-anchored refiner (row 4a)      strength  the strength-anchored refiner (row 4b)
#   cascade   the same refiner network without noise (row 3)
#   budget    a U-Net trained for the prior's + the refiner's budget (row 2)
#   ship      copy the prior and the residual pipeline into checkpoints/ (the embedded reference)
#   evaluate  the table on the 8 test images at full resolution (and under a camera shift)
# The feature-reusing refiner (a light head over the prior's decoder features; not in the default STAGES):
#   students  4 out-of-fold students distilled from the prior (no labels; 500 steps each)
#   features  the PriorFeatureRefinerModel on the students' priors and features (2000 steps), then its default step
#             count chosen by out-of-fold NLL on the training photographs (training/select_denoising_steps.py)
#   evaluate_features  prior, residual refiner and feature refiner at 1 and 2 steps timed in one process (ratios to
#             the prior), on the 8 test images, plain and under the camera-like shift
# PRIOR_UNET (default $PRIOR_DIR/unet, PRIOR_DIR default runs/vessel-segmenter-chase) names the prior they build on.
# CHASE_DB1 (CC BY 4.0) is read from DATA (default ../shared/data/chase_db1); all settings were chosen on the 20
# training images only.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DATA=${DATA:-../shared/data/chase_db1}
RUNS=${RUNS:-runs}
STAGES=${STAGES:-"prior oof residual strength cascade budget ship evaluate"}
THREADS=${THREADS:-1}
export OMP_NUM_THREADS=$THREADS

DATA_FLAGS=(--train_data_dir "$DATA" --mask_dir 1stHO --mask_suffix _1stHO)
AUGMENT=(--photometric_augmentation 1 --scale_augmentation 0.75,1.33)
COMMON=(--resolution 128 --train_batch_size 8 --learning_rate 1e-3 --lr_scheduler cosine --use_ema
        --checkpoints_total_limit 1 --seed 0 --report_to none --save_dtype float16 --resume_from_checkpoint latest)
UNET=(--block_out_channels 16,32,64,128 --layers_per_block 1 --norm_num_groups 8)
# the refiner: a quarter of the prior's channels, three levels (5 members cost about one prior pass)
REFINER=(--block_out_channels 8,16,32 --layers_per_block 1 --norm_num_groups 4)
PRIOR_DIR=${PRIOR_DIR:-$RUNS/vessel-segmenter-chase}
MAPS=$RUNS/prior-maps-oof
PRIOR_UNET=${PRIOR_UNET:-$PRIOR_DIR/unet}  # e.g. checkpoints/vessel-segmenter-chase, the shipped prior
STUDENTS=${STUDENTS:-$RUNS/prior-students}
FEATURES=${FEATURES:-$RUNS/anchored-features}
REFINER_STEPS=${REFINER_STEPS:-1200}

stage() { [[ " $STAGES " == *" $1 "* ]]; }

if stage prior; then
  $PYTHON training/train_segmentation_ensemble.py --objective supervised "${DATA_FLAGS[@]}" \
    --train_stems 'Image_0*,Image_10*' "${UNET[@]}" "${AUGMENT[@]}" "${COMMON[@]}" --lr_warmup_steps 100 \
    --max_train_steps "${PRIOR_STEPS:-1500}" --checkpointing_steps 250 --output_dir "$PRIOR_DIR"
fi
if stage oof; then
  $PYTHON training/make_prior_maps.py "${DATA_FLAGS[@]}" --stems 'Image_0*,Image_10*' --folds 4 \
    --output_dir "$MAPS" -- "${UNET[@]}" "${AUGMENT[@]}" "${COMMON[@]}" --lr_warmup_steps 50 \
    --max_train_steps 500 --checkpointing_steps 250
fi
ANCHORED=("${DATA_FLAGS[@]}" --train_stems 'Image_0*,Image_10*' "${REFINER[@]}" "${AUGMENT[@]}" "${COMMON[@]}"
          --lr_warmup_steps 100 --max_train_steps "$REFINER_STEPS" --checkpointing_steps 250
          --prior_maps "$MAPS/maps" --prediction_type sample)
if stage residual; then
  $PYTHON training/train_segmentation_ensemble.py "${ANCHORED[@]}" --anchor residual \
    --prior_segmenter "$PRIOR_DIR/unet" --default_denoising_steps 2 --output_dir "$RUNS/anchored-residual"
fi
if stage strength; then
  $PYTHON training/train_segmentation_ensemble.py "${ANCHORED[@]}" --anchor strength --anchor_strength 0.4 \
    --prior_segmenter "$PRIOR_DIR/unet" --default_denoising_steps 2 --output_dir "$RUNS/anchored-strength"
fi
if stage cascade; then
  $PYTHON training/train_segmentation_ensemble.py --objective supervised "${ANCHORED[@]}" \
    --output_dir "$RUNS/cascade"
fi
if stage budget; then
  $PYTHON training/train_segmentation_ensemble.py --objective supervised "${DATA_FLAGS[@]}" \
    --train_stems 'Image_0*,Image_10*' "${UNET[@]}" "${AUGMENT[@]}" "${COMMON[@]}" --lr_warmup_steps 100 \
    --max_train_steps "${BUDGET_STEPS:-2500}" --checkpointing_steps 250 --output_dir "$RUNS/segmenter-budget"
fi
if stage ship; then  # the shipped reference: the prior as a model of its own, the residual pipeline (with its prior)
  mkdir -p checkpoints/vessel-segmenter-chase checkpoints/segmentation-anchored-chase
  cp "$PRIOR_DIR"/unet/{config.json,diffusion_pytorch_model.safetensors,training_info.json} \
    checkpoints/vessel-segmenter-chase/
  (cd "$RUNS/anchored-residual" && tar --exclude='checkpoint-*' --exclude=logs -cf - .) | \
    tar -xf - -C checkpoints/segmentation-anchored-chase
fi
if stage evaluate; then
  # the rows in two processes side by side (one thread each: the same per-row timing as one process), then one table;
  # 4 steps and MedSegDiff are left out of the timed table to keep it under an hour on 2 cores
  R=benchmarks/results
  for shift in "" "--shift"; do
    suffix=${shift:+_shift}
    cards=()
    [[ -z $shift ]] && cards=(--write-card "1. U-Net alone (the prior)=checkpoints/vessel-segmenter-chase"
                              --write-card "4a. Residual-anchored diffusion, 2 steps=checkpoints/segmentation-anchored-chase")
    $PYTHON benchmarks/evaluate_anchored.py --threads 1 $shift --output "$R/evaluate_anchored${suffix}_part1.json" \
      --segmenter "1. U-Net alone (the prior)=checkpoints/vessel-segmenter-chase" \
      --segmenter "2. U-Net, prior + refiner budget=$RUNS/segmenter-budget" \
      --cascade "3. Deterministic cascade=checkpoints/vessel-segmenter-chase,$RUNS/cascade" \
      --diffusion "4a. Residual-anchored diffusion=checkpoints/segmentation-anchored-chase@1,2,4" &
    $PYTHON benchmarks/evaluate_anchored.py --threads 1 $shift --output "$R/evaluate_anchored${suffix}_part2.json" \
      --diffusion "4b. Strength-anchored diffusion=$RUNS/anchored-strength@1,2" \
      --diffusion "5a. Plain diffusion (reference)=checkpoints/segmentation-ensemble-chase@2" &
    wait
    $PYTHON benchmarks/evaluate_anchored.py --merge "$R/evaluate_anchored${suffix}_part1.json" \
      "$R/evaluate_anchored${suffix}_part2.json" --output "$R/evaluate_anchored${suffix}.json" "${cards[@]}"
  done
fi
if stage students; then
  $PYTHON training/make_prior_maps.py "${DATA_FLAGS[@]}" --stems 'Image_0*,Image_10*' --folds 4 \
    --distill_from "$PRIOR_UNET" --output_dir "$STUDENTS" -- "${UNET[@]}" "${AUGMENT[@]}" "${COMMON[@]}" \
    --lr_warmup_steps 50 --max_train_steps 500 --checkpointing_steps 250
fi
if stage features; then
  $PYTHON training/train_segmentation_ensemble.py "${DATA_FLAGS[@]}" --train_stems 'Image_0*,Image_10*' \
    "${AUGMENT[@]}" "${COMMON[@]}" --lr_warmup_steps 100 --max_train_steps "${FEATURE_STEPS:-2000}" \
    --checkpointing_steps 250 --prediction_type sample --anchor residual --refiner features --refiner_channels 16 \
    --prior_folds "$STUDENTS" --prior_segmenter "$PRIOR_UNET" --default_denoising_steps 2 --output_dir "$FEATURES"
  $PYTHON training/select_denoising_steps.py --pipeline "$FEATURES" --prior_folds "$STUDENTS" "${DATA_FLAGS[@]}" \
    --stems 'Image_0*,Image_10*' --steps 1 2 4 --apply
fi
if stage evaluate_features; then
  R=benchmarks/results
  for shift in "" "--shift"; do
    suffix=${shift:+_shift}
    $PYTHON benchmarks/evaluate_anchored.py --threads 1 $shift --output "$R/evaluate_feature_refiner${suffix}.json" \
      --segmenter "1. U-Net alone (the prior)=$PRIOR_UNET" \
      --diffusion "4a. Residual-anchored diffusion=checkpoints/segmentation-anchored-chase@1,2" \
      --diffusion "6. Feature-reusing refiner=$FEATURES@1,2" &
  done
  wait
fi
