"""The ``diffusers-retina`` entry point: the argument parser with every sub-command, and :func:`main`.

No network at run time: :func:`main` sets ``HF_HUB_OFFLINE=1`` for every sub-command but ``push`` unless the user set
``HF_HUB_OFFLINE``, so ``--pipeline org/name`` resolves from the local Hugging Face cache. Importing this module
changes no Hub setting. No module of the package imports this one.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import diffusers_retina

from . import adapt, adapt_train, demo, features, measure, push, segment, synthesize
from .common import CLIError

def _apply_offline_mode() -> None:
    """Make ``HF_HUB_OFFLINE`` effective even though importing this module (``diffusers_retina.cli``) first imports
    the package, and with it huggingface_hub, which reads the variable once at import time."""
    import huggingface_hub.constants as hub_constants

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    hub_constants.HF_HUB_OFFLINE = offline or hub_constants.HF_HUB_OFFLINE
    hub_utils = sys.modules.get("diffusers.utils.hub_utils")
    if hub_utils is not None and hasattr(hub_utils, "HF_HUB_OFFLINE"):
        hub_utils.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE


#: Sub-commands that need the network (everything else runs offline by default).
ONLINE_COMMANDS = ("push",)


def build_parser() -> argparse.ArgumentParser:
    """The ``diffusers-retina`` argument parser with all sub-commands."""
    parser = argparse.ArgumentParser(
        prog="diffusers-retina",
        description="Diffusion models for retinal image analysis (Hugging Face diffusers pipelines).",
    )
    parser.add_argument("--version", action="version", version=f"diffusers-retina {diffusers_retina.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    segment.build_segment_parser(subparsers)
    measure.build_measure_parser(subparsers)
    synthesize.build_synthesize_parser(subparsers)
    features.build_features_parser(subparsers)
    adapt.build_adapt_parser(subparsers)
    adapt_train.build_adapt_train_parser(subparsers)
    demo.build_demo_parser(subparsers)
    push.build_push_parser(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``diffusers-retina`` with ``argv`` (default: ``sys.argv[1:]``).

    Returns 0 on success. Bad arguments or inputs exit through ``SystemExit`` with a non-zero code after printing
    an error that names the file or argument (argparse errors: 2, everything else: 1).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command not in ONLINE_COMMANDS:  # no network at run time unless the user set HF_HUB_OFFLINE
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        _apply_offline_mode()
    try:
        return int(args.handler(args))
    except CLIError as error:
        print(f"diffusers-retina {args.command}: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None

