"""``diffusers-retina``: the command-line interface of diffusers-retina, one module per sub-command.

Sub-commands:

* ``segment`` -- vessel segmentation with an ensemble of diffusion samples: a fused mask plus probability and
  uncertainty maps (entropy, variance, mutual information) per image, one row per image in ``results.jsonl`` and
  a ``summary.json``. NIfTI inputs (MRI
  such as BraTS: a 2-D slice, or a 3-D volume segmented slice by slice; modalities as a 4-D file, as several files
  joined by commas, or as case folders with ``--modalities``) give NIfTI outputs with the input's affine and header.
* ``synthesize`` -- paint fundus images from vessel masks (or from masks the pipeline samples itself) with a
  Mask2ImagePipeline; writes ``images/`` + ``masks/`` with matching names, a folder the training scripts read.
* ``features`` -- a DiffusionFeaturePipeline over images: its head's segmentation (mask, probability, uncertainty) or
  the UNet features themselves as safetensors (see :mod:`diffusers_retina.cli.features`).
* ``demo`` -- the reference checkpoint on ``skimage.data.retina()`` and, when present, a CHASE_DB1 test image;
  prints the figures and writes a picture panel (see :mod:`diffusers_retina.cli.demo`).
* ``push`` -- upload a saved pipeline folder to the Hugging Face Hub: the repo is created first, then an explicit
  allow-list of files is uploaded (never training states, pickles or logs; see :mod:`diffusers_retina.hub.upload`).

``segment``, ``synthesize`` and ``features`` run folders sharded and resumable
(:mod:`diffusers_retina.sharded_inference`): under ``accelerate launch`` each process takes its share of the inputs,
inputs whose outputs are complete are skipped (``--overwrite`` redoes them), ``--image-batch-size`` images of one size
share a pipeline call, and each finished input appends its row to a per-process file merged into ``results.jsonl``.

Examples::

    diffusers-retina segment fundus.png photos/ --output-dir results --ensemble-size 5 --steps 2
    diffusers-retina segment eye.jpg --output-dir out --pipeline org/segmentation-ensemble --fusion staple
    diffusers-retina segment BraTS20_Training_001/ --modalities t1,t1ce,t2,flair --label-values 0,1,2,4 \
        --output-dir out --pipeline brats-run
    accelerate launch --num_processes 8 -m diffusers_retina.cli segment photos/ --output-dir results \
        --image-batch-size 4 --device cuda
    diffusers-retina demo --output demo_panel.png
    diffusers-retina push checkpoints/segmentation-ensemble-chase --repo-id my-org/segmentation-ensemble --dry-run

Layout: :mod:`~diffusers_retina.cli.main` builds the parser and dispatches; :mod:`~diffusers_retina.cli.common` holds
what the commands share (flags, device, :func:`~diffusers_retina.cli.common.load_pipeline`,
:func:`~diffusers_retina.cli.common.run_folder_command`); ``segment``, ``measure``, ``synthesize``, ``features``,
``adapt``, ``demo`` and ``push`` have a module each.

No network at run time: the ``diffusers-retina`` entry point (:func:`main`) sets
``HF_HUB_OFFLINE=1`` for every sub-command but ``push`` unless the user set ``HF_HUB_OFFLINE``, so
``--pipeline org/name`` resolves from the local Hugging Face cache. Importing this module changes no Hub setting.
"""

from .common import (
    DEFAULT_PIPELINE,
    DTYPES,
    FUSIONS,
    IMAGE_EXTENSIONS,
    SCHEDULERS,
    CLIError,
    collect_inputs,
    load_pipeline,
    resolve_device,
    run_folder_command,
)
from .main import build_parser, main
from .segment import collect_segment_inputs, segment_image, segment_images, segment_volume

__all__ = [
    "CLIError",
    "DEFAULT_PIPELINE",
    "DTYPES",
    "FUSIONS",
    "IMAGE_EXTENSIONS",
    "SCHEDULERS",
    "build_parser",
    "collect_inputs",
    "collect_segment_inputs",
    "load_pipeline",
    "main",
    "resolve_device",
    "run_folder_command",
    "segment_image",
    "segment_images",
    "segment_volume",
]
