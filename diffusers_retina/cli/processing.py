"""The commands' processing-scale flags: ``--processing-resolution`` and ``--camera-degrees`` (the segmenting
pipelines' ``processing_resolution`` and ``camera_degrees``), and the note a result row gets when its photograph was
resized."""

from __future__ import annotations

import argparse
from typing import Any, Dict, Union

from diffusers_retina.image_processing import PROCESSING_MODES
from diffusers_retina.pipelines.checks import auto_processing_diameter


def processing_resolution_argument(text: str) -> Union[int, str]:
    """``--processing-resolution``: ``auto``, ``native`` or the longer side in pixels (an integer >= 8)."""
    if text in PROCESSING_MODES:
        return text
    if not text.isdigit() or int(text) < 8:
        raise argparse.ArgumentTypeError(f"expected 'auto', 'native' or a longer side in pixels (>= 8), got {text!r}")
    return int(text)


def add_processing_resolution_argument(parser: argparse.ArgumentParser) -> None:
    """``--processing-resolution`` (the pipelines' ``processing_resolution``), shared by every segmenting command."""
    parser.add_argument("--processing-resolution", type=processing_resolution_argument, default="auto",
                        metavar="auto|native|PIXELS",
                        help="the size photographs are segmented at; outputs come back at the input's size. auto: "
                        "the photograph's field of view is resized to span the checkpoint's training diameter (920 px "
                        "for the CHASE_DB1 references; within 5%% the photograph is kept; a crop without a dark "
                        "surround is only shrunk to that size; checkpoints that record no diameter run natively); "
                        "native: as given; PIXELS: the longer side (default: auto)")
    parser.add_argument("--camera-degrees", type=float, default=None, metavar="DEGREES",
                        help="the field-of-view angle of the camera that took the photographs (e.g. 45), when known: "
                        "--processing-resolution auto then matches the checkpoint's pixels per degree instead of its "
                        "diameter, so a wider camera's vessels get the width the model learnt (needs a checkpoint "
                        "that records field_of_view_degrees; 30 for the CHASE_DB1 references)")


def processing_call_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The pipelines' ``processing_resolution`` and ``camera_degrees`` from the flags."""
    return {"processing_resolution": args.processing_resolution, "camera_degrees": getattr(args, "camera_degrees", None)}


def check_processing_flags(pipe, args: argparse.Namespace) -> None:
    """``--camera-degrees`` against the pipeline, before anything runs: it needs ``--processing-resolution auto`` and
    a checkpoint that records its training angle (``ValueError`` naming ``--camera-degrees``)."""
    try:
        auto_processing_diameter(pipe.config, args.processing_resolution, getattr(args, "camera_degrees", None))
    except ValueError as error:
        raise ValueError(str(error).replace("`camera_degrees`", "--camera-degrees")) from error


def processing_note(row: Dict[str, Any]) -> str:
    """`` (segmented at HxW, xS by field of view)`` for a row whose image was resized (``--processing-resolution``),
    else nothing."""
    if row.get("processing_basis") in (None, "native"):
        return ""
    return (f" (segmented at {row['processing_height']}x{row['processing_width']}, x{row['processing_scale']:.2f} by "
            f"{row['processing_basis'].replace('_', ' ')})")
