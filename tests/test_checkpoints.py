"""Crash-safe training checkpoints (issue 15): ``save_checkpoint`` writes ``checkpoint-<N>.tmp``, marks it complete and
renames it; "latest" is the newest *complete* checkpoint; rotation happens only after the new one is complete; the
training clock is JSON inside the checkpoint, never a pickle that accelerate would load with ``weights_only=False``.

The end-to-end test SIGKILLs a tiny training run while it writes a checkpoint and checks that resuming with
``--resume_from_checkpoint latest`` ends with weights bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusers_retina.training_utils import (
    CHECKPOINT_COMPLETE,
    TrainingClock,
    checkpoint_step,
    complete_checkpoints,
    find_resume_checkpoint,
    save_checkpoint,
)

from testing_utils import KILLING_RUNNER, write_folder_dataset
from testing_utils import SEGMENTATION_SCRIPT as SCRIPT
from testing_utils import TINY_SEGMENTATION as TINY

REPO = Path(__file__).resolve().parents[1]



def _env(**extra):
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)


def _train(args, **env):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=_env(**env), capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory):
    return write_folder_dataset(tmp_path_factory.mktemp("checkpoint_data") / "pairs")


def _mark(folder: Path, step: int) -> Path:
    """A fake complete checkpoint."""
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / CHECKPOINT_COMPLETE).write_text(json.dumps({"step": step}))
    return folder


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_kill_while_writing_a_checkpoint_resumes_to_bit_identical_weights(folder_dataset, tmp_path):
    common = ["--train_data_dir", str(folder_dataset), *TINY, "--max_train_steps", "8", "--checkpointing_steps", "4",
              "--checkpoints_total_limit", "1", "--use_ema", "--save_dtype", "float32"]
    straight = tmp_path / "straight"
    result = _train(common + ["--output_dir", str(straight)])
    assert result.returncode == 0, result.stderr[-3000:]

    crashed = tmp_path / "crashed"
    killed = subprocess.run([sys.executable, "-c", KILLING_RUNNER, str(SCRIPT), *common, "--output_dir", str(crashed)],
                            cwd=REPO, env=_env(KILL_AT_CHECKPOINT="8"), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # the interrupted checkpoint is not complete, and the limit of 1 did not delete the previous one first
    assert [p.name for p in complete_checkpoints(crashed)] == ["checkpoint-4"]
    assert not (crashed / "checkpoint-8" / CHECKPOINT_COMPLETE).exists()
    # strays that "latest" must ignore: another name, and a newer folder an older version left half-written
    (crashed / "checkpoint-foo").mkdir()
    (crashed / "checkpoint-9").mkdir()
    (crashed / "checkpoint-9" / "model.safetensors").write_bytes(b"truncated")

    resumed = _train(common + ["--output_dir", str(crashed), "--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {crashed / 'checkpoint-4'}" in resumed.stdout + resumed.stderr

    for name in ("model.safetensors", "unet_ema/diffusion_pytorch_model.safetensors"):
        a, b = load_file(straight / "checkpoint-8" / name), load_file(crashed / "checkpoint-8" / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a), name
    a = load_file(straight / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(crashed / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)

    # rotation after completion: only the new checkpoint is left, and no temporary folder
    assert [p.name for p in complete_checkpoints(crashed)] == ["checkpoint-8"]
    assert not list(crashed.glob("checkpoint-*.tmp"))
    # the clock is JSON in the checkpoint; nothing is pickled for accelerate to load with weights_only=False
    checkpoint = crashed / "checkpoint-8"
    assert json.loads((checkpoint / TrainingClock.FILE_NAME).read_text())["seconds"] > 0
    assert not list(checkpoint.glob("custom_checkpoint_*.pkl"))
    assert json.loads((checkpoint / CHECKPOINT_COMPLETE).read_text())["step"] == 8


class _Payload:
    """Unpickling this creates a file: the proof that a pickle ran code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_a_pickled_custom_state_in_a_checkpoint_is_refused_not_executed(folder_dataset, tmp_path):
    out = tmp_path / "run"
    common = ["--train_data_dir", str(folder_dataset), *TINY, "--max_train_steps", "2", "--checkpointing_steps", "1",
              "--output_dir", str(out)]
    result = _train(common)
    assert result.returncode == 0, result.stderr[-3000:]
    sentinel = tmp_path / "code_ran"
    with open(out / "checkpoint-2" / "custom_checkpoint_0.pkl", "wb") as handle:
        pickle.dump({"seconds": _Payload(str(sentinel))}, handle)
    (out / "model_index.json").unlink()  # so the run cannot pass by not resuming
    result = _train(common + ["--resume_from_checkpoint", "latest"])
    assert result.returncode != 0
    assert "custom_checkpoint_0.pkl" in result.stderr and "weights_only=False" in result.stderr
    assert not sentinel.exists()


