"""Helpers shared by the benchmark scripts in this folder (not part of the installed package).

Every script: argparse with ``--pipeline``, ``--output``, ``--seed``, ``--device`` (plus ``--dtype``, ``--threads``,
``--repeats``), a readable table on stdout and a JSON file recording the machine, versions, date and the exact
command line. Timings use ``time.perf_counter`` after one warm-up run and report the median of ``--repeats``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network (DESIGN §3)

import argparse
import datetime
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PIPELINE = "checkpoints/segmentation-ensemble-chase"
RESULTS = "benchmarks/results"

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}


# ------------------------------------------------------------------------------------------------ arguments


def base_parser(description: str, script: str) -> argparse.ArgumentParser:
    """Arguments common to every benchmark; ``script`` names the default ``benchmarks/results/<script>.json``."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pipeline", default=DEFAULT_PIPELINE,
                        help="Folder (or Hub id) of a SegmentationEnsemblePipeline.")
    parser.add_argument("--output", default=f"{RESULTS}/{script}.json", help="Where to write the JSON results.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampling generators.")
    parser.add_argument("--device", default="auto", help="'cpu', 'cuda', 'cuda:1', ... ('auto': cuda if available).")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="Weights and activations dtype (checkpoints are stored in float16; CPU wants float32).")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice).")
    parser.add_argument("--timestep-spacing", default=None, choices=["leading", "trailing", "linspace"],
                        help="Override the scheduler's timestep_spacing (default: the checkpoint's config).")
    return parser


def resolve_path(path: str) -> Path:
    """A relative path is taken from the current folder, else from the repository root (so defaults work anywhere)."""
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists():
        return candidate
    from_repo = REPO / candidate
    if from_repo.exists() or str(path).startswith(RESULTS):
        return from_repo
    return candidate


def setup(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads``; return the device of ``--device``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    load = _load_average()
    if load is not None and load >= 1.0:
        print(f"WARNING: the machine is busy (1-minute load average {load:.1f} on {os.cpu_count()} cores): timings "
              "will be inflated, and torch threads competing with another process for the cores can be 10-100x "
              "slower than on an idle machine (try --threads 1, or wait until the machine is idle).", flush=True)
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


# ------------------------------------------------------------------------------------------------ pipeline


def load_pipeline(path: str, device: torch.device, dtype: str = "float32"):
    """Load a ``SegmentationEnsemblePipeline`` (exits with a clear message when the folder does not exist)."""
    from diffusers_retina import SegmentationEnsemblePipeline

    folder = resolve_path(path)
    if not folder.is_dir():
        if str(path) == DEFAULT_PIPELINE or len(Path(path).parts) != 2:
            sys.exit(f"Pipeline folder '{path}' not found (the reference checkpoint is written by "
                     "training/train_segmentation_ensemble.py; pass --pipeline <folder>).")
        folder = Path(path)  # a Hub id "org/name", read from the local cache (HF_HUB_OFFLINE=1)
    elif not (folder / "model_index.json").is_file():
        sys.exit(f"'{folder}' holds no model_index.json: not a saved pipeline (yet? training writes it at the end).")
    pipe = SegmentationEnsemblePipeline.from_pretrained(str(folder), dtype=getattr(torch, dtype))
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_rows(specs: Sequence[str], device: torch.device, threshold: float):
    """The ``--diffusion LABEL=DIR@STEPS[,STEPS...]`` rows of the evaluation scripts: ``(label, path, pipe,
    threshold, steps)`` per step count, each pipeline loaded once; the threshold is the checkpoint's
    ``default_threshold`` when it stores one, else ``threshold``."""
    for spec in specs:
        label, rest = spec.split("=", 1)
        path, _, steps = rest.partition("@")
        pipe = load_pipeline(path, device)
        row_threshold = pipe.config.get("default_threshold") or threshold
        for step_count in [int(s) for s in (steps or "2").split(",")]:
            yield f"{label}, {step_count} step{'s' if step_count > 1 else ''}", path, pipe, row_threshold, step_count


def make_scheduler(name: str, config: Dict[str, Any], timestep_spacing: Optional[str] = None):
    """A diffusers scheduler by short name (``ddim``, ``ddpm``, ``dpm``, ``euler``), built from ``config``.

    ``timestep_spacing`` overrides the config's (a DDPM-trained config says "leading": DDIM at 2 steps then runs
    t = 500, 0; "trailing" gives t = 999, 499).
    """
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; choose from {sorted(SCHEDULERS)}.")
    overrides = {"timestep_spacing": timestep_spacing} if timestep_spacing else {}
    return getattr(diffusers, SCHEDULERS[name]).from_config(config, **overrides)


def load_pipeline_and_scheduler(args, device: torch.device):
    """``--pipeline`` in ``--dtype`` on ``device``, sampling with ``--scheduler`` (and ``--timestep-spacing``)."""
    pipe = load_pipeline(args.pipeline, device, args.dtype)
    pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config, args.timestep_spacing)
    return pipe


