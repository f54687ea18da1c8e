"""Pushed repos carry self-contained remote code (``diffusers_retina_bundle.py``, :mod:`diffusers_retina.bundle`):
``DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)`` works where diffusers-retina is not installed, and
an installed package still wins.

* fast, always: what ``push`` uploads for a tiny segmentation ensemble on a MedSegDiff UNet (a component with its own
  module) and a tiny feature pipeline with a PixelMLPEnsemble head is staged, then loaded and run in a fresh
  interpreter in which the installed package is unimportable (a ``sitecustomize`` meta-path finder), from the staged
  folders and by repo id from an offline Hub cache; the Hub download branch of diffusers' remote-code loader fetches
  the bundle beside the pipeline file;
* slow (about 70 s with a warm pip cache; ``DIFFUSERS_RETINA_FRESH_VENV=0`` skips it): a real fresh venv with torch,
  diffusers, their dependencies and scipy, without diffusers-retina.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, UNet2DModel

import diffusers_retina
from diffusers_retina import DiffusionFeaturePipeline, SegmentationEnsemblePipeline, bundle
from diffusers_retina.hub import upload as push
from diffusers_retina.models import MedSegDiffUNet2DModel, PixelMLPEnsemble
from diffusers_retina.pipelines.pipeline_utils import INSTALL_HINT

SNAPSHOT_SHA = "0123456789abcdef0123456789abcdef01234567"
REPO_ROOT = Path(__file__).resolve().parents[1]

# Makes the installed diffusers_retina unimportable: the top-level package is only found in zip files on sys.path
# (the bundle); its submodules are found in the package's own __path__ (inside the zip).
BLOCKER = textwrap.dedent(
    """
    import importlib.machinery
    import sys


    class BlockInstalledDiffusersRetina:
        def find_spec(self, name, path=None, target=None):
            if name == "diffusers_retina":
                zips = [entry for entry in sys.path if entry.endswith(".zip")]
                spec = importlib.machinery.PathFinder.find_spec(name, zips) if zips else None
                if spec is None:
                    raise ModuleNotFoundError("No module named 'diffusers_retina' (blocked)", name=name)
                return spec
            if name.startswith("diffusers_retina."):
                return importlib.machinery.PathFinder.find_spec(name, path)
            return None


    sys.meta_path.insert(0, BlockInstalledDiffusersRetina())
    """
)

LOAD_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(1)
    seg_folder, feature_folder, check_hub_branch = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    try:
        import diffusers_retina
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("diffusers_retina is importable: " + diffusers_retina.__file__)

    results = {"modules_cache": os.environ["HF_MODULES_CACHE"]}
    if check_hub_branch:
        # diffusers' Hub branch of remote code (hf_hub_download of the pipeline file and of what it imports
        # relatively); offline, model_info (the commit to cache the module under) is the one network call: stood in
        import diffusers.utils.dynamic_modules_utils as dynamic
        from types import SimpleNamespace

        dynamic.model_info = lambda repo_id, revision=None, token=None: SimpleNamespace(sha="hub-branch")
        cls = dynamic.get_class_from_dynamic_module("org/seg", module_file="pipeline_segmentation_ensemble.py",
                                                    class_name="SegmentationEnsemblePipeline", trust_remote_code=True)
        folder = os.path.join(os.environ["HF_MODULES_CACHE"], "diffusers_modules", "local", "org--seg", "hub-branch")
        results["hub_branch"] = {"class": cls.__name__, "files": sorted(os.listdir(folder))}

    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(321))
    for name, location in [("seg_folder", seg_folder), ("seg_hub", "org/seg")]:
        pipe = DiffusionPipeline.from_pretrained(location, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        members = pipe(image, num_inference_steps=2, ensemble_size=2, generator=torch.Generator().manual_seed(0),
                       output_type="pt", return_members=True).members
        results[name] = {"class": type(pipe).__module__ + "." + type(pipe).__name__,
                         "unet": type(pipe.unet).__module__ + "." + type(pipe.unet).__name__,
                         "shape": list(members.shape), "values": members.flatten().tolist()}
    pipe = DiffusionPipeline.from_pretrained(feature_folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(image, output="segmentation", seed=0, field_of_view=False)
    results["feature_folder"] = {"class": type(pipe).__module__ + "." + type(pipe).__name__,
                                 "head": type(pipe.head).__module__ + "." + type(pipe.head).__name__,
                                 "shape": list(out.probabilities.shape),
                                 "values": out.probabilities.flatten().tolist()}
    import diffusers_retina

    results["file"] = diffusers_retina.__file__
    results["version"] = diffusers_retina.__version__
    print("RESULT " + json.dumps(results))
    """
)


