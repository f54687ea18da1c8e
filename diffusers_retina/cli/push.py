"""``diffusers-retina push CHECKPOINT --repo-id ORG/NAME``: publish a saved pipeline folder to the Hugging Face Hub.

The command half of :mod:`diffusers_retina.hub.upload` (which holds the allow-list, the staging and the upload): it prints
the exact file list, and uploads it unless ``--dry-run``. The library's :class:`~diffusers_retina.hub.upload.PushError`
becomes a :class:`~diffusers_retina.cli.common.CLIError` here.

Example::

    diffusers-retina push checkpoints/segmentation-ensemble-chase --repo-id my-org/segmentation-ensemble-chase --dry-run
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import diffusers_retina

from ..bundle import BUNDLE_FILE
from ..hub.upload import PushError, files_to_push, push_checkpoint, upload_sources
from .common import CLIError


def _human_size(size: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size} B"


#: The ``push`` command's one-line help and its description (``--help``).
HELP = "upload a saved pipeline folder to the Hugging Face Hub (allow-listed files only)"
DESCRIPTION = (
    "Create the Hub model repo --repo-id (if needed), then upload the pipeline files of CHECKPOINT: "
    "model_index.json, configs, *.safetensors, scheduler configs, remote-code shims with a self-contained copy of "
    "the diffusers-retina code (diffusers_retina_bundle.py), README.md, "
    "training_info.json, evaluation.json and small PNGs. Never checkpoint-*/ training states, optimizer states, "
    "pickles or logs. Uses your Hugging Face login (huggingface-cli login) or --token."
)


def build_push_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """The ``push`` sub-command's arguments."""
    parser = subparsers.add_parser("push", help=HELP, description=DESCRIPTION)
    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="a saved pipeline folder")
    parser.add_argument("--repo-id", required=True, metavar="ORG/NAME", help="the Hub model repo to create/update")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--token", default=None, help="a Hugging Face token (default: your login)")
    parser.add_argument("--commit-message", default=None, help="the commit message")
    parser.add_argument("--base-model", default=None, metavar="ORG/NAME",
                        help="the Hub id of the model this one is built on (e.g. the fundus DDPM under a feature "
                        "head), written as base_model into the uploaded card")
    parser.add_argument("--dry-run", action="store_true", help="print the files that would be uploaded and stop")
    parser.set_defaults(handler=run_push)
    return parser


def run_push(args: argparse.Namespace) -> int:
    """The ``push`` sub-command: print the file list, and upload it unless ``--dry-run``."""
    if args.repo_id.count("/") > 1 or not args.repo_id.strip("/"):
        raise CLIError(f"--repo-id must be NAME or ORG/NAME, got {args.repo_id!r}.")
    try:
        files = files_to_push(args.checkpoint)
    except PushError as error:
        raise CLIError(str(error)) from None
    if args.base_model is not None and not re.fullmatch(r"[\w.\-]+/[\w.\-]+", args.base_model):
        raise CLIError(f"--base-model must be a Hub id ORG/NAME, got {args.base_model!r}.")
    sources = upload_sources(args.checkpoint, files, repo_id=args.repo_id, base_model=args.base_model)
    sizes = {name: len(source) if isinstance(source, bytes) else source.stat().st_size
             for name, source in sources.items()}
    print(f"{len(files)} files ({_human_size(sum(sizes.values()))}) from {args.checkpoint} to {args.repo_id}:")
    for name in files:
        note = ""
        if name == "README.md" and isinstance(sources[name], bytes):
            note = f"; the model card names {args.repo_id}"
        elif name == BUNDLE_FILE:
            note = f"; generated: self-contained diffusers-retina {diffusers_retina.__version__} code for trust_remote_code=True"
        elif isinstance(sources[name], bytes):
            note = f"; generated: falls back on {BUNDLE_FILE} without diffusers-retina installed"
        print(f"  {name}  ({_human_size(sizes[name])}{note})")
    if args.dry_run:
        print("Dry run: nothing uploaded.")
        return 0
    try:
        repo_id = push_checkpoint(args.checkpoint, args.repo_id, token=args.token, private=args.private,
                                  commit_message=args.commit_message, base_model=args.base_model)
    except PushError as error:
        raise CLIError(str(error)) from None
    except Exception as error:  # network, login, permissions: say which repo, keep the Hub's message
        raise CLIError(f"pushing to --repo-id {args.repo_id} failed: {type(error).__name__}: {error}") from None
    print(f"Uploaded to https://huggingface.co/{repo_id}")
    return 0
