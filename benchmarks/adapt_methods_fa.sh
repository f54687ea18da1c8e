#!/bin/bash
# usage: benchmarks/adapt_methods_fa.sh: the three adaptation methods on the fluorescein-like target (needs runs/chase-fa
# from training/make_target_modality.py), every setting by the workflow's label-free rules. Target: the 20 training
# photographs in the target modality (unlabelled); source masks: their CHASE_DB1 masks; scored on the 8 test
# photographs in the target modality (benchmarks/evaluate_adaptdiff.py). The painter is the narrow one shipped in
# checkpoints/adaptdiff-chase-fa (16,32,64,64 channels, SPADE hidden 16). combined and self-training take steps 1-3 of
# the AdaptDiff run (--reuse_from: those steps do not depend on the method). THREADS (default 2).
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS HF_HUB_OFFLINE=1 DIFFUSERS_RETINA_DATA=../shared/data/chase_db1
COMMON=(--source_data_dir ../shared/data/chase_db1 --source_mask_dir 1stHO --source_mask_suffix _1stHO
        --source_stems 'Image_0*,Image_10*' --source_segmenter checkpoints/vessel-segmenter-chase
        --target_data_dir runs/chase-fa --target_stems 'Image_0*,Image_10*' --pseudo_label_transform auto
        --diffusion_steps 1200 --diffusion_block_out_channels 16,32,64,64 --diffusion_args "--spade_hidden_channels 16"
        --paint_steps 10 --paint_crop 256 --images_per_mask 3 --checkpointing_steps 100
        --anchored_pipeline checkpoints/segmentation-anchored-features-chase)
.venv/bin/python training/adaptdiff_workflow.py "${COMMON[@]}" --method adaptdiff --work_dir runs/fa/adaptdiff || exit 1
for method in combined self-training; do
  .venv/bin/python training/adaptdiff_workflow.py "${COMMON[@]}" --method $method --work_dir runs/fa/$method \
    --reuse_from runs/fa/adaptdiff || exit 1
done
.venv/bin/python benchmarks/evaluate_adaptdiff.py --threads "$THREADS" --target_dir runs/chase-fa \
  --output benchmarks/results/adapt_methods_fa.json \
  --row "Source, inversion + histogram matching=checkpoints/vessel-segmenter-chase@invert+histmatch" \
  --row "AdaptDiff (painted pairs)=runs/fa/adaptdiff/adapted-segmenter" \
  --row "Self-training (confident pseudo-labels)=runs/fa/self-training/adapted-segmenter" \
  --row "Combined (painted pairs + confident pseudo-labels)=runs/fa/combined/adapted-segmenter"
