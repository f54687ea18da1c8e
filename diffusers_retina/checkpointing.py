"""The checkpoint lifecycle of the accelerate training scripts: crash-safe ``save_state`` folders with a completion
marker, rotation, resumption from the newest complete checkpoint (refusing pickled custom state), and the wall-time
clock saved inside each checkpoint as JSON.

A resumed run sees exactly the batches, noise and learning rates of an uninterrupted one; everything here takes
explicit arguments (folders, limits, steps), not parsed flags.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import List, Optional, Tuple, Union

from .utils.io_utils import fsync_directory


class TrainingClock:
    """Wall time spent training, saved as JSON (``training_clock.json``) inside each checkpoint so resumed runs report
    the total. Never pickled: accelerate's ``register_for_checkpointing`` would store it with ``torch.save`` and read it
    back with ``weights_only=False``, so a tampered checkpoint could run code."""

    FILE_NAME = "training_clock.json"

    def __init__(self):
        self.seconds, self._since = 0.0, time.time()

    def elapsed(self) -> float:
        return self.seconds + time.time() - self._since

    def state_dict(self):
        return {"seconds": self.elapsed()}

    def load_state_dict(self, state):
        seconds = state.get("seconds") if isinstance(state, dict) else None
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
                or seconds < 0:
            raise ValueError(f"The training clock state must hold a finite, non-negative 'seconds', got {state!r}.")
        self.seconds, self._since = float(seconds), time.time()

    def save(self, folder) -> None:
        """Write ``training_clock.json`` into ``folder`` (a checkpoint being written)."""
        (Path(folder) / self.FILE_NAME).write_text(json.dumps(self.state_dict()) + "\n")

    def load(self, folder) -> bool:
        """Read ``training_clock.json`` from ``folder``; False (clock unchanged) when the checkpoint has none."""
        path = Path(folder) / self.FILE_NAME
        if not path.is_file():
            return False
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"Cannot read the training clock {path}: {error}") from None
        try:
            self.load_state_dict(state)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        return True


def register_clock_checkpointing(accelerator, clock: TrainingClock) -> None:
    """Save ``clock`` as JSON in every ``accelerator.save_state`` folder and restore it in ``load_state`` (through
    accelerate's state pre-hooks, instead of ``register_for_checkpointing``, which pickles)."""

    def save_clock(models, weights, output_dir):
        if accelerator.is_main_process:
            clock.save(output_dir)

    def load_clock(models, input_dir):
        clock.load(input_dir)

    accelerator.register_save_state_pre_hook(save_clock)
    accelerator.register_load_state_pre_hook(load_clock)


CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_COMPLETE = "checkpoint_complete.json"  # written last: a folder without it is not a checkpoint to resume
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
_PICKLED_CUSTOM_STATE = re.compile(r"^custom_checkpoint_\d+\.pkl$")


def checkpoint_step(path) -> int:
    """The step of a checkpoint folder named ``checkpoint-<step>``; ``ValueError`` naming the folder otherwise."""
    match = _CHECKPOINT_NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint folder: its name must be 'checkpoint-<step>'.")
    return int(match.group(1))


def is_complete_checkpoint(path) -> bool:
    """A folder named ``checkpoint-<step>`` whose completion marker was written (after ``save_state`` returned)."""
    path = Path(path)
    return _CHECKPOINT_NAME.match(path.name) is not None and path.is_dir() and (path / CHECKPOINT_COMPLETE).is_file()


def complete_checkpoints(output_dir) -> List[Path]:
    """The complete checkpoints in ``output_dir``, oldest first. Folders still being written (``checkpoint-<N>.tmp``),
    interrupted ones (no marker) and other names (``checkpoint-foo``) are not checkpoints."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if is_complete_checkpoint(p)), key=checkpoint_step)


def check_resumable(path: Path) -> None:
    """Refuse a checkpoint that is incomplete or holds pickled custom objects (``custom_checkpoint_<i>.pkl``, which
    accelerate loads with ``weights_only=False``)."""
    if not path.is_dir():
        raise ValueError(f"--resume_from_checkpoint {path}: no such checkpoint folder.")
    checkpoint_step(path)
    if not (path / CHECKPOINT_COMPLETE).is_file():
        raise ValueError(
            f"--resume_from_checkpoint {path} is not a complete checkpoint (no {CHECKPOINT_COMPLETE}): it was "
            "interrupted while being written, or written before checkpoints were crash-safe. Resume from an older "
            "complete one, or --resume_from_checkpoint latest.")
    pickled = sorted(p.name for p in path.iterdir() if _PICKLED_CUSTOM_STATE.match(p.name))
    if pickled:
        raise ValueError(
            f"--resume_from_checkpoint {path} holds pickled custom state {pickled}: accelerate would load it with "
            "weights_only=False, which can execute arbitrary code. diffusers-retina never writes these files (the "
            "training clock is training_clock.json); delete them if you trust this checkpoint.")


def find_resume_checkpoint(resume_from_checkpoint: Optional[str], output_dir: Union[str, os.PathLike]
                           ) -> Optional[str]:
    """The checkpoint ``--resume_from_checkpoint`` names (``"latest"``: the newest *complete* one in ``output_dir``),
    or None. Raises ``ValueError`` for a named checkpoint that is missing, incomplete or holds pickled state."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint != "latest":
        path = Path(resume_from_checkpoint)
        check_resumable(path)
        return str(path)
    found = complete_checkpoints(output_dir)
    if not found:
        return None
    check_resumable(found[-1])
    return str(found[-1])


def resume_position(path: str, num_update_steps_per_epoch: int, gradient_accumulation_steps: int
                    ) -> Tuple[int, int, int]:
    """``(global_step, first_epoch, batches to skip in that epoch)`` after loading checkpoint ``path``."""
    global_step = checkpoint_step(path)
    first_epoch = global_step // num_update_steps_per_epoch
    resume_step = (global_step % num_update_steps_per_epoch) * gradient_accumulation_steps
    return global_step, first_epoch, resume_step


def _remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder, its completion marker first, so a kill halfway never leaves a "complete" remnant."""
    marker = path / CHECKPOINT_COMPLETE
    if marker.exists():
        marker.unlink()
    shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(accelerator, output_dir: Union[str, os.PathLike], global_step: int,
                    total_limit: Optional[int] = None) -> str:
    """Crash-safe ``accelerator.save_state``: write ``checkpoint-<step>.tmp``, add the completion marker, rename it to
    ``checkpoint-<step>``, and only then delete the oldest complete checkpoints beyond ``total_limit``
    (and leftovers of interrupted writes). A kill at any point leaves the previous complete checkpoint resumable.
    Returns the checkpoint folder."""
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{global_step}"
    temporary = output_dir / f"{final.name}.tmp"
    if temporary.exists():  # a leftover of an interrupted write of the same step
        shutil.rmtree(temporary)
    accelerator.save_state(str(temporary))
    files = sorted(p.relative_to(temporary).as_posix() for p in temporary.rglob("*") if p.is_file())
    with open(temporary / CHECKPOINT_COMPLETE, "w") as handle:
        json.dump({"step": global_step, "files": files}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    fsync_directory(temporary)
    if final.exists():  # e.g. a run resumed from an earlier step writes this step again
        stale = output_dir / f"{final.name}.old"
        if stale.exists():
            shutil.rmtree(stale)
        os.replace(final, stale)
        os.replace(temporary, final)
        _remove_checkpoint(stale)
    else:
        os.replace(temporary, final)
    fsync_directory(output_dir)

    if total_limit is not None:
        complete = complete_checkpoints(output_dir)
        for old in complete[: max(len(complete) - total_limit, 0)]:
            if old != final:
                _remove_checkpoint(old)
    for leftover in output_dir.glob(f"{CHECKPOINT_PREFIX}*.tmp"):  # interrupted writes of other steps
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
    return str(final)

