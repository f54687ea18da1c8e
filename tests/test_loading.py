"""Every loading / saving entry point of DESIGN section 5, with the tiny SegmentationEnsemblePipeline.

* ``save_pretrained``: safetensors only, remote-code ``model_index.json``, shim files;
* ``SegmentationEnsemblePipeline.from_pretrained(dir | repo id)`` and
  ``DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)``;
* ``custom_pipeline=`` with the community file ``pipelines/segmentation_ensemble``;
* an offline Hub cache (``models--org--name``) loaded in a fresh interpreter;
* ``dtype=`` float16 / bfloat16; the shim's ImportError; ``push_to_hub=True`` (no network: recorded calls);
* a component class of the package saved as ``<component>/<module>.py`` shim.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ModelMixin

import diffusers_retina.models
from diffusers_retina import SegmentationEnsemblePipeline
from diffusers_retina.pipelines.pipeline_utils import INSTALL_HINT

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMUNITY_DIR = REPO_ROOT / "pipelines" / "segmentation_ensemble"
SHIM_NAME = "pipeline_segmentation_ensemble.py"
SNAPSHOT_SHA = "0123456789abcdef0123456789abcdef01234567"


def _image():
    return torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(321))  # [0, 1], as pipelines take


def _output(pipe) -> torch.Tensor:
    """Member probabilities of a fixed seeded call (binary, 3 members, 2 DDIM steps)."""
    pipe.set_progress_bar_config(disable=True)
    out = pipe(_image(), num_inference_steps=2, ensemble_size=3, generator=torch.Generator().manual_seed(0),
               output_type="pt", return_members=True)
    return out.members


@pytest.fixture
def saved(tmp_path, make_pipe):
    """A tiny pipeline, its reference output, and the folder it was saved to."""
    pipe = make_pipe()
    reference = _output(pipe)
    folder = tmp_path / "saved"
    pipe.save_pretrained(folder)
    return pipe, reference, folder


def _files(folder: Path):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------- save


def test_save_pretrained_writes_safetensors_and_remote_code_layout(saved):
    pipe, _, folder = saved
    files = _files(folder)
    assert "unet/diffusion_pytorch_model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_segmentation_ensemble", "SegmentationEnsemblePipeline"]
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]

    shim = (folder / SHIM_NAME).read_text()
    assert "from diffusers_retina.pipelines.segmentation_ensemble import SegmentationEnsemblePipeline" in shim
    assert INSTALL_HINT in shim
    namespace = {}
    exec(compile(shim, SHIM_NAME, "exec"), namespace)  # the shim re-exports the package class itself
    assert namespace["SegmentationEnsemblePipeline"] is SegmentationEnsemblePipeline


# ---------------------------------------------------------------------------------------------- load


def test_class_from_pretrained_gives_the_same_output(saved):
    _, reference, folder = saved
    loaded = SegmentationEnsemblePipeline.from_pretrained(folder)
    assert type(loaded) is SegmentationEnsemblePipeline
    assert isinstance(loaded.scheduler, DDIMScheduler)
    torch.testing.assert_close(_output(loaded), reference, rtol=0, atol=1e-6)


def test_diffusion_pipeline_with_trust_remote_code_gives_our_class(saved):
    _, reference, folder = saved
    loaded = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(loaded) is SegmentationEnsemblePipeline
    torch.testing.assert_close(_output(loaded), reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("target", ["folder", "file"])
def test_custom_pipeline_loads_the_community_file(saved, tmp_path, monkeypatch, target):
    import diffusers.pipelines.pipeline_loading_utils as loading_utils

    _, reference, folder = saved
    # a folder that does not point at our package by itself: no shim, plain class name
    plain = tmp_path / "plain"
    shutil.copytree(folder, plain)
    (plain / SHIM_NAME).unlink()
    index = json.loads((plain / "model_index.json").read_text())
    index["_class_name"] = "SegmentationEnsemblePipeline"
    (plain / "model_index.json").write_text(json.dumps(index))

    requested = []
    original = loading_utils.get_class_from_dynamic_module

    def spy(location, module_file=None, **kwargs):
        requested.append((Path(location).resolve(), module_file))
        return original(location, module_file=module_file, **kwargs)

    monkeypatch.setattr(loading_utils, "get_class_from_dynamic_module", spy)
    custom = COMMUNITY_DIR if target == "folder" else COMMUNITY_DIR / "pipeline.py"
    loaded = DiffusionPipeline.from_pretrained(plain, custom_pipeline=str(custom), trust_remote_code=True)

    assert requested == [(COMMUNITY_DIR.resolve(), "pipeline.py")]
    community_source = (COMMUNITY_DIR / "pipeline.py").read_text()
    executed = [module for name, module in sys.modules.items()
                if name.startswith("diffusers_modules.") and name.endswith(".pipeline")]
    assert any(Path(module.__file__).read_text() == community_source for module in executed)
    assert type(loaded) is SegmentationEnsemblePipeline
    torch.testing.assert_close(_output(loaded), reference, rtol=0, atol=1e-6)


OFFLINE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    assert "huggingface_hub" not in sys.modules
    import torch
    from huggingface_hub import constants
    from diffusers import DiffusionPipeline
    from diffusers_retina import SegmentationEnsemblePipeline

    assert constants.HF_HUB_OFFLINE
    torch.set_num_threads(1)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(321))
    results = {}
    for name, load in [
        ("class", lambda: SegmentationEnsemblePipeline.from_pretrained("org/name")),
        ("diffusers", lambda: DiffusionPipeline.from_pretrained("org/name", trust_remote_code=True)),
    ]:
        pipe = load()
        pipe.set_progress_bar_config(disable=True)
        members = pipe(image, num_inference_steps=2, ensemble_size=3, generator=torch.Generator().manual_seed(0),
                       output_type="pt", return_members=True).members
        results[name] = {"class": type(pipe).__name__, "module": type(pipe).__module__,
                         "values": members.flatten().tolist(), "checksum": float(members.double().sum())}
    print("RESULT " + json.dumps(results))
    """
)


