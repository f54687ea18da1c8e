"""Gradio Space: the diffusers-retina pipelines, one tab each, on the embedded reference checkpoints.

    pip install -e ".[demo]" && python app.py

Tabs (and their API names, for ``gradio_client``):

* **Segment with uncertainty** (``/segment``) -- ``SegmentationEnsemblePipeline``,
  ``checkpoints/segmentation-anchored-chase`` (residual-anchored diffusion on a U-Net prior): fused vessel mask,
  predictive-entropy map, the ensemble members and the vessel measures with their 90 % intervals over the members
  (in pixels of the downscaled photograph).
* **Mask -> image** (``/synthesize``) -- ``Mask2ImagePipeline``, ``checkpoints/mask2image-chase``: a fundus image
  painted from a vessel mask.
* **Features -> segmentation** (``/features``) -- ``DiffusionFeaturePipeline``, ``checkpoints/feature-head-chase``: a
  pixel-MLP head on a frozen fundus DDPM's features, with its uncertainty.
* **Adaptation** (``/adapt``) -- ``AdaptDiffPipeline``, ``checkpoints/adaptdiff-chase-fa``: vessels of a
  fluorescein-angiography-like image from the adapted segmenter, and a synthetic angiogram painted from that mask.

Masks come back as lossless PNGs (0/255) through the UI and the API (gradio's default image format, WebP, is lossy).
Each checkpoint can be replaced by a folder or Hub repo with ``DIFFUSERS_RETINA_PIPELINE``,
``DIFFUSERS_RETINA_MASK2IMAGE``, ``DIFFUSERS_RETINA_FEATURES`` and ``DIFFUSERS_RETINA_ADAPTDIFF``. Runs on CPU:
inputs are downscaled (longer side at most ``MAX_SIDE`` / ``SMALL_SIDE`` pixels), the segmentation tabs then segment
each photograph at the scale its checkpoint learnt (``processing_resolution="auto"``: the field of view resized to
the training diameter the checkpoint records, 920 px for the references) and the default step counts are small. No
network at run time unless ``HF_HUB_OFFLINE=0`` is set.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network at run time unless the user asks for it

from functools import lru_cache  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import List, Optional, Tuple  # noqa: E402

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402

from diffusers_retina import (  # noqa: E402
    AdaptDiffPipeline,
    DiffusionFeaturePipeline,
    Mask2ImagePipeline,
    SegmentationEnsemblePipeline,
)
from diffusers_retina.image_processing import RetinaImageProcessor  # noqa: E402
from diffusers_retina.measures import (  # noqa: E402
    MEASURE_NAMES,
    MeasureError,
    format_measure,
    RAW_INTERVAL_LABEL,
    load_interval_calibration,
    measure_with_intervals,
    measures_record,
    photograph_field_of_view,
)

ROOT = Path(__file__).resolve().parent
DEFAULT_PIPELINE = str(ROOT / "checkpoints" / "segmentation-anchored-chase")
DEFAULT_MASK2IMAGE = str(ROOT / "checkpoints" / "mask2image-chase")
DEFAULT_FEATURES = str(ROOT / "checkpoints" / "feature-head-chase")
DEFAULT_ADAPTDIFF = str(ROOT / "checkpoints" / "adaptdiff-chase-fa")
EXAMPLES = ROOT / "space" / "examples"
EXAMPLE_FUNDUS = EXAMPLES / "retina_256.png"  # skimage.data.retina() (public domain), downscaled to 256 px
# a mask of it from the plain diffusion reference (checkpoints/segmentation-ensemble-chase, seed 0, 5 members)
EXAMPLE_VESSELS = EXAMPLES / "retina_256_vessels.png"
EXAMPLE_ANGIOGRAM = EXAMPLES / "retina_256_fa.png"  # fluorescein_like(retina_256.png, seed=0)
# skimage.data.retina() resized so its field of view spans the feature checkpoint's training diameter (920 px)
EXAMPLE_FUNDUS_FULL = EXAMPLES / "retina_920.jpg"
MAX_SIDE = 1024  # segmentation uploads (then segmented at the checkpoint's scale, tiled in 256-pixel windows)
SMALL_SIDE = 256  # mask -> image and adaptation inputs
FUSIONS = ["mean", "majority", "staple"]


@lru_cache(maxsize=4)
def load(pipeline_class, name_or_path: str):
    """A pipeline from a folder or Hub repo, in float32 on the CPU, loaded once per (class, path)."""
    pipe = pipeline_class.from_pretrained(name_or_path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(name_or_path: str) -> SegmentationEnsemblePipeline:
    return load(SegmentationEnsemblePipeline, name_or_path)


def downscale(image: PIL.Image.Image, max_side: int = MAX_SIDE,
              resample: int = PIL.Image.BICUBIC) -> PIL.Image.Image:
    """``image`` resized so its longer side is at most ``max_side`` (``RetinaImageProcessor.downscale``)."""
    return RetinaImageProcessor.downscale(image, max_side, resample)


def processed_at(plan) -> str:
    """`` (segmented at HxW, xS, the checkpoint's scale)`` for a resized photograph (a ``ProcessingPlan``), else
    nothing."""
    if plan.basis == "native":
        return ""
    return f" (segmented at {plan.size[1]}x{plan.size[0]} px, x{plan.scale:.2f}, the checkpoint's scale)"


def binary_png(mask) -> PIL.Image.Image:
    """A mask (bool / 0-1 / 0-255 array or tensor) as an "L" image with values 0 and 255 only."""
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    return PIL.Image.fromarray(np.where(array > 0, 255, 0).astype(np.uint8), mode="L")


# ------------------------------------------------------------------------------------------------ tab functions


def segment(image: PIL.Image.Image, ensemble_size: int = 5, steps: int = 2, fusion: str = "mean", seed: int = 0,
            pipeline: str = None) -> Tuple[PIL.Image.Image, PIL.Image.Image, List[PIL.Image.Image], str, str]:
    """Segment one photograph; returns (fused mask 0/255, entropy map, member probability maps, summary text, vessel
    measures with their 90 % intervals over the members, one per line)."""
    if image is None:
        raise ValueError("Upload a fundus photograph first.")
    location = pipeline or os.environ.get("DIFFUSERS_RETINA_PIPELINE", DEFAULT_PIPELINE)
    pipe = load_pipeline(location)
    image = downscale(image.convert("RGB"))
    out = pipe(image, num_inference_steps=int(steps), ensemble_size=int(ensemble_size), fusion=fusion,
               tile_size=256, generator=torch.Generator().manual_seed(int(seed)), return_members=True,
               processing_resolution="auto")
    vessel_fraction = np.asarray(out.masks[0]).astype(bool).mean()
    entropy = np.asarray(out.entropy[0], dtype=np.float32) / 255.0 * np.log(2.0)
    summary = (f"{image.width}x{image.height} px{processed_at(out.processing[0])}, {int(ensemble_size)} members, "
               f"{int(steps)} steps, fusion={fusion}: vessel fraction {vessel_fraction:.3f}, mean predictive entropy "
               f"{entropy.mean():.4f} nats")
    return binary_png(out.masks[0]), out.entropy[0], out.members[0], summary, measures_text(image, out, location)


def measures_text(image: PIL.Image.Image, out, location: str) -> str:
    """The fused mask's vessel measures with their 90 % intervals over the members (in pixels), one per line."""
    fov, note = photograph_field_of_view(np.asarray(image))
    calibration = load_interval_calibration(location) if Path(location).is_dir() else None
    label = calibration.label if calibration else RAW_INTERVAL_LABEL
    members = [np.asarray(member) > 127 for member in out.members[0]]
    try:
        fused, intervals = measure_with_intervals(np.asarray(out.masks[0]) > 0, members, fov,
                                                  calibration=calibration, name="photograph")
    except MeasureError as error:
        return f"No measures: {error}"
    record = measures_record(fused, intervals, note)
    header = (f"Field of view: {record['field_of_view']}; values in pixels of the {image.width}x{image.height} image; "
              f"interval: {label if intervals else 'none (fewer than two members with vessels)'}")
    return "\n".join([header] + [format_measure(name, record["measures"][name]) for name in MEASURE_NAMES])


def synthesize(mask: PIL.Image.Image, steps: int = 10, guidance_scale: float = 1.5, seed: int = 0,
               pipeline: Optional[str] = None) -> Tuple[PIL.Image.Image, PIL.Image.Image, str]:
    """Paint a fundus image from a vessel mask (white = vessel); returns (image, the binary mask used, summary)."""
    if mask is None:
        raise ValueError("Upload or draw a vessel mask first (white vessels on black).")
    pipe = load(Mask2ImagePipeline, pipeline or os.environ.get("DIFFUSERS_RETINA_MASK2IMAGE", DEFAULT_MASK2IMAGE))
    grey = downscale(mask.convert("L"), SMALL_SIDE, PIL.Image.NEAREST)
    binary = binary_png(np.asarray(grey) > 127)
    out = pipe(binary, num_inference_steps=int(steps), guidance_scale=float(guidance_scale), tile_size=64,
               generator=torch.Generator().manual_seed(int(seed)))
    vessel_fraction = (np.asarray(binary) > 0).mean()
    summary = (f"{binary.width}x{binary.height} px mask (vessel fraction {vessel_fraction:.3f}), {int(steps)} steps, "
               f"guidance {float(guidance_scale):g}, seed {int(seed)}")
    return out.images[0], binary, summary


def segment_features(image: PIL.Image.Image, seed: int = 0,
                     pipeline: Optional[str] = None) -> Tuple[PIL.Image.Image, PIL.Image.Image, str]:
    """Vessels from a frozen DDPM's features and a pixel-MLP head; returns (mask 0/255, uncertainty map, summary).

    The photograph is segmented whole at the scale the head learnt (``processing_resolution="auto"``: its field of
    view resized to the checkpoint's training diameter), as the head was trained; the mask and map come back at the
    photograph's size."""
    if image is None:
        raise ValueError("Upload a fundus photograph first.")
    pipe = load(DiffusionFeaturePipeline, pipeline or os.environ.get("DIFFUSERS_RETINA_FEATURES", DEFAULT_FEATURES))
    image = image.convert("RGB")
    out = pipe(image, output="segmentation", seed=int(seed), processing_resolution="auto")
    mask = out.masks[0]
    # the head's uncertainty is an entropy in nats: at most log 2 for two classes, shown as 0..255
    uncertainty = (out.uncertainty[0].float() / np.log(2.0)).clamp(0, 1).mul(255).round().byte().numpy()
    summary = (f"{image.width}x{image.height} px photograph{processed_at(out.processing[0])}: vessel fraction "
               f"{(mask > 0).float().mean():.3f}, mean uncertainty {out.uncertainty[0].float().mean():.4f} nats")
    return binary_png(mask), PIL.Image.fromarray(uncertainty, mode="L"), summary


def adapt(image: PIL.Image.Image, steps: int = 10, seed: int = 0, pipeline: Optional[str] = None
          ) -> Tuple[PIL.Image.Image, PIL.Image.Image, PIL.Image.Image, str]:
    """Segment a target-modality image with the adapted segmenter and paint a synthetic angiogram from the mask;
    returns (mask 0/255, probability map, painted image, summary)."""
    if image is None:
        raise ValueError("Upload an angiogram (target-modality image) first.")
    pipe = load(AdaptDiffPipeline, pipeline or os.environ.get("DIFFUSERS_RETINA_ADAPTDIFF", DEFAULT_ADAPTDIFF))
    image = downscale(image.convert("RGB"), SMALL_SIDE)
    segmentation = pipe.segment(image, tile_size=128)
    mask = np.asarray(segmentation.masks[0]) > 127
    painted = pipe(mask.astype(np.uint8), num_inference_steps=int(steps), reference_images=[image], tile_size=128,
                   generator=torch.Generator().manual_seed(int(seed))).images[0]
    summary = (f"{image.width}x{image.height} px: vessel fraction {mask.mean():.3f}; synthetic angiogram painted "
               f"from the mask in {int(steps)} steps (seed {int(seed)}), histogram-matched to the input")
    return binary_png(mask), segmentation.probabilities[0], painted, summary


# ------------------------------------------------------------------------------------------------ UI


def _example(path: Path) -> Optional[str]:
    return str(path) if path.is_file() else None


def build_demo():
    """The Blocks app: one tab per pipeline; every image output is PNG (lossless)."""
    import gradio as gr

    fundus, vessels = _example(EXAMPLE_FUNDUS), _example(EXAMPLE_VESSELS)
    with gr.Blocks(title="diffusers-retina") as demo:
        gr.Markdown("# diffusers-retina\nDiffusion models for retinal images as diffusers pipelines. Reference models "
                    "trained on CHASE_DB1 (CC BY 4.0, Fraz et al. 2012); the example photograph is "
                    "`skimage.data.retina()` (public domain). Runs on a CPU: keep images small and steps few.")

        with gr.Tab("Segment with uncertainty"):
            gr.Markdown("Each ensemble member is one diffusion sample of the vessel mask, anchored on a U-Net's "
                        "prediction; their disagreement is the uncertainty (predictive entropy), and measuring each "
                        "member gives each vessel measure an interval.")
            with gr.Row():
                image = gr.Image(type="pil", label="Fundus photograph", value=fundus, format="png")
                with gr.Column():
                    ensemble_size = gr.Slider(1, 8, value=5, step=1, label="Ensemble members")
                    steps = gr.Slider(1, 25, value=2, step=1, label="DDIM steps")
                    fusion = gr.Dropdown(FUSIONS, value="mean", label="Fusion")
                    seed = gr.Number(value=0, precision=0, label="Seed")
                    run = gr.Button("Segment", variant="primary")
            with gr.Row():
                mask = gr.Image(label="Fused mask", format="png", type="pil")
                entropy = gr.Image(label="Predictive entropy", format="png", type="pil")
            members = gr.Gallery(label="Members (vessel probability)", columns=5, format="png")
            summary = gr.Textbox(label="Summary")
            measures = gr.Textbox(label="Vessel measures [90 % interval over the members]", lines=11)
            run.click(segment, [image, ensemble_size, steps, fusion, seed],
                      [mask, entropy, members, summary, measures], api_name="segment")
            if fundus:
                gr.Examples([[fundus]], inputs=[image], cache_examples=False)

        with gr.Tab("Mask → image"):
            gr.Markdown("A fundus image painted from a vessel mask (white vessels on black) by a mask-conditioned "
                        "diffusion model (ReTree; concat + SPADE conditioning, classifier-free guidance).")
            with gr.Row():
                vessel_mask = gr.Image(type="pil", label="Vessel mask", value=vessels, format="png",
                                       image_mode="L")
                with gr.Column():
                    synth_steps = gr.Slider(1, 50, value=10, step=1, label="DDIM steps")
                    guidance = gr.Slider(1.0, 3.0, value=1.5, step=0.1, label="Guidance scale")
                    synth_seed = gr.Number(value=0, precision=0, label="Seed")
                    synth_run = gr.Button("Paint", variant="primary")
            with gr.Row():
                painted = gr.Image(label="Synthetic fundus", format="png", type="pil")
                used_mask = gr.Image(label="Mask used (binary)", format="png", type="pil")
            synth_summary = gr.Textbox(label="Summary")
            synth_run.click(synthesize, [vessel_mask, synth_steps, guidance, synth_seed],
                            [painted, used_mask, synth_summary], api_name="synthesize")
            if vessels:
                gr.Examples([[vessels]], inputs=[vessel_mask], cache_examples=False)

        with gr.Tab("Features → segmentation"):
            gr.Markdown("A frozen fundus DDPM as a feature extractor (ddpm-segmentation / DiffDGSSv2 anchoring) and "
                        "a small pixel-MLP ensemble head trained on 20 labelled whole photographs. The photograph is "
                        "segmented whole at the scale the head learnt (its field of view resized to the training "
                        "diameter the checkpoint records, 920 px): about a minute on a CPU.")
            with gr.Row():
                feature_image = gr.Image(type="pil", label="Fundus photograph", format="png",
                                         value=_example(EXAMPLE_FUNDUS_FULL) or fundus)
                with gr.Column():
                    feature_seed = gr.Number(value=0, precision=0, label="Seed")
                    feature_run = gr.Button("Segment from features", variant="primary")
            with gr.Row():
                feature_mask = gr.Image(label="Vessel mask", format="png", type="pil")
                feature_uncertainty = gr.Image(label="Uncertainty (head disagreement)", format="png", type="pil")
            feature_summary = gr.Textbox(label="Summary")
            feature_run.click(segment_features, [feature_image, feature_seed],
                              [feature_mask, feature_uncertainty, feature_summary], api_name="features")

        with gr.Tab("Adaptation"):
            gr.Markdown("AdaptDiff: a vessel segmenter trained on colour photographs, adapted to an unlabelled "
                        "modality (here a fluorescein-angiography-like one) by fine-tuning on angiograms that a "
                        "weakly conditioned diffusion model painted from real vessel masks.")
            with gr.Row():
                angiogram = gr.Image(type="pil", label="Angiogram (target modality)", format="png",
                                     value=_example(EXAMPLE_ANGIOGRAM))
                with gr.Column():
                    adapt_steps = gr.Slider(1, 50, value=10, step=1, label="Painting steps")
                    adapt_seed = gr.Number(value=0, precision=0, label="Seed")
                    adapt_run = gr.Button("Segment and paint", variant="primary")
            with gr.Row():
                adapted_mask = gr.Image(label="Vessel mask (adapted segmenter)", format="png", type="pil")
                adapted_probability = gr.Image(label="Vessel probability", format="png", type="pil")
                adapted_painting = gr.Image(label="Synthetic angiogram painted from the mask", format="png",
                                            type="pil")
            adapt_summary = gr.Textbox(label="Summary")
            adapt_run.click(adapt, [angiogram, adapt_steps, adapt_seed],
                            [adapted_mask, adapted_probability, adapted_painting, adapt_summary], api_name="adapt")
    return demo


if __name__ == "__main__":
    build_demo().launch()
