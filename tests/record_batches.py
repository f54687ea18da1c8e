"""Run a training script unchanged while recording every patch each rank trains on (used by test_multiprocess.py).

    RECORD_BATCHES=/tmp/batches accelerate launch ... tests/record_batches.py training/train_segmentation_ensemble.py ...

writes ``/tmp/batches.rank<i>.jsonl``: one row per batch with the loop's epoch, the dataset's epoch as that rank's
``RandomPatchDataset`` saw it, and a digest of every patch in the batch. The script runs as ``__main__`` through
``runpy`` after ``diffusers_retina.training_utils.epoch_dataloader`` is wrapped, so the script's own
``from diffusers_retina.training_utils import epoch_dataloader`` picks up the wrapper; nothing else changes.
"""

import hashlib
import json
import os
import runpy
import sys

import diffusers_retina.training_utils as training_utils

RECORD = os.environ["RECORD_BATCHES"]
_epoch_dataloader = training_utils.epoch_dataloader


def _recording_epoch_dataloader(accelerator, train_dataloader, epoch, first_epoch, resume_step):
    loader = _epoch_dataloader(accelerator, train_dataloader, epoch, first_epoch, resume_step)
    path = f"{RECORD}.rank{accelerator.process_index}.jsonl"

    def batches():
        for batch in loader:
            digests = [hashlib.sha1(patch.cpu().numpy().tobytes()).hexdigest()[:16] for patch in batch["image"]]
            with open(path, "a") as handle:
                handle.write(json.dumps({"epoch": epoch, "dataset_epoch": train_dataloader.dataset.epoch,
                                         "patches": digests}) + "\n")
            yield batch

    return batches()


training_utils.epoch_dataloader = _recording_epoch_dataloader

if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
