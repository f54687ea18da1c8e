"""``diffusers-retina measure``: masks from any tool, segment-and-measure with intervals, units, resuming, bad input."""

import csv
import io
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from diffusers_retina import cli
from diffusers_retina.measures import MEASURE_NAMES

REPO = Path(__file__).resolve().parents[1]
ANCHORED = REPO / "checkpoints" / "segmentation-anchored-chase"


def photograph(path: Path, size=(120, 140), surround=True) -> Path:
    """A reddish disc on black (a field of view) or a flat image without a surround."""
    height, width = size
    yy, xx = np.mgrid[:height, :width]
    image = np.zeros((height, width, 3), np.uint8)
    inside = np.hypot(yy - height / 2, xx - width / 2) < min(size) / 2 - 4 if surround else np.ones_like(yy, bool)
    image[inside] = (170, 80, 40)
    PIL.Image.fromarray(image).save(path)
    return path


def tube_mask(path: Path, size=(120, 140), width=5, value=255) -> Path:
    mask = np.zeros(size, np.uint8)
    top = size[0] // 2 - width // 2
    mask[top:top + width, 30:110] = value
    PIL.Image.fromarray(mask).save(path)
    return path


def read_csv(path: Path):
    text = path.read_text()
    lines = text.splitlines()
    note = lines[0] if lines[0].startswith("#") else None
    body = "\n".join(lines[1:] if note else lines)
    return note, list(csv.DictReader(io.StringIO(body)))


def expect_error(argv, capsys, *needles):
    with pytest.raises(SystemExit) as raised:
        cli.main(argv)
    assert raised.value.code == 1
    error = capsys.readouterr().err
    for needle in needles:
        assert needle in error, error
    return error


def test_masks_from_any_tool_in_pixels_and_micrometres(tmp_path):
    masks, photos = tmp_path / "masks", tmp_path / "photos"
    masks.mkdir(), photos.mkdir()
    tube_mask(masks / "eye1_mask.png", width=5)
    tube_mask(masks / "eye2_mask.png", width=7, value=1)  # 0/1 masks are binary too
    photograph(photos / "eye1.png")
    photograph(photos / "eye2.png", surround=False)

    assert cli.main(["measure", "--masks", str(masks), "--mask-suffix", "_mask", str(photos),
                     "--output-dir", str(tmp_path / "px")]) == 0
    note, rows = read_csv(tmp_path / "px" / "measures.csv")
    assert note is not None and "values in pixels" in note
    assert [row["image"] for row in rows] == ["eye1", "eye2"]
    assert float(rows[0]["calibre_median"]) == pytest.approx(5.0, abs=0.25)
    assert float(rows[1]["calibre_median"]) == pytest.approx(7.0, abs=0.25)
    assert rows[0]["calibre_median_unit"] == "px" and rows[0]["pixel_size_um"] == ""
    assert rows[0]["field_of_view"] == "detected" and rows[1]["field_of_view"].startswith("whole image")
    assert rows[0]["members"] == "0" and rows[0]["calibre_median_low_90pct"] == ""
    assert set(f"{name}_unit" for name in MEASURE_NAMES) <= set(rows[0])

    assert cli.main(["measure", "--masks", str(masks), "--mask-suffix", "_mask", str(photos), "--pixel-size-um",
                     "10", "--output-dir", str(tmp_path / "um")]) == 0
    note, scaled = read_csv(tmp_path / "um" / "measures.csv")
    assert note is None
    assert scaled[0]["calibre_median_unit"] == "um" and float(scaled[0]["pixel_size_um"]) == 10.0
    assert float(scaled[0]["calibre_median"]) == pytest.approx(10 * float(rows[0]["calibre_median"]), rel=1e-4)
    assert float(scaled[0]["vessel_density"]) == pytest.approx(float(rows[0]["vessel_density"]), rel=1e-4)


