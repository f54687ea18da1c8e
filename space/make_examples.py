"""Write the Space's example inputs (run from the repository root: ``python space/make_examples.py``).

* ``space/examples/retina_256.png``: ``skimage.data.retina()`` (public domain), downscaled to 256x256 (bicubic);
* ``space/examples/retina_256_vessels.png``: the "Segment with uncertainty" tab's fused mask of it (embedded
  reference checkpoint, 5 members, 2 DDIM steps, mean fusion, seed 0), 0/255, the mask -> image tab's example;
* ``space/examples/retina_920.jpg``: ``skimage.data.retina()`` resized (bicubic) so that its field of view spans the
  feature checkpoint's training diameter (``field_of_view_diameter``, 920 px), the scale the features tab segments at
  (JPEG, quality 90, to keep it small).
"""

import sys
from pathlib import Path

import PIL.Image
from skimage.data import retina

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import app  # noqa: E402


def main() -> None:
    app.EXAMPLES.mkdir(parents=True, exist_ok=True)
    fundus = PIL.Image.fromarray(retina()).convert("RGB").resize((256, 256), PIL.Image.BICUBIC)
    fundus.save(app.EXAMPLE_FUNDUS, optimize=True)
    mask, _, _, summary = app.segment(fundus, ensemble_size=5, steps=2, fusion="mean", seed=0)
    mask.save(app.EXAMPLE_VESSELS, optimize=True)
    diameter = app.load(app.DiffusionFeaturePipeline, app.DEFAULT_FEATURES).config.field_of_view_diameter
    full, _ = app.RetinaImageProcessor.rescale_to_field_of_view(PIL.Image.fromarray(retina()).convert("RGB"), diameter)
    full.save(app.EXAMPLE_FUNDUS_FULL, quality=90, optimize=True)
    print(f"{app.EXAMPLE_FUNDUS}, {app.EXAMPLE_VESSELS}: {summary}")


if __name__ == "__main__":
    main()
