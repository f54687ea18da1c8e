#!/bin/bash
# usage: benchmarks/adapt_methods_fa.sh: the three adaptation methods on the fluorescein-like target (needs runs/chase-fa
# from training/make_target_modality.py), every setting by the workflow's label-free rules. Target: the 20 training
# photographs in the target modality (unlabelled); source masks: their CHASE_DB1 masks; scored on the 8 test
# photographs in the target modality (benchmarks/evaluate_adaptdiff.py). The painter is the narrow one shipped in
# checkpoints/adaptdiff-chase-fa (16,32,64,64 channels, SPADE hidden 16). combined and self-training take steps 1-3 of
# the AdaptDiff run (--reuse_from: those steps do not depend on the method). Every other setting is the workflow's
# default (pseudo-label threshold one half, painted pixels left out where the source's reading contradicts the mask,
# grey paintings for a grey target, fine-tuning in the source's intensity space). THREADS (default 2); SHIP=1 ships
# the combined run as checkpoints/adaptdiff-chase-fa and writes its card; SPACE=target fine-tunes on the pairs as they
# are (--finetune_space target, the behaviour before the source space became the default; runs/fa-target, results
# _target_space.json).
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
SPACE=${SPACE:-source}
RUNS=runs/fa$([ "$SPACE" = source ] || echo "-$SPACE")
RESULT=benchmarks/results/adapt_methods_fa_$([ "$SPACE" = source ] && echo defaults || echo "${SPACE}_space").json
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS HF_HUB_OFFLINE=1 DIFFUSERS_RETINA_DATA=../shared/data/chase_db1
COMMON=(--source_data_dir ../shared/data/chase_db1 --source_mask_dir 1stHO --source_mask_suffix _1stHO
        --source_stems 'Image_0*,Image_10*' --source_segmenter checkpoints/vessel-segmenter-chase
        --target_data_dir runs/chase-fa --target_stems 'Image_0*,Image_10*' --pseudo_label_transform auto
        --diffusion_steps 1200 --diffusion_block_out_channels 16,32,64,64 --diffusion_args "--spade_hidden_channels 16"
        --paint_steps 10 --paint_crop 256 --images_per_mask 3 --checkpointing_steps 100
        --anchored_pipeline checkpoints/segmentation-anchored-features-chase --finetune_space "$SPACE")
.venv/bin/python training/adaptdiff_workflow.py "${COMMON[@]}" --method adaptdiff --work_dir $RUNS/adaptdiff || exit 1
for method in combined self-training; do
  .venv/bin/python training/adaptdiff_workflow.py "${COMMON[@]}" --method $method --work_dir $RUNS/$method \
    --reuse_from $RUNS/adaptdiff || exit 1
done
# the combined run ships as checkpoints/adaptdiff-chase-fa (fp16; its card is written from this evaluation)
[ "$SHIP" = 1 ] && [ "$SPACE" = source ] && .venv/bin/python - <<'PY'
import shutil
from pathlib import Path
import torch
from diffusers_retina import AdaptDiffPipeline
source, target = Path("runs/fa/combined/adapted"), Path("checkpoints/adaptdiff-chase-fa")
staging = target.with_name(target.name + ".new")
shutil.rmtree(staging, ignore_errors=True)
pipe = AdaptDiffPipeline.from_pretrained(source, dtype=torch.float32)
pipe.unet.to(torch.float16); pipe.segmenter.to(torch.float16)
pipe.save_pretrained(staging)
shutil.copy2(source / "training_info.json", staging / "training_info.json")
shutil.rmtree(target, ignore_errors=True)
staging.rename(target)
PY
# without SHIP the combined row is scored from its run folder and no card is written
COMBINED=$RUNS/combined/adapted-segmenter
CARD=()
if [ "$SHIP" = 1 ] && [ "$SPACE" = source ]; then
  COMBINED=checkpoints/adaptdiff-chase-fa
  CARD=(--write-card "4. Combined (painted pairs + confident pseudo-labels)=$COMBINED")
fi
.venv/bin/python benchmarks/evaluate_adaptdiff.py --threads "$THREADS" --target_dir runs/chase-fa \
  --output "$RESULT" \
  --row "1. Source, inversion + histogram matching=checkpoints/vessel-segmenter-chase@invert+histmatch" \
  --row "2. AdaptDiff (painted pairs; grey, uncontradicted pixels)=$RUNS/adaptdiff/adapted-segmenter" \
  --row "3. Self-training (confident pseudo-labels)=$RUNS/self-training/adapted-segmenter" \
  --row "4. Combined (painted pairs + confident pseudo-labels)=$COMBINED" "${CARD[@]}"
