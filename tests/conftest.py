"""pytest set-up and fixtures; the dummy components themselves live in ``testing_utils`` (imported by test modules).

Everything here is sized for a busy 2-core CPU: a UNet with (8, 16) channels, 16x16 images, 1-3 steps.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# No network in tests, and keep diffusers' remote-code module cache out of the user's home. Both must be set before
# diffusers / huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "HF_MODULES_CACHE" not in os.environ:
    _modules_cache = tempfile.mkdtemp(prefix="diffusers_retina_tests_modules_")
    os.environ["HF_MODULES_CACHE"] = _modules_cache
    atexit.register(shutil.rmtree, _modules_cache, ignore_errors=True)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from testing_utils import IMAGE_SIZE, PixelModel, seeded, tiny_pipeline, tiny_unet, write_folder_dataset  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    # Tiny tensors: on a busy 2-core machine extra intra-op threads only add scheduling waits.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def four_pairs(tmp_path_factory) -> Path:
    """A folder dataset of 4 tiny image/mask pairs (``case0``..``case3``), one per test module."""
    return write_folder_dataset(tmp_path_factory.mktemp("pairs") / "pairs", num_images=4)


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
