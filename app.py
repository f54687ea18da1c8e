"""Gradio Space: vessel segmentation with a diffusion ensemble and its uncertainty.

    pip install -e ".[demo]" && python app.py

The pipeline is the embedded reference checkpoint unless ``DIFFUSERS_RETINA_PIPELINE`` names another folder or Hub
repo. Runs on CPU; large photographs are downscaled so that their longer side is ``MAX_SIDE`` pixels.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network at run time unless the user asks for it

from functools import lru_cache  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import List, Tuple  # noqa: E402

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402

from diffusers_retina import SegmentationEnsemblePipeline  # noqa: E402

DEFAULT_PIPELINE = str(Path(__file__).resolve().parent / "checkpoints" / "segmentation-ensemble-chase")
MAX_SIDE = 960
FUSIONS = ["mean", "majority", "staple"]


@lru_cache(maxsize=1)
def load_pipeline(name_or_path: str) -> SegmentationEnsemblePipeline:
    pipe = SegmentationEnsemblePipeline.from_pretrained(name_or_path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def downscale(image: PIL.Image.Image, max_side: int = MAX_SIDE) -> PIL.Image.Image:
    scale = max_side / max(image.size)
    if scale >= 1:
        return image
    return image.resize((round(image.width * scale), round(image.height * scale)), PIL.Image.BICUBIC)


def segment(image: PIL.Image.Image, ensemble_size: int = 5, steps: int = 2, fusion: str = "mean", seed: int = 0,
            pipeline: str = None) -> Tuple[PIL.Image.Image, PIL.Image.Image, List[PIL.Image.Image], str]:
    """Segment one photograph; returns (fused mask, entropy map, member probability maps, summary text)."""
    if image is None:
        raise ValueError("Upload a fundus photograph first.")
    pipe = load_pipeline(pipeline or os.environ.get("DIFFUSERS_RETINA_PIPELINE", DEFAULT_PIPELINE))
    image = downscale(image.convert("RGB"))
    out = pipe(image, num_inference_steps=int(steps), ensemble_size=int(ensemble_size), fusion=fusion,
               tile_size=256, generator=torch.Generator().manual_seed(int(seed)), return_members=True)
    vessel_fraction = np.asarray(out.masks[0]).astype(bool).mean()
    entropy = np.asarray(out.entropy[0], dtype=np.float32) / 255.0 * np.log(2.0)
    summary = (f"{image.width}x{image.height} px, {int(ensemble_size)} members, {int(steps)} steps, fusion={fusion}: "
               f"vessel fraction {vessel_fraction:.3f}, mean predictive entropy {entropy.mean():.4f} nats")
    return out.masks[0], out.entropy[0], out.members[0], summary


def build_demo():
    import gradio as gr

    example = None
    try:
        from skimage.data import retina

        example = PIL.Image.fromarray(retina())
    except ImportError:
        pass
    with gr.Blocks(title="diffusers-retina: diffusion segmentation ensembles") as demo:
        gr.Markdown("# Retinal vessel segmentation with a diffusion ensemble\nEach member is one diffusion sample; "
                    "their disagreement is the uncertainty map. Reference model trained on CHASE_DB1 (CC BY 4.0).")
        with gr.Row():
            image = gr.Image(type="pil", label="Fundus photograph", value=example)
            with gr.Column():
                ensemble_size = gr.Slider(1, 8, value=5, step=1, label="Ensemble members")
                steps = gr.Slider(1, 25, value=2, step=1, label="DDIM steps")
                fusion = gr.Dropdown(FUSIONS, value="mean", label="Fusion")
                seed = gr.Number(value=0, precision=0, label="Seed")
                run = gr.Button("Segment", variant="primary")
        with gr.Row():
            mask = gr.Image(label="Fused mask")
            entropy = gr.Image(label="Predictive entropy")
        members = gr.Gallery(label="Members (vessel probability)", columns=5)
        summary = gr.Textbox(label="Summary")
        run.click(segment, [image, ensemble_size, steps, fusion, seed], [mask, entropy, members, summary])
    return demo


if __name__ == "__main__":
    build_demo().launch()
