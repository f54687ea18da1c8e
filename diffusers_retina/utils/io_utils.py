"""File writing shared by the commands, the folder runner and the card writers: atomic writes and JSON.

Every output file either appears complete or not at all (:func:`write_files_atomically`); JSON never holds NaN
(:func:`json_safe`). This module imports nothing from the package.

Example:
    >>> from pathlib import Path
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> [p.name for p in write_files_atomically(folder, {"row.json": json_writer({"dice": float("nan")})})]
    ['row.json']
    >>> read_json(folder / "row.json")
    {'dice': None}
"""

from __future__ import annotations

import json
import math
import os
import shlex
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, IO, List, Optional, Tuple, Union

import PIL.Image

def fsync_directory(folder: Union[str, os.PathLike]) -> None:
    """Flush a folder's entries (a rename into it, a new file) to disk, where the platform allows it."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


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


def write_json(path: Union[str, os.PathLike], data: Dict[str, Any]) -> None:
    """Write ``data`` as sorted, indented JSON to ``path`` atomically (numpy scalars as floats), so that a crash never
    leaves half a file."""
    path = Path(path)
    text = json.dumps(data, indent=2, sort_keys=True, default=float) + "\n"
    write_files_atomically(path.parent, {path.name: lambda file: file.write(text.encode("utf-8"))})


def read_json(path: Union[str, os.PathLike]) -> Optional[Dict[str, Any]]:
    """The JSON object in ``path``, or ``None`` when there is no such file."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def command_line(argv: List[str]) -> str:
    """``argv`` as one shell-quoted command line (recorded in ``training_info.json``)."""
    return " ".join(shlex.quote(a) for a in argv)


__all__ = ["bytes_writer", "command_line", "json_safe", "json_writer", "png_writer", "read_json",
           "write_files_atomically", "write_json"]
