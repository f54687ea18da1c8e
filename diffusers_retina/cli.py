"""``diffusers-retina``: the command-line interface of diffusers-retina.

Sub-commands:

* ``segment`` -- vessel segmentation with an ensemble of diffusion samples: a fused mask plus probability and
  uncertainty maps (entropy, variance, mutual information) per image, one row per image in ``results.jsonl`` and
  a ``summary.json``. NIfTI inputs (MRI
  such as BraTS: a 2-D slice, or a 3-D volume segmented slice by slice; modalities as a 4-D file, as several files
  joined by commas, or as case folders with ``--modalities``) give NIfTI outputs with the input's affine and header.
* ``synthesize`` -- paint fundus images from vessel masks (or from masks the pipeline samples itself) with a
  Mask2ImagePipeline; writes ``images/`` + ``masks/`` with matching names, a folder the training scripts read.
* ``features`` -- a DiffusionFeaturePipeline over images: its head's segmentation (mask, probability, uncertainty) or
  the UNet features themselves as safetensors (see :mod:`diffusers_retina.features`).
* ``demo`` -- the reference checkpoint on ``skimage.data.retina()`` and, when present, a CHASE_DB1 test image;
  prints the figures and writes a picture panel (see :mod:`diffusers_retina.demo`).
* ``push`` -- upload a saved pipeline folder to the Hugging Face Hub: the repo is created first, then an explicit
  allow-list of files is uploaded (never training states, pickles or logs; see :mod:`diffusers_retina.push`).

``segment``, ``synthesize`` and ``features`` run folders sharded and resumable
(:mod:`diffusers_retina.sharded_inference`): under ``accelerate launch`` each process takes its share of the inputs,
inputs whose outputs are complete are skipped (``--overwrite`` redoes them), ``--image-batch-size`` images of one size
share a pipeline call, and each finished input appends its row to a per-process file merged into ``results.jsonl``.

Examples::

    diffusers-retina segment fundus.png photos/ --output-dir results --ensemble-size 5 --steps 2
    diffusers-retina segment eye.jpg --output-dir out --pipeline org/segmentation-ensemble --fusion staple
    diffusers-retina segment BraTS20_Training_001/ --modalities t1,t1ce,t2,flair --label-values 0,1,2,4 \
        --output-dir out --pipeline brats-run
    accelerate launch --num_processes 8 -m diffusers_retina.cli segment photos/ --output-dir results \
        --image-batch-size 4 --device cuda
    diffusers-retina demo --output demo_panel.png
    diffusers-retina push checkpoints/segmentation-ensemble-chase --repo-id my-org/segmentation-ensemble --dry-run

No network at run time: the ``diffusers-retina`` entry point (:func:`main`) sets
``HF_HUB_OFFLINE=1`` for every sub-command but ``push`` unless the user set ``HF_HUB_OFFLINE``, so
``--pipeline org/name`` resolves from the local Hugging Face cache. Importing this module changes no Hub setting.
"""

from __future__ import annotations

import os
import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Dict, IO, List, Optional, Sequence, Tuple, Union  # noqa: E402

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402

import diffusers_retina  # noqa: E402
from diffusers_retina.data import (  # noqa: E402
    DataError,
    NiftiCase,
    find_modality_file,
    is_nifti_file,
    nifti_bytes_like,
    nifti_case,
    read_image,
    read_nifti_case,
)
from diffusers_retina.pipelines import SegmentationEnsemblePipeline  # noqa: E402
from diffusers_retina.pipelines.sampling import AUTO_BATCH, per_sample_generators  # noqa: E402
from diffusers_retina.sharded_inference import (  # noqa: E402
    RESULTS_FILE,
    SUMMARY_FILE,
    RunOutcome,
    ShardedFolderRun,
    ShardedRunError,
    WorkItem,
    make_batches,
    process_state,
)


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


# ------------------------------------------------------------------------------------------------ argument types


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


