"""``diffusers-retina adapt``: target-modality images in, the adapted segmenter's masks and probabilities out."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest

from diffusers_retina import AdaptDiffPipeline, cli

from testing_utils import tiny_adaptdiff


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapt") / "pipe"
    tiny_adaptdiff().save_pretrained(folder)
    return folder


def write_images(folder, count=2, size=(20, 28)):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        PIL.Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(folder / f"angio{index}.png")


def test_adapt_writes_masks_probabilities_and_rows(adapted, tmp_path):
    write_images(tmp_path / "in")
    out = tmp_path / "out"
    assert cli.main(["adapt", str(tmp_path / "in"), "--output-dir", str(out), "--pipeline", str(adapted),
                     "--tile-size", "0"]) == 0
    pipe = AdaptDiffPipeline.from_pretrained(adapted)
    pipe.set_progress_bar_config(disable=True)
    for index in range(2):
        mask = np.asarray(PIL.Image.open(out / f"angio{index}_mask.png"))
        probability = np.asarray(PIL.Image.open(out / f"angio{index}_probability.png"))
        assert mask.shape == probability.shape == (20, 28) and set(np.unique(mask)) <= {0, 255}
        image = np.asarray(PIL.Image.open(tmp_path / "in" / f"angio{index}.png"))
        direct = pipe.segment(image, output_type="np")
        np.testing.assert_array_equal(mask > 0, direct.masks[0] > 0)  # the CLI is the pipeline's segment()
        np.testing.assert_allclose(probability / 255.0, direct.probabilities[0], atol=1 / 255 + 1e-6)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(row["name"] for row in rows) == ["angio0", "angio1"]
    # a rerun skips the finished images
    assert cli.main(["adapt", str(tmp_path / "in"), "--output-dir", str(out), "--pipeline", str(adapted),
                     "--tile-size", "0"]) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 2


def test_adapt_reads_through_the_pipelines_input_transform(tmp_path):
    from diffusers_retina.image_processing import source_intensity_transform

    tiny = tiny_adaptdiff()
    record = source_intensity_transform("invert+histmatch", [np.random.default_rng(1).random((16, 16, 3))])
    AdaptDiffPipeline(unet=tiny.unet, scheduler=tiny.scheduler, segmenter=tiny.segmenter,
                      input_transform=record).save_pretrained(tmp_path / "pipe")
    write_images(tmp_path / "in", count=1)
    out = tmp_path / "out"
    assert cli.main(["adapt", str(tmp_path / "in"), "--output-dir", str(out), "--pipeline", str(tmp_path / "pipe"),
                     "--tile-size", "0"]) == 0
    image = np.asarray(PIL.Image.open(tmp_path / "in" / "angio0.png"))
    probability = np.asarray(PIL.Image.open(out / "angio0_probability.png")) / 255.0
    tiny.set_progress_bar_config(disable=True)
    plain = tiny.segment(image, output_type="np").probabilities[0]  # the same segmenter without the transform
    assert np.abs(probability - plain).max() > 2 / 255
    assert json.loads((out / "summary.json").read_text())["settings"]["input_transform"] == "invert+histmatch"


def test_adapt_confident_labels_and_errors(adapted, tmp_path, capsys):
    write_images(tmp_path / "in", count=1)
    out = tmp_path / "out"
    assert cli.main(["adapt", str(tmp_path / "in"), "--output-dir", str(out), "--pipeline", str(adapted),
                     "--labels", "confident", "--confidence", "0.51", "--tile-size", "8"]) == 0
    assert set(np.unique(np.asarray(PIL.Image.open(out / "angio0_mask.png")))) <= {0, 128, 255}
    with pytest.raises(SystemExit) as error:
        cli.main(["adapt", str(tmp_path / "in"), "--output-dir", str(tmp_path / "bad"), "--pipeline", str(adapted),
                  "--tile-size", "5"])
    assert error.value.code != 0
    assert "--tile-size" in capsys.readouterr().err and not (tmp_path / "bad" / "results.jsonl").exists()
    with pytest.raises(SystemExit):
        cli.main(["adapt", str(tmp_path / "in"), "--output-dir", str(out), "--threshold", "1.5"])
