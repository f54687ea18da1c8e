"""Two-process training on the CPU (``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2``, gloo):
every step runs, each rank's patches change with the epoch and differ from the other rank's, the launch is recorded,
and a run resumed from a mid-run checkpoint ends with the uninterrupted run's weights.

The first run goes through ``tests/record_batches.py``, which runs the unchanged training script while logging a
digest of every patch per rank; the resumed run is the plain script command."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from testing_utils import REPO, write_folder_dataset
from testing_utils import SEGMENTATION_SCRIPT as SCRIPT
from testing_utils import TINY_SEGMENTATION as TINY

RECORDER = Path(__file__).resolve().parent / "record_batches.py"
MAX_STEPS = 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_cpu_processes(script_args, env_extra=None):
    """``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 <script_args>`` (the CPU recipe that
    really starts two gloo ranks; ``--cpu --num_processes 2`` starts one), one thread per process, on a free port."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **(env_extra or {}))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port()), *script_args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def read_records(prefix: Path, rank: int):
    return [json.loads(line) for line in Path(f"{prefix}.rank{rank}.jsonl").read_text().splitlines()]


def patches_of(records, epoch):
    return {digest for row in records if row["epoch"] == epoch for digest in row["patches"]}


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_two_process_training_runs_all_steps_new_patches_and_resumes(tmp_path):
    # 3 images x 4 patches = 12 patches = 3 batches of 2 per rank and epoch: 8 steps span epochs 0, 1 and 2, and the
    # checkpoint at step 4 lies inside epoch 1 (one batch into it), so resuming skips batches of a sharded loader
    data = write_folder_dataset(tmp_path / "pairs")
    common = ["--train_data_dir", str(data), *TINY, "--max_train_steps", str(MAX_STEPS), "--checkpointing_steps", "4",
              "--use_ema", "--validation_stems", "case0", "--validation_crop", "32", "--validation_steps", "4"]
    straight, record = tmp_path / "straight", tmp_path / "batches"
    log = launch_two_cpu_processes([str(RECORDER), str(SCRIPT), *common, "--output_dir", str(straight)],
                                   {"RECORD_BATCHES": str(record)})
    assert "Processes = 2 (MULTI_CPU)" in log.stdout + log.stderr

    # all steps ran, on both ranks, and the record names the launch
    ranks = [read_records(record, rank) for rank in (0, 1)]
    assert [len(rows) for rows in ranks] == [MAX_STEPS, MAX_STEPS]
    assert sorted(p.name for p in straight.glob("checkpoint-*")) == ["checkpoint-4", f"checkpoint-{MAX_STEPS}"]
    info = json.loads((straight / "training_info.json").read_text())
    assert info["global_step"] == MAX_STEPS
    assert info["launch"] == {"launcher": "accelerate launch", "distributed_type": "MULTI_CPU", "num_processes": 2,
                              "num_machines": 1, "train_batch_size_per_process": 2, "gradient_accumulation_steps": 1,
                              "total_batch_size": 4}
    assert info["command"].startswith("ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 "
                                      "training/train_segmentation_ensemble.py --train_data_dir")

    # every rank's dataset followed the epoch; patches change between epochs and differ between ranks
    for rows in ranks:
        assert [row["epoch"] for row in rows] == [0, 0, 0, 1, 1, 1, 2, 2]
        assert all(row["dataset_epoch"] == row["epoch"] for row in rows)
    for epoch in (0, 1):
        # 12 patches per epoch over both ranks; tiny 40x40 images allow the odd chance repeat, not a repeated epoch
        this_epoch = patches_of(ranks[0], epoch) | patches_of(ranks[1], epoch)
        next_epoch = patches_of(ranks[0], epoch + 1) | patches_of(ranks[1], epoch + 1)
        assert len(this_epoch & next_epoch) <= 2, f"epoch {epoch + 1} repeats the patches of epoch {epoch}"
        assert len(patches_of(ranks[0], epoch) & patches_of(ranks[1], epoch)) <= 1, "the ranks trained on the same patches"

    # a run that "crashed" after step 4 (inside epoch 1), resumed with the plain script command under 2 processes
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-4", resumed / "checkpoint-4")
    log = launch_two_cpu_processes([str(SCRIPT), *common, "--output_dir", str(resumed),
                                    "--resume_from_checkpoint", "latest"])
    assert "Resuming from" in log.stdout + log.stderr
    assert json.loads((resumed / "training_info.json").read_text())["global_step"] == MAX_STEPS
    for name in ("model.safetensors", "unet_ema/diffusion_pytorch_model.safetensors"):
        a = load_file(straight / f"checkpoint-{MAX_STEPS}" / name)
        b = load_file(resumed / f"checkpoint-{MAX_STEPS}" / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=f"{name}:{key}")
    # and the resumed part trained: the weights moved away from the checkpoint-4 state
    start = load_file(straight / "checkpoint-4" / "model.safetensors")
    end = load_file(straight / f"checkpoint-{MAX_STEPS}" / "model.safetensors")
    assert any(not torch.equal(start[k], end[k]) for k in start)
