"""The Gradio Space's segment function (gradio itself is only needed to build the UI)."""

import importlib.util
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

APP = Path(__file__).resolve().parents[1] / "app.py"


@pytest.fixture
def app_module():
    spec = importlib.util.spec_from_file_location("retina_app", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def saved_pipeline(tmp_path, make_pipe):
    make_pipe().save_pretrained(tmp_path / "tiny")
    return str(tmp_path / "tiny")


def test_segment_returns_mask_uncertainty_and_members(app_module, saved_pipeline):
    rng = np.random.default_rng(0)
    photo = PIL.Image.fromarray(rng.integers(0, 255, size=(30, 41, 3), dtype=np.uint8))
    mask, entropy, members, summary = app_module.segment(photo, ensemble_size=3, steps=2, fusion="staple", seed=1,
                                                         pipeline=saved_pipeline)
    assert mask.size == entropy.size == (41, 30)
    assert set(np.unique(np.asarray(mask))) <= {0, 255}
    assert len(members) == 3 and all(m.size == (41, 30) for m in members)
    assert "3 members" in summary and "fusion=staple" in summary
    again = app_module.segment(photo, ensemble_size=3, steps=2, fusion="staple", seed=1, pipeline=saved_pipeline)
    assert np.array_equal(np.asarray(again[0]), np.asarray(mask))


def test_large_photographs_are_downscaled(app_module):
    image = PIL.Image.new("RGB", (2000, 1000))
    assert app_module.downscale(image, 960).size == (960, 480)
    assert app_module.downscale(PIL.Image.new("RGB", (100, 50)), 960).size == (100, 50)


def test_missing_image_is_a_clear_error(app_module, saved_pipeline):
    with pytest.raises(ValueError, match="Upload"):
        app_module.segment(None, pipeline=saved_pipeline)


def test_ui_builds(app_module):
    pytest.importorskip("gradio")
    demo = app_module.build_demo()
    assert demo is not None
