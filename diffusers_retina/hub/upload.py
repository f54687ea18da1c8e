"""Upload a saved checkpoint folder to the Hugging Face Hub: the library half of ``diffusers-retina push``
(``diffusers_retina.cli.push`` prints the list and maps :class:`PushError` to a message; this module raises it).

The repo is created first (so a missing login or network fails before anything else), then exactly the files of an
explicit allow-list are uploaded in one commit:

* ``model_index.json``, ``config.json`` files (top level and one component folder down), ``*.safetensors`` weights,
  ``scheduler_config.json`` files;
* the remote-code shim files (``pipeline_*.py`` and ``<component>/*.py``) that ``trust_remote_code=True`` loads, and
  for a diffusers-retina pipeline the generated ``diffusers_retina_bundle.py``: a self-contained copy of the package's
  code, which the uploaded pipeline shim installs when diffusers-retina is not installed, so the repo loads with
  ``DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)`` without the package
  (:mod:`diffusers_retina.bundle`; the folder on disk is not changed);
* ``README.md`` (the model card, uploaded naming the repo it lands in: :func:`card_for_repo`), ``training_info.json``,
  ``evaluation.json``, ``measure_intervals.json`` (calibrated vessel-measure intervals);
* small PNGs (validation grids, at most :data:`MAX_PNG_BYTES` each) at the top level or in ``validation/``.

Never uploaded, whatever their name: anything in ``checkpoint-*`` folders (accelerate states: optimizer,
scheduler, RNG pickles), ``logs/``, hidden or ``__pycache__`` folders, and every other file (``*.bin``, ``*.pkl``,
``*.pt`` ...). ``--dry-run`` prints the exact list and uploads nothing. The same list serves
``--push_to_hub`` in the training scripts (:func:`diffusers_retina.training_utils.push_folder`).

Example::

    diffusers-retina push checkpoints/segmentation-ensemble-chase --repo-id my-org/segmentation-ensemble-chase --dry-run
    diffusers-retina push checkpoints/segmentation-ensemble-chase --repo-id my-org/segmentation-ensemble-chase
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path, PurePosixPath
import shutil
import tempfile
from typing import Dict, List, Optional, Sequence, Union

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard

from ..bundle import BUNDLE_FILE, remote_code_files

#: Largest PNG uploaded (validation grids are tens of kB; anything bigger is probably not a preview).
MAX_PNG_BYTES = 2 * 1024 * 1024

#: ``(pattern, maximum folder depth)``: a relative path is uploaded when it matches a pattern (``fnmatch`` on the
#: POSIX path) and lies at most that many folders deep (0: top level; 1: inside one component folder).
ALLOWED_FILES = (
    ("model_index.json", 0),
    ("config.json", 0),  # a bare model folder (e.g. a supervised baseline's unet/)
    ("*/config.json", 1),
    ("*.safetensors", 1),
    ("scheduler_config.json", 0),
    ("*/scheduler_config.json", 1),
    ("pipeline_*.py", 0),
    ("*/*.py", 1),
    ("README.md", 0),
    ("training_info.json", 0),
    ("evaluation.json", 0),
    ("measure_intervals.json", 0),
    ("*.png", 0),
    ("validation/*.png", 1),
)

#: Folders never entered: accelerate training states, tracker logs, caches.
EXCLUDED_FOLDERS = ("checkpoint-*", "checkpoints", "logs", "__pycache__", ".*")


#: Top-level files that mark an accelerate ``save_state`` folder (optimizer, schedulers, RNG pickles): refused whole.
TRAINING_STATE_FILES = ("optimizer*.bin", "scheduler*.bin", "random_states_*.pkl", "custom_checkpoint_*.pkl")


class PushError(Exception):
    """A folder that cannot be pushed (the message names it and says why)."""


def files_to_push(folder: Union[str, Path]) -> List[str]:
    """The sorted relative POSIX paths that ``push`` uploads from ``folder``: the files of the allow-list above, plus
    the generated :data:`~diffusers_retina.bundle.BUNDLE_FILE` when ``folder`` holds a diffusers-retina pipeline shim
    (its contents, and those of the rewritten shim, come from :func:`upload_sources`).

    Raises :class:`PushError` when ``folder`` is not a folder, or holds no saved weights (``*.safetensors``) in the
    allowed places -- for example an accelerate ``checkpoint-N`` state, which is not a saved pipeline.
    """
    root = Path(folder)
    if not root.is_dir():
        raise PushError(f"CHECKPOINT '{root}' is not a folder (give a folder written by save_pretrained or a "
                        "training script's --output_dir).")
    selected = []
    for path in root.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        relative = PurePosixPath(path.relative_to(root).as_posix())
        folders = relative.parts[:-1]
        if any(fnmatch.fnmatch(part, pattern) for part in folders for pattern in EXCLUDED_FOLDERS):
            continue
        if not any(fnmatch.fnmatch(str(relative), pattern) and len(folders) <= depth
                   for pattern, depth in ALLOWED_FILES):
            continue
        if relative.suffix == ".png" and path.stat().st_size > MAX_PNG_BYTES:
            continue
        selected.append(str(relative))
    if BUNDLE_FILE not in selected and remote_code_files(root):
        selected.append(BUNDLE_FILE)
    selected.sort()
    state_files = sorted(p.name for pattern in TRAINING_STATE_FILES for p in root.glob(pattern))
    if state_files:
        raise PushError(f"CHECKPOINT '{root}' is an accelerate training state ({', '.join(state_files)}), not a saved "
                        "pipeline: push the run's --output_dir (the pipeline saved at the end of training).")
    if not any(name.endswith(".safetensors") for name in selected):
        raise PushError(f"CHECKPOINT '{root}' holds no *.safetensors weights at the top level or in a component "
                        "folder, so it is not a saved pipeline or model.")
    return selected


def create_repo(repo_id: str, token: Optional[str] = None, private: bool = False) -> str:
    """Create (or reuse) the model repo ``repo_id`` and return its full id (``user/name`` when only a name was
    given). Run it before anything expensive: a missing login or network fails here."""
    return HfApi(token=token).create_repo(repo_id, repo_type="model", private=private, exist_ok=True).repo_id


def card_for_repo(folder: Union[str, Path], repo_id: str, base_model: Optional[str] = None) -> Optional[bytes]:
    """The model card of ``folder`` as uploaded to ``repo_id``: the card's own name (``model_name``, the
    ``model-index`` name, the ``# heading`` and the ``from_pretrained("...")`` examples) becomes ``repo_id``, and
    ``base_model`` (a Hub id) is set when given. The file on disk is left as it is.

    Returns:
        The card's bytes, or None when ``folder`` has no ``README.md`` or it is not a model card with a name (it is
        then uploaded unchanged).
    """
    path = Path(folder) / "README.md"
    if not path.is_file():
        return None
    try:
        card = ModelCard(path.read_text(encoding="utf-8"), ignore_metadata_errors=True)
    except Exception:  # noqa: BLE001 -- not a model card: uploaded as it is
        return None
    old = card.data.model_name
    if not old and not base_model:
        return None
    body = card.text
    if old and old != repo_id:
        body = re.sub(r"(from_pretrained\(\s*[\"'])" + re.escape(old) + r"([\"'])",
                      lambda match: match.group(1) + repo_id + match.group(2), body)
        body = re.sub(r"^# " + re.escape(old) + r"[ \t]*$", lambda match: f"# {repo_id}", body, flags=re.MULTILINE)
    card.data.model_name = repo_id
    if base_model:
        card.data.base_model = base_model
    return str(ModelCard(f"---\n{card.data.to_yaml()}\n---\n{body}")).encode("utf-8")


def upload_sources(folder: Union[str, Path], files: Optional[Sequence[str]] = None, repo_id: Optional[str] = None,
                   base_model: Optional[str] = None) -> Dict[str, Union[Path, bytes]]:
    """What each uploaded file of ``folder`` is made of: its ``Path`` on disk, or ``bytes`` for the generated ones --
    the self-contained bundle and the pipeline shim that falls back on it
    (:func:`diffusers_retina.bundle.remote_code_files`)
    and, with ``repo_id``, the model card naming that repo (:func:`card_for_repo`). ``files`` defaults to
    :func:`files_to_push`."""
    files = files_to_push(folder) if files is None else list(files)
    generated = remote_code_files(folder)
    if repo_id is not None and "README.md" in files:
        card = card_for_repo(folder, repo_id, base_model=base_model)
        if card is not None:
            generated["README.md"] = card
    return {name: generated.get(name, Path(folder) / name) for name in files}


def stage_upload(folder: Union[str, Path], destination: Union[str, Path], repo_id: Optional[str] = None) -> List[str]:
    """Write what a push of ``folder`` uploads into the new folder ``destination`` (the repo's file tree; weights are
    hard-linked when possible). Returns the file list. Used by ``save_pretrained(push_to_hub=True)`` and the tests."""
    destination = Path(destination)
    sources = upload_sources(folder, repo_id=repo_id)
    for name, source in sources.items():
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, bytes):
            target.write_bytes(source)
            continue
        try:
            target.hardlink_to(source)
        except OSError:
            shutil.copy2(source, target)
    return list(sources)


def push_checkpoint(folder: Union[str, Path], repo_id: str, token: Optional[str] = None, private: bool = False,
                    commit_message: Optional[str] = None, base_model: Optional[str] = None) -> str:
    """Create ``repo_id`` if needed, then upload :func:`files_to_push` of ``folder`` in one commit, with the model
    card naming the repo it lands in (:func:`card_for_repo`). Returns the full repo id."""
    files = files_to_push(folder)  # a bad folder fails before any network call
    full_repo_id = create_repo(repo_id, token=token, private=private)
    sources = upload_sources(folder, files, repo_id=full_repo_id, base_model=base_model)
    with tempfile.TemporaryDirectory(prefix="diffusers-retina-push-") as staging:
        operations = []
        for name, source in sources.items():
            if isinstance(source, bytes) and name != "README.md":
                # generated code (the bundle and the shim that falls back on it): uploaded from a temporary file
                path = Path(staging) / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(source)
                source = path
            operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=source if isinstance(source, bytes)
                                                 else str(source)))
        HfApi(token=token).create_commit(full_repo_id, operations=operations, repo_type="model",
                                         commit_message=commit_message
                                         or f"Upload {Path(folder).name} with diffusers-retina")
    return full_repo_id


__all__: Sequence[str] = ("ALLOWED_FILES", "MAX_PNG_BYTES", "PushError", "card_for_repo", "create_repo",
                          "files_to_push", "push_checkpoint", "stage_upload", "upload_sources")
