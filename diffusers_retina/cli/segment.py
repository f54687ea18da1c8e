"""``diffusers-retina segment``: vessel segmentation with an ensemble of diffusion samples.

A fused mask plus probability and uncertainty maps (entropy, variance, mutual information) per image, one row per
image in ``results.jsonl`` and a ``summary.json``. NIfTI inputs (MRI such as BraTS: a 2-D slice, or a 3-D volume
segmented slice by slice; modalities as a 4-D file, as several files joined by commas, or as case folders with
``--modalities``) give NIfTI outputs with the input's affine and header.

Example::

    diffusers-retina segment fundus.png photos/ --output-dir results --ensemble-size 5 --steps 2
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Callable, Dict, IO, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch

import diffusers_retina
from diffusers_retina.data import (
    DataError,
    NiftiCase,
    find_modality_file,
    is_nifti_file,
    nifti_bytes_like,
    nifti_case,
    read_nifti_case,
)
from diffusers_retina.image_processing import transform_name
from diffusers_retina.pipelines import SegmentationEnsemblePipeline
from diffusers_retina.pipelines.sampling import per_sample_generators
from diffusers_retina.sharded_inference import RESULTS_FILE, SUMMARY_FILE, WorkItem
from diffusers_retina.utils.io_utils import bytes_writer, png_writer, write_files_atomically

from .common import (
    FUSIONS,
    CLIError,
    add_folder_run_arguments,
    add_pipeline_arguments,
    apply_threads,
    check_output_dir,
    check_pipeline_settings,
    collect_inputs,
    image_group,
    IMAGE_EXTENSIONS,
    load_pipeline,
    open_unit_float,
    overlap_fraction,
    pipeline_call_kwargs,
    read_input_image,
    resolve_device,
    resolve_steps,
    run_folder_command,
)
from .processing import processing_note

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


#: The ``segment`` command's one-line help and its description (``--help``).
HELP = "segment vessels in fundus images with a diffusion ensemble"
DESCRIPTION = (
    "Segment each INPUT image with an ensemble of diffusion samples. Writes <stem>_mask.png "
    "(0/255), <stem>_probability.png, <stem>_entropy.png, <stem>_variance.png, "
    "<stem>_mutual_information.png (8-bit maps: probability 0..1, entropy and mutual information 0..ln K, "
    "variance 0..0.25), optionally <stem>_member<k>.png, and summary.json to --output-dir. Files are written "
    "atomically: an interrupted run leaves only complete files."
)


def build_segment_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """The ``segment`` sub-command's arguments."""
    parser = subparsers.add_parser("segment", help=HELP, description=DESCRIPTION)
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
        "processing_resolution": args.processing_resolution,
        "camera_degrees": args.camera_degrees,
        "input_transform": transform_name(pipe.config.get("input_transform")),
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
        generator=generators,
        **pipeline_call_kwargs(args),
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
            **result.processing[index].as_record(),
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
            generator=torch.Generator().manual_seed(args.seed),
            **pipeline_call_kwargs(args),
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
        size = "x".join(str(row[key]) for key in ("height", "width", "slices") if key in row) + processing_note(row)
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

