"""Score a saved DiffusionFeaturePipeline (UNet + head) on the 8 CHASE_DB1 test photographs, whole, at full resolution.

Each test photograph (Image_11L–Image_14R, reference ``1stHO``) is segmented as a user would segment it:
``pipe(photo, output="segmentation", tile_size=--tile-size, field_of_view=...)`` -- the field of view found from the
photograph (``field_of_view_mask``), its surround filled with the field of view's mean colour and predicted as
background -- and scored by the package's metrics (Dice, clDice, AUC-ROC; mean over images) inside that field of view.
``--no-field-of-view`` segments and scores every pixel instead (the pipeline's behaviour before the field of view).

    python benchmarks/evaluate_feature_head.py --pipeline checkpoints/feature-head-chase --threads 2
    python benchmarks/evaluate_feature_head.py --pipeline runs/head-crops --tile-size 256   # heads on crop features
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from label_efficiency import REPORTED, evaluate  # noqa: E402

from diffusers_retina.data import CHASE_DB1_TEST  # noqa: E402


def parse_args(argv=None):
    parser = _common.base_parser(__doc__.split("\n\n")[0], "evaluate_feature_head")
    parser.set_defaults(pipeline="checkpoints/feature-head-chase")
    parser.add_argument("--tile-size", type=int, default=0, help="Segmentation windows (0: whole photographs).")
    parser.add_argument("--no-field-of-view", dest="field_of_view", action="store_false",
                        help="Segment and score every pixel (no field of view, no fill).")
    parser.add_argument("--images", nargs="+", default=list(CHASE_DB1_TEST))
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = _common.setup(args)
    from diffusers_retina import DiffusionFeaturePipeline

    pipe = DiffusionFeaturePipeline.from_pretrained(str(_common.resolve_path(args.pipeline)), dtype=torch.float32)
    pipe.to(device).set_progress_bar_config(disable=True)
    test = _common.test_crops(args.images, 0)

    def predict(image, fov):
        out = pipe((image[None] + 1) / 2, output="segmentation", seed=args.seed, tile_size=args.tile_size or None,
                   field_of_view=fov if args.field_of_view else False)
        return {"mask": out.masks[0].cpu() == 1, "probability": out.probabilities[0, 1].cpu()}

    scores = evaluate(predict, test, field_of_view=args.field_of_view)
    result = {**_common.header(args, device), "pipeline": str(args.pipeline), "tile_size": args.tile_size,
              "field_of_view": args.field_of_view, "images": args.images, **scores}
    path = _common.save_json(args.output, result)
    _common.print_table(["pipeline", *REPORTED, "s/image"],
                        [[args.pipeline, *(scores["metrics"][m] for m in REPORTED), scores["seconds_per_image"]]])
    print(f"\nWrote {path}")


if __name__ == "__main__":
    main()
