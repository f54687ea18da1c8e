#!/usr/bin/env bash
# Run the four benchmarks in sequence with the reference checkpoint (full settings); results in benchmarks/results/.
# Run on an idle machine: about 30-40 min on the 2-core CPU (the DDPM-1000 reference alone ~10 min).
#   PIPELINE=<folder> PYTHON=<interpreter> bash benchmarks/run_all.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
PIPELINE="${PIPELINE:-checkpoints/segmentation-ensemble-chase}"
PYTHON="${PYTHON:-python}"
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
failed=()

run() {
    echo
    echo "=== $*"
    "$PYTHON" "$@" || failed+=("$1")
}

# the same-budget deterministic baseline row, when its run exists (train_segmentation_ensemble.py --objective
# supervised; the command is in the README)
BASELINE="${BASELINE:-runs/segmentation-supervised-chase}"
baseline=()
[[ -d "$BASELINE/unet" ]] && baseline=(--baseline "$BASELINE")
run benchmarks/evaluate_segmentation.py --pipeline "$PIPELINE" --ensemble-size 5 --steps 2 --scheduler ddim \
    --fusion mean --tile-size 256 --tile-overlap 0.25 --crop 0 "${baseline[@]}" \
    --output "$RESULTS/evaluate_segmentation.json"
run benchmarks/bench_ensemble_batching.py --pipeline "$PIPELINE" --ensemble-size 5 --steps 10 --scheduler ddim \
    --image Image_11R --crop-sizes 64 96 128 256 --repeats 3 --output "$RESULTS/bench_ensemble_batching.json"
run benchmarks/bench_schedulers.py --pipeline "$PIPELINE" --crops 2 --crop-size 128 --ensemble-size 5 \
    --steps 10 25 50 --demo-steps 2 --reference-steps 1000 --repeats 3 --output "$RESULTS/bench_schedulers.json"
run benchmarks/bench_pipeline_overhead.py --pipeline "$PIPELINE" --ensemble-size 5 --steps 10 --scheduler ddim \
    --image Image_11R --crop-size 256 --repeats 3 --output "$RESULTS/bench_pipeline_overhead.json"

echo
if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "All benchmarks done; results in $RESULTS/"
