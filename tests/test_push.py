"""``diffusers-retina push`` and training's ``--push_to_hub``: the repo is created first, exactly the allow-listed
files are uploaded (never training states, optimizer states, pickles or logs), ``--dry-run`` prints the list, and
importing the CLI changes no Hub setting. ``HfApi`` is replaced by a recorder: no network."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusers_retina import cli
from diffusers_retina.hub import upload as push

from testing_utils import RecordingHfApi
from testing_utils import REPO, write_folder_dataset
from testing_utils import TINY_SEGMENTATION as TINY

REFERENCE = REPO / "checkpoints" / "segmentation-ensemble-chase"
REFERENCE_FILES = [
    "README.md",
    "diffusers_retina_bundle.py",  # generated at push time: the self-contained code (diffusers_retina.bundle)
    "evaluation.json",
    "model_index.json",
    "pipeline_segmentation_ensemble.py",
    "scheduler/scheduler_config.json",
    "training_info.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
]


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setattr(push, "HfApi", RecordingHfApi)
    monkeypatch.setattr(RecordingHfApi, "calls", [])
    monkeypatch.setattr(RecordingHfApi, "fail_create", False)
    return RecordingHfApi


def write_file(path: Path, size: int = 10) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


def training_output_folder(root: Path) -> Path:
    """What a training run leaves in --output_dir: the pipeline, records, validation PNGs and the things that must
    never be uploaded (accelerate states with optimizer and RNG pickles, logs, stray weights in other formats)."""
    for name in ["model_index.json", "README.md", "training_info.json", "evaluation.json",
                 "pipeline_segmentation_ensemble.py", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "unet/medsegdiff_unet.py", "scheduler/scheduler_config.json", "mask_scheduler/scheduler_config.json",
                 "validation/step-000100.png",
                 # never uploaded:
                 "checkpoint-4/model.safetensors", "checkpoint-4/optimizer.bin", "checkpoint-4/scheduler.bin",
                 "checkpoint-4/random_states_0.pkl", "checkpoint-4/unet_ema/config.json",
                 "checkpoint-4/unet_ema/diffusion_pytorch_model.safetensors", "checkpoints/checkpoint_0/model.safetensors",
                 "logs/train/events.out.tfevents.1", "unet/diffusion_pytorch_model.bin", "optimizer.pt", "state.pkl",
                 "notes.txt", "a/b/deep.safetensors", ".cache/huggingface/upload.lock", "__pycache__/x.py",
                 "validation/nested/step.png", "train_script.py"]:
        write_file(root / name)
    write_file(root / "validation" / "huge.png", push.MAX_PNG_BYTES + 1)
    return root


def test_allow_list_on_a_training_output_folder(tmp_path):
    folder = training_output_folder(tmp_path / "run")
    assert push.files_to_push(folder) == [
        "README.md", "evaluation.json", "mask_scheduler/scheduler_config.json", "model_index.json",
        "pipeline_segmentation_ensemble.py", "scheduler/scheduler_config.json", "training_info.json",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/medsegdiff_unet.py",
        "validation/step-000100.png"]


def test_allow_list_of_the_reference_checkpoint():
    assert push.files_to_push(REFERENCE) == REFERENCE_FILES


def test_folders_that_are_not_pipelines_are_refused(tmp_path):
    state = tmp_path / "checkpoint-4"  # what accelerate.save_state writes
    for name in ["model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
                 "unet_ema/config.json", "unet_ema/diffusion_pytorch_model.safetensors"]:
        write_file(state / name)
    with pytest.raises(push.PushError, match="training state .*optimizer.bin"):
        push.files_to_push(state)
    deep = tmp_path / "deep"
    write_file(deep / "a" / "b" / "model.safetensors")  # weights only below the allowed depth
    write_file(deep / "README.md")
    with pytest.raises(push.PushError, match="no \\*.safetensors"):
        push.files_to_push(deep)
    with pytest.raises(push.PushError, match="is not a folder"):
        push.files_to_push(tmp_path / "missing")


def test_dry_run_prints_the_exact_list_and_touches_nothing(hub, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert cli.main(["push", str(REFERENCE), "--repo-id", "my-org/seg", "--dry-run"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert listed == REFERENCE_FILES
    assert "Dry run: nothing uploaded." in out
    assert hub.calls == []
    assert "HF_HUB_OFFLINE" not in os.environ  # push is the one sub-command main() leaves online


def test_push_creates_the_repo_then_uploads_the_allow_list(hub, tmp_path, capsys):
    folder = training_output_folder(tmp_path / "run")
    assert cli.main(["push", str(folder), "--repo-id", "seg-run", "--private", "--token", "hf_x"]) == 0
    assert [call["call"] for call in hub.calls] == ["create_repo", "create_commit"]
    assert hub.calls[0] == {"call": "create_repo", "repo_id": "seg-run", "private": True, "exist_ok": True,
                            "token": "hf_x"}
    assert hub.calls[1]["repo_id"] == "someone/seg-run"  # the full id the Hub returned
    assert hub.calls[1]["files"] == push.files_to_push(folder)
    assert not any(name.startswith(("checkpoint", "logs")) or name.endswith((".bin", ".pkl", ".pt"))
                   for name in hub.calls[1]["files"])
    assert "https://huggingface.co/someone/seg-run" in capsys.readouterr().out


def test_push_errors_name_the_problem(hub, tmp_path, capsys):
    state = tmp_path / "checkpoint-8"
    write_file(state / "optimizer.bin")
    with pytest.raises(SystemExit) as raised:
        cli.main(["push", str(state), "--repo-id", "org/name"])
    assert raised.value.code == 1 and "checkpoint-8" in capsys.readouterr().err and hub.calls == []
    hub.fail_create = True
    with pytest.raises(SystemExit):
        cli.main(["push", str(REFERENCE), "--repo-id", "org/name"])
    err = capsys.readouterr().err
    assert "--repo-id org/name" in err and "Unauthorized" in err
    assert [call["call"] for call in hub.calls] == ["create_repo"]  # nothing uploaded after a failed create
    with pytest.raises(SystemExit):
        cli.main(["push", str(REFERENCE), "--repo-id", "a/b/c", "--dry-run"])
    assert "--repo-id" in capsys.readouterr().err


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_importing_the_cli_sets_no_hub_switch():
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    code = ("import os, diffusers_retina.cli, huggingface_hub.constants as c; "
            "print(os.environ.get('HF_HUB_OFFLINE'), c.HF_HUB_OFFLINE)")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["None", "False"]


def test_main_runs_other_commands_offline(monkeypatch, tmp_path, capsys):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(SystemExit):  # a missing input: the command fails after main() chose offline mode
        cli.main(["segment", str(tmp_path / "missing.png"), "--output-dir", str(tmp_path / "out")])
    capsys.readouterr()
    assert os.environ.get("HF_HUB_OFFLINE") == "1" and huggingface_hub.constants.HF_HUB_OFFLINE is True
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # restored to the test session's setting by monkeypatch


def run_training_in_process(data: Path, out: Path, *extra):
    sys.path.insert(0, str(REPO / "training"))
    try:
        import train_segmentation_ensemble
    finally:
        sys.path.pop(0)
    train_segmentation_ensemble.main(["--train_data_dir", str(data), *TINY, "--max_train_steps", "2",
                                      "--checkpointing_steps", "1", "--output_dir", str(out), "--push_to_hub", *extra])


def test_training_push_to_hub_creates_the_repo_first_and_uploads_the_allow_list(hub, tmp_path, monkeypatch):
    data = write_folder_dataset(tmp_path / "pairs")
    out = tmp_path / "run"
    seen_at_create = []
    original = RecordingHfApi.create_repo

    def create_repo(self, repo_id, **kwargs):
        seen_at_create.append(sorted(p.name for p in out.iterdir()) if out.exists() else [])
        return original(self, repo_id, **kwargs)

    monkeypatch.setattr(RecordingHfApi, "create_repo", create_repo)

    # a failed create stops the run before any training step
    hub.fail_create = True
    with pytest.raises(RuntimeError, match="--push_to_hub"):
        run_training_in_process(data, out)
    assert not list(out.glob("checkpoint-*")) and not (out / "training_info.json").exists()

    hub.fail_create, hub.calls[:], seen_at_create[:] = False, [], []
    run_training_in_process(data, out, "--hub_model_id", "seg-tiny")
    # created at the start (before anything was trained or saved), re-checked (exist_ok) by the final upload
    assert [call["call"] for call in hub.calls] == ["create_repo", "create_repo", "create_commit"]
    assert seen_at_create[0] == []
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    uploaded = hub.calls[-1]["files"]
    assert hub.calls[-1]["repo_id"] == "someone/seg-tiny" and uploaded == push.files_to_push(out)
    assert "unet/diffusion_pytorch_model.safetensors" in uploaded and "README.md" in uploaded
    assert not any(name.startswith(("checkpoint-", "logs")) for name in uploaded)
    # the card and the record name the repo the run was pushed to
    assert json.loads((out / "training_info.json").read_text())["args"]["hub_model_id"] == "someone/seg-tiny"
    assert "someone/seg-tiny" in (out / "README.md").read_text()
