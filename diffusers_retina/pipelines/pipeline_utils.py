"""`RetinaPipelineMixin`: loading and saving of diffusers-retina pipelines locally and on the Hub.

Facts checked against diffusers 0.42.1 (DESIGN.md section 5):

* ``DiffusionPipeline.from_pretrained`` resolves ``_class_name`` inside diffusers, so it only finds our classes
  through remote code: ``_class_name = ["pipeline_<name>", "<Class>"]`` plus a ``pipeline_<name>.py`` in the repo.
* A component whose module lives outside diffusers/transformers is loaded either from ``<component>/<module>.py``
  (remote code, needs ``trust_remote_code=True``) or, when recorded under its full module path, from
  ``sys.modules`` (the module must be imported and expose ``ModelMixin``).
* ``DiffusionPipeline.download`` refuses repos with third-party components, so Hub repos are fetched with
  ``huggingface_hub.snapshot_download``.

So every saved pipeline uses the remote-code layout with one-line shim files that import from this package, and the
mixin maps that layout back to package classes when a pipeline class of ours loads it: class loading needs no
``trust_remote_code``, while plain ``DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)`` works too.
Pushed repos also carry a self-contained copy of the code (:mod:`diffusers_retina.bundle`), so that plain load works
without the package installed.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import tempfile
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

from diffusers.pipelines.pipeline_loading_utils import LOADABLE_CLASSES

from .. import models
from ..bundle import remote_code_files
from ..utils.io_utils import fsync_directory
from .remote_code import INSTALL_HINT, PACKAGE, shim_source, snake_case

def _package_class(class_name: str):
    """Find a model/scheduler class of this package by name (used to map shim entries back to real modules)."""
    cls = getattr(models, class_name, None)
    if cls is None:
        raise ValueError(
            f"`model_index.json` names a component class `{class_name}` that diffusers_retina does not provide; "
            "upgrade diffusers-retina or check the repository."
        )
    return cls


def _is_external_library(library: Optional[str]) -> bool:
    if library is None:
        return False
    if library in LOADABLE_CLASSES:
        return False
    from diffusers import pipelines

    return not hasattr(pipelines, library)


def _check_pipeline_class(cls, saved_class, location) -> None:
    """A folder saved from another pipeline of this package is refused with a message naming both classes (a
    Mask2Image checkpoint is no segmentation model, and the other way round: loading it would fail later with an
    unrelated error, or not at all)."""
    saved = _PIPELINE_CLASSES.get(saved_class) if isinstance(saved_class, str) else None
    if saved is None or not isinstance(saved, type) or issubclass(cls, saved) or issubclass(saved, cls):
        return
    raise ValueError(
        f"{location} holds a {saved_class} (its model_index.json), not a {cls.__name__}: load it with "
        f"`{saved_class}.from_pretrained(...)`, or give a {cls.__name__} checkpoint.")


#: Every pipeline class of the package by name, filled as the classes are defined (RetinaPipelineMixin subclasses).
_PIPELINE_CLASSES: Dict[str, type] = {}


class RetinaPipelineMixin:
    """First base class of every diffusers-retina pipeline (before ``DiffusionPipeline``).

    * ``from_pretrained`` accepts a local folder or a Hub repo id (fetched with ``snapshot_download``, so
      ``HF_HUB_OFFLINE=1`` uses the local cache) and maps the remote-code layout back to package classes.
    * ``save_pretrained`` writes safetensors, the remote-code layout with shim files and, with ``push_to_hub=True``,
      uploads the folder without overwriting a model card written beside it.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _PIPELINE_CLASSES.setdefault(cls.__name__, cls)  # the first definition wins (bundles re-import the package)

    @property
    def num_timesteps(self) -> int:
        """Denoising steps per sample of the running (or last) call (diffusers' property)."""
        return getattr(self, "_num_timesteps", 0)

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` from a step callback to skip the remaining steps (diffusers' convention)."""
        return getattr(self, "_interrupt", False)

    @classmethod
    def _remote_code_name(cls) -> str:
        return f"pipeline_{snake_case(cls.__name__)}"

    @classmethod
    def load_config(cls, *args, **kwargs):
        output = super().load_config(*args, **kwargs)
        config = output[0] if isinstance(output, tuple) else output
        class_name = config.get("_class_name")
        saved_class = class_name[1] if isinstance(class_name, (list, tuple)) and len(class_name) == 2 else class_name
        _check_pipeline_class(cls, saved_class, args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        if isinstance(class_name, (list, tuple)):
            # ["pipeline_x", "XPipeline"]: we are the class, do not let diffusers import the shim file
            config["_class_name"] = class_name[1]
        for key, value in list(config.items()):
            if key.startswith("_") or not isinstance(value, (list, tuple)) or len(value) != 2:
                continue
            library, component_class = value
            if _is_external_library(library):
                component = _package_class(component_class)
                # diffusers resolves non-diffusers libraries from sys.modules (DESIGN section 5)
                importlib.import_module(component.__module__)
                config[key] = [component.__module__, component_class]
        return output

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs):
        """Load from a local folder or a Hub repo id (``org/name``). Keyword arguments are those of
        ``DiffusionPipeline.from_pretrained`` (``dtype=``, ``revision=``, ``cache_dir=``, ...)."""
        path = str(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            from huggingface_hub import constants, snapshot_download

            path = snapshot_download(
                path,
                revision=kwargs.pop("revision", None),
                cache_dir=kwargs.pop("cache_dir", None),
                token=kwargs.pop("token", None),
                local_files_only=kwargs.pop("local_files_only", False) or constants.HF_HUB_OFFLINE,
            )
        kwargs.pop("trust_remote_code", None)  # nothing remote is executed on this path
        # safetensors only unless the caller opts in: a pickle-only folder is an error naming the file
        if kwargs.get("use_safetensors") is None:
            kwargs["use_safetensors"] = True
        _check_interrupted_save(Path(path))
        check_weight_files(path, kwargs["use_safetensors"])
        check_component_folders(path, passed=kwargs)
        pipeline = super().from_pretrained(path, **kwargs)
        check_loaded_weights(pipeline, path, skip=[name for name in kwargs if name in pipeline.components],
                             variant=kwargs.get("variant"))
        return pipeline

    def save_pretrained(
        self,
        save_directory: Union[str, os.PathLike],
        push_to_hub: bool = False,
        repo_id: Optional[str] = None,
        private: Optional[bool] = None,
        token: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        """Save weights as safetensors plus the remote-code layout (shim files) so the folder loads with this
        class, with ``DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`` and from the Hub.

        Crash-safe: everything is written into a sibling temporary folder first and then swapped in (``swap_in``), so
        a kill never leaves new components under an old ``model_index.json``. Other files in ``save_directory`` (a
        model card, training checkpoints) are kept. ``safe_serialization=False`` is an error: weights are safetensors
        only."""
        if kwargs.get("safe_serialization", True) is not True:
            raise ValueError(
                f"`safe_serialization={kwargs['safe_serialization']!r}` is not supported: diffusers-retina saves "
                "safetensors only (pickled weights can execute code when loaded). Drop the argument.")
        kwargs["safe_serialization"] = True
        commit_message = kwargs.pop("commit_message", None)
        create_pr = kwargs.pop("create_pr", False)
        target = Path(save_directory).absolute()
        if target.exists() and not target.is_dir():
            raise NotADirectoryError(f"`save_directory` {save_directory} exists and is not a folder.")
        target.parent.mkdir(parents=True, exist_ok=True)
        for leftover in _leftovers(target):  # interrupted saves of dead processes
            shutil.rmtree(leftover, ignore_errors=True)
        staging = _sibling(target, _STAGING_TAG)
        if staging.exists():
            shutil.rmtree(staging)
        try:
            super().save_pretrained(staging, **kwargs)
            write_remote_code_layout(self, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # an error (not a kill) while writing: target untouched
            raise
        swap_in(staging, target)
        if push_to_hub:
            from huggingface_hub import create_repo, upload_folder

            repo_id = repo_id or Path(save_directory).name
            repo_id = create_repo(repo_id, exist_ok=True, private=private, token=token).repo_id
            card_path = Path(save_directory) / "README.md"
            if not card_path.is_file():  # a card written beside the weights (e.g. by training) is kept
                default_model_card(type(self).__name__, repo_id).save(str(card_path))
            with _upload_view(Path(save_directory)) as folder_path:
                upload_folder(repo_id=repo_id, folder_path=str(folder_path), token=token,
                              commit_message=commit_message, create_pr=create_pr)


@contextlib.contextmanager
def _upload_view(folder: Path):
    """``folder`` as uploaded by ``save_pretrained(push_to_hub=True)``: a hard-linked copy beside it (removed after)
    with the pipeline shim that falls back on the self-contained ``diffusers_retina_bundle.py``, which is added
    (:mod:`diffusers_retina.bundle`), so the repo loads with ``trust_remote_code=True`` without the package installed.
    The folder itself is not changed."""
    generated = remote_code_files(folder)
    if not generated:
        yield folder
        return

    def link_or_copy(source, target):
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)

    view = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.upload-"))
    try:
        shutil.copytree(folder, view / folder.name, copy_function=link_or_copy)
        for name, data in generated.items():
            target = view / folder.name / name
            if target.exists():
                target.unlink()  # a hard link: never write through it into the saved folder
            target.write_bytes(data)
        yield view / folder.name
    finally:
        shutil.rmtree(view, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ crash-safe saving

MODEL_INDEX = "model_index.json"
_STAGING_TAG = ".saving-"  # sibling folder a save is written into: .<name>.saving-<pid>
_RETIRED_TAG = ".old-"  # sibling folder the replaced entries wait in until the new ones are in: .<name>.old-<pid>
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _sibling(target: Path, tag: str, pid: Optional[int] = None) -> Path:
    return target.parent / f".{target.name}{tag}{os.getpid() if pid is None else pid}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _leftovers(target: Path) -> List[Path]:
    """Sibling folders of interrupted saves into ``target`` (their process is gone)."""
    found = []
    for tag in (_STAGING_TAG, _RETIRED_TAG):
        for path in target.parent.glob(f".{glob_escape(target.name)}{tag}*"):
            pid = path.name[len(f".{target.name}{tag}"):]
            if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
                found.append(path)
    return found


def pipeline_entries(folder: Union[str, os.PathLike]) -> Set[str]:
    """The names in ``folder`` that belong to the pipeline its ``model_index.json`` describes: the index, one folder per
    component and the pipeline's shim file. Other files (a model card, training checkpoints, logs) are not entries."""
    folder = Path(folder)
    try:
        index = json.loads((folder / MODEL_INDEX).read_text())
    except (OSError, ValueError):
        return {MODEL_INDEX}
    entries = {MODEL_INDEX}
    class_name = index.get("_class_name")
    if isinstance(class_name, (list, tuple)) and class_name and isinstance(class_name[0], str):
        entries.add(f"{class_name[0]}.py")
    for key, value in index.items():
        if not key.startswith("_") and isinstance(value, (list, tuple)) and len(value) == 2:
            entries.add(key)
    return {name for name in entries if "/" not in name and name not in ("", ".", "..")}


def swap_in(staging: Path, target: Path) -> None:
    """Move a complete pipeline folder ``staging`` to ``target`` so that a kill at any moment leaves ``target`` either
    the old pipeline, the new one, or no pipeline (no ``model_index.json``): never new components under the old index.

    A new ``target`` is one rename. Into an existing folder the old index is renamed away first, then the old entries
    (components, shim), then the new entries are renamed in with the new index last; the old ones are deleted after.
    Files that are no pipeline entries (a model card, training checkpoints) stay where they are."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        os.replace(staging, target)
        fsync_directory(target.parent)
        return
    if not target.is_dir():
        raise NotADirectoryError(f"`save_directory` {target} exists and is not a folder.")
    new = {path.name for path in staging.iterdir()}
    old = {name for name in pipeline_entries(target) | new if os.path.lexists(target / name)}
    retired = _sibling(target, _RETIRED_TAG)
    if retired.exists():
        shutil.rmtree(retired)
    retired.mkdir()
    for name in sorted(old, key=lambda n: n != MODEL_INDEX):  # the index first: from now on no (old) pipeline
        os.replace(target / name, retired / name)
    fsync_directory(target)
    for name in sorted(new, key=lambda n: n == MODEL_INDEX):  # the index last: the new pipeline is complete
        os.replace(staging / name, target / name)
        if name == MODEL_INDEX:
            fsync_directory(target)
    shutil.rmtree(retired, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


def _check_interrupted_save(path: Path) -> None:
    if path.is_dir() and not (path / MODEL_INDEX).is_file():
        pending = [p.name for p in path.parent.glob(f".{glob_escape(path.name)}.*")
                   if _STAGING_TAG in p.name or _RETIRED_TAG in p.name]
        if pending:
            raise ValueError(
                f"{path} has no {MODEL_INDEX}: a save_pretrained into it was interrupted ({pending} beside it hold the "
                "pipeline being written or the one being replaced). Save the pipeline again.")


# ------------------------------------------------------------------------------------------------ safe loading


def check_component_folders(path: Union[str, os.PathLike], passed: Dict[str, Any]) -> None:
    """Before loading: every component ``model_index.json`` lists (and the caller does not pass) has its folder. A
    missing one is an error naming the component and the folder -- diffusers would only report a ``config.json``
    missing from an unnamed directory, and a pipeline whose parts depend on each other (a feature-reusing refiner
    without its prior) must not get as far as its sampling loop."""
    path = Path(path)
    try:
        index = json.loads((path / MODEL_INDEX).read_text())
    except (OSError, ValueError):
        return  # diffusers reports an unreadable index itself
    for name, value in sorted(index.items()):
        if name.startswith("_") or name in passed or not isinstance(value, (list, tuple)) or len(value) != 2:
            continue
        if value[0] is None or value[1] is None:
            continue
        if not (path / name).is_dir():
            raise FileNotFoundError(
                f"{path} lists the component `{name}` ({value[1]}) in {MODEL_INDEX} but has no {name}/ folder: the "
                f"saved pipeline is incomplete. Restore the folder, or pass `{name}=...` to from_pretrained.")


def check_weight_files(path: Union[str, os.PathLike], use_safetensors: bool = True) -> None:
    """Before loading: with ``use_safetensors`` a component folder holding only pickle weights (``.bin``, ``.pt``,
    ...) is an error naming the file -- unpickling can execute code, even restricted unpickling is no guarantee."""
    path = Path(path)
    if not use_safetensors:
        return
    for name in sorted(pipeline_entries(path) - {MODEL_INDEX}):
        folder = path / name
        if not folder.is_dir():
            continue
        files = sorted(p for p in folder.iterdir() if p.is_file())
        pickles = [p for p in files if p.suffix in PICKLE_WEIGHT_SUFFIXES]
        if pickles and not any(p.name.endswith(".safetensors") for p in files):
            raise ValueError(
                f"{pickles[0]} holds pickled weights and {folder} has no .safetensors file: diffusers-retina loads "
                "safetensors only (unpickling can execute code). If you trust the file, load it once with "
                "`use_safetensors=False` and save_pretrained() it again to convert it.")


def _saved_weight_keys(folder: Path, variant: Optional[str]) -> Optional[Tuple[Path, Set[str]]]:
    """``(file, tensor names)`` of the safetensors weights of a component folder (the sharded index when there is
    one), or None when there are none or the file cannot be told."""
    from safetensors import safe_open

    def has_variant(name: str, suffix: str) -> bool:
        parts = name[: -len(suffix)].split(".")
        return (variant in parts[1:]) if variant else len(parts) == 1

    indexes = [p for p in folder.glob("*.safetensors.index.json") if has_variant(p.name, ".safetensors.index.json")]
    if len(indexes) == 1:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{indexes[0]} is not a readable sharded-weights index: {error}") from None
        return indexes[0], set(weight_map)
    files = [p for p in folder.glob("*.safetensors") if has_variant(p.name, ".safetensors")]
    if len(files) != 1:
        return None
    with safe_open(str(files[0]), framework="pt") as handle:
        return files[0], set(handle.keys())


def check_loaded_weights(pipeline, path: Union[str, os.PathLike], skip: Sequence[str] = (),
                         variant: Optional[str] = None) -> None:
    """After loading: every model component's weights file must hold exactly the model's tensors. diffusers only logs
    missing keys (the tensors stay on the meta device and fail later elsewhere) and unexpected ones."""
    import torch

    path = Path(path)
    for name, component in pipeline.components.items():
        if name in skip or not isinstance(component, torch.nn.Module) or not (path / name).is_dir():
            continue
        saved = _saved_weight_keys(path / name, variant)
        expected = set(component.state_dict())
        on_meta = sorted(key for key, tensor in component.state_dict().items() if tensor.device.type == "meta")
        if saved is None:
            if on_meta:
                raise ValueError(f"{path / name}: the weights of {type(component).__name__} were not loaded "
                                 f"(still on the meta device: {on_meta[:5]}).")
            continue
        file, keys = saved
        missing, unexpected = sorted(expected - keys), sorted(keys - expected)
        if missing or unexpected or on_meta:
            details = []
            if missing or on_meta:
                details.append(f"missing {len(missing or on_meta)} tensor(s) {(missing or on_meta)[:5]}")
            if unexpected:
                details.append(f"{len(unexpected)} unexpected tensor(s) {unexpected[:5]}")
            raise ValueError(
                f"{file} does not match the {type(component).__name__} of {path / name / 'config.json'}: "
                f"{'; '.join(details)}. The weights belong to another model or the file is damaged.")


def default_model_card(class_name: str, repo_id: str):
    """A minimal model card for a pushed pipeline that has none (``huggingface_hub.ModelCard``)."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="diffusers", tags=["diffusers-retina", "diffusers"])
    return ModelCard(
        f"---\n{data.to_yaml()}\n---\n\n# {repo_id}\n\n"
        f"A `{class_name}` of diffusers-retina; the code comes from the package (`{INSTALL_HINT}`).\n\n"
        "```py\n"
        f"from diffusers_retina import {class_name}\n\n"
        f'pipe = {class_name}.from_pretrained("{repo_id}")\n'
        "# or, without diffusers-retina installed: DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)\n"
        "```\n"
    )


