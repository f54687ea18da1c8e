"""Crash-safe ``save_pretrained`` and safe loading (issue 15).

* A process SIGKILLed while ``save_pretrained`` writes over an existing pipeline folder leaves the old pipeline, the
  new one, or no pipeline with a clear error -- never new components under the old ``model_index.json``; files beside
  the pipeline (a model card, training checkpoints) survive.
* ``safe_serialization=False`` is an error, not silently ignored.
* Loading is safetensors-only by default (a pickle-only folder is an error naming the file) and weights with missing
  or unexpected tensors are an error naming the file.

The killed saves run in forked children of the test process (cheap: torch is already imported there)."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from safetensors.torch import load_file, save_file

from diffusers_retina import Mask2ImagePipeline, SegmentationEnsemblePipeline
from diffusers_retina.models import ConditionalUNet2DModel
from diffusers_retina.pipelines.pipeline_utils import MODEL_INDEX

from testing_utils import tiny_unet


def two_model_pipe(seed: int, with_mask_model: bool = True) -> Mask2ImagePipeline:
    """A tiny Mask2ImagePipeline with two model components (image UNet and mask UNet)."""
    torch.manual_seed(seed)
    unet = ConditionalUNet2DModel(sample_size=16, conditioning="concat", mask_channels=1, block_out_channels=(8, 16),
                                  norm_num_groups=4).eval()
    mask_unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                            norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                            up_block_types=("UpBlock2D",) * 2).eval() if with_mask_model else None
    return Mask2ImagePipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=100), mask_unet=mask_unet,
                              mask_scheduler=DDPMScheduler(num_train_timesteps=100) if with_mask_model else None)


def weights(pipe) -> dict:
    return {f"{name}.{key}": tensor.detach().clone() for name, component in pipe.components.items()
            if isinstance(component, torch.nn.Module) for key, tensor in component.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def run_killed(action) -> None:
    """Run ``action`` in a forked child that is expected to SIGKILL itself; fail if it exits any other way."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            action()
        finally:
            os._exit(17)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"child status {status}"


@pytest.fixture
def saved_old(tmp_path):
    """Pipeline A saved in a folder that also holds a model card and a training checkpoint."""
    folder = tmp_path / "pipeline"
    old = two_model_pipe(seed=0)
    old.save_pretrained(folder)
    (folder / "README.md").write_text("card of A")
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "model.safetensors").write_bytes(b"training state")
    return folder, weights(old)


def test_kill_while_writing_weights_keeps_the_old_pipeline(saved_old):
    folder, old = saved_old
    new = two_model_pipe(seed=1)

    def save_and_die_in_the_second_weights_file():
        import safetensors.torch

        original, calls = safetensors.torch.save_file, []

        def slow_save_file(tensors, filename, metadata=None):
            calls.append(filename)
            if len(calls) == 2:  # the first model is written; die half-way through the second
                Path(filename).write_bytes(b"\0" * 100)
                os.kill(os.getpid(), signal.SIGKILL)
            return original(tensors, filename, metadata=metadata)

        safetensors.torch.save_file = slow_save_file
        new.save_pretrained(folder)

    run_killed(save_and_die_in_the_second_weights_file)
    loaded = Mask2ImagePipeline.from_pretrained(folder)
    assert same(weights(loaded), old)  # all of A, none of B
    assert (folder / "README.md").read_text() == "card of A"
    assert (folder / "checkpoint-5" / "model.safetensors").read_bytes() == b"training state"

    # the next save cleans up the dead process's temporary folder and lands completely
    new.save_pretrained(folder)
    assert same(weights(Mask2ImagePipeline.from_pretrained(folder)), weights(new))
    assert sorted(p.name for p in folder.parent.iterdir()) == ["pipeline"]
    assert (folder / "README.md").exists() and (folder / "checkpoint-5").is_dir()


