"""The one shared set of dummy components and helpers of the test suite (in the role of diffusers'
``testing_utils``): tiny models and pipelines for every pipeline of the package, tiny datasets, the training-script
runner and the Hub stand-in. Test modules import from here, never from one another.

Everything is sized for a busy 2-core CPU: (8, 16)-channel UNets, 16x16 images, 1-3 denoising steps.
"""

from __future__ import annotations

import ast
import builtins
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional, Tuple

import numpy as np
import torch
from diffusers import ConfigMixin, DDIMScheduler, DDPMScheduler, ModelMixin, UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput
from PIL import Image

from diffusers_retina import (
    AdaptDiffPipeline,
    DiffusionFeaturePipeline,
    Mask2ImagePipeline,
    SegmentationEnsemblePipeline,
)
from diffusers_retina.data.modality import fluorescein_like
from diffusers_retina.models import ConditionalUNet2DModel, PixelMLPEnsemble, PriorFeatureRefinerModel

REPO = Path(__file__).resolve().parents[1]
#: The CHASE_DB1 folder beside the repository (absent on a user's clone: tests that need it skip with a reason).
CHASE = Path(os.environ.get("DIFFUSERS_RETINA_DATA", REPO.parent / "shared" / "data" / "chase_db1"))
SEGMENTATION_SCRIPT = REPO / "training" / "train_segmentation_ensemble.py"
#: Flags of a tiny segmentation training run (32x32 patches, a (8, 16) UNet, batch 2).
TINY_SEGMENTATION = ["--resolution", "32", "--block_out_channels", "8,16", "--norm_num_groups", "4",
                     "--train_batch_size", "2", "--patches_per_image", "4", "--report_to", "none", "--seed", "3"]
IMAGE_SIZE = 16


# ---------------------------------------------------------------------------------------------- scripts and data


