"""An experiment beside the adaptation workflow: fine-tune in the *source's* intensity space instead of the target's.

The workflow fine-tunes the source segmenter on target-looking images (raw target photographs, target-style
paintings), so on an angiogram-like target it must learn to read inverted contrast in 300 steps. Here the same
fine-tuning pairs of a finished workflow run (its ``4-data``, or ``1-pseudo-labels`` for self-training) are first
moved through step 1's transform (``invert+histmatch`` on the fluorescein-like target), the space where the source
already reads the target; the model is then fine-tuned with step 4's own command and scored with the same transform
at inference (``benchmarks/evaluate_adaptdiff.py --row LABEL=FOLDER@TRANSFORM``). The workflow's adapted pipelines do
not apply an input transform, which is why this is a benchmark and not a workflow option.

    python benchmarks/adapt_in_source_space.py --work_dir runs/fa/combined --source_data_dir ../shared/data/chase_db1
    python benchmarks/evaluate_adaptdiff.py --target_dir runs/chase-fa \\
        --row "combined, source space=runs/fa/combined/source-space/4-fine-tune/unet@invert+histmatch"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "training"))
import adaptdiff_steps  # noqa: E402
import train_segmentation_ensemble  # noqa: E402

from diffusers_retina.data.modality import field_of_view_mask, to_source_intensities  # noqa: E402


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", required=True, help="A finished adaptdiff_workflow.py --work_dir.")
    parser.add_argument("--source_data_dir", required=True, help="The source photographs histmatch matches to.")
    parser.add_argument("--source_image_dir", default="images")
    parser.add_argument("--source_stems", default="Image_0*,Image_10*")
    parser.add_argument("--num_source_references", type=int, default=4)
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    state = json.loads((work / "workflow.json").read_text())
    if not state["steps"].get("fine-tune", {}).get("complete"):
        raise SystemExit(f"{work} has no completed fine-tune step (run the workflow first).")
    command = shlex.split(state["steps"]["fine-tune"]["command"])[2:]  # drop "python training/..."
    if len(command) % 2 or any(not flag.startswith("--") or value.startswith("--")
                               for flag, value in zip(command[::2], command[1::2])):
        raise SystemExit(f"{work}: step 4's command is not all '--flag value' pairs; fine-tune the moved data by "
                         "hand.")
    flags = dict(zip(command[::2], command[1::2]))
    data, output = Path(flags["--train_data_dir"]), work / "source-space" / "4-fine-tune"
    transform = adaptdiff_steps.chosen_transform(argparse.Namespace(pseudo_label_transform="none"), work)
    references, reference_fovs = adaptdiff_steps._source_references(args, transform)
    moved = work / "source-space" / "data"
    shutil.rmtree(moved, ignore_errors=True)
    for sub in ("images", "masks", "confident"):
        (moved / sub).mkdir(parents=True)
    done = {}  # hard-linked copies (the combined data lists each target photograph several times) moved once
    for path in sorted((data / "images").glob("*.png")):
        key = os.stat(path).st_ino
        if key not in done:
            image = adaptdiff_steps._read_unit_image(path)
            done[key] = to_source_intensities(image, transform, references, reference_fovs,
                                              fov=field_of_view_mask(image))
        pixels = (np.clip(done[key], 0, 1) * 255).round().astype(np.uint8)
        adaptdiff_steps._save_png(pixels, moved / "images" / path.name)
        for sub in ("masks", "confident"):
            shutil.copy2(data / sub / path.name, moved / sub / path.name)
    flags.update({"--train_data_dir": str(moved), "--output_dir": str(output)})
    print(f"{len(list((moved / 'images').iterdir()))} pairs moved through {transform}; fine-tuning into {output}")
    train_segmentation_ensemble.main([item for pair in flags.items() for item in pair])
    print(f"score with: --row 'LABEL={output / 'unet'}@{transform}'")
    return output


if __name__ == "__main__":
    main()
