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
"""

from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Optional, Union

from diffusers.pipelines.pipeline_loading_utils import LOADABLE_CLASSES

PACKAGE = "diffusers_retina"
INSTALL_HINT = "pip install diffusers-retina"


def _snake_case(name: str) -> str:
    name = re.sub(r"Pipeline$", "", name)
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def shim_source(module: str, class_name: str) -> str:
    """Source of a shim file that re-exports ``class_name`` from ``module`` of this package."""
    return (
        f"# Shim written by diffusers-retina: the code of this component lives in the `diffusers-retina` package.\n"
        f"try:\n"
        f"    from {module} import {class_name}  # noqa: F401\n"
        f"except ImportError as error:  # pragma: no cover - depends on the user's environment\n"
        f"    raise ImportError(\"{class_name} needs the diffusers-retina package: `{INSTALL_HINT}`\") from error\n"
    )


def _package_class(class_name: str):
    """Find a model/scheduler class of this package by name (used to map shim entries back to real modules)."""
    from .. import models

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


class RetinaPipelineMixin:
    """First base class of every diffusers-retina pipeline (before ``DiffusionPipeline``).

    * ``from_pretrained`` accepts a local folder or a Hub repo id (fetched with ``snapshot_download``, so
      ``HF_HUB_OFFLINE=1`` uses the local cache) and maps the remote-code layout back to package classes.
    * ``save_pretrained`` writes safetensors, the remote-code layout with shim files and, with ``push_to_hub=True``,
      uploads the folder without overwriting a model card written beside it.
    """

    @classmethod
    def _remote_code_name(cls) -> str:
        return f"pipeline_{_snake_case(cls.__name__)}"

    @classmethod
    def load_config(cls, *args, **kwargs):
        output = super().load_config(*args, **kwargs)
        config = output[0] if isinstance(output, tuple) else output
        class_name = config.get("_class_name")
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
        return super().from_pretrained(path, **kwargs)

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
        class, with ``DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`` and from the Hub."""
        kwargs["safe_serialization"] = True
        commit_message = kwargs.pop("commit_message", None)
        create_pr = kwargs.pop("create_pr", False)
        super().save_pretrained(save_directory, **kwargs)
        write_remote_code_layout(self, save_directory)
        if push_to_hub:
            from huggingface_hub import create_repo, upload_folder

            repo_id = repo_id or Path(save_directory).name
            repo_id = create_repo(repo_id, exist_ok=True, private=private, token=token).repo_id
            card_path = Path(save_directory) / "README.md"
            if not card_path.is_file():  # a card written beside the weights (e.g. by training) is kept
                default_model_card(type(self).__name__, repo_id).save(str(card_path))
            upload_folder(repo_id=repo_id, folder_path=save_directory, token=token, commit_message=commit_message,
                          create_pr=create_pr)


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
        "# or: DiffusionPipeline.from_pretrained(repo, trust_remote_code=True) with diffusers-retina installed\n"
        "```\n"
    )


def write_remote_code_layout(pipeline, save_directory: Union[str, os.PathLike]) -> Dict[str, str]:
    """Rewrite ``model_index.json`` to the remote-code layout and write the shim files. Returns ``{file: module}``."""
    save_directory = Path(save_directory)
    index_path = save_directory / "model_index.json"
    index = json.loads(index_path.read_text())
    written: Dict[str, str] = {}

    remote_name = type(pipeline)._remote_code_name()
    index["_class_name"] = [remote_name, type(pipeline).__name__]
    (save_directory / f"{remote_name}.py").write_text(shim_source(type(pipeline).__module__, type(pipeline).__name__))
    written[f"{remote_name}.py"] = type(pipeline).__module__

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
