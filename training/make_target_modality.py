#!/usr/bin/env python
"""Make the fluorescein-angiography-like target modality of the AdaptDiff reference from a CHASE_DB1-style folder.

    python training/make_target_modality.py --data_dir ../shared/data/chase_db1 --output_dir runs/chase-fa

Writes ``<output_dir>/images/<stem>.png`` (``diffusers_retina.data.modality.fluorescein_like``: inverted, background-
flattened green channel, gamma, blur, vignetting, noise seeded by the image's index) and copies the reference masks
to ``<output_dir>/reference/`` -- used only to *evaluate* adaptation, never by the workflow. The images stay under the
source dataset's licence (CHASE_DB1: CC BY 4.0, Fraz et al. 2012, Kingston University London): a README.md beside them
says so.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import PIL.Image

README = """---
pretty_name: {name} (CHASE_DB1, fluorescein-angiography-like)
license: CC BY 4.0
attribution: "Derived from CHASE_DB1 (Fraz MM et al., An ensemble classification-based approach applied to retinal
  blood vessel segmentation, IEEE Trans. Biomed. Eng. 59(9):2538-2548, 2012) by diffusers-retina's fluorescein_like
  transform."
homepage: https://researchdata.kingston.ac.uk/96/
---

# {name}: a fluorescein-angiography-like target modality

Made by `training/make_target_modality.py` of diffusers-retina from the colour photographs in `{source}` with
`diffusers_retina.data.modality.fluorescein_like` (seed = index of the image in sorted order). `reference/` holds the
source's vessel masks, used only to evaluate adaptation. Derived from CHASE_DB1 (Fraz et al., "An ensemble
classification-based approach applied to retinal blood vessel segmentation", IEEE TBME 2012; Kingston University
London), licensed CC BY 4.0: https://creativecommons.org/licenses/by/4.0/ -- the transform is the only change.
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--data_dir", type=str, required=True, help="Folder with images/ and the mask folder.")
    parser.add_argument("--image_dir", type=str, default="images")
    parser.add_argument("--mask_dir", type=str, default="1stHO")
    parser.add_argument("--mask_suffix", type=str, default="_1stHO")
    parser.add_argument("--output_dir", type=str, required=True)
    args = parser.parse_args(argv)

    from diffusers_retina.data import read_image
    from diffusers_retina.data.modality import fluorescein_like

    images = sorted(p for p in (Path(args.data_dir) / args.image_dir).iterdir() if p.is_file())
    if not images:
        parser.error(f"--image_dir: no images in {Path(args.data_dir) / args.image_dir}.")
    output = Path(args.output_dir)
    (output / "images").mkdir(parents=True, exist_ok=True)
    (output / "reference").mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(images):
        angiogram = fluorescein_like(read_image(path, 3), seed=index)
        PIL.Image.fromarray((angiogram * 255).round().astype(np.uint8)).save(output / "images" / f"{path.stem}.png")
        for mask in (Path(args.data_dir) / args.mask_dir).glob(f"{path.stem}{args.mask_suffix}.*"):
            shutil.copy(mask, output / "reference" / f"{path.stem}{mask.suffix}")
    (output / "README.md").write_text(README.format(name=output.name, source=args.data_dir))
    print(f"{len(images)} target images in {output / 'images'}")


if __name__ == "__main__":
    main()
