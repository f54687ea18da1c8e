"""Model cards render what the benchmarks measured: the comparison block of compare_segmentation.py --write-into and
the prior-anchored evaluation (evaluate_anchored.py --write-card)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "compare_segmentation.py"


def fake_evaluation(path: Path, dice: float) -> str:
    row = {"name": "pipeline", "metrics": {"dice": dice, "dice_std": 0.01, "cldice": dice - 0.02, "auc_roc": 0.97,
                                           "ece": 0.01, "hd95": 30.0}, "seconds_per_image": 12.0}
    path.write_text(json.dumps({"command": "python evaluate", "rows": [row], "machine": {"torch_threads": 2}}))
    return str(path)


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
@pytest.mark.parametrize("source, heading", [
    ("mask2image-chase", "Train on synthetic, test on real"),
    ("segmentation-ensemble-chase", None),
])
def test_comparison_is_written_into_the_card(tmp_path, source, heading):
    folder = tmp_path / source
    folder.mkdir()
    for name in ("model_index.json", "training_info.json", "evaluation.json"):  # the card's inputs, not the weights
        shutil.copy(REPO / "checkpoints" / source / name, folder / name)
    if source == "segmentation-ensemble-chase":
        shutil.copytree(REPO / "checkpoints" / source / "unet", folder / "unet",
                        ignore=shutil.ignore_patterns("*.safetensors"))
    args = [sys.executable, str(SCRIPT), "real=" + fake_evaluation(tmp_path / "a.json", 0.776),
            "synthetic=" + fake_evaluation(tmp_path / "b.json", 0.612), "--output", str(tmp_path / "out.json"),
            "--write-into", str(folder)] + (["--heading", heading] if heading else [])
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    card = (folder / "README.md").read_text()
    expected = heading or "Compared with other models"
    assert f"### {expected}" in card
    assert "| synthetic | 0.612 ± 0.010 |" in card and "| real | 0.776 ± 0.010 |" in card
    # the card keeps its own evaluation above the comparison
    own = json.loads((folder / "evaluation.json").read_text())
    assert own["comparison"]["heading"] == heading and card.index("Measured with") < card.index(f"### {expected}")


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_write_into_a_folder_without_evaluation_fails_clearly(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run([sys.executable, str(SCRIPT), "x=" + fake_evaluation(tmp_path / "a.json", 0.7),
                             "--output", str(tmp_path / "o.json"), "--write-into", str(tmp_path / "empty")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "evaluation.json" in result.stderr


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_a_named_row_can_be_compared(tmp_path):
    """LABEL=JSON#ROW takes that row (e.g. the deterministic baseline beside the diffusion model), not the first."""
    path = tmp_path / "a.json"
    fake_evaluation(path, 0.776)
    data = json.loads(path.read_text())
    data["rows"].append({**data["rows"][0], "name": "baseline, same budget",
                         "metrics": {**data["rows"][0]["metrics"], "dice": 0.799}})
    path.write_text(json.dumps(data))
    run = [sys.executable, str(SCRIPT), f"diffusion={path}", f"baseline={path}#baseline, same budget",
           "--output", str(tmp_path / "o.json")]
    result = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| diffusion | 0.776 ± 0.010 |" in result.stdout and "| baseline | 0.799 ± 0.010 |" in result.stdout
    run[-3] = f"baseline={path}#no such row"
    result = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "no such row" in result.stderr and "baseline, same budget" in result.stderr


def fake_anchored_table():
    row = {"dice_mean": 0.8123, "cldice_mean": 0.83, "auc_roc_mean": 0.98, "ece_mean": 0.012, "hd95_mean": 20.0,
           "nll_mean": 0.1, "brier_mean": 0.03, "seconds_per_image": 2.0, "entropy_auroc_errors": 0.9,
           "entropy_auroc_observer_disagreement": 0.8}
    return [{"label": "1. U-Net alone (the prior)", **row},
            {"label": "4a. Residual-anchored diffusion, 2 steps", **row, "dice_mean": 0.8234},
            {"label": "Second observer (2ndHO)", "dice_mean": 0.798}]


@pytest.mark.parametrize("source, label, dice", [
    ("vessel-segmenter-chase", "1. U-Net alone (the prior)", "0.8123"),
    ("segmentation-anchored-chase", "4a. Residual-anchored diffusion, 2 steps", "0.8234"),
])
def test_anchored_evaluation_writes_card_and_model_index(tmp_path, source, label, dice):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from evaluate_anchored import write_card

    folder = tmp_path / source
    shutil.copytree(REPO / "checkpoints" / source, folder, ignore=shutil.ignore_patterns("*.safetensors", "README.md",
                                                                                           "evaluation.json"))
    write_card(f"{label}={folder}", fake_anchored_table(), {"command": "python benchmarks/evaluate_anchored.py"})
    card = (folder / "README.md").read_text()
    evaluation = json.loads((folder / "evaluation.json").read_text())
    assert evaluation["row"] == label and evaluation["metrics"]["dice"] == float(dice)
    assert "model-index" in card and f"value: {dice}" in card and f"| {dice[:5]} |" in card
    assert f"**{label}**" in card and "Second observer" in card and "python benchmarks/evaluate_anchored.py" in card
    assert "license: cc-by-4.0" in card
    if source == "segmentation-anchored-chase":
        assert "Prior-anchored" in card and "out-of-fold" in card and "--objective supervised" in card
    with pytest.raises(SystemExit):
        write_card(f"no such row={folder}", fake_anchored_table(), {"command": "x"})