def generator(seed: int) -> torch.Generator:
    """A CPU generator: the pipeline splits it into one seeded generator per member on the execution device."""
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ data


def chase_root_or_exit() -> Path:
    """The CHASE_DB1 folder, or a clean exit (status 0) saying the benchmark is skipped."""
    from diffusers_retina.data import default_chase_db1_root

    root = default_chase_db1_root()
    if root is None:
        print("SKIPPED: CHASE_DB1 was not found (expected <repository>/../shared/data/chase_db1 or "
              "$DIFFUSERS_RETINA_DATA); nothing was measured and no JSON was written.")
        sys.exit(0)
    return root


def central_box(height: int, width: int, size: int) -> Tuple[int, int, int, int]:
    """``(top, left, crop_height, crop_width)`` of the central ``size`` x ``size`` crop (clamped to the image)."""
    crop_h, crop_w = min(size, height), min(size, width)
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def crop(array, box: Tuple[int, int, int, int]):
    """Crop the last two axes of a tensor or array."""
    top, left, crop_h, crop_w = box
    return array[..., top:top + crop_h, left:left + crop_w]


def test_crops(names: Sequence[str], size: int) -> List[Dict[str, Any]]:
    """Central ``size`` crops of CHASE_DB1 test images.

    Each is ``{"name", "image": (3, h, w) in [-1, 1], "mask": (h, w) long, "box"}``.
    """
    from diffusers_retina.data import chase_db1

    dataset = chase_db1(root=chase_root_or_exit(), split="test")
    stems = dataset.stems
    crops = []
    for name in names:
        if name not in stems:
            sys.exit(f"Unknown CHASE_DB1 test image {name!r}; choose from {stems}.")
        item = dataset[stems.index(name)]
        box = central_box(*item["mask"].shape, size) if size else (0, 0, *item["mask"].shape)
        crops.append({"name": name, "image": crop(item["image"], box), "mask": crop(item["mask"], box), "box": box})
    return crops


# ------------------------------------------------------------------------------------------------ timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], Any], device: torch.device) -> Tuple[float, Any]:
    """``(seconds, result)`` of one call, wall clock (``time.perf_counter``), device work included."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


def benchmark(function: Callable[[], Any], device: torch.device, repeats: int, warmup: bool = True
              ) -> Tuple[float, List[float], Any]:
    """One warm-up call (untimed), then ``repeats`` timed calls: ``(median seconds, all seconds, last result)``."""
    if warmup:
        function()
    times, result = [], None
    for _ in range(max(1, repeats)):
        seconds, result = timed(function, device)
        times.append(seconds)
    return statistics.median(times), times, result


# ------------------------------------------------------------------------------------------------ reporting


def _cpu_name() -> str:
    name = platform.processor()
    if name and name not in ("x86_64", "aarch64", "arm64", "i386"):
        return name
    try:  # platform.processor() is often just the architecture on Linux
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name or platform.machine()


def _load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


def machine_info(device: torch.device) -> Dict[str, Any]:
    import diffusers

    import diffusers_retina

    info = {
        "processor": platform.processor(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "diffusers": diffusers.__version__,
        "diffusers_retina": getattr(diffusers_retina, "__version__", "unknown"),
        "device": str(device),
        "load_average_1min": _load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def command(argv: Optional[List[str]] = None) -> str:
    """The exact command line, with the script path relative to the repository root when it lies inside it."""
    from diffusers_retina.hub import command_line

    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    try:
        argv[0] = str(script.relative_to(REPO))
    except ValueError:
        pass
    return command_line(["python"] + argv)


def merged_command(part_commands: Sequence[str]) -> str:
    """How a ``--merge`` result was made: its parts' commands run side by side, then this merge command."""
    return "\n".join([f"{part} &" for part in part_commands] + ["wait", command()])


def header(args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    """The common part of every result JSON."""
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command(),
        "machine": machine_info(device),
        "pipeline": str(args.pipeline),
        "seed": args.seed,
        "dtype": args.dtype,
        "timestep_spacing_override": getattr(args, "timestep_spacing", None),
    }


def finite_or_none(value: Any) -> Any:
    """Recursively replace NaN / inf floats by None so the JSON is strict (and numpy scalars by floats)."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_json(path: str, data: Dict[str, Any]) -> Path:
    """Write ``data`` (non-finite numbers as null) atomically; returns the path written."""
    from diffusers_retina.hub import write_json

    target = resolve_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json(target, finite_or_none(data))
    return target


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}"
    return str(value)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> None:
    """A plain fixed-width table."""
    cells = [[fmt(v, digits) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