def _hub_cache(folder: Path, cache: Path) -> Path:
    """Lay ``folder`` out as the Hub cache entry of ``org/name``: ``models--org--name/{refs/main, snapshots/<sha>}``."""
    repo = cache / "models--org--name"
    shutil.copytree(folder, repo / "snapshots" / SNAPSHOT_SHA)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT_SHA)
    return repo / "snapshots" / SNAPSHOT_SHA


def test_class_from_pretrained_repo_id_goes_through_snapshot_download(saved, tmp_path, monkeypatch):
    import huggingface_hub

    _, reference, folder = saved
    snapshot = _hub_cache(folder, tmp_path / "hub")
    requested = []
    original = huggingface_hub.snapshot_download

    def spy(repo_id, **kwargs):
        requested.append((repo_id, kwargs.get("local_files_only")))
        return original(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = SegmentationEnsemblePipeline.from_pretrained("org/name", cache_dir=str(tmp_path / "hub"))
    assert requested == [("org/name", True)]  # offline mode means local files only
    assert Path(loaded.name_or_path).resolve() == snapshot.resolve()
    torch.testing.assert_close(_output(loaded), reference, rtol=0, atol=1e-6)


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_offline_hub_cache_in_a_fresh_interpreter(saved, tmp_path):
    _, reference, folder = saved
    _hub_cache(folder, tmp_path / "hub")

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    env.pop("HF_HUB_DISABLE_IMPLICIT_TOKEN", None)
    completed = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], env=env, cwd=tmp_path, capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = [l for l in completed.stdout.splitlines() if l.startswith("RESULT ")][-1]
    results = json.loads(line[len("RESULT "):])
    for name in ("class", "diffusers"):
        assert results[name]["class"] == "SegmentationEnsemblePipeline"
        assert results[name]["module"] == SegmentationEnsemblePipeline.__module__  # the package's class, not a copy
        values = torch.tensor(results[name]["values"]).reshape(reference.shape)
        torch.testing.assert_close(values, reference, rtol=0, atol=1e-6)
        assert results[name]["checksum"] == pytest.approx(float(reference.double().sum()), abs=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_dtype_loading(saved, dtype):
    _, reference, folder = saved
    loaded = SegmentationEnsemblePipeline.from_pretrained(folder, dtype=dtype)
    assert loaded.unet.dtype == dtype
    assert {p.dtype for p in loaded.unet.parameters()} == {dtype}
    # a reduced-precision call on CPU: same members up to rounding
    members = _output(loaded)
    assert members.dtype == torch.float32 and torch.isfinite(members).all()
    torch.testing.assert_close(members, reference, rtol=0, atol=0.05)


# ---------------------------------------------------------------------------------------------- shims


SHIM_IMPORT_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["diffusers_retina"] = None  # the package is not installed
    path = sys.argv[1]
    try:
        exec(compile(open(path).read(), path, "exec"), {"__name__": "shim"})
    except ImportError as error:
        print("IMPORT_ERROR:", error)
        print("CAUSE:", type(error.__cause__).__name__)
    else:
        print("NO_ERROR")
    """
)


@pytest.mark.parametrize("which", ["saved_shim", "community_file"])
def test_shim_import_error_tells_how_to_install(saved, which):
    _, _, folder = saved
    path = folder / SHIM_NAME if which == "saved_shim" else COMMUNITY_DIR / "pipeline.py"
    completed = subprocess.run([sys.executable, "-S", "-c", SHIM_IMPORT_SCRIPT, str(path)], capture_output=True,
                               text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert "IMPORT_ERROR:" in completed.stdout and "NO_ERROR" not in completed.stdout
    assert "pip install diffusers-retina" in completed.stdout
    assert "SegmentationEnsemblePipeline" in completed.stdout
    assert "CAUSE: ModuleNotFoundError" in completed.stdout  # the original error is chained


# ---------------------------------------------------------------------------------------------- push_to_hub


@pytest.fixture
def recorded_hub(monkeypatch):
    import huggingface_hub

    calls = {"create_repo": [], "upload_folder": []}

    def create_repo(repo_id, **kwargs):
        calls["create_repo"].append((repo_id, kwargs))
        return types.SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"someone/{repo_id}")

    def upload_folder(*, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        readme = folder / "README.md"
        calls["upload_folder"].append({
            "repo_id": repo_id, "files": _files(folder), "kwargs": kwargs,
            "readme": readme.read_text() if readme.is_file() else None,
        })
        return "https://huggingface.co/fake/commit"

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_weights_shims_and_a_card(make_pipe, tmp_path, recorded_hub):
    folder = tmp_path / "tiny-seg"
    make_pipe().save_pretrained(folder, push_to_hub=True, private=True, commit_message="tiny upload")

    assert [repo for repo, _ in recorded_hub["create_repo"]] == ["tiny-seg"]
    assert recorded_hub["create_repo"][0][1]["private"] is True
    (upload,) = recorded_hub["upload_folder"]
    assert upload["repo_id"] == "someone/tiny-seg"
    assert upload["kwargs"].get("commit_message") == "tiny upload"
    for name in ("README.md", SHIM_NAME, "model_index.json", "unet/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json"):
        assert name in upload["files"], name
    assert "someone/tiny-seg" in upload["readme"] and "SegmentationEnsemblePipeline" in upload["readme"]
    assert "library_name: diffusers" in upload["readme"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_segmentation_ensemble", "SegmentationEnsemblePipeline"]


def test_push_to_hub_keeps_a_card_written_beside(make_pipe, tmp_path, recorded_hub):
    folder = tmp_path / "with-card"
    folder.mkdir()
    card = "---\nlicense: cc-by-4.0\n---\n# Measured card\n"
    (folder / "README.md").write_text(card)
    make_pipe().save_pretrained(folder, push_to_hub=True, repo_id="org/with-card")

    assert recorded_hub["create_repo"][0][0] == "org/with-card"
    (upload,) = recorded_hub["upload_folder"]
    assert upload["repo_id"] == "org/with-card"
    assert upload["readme"] == card
    assert SHIM_NAME in upload["files"]


# ---------------------------------------------------------------------------------------------- package components


def test_package_component_is_saved_as_a_shim_and_loads_back(pixel_model_cls, make_pipe, tmp_path, monkeypatch):
    """A model class of this package is written as ``unet/<module>.py`` and mapped back on load (DESIGN section 5)."""
    module_name = "diffusers_retina.models.tiny_pixel_model"
    module = types.ModuleType(module_name)
    module.ModelMixin = ModelMixin  # diffusers resolves such components from sys.modules and needs this attribute
    module.PixelModel = pixel_model_cls
    exec("class TinyPixelModel(PixelModel):\n    pass\n", module.__dict__)
    model_cls = module.TinyPixelModel
    assert model_cls.__module__ == module_name
    monkeypatch.setitem(sys.modules, module_name, module)
    monkeypatch.setattr(diffusers_retina.models, "TinyPixelModel", model_cls, raising=False)

    torch.manual_seed(0)
    pipe = make_pipe(model_cls())
    reference = _output(pipe)
    folder = tmp_path / "component"
    pipe.save_pretrained(folder)

    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["tiny_pixel_model", "TinyPixelModel"]
    shim = (folder / "unet" / "tiny_pixel_model.py").read_text()
    assert f"from {module_name} import TinyPixelModel" in shim and INSTALL_HINT in shim
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    for loaded in (SegmentationEnsemblePipeline.from_pretrained(folder),
                   DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)):
        assert type(loaded) is SegmentationEnsemblePipeline
        assert type(loaded.unet) is model_cls
        torch.testing.assert_close(_output(loaded), reference, rtol=0, atol=1e-6)