def tiny_segmentation() -> SegmentationEnsemblePipeline:
    torch.manual_seed(0)
    unet = MedSegDiffUNet2DModel(sample_size=16, in_channels=4, out_channels=1, block_out_channels=(8, 16),
                                 norm_num_groups=4, ff_parser_grid=(6, 4)).eval()
    pipe = SegmentationEnsemblePipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=100))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_feature_pipeline() -> DiffusionFeaturePipeline:
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, norm_num_groups=4, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).eval()
    head = PixelMLPEnsemble(blocks=["up.0", "up.1"], timesteps=[10], block_channels=[16, 8], ensemble_size=2)
    pipe = DiffusionFeaturePipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100), head=head)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image():
    return torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(321))


def reference_outputs(seg, feature):
    members = seg(_image(), num_inference_steps=2, ensemble_size=2, generator=torch.Generator().manual_seed(0),
                  output_type="pt", return_members=True).members
    probabilities = feature(_image(), output="segmentation", seed=0, field_of_view=False).probabilities
    return members, probabilities


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """Saved folders, what push uploads from them (staged), an offline Hub cache of the segmentation repo, and the
    reference outputs of the pipelines that were saved."""
    root = tmp_path_factory.mktemp("remote_code")
    seg, feature = tiny_segmentation(), tiny_feature_pipeline()
    reference = reference_outputs(seg, feature)
    seg.save_pretrained(root / "saved" / "seg")
    feature.save_pretrained(root / "saved" / "feature")
    for name in ("seg", "feature"):
        push.stage_upload(root / "saved" / name, root / "staged" / name)
    repo = root / "hub" / "models--org--seg"
    shutil.copytree(root / "staged" / "seg", repo / "snapshots" / SNAPSHOT_SHA)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT_SHA)
    return root, reference