def run_script(script, args, expect: int = 0, cwd=REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a repository script offline on one thread; assert its exit status (0, or 2 for refused arguments)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == expect, result.stderr[-3000:]
    return result


def load_script(name: str):
    """A training script of ``training/`` imported as a module (its parser and helpers, without running it)."""
    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_folder_dataset(root: Path, num_images: int = 3, num_classes: int = 2, size: int = 40) -> Path:
    """Tiny images whose bright pixels are the mask, so the task is learnable and checks are meaningful."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for index in range(num_images):
        mask = rng.integers(0, num_classes, size=(size, size)).astype(np.uint8)
        image = np.stack([mask * (200 // (num_classes - 1))] * 3, axis=-1).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"case{index}.png")
        stored = mask * 255 if num_classes == 2 else mask
        Image.fromarray(stored.astype(np.uint8)).save(root / "masks" / f"case{index}.png")
    return root


#: Runs the training script in this interpreter after wrapping accelerate's ``save`` (used for optimizer.bin, after
#: model.safetensors is written) so that the process SIGKILLs itself in the middle of writing
#: ``checkpoint-<KILL_AT_CHECKPOINT>``.
KILLING_RUNNER = textwrap.dedent(
    """
    import os, runpy, signal, sys
    import accelerate.checkpointing as checkpointing

    kill_step = os.environ["KILL_AT_CHECKPOINT"]
    original_save = checkpointing.save

    def save(obj, path, *args, **kwargs):
        folder = os.path.basename(os.path.dirname(str(path)))
        if folder.split(".")[0] == "checkpoint-" + kill_step and os.path.basename(str(path)).startswith("optimizer"):
            os.kill(os.getpid(), signal.SIGKILL)  # model weights are on disk, the optimizer state is not
        return original_save(obj, path, *args, **kwargs)

    checkpointing.save = save
    sys.argv = [sys.argv[1]] + sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """
)


class RecordingHfApi:
    """Stands in for ``huggingface_hub.HfApi``: records create_repo / create_commit calls in ``calls``."""

    calls: list = []
    fail_create: bool = False

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, repo_type="model", private=False, exist_ok=False):
        RecordingHfApi.calls.append({"call": "create_repo", "repo_id": repo_id, "private": private,
                                     "exist_ok": exist_ok, "token": self.token})
        if RecordingHfApi.fail_create:
            raise OSError("401 Client Error: Unauthorized (invalid token)")
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"someone/{repo_id}")

    def create_commit(self, repo_id, operations, repo_type="model", commit_message=None):
        for operation in operations:  # a file on disk, or the bytes of a card renamed for the repo
            assert isinstance(operation.path_or_fileobj, bytes) or Path(operation.path_or_fileobj).is_file()
        RecordingHfApi.calls.append({"call": "create_commit", "repo_id": repo_id,
                                     "files": sorted(op.path_in_repo for op in operations),
                                     "contents": {op.path_in_repo: op.path_or_fileobj for op in operations
                                                  if isinstance(op.path_or_fileobj, bytes)}})


# ---------------------------------------------------------------------------------------------- inputs


def unit_range(image):
    """Image tensors (or a list of them) from the models' ``[-1, 1]``, in which these tests make them, to the ``[0, 1]``
    the pipelines take (diffusers' convention; ``prepare_images`` maps them back exactly). PIL images and numpy arrays
    pass unchanged."""
    if isinstance(image, torch.Tensor):
        return (image + 1) / 2
    if isinstance(image, (list, tuple)) and image and all(isinstance(item, torch.Tensor) for item in image):
        return [(item + 1) / 2 for item in image]
    return image


def seeded(*seeds: int):
    """One fresh CPU generator, or a list of them for several seeds."""
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return generators[0] if len(generators) == 1 else generators


def vessel_masks(count: int = 2, size=(16, 16), seed: int = 0) -> torch.Tensor:
    """Random binary ``(count, H, W)`` masks."""
    return (torch.rand(count, *size, generator=torch.Generator().manual_seed(seed)) > 0.7).long()


def feature_images(count: int = 2, height: int = 16, width: int = 24, seed: int = 0) -> torch.Tensor:
    """Random NCHW images in [-1, 1] (the models' range)."""
    return torch.rand(count, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def fundus(size: int = 64, seed: int = 0) -> np.ndarray:
    """A synthetic photograph: a bright disc on black with a dark horizontal "vessel" through it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.45 * size) ** 2
    image = np.zeros((size, size, 3), dtype=np.float32)
    image[disc] = (0.8, 0.45, 0.2)
    image[size // 2 - 1: size // 2 + 2, :, 1] *= 0.3  # vessels are dark in the green channel
    image += 0.01 * rng.standard_normal(image.shape).astype(np.float32)
    return np.clip(image * disc[..., None], 0, 1)


def disc_photograph(width: int, height: int, diameter: int, seed: Optional[int] = None) -> Image.Image:
    """An RGB photograph ``width`` x ``height`` whose field of view is a disc ``diameter`` px across on black (with
    ``seed``: a textured disc, so that models see more than a flat colour)."""
    yy, xx = np.mgrid[:height, :width]
    inside = (yy - height / 2) ** 2 + (xx - width / 2) ** 2 < (diameter / 2) ** 2
    colour = np.array([200, 90, 40], dtype=np.float64)
    if seed is not None:
        colour = colour * (0.7 + 0.3 * np.random.default_rng(seed).random((height, width, 1)))
    return Image.fromarray((inside[..., None] * colour).astype(np.uint8))


# ---------------------------------------------------------------------------------------------- dummy components


class PixelModel(ModelMixin, ConfigMixin):
    """Stand-in denoiser with the UNet's call contract whose output at a pixel depends only on the input at that
    pixel (a 1x1 convolution, scaled by the timestep), so tiled and untiled runs must agree.

    ``fn(sample, timestep) -> output`` replaces the convolution when set; every call's input is kept in ``calls``.
    """

    @register_to_config
    def __init__(self, in_channels: int = 4, out_channels: int = 1, block_out_channels: Tuple[int, ...] = (8, 16)):
        super().__init__()
        self.proj = torch.nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.fn: Optional[Callable] = None
        self.calls = []

    def forward(self, sample, timestep, return_dict: bool = True):
        self.calls.append(sample.detach().clone())
        if self.fn is not None:
            output = self.fn(sample, timestep)
        else:
            scale = 1.0 + torch.as_tensor(timestep, dtype=sample.dtype).reshape(-1)[0] / 1000.0
            output = self.proj(sample) * scale
        return UNet2DOutput(sample=output) if return_dict else (output,)


def tiny_unet(image_channels: int = 3, mask_channels: int = 1, out_channels: Optional[int] = None,
              seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=IMAGE_SIZE,
        in_channels=image_channels + mask_channels,
        out_channels=out_channels or mask_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


def tiny_pipeline(unet=None, scheduler=None) -> SegmentationEnsemblePipeline:
    pipe = SegmentationEnsemblePipeline(
        unet=unet if unet is not None else tiny_unet(),
        scheduler=scheduler if scheduler is not None else DDIMScheduler(num_train_timesteps=100),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_prior(seed: int = 1) -> UNet2DModel:
    """A tiny deterministic segmenter (image in, one logit out): the ``prior`` of anchored pipelines."""
    return tiny_unet(image_channels=3, mask_channels=0, out_channels=1, seed=seed)


def tiny_head(feature_channels: int = 8, seed: int = 2, trained: bool = True) -> PriorFeatureRefinerModel:
    """A tiny ``PriorFeatureRefinerModel`` for :func:`tiny_prior`'s 8 decoder feature channels. Its output layer
    starts at zero (the prior unchanged); ``trained`` gives it random weights so that the head does something."""
    torch.manual_seed(seed)
    head = PriorFeatureRefinerModel(feature_channels=feature_channels, hidden_channels=8).eval()
    if trained:
        torch.nn.init.normal_(head.conv_out.weight, std=0.2)
    return head


def tiny_feature_pipeline(scheduler, head=None) -> SegmentationEnsemblePipeline:
    """A residual-anchored pipeline with a feature-reusing refiner over :func:`tiny_prior`."""
    pipe = SegmentationEnsemblePipeline(unet=head or tiny_head(), prior=tiny_prior(), anchor="residual",
                                        scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_conditional(conditioning="concat+spade", mask_channels=1, seed=0, perturb=True, **config
                     ) -> ConditionalUNet2DModel:
    torch.manual_seed(seed)
    model = ConditionalUNet2DModel(sample_size=16, conditioning=conditioning, mask_channels=mask_channels,
                                   block_out_channels=(8, 16), norm_num_groups=4, spade_hidden_channels=8,
                                   **config).eval()
    if perturb:  # SPADE's gamma/beta and the null condition start at zero: move them as training would
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if ".gamma." in name or ".beta." in name or name == "null_condition":
                    parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model


def tiny_mask_unet(seed=0, channels=1) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=16, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                       norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2).eval()


def tiny_mask2image(conditioning="concat+spade", with_mask_model=False, scheduler_cls=DDIMScheduler,
                    **config) -> Mask2ImagePipeline:
    pipe = Mask2ImagePipeline(
        unet=tiny_conditional(conditioning, **config), scheduler=scheduler_cls(num_train_timesteps=100),
        mask_unet=tiny_mask_unet() if with_mask_model else None,
        mask_scheduler=DDPMScheduler(num_train_timesteps=100) if with_mask_model else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


FEATURE_UNET_CONFIGS = {
    "plain": dict(block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2,
                  up_block_types=("UpBlock2D",) * 2),
    "attention": dict(block_out_channels=(8, 16, 16), down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), attention_head_dim=4),
    "two_layers": dict(block_out_channels=(8, 12, 16), layers_per_block=2, down_block_types=("DownBlock2D",) * 3,
                       up_block_types=("UpBlock2D",) * 3, add_attention=False),
}


def tiny_feature_unet(config="plain", seed=0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, norm_num_groups=4,
                       **FEATURE_UNET_CONFIGS[config]).eval()


def tiny_diffusion_features(config="plain", head=None, seed=0) -> DiffusionFeaturePipeline:
    pipe = DiffusionFeaturePipeline(unet=tiny_feature_unet(config, seed),
                                    scheduler=DDPMScheduler(num_train_timesteps=100), head=head)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def decisive_head() -> PixelMLPEnsemble:
    """A pixel-MLP head on the anchor policy (no content-seeded noise) for :func:`tiny_diffusion_features`' UNet, with
    large random weights, so that its probabilities move visibly with its features (a fresh head predicts ~0.5)."""
    head = PixelMLPEnsemble(blocks=["up.0", "up.1"], timesteps=[10], block_channels=[16, 8], ensemble_size=2,
                            policy="anchor")
    generator = torch.Generator().manual_seed(0)
    for parameter in head.parameters():
        parameter.data = torch.randn(parameter.shape, generator=generator)
    return head.eval()


def tiny_adaptdiff(seed: int = 0) -> AdaptDiffPipeline:
    torch.manual_seed(seed)
    unet = ConditionalUNet2DModel(sample_size=16, conditioning="spade", spade_norm="instance", mask_channels=1,
                                  block_out_channels=(8, 16), norm_num_groups=4, spade_hidden_channels=8).eval()
    with torch.no_grad():  # SPADE's gamma/beta start at zero: move them so the mask matters
        for name, parameter in unet.named_parameters():
            if ".gamma." in name or ".beta." in name:
                parameter.add_(0.3 * torch.randn(parameter.shape))
    segmenter = UNet2DModel(sample_size=16, in_channels=3, out_channels=1, block_out_channels=(8, 16),
                            layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                            up_block_types=("UpBlock2D",) * 2).eval()
    pipe = AdaptDiffPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=300), segmenter=segmenter)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------- docstrings


def check_call_example(pipeline_cls) -> None:
    """A pipeline's ``__call__`` docstring carries a usable example (valid Python, real keywords, every name defined)."""
    doc = pipeline_cls.__call__.__doc__
    assert "Examples:" in doc
    example = doc.split("Examples:", 1)[1]
    assert "```py" in example and ">>> " in example
    assert f"{pipeline_cls.__name__}.from_pretrained" in example
    # every keyword the example passes to the pipeline exists in the signature
    calls = re.findall(r"pipe\((.*?)\)\n", example.replace("\n        ...", ""), re.S)
    assert calls
    keywords = {keyword for call in calls for keyword in re.findall(r"(\w+)=", call)}
    assert keywords and keywords <= set(inspect.signature(pipeline_cls.__call__).parameters)
    # the example is valid Python and every name it uses is imported or assigned in it
    code = "\n".join(line.strip()[4:] for line in example.splitlines() if line.strip().startswith((">>> ", "... ")))
    tree = ast.parse(code)
    defined = {alias.asname or alias.name.split(".")[0] for node in ast.walk(tree)
               if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    defined |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    assert used - defined - set(dir(builtins)) == set()


# ---------------------------------------------------------------------------------------------- adaptation
def write_domains(root: Path, count: int = 4, size: int = 48) -> dict:
    """A labelled source folder (synthetic photographs + masks) and an unlabelled target folder (their angiograms)."""
    (root / "source" / "images").mkdir(parents=True)
    (root / "source" / "masks").mkdir(parents=True)
    (root / "target" / "images").mkdir(parents=True)
    for index in range(count):
        image = fundus(size, seed=index)
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[size // 2 - 1: size // 2 + 2, 4:-4] = 255
        Image.fromarray((image * 255).astype(np.uint8)).save(root / "source" / "images" / f"s{index}.png")
        Image.fromarray(mask).save(root / "source" / "masks" / f"s{index}.png")
        angiogram = fluorescein_like(image, seed=index)
        Image.fromarray((angiogram * 255).astype(np.uint8)).save(root / "target" / "images" / f"t{index}.png")
    segmenter = tiny_adaptdiff().segmenter
    segmenter.save_pretrained(root / "segmenter")
    return {"source": root / "source", "target": root / "target", "segmenter": root / "segmenter"}


def adaptdiff_workflow_args(domains: dict, work_dir: Path, *extra: str) -> list:
    """Flags of training/adaptdiff_workflow.py for :func:`write_domains`' folders at tiny sizes (seconds on a CPU)."""
    return [
        "--source_data_dir", str(domains["source"]), "--source_segmenter", str(domains["segmenter"]),
        "--target_data_dir", str(domains["target"]), "--work_dir", str(work_dir),
        "--diffusion_steps", "8", "--diffusion_resolution", "16", "--diffusion_batch_size", "2",
        "--diffusion_block_out_channels", "8,16",
        "--diffusion_args", "--norm_num_groups 4 --spade_hidden_channels 8 --patches_per_image 2",
        "--paint_steps", "2", "--finetune_steps", "4", "--finetune_resolution", "16", "--finetune_batch_size", "2",
        "--finetune_args", "--patches_per_image 2", "--checkpointing_steps", "4", "--tile_size", "16",
        "--num_reference_images", "2", *extra,
    ]
