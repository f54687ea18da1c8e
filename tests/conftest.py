"""Shared tiny fixtures for the pipeline and loading tests.

Everything here is sized for a busy 2-core CPU: a UNet with (8, 16) channels, 16x16 images, 1-3 steps.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# No network in tests (DESIGN section 3), and keep diffusers' remote-code module cache out of the user's home.
# Both must be set before diffusers / huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "HF_MODULES_CACHE" not in os.environ:
    _modules_cache = tempfile.mkdtemp(prefix="diffusers_retina_tests_modules_")
    os.environ["HF_MODULES_CACHE"] = _modules_cache
    atexit.register(shutil.rmtree, _modules_cache, ignore_errors=True)

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Optional, Tuple  # noqa: E402

import numpy as np  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from diffusers import ConfigMixin, DDIMScheduler, ModelMixin, UNet2DModel  # noqa: E402
from diffusers.configuration_utils import register_to_config  # noqa: E402
from diffusers.models.unets.unet_2d import UNet2DOutput  # noqa: E402

from diffusers_retina import SegmentationEnsemblePipeline  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: Flags of a tiny segmentation training run (32x32 patches, a (8, 16) UNet, batch 2).
TINY_SEGMENTATION = ["--resolution", "32", "--block_out_channels", "8,16", "--norm_num_groups", "4",
                     "--train_batch_size", "2", "--patches_per_image", "4", "--report_to", "none", "--seed", "3"]


def run_script(script, args, expect: int = 0, cwd=REPO) -> subprocess.CompletedProcess:
    """Run a repository script offline on one thread; assert its exit status (0, or 2 for refused arguments)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == expect, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def four_pairs(tmp_path_factory) -> Path:
    """A folder dataset of 4 tiny image/mask pairs (``case0``..``case3``), one per test module."""
    return write_folder_dataset(tmp_path_factory.mktemp("pairs") / "pairs", num_images=4)


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

IMAGE_SIZE = 16


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    # Tiny tensors: on a busy 2-core machine extra intra-op threads only add scheduling waits.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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


def tiny_head(feature_channels: int = 8, seed: int = 2, trained: bool = True):
    """A tiny ``PriorFeatureRefinerModel`` for :func:`tiny_prior`'s 8 decoder feature channels. Its output layer
    starts at zero (the prior unchanged); ``trained`` gives it random weights so that the head does something."""
    from diffusers_retina.models import PriorFeatureRefinerModel

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


@pytest.fixture
def make_unet():
    return tiny_unet


@pytest.fixture
def make_pipe():
    return tiny_pipeline


@pytest.fixture
def pixel_model_cls():
    return PixelModel


@pytest.fixture
def gen():
    return seeded


@pytest.fixture
def pipe():
    return tiny_pipeline()


@pytest.fixture
def image():
    """One 3-channel NCHW image in [-1, 1] with structure (so members of a trained-like model can differ); the models'
    range: pass ``unit_range(image)`` to a pipeline, which takes [0, 1] tensors."""
    return torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(123)) * 2 - 1
