"""Write CHASE_DB1 photographs re-taken by one simulated camera (``diffusers_retina.data.camera_shift``) as a folder:
``images/`` (what an adaptation run is given, unlabelled), and ``masks/`` + ``valid/`` (the reference and the region
it is known in, for scoring only; never read by the adaptation).

    python benchmarks/make_camera_shift_folder.py --shift combined --output runs/targets/combined
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import PIL.Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from diffusers_retina.data import chase_db1  # noqa: E402
from diffusers_retina.data.camera_shift import CAMERA_SHIFTS, apply_camera_shift  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shift", required=True, choices=list(CAMERA_SHIFTS))
    parser.add_argument("--output", required=True)
    parser.add_argument("--split", default="test", choices=["train", "test"])
    args = parser.parse_args(argv)
    reference = chase_db1(root=_common.chase_root_or_exit(), split=args.split, observer="1stHO")
    output = Path(args.output)
    for folder in ("images", "masks", "valid"):
        (output / folder).mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(reference.stems):
        item = reference[index]
        photo = ((item["image"].float() + 1) / 2).permute(1, 2, 0).numpy()
        image, mask, valid = apply_camera_shift(photo, item["mask"].numpy().astype(bool), CAMERA_SHIFTS[args.shift])
        pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        PIL.Image.fromarray(pixels).save(output / "images" / f"{name}.png")
        PIL.Image.fromarray(mask.astype(np.uint8) * 255).save(output / "masks" / f"{name}.png")
        PIL.Image.fromarray(valid.astype(np.uint8) * 255).save(output / "valid" / f"{name}.png")
    print(f"wrote {len(reference)} CHASE_DB1 {args.split} photographs as the {args.shift} camera takes them "
          f"to {output}")


if __name__ == "__main__":
    main()
