"""Sharded, resumable folder inference for ``diffusers-retina segment | synthesize | features``.

One mechanism for the three sub-commands, so that a folder of thousands of images scales from one CPU to a GPU
cluster and survives being stopped:

* **Sharding.** Under ``accelerate launch`` every process takes its share of the work with accelerate's
  ``PartialState().split_between_processes`` (a plain ``python``/console-script run is one process that does
  everything). Each process runs on its own device (``PartialState().device``) unless ``--device`` names one.
* **Resuming.** An input is *done* when ``results.jsonl`` (or a per-process file left by a stopped run) holds its
  row and every output file the row names exists -- outputs are renamed into place only once complete, so an
  existing file is a complete file. Done inputs are skipped; ``--overwrite`` redoes them. A folder written with other
  output-affecting settings (seed, steps, ...) is refused rather than mixed, unless ``--overwrite`` is given.
* **Rows as they finish.** Each process appends one JSON line per finished input to its own
  ``results.rank<r>.jsonl`` (one ``write`` of a whole line on an ``O_APPEND`` descriptor, then ``fsync``; a torn last
  line of a killed run is ignored). At the end the main process merges every rank file with the earlier rows into
  ``results.jsonl`` (atomically, in input order) and removes the rank files; a rerun merges any left behind first.
* **Status.** ``summary.json`` says ``running`` only while a run is in progress: the end of a run writes
  ``complete``, ``failed`` (with the error and the input it came from) or ``interrupted`` (Ctrl-C). A run killed
  outright cannot write anything; its summary says ``running`` until the rerun, which continues where it stopped.

Example (two GPUs, four images per pipeline call)::

    accelerate launch --num_processes 2 -m diffusers_retina.cli segment photos/ --output-dir out --image-batch-size 4
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Hashable, Iterable, List, Optional, Sequence

from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env

from .utils.io_utils import json_safe, json_writer, write_files_atomically

#: The merged per-input rows, one JSON object per line, in input order.
RESULTS_FILE = "results.jsonl"
#: The run's settings, status and counts (plus the rows of this run's inputs, for a quick look).
SUMMARY_FILE = "summary.json"
#: Settings that change how fast or where a run goes, not what it writes: they may differ between a run and its rerun.
NON_OUTPUT_SETTINGS = frozenset({"device", "threads", "batch_size", "image_batch_size", "num_processes",
                                 "diffusers_retina_version"})


def process_state() -> PartialState:
    """This process's accelerate ``PartialState``, on the CPU when ``ACCELERATE_USE_CPU`` is set (as
    ``accelerate launch --cpu`` and ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu`` do), as accelerate's own
    ``AcceleratorState`` reads it: without that flag a CPU-only launch would start processes that each think they
    are alone."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


class ShardedRunError(Exception):
    """A problem with the output folder or the run itself (the CLI turns it into a CLIError naming the file)."""


@dataclass
class WorkItem:
    """One input of a folder run.

    Attributes:
        name: the unique output key (a file stem); rows are matched to inputs by it.
        label: the input as the user named it (a path), for rows, progress lines and errors.
        payload: whatever the sub-command needs to process it (a path, a NIfTI case, a mask and its seed index).
        group: inputs with equal groups may share one pipeline call (e.g. the image size); ``None`` never batches.
    """

    name: str
    label: str
    payload: Any = None
    group: Optional[Hashable] = None


@dataclass
class RunOutcome:
    """What :meth:`ShardedFolderRun.execute` did, on every process."""

    summary: Dict[str, Any]
    errors: List[Dict[str, Any]] = field(default_factory=list)
    processed_here: int = 0