def test_masks_without_photographs_use_the_whole_image(tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    tube_mask(masks / "a.png")
    assert cli.main(["measure", "--masks", str(masks), "--output-dir", str(tmp_path / "out")]) == 0
    _, rows = read_csv(tmp_path / "out" / "measures.csv")
    assert rows[0]["field_of_view"].startswith("whole image (no photograph given)")


@pytest.mark.parametrize("case", ["grey", "empty", "size", "no_images"])
def test_bad_masks_name_the_file_and_write_nothing(case, tmp_path, capsys):
    masks, photos = tmp_path / "masks", tmp_path / "photos"
    masks.mkdir(), photos.mkdir()
    tube_mask(masks / "good.png")
    photograph(photos / "good.png")
    if case == "grey":
        PIL.Image.fromarray(np.arange(120 * 140, dtype=np.uint32).reshape(120, 140).astype(np.uint8)).save(
            masks / "soft.png")
        needles = ["soft.png", "not binary"]
    elif case == "empty":
        PIL.Image.fromarray(np.zeros((120, 140), np.uint8)).save(masks / "blank.png")
        needles = ["blank.png", "empty"]
    elif case == "size":
        tube_mask(masks / "small.png", size=(60, 70))
        photograph(photos / "small.png")
        needles = ["small.png", "70x60", "140x120"]
    else:
        for path in masks.iterdir():
            path.unlink()
        (masks / "notes.txt").write_text("no masks")
        needles = [str(masks), "contains no images"]
    expect_error(["measure", "--masks", str(masks), str(photos), "--output-dir", str(tmp_path / "out")], capsys,
                 *needles)
    assert not (tmp_path / "out" / "measures.csv").exists()


def test_measure_needs_photographs_or_masks(tmp_path, capsys):
    expect_error(["measure", "--output-dir", str(tmp_path / "out")], capsys, "INPUT", "--masks")
    # one camera, one angle: the units' angle and the processing scale's angle must agree
    expect_error(["measure", "--output-dir", str(tmp_path / "out"), "--fov-degrees", "45", "--camera-degrees", "50",
                  str(tmp_path)], capsys, "--fov-degrees", "--camera-degrees")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_segment_and_measure_with_member_intervals_and_resume(tmp_path, capsys):
    """The anchored reference on two small photographs: each row has its members' interval around the mean; a
    rerun with one more photograph measures only that one and the CSV holds each photograph once."""
    from skimage.data import retina

    fundus = PIL.Image.fromarray(retina()[..., :3]).resize((128, 128), PIL.Image.LANCZOS)
    photos = tmp_path / "photos"
    photos.mkdir()
    fundus.save(photos / "a.png")
    output = tmp_path / "out"
    # native: a 128 px thumbnail would otherwise be segmented at the reference's 920 px scale (slow for a test)
    common = ["--output-dir", str(output), "--ensemble-size", "3", "--threads", "1", "--fov-degrees", "45",
              "--processing-resolution", "native"]
    assert cli.main(["measure", str(photos), *common]) == 0
    fundus.transpose(PIL.Image.FLIP_LEFT_RIGHT).save(photos / "b.png")
    capsys.readouterr()
    assert cli.main(["measure", str(photos), *common]) == 0
    assert "1 already done" in capsys.readouterr().out
    note, rows = read_csv(output / "measures.csv")
    assert note is None and [row["image"] for row in rows] == ["a", "b"]
    for row in rows:
        assert row["members"] == "3" and row["field_of_view"] == "detected"
        assert row["calibre_median_unit"] == "um" and float(row["pixel_size_um"]) > 0
        for name in ("vessel_density", "calibre_median", "fractal_dimension"):
            low, high = float(row[f"{name}_low_90pct"]), float(row[f"{name}_high_90pct"])
            assert low <= float(row[f"{name}_mean"]) <= high
        assert (output / "a_mask.png").is_file()
        expected = "calibrated" if (ANCHORED / "measure_intervals.json").is_file() else "raw member quantiles"
        assert row["interval"].startswith(expected)