# ------------------------------------------------------------------------------------------------ pipeline


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
        import diffusers

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
    except ValueError as error:
        message = str(error)
        for name, flag in _FLAG_NAMES.items():
            message = message.replace(name, flag)
        raise CLIError(message) from error


# ------------------------------------------------------------------------------------------------ files


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


def _nifti_or_cli_error(paths: Sequence[Union[str, Path]], name: Optional[str] = None) -> NiftiCase:
    """:func:`diffusers_retina.data.nifti_case`, its errors (and a missing nibabel) as CLIErrors."""
    try:
        return nifti_case(paths, name=name)
    except (DataError, ImportError) as error:
        raise CLIError(str(error)) from error


def _case_folders(folder: Path, modalities: Sequence[str]) -> List[NiftiCase]:
    """``--modalities``: ``folder`` is one case folder (it holds the modality files) or a folder of case folders."""
    def case_of(candidate: Path) -> NiftiCase:
        try:
            files = [find_modality_file(candidate, modality) for modality in modalities]
        except DataError as error:
            raise CLIError(f"Case folder '{candidate}': {error}") from error
        return _nifti_or_cli_error(files, name=candidate.name)

    if any(is_nifti_file(child) for child in folder.iterdir() if child.is_file()):
        return [case_of(folder)]
    children = sorted(child for child in folder.iterdir() if child.is_dir() and not child.name.startswith("."))
    if not children:
        raise CLIError(f"Input folder '{folder}' holds neither NIfTI files nor case folders (--modalities).")
    return [case_of(child) for child in children]


def collect_segment_inputs(inputs: Sequence[str], modalities: Optional[Sequence[str]] = None
                           ) -> List[Union[Path, NiftiCase]]:
    """Expand ``segment``'s INPUT arguments into photographs (:func:`collect_inputs`) and NIfTI cases, in order.

    * ``x.nii.gz`` (or ``.nii``): one case (2-D slice, 3-D volume, or 4-D with the modalities last);
    * ``a_t1.nii.gz,a_t2.nii.gz``: files joined by commas are the modalities of one case, in that order;
    * a folder with ``modalities`` given: a case folder holding one file per modality (found by name as in
      :class:`~diffusers_retina.data.BratsSliceDataset`), or a folder of such case folders;
    * another folder: its NIfTI files are cases, its photographs are segmented as photographs.

    Only file headers are read here. Raises a CLIError for missing inputs, unreadable headers and inputs whose
    outputs would share a name.

    Example:
        >>> collect_segment_inputs(["BraTS20_Training_001"], ["t1", "t1ce", "t2", "flair"])  # doctest: +SKIP
        [NiftiCase(name='BraTS20_Training_001', ...)]
    """
    items: List[Union[Path, NiftiCase]] = []
    for entry in inputs:
        parts = entry.split(",")
        path = Path(entry)
        if len(parts) > 1 and all(is_nifti_file(part) for part in parts):
            items.append(_nifti_or_cli_error(parts))
        elif is_nifti_file(entry) and not path.is_dir():
            if not path.exists():
                raise CLIError(f"Input '{entry}' does not exist.")
            items.append(_nifti_or_cli_error([path]))
        elif path.is_dir() and modalities:
            items.extend(_case_folders(path, modalities))
        elif path.is_dir() and any(is_nifti_file(c) for c in path.iterdir() if c.is_file()):
            volumes = sorted(c for c in path.iterdir()
                             if c.is_file() and is_nifti_file(c) and not c.name.startswith("."))
            items.extend(_nifti_or_cli_error([volume]) for volume in volumes)
            if any(c.suffix.lower() in IMAGE_EXTENSIONS for c in path.iterdir() if c.is_file()):
                items.extend(collect_inputs([entry]))
        else:
            items.extend(collect_inputs([entry]))
    unique: List[Union[Path, NiftiCase]] = []
    seen = set()
    names: Dict[str, str] = {}
    for item in items:
        key = item.sources if isinstance(item, NiftiCase) else (item,)
        key = tuple(source.resolve() for source in key)
        if key in seen:
            continue  # the same input named twice (e.g. a file and its folder)
        seen.add(key)
        name, label = (item.name, item.label) if isinstance(item, NiftiCase) else (item.stem, str(item))
        if name in names:
            raise CLIError(
                f"Inputs '{names[name]}' and '{label}' share the name '{name}', so their outputs '{name}_*' would "
                "overwrite each other; rename one of them."
            )
        names[name] = label
        unique.append(item)
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