def make_batches(items: Sequence[WorkItem], size: int) -> List[List[WorkItem]]:
    """Batches of at most ``size`` items with equal :attr:`WorkItem.group` (first-appearance order of the groups,
    input order inside a group); items without a group form batches of one."""
    if size < 1:
        raise ValueError(f"The batch size must be a positive integer, got {size!r}.")
    batches: List[List[WorkItem]] = []
    open_batches: Dict[Hashable, List[WorkItem]] = {}
    for item in items:
        if item.group is None or size == 1:
            batches.append([item])
            continue
        batch = open_batches.get(item.group)
        if batch is None or len(batch) >= size:
            batch = []
            open_batches[item.group] = batch
            batches.append(batch)
        batch.append(item)
    return batches


def read_rows(path: Path) -> List[Dict[str, Any]]:
    """The JSON rows of a ``.jsonl`` file; a torn last line (a killed writer) and blank lines are ignored, a broken
    line elsewhere is a ShardedRunError naming the file and line."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        return []
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):  # no newline after it: the write of this line never finished
                continue
            raise ShardedRunError(f"'{path}' line {number} is not JSON ({error}); remove the line or use "
                                  "--overwrite.") from error
        if isinstance(row, dict) and isinstance(row.get("name"), str):
            rows.append(row)
    return rows


def append_row(path: Path, row: Dict[str, Any]) -> None:
    """Append ``row`` as one line with a single ``write`` on an ``O_APPEND`` descriptor, then ``fsync``: the line is
    in the file whole or (after a crash mid-write) torn at the end, which :func:`read_rows` ignores."""
    data = (json.dumps(row, allow_nan=False) + "\n").encode("utf-8")
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        view = memoryview(data)
        while view:
            written = os.write(descriptor, view)
            view = view[written:]
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class ShardedFolderRun:
    """Plan, shard, run and record one folder run of a sub-command (see the module docstring).

    Usage (every process of a launch runs the same code)::

        run = ShardedFolderRun(output_dir, "segment", settings, overwrite=args.overwrite)
        mine = run.plan(items)                 # reads only; this process's share of the inputs still to do
        run.agree(lambda: validate(mine))      # every process checks its inputs; any failure stops all of them
        run.start()                            # the first write: folder, merged leftovers, summary "running"
        outcome = run.execute(make_batches(mine, n), process_batch)

    Args:
        output_dir: the output folder (created by :meth:`start`).
        command: the sub-command's name, recorded in the summary.
        settings: the run's settings; the output-affecting ones must match those of rows that are skipped.
        overwrite: redo inputs that are already done.
        rows_key: the summary key listing this run's rows (``"images"`` for ``segment``).
        summary_extra: adds keys to the final summary from the rows of this run's inputs.
        state: accelerate's ``PartialState`` (default: :func:`process_state`).
    """

    def __init__(self, output_dir: Path, command: str, settings: Dict[str, Any], overwrite: bool = False,
                 rows_key: str = "images",
                 summary_extra: Optional[Callable[[List[Dict[str, Any]]], Dict[str, Any]]] = None,
                 state: Optional[PartialState] = None) -> None:
        self.output_dir = Path(output_dir)
        self.command = command
        self.settings = dict(settings)
        self.overwrite = overwrite
        self.rows_key = rows_key
        self.summary_extra = summary_extra
        self.state = state if state is not None else process_state()
        self.items: List[WorkItem] = []
        self.skipped: List[str] = []
        self.started = time.perf_counter()

    # ------------------------------------------------------------------ files
    @property
    def rank_file(self) -> Path:
        """This process's row file, ``results.rank<r>.jsonl``."""
        return self.output_dir / f"results.rank{self.state.process_index}.jsonl"

    def _rank_files(self) -> List[Path]:
        if not self.output_dir.is_dir():
            return []
        return sorted(self.output_dir.glob("results.rank*.jsonl"))

    def previous_rows(self) -> Dict[str, Dict[str, Any]]:
        """Rows of earlier runs by name: ``results.jsonl`` and rank files left by a stopped run (later rows win)."""
        rows: Dict[str, Dict[str, Any]] = {}
        for path in [self.output_dir / RESULTS_FILE, *self._rank_files()]:
            for row in read_rows(path):
                rows[row["name"]] = row
        return rows

    def _previous_settings(self) -> Optional[Dict[str, Any]]:
        path = self.output_dir / SUMMARY_FILE
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8")).get("settings")
        except (json.JSONDecodeError, AttributeError) as error:
            raise ShardedRunError(f"'{path}' is not a JSON summary ({error}); remove it or use --overwrite.") from error

    def is_done(self, row: Optional[Dict[str, Any]]) -> bool:
        """A row whose listed output files all exist (outputs are renamed into place only when complete)."""
        if row is None or not row.get("outputs"):
            return False
        return all((self.output_dir / name).is_file() for name in row["outputs"])

    # ------------------------------------------------------------------ phases
    def plan(self, items: Sequence[WorkItem]) -> List[WorkItem]:
        """Decide what is still to do (reads files only) and return this process's share of it.

        Raises:
            ShardedRunError: when inputs would be skipped whose outputs were made with other output-affecting
                settings, naming the settings that differ.
        """
        self.items = list(items)
        names = [item.name for item in self.items]
        if len(set(names)) != len(names):
            raise ShardedRunError("Two inputs share an output name; rename one of them.")
        done: List[str] = []
        if not self.overwrite:
            previous = self.previous_rows()
            done = [item.name for item in self.items if self.is_done(previous.get(item.name))]
        if done:
            before = self._previous_settings() or {}
            changed = sorted(key for key in set(before) | set(self.settings)
                             if key not in NON_OUTPUT_SETTINGS and before.get(key) != self.settings.get(key))
            if changed:
                detail = ", ".join(f"{key}: {before.get(key)!r} -> {self.settings.get(key)!r}" for key in changed)
                raise ShardedRunError(
                    f"--output-dir '{self.output_dir}' already holds {len(done)} finished output(s) made with other "
                    f"settings ({detail}); pass --overwrite to redo them, or choose another --output-dir.")
        self.skipped = done
        todo = [item for item in self.items if item.name not in set(done)]
        with self.state.split_between_processes(todo) as share:
            return list(share)

    def agree(self, check: Callable[[], None]) -> None:
        """Run ``check`` on every process and share the outcome: when any process's check raised, every process
        raises (the first error, as a ShardedRunError unless it already is an exception the caller reports), so
        that no process waits forever for one that stopped. Nothing has been written yet at this point."""
        error: Optional[BaseException] = None
        try:
            check()
        except Exception as caught:  # noqa: BLE001 -- reported on every process below
            error = caught
        messages = gather_object([None if error is None else (type(error).__name__, str(error))])
        failures = [message for message in messages if message is not None]
        if error is not None:
            raise error
        if failures:
            raise ShardedRunError(f"Another process stopped before writing anything: {failures[0][1]}")

    def start(self) -> None:
        """The first write: create the folder; on the main process merge rows left by a stopped run (or drop the
        redone ones with ``overwrite``) and write ``summary.json`` with status ``running``; then wait for all."""
        if self.state.is_main_process:
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise ShardedRunError(f"--output-dir '{self.output_dir}' cannot be created: {error}") from error
            self._merge(drop=set() if not self.overwrite else {item.name for item in self.items})
            self._write_summary("running")
        self.state.wait_for_everyone()

    def execute(self, batches: Iterable[List[WorkItem]],
                process_batch: Callable[[List[WorkItem]], List[Dict[str, Any]]],
                describe: Optional[Callable[[Dict[str, Any]], str]] = None) -> RunOutcome:
        """Run ``process_batch`` on each batch of this process's share, appending each returned row (one per item, in
        order; its ``outputs`` list the files written) to the rank file as it finishes. The first failure stops this
        process; then every process meets, the main process merges the rows and writes the final summary
        (``complete``/``failed``), and every process gets the errors of all. Ctrl-C writes ``interrupted``.
        """
        batches = list(batches)
        total = sum(len(batch) for batch in batches)
        prefix = f"[rank {self.state.process_index}] " if self.state.num_processes > 1 else ""
        error: Optional[Dict[str, Any]] = None
        count = 0
        try:
            for batch in batches:
                batch_started = time.perf_counter()
                try:
                    rows = process_batch(batch)
                except Exception as caught:  # noqa: BLE001 -- recorded in the summary and re-raised by the caller
                    label = batch[0].label if len(batch) == 1 else ", ".join(item.label for item in batch)
                    error = {"input": label, "message": str(caught), "type": type(caught).__name__,
                             "rank": self.state.process_index, "exception": caught}
                    break
                seconds = (time.perf_counter() - batch_started) / len(batch)
                for item, row in zip(batch, rows):
                    count += 1
                    row = {"name": item.name, "input": item.label, **row, "rank": self.state.process_index}
                    row.setdefault("seconds", round(seconds, 3))
                    append_row(self.rank_file, row)
                    detail = f": {describe(row)}" if describe is not None else ""
                    print(f"{prefix}[{count}/{total}] {item.label}{detail}", flush=True)
        except KeyboardInterrupt:
            if self.state.is_main_process:  # the others may be gone: no barrier, leave their rank files for a rerun
                self._merge(drop=set())
                self._write_summary("interrupted")
            raise
        shared = None if error is None else {k: v for k, v in error.items() if k != "exception"}
        errors = [e for e in gather_object([shared]) if e is not None]
        self.state.wait_for_everyone()
        summary: Dict[str, Any] = {}
        if self.state.is_main_process:
            self._merge(drop=set())
            summary = self._write_summary("failed" if errors else "complete", errors[0] if errors else None)
        self.state.wait_for_everyone()
        if not self.state.is_main_process:
            summary = self._read_summary()
        outcome = RunOutcome(summary=summary, errors=errors, processed_here=count)
        if error is not None:
            outcome.errors = [dict(error)] + [e for e in errors if e != shared]
        return outcome

    # ------------------------------------------------------------------ main-process helpers
    def _merge(self, drop: set) -> List[Dict[str, Any]]:
        """Join ``results.jsonl`` and every rank file into ``results.jsonl`` (rows of this run's inputs in input
        order, then rows of other inputs), written atomically; then remove the rank files. ``drop``: names whose
        old rows are discarded (``--overwrite``)."""
        rows = {name: row for name, row in self.previous_rows().items() if name not in drop}
        order = {item.name: index for index, item in enumerate(self.items)}
        merged = sorted(rows.values(), key=lambda row: (order.get(row["name"], len(order)), row["name"]))
        text = "".join(json.dumps(json_safe(row), allow_nan=False) + "\n" for row in merged)
        write_files_atomically(self.output_dir, {RESULTS_FILE: lambda file: file.write(text.encode("utf-8"))})
        for path in self._rank_files():
            path.unlink()
        return merged

    def _write_summary(self, status: str, error: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        rows = {row["name"]: row for row in read_rows(self.output_dir / RESULTS_FILE)}
        current = [rows[item.name] for item in self.items if item.name in rows]
        summary: Dict[str, Any] = {
            "command": self.command,
            "settings": self.settings,
            "status": status,
            "num_processes": self.state.num_processes,
            "inputs": len(self.items),
            "skipped": len(self.skipped),
            "done": sum(1 for row in current if self.is_done(row)),
            "results": RESULTS_FILE,
            self.rows_key: current,
            "total_seconds": round(time.perf_counter() - self.started, 3),
        }
        if self.summary_extra is not None:
            summary.update(self.summary_extra(current))
        if error is not None:
            summary["error"] = error
        write_files_atomically(self.output_dir, {SUMMARY_FILE: json_writer(summary)})
        return summary

    def _read_summary(self) -> Dict[str, Any]:
        try:
            return json.loads((self.output_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}
