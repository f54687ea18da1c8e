#!/usr/bin/env python
"""Turn a CHASE_DB1-style folder into a Hugging Face ``datasets`` dataset, saved with ``save_to_disk``.

Input: ``DATA_DIR/images/<stem>.<ext>`` and one folder per annotation, ``DATA_DIR/<observer>/<stem><suffix>.png``
(CHASE_DB1: ``1stHO/Image_01L_1stHO.png`` and ``2ndHO/Image_01L_2ndHO.png``). Output: a ``DatasetDict`` with one
split per ``--split NAME=PATTERNS`` (glob patterns on the stem; default one ``train`` split with every image) and the
columns ``name`` (the stem), ``image`` and ``mask_<observer>`` for each observer (``datasets.Image()``: the files'
own bytes, so nothing is re-encoded and the dataset is self-contained). The dataset's ``info`` carries the licence,
citation and homepage read from the folder's PROVENANCE/LICENSE files (or ``--license``/``--citation``), which the
training scripts copy into ``training_info.json`` and the model cards.

Example (CHASE_DB1 with its usual split, then training on it)::

    python training/make_hf_dataset.py --data_dir ../shared/data/chase_db1 --output_dir data/chase_db1_hf \\
        --split "train=Image_0*,Image_10*" --split "test=Image_1[1-4]*"
    python training/train_segmentation_ensemble.py --dataset_name data/chase_db1_hf --mask_column mask_1stHO \\
        --validation_split test --validation_stems Image_11L --output_dir runs/seg-hf ...

Rows are written split by split through ``Dataset.from_generator`` (Arrow files on disk), so memory stays flat
whatever the number of images.
"""

from __future__ import annotations

import argparse
import fnmatch
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, required=True, help="the folder holding images/ and the mask folders")
    parser.add_argument("--output_dir", type=Path, required=True, help="where save_to_disk writes the dataset")
    parser.add_argument("--image_dir", default="images", help="image folder inside --data_dir (default: images)")
    parser.add_argument("--masks", default=None, metavar="FOLDER[:SUFFIX],...",
                        help="mask folders inside --data_dir, each with the suffix its file stems carry (default: "
                        "every other folder whose files are named <image stem><suffix>, the suffix '_<folder>' when "
                        "they carry it, as CHASE_DB1's 1stHO/Image_01L_1stHO.png)")
    parser.add_argument("--split", action="append", default=None, metavar="NAME=PATTERNS",
                        help="a split and the comma-separated glob patterns of its stems; repeat for more splits "
                        "(default: one 'train' split with every image). A stem in no split is left out; a stem in two "
                        "splits is an error")
    parser.add_argument("--license", default=None, help="licence of the data (default: read from PROVENANCE/LICENSE)")
    parser.add_argument("--citation", default=None, help="citation of the data (default: read from PROVENANCE)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")
    args = parser.parse_args(argv)
    if not args.data_dir.is_dir():
        parser.error(f"--data_dir {args.data_dir}: no such folder.")
    if not (args.data_dir / args.image_dir).is_dir():
        parser.error(f"--data_dir {args.data_dir} has no {args.image_dir}/ folder (--image_dir).")
    if args.output_dir.exists() and not args.overwrite:
        parser.error(f"--output_dir {args.output_dir} exists; pass --overwrite to replace it.")
    try:
        args.splits = parse_splits(args.split)
    except ValueError as error:
        parser.error(str(error))
    return args


def parse_splits(values: Optional[Sequence[str]]) -> List[Tuple[str, List[str]]]:
    """``["train=Image_0*,Image_10*", "test=Image_1[1-4]*"]`` -> ``[("train", [...]), ("test", [...])]``."""
    if not values:
        return [("train", ["*"])]
    splits = []
    for value in values:
        name, _, patterns = value.partition("=")
        globs = [pattern.strip() for pattern in patterns.split(",") if pattern.strip()]
        if not name.strip() or not globs:
            raise ValueError(f"--split {value!r}: expected NAME=PATTERNS, e.g. train=Image_0*,Image_10*.")
        if name.strip() in {existing for existing, _ in splits}:
            raise ValueError(f"--split {name.strip()!r} is given twice.")
        splits.append((name.strip(), globs))
    return splits


def image_files(folder: Path) -> Dict[str, Path]:
    """``{stem: path}`` of the images in ``folder``, sorted by stem."""
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    return {path.stem: path for path in files}