def _umask() -> int:
    """The process umask (read by setting and restoring it; there is no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_files_atomically(directory: Path, writers: Dict[str, Callable[[IO[bytes]], None]]) -> List[Path]:
    """Write several files so that each one either appears complete or not at all.

    Each ``writers[name](file)`` writes into a temporary file beside its target (same file system); only when all of
    them succeeded are they renamed into place with ``os.replace``. On any error the temporary files are removed.
    """
    pending: List[Tuple[str, Path]] = []
    try:
        for name, write in writers.items():  # a name may hold a sub-folder ("images/x.png")
            target = directory / name
            handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            pending.append((name, Path(temporary)))
            os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates 0600; outputs get the usual permissions
            with os.fdopen(handle, "wb") as file:
                write(file)
        for name, temporary in pending:
            os.replace(temporary, directory / name)
    finally:
        for _, temporary in pending:
            if temporary.exists():
                temporary.unlink()
    return [directory / name for name, _ in pending]


def png_writer(image: PIL.Image.Image) -> Callable[[IO[bytes]], None]:
    """A writer for :func:`write_files_atomically` that saves ``image`` as PNG."""
    return lambda file: image.save(file, format="PNG")


def bytes_writer(data: bytes) -> Callable[[IO[bytes]], None]:
    """A writer for :func:`write_files_atomically` that writes ``data`` as is (e.g. a gzipped NIfTI file)."""
    return lambda file: file.write(data)


def json_safe(value: Any) -> Any:
    """Replace NaN and infinities (not valid JSON) by ``None``, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def json_writer(data: Dict[str, Any]) -> Callable[[IO[bytes]], None]:
    """A writer for :func:`write_files_atomically` that saves ``data`` as indented JSON."""
    text = json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n"
    return lambda file: file.write(text.encode("utf-8"))


# ------------------------------------------------------------------------------------------------ segment


def _name_list(text: str) -> List[str]:
    """``--modalities``: comma-separated non-empty names."""
    names = [name.strip() for name in text.split(",")]
    if not names or not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names like t1,t1ce,t2,flair, got {text!r}")
    return names


