"""What ``diffusers-retina measure`` adds to segmentation: measuring the fused mask and every member, per photograph.

Runs the ``measure`` command (the default residual-anchored pipeline, E = 5) on the 8 CHASE_DB1 test photographs at
full resolution and reads each row's ``segment_seconds`` (the pipeline call) and ``measure_seconds`` (field of view
and the measures of the fused mask and the 5 members); the overhead is their ratio, summed over the photographs.

    python benchmarks/measure_overhead.py --threads 1
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from diffusers_retina import cli  # noqa: E402
from diffusers_retina.data import CHASE_DB1_TEST  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ensemble-size", type=int, default=5)
    parser.add_argument("--output", default="benchmarks/results/measure_overhead.json")
    args = parser.parse_args(argv)
    root = _common.chase_root_or_exit()
    with tempfile.TemporaryDirectory() as work:
        photos = Path(work) / "photos"
        photos.mkdir()
        for stem in CHASE_DB1_TEST:
            (photos / f"{stem}.jpg").symlink_to((root / "images" / f"{stem}.jpg").resolve())
        output = Path(work) / "out"
        cli.main(["measure", str(photos), "--output-dir", str(output), "--threads", str(args.threads),
                  "--ensemble-size", str(args.ensemble_size), "--fov-degrees", "30"])
        rows = [json.loads(line) for line in (output / "results.jsonl").read_text().splitlines()]
    segment = sum(row["segment_seconds"] for row in rows)
    measure = sum(row["measure_seconds"] for row in rows)
    result = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": _common.command(),
        "machine": _common.machine_info(torch.device("cpu")),
        "photographs": len(rows),
        "segment_seconds": segment,
        "measure_seconds": measure,
        "overhead": measure / segment,
        "per_image": [{"image": row["name"], "segment_seconds": row["segment_seconds"],
                       "measure_seconds": row["measure_seconds"]} for row in rows],
    }
    _common.save_json(args.output, result)
    print(f"{len(rows)} photographs: segmentation {segment:.1f} s, measures {measure:.1f} s, overhead "
          f"{measure / segment:.1%} -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
