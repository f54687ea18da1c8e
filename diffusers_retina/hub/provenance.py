"""Where training data comes from and under which licence, as model cards record it.

:func:`dataset_provenance` reads the licence, attribution and homepage of a training run's data from the data source
itself (provenance or licence files beside an image folder, or a ``datasets`` dataset's metadata), never from its
path's name; :func:`data_description` turns the record into the card's training-data paragraph.
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import yaml

#: Files of a data folder (or of the folder above it) that say where the data comes from and under which licence,
#: read in this order; the first that names a licence wins (``README.md`` is read for its YAML front-matter only, as
#: in a Hugging Face dataset card).
PROVENANCE_FILES = ("PROVENANCE.md", "PROVENANCE.txt", "README.md", "LICENSE.txt", "LICENSE.md", "LICENSE")

#: Licence phrases and the Hub's licence identifiers (https://huggingface.co/docs/hub/repositories-licenses).
_LICENSE_PATTERNS = (
    (r"\bCC[ -]?BY[ -]NC[ -]SA[ -]?(\d\.\d)", "cc-by-nc-sa-{}"),
    (r"\bCC[ -]?BY[ -]NC[ -]ND[ -]?(\d\.\d)", "cc-by-nc-nd-{}"),
    (r"\bCC[ -]?BY[ -]NC[ -]?(\d\.\d)", "cc-by-nc-{}"),
    (r"\bCC[ -]?BY[ -]SA[ -]?(\d\.\d)", "cc-by-sa-{}"),
    (r"\bCC[ -]?BY[ -]ND[ -]?(\d\.\d)", "cc-by-nd-{}"),
    (r"\bCC[ -]?BY[ -]?(\d\.\d)", "cc-by-{}"),
    (r"Creative Commons Attribution[- ]NonCommercial[- ]ShareAlike (\d\.\d)", "cc-by-nc-sa-{}"),
    (r"Creative Commons Attribution[- ]NonCommercial (\d\.\d)", "cc-by-nc-{}"),
    (r"Creative Commons Attribution[- ]ShareAlike (\d\.\d)", "cc-by-sa-{}"),
    (r"Creative Commons Attribution (\d\.\d)", "cc-by-{}"),
    (r"\bCC0\b", "cc0-1.0"),
    (r"\bApache(?: License)?,? (?:Version )?2\.0", "apache-2.0"),
    (r"\bMIT License\b", "mit"),
    (r"\bODbL\b", "odbl"),
)


def license_id(text: Optional[str]) -> Optional[str]:
    """The Hub licence identifier a licence phrase names (``"CC BY 4.0"`` -> ``"cc-by-4.0"``), a Hub identifier as
    is (``"cc-by-4.0"``), or None when ``text`` names none.

    Example:
        >>> license_id("Licensed under the Creative Commons Attribution 4.0 International licence (CC BY 4.0)")
        'cc-by-4.0'
    """
    if not text:
        return None
    stripped = text.strip()
    if re.fullmatch(r"[a-z0-9][a-z0-9.\-]*", stripped):  # already an identifier (cc-by-4.0, apache-2.0, other)
        return stripped
    for pattern, template in _LICENSE_PATTERNS:
        match = re.search(pattern, text, flags=re.IGNORECASE)
        if match:
            return template.format(*match.groups())
    return None


def _front_matter(text: str) -> Dict[str, Any]:
    """The YAML front-matter of a markdown file (a Hugging Face dataset card), or ``{}``."""
    match = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, flags=re.DOTALL)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except Exception:  # noqa: BLE001 -- a broken front-matter is no provenance
        return {}
    return data if isinstance(data, dict) else {}


def _attribution(text: str) -> Optional[str]:
    """The citation a provenance text asks for: the lines after one that says "cite" (until a blank line or a line
    that is not indented), joined; else None."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if re.search(r"\bcite\b", line, flags=re.IGNORECASE):
            block = []
            for following in lines[index + 1:]:
                if not following.strip() or not following.startswith((" ", "\t")):
                    break
                block.append(following.strip())
            if block:
                return " ".join(block)
    return None