def _label_values(text: str) -> List[int]:
    """``--label-values``: comma-separated integers in 0..255 (written as uint8)."""
    try:
        values = [int(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2,4, got {text!r}") from None
    if not all(0 <= value <= 255 for value in values):
        raise argparse.ArgumentTypeError(f"label values must lie in 0..255, got {text!r}")
    return values


def build_segment_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """The ``segment`` sub-command's arguments."""
    parser = subparsers.add_parser(
        "segment",
        help="segment vessels in fundus images with a diffusion ensemble",
        description="Segment each INPUT image with an ensemble of diffusion samples. Writes <stem>_mask.png "
        "(0/255), <stem>_probability.png, <stem>_entropy.png, <stem>_variance.png, "
        "<stem>_mutual_information.png (8-bit maps: probability 0..1, entropy and mutual information 0..ln K, "
        "variance 0..0.25), optionally <stem>_member<k>.png, and summary.json to --output-dir. Files are written "
        "atomically: an interrupted run leaves only complete files.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="an image file, or a folder whose images (png, jpg, jpeg, tif, tiff, bmp) are all "
                        "segmented in sorted order; or NIfTI (.nii, .nii.gz; needs nibabel): a 2-D slice or 3-D "
                        "volume (segmented slice by slice along its last axis), a 4-D file with the modalities last, "
                        "several files joined by commas (the modalities of one case, in channel order), or with "
                        "--modalities a case folder or a folder of case folders. NIfTI outputs are "
                        "<name>_mask.nii.gz, _probability, _entropy, _variance, _mutual_information (float32) with "
                        "the input's affine and header")
    parser.add_argument("--output-dir", required=True, type=Path, metavar="DIR",
                        help="folder for the outputs (created if missing)")
    add_pipeline_arguments(parser)
    parser.add_argument("--fusion", choices=FUSIONS, default="mean",
                        help="how members are fused: mean probability, majority vote or STAPLE (default: mean)")
    parser.add_argument("--threshold", type=open_unit_float, default=0.5, metavar="P",
                        help="foreground threshold of binary masks: of the fused probability, and of each member before "
                        "majority/STAPLE fusion (default: 0.5)")
    parser.add_argument("--tile-overlap", type=overlap_fraction, default=0.25, metavar="FRACTION",
                        help="overlap of neighbouring windows as a fraction of --tile-size (default: 0.25)")
    parser.add_argument("--save-members", action="store_true",
                        help="also write each member's probability map as <stem>_member<k>.png (k = 1..E)")
    parser.add_argument("--modalities", type=_name_list, default=None, metavar="NAMES",
                        help="NIfTI: comma-separated modality names in the pipeline's channel order (e.g. "
                        "t1,t1ce,t2,flair); folder INPUTs are then BraTS case folders holding <case>_<name>.nii.gz "
                        "(or a folder of such folders)")
    parser.add_argument("--label-values", type=_label_values, default=None, metavar="V0,V1,...",
                        help="NIfTI: the value written in the mask for each class (e.g. 0,1,2,4 for BraTS labels "
                        "from a 4-class pipeline; default: the class index)")
    add_folder_run_arguments(parser, "images")
    parser.set_defaults(handler=run_segment)
    return parser


def resolve_steps(steps: Optional[int], pipe) -> int:
    """``--steps``, else the checkpoint's ``default_denoising_steps`` (Marigold's convention), else 2."""
    return steps or pipe.config.get("default_denoising_steps") or 2


def _settings(args: argparse.Namespace, pipe: SegmentationEnsemblePipeline, source: str) -> Dict[str, Any]:
    return {
        "pipeline": source,
        "ensemble_size": args.ensemble_size,
        "steps": args.steps,
        "scheduler": type(pipe.scheduler).__name__,
        "fusion": args.fusion,
        "threshold": args.threshold,
        "tile_size": args.tile_size or None,
        "tile_overlap": args.tile_overlap,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "save_members": args.save_members,
        "image_batch_size": getattr(args, "image_batch_size", 1),
        "device": str(pipe.device),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "diffusers_retina_version": diffusers_retina.__version__,
    }


def segment_images(
    pipe: SegmentationEnsemblePipeline, images: Sequence[np.ndarray], args: argparse.Namespace
) -> List[Tuple[Dict[str, PIL.Image.Image], Dict[str, float]]]:
    """Run the pipeline once on several images of one size (a batch of ``--image-batch-size``).

    Each image gets the ensemble generators a lone call with ``torch.Generator().manual_seed(--seed)`` would give it,
    so an image's outputs do not depend on which images share its call, nor on the process that segments it.

    Returns:
        For each image: the output pictures keyed by file suffix, and the figures of its row.
    """
    generators: List[torch.Generator] = []
    for _ in images:  # CPU seed generator: same seed, same output on any device
        generators.extend(per_sample_generators(torch.Generator().manual_seed(args.seed), args.ensemble_size,
                                                pipe._execution_device))
    result = pipe(
        list(images) if len(images) > 1 else images[0],
        num_inference_steps=args.steps,
        ensemble_size=args.ensemble_size,
        fusion=args.fusion,
        threshold=args.threshold,
        generator=generators,
        batch_size=args.batch_size,
        tile_size=args.tile_size or None,
        tile_overlap=args.tile_overlap,
        output_type="pil",
        return_members=args.save_members,
    )
    max_entropy = math.log(pipe.num_classes)
    per_image = []
    for index in range(len(images)):
        outputs = {
            "mask": result.masks[index],
            "probability": result.probabilities[index],
            "entropy": result.entropy[index],
            "variance": result.variance[index],
            "mutual_information": result.mutual_information[index],
        }
        if args.save_members:
            for member_index, member in enumerate(result.members[index], start=1):
                outputs[f"member{member_index}"] = member
        # Figures from the 8-bit maps the pipeline returns: entropy is scaled so ln K is 255 (error < 0.002 nats).
        figures = {
            "mean_entropy": float(np.asarray(result.entropy[index], dtype=np.float64).mean() / 255.0 * max_entropy),
            "foreground_fraction": float((np.asarray(result.masks[index]) > 0).mean()),
        }
        per_image.append((outputs, figures))
    return per_image


def segment_image(
    pipe: SegmentationEnsemblePipeline, image: np.ndarray, args: argparse.Namespace
) -> Tuple[Dict[str, PIL.Image.Image], Dict[str, float]]:
    """Run the pipeline on one image. Returns the output images keyed by file suffix and the per-image figures."""
    return segment_images(pipe, [image], args)[0]


def segment_volume(
    pipe: SegmentationEnsemblePipeline, volume: np.ndarray, args: argparse.Namespace, name: str = "volume"
) -> Tuple[Dict[str, np.ndarray], Dict[str, float]]:
    """Run the pipeline on each slice ``volume[:, :, z]`` of an ``(X, Y, Z, M)`` volume in ``[0, 1]``, each with
    the ``--seed`` generator (as every photograph).

    Returns the maps keyed by file suffix, shaped ``(X, Y, Z)`` (``probability`` and members: ``(X, Y, Z, K)`` for
    ``K > 2`` classes, the foreground probability for binary masks): ``mask`` uint8 class indices, the others
    float32; and the figures of the summary row (over all voxels).

    Example:
        >>> volume = np.random.rand(32, 32, 4, 4).astype(np.float32)  # (X, Y, slices, modalities)
        >>> maps, figures = segment_volume(pipe, volume, args)  # doctest: +SKIP
        >>> maps["mask"].shape, sorted(figures)  # doctest: +SKIP
        ((32, 32, 4), ['foreground_fraction', 'mean_entropy'])
    """
    height, width, depth = volume.shape[:3]
    num_classes = pipe.num_classes
    per_class = () if num_classes == 2 else (num_classes,)
    maps: Dict[str, np.ndarray] = {"mask": np.zeros((height, width, depth), np.uint8),
                                   "probability": np.zeros((height, width, depth) + per_class, np.float32)}
    for suffix in ("entropy", "variance", "mutual_information"):
        maps[suffix] = np.zeros((height, width, depth), np.float32)
    if args.save_members:
        for index in range(1, args.ensemble_size + 1):
            maps[f"member{index}"] = np.zeros((height, width, depth) + per_class, np.float32)
    for z in range(depth):
        pipe.set_progress_bar_config(desc=f"{name} slice {z + 1}/{depth}", leave=False)
        result = pipe(
            volume[:, :, z],
            num_inference_steps=args.steps,
            ensemble_size=args.ensemble_size,
            fusion=args.fusion,
            threshold=args.threshold,
            generator=torch.Generator().manual_seed(args.seed),
            batch_size=args.batch_size,
            tile_size=args.tile_size or None,
            tile_overlap=args.tile_overlap,
            output_type="np",
            return_members=args.save_members,
        )
        probability = result.probabilities[0]  # (H, W, C)
        maps["mask"][:, :, z] = result.masks[0]
        maps["probability"][:, :, z] = probability[..., 0] if num_classes == 2 else probability
        maps["entropy"][:, :, z] = result.entropy[0]
        maps["variance"][:, :, z] = result.variance[0]
        maps["mutual_information"][:, :, z] = result.mutual_information[0]
        if args.save_members:
            for index, member in enumerate(result.members[0], start=1):  # (H, W, C) each
                maps[f"member{index}"][:, :, z] = member[..., 0] if num_classes == 2 else member
    figures = {
        "mean_entropy": float(maps["entropy"].mean(dtype=np.float64)),
        "foreground_fraction": float((maps["mask"] > 0).mean()),
    }
    return maps, figures


def nifti_outputs(case: NiftiCase, reference: Any, maps: Dict[str, np.ndarray],
                  label_values: Optional[Sequence[int]] = None) -> Dict[str, Callable[[IO[bytes]], None]]:
    """Writers of ``<name>_<suffix>.nii.gz`` for the maps of :func:`segment_volume`, on the input's grid (a 2-D input
    gives 2-D outputs), with the input's affine and header; the mask as uint8 (``label_values[k]`` for class ``k``
    when given), the other maps as float32."""
    writers: Dict[str, Callable[[IO[bytes]], None]] = {}
    for suffix, array in maps.items():
        if suffix == "mask":
            if label_values is not None:
                array = np.asarray(label_values, dtype=np.uint8)[array]
            dtype = np.uint8
        else:
            dtype = np.float32
        array = array.reshape(tuple(case.spatial_shape) + array.shape[3:])
        writers[f"{case.name}_{suffix}.nii.gz"] = bytes_writer(nifti_bytes_like(array, reference, dtype))
    return writers


def _check_nifti_cases(cases: Sequence[NiftiCase], pipe: SegmentationEnsemblePipeline,
                       args: argparse.Namespace) -> None:
    """Channel counts and ``--label-values`` against the pipeline, before anything is written."""
    for case in cases:
        if case.channels != pipe.image_channels:
            raise CLIError(
                f"NIfTI input '{case.label}' has {case.channels} channel(s) but the pipeline expects "
                f"{pipe.image_channels}: give a 4-D file with the modalities last, the modality files joined by "
                "commas, or case folders with --modalities (e.g. t1,t1ce,t2,flair)."
            )
    if cases and args.label_values is not None and len(args.label_values) != pipe.num_classes:
        raise CLIError(f"--label-values gives {len(args.label_values)} values but the pipeline has "
                       f"{pipe.num_classes} classes.")


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
    """The progress line of one finished image: its size, time and output stem."""
    return lambda row: f"{row['height']}x{row['width']}, {row['seconds']:.2f} s -> {output_dir / row['name']}_*"


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


def run_segment(args: argparse.Namespace) -> int:
    """The ``segment`` sub-command. Validates everything before writing, then segments this process's share of the
    inputs still to do, ``--image-batch-size`` images of one size per pipeline call (see
    :mod:`diffusers_retina.sharded_inference`)."""
    output_dir: Path = args.output_dir
    files = collect_segment_inputs(args.inputs, getattr(args, "modalities", None))
    check_output_dir(output_dir)
    device = resolve_device(args.device)
    apply_threads(args.threads)
    pipe, source = load_pipeline(args.pipeline, device, args.dtype, args.scheduler)
    args.steps = resolve_steps(args.steps, pipe)
    check_pipeline_settings(pipe, args, args.fusion, args.threshold, args.tile_overlap)
    _check_nifti_cases([item for item in files if isinstance(item, NiftiCase)], pipe, args)
    items = [WorkItem(name=item.name, label=item.label, payload=item) if isinstance(item, NiftiCase)
             else WorkItem(name=item.stem, label=str(item), payload=item) for item in files]
    photograph_group = image_group(pipe.image_channels)

    def group_of(item: WorkItem) -> Any:  # NIfTI headers were read above; photographs are decoded here
        return None if isinstance(item.payload, NiftiCase) else photograph_group(item)

    def process(batch: List[WorkItem]) -> List[Dict[str, Any]]:
        if isinstance(batch[0].payload, NiftiCase):
            return [_segment_nifti_case(pipe, entry.payload, args) for entry in batch]
        images = [read_input_image(item.payload, pipe.image_channels) for item in batch]
        pipe.set_progress_bar_config(desc=batch[0].name if len(batch) == 1 else f"{len(batch)} images", leave=False)
        rows = []
        for item, image, (outputs, figures) in zip(batch, images, segment_images(pipe, images, args)):
            written = write_files_atomically(
                output_dir, {f"{item.name}_{suffix}.png": png_writer(picture) for suffix, picture in outputs.items()}
            )
            rows.append({"outputs": [path.name for path in written], "width": int(image.shape[1]),
                         "height": int(image.shape[0]), **figures})
        return rows

    def describe(row: Dict[str, Any]) -> str:
        size = "x".join(str(row[key]) for key in ("height", "width", "slices") if key in row)
        return (f"{size}, {row['seconds']:.1f} s, mean entropy {row['mean_entropy']:.4f} nats, foreground "
                f"{row['foreground_fraction']:.2%} -> {output_dir / row['name']}_*")

    run_folder_command(
        args, "segment", _settings(args, pipe, source), items, process, group_of=group_of, describe=describe,
        verb="Segmenting",
        intro=lambda mine, total, skipped: (
            f"Segmenting {mine} of {total} input(s) ({skipped} already done) with {source} "
            f"({type(pipe.scheduler).__name__}, {args.steps} steps, {args.ensemble_size} members) on {device} "
            f"-> {output_dir}"),
        done=lambda outcome: (f"Done in {outcome.summary.get('total_seconds', 0.0):.1f} s; rows: "
                              f"{output_dir / RESULTS_FILE}, summary: {output_dir / SUMMARY_FILE}"))
    return 0


def _segment_nifti_case(pipe: SegmentationEnsemblePipeline, case: NiftiCase, args: argparse.Namespace
                        ) -> Dict[str, Any]:
    """One NIfTI case of :func:`run_segment`: segment it slice by slice and write its files atomically. Returns its
    row (outputs, size, figures)."""
    try:
        volume, reference = read_nifti_case(case)
    except (DataError, ImportError) as error:
        raise CLIError(str(error)) from error
    maps, figures = segment_volume(pipe, volume, args, name=case.name)
    written = write_files_atomically(args.output_dir, nifti_outputs(case, reference, maps, args.label_values))
    height, width, depth = volume.shape[:3]
    return {
        "outputs": [item.name for item in written],
        "width": int(width),
        "height": int(height),
        "slices": int(depth),
        "channels": int(volume.shape[3]),
        **figures,
    }


# ------------------------------------------------------------------------------------------------ entry point


def build_parser() -> argparse.ArgumentParser:
    """The ``diffusers-retina`` argument parser with all sub-commands."""
    from . import adapt, demo, features, measure_command, push, synthesize

    parser = argparse.ArgumentParser(
        prog="diffusers-retina",
        description="Diffusion models for retinal image analysis (Hugging Face diffusers pipelines).",
    )
    parser.add_argument("--version", action="version", version=f"diffusers-retina {diffusers_retina.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    build_segment_parser(subparsers)
    measure_command.build_measure_parser(subparsers)
    synthesize.build_synthesize_parser(subparsers)
    features.build_features_parser(subparsers)
    adapt.build_adapt_parser(subparsers)
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


if __name__ == "__main__":
    # `python -m diffusers_retina.cli` runs this file as `__main__`; delegate to the importable module so that
    # demo.py (which imports diffusers_retina.cli) and this entry point share one CLIError class.
    from diffusers_retina.cli import main as _package_main

    sys.exit(_package_main())