def find_masks(data_dir: Path, image_dir: str, stems: Sequence[str], spec: Optional[str]) -> Dict[str, Dict[str, Path]]:
    """``{observer: {stem: mask path}}`` for the ``--masks`` folders (or every folder that pairs with the images).

    Raises:
        ValueError: naming the folder and the first image without a mask in it.
    """
    if spec:
        entries = []
        for item in spec.split(","):
            folder, _, suffix = item.strip().partition(":")
            entries.append((folder, suffix if _ else None))
    else:
        entries = [(child.name, None) for child in sorted(data_dir.iterdir())
                   if child.is_dir() and child.name != image_dir and not child.name.startswith(".")]
    masks: Dict[str, Dict[str, Path]] = {}
    for folder, suffix in entries:
        path = data_dir / folder
        if not path.is_dir():
            raise ValueError(f"--masks: {path} is not a folder.")
        files = image_files(path)
        candidates = [suffix] if suffix is not None else [f"_{folder}", ""]
        for candidate in candidates:
            found = {stem: files.get(f"{stem}{candidate}") for stem in stems}
            if all(found.values()):
                masks[folder] = found
                break
        else:
            if spec:  # asked for: every image needs its mask
                suffix_text = candidates[0] if candidates else ""
                missing = next(stem for stem in stems if f"{stem}{suffix_text}" not in files)
                raise ValueError(f"--masks: {path} has no mask for image '{missing}' (looked for "
                                 f"'{missing}{suffix_text}.*').")
    if not masks:
        raise ValueError(f"No mask folder in {data_dir} pairs with every image of {image_dir}/ (give --masks).")
    return masks


def assign_splits(stems: Sequence[str], splits: Sequence[Tuple[str, List[str]]]) -> Dict[str, List[str]]:
    """``{split: [stems]}``; a stem matching two splits is a ValueError, one matching none is left out."""
    assigned: Dict[str, List[str]] = {name: [] for name, _ in splits}
    for stem in stems:
        hits = [name for name, globs in splits if any(fnmatch.fnmatch(stem, g) for g in globs)]
        if len(hits) > 1:
            raise ValueError(f"Image '{stem}' matches the splits {hits}; make the --split patterns disjoint.")
        if hits:
            assigned[hits[0]].append(stem)
    empty = [name for name, rows in assigned.items() if not rows]
    if empty:
        raise ValueError(f"--split {empty[0]!r} matches no image stem (e.g. {list(stems)[:3]}).")
    return assigned


def dataset_info(data_dir: Path, license_text: Optional[str], citation: Optional[str]):
    """A ``datasets.DatasetInfo`` with the licence, citation and homepage of the folder's provenance files."""
    import datasets

    from diffusers_retina.hub import dataset_provenance

    record = dataset_provenance({"train_data_dir": str(data_dir)})
    return datasets.DatasetInfo(
        dataset_name=record.get("name"),
        description=f"Built by diffusers-retina's training/make_hf_dataset.py from {data_dir.resolve().name}.",
        license=license_text or record.get("license_text") or record.get("license") or "",
        citation=citation or record.get("attribution") or "",
        homepage=record.get("homepage") or "",
    )


def build(args: argparse.Namespace):
    """Build the ``DatasetDict`` (rows streamed to Arrow files in a temporary cache) and save it to
    ``--output_dir``. Returns the loaded-from-disk result."""
    import datasets

    images = image_files(args.data_dir / args.image_dir)
    if not images:
        raise ValueError(f"{args.data_dir / args.image_dir} holds no images.")
    stems = list(images)
    masks = find_masks(args.data_dir, args.image_dir, stems, args.masks)
    assigned = assign_splits(stems, args.splits)
    features = datasets.Features({"name": datasets.Value("string"), "image": datasets.Image(),
                                  **{f"mask_{observer}": datasets.Image() for observer in masks}})
    info = dataset_info(args.data_dir, args.license, args.citation)

    def rows(split_stems: List[str]) -> Iterator[dict]:
        for stem in split_stems:
            row = {"name": stem, "image": {"bytes": images[stem].read_bytes(), "path": images[stem].name}}
            for observer, files in masks.items():
                row[f"mask_{observer}"] = {"bytes": files[stem].read_bytes(), "path": files[stem].name}
            yield row

    cache = tempfile.mkdtemp(prefix="make_hf_dataset_")
    try:
        parts = {}
        for split, split_stems in assigned.items():
            part = datasets.Dataset.from_generator(rows, gen_kwargs={"split_stems": split_stems}, features=features,
                                                   cache_dir=cache, split=datasets.NamedSplit(split))
            part.info.update(info)
            parts[split] = part
        dataset = datasets.DatasetDict(parts)
        if args.output_dir.exists():
            shutil.rmtree(args.output_dir)
        dataset.save_to_disk(str(args.output_dir))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return datasets.load_from_disk(str(args.output_dir))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        dataset = build(args)
    except ValueError as error:
        print(f"make_hf_dataset.py: error: {error}", file=sys.stderr)
        return 2
    for split, part in dataset.items():
        print(f"{split}: {len(part)} rows, columns {part.column_names}")
    first = next(iter(dataset.values()))
    print(f"licence: {first.info.license or 'not recorded'}; saved to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