def read_provenance_file(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """What a provenance or licence file says: ``name`` (its first heading's first word, or a ``Dataset:`` line),
    ``license`` (Hub identifier), ``license_text`` (the phrase as written), ``attribution`` (the citation asked for),
    ``homepage`` (the first URL); keys it does not give are left out. A ``README.md`` counts only through its YAML
    front-matter (``license``, ``pretty_name``, ``citation``/``attribution``, ``homepage``)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    record: Dict[str, Any] = {}
    if path.name.lower() == "readme.md":
        meta = _front_matter(text)
        for key, target in (("pretty_name", "name"), ("license", "license_text"), ("citation", "attribution"),
                            ("attribution", "attribution"), ("homepage", "homepage")):
            value = meta.get(key)
            if isinstance(value, list):
                value = value[0] if value else None
            if value and target not in record:
                record[target] = str(value).strip()
        if "license_text" in record:
            record["license"] = license_id(record["license_text"])
        return {key: value for key, value in record.items() if value}
    heading = re.search(r"^#\s*([\w.\-]+)", text, flags=re.MULTILINE)
    dataset_line = re.search(r"^Dataset:\s*([\w.\-]+)", text, flags=re.MULTILINE)
    if heading or dataset_line:
        record["name"] = (heading or dataset_line).group(1)
    licence_line = re.search(r"^Licen[cs]e[d]?:?\s*(.+)$", text, flags=re.MULTILINE | re.IGNORECASE)
    identifier = license_id(licence_line.group(1) if licence_line else None) or license_id(text)
    if identifier:
        record["license"] = identifier
        phrase = re.search(r"\bCC[ -]?BY[\w .\-]*?\d\.\d|\bCC0\b|Apache[\w ,]*2\.0|\bMIT\b", text)
        record["license_text"] = phrase.group(0).strip() if phrase else identifier
    attribution = _attribution(text)
    if attribution:
        record["attribution"] = attribution
    url = re.search(r"https?://[^\s)>\]]+", text)
    if url:
        record["homepage"] = url.group(0).rstrip(".,;")
    return record


def _data_root(args: Dict[str, Any]) -> Optional[Path]:
    folder = args.get("train_data_dir")
    return Path(folder).expanduser() if folder else None


def _provenance_from_folder(root: Path) -> Dict[str, Any]:
    """Merge the provenance files of ``root`` and of the folder above it (a prepared copy inside the dataset folder):
    the first file that gives a key wins; ``source`` lists the files read."""
    record: Dict[str, Any] = {}
    sources: List[str] = []
    for folder in (root, root.parent):
        for name in PROVENANCE_FILES:
            path = folder / name
            if not path.is_file():
                continue
            found = read_provenance_file(path)
            if not found:
                continue
            sources.append(str(path.resolve()))
            for key, value in found.items():
                record.setdefault(key, value)
        if record.get("license"):
            break
    if sources:
        record["source"] = sources
    return record


def _provenance_from_datasets(name: str, config: Optional[str] = None) -> Dict[str, Any]:
    """Licence, citation and homepage of a ``datasets`` dataset from its metadata only (no image is decoded): a folder
    written by ``save_to_disk`` (its ``dataset_info.json``/``state``) or a Hub dataset's builder info."""
    record: Dict[str, Any] = {"name": name}
    info: Any = None
    try:
        if Path(name).expanduser().is_dir():
            import datasets

            loaded = datasets.load_from_disk(str(Path(name).expanduser()))
            first = next(iter(loaded.values())) if isinstance(loaded, datasets.DatasetDict) else loaded
            info = first.info
            record["name"] = info.dataset_name or Path(name).name
        else:
            from datasets import load_dataset_builder

            info = load_dataset_builder(name, config).info
    except Exception:  # noqa: BLE001 -- no metadata: the record says so
        info = None
    if info is not None:
        if info.license:
            record["license_text"] = info.license
            record["license"] = license_id(info.license)
        if info.citation:
            record["attribution"] = info.citation.strip()
        if info.homepage:
            record["homepage"] = info.homepage
    record["source"] = [f"datasets:{name}"]
    return {key: value for key, value in record.items() if value}


def dataset_provenance(args: Dict[str, Any]) -> Dict[str, Any]:
    """The training data's provenance, as ``training_info.json`` records it under ``"dataset"``.

    From the data source, never from its path's name: ``--dataset_license`` / ``--dataset_attribution`` /
    ``--dataset_id`` when given (they win), then the provenance or licence files of ``--train_data_dir`` (or of the
    folder above it; :data:`PROVENANCE_FILES`), or the metadata of the ``--dataset_name`` dataset. Also what was used:
    ``train_stems`` (the image stems selected by ``--train_stems``, or all), ``validation_stems`` and the mask folder.

    Returns:
        ``{"name", "license", "license_text", "attribution", "homepage", "source", "train_images", ...}`` with the keys
        that are known; ``license`` is None when no source names one.

    Example:
        >>> dataset_provenance({"train_data_dir": "../shared/data/chase_db1", "mask_dir": "1stHO"})["license"]  # doctest: +SKIP
        'cc-by-4.0'
    """
    record: Dict[str, Any] = {}
    if args.get("dataset_name"):
        record = _provenance_from_datasets(str(args["dataset_name"]), args.get("dataset_config_name"))
    else:
        root = _data_root(args)
        if root is not None and root.is_dir():
            record = _provenance_from_folder(root)
            record.setdefault("name", root.resolve().name)
            stems = _selected_stems(root, args)
            if stems is not None:
                record["train_images"] = stems
            if args.get("mask_dir"):
                record["mask_dir"] = args["mask_dir"]
            if args.get("validation_stems"):
                record["validation_stems"] = args["validation_stems"]
    if args.get("dataset_id"):
        record["name"] = args["dataset_id"]
    if args.get("dataset_license"):
        record["license_text"] = args["dataset_license"]
        record["license"] = license_id(args["dataset_license"]) or "other"
        record["source"] = ["--dataset_license"] + list(record.get("source", []))
    if args.get("dataset_attribution"):
        record["attribution"] = args["dataset_attribution"]
    record.setdefault("license", None)
    return record


def _selected_stems(root: Path, args: Dict[str, Any]) -> Optional[List[str]]:
    """The image stems ``--train_stems`` selects under ``root/--image_dir`` (all when not given); None if unknown.
    The feature head's ``train_stems`` is a plain list of stems and is returned as given."""
    folder = root / (args.get("image_dir") or "images")
    if not folder.is_dir():
        return None
    suffix = args.get("image_suffix") or ""
    stems = sorted(p.stem[: len(p.stem) - len(suffix)] if suffix else p.stem
                   for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    patterns = args.get("train_stems")
    if not patterns:
        return stems
    return [s for s in stems if any(fnmatch.fnmatch(s, pat.strip()) for pat in str(patterns).split(","))]


def dataset_record(info: Dict[str, Any]) -> Dict[str, Any]:
    """The ``"dataset"`` record of a ``training_info.json``; for records written before it existed, read from the
    data source now (:func:`dataset_provenance`)."""
    recorded = info.get("dataset")
    if isinstance(recorded, dict):
        return recorded
    return dataset_provenance(info.get("args", {}))


def stem_range(stems: Sequence[str]) -> str:
    return stems[0] if len(stems) == 1 else f"{stems[0]}–{stems[-1]}"


def data_description(record: Dict[str, Any], args: Dict[str, Any]) -> str:
    """The card's training-data paragraph, from the dataset record: name and link, licence as written, what was used
    (image count and range, mask folder, validation images) and the attribution the data asks for."""
    name = record.get("name") or args.get("train_data_dir") or args.get("dataset_name") or "the training data"
    text = f"[{name}]({record['homepage']})" if record.get("homepage") else f"`{name}`"
    if record.get("license"):
        text += f", licensed **{record.get('license_text') or record['license']}**."
    else:
        text += (": its licence was not recorded (no provenance or licence file beside the data, no "
                 "`--dataset_license`); check it before reusing these weights.")
    stems = record.get("train_images")
    if stems:
        text += f" Training used {len(stems)} image(s) ({stem_range(stems)})"
        text += f" with the masks in `{record['mask_dir']}`." if record.get("mask_dir") else "."
    if record.get("validation_stems"):
        text += f" Validation (monitoring only): `{record['validation_stems']}`."
    if record.get("attribution"):
        text += f" Cite: {record['attribution']}"
    return text


def data_scope(record: Dict[str, Any]) -> str:
    """``"20 images of one dataset (CHASE_DB1)"``, for the cards' limitations."""
    stems = record.get("train_images")
    count = f"{len(stems)} images" if stems else "the images"
    return f"{count} of one dataset ({record.get('name') or 'see Training data'})"
