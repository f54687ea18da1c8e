#!/bin/bash
# usage: benchmarks/adaptdiff_robustness.sh NAME FP_FN_RATE [NAME RATE ...]: reduced-budget AdaptDiff runs with corrupted pseudo-labels (after the reference run in runs/adaptdiff-ref; the study ran clean 0, r10 0.1, r20 0.2, r40 0.4 side by side)
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 DIFFUSERS_RETINA_DATA=../shared/data/chase_db1
while [ $# -ge 2 ]; do
  name=$1; rate=$2; shift 2
  nice -n 5 .venv/bin/python training/adaptdiff_workflow.py \
    --source_data_dir ../shared/data/chase_db1 --source_mask_dir 1stHO --source_mask_suffix _1stHO \
    --source_stems 'Image_01*,Image_02*,Image_03*,Image_04*,Image_05*' --source_segmenter checkpoints/vessel-segmenter-chase \
    --target_data_dir runs/chase-fa --target_stems 'Image_0*,Image_10*' \
    --work_dir runs/adaptdiff-robust-$name --diffusion_steps 150 --diffusion_batch_size 4 \
    --diffusion_block_out_channels 32,64,64,128 --diffusion_args "--spade_hidden_channels 32" \
    --pseudo_labels_from runs/adaptdiff-ref/1-pseudo-labels --pseudo_label_fp $rate --pseudo_label_fn $rate \
    --paint_steps 10 --paint_crop 256 --tile_size 256 --finetune_steps 150 --checkpointing_steps 50
done
