"""The Gradio Space (app.py): its tab functions on the embedded checkpoints, the launched app through
``gradio_client`` (masks come back as lossless PNGs: only 0/255, equal to a direct call), and, when a Chromium is
installed (``make browser``), the app in a real headless browser (``SPACE_SCREENSHOT=path`` keeps its screenshot).

gradio is in the ``demo`` and ``test`` extras; the API and browser tests skip with a reason without it."""

import importlib.util
import os
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from diffusers_retina.image_processing import RetinaImageProcessor

from testing_utils import disc_photograph

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network from gradio either

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "app.py"
CHROMIUM_CANDIDATES = ("chromium-headless-shell", "chromium", "chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def load_app_module():
    spec = importlib.util.spec_from_file_location("retina_app", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def app_module():
    return load_app_module()


@pytest.fixture
def saved_pipeline(tmp_path, make_pipe):
    make_pipe().save_pretrained(tmp_path / "tiny")
    return str(tmp_path / "tiny")


def is_binary_png(path_or_image) -> bool:
    image = path_or_image if isinstance(path_or_image, PIL.Image.Image) else PIL.Image.open(path_or_image)
    return set(np.unique(np.asarray(image.convert("L")))) <= {0, 255}


def crop(path: Path, size: int, mode: str) -> PIL.Image.Image:
    return PIL.Image.open(path).convert(mode).crop((96, 96, 96 + size, 96 + size))


# ------------------------------------------------------------------------------------------------ tab functions


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_segment_returns_mask_uncertainty_and_members(app_module, saved_pipeline):
    rng = np.random.default_rng(0)
    photo = PIL.Image.fromarray(rng.integers(0, 255, size=(30, 41, 3), dtype=np.uint8))
    mask, entropy, members, summary, measures = app_module.segment(photo, ensemble_size=3, steps=2, fusion="staple",
                                                                   seed=1, pipeline=saved_pipeline)
    assert mask.size == entropy.size == (41, 30)
    assert is_binary_png(mask)
    assert len(members) == 3 and all(m.size == (41, 30) for m in members)
    assert "3 members" in summary and "fusion=staple" in summary
    again = app_module.segment(photo, ensemble_size=3, steps=2, fusion="staple", seed=1, pipeline=saved_pipeline)
    assert np.array_equal(np.asarray(again[0]), np.asarray(mask))
    assert again[4] == measures and measures  # a random tiny model: measures, or a clear reason there are none


def test_segment_tab_measures_with_intervals(app_module, tmp_path):
    """The measures text of the segmentation tab: every measure, the fused value and the members' interval."""
    from types import SimpleNamespace

    tube = np.zeros((64, 96), np.uint8)
    tube[30:35, 8:88] = 255
    wider = tube.copy()
    wider[29] = tube[30]  # 6 px wide
    out = SimpleNamespace(masks=[PIL.Image.fromarray(tube)],
                          members=[[PIL.Image.fromarray(m) for m in (tube, wider, tube, wider)]])
    photo = PIL.Image.new("RGB", (96, 64), (180, 90, 40))  # no dark surround: the whole image
    text = app_module.measures_text(photo, out, str(tmp_path))
    lines = text.splitlines()
    assert lines[0].startswith("Field of view: whole image") and "raw member quantiles" in lines[0]
    assert len(lines) == 1 + len(app_module.MEASURE_NAMES)
    calibre = next(line for line in lines if line.startswith("calibre median"))
    low, high = (float(v) for v in calibre.split("[")[1].split("]")[0].split(","))
    value = float(calibre.split()[2])
    assert value == pytest.approx(5.0, abs=0.2) and low == pytest.approx(5.0, abs=0.2) and high > 5.5


def test_large_photographs_are_downscaled(app_module):
    image = PIL.Image.new("RGB", (2000, 1000))
    assert app_module.downscale(image, 960).size == (960, 480)
    assert app_module.downscale(PIL.Image.new("RGB", (100, 50)), 960).size == (100, 50)


def test_features_tab_segments_at_the_heads_scale(app_module):
    """The features tab uses the pipeline's processing_resolution="auto" (no scale constant of its own): a photograph
    is segmented with its field of view resized to the checkpoint's training diameter, and the mask comes back at the
    photograph's size. (The shipped head records 920 px; the check uses a small diameter to stay cheap.)"""
    from diffusers_retina import DiffusionFeaturePipeline

    pipe = app_module.load(DiffusionFeaturePipeline, app_module.DEFAULT_FEATURES)
    assert pipe.config.field_of_view_diameter == 920
    photo = disc_photograph(80, 70, 60, seed=0)
    pipe.register_to_config(field_of_view_diameter=96)
    try:
        mask, uncertainty, summary = app_module.segment_features(photo, seed=0)
    finally:
        pipe.register_to_config(field_of_view_diameter=920)
    assert mask.size == uncertainty.size == photo.size
    scale = 96 / RetinaImageProcessor.field_of_view_diameter(np.asarray(photo))
    assert f"segmented at {round(80 * scale)}x{round(70 * scale)} px, x{scale:.2f}" in summary, summary


def test_missing_inputs_are_clear_errors(app_module, saved_pipeline):
    with pytest.raises(ValueError, match="Upload"):
        app_module.segment(None, pipeline=saved_pipeline)
    with pytest.raises(ValueError, match="vessel mask"):
        app_module.synthesize(None)
    with pytest.raises(ValueError, match="Upload"):
        app_module.segment_features(None)
    with pytest.raises(ValueError, match="angiogram"):
        app_module.adapt(None)


def test_examples_and_embedded_checkpoints_are_there(app_module):
    for path in (app_module.DEFAULT_PIPELINE, app_module.DEFAULT_MASK2IMAGE, app_module.DEFAULT_FEATURES,
                 app_module.DEFAULT_ADAPTDIFF):
        assert (Path(path) / "model_index.json").is_file(), path
    assert PIL.Image.open(app_module.EXAMPLE_FUNDUS).size == (256, 256)
    assert PIL.Image.open(app_module.EXAMPLE_ANGIOGRAM).size == (256, 256)
    assert PIL.Image.open(app_module.EXAMPLE_FUNDUS_FULL).size == (920, 920)  # the feature checkpoint's diameter
    vessels = PIL.Image.open(app_module.EXAMPLE_VESSELS)
    assert vessels.size == (256, 256) and is_binary_png(vessels)
    assert 0.02 < (np.asarray(vessels) > 0).mean() < 0.3  # a vessel tree, not an empty or full mask


def test_mask_to_image_feature_and_adaptation_tabs(app_module):
    """The three other tabs on the embedded checkpoints, on small crops of the examples (a few CPU seconds)."""
    painted, used, summary = app_module.synthesize(crop(app_module.EXAMPLE_VESSELS, 64, "L"), steps=2, seed=0)
    assert painted.mode == "RGB" and painted.size == used.size == (64, 64)
    assert is_binary_png(used) and "2 steps" in summary
    mask, uncertainty, summary = app_module.segment_features(crop(app_module.EXAMPLE_FUNDUS, 64, "RGB"), seed=0)
    assert mask.size == uncertainty.size == (64, 64) and is_binary_png(mask)  # a crop: no field of view to scale
    assert "vessel fraction" in summary and "segmented at" not in summary  # kept at its own size
    mask, probability, painted, summary = app_module.adapt(crop(app_module.EXAMPLE_ANGIOGRAM, 64, "RGB"), steps=2)
    assert mask.size == probability.size == painted.size == (64, 64) and is_binary_png(mask)
    assert painted.mode == "RGB" and "2 steps" in summary


def test_space_files():
    """Space front-matter (the Space's README.md) and its requirements, kept in step with setup.cfg."""
    front, _, _ = (REPO / "space" / "README.md").read_text().removeprefix("---\n").partition("\n---\n")
    config = dict(line.split(": ", 1) for line in front.splitlines() if ": " in line and not line.startswith(" "))
    assert config["sdk"] == "gradio" and config["app_file"] == "app.py" and "sdk_version" in config
    requirements = (REPO / "space" / "requirements.txt").read_text().lower()
    import configparser

    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    needed = [line.split(">")[0].split("<")[0].split("=")[0].strip().lower()
              for line in setup["options"]["install_requires"].splitlines() if line.strip()]
    for package in needed + ["gradio"]:
        assert package in requirements, f"space/requirements.txt lacks {package}"


# ------------------------------------------------------------------------------------------------ launched app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def running_app(app_module):
    pytest.importorskip("gradio", reason="gradio is in the demo/test extras: pip install -e '.[test]'")
    demo = app_module.build_demo()
    demo.queue()
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield demo
    demo.close()


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_api_returns_lossless_png_masks(running_app, app_module, tmp_path):
    from gradio_client import Client, handle_file

    # a generous read timeout: on a busy 2-core machine the first call also loads the checkpoints
    client = Client(running_app.local_url, verbose=False, httpx_kwargs={"timeout": 600}, analytics_enabled=False)
    fundus = tmp_path / "fundus.png"
    crop(app_module.EXAMPLE_FUNDUS, 96, "RGB").save(fundus)
    mask_path, entropy_path, members, summary, measures = client.predict(handle_file(str(fundus)), 2, 1, "mean", 0,
                                                                         api_name="/segment")
    assert PIL.Image.open(mask_path).format == "PNG" and PIL.Image.open(entropy_path).format == "PNG"
    assert is_binary_png(mask_path)  # lossy WebP would add grey levels
    direct = app_module.segment(PIL.Image.open(fundus), ensemble_size=2, steps=1, fusion="mean", seed=0)
    assert np.array_equal(np.asarray(PIL.Image.open(mask_path).convert("L")), np.asarray(direct[0]))
    assert len(members) == 2 and "2 members" in summary
    assert measures == direct[4] and "vessel density" in measures

    vessels = tmp_path / "vessels.png"
    crop(app_module.EXAMPLE_VESSELS, 64, "L").save(vessels)
    painted_path, used_path, _ = client.predict(handle_file(str(vessels)), 2, 1.5, 0, api_name="/synthesize")
    assert PIL.Image.open(painted_path).format == "PNG" and is_binary_png(used_path)
    feature_mask, feature_uncertainty, _ = client.predict(handle_file(str(fundus)), 0, api_name="/features")
    assert PIL.Image.open(feature_mask).format == "PNG" and is_binary_png(feature_mask)
    assert PIL.Image.open(feature_uncertainty).size == (96, 96)
    angiogram = tmp_path / "angiogram.png"
    crop(app_module.EXAMPLE_ANGIOGRAM, 64, "RGB").save(angiogram)
    adapted_mask, _, adapted_painting, _ = client.predict(handle_file(str(angiogram)), 2, 0, api_name="/adapt")
    assert is_binary_png(adapted_mask) and PIL.Image.open(adapted_painting).format == "PNG"


def find_chromium():
    """Debian's Chromium binary (not its /usr/bin shell wrapper, so that closing the browser ends the real process),
    else whichever candidate is on PATH."""
    for name in CHROMIUM_CANDIDATES:
        binary = Path("/usr/lib/chromium") / name
        if binary.is_file():
            return str(binary)
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def test_app_in_a_real_headless_browser(running_app, tmp_path):
    """Chromium from Debian (`make browser`) driven by Playwright: all tabs render, the segmentation runs from the
    page and shows its mask; the screenshot goes to $SPACE_SCREENSHOT when set (docs/space_screenshot.png)."""
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium: `make browser` installs chromium-headless-shell and playwright")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (`make browser`)")
    screenshot = Path(os.environ.get("SPACE_SCREENSHOT") or tmp_path / "space.png")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(running_app.local_url, wait_until="networkidle")
            # the page renders after its scripts run, which can take a while on a busy machine
            page.get_by_role("tab", name="Segment with uncertainty").wait_for(timeout=180_000)
            for tab in ("Segment with uncertainty", "Mask → image", "Features → segmentation",
                        "Adaptation"):
                assert page.get_by_role("tab", name=tab).count() == 1, tab
            images_before = page.locator("img").count()
            page.get_by_role("button", name="Segment", exact=True).click()
            summary = page.get_by_label("Summary").first
            sync_api.expect(summary).to_have_value(re.compile("members"), timeout=600_000)
            assert "256x256 px, 5 members" in summary.input_value()
            # the fused mask, the entropy map and the members' thumbnails appear on the page
            page.wait_for_function(f"document.querySelectorAll('img').length >= {images_before + 3}", timeout=60_000)
            page.wait_for_timeout(1000)  # let the images paint before the screenshot
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert PIL.Image.open(screenshot).size[0] >= 1000