def pipeline_files(folder: Path) -> dict:
    """``{path: bytes}`` of the pipeline's own files in ``folder`` (not the card or checkpoints beside it)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).parts[0] not in ("README.md", "checkpoint-5")}


def test_kill_at_every_rename_of_the_swap_never_mixes_components(tmp_path):
    old_reference, new_reference = tmp_path / "reference_a", tmp_path / "reference_b"
    two_model_pipe(seed=0).save_pretrained(old_reference)
    new = two_model_pipe(seed=1)
    new.save_pretrained(new_reference)
    old_files, new_files = pipeline_files(old_reference), pipeline_files(new_reference)
    folder = tmp_path / "work" / "pipeline"
    outcomes = []
    for kill_at in range(2 * len(os.listdir(new_reference)) + 1):  # every entry renamed out and in, then done
        shutil.rmtree(folder.parent, ignore_errors=True)
        shutil.copytree(old_reference, folder)
        (folder / "checkpoint-5").mkdir()
        (folder / "README.md").write_text("card of A")

        def swap_and_die():
            import diffusers_retina.pipelines.pipeline_utils as loading

            original, calls = os.replace, []

            def replace(source, destination):
                calls.append(source)
                if len(calls) == kill_at + 1:
                    os.kill(os.getpid(), signal.SIGKILL)
                return original(source, destination)

            loading.os.replace = replace
            new.save_pretrained(folder)
            os.kill(os.getpid(), signal.SIGKILL)  # past the last rename: the save finished

        run_killed(swap_and_die)
        assert (folder / "checkpoint-5").is_dir() and (folder / "README.md").read_text() == "card of A"
        if not (folder / MODEL_INDEX).exists():  # between the two indexes: no pipeline, and an error that says why
            with pytest.raises(ValueError, match="interrupted"):
                Mask2ImagePipeline.from_pretrained(folder)
            outcomes.append("none")
        else:
            files = pipeline_files(folder)
            assert files in (old_files, new_files), f"mixed components after a kill at rename {kill_at}"
            outcomes.append("old" if files == old_files else "new")
    assert outcomes[0] == "old" and outcomes[-1] == "new" and "none" in outcomes
    assert outcomes == sorted(outcomes, key=["old", "none", "new"].index)  # old, then no pipeline, then new
    assert same(weights(Mask2ImagePipeline.from_pretrained(folder)), weights(new))


def test_saving_replaces_components_the_new_pipeline_lacks(tmp_path):
    folder = tmp_path / "pipeline"
    two_model_pipe(seed=0).save_pretrained(folder)
    assert (folder / "mask_unet").is_dir()
    two_model_pipe(seed=1, with_mask_model=False).save_pretrained(folder)
    assert not (folder / "mask_unet").exists()  # a stale component would load as part of the new pipeline
    assert Mask2ImagePipeline.from_pretrained(folder).mask_unet is None


def test_safe_serialization_false_is_an_error(tmp_path):
    pipe = SegmentationEnsemblePipeline(unet=tiny_unet(), scheduler=DDIMScheduler(num_train_timesteps=100))
    with pytest.raises(ValueError, match="safe_serialization"):
        pipe.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert not (tmp_path / "pickled").exists()
    with pytest.raises(NotADirectoryError, match="save_directory"):
        (tmp_path / "file").write_text("x")
        pipe.save_pretrained(tmp_path / "file")


@pytest.fixture
def saved_segmentation(tmp_path):
    pipe = SegmentationEnsemblePipeline(unet=tiny_unet(), scheduler=DDIMScheduler(num_train_timesteps=100))
    folder = tmp_path / "segmentation"
    pipe.save_pretrained(folder)
    return folder, weights(pipe)


def test_a_pickle_only_folder_is_an_error_naming_the_file(saved_segmentation):
    folder, reference = saved_segmentation
    safetensors_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(safetensors_file), folder / "unet" / "diffusion_pytorch_model.bin")
    safetensors_file.unlink()
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.bin.*safetensors"):
        SegmentationEnsemblePipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.bin"):
        SegmentationEnsemblePipeline.from_pretrained(folder, use_safetensors=True)
    # an explicit opt-in (a trusted file) still loads, through diffusers' restricted unpickling
    assert same(weights(SegmentationEnsemblePipeline.from_pretrained(folder, use_safetensors=False)), reference)


@pytest.mark.parametrize("damage", ["missing", "unexpected"])
def test_weights_with_missing_or_unexpected_tensors_are_an_error_naming_the_file(saved_segmentation, damage):
    folder, _ = saved_segmentation
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    if damage == "missing":
        del tensors["conv_norm_out.weight"]
        key = "conv_norm_out.weight"
    else:
        tensors["extra_head.weight"] = torch.zeros(3)
        key = "extra_head.weight"
    save_file(tensors, path)
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors") as error:
        SegmentationEnsemblePipeline.from_pretrained(folder)
    assert key in str(error.value) and damage in str(error.value)