def test_anchored_evaluation_refuses_to_write_cards_from_a_partial_run(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from evaluate_anchored import parse_args

    for partial in (["--crop", "64"], ["--shift"], ["--images", "Image_11L"]):
        with pytest.raises(SystemExit) as raised:
            parse_args([*partial, "--segmenter", f"a={tmp_path}", "--write-card", f"a={tmp_path}"])
        assert raised.value.code == 2 and "only for the full evaluation" in capsys.readouterr().err


def test_anchored_merge_keeps_the_first_part_of_a_repeated_row(tmp_path):
    """A row measured again in a later part (row 1 re-timed beside a new row) is listed once, with the first part's
    figures; the new rows and every part's per-image records are kept; parts of different runs are refused."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from evaluate_anchored import merge, parse_args

    first, second = fake_anchored_table(), fake_anchored_table()
    for table in (first, second):
        table[-1]["kind"] = "observer"
    second[0] = {**second[0], "dice_mean": 0.5}
    second[1] = {**second[1], "label": "5b. MedSegDiff (reference), 2 steps", "dice_mean": 0.79}
    header = {"images": ["Image_11L"], "crop": 0, "shift": False}
    paths = []
    for index, (table, seconds) in enumerate([(first, 1.0), (second, 9.0)]):
        per_image = [{"image": "Image_11L", table[0]["label"]: {"seconds": seconds},
                      table[1]["label"]: {"seconds": seconds}}]
        paths.append(tmp_path / f"part{index}.json")
        paths[-1].write_text(json.dumps({**header, "rows": table, "per_image": per_image, "command": f"part {index}"}))
    merged = merge(parse_args(["--merge", *map(str, paths), "--output", str(tmp_path / "merged.json")]))
    labels = [r["label"] for r in merged["rows"]]
    assert labels == ["1. U-Net alone (the prior)", "4a. Residual-anchored diffusion, 2 steps",
                      "5b. MedSegDiff (reference), 2 steps", "Second observer (2ndHO)"]
    assert merged["rows"][0]["dice_mean"] == 0.8123
    record = merged["per_image"][0]
    assert record["1. U-Net alone (the prior)"]["seconds"] == 1.0
    assert record["5b. MedSegDiff (reference), 2 steps"]["seconds"] == 9.0
    paths[1].write_text(json.dumps({**header, "shift": True, "rows": second, "per_image": [{}], "command": "x"}))
    with pytest.raises(SystemExit):
        merge(parse_args(["--merge", *map(str, paths), "--output", str(tmp_path / "merged.json")]))


def test_label_efficiency_heads_pay_for_their_whole_photograph_features():
    """The U-Net's budget is each head's wall time: heads on whole-photograph features get no shared feature cache
    (a head trained after another on the same photographs would otherwise skip their extraction and shrink the
    budget); crop-feature heads keep it."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from label_efficiency import cache_arguments, parse_args

    assert cache_arguments(parse_args(["--feature-context", "image", "--work", "w"])) == []
    assert cache_arguments(parse_args(["--feature-context", "crop", "--work", "w"])) == ["--cache_dir",
                                                                                        str(Path("w") / "cache")]


def test_label_efficiency_merge_orders_rows_and_refuses_mismatched_runs(tmp_path):
    """Runs of one setting made side by side (N=20 | N=1,2,5) become one table ordered by N; a run of another
    setting, an unfinished run or a row present twice is refused."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from label_efficiency import merge, parse_args

    def row(n, method="PixelMLPEnsemble (anchor)", condition="clean"):
        return {"num_labelled": n, "method": method, "condition": condition, "head": "pixel_mlp", "folder": f"h{n}",
                "metrics": {"dice": 0.1 * n / 20, "cldice": 0.1, "auc_roc": 0.8}, "training_seconds": 1.0,
                "seconds_per_image": 2.0}

    def part(name, rows, **changes):
        data = {"ddpm": "ddpm", "setting": "8 test images", "rows": rows, "complete": True, "command": name, **changes}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(data))
        return str(path)

    a = part("a", [row(20), row(20, condition="shifted")])
    b = part("b", [row(1), row(5), row(2)])
    merged = merge(parse_args(["--merge", a, b, "--output", str(tmp_path / "m.json")]))
    assert [r["num_labelled"] for r in merged["rows"] if r["condition"] == "clean"] == [1, 2, 5, 20]
    assert len(merged["rows"]) == 5 and merged["merged_from"] == ["a", "b"] and "wait" in merged["command"]
    assert json.loads((tmp_path / "m.json").read_text())["rows"] == merged["rows"]
    for bad in (part("c", [row(2)], setting="other crops"), part("d", [row(3)], complete=False),
                part("e", [row(20)])):
        with pytest.raises(SystemExit):
            merge(parse_args(["--merge", a, bad, "--output", str(tmp_path / "x.json")]))
