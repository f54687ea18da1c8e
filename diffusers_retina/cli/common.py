"""What the ``diffusers-retina`` commands share: argument types and flags, the device, loading a pipeline, input
collection and the sharded, resumable folder run (:func:`run_folder_command`).

Every user-facing error is a :class:`CLIError` whose message names the file or flag; :func:`diffusers_retina.cli.main`
prints it and exits with 1. Command modules import from here and from :mod:`diffusers_retina.utils.io_utils`, never
from :mod:`diffusers_retina.cli.main`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

import diffusers
import diffusers_retina
from diffusers_retina.data import DataError, read_image
from diffusers_retina.pipelines import SegmentationEnsemblePipeline
from diffusers_retina.pipelines.sampling import AUTO_BATCH
from diffusers_retina.sharded_inference import (
    RESULTS_FILE,
    RunOutcome,
    ShardedFolderRun,
    ShardedRunError,
    WorkItem,
    make_batches,
    process_state,
)

from .processing import (
    add_processing_resolution_argument,
    check_processing_flags,
    processing_call_kwargs,
    processing_note,
)

#: The embedded reference checkpoint, trained by ``training/train_segmentation_ensemble.py``.
DEFAULT_PIPELINE: Path = Path(diffusers_retina.__file__).resolve().parents[1] / "checkpoints" / "segmentation-anchored-chase"


#: Image files a folder INPUT is scanned for (lower-case suffixes).
IMAGE_EXTENSIONS: Tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


#: ``--scheduler`` names and the diffusers classes they select.
SCHEDULERS: Dict[str, str] = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}


DTYPES: Dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


FUSIONS: Tuple[str, ...] = ("mean", "majority", "staple")


#: Pipeline argument names as they appear in its error messages, and the command-line flags that set them.
_FLAG_NAMES: Dict[str, str] = {
    "`ensemble_size`": "--ensemble-size",
    "`fusion`": "--fusion",
    "`threshold`": "--threshold",
    "`batch_size`": "--batch-size",
    "`tile_size`": "--tile-size",
    "`tile_overlap`": "--tile-overlap",
}


class CLIError(Exception):
    """A user-facing error: :func:`main` prints the message (which names the file or argument) and exits with 1."""


def bounded(kind: Callable[[str], float], low: float, high: Optional[float] = None, high_inclusive: bool = False,
            low_inclusive: bool = True) -> Callable[[str], float]:
    """An argparse type: ``kind(text)`` within the given bounds, with an error that names the expected range."""
    left = "[" if low_inclusive else "("
    right = ")" if high is None or not high_inclusive else "]"
    expected = f"{'an integer' if kind is int else 'a number'} in {left}{low}, {'inf' if high is None else high}{right}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        above = value >= low if low_inclusive else value > low
        below = high is None or (value <= high if high_inclusive else value < high)
        if not (above and below):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


positive_int = bounded(int, 1)


non_negative_int = bounded(int, 0)


open_unit_float = bounded(float, 0.0, 1.0, low_inclusive=False)


overlap_fraction = bounded(float, 0.0, 1.0)


def batch_size_argument(text: str) -> Union[int, str]:
    """``--batch-size``: a positive integer or ``auto`` (the pipelines' ``batch_size="auto"``)."""
    if text == AUTO_BATCH:
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or {AUTO_BATCH!r}, got {text!r}") from None


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by ``segment`` and ``demo``: which pipeline, where it runs and how it samples."""
    parser.add_argument(
        "--pipeline",
        default=None,
        metavar="PATH_OR_REPO",
        help="a saved SegmentationEnsemblePipeline: a local folder or a Hub repo id already in the local cache "
        f"(HF_HUB_OFFLINE=1 unless you set HF_HUB_OFFLINE). Default: the embedded reference checkpoint {DEFAULT_PIPELINE}.",
    )
    parser.add_argument("--ensemble-size", type=positive_int, default=5, metavar="E",
                        help="ensemble members sampled per image (default: 5)")
    parser.add_argument("--steps", type=positive_int, default=None, metavar="N",
                        help="denoising steps per member (default: the checkpoint's default_denoising_steps, else 2)")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None,
                        help="sampler, built from the saved scheduler's config (default: the scheduler saved with "
                        "the pipeline)")
    parser.add_argument("--tile-size", type=non_negative_int, default=256, metavar="PIXELS",
                        help="images larger than this are denoised in overlapping windows of this size blended "
                        "with a Gaussian; a multiple of the UNet's down-sampling factor; 0 = no tiling (default: 256)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed; the same seed gives the same output (default: 0)")
    add_processing_resolution_argument(parser)
    parser.add_argument("--batch-size", type=batch_size_argument, default=AUTO_BATCH, metavar="N|auto",
                        help="ensemble members denoised together; the output does not depend on it (default: auto = "
                        "all at once on GPU; on CPU as many as keep one UNet call within 48k float32 pixels, since a batch of "
                        "5 x 256^2 ran slower there than 5 single calls, see benchmarks/)")
    add_device_argument(parser)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="weights and activations dtype (default: float32; float16/bfloat16 for GPUs)")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="CPU threads for torch (default: torch's choice; on a CPU busy with other jobs, 1 can "
                        "be several times faster)")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device``: any torch device string, checked by :func:`resolve_device` before anything is loaded."""
    parser.add_argument("--device", default=None, metavar="DEVICE",
                        help="where to run: any torch device string (cpu, cuda, cuda:1, mps, xpu, ...). Default: under "
                        "`accelerate launch` each process's own device, else cuda when available, else cpu")


def _backend_available(kind: str) -> bool:
    """Whether torch can use devices of type ``kind`` here (``cuda``, ``mps``, ``xpu``, ...)."""
    if kind == "cpu":
        return True
    if kind == "mps":
        return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    module = getattr(torch, kind, None)
    is_available = getattr(module, "is_available", None)
    return bool(callable(is_available) and is_available())


def resolve_device(name: Optional[str]) -> torch.device:
    """``--device``: any torch device string (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ``xpu:0``, ...), checked here.

    ``None`` picks the device of this process: under ``accelerate launch`` with several processes accelerate's
    ``PartialState().device`` (e.g. ``cuda:<local rank>``), else CUDA when available, else the CPU. A device type
    without an index (``cuda``) under several processes also becomes the process's own device of that type, so that
    the processes do not all run on device 0.

    Raises:
        CLIError: naming ``--device`` for a string torch does not parse, a backend that is not available, or an index
            beyond the devices present.
    """
    state = process_state()
    if name is None:
        if state.num_processes > 1:
            return state.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as error:
        raise CLIError(f"--device {name!r} is not a torch device string (e.g. cpu, cuda, cuda:1, mps): "
                       f"{error}") from None
    if not _backend_available(device.type):
        fallback = "; use --device cpu." if device.type != "cpu" else "."
        what = "CUDA" if device.type == "cuda" else f"the {device.type!r} backend"
        raise CLIError(f"--device {name}: {what} is not available on this machine{fallback}")
    if device.type != "cpu" and device.index is not None:
        module = getattr(torch, device.type, None)
        count = module.device_count() if hasattr(module, "device_count") else None
        if count is not None and device.index >= count:
            raise CLIError(f"--device {name}: this machine has {count} {device.type} device(s) "
                           f"({device.type}:0 to {device.type}:{count - 1}).")
    own_type = state.device.type == device.type
    if device.type != "cpu" and device.index is None and state.num_processes > 1 and own_type:
        return state.device
    return device


def apply_threads(threads: Optional[int]) -> None:
    """``--threads``: set torch's intra-op thread count (``None`` leaves it alone)."""
    if threads is not None:
        torch.set_num_threads(threads)


def load_pipeline(
    location: Optional[str],
    device: torch.device,
    dtype: str = "float32",
    scheduler: Optional[str] = None,
    pipeline_class: type = SegmentationEnsemblePipeline,
    default: Optional[Path] = None,
) -> Tuple[Any, str]:
    """Load a pipeline (default: :class:`SegmentationEnsemblePipeline`) from a local folder or a (cached) Hub repo id.

    Args:
        location: folder or repo id; ``None`` means ``default`` (:data:`DEFAULT_PIPELINE` unless given).
        device: where the pipeline runs.
        dtype: a key of :data:`DTYPES`.
        scheduler: a key of :data:`SCHEDULERS` to swap the sampler (built from the saved scheduler's config).
        pipeline_class: the class to load with (``Mask2ImagePipeline`` for ``synthesize``).
        default: the embedded checkpoint used when ``location`` is None.

    Returns:
        The pipeline and the location it was loaded from, as a string.

    Raises:
        CLIError: naming the location when it is missing or cannot be loaded.
    """
    if location is None:
        default = default or DEFAULT_PIPELINE
        if not (default / "model_index.json").is_file():
            raise CLIError(
                f"The reference checkpoint is not in '{default}' (it is produced by the scripts in training/). "
                f"Pass --pipeline PATH_OR_REPO with a saved {pipeline_class.__name__}."
            )
        location = str(default)
    path = Path(location).expanduser()
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise CLIError(f"--pipeline '{location}' is a folder without model_index.json, not a saved pipeline.")
    if path.exists() and not path.is_dir():
        raise CLIError(f"--pipeline '{location}' is a file; pass the folder of a saved pipeline or a Hub repo id.")
    source = str(path) if path.is_dir() else location
    try:
        pipe = pipeline_class.from_pretrained(source, dtype=DTYPES[dtype])
    except Exception as error:  # missing cache entry, broken weights, wrong pipeline class, ...
        hint = ""
        if not path.is_dir():
            hint = (" It is not a local folder; as a Hub repo id it must already be in the local cache, because "
                    "HF_HUB_OFFLINE=1 (set HF_HUB_OFFLINE=0 to allow downloads).")
        detail = str(error).strip().rstrip(".") or type(error).__name__
        raise CLIError(f"Cannot load --pipeline '{location}': {detail}.{hint}") from error
    if scheduler is not None:
        scheduler_class = getattr(diffusers, SCHEDULERS[scheduler])
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    pipe.to(device)
    return pipe, source


def check_pipeline_settings(pipe: SegmentationEnsemblePipeline, args: argparse.Namespace, fusion: str = "mean",
                            threshold: float = 0.5, tile_overlap: float = 0.25) -> None:
    """Run the pipeline's own argument checks now, before anything is written; errors name the flag."""
    try:
        pipe.check_inputs(args.ensemble_size, fusion, threshold, args.batch_size, args.tile_size or None,
                          tile_overlap, "pil", ["latents"])
        check_processing_flags(pipe, args)
    except ValueError as error:
        message = str(error)
        for name, flag in _FLAG_NAMES.items():
            message = message.replace(name, flag)
        raise CLIError(message) from error


def resolve_steps(steps: Optional[int], pipe) -> int:
    """``--steps``, else the checkpoint's ``default_denoising_steps`` (Marigold's convention), else 2."""
    return steps or pipe.config.get("default_denoising_steps") or 2


def collect_inputs(inputs: Sequence[str]) -> List[Path]:
    """Expand INPUT arguments (files, or folders scanned for :data:`IMAGE_EXTENSIONS`, sorted) into image files.

    Raises:
        CLIError: for a missing input, a folder without images, or two inputs whose outputs would collide
            (the same file stem).
    """
    files: List[Path] = []
    for entry in inputs:
        path = Path(entry)
        if not path.exists():
            raise CLIError(f"Input '{entry}' does not exist.")
        if path.is_dir():
            found = sorted(
                child for child in path.iterdir()
                if child.is_file() and child.suffix.lower() in IMAGE_EXTENSIONS and not child.name.startswith(".")
            )
            if not found:
                raise CLIError(
                    f"Input folder '{entry}' contains no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)})."
                )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise CLIError(f"Input '{entry}' is neither a file nor a folder.")
    unique: List[Path] = []
    seen_files = set()
    stems: Dict[str, Path] = {}
    for path in files:
        resolved = path.resolve()
        if resolved in seen_files:
            continue  # the same file named twice (e.g. a file and its folder)
        seen_files.add(resolved)
        if path.stem in stems:
            raise CLIError(
                f"Inputs '{stems[path.stem]}' and '{path}' share the name '{path.stem}', so their outputs "
                f"'{path.stem}_*.png' would overwrite each other; rename one of them."
            )
        stems[path.stem] = path
        unique.append(path)
    return unique


def check_output_dir(output_dir: Path) -> None:
    """The output folder may exist (as a folder) or be created; a file in its place is a CLIError."""
    for candidate in (output_dir, *output_dir.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise CLIError(f"--output-dir '{output_dir}': '{candidate}' exists and is not a folder.")
            break


def read_input_image(path: Path, image_channels: int) -> np.ndarray:
    """Decode one input fully (PIL ``verify`` + ``load``, via :func:`diffusers_retina.data.read_image`).

    Returns ``(H, W, C)`` uint8 or float32 in ``[0, 1]``; a broken file is a CLIError naming it.
    """
    try:
        image = read_image(path, image_channels)
    except DataError as error:
        raise CLIError(str(error)) from error
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise CLIError(f"Image file '{path}' is empty ({image.shape[1]}x{image.shape[0]}).")
    return image


def _sharded_errors(action: Callable[[], Any]) -> Any:
    """Run ``action``; the sharded runner's errors (output folder, settings, another process) become CLIErrors."""
    try:
        return action()
    except ShardedRunError as error:
        raise CLIError(str(error)) from error


def finish_sharded_run(outcome: RunOutcome, verb: str) -> None:
    """Raise the CLIError of a failed folder run (this process's own error first; the original CLIError as is)."""
    if not outcome.errors:
        return
    first = outcome.errors[0]
    caught = first.get("exception")
    if isinstance(caught, CLIError):
        raise caught
    if caught is not None:
        raise CLIError(f"{verb} '{first['input']}' failed: {type(caught).__name__}: {caught}") from caught
    raise CLIError(f"{verb} '{first['input']}' failed on process {first['rank']}: {first['type']}: "
                   f"{first['message']}")


def add_folder_run_arguments(parser: argparse.ArgumentParser, what: str = "images") -> None:
    """``--overwrite`` and ``--image-batch-size``: the sharded, resumable folder run of
    :mod:`diffusers_retina.sharded_inference` (``segment``, ``synthesize``, ``features``)."""
    parser.add_argument("--overwrite", action="store_true",
                        help=f"redo {what} whose outputs are already complete in --output-dir (default: skip them, "
                        "so that a stopped run continues where it stopped)")
    parser.add_argument("--image-batch-size", type=positive_int, default=1, metavar="N",
                        help=f"{what} of one size put through one pipeline call (default: 1); the outputs do not "
                        "depend on it. Under `accelerate launch` each process takes its share of the inputs")


def add_image_input_arguments(parser: argparse.ArgumentParser, pipeline_help: Optional[str] = None) -> None:
    """``INPUT...`` (image files or folders), ``--output-dir`` and, with ``pipeline_help``, ``--pipeline``: the inputs of
    the image folder commands (``features``, ``adapt``)."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="an image file, or a folder whose images (png, jpg, jpeg, tif, tiff, bmp) are all used")
    parser.add_argument("--output-dir", required=True, type=Path, metavar="DIR",
                        help="folder for the outputs (created if missing)")
    if pipeline_help is not None:
        parser.add_argument("--pipeline", default=None, metavar="PATH_OR_REPO", help=pipeline_help)


def image_group(channels: int) -> Callable[[WorkItem], Tuple[Tuple[int, ...], str]]:
    """``group_of`` for :func:`run_folder_command` over image files: decodes the image (so an unreadable file fails
    before anything is written) and groups images of one shape and dtype into the same batches."""

    def group_of(item: WorkItem) -> Tuple[Tuple[int, ...], str]:
        image = read_input_image(item.payload, channels)
        return image.shape, image.dtype.str

    return group_of


def describe_image_row(output_dir: Path) -> Callable[[Dict[str, Any]], str]:
    """The progress line of one finished image: its size (and processing size), time and output stem."""
    return lambda row: (f"{row['height']}x{row['width']}{processing_note(row)}, {row['seconds']:.2f} s -> "
                        f"{output_dir / row['name']}_*")


def run_folder_command(
    args: argparse.Namespace,
    command: str,
    settings: Dict[str, Any],
    items: List[WorkItem],
    process: Callable[[List[WorkItem]], List[Dict[str, Any]]],
    *,
    group_of: Optional[Callable[[WorkItem], Any]],
    intro: Callable[[int, int, int], str],
    verb: str,
    done: Optional[Callable[[RunOutcome], str]] = None,
    describe: Optional[Callable[[Dict[str, Any]], str]] = None,
    before_start: Optional[Callable[[], None]] = None,
    **run_options: Any,
) -> RunOutcome:
    """The sharded, resumable folder run shared by ``segment``, ``synthesize``, ``features`` and ``adapt`` (see
    :mod:`diffusers_retina.sharded_inference`): plan this process's share of ``items`` in ``args.output_dir`` (inputs
    already complete skipped unless ``args.overwrite``), check every input of the share with ``group_of`` (which
    returns its batch group, or ``None`` to keep the item's own) before anything is written, agree across processes,
    run ``before_start`` on the main process, then ``process`` batches of ``args.image_batch_size`` inputs of one
    group; prints ``intro(mine, total, skipped)`` first and ``done(outcome)`` at the end (main process; default: the
    total time and the results file), and raises
    the first failure as a :class:`CLIError` (``verb`` names the action)."""
    run = ShardedFolderRun(args.output_dir, command, settings, overwrite=args.overwrite, **run_options)
    mine = _sharded_errors(lambda: run.plan(items))

    def validate() -> None:
        for item in mine:
            group = group_of(item) if group_of is not None else None
            if group is not None:
                item.group = group

    _sharded_errors(lambda: run.agree(validate))
    if before_start is not None and run.state.is_main_process:
        before_start()
    _sharded_errors(run.start)
    prefix = f"[rank {run.state.process_index}] " if run.state.num_processes > 1 else ""
    print(prefix + intro(len(mine), len(items), len(run.skipped)), flush=True)
    outcome = _sharded_errors(lambda: run.execute(make_batches(mine, args.image_batch_size), process,
                                                  describe or (lambda row: f"{row['seconds']:.1f} s")))
    if run.state.num_processes > 1:
        # every collective is done (execute ends on a barrier): close the process group before the interpreter exits;
        # a rank leaving with gloo's threads still alive was aborted ("terminate called without an active exception")
        run.state.destroy_process_group()
    finish_sharded_run(outcome, verb)
    if run.state.is_main_process:
        print(done(outcome) if done else (f"Done in {outcome.summary.get('total_seconds', 0.0):.1f} s; rows: "
                                          f"{args.output_dir / RESULTS_FILE}"), flush=True)
    return outcome


def pipeline_call_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The ``SegmentationEnsemblePipeline`` call arguments of the shared segmentation flags (``segment``, ``measure``,
    ``demo``): steps, ensemble size, fusion, threshold, batch size, tiles, processing resolution and camera angle."""
    return dict(num_inference_steps=args.steps, ensemble_size=args.ensemble_size, fusion=args.fusion,
                threshold=args.threshold, batch_size=args.batch_size, tile_size=args.tile_size or None,
                tile_overlap=args.tile_overlap, **processing_call_kwargs(args))