def _files(folder: Path):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_push_adds_the_bundle_and_leaves_the_saved_folder_alone(staged):
    root, _ = staged
    saved, uploaded = root / "saved" / "seg", root / "staged" / "seg"
    assert bundle.BUNDLE_FILE not in _files(saved)  # save_pretrained writes the small shims only
    assert push.files_to_push(saved) == _files(uploaded)
    assert bundle.BUNDLE_FILE in _files(uploaded) and "unet/medsegdiff_unet.py" in _files(uploaded)
    shim = (uploaded / "pipeline_segmentation_ensemble.py").read_text()
    assert "from .diffusers_retina_bundle import install" in shim and INSTALL_HINT in shim
    assert "from diffusers_retina" not in shim  # diffusers' import check must not warn about the bundled package
    assert (saved / "pipeline_segmentation_ensemble.py").read_text() != shim  # the saved shim is unchanged
    assert (uploaded / "unet" / "medsegdiff_unet.py").read_text() == (saved / "unet" / "medsegdiff_unet.py").read_text()
    source = (uploaded / bundle.BUNDLE_FILE).read_text()
    assert f'VERSION = "{diffusers_retina.__version__}"' in source
    data = bundle.package_zip()
    assert f'SHA256 = "{hashlib.sha256(data).hexdigest()}"' in source
    assert bundle.package_zip() == data  # deterministic: the same code gives the same file
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert "diffusers_retina/__init__.py" in names and "diffusers_retina/models/medsegdiff_unet.py" in names
    assert not [n for n in names if not n.endswith(".py") or "__pycache__" in n]
    assert len(source) < 600_000


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_loads_and_runs_without_the_package_installed(staged, tmp_path):
    root, (members, probabilities) = staged
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    work = tmp_path / "work"  # a cwd outside the repo: the checkout is not importable from there
    work.mkdir()
    modules = tmp_path / "modules"
    env = dict(os.environ, PYTHONPATH=str(site), HF_MODULES_CACHE=str(modules), HF_HUB_OFFLINE="1",
               HF_HUB_CACHE=str(root / "hub"), OMP_NUM_THREADS="1")
    env.pop("HF_HUB_DISABLE_IMPLICIT_TOKEN", None)
    completed = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(root / "staged" / "seg"),
                                str(root / "staged" / "feature"), "1"], env=env, cwd=work, capture_output=True,
                               text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    assert "might require the following packages" not in completed.stderr
    results = json.loads([line for line in completed.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    bundles = modules / "diffusers_retina_bundles"
    assert Path(results["file"]).is_relative_to(bundles), results["file"]
    assert results["file"].endswith(".zip/diffusers_retina/__init__.py")
    assert results["version"] == diffusers_retina.__version__
    assert results["hub_branch"]["class"] == "SegmentationEnsemblePipeline"
    assert bundle.BUNDLE_FILE in results["hub_branch"]["files"]  # downloaded beside the pipeline file
    for name in ("seg_folder", "seg_hub"):
        assert results[name]["class"] == ("diffusers_retina.pipelines.segmentation_ensemble.pipeline_segmentation_ensemble"
                                         ".SegmentationEnsemblePipeline")
        assert results[name]["unet"] == "diffusers_retina.models.medsegdiff_unet.MedSegDiffUNet2DModel"
        assert results[name]["shape"] == list(members.shape)
        torch.testing.assert_close(torch.tensor(results[name]["values"]).reshape(members.shape), members,
                                   rtol=0, atol=1e-6)
    feature = results["feature_folder"]
    assert feature["class"] == ("diffusers_retina.pipelines.diffusion_features.pipeline_diffusion_features"
                                ".DiffusionFeaturePipeline")
    assert feature["head"] == "diffusers_retina.models.pixel_mlp_ensemble.PixelMLPEnsemble"
    assert feature["shape"] == list(probabilities.shape)
    torch.testing.assert_close(torch.tensor(feature["values"]).reshape(probabilities.shape), probabilities,
                               rtol=0, atol=1e-6)
    assert len(list(bundles.glob("*.zip"))) == 1  # written once, reused by the later loads


def test_an_installed_package_wins_over_the_bundle(staged):
    root, (members, _) = staged
    folder = root / "staged" / "seg"
    for loaded in (DiffusionPipeline.from_pretrained(folder, trust_remote_code=True),
                   SegmentationEnsemblePipeline.from_pretrained(folder)):
        assert type(loaded) is SegmentationEnsemblePipeline and type(loaded.unet) is MedSegDiffUNet2DModel
        loaded.set_progress_bar_config(disable=True)
        out = loaded(_image(), num_inference_steps=2, ensemble_size=2, generator=torch.Generator().manual_seed(0),
                     output_type="pt", return_members=True).members
        torch.testing.assert_close(out, members, rtol=0, atol=1e-6)
    assert not [entry for entry in sys.path if entry.endswith(".zip") and "diffusers_retina_bundles" in entry]
    assert Path(diffusers_retina.__file__).resolve() == REPO_ROOT / "diffusers_retina" / "__init__.py"


def test_without_package_or_bundle_the_error_says_how_to_install(staged, tmp_path):
    root, _ = staged
    script = textwrap.dedent(
        """
        import sys
        sys.modules["diffusers_retina"] = None  # not installed
        path = sys.argv[1]
        try:
            exec(compile(open(path).read(), path, "exec"), {"__name__": "shim"})  # no bundle beside it
        except ImportError as error:
            print("IMPORT_ERROR:", error)
        """
    )
    completed = subprocess.run([sys.executable, "-S", "-c", script,
                                str(root / "staged" / "seg" / "pipeline_segmentation_ensemble.py")],
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert "IMPORT_ERROR:" in completed.stdout and INSTALL_HINT in completed.stdout
    assert "SegmentationEnsemblePipeline" in completed.stdout


def test_push_uploads_the_bundle_and_the_rewritten_shim(staged, monkeypatch):
    from testing_utils import RecordingHfApi

    uploaded = {}

    class ReadingHfApi(RecordingHfApi):  # also keeps what each uploaded file holds at commit time
        def create_commit(self, repo_id, operations, **kwargs):
            for operation in operations:
                source = operation.path_or_fileobj
                uploaded[operation.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()
            return super().create_commit(repo_id, operations, **kwargs)

    root, _ = staged
    monkeypatch.setattr(push, "HfApi", ReadingHfApi)
    monkeypatch.setattr(RecordingHfApi, "calls", [])
    push.push_checkpoint(root / "saved" / "feature", "org/feature")
    commit = RecordingHfApi.calls[-1]
    assert commit["files"] == push.files_to_push(root / "saved" / "feature") == sorted(uploaded)
    for name in commit["files"]:  # exactly what stage_upload writes (the repo's file tree)
        assert uploaded[name] == (root / "staged" / "feature" / name).read_bytes(), name
    assert bundle.BUNDLE_FILE in uploaded and "head/pixel_mlp_ensemble.py" in uploaded


# ------------------------------------------------------------------------------------------------ a real fresh venv

#: What the venv gets: torch, diffusers and the bundled code's runtime imports (bundle.REQUIREMENTS), not the package.
FRESH_VENV_PACKAGES = ["torch==2.13.0", "diffusers==0.42.1", "numpy", "pillow", "safetensors", "huggingface_hub",
                       "tqdm", "scipy"]


def _venv_python():
    """``DIFFUSERS_RETINA_FRESH_VENV_PYTHON``, else a ``python3`` on PATH outside this venv (None: none found)."""
    return os.environ.get("DIFFUSERS_RETINA_FRESH_VENV_PYTHON") or shutil.which("python3", path=os.pathsep.join(
        entry for entry in os.environ.get("PATH", "").split(os.pathsep) if not entry.startswith(sys.prefix)))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DIFFUSERS_RETINA_FRESH_VENV") == "0",
                    reason="DIFFUSERS_RETINA_FRESH_VENV=0: the fresh-venv check (pip installs torch, diffusers) is off")
def test_fresh_venv_without_diffusers_retina(staged, tmp_path):
    """``python -m venv`` + ``pip install`` torch, diffusers and the runtime dependencies (not diffusers-retina),
    then the staged repos load with ``trust_remote_code=True`` and run (about 70 s on a 2-core machine with a warm pip
    cache; ``-m "not slow"`` or ``DIFFUSERS_RETINA_FRESH_VENV=0`` skip it). Python:
    ``DIFFUSERS_RETINA_FRESH_VENV_PYTHON`` (default: a ``python3`` on PATH outside this venv)."""
    root, (members, probabilities) = staged
    python = _venv_python()
    if python is None:
        pytest.skip("no python3 outside this venv to make a fresh venv with (set DIFFUSERS_RETINA_FRESH_VENV_PYTHON)")
    venv = tmp_path / "venv"
    started = time.monotonic()
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=300)
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *FRESH_VENV_PACKAGES], env=env,
                         capture_output=True, text=True, timeout=1200)
    assert pip.returncode == 0, pip.stderr[-3000:]
    installed_seconds = time.monotonic() - started
    freeze = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "freeze"], env=env, capture_output=True,
                            text=True, timeout=120).stdout
    assert "diffusers-retina" not in freeze.lower() and "diffusers_retina" not in freeze.lower()
    work = tmp_path / "work"
    work.mkdir()
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(root / "hub"),
               OMP_NUM_THREADS="1")
    completed = subprocess.run([str(venv / "bin" / "python"), "-c", LOAD_SCRIPT, str(root / "staged" / "seg"),
                                str(root / "staged" / "feature"), "0"], env=env, cwd=work, capture_output=True,
                               text=True, timeout=600)
    total_seconds = time.monotonic() - started
    print(f"fresh venv: {installed_seconds:.0f} s to create and install, {total_seconds:.0f} s in all\n{freeze}")
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    results = json.loads([line for line in completed.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    print("fresh venv loaded:", json.dumps({name: {key: value for key, value in entry.items() if key != "values"}
                                             for name, entry in results.items() if isinstance(entry, dict)}),
          "diffusers_retina from", results["file"])
    assert Path(results["file"]).is_relative_to(tmp_path / "modules" / "diffusers_retina_bundles")
    for name in ("seg_folder", "seg_hub"):
        assert results[name]["shape"] == list(members.shape)
        torch.testing.assert_close(torch.tensor(results[name]["values"]).reshape(members.shape), members,
                                   rtol=0, atol=1e-5)
    assert results["feature_folder"]["shape"] == list(probabilities.shape)
    torch.testing.assert_close(torch.tensor(results["feature_folder"]["values"]).reshape(probabilities.shape),
                               probabilities, rtol=0, atol=1e-5)


def test_save_pretrained_push_to_hub_uploads_the_bundle(tmp_path, monkeypatch):
    import types

    import huggingface_hub

    uploads = []

    def upload_folder(*, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        uploads.append({"files": _files(folder), "folder": folder,
                        "shim": (folder / "pipeline_segmentation_ensemble.py").read_text()})

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kwargs: types.SimpleNamespace(
        repo_id=f"someone/{repo_id}"))
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    folder = tmp_path / "tiny-seg"
    tiny_segmentation().save_pretrained(folder, push_to_hub=True)
    (upload,) = uploads
    assert bundle.BUNDLE_FILE in upload["files"] and "unet/medsegdiff_unet.py" in upload["files"]
    assert "from .diffusers_retina_bundle import install" in upload["shim"]
    assert not upload["folder"].exists()  # the hard-linked upload view is removed
    assert bundle.BUNDLE_FILE not in _files(folder) and sorted(p.name for p in tmp_path.iterdir()) == ["tiny-seg"]
    assert "from diffusers_retina.pipelines" in (folder / "pipeline_segmentation_ensemble.py").read_text()