def pipeline_import_path(pipeline_class: type) -> str:
    """The module a saved pipeline's shim imports its class from: the pipeline's folder package
    (``diffusers_retina.pipelines.segmentation_ensemble``) when it re-exports the class defined in its
    ``pipeline_<name>.py``, so shims name a public path that survives moves inside the folder."""
    module = pipeline_class.__module__
    parent, _, leaf = module.rpartition(".")
    if leaf.startswith("pipeline_") and getattr(importlib.import_module(parent), pipeline_class.__name__, None) \
            is pipeline_class:
        return parent
    return module


def write_remote_code_layout(pipeline, save_directory: Union[str, os.PathLike]) -> Dict[str, str]:
    """Rewrite ``model_index.json`` to the remote-code layout and write the shim files. Returns ``{file: module}``."""
    save_directory = Path(save_directory)
    index_path = save_directory / "model_index.json"
    index = json.loads(index_path.read_text())
    written: Dict[str, str] = {}

    remote_name = type(pipeline)._remote_code_name()
    index["_class_name"] = [remote_name, type(pipeline).__name__]
    module = pipeline_import_path(type(pipeline))
    (save_directory / f"{remote_name}.py").write_text(shim_source(module, type(pipeline).__name__))
    written[f"{remote_name}.py"] = module

    for key, value in index.items():
        if key.startswith("_") or not isinstance(value, (list, tuple)) or len(value) != 2:
            continue
        library, class_name = value
        if library is not None and library.split(".")[0] == PACKAGE:
            module_name = library.rsplit(".", 1)[-1]
            (save_directory / key / f"{module_name}.py").write_text(shim_source(library, class_name))
            index[key] = [module_name, class_name]
            written[f"{key}/{module_name}.py"] = library
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return written