# ---------------------------------------------------------------------------------------------- the helpers


def test_latest_is_the_newest_complete_checkpoint(tmp_path):
    _mark(tmp_path / "checkpoint-2", 2)
    _mark(tmp_path / "checkpoint-10", 10)
    (tmp_path / "checkpoint-30").mkdir()  # interrupted: no completion marker
    _mark(tmp_path / "checkpoint-40.tmp", 40)  # still being renamed
    (tmp_path / "checkpoint-foo").mkdir()
    (tmp_path / "checkpoint-5-old").mkdir()
    (tmp_path / "checkpoint-50").write_text("a file, not a folder")
    assert find_resume_checkpoint("latest", tmp_path) == str(tmp_path / "checkpoint-10")  # numeric, not lexical
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    assert find_resume_checkpoint("latest", tmp_path / "none") is None
    assert find_resume_checkpoint(None, tmp_path) is None


@pytest.mark.parametrize("name, message", [("checkpoint-30", "not a complete checkpoint"),
                                           ("checkpoint-99", "no such checkpoint folder"),
                                           ("checkpoint-foo", "not a checkpoint folder")])
def test_a_named_checkpoint_that_cannot_be_resumed_is_a_clear_error(tmp_path, name, message):
    (tmp_path / "checkpoint-30").mkdir()
    (tmp_path / "checkpoint-foo").mkdir()
    with pytest.raises(ValueError, match=message) as error:
        find_resume_checkpoint(str(tmp_path / name), tmp_path)
    assert name in str(error.value)


def test_checkpoint_step_names_a_bad_folder():
    assert checkpoint_step("/runs/x/checkpoint-120") == 120
    for name in ("checkpoint-foo", "checkpoint-12.tmp", "model"):
        with pytest.raises(ValueError, match=name):
            checkpoint_step(name)


class _FakeAccelerator:
    """``save_state`` writes two files, or dies after the first one (a crash while writing)."""

    def __init__(self, crash=False):
        self.crash = crash

    def save_state(self, output_dir):
        os.makedirs(output_dir, exist_ok=True)
        Path(output_dir, "model.safetensors").write_bytes(b"new weights")
        if self.crash:
            raise KeyboardInterrupt("killed while writing")
        Path(output_dir, "optimizer.bin").write_bytes(b"state")


def test_rotation_happens_only_after_the_new_checkpoint_is_complete(tmp_path):
    _mark(tmp_path / "checkpoint-4", 4)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_FakeAccelerator(crash=True), tmp_path, 8, total_limit=1)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-4"]  # still resumable
    assert not (tmp_path / "checkpoint-8").exists()

    assert save_checkpoint(_FakeAccelerator(), tmp_path, 8, total_limit=1) == str(tmp_path / "checkpoint-8")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-8"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-8"]  # the leftover .tmp is gone too
    marker = json.loads((tmp_path / "checkpoint-8" / CHECKPOINT_COMPLETE).read_text())
    assert marker == {"step": 8, "files": ["model.safetensors", "optimizer.bin"]}

    # writing a step that exists again (a resumed run) replaces it; no limit keeps everything
    save_checkpoint(_FakeAccelerator(), tmp_path, 12)
    save_checkpoint(_FakeAccelerator(), tmp_path, 8)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-8", "checkpoint-12"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-12", "checkpoint-8"]


def test_training_clock_is_json(tmp_path):
    clock = TrainingClock()
    clock.seconds = 100.0
    clock.save(tmp_path)
    restored = TrainingClock()
    assert restored.load(tmp_path)
    assert 100.0 <= restored.elapsed() < 110.0
    assert not TrainingClock().load(tmp_path / "missing")
    (tmp_path / TrainingClock.FILE_NAME).write_text('{"seconds": "nan"}')
    with pytest.raises(ValueError, match=TrainingClock.FILE_NAME):
        TrainingClock().load(tmp_path)
